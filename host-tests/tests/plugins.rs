//! Several plugin configs in one VM and one shared-data namespace. In Envoy
//! every filter config with the same `vm_id` and code shares one VM per
//! worker and one shared-data namespace (Istio leaves `vm_id` empty, so
//! every WasmPlugin on a proxy does); each config gets its own root context.
//!
//! What Sluice does with two configs that both have a service `shop`:
//! - shared data: the keys are derived from the service name AND a
//!   fingerprint of the block (`breaker::state_key`, `retry::budget_key`,
//!   `rollout::state_key`), so different blocks never share state. Identical
//!   blocks on the same service name (and, for breakers, the same cluster)
//!   do share it, on purpose: it is the same upstream judged by the same
//!   rule, exactly as one config keeps its state across a reload.
//! - metrics are named `sluice.<service>.…` and Envoy's stats store is
//!   process-wide: the two `shop` services report into the same stats.
//!   Counters add up (the process's total for that service name); a gauge
//!   shows whichever config refreshed it last. Sluice refuses nothing here
//!   (a VM cannot see the other configs when it checks one, and Envoy's
//!   canary would not either); the README tells operators to give services
//!   distinct names across configs that share a `vm_id`, or to give the
//!   configs distinct `vm_id`s.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Proxy, Stream, Vm};

const A: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "retry": {"max_retries": 1, "budget": {"ratio": 0.2}},
    "breaker": {"consecutive_failures": 3, "open_ms": 5000}
}]}"#;

const B: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "retry": {"max_retries": 1, "budget": {"ratio": 0.1}},
    "breaker": {"consecutive_failures": 10, "open_ms": 20000}
}]}"#;

fn send(s: Stream, status: &str) -> Result<(), u32> {
    s.request_headers(&[(":authority", "shop.local"), (":path", "/")], true);
    if let Some(reply) = s.local_reply() {
        s.finish();
        return Err(reply.status);
    }
    assert_eq!(
        s.request_header("x-sluice-cluster").as_deref(),
        Some("shop_v1")
    );
    s.response_headers(&[(":status", status)], true);
    s.finish();
    Ok(())
}

#[test]
fn two_plugin_configs_in_one_vm_keep_their_shop_state_apart() {
    let proxy = Proxy::builder(require_sluice_wasm())
        .plugin_config(A)
        .root_id("sluice")
        .vm_id("sluice")
        .build()
        .unwrap();
    let workers: Vec<Vm> = proxy.boot(2).unwrap().into_iter().skip(1).collect();
    // The second config joins each worker's VM with its own root context.
    let roots_b: Vec<u32> = workers.iter().map(|vm| vm.add_plugin(B).unwrap()).collect();
    let a = |i: usize| workers[i % 2].stream();
    let b = |i: usize| workers[i % 2].stream_for(roots_b[i % 2]);

    // One namespace, no collision: two breakers and two budgets for `shop`.
    let keys: Vec<String> = proxy
        .shared_data_keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    let breakers = keys
        .iter()
        .filter(|k| k.starts_with("sluice/breaker/"))
        .count();
    let budgets = keys
        .iter()
        .filter(|k| k.starts_with("sluice/retry_budget/"))
        .count();
    assert_eq!((breakers, budgets), (2, 2), "{keys:?}");

    // A's breaker trips after 3 failures; B's needs 10 and stays closed.
    for i in 0..3 {
        send(a(i), "503").unwrap();
        send(b(i), "503").unwrap();
    }
    proxy.advance_ms(200);
    for i in 0..4 {
        assert_eq!(send(a(i), "200"), Err(503), "A's breaker is open");
        assert_eq!(send(b(i), "200"), Ok(()), "B's breaker must stay closed");
    }
    for i in 0..3 {
        send(b(i), "503").unwrap();
    }

    // Metrics share their names: counters are the sum of both configs.
    proxy.tick_now();
    assert_eq!(proxy.counter("sluice.shop.breaker.stable.trips"), Some(1));
    assert_eq!(
        proxy.counter("sluice.shop.breaker.stable.rejected"),
        Some(4)
    );
    // Routed: A 3 + B 3 + B 4 + B 3.
    assert_eq!(proxy.counter("sluice.shop.routed.stable"), Some(13));
    // The shared state gauge shows the config that refreshed it last, so it
    // is no use when two configs share a service name (documented).
    let gauge = proxy.gauge("sluice.shop.breaker.stable.state").unwrap();
    assert!(gauge <= 1);
    for vm in &workers {
        assert!(vm.trapped().is_none());
    }
}
