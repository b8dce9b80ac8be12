//! A wall clock that jumps. Envoy's `proxy_get_current_time_nanoseconds` is
//! the system wall clock (`std::chrono::system_clock`), which NTP steps back
//! and forward; timers (ticks) run on the dispatcher's monotonic clock. The
//! fake keeps both (`Proxy::step_wall_clock_back`/`_forward` move only the
//! wall clock; `advance` moves both).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use sluice_host::{require_sluice_wasm, Proxy, Stream, Vm};

const TEN_MINUTES: Duration = Duration::from_secs(600);
const ONE_HOUR: Duration = Duration::from_secs(3_600);

const BREAKER: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "breaker": {"consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 60000,
                "half_open_requests": 1}
}]}"#;

const BUDGET: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "retry": {"max_retries": 1, "retry_on": "5xx",
              "budget": {"ratio": 0.1, "min_per_s": 1, "window_s": 10}}
}]}"#;

/// Two-hour steps from `start_unix_s` (set per test).
fn rollout(start: &str) -> String {
    format!(
        r#"{{"services": [{{
        "name": "shop",
        "match": {{"authority": "shop.local"}},
        "stable": "shop_v1", "canary": "shop_v2",
        "rollout": {{"steps": [10, 50, 100], "step_s": 7200, "max_failure_rate": 0.5,
                    "min_requests": 10{start}}}
    }}]}}"#
    )
}

fn rig(config: &str) -> (Proxy, Vec<Vm>) {
    let proxy = Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .build()
        .unwrap();
    let vms = proxy.boot(2).unwrap().into_iter().skip(1).collect();
    (proxy, vms)
}

fn begin(vm: &Vm) -> Stream {
    let s = vm.stream();
    s.request_headers(
        &[
            (":method", "GET"),
            (":authority", "shop.local"),
            (":path", "/"),
        ],
        true,
    );
    s
}

/// One request answered `status` by the upstream, or turned away by the
/// filter (then: the reply's retry-after).
fn send(vm: &Vm, status: &str) -> Result<String, u64> {
    let s = begin(vm);
    if let Some(reply) = s.local_reply() {
        s.finish();
        let after = reply
            .headers
            .iter()
            .find(|(k, _)| k == "retry-after")
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        return Err(after);
    }
    let cluster = s.request_header("x-sluice-cluster").unwrap();
    s.response_headers(&[(":status", status)], true);
    s.finish();
    assert!(vm.trapped().is_none());
    Ok(cluster)
}

/// A breaker tripped (open 5 s) by worker 0; the wall clock is stepped back
/// 10 minutes; 6 s later (monotonic) a probe is admitted by either worker —
/// including the one that tripped it and cached "open until" — rather than
/// the breaker staying open for 10 minutes and 5 seconds.
#[test]
fn a_wall_clock_stepped_back_does_not_hold_a_breaker_open() {
    for prober in 0..2 {
        let (proxy, w) = rig(BREAKER);
        for _ in 0..5 {
            send(&w[0], "503").unwrap();
        }
        let after = send(&w[0], "200").unwrap_err();
        assert!((5..=6).contains(&after), "retry-after {after}");
        proxy.step_wall_clock_back(TEN_MINUTES);
        proxy.advance(Duration::from_secs(6));
        // Retry-afters seen meanwhile never promise more than max_open_ms.
        assert_eq!(
            send(&w[prober], "200"),
            Ok("shop_v1".to_string()),
            "worker {prober}: no probe 6 s after the trip"
        );
        // The probe succeeded: closed for everyone.
        proxy.advance_ms(200);
        assert_eq!(send(&w[1 - prober], "200"), Ok("shop_v1".to_string()));
        assert_eq!(send(&w[prober], "200"), Ok("shop_v1".to_string()));
    }
}

/// Same for a retry budget: drained, the wall clock stepped back 10 minutes,
/// the budget is whole again (its reserve) within one window, not 10
/// minutes later.
#[test]
fn a_wall_clock_stepped_back_does_not_hold_the_retry_budget_dry() {
    let (proxy, w) = rig(BUDGET);
    let granted = |vm: &Vm| {
        let s = begin(vm);
        let n: u32 = s
            .request_header("x-envoy-max-retries")
            .unwrap()
            .parse()
            .unwrap();
        s.set_attempt_count(u64::from(n) + 1);
        s.response_headers(&[(":status", "503")], true);
        s.finish();
        n
    };
    // Drain it: every request uses its retry.
    let mut denied = 0;
    for i in 0..200 {
        if granted(&w[i % 2]) == 0 {
            denied += 1;
        }
    }
    assert!(denied > 100, "the budget never ran dry ({denied} denied)");
    proxy.step_wall_clock_back(TEN_MINUTES);
    proxy.advance(Duration::from_secs(10));
    assert_eq!(
        granted(&w[0]),
        1,
        "budget still dry one window after the step"
    );
    assert_eq!(granted(&w[1]), 1);
}

fn weight_of(proxy: &Proxy) -> u64 {
    proxy.tick_now();
    proxy.gauge("sluice.shop.rollout.weight_bp").unwrap()
}

fn rollout_state(proxy: &Proxy) -> u64 {
    proxy.tick_now();
    proxy.gauge("sluice.shop.rollout.state").unwrap()
}

/// A rollout in its first step (10 %), with the wall clock stepped back 10
/// minutes. With `start_unix_s` the schedule is the wall clock's (so that a
/// fleet moves in lockstep); stepped back to before the start it is pending
/// (weight 0) until the wall clock reaches the start again. Without it (the
/// start is when the process first applied the block, recorded in shared
/// data), the rollout is not held "pending" for 10 minutes: 6 s later the
/// canary still gets its 10 %.
#[test]
fn a_wall_clock_stepped_back_does_not_freeze_a_rollout() {
    // Default start: applied at boot.
    let (proxy, w) = rig(&rollout(""));
    proxy.advance_ms(1_000);
    assert_eq!(weight_of(&proxy), 1_000);
    proxy.step_wall_clock_back(TEN_MINUTES);
    proxy.advance(Duration::from_secs(6));
    assert_eq!(
        weight_of(&proxy),
        1_000,
        "rollout frozen by a clock stepped back"
    );
    let canary = (0..400)
        .filter(|i| send(&w[i % 2], "200").unwrap() == "shop_v2")
        .count();
    assert!((10..=80).contains(&canary), "{canary}/400 to the canary");
    assert_eq!(rollout_state(&proxy), 0, "progressing");
    // Forward again past where it was: still the first step.
    proxy.step_wall_clock_forward(TEN_MINUTES);
    proxy.advance_ms(1_000);
    assert_eq!(weight_of(&proxy), 1_000);
}

/// Forward one hour, in the middle of two-hour steps, with failures at the
/// gate's limit before the jump: nothing is promoted, no step announced,
/// nothing rolled back; the schedule goes on from the wall clock.
#[test]
fn a_wall_clock_stepped_forward_promotes_and_rolls_back_nothing() {
    let start_s = sluice_host::DEFAULT_START_UNIX_SECS + 60;
    let (proxy, w) = rig(&rollout(&format!(r#", "start_unix_s": {start_s}"#)));
    proxy.advance_ms(61_000);
    assert_eq!(weight_of(&proxy), 1_000);
    // Some canary traffic, few failures.
    let mut canary = 0;
    for i in 0..200 {
        let status = if i % 10 == 0 { "503" } else { "200" };
        if send(&w[i % 2], status).unwrap() == "shop_v2" {
            canary += 1;
        }
    }
    assert!(canary > 0);
    proxy.clear_logs();
    proxy.step_wall_clock_forward(ONE_HOUR);
    proxy.advance_ms(1_000);
    assert_eq!(weight_of(&proxy), 1_000, "still the first step");
    assert_eq!(rollout_state(&proxy), 0, "progressing");
    assert!(
        !proxy.logged("sluice: rollout of service shop"),
        "{:?}",
        proxy.logs()
    );
    for i in 0..200 {
        send(&w[i % 2], "200").unwrap();
    }
    assert_eq!(rollout_state(&proxy), 0);
    // The step boundary comes when the wall clock reaches it (one more hour).
    proxy.advance(ONE_HOUR);
    assert_eq!(weight_of(&proxy), 5_000);
}

/// Forward one hour with a breaker that has failures in its window and one
/// that is open: the first does not trip (the window's old failures leave
/// it), the second admits a probe (its open time has passed on the wall
/// clock) and closes on success — no extra trip, no stuck state.
#[test]
fn a_wall_clock_stepped_forward_trips_no_breaker() {
    let (proxy, w) = rig(BREAKER);
    for _ in 0..4 {
        send(&w[0], "503").unwrap();
    }
    proxy.step_wall_clock_forward(ONE_HOUR);
    proxy.advance_ms(200);
    assert_eq!(send(&w[1], "200"), Ok("shop_v1".into()));
    assert_eq!(send(&w[0], "503"), Ok("shop_v1".into()));
    assert_eq!(send(&w[1], "200"), Ok("shop_v1".into()));
    proxy.tick_now();
    assert_eq!(
        proxy
            .counter("sluice.shop.breaker.stable.trips")
            .unwrap_or(0),
        0
    );
    assert_eq!(send(&w[0], "200"), Ok("shop_v1".into()));
}

/// A worker that read the breaker closed just before the wall clock was
/// stepped back 10 minutes does not trust that read for 10 minutes: when
/// another worker trips the breaker, it turns requests away within the
/// usual cache time (100 ms).
#[test]
fn a_wall_clock_stepped_back_does_not_extend_a_cached_closed_verdict() {
    let (proxy, w) = rig(BREAKER);
    assert_eq!(send(&w[1], "200"), Ok("shop_v1".into()));
    proxy.step_wall_clock_back(TEN_MINUTES);
    for _ in 0..5 {
        send(&w[0], "503").unwrap();
    }
    proxy.advance_ms(100);
    let after =
        send(&w[1], "200").expect_err("worker 1 still trusts its read from before the step");
    assert!((4..=6).contains(&after), "retry-after {after}");
}
