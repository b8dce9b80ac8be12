//! Safe retries, end to end: a real Envoy loading the release sluice.wasm in
//! front of an upstream that counts side effects (it records every request
//! body it accepts, then answers 503), so a replayed write shows as a
//! duplicate body.
//!
//! The route has no retry policy of its own: every retry the upstream sees
//! was armed by the headers Sluice wrote. The clients are internal (Envoy
//! honours their `x-envoy-*` headers) and forge `x-envoy-retry-on: 5xx` and
//! `x-envoy-max-retries: 10` on every request: Sluice overwrites them.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`. Run with
//! `cargo test -p sluice-envoy --test safe_retries -- --nocapture` to see
//! the measured attempts and writes.

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_envoy::config::INTERNAL_CLIENTS;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Envoy, EnvoyConfig, Upstream};

/// The default conditions (`5xx,reset,connect-failure,refused-stream`),
/// two retries, and one path prefix declared safe.
fn shop() -> Value {
    json!({
        "services": [{
            "name": "shop",
            "match": {"authority": "shop.local"},
            "stable": "shop_v1",
            "retry": {
                "max_retries": 2,
                "timeout_ms": 5000,
                "idempotent": {"path_prefixes": ["/search/"]}
            }
        }]
    })
}

/// What a client forges to get retried; Sluice overwrites it.
const FORGED: &[(&str, &str)] = &[
    ("x-envoy-max-retries", "10"),
    ("x-envoy-retry-on", "5xx,reset,gateway-error"),
];

/// Envoy's own circuit breaker must never be what limits retries.
const CIRCUIT_BREAKERS: &str = "    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 100000
";

/// Envoy with Sluice in front of cluster shop_v1 at `ports` (its
/// endpoints, in order).
fn start(ports: &[u16]) -> Envoy {
    if let Err(message) = sluice_envoy::require_wasm() {
        panic!("{message}");
    }
    let first = *ports.first().unwrap();
    let mut yaml = EnvoyConfig::from_json(&shop())
        .cluster("shop_v1", first)
        .route_timeout(Duration::from_secs(10))
        .to_yaml();
    assert!(
        !yaml.contains("retry_policy"),
        "the route must not retry itself"
    );
    let endpoint = |port: u16| {
        format!(
            "        - endpoint:\n            address:\n              socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n"
        )
    };
    let only = endpoint(first);
    assert!(yaml.contains(&only), "{yaml}");
    let all: String = ports.iter().map(|&port| endpoint(port)).collect();
    yaml = yaml
        .replace(&only, &all)
        .replace("    connect_timeout: 1s\n", CIRCUIT_BREAKERS)
        .replace("          codec_type: AUTO\n", INTERNAL_CLIENTS);
    Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// A port nothing listens on: bound, then released.
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Sends `count` requests with distinct bodies (`<label>-<i>`); returns
/// the statuses the client saw.
fn send(
    envoy: &Envoy,
    label: &str,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    count: usize,
) -> Vec<u16> {
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    (0..count)
        .map(|i| {
            let mut headers: Vec<(&str, &str)> = FORGED.to_vec();
            headers.extend_from_slice(extra);
            let key = format!("{label}-{i}");
            if extra.iter().any(|(name, _)| *name == "idempotency-key") {
                headers.retain(|(name, _)| *name != "idempotency-key");
                headers.push(("idempotency-key", &key));
            }
            let response = client
                .request(method, "shop.local", path, &headers, key.as_bytes())
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            response.status
        })
        .collect()
}

/// How many times the upstream accepted each body with this label.
fn writes(upstream: &Upstream, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for request in upstream.recorded() {
        let body = String::from_utf8_lossy(&request.body).into_owned();
        if body.starts_with(&format!("{label}-")) {
            *out.entry(body).or_insert(0) += 1;
        }
    }
    out
}

#[test]
fn a_post_answered_503_after_its_effect_is_written_once_and_safe_requests_are_retried() {
    let upstream = Upstream::start("orders").unwrap();
    upstream.set_fail_all(true);
    let envoy = start(&[upstream.port()]);

    // POST: the upstream writes the order, then answers 503. Not replayed.
    let statuses = send(&envoy, "post", "POST", "/orders", &[], 10);
    assert!(statuses.iter().all(|&status| status == 503), "{statuses:?}");
    let posts = writes(&upstream, "post");
    assert_eq!(posts.len(), 10);
    assert!(
        posts.values().all(|&count| count == 1),
        "duplicated writes: {posts:?}"
    );
    let post_attempts: u64 = posts.values().sum();

    // The same through the opt-ins, and a PUT: two retries each.
    let mut retried = Vec::new();
    for (label, method, path, extra) in [
        ("keyed", "POST", "/orders", &[("idempotency-key", "")][..]),
        ("put", "PUT", "/orders/42", &[][..]),
        ("search", "POST", "/search/products", &[][..]),
    ] {
        let statuses = send(&envoy, label, method, path, extra, 5);
        assert!(
            statuses.iter().all(|&status| status == 503),
            "{label}: {statuses:?}"
        );
        let counts = writes(&upstream, label);
        assert_eq!(counts.len(), 5, "{label}");
        assert!(
            counts.values().all(|&count| count == 3),
            "{label}: {counts:?}"
        );
        retried.push((label, counts.values().sum::<u64>()));
    }

    let withheld = envoy
        .settled_wasm_metric("sluice.shop.retry.withheld_unsafe")
        .unwrap()
        .unwrap_or(0);
    let retries = envoy.stat_value("cluster.shop_v1.upstream_rq_retry");
    println!(
        "upstream answering 503 after accepting each write (client forging x-envoy-max-retries: 10, x-envoy-retry-on: 5xx):"
    );
    println!("  10 POST /orders: {post_attempts} attempts, {} distinct writes, max {} per order; withheld_unsafe = {withheld}",
        posts.len(), posts.values().max().unwrap());
    for (label, attempts) in &retried {
        println!("  5 {label}: {attempts} attempts (3 per request)");
    }
    println!("  Envoy cluster.shop_v1.upstream_rq_retry = {retries}");
    assert_eq!(post_attempts, 10);
    assert_eq!(withheld, 10);
    assert_eq!(retries, 3 * 5 * 2);
}

#[test]
fn a_post_whose_connection_was_refused_is_retried_on_the_healthy_endpoint() {
    let upstream = Upstream::start("healthy").unwrap();
    let refused = closed_port();
    let envoy = start(&[refused, upstream.port()]);
    let statuses = send(&envoy, "order", "POST", "/orders", &[], 10);
    assert!(statuses.iter().all(|&status| status == 200), "{statuses:?}");
    let counts = writes(&upstream, "order");
    assert_eq!(counts.len(), 10);
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    let connect_failures = envoy.stat_value("cluster.shop_v1.upstream_cx_connect_fail");
    let retries = envoy.stat_value("cluster.shop_v1.upstream_rq_retry");
    println!(
        "10 POST, first endpoint refusing connections: 10 x 200, {} writes, {connect_failures} connect failures, {retries} retries",
        counts.values().sum::<u64>()
    );
    assert!(connect_failures >= 1, "no request met the closed port");
    assert!(
        retries >= 1 && retries <= connect_failures,
        "{retries} retries"
    );
}

/// gRPC in the shape Envoy's router judges it: the request's
/// `content-type: application/grpc`, the answer's `grpc-status` in the
/// response headers (a trailers-only response). The harness's upstream
/// speaks HTTP/1.1, and Envoy's router reads `grpc-status` from the
/// response headers whatever the protocol, so a 200 with `grpc-status: 14`
/// is an UNAVAILABLE to its retry policy. Each answer is a failure after the
/// call was received (a write recorded).
#[test]
fn grpc_calls_are_retried_on_unavailable_and_not_on_internal() {
    let upstream = Upstream::start("grpc").unwrap();
    upstream.set_fail_all(true);
    upstream.set_fail_status(200);
    let envoy = start(&[upstream.port()]);
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let mut attempts = Vec::new();
    for (label, status) in [("unavailable", "14"), ("internal", "13")] {
        upstream.set_fail_header(Some(("grpc-status", status)));
        let statuses = send(&envoy, label, "POST", "/shop.Orders/Create", &grpc, 5);
        assert!(
            statuses.iter().all(|&status| status == 200),
            "{label}: {statuses:?}"
        );
        let counts = writes(&upstream, label);
        assert_eq!(counts.len(), 5, "{label}");
        attempts.push((
            label,
            counts.values().sum::<u64>(),
            counts.values().max().copied(),
        ));
    }
    println!(
        "gRPC calls (grpc-status in the response headers), max_retries 2, default conditions:"
    );
    for (label, total, max) in &attempts {
        println!("  5 calls answered {label}: {total} attempts, max {max:?} per call");
    }
    assert_eq!(attempts[0].1, 15, "UNAVAILABLE is retried twice");
    assert_eq!(attempts[1].1, 5, "INTERNAL is not retried");
}
