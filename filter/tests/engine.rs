//! The engine through the proxy-wasm lifecycle, over the in-memory host:
//! what a user of the filter would see, end state asserted.

use sluice::engine::HeadersAction;
use sluice::testing::{Ending, FaultyStore, Vm};
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
    // headers, then the status and attempts: about 13 host calls today.
    assert!(per_request <= 14.0, "{per_request} host calls per request");
}
