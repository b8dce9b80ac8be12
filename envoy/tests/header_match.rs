//! Header-match routing with Istio-style cluster names, in a real Envoy: the
//! shipped ECDS example routes `x-sluice-cluster: v2` (exact) to
//! `outbound|80|v2|shop.default.svc.cluster.local` and everything else to
//! the v1 cluster, as an Istio VirtualService on subsets (or a Gateway API
//! HTTPRoute with a header match) does; Sluice's `stable`/`canary` are the
//! values `v1`/`v2`. Routing follows Sluice's choice, and a client-forged
//! `x-sluice-cluster: v2` never steers: overwritten on a request Sluice
//! routes, removed from any other.
//!
//! Needs the release wasm and Envoy, as `ecds.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;

use sluice_envoy::ecds::EcdsEnvoy;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::Upstream;

#[test]
fn header_match_routes_follow_sluice_and_a_forged_header_never_steers() {
    let v1 = Upstream::start("v1").unwrap();
    let v2 = Upstream::start("v2").unwrap();
    let proxy = EcdsEnvoy::start(&v1, &v2, &EnvoyOptions::default(), Ok).unwrap();
    let mut clients = proxy.envoy.clients_on_both_workers(2);

    // 1. The sticky split (weight 10), every request forging v2.
    let mut side: HashMap<String, String> = HashMap::new();
    let users = 1_000;
    for round in 0..2 {
        for user in 0..users {
            let id = format!("user-{user}");
            let slot = (user + round) % clients.len();
            let client = &mut clients[slot];
            let r = client
                .get(
                    "shop.local",
                    "/",
                    &[("x-user-id", id.as_str()), ("x-sluice-cluster", "v2")],
                )
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.body_text());
            let upstream = r.upstream().unwrap().to_string();
            if let Some(first) = side.insert(id.clone(), upstream.clone()) {
                assert_eq!(first, upstream, "{id} changed sides between workers");
            }
        }
    }
    let on_v2 = side.values().filter(|u| *u == "v2").count();
    let share = on_v2 as f64 / users as f64;
    eprintln!("header-match split: {on_v2} of {users} users on v2 ({share:.3}, weight 10)");
    assert!((0.07..0.13).contains(&share), "v2 share {share}");
    // Each upstream saw only what Sluice sent it: v2 its route's value,
    // v1 no header at all (the example's "stable_by_default": a request
    // kept on stable takes the default route, the client's forged v2
    // removed). Never a forged value.
    for (upstream, value) in [(&v1, ""), (&v2, "v2")] {
        let seen = upstream.counts_by_header("x-sluice-cluster");
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec![value],
            "{}: {seen:?}",
            upstream.name()
        );
    }

    // 2. Rules: `never` beats the forged v2, `always` sends to v2.
    let client = &mut clients[0];
    for (canary, want) in [("never", "v1"), ("always", "v2")] {
        for user in 0..50 {
            let id = format!("rule-{user}");
            let r = client
                .get(
                    "shop.default.svc.cluster.local",
                    "/",
                    &[
                        ("x-user-id", id.as_str()),
                        ("x-canary", canary),
                        ("x-sluice-cluster", "v2"),
                    ],
                )
                .unwrap();
            assert_eq!(r.upstream(), Some(want), "x-canary: {canary}");
        }
    }

    // 3. A request Sluice does not route: the forged header is removed, and
    //    the default route (v1) serves it.
    v1.reset_counters();
    for _ in 0..20 {
        let r = client
            .get("other.local", "/", &[("x-sluice-cluster", "v2")])
            .unwrap();
        assert_eq!(r.upstream(), Some("v1"));
    }
    assert!(
        v1.recorded()
            .iter()
            .all(|r| r.header("x-sluice-cluster").is_none()),
        "the forged header is removed"
    );
    proxy.envoy.await_sluice_tick();
    let metrics = proxy.envoy.wasm_metrics().unwrap();
    eprintln!(
        "routed.stable {:?}, routed.canary {:?}, unmatched {:?}",
        metrics.get("sluice.shop.routed.stable"),
        metrics.get("sluice.shop.routed.canary"),
        metrics.get("sluice.unmatched"),
    );
    assert_eq!(metrics.get("sluice.unmatched"), Some(&20));
    assert!(!proxy.envoy.log().contains("offers no clear_route_cache"));
}
