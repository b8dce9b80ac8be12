//! The circuit breaker's state machine, driven with explicit time and
//! randomness through the same calls the glue makes, on a `MemoryStore`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::breaker::{
    self, admit_held, check_run, is_failure, open_duration, record_held, release,
    retry_after_seconds, state, Admission, BreakerConfig, BreakerState, Check, Outcome,
    PendingSuccesses, ProbeToken, Reason, Transition, PROBES_BUSY_RETRY_MS, PROBE_LEASE_MS,
};
use sluice::config::Config;
use sluice::shared::{ensure, update, MemoryStore, SharedStore};
use sluice::sticky::Rng;
use sluice::testing::Interleaved;
use std::cell::RefCell;

/// The verdict at request start, without the run flag.
fn check(bytes: Option<&[u8]>, config: &BreakerConfig, now: u64) -> Check {
    check_run(bytes, config, now).0
}

/// A probe admission with no held successes to book.
fn admit(
    bytes: Option<&[u8]>,
    config: &BreakerConfig,
    now: u64,
) -> (Vec<u8>, (Admission, Option<Transition>)) {
    admit_held(bytes, config, now, &PendingSuccesses::new())
}

/// One finished request booked on its own.
fn record(
    bytes: Option<&[u8]>,
    config: &BreakerConfig,
    now: u64,
    outcome: Outcome,
    probe: Option<ProbeToken>,
    random: u64,
) -> (Vec<u8>, Option<Transition>) {
    let (bytes, (transition, _, _)) = record_held(
        bytes,
        config,
        now,
        &PendingSuccesses::new(),
        Some((outcome, probe)),
        random,
    );
    (bytes, transition)
}

const T0: u64 = 1_795_000_000_000;

/// A `breaker` block, read as part of a config (its path is
/// `services[0].breaker`).
fn parse(json: &str) -> Result<BreakerConfig, String> {
    let document =
        format!(r#"{{"services": [{{"name": "shop", "stable": "shop_v1", "breaker": {json}}}]}}"#);
    let mut config = Config::parse(document.as_bytes()).map_err(|err| err.to_string())?;
    Ok(config.services.remove(0).breaker.unwrap())
}

fn config(json: &str) -> BreakerConfig {
    parse(json).unwrap()
}

fn refused(json: &str) -> String {
    match parse(json) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(err) => err,
    }
}

fn ok(ms: u64) -> Outcome {
    Outcome {
        attempts: 1,
        failed: false,
        duration_ms: ms,
    }
}

fn fail() -> Outcome {
    Outcome {
        attempts: 1,
        failed: true,
        duration_ms: 5,
    }
}

/// One worker's view of the glue: the calls it makes at request start and
/// end, through `shared::update` like the filter does.
struct Worker<'a, S: SharedStore> {
    store: &'a S,
    key: String,
    config: BreakerConfig,
    rng: RefCell<Rng>,
}

impl<'a, S: SharedStore> Worker<'a, S> {
    fn new(store: &'a S, config: &BreakerConfig, seed: u64) -> Self {
        let key = breaker::state_key("shop", "shop_v1", config);
        ensure(store, &key, &breaker::initial());
        Worker {
            store,
            key,
            config: config.clone(),
            rng: RefCell::new(Rng::new(seed)),
        }
    }

    fn bytes(&self) -> Option<Vec<u8>> {
        self.store.get(&self.key).map(|(bytes, _)| bytes)
    }

    fn start(&self, now: u64) -> (Admission, Option<Transition>) {
        match check(self.bytes().as_deref(), &self.config, now) {
            Check::Allowed => (Admission::Allowed, None),
            Check::Rejected { retry_after_ms } => (Admission::Rejected { retry_after_ms }, None),
            Check::TryProbe => update(self.store, &self.key, |bytes| {
                admit(bytes, &self.config, now)
            })
            .expect("CAS attempts exhausted"),
        }
    }

    fn end(&self, now: u64, outcome: Outcome, probe: Option<ProbeToken>) -> Option<Transition> {
        let random = self.rng.borrow_mut().next_u64();
        update(self.store, &self.key, |bytes| {
            record(bytes, &self.config, now, outcome, probe, random)
        })
        .expect("CAS attempts exhausted")
    }

    /// A whole request admitted while closed.
    fn request(&self, now: u64, outcome: Outcome) -> Option<Transition> {
        assert_eq!(self.start(now), (Admission::Allowed, None), "at {now}");
        self.end(now, outcome, None)
    }

    fn state(&self, now: u64) -> BreakerState {
        state(self.bytes().as_deref(), &self.config, now)
    }

    fn probe(&self, now: u64) -> (ProbeToken, Option<Transition>) {
        match self.start(now) {
            (Admission::Probe(token), transition) => (token, transition),
            other => panic!("expected a probe at {now}, got {other:?}"),
        }
    }

    /// Trips a fresh breaker with `consecutive_failures` failures at `now`.
    fn trip(&self, now: u64) -> Transition {
        let limit = self
            .config
            .consecutive_failures
            .expect("test config needs consecutive_failures");
        for _ in 1..limit {
            assert_eq!(self.request(now, fail()), None);
        }
        self.request(now, fail()).expect("the last failure trips")
    }
}

#[test]
fn defaults_are_documented_values() {
    let defaults = config("{}");
    assert_eq!(
        defaults,
        BreakerConfig {
            window_ms: 10_000,
            min_requests: 20,
            failure_rate_ppm: 500_000,
            consecutive_failures: None,
            slow: None,
            open_ms: 5_000,
            max_open_ms: 60_000,
            half_open_requests: 3,
        }
    );
    // An open time above the default cap raises the cap instead of refusing.
    let long = config(r#"{"open_ms": 120000}"#);
    assert_eq!((long.open_ms, long.max_open_ms), (120_000, 120_000));
}

#[test]
fn the_documented_example_parses() {
    let parsed = config(
        r#"{"window_s": 10, "min_requests": 20, "failure_rate": 0.5, "consecutive_failures": 5,
            "slow_ms": 1000, "slow_rate": 0.8, "open_ms": 5000, "max_open_ms": 60000, "half_open_requests": 3}"#,
    );
    assert_eq!(parsed.consecutive_failures, Some(5));
    let slow = parsed.slow.unwrap();
    assert_eq!((slow.threshold_ms, slow.rate_ppm), (1000, 800_000));
    assert_eq!(parsed.failure_rate_ppm, 500_000);
}

#[test]
fn rates_are_exact_decimals_in_ppm() {
    let rate = |text: &str| config(&format!(r#"{{"failure_rate": {text}}}"#)).failure_rate_ppm;
    assert_eq!(rate("0.25"), 250_000);
    assert_eq!(rate("1"), 1_000_000);
    assert_eq!(rate("5e-2"), 50_000);
    assert_eq!(rate("0.3333333"), 333_333);
    assert_eq!(rate("0.9999995"), 1_000_000);
    // Above zero but below a ppm: at least 1 ppm, never 0.
    assert_eq!(rate("0.0000001"), 1);
    assert_eq!(rate("1e-30"), 1);
}

#[test]
fn each_refusal_names_the_path_and_the_reason() {
    let cases: &[(&str, &str)] = &[
        (r#"[]"#, "services[0].breaker: must be an object, got a list"),
        (r#"{"window_s": 0}"#, "services[0].breaker.window_s: must be between 1 and 300, got 0"),
        (r#"{"window_s": 301}"#, "services[0].breaker.window_s: must be between 1 and 300, got 301"),
        (r#"{"window_s": 1.5}"#, "services[0].breaker.window_s: must be a whole number between 1 and 300, got 1.5"),
        (r#"{"failure_rate": 0}"#, "services[0].breaker.failure_rate: must be above 0 (0 would trip on the first call)"),
        (r#"{"failure_rate": 1.5}"#, "services[0].breaker.failure_rate: must be between 0 and 1, got 1.5"),
        (r#"{"failure_rate": 0.0e5}"#, "services[0].breaker.failure_rate: must be above 0 (0 would trip on the first call)"),
        (r#"{"slow_ms": 10, "slow_rate": -0.5}"#, "services[0].breaker.slow_rate: must be between 0 and 1, got -0.5"),
        (r#"{"min_requests": 0}"#, "services[0].breaker.min_requests: must be between 1 and 1000000, got 0"),
        (r#"{"consecutive_failures": 0}"#, "services[0].breaker.consecutive_failures: must be between 1 and 1000000, got 0"),
        (r#"{"slow_ms": 1000}"#, "services[0].breaker.slow_rate: is required with slow_ms (which share of calls may be slow)"),
        (r#"{"slow_rate": 0.5}"#, "services[0].breaker.slow_ms: is required with slow_rate (how long a call must take to be slow)"),
        (r#"{"open_ms": 5000, "max_open_ms": 1000}"#, "services[0].breaker.max_open_ms: must be at least open_ms (5000), got 1000"),
        (r#"{"half_open_requests": 0}"#, "services[0].breaker.half_open_requests: must be between 1 and 100, got 0"),
        (r#"{"half_open_requests": 101}"#, "services[0].breaker.half_open_requests: must be between 1 and 100, got 101"),
        (r#"{"open_ms": "5s"}"#, "services[0].breaker.open_ms: must be a whole number, got a string"),
        (r#"{"windows": 10}"#, "services[0].breaker.windows: unknown key (expected one of: window_s, min_requests, failure_rate, consecutive_failures, slow_ms, slow_rate, open_ms, max_open_ms, half_open_requests)"),
    ];
    for (json, expected) in cases {
        assert_eq!(&refused(json), expected, "for {json}");
    }
}

#[test]
fn the_key_follows_the_block_not_its_spelling() {
    let base = config(r#"{"failure_rate": 0.5}"#);
    let key = breaker::state_key("shop", "shop_v1", &base);
    assert!(key.starts_with("sluice/breaker/v2/shop/shop_v1/"), "{key}");
    // The same settings, spelled out with defaults: the same breaker.
    assert_eq!(
        key,
        breaker::state_key("shop", "shop_v1", &config(r#"{"window_s": 10}"#))
    );
    // Any changed setting, cluster or service: another breaker.
    assert_ne!(
        key,
        breaker::state_key("shop", "shop_v1", &config(r#"{"failure_rate": 0.6}"#))
    );
    assert_ne!(
        key,
        breaker::state_key(
            "shop",
            "shop_v1",
            &config(r#"{"slow_ms": 1, "slow_rate": 1}"#)
        )
    );
    assert_ne!(key, breaker::state_key("shop", "shop_v2", &base));
    assert_ne!(key, breaker::state_key("cart", "shop_v1", &base));
}

#[test]
fn failures_are_5xx_and_upstream_failures() {
    assert!(!is_failure(Some(200), 0));
    assert!(!is_failure(Some(404), 0));
    assert!(!is_failure(Some(499), 0));
    assert!(is_failure(Some(500), 0));
    assert!(is_failure(Some(503), 0));
    assert!(!is_failure(Some(600), 0));
    // UF (connection failure) with no response, UT (timeout), UR (reset).
    assert!(is_failure(None, 0x20));
    assert!(is_failure(Some(504), 0x4));
    assert!(is_failure(None, 0x10));
    // LR alone: the client went away, nothing learnt about the upstream.
    assert!(!is_failure(None, 0x8));
    assert!(!is_failure(None, 0));
}

#[test]
fn retried_attempts_count_as_failed_calls() {
    let retried = Outcome {
        attempts: 3,
        failed: false,
        duration_ms: 10,
    };
    assert_eq!(
        (retried.calls(), retried.failures(), retried.any_failure()),
        (3, 2, true)
    );
    let failed = Outcome {
        attempts: 2,
        failed: true,
        duration_ms: 10,
    };
    assert_eq!((failed.calls(), failed.failures()), (2, 2));
    let zero = Outcome {
        attempts: 0,
        failed: false,
        duration_ms: 10,
    };
    assert_eq!(
        (zero.calls(), zero.failures(), zero.any_failure()),
        (1, 0, false)
    );

    // Ten requests that each needed one retry: 20 calls, 10 failed: 0.5.
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config("{}"), 1);
    let once_retried = Outcome {
        attempts: 2,
        failed: false,
        duration_ms: 10,
    };
    for _ in 0..9 {
        assert_eq!(worker.request(T0, once_retried), None);
    }
    let trip = worker
        .request(T0, once_retried)
        .expect("20 calls, 10 failed");
    assert_eq!(
        trip.reason,
        Reason::FailureRate {
            failures: 10,
            calls: 20,
            threshold_ppm: 500_000,
            window_s: 10
        }
    );
}

#[test]
fn closed_opens_when_the_failure_rate_reaches_the_threshold() {
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config("{}"), 1);
    // 11 successes and 8 failures: 19 calls, below min_requests.
    for _ in 0..11 {
        assert_eq!(worker.request(T0, ok(5)), None);
    }
    for _ in 0..8 {
        assert_eq!(worker.request(T0 + 100, fail()), None);
    }
    // 20 calls at 0.45: still closed.
    assert_eq!(worker.request(T0 + 200, fail()), None);
    assert_eq!(worker.state(T0 + 200), BreakerState::Closed);
    // 21 calls, 10 failed: 0.476. 22 calls, 11 failed: 0.5 trips.
    assert_eq!(worker.request(T0 + 300, fail()), None);
    let trip = worker
        .request(T0 + 400, fail())
        .expect("0.5 over 22 calls trips");
    assert_eq!(
        (trip.from, trip.to, trip.is_trip()),
        (BreakerState::Closed, BreakerState::Open, true)
    );
    assert_eq!(
        trip.reason,
        Reason::FailureRate {
            failures: 11,
            calls: 22,
            threshold_ppm: 500_000,
            window_s: 10
        }
    );
    let open_ms = trip.open_ms.unwrap();
    assert!((5_000..=6_000).contains(&open_ms), "{open_ms}");
    assert_eq!(
        trip.log_line("shop", "shop_v1"),
        format!(
            "sluice: breaker of service shop, cluster shop_v1: closed -> open: failure rate 0.50 >= 0.5 over 22 requests in 10s; probing again in {}",
            if open_ms.is_multiple_of(1000) { format!("{}s", open_ms / 1000) } else { format!("{:.1}s", open_ms as f64 / 1000.0) }
        )
    );
    assert_eq!(worker.state(T0 + 400), BreakerState::Open);
    assert_eq!(BreakerState::Open.gauge(), 1);
}

#[test]
fn rates_compare_exactly() {
    // 3 failures in 30 calls is 0.1, which floating point makes 0.1000...04.
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"failure_rate": 0.1, "min_requests": 30}"#),
        1,
    );
    for _ in 0..27 {
        assert_eq!(worker.request(T0, ok(5)), None);
    }
    assert_eq!(worker.request(T0, fail()), None);
    assert_eq!(worker.request(T0, fail()), None);
    assert!(worker.request(T0, fail()).is_some(), "3/30 reaches 0.1");
}

#[test]
fn the_window_forgets_old_calls() {
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config("{}"), 1);
    // 19 failures, then the window moves on: 10 s later they are gone.
    for _ in 0..19 {
        assert_eq!(worker.request(T0, fail()), None);
    }
    for _ in 0..19 {
        assert_eq!(
            worker.request(T0 + 10_000, fail()),
            None,
            "old failures must not count"
        );
    }
    // Within the same window, the 20th failure trips.
    assert!(worker.request(T0 + 10_500, fail()).is_some());

    // After a long idle gap every bucket is stale, not just the one reused.
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config("{}"), 1);
    for _ in 0..19 {
        assert_eq!(worker.request(T0 + 2_000, fail()), None);
    }
    for _ in 0..19 {
        assert_eq!(
            worker.request(T0 + 15_000, fail()),
            None,
            "failures 13 s old must not count"
        );
    }
}

#[test]
fn the_window_is_a_ring_of_buckets() {
    // 10 s window in 1 s buckets: calls 9 s ago still count, 10 s ago not.
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config(r#"{"min_requests": 4}"#), 1);
    assert_eq!(worker.request(T0, fail()), None);
    assert_eq!(worker.request(T0 + 1_000, fail()), None);
    assert_eq!(worker.request(T0 + 5_000, ok(5)), None);
    // At T0 + 10 s the T0 bucket has rotated out: 3 calls, below min.
    assert_eq!(worker.request(T0 + 10_000, ok(5)), None);
    // At T0 + 10.5 s: failures at +1 s and +10.5 s, successes at +5 s and
    // +10 s: 2/4 = 0.5 trips, which needs the +1 s bucket to still count
    // (and the T0 one gone, or it would be 3/5).
    let trip = worker.request(T0 + 10_500, fail()).expect("trips");
    assert_eq!(
        trip.reason,
        Reason::FailureRate {
            failures: 2,
            calls: 4,
            threshold_ppm: 500_000,
            window_s: 10
        }
    );
}

#[test]
fn a_clock_stepped_back_restarts_the_window() {
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config(r#"{"min_requests": 2}"#), 1);
    assert_eq!(worker.request(T0, ok(5)), None);
    // An hour back: the calls count from there instead of being dropped.
    let back = T0 - 3_600_000;
    assert_eq!(worker.request(back, fail()), None);
    assert!(worker.request(back + 10, fail()).is_some());
}

#[test]
fn closed_opens_after_consecutive_failures() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 5, "min_requests": 1000}"#),
        1,
    );
    for _ in 0..4 {
        assert_eq!(worker.request(T0, fail()), None);
    }
    // A success ends the run.
    assert_eq!(worker.request(T0, ok(5)), None);
    for _ in 0..4 {
        assert_eq!(worker.request(T0, fail()), None);
    }
    let trip = worker.request(T0, fail()).expect("5 in a row");
    assert_eq!(trip.reason, Reason::ConsecutiveFailures { failures: 5 });
    assert_eq!(
        trip.to_string().split(';').next(),
        Some("closed -> open: 5 consecutive failures")
    );

    // Retried attempts are failures in the same run.
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 5, "min_requests": 1000}"#),
        1,
    );
    assert_eq!(
        worker.request(
            T0,
            Outcome {
                attempts: 3,
                failed: true,
                duration_ms: 9
            }
        ),
        None
    );
    let trip = worker
        .request(
            T0,
            Outcome {
                attempts: 2,
                failed: true,
                duration_ms: 9,
            },
        )
        .expect("3 + 2 failed attempts in a row");
    assert_eq!(trip.reason, Reason::ConsecutiveFailures { failures: 5 });
}

#[test]
fn closed_opens_when_slow_calls_reach_the_rate() {
    let json = r#"{"slow_ms": 1000, "slow_rate": 0.8, "min_requests": 20}"#;
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config(json), 1);
    for _ in 0..5 {
        assert_eq!(worker.request(T0, ok(999)), None);
    }
    for _ in 0..15 {
        assert_eq!(worker.request(T0, ok(1000)), None);
    }
    // 15/20 slow = 0.75: closed. 16/21 = 0.76, 17/22 = 0.77 ... 20/25 = 0.8.
    for _ in 0..4 {
        assert_eq!(worker.request(T0, ok(2000)), None);
    }
    let trip = worker.request(T0, ok(2000)).expect("20 slow of 25");
    assert_eq!(
        trip.reason,
        Reason::SlowCallRate {
            slow: 20,
            calls: 25,
            threshold_ppm: 800_000,
            slow_ms: 1000,
            window_s: 10
        }
    );
    assert!(trip.to_string().starts_with(
        "closed -> open: slow call rate 0.80 >= 0.8 (calls of 1000ms or more) over 25 requests in 10s"
    ));
    // Without slow_* settings, slowness is no reason.
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config("{}"), 1);
    for _ in 0..40 {
        assert_eq!(worker.request(T0, ok(60_000)), None);
    }
}

#[test]
fn open_rejects_until_the_open_time_then_lets_one_request_probe() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 1, "half_open_requests": 1}"#),
        7,
    );
    let trip = worker.trip(T0);
    let open_ms = trip.open_ms.unwrap();
    // While open: rejected with the time left, no write.
    let written = store.get(&worker.key).unwrap();
    assert_eq!(
        worker.start(T0 + 1),
        (
            Admission::Rejected {
                retry_after_ms: open_ms - 1
            },
            None
        )
    );
    assert_eq!(
        store.get(&worker.key).unwrap(),
        written,
        "a rejection writes nothing"
    );
    assert_eq!(retry_after_seconds(open_ms - 1), open_ms.div_ceil(1000));
    assert_eq!(retry_after_seconds(1), 1);
    assert_eq!(retry_after_seconds(0), 1);
    assert_eq!(retry_after_seconds(5_000), 5);
    assert_eq!(retry_after_seconds(5_001), 6);
    // One millisecond before: still open. At the open time: a probe.
    let due = T0 + open_ms;
    assert_eq!(
        check(worker.bytes().as_deref(), &worker.config, due - 1),
        Check::Rejected { retry_after_ms: 1 }
    );
    assert_eq!(worker.state(due - 1), BreakerState::Open);
    assert_eq!(
        worker.state(due),
        BreakerState::HalfOpen,
        "the gauge shows it ready to probe"
    );
    assert_eq!(
        check(worker.bytes().as_deref(), &worker.config, due),
        Check::TryProbe
    );
    let (_token, transition) = worker.probe(due);
    let transition = transition.expect("open -> half-open is reported");
    assert_eq!(
        (transition.from, transition.to),
        (BreakerState::Open, BreakerState::HalfOpen)
    );
    assert_eq!(transition.reason, Reason::OpenTimeElapsed { probes: 1 });
    assert!(!transition.is_trip());
    // The slot is taken: the next request is turned away without a write.
    assert_eq!(
        check(worker.bytes().as_deref(), &worker.config, due + 1),
        Check::Rejected {
            retry_after_ms: PROBES_BUSY_RETRY_MS
        }
    );
}

#[test]
fn outcomes_of_requests_admitted_before_the_trip_are_ignored_while_open() {
    let store = MemoryStore::default();
    let worker = Worker::new(&store, &config(r#"{"consecutive_failures": 1}"#), 7);
    let open_ms = worker.trip(T0).open_ms.unwrap();
    for _ in 0..50 {
        assert_eq!(worker.end(T0 + 10, fail(), None), None);
    }
    // The open time was not extended.
    assert_eq!(
        worker.start(T0 + 10),
        (
            Admission::Rejected {
                retry_after_ms: open_ms - 10
            },
            None
        )
    );
}

#[test]
fn half_open_limits_probes_and_closes_when_they_all_succeed() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 2, "half_open_requests": 3}"#),
        3,
    );
    let open_ms = worker.trip(T0).open_ms.unwrap();
    let due = T0 + open_ms;
    let (first, transition) = worker.probe(due);
    assert!(transition.is_some());
    let (second, transition) = worker.probe(due + 1);
    assert_eq!(transition, None, "only the first probe reports half-open");
    let (third, _) = worker.probe(due + 2);
    // Three in flight: a fourth is turned away, by check and by admit alike.
    assert_eq!(
        worker.start(due + 3),
        (
            Admission::Rejected {
                retry_after_ms: PROBES_BUSY_RETRY_MS
            },
            None
        )
    );
    let (_, (admission, _)) = admit(worker.bytes().as_deref(), &worker.config, due + 3);
    assert_eq!(
        admission,
        Admission::Rejected {
            retry_after_ms: PROBES_BUSY_RETRY_MS
        }
    );
    // Two succeed: still half-open, and a freed slot can be taken again.
    assert_eq!(worker.end(due + 10, ok(5), Some(first)), None);
    assert_eq!(worker.end(due + 11, ok(5), Some(second)), None);
    assert_eq!(worker.state(due + 11), BreakerState::HalfOpen);
    let (fourth, _) = worker.probe(due + 12);
    // A non-probe request that was admitted before the trip is ignored.
    assert_eq!(worker.end(due + 13, ok(5), None), None);
    assert_eq!(worker.state(due + 13), BreakerState::HalfOpen);
    // The third success closes it; the fourth probe then just counts.
    let closed = worker
        .end(due + 14, ok(5), Some(third))
        .expect("3 probes succeeded");
    assert_eq!(
        (closed.from, closed.to),
        (BreakerState::HalfOpen, BreakerState::Closed)
    );
    assert_eq!(closed.reason, Reason::ProbesSucceeded { probes: 3 });
    assert_eq!(
        closed.to_string(),
        "half-open -> closed: 3 probe requests succeeded"
    );
    assert_eq!(worker.end(due + 15, ok(5), Some(fourth)), None);
    assert_eq!(worker.state(due + 15), BreakerState::Closed);
    assert_eq!(worker.start(due + 16), (Admission::Allowed, None));
    // The trip streak was reset: the next trip opens for the base time again.
    let again = worker.trip(due + 20).open_ms.unwrap();
    assert!((5_000..=6_000).contains(&again), "{again}");
}

#[test]
fn a_failed_probe_reopens_with_a_doubled_time_up_to_the_cap() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(
            r#"{"consecutive_failures": 1, "open_ms": 5000, "max_open_ms": 60000, "half_open_requests": 2}"#,
        ),
        11,
    );
    let mut open_ms = worker.trip(T0).open_ms.unwrap();
    let mut now = T0;
    let expected: [(u64, u64); 7] = [
        (5_000, 6_000),
        (10_000, 12_000),
        (20_000, 24_000),
        (40_000, 48_000),
        (48_000, 60_000),
        (48_000, 60_000),
        (48_000, 60_000),
    ];
    for (trip, (low, high)) in expected.iter().enumerate() {
        assert!(
            (*low..=*high).contains(&open_ms),
            "trip {}: {open_ms} not in {low}..={high}",
            trip + 1
        );
        now += open_ms;
        let (token, _) = worker.probe(now);
        let (other, _) = worker.probe(now);
        let reopened = worker
            .end(now + 5, fail(), Some(token))
            .expect("a failed probe reopens");
        assert_eq!(
            (reopened.from, reopened.to),
            (BreakerState::HalfOpen, BreakerState::Open)
        );
        assert_eq!(reopened.reason, Reason::ProbeFailed);
        // The other probe of that episode no longer decides anything.
        assert_eq!(worker.end(now + 6, ok(5), Some(other)), None);
        now += 5;
        open_ms = reopened.open_ms.unwrap();
        assert_eq!(
            worker.start(now),
            (
                Admission::Rejected {
                    retry_after_ms: open_ms
                },
                None
            ),
            "rejected for exactly the announced time"
        );
    }
}

#[test]
fn open_times_are_jittered_within_bounds() {
    let settings = config(r#"{"open_ms": 5000, "max_open_ms": 60000}"#);
    let mut rng = Rng::new(5);
    for streak in 1..=12u8 {
        let base = (5_000u64 << (streak - 1)).min(60_000);
        let (low, high) = if base * 6 / 5 <= 60_000 {
            (base, base * 6 / 5)
        } else {
            (48_000, 60_000)
        };
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2_000 {
            let open = open_duration(&settings, streak, rng.next_u64());
            assert!((low..=high).contains(&open), "streak {streak}: {open}");
            seen.insert(open);
        }
        // Spread over the range, not a few values: proxies do not probe in lockstep.
        assert!(seen.len() > 500, "streak {streak}: {} distinct", seen.len());
        assert!(*seen.first().unwrap() < low + (high - low) / 10);
        assert!(*seen.last().unwrap() > high - (high - low) / 10);
    }
    // A huge streak neither overflows nor leaves the bounds.
    assert!((48_000..=60_000).contains(&open_duration(&settings, u8::MAX, 3)));
    // With no room between open_ms and the cap there is nothing to spread.
    let fixed = config(r#"{"open_ms": 7000, "max_open_ms": 7000}"#);
    assert_eq!(open_duration(&fixed, 1, 12345), 7000);
    assert_eq!(open_duration(&fixed, 9, 54321), 7000);
}

#[test]
fn a_slow_probe_reopens_when_slow_calls_are_configured() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(
            r#"{"consecutive_failures": 1, "slow_ms": 1000, "slow_rate": 0.5, "half_open_requests": 1}"#,
        ),
        2,
    );
    let due = T0 + worker.trip(T0).open_ms.unwrap();
    let (token, _) = worker.probe(due);
    let reopened = worker
        .end(due + 1500, ok(1500), Some(token))
        .expect("slow probe");
    assert_eq!(reopened.reason, Reason::ProbeSlow { slow_ms: 1000 });
    assert_eq!(reopened.to, BreakerState::Open);
}

#[test]
fn a_retried_probe_failed() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 1, "half_open_requests": 1}"#),
        2,
    );
    let due = T0 + worker.trip(T0).open_ms.unwrap();
    let (token, _) = worker.probe(due);
    let retried = Outcome {
        attempts: 2,
        failed: false,
        duration_ms: 10,
    };
    assert_eq!(
        worker.end(due + 10, retried, Some(token)).map(|t| t.reason),
        Some(Reason::ProbeFailed)
    );
}

#[test]
fn a_released_probe_frees_its_slot_without_deciding() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 1, "half_open_requests": 2}"#),
        2,
    );
    let due = T0 + worker.trip(T0).open_ms.unwrap();
    let (a, _) = worker.probe(due);
    let (b, _) = worker.probe(due);
    assert!(matches!(
        worker.start(due + 1).0,
        Admission::Rejected { .. }
    ));
    let release_a = || {
        update(&store, &worker.key, |bytes| {
            release(bytes, &worker.config, due + 2, a)
        })
        .unwrap()
    };
    release_a();
    assert_eq!(worker.state(due + 2), BreakerState::HalfOpen);
    // Released twice: the slot is freed once, b still holds the other one.
    release_a();
    let (c, _) = worker.probe(due + 3);
    assert!(
        matches!(worker.start(due + 4).0, Admission::Rejected { .. }),
        "only one slot was free"
    );
    // b and c decide: two successes close it.
    assert_eq!(worker.end(due + 5, ok(5), Some(b)), None);
    assert_eq!(
        worker.end(due + 6, ok(5), Some(c)).map(|t| t.to),
        Some(BreakerState::Closed)
    );
}

#[test]
fn leaked_probe_slots_expire() {
    let store = MemoryStore::default();
    let worker = Worker::new(
        &store,
        &config(r#"{"consecutive_failures": 1, "half_open_requests": 2}"#),
        2,
    );
    let due = T0 + worker.trip(T0).open_ms.unwrap();
    // Two probes whose VMs die: nobody records or releases them.
    let (leaked_a, _) = worker.probe(due);
    let (leaked_b, _) = worker.probe(due + 1_000);
    // The lease runs from the newest grant.
    let expiry = due + 1_000 + PROBE_LEASE_MS;
    assert!(matches!(
        worker.start(expiry - 1).0,
        Admission::Rejected { .. }
    ));
    assert_eq!(
        check(worker.bytes().as_deref(), &worker.config, expiry),
        Check::TryProbe
    );
    let (fresh, transition) = worker.probe(expiry);
    assert_eq!(transition, None, "reclaiming slots is not a state change");
    let (fresh_b, _) = worker.probe(expiry + 1);
    // The leaked tokens are void: their late outcomes neither free a slot,
    // nor close, nor reopen the breaker.
    assert_eq!(worker.end(expiry + 2, fail(), Some(leaked_a)), None);
    assert_eq!(worker.end(expiry + 2, ok(5), Some(leaked_b)), None);
    assert!(matches!(
        worker.start(expiry + 3).0,
        Admission::Rejected { .. }
    ));
    assert_eq!(worker.state(expiry + 3), BreakerState::HalfOpen);
    // The live probes decide.
    assert_eq!(worker.end(expiry + 4, ok(5), Some(fresh)), None);
    let closed = worker
        .end(expiry + 5, ok(5), Some(fresh_b))
        .expect("both probes succeeded");
    assert_eq!(closed.to, BreakerState::Closed);
}

#[test]
fn only_the_worker_whose_write_trips_the_breaker_reports_it() {
    let settings = config(r#"{"consecutive_failures": 3}"#);
    let store = MemoryStore::default();
    let a = Worker::new(&store, &settings, 1);
    let b = Worker::new(&store, &settings, 2);
    assert_eq!(a.request(T0, fail()), None);
    assert_eq!(b.request(T0, fail()), None);
    // Both now finish a failure that would be the third in a row. A read the
    // state first, then B's write landed, so A's write is refused and redone.
    let b_result = RefCell::new(None);
    let meddling = Interleaved::new(&store, || {
        *b_result.borrow_mut() = Some(b.end(T0 + 1, fail(), None));
    });
    let a_via_meddling = Worker {
        store: &meddling,
        key: a.key.clone(),
        config: settings.clone(),
        rng: RefCell::new(Rng::new(3)),
    };
    let a_result = a_via_meddling.end(T0 + 2, fail(), None);
    drop(a_via_meddling);
    drop(meddling);
    let b_result = b_result.into_inner().expect("B ran");
    assert!(
        b_result.is_some_and(|t| t.is_trip()),
        "B's write tripped it: {b_result:?}"
    );
    assert_eq!(
        a_result, None,
        "A's redone write found it open: nothing to report"
    );
    assert_eq!(a.state(T0 + 3), BreakerState::Open);
}

#[test]
fn racing_workers_share_the_probe_slots() {
    let settings = config(r#"{"consecutive_failures": 1, "half_open_requests": 1}"#);
    let store = MemoryStore::default();
    let a = Worker::new(&store, &settings, 1);
    let b = Worker::new(&store, &settings, 2);
    let due = T0 + a.trip(T0).open_ms.unwrap();
    // Both saw "try a probe"; B's admit lands between A's read and write.
    assert_eq!(check(a.bytes().as_deref(), &settings, due), Check::TryProbe);
    let b_result = RefCell::new(None);
    let meddling = Interleaved::new(&store, || *b_result.borrow_mut() = Some(b.start(due)));
    let a_result = update(&meddling, &a.key, |bytes| admit(bytes, &settings, due)).unwrap();
    drop(meddling);
    let (b_admission, b_transition) = b_result.into_inner().unwrap();
    assert!(matches!(b_admission, Admission::Probe(_)));
    assert!(
        b_transition.is_some(),
        "B moved it to half-open and reports it"
    );
    assert_eq!(
        a_result,
        (
            Admission::Rejected {
                retry_after_ms: PROBES_BUSY_RETRY_MS
            },
            None
        )
    );
}

#[test]
fn workers_interleaving_through_an_outage_keep_one_consistent_story() {
    // Four workers share one breaker; the upstream fails between 20 s and
    // 60 s. Requests start every 10 ms round-robin and take 50 ms, so they
    // overlap across workers and finish out of start order.
    let settings = config(
        r#"{"window_s": 5, "min_requests": 20, "failure_rate": 0.5, "open_ms": 1000, "max_open_ms": 8000, "half_open_requests": 3}"#,
    );
    let store = MemoryStore::default();
    let workers: Vec<Worker<MemoryStore>> = (0..4)
        .map(|seed| Worker::new(&store, &settings, seed))
        .collect();
    let broken = |t: u64| (T0 + 20_000..T0 + 60_000).contains(&t);
    let mut pending: Vec<(u64, usize, Option<ProbeToken>)> = Vec::new();
    let mut transitions: Vec<Transition> = Vec::new();
    let (mut rejected, mut probes_in_flight, mut max_probes_in_flight) = (0u32, 0i32, 0i32);
    let mut rejected_while_healthy_and_closed = 0;
    for tick in 0..10_000u64 {
        let now = T0 + tick * 10;
        // Finish what is due, in order.
        pending.sort_by_key(|(end, worker, _)| (*end, *worker));
        while pending.first().is_some_and(|(end, _, _)| *end <= now) {
            let (end, worker, probe) = pending.remove(0);
            let outcome = if broken(end) { fail() } else { ok(5) };
            if probe.is_some() {
                probes_in_flight -= 1;
            }
            transitions.extend(workers[worker].end(end, outcome, probe));
        }
        let worker = (tick % 4) as usize;
        let before = workers[worker].state(now);
        let (admission, transition) = workers[worker].start(now);
        transitions.extend(transition);
        match admission {
            Admission::Allowed => pending.push((now + 50, worker, None)),
            Admission::Probe(token) => {
                probes_in_flight += 1;
                max_probes_in_flight = max_probes_in_flight.max(probes_in_flight);
                pending.push((now + 50, worker, Some(token)));
            }
            Admission::Rejected { .. } => {
                rejected += 1;
                if before == BreakerState::Closed {
                    rejected_while_healthy_and_closed += 1;
                }
            }
        }
    }
    assert_eq!(rejected_while_healthy_and_closed, 0);
    assert!(
        rejected > 3_000,
        "the outage was mostly failed fast: {rejected}"
    );
    assert!(max_probes_in_flight <= 3, "{max_probes_in_flight}");
    // The story: a chain of transitions, each from where the last one went.
    let mut at = BreakerState::Closed;
    for transition in &transitions {
        assert_eq!(transition.from, at, "{transitions:#?}");
        at = transition.to;
    }
    assert_eq!(at, BreakerState::Closed, "recovered after the outage");
    let trips = transitions.iter().filter(|t| t.is_trip()).count();
    let first_trip = transitions.iter().position(|t| t.is_trip()).unwrap();
    assert!(matches!(
        transitions[first_trip].reason,
        Reason::FailureRate { .. }
    ));
    // Several trips in a row during 40 s of outage, with growing open times
    // (1, 2, 4, 8, 8, ... s), each logged once: not one per worker.
    assert!((5..=12).contains(&trips), "{trips}: {transitions:#?}");
    let last = transitions.last().unwrap();
    assert_eq!(last.reason, Reason::ProbesSucceeded { probes: 3 });
    assert_eq!(workers[0].state(T0 + 100_000), BreakerState::Closed);
}

#[test]
fn garbage_bytes_are_a_fresh_closed_breaker() {
    let settings = config(r#"{"consecutive_failures": 2}"#);
    let fresh = breaker::initial();
    let mut rng = Rng::new(99);
    let mut blobs: Vec<Vec<u8>> = vec![Vec::new(), vec![0], vec![1; 3], vec![0xff; fresh.len()]];
    for length in [1, 5, fresh.len() - 1, fresh.len(), fresh.len() + 1, 1000] {
        for _ in 0..200 {
            blobs.push((0..length).map(|_| rng.next_u64() as u8).collect());
        }
    }
    // Valid-looking prefixes with wild fields: version 1, every mode.
    for mode in 0..4u8 {
        for _ in 0..200 {
            let mut blob: Vec<u8> = (0..fresh.len()).map(|_| rng.next_u64() as u8).collect();
            blob[0] = 1;
            blob[1] = mode;
            blobs.push(blob);
        }
    }
    for blob in &blobs {
        for now in [0, T0, u64::MAX] {
            let shown = state(Some(blob), &settings, now);
            match check(Some(blob), &settings, now) {
                Check::Rejected { retry_after_ms } => assert!(
                    retry_after_ms <= settings.max_open_ms.max(PROBE_LEASE_MS),
                    "garbage must not hold the breaker open for {retry_after_ms} ms"
                ),
                Check::Allowed => assert_eq!(shown, BreakerState::Closed),
                Check::TryProbe => assert_ne!(shown, BreakerState::Closed),
            }
            let (bytes, _) = admit(Some(blob), &settings, now);
            assert_eq!(bytes.len(), fresh.len());
            let (bytes, _) = record(Some(blob), &settings, now, fail(), None, 1);
            assert_eq!(bytes.len(), fresh.len());
            let (bytes, ()) = release(Some(blob), &settings, now, probe_token_from(&settings));
            assert_eq!(bytes.len(), fresh.len());
        }
    }
    // Bytes of the wrong length or version read as fresh: closed, allowed.
    for blob in [
        Vec::new(),
        vec![3u8; fresh.len()],
        vec![1u8; fresh.len() + 1],
    ] {
        assert_eq!(check(Some(&blob), &settings, T0), Check::Allowed);
        assert_eq!(state(Some(&blob), &settings, T0), BreakerState::Closed);
        let (bytes, transition) = record(Some(&blob), &settings, T0, fail(), None, 1);
        assert_eq!(
            transition, None,
            "one failure of a fresh breaker trips nothing"
        );
        assert_eq!(bytes.len(), fresh.len());
    }
    assert_eq!(check(None, &settings, T0), Check::Allowed);
}

/// A probe token, obtained the only way there is: from an admission.
fn probe_token_from(settings: &BreakerConfig) -> ProbeToken {
    let (open, _) = record(
        None,
        &BreakerConfig {
            consecutive_failures: Some(1),
            ..settings.clone()
        },
        T0,
        fail(),
        None,
        0,
    );
    let (_, (admission, _)) = admit(Some(&open), settings, T0 + settings.max_open_ms);
    match admission {
        Admission::Probe(token) => token,
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_open_state_from_garbage_cannot_wedge_the_breaker() {
    let settings = config("{}");
    let mut open_forever = breaker::initial();
    open_forever[1] = 1; // open
    for byte in &mut open_forever[16..24] {
        *byte = 0xff; // until the end of time
    }
    // No open time is that long: it is read as passed, and the next request probes.
    assert_eq!(
        state(Some(&open_forever), &settings, T0),
        BreakerState::HalfOpen
    );
    assert_eq!(check(Some(&open_forever), &settings, T0), Check::TryProbe);
    let (_, (admission, _)) = admit(Some(&open_forever), &settings, T0);
    assert!(matches!(admission, Admission::Probe(_)), "{admission:?}");
    // The longest real open time still holds.
    let mut open_for_max = open_forever.clone();
    open_for_max[16..24].copy_from_slice(&(T0 + settings.max_open_ms).to_le_bytes());
    assert_eq!(
        check(Some(&open_for_max), &settings, T0),
        Check::Rejected {
            retry_after_ms: settings.max_open_ms
        }
    );
    // Likewise a probe lease from the far future does not block probing.
    let mut busy_forever = breaker::initial();
    busy_forever[1] = 2; // half-open
    for byte in &mut busy_forever[28..44] {
        *byte = 0xff; // every slot taken
    }
    for byte in &mut busy_forever[16..24] {
        *byte = 0xff;
    }
    assert_eq!(check(Some(&busy_forever), &settings, T0), Check::TryProbe);
}
