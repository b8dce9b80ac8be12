//! Module loading and start-up checks, with minimal hand-written modules.

// Tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sluice_host::{Proxy, StartError, TrapPolicy};

/// A minimal module around `body` (extra imports/exports/functions).
fn module(imports: &str, body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
            {imports}
            (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024))
            {body})"#
    ))
    .unwrap()
}

fn load(bytes: Vec<u8>) -> Result<Proxy, StartError> {
    Proxy::builder_from_bytes("test.wat", bytes)
        .trap_policy(TrapPolicy::FailClosed)
        .echo_logs(false)
        .build()
}

fn load_error(bytes: Vec<u8>) -> String {
    match load(bytes) {
        Err(StartError::Load(m)) => m,
        Err(e) => panic!("expected a load error, got {e}"),
        Ok(_) => panic!("expected a load error"),
    }
}

#[test]
fn an_import_envoy_does_not_provide_is_refused_by_name() {
    let m = load_error(module(
        r#"(import "env" "proxy_frobnicate" (func (param i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#,
        "",
    ));
    assert!(m.contains("missing import: env.proxy_frobnicate"), "{m}");
    assert!(!m.contains("fd_write"), "fd_write is provided: {m}");
}

#[test]
fn an_import_with_the_wrong_signature_is_refused() {
    let m = load_error(module(
        r#"(import "env" "proxy_log" (func (param i32 i32) (result i32)))"#,
        "",
    ));
    assert!(m.contains("import type mismatch: env.proxy_log"), "{m}");
}

#[test]
fn a_module_without_an_abi_version_is_refused() {
    let bytes = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let m = load_error(bytes);
    assert!(m.contains("ABI version"), "{m}");
}

#[test]
fn a_module_without_an_allocator_cannot_start() {
    let bytes = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let p = load(bytes).unwrap();
    let err = p.start_vm().err().unwrap();
    assert!(err.to_string().contains("missing malloc"), "{err}");
}

#[test]
fn initialize_may_only_log_like_in_envoy() {
    // proxy_get_current_time_nanoseconds is not on Envoy's start-up allow list.
    let p = load(module(
        r#"(import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))"#,
        r#"(func (export "_initialize") (drop (call $now (i32.const 0))))"#,
    ))
    .unwrap();
    match p.start_vm() {
        Err(StartError::Trap(t)) => {
            assert_eq!(t.function, "_initialize");
            assert!(t.message.contains("restricted_callback"), "{}", t.message);
        }
        Err(e) => panic!("expected a trap, got {e}"),
        Ok(_) => panic!("expected a trap"),
    }
}

#[test]
fn initialize_then_main_run_before_the_root_context() {
    let p = load(module(
        r#"(import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 100) "init" "main" "ctx")
           (func (export "_initialize") (drop (call $log (i32.const 2) (i32.const 100) (i32.const 4))))
           (func (export "main") (param i32 i32) (result i32)
             (drop (call $log (i32.const 2) (i32.const 104) (i32.const 4))) (i32.const 0))
           (func (export "proxy_on_context_create") (param i32 i32)
             (drop (call $log (i32.const 2) (i32.const 108) (i32.const 3))))"#,
    ))
    .unwrap();
    let vm = p.start_vm().unwrap();
    let lines: Vec<String> = p.logs().into_iter().map(|l| l.message).collect();
    assert_eq!(lines, ["init", "main", "ctx"]);
    assert_eq!(vm.root_context_id(), 1, "context 0 is the VM context");
}
