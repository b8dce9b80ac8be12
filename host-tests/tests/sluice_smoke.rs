//! Loads the real sluice.wasm in the fake host. The test command builds it
//! first (`cargo build --release --target wasm32-wasip1 -p sluice`); a
//! missing file is a failure with that instruction, not a skip.

// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sluice_host::{require_sluice_wasm, AbiVersion, Action, Proxy, StartError};
use std::time::Instant;

const CONFIG: &str = r#"{"services": [{"name": "shop", "stable": "shop-v1"}]}"#;

fn proxy(config: &str) -> Proxy {
    let started = Instant::now();
    let p = Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .build()
        .unwrap();
    eprintln!(
        "sluice.wasm compiled in {:?} (this call took {:?})",
        p.module_compile_time(),
        started.elapsed()
    );
    p
}

#[test]
fn sluice_loads_and_declares_abi_0_2_1() {
    let p = proxy(CONFIG);
    assert_eq!(p.abi_version(), AbiVersion::V0_2_1);
    let vms = p.boot(1).unwrap();
    assert_eq!(vms.len(), 2);
    assert!(vms.iter().all(|vm| vm.trapped().is_none()));
}

#[test]
fn sluice_refuses_a_broken_configuration_with_a_reason() {
    let p = proxy("not json");
    let err = p.start_vm().err().expect("garbage must be refused");
    assert!(matches!(err, StartError::ConfigureFailed { .. }), "{err}");
    assert!(!err.logs().is_empty(), "the refusal should say why: {err}");
}

#[test]
fn sluice_handles_a_request_without_trapping() {
    let p = proxy(CONFIG);
    let vm = p.start_vm().unwrap();
    let s = vm.stream();
    let action = s.request_headers(
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "shop.local"),
            (":path", "/"),
            ("x-sluice-cluster", "client-chosen"),
        ],
        true,
    );
    assert_eq!(action, Action::Continue);
    // A client must never choose the cluster: the filter overwrites it with
    // the (only, stable) cluster of the matching service.
    assert_eq!(
        s.request_header("x-sluice-cluster").as_deref(),
        Some("shop-v1")
    );
    s.response_headers(&[(":status", "200")], true);
    s.finish();
    assert!(vm.trapped().is_none());
}
