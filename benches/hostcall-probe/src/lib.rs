//! Prices the host calls a filter can make, in Envoy: the plugin
//! configuration `"<kind>:<n>"` makes the module do `n` calls of one kind per
//! request, and `benches/hostcalls.sh` compares Envoy's CPU per request
//! against `"none:0"`. The kinds: `clock`, `hvalue` (one request header,
//! with the host's `malloc` callback), `pairs` (all request headers),
//! `setpairs` (read all headers and write them back whole), `replace` (one
//! header), `sget`/`sset` (200 bytes of shared data), `metric` (a counter
//! increment), and at the response headers `prop` (the attempt count) and
//! `propflags` (the response flags). Two kinds price what Envoy does with
//! the headers rather than the calls: `retryheaders` writes the four retry
//! headers Sluice writes (`x-envoy-max-retries: 2`, `x-envoy-retry-on`, the
//! per-try and the upstream timeout), `plainheaders` four headers Envoy
//! ignores; `n` times each. `clearroute` calls Envoy's foreign function
//! `clear_route_cache` (what Sluice calls once per changed request). `sluice` makes, once per request, exactly the
//! host calls Sluice makes for a request of the load benchmark (all request
//! headers, the clock, a read and a write of 260 bytes of shared data, the
//! steering header and the four retry headers; the attempt count and the
//! status at the response headers; the response flags at the log) with
//! fixed values and no policy: the floor of any proxy-wasm filter that asks
//! Envoy for what Sluice asks. For pricing its parts, `n` (default 15) is a
//! mask of what it does beyond the header read, clock and steering header:
//! 1 the shared data, 2 the retry headers, 4 the response-header reads, 8 the
//! flags read at the log. `sluicelean` makes the calls of Sluice's common
//! path since issue 13 (the realistic config: all request headers and the
//! clock at the request headers, all response headers at the response
//! headers; nothing else): the floor of today's Sluice.
//!
//! ```sh
//! bash benches/hostcalls.sh
//! ```

// Built only for wasm32, like the filter glue in `sluice`.
#![cfg(target_arch = "wasm32")]
#![allow(unsafe_code)]

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ptr::null_mut;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, size: usize) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        arguments: *const u8,
        arguments_size: usize,
        results: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    None,
    Clock,
    HeaderValue,
    Pairs,
    SetPairs,
    Replace,
    AttemptsProperty,
    FlagsProperty,
    SharedGet,
    SharedSet,
    Metric,
    RetryHeaders,
    PlainHeaders,
    SluiceCalls,
    SluiceLean,
    ClearRouteCache,
}

const RETRY_HEADERS: [(&[u8], &[u8]); 4] = [
    (b"x-envoy-max-retries", b"2"),
    (
        b"x-envoy-retry-on",
        b"5xx,reset,connect-failure,refused-stream",
    ),
    (b"x-envoy-upstream-rq-per-try-timeout-ms", b"1000"),
    (b"x-envoy-upstream-rq-timeout-ms", b"5000"),
];

const PLAIN_HEADERS: [(&[u8], &[u8]); 4] = [
    (b"x-probe-max-retries", b"2"),
    (
        b"x-probe-retry-on",
        b"5xx,reset,connect-failure,refused-stream",
    ),
    (b"x-probe-per-try-timeout-ms", b"1000"),
    (b"x-probe-timeout-ms", b"5000"),
];

thread_local! {
    /// The configured kind and its `n`: calls per request, or for `sluice`
    /// the mask of its parts.
    static PLAN: Cell<(Kind, u32)> = const { Cell::new((Kind::None, 0)) };
    static METRIC: Cell<u32> = const { Cell::new(0) };
}

const SHARED_KEY: &[u8] = b"sluice-probe";
const SHARED_VALUE: [u8; 200] = [7; 200];
/// About the size of Sluice's retry budget state (10 one-second slots).
const BUDGET_VALUE: [u8; 260] = [7; 260];
const STEERING_HEADER: &[u8] = b"x-sluice-cluster";
/// The parts of `sluice:<mask>`.
const SLUICE_SHARED: u32 = 1;
const SLUICE_RETRY_HEADERS: u32 = 2;
const SLUICE_RESPONSE_READS: u32 = 4;
const SLUICE_LOG_READ: u32 = 8;
const SLUICE_ALL: u32 = 15;
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;

/// Frees a buffer the host allocated through `proxy_on_memory_allocate`.
fn release(data: *mut u8, size: usize) {
    if !data.is_null() {
        // SAFETY: allocated below as a boxed slice of exactly `size` bytes.
        drop(unsafe { Vec::from_raw_parts(data, size, size) });
    }
}

fn clock() {
    let mut time = 0;
    // SAFETY: `time` outlives the call.
    unsafe { proxy_get_current_time_nanoseconds(&mut time) };
}

/// Reads one header of `map` (the host's `malloc` callback included).
fn header_value(map: u32, name: &[u8]) {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    release(data, size);
}

/// Reads every request header (the host's `malloc` callback included).
fn request_header_pairs() {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: out-pointers outlive the call.
    unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size) };
    release(data, size);
}

fn replace_request_header(name: &[u8], value: &[u8]) {
    // SAFETY: live slices for the duration of the call.
    unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

/// Reads the probe's shared data; returns its CAS.
fn shared_get() -> u32 {
    let (mut data, mut size, mut cas) = (null_mut(), 0, 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    unsafe {
        proxy_get_shared_data(
            SHARED_KEY.as_ptr(),
            SHARED_KEY.len(),
            &mut data,
            &mut size,
            &mut cas,
        )
    };
    release(data, size);
    cas
}

fn shared_set(value: &[u8], cas: u32) {
    // SAFETY: live slices for the duration of the call.
    unsafe {
        proxy_set_shared_data(
            SHARED_KEY.as_ptr(),
            SHARED_KEY.len(),
            value.as_ptr(),
            value.len(),
            cas,
        )
    };
}

/// Envoy's foreign function `clear_route_cache`, as Sluice calls it.
fn clear_route_cache() {
    let name = b"clear_route_cache";
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            name.as_ptr(),
            0,
            &mut data,
            &mut size,
        )
    };
    release(data, size);
}

fn property(path: &[u8]) {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    release(data, size);
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer: Box<[MaybeUninit<u8>]> = Box::new_uninit_slice(size);
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root: u32, _size: usize) -> u32 {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: out-pointers outlive the call; the buffer is taken over.
    unsafe { proxy_get_buffer_bytes(7, 0, usize::MAX, &mut data, &mut size) };
    let config = if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: as in `release`.
        unsafe { Vec::from_raw_parts(data, size, size) }
    };
    let text = String::from_utf8_lossy(&config);
    let mut parts = text.trim().split(':');
    let kind = match parts.next().unwrap_or_default() {
        "clock" => Kind::Clock,
        "hvalue" => Kind::HeaderValue,
        "pairs" => Kind::Pairs,
        "setpairs" => Kind::SetPairs,
        "replace" => Kind::Replace,
        "prop" => Kind::AttemptsProperty,
        "propflags" => Kind::FlagsProperty,
        "sget" => Kind::SharedGet,
        "sset" => Kind::SharedSet,
        "metric" => Kind::Metric,
        "retryheaders" => Kind::RetryHeaders,
        "plainheaders" => Kind::PlainHeaders,
        "sluice" => Kind::SluiceCalls,
        "sluicelean" => Kind::SluiceLean,
        "clearroute" => Kind::ClearRouteCache,
        _ => Kind::None,
    };
    let default_count = if kind == Kind::SluiceCalls {
        SLUICE_ALL
    } else {
        0
    };
    let count = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default_count);
    PLAN.with(|plan| plan.set((kind, count)));
    let name = b"sluice_probe.calls";
    let mut id = 0;
    // SAFETY: live slice and out-pointer for the duration of the call.
    unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) };
    shared_set(&SHARED_VALUE, 0);
    METRIC.with(|metric| metric.set(id));
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context: u32, _parent: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _eos: u32) -> u32 {
    let (kind, count) = PLAN.with(Cell::get);
    if kind == Kind::SluiceCalls {
        sluice_request_calls(count);
        return 0;
    }
    if kind == Kind::SluiceLean {
        request_header_pairs();
        clock();
        return 0;
    }
    for _ in 0..count {
        match kind {
            Kind::Clock => clock(),
            Kind::HeaderValue => header_value(REQUEST_HEADERS, b":path"),
            Kind::Pairs => request_header_pairs(),
            Kind::SetPairs => {
                let (mut data, mut size) = (null_mut(), 0);
                // SAFETY: out-pointers outlive the first call; the buffer
                // it returned is live for the second, then released.
                unsafe {
                    proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size);
                    proxy_set_header_map_pairs(REQUEST_HEADERS, data, size);
                }
                release(data, size);
            }
            Kind::Replace => replace_request_header(b"x-probe", b"1"),
            Kind::SharedGet => {
                shared_get();
            }
            Kind::SharedSet => shared_set(&SHARED_VALUE, 0),
            Kind::Metric => {
                // SAFETY: plain value arguments.
                unsafe { proxy_increment_metric(METRIC.with(Cell::get), 1) };
            }
            Kind::RetryHeaders => RETRY_HEADERS
                .iter()
                .for_each(|(name, value)| replace_request_header(name, value)),
            Kind::PlainHeaders => PLAIN_HEADERS
                .iter()
                .for_each(|(name, value)| replace_request_header(name, value)),
            Kind::ClearRouteCache => clear_route_cache(),
            Kind::None
            | Kind::AttemptsProperty
            | Kind::FlagsProperty
            | Kind::SluiceCalls
            | Kind::SluiceLean => {}
        }
    }
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(_context: u32, _headers: usize, _eos: u32) -> u32 {
    let (kind, count) = PLAN.with(Cell::get);
    if kind == Kind::SluiceCalls {
        if count & SLUICE_RESPONSE_READS == 0 {
            return 0;
        }
        property(b"upstream\0request_attempt_count");
        header_value(RESPONSE_HEADERS, b":status");
        return 0;
    }
    if kind == Kind::SluiceLean {
        let (mut data, mut size) = (null_mut(), 0);
        // SAFETY: out-pointers outlive the call.
        unsafe { proxy_get_header_map_pairs(RESPONSE_HEADERS, &mut data, &mut size) };
        release(data, size);
        return 0;
    }
    let path: &[u8] = match kind {
        Kind::AttemptsProperty => b"upstream\0request_attempt_count",
        Kind::FlagsProperty => b"response\0flags",
        _ => return 0,
    };
    for _ in 0..count {
        property(path);
    }
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context: u32) {
    let (kind, mask) = PLAN.with(Cell::get);
    if kind == Kind::SluiceCalls && mask & SLUICE_LOG_READ != 0 {
        property(b"response\0flags");
    }
}

/// Sluice's request-side host calls for a routed request of the load
/// benchmark, with fixed values (every request to the stable cluster).
fn sluice_request_calls(mask: u32) {
    request_header_pairs();
    clock();
    if mask & SLUICE_SHARED != 0 {
        let cas = shared_get();
        shared_set(&BUDGET_VALUE, cas);
    }
    if mask & SLUICE_RETRY_HEADERS != 0 {
        for (name, value) in RETRY_HEADERS {
            replace_request_header(name, value);
        }
    }
    replace_request_header(STEERING_HEADER, b"shop_v1");
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context: u32) {}
