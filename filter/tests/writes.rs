//! What Sluice writes into a request, per routing and retry mode: only what
//! changes (`stable_by_default`, `retry.mode: "route"`), and never what a
//! client sent to steer or to raise its retries or timeouts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::retry::OWNED_HEADERS;
use sluice::testing::{FaultyStore, StreamState, Vm};
use std::cell::Cell;
use std::rc::Rc;

const NOW: u64 = 1_800_000_000_000;

fn vm(config: &str) -> Vm {
    let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::new(Cell::new(NOW)), 7);
    assert!(vm.configure(config.as_bytes()), "config refused");
    vm
}

type Headers = Vec<(&'static str, Vec<u8>)>;

fn request(method: &str, extra: &[(&'static str, &str)]) -> Headers {
    let mut headers = vec![
        (":authority", b"shop.local".to_vec()),
        (":path", b"/".to_vec()),
        (":method", method.as_bytes().to_vec()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, value.as_bytes().to_vec())),
    );
    headers
}

fn text(stream: &StreamState, name: &str) -> Option<String> {
    stream
        .header(name)
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// The owned retry headers the upstream request carries, by name.
fn owned(stream: &StreamState) -> Vec<(&'static str, String)> {
    OWNED_HEADERS
        .iter()
        .filter_map(|name| text(stream, name).map(|value| (*name, value)))
        .collect()
}

/// What a client sends to get more retries and time than the route's.
const GREEDY: [(&str, &str); 9] = [
    ("x-envoy-max-retries", "10"),
    ("x-envoy-retry-on", "5xx,retriable-4xx"),
    ("x-envoy-retry-grpc-on", "internal"),
    ("x-envoy-upstream-rq-timeout-ms", "60000"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "60000"),
    ("x-envoy-hedge-on-per-try-timeout", "true"),
    ("x-envoy-expected-rq-timeout-ms", "60000"),
    ("x-envoy-retriable-status-codes", "409"),
    ("x-envoy-retriable-header-names", "x-again"),
];

// ------------------------------------------------------- stable_by_default

const BY_DEFAULT: &str = r#"{"services": [{"name": "shop", "match": {"authority": "shop.local"},
    "stable": "v1", "canary": "v2", "stable_by_default": true, "sticky": {"header": "x-user"},
    "weight": 50, "rules": [{"header": "x-beta", "equals": "yes", "to": "canary"},
                            {"header": "x-pin", "equals": "stable", "to": "stable"}]}]}"#;

#[test]
fn stable_by_default_writes_nothing_for_a_stable_request_without_a_client_header() {
    let mut vm = vm(BY_DEFAULT);
    let stream = vm.exchange(&request("GET", &[("x-pin", "stable")]), 200, 1);
    assert_eq!(text(&stream, "x-sluice-cluster"), None);
    assert_eq!(stream.header_changes, 0);
    assert_eq!(stream.route_cache_clears, 0);
    // The canary is written and the route selected again, as always.
    let stream = vm.exchange(&request("GET", &[("x-beta", "yes")]), 200, 1);
    assert_eq!(text(&stream, "x-sluice-cluster").as_deref(), Some("v2"));
    assert_eq!((stream.header_changes, stream.route_cache_clears), (1, 1));
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.routed.stable"), Some(1));
    assert_eq!(vm.host.metric("sluice.shop.routed.canary"), Some(1));
}

#[test]
fn stable_by_default_still_removes_every_forged_steering_header() {
    let mut vm = vm(BY_DEFAULT);
    // A rule forcing stable against a forged canary value: removed, and the
    // route selected again (the default route then takes it to stable).
    let forged = request("GET", &[("x-pin", "stable"), ("x-sluice-cluster", "v2")]);
    let stream = vm.exchange(&forged, 200, 1);
    assert_eq!(text(&stream, "x-sluice-cluster"), None);
    assert_eq!((stream.header_changes, stream.route_cache_clears), (1, 1));
    // Sent twice: the removal takes every copy.
    let mut twice = request("GET", &[("x-pin", "stable")]);
    twice.push(("x-sluice-cluster", b"v2".to_vec()));
    twice.push(("x-sluice-cluster", b"admin".to_vec()));
    let stream = vm.exchange(&twice, 200, 1);
    assert_eq!(text(&stream, "x-sluice-cluster"), None);
    // Over many users, each lands where Sluice chose, whatever they forge:
    // the stable half without the header, the canary half with Sluice's.
    let (mut stable, mut canary) = (0, 0);
    for user in 0..200 {
        let user = user.to_string();
        let clean = vm.exchange(&request("GET", &[("x-user", user.as_str())]), 200, 1);
        let forged = vm.exchange(
            &request(
                "GET",
                &[("x-user", user.as_str()), ("x-sluice-cluster", "v2")],
            ),
            200,
            1,
        );
        let side = text(&clean, "x-sluice-cluster");
        assert_eq!(text(&forged, "x-sluice-cluster"), side, "user {user}");
        match side.as_deref() {
            None => stable += 1,
            Some("v2") => canary += 1,
            other => panic!("user {user} steered to {other:?}"),
        }
    }
    assert!(
        stable > 60 && canary > 60,
        "{stable} stable, {canary} canary"
    );
}

#[test]
fn without_stable_by_default_stable_is_written_as_before() {
    let config = BY_DEFAULT.replace(
        r#""stable_by_default": true"#,
        r#""stable_by_default": false"#,
    );
    let mut vm = vm(&config);
    let stream = vm.exchange(&request("GET", &[("x-pin", "stable")]), 200, 1);
    assert_eq!(text(&stream, "x-sluice-cluster").as_deref(), Some("v1"));
    assert_eq!(stream.route_cache_clears, 1);
}

// ------------------------------------------------ services without retries

#[test]
fn a_service_without_a_retry_block_removes_a_clients_retry_and_timeout_headers() {
    let mut vm = vm(BY_DEFAULT);
    let stream = vm.exchange(
        &request(
            "GET",
            &[("x-pin", "stable")]
                .into_iter()
                .chain(GREEDY)
                .collect::<Vec<_>>(),
        ),
        200,
        1,
    );
    assert_eq!(owned(&stream), []);
    assert_eq!(stream.header_changes, 9);
    // Retry headers select no route: nothing to clear.
    assert_eq!(stream.route_cache_clears, 0);
    // An unmatched request is not Sluice's: left alone.
    let mut other = request("GET", &GREEDY);
    other[0].1 = b"other.local".to_vec();
    let stream = vm.exchange(&other, 200, 1);
    assert_eq!(owned(&stream).len(), 9);
    assert_eq!(stream.header_changes, 0);
}

// -------------------------------------------------------------- route mode

/// The route has `retry_policy: {retry_on: "5xx,reset,connect-failure",
/// num_retries: 2, per_try_timeout: 0.5s}` and `timeout: 3s`.
fn route_mode(retry_on: &str, budget: &str) -> String {
    format!(
        r#"{{"services": [{{"name": "shop", "match": {{"authority": "shop.local"}},
            "stable": "v1", "canary": "v2", "stable_by_default": true,
            "rules": [{{"header": "x-beta", "equals": "yes", "to": "canary"}}],
            "retry": {{"mode": "route", "max_retries": 2, "retry_on": "{retry_on}",
                       "timeout_ms": 3000, "per_try_timeout_ms": 500,
                       "deadline_header": "x-deadline-ms", "budget": {budget}}}}}]}}"#
    )
}

const PLENTY: &str = r#"{"min_per_s": 1000}"#;

#[test]
fn route_mode_writes_nothing_when_the_routes_policy_stands() {
    let mut vm = vm(&route_mode("5xx,reset,connect-failure", PLENTY));
    for method in ["GET", "PUT", "DELETE"] {
        let stream = vm.exchange(&request(method, &[]), 200, 1);
        assert_eq!(owned(&stream), [], "{method}");
        assert_eq!(stream.header_changes, 0, "{method}");
        assert_eq!(stream.route_cache_clears, 0, "{method}");
    }
    // A POST opted in by its Idempotency-Key keeps the route's retries too.
    let stream = vm.exchange(&request("POST", &[("idempotency-key", "k1")]), 200, 1);
    assert_eq!(owned(&stream), []);
    // The canary: only the steering header.
    let stream = vm.exchange(&request("GET", &[("x-beta", "yes")]), 200, 1);
    assert_eq!(owned(&stream), []);
    assert_eq!((stream.header_changes, stream.route_cache_clears), (1, 1));
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.retry.granted"), Some(10));
    assert_eq!(vm.host.metric("sluice.shop.retry.withheld_unsafe"), Some(0));
}

#[test]
fn route_mode_removes_a_greedy_clients_headers_and_keeps_the_routes_policy() {
    let mut vm = vm(&route_mode("5xx,reset,connect-failure", PLENTY));
    let stream = vm.exchange(&request("GET", &GREEDY), 200, 1);
    assert_eq!(owned(&stream), []);
    assert_eq!(stream.header_changes, 9);
    assert_eq!(stream.route_cache_clears, 0);
    // Even with a deadline past the route's timeout: nothing raised.
    let stream = vm.exchange(&request("GET", &[("x-deadline-ms", "60000")]), 200, 1);
    assert_eq!(owned(&stream), []);
}

#[test]
fn route_mode_gives_a_request_that_may_not_be_replayed_no_retry_when_the_route_would_replay_it() {
    // The route retries on 5xx and reset: conditions that fire after the
    // application may have acted. A header cannot narrow them, so a POST
    // gets none.
    let mut vm = vm(&route_mode("5xx,reset,connect-failure", PLENTY));
    for method in ["POST", "PATCH", "LOCK"] {
        let stream = vm.exchange(&request(method, &[]), 200, 1);
        assert_eq!(
            owned(&stream),
            [("x-envoy-max-retries", "0".to_string())],
            "{method}"
        );
        assert_eq!(stream.route_cache_clears, 0);
    }
    // A client cannot undo it by sending its own.
    let stream = vm.exchange(&request("POST", &GREEDY), 200, 1);
    assert_eq!(owned(&stream), [("x-envoy-max-retries", "0".to_string())]);
    // A gRPC call: the route's 5xx fires after the call was processed.
    let grpc = [("content-type", "application/grpc")];
    let stream = vm.exchange(&request("POST", &grpc), 200, 1);
    assert_eq!(owned(&stream), [("x-envoy-max-retries", "0".to_string())]);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.retry.withheld_unsafe"), Some(5));

    // Conditions that fire only before the application saw the request: a
    // POST keeps the route's retries, nothing written.
    let mut vm = self::vm(&route_mode("connect-failure,refused-stream", PLENTY));
    let stream = vm.exchange(&request("POST", &[]), 200, 1);
    assert_eq!(owned(&stream), []);
    // gRPC conditions are a gRPC call's own language, as in headers mode;
    // a plain POST must not be replayed on a `grpc-status` response.
    let mut vm = self::vm(&route_mode("connect-failure,unavailable", PLENTY));
    let stream = vm.exchange(&request("POST", &grpc), 200, 1);
    assert_eq!(owned(&stream), []);
    let stream = vm.exchange(&request("POST", &[]), 200, 1);
    assert_eq!(owned(&stream), [("x-envoy-max-retries", "0".to_string())]);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.retry.withheld_unsafe"), Some(1));
}

#[test]
fn route_mode_lowers_the_timeout_and_the_retries_for_a_client_deadline() {
    let mut vm = vm(&route_mode("5xx,reset,connect-failure", PLENTY));
    // 1200 ms: the timeout becomes 1200, and at 500 ms a try only two
    // attempts fit (one retry).
    let stream = vm.exchange(&request("GET", &[("x-deadline-ms", "1200")]), 200, 1);
    assert_eq!(
        owned(&stream),
        [
            ("x-envoy-max-retries", "1".to_string()),
            ("x-envoy-upstream-rq-timeout-ms", "1200".to_string())
        ]
    );
    // 2500 ms: every retry fits; only the timeout is lowered.
    let stream = vm.exchange(&request("GET", &[("x-deadline-ms", "2500")]), 200, 1);
    assert_eq!(
        owned(&stream),
        [("x-envoy-upstream-rq-timeout-ms", "2500".to_string())]
    );
    // A gRPC deadline keeps its grace: Envoy's timeout runs 50 ms past
    // 500 ms, so the client's own timer fires first.
    let stream = vm.exchange(
        &request(
            "POST",
            &[
                ("content-type", "application/grpc"),
                ("grpc-timeout", "500m"),
                ("idempotency-key", "k"),
            ],
        ),
        200,
        1,
    );
    assert_eq!(
        owned(&stream),
        [
            ("x-envoy-max-retries", "0".to_string()),
            ("x-envoy-upstream-rq-timeout-ms", "550".to_string())
        ]
    );
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.retry.deadline_cut"), Some(2));
}

#[test]
fn route_mode_writes_fewer_retries_when_the_budget_is_short() {
    // A reserve of one token a second and no ratio: the first request gets
    // its two retries from the reserve (one window of 1 s holds 1 token,
    // so only the first retry), then nothing until it is settled.
    let mut vm = vm(&route_mode(
        "5xx,reset,connect-failure",
        r#"{"ratio": 0, "min_per_s": 1, "window_s": 1}"#,
    ));
    let (first, _) = vm.request(&request("GET", &[]));
    let (second, _) = vm.request(&request("GET", &[]));
    let first = vm.forget(first);
    let second = vm.forget(second);
    assert_eq!(owned(&first), [("x-envoy-max-retries", "1".to_string())]);
    assert_eq!(owned(&second), [("x-envoy-max-retries", "0".to_string())]);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.retry.denied"), Some(3));
}

#[test]
fn headers_mode_still_writes_the_whole_policy_on_every_request() {
    let config = route_mode("5xx,reset,connect-failure", PLENTY)
        .replace(r#""mode": "route""#, r#""mode": "headers""#);
    let mut vm = vm(&config);
    let stream = vm.exchange(&request("GET", &GREEDY), 200, 1);
    assert_eq!(
        owned(&stream),
        [
            ("x-envoy-max-retries", "2".to_string()),
            ("x-envoy-retry-on", "5xx,reset,connect-failure".to_string()),
            ("x-envoy-upstream-rq-timeout-ms", "3000".to_string()),
            ("x-envoy-upstream-rq-per-try-timeout-ms", "500".to_string()),
        ]
    );
    // Retry headers alone select no route.
    assert_eq!(stream.route_cache_clears, 0);
}

/// Host calls per request on issue 13's common path (a matched request,
/// breaker closed, budget with tokens, no deadline, 2xx), and how many of
/// the requests went out with no header change.
fn common_path(config: &str) -> (f64, u32) {
    let mut vm = vm(config);
    vm.exchange(&request("GET", &[]), 200, 1);
    let before = vm.host.crossings.get();
    let mut untouched = 0;
    for _ in 0..100 {
        let stream = vm.exchange(&request("GET", &[]), 200, 1);
        if stream.header_changes == 0 {
            assert_eq!(stream.route_cache_clears, 0);
            assert_eq!(text(&stream, "x-sluice-cluster"), None);
            untouched += 1;
        }
    }
    ((vm.host.crossings.get() - before) as f64 / 100.0, untouched)
}

#[test]
fn the_common_path_with_stable_by_default_and_route_mode_writes_no_header() {
    let base = r#"{"services": [{"name": "shop", "stable": "v1", "canary": "v2", "weight": 10,
            "retry": {"max_retries": 2, "retry_on": "5xx,reset"}, "breaker": {}}]}"#;
    let (today, untouched) = common_path(base);
    assert_eq!(untouched, 0);
    let lean = base
        .replace(
            r#""weight": 10,"#,
            r#""weight": 10, "stable_by_default": true,"#,
        )
        .replace(r#"{"max_retries""#, r#"{"mode": "route", "max_retries""#);
    let (now, untouched) = common_path(&lean);
    // About 90 % stay on stable: each saves the steering write,
    // `x-envoy-max-retries`, `x-envoy-retry-on` and the clear.
    assert!(untouched > 80, "{untouched}");
    assert!(today - now > 3.3, "{today} -> {now} host calls per request");
    println!("host calls per request (engine, FakeHost): {today} -> {now}");
}
