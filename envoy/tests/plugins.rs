//! Two Sluice plugin configs in ONE real Envoy VM (`--concurrency 2`): two
//! listeners, each with its own `envoy.filters.http.wasm` filter, different
//! `configuration` JSON but the same `vm_config` (`vm_id: sluice`, same code
//! and runtime). Envoy then runs both configs in one VM per worker, each with
//! its own root context, and one shared-data namespace: what Istio does for
//! every WasmPlugin on a proxy (it leaves `vm_id` empty). The wasmtime fake's
//! version of this test is `host-tests/tests/plugins.rs`.
//!
//! Both configs have a service `shop` on the same stable cluster (`shop_v1`)
//! with different breakers: A trips after 3 failures in a row, B after 50.
//! The breaker's shared key is `sluice/breaker/v<n>/shop/shop_v1/<digest of
//! the breaker block>`, so the two blocks get two keys. Envoy offers no view
//! of shared data, so the test shows the keys apart by behaviour: A's breaker
//! opens and B's requests still reach the upstream.
//!
//! Metrics: both configs define `sluice.shop.*` in the same VM and Envoy's
//! stats store is process-wide, so they are ONE set of stats, observed as:
//! counters add up (`routed.stable` = A's routed + B's routed; `trips` and
//! `rejected` are A's alone, as B never trips), and the breaker state gauge
//! flips between A's 1 and B's 0 with each config's tick.
//!
//! Needs the release wasm and Envoy, as `breaker.rs`.

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_envoy::{Client, Envoy, EnvoyConfig, EnvoyOptions, Response, Upstream};

fn shop(consecutive_failures: u64) -> Value {
    json!({"services": [{
        "name": "shop",
        "match": {"authority": "shop.local"},
        "stable": "shop_v1",
        "breaker": {"consecutive_failures": consecutive_failures, "open_ms": 10_000}
    }]})
}

/// One bootstrap with two listeners: A's listener is `EnvoyConfig`'s own;
/// B's is the same listener built from B's JSON, renamed (listener, stats,
/// routes and plugin name `sluice_b`, so its log lines are its own), with the
/// same `vm_config`.
fn two_listener_yaml(a: &Value, b: &Value, upstream: &Upstream) -> String {
    let yaml = |json: &Value| {
        EnvoyConfig::from_json(json)
            .upstream("shop_v1", upstream)
            .to_yaml()
    };
    let (yaml_a, yaml_b) = (yaml(a), yaml(b));
    let listener = |y: &str| -> String {
        let start = y.find("  - name: sluice_listener\n").unwrap();
        let end = y.find("  clusters:\n").unwrap();
        y[start..end].to_string()
    };
    let listener_b = listener(&yaml_b)
        .replace("sluice_listener", "sluice_listener_b")
        .replace("stat_prefix: ingress_http", "stat_prefix: ingress_http_b")
        .replace("name: sluice_routes", "name: sluice_routes_b")
        .replace(
            "                name: sluice\n                root_id: sluice\n",
            "                name: sluice_b\n                root_id: sluice\n",
        );
    assert!(listener_b.contains("name: sluice_b\n"), "{listener_b}");
    assert!(listener_b.contains("vm_id: sluice\n"), "{listener_b}");
    let at = yaml_a.find("  clusters:\n").unwrap();
    format!("{}{listener_b}{}", &yaml_a[..at], &yaml_a[at..])
}

/// The bound address of the listener called `name`.
fn listener_addr(envoy: &Envoy, name: &str) -> SocketAddr {
    let r = envoy.admin_get("/listeners?format=json").unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let l = v["listener_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name}: {v}"));
    let sa = &l["local_address"]["socket_address"];
    format!(
        "{}:{}",
        sa["address"].as_str().unwrap(),
        sa["port_value"].as_u64().unwrap()
    )
    .parse()
    .unwrap()
}

/// The thread id in an Envoy log line (`[time][thread][level]...`).
fn thread_of(line: &str) -> String {
    line.split(['[', ']'])
        .filter(|s| !s.is_empty())
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

fn get(client: &mut Client) -> Response {
    client
        .get("shop.local", "/", &[])
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}

fn is_rejection(r: &Response) -> bool {
    r.status == 503 && r.header("x-sluice-breaker") == Some("open") && r.upstream().is_none()
}

#[test]
fn two_plugin_configs_in_one_envoy_vm_keep_their_breakers_apart_and_add_up_their_counters() {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
    let started = Instant::now();
    let up = Upstream::start("stable").unwrap();
    let yaml = two_listener_yaml(&shop(3), &shop(50), &up);
    // wasm:debug logs each VM Envoy creates, with its thread.
    let opts = EnvoyOptions {
        component_log_level: Some("wasm:debug".into()),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start_yaml(&yaml, &opts).unwrap_or_else(|e| panic!("{e}"));
    let addr_a = listener_addr(&envoy, "sluice_listener");
    let addr_b = listener_addr(&envoy, "sluice_listener_b");

    // One VM per thread for both configs. Envoy 1.40 creates: the base VM
    // (once: the second config finds it by its VM key), one throw-away
    // "canary" VM per config to try its configuration, one VM for the main
    // thread and one per worker, each of which then configures BOTH root
    // contexts. Separate VMs would show two per worker.
    let created = envoy.log_lines_containing("Wasm created");
    let main_thread = thread_of(
        created
            .iter()
            .find(|l| l.contains("Base Wasm created"))
            .expect("a base VM"),
    );
    let base = created.iter().filter(|l| l.contains("Base Wasm")).count();
    let mut per_worker = std::collections::BTreeMap::<String, usize>::new();
    for l in created.iter().filter(|l| thread_of(l) != main_thread) {
        *per_worker.entry(thread_of(l)).or_default() += 1;
    }
    let mut configured = std::collections::BTreeMap::<String, usize>::new();
    for l in envoy.log_lines_containing("sluice: config applied") {
        *configured.entry(thread_of(&l)).or_default() += 1;
    }
    let stats = envoy.stats().unwrap();
    let v8 = |k: &str| stats[&format!("wasm.envoy.wasm.runtime.v8.{k}")];
    println!(
        "listeners A {addr_a}, B {addr_b}; base VMs {base}; VMs per worker thread {per_worker:?}; \
         'config applied' per thread {configured:?} (main thread {main_thread}); \
         v8 VMs created {}, active {}",
        v8("created"),
        v8("active")
    );
    assert_eq!(base, 1, "one base VM for both configs");
    assert_eq!(per_worker.len(), 2, "{per_worker:?}");
    assert!(per_worker.values().all(|n| *n == 1), "{per_worker:?}");
    for worker in per_worker.keys() {
        assert_eq!(configured.get(worker), Some(&2), "both configs in {worker}");
    }
    // 1 base + 2 canaries + 1 main-thread VM + 2 workers; the canaries go.
    assert_eq!((v8("created"), v8("active")), (6, 4));

    let mut a = Client::new(addr_a).with_timeout(Duration::from_secs(5));
    let mut b = Client::new(addr_b).with_timeout(Duration::from_secs(5));
    let (mut routed_a, mut routed_b) = (0u64, 0u64);

    // Both start healthy.
    for _ in 0..5 {
        assert_eq!(get(&mut a).upstream(), Some("stable"));
        assert_eq!(get(&mut b).upstream(), Some("stable"));
    }
    routed_a += 5;
    routed_b += 5;

    // The upstream fails. A's breaker (3 in a row) opens; B sees the same
    // failures through its own listener, interleaved, and stays closed.
    up.set_fail_all(true);
    let mut failures_a = 0;
    let mut rejected_a = 0;
    for _ in 0..20 {
        let r = get(&mut a);
        if is_rejection(&r) {
            rejected_a += 1;
            break;
        }
        assert_eq!((r.status, r.upstream()), (503, Some("stable")), "{r:?}");
        failures_a += 1;
        routed_a += 1;
        let r = get(&mut b);
        assert_eq!((r.status, r.upstream()), (503, Some("stable")), "B: {r:?}");
        routed_b += 1;
    }
    println!("A: {failures_a} upstream 503s, then the fast 503");
    assert_eq!(failures_a, 3, "A's breaker opens after 3 in a row");
    assert_eq!(rejected_a, 1);

    // A's breaker is open; B's requests still reach the upstream (failing,
    // then healthy again), while A's are turned away without reaching it.
    for _ in 0..5 {
        let r = get(&mut b);
        assert_eq!((r.status, r.upstream()), (503, Some("stable")), "B: {r:?}");
        routed_b += 1;
        assert!(is_rejection(&get(&mut a)), "A's breaker is open");
        rejected_a += 1;
    }
    up.set_fail_all(false);
    for _ in 0..10 {
        let r = get(&mut b);
        assert_eq!((r.status, r.upstream()), (200, Some("stable")), "B: {r:?}");
        routed_b += 1;
        assert!(is_rejection(&get(&mut a)), "A's breaker is open");
        rejected_a += 1;
    }
    assert_eq!(
        up.requests(),
        routed_a + routed_b,
        "only routed requests reach it"
    );
    println!(
        "routed: A {routed_a}, B {routed_b}; A rejected {rejected_a}; upstream saw {}",
        up.requests()
    );
    // One state change in the log: A's. Sluice's line names the service and
    // cluster, not the config. Envoy's prefix on a line logged while serving
    // a request is the plugin name, root id and vm id (`sluice sluice
    // sluice` for A; with the roles swapped it read `sluice_b sluice
    // sluice`); root-context lines (config applied) carry only root id and
    // vm id, so configs with one root id look alike there.
    let transitions = envoy.log_lines_containing("breaker of service shop");
    for l in &transitions {
        println!(
            "log: {}",
            l.split_once("wasm log").map_or(l.as_str(), |x| x.1)
        );
    }
    assert_eq!(transitions.len(), 1, "{transitions:?}");
    assert!(
        transitions[0].contains(
            "wasm log sluice sluice sluice: sluice: breaker of service shop, \
             cluster shop_v1: closed -> open: 3 consecutive failures"
        ),
        "{transitions:?}"
    );

    // Metrics. Both root contexts define `sluice.shop.routed.stable` etc. in
    // the same VM; Envoy hands out the same process-wide stat for the same
    // name, so there is one `wasmcustom.sluice.shop.*` per name and the two
    // configs' counters add up.
    envoy.await_sluice_tick();
    let m = envoy.wasm_metrics().unwrap();
    for (k, v) in m.iter().filter(|(k, _)| k.starts_with("sluice.shop.")) {
        println!("  wasmcustom.{k}: {v}");
    }
    let metric = |name: &str| m.get(name).copied().unwrap_or(0);
    assert_eq!(
        metric("sluice.shop.routed.stable"),
        routed_a + routed_b,
        "routed.stable is A's plus B's"
    );
    assert_eq!(
        metric("sluice.shop.breaker.stable.trips"),
        1,
        "A's trip only"
    );
    assert_eq!(metric("sluice.shop.breaker.stable.rejected"), rejected_a);
    // The state gauge is one stat too, set by both configs on every tick
    // (250 ms, each root context on its own timer): it flips between A's 1
    // (open) and B's 0 (closed), whichever wrote last. Sampled until both
    // are seen (at most 3 s).
    let mut gauge = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while !(gauge.contains(&0) && gauge.contains(&1)) && Instant::now() < until {
        gauge.push(
            envoy
                .wasm_metric("sluice.shop.breaker.stable.state")
                .unwrap()
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let flips = gauge.windows(2).filter(|w| w[0] != w[1]).count();
    println!(
        "breaker.stable.state: {} samples, {} of them 1, {flips} flips",
        gauge.len(),
        gauge.iter().filter(|g| **g == 1).count()
    );
    assert!(gauge.iter().all(|g| *g <= 1), "{gauge:?}");
    assert!(
        gauge.contains(&0) && gauge.contains(&1),
        "A's open and B's closed: {gauge:?}"
    );
    println!("took {:?}", started.elapsed());
}
