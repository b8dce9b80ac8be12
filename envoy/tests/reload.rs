//! Zero-downtime configuration changes: Envoy's listener comes from a
//! file-based LDS source, Sluice's config is changed while traffic flows,
//! and no request may fail because of it.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first, and
//! Envoy from `scripts/setup.sh`.

// A failing harness is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::lds::{LdsEnvoy, PushOutcome};
use sluice_envoy::load::{share_of, PhasedLoad, Seen};
use sluice_envoy::{Client, EnvoyConfig, Upstream};

fn shop(weight: f64, extra_rule: Option<Value>, failure_rate: f64) -> String {
    let mut rules = vec![
        json!({"header": "x-canary", "equals": "always", "to": "canary"}),
        json!({"header": "x-canary", "equals": "never", "to": "stable"}),
    ];
    rules.extend(extra_rule);
    json!({
        "services": [{
            "name": "shop",
            "match": {"authority": "shop.local"},
            "stable": "shop_v1",
            "canary": "shop_v2",
            "weight": weight,
            "sticky": {"header": "x-user-id"},
            "rules": rules,
            "retry": {"max_retries": 1, "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10}},
            "breaker": {"window_s": 10, "min_requests": 50, "failure_rate": failure_rate}
        }]
    })
    .to_string()
}

/// Drain time plus margin.
const SETTLE: Duration = Duration::from_millis(1_400);
/// How long each phase of the push sequence lasts.
const PHASE: Duration = Duration::from_millis(2_400);

fn options() -> EnvoyOptions {
    EnvoyOptions {
        // Old filter chains drain quickly, so a test sees several
        // generations of connections.
        extra_args: vec!["--drain-time-s".into(), "1".into()],
        ..EnvoyOptions::default()
    }
}

/// Canary share of a phase's answered requests, skipping the first
/// `SETTLE` after the phase began: keep-alive connections opened before a
/// push stay on the previous filter chain until Envoy drains them
/// (`--drain-time-s 1`), exactly as in production.
fn canary_share(seen: &[Seen], phase: usize, began: Instant) -> (f64, usize) {
    share_of(seen, phase, began, SETTLE, "canary")
}

#[test]
fn config_pushes_under_load_fail_no_request() {
    let wasm = sluice_envoy::require_wasm().unwrap();
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let config = EnvoyConfig::new(shop(10.0, None, 0.5))
        .wasm(&wasm)
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary);
    let mut proxy = LdsEnvoy::start(&config, &options()).unwrap();
    let addr = format!("127.0.0.1:{}", proxy.listener_port())
        .parse()
        .unwrap();
    let load = PhasedLoad::start(addr, 6, &[]);
    let mut began = vec![Instant::now()];
    thread::sleep(PHASE);

    // 1. Raise the weight.
    assert_eq!(
        proxy.push(&shop(50.0, None, 0.5)).unwrap(),
        PushOutcome::Accepted
    );
    load.enter(1);
    began.push(Instant::now());
    thread::sleep(PHASE);

    // 2. An invalid config: refused, the previous one keeps serving.
    assert_eq!(
        proxy.push(&shop(150.0, None, 0.5)).unwrap(),
        PushOutcome::Rejected
    );
    load.enter(2);
    began.push(Instant::now());
    thread::sleep(PHASE);

    // 3. A new rule and a new breaker threshold.
    let beta = json!({"header": "x-beta", "present": true, "to": "canary"});
    assert_eq!(
        proxy.push(&shop(50.0, Some(beta), 0.6)).unwrap(),
        PushOutcome::Accepted
    );
    load.enter(3);
    began.push(Instant::now());
    thread::sleep(PHASE);
    let mut probe = Client::new(proxy.envoy.addr());
    for user in 0..50 {
        let id = format!("beta-{user}");
        let response = probe
            .get(
                "shop.local",
                "/",
                &[("x-user-id", id.as_str()), ("x-beta", "1")],
            )
            .unwrap();
        assert_eq!(
            response.upstream(),
            Some("canary"),
            "the pushed rule is in force"
        );
    }

    // 4. Promote: everyone on canary.
    assert_eq!(
        proxy.push(&shop(100.0, None, 0.6)).unwrap(),
        PushOutcome::Accepted
    );
    load.enter(4);
    began.push(Instant::now());
    thread::sleep(PHASE);
    let (seen, _) = load.finish();

    let failed: Vec<&Seen> = seen
        .iter()
        .filter(|s| !matches!(s.outcome, Ok((200, _))))
        .collect();
    let elapsed = began[0].elapsed().as_secs_f64();
    eprintln!(
        "pushes under load: {} requests in {elapsed:.1}s ({:.0} req/s) across 4 pushes (1 refused), {} failed",
        seen.len(),
        seen.len() as f64 / elapsed,
        failed.len()
    );
    assert!(
        seen.len() > 2_000,
        "the load was too light to mean anything: {}",
        seen.len()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    let expected = [(0, 0.10), (1, 0.50), (2, 0.50), (4, 1.00)];
    for (phase, want) in expected {
        let (share, count) = canary_share(&seen, phase, began[phase]);
        eprintln!("phase {phase}: canary share {share:.3} over {count} requests (want {want})");
        assert!(count > 200, "phase {phase} saw only {count} requests");
        assert!(
            (share - want).abs() <= 0.05,
            "phase {phase}: canary share {share:.3}, want {want}"
        );
    }
    assert!(
        proxy
            .envoy
            .log()
            .contains("services[0].weight: must be between 0 and 100, got 150"),
        "the refusal names the path and the reason"
    );
}

#[test]
fn breaker_state_survives_a_push_that_keeps_its_block() {
    let wasm = sluice_envoy::require_wasm().unwrap();
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    canary.set_fail_all(true);
    let sluice = |weight: f64, open_ms: u64| {
        json!({"services": [{
            "name": "shop", "stable": "shop_v1", "canary": "shop_v2", "weight": weight,
            "sticky": {"header": "x-user-id"},
            "breaker": {"min_requests": 5, "failure_rate": 0.5, "open_ms": open_ms, "max_open_ms": open_ms}
        }]})
        .to_string()
    };
    let config = EnvoyConfig::new(sluice(50.0, 60_000))
        .wasm(&wasm)
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary);
    let mut proxy = LdsEnvoy::start(&config, &options()).unwrap();
    let addr = proxy.envoy.addr();
    // A new connection per batch: after a push, connections opened earlier
    // stay on the previous filter chain until Envoy drains them.
    let send = |count: usize, offset: usize| -> usize {
        let mut client = Client::new(addr);
        (0..count)
            .filter(|user| {
                let id = format!("u{}", user + offset);
                client
                    .get("shop.local", "/", &[("x-user-id", id.as_str())])
                    .unwrap()
                    .status
                    != 200
            })
            .count()
    };

    // Trip the canary's breaker.
    send(60, 0);
    assert_eq!(
        proxy
            .envoy
            .settled_wasm_metric("sluice.shop.breaker.canary.trips")
            .unwrap(),
        Some(1)
    );
    let canary_seen = canary.requests();
    assert_eq!(
        send(200, 1_000),
        0,
        "canary traffic goes to stable while its breaker is open"
    );
    assert_eq!(canary.requests(), canary_seen);

    // A push that keeps the breaker block keeps the breaker open.
    assert_eq!(
        proxy.push(&sluice(60.0, 60_000)).unwrap(),
        PushOutcome::Accepted
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(send(200, 2_000), 0);
    assert_eq!(
        canary.requests(),
        canary_seen,
        "the canary's upstream was not tried again"
    );
    assert_eq!(
        proxy
            .envoy
            .settled_wasm_metric("sluice.shop.breaker.canary.trips")
            .unwrap(),
        Some(1)
    );

    // A changed breaker block starts a fresh, closed breaker.
    assert_eq!(
        proxy.push(&sluice(60.0, 59_000)).unwrap(),
        PushOutcome::Accepted
    );
    thread::sleep(Duration::from_millis(300));
    send(20, 3_000);
    assert!(
        canary.requests() > canary_seen,
        "a fresh breaker lets canary traffic through"
    );
}
