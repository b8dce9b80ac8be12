//! Safe retries through the engine, over the in-memory host: which retry
//! conditions the router is armed with for each method, opt-in and gRPC
//! call, the `withheld_unsafe` counter, and what the budget is charged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::failures::is_grpc_content_type;
use sluice::retry::{
    self, classify, conditions_after_response, safe_conditions, safe_to_replay, Replayable,
    RequestFacts, RequestKind, RetryPolicy,
};
use sluice::testing::{Event, FaultyStore, StreamState, Vm};
use std::cell::Cell;
use std::rc::Rc;

const NOW: u64 = 1_800_000_000_000;
const FULL: &str = "5xx,reset,connect-failure,refused-stream";
const SAFE: &str = "connect-failure,refused-stream";

fn vm(retry: &str) -> Vm {
    let config =
        format!(r#"{{"services": [{{"name": "shop", "stable": "shop_v1", "retry": {retry}}}]}}"#);
    let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::new(Cell::new(NOW)), 7);
    assert!(vm.configure(config.as_bytes()), "config refused: {config}");
    vm
}

/// A request with `:method` (none when empty), `:path` and extra headers;
/// the client also forges the retry headers, which must never survive.
fn request(
    method: &str,
    path: &str,
    extra: &[(&'static str, &str)],
) -> Vec<(&'static str, Vec<u8>)> {
    let mut headers = vec![
        (":authority", b"shop.local".to_vec()),
        (":path", path.as_bytes().to_vec()),
        ("x-envoy-retry-on", b"5xx,reset,retriable-4xx".to_vec()),
        ("x-envoy-retry-grpc-on", b"internal".to_vec()),
        ("x-envoy-max-retries", b"10".to_vec()),
    ];
    if !method.is_empty() {
        headers.push((":method", method.as_bytes().to_vec()));
    }
    for (name, value) in extra {
        headers.push((name, value.as_bytes().to_vec()));
    }
    headers
}

/// (`x-envoy-max-retries`, `x-envoy-retry-on`, `x-envoy-retry-grpc-on`) as
/// the router sees them.
fn armed(stream: &StreamState) -> (String, Option<String>, Option<String>) {
    let text = |name: &str| {
        stream
            .header(name)
            .map(|value| String::from_utf8_lossy(value).into_owned())
    };
    (
        text("x-envoy-max-retries").unwrap_or_default(),
        text("x-envoy-retry-on"),
        text("x-envoy-retry-grpc-on"),
    )
}

fn send(
    vm: &mut Vm,
    method: &str,
    path: &str,
    extra: &[(&'static str, &str)],
) -> (String, Option<String>, Option<String>) {
    armed(&vm.exchange(&request(method, path, extra), 503, 1))
}

fn full(max: &str) -> (String, Option<String>, Option<String>) {
    (max.to_string(), Some(FULL.to_string()), None)
}

fn safe(max: &str) -> (String, Option<String>, Option<String>) {
    (max.to_string(), Some(SAFE.to_string()), None)
}

fn withheld(vm: &mut Vm) -> i64 {
    vm.tick();
    vm.host.metric("sluice.shop.retry.withheld_unsafe").unwrap()
}

#[test]
fn idempotent_methods_keep_every_condition_and_the_others_only_pre_request_ones() {
    let mut vm = vm(r#"{"max_retries": 2}"#);
    for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        assert_eq!(send(&mut vm, method, "/", &[]), full("2"), "{method}");
    }
    assert_eq!(withheld(&mut vm), 0);
    // POST, PATCH, unknown methods, a method in the wrong case (methods are
    // case-sensitive) and no method at all.
    for method in ["POST", "PATCH", "BREW", "get", "Put", "CONNECT", ""] {
        assert_eq!(send(&mut vm, method, "/", &[]), safe("2"), "{method:?}");
    }
    assert_eq!(withheld(&mut vm), 7);
}

#[test]
fn an_idempotency_key_opts_a_request_in() {
    let mut vm = vm(r#"{"max_retries": 2}"#);
    assert_eq!(
        send(
            &mut vm,
            "POST",
            "/orders",
            &[("idempotency-key", "\"8e03978e-40d5-43e8\"")]
        ),
        full("2")
    );
    assert_eq!(
        send(&mut vm, "PATCH", "/orders/1", &[("idempotency-key", "k")]),
        full("2")
    );
    assert_eq!(withheld(&mut vm), 0);
    // An empty (or all-whitespace) key is no key.
    assert_eq!(
        send(&mut vm, "POST", "/orders", &[("idempotency-key", "")]),
        safe("2")
    );
    assert_eq!(
        send(&mut vm, "POST", "/orders", &[("idempotency-key", " \t")]),
        safe("2")
    );
    assert_eq!(withheld(&mut vm), 2);
}

#[test]
fn configured_methods_and_path_prefixes_opt_requests_in() {
    let mut vm = vm(
        r#"{"max_retries": 2, "idempotent": {"methods": ["POST", "LOCK"], "path_prefixes": ["/search/", "/api/v1/quote"]}}"#,
    );
    assert_eq!(send(&mut vm, "POST", "/orders", &[]), full("2"));
    assert_eq!(send(&mut vm, "LOCK", "/file", &[]), full("2"));
    // Case-sensitive, as RFC 9110 compares methods.
    assert_eq!(send(&mut vm, "lock", "/file", &[]), safe("2"));
    assert_eq!(send(&mut vm, "PATCH", "/search/items", &[]), full("2"));
    assert_eq!(send(&mut vm, "PATCH", "/api/v1/quote?x=1", &[]), full("2"));
    assert_eq!(send(&mut vm, "PATCH", "/api/v1/order", &[]), safe("2"));
    assert_eq!(send(&mut vm, "PATCH", "/Search/items", &[]), safe("2"));
    assert_eq!(withheld(&mut vm), 3);
}

#[test]
fn the_safe_set_never_adds_a_condition_the_service_did_not_configure() {
    let mut vm = vm(r#"{"retry_on": "reset-before-request,5xx,gateway-error,refused-stream"}"#);
    assert_eq!(
        send(&mut vm, "POST", "/", &[]),
        (
            "2".to_string(),
            Some("reset-before-request,refused-stream".to_string()),
            None
        )
    );
    // Only safe conditions configured: nothing is narrowed, nothing counted.
    let mut vm = self::vm(r#"{"retry_on": "connect-failure"}"#);
    assert_eq!(
        send(&mut vm, "POST", "/", &[]),
        ("2".to_string(), Some("connect-failure".to_string()), None)
    );
    assert_eq!(withheld(&mut vm), 0);
}

#[test]
fn a_request_left_with_no_condition_plans_no_retry_and_reserves_nothing() {
    let mut vm = vm(r#"{"max_retries": 3, "retry_on": "5xx,unavailable"}"#);
    assert_eq!(
        send(&mut vm, "GET", "/", &[]),
        (
            "3".to_string(),
            Some("5xx".to_string()),
            Some("unavailable".to_string())
        )
    );
    vm.host.take_events();
    assert_eq!(
        send(&mut vm, "POST", "/", &[]),
        ("0".to_string(), None, None)
    );
    // Nothing reserved and nothing denied: no write at all; the request is
    // deposited with the worker's next write, here its tick.
    let events = vm.host.take_events();
    assert!(
        !events
            .iter()
            .any(|event| matches!(event, Event::Reserved { .. } | Event::Deposited { .. })),
        "{events:?}"
    );
    vm.tick();
    let deposited: u32 = vm
        .host
        .take_events()
        .iter()
        .filter_map(|event| match event {
            Event::Deposited { landed, .. } => Some(landed.deposits),
            _ => None,
        })
        .sum();
    assert_eq!(deposited, 1, "the POST, at the tick");
    assert_eq!(vm.host.metric("sluice.shop.retry.denied"), Some(0));
    assert_eq!(vm.host.metric("sluice.shop.retry.granted"), Some(3));
    assert_eq!(withheld(&mut vm), 1);
}

#[test]
fn grpc_calls_follow_the_grpc_conditions() {
    let grpc = [("content-type", "application/grpc")];
    // No gRPC condition configured: `unavailable` only; HTTP narrowed.
    let mut vm = vm(r#"{"max_retries": 2}"#);
    assert_eq!(
        send(&mut vm, "POST", "/shop.Orders/Create", &grpc),
        (
            "2".to_string(),
            Some(SAFE.to_string()),
            Some("unavailable".to_string())
        )
    );
    for content_type in [
        "application/grpc+proto",
        "application/grpc-web",
        "Application/GRPC;charset=x",
    ] {
        assert_eq!(
            send(
                &mut vm,
                "POST",
                "/shop.Orders/Create",
                &[("content-type", content_type)]
            )
            .2,
            Some("unavailable".to_string()),
            "{content_type}"
        );
    }
    assert_eq!(withheld(&mut vm), 4);
    // Not gRPC: a POST with another content type gets no gRPC condition.
    assert_eq!(
        send(
            &mut vm,
            "POST",
            "/",
            &[("content-type", "application/json")]
        ),
        safe("2")
    );

    // Configured gRPC conditions are the call's; HTTP ones narrowed away.
    let mut vm = self::vm(r#"{"max_retries": 2, "retry_on": "5xx,reset,internal,cancelled"}"#);
    assert_eq!(
        send(&mut vm, "POST", "/shop.Orders/Create", &grpc),
        (
            "2".to_string(),
            None,
            Some("internal,cancelled".to_string())
        )
    );
    assert_eq!(withheld(&mut vm), 1);

    // Opted in (a key, or the service's path prefix): the HTTP conditions too.
    let mut vm = self::vm(
        r#"{"max_retries": 2, "retry_on": "5xx,reset,internal", "idempotent": {"path_prefixes": ["/shop.Catalog/"]}}"#,
    );
    let both = (
        "2".to_string(),
        Some("5xx,reset".to_string()),
        Some("internal".to_string()),
    );
    assert_eq!(
        send(
            &mut vm,
            "POST",
            "/shop.Orders/Create",
            &[grpc[0], ("idempotency-key", "k1")]
        ),
        both
    );
    assert_eq!(send(&mut vm, "POST", "/shop.Catalog/Get", &grpc), both);
    assert_eq!(withheld(&mut vm), 0);
    let mut vm = self::vm(r#"{"max_retries": 2}"#);
    assert_eq!(
        send(
            &mut vm,
            "POST",
            "/shop.Orders/Create",
            &[grpc[0], ("idempotency-key", "k1")]
        ),
        (
            "2".to_string(),
            Some(FULL.to_string()),
            Some("unavailable".to_string())
        )
    );
}

#[test]
fn a_policy_that_never_retries_counts_nothing_as_withheld() {
    let mut vm = vm(r#"{"max_retries": 0}"#);
    assert_eq!(send(&mut vm, "POST", "/", &[]), safe("0"));
    assert_eq!(withheld(&mut vm), 0);
}

#[test]
fn hostile_header_bytes_never_trap_and_count_as_unknown() {
    let mut vm =
        vm(r#"{"max_retries": 2, "idempotent": {"methods": ["POST"], "path_prefixes": ["/a"]}}"#);
    for method in [
        "\u{0}",
        "GET\u{0}",
        "\u{ff}",
        " GET",
        "GET ",
        "POSTPOSTPOST",
    ] {
        assert_eq!(
            send(
                &mut vm,
                method,
                "\u{ff}",
                &[("content-type", "application/gr")]
            ),
            safe("2"),
            "{method:?}"
        );
    }
    let long = "a".repeat(100_000);
    assert_eq!(
        send(
            &mut vm,
            &long,
            &long,
            &[("content-type", &long), ("idempotency-key", "")]
        ),
        safe("2")
    );
}

#[test]
fn the_pure_helpers_classify_as_the_engine_does() {
    assert_eq!(safe_conditions(FULL), SAFE);
    assert_eq!(safe_conditions("5xx,gateway-error"), "");
    assert!(conditions_after_response(FULL));
    assert!(conditions_after_response("unavailable"));
    assert!(!conditions_after_response(SAFE));
    assert!(!conditions_after_response("reset-before-request"));
    assert!(!conditions_after_response(""));
    assert!(is_grpc_content_type(Some(b"application/grpc")));
    assert!(!is_grpc_content_type(Some(b"application/json")));
    assert!(!is_grpc_content_type(Some(b"application/grp")));
    let policy = RetryPolicy::default();
    let facts = |method: &'static [u8]| RequestFacts {
        method: Some(method),
        ..RequestFacts::default()
    };
    assert_eq!(
        safe_to_replay(&policy, &facts(b"PUT")),
        Some(Replayable::Method)
    );
    assert_eq!(safe_to_replay(&policy, &facts(b"POST")), None);
    assert_eq!(classify(&policy, &facts(b"POST")), RequestKind::Unsafe);
    assert_eq!(
        classify(&policy, &RequestFacts::default()),
        RequestKind::Unsafe
    );
    let plan = retry::plan_for(&policy, None, RequestKind::Unsafe);
    assert!(plan.withheld);
    assert_eq!(retry::conditions(&policy, plan.kind), (SAFE, ""));
}
