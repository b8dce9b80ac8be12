//! Progressive rollouts through the real sluice.wasm in the fake Envoy host:
//! the canary weight follows the virtual clock, the gate rolls a failing
//! canary back, and the state lives in shared data across worker VMs and
//! config pushes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;

use sluice_host::{require_sluice_wasm, Action, LogLevel, Proxy, Vm};

/// The issue's `start_unix_s`.
const START_S: u64 = 1_795_000_000;
const STEP_MS: u64 = 300_000;

/// The issue's example rollout. Explicit `to: canary` rule for engineers,
/// and a mobile cohort with its own weight.
const SHOP: &str = r#"{
  "services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1", "canary": "shop_v2",
    "sticky": {"header": "x-user-id"},
    "rules": [
      {"header": "x-canary", "equals": "always", "to": "canary"},
      {"device": "mobile", "weight": 50}
    ],
    "rollout": {"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02,
                "min_requests": 100, "start_unix_s": 1795000000}
  }]
}"#;

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1";

const ROLLOUT_LOG: &str = "sluice: rollout of service shop: ";

/// The example without `start_unix_s`: the rollout starts when the config
/// is first applied.
fn shop_default_start() -> String {
    SHOP.replace(r#", "start_unix_s": 1795000000"#, "")
}

struct Rig {
    proxy: Proxy,
    vms: Vec<Vm>,
}

impl Rig {
    /// Main VM and two workers; the virtual clock starts `offset_ms` after
    /// (or, negative, before) `start_unix_s`.
    fn at(config: &str, offset_ms: i64) -> Rig {
        let start_ns = (START_S as i128 * 1_000_000_000 + offset_ms as i128 * 1_000_000) as u64;
        let proxy = Proxy::builder(require_sluice_wasm())
            .plugin_config(config)
            .root_id("sluice")
            .start_time_unix_nanos(start_ns)
            .build()
            .unwrap();
        let vms = proxy.boot(2).unwrap();
        Rig { proxy, vms }
    }

    fn w(&self, i: usize) -> &Vm {
        &self.vms[1 + i % 2]
    }

    fn weight_bp(&self) -> u64 {
        self.proxy.tick_now();
        self.proxy.gauge("sluice.shop.rollout.weight_bp").unwrap()
    }

    fn state(&self) -> u64 {
        self.proxy.tick_now();
        self.proxy.gauge("sluice.shop.rollout.state").unwrap()
    }

    fn rollbacks(&self) -> u64 {
        self.proxy.tick_now();
        self.proxy
            .counter("sluice.shop.rollout.rollbacks")
            .unwrap_or(0)
    }

    /// The rollout's announcements so far, without the common prefix.
    fn rollout_log(&self) -> Vec<String> {
        self.proxy
            .logs()
            .into_iter()
            .filter_map(|line| {
                let message = line.message.strip_prefix(ROLLOUT_LOG)?.to_string();
                let expected = if message.starts_with("rolled back") {
                    LogLevel::Warn
                } else {
                    LogLevel::Info
                };
                assert_eq!(line.level, expected, "{line}");
                Some(message)
            })
            .collect()
    }

    /// Which of `users` land on canary (requests spread over both
    /// workers; every answer a 200).
    fn canary_users(&self, users: usize, extra: &[(&str, &str)]) -> BTreeSet<usize> {
        (0..users)
            .filter(|&user| {
                let id = format!("user-{user}");
                let mut headers = vec![("x-user-id", id.as_str())];
                headers.extend_from_slice(extra);
                send(self.w(user), &headers, |_| 200) == "shop_v2"
            })
            .collect()
    }
}

/// One request; the cluster it is steered to answers `status_of(cluster)`.
/// Returns the cluster.
fn send(vm: &Vm, extra: &[(&str, &str)], status_of: impl Fn(&str) -> u32) -> String {
    let mut headers = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "shop.local"),
        (":path", "/"),
    ];
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    assert_eq!(stream.request_headers(&headers, true), Action::Continue);
    assert_eq!(stream.local_reply(), None);
    let cluster = stream.request_header("x-sluice-cluster").unwrap();
    let status = status_of(&cluster);
    stream.set_attempt_count(1);
    stream.response_headers(&[(":status", &status.to_string())], true);
    stream.finish();
    assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    cluster
}

fn share(users: &BTreeSet<usize>, of: usize) -> f64 {
    users.len() as f64 / of as f64
}

/// A canary request through the explicit rule, answered `status`.
fn canary_call(vm: &Vm, status: u32) {
    assert_eq!(send(vm, &[("x-canary", "always")], |_| status), "shop_v2");
}

/// Failing canary requests until the gate rolls the canary back (a bounded
/// number: the gate must act within a few percent of the traffic seen).
fn fail_until_rolled_back(rig: &Rig) -> usize {
    let before = rig.rollbacks();
    for failures in 1..=50 {
        canary_call(rig.w(failures), 503);
        if rig.rollbacks() > before {
            return failures;
        }
    }
    panic!("50 canary failures in a row and no rollback");
}

#[test]
fn the_weight_follows_the_clock_step_by_step_then_the_canary_is_promoted() {
    const USERS: usize = 1_000;
    let rig = Rig::at(SHOP, 0);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    let step0 = rig.canary_users(USERS, &[]);
    assert!(
        (0.025..=0.08).contains(&share(&step0, USERS)),
        "{}",
        step0.len()
    );
    // The last millisecond of the step is still the step.
    rig.proxy.advance_ms(STEP_MS - 1);
    assert_eq!(rig.canary_users(USERS, &[]), step0);
    rig.proxy.advance_ms(1);
    let step1 = rig.canary_users(USERS, &[]);
    assert_eq!(rig.weight_bp(), 2_500);
    assert!(
        (0.2..=0.3).contains(&share(&step1, USERS)),
        "{}",
        step1.len()
    );
    // Users only ever move from stable to canary.
    assert!(step1.is_superset(&step0));
    rig.proxy.advance_ms(STEP_MS);
    let step2 = rig.canary_users(USERS, &[]);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 5_000));
    assert!(
        (0.44..=0.56).contains(&share(&step2, USERS)),
        "{}",
        step2.len()
    );
    assert!(step2.is_superset(&step1));
    rig.proxy.advance_ms(STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 10_000));
    assert_eq!(rig.canary_users(USERS, &[]).len(), USERS);
    rig.proxy.advance_ms(STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (2, 10_000));
    assert_eq!(rig.canary_users(USERS, &[]).len(), USERS);
    rig.proxy.advance_ms(10 * STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (2, 10_000));
    // Announced once per process each, though three VMs tick.
    assert_eq!(
        rig.rollout_log(),
        [
            "step 1/4, canary weight 5%",
            "step 2/4, canary weight 25%",
            "step 3/4, canary weight 50%",
            "step 4/4, canary weight 100%",
            "promoted, canary weight 100%"
        ]
    );
    assert_eq!(rig.rollbacks(), 0);
}

#[test]
fn a_rollout_that_has_not_started_is_pending_with_no_canary_traffic() {
    const USERS: usize = 400;
    let rig = Rig::at(SHOP, -600_000);
    assert_eq!((rig.state(), rig.weight_bp()), (3, 0));
    assert!(rig.canary_users(USERS, &[]).is_empty());
    // Cohort weights wait for the start too.
    assert!(rig
        .canary_users(USERS, &[("user-agent", IPHONE)])
        .is_empty());
    rig.proxy.advance_ms(600_000 - 1);
    assert_eq!((rig.state(), rig.weight_bp()), (3, 0));
    assert!(rig.canary_users(USERS, &[]).is_empty());
    assert!(rig.rollout_log().is_empty(), "{:?}", rig.rollout_log());
    rig.proxy.advance_ms(1);
    let step0 = rig.canary_users(USERS, &[]);
    assert!(!step0.is_empty() && share(&step0, USERS) < 0.1, "{step0:?}");
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    assert_eq!(rig.rollout_log(), ["step 1/4, canary weight 5%"]);
}

#[test]
fn without_start_unix_s_the_rollout_starts_when_the_config_is_first_applied() {
    const USERS: usize = 1_000;
    // The clock is far from start_unix_s: only the apply time matters.
    let rig = Rig::at(&shop_default_start(), -86_400_000);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    rig.proxy.advance_ms(200_000);
    // A worker started later agrees with the others on the schedule.
    let late = rig.proxy.start_vm().unwrap();
    rig.proxy.advance_ms(150_000);
    assert_eq!(rig.weight_bp(), 2_500);
    let on_canary = (0..USERS)
        .filter(|user| send(&late, &[("x-user-id", &format!("user-{user}"))], |_| 200) == "shop_v2")
        .count();
    assert!((200..=300).contains(&on_canary), "{on_canary}");
}

#[test]
fn a_failing_canary_is_rolled_back_for_good_but_explicit_rules_still_reach_it() {
    const USERS: usize = 1_000;
    // Who is on canary at 5 %, and the mobile cohort at its own 50 %, as a
    // twin proxy (same config, same clock) sees them.
    let twin = Rig::at(SHOP, 0);
    let step0 = twin.canary_users(USERS, &[]);
    let mobile = twin.canary_users(200, &[("user-agent", IPHONE)]);
    assert!((0.35..=0.65).contains(&share(&mobile, 200)), "{mobile:?}");

    let rig = Rig::at(SHOP, 0);
    // The canary starts failing. With min_requests 100 and a 2 % budget,
    // the third failure settles it: 3 > 0.02 x 100.
    let mut failed = 0;
    for &user in &step0 {
        let id = format!("user-{user}");
        let cluster = send(rig.w(user), &[("x-user-id", &id)], |cluster| {
            if cluster == "shop_v2" {
                503
            } else {
                200
            }
        });
        if cluster == "shop_v2" {
            failed += 1;
        }
        if rig.rollbacks() > 0 {
            break;
        }
    }
    assert_eq!(failed, 3);
    assert_eq!(rig.rollbacks(), 1);
    assert_eq!(
        rig.rollout_log(),
        [
            "step 1/4, canary weight 5%",
            "rolled back at step 1/4 (5%): 3 canary failures in 3 requests already exceed 0.02 of 100; canary weight 0 until the rollout block or the clusters change"
        ]
    );
    // Every worker drops the canary within a second.
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (1, 0));
    assert!(rig.canary_users(USERS, &[]).is_empty());
    // Cohort weights send nobody either; explicit rules still do.
    assert!(rig.canary_users(200, &[("user-agent", IPHONE)]).is_empty());
    canary_call(rig.w(0), 200);
    canary_call(rig.w(1), 200);
    // The clock moves past every step: no progress, no promotion.
    rig.proxy.advance_ms(5 * STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (1, 0));
    assert!(rig.canary_users(USERS, &[]).is_empty());
    assert_eq!(rig.rollout_log().len(), 2, "{:?}", rig.rollout_log());
    assert_eq!(rig.rollbacks(), 1);
}

#[test]
fn the_gate_allows_the_failure_budget_and_rolls_back_above_it() {
    let rig = Rig::at(SHOP, 0);
    // 2 of the first 202 canary requests fail: within 2 %.
    canary_call(rig.w(0), 500);
    canary_call(rig.w(1), 503);
    for i in 0..200 {
        canary_call(rig.w(i), 200);
    }
    // 4 of 204: still within.
    canary_call(rig.w(0), 503);
    canary_call(rig.w(1), 503);
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    assert_eq!(rig.rollbacks(), 0);
    // 5 of 205 is above 2 %.
    canary_call(rig.w(0), 503);
    assert_eq!(rig.rollbacks(), 1);
    assert!(
        rig.rollout_log().contains(
            &"rolled back at step 1/4 (5%): canary failure rate 0.024 > 0.02 over 205 requests; canary weight 0 until the rollout block or the clusters change"
                .to_string()
        ),
        "{:?}",
        rig.rollout_log()
    );
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (1, 0));
}

#[test]
fn each_step_is_judged_on_its_own_requests() {
    let rig = Rig::at(SHOP, 0);
    // Step 1: 4 failures in 200 requests, exactly the budget.
    for i in 0..196 {
        canary_call(rig.w(i), 200);
    }
    for i in 0..4 {
        canary_call(rig.w(i), 503);
    }
    rig.proxy.advance_ms(STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 2_500));
    // Step 2 starts with two failures: 2 of at least 100 is within budget
    // (counted with step 1, 6 of 202 would not be).
    canary_call(rig.w(0), 503);
    canary_call(rig.w(1), 503);
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.rollbacks()), (0, 0));
    canary_call(rig.w(0), 503);
    assert_eq!(rig.rollbacks(), 1);
    assert!(rig
        .rollout_log()
        .iter()
        .any(|line| line.starts_with("rolled back at step 2/4 (25%): 3 canary failures in 3")));
}

#[test]
fn an_unchanged_block_keeps_the_rollout_across_pushes_and_a_changed_one_restarts_it() {
    const USERS: usize = 1_000;
    let config = shop_default_start();
    let rig = Rig::at(&config, 0);
    rig.proxy.advance_ms(STEP_MS);
    assert_eq!(rig.weight_bp(), 2_500);
    // A push that changes the rules but not the rollout: still step 2.
    let more_rules = config.replace(
        r#"{"device": "mobile", "weight": 50}"#,
        r#"{"device": "mobile", "weight": 50}, {"header": "x-canary", "equals": "never", "to": "stable"}"#,
    );
    assert_ne!(more_rules, config);
    rig.proxy.reconfigure(more_rules.clone()).unwrap();
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 2_500));
    let on_canary = rig.canary_users(USERS, &[]);
    assert!(
        (0.2..=0.3).contains(&share(&on_canary, USERS)),
        "{}",
        on_canary.len()
    );

    // Rolled back, then pushed again unchanged: still rolled back.
    fail_until_rolled_back(&rig);
    assert_eq!(rig.rollbacks(), 1);
    rig.proxy.reconfigure(config.clone()).unwrap();
    rig.proxy.advance_ms(1_000);
    assert_eq!((rig.state(), rig.weight_bp()), (1, 0));
    assert!(rig.canary_users(USERS, &[]).is_empty());

    // A changed block is a new rollout, from its first step, now.
    let changed = config.replace(r#""max_failure_rate": 0.02"#, r#""max_failure_rate": 0.05"#);
    rig.proxy.reconfigure(changed.clone()).unwrap();
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    let on_canary = rig.canary_users(USERS, &[]);
    assert!(
        (0.025..=0.08).contains(&share(&on_canary, USERS)),
        "{}",
        on_canary.len()
    );
    rig.proxy.advance_ms(STEP_MS);
    assert_eq!((rig.state(), rig.weight_bp()), (0, 2_500));

    // So is the same block for another canary cluster.
    fail_until_rolled_back(&rig);
    assert_eq!(rig.rollbacks(), 2);
    rig.proxy
        .reconfigure(changed.replace(r#""canary": "shop_v2""#, r#""canary": "shop_v3""#))
        .unwrap();
    assert_eq!((rig.state(), rig.weight_bp()), (0, 500));
    assert_eq!(rig.rollbacks(), 2);
    assert_eq!(
        rig.rollout_log()
            .iter()
            .filter(|line| *line == "step 1/4, canary weight 5%")
            .count(),
        3
    );
}

#[test]
fn a_canary_hidden_by_its_open_breaker_still_fails_the_gate() {
    const USERS: usize = 200;
    let config = SHOP
        .replace(r#""steps": [5, 25, 50, 100]"#, r#""steps": [50, 100]"#)
        .replace(r#""max_failure_rate": 0.02"#, r#""max_failure_rate": 0.1"#)
        .replace(
            r#""rollout":"#,
            r#""breaker": {"consecutive_failures": 5, "open_ms": 5000},
    "rollout":"#,
        );
    let rig = Rig::at(&config, 0);
    for i in 0..100 {
        canary_call(rig.w(i), 200);
    }
    // Five failures in a row open the canary's breaker; 5 in 105 is
    // within the rollout's 10 %.
    for i in 0..5 {
        canary_call(rig.w(i), 503);
    }
    // Every worker sees the open breaker within 100 ms (BREAKER_CACHE_MS).
    rig.proxy.advance_ms(100);
    rig.proxy.tick_now();
    assert_eq!(rig.proxy.gauge("sluice.shop.breaker.canary.state"), Some(1));
    assert_eq!(rig.rollbacks(), 0);
    // The canary's users are served by stable without an error, but each
    // of them is a canary request that failed: 12 of 112 rolls it back.
    let mut steered = 0;
    for user in 0..USERS {
        let id = format!("user-{user}");
        let cluster = send(rig.w(user), &[("x-user-id", &id)], |_| 200);
        assert_eq!(cluster, "shop_v1");
        if rig.rollbacks() > 0 {
            break;
        }
        steered += 1;
    }
    assert_eq!(rig.rollbacks(), 1);
    assert!(steered < USERS, "never rolled back");
    assert!(
        rig.rollout_log().contains(
            &"rolled back at step 1/2 (50%): canary failure rate 0.107 > 0.1 over 112 requests; canary weight 0 until the rollout block or the clusters change"
                .to_string()
        ),
        "{:?}",
        rig.rollout_log()
    );
    // Once the breaker would let probes through, the rolled-back canary
    // still gets no cohort traffic; an explicit request probes it and
    // closes the breaker, and the cohort stays on stable.
    rig.proxy.advance_ms(6_000);
    for i in 0..3 {
        canary_call(rig.w(i), 200);
    }
    rig.proxy.tick_now();
    assert_eq!(rig.proxy.gauge("sluice.shop.breaker.canary.state"), Some(0));
    assert!(rig.canary_users(USERS, &[]).is_empty());
    assert_eq!((rig.state(), rig.weight_bp()), (1, 0));
}
