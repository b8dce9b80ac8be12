//! `clear_route_cache` through the real sluice.wasm in the fake Envoy host:
//! called once per request whose headers Sluice changed, after the last
//! change; on a host without the foreign function (NOT_FOUND, as a host
//! other than Envoy may answer) asked once per VM and never again, with
//! routing unchanged and no trap.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Action, Proxy, Stream, Vm};

const SHOP: &str = r#"{
  "services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1", "canary": "shop_v2", "weight": 50,
    "sticky": {"header": "x-user-id"},
    "retry": {"max_retries": 2, "timeout_ms": 5000}
  }]
}"#;

fn proxy(clear_route_cache: bool) -> Proxy {
    let builder = Proxy::builder(require_sluice_wasm())
        .plugin_config(SHOP)
        .root_id("sluice");
    let builder = if clear_route_cache {
        builder
    } else {
        builder.without_clear_route_cache()
    };
    builder.build().unwrap()
}

/// Envoy's main-thread VM plus two workers; the workers.
fn workers(proxy: &Proxy) -> Vec<Vm> {
    proxy.boot(2).unwrap().into_iter().skip(1).collect()
}

/// One request through `vm`: the stream, once finished.
fn send(vm: &Vm, authority: &str, extra: &[(&str, &str)]) -> Stream {
    let mut headers = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", "/"),
    ];
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    assert_eq!(stream.request_headers(&headers, true), Action::Continue);
    stream.response_headers(&[(":status", "200")], true);
    stream.finish();
    assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    stream
}

#[test]
fn envoy_gets_one_clear_per_changed_request_and_none_for_an_untouched_one() {
    let proxy = proxy(true);
    let vms = workers(&proxy);
    for user in 0..200 {
        let id = format!("u{user}");
        let stream = send(
            &vms[user % 2],
            "shop.local",
            &[
                ("x-user-id", &id),
                ("x-sluice-cluster", "admin_backend"),
                ("x-envoy-max-retries", "10"),
            ],
        );
        let steered = stream.request_header("x-sluice-cluster").unwrap();
        assert!(steered == "shop_v1" || steered == "shop_v2", "{steered}");
        assert_eq!(stream.clear_route_cache_calls(), 1, "user {id}");
    }
    // Unmatched, nothing forged: Sluice changed nothing and asks nothing.
    let stream = send(&vms[0], "other.local", &[]);
    assert_eq!(stream.clear_route_cache_calls(), 0);
    // Unmatched with a forged steering header: removed, then one clear.
    let stream = send(&vms[1], "other.local", &[("x-sluice-cluster", "shop_v2")]);
    assert_eq!(stream.request_header("x-sluice-cluster"), None);
    assert_eq!(stream.clear_route_cache_calls(), 1);
}

#[test]
fn a_host_without_clear_route_cache_is_asked_once_per_vm_and_routing_is_unchanged() {
    let with = proxy(true);
    let without = proxy(false);
    let (with_vms, without_vms) = (workers(&with), workers(&without));
    let mut calls = [0u32; 2];
    for user in 0..300 {
        let id = format!("user-{user}");
        let headers = [("x-user-id", id.as_str()), ("x-sluice-cluster", "forged")];
        let a = send(&with_vms[user % 2], "shop.local", &headers);
        let b = send(&without_vms[user % 2], "shop.local", &headers);
        // The same sticky choice, whatever the host offers.
        assert_eq!(
            a.request_header("x-sluice-cluster"),
            b.request_header("x-sluice-cluster")
        );
        assert_eq!(a.clear_route_cache_calls(), 1);
        calls[user % 2] += b.clear_route_cache_calls();
        if user < 2 {
            assert_eq!(b.clear_route_cache_calls(), 1, "the first request asks");
        }
    }
    assert_eq!(calls, [1, 1], "once per VM, never again");
    let notes: Vec<String> = without
        .logs()
        .into_iter()
        .filter(|entry| entry.message.contains("offers no clear_route_cache"))
        .map(|entry| entry.vm)
        .collect();
    assert_eq!(notes.len(), 2, "one note per worker VM: {notes:?}");
    assert!(!with.logged("offers no clear_route_cache"));
}
