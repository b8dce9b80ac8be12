//! Sluice configured through ECDS, as a control plane feeds it: the shipped
//! example (`envoy/examples/sluice-ecds-bootstrap.yaml` and
//! `sluice-ecds-filter.yaml`: header-match routes, Istio-style cluster
//! names, `vm_id` empty) in a real Envoy, config pushes by atomic file
//! replace under load. No request may fail, and unlike a listener (LDS) push
//! no connection is drained: the keep-alive clients keep the connection they
//! opened, and the new config applies on it. A refused config keeps the old
//! one serving (`config_fail`). For comparison, the same pushes by LDS
//! (`reload.rs`'s way) drain every keep-alive connection.
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
use sluice_envoy::ecds::{self, EcdsEnvoy};
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::lds::{LdsEnvoy, PushOutcome};
use sluice_envoy::load::{share_of, PhasedLoad, Seen};
use sluice_envoy::{EnvoyConfig, Upstream};

/// Keep-alive clients of the load.
const CLIENTS: usize = 6;
/// How long each phase of a push sequence lasts.
const PHASE: Duration = Duration::from_millis(2_000);
/// After an accepted ECDS push, the workers get the new config through
/// Envoy's thread-local update: a few milliseconds; this is the margin.
const ECDS_SETTLE: Duration = Duration::from_millis(300);

/// The example's Sluice JSON with another weight and, optionally, another
/// breaker threshold.
fn example_with(weight: f64, failure_rate: Option<f64>) -> String {
    let filter = ecds::example_filter().unwrap();
    let mut value: Value = serde_json::from_str(&ecds::sluice_json_of(&filter).unwrap()).unwrap();
    value["services"][0]["weight"] = json!(weight);
    if let Some(rate) = failure_rate {
        value["services"][0]["breaker"]["failure_rate"] = json!(rate);
    }
    serde_json::to_string_pretty(&value).unwrap()
}

/// Share of a phase's answered requests that reached v2, skipping the
/// first `settle` after the phase began.
fn canary_share(seen: &[Seen], phase: usize, began: Instant, settle: Duration) -> (f64, usize) {
    share_of(seen, phase, began, settle, "v2")
}

fn failed(seen: &[Seen]) -> Vec<&Seen> {
    seen.iter()
        .filter(|s| !matches!(s.outcome, Ok((200, _))))
        .collect()
}

#[test]
fn the_examples_sluice_json_passes_sluices_own_check() {
    let filter = ecds::example_filter().unwrap();
    let json = ecds::sluice_json_of(&filter).unwrap();
    let config = sluice::config::Config::parse(json.as_bytes()).unwrap();
    assert_eq!(config.services[0].stable, "v1");
    assert!(filter.contains("vm_id: \"\""), "vm_id empty, as Istio");
    let bootstrap = ecds::example_bootstrap().unwrap();
    assert!(bootstrap.contains("type_urls:\n              - type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"));
}

#[test]
fn ecds_pushes_under_load_lose_no_request_and_drain_no_connection() {
    let v1 = Upstream::start("v1").unwrap();
    let v2 = Upstream::start("v2").unwrap();
    let mut proxy = EcdsEnvoy::start(&v1, &v2, &EnvoyOptions::default(), Ok).unwrap();
    let listener_modified = proxy
        .envoy
        .stat("listener_manager.listener_modified")
        .unwrap()
        .unwrap_or(0);
    let load = PhasedLoad::start(proxy.envoy.addr(), CLIENTS, &[("x-sluice-cluster", "v2")]);
    let mut began = vec![Instant::now()];
    thread::sleep(PHASE);

    // 1. Raise the weight 10 -> 50.
    let t = Instant::now();
    assert_eq!(
        proxy.push(&example_with(50.0, None)).unwrap(),
        PushOutcome::Accepted
    );
    eprintln!("push 1 accepted after {:?}", t.elapsed());
    load.enter(1);
    began.push(Instant::now());
    thread::sleep(PHASE);

    // 2. Bad Sluice JSON: refused, the previous config keeps serving.
    let fails = proxy.ecds_counter("config_fail");
    assert_eq!(
        proxy.push(&example_with(150.0, None)).unwrap(),
        PushOutcome::Rejected
    );
    assert_eq!(proxy.ecds_counter("config_fail"), fails + 1);
    load.enter(2);
    began.push(Instant::now());
    thread::sleep(PHASE);

    // 3. A new breaker threshold (a changed block starts a fresh breaker).
    assert_eq!(
        proxy.push(&example_with(50.0, Some(0.6))).unwrap(),
        PushOutcome::Accepted
    );
    load.enter(3);
    began.push(Instant::now());
    thread::sleep(PHASE);

    // 4. Promote: everyone on v2.
    assert_eq!(
        proxy.push(&example_with(100.0, Some(0.6))).unwrap(),
        PushOutcome::Accepted
    );
    load.enter(4);
    began.push(Instant::now());
    thread::sleep(PHASE);
    let (seen, opened) = load.finish();

    let failed = failed(&seen);
    let elapsed = began[0].elapsed().as_secs_f64();
    let stats = proxy.envoy.stats().unwrap();
    let stat = |name: &str| stats.get(name).copied().unwrap_or(0);
    eprintln!(
        "ECDS pushes under load: {} requests in {elapsed:.1}s ({:.0} req/s), 4 pushes (1 refused), \
         {} failed; {CLIENTS} keep-alive clients opened {opened} connections ({} drained); \
         http.ingress_http.downstream_cx_total {}, downstream_cx_drain_close {}, \
         listener_manager.listener_modified +{}, ECDS update_success {}, config_fail {}",
        seen.len(),
        seen.len() as f64 / elapsed,
        failed.len(),
        opened.saturating_sub(CLIENTS as u64),
        stat("http.ingress_http.downstream_cx_total"),
        stat("http.ingress_http.downstream_cx_drain_close"),
        stat("listener_manager.listener_modified") - listener_modified,
        proxy.ecds_counter("update_success"),
        proxy.ecds_counter("config_fail"),
    );
    assert!(seen.len() > 2_000, "the load was too light: {}", seen.len());
    assert!(
        failed.is_empty(),
        "{} requests failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(
        opened, CLIENTS as u64,
        "an ECDS push drains no connection: each client kept its first one"
    );
    assert_eq!(
        stat("http.ingress_http.downstream_cx_total"),
        CLIENTS as u64
    );
    assert_eq!(stat("http.ingress_http.downstream_cx_drain_close"), 0);
    assert_eq!(
        stat("listener_manager.listener_modified"),
        listener_modified,
        "no listener was replaced"
    );

    // Every client sent a forged `x-sluice-cluster: v2`; the split is
    // Sluice's, applied on the connections opened before the push.
    let expected = [(0, 0.10), (1, 0.50), (2, 0.50), (3, 0.50), (4, 1.00)];
    for (phase, want) in expected {
        let (share, count) = canary_share(&seen, phase, began[phase], ECDS_SETTLE);
        eprintln!("phase {phase}: v2 share {share:.3} over {count} requests (want {want})");
        assert!(count > 200, "phase {phase} saw only {count} requests");
        assert!(
            (share - want).abs() <= 0.05,
            "phase {phase}: v2 share {share:.3}, want {want}"
        );
    }
    assert!(
        proxy
            .envoy
            .log()
            .contains("services[0].weight: must be between 0 and 100, got 150"),
        "the refusal names the path and the reason"
    );
    assert!(
        !proxy.envoy.log().contains("offers no clear_route_cache"),
        "Envoy 1.40 offers clear_route_cache"
    );
}

/// The same kind of pushes by LDS, for the comparison the README shows:
/// every keep-alive connection opened before a push is drained (closed by
/// Envoy) and reopened, though no request fails.
#[test]
fn lds_pushes_under_load_lose_no_request_but_drain_the_connections() {
    let stable = Upstream::start("v1").unwrap();
    let canary = Upstream::start("v2").unwrap();
    let sluice = |weight: f64| {
        json!({"services": [{
            "name": "shop", "match": {"authority": "shop.local"},
            "stable": "shop_v1", "canary": "shop_v2", "weight": weight,
            "sticky": {"header": "x-user-id"}
        }]})
        .to_string()
    };
    let config = EnvoyConfig::new(sluice(10.0))
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary);
    let options = EnvoyOptions {
        extra_args: vec!["--drain-time-s".into(), "1".into()],
        ..EnvoyOptions::default()
    };
    let mut proxy = LdsEnvoy::start(&config, &options).unwrap();
    let load = PhasedLoad::start(proxy.envoy.addr(), CLIENTS, &[("x-sluice-cluster", "v2")]);
    thread::sleep(PHASE);
    for (phase, weight) in [(1, 50.0), (2, 100.0)] {
        assert_eq!(proxy.push(&sluice(weight)).unwrap(), PushOutcome::Accepted);
        load.enter(phase);
        thread::sleep(PHASE);
    }
    let (seen, opened) = load.finish();
    let failed = failed(&seen);
    let stats = proxy.envoy.stats().unwrap();
    eprintln!(
        "LDS pushes under load: {} requests, 2 pushes, {} failed; {CLIENTS} keep-alive clients \
         opened {opened} connections ({} drained); downstream_cx_drain_close {}",
        seen.len(),
        failed.len(),
        opened.saturating_sub(CLIENTS as u64),
        stats
            .get("http.ingress_http.downstream_cx_drain_close")
            .copied()
            .unwrap_or(0),
    );
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert!(
        opened >= 2 * CLIENTS as u64,
        "each LDS push drains the connections opened before it: {opened}"
    );
}
