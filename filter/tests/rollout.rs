//! The progressive rollout: schedule, gate, rollback and promotion, driven
//! with explicit time through the calls the glue makes, on a `MemoryStore`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::config::Config;
use sluice::rollout::{
    self, advance, due, initial, record, view, RolloutConfig, RolloutEvent, RolloutState,
    RolloutView,
};
use sluice::shared::{ensure, update, MemoryStore, SharedStore};
use sluice::testing::Interleaved;
use std::cell::RefCell;

/// 1_795_000_000 s, the documented example's start.
const START: u64 = 1_795_000_000_000;
const STEP: u64 = 300_000;

const EXAMPLE: &str = r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000000}"#;

/// A `rollout` block, read as part of a config (its path is
/// `services[0].rollout`).
fn parse(json: &str) -> Result<RolloutConfig, String> {
    let document = format!(
        r#"{{"services": [{{"name": "shop", "stable": "shop_v1", "canary": "shop_v2", "rollout": {json}}}]}}"#
    );
    let mut config = Config::parse(document.as_bytes()).map_err(|err| err.to_string())?;
    Ok(config.services.remove(0).rollout.unwrap())
}

fn config(json: &str) -> RolloutConfig {
    parse(json).unwrap()
}

fn refused(json: &str) -> String {
    match parse(json) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(err) => err,
    }
}

/// One worker's calls, as the glue makes them.
struct Worker<'a, S: SharedStore> {
    store: &'a S,
    key: String,
    config: RolloutConfig,
}

impl<'a, S: SharedStore> Worker<'a, S> {
    /// What `on_configure` does: derive the key, create the state if new.
    fn apply(store: &'a S, config: &RolloutConfig, now: u64) -> Self {
        let key = rollout::state_key("shop", "shop_v1", "shop_v2", config);
        ensure(store, &key, &initial(config, now));
        Worker {
            store,
            key,
            config: config.clone(),
        }
    }

    fn bytes(&self) -> Option<Vec<u8>> {
        self.store.get(&self.key).map(|(bytes, _)| bytes)
    }

    fn view(&self, now: u64) -> RolloutView {
        view(self.bytes().as_deref(), &self.config, now)
    }

    fn weight(&self, now: u64) -> u16 {
        self.view(now).weight_bp
    }

    fn record(&self, now: u64, failed: bool) -> Option<RolloutEvent> {
        update(self.store, &self.key, |bytes| {
            record(bytes, &self.config, now, failed)
        })
        .unwrap()
    }

    /// What `on_tick` does.
    fn tick(&self, now: u64) -> Option<RolloutEvent> {
        if !due(self.bytes().as_deref(), &self.config, now) {
            return None;
        }
        update(self.store, &self.key, |bytes| {
            advance(bytes, &self.config, now)
        })
        .unwrap()
    }

    /// `n` canary requests at `now`, the first `failures` of them failed;
    /// returns the events they produced.
    fn traffic(&self, now: u64, n: u32, failures: u32) -> Vec<RolloutEvent> {
        (0..n)
            .filter_map(|i| self.record(now, i < failures))
            .collect()
    }
}

#[test]
fn the_documented_example_parses() {
    let parsed = config(EXAMPLE);
    assert_eq!(
        parsed,
        RolloutConfig {
            steps_bp: vec![500, 2500, 5000, 10_000],
            step_ms: 300_000,
            max_failure_ppm: 20_000,
            min_requests: 100,
            start_ms: Some(START),
        }
    );
    let defaults = config(r#"{"steps": [0.5, 12.25], "step_s": 1, "max_failure_rate": 0}"#);
    assert_eq!(defaults.steps_bp, vec![50, 1225]);
    assert_eq!((defaults.min_requests, defaults.start_ms), (100, None));
}

#[test]
fn each_refusal_names_the_path_and_the_reason() {
    let hundred_and_one = format!(
        r#"{{"steps": [{}], "step_s": 1, "max_failure_rate": 0.1}}"#,
        vec!["1"; 101].join(",")
    );
    let cases: &[(&str, &str)] = &[
        ("5", "services[0].rollout: must be an object, got a number"),
        (r#"{"step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps: is required"),
        (r#"{"steps": [], "step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps: must list 1 to 100 steps, got 0"),
        (&hundred_and_one, "services[0].rollout.steps: must list 1 to 100 steps, got 101"),
        (r#"{"steps": [5, 101], "step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps[1]: must be between 0 and 100, got 101"),
        (r#"{"steps": [5, 12.345], "step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps[1]: resolution is 0.01 percent, got 12.345"),
        (r#"{"steps": [5, 25, 10], "step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps[2]: must not be below the previous step (25), got 10"),
        (r#"{"steps": ["5"], "step_s": 1, "max_failure_rate": 0.1}"#, "services[0].rollout.steps[0]: must be a number, got a string"),
        (r#"{"steps": [5], "max_failure_rate": 0.1}"#, "services[0].rollout.step_s: is required"),
        (r#"{"steps": [5], "step_s": 0, "max_failure_rate": 0.1}"#, "services[0].rollout.step_s: must be between 1 and 31536000, got 0"),
        (r#"{"steps": [5], "step_s": 1}"#, "services[0].rollout.max_failure_rate: is required"),
        (r#"{"steps": [5], "step_s": 1, "max_failure_rate": 1.5}"#, "services[0].rollout.max_failure_rate: must be between 0 and 1, got 1.5"),
        (r#"{"steps": [5], "step_s": 1, "max_failure_rate": 0.1, "min_requests": 0}"#, "services[0].rollout.min_requests: must be between 1 and 1000000000, got 0"),
        (r#"{"steps": [5], "step_s": 1, "max_failure_rate": 0.1, "start_unix_s": -1}"#, "services[0].rollout.start_unix_s: must be a whole number between 0 and 32503680000, got -1"),
        (r#"{"steps": [5], "step_s": 1, "max_failure_rate": 0.1, "start": 1}"#, "services[0].rollout.start: unknown key (expected one of: steps, step_s, max_failure_rate, min_requests, start_unix_s)"),
    ];
    for (json, expected) in cases {
        assert_eq!(&refused(json), expected, "for {json}");
    }
}

#[test]
fn the_weight_follows_the_schedule_and_promotes_after_the_last_step() {
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &config(EXAMPLE), START - 3_600_000);
    // Before the start: nothing to canary yet.
    assert_eq!(
        worker.view(START - 1),
        RolloutView {
            weight_bp: 0,
            state: RolloutState::Pending,
            next_change_ms: Some(START)
        }
    );
    let expected = [(500, 0), (2500, 1), (5000, 2), (10_000, 3)];
    for (index, (weight, step)) in expected.iter().enumerate() {
        let begins = START + index as u64 * STEP;
        for now in [begins, begins + STEP / 2, begins + STEP - 1] {
            assert_eq!(
                worker.view(now),
                RolloutView {
                    weight_bp: *weight,
                    state: RolloutState::Progressing { step: *step },
                    next_change_ms: Some(begins + STEP),
                },
                "at {now}"
            );
        }
    }
    let end = START + 4 * STEP;
    assert_eq!(
        worker.view(end),
        RolloutView {
            weight_bp: 10_000,
            state: RolloutState::Promoted,
            next_change_ms: None
        }
    );
    assert_eq!(worker.view(end + 86_400_000).state, RolloutState::Promoted);
    assert_eq!(
        [
            RolloutState::Progressing { step: 0 },
            RolloutState::RolledBack { step: 0 },
            RolloutState::Promoted,
            RolloutState::Pending
        ]
        .map(RolloutState::gauge),
        [0, 1, 2, 3]
    );
}

#[test]
fn a_schedule_that_stops_short_of_100_still_promotes_to_100() {
    let settings = config(
        r#"{"steps": [10, 50], "step_s": 60, "max_failure_rate": 0.1, "start_unix_s": 1795000000}"#,
    );
    assert_eq!(view(None, &settings, START + 119_999).weight_bp, 5000);
    assert_eq!(view(None, &settings, START + 120_000).weight_bp, 10_000);
}

#[test]
fn without_start_unix_s_the_first_application_starts_the_rollout() {
    let settings = config(r#"{"steps": [5, 25], "step_s": 60, "max_failure_rate": 0.02}"#);
    let store = MemoryStore::default();
    let first = Worker::apply(&store, &settings, START);
    // Another VM (or a config push with the same block) applies it later:
    // the recorded start stays.
    let second = Worker::apply(&store, &settings, START + 50_000);
    assert_eq!(second.key, first.key);
    assert_eq!(second.view(START + 59_999).weight_bp, 500);
    assert_eq!(second.view(START + 60_000).weight_bp, 2500);
    assert_eq!(
        first.view(START + 60_000).next_change_ms,
        Some(START + 120_000)
    );
    assert_eq!(first.view(START + 120_000).state, RolloutState::Promoted);
    // The recorded start is never "pending": a clock stepped back stays on step 0.
    assert_eq!(
        first.view(START - 10_000).state,
        RolloutState::Progressing { step: 0 }
    );
}

#[test]
fn keys_follow_the_block_and_the_clusters() {
    let base = config(EXAMPLE);
    let key = rollout::state_key("shop", "shop_v1", "shop_v2", &base);
    assert!(key.starts_with("sluice/rollout/shop/"), "{key}");
    // Unchanged block (however spelled): same key, so the state carries over.
    let respelled = config(
        r#"{"start_unix_s": 1795000000, "min_requests": 100, "max_failure_rate": 0.020, "step_s": 300, "steps": [5.0, 25, 50, 100]}"#,
    );
    assert_eq!(
        key,
        rollout::state_key("shop", "shop_v1", "shop_v2", &respelled)
    );
    // Any change starts a new rollout.
    for changed in [
        r#"{"steps": [5, 25, 50], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000000}"#,
        r#"{"steps": [5, 25, 50, 100], "step_s": 301, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000000}"#,
        r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.03, "min_requests": 100, "start_unix_s": 1795000000}"#,
        r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 101, "start_unix_s": 1795000000}"#,
        r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000001}"#,
        r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100}"#,
    ] {
        assert_ne!(
            key,
            rollout::state_key("shop", "shop_v1", "shop_v2", &config(changed)),
            "{changed}"
        );
    }
    // A new canary build under a new cluster name is a new rollout.
    assert_ne!(key, rollout::state_key("shop", "shop_v1", "shop_v3", &base));
    assert_ne!(key, rollout::state_key("shop", "shop_v0", "shop_v2", &base));
    assert_ne!(key, rollout::state_key("cart", "shop_v1", "shop_v2", &base));
    // Cluster names are length-prefixed: moving a character across does not collide.
    assert_ne!(
        rollout::state_key("s", "ab", "c", &base),
        rollout::state_key("s", "a", "bc", &base)
    );
}

#[test]
fn a_failing_canary_is_rolled_back_until_the_block_changes() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    let now = START + STEP + 10; // step 2 (25 %)
                                 // 97 good, then failures: the third failure in 100 requests is 3 % > 2 %.
    assert_eq!(
        worker.traffic(now, 97, 0),
        vec![RolloutEvent::Step {
            step: 1,
            steps: 4,
            weight_bp: 2500
        }]
    );
    assert_eq!(worker.record(now, true), None);
    assert_eq!(worker.record(now, true), None);
    let event = worker.record(now, true).expect("3 of 100 failed");
    assert_eq!(
        event,
        RolloutEvent::RolledBack {
            step: 1,
            steps: 4,
            weight_bp: 2500,
            requests: 100,
            failures: 3,
            max_failure_ppm: 20_000,
            min_requests: 100
        }
    );
    assert!(event.is_rollback());
    assert_eq!(
        event.log_line("shop"),
        "sluice: rollout of service shop: rolled back at step 2/4 (25%): canary failure rate 0.030 > 0.02 over 100 requests; canary weight 0 until the rollout block or the clusters change"
    );
    // Weight 0 from now on, through later steps and past the schedule's end.
    for later in [now, START + 3 * STEP, START + 10 * STEP] {
        assert_eq!(
            worker.view(later),
            RolloutView {
                weight_bp: 0,
                state: RolloutState::RolledBack { step: 1 },
                next_change_ms: None
            }
        );
    }
    // Reported once: later outcomes and ticks say nothing more.
    assert_eq!(worker.traffic(now, 50, 50), vec![]);
    assert_eq!(worker.tick(START + 3 * STEP), None);
    assert_eq!(
        worker.traffic(START + 3 * STEP, 5, 0),
        vec![],
        "no step announced after a rollback"
    );
    assert_eq!(
        advance(worker.bytes().as_deref(), &settings, START + 10 * STEP).1,
        None
    );
    assert!(!due(
        worker.bytes().as_deref(),
        &settings,
        START + 10 * STEP
    ));
    // The same block applied again keeps it rolled back.
    let again = Worker::apply(&store, &settings, START + 2 * STEP);
    assert_eq!(again.weight(START + 2 * STEP), 0);
    // A changed block (here a new start) is a new rollout.
    let retry = Worker::apply(
        &store,
        &config(
            r#"{"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000600}"#,
        ),
        START + 2 * STEP,
    );
    assert_eq!(retry.weight(START + 2 * STEP), 500);
}

#[test]
fn a_failure_rate_at_the_limit_passes() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    // 2 of 100 is exactly 2 %: at or below the limit is fine.
    assert_eq!(
        worker.traffic(START, 100, 2),
        vec![RolloutEvent::Step {
            step: 0,
            steps: 4,
            weight_bp: 500
        }]
    );
    assert_eq!(worker.weight(START), 500);
    // Then it must stay there: 3 of 101 is above.
    assert!(worker.record(START, true).is_some_and(|e| e.is_rollback()));
}

#[test]
fn failures_that_already_decide_the_gate_roll_back_early() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    // Two failures in the first requests could still be 2 % of 100: wait.
    assert_eq!(
        worker.traffic(START, 2, 2),
        vec![RolloutEvent::Step {
            step: 0,
            steps: 4,
            weight_bp: 500
        }]
    );
    assert_eq!(worker.weight(START), 500);
    // A third cannot be: 3/100 > 2 % whatever comes next.
    let event = worker.record(START, true).expect("decided");
    assert!(event.is_rollback());
    assert_eq!(
        event.to_string(),
        "rolled back at step 1/4 (5%): 3 canary failures in 3 requests already exceed 0.02 of 100; canary weight 0 until the rollout block or the clusters change"
    );
    assert_eq!(worker.weight(START), 0);
}

#[test]
fn a_step_without_enough_requests_does_not_hold_the_schedule_but_its_counts_carry_over() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    // Step 1: 50 requests, 1 failure: too few to judge.
    worker.traffic(START, 50, 1);
    // The clock moves the rollout on regardless.
    assert_eq!(worker.weight(START + STEP), 2500);
    // Step 2: the counts go on from 50/1; two more failures in 50 make 3/100.
    worker.traffic(START + STEP, 48, 0);
    assert_eq!(worker.record(START + STEP, true), None);
    assert!(
        worker
            .record(START + STEP, true)
            .is_some_and(|e| e.is_rollback()),
        "3 of 100 across two steps"
    );
}

#[test]
fn a_step_that_passed_the_gate_starts_the_next_with_fresh_counts() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    // Step 1: 100 requests, 2 failures: passed.
    worker.traffic(START, 100, 2);
    // Step 2: two failures in 100 again is fine, because step 1's do not count.
    let events = worker.traffic(START + STEP, 100, 2);
    assert_eq!(
        events,
        vec![RolloutEvent::Step {
            step: 1,
            steps: 4,
            weight_bp: 2500
        }]
    );
    assert_eq!(worker.weight(START + STEP), 2500);
}

#[test]
fn steps_and_promotion_are_announced_once() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let a = Worker::apply(&store, &settings, START);
    let b = Worker::apply(&store, &settings, START);
    let mut events = Vec::new();
    // Two workers tick every second through the whole schedule and past it.
    for second in 0..(5 * STEP / 1000) {
        let now = START - 2_000 + second * 1000;
        events.extend(a.tick(now));
        events.extend(b.tick(now + 500));
    }
    assert_eq!(
        events,
        vec![
            RolloutEvent::Step {
                step: 0,
                steps: 4,
                weight_bp: 500
            },
            RolloutEvent::Step {
                step: 1,
                steps: 4,
                weight_bp: 2500
            },
            RolloutEvent::Step {
                step: 2,
                steps: 4,
                weight_bp: 5000
            },
            RolloutEvent::Step {
                step: 3,
                steps: 4,
                weight_bp: 10_000
            },
            RolloutEvent::Promoted,
        ]
    );
    assert_eq!(
        events[1].log_line("shop"),
        "sluice: rollout of service shop: step 2/4, canary weight 25%"
    );
    assert_eq!(events[4].to_string(), "promoted, canary weight 100%");
    assert!(!due(a.bytes().as_deref(), &settings, START + 5 * STEP));
    // Once promoted, failures change nothing.
    assert_eq!(a.traffic(START + 5 * STEP, 100, 100), vec![]);
    assert_eq!(a.weight(START + 5 * STEP), 10_000);
}

#[test]
fn a_quiet_proxy_skips_announcements_to_the_current_step() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START);
    assert_eq!(
        worker.tick(START + 2 * STEP + 1),
        Some(RolloutEvent::Step {
            step: 2,
            steps: 4,
            weight_bp: 5000
        })
    );
    assert_eq!(worker.tick(START + 2 * STEP + 2), None);
}

#[test]
fn the_rate_limits_are_inclusive_at_both_ends() {
    // max_failure_rate 1: never rolled back.
    let lenient = config(
        r#"{"steps": [50], "step_s": 60, "max_failure_rate": 1, "min_requests": 1, "start_unix_s": 1795000000}"#,
    );
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &lenient, START);
    assert!(worker
        .traffic(START, 500, 500)
        .iter()
        .all(|event| !event.is_rollback()));
    assert_eq!(worker.weight(START), 5000);
    // max_failure_rate 0: the first failure.
    let strict = config(
        r#"{"steps": [50], "step_s": 60, "max_failure_rate": 0, "start_unix_s": 1795000000}"#,
    );
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &strict, START);
    assert!(worker
        .traffic(START, 500, 0)
        .iter()
        .all(|event| !event.is_rollback()));
    assert!(worker.record(START, true).is_some_and(|e| e.is_rollback()));
}

#[test]
fn nothing_is_counted_before_the_start() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let worker = Worker::apply(&store, &settings, START - 60_000);
    assert_eq!(worker.traffic(START - 1, 100, 100), vec![]);
    assert_eq!(worker.weight(START), 500);
    assert!(due(worker.bytes().as_deref(), &settings, START));
    assert!(!due(worker.bytes().as_deref(), &settings, START - 1));
}

#[test]
fn only_the_worker_whose_write_rolls_back_reports_it() {
    let settings = config(EXAMPLE);
    let store = MemoryStore::default();
    let a = Worker::apply(&store, &settings, START);
    let b = Worker::apply(&store, &settings, START);
    a.traffic(START, 2, 2);
    // Both finish a failed canary request; B's write lands between A's read and write.
    let b_event = RefCell::new(None);
    let meddling = Interleaved::new(&store, || {
        *b_event.borrow_mut() = Some(b.record(START, true))
    });
    let a_event = update(&meddling, &a.key, |bytes| {
        record(bytes, &settings, START, true)
    })
    .unwrap();
    drop(meddling);
    let b_event = b_event.into_inner().unwrap();
    assert!(b_event.is_some_and(|e| e.is_rollback()), "{b_event:?}");
    assert_eq!(a_event, None);
    // A's failure was not lost either: it was counted on top of B's.
    assert_eq!(a.weight(START), 0);
}

#[test]
fn garbage_bytes_are_a_fresh_rollout() {
    let settings = config(EXAMPLE);
    let fresh = initial(&settings, START);
    let mut seed = 7u64;
    let mut next = move || {
        seed = sluice::sticky::mix(seed.wrapping_add(1));
        seed
    };
    let mut blobs: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![1],
        vec![0xff; fresh.len()],
        vec![2; fresh.len()],
    ];
    for length in [1, fresh.len() - 1, fresh.len(), fresh.len() + 1, 500] {
        for _ in 0..300 {
            blobs.push((0..length).map(|_| next() as u8).collect());
        }
    }
    for _ in 0..300 {
        let mut blob: Vec<u8> = (0..fresh.len()).map(|_| next() as u8).collect();
        blob[0] = 1;
        blob[1] = (next() % 2) as u8;
        blobs.push(blob);
    }
    for blob in &blobs {
        for now in [0, START, START + 2 * STEP, u64::MAX] {
            let shown = view(Some(blob), &settings, now);
            assert!(shown.weight_bp <= 10_000);
            let (bytes, _) = record(Some(blob), &settings, now, true);
            assert_eq!(bytes.len(), fresh.len());
            let (bytes, _) = advance(Some(blob), &settings, now);
            assert_eq!(bytes.len(), fresh.len());
            let _ = due(Some(blob), &settings, now);
        }
    }
    // Unreadable bytes read as a rollout that has not rolled back.
    for blob in [
        Vec::new(),
        vec![2u8; fresh.len()],
        vec![1u8; fresh.len() + 1],
    ] {
        assert_eq!(view(Some(&blob), &settings, START).weight_bp, 500);
        assert!(
            due(Some(&blob), &settings, START),
            "garbage is rewritten by the next tick"
        );
    }
    // Without start_unix_s, missing bytes are a rollout starting now; the
    // first write records that start.
    let unscheduled = config(r#"{"steps": [5, 25], "step_s": 60, "max_failure_rate": 0.02}"#);
    assert_eq!(view(None, &unscheduled, START).weight_bp, 500);
    let (bytes, event) = advance(None, &unscheduled, START);
    assert_eq!(
        event,
        Some(RolloutEvent::Step {
            step: 0,
            steps: 2,
            weight_bp: 500
        })
    );
    assert_eq!(
        view(Some(&bytes), &unscheduled, START + 60_000).weight_bp,
        2500
    );
}
