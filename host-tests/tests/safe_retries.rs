//! Safe retries through the real sluice.wasm in the fake Envoy host: the
//! retry conditions each request reaches the router with, and what a router
//! armed with them would do to an upstream that answers 503 (or a gRPC
//! status) after it has already had the request's effect.
//!
//! The fake host does not route, so the tests play Envoy's router: a 503
//! is retried only when `x-envoy-retry-on` holds `5xx` (or
//! `gateway-error`), a refused connection when it holds `connect-failure`,
//! a trailers-only gRPC status when `x-envoy-retry-grpc-on` names it; never
//! more than `x-envoy-max-retries` times.
//!
//! Run with `cargo test -p sluice-host-tests --test safe_retries --
//! --nocapture` to see the counts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Action, Proxy, Stream, Vm};

const FULL: &str = "5xx,reset,connect-failure,refused-stream";
const SAFE: &str = "connect-failure,refused-stream";

/// What the client forges; none of it may reach the router.
const FORGED: &[(&str, &str)] = &[
    ("x-envoy-max-retries", "10"),
    ("x-envoy-retry-on", "5xx,reset,retriable-4xx"),
    ("x-envoy-retry-grpc-on", "internal,cancelled"),
];

fn proxy(retry: &str) -> Proxy {
    let config = format!(
        r#"{{"services": [{{
            "name": "shop",
            "match": {{"authority": "shop.local"}},
            "stable": "shop_v1",
            "retry": {retry}
        }}]}}"#
    );
    Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .build()
        .unwrap()
}

fn worker(proxy: &Proxy) -> Vm {
    proxy.boot(2).unwrap().into_iter().nth(1).unwrap()
}

/// The router's arming: retries, `x-envoy-retry-on`, `x-envoy-retry-grpc-on`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    max_retries: u32,
    retry_on: Option<String>,
    retry_grpc_on: Option<String>,
}

fn armed(max_retries: u32, retry_on: Option<&str>, retry_grpc_on: Option<&str>) -> Armed {
    Armed {
        max_retries,
        retry_on: retry_on.map(str::to_string),
        retry_grpc_on: retry_grpc_on.map(str::to_string),
    }
}

/// Sends a request's headers; returns the stream and how the router is armed.
fn start(vm: &Vm, method: &str, path: &str, extra: &[(&str, &str)]) -> (Stream, Armed) {
    let mut headers = vec![
        (":method", method),
        (":scheme", "http"),
        (":authority", "shop.local"),
        (":path", path),
    ];
    headers.extend_from_slice(FORGED);
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    assert_eq!(stream.request_headers(&headers, true), Action::Continue);
    let map = stream.request_header_map();
    let one = |name: &str| {
        let values = map.get_all(name);
        assert!(values.len() <= 1, "{name} twice: {values:?}");
        values.into_iter().next()
    };
    let armed = Armed {
        max_retries: one("x-envoy-max-retries").unwrap().parse().unwrap(),
        retry_on: one("x-envoy-retry-on"),
        retry_grpc_on: one("x-envoy-retry-grpc-on"),
    };
    (stream, armed)
}

fn has(list: &Option<String>, condition: &str) -> bool {
    list.as_deref()
        .is_some_and(|list| list.split(',').any(|item| item == condition))
}

/// How an attempt fails.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// The upstream accepted the request (its side effect happened), then
    /// answered 503.
    AcceptedThen503,
    /// The connection was refused: the request never reached anyone.
    ConnectRefused,
    /// A trailers-only gRPC status (the call reached the server).
    Grpc(&'static str),
}

/// Plays the router on an upstream whose first `failing` attempts fail as
/// `failure` and whose next one succeeds; returns (attempts, side effects,
/// final status).
fn route(stream: &Stream, armed: &Armed, failure: Failure, failing: u32) -> (u64, u64, u32) {
    let retriable = match failure {
        Failure::AcceptedThen503 => has(&armed.retry_on, "5xx"),
        Failure::ConnectRefused => has(&armed.retry_on, "connect-failure"),
        Failure::Grpc(status) => has(&armed.retry_grpc_on, status),
    };
    let mut attempts = 0u64;
    let mut effects = 0u64;
    let status = loop {
        attempts += 1;
        let fails = attempts <= u64::from(failing);
        if !matches!(failure, Failure::ConnectRefused) || !fails {
            effects += 1;
        }
        if !fails {
            break 200;
        }
        if !retriable || attempts > u64::from(armed.max_retries) {
            break match failure {
                Failure::ConnectRefused => 503,
                Failure::AcceptedThen503 => 503,
                Failure::Grpc(_) => 200,
            };
        }
    };
    stream.set_attempt_count(attempts);
    stream.response_headers(&[(":status", &status.to_string())], true);
    stream.finish();
    assert!(
        stream.vm().trapped().is_none(),
        "{:?}",
        stream.vm().trapped()
    );
    (attempts, effects, status)
}

fn withheld(proxy: &Proxy) -> u64 {
    proxy.tick_now();
    proxy
        .counter("sluice.shop.retry.withheld_unsafe")
        .unwrap_or(0)
}

#[test]
fn each_method_reaches_the_router_with_the_conditions_it_may_have() {
    let proxy = proxy(r#"{"max_retries": 2}"#);
    let vm = worker(&proxy);
    for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        let (stream, got) = start(&vm, method, "/", &[]);
        assert_eq!(got, armed(2, Some(FULL), None), "{method}");
        route(&stream, &got, Failure::AcceptedThen503, 0);
    }
    assert_eq!(withheld(&proxy), 0);
    for method in ["POST", "PATCH", "BREW", "get"] {
        let (stream, got) = start(&vm, method, "/", &[]);
        assert_eq!(got, armed(2, Some(SAFE), None), "{method}");
        route(&stream, &got, Failure::AcceptedThen503, 0);
    }
    assert_eq!(withheld(&proxy), 4);
}

#[test]
fn a_post_answered_503_after_its_effect_is_not_replayed() {
    let proxy = proxy(r#"{"max_retries": 2}"#);
    let vm = worker(&proxy);
    let mut effects = 0;
    let mut attempts = 0;
    for _ in 0..10 {
        let (stream, got) = start(&vm, "POST", "/orders", &[]);
        let (made, had, status) = route(&stream, &got, Failure::AcceptedThen503, 3);
        assert_eq!(status, 503, "the client sees the 503");
        attempts += made;
        effects += had;
    }
    println!("10 POST, upstream 503 after accepting: {attempts} attempts, {effects} writes");
    assert_eq!((attempts, effects), (10, 10));
    // A refused connection is still retried: the request never arrived.
    let (stream, got) = start(&vm, "POST", "/orders", &[]);
    assert_eq!(
        route(&stream, &got, Failure::ConnectRefused, 1),
        (2, 1, 200)
    );
    // Opted in by a key, or a PUT: retried (the server deduplicates).
    for (method, extra) in [
        ("POST", &[("idempotency-key", "order-42")][..]),
        ("PUT", &[][..]),
    ] {
        let (stream, got) = start(&vm, method, "/orders/42", extra);
        assert_eq!(got, armed(2, Some(FULL), None), "{method}");
        assert_eq!(
            route(&stream, &got, Failure::AcceptedThen503, 1),
            (2, 2, 200)
        );
    }
    assert_eq!(withheld(&proxy), 11);
}

#[test]
fn the_services_own_methods_and_path_prefixes_opt_in() {
    let proxy = proxy(
        r#"{"max_retries": 2, "idempotent": {"methods": ["LOCK"], "path_prefixes": ["/search/"]}}"#,
    );
    let vm = worker(&proxy);
    for (method, path, expected) in [
        ("POST", "/search/q?x=1", FULL),
        ("LOCK", "/doc", FULL),
        ("lock", "/doc", SAFE),
        ("POST", "/orders", SAFE),
        ("POST", "/Search/q", SAFE),
    ] {
        let (stream, got) = start(&vm, method, path, &[]);
        assert_eq!(got, armed(2, Some(expected), None), "{method} {path}");
        route(&stream, &got, Failure::AcceptedThen503, 0);
    }
    assert_eq!(withheld(&proxy), 3);
}

#[test]
fn grpc_calls_retry_unavailable_and_not_internal_by_default() {
    let grpc = [("content-type", "application/grpc")];
    let proxy = proxy(r#"{"max_retries": 2}"#);
    let vm = worker(&proxy);
    let (stream, got) = start(&vm, "POST", "/shop.Orders/Create", &grpc);
    assert_eq!(got, armed(2, Some(SAFE), Some("unavailable")));
    assert_eq!(
        route(&stream, &got, Failure::Grpc("unavailable"), 1),
        (2, 2, 200)
    );
    let (stream, got) = start(&vm, "POST", "/shop.Orders/Create", &grpc);
    assert_eq!(
        route(&stream, &got, Failure::Grpc("internal"), 1),
        (1, 1, 200)
    );
    assert_eq!(withheld(&proxy), 2);

    // Configured gRPC conditions are the call's; opted in, the HTTP ones too.
    let proxy = self::proxy(
        r#"{"max_retries": 2, "retry_on": "5xx,reset,internal", "idempotent": {"path_prefixes": ["/shop.Catalog/"]}}"#,
    );
    let vm = worker(&proxy);
    let (stream, got) = start(&vm, "POST", "/shop.Orders/Create", &grpc);
    assert_eq!(got, armed(2, None, Some("internal")));
    assert_eq!(
        route(&stream, &got, Failure::Grpc("internal"), 1),
        (2, 2, 200)
    );
    for extra in [&[grpc[0], ("idempotency-key", "k")][..], &grpc[..]] {
        let path = if extra.len() == 2 {
            "/shop.Orders/Create"
        } else {
            "/shop.Catalog/Get"
        };
        let (stream, got) = start(&vm, "POST", path, extra);
        assert_eq!(got, armed(2, Some("5xx,reset"), Some("internal")), "{path}");
        route(&stream, &got, Failure::Grpc("internal"), 0);
    }
    assert_eq!(withheld(&proxy), 1);
}

#[test]
fn a_request_with_every_condition_withheld_gets_no_retry() {
    let proxy = proxy(r#"{"max_retries": 3, "retry_on": "5xx,unavailable"}"#);
    let vm = worker(&proxy);
    let (stream, got) = start(&vm, "GET", "/", &[]);
    assert_eq!(got, armed(3, Some("5xx"), Some("unavailable")));
    route(&stream, &got, Failure::AcceptedThen503, 0);
    let (stream, got) = start(&vm, "POST", "/", &[]);
    assert_eq!(got, armed(0, None, None));
    assert_eq!(
        route(&stream, &got, Failure::AcceptedThen503, 1),
        (1, 1, 503)
    );
    assert_eq!(withheld(&proxy), 1);
    assert_eq!(proxy.counter("sluice.shop.retry.denied").unwrap_or(0), 0);
    assert_eq!(proxy.counter("sluice.shop.retry.granted").unwrap_or(0), 3);
}
