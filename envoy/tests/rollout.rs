//! Sluice's progressive rollout in a real Envoy (`--concurrency 2`), with
//! real upstreams and real HTTP, on the wall clock: steps of two to four
//! seconds starting right after Envoy does, so each test takes seconds.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`. Every test starts its
//! own upstreams and Envoy on kernel-picked ports on 127.0.0.1.

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use sluice_envoy::{Client, Envoy, EnvoyConfig, Response, Upstream};

fn require_wasm() {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
}

/// Wall-clock time in seconds, as Envoy (and so the filter) reads it.
fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn sleep_until_s(t: f64) {
    let left = t - now_s();
    if left > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(left));
    }
}

/// A stable (`shop_v1`) and a canary (`shop_v2`) upstream behind Envoy.
struct Rig {
    stable: Upstream,
    canary: Upstream,
    envoy: Envoy,
}

impl Rig {
    fn start(sluice: &Value) -> Rig {
        require_wasm();
        let stable = Upstream::start("stable").unwrap();
        let canary = Upstream::start("canary").unwrap();
        let config = EnvoyConfig::from_json(sluice)
            .upstream("shop_v1", &stable)
            .upstream("shop_v2", &canary);
        let envoy = Envoy::start(&config).unwrap_or_else(|e| panic!("{e}"));
        Rig {
            stable,
            canary,
            envoy,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        self.envoy.settled_wasm_metric(name).unwrap().unwrap_or(0)
    }

    fn await_metric(&self, name: &str, value: u64) {
        self.envoy.await_wasm_metric(name, value);
    }

    /// Keep-alive clients until both workers have accepted connections.
    fn clients_on_both_workers(&self) -> Vec<Client> {
        self.envoy.clients_on_both_workers(4)
    }

    /// The rollout's log lines (after the common prefix).
    fn rollout_log(&self) -> Vec<String> {
        let needle = "sluice: rollout of service shop: ";
        self.envoy
            .log_lines_containing(needle)
            .into_iter()
            .map(|line| line.split_once(needle).unwrap().1.to_string())
            .collect()
    }
}

/// Starts Envoy with a rollout that begins at a whole second `lead`
/// seconds or so from now (`config(start_unix_s)`), so that the test knows
/// the schedule. A machine so busy that Envoy is not ready by
/// `start + slack` would leave the test without the phases it must watch:
/// it then tries again, at most twice, with the start as far ahead as
/// Envoy took to start. Returns the rig and the start (Unix seconds).
fn start_scheduled(config: impl Fn(u64) -> Value, lead: f64, slack: f64) -> (Rig, f64) {
    let mut lead = lead;
    for _ in 0..3 {
        let spawned = now_s();
        let start = (spawned + lead).floor();
        let rig = Rig::start(&config(start as u64));
        let ready = now_s();
        if ready <= start + slack {
            return (rig, start);
        }
        eprintln!(
            "Envoy took {:.1}s to start; trying a later start",
            ready - spawned
        );
        lead += (ready - spawned).ceil();
    }
    panic!("Envoy never started in time for the rollout schedule");
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|u| format!("user-{u}")).collect()
}

fn get(client: &mut Client, headers: &[(&str, &str)]) -> Response {
    client
        .get("shop.local", "/", headers)
        .unwrap_or_else(|e| panic!("request {headers:?} failed: {e}"))
}

/// Every user once, spread over the clients in parallel; the users served
/// by canary. Any answer but a 200 from stable or canary fails the test.
fn canary_users(clients: &mut [Client], ids: &[String]) -> BTreeSet<usize> {
    let n = clients.len();
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(c, client)| {
                s.spawn(move || {
                    let mut on_canary = Vec::new();
                    for (u, id) in ids.iter().enumerate().skip(c).step_by(n) {
                        let r = get(client, &[("x-user-id", id)]);
                        match (r.status, r.upstream()) {
                            (200, Some("canary")) => on_canary.push(u),
                            (200, Some("stable")) => {}
                            _ => panic!("{id}: {r:?}"),
                        }
                    }
                    on_canary
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Pending,
    Step(u64),
    Promoted,
}

#[test]
fn a_healthy_canary_steps_forward_with_the_clock_and_is_promoted() {
    const STEP_S: f64 = 2.0;
    // Starts a second or two from now (Envoy is usually up before that):
    // steps of 10 % and 50 %, two seconds each, then promotion.
    let (rig, start) = start_scheduled(
        |start| {
            json!({"services": [{
                "name": "shop",
                "match": {"authority": "shop.local"},
                "stable": "shop_v1", "canary": "shop_v2",
                "sticky": {"header": "x-user-id"},
                "rollout": {"steps": [10, 50], "step_s": STEP_S as u64,
                            "max_failure_rate": 0.02, "min_requests": 100,
                            "start_unix_s": start}
            }]})
        },
        1.5,
        0.5,
    );
    let phase = |t: f64| {
        if t < start {
            Phase::Pending
        } else if t < start + 2.0 * STEP_S {
            Phase::Step(((t - start) / STEP_S) as u64)
        } else {
            Phase::Promoted
        }
    };
    let ids = users(200);
    let mut clients = rig.clients_on_both_workers();
    // Rounds of every user, each kept only if it ran well inside one phase.
    let mut seen: BTreeMap<Phase, BTreeSet<usize>> = BTreeMap::new();
    let mut rounds: BTreeMap<Phase, usize> = BTreeMap::new();
    let deadline = start + 2.0 * STEP_S + 0.6;
    while now_s() < deadline {
        let before = now_s();
        let on_canary = canary_users(&mut clients, &ids);
        let after = now_s();
        let (first, last) = (phase(before - 0.15), phase(after + 0.15));
        if first != last {
            continue;
        }
        *rounds.entry(first).or_default() += 1;
        if let Some(earlier) = seen.get(&first) {
            assert_eq!(*earlier, on_canary, "users changed sides within {first:?}");
        }
        seen.insert(first, on_canary);
    }
    for phase in [Phase::Step(0), Phase::Step(1), Phase::Promoted] {
        assert!(
            seen.contains_key(&phase),
            "no round ran in {phase:?}: {rounds:?}"
        );
    }
    if let Some(pending) = seen.get(&Phase::Pending) {
        assert!(
            pending.is_empty(),
            "{} users on canary before the start",
            pending.len()
        );
    }
    let (step0, step1) = (&seen[&Phase::Step(0)], &seen[&Phase::Step(1)]);
    assert!(
        (6..=40).contains(&step0.len()),
        "{} of 200 at 10 %",
        step0.len()
    );
    assert!(
        (70..=130).contains(&step1.len()),
        "{} of 200 at 50 %",
        step1.len()
    );
    assert!(step1.is_superset(step0), "users moved back to stable");
    assert_eq!(seen[&Phase::Promoted].len(), ids.len());
    assert_eq!(rig.stable.failed() + rig.canary.failed(), 0);

    rig.await_metric("sluice.shop.rollout.state", 2);
    rig.await_metric("sluice.shop.rollout.weight_bp", 10_000);
    assert_eq!(rig.metric("sluice.shop.rollout.rollbacks"), 0);
    // Each announcement once for the process, though two workers (and the
    // main thread) run the filter.
    assert_eq!(
        rig.rollout_log(),
        [
            "step 1/2, canary weight 10%",
            "step 2/2, canary weight 50%",
            "promoted, canary weight 100%"
        ]
    );
}

#[test]
fn a_failing_canary_is_rolled_back_and_stays_rolled_back() {
    const STEP_S: f64 = 4.0;
    // One step of 50 % that begins about now; had the canary been healthy
    // it would be promoted four seconds later.
    let (rig, start) = start_scheduled(
        |start| {
            json!({"services": [{
                "name": "shop",
                "match": {"authority": "shop.local"},
                "stable": "shop_v1", "canary": "shop_v2",
                "sticky": {"header": "x-user-id"},
                "rules": [{"header": "x-canary", "equals": "always", "to": "canary"}],
                "rollout": {"steps": [50], "step_s": STEP_S as u64,
                            "max_failure_rate": 0.02, "min_requests": 100,
                            "start_unix_s": start}
            }]})
        },
        0.0,
        2.5,
    );
    // A retried start may lie a little ahead: the step must be on.
    sleep_until_s(start + 0.05);
    let ids = users(60);

    // The canary fails everything. With a 2 % budget over at least 100
    // requests, three failures settle it: its users see those three errors,
    // then stable.
    rig.canary.set_fail_all(true);
    let mut client = rig.envoy.client().with_timeout(Duration::from_secs(5));
    let mut errors = 0;
    let mut rolled_back_at = None;
    for id in &ids {
        let r = get(&mut client, &[("x-user-id", id)]);
        match (r.status, r.upstream()) {
            (503, Some("canary")) => {
                errors += 1;
                if errors == 3 {
                    rolled_back_at = Some(now_s());
                }
            }
            (200, Some("stable")) => {}
            _ => panic!("{id}: {r:?}"),
        }
    }
    assert_eq!(errors, 3, "canary errors before the rollback");
    let rolled_back_at = rolled_back_at.unwrap();
    assert_eq!(rig.canary.requests(), 3);

    // Even healthy again, the canary gets no cohort traffic: on both
    // workers (the other one within a second), nobody goes there...
    rig.canary.reset_behaviour();
    sleep_until_s(rolled_back_at + 1.1);
    let mut clients = rig.clients_on_both_workers();
    for _ in 0..3 {
        assert!(canary_users(&mut clients, &ids).is_empty());
    }
    assert_eq!(rig.canary.requests(), 3);
    // ... except through an explicit rule, for the engineers debugging it.
    let r = get(&mut client, &[("x-canary", "always"), ("x-user-id", "dev")]);
    assert_eq!((r.status, r.upstream()), (200, Some("canary")), "{r:?}");
    rig.await_metric("sluice.shop.rollout.state", 1);
    rig.await_metric("sluice.shop.rollout.weight_bp", 0);

    // Past the time it would have been promoted: still rolled back.
    sleep_until_s(start + STEP_S + 0.3);
    assert!(canary_users(&mut clients, &ids).is_empty());
    assert_eq!(rig.canary.requests(), 4);
    rig.await_metric("sluice.shop.rollout.state", 1);
    assert_eq!(rig.metric("sluice.shop.rollout.weight_bp"), 0);
    assert_eq!(rig.metric("sluice.shop.rollout.rollbacks"), 1);
    let rollbacks = rig.envoy.log_lines_containing("rolled back at step");
    assert_eq!(rollbacks.len(), 1, "{rollbacks:?}");
    assert!(rollbacks[0].contains("[warning]"), "{rollbacks:?}");
    assert_eq!(
        rig.rollout_log(),
        [
            "step 1/1, canary weight 50%",
            "rolled back at step 1/1 (50%): 3 canary failures in 3 requests already exceed 0.02 of 100; canary weight 0 until the rollout block or the clusters change"
        ]
    );
}
