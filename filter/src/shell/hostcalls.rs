//! The host calls Sluice makes, declared here rather than taken from the
//! SDK's `hostcalls`, which panics (traps the VM) on any status it did not
//! expect. Every status is handled: an error degrades to "absent" or "not
//! done", never to a trap. Statuses and enums travel as plain `u32`, so an
//! unknown value from a future host is just an unknown number.
//!
//! Buffers the host returns are allocated through the module's
//! `proxy_on_memory_allocate` (the SDK's allocator: a boxed `[u8]` of exactly
//! the requested size), so they are reclaimed as `Vec<u8>` of that size.

#![allow(unsafe_code)]

use std::ptr::null_mut;

/// `Status::Ok` of the proxy-wasm ABI.
const OK: u32 = 0;
/// `Status::NotFound`: e.g. a foreign function the host does not have.
const NOT_FOUND: u32 = 1;
/// `Status::Unimplemented`.
const UNIMPLEMENTED: u32 = 12;

const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
pub const LOG_TRACE: u32 = 0;
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_GAUGE: u32 = 1;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

// Same symbols as the SDK's declarations, with `u32` in place of its enums
// (identical at the Wasm ABI level).
#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        return_results_data: *mut *mut u8,
        return_results_size: *mut usize,
    ) -> u32;
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buffer: *mut u8, length: usize) -> i32;
}

/// Eight random bytes from the host (WASI `random_get`, which Envoy
/// provides); `None` if it refused.
pub fn random_u64() -> Option<u64> {
    let mut bytes = [0u8; 8];
    // SAFETY: `bytes` outlives the call and is 8 bytes long.
    let errno = unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) };
    (errno == 0).then(|| u64::from_le_bytes(bytes))
}

/// Takes ownership of a buffer the host allocated for us.
fn take_buffer(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes through
    // `proxy_on_memory_allocate`, which hands out a boxed slice of exactly
    // `size` bytes and gives up ownership; nothing else refers to it.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

pub fn log(level: u32, message: &str) {
    // SAFETY: the message is a live slice for the duration of the call.
    let _ = unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// Wall-clock milliseconds since the Unix epoch; 0 if the host refused.
pub fn now_ms() -> u64 {
    let mut nanos: u64 = 0;
    // SAFETY: `nanos` outlives the call.
    match unsafe { proxy_get_current_time_nanoseconds(&mut nanos) } {
        OK => nanos / 1_000_000,
        _ => 0,
    }
}

pub fn set_tick_period_ms(period_ms: u32) {
    // SAFETY: plain value arguments.
    let _ = unsafe { proxy_set_tick_period_milliseconds(period_ms) };
}

/// The plugin configuration bytes (empty if the host has none).
pub fn plugin_configuration() -> Vec<u8> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: out-pointers outlive the call; the buffer is taken over below.
    let status = unsafe {
        proxy_get_buffer_bytes(
            BUFFER_PLUGIN_CONFIGURATION,
            0,
            usize::MAX,
            &mut data,
            &mut size,
        )
    };
    let buffer = take_buffer(data, size);
    if status == OK {
        buffer
    } else {
        Vec::new()
    }
}

/// Every header of a map, serialised by the host: one call instead of one
/// per header, and parsed in place by `HeaderPairs` without copying. Empty
/// when the map is not available.
fn header_pairs(map_type: u32) -> Vec<u8> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `plugin_configuration`.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    let buffer = take_buffer(data, size);
    if status == OK {
        buffer
    } else {
        Vec::new()
    }
}

/// Every request header (see `header_pairs`).
pub fn request_header_pairs() -> Vec<u8> {
    header_pairs(REQUEST_HEADERS)
}

/// Every response header (see `header_pairs`): `:status`, `grpc-status` and
/// `x-envoy-attempt-count` in one call, where reading each would cost a
/// call and an allocation.
pub fn response_header_pairs() -> Vec<u8> {
    header_pairs(RESPONSE_HEADERS)
}

/// Sets a request header to one value (replacing every existing one).
pub fn set_request_header(name: &str, value: &[u8]) {
    // SAFETY: live slices for the duration of the call.
    let _ = unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

/// Removes every value of a request header.
pub fn remove_request_header(name: &str) {
    // SAFETY: live slice for the duration of the call.
    let _ = unsafe { proxy_remove_header_map_value(REQUEST_HEADERS, name.as_ptr(), name.len()) };
}

/// A property; `path` is its segments, each followed by a NUL byte
/// (`"response\0code\0"`), as the ABI wants them.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `plugin_configuration`.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    let buffer = take_buffer(data, size);
    (status == OK).then_some(buffer)
}

/// An integer property (8 little-endian bytes, as Envoy encodes them).
pub fn integer_property(path: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = property(path)?.as_slice().try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// A shared-data value and its CAS token.
pub fn shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: as in `plugin_configuration`.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    let buffer = take_buffer(data, size);
    (status == OK).then_some((buffer, cas))
}

/// Writes shared data if `cas` (0: unconditionally) still matches.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> bool {
    // SAFETY: live slices for the duration of the call.
    let status =
        unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
    status == OK
}

/// Answers the request locally with `status`, `headers` and `body`; with a
/// `grpc_status` (0-16) a gRPC request gets a trailers-only gRPC answer.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
    grpc_status: Option<u32>,
) {
    // -1: none (Envoy takes anything outside 0-16 as none).
    let grpc_status = grpc_status
        .and_then(|code| i32::try_from(code).ok())
        .unwrap_or(-1);
    let headers: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    let serialized = crate::pairs::serialize(&headers);
    let details = b"sluice_circuit_breaker_open";
    // SAFETY: live slices for the duration of the call.
    let _ = unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            serialized.as_ptr(),
            serialized.len(),
            grpc_status,
        )
    };
}

pub fn define_metric(metric_type: u32, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: live slice and out-pointer for the duration of the call.
    let status = unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, offset: i64) {
    // SAFETY: plain value arguments.
    let _ = unsafe { proxy_increment_metric(id, offset) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: plain value arguments.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// Envoy's foreign function `clear_route_cache` (empty argument, no result):
/// the route is selected again when next asked for. False when the host has
/// no such function (NotFound, or Unimplemented); true otherwise.
pub fn clear_route_cache() -> bool {
    let name = b"clear_route_cache";
    let arguments: [u8; 0] = [];
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: live slices and out-pointers for the duration of the call; a
    // result the host allocated is taken over and freed below.
    let status = unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            arguments.as_ptr(),
            arguments.len(),
            &mut data,
            &mut size,
        )
    };
    drop(take_buffer(data, size));
    status != NOT_FOUND && status != UNIMPLEMENTED
}
