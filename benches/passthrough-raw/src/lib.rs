//! The raw-exports Wasm floor: a proxy-wasm HTTP filter that does nothing,
//! written without the SDK and exporting exactly the functions Sluice
//! exports (`filter/src/filter.rs`), with the same shape: `_initialize`
//! running the linker's initialisers once (the reactor model), the host's
//! `malloc` callback, VM start, configure, context create, tick, request and
//! response headers (both `0`, Continue), log and delete. No body, trailer,
//! `on_done` or other callback is exported, so Envoy does not enter the
//! module for them.
//!
//! `benches/passthrough` is the same do-nothing filter built with the
//! proxy-wasm SDK, whose dispatcher exports every callback: Envoy enters it
//! for every body chunk, for trailers and for `on_done` too. The load
//! benchmark's `passthrough-raw` setup against `passthrough` prices that
//! difference (`benches/README.md`).
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1 -p sluice-passthrough-raw
//! # -> target/wasm32-wasip1/release/sluice_passthrough_raw.wasm (any root_id)
//! ```
//!
//! Per request it makes no host call and keeps no state.

// Built only for wasm32, like `benches/passthrough`: natively the crate is
// empty (clippy and `cargo build --workspace` stay happy).
#![cfg(target_arch = "wasm32")]
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

/// The ABI this module speaks (proxy-wasm 0.2.1), as Sluice.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

extern "C" {
    /// The linker's static initialisers (wasi-libc's and the standard
    /// library's).
    fn __wasm_call_ctors();
}

/// The reactor entry point, which the host calls once before anything else.
/// Without it the linker treats the module as a command and wraps every
/// export in calls to the initialisers and finalisers (as Sluice explains).
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the linker's initialisers, run once, before any other export,
    // as the reactor model wants.
    unsafe { __wasm_call_ctors() }
}

/// The host's `malloc` callback, which Envoy requires of every module. The
/// host calls it only to hand over a buffer the module asked for, and this
/// module asks for none; shaped as Sluice's all the same.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer: Box<[MaybeUninit<u8>]> = Box::new_uninit_slice(size);
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_context_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_context_id: u32, _configuration_size: usize) -> u32 {
    1
}

/// Never called: the module sets no tick period. Exported because Sluice
/// exports it.
#[no_mangle]
pub extern "C" fn proxy_on_tick(_root_context_id: u32) {}

/// 0: Continue.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    _context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    0
}

/// 0: Continue.
#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    _context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}
