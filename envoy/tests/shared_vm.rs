//! Sluice with `vm_id` empty (as Istio runs every WasmPlugin) next to a
//! second, unrelated Wasm filter that also uses shared data, in a real
//! Envoy: the shipped ECDS example with the neighbour module
//! (`envoy/neighbour`, `vm_id: ""` too) added in front of Sluice.
//!
//! Envoy keys shared data by `vm_id` alone, so the two plugins write into
//! one namespace. The neighbour counts every request under its key (named
//! `shop`, after Sluice's service, to tempt a collision) with
//! compare-and-swap, and can read any key on request: it sees Sluice's
//! breaker and budget keys (the namespace really is shared), its own counter
//! ends exactly at the number of requests it saw (nobody else wrote it), and
//! Sluice keeps routing as before.
//!
//! Needs the release wasm of Sluice and of the neighbour
//! (`cargo build --release --target wasm32-wasip1 -p sluice -p sluice-neighbour`),
//! and Envoy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;

use sluice_envoy::ecds::{self, EcdsEnvoy};
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Response, Upstream};

/// The neighbour's key: a plain name, as a plugin may choose, and Sluice's
/// service name.
const NEIGHBOUR_KEY: &str = "shop";

fn neighbour_wasm() -> PathBuf {
    let path = sluice_envoy::wasm_path().with_file_name("sluice_neighbour.wasm");
    assert!(
        path.is_file(),
        "{} missing: build it with `cargo build --release --target wasm32-wasip1 -p sluice-neighbour`",
        path.display()
    );
    path
}

/// The neighbour filter, placed before Sluice in the example's chain.
fn with_neighbour(bootstrap: String) -> Result<String, sluice_envoy::EnvoyError> {
    let neighbour = format!(
        r#"          - name: neighbour
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: neighbour
                root_id: neighbour
                failure_policy: FAIL_RELOAD
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {NEIGHBOUR_KEY}
                vm_config:
                  vm_id: ""
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {}
"#,
        serde_json::to_string(&neighbour_wasm().to_string_lossy()).unwrap()
    );
    let sluice = "          - name: sluice\n            config_discovery:\n";
    ecds::replace_once(&bootstrap, sluice, &format!("{neighbour}{sluice}"))
}

/// Sluice's shared-data keys for the example's config.
fn sluice_keys() -> Vec<String> {
    let json = ecds::sluice_json_of(&ecds::example_filter().unwrap()).unwrap();
    let config = sluice::config::Config::parse(json.as_bytes()).unwrap();
    let shop = &config.services[0];
    let breaker = shop.breaker.as_ref().unwrap();
    vec![
        sluice::retry::budget_key(&shop.name, shop.retry.as_ref().unwrap()),
        sluice::breaker::state_key(&shop.name, &shop.stable, breaker),
        sluice::breaker::state_key(&shop.name, shop.canary.as_deref().unwrap(), breaker),
    ]
}

fn count(r: &Response) -> u64 {
    let text = r.header("x-neighbour-count").unwrap_or("missing");
    text.parse()
        .unwrap_or_else(|_| panic!("the neighbour's counter: {text}"))
}

#[test]
fn sluice_and_another_plugin_share_a_namespace_without_touching_each_others_keys() {
    let keys = sluice_keys();
    for key in &keys {
        assert!(key.starts_with("sluice/"), "{key}");
    }
    let v1 = Upstream::start("v1").unwrap();
    let v2 = Upstream::start("v2").unwrap();
    let proxy = EcdsEnvoy::start(&v1, &v2, &EnvoyOptions::default(), with_neighbour).unwrap();
    let mut clients = proxy.envoy.clients_on_both_workers(2);

    // One request first: the neighbour's first write (CAS 0) is not raced.
    let first = clients[0].get("shop.local", "/", &[]).unwrap();
    assert_eq!(count(&first), 1);

    // Requests over both workers: Sluice routes, the neighbour counts.
    let requests = 600u64;
    let mut counts = Vec::new();
    let mut on_v2 = 0;
    for n in 0..requests {
        let id = format!("user-{n}");
        let slot = n as usize % clients.len();
        let client = &mut clients[slot];
        let r = client
            .get(
                "shop.local",
                "/",
                &[("x-user-id", id.as_str()), ("x-sluice-cluster", "v2")],
            )
            .unwrap();
        assert_eq!(r.status, 200);
        if r.upstream() == Some("v2") {
            on_v2 += 1;
        }
        counts.push(count(&r));
    }
    counts.sort_unstable();
    counts.dedup();
    assert_eq!(
        counts,
        (2..=requests + 1).collect::<Vec<_>>(),
        "the neighbour's counter went up by one per request, nothing else wrote it"
    );
    let share = on_v2 as f64 / requests as f64;
    assert!((0.06..0.14).contains(&share), "Sluice's split: {share}");
    assert!(
        v2.counts_by_header("x-sluice-cluster")
            .keys()
            .all(|v| v == "v2")
            && v1
                .counts_by_header("x-sluice-cluster")
                .keys()
                .all(|v| v.is_empty()),
        "the forged v2 never steered (v1 gets no header: stable_by_default)"
    );

    // From the neighbour's side of the namespace: Sluice's keys are there.
    let mut sizes = Vec::new();
    for key in &keys {
        let r = clients[0]
            .get("shop.local", "/", &[("x-neighbour-peek", key.as_str())])
            .unwrap();
        let size = r
            .header("x-neighbour-peek")
            .unwrap_or("missing")
            .to_string();
        assert!(
            size.parse::<u64>().is_ok_and(|n| n > 0),
            "{key}: {size} (the namespace is shared, so the neighbour sees it)"
        );
        sizes.push(format!("{key} ({size} bytes)"));
    }
    let r = clients[0]
        .get(
            "shop.local",
            "/",
            &[("x-neighbour-peek", "sluice/no-such-key")],
        )
        .unwrap();
    assert_eq!(r.header("x-neighbour-peek"), Some("absent"));
    let total = count(&r);
    assert_eq!(total, requests + 1 + keys.len() as u64 + 1);
    proxy.envoy.await_sluice_tick();
    let metrics = proxy.envoy.wasm_metrics().unwrap();
    let routed = metrics
        .get("sluice.shop.routed.stable")
        .copied()
        .unwrap_or(0)
        + metrics
            .get("sluice.shop.routed.canary")
            .copied()
            .unwrap_or(0);
    eprintln!(
        "shared namespace (vm_id \"\"): neighbour key {NEIGHBOUR_KEY:?} = {total} after {total} requests; \
         Sluice routed {routed}, {on_v2} of {requests} to v2; Sluice's keys seen by the neighbour: {}",
        sizes.join(", ")
    );
    assert_eq!(routed, total, "Sluice routed every request");
    let log = proxy.envoy.log();
    assert!(!log.contains("offers no clear_route_cache"));
    assert!(
        !log.contains("Function: proxy_on_request_headers failed"),
        "no VM trapped"
    );
}
