//! The proxy-wasm shell: the ABI exports, and the engine's `Host` over the
//! raw host calls. It decides nothing: every export hands its callback to
//! the VM's `engine::Worker` and returns what the engine says.
//!
//! # Why no SDK
//!
//! The proxy-wasm Rust SDK's dispatcher exports every callback, whatever
//! the filter uses, and Envoy then enters the module for each request and
//! response body chunk and for trailers. Envoy skips a callback a module
//! does not export, so this shell exports only what the engine uses
//! (headers, log, delete, tick, configure). Measured in Envoy 1.40, one
//! worker, alternating rounds of one run (`benches/load.sh --setups
//! passthrough,passthrough-raw --rounds 4 --duration 8`, with and without
//! `--response-bytes 65536`; `benches/results/load-2026-12-06T0519Z.md`
//! and `…T0526Z.md`): a do-nothing module exporting only these callbacks
//! cost 77.7 µs of Envoy CPU per request against 82.1 µs for the SDK's
//! do-nothing module with 3-byte responses (+4.4 µs), 101.9 against 107.2 µs
//! with 64 KiB ones (+5.3 µs); an earlier run with 4,000-byte responses gave
//! 51.5 against 57.1 µs. Scaled by the upstream's CPU (which takes out most
//! of this machine's drift) the difference is within noise, so the saving
//! is a few µs at most; keeping it costs nothing at run time (the shell is
//! this file and `hostcalls`).
//!
//! The SDK's `hostcalls` also panic on a status they did not expect, and
//! a panic traps the VM and fails every later request of the worker; the
//! calls in `hostcalls` handle every status.

#![allow(unsafe_code)]

mod hostcalls;
mod logger;

use crate::engine::{HeadersAction, Host, MetricKind, Property, Worker};
use crate::shared::{CasMismatch, SharedStore};
use std::cell::RefCell;
use std::mem::MaybeUninit;

/// The ABI this module speaks (proxy-wasm 0.2.1).
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

extern "C" {
    /// The linker's static initialisers (wasi-libc's and the standard
    /// library's).
    fn __wasm_call_ctors();
}

/// The reactor entry point, which the host calls once before anything else
/// (`WasmBase::startVm`). Without it the linker treats the module as a
/// command and wraps EVERY export in a call to the initialisers and one to
/// the finalisers: some twenty extra calls into the module's runtime per
/// request, for nothing.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the linker's initialisers, run once, before any other export,
    // as the reactor model wants.
    unsafe { __wasm_call_ctors() }
    logger::install();
}

/// Buffers the host hands over (headers, properties, shared data) are
/// allocated here, as a boxed slice of exactly `size` bytes: `hostcalls`
/// reclaims them as a `Vec` of that size.
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
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    with_worker(|worker| worker.create_context(context_id, parent_context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_context_id: u32, _configuration_size: usize) -> u32 {
    with_worker(|worker| worker.configure(&Envoy, root_context_id)).map_or(0, u32::from)
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_context_id: u32) {
    with_worker(|worker| worker.tick(&Envoy, root_context_id));
}

/// 0: continue; 1: stop (a local reply was sent).
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    match with_worker(|worker| worker.request_headers(&Envoy, context_id)) {
        Some(HeadersAction::Stop) => 1,
        Some(HeadersAction::Continue) | None => 0,
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    with_worker(|worker| worker.response_headers(&Envoy, context_id, end_of_stream != 0));
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with_worker(|worker| worker.log(&Envoy, context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with_worker(|worker| worker.delete_context(&Envoy, context_id));
}

thread_local! {
    /// The VM's state. A VM is single threaded and the host never calls in
    /// while a callback runs (only `proxy_on_memory_allocate`, which does
    /// not touch it), so a borrow is always free; if it were not, the call
    /// is skipped rather than trap.
    static WORKER: RefCell<Worker> = RefCell::new(Worker::new());
}

fn with_worker<T>(call: impl FnOnce(&mut Worker) -> T) -> Option<T> {
    WORKER.with(|cell| {
        cell.try_borrow_mut()
            .ok()
            .map(|mut worker| call(&mut worker))
    })
}

/// Envoy, through the raw host calls.
struct Envoy;

impl SharedStore for Envoy {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        hostcalls::shared_data(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        if hostcalls::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(())
        } else {
            Err(CasMismatch)
        }
    }
}

impl Host for Envoy {
    fn now_ms(&self) -> u64 {
        hostcalls::now_ms()
    }

    fn random_u64(&self) -> Option<u64> {
        hostcalls::random_u64()
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        hostcalls::plugin_configuration()
    }

    fn set_tick_period_ms(&self, period_ms: u32) {
        hostcalls::set_tick_period_ms(period_ms);
    }

    fn request_header_pairs(&self) -> Vec<u8> {
        hostcalls::request_header_pairs()
    }

    fn set_request_header(&self, name: &str, value: &[u8]) {
        hostcalls::set_request_header(name, value);
    }

    fn remove_request_header(&self, name: &str) {
        hostcalls::remove_request_header(name);
    }

    fn clear_route_cache(&self) -> bool {
        hostcalls::clear_route_cache()
    }

    fn response_header_pairs(&self) -> Vec<u8> {
        hostcalls::response_header_pairs()
    }

    fn integer_property(&self, property: Property) -> Option<u64> {
        // Property paths, their segments joined by NUL as the ABI wants.
        let path: &[u8] = match property {
            Property::ResponseCode => b"response\0code",
            Property::ResponseFlags => b"response\0flags",
            Property::AttemptCount => b"upstream\0request_attempt_count",
            Property::GrpcStatus => b"response\0grpc_status",
        };
        hostcalls::integer_property(path)
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) {
        hostcalls::send_local_response(status, headers, body, grpc_status);
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => hostcalls::METRIC_COUNTER,
            MetricKind::Gauge => hostcalls::METRIC_GAUGE,
        };
        hostcalls::define_metric(kind, name)
    }

    fn increment_metric(&self, id: u32, offset: i64) {
        hostcalls::increment_metric(id, offset);
    }

    fn record_metric(&self, id: u32, value: u64) {
        hostcalls::record_metric(id, value);
    }
}
