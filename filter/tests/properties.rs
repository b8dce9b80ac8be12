//! Property tests: the split's monotonicity, stickiness, the retry budget's
//! bound and the breaker's legal transitions, over generated inputs.
//!
//! The budget and breaker properties drive the engine through the request
//! lifecycle simulator that the `lifecycle` fuzz target uses
//! (`fuzz/src/lifecycle.rs`, included here: one `sluice::testing::Vm` per
//! worker over one store), so both check the same invariants: proptest explores the inputs
//! quickly on every `cargo test`, the fuzzer for as long as it is given
//! (README, "Fuzzing").
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[allow(dead_code)]
#[path = "../../fuzz/src/lifecycle.rs"]
mod lifecycle;

use lifecycle::{Event, Knobs, Scenario, Sim, AUTHORITIES};
use proptest::prelude::*;
use sluice::config::{Config, HostPattern, Side};
use sluice::retry::{self, RetryPolicy};
use sluice::rollout;
use sluice::router::{Decision, RequestHeaders, Router};

struct Headers(Vec<(&'static str, Vec<u8>)>);

impl RequestHeaders for Headers {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, value)| value.as_slice())
    }
}

fn router(json: &str) -> Router {
    Router::new(Config::parse(json.as_bytes()).unwrap())
}

fn side(router: &Router, weight_bp: u16, headers: &mut Headers, random: u64) -> Side {
    match router.decide(0, weight_bp, true, headers, random) {
        Decision::Routed { side, .. } => side,
        Decision::Unmatched => panic!("service 0 exists"),
    }
}

fn percent(bp: u16) -> String {
    format!("{}.{:02}", bp / 100, bp % 100)
}

/// A service with a sticky key read from a header or a cookie, and a cohort
/// rule (`x-cohort` present) with its own weight.
fn sticky_service(name: &str, weight_bp: u16, cohort_bp: u16, cookie: bool) -> Router {
    let sticky = if cookie {
        r#"{"cookie": "uid"}"#
    } else {
        r#"{"header": "x-user"}"#
    };
    router(&format!(
        r#"{{"services": [{{"name": "{name}", "stable": "v1", "canary": "v2", "weight": {},
            "sticky": {sticky}, "rules": [{{"header": "x-cohort", "present": true, "weight": {}}}]}}]}}"#,
        percent(weight_bp),
        percent(cohort_bp)
    ))
}

fn keyed(key: &[u8], cookie: bool, cohort: bool) -> Headers {
    let mut headers = if cookie {
        let mut value = b"theme=dark; uid=".to_vec();
        value.extend_from_slice(key);
        vec![("cookie", value)]
    } else {
        vec![("x-user", key.to_vec())]
    };
    if cohort {
        headers.push(("x-cohort", b"1".to_vec()));
    }
    Headers(headers)
}

fn weights() -> impl Strategy<Value = (u16, u16)> {
    (0..=10_000u16, 0..=10_000u16).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Raising a weight only moves requests from stable to canary: the
    /// service's weight, a cohort's weight, and a keyless request's split
    /// with the same random word.
    #[test]
    fn the_split_is_monotonic_in_the_weight(
        name in "[a-z0-9_-]{1,16}",
        key in proptest::collection::vec(any::<u8>(), 0..24),
        (low, high) in weights(),
        cookie in any::<bool>(),
        cohort in any::<bool>(),
        random in any::<u64>(),
    ) {
        // The service's weight, passed to decide (the rollout's path too).
        let service = sticky_service(&name, 0, 5_000, cookie);
        let at_low = side(&service, low, &mut keyed(&key, cookie, false), random);
        let at_high = side(&service, high, &mut keyed(&key, cookie, false), random);
        prop_assert!(at_low == Side::Stable || at_high == Side::Canary, "canary at {low} bp, stable at {high} bp");
        // A cohort rule's own weight.
        let low_rule = sticky_service(&name, 0, low, cookie);
        let high_rule = sticky_service(&name, 0, high, cookie);
        let at_low = side(&low_rule, 0, &mut keyed(&key, cookie, cohort), random);
        let at_high = side(&high_rule, 0, &mut keyed(&key, cookie, cohort), random);
        prop_assert!(at_low == Side::Stable || at_high == Side::Canary);
        // No key: the random bucket, for the same word.
        let at_low = side(&service, low, &mut Headers(Vec::new()), random);
        let at_high = side(&service, high, &mut Headers(Vec::new()), random);
        prop_assert!(at_low == Side::Stable || at_high == Side::Canary);
        // The ends are exact.
        prop_assert_eq!(side(&service, 0, &mut keyed(&key, cookie, false), random), Side::Stable);
        prop_assert_eq!(side(&service, 10_000, &mut keyed(&key, cookie, false), random), Side::Canary);
    }

    /// A rollout's weight never falls as the clock advances (until a
    /// rollback), so its users only ever move to the canary.
    #[test]
    fn a_rollout_only_raises_the_weight(
        mut steps in proptest::collection::vec(0..=10_000u16, 1..8),
        step_s in 1..600u64,
        start_offset_s in 0..4_000u64,
        times in proptest::collection::vec(0..10_000_000u64, 2..12),
    ) {
        steps.sort_unstable();
        let steps_json: Vec<String> = steps.iter().map(|&bp| percent(bp)).collect();
        let start = lifecycle::T0 / 1000 + start_offset_s;
        let config = Config::parse(format!(
            r#"{{"services": [{{"name": "r", "stable": "v1", "canary": "v2",
                "rollout": {{"steps": [{}], "step_s": {step_s}, "max_failure_rate": 0.1, "start_unix_s": {start}}}}}]}}"#,
            steps_json.join(", ")
        ).as_bytes()).unwrap();
        let rollout_config = config.services[0].rollout.clone().unwrap();
        let bytes = rollout::initial(&rollout_config, lifecycle::T0);
        let mut times = times;
        times.sort_unstable();
        let mut last = 0;
        for offset in times {
            let view = rollout::view(Some(&bytes), &rollout_config, lifecycle::T0 + offset);
            prop_assert!(view.weight_bp >= last, "{} after {last}", view.weight_bp);
            last = view.weight_bp;
        }
    }

    /// The same key lands on the same side whatever the random word, on any
    /// worker (a router compiled from the same config), by header or cookie.
    #[test]
    fn a_sticky_key_keeps_its_side(
        name in "[a-z0-9_-]{1,16}",
        key in proptest::collection::vec(any::<u8>().prop_filter("not a separator", |b| *b != b';'), 1..24),
        weight in 0..=10_000u16,
        cohort in any::<bool>(),
        cookie in any::<bool>(),
        randoms in proptest::collection::vec(any::<u64>(), 2..6),
    ) {
        // A cookie value is trimmed and unquoted: keep the key's bytes as sent.
        prop_assume!(!cookie || key.iter().all(|b| !b.is_ascii_whitespace() && *b != b'"'));
        let workers = [sticky_service(&name, weight, 3_000, cookie), sticky_service(&name, weight, 3_000, cookie)];
        let first = side(&workers[0], weight, &mut keyed(&key, cookie, cohort), randoms[0]);
        for (index, &random) in randoms.iter().enumerate() {
            let worker = &workers[index % 2];
            prop_assert_eq!(side(worker, weight, &mut keyed(&key, cookie, cohort), random), first);
        }
        // The side is the bucket's: canary iff bucket < the weight.
        if !cohort {
            let bucket = sluice::sticky::bucket(name.as_bytes(), &key);
            prop_assert_eq!(first == Side::Canary, bucket < weight);
        }
    }
}

proptest! {
    /// An accepted host pattern is a host name: lower-case, every label
    /// non-empty (found by the config fuzz target: `shop.local..`, `.x` and
    /// `..` were accepted as patterns no real host matches).
    #[test]
    fn accepted_host_patterns_have_no_empty_labels(name in "[*]?[A-Za-z.:-]{0,10}[.]{0,2}") {
        // The pattern's alphabet needs no JSON escaping.
        let json = format!(r#"{{"services": [{{"name": "s", "stable": "a", "match": {{"authority": "{name}"}}}}]}}"#);
        if let Ok(config) = Config::parse(json.as_bytes()) {
            for pattern in &config.services[0].matcher.authorities {
                let host = match pattern {
                    HostPattern::Any => continue,
                    HostPattern::Exact(host) => host.as_str(),
                    HostPattern::Suffix(suffix) => suffix.strip_prefix('.').unwrap(),
                };
                prop_assert!(!host.split('.').any(str::is_empty), "{name:?} accepted as {pattern:?}");
                prop_assert_eq!(host, host.to_ascii_lowercase());
            }
        }
    }
}

// ------------------------------------------------- the lifecycle simulator

fn budget_knobs() -> impl Strategy<Value = Knobs> {
    (
        prop_oneof![Just(0u8), Just(3u8), Just(4u8), Just(15u8), Just(28u8)],
        any::<u16>(),
        1..=10u8,
        prop_oneof![Just(0u32), 0..=1_000_000u32],
        // Scarce (no lease is ever taken) and plentiful (leases).
        prop_oneof![0..=5u32, 6..=40u32],
        0..=20u8,
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(
            |(
                template,
                weight_bp,
                max_retries,
                ratio_ppm,
                min_per_s,
                window,
                per_try_ms,
                timeout_ms,
            )| Knobs {
                template,
                weight_bp,
                max_retries,
                ratio_ppm,
                min_per_s,
                window_s: window,
                per_try_ms,
                timeout_ms,
                // A breaker that stays out of the way.
                min_requests: 49,
                failure_rate_ppm: 999_999,
                ..Knobs::default()
            },
        )
}

fn breaker_knobs() -> impl Strategy<Value = Knobs> {
    (
        prop_oneof![Just(0u8), Just(1u8), Just(3u8)],
        any::<u16>(),
        0..=3u8,
        (0..=30u16, 0..=10u32, any::<u32>()),
        proptest::option::of(0..6u32),
        proptest::option::of((0..3_000u32, any::<u32>())),
        (0..3_000u32, 0..20_000u32, 0..4u8),
        (
            proptest::collection::vec(any::<u16>(), 1..4),
            0..30u32,
            any::<u32>(),
            0..20u32,
        ),
    )
        .prop_map(
            |(
                template,
                weight_bp,
                max_retries,
                (breaker_window_s, min_requests, failure_rate_ppm),
                consecutive,
                slow,
                (open_ms, max_open_extra_ms, half_open),
                (steps, step_s, max_failure_ppm, rollout_min_requests),
            )| Knobs {
                template,
                weight_bp,
                max_retries,
                ratio_ppm: 200_000,
                min_per_s: 10,
                window_s: 9,
                breaker_window_s,
                min_requests,
                failure_rate_ppm,
                consecutive,
                slow,
                open_ms,
                max_open_extra_ms,
                half_open,
                steps,
                step_s,
                max_failure_ppm,
                rollout_min_requests,
                start_offset_s: Some(-60),
                ..Knobs::default()
            },
        )
}

fn request() -> impl Strategy<Value = Event> {
    (
        any::<u8>(),
        0..AUTHORITIES.len(),
        prop_oneof![
            3 => proptest::sample::select(lifecycle::PATHS).prop_map(str::to_string),
            1 => "/[a-z/]{0,6}",
        ],
        0..40u8,
        proptest::option::of(prop_oneof![Just("50m"), Just("2S"), Just("0n"), Just("x")]),
        any::<u64>(),
    )
        .prop_map(|(worker, authority, path, user, deadline, random)| {
            let mut headers = vec![
                (
                    ":authority".to_string(),
                    AUTHORITIES[authority].as_bytes().to_vec(),
                ),
                (":path".to_string(), path.into_bytes()),
                ("x-user".to_string(), format!("u{user}").into_bytes()),
                ("cookie".to_string(), format!("uid=u{user}").into_bytes()),
            ];
            if let Some(deadline) = deadline {
                headers.push(("grpc-timeout".to_string(), deadline.as_bytes().to_vec()));
            }
            Event::Request {
                worker,
                headers,
                random,
            }
        })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => request(),
        3 => (any::<u16>(), 0..12u64, any::<bool>(), prop_oneof![Just(200u64), Just(503), Just(500), Just(404)])
            .prop_map(|(pick, attempts, reported, status)| Event::Response { pick, attempts, reported, status }),
        4 => (any::<u16>(), prop_oneof![Just(200u64), Just(503), Just(500), Just(0), Just(404)], prop_oneof![Just(0u64), Just(0x20)], 0..12u64, any::<bool>())
            .prop_map(|(pick, status, flags, attempts, reported)| Event::End { pick, status, flags, attempts, reported }),
        1 => any::<u16>().prop_map(|pick| Event::Abandon { pick }),
        3 => prop_oneof![0..3_000i64, 0..120_000i64, -15_000..0i64].prop_map(|delta_ms| Event::Clock { delta_ms }),
        1 => (proptest::option::of(any::<u8>()), any::<u8>()).prop_map(|(worker, variant)| Event::Reload { worker, variant }),
        1 => (0..24u8).prop_map(|failures| Event::Contend { failures }),
        1 => any::<u8>().prop_map(|worker| Event::Tick { worker }),
        1 => any::<u8>().prop_map(|to| Event::Rewind { to }),
        2 => (any::<u8>(), 0..5u8, prop_oneof![Just(200u64), Just(503)], 0..12u64, 0..400u16, any::<bool>())
            .prop_map(|(count, authority, status, attempts, step_ms, overlap)| Event::Burst {
                count, authority, path: 0, status, attempts, step_ms, overlap,
            }),
    ]
}

fn scenario(knobs: impl Strategy<Value = Knobs>) -> impl Strategy<Value = Scenario> {
    (
        1..=4u8,
        any::<u64>(),
        0..1_000_000u32,
        proptest::collection::vec(knobs, 1..=3),
        proptest::collection::vec(event(), 1..60),
    )
        .prop_map(
            |(workers, seed, start_offset_ms, variants, events)| Scenario {
                workers,
                seed,
                start_offset_ms,
                variants,
                events,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// For every interval of seconds of a budget state, retries ≤ ratio ×
    /// requests (from W − 1 seconds before) + min_per_s × (b − a + W):
    /// several workers on one store, requests, failures, refunds, lost CAS
    /// races, leaked reservations, reloads and a clock that jumps both ways.
    #[test]
    fn the_retry_budget_bound_holds(scenario in scenario(budget_knobs())) {
        let result = Sim::run(&scenario);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }

    /// Breakers only go closed→open, open→half-open (once the open time has
    /// passed), half-open→closed and half-open→open; each change is reported
    /// to exactly the writer that made it; a breaker trips only after an
    /// outcome that could count against its cluster. (Routing, stickiness
    /// and rollout invariants are checked along the way.)
    #[test]
    fn breakers_make_only_legal_transitions(scenario in scenario(breaker_knobs())) {
        let result = Sim::run(&scenario);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// The simulator is not vacuous: through the engine, a failing canary trips
/// its breaker, which then probes and closes, and fails its rollout; the
/// budget grants and denies, and the open stable breaker refuses requests.
#[test]
fn the_simulator_reaches_trips_closes_and_rollbacks() {
    let knobs = Knobs {
        template: 1,
        steps: vec![5000],
        step_s: 599,
        max_failure_ppm: 10_000,
        rollout_min_requests: 9,
        consecutive: Some(2),
        min_requests: 4,
        failure_rate_ppm: 499_999,
        half_open: 0,
        open_ms: 999,
        max_retries: 2,
        ratio_ppm: 200_000,
        min_per_s: 1,
        window_s: 9,
        ..Knobs::default()
    };
    let burst = |count, status, attempts, overlap| Event::Burst {
        count,
        authority: 4,
        path: 1,
        status,
        attempts,
        step_ms: 10,
        overlap,
    };
    let scenario = Scenario {
        workers: 2,
        seed: 1,
        start_offset_ms: 0,
        variants: vec![knobs],
        events: vec![
            burst(31, 503, 3, false),
            Event::Clock { delta_ms: 5_000 },
            burst(19, 200, 1, false),
            burst(31, 200, 1, true),
        ],
    };
    let stats = Sim::run(&scenario).unwrap();
    assert!(stats.rollbacks >= 1, "{stats:?}");
    assert!(
        stats.trips >= 1 && stats.half_opens >= 1 && stats.closes >= 1,
        "{stats:?}"
    );
    assert!(
        stats.granted > 0 && stats.denied > 0 && stats.rejected > 0,
        "{stats:?}"
    );
}

/// Two workers on a plentiful budget: grants come from leases, which run
/// out, expire and are renewed across clock steps and lost CAS races,
/// with every oracle (the bound, the leases') checked on the way.
#[test]
fn the_simulator_reaches_leases_and_their_renewals() {
    let knobs = Knobs {
        template: 0,
        max_retries: 3,
        ratio_ppm: 100_000,
        min_per_s: 40,
        window_s: 2,
        min_requests: 49,
        failure_rate_ppm: 999_999,
        ..Knobs::default()
    };
    let burst = |count, status, attempts, overlap| Event::Burst {
        count,
        authority: 0,
        path: 0,
        status,
        attempts,
        step_ms: 40,
        overlap,
    };
    let scenario = Scenario {
        workers: 2,
        seed: 3,
        start_offset_ms: 700,
        variants: vec![knobs],
        events: vec![
            burst(31, 200, 1, true),
            burst(31, 503, 4, true),
            Event::Contend { failures: 40 },
            burst(20, 503, 4, false),
            Event::Clock { delta_ms: -1_500 },
            burst(31, 200, 2, true),
            Event::Tick { worker: 0 },
            Event::Clock { delta_ms: 3_000 },
            burst(31, 503, 4, false),
            Event::Tick { worker: 1 },
            burst(31, 503, 4, true),
        ],
    };
    let stats = Sim::run(&scenario).unwrap();
    assert!(stats.leases >= 3 && stats.granted > 0, "{stats:?}");
}

/// Found by the lifecycle fuzz target's budget oracle: a state recreated
/// after the clock stepped back to the exact millisecond its predecessor was
/// created had the same epoch, so an old reservation's refund landed in the
/// new state and let it grant past its budget.
#[test]
fn a_recreated_budget_state_takes_no_refund_from_its_predecessor() {
    let policy = RetryPolicy {
        max_retries: 10,
        budget: retry::Budget {
            ratio_ppm: 0,
            min_per_s: 10,
            window_s: 1,
        },
        ..RetryPolicy::default()
    };
    let t0 = lifecycle::T0;
    let fresh = retry::fresh_state(&policy, t0);
    let (bytes, old) = retry::reserve_settling(Some(&fresh), &policy, t0 + 10_000, 10, &[]);
    assert_eq!(old.granted, 10);
    // The clock steps back to t0: the state is recreated.
    let (bytes, _) = retry::reserve_settling(Some(&bytes), &policy, t0, 10, &[]);
    // Forward again, into the old reservation's second: the reserve is spent.
    let (bytes, spent) = retry::reserve_settling(Some(&bytes), &policy, t0 + 10_000, 10, &[]);
    assert_eq!(spent.granted, 10);
    // The old request made one attempt; its refund must not reach this state.
    let settlement = retry::Settlement {
        reservation: old,
        attempts_made: Some(1),
    };
    let bytes = retry::settle_all(Some(&bytes), &policy, t0 + 10_000, &[settlement]);
    let (_, after) = retry::reserve_settling(Some(&bytes), &policy, t0 + 10_000, 10, &[]);
    assert_eq!(after.granted, 0, "{after:?}");
}
