//! Stream facts the fake derives from what the test's upstream did, instead
//! of letting a test script them: `upstream.request_attempt_count`,
//! `response.code`, `response.grpc_status`, `response.flags`; and the
//! refusal to change them once the filter could have read them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Proxy, Stream, Vm};

const SHOP: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "breaker": {"consecutive_failures": 3, "open_ms": 5000}
}]}"#;

fn worker() -> (Proxy, Vm) {
    let proxy = Proxy::builder(require_sluice_wasm())
        .plugin_config(SHOP)
        .root_id("sluice")
        .build()
        .unwrap();
    let vm = proxy.boot(1).unwrap().pop().unwrap();
    (proxy, vm)
}

fn begin(vm: &Vm, extra: &[(&str, &str)]) -> Stream {
    let s = vm.stream();
    let mut headers = vec![(":authority", "shop.local"), (":path", "/")];
    headers.extend_from_slice(extra);
    s.request_headers(&headers, true);
    s
}

fn int(bytes: Option<Vec<u8>>) -> Option<i64> {
    bytes.map(|b| i64::from_le_bytes(b[..8].try_into().unwrap()))
}

#[test]
fn the_attempt_count_is_one_once_the_request_went_upstream() {
    let (_proxy, vm) = worker();
    let s = vm.stream();
    assert_eq!(
        int(s.property(&["upstream", "request_attempt_count"])),
        Some(0)
    );
    s.request_headers(&[(":authority", "shop.local"), (":path", "/")], true);
    assert_eq!(
        int(s.property(&["upstream", "request_attempt_count"])),
        Some(1)
    );
    s.response_headers(&[(":status", "200")], true);
    assert_eq!(
        int(s.property(&["upstream", "request_attempt_count"])),
        Some(1)
    );
    assert_eq!(int(s.property(&["response", "code"])), Some(200));
    s.finish();
}

#[test]
fn grpc_status_follows_envoys_get_grpc_status() {
    let (_proxy, vm) = worker();
    let grpc = [("content-type", "application/grpc")];
    // No response yet: absent.
    let s = begin(&vm, &grpc);
    assert_eq!(s.property(&["response", "grpc_status"]), None);
    // From the trailers.
    s.response_headers(
        &[(":status", "200"), ("content-type", "application/grpc")],
        false,
    );
    s.response_trailers(&[("grpc-status", "14")]);
    assert_eq!(int(s.property(&["response", "grpc_status"])), Some(14));
    s.finish();
    // Trailers-only: from the header block.
    let s = begin(&vm, &grpc);
    s.response_headers(&[(":status", "200"), ("grpc-status", "5")], true);
    assert_eq!(int(s.property(&["response", "grpc_status"])), Some(5));
    s.finish();
    // Not a number, or above 16: InvalidCode (-1).
    let s = begin(&vm, &grpc);
    s.response_headers(&[(":status", "200"), ("grpc-status", "99")], true);
    assert_eq!(int(s.property(&["response", "grpc_status"])), Some(-1));
    s.finish();
    // No grpc-status anywhere: inferred from the HTTP status
    // (Grpc::Utility::httpToGrpcStatus), for gRPC and plain HTTP alike,
    // as Envoy's third fallback does: 503 → UNAVAILABLE, 200 → UNKNOWN.
    let s = begin(&vm, &[]);
    s.response_headers(&[(":status", "503")], true);
    assert_eq!(int(s.property(&["response", "grpc_status"])), Some(14));
    s.finish();
    let s = begin(&vm, &[]);
    s.response_headers(&[(":status", "200")], true);
    assert_eq!(int(s.property(&["response", "grpc_status"])), Some(2));
    s.finish();
}

/// An upstream that fails before any response: Envoy's router answers 503
/// itself, with the response flag, through this filter — which books it
/// as a failure of the cluster.
#[test]
fn an_upstream_failure_is_the_routers_503_with_its_flag() {
    let (proxy, vm) = worker();
    for _ in 0..3 {
        let s = begin(&vm, &[]);
        s.upstream_failed(0x20); // UF: connection failure
        let reply = s.local_reply().unwrap();
        assert_eq!(reply.status, 503);
        assert_eq!(int(s.property(&["response", "flags"])), Some(0x20));
        assert_eq!(int(s.property(&["response", "code"])), Some(503));
        s.finish();
    }
    proxy.advance_ms(200);
    let s = begin(&vm, &[]);
    let reply = s
        .local_reply()
        .expect("three connection failures trip the breaker");
    assert_eq!(reply.status, 503);
    assert!(reply
        .headers
        .contains(&("x-sluice-breaker".into(), "open".into())));
    s.finish();
}

#[test]
#[should_panic(expected = "after the response headers reached the filter")]
fn the_attempt_count_cannot_change_after_the_response_headers() {
    let (_proxy, vm) = worker();
    let s = begin(&vm, &[]);
    s.response_headers(&[(":status", "200")], false);
    s.set_attempt_count(3);
}

#[test]
#[should_panic(expected = "after finish()")]
fn flags_cannot_change_after_the_access_log() {
    let (_proxy, vm) = worker();
    let s = begin(&vm, &[]);
    s.response_headers(&[(":status", "200")], true);
    s.finish();
    s.set_response_flags(0x10);
}
