//! The engine through the proxy-wasm lifecycle, over the in-memory host:
//! what a user of the filter would see, end state asserted.
#![allow(clippy::expect_used)]

use sluice::engine::HeadersAction;
use sluice::testing::{Ending, Event, FaultyStore, Vm};
use std::cell::Cell;
use std::rc::Rc;

const NOW: u64 = 1_800_000_000_000;

fn vm(config: &str) -> Vm {
    let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::new(Cell::new(NOW)), 7);
    assert!(vm.configure(config.as_bytes()), "config refused");
    vm
}

fn shop(path: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (":authority", b"shop.local".to_vec()),
        (":path", path.as_bytes().to_vec()),
    ]
}

#[test]
fn a_matched_request_is_steered_and_a_forged_steering_header_never_survives() {
    let mut vm = vm(
        r#"{"services": [{"name": "shop", "match": {"authority": "shop.local"},
            "stable": "shop_v1", "canary": "shop_v2", "weight": 100}]}"#,
    );
    let mut forged = shop("/");
    forged.push(("x-sluice-cluster", b"admin_backend".to_vec()));
    let stream = vm.exchange(&forged, 200, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"shop_v2"[..]));

    let unmatched = vec![
        (":authority", b"other.local".to_vec()),
        (":path", b"/".to_vec()),
        ("x-sluice-cluster", b"admin_backend".to_vec()),
    ];
    let stream = vm.exchange(&unmatched, 200, 1);
    assert_eq!(stream.header("x-sluice-cluster"), None);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.shop.routed.canary"), Some(1));
    assert_eq!(vm.host.metric("sluice.unmatched"), Some(1));
}

#[test]
fn an_open_stable_breaker_answers_503_with_retry_after_and_the_upstream_is_not_asked() {
    let mut vm = vm(r#"{"services": [{"name": "shop", "stable": "shop_v1",
            "breaker": {"consecutive_failures": 3, "open_ms": 5000, "max_open_ms": 5000}}]}"#);
    for _ in 0..3 {
        vm.exchange(&shop("/"), 503, 1);
    }
    let (context, action) = vm.request(&shop("/"));
    assert_eq!(action, HeadersAction::Stop);
    vm.end(context, Ending::default());
    let stream = vm.forget(context);
    let reply = stream.local_reply.clone().expect("a local reply");
    assert_eq!(reply.status, 503);
    assert!(reply
        .headers
        .iter()
        .any(|(name, value)| name == "retry-after" && value == "5"));
    assert!(reply
        .headers
        .iter()
        .any(|(name, value)| name == "x-sluice-breaker" && value == "open"));
    // Refused requests were never steered anywhere.
    assert_eq!(stream.header("x-sluice-cluster"), None);
}

#[test]
fn a_config_with_an_unknown_key_is_refused_and_the_one_in_force_stays() {
    let mut vm = vm(r#"{"services": [{"name": "shop", "stable": "shop_v1"}]}"#);
    assert!(!vm.configure(br#"{"services": [{"name": "shop", "stable": "shop_v1", "wieght": 5}]}"#));
    let stream = vm.exchange(&shop("/"), 200, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"shop_v1"[..]));
}

#[test]
fn the_common_path_crosses_into_the_host_a_bounded_number_of_times() {
    let mut vm = vm(
        r#"{"services": [{"name": "shop", "stable": "shop_v1", "canary": "shop_v2", "weight": 10,
            "retry": {"max_retries": 2}, "breaker": {}}]}"#,
    );
    // Warm up: the breaker verdict is cached after the first read.
    vm.exchange(&shop("/"), 200, 1);
    let before = vm.host.crossings.get();
    let requests = 100;
    for _ in 0..requests {
        vm.exchange(&shop("/"), 200, 1);
    }
    let per_request = (vm.host.crossings.get() - before) as f64 / f64::from(requests);
    // Headers read, clock, budget read + CAS, steering and four retry
    // headers, `clear_route_cache`, then the response headers and the
    // attempts (no flags after a 200): about 13 host calls today.
    assert!(per_request <= 14.0, "{per_request} host calls per request");
}

const SHOP_RETRY: &str = r#"{"services": [{"name": "shop", "stable": "shop_v1",
    "retry": {"max_retries": 2}, "breaker": {}ATTEMPTS}]}"#;

fn shop_retry(attempt_count_in_response: bool) -> String {
    let key = if attempt_count_in_response {
        r#", "attempt_count_in_response": true"#
    } else {
        ""
    };
    SHOP_RETRY.replace("ATTEMPTS", key)
}

/// Host calls at the response headers and at the end of one request
/// answered `status` (after a warm-up request and a tick: the breaker's
/// verdict cached, nothing held to write).
fn end_crossings(vm: &mut Vm, status: u64, attempts: u64) -> (u64, u64) {
    vm.exchange(&shop("/"), 200, 1);
    vm.tick();
    let (context, action) = vm.request(&shop("/"));
    assert_eq!(action, HeadersAction::Continue);
    let before = vm.host.crossings.get();
    vm.respond(context, status, Some(attempts));
    let responded = vm.host.crossings.get();
    vm.end(
        context,
        Ending {
            code: Some(status),
            flags: 0,
            attempts: Some(attempts),
            grpc_status: None,
        },
    );
    vm.forget(context);
    (responded - before, vm.host.crossings.get() - responded)
}

#[test]
fn the_end_of_a_request_is_read_once_when_the_route_writes_the_attempt_count() {
    // The route writes `x-envoy-attempt-count` and the service says so: one
    // read of the response headers gives the status and the attempts, and a
    // 200 asks nothing at the end.
    let mut vm = vm(&shop_retry(true));
    vm.route_writes_attempt_count = true;
    assert_eq!(end_crossings(&mut vm, 200, 1), (1, 0));
    // Without the key the attempts are the property: one more call.
    let mut vm = self::vm(&shop_retry(false));
    vm.route_writes_attempt_count = true;
    assert_eq!(end_crossings(&mut vm, 200, 1), (2, 0));
    // A 5xx has failed already: no flags either; its breaker write is at
    // the end.
    let mut vm = self::vm(&shop_retry(true));
    vm.route_writes_attempt_count = true;
    let (at_response, _) = end_crossings(&mut vm, 503, 3);
    assert_eq!(at_response, 1);
}

/// The budget level the next reservation sees after one request that
/// reserved 2 retries and answered 200 with `upstream` response headers,
/// the router reporting `attempts` (the property).
fn level_after(config: &str, upstream: &[(&str, &str)], attempts: u64) -> u64 {
    let mut vm = vm(config);
    let (context, _) = vm.request(&shop("/"));
    let mut headers = vec![(":status", "200")];
    headers.extend_from_slice(upstream);
    vm.respond_with(context, &headers, Some(attempts), true);
    vm.end(context, Ending::default());
    vm.forget(context);
    vm.host.take_events();
    vm.exchange(&shop("/"), 200, 1);
    vm.host
        .take_events()
        .into_iter()
        .find_map(|event| match event {
            Event::Reserved { reservation, .. } => Some(reservation.level),
            _ => None,
        })
        .expect("a reservation")
}

#[test]
fn an_attempt_count_the_upstream_forged_never_refunds_retries() {
    // The router made 3 attempts (2 retries used); the upstream claims 1,
    // which would give both retries back to the budget.
    let forged: &[(&str, &str)] = &[("x-envoy-attempt-count", "1")];
    let honest = level_after(&shop_retry(false), &[], 3);
    // Without the key the upstream's header is not read at all.
    assert_eq!(level_after(&shop_retry(false), forged, 3), honest);
    // With the key, values the router never writes are not believed.
    for value in ["0", "12", "1,1", "x", ""] {
        let hostile: &[(&str, &str)] = &[("x-envoy-attempt-count", value)];
        assert_eq!(
            level_after(&shop_retry(true), hostile, 3),
            honest,
            "{value:?}"
        );
    }
    let repeated: &[(&str, &str)] = &[
        ("x-envoy-attempt-count", "1"),
        ("x-envoy-attempt-count", "1"),
    ];
    assert_eq!(level_after(&shop_retry(true), repeated, 3), honest);
    // The key is the operator's word that the route writes the header (in
    // Envoy the router then overwrites the upstream's): believed, the
    // unused retries go back. Only a misconfigured route lets the two
    // disagree as here.
    assert!(level_after(&shop_retry(true), forged, 3) > honest);
}

/// `clear_route_cache` once per request whose headers Sluice changed, after
/// the last change; never for a request it left alone or refused.
#[test]
fn the_route_cache_is_cleared_once_after_the_last_header_change() {
    let mut vm = vm(
        r#"{"services": [{"name": "shop", "match": {"authority": "shop.local"},
            "stable": "shop_v1", "canary": "shop_v2", "weight": 50,
            "retry": {"max_retries": 2, "timeout_ms": 5000}}]}"#,
    );
    // Routed: the steering header and the retry headers written, one clear
    // after all of them.
    let mut forged = shop("/");
    forged.push(("x-envoy-max-retries", b"10".to_vec()));
    forged.push(("x-sluice-cluster", b"admin_backend".to_vec()));
    for _ in 0..20 {
        let stream = vm.exchange(&forged, 200, 1);
        assert_eq!(stream.route_cache_clears, 1);
        // The steering header and the retry headers (forged ones
        // overwritten), all before the clear.
        assert!(stream.header_changes >= 3, "{}", stream.header_changes);
        assert_eq!(stream.changes_before_clear, Some(stream.header_changes));
        assert_ne!(
            stream.header("x-sluice-cluster"),
            Some(&b"admin_backend"[..])
        );
    }
    // Unmatched and clean: nothing changed, nothing cleared.
    let unmatched = vec![
        (":authority", b"other.local".to_vec()),
        (":path", b"/".to_vec()),
    ];
    assert_eq!(vm.exchange(&unmatched, 200, 1).route_cache_clears, 0);
    // Unmatched with a forged steering header: removed, then cleared.
    let mut unmatched_forged = unmatched.clone();
    unmatched_forged.push(("x-sluice-cluster", b"admin_backend".to_vec()));
    let stream = vm.exchange(&unmatched_forged, 200, 1);
    assert_eq!(stream.header("x-sluice-cluster"), None);
    assert_eq!(stream.route_cache_clears, 1);
    assert_eq!(vm.host.route_cache_calls.get(), 21);
}

#[test]
fn a_request_the_breaker_refuses_clears_no_route_cache() {
    let mut vm = vm(r#"{"services": [{"name": "shop", "stable": "shop_v1",
            "breaker": {"consecutive_failures": 3, "open_ms": 5000, "max_open_ms": 5000}}]}"#);
    for _ in 0..3 {
        vm.exchange(&shop("/"), 503, 1);
    }
    let calls = vm.host.route_cache_calls.get();
    let mut forged = shop("/");
    forged.push(("x-sluice-cluster", b"admin_backend".to_vec()));
    let (context, action) = vm.request(&forged);
    assert_eq!(action, HeadersAction::Stop);
    vm.end(context, Ending::default());
    let stream = vm.forget(context);
    assert!(stream.local_reply.is_some());
    assert_eq!(stream.route_cache_clears, 0);
    assert_eq!(vm.host.route_cache_calls.get(), calls);
}

/// A host without `clear_route_cache` (NotFound) is asked once per VM, and
/// routing goes on as before.
#[test]
fn a_host_without_clear_route_cache_is_asked_once_per_vm() {
    let store = Rc::new(FaultyStore::default());
    let clock = Rc::new(Cell::new(NOW));
    let config = br#"{"services": [{"name": "shop", "stable": "shop_v1", "canary": "shop_v2",
        "weight": 100}]}"#;
    let mut vms: Vec<Vm> = (0..2)
        .map(|seed| {
            let mut vm = Vm::new(Rc::clone(&store), Rc::clone(&clock), seed);
            vm.host.offers_clear_route_cache.set(false);
            assert!(vm.configure(config));
            vm
        })
        .collect();
    for vm in &mut vms {
        for _ in 0..50 {
            let stream = vm.exchange(&shop("/"), 200, 1);
            assert_eq!(stream.header("x-sluice-cluster"), Some(&b"shop_v2"[..]));
        }
        assert_eq!(vm.host.route_cache_calls.get(), 1);
        // A new config in the same VM does not ask again either.
        assert!(vm.configure(config));
        vm.exchange(&shop("/"), 200, 1);
        assert_eq!(vm.host.route_cache_calls.get(), 1);
    }
}
