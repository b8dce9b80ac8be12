//! `random_get` per VM and per run. Envoy's is BoringSSL's `RAND_bytes`:
//! every worker VM draws different bytes, and so does every run. The fake
//! seeds one generator per VM from a per-proxy seed (`Proxy::random_seed`,
//! fixed with `ProxyBuilder::random_seed` to replay a run).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Proxy, Vm};

/// 30 % to the canary, no sticky key: every request is a fresh draw.
const SPLIT: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1", "canary": "shop_v2", "weight": 30
}]}"#;

const WORKERS: usize = 4;
const PER_WORKER: usize = 2_000;

fn decisions(vm: &Vm, n: usize) -> Vec<bool> {
    (0..n)
        .map(|_| {
            let s = vm.stream();
            s.request_headers(&[(":authority", "shop.local"), (":path", "/")], true);
            let canary = match s.request_header("x-sluice-cluster").as_deref() {
                Some("shop_v2") => true,
                Some("shop_v1") => false,
                other => panic!("steered to {other:?}"),
            };
            s.response_headers(&[(":status", "200")], true);
            s.finish();
            canary
        })
        .collect()
}

fn boot(seed: Option<u64>) -> (Proxy, Vec<Vm>) {
    let mut builder = Proxy::builder(require_sluice_wasm())
        .plugin_config(SPLIT)
        .root_id("sluice");
    if let Some(seed) = seed {
        builder = builder.random_seed(seed);
    }
    let proxy = builder.build().unwrap();
    let vms = proxy.boot(WORKERS).unwrap().into_iter().skip(1).collect();
    (proxy, vms)
}

/// Unsticky splits differ from worker to worker (with one shared seed they
/// were the same sequence on every worker, so the workers' errors added up
/// instead of averaging out), and each worker's share and the total still
/// come to the weight.
#[test]
fn unsticky_splits_differ_across_workers_and_sum_to_the_weight() {
    let (proxy, vms) = boot(None);
    let per_worker: Vec<Vec<bool>> = vms.iter().map(|vm| decisions(vm, PER_WORKER)).collect();
    for i in 0..WORKERS {
        for j in i + 1..WORKERS {
            assert_ne!(
                per_worker[i],
                per_worker[j],
                "workers {i} and {j} made the same decisions (seed {})",
                proxy.random_seed()
            );
        }
    }
    // Each worker: 600 of 2,000 expected, σ ≈ 20.5; 5σ bounds.
    for (i, d) in per_worker.iter().enumerate() {
        let canary = d.iter().filter(|c| **c).count();
        assert!(
            (497..=703).contains(&canary),
            "worker {i}: {canary}/{PER_WORKER} to the canary (seed {})",
            proxy.random_seed()
        );
    }
    // All: 2,400 of 8,000 expected, σ ≈ 41; 5σ bounds.
    let total: usize = per_worker.iter().flatten().filter(|c| **c).count();
    assert!(
        (2_195..=2_605).contains(&total),
        "{total}/8000 to the canary (seed {})",
        proxy.random_seed()
    );
    proxy.tick_now();
    assert_eq!(
        proxy.counter("sluice.shop.routed.canary"),
        Some(total as u64)
    );
    assert_eq!(
        proxy.counter("sluice.shop.routed.stable"),
        Some((WORKERS * PER_WORKER - total) as u64)
    );
}

/// Each run draws differently; a seed replays a run exactly.
#[test]
fn runs_differ_unless_the_seed_is_fixed() {
    let (a, va) = boot(None);
    let (b, vb) = boot(None);
    assert_ne!(a.random_seed(), b.random_seed());
    assert_ne!(decisions(&va[0], 200), decisions(&vb[0], 200));
    let (_, vc) = boot(Some(7));
    let (_, vd) = boot(Some(7));
    assert_eq!(decisions(&vc[1], 200), decisions(&vd[1], 200));
}
