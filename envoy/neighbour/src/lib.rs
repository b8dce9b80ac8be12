//! Sluice's neighbour: a second, unrelated proxy-wasm HTTP filter that uses
//! shared data, for `envoy/tests/shared_vm.rs`. Run with `vm_id: ""` next to
//! Sluice (as Istio runs every WasmPlugin of a proxy), it shares Sluice's
//! shared-data namespace, and shows from inside it that the two plugins'
//! keys do not collide.
//!
//! - Its plugin configuration is the name of its one key (default
//!   `neighbour/requests`). Every request increments the decimal counter
//!   stored there, with compare-and-swap, so across workers the counter is
//!   exactly the number of requests it saw, unless someone else wrote the
//!   key.
//! - The response carries `x-neighbour-count`: the counter after this
//!   request's increment, or `corrupt` (the key holds something that is not
//!   its counter: another plugin wrote it), or `contended`/`refused`.
//! - A request with `x-neighbour-peek: KEY` also gets
//!   `x-neighbour-peek: <length of KEY's value>` (or `absent`): the test
//!   uses it to see Sluice's keys from the neighbour's side of the
//!   namespace. It only reads them.
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1 -p sluice-neighbour
//! ```

#![cfg(target_arch = "wasm32")]
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::ptr::null_mut;

#[link(wasm_import_module = "env")]
extern "C" {
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
    fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
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
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;
const REQUEST_HEADERS: u32 = 0;
const RESPONSE_HEADERS: u32 = 2;
const PLUGIN_CONFIGURATION: u32 = 7;
const DEFAULT_KEY: &[u8] = b"neighbour/requests";

thread_local! {
    static KEY: RefCell<Vec<u8>> = RefCell::new(DEFAULT_KEY.to_vec());
    /// Per stream: the count and the peek to answer with.
    static SEEN: RefCell<HashMap<u32, (String, Option<String>)>> = RefCell::new(HashMap::new());
}

/// Takes over a buffer the host allocated through `proxy_on_memory_allocate`.
fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: allocated by `proxy_on_memory_allocate` as a boxed slice of
    // exactly `size` bytes; the host gave up ownership.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// A shared-data value and its CAS, or the status.
fn shared_get(key: &[u8]) -> Result<(Vec<u8>, u32), u32> {
    let (mut data, mut size, mut cas) = (null_mut(), 0, 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    let value = take(data, size);
    if status == OK {
        Ok((value, cas))
    } else {
        Err(status)
    }
}

fn shared_set(key: &[u8], value: &[u8], cas: u32) -> u32 {
    // SAFETY: live slices for the duration of the call.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

fn request_header(name: &[u8]) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0);
    // SAFETY: live slice and out-pointers for the duration of the call.
    let status = unsafe {
        proxy_get_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        )
    };
    let value = take(data, size);
    (status == OK).then_some(value)
}

fn add_response_header(name: &[u8], value: &[u8]) {
    // SAFETY: live slices for the duration of the call.
    unsafe {
        proxy_add_header_map_value(
            RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

/// Adds one to the counter under `key`, with CAS; the new value, or why not.
fn increment(key: &[u8]) -> String {
    for _ in 0..32 {
        let (current, cas) = match shared_get(key) {
            Ok(found) => found,
            Err(NOT_FOUND) => (b"0".to_vec(), 0),
            Err(_) => return "refused".to_string(),
        };
        let Some(count) = std::str::from_utf8(&current)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
        else {
            return "corrupt".to_string();
        };
        let next = count.saturating_add(1).to_string();
        // CAS 0 (the key did not exist) writes unconditionally: two workers'
        // very first requests may race there, which the test avoids by
        // sending one request before it counts.
        match shared_set(key, next.as_bytes(), cas) {
            OK => return next,
            CAS_MISMATCH => continue,
            _ => return "refused".to_string(),
        }
    }
    "contended".to_string()
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
    unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, &mut data, &mut size) };
    let config = take(data, size);
    let key = config.trim_ascii();
    if !key.is_empty() {
        KEY.with(|k| *k.borrow_mut() = key.to_vec());
    }
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context: u32, _parent: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context: u32, _headers: usize, _eos: u32) -> u32 {
    let count = KEY.with(|key| increment(&key.borrow()));
    let peek = request_header(b"x-neighbour-peek").map(|peeked| match shared_get(&peeked) {
        Ok((value, _)) => value.len().to_string(),
        Err(_) => "absent".to_string(),
    });
    SEEN.with(|seen| seen.borrow_mut().insert(context, (count, peek)));
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context: u32, _headers: usize, _eos: u32) -> u32 {
    if let Some((count, peek)) = SEEN.with(|seen| seen.borrow_mut().remove(&context)) {
        add_response_header(b"x-neighbour-count", count.as_bytes());
        if let Some(peek) = peek {
            add_response_header(b"x-neighbour-peek", peek.as_bytes());
        }
    }
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context: u32) {
    SEEN.with(|seen| seen.borrow_mut().remove(&context));
}
