//! Every host function Envoy 1.40 links into a Proxy-Wasm module: the
//! `env.proxy_*` ABI (proxy-wasm-cpp-host `src/exports.cc`), Envoy's own
//! `env.envoy_resolve_dns`, the two Emscripten helpers, and the WASI preview1
//! subset proxy-wasm-cpp-host implements (registered under both
//! `wasi_snapshot_preview1` and `wasi_unstable`, with the same signatures —
//! including its 6-argument `path_link` and 4-argument `path_symlink`).
//!
//! Each function validates guest pointers like `WasmVm::getMemory`/`setWord`
//! (out of bounds → `INVALID_MEMORY_ACCESS`, or `EFAULT` for WASI) and
//! returns buffers through the module's allocator like `copyToPointerSize`.

use crate::abi::{
    deserialize_pairs, serialize_pairs, BufferType, LogLevel, MapType, MetricType, Status,
    StreamType,
};
use crate::engine::AbiVersion;
use crate::headers::{HeaderMap, HeaderMapKind};
use crate::proxy::{HttpCall, LogSource, Metric, Queue};
use crate::stream::LocalReply;
use crate::vm::{AfterCall, CtxKind, HostState, PendingCall, RootState, Timer, MALLOC_ALLOWED};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;
use wasmtime::{Caller, Engine, FuncType, Linker, ValType};

type C<'a> = Caller<'a, HostState>;
type R = wasmtime::Result<i32>;

const OK: i32 = Status::Ok as i32;
const NOT_FOUND: i32 = Status::NotFound as i32;
const BAD_ARGUMENT: i32 = Status::BadArgument as i32;
const PARSE_FAILURE: i32 = Status::ParseFailure as i32;
const IMA: i32 = Status::InvalidMemoryAccess as i32;
const EMPTY: i32 = Status::Empty as i32;
const UNIMPLEMENTED: i32 = Status::Unimplemented as i32;

const WASI_SUCCESS: i32 = 0;
const WASI_BADF: i32 = 8;
const WASI_NOTDIR: i32 = 20;
const WASI_FAULT: i32 = 21;
const WASI_INVAL: i32 = 28;
const WASI_NOENT: i32 = 44;
const WASI_NOSYS: i32 = 52;
const WASI_NOTSUP: i32 = 58;

/// Signatures of everything we link, for the pre-instantiation import check.
type Sigs = HashMap<(String, String), &'static str>;

struct Linked {
    linker: Linker<HostState>,
    sigs: Sigs,
}

/// The linker for an ABI version, built once per process.
pub(crate) fn linker(engine: &Engine, abi: AbiVersion) -> Result<Linker<HostState>, String> {
    Ok(linked(engine, abi)?.linker.clone())
}

fn linked(engine: &Engine, abi: AbiVersion) -> Result<&'static Linked, String> {
    static V020: OnceLock<Result<Linked, String>> = OnceLock::new();
    static V021: OnceLock<Result<Linked, String>> = OnceLock::new();
    let cell = match abi {
        AbiVersion::V0_2_0 => &V020,
        AbiVersion::V0_2_1 => &V021,
    };
    cell.get_or_init(|| build(engine, abi))
        .as_ref()
        .map_err(Clone::clone)
}

/// The host's signature for `module.name` under `abi`, if Envoy provides it.
pub(crate) fn signature(
    engine: &Engine,
    abi: AbiVersion,
    module: &str,
    name: &str,
) -> Option<FuncType> {
    let l = linked(engine, abi).ok()?;
    l.sigs
        .get(&(module.to_owned(), name.to_owned()))
        .map(|sig| parse_sig(engine, sig))
}

fn parse_sig(engine: &Engine, sig: &str) -> FuncType {
    let (p, r) = sig.split_once('>').unwrap_or((sig, ""));
    let ty = |c: char| if c == 'I' { ValType::I64 } else { ValType::I32 };
    FuncType::new(engine, p.chars().map(ty), r.chars().map(ty))
}

macro_rules! host {
    ($l:expr, $sigs:expr, $module:expr, $name:expr, $sig:expr, $f:expr) => {{
        $sigs.insert(($module.to_string(), $name.to_string()), $sig);
        $l.func_wrap($module, $name, $f)
            .map_err(|e| format!("registering {}.{}: {e:?}", $module, $name))?;
    }};
}

// ---------------------------------------------------------------------------
// Memory helpers.

fn u(v: i32) -> u32 {
    v as u32
}

fn n(v: usize) -> i32 {
    u32::try_from(v).unwrap_or(u32::MAX) as i32
}

/// `WasmVm::setRestrictedCallback` check (V8 traps with "restricted_callback").
fn enter(c: &C, module: &str, name: &str) -> wasmtime::Result<()> {
    if let Some(allowed) = c.data().restricted {
        let ok = if module == "env" {
            allowed.iter().any(|a| a.strip_prefix("env.") == Some(name))
        } else {
            allowed.contains(&name)
        };
        if !ok {
            return Err(wasmtime::Error::msg(format!(
                "restricted_callback: {module}.{name} may not be called from _initialize/main \
                 or from the allocator (Envoy's V8 runtime traps here)"
            )));
        }
    }
    Ok(())
}

fn read(c: &C, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = c.data().memory?;
    let start = u(ptr) as usize;
    let end = start.checked_add(u(len) as usize)?;
    mem.data(c).get(start..end).map(<[u8]>::to_vec)
}

fn write(c: &mut C, ptr: u32, bytes: &[u8]) -> bool {
    let Some(mem) = c.data().memory else {
        return false;
    };
    let start = ptr as usize;
    let Some(end) = start.checked_add(bytes.len()) else {
        return false;
    };
    match mem.data_mut(c).get_mut(start..end) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn write_u32(c: &mut C, ptr: i32, v: u32) -> bool {
    write(c, u(ptr), &v.to_le_bytes())
}

fn write_u64(c: &mut C, ptr: i32, v: u64) -> bool {
    write(c, u(ptr), &v.to_le_bytes())
}

/// `WasmBase::allocMemory`: calls `malloc`/`proxy_on_memory_allocate` in the
/// VM context with only logging/clock allowed; `None` if it returned 0 or a
/// block outside memory. A trap inside the allocator propagates.
fn alloc(c: &mut C, size: usize) -> wasmtime::Result<Option<u32>> {
    let Some(malloc) = c.data().malloc.clone() else {
        return Ok(None);
    };
    let saved = {
        let st = c.data_mut();
        let saved = (st.restricted, st.current, st.effective);
        st.restricted = Some(MALLOC_ALLOWED);
        st.current = 0;
        st.effective = 0;
        saved
    };
    let result = malloc.call(&mut *c, n(size));
    {
        let st = c.data_mut();
        st.restricted = saved.0;
        st.current = saved.1;
        st.effective = saved.2;
    }
    let addr = u(result?);
    if addr == 0 {
        return Ok(None);
    }
    let in_bounds = c.data().memory.is_some_and(|m| {
        (addr as usize)
            .checked_add(size)
            .is_some_and(|end| end <= m.data_size(&*c))
    });
    Ok(in_bounds.then_some(addr))
}

/// `WasmBase::copyToPointerSize`: empty → (0, 0) without allocating.
fn copy_out(c: &mut C, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> wasmtime::Result<bool> {
    let mut pointer = 0u32;
    if !bytes.is_empty() {
        match alloc(c, bytes.len())? {
            Some(p) if write(c, p, bytes) => pointer = p,
            _ => return Ok(false),
        }
    }
    Ok(write_u32(c, ptr_ptr, pointer)
        && write_u32(c, size_ptr, u32::try_from(bytes.len()).unwrap_or(u32::MAX)))
}

fn status_of(ok: bool) -> i32 {
    if ok {
        OK
    } else {
        IMA
    }
}

// ---------------------------------------------------------------------------
// Header maps (`Context::getMap` / `getConstMap`).

fn const_map(st: &HostState, t: MapType) -> Option<HeaderMap> {
    match t {
        MapType::HttpCallResponseHeaders => {
            return st.call_response.as_ref().map(|r| r.headers.clone())
        }
        MapType::HttpCallResponseTrailers => {
            return st.call_response.as_ref().map(|r| r.trailers.clone())
        }
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => return None,
        _ => {}
    }
    let h = st.http_ref(st.context_id())?;
    let (map, live) = match t {
        MapType::RequestHeaders => (&h.request_headers, h.request_headers_live || h.access_log),
        // Envoy does not expose request trailers in the access-log phase.
        MapType::RequestTrailers => (
            &h.request_trailers,
            h.request_trailers_live && !h.access_log,
        ),
        MapType::ResponseHeaders => (&h.response_headers, h.response_headers_live || h.access_log),
        MapType::ResponseTrailers => (
            &h.response_trailers,
            h.response_trailers_live || h.access_log,
        ),
        _ => return None,
    };
    map.as_ref().filter(|_| live).cloned()
}

fn with_map<T>(
    st: &mut HostState,
    t: MapType,
    modifies: bool,
    f: impl FnOnce(&mut HeaderMap) -> T,
) -> Option<T> {
    let id = st.context_id();
    let h = st.http(id)?;
    if h.access_log {
        return None;
    }
    let map = match t {
        MapType::RequestHeaders if h.request_headers_live => h.request_headers.as_mut(),
        MapType::ResponseHeaders if h.response_headers_live => h.response_headers.as_mut(),
        MapType::RequestTrailers => {
            // Trailers can be added from the last body callback (addDecodedTrailers).
            if h.request_trailers.is_none() && h.request_body_live && h.end_of_stream {
                h.request_trailers = Some(HeaderMap::new(HeaderMapKind::RequestTrailers));
                h.request_trailers_live = true;
            }
            h.request_trailers
                .as_mut()
                .filter(|_| h.request_trailers_live)
        }
        MapType::ResponseTrailers => {
            if h.response_trailers.is_none() && h.response_body_live && h.end_of_stream {
                h.response_trailers = Some(HeaderMap::new(HeaderMapKind::ResponseTrailers));
                h.response_trailers_live = true;
            }
            h.response_trailers
                .as_mut()
                .filter(|_| h.response_trailers_live)
        }
        _ => None,
    }?;
    let out = f(map);
    if modifies && t == MapType::RequestHeaders {
        // Newer Envoy clears the route cache when a plugin changes request headers.
        h.route_cache_clears += 1;
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Buffers (`Context::getBuffer`).

fn buffer(st: &HostState, t: BufferType) -> Option<Vec<u8>> {
    let id = st.context_id();
    match t {
        BufferType::VmConfiguration => Some(st.proxy.config.vm_config.clone()),
        BufferType::PluginConfiguration => match st.contexts.get(&id) {
            Some(CtxKind::Root(r)) if r.configuring => Some(r.plugin_config.clone()),
            _ => None,
        },
        BufferType::HttpRequestBody => Some(
            st.http_ref(id)
                .filter(|h| h.request_body_live)
                .map(|h| h.request_body.clone())
                .unwrap_or_default(),
        ),
        BufferType::HttpResponseBody => Some(
            st.http_ref(id)
                .filter(|h| h.response_body_live)
                .map(|h| h.response_body.clone())
                .unwrap_or_default(),
        ),
        BufferType::HttpCallResponseBody => st.call_response.as_ref().map(|r| r.body.clone()),
        BufferType::DownstreamData
        | BufferType::UpstreamData
        | BufferType::GrpcCallMessage
        | BufferType::CallData => Some(Vec::new()),
    }
}

/// `Buffer::copyFrom` on a live HTTP body; other buffers are immutable.
fn set_buffer(st: &mut HostState, t: BufferType, start: usize, length: usize, data: &[u8]) -> i32 {
    let id = st.context_id();
    let Some(h) = st.http(id) else {
        return BAD_ARGUMENT;
    };
    let body = match t {
        BufferType::HttpRequestBody if h.request_body_live => &mut h.request_body,
        BufferType::HttpResponseBody if h.response_body_live => &mut h.response_body,
        _ => return BAD_ARGUMENT,
    };
    if start == 0 {
        let drain = length.min(body.len());
        body.drain(..drain);
        body.splice(0..0, data.iter().copied());
        OK
    } else if start >= body.len() {
        body.extend_from_slice(data);
        OK
    } else {
        BAD_ARGUMENT
    }
}

// ---------------------------------------------------------------------------

fn build(engine: &Engine, abi: AbiVersion) -> Result<Linked, String> {
    let mut l: Linker<HostState> = Linker::new(engine);
    let mut s: Sigs = HashMap::new();
    env(&mut l, &mut s, abi)?;
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        wasi(&mut l, &mut s, module)?;
    }
    Ok(Linked { linker: l, sigs: s })
}

#[allow(clippy::too_many_lines)]
fn env(l: &mut Linker<HostState>, s: &mut Sigs, abi: AbiVersion) -> Result<(), String> {
    const E: &str = "env";

    host!(l, s, E, "pthread_equal", "ii>i", |a: i32, b: i32| -> i32 {
        i32::from(a == b)
    });
    host!(
        l,
        s,
        E,
        "emscripten_notify_memory_growth",
        "i>",
        |_m: i32| {}
    );

    host!(l, s, E, "proxy_log", "iii>i", |c: C,
                                          level: i32,
                                          ptr: i32,
                                          len: i32|
     -> R {
        enter(&c, E, "proxy_log")?;
        let Some(level) = LogLevel::from_raw(u(level)) else {
            return Ok(BAD_ARGUMENT);
        };
        let Some(msg) = read(&c, ptr, len) else {
            return Ok(IMA);
        };
        c.data().log(
            level,
            LogSource::Plugin,
            String::from_utf8_lossy(&msg).into_owned(),
        );
        Ok(OK)
    });

    if abi == AbiVersion::V0_2_1 {
        host!(l, s, E, "proxy_get_log_level", "i>i", |mut c: C,
                                                      ptr: i32|
         -> R {
            enter(&c, E, "proxy_get_log_level")?;
            let level = c.data().proxy.config.log_level as u32;
            Ok(status_of(write_u32(&mut c, ptr, level)))
        });
    }

    host!(l, s, E, "proxy_get_status", "iii>i", |mut c: C,
                                                 code_ptr: i32,
                                                 pp: i32,
                                                 sp: i32|
     -> R {
        enter(&c, E, "proxy_get_status")?;
        let st = c.data_mut();
        let root = st.root_of(st.context_id());
        let (code, msg) = st.root(root).map(|r| r.status.clone()).unwrap_or_default();
        if !write_u32(&mut c, code_ptr, code) {
            return Ok(IMA);
        }
        Ok(status_of(copy_out(&mut c, &msg, pp, sp)?))
    });

    host!(l, s, E, "proxy_set_property", "iiii>i", |mut c: C,
                                                    kp: i32,
                                                    ks: i32,
                                                    vp: i32,
                                                    vs: i32|
     -> R {
        enter(&c, E, "proxy_set_property")?;
        let (Some(key), Some(value)) = (read(&c, kp, ks), read(&c, vp, vs)) else {
            return Ok(IMA);
        };
        let st = c.data_mut();
        let id = st.context_id();
        match st.http(id) {
            // Stored as CEL filter state "wasm.<path>" (default prototype: bytes).
            Some(h) => {
                h.filter_state.insert(key, value);
                Ok(OK)
            }
            None => Ok(NOT_FOUND),
        }
    });

    host!(l, s, E, "proxy_get_property", "iiii>i", |mut c: C,
                                                    pp: i32,
                                                    ps: i32,
                                                    rp: i32,
                                                    rs: i32|
     -> R {
        enter(&c, E, "proxy_get_property")?;
        let Some(path) = read(&c, pp, ps) else {
            return Ok(IMA);
        };
        match c.data().get_property(&path) {
            Ok(value) => Ok(status_of(copy_out(&mut c, &value, rp, rs)?)),
            Err(status) => Ok(status.code()),
        }
    });

    host!(
        l,
        s,
        E,
        "proxy_send_local_response",
        "iiiiiiii>i",
        |mut c: C,
         code: i32,
         dp: i32,
         ds: i32,
         bp: i32,
         bs: i32,
         hp: i32,
         hs: i32,
         grpc: i32|
         -> R {
            enter(&c, E, "proxy_send_local_response")?;
            let (Some(details), Some(body), Some(pairs)) =
                (read(&c, dp, ds), read(&c, bp, bs), read(&c, hp, hs))
            else {
                return Ok(IMA);
            };
            let headers = deserialize_pairs(&pairs);
            let st = c.data_mut();
            let id = st.context_id();
            if st.http(id).is_some() {
                let reply = LocalReply::new(u(code), &details, &body, headers, grpc);
                st.after_call.push(AfterCall::LocalReply(id, reply));
            }
            st.stop_iteration = true;
            Ok(OK)
        }
    );

    host!(l, s, E, "proxy_get_shared_data", "iiiii>i", |mut c: C,
                                                        kp: i32,
                                                        ks: i32,
                                                        vp: i32,
                                                        vs: i32,
                                                        casp: i32|
     -> R {
        enter(&c, E, "proxy_get_shared_data")?;
        let Some(key) = read(&c, kp, ks) else {
            return Ok(IMA);
        };
        let entry = c.data().proxy.state().shared.entries.get(&key).cloned();
        let Some((value, cas)) = entry else {
            return Ok(NOT_FOUND);
        };
        if !copy_out(&mut c, &value, vp, vs)? {
            return Ok(IMA);
        }
        Ok(status_of(write_u32(&mut c, casp, cas)))
    });

    host!(l, s, E, "proxy_set_shared_data", "iiiii>i", |c: C,
                                                        kp: i32,
                                                        ks: i32,
                                                        vp: i32,
                                                        vs: i32,
                                                        cas: i32|
     -> R {
        enter(&c, E, "proxy_set_shared_data")?;
        let (Some(key), Some(value)) = (read(&c, kp, ks), read(&c, vp, vs)) else {
            return Ok(IMA);
        };
        Ok(c.data()
            .proxy
            .state()
            .shared
            .guest_set(&key, &value, u(cas))
            .code())
    });

    host!(
        l,
        s,
        E,
        "proxy_register_shared_queue",
        "iii>i",
        |mut c: C, np: i32, ns: i32, tp: i32| -> R {
            enter(&c, E, "proxy_register_shared_queue")?;
            let Some(name) = read(&c, np, ns) else {
                return Ok(IMA);
            };
            let st = c.data();
            let root = st.root_of(st.context_id());
            let vm = st.vm_index;
            let token = {
                let mut ps = st.proxy.state();
                let existing = ps
                    .queues
                    .iter()
                    .find(|(_, q)| q.name == name)
                    .map(|(t, _)| *t);
                match existing {
                    Some(t) => {
                        if let Some(q) = ps.queues.get_mut(&t) {
                            q.vm = vm;
                            q.context_id = root;
                        }
                        t
                    }
                    None => {
                        let t = ps.next_queue_token;
                        ps.next_queue_token += 1;
                        ps.queues.insert(
                            t,
                            Queue {
                                name,
                                vm,
                                context_id: root,
                                items: Default::default(),
                            },
                        );
                        t
                    }
                }
            };
            Ok(status_of(write_u32(&mut c, tp, token)))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_resolve_shared_queue",
        "iiiii>i",
        |mut c: C, vp: i32, vs: i32, np: i32, ns: i32, tp: i32| -> R {
            enter(&c, E, "proxy_resolve_shared_queue")?;
            let (Some(vm_id), Some(name)) = (read(&c, vp, vs), read(&c, np, ns)) else {
                return Ok(IMA);
            };
            let st = c.data();
            if !vm_id.is_empty() && vm_id != st.proxy.config.vm_id.as_bytes() {
                return Ok(NOT_FOUND);
            }
            let token = st
                .proxy
                .state()
                .queues
                .iter()
                .find(|(_, q)| q.name == name)
                .map(|(t, _)| *t);
            match token {
                Some(t) => Ok(status_of(write_u32(&mut c, tp, t))),
                None => Ok(NOT_FOUND),
            }
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_dequeue_shared_queue",
        "iii>i",
        |mut c: C, token: i32, dp: i32, ds: i32| -> R {
            enter(&c, E, "proxy_dequeue_shared_queue")?;
            let item = {
                let mut ps = c.data().proxy.state();
                match ps.queues.get_mut(&u(token)) {
                    None => return Ok(NOT_FOUND),
                    Some(q) => q.items.pop_front(),
                }
            };
            match item {
                None => Ok(EMPTY),
                Some(data) => Ok(status_of(copy_out(&mut c, &data, dp, ds)?)),
            }
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_enqueue_shared_queue",
        "iii>i",
        |c: C, token: i32, dp: i32, ds: i32| -> R {
            enter(&c, E, "proxy_enqueue_shared_queue")?;
            let Some(data) = read(&c, dp, ds) else {
                return Ok(IMA);
            };
            let mut ps = c.data().proxy.state();
            let Some(q) = ps.queues.get_mut(&u(token)) else {
                return Ok(NOT_FOUND);
            };
            q.items.push_back(data);
            let target = (q.vm, q.context_id, u(token));
            ps.queue_ready.push_back(target);
            Ok(OK)
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_get_header_map_value",
        "iiiii>i",
        |mut c: C, t: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> R {
            enter(&c, E, "proxy_get_header_map_value")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(key) = read(&c, kp, ks) else {
                return Ok(IMA);
            };
            let st = c.data();
            let Some(map) = const_map(st, t) else {
                let in_log = st.http_ref(st.context_id()).is_some_and(|h| h.access_log);
                return Ok(if in_log { NOT_FOUND } else { BAD_ARGUMENT });
            };
            let Some(value) = map.get_bytes(&key).map(<[u8]>::to_vec) else {
                return Ok(NOT_FOUND);
            };
            Ok(status_of(copy_out(&mut c, &value, vp, vs)?))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_add_header_map_value",
        "iiiii>i",
        |mut c: C, t: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> R {
            enter(&c, E, "proxy_add_header_map_value")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let (Some(key), Some(value)) = (read(&c, kp, ks), read(&c, vp, vs)) else {
                return Ok(IMA);
            };
            Ok(with_map(c.data_mut(), t, true, |m| m.add(&key, &value))
                .map_or(BAD_ARGUMENT, |()| OK))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_replace_header_map_value",
        "iiiii>i",
        |mut c: C, t: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> R {
            enter(&c, E, "proxy_replace_header_map_value")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let (Some(key), Some(value)) = (read(&c, kp, ks), read(&c, vp, vs)) else {
                return Ok(IMA);
            };
            Ok(with_map(c.data_mut(), t, true, |m| m.replace(&key, &value))
                .map_or(BAD_ARGUMENT, |()| OK))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_remove_header_map_value",
        "iii>i",
        |mut c: C, t: i32, kp: i32, ks: i32| -> R {
            enter(&c, E, "proxy_remove_header_map_value")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(key) = read(&c, kp, ks) else {
                return Ok(IMA);
            };
            Ok(with_map(c.data_mut(), t, true, |m| m.remove(&key)).map_or(BAD_ARGUMENT, |_| OK))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_get_header_map_pairs",
        "iii>i",
        |mut c: C, t: i32, pp: i32, sp: i32| -> R {
            enter(&c, E, "proxy_get_header_map_pairs")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            // An unavailable map reads as empty (headerMapToPairs(nullptr)).
            let pairs = const_map(c.data(), t)
                .map(|m| m.raw_pairs().to_vec())
                .unwrap_or_default();
            let bytes = if pairs.is_empty() {
                Vec::new()
            } else {
                serialize_pairs(&pairs)
            };
            Ok(status_of(copy_out(&mut c, &bytes, pp, sp)?))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_set_header_map_pairs",
        "iii>i",
        |mut c: C, t: i32, p: i32, size: i32| -> R {
            enter(&c, E, "proxy_set_header_map_pairs")?;
            let Some(t) = MapType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(data) = read(&c, p, size) else {
                return Ok(IMA);
            };
            let pairs = deserialize_pairs(&data);
            let done = with_map(c.data_mut(), t, true, |m| {
                m.clear();
                for (k, v) in &pairs {
                    m.add(k, v);
                }
            });
            Ok(done.map_or(BAD_ARGUMENT, |()| OK))
        }
    );

    host!(l, s, E, "proxy_get_header_map_size", "ii>i", |mut c: C,
                                                         t: i32,
                                                         rp: i32|
     -> R {
        enter(&c, E, "proxy_get_header_map_size")?;
        let Some(t) = MapType::from_raw(u(t)) else {
            return Ok(BAD_ARGUMENT);
        };
        // Envoy uses the mutable map here: unavailable → BAD_ARGUMENT.
        let size = with_map(c.data_mut(), t, false, |m| m.byte_size());
        match size {
            None => Ok(BAD_ARGUMENT),
            Some(sz) => Ok(status_of(write_u32(
                &mut c,
                rp,
                u32::try_from(sz).unwrap_or(u32::MAX),
            ))),
        }
    });

    host!(l, s, E, "proxy_get_buffer_status", "iii>i", |mut c: C,
                                                        t: i32,
                                                        lp: i32,
                                                        fp: i32|
     -> R {
        enter(&c, E, "proxy_get_buffer_status")?;
        let Some(t) = BufferType::from_raw(u(t)) else {
            return Ok(BAD_ARGUMENT);
        };
        let Some(buf) = buffer(c.data(), t) else {
            return Ok(NOT_FOUND);
        };
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        Ok(status_of(
            write_u32(&mut c, lp, len) && write_u32(&mut c, fp, 0),
        ))
    });

    host!(
        l,
        s,
        E,
        "proxy_get_buffer_bytes",
        "iiiii>i",
        |mut c: C, t: i32, start: i32, len: i32, pp: i32, sp: i32| -> R {
            enter(&c, E, "proxy_get_buffer_bytes")?;
            let Some(t) = BufferType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(buf) = buffer(c.data(), t) else {
                return Ok(NOT_FOUND);
            };
            // Don't overread: clamp to the buffer like Envoy.
            let start = u(start) as usize;
            let end = start.saturating_add(u(len) as usize).min(buf.len());
            let slice = buf.get(start..end).unwrap_or_default();
            Ok(status_of(copy_out(&mut c, slice, pp, sp)?))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_set_buffer_bytes",
        "iiiii>i",
        |mut c: C, t: i32, start: i32, len: i32, dp: i32, ds: i32| -> R {
            enter(&c, E, "proxy_set_buffer_bytes")?;
            let Some(t) = BufferType::from_raw(u(t)) else {
                return Ok(BAD_ARGUMENT);
            };
            if buffer(c.data(), t).is_none() {
                return Ok(NOT_FOUND);
            }
            let Some(data) = read(&c, dp, ds) else {
                return Ok(IMA);
            };
            Ok(set_buffer(
                c.data_mut(),
                t,
                u(start) as usize,
                u(len) as usize,
                &data,
            ))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_http_call",
        "iiiiiiiiii>i",
        |mut c: C,
         up: i32,
         us: i32,
         hp: i32,
         hs: i32,
         bp: i32,
         bs: i32,
         tp: i32,
         ts: i32,
         timeout: i32,
         tokp: i32|
         -> R {
            enter(&c, E, "proxy_http_call")?;
            let (Some(cluster), Some(headers), Some(body), Some(trailers)) = (
                read(&c, up, us),
                read(&c, hp, hs),
                read(&c, bp, bs),
                read(&c, tp, ts),
            ) else {
                return Ok(IMA);
            };
            if !write_u32(&mut c, tokp, 0) {
                return Ok(IMA);
            }
            let cluster = String::from_utf8_lossy(&cluster).into_owned();
            let headers =
                HeaderMap::from_pairs(HeaderMapKind::RequestHeaders, &deserialize_pairs(&headers));
            let st = c.data_mut();
            if timeout < 0 || !st.proxy.config.clusters.contains(&cluster) {
                return Ok(BAD_ARGUMENT);
            }
            if !headers.contains(":path")
                || !headers.contains(":method")
                || !headers.contains(":authority")
            {
                return Ok(BAD_ARGUMENT);
            }
            st.next_http_call_id += 4;
            let token = st.next_http_call_id;
            let root = st.root_of(st.context_id());
            st.http_calls
                .insert(token, PendingCall { context_id: root });
            let call = HttpCall {
                token,
                vm: st.label.clone(),
                cluster,
                headers: headers.pairs(),
                body,
                trailers: deserialize_pairs(&trailers)
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(&k).into_owned(),
                            String::from_utf8_lossy(&v).into_owned(),
                        )
                    })
                    .collect(),
                timeout: Duration::from_millis(u64::from(u(timeout))),
            };
            st.proxy.state().http_calls.push(call);
            Ok(status_of(write_u32(&mut c, tokp, token)))
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_grpc_call",
        "iiiiiiiiiiii>i",
        |c: C,
         sp: i32,
         ss: i32,
         np: i32,
         ns: i32,
         mp: i32,
         ms: i32,
         ip: i32,
         is: i32,
         rp: i32,
         rs: i32,
         _timeout: i32,
         _tokp: i32|
         -> R {
            enter(&c, E, "proxy_grpc_call")?;
            if [(sp, ss), (np, ns), (mp, ms), (ip, is), (rp, rs)]
                .iter()
                .any(|(p, l)| read(&c, *p, *l).is_none())
            {
                return Ok(IMA);
            }
            // No gRPC services/clusters are modelled: Envoy answers PARSE_FAILURE
            // for a service that is neither a GrpcService proto nor a known cluster.
            Ok(PARSE_FAILURE)
        }
    );

    host!(l, s, E, "proxy_grpc_stream", "iiiiiiiii>i", |c: C,
                                                        sp: i32,
                                                        ss: i32,
                                                        np: i32,
                                                        ns: i32,
                                                        mp: i32,
                                                        ms: i32,
                                                        ip: i32,
                                                        is: i32,
                                                        _tokp: i32|
     -> R {
        enter(&c, E, "proxy_grpc_stream")?;
        if [(sp, ss), (np, ns), (mp, ms), (ip, is)]
            .iter()
            .any(|(p, l)| read(&c, *p, *l).is_none())
        {
            return Ok(IMA);
        }
        Ok(PARSE_FAILURE)
    });

    // Callout ids carry their kind in the low two bits (0 http, 1 grpc call, 2 grpc stream).
    host!(l, s, E, "proxy_grpc_close", "i>i", |c: C,
                                               token: i32|
     -> R {
        enter(&c, E, "proxy_grpc_close")?;
        Ok(if matches!(u(token) & 3, 1 | 2) {
            NOT_FOUND
        } else {
            BAD_ARGUMENT
        })
    });
    host!(l, s, E, "proxy_grpc_cancel", "i>i", |c: C,
                                                token: i32|
     -> R {
        enter(&c, E, "proxy_grpc_cancel")?;
        Ok(if matches!(u(token) & 3, 1 | 2) {
            NOT_FOUND
        } else {
            BAD_ARGUMENT
        })
    });
    host!(l, s, E, "proxy_grpc_send", "iiii>i", |c: C,
                                                 token: i32,
                                                 mp: i32,
                                                 ms: i32,
                                                 _eos: i32|
     -> R {
        enter(&c, E, "proxy_grpc_send")?;
        if read(&c, mp, ms).is_none() {
            return Ok(IMA);
        }
        Ok(if u(token) & 3 == 2 {
            NOT_FOUND
        } else {
            BAD_ARGUMENT
        })
    });

    host!(
        l,
        s,
        E,
        "proxy_set_tick_period_milliseconds",
        "i>i",
        |mut c: C, period: i32| -> R {
            enter(&c, E, "proxy_set_tick_period_milliseconds")?;
            let st = c.data_mut();
            // Timers belong to the root context (ContextBase::setTimerPeriod).
            let root = st.root_of(st.context_id());
            let period_ns = u64::from(u(period)) * 1_000_000;
            if period_ns == 0 {
                st.timers.remove(&root);
            } else {
                let now = st.proxy.mono_ns();
                st.timers.insert(
                    root,
                    Timer {
                        period_ns,
                        due_ns: now.saturating_add(period_ns),
                    },
                );
            }
            Ok(OK)
        }
    );

    host!(
        l,
        s,
        E,
        "proxy_get_current_time_nanoseconds",
        "i>i",
        |mut c: C, ptr: i32| -> R {
            enter(&c, E, "proxy_get_current_time_nanoseconds")?;
            let now = c.data().proxy.now_ns();
            Ok(status_of(write_u64(&mut c, ptr, now)))
        }
    );

    host!(l, s, E, "proxy_define_metric", "iiii>i", |mut c: C,
                                                     t: i32,
                                                     np: i32,
                                                     ns: i32,
                                                     idp: i32|
     -> R {
        enter(&c, E, "proxy_define_metric")?;
        let Some(name) = read(&c, np, ns) else {
            return Ok(IMA);
        };
        let Some(kind) = MetricType::from_raw(u(t)) else {
            return Ok(BAD_ARGUMENT);
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let st = c.data_mut();
        // Per-VM ids (type in the low 2 bits, step 4); the stat is shared by name.
        let slot = kind as usize;
        let id = match st.next_metric_id.get_mut(slot) {
            Some(next) => {
                *next += 4;
                *next
            }
            None => return Ok(BAD_ARGUMENT),
        };
        st.metric_ids.insert(id, (name.clone(), kind));
        st.proxy
            .state()
            .metrics
            .entry((name.clone(), kind))
            .or_insert_with(|| Metric {
                name,
                kind,
                value: 0,
                samples: Vec::new(),
            });
        Ok(status_of(write_u32(&mut c, idp, id)))
    });

    host!(l, s, E, "proxy_increment_metric", "iI>i", |c: C,
                                                      id: i32,
                                                      offset: i64|
     -> R {
        enter(&c, E, "proxy_increment_metric")?;
        let st = c.data();
        let kind = MetricType::from_raw(u(id) & 3);
        if !matches!(kind, Some(MetricType::Counter | MetricType::Gauge)) {
            return Ok(BAD_ARGUMENT);
        }
        let Some(key) = st.metric_ids.get(&u(id)).cloned() else {
            return Ok(NOT_FOUND);
        };
        let mut ps = st.proxy.state();
        let Some(m) = ps.metrics.get_mut(&key) else {
            return Ok(NOT_FOUND);
        };
        match key.1 {
            // Counters only go up: Envoy rejects offset <= 0.
            MetricType::Counter if offset <= 0 => return Ok(BAD_ARGUMENT),
            _ if offset > 0 => m.value = m.value.wrapping_add(offset.unsigned_abs()),
            _ => {
                let sub = offset.unsigned_abs();
                let underflow = sub > m.value;
                m.value = m.value.wrapping_sub(sub);
                if underflow {
                    let name = m.name.clone();
                    drop(ps);
                    st.log(
                        LogLevel::Critical,
                        LogSource::Host,
                        format!("gauge '{name}' went below zero (Envoy gauges are unsigned; debug builds assert)"),
                    );
                }
            }
        }
        Ok(OK)
    });

    host!(l, s, E, "proxy_record_metric", "iI>i", |c: C,
                                                   id: i32,
                                                   value: i64|
     -> R {
        enter(&c, E, "proxy_record_metric")?;
        let st = c.data();
        let Some(key) = st.metric_ids.get(&u(id)).cloned() else {
            return Ok(NOT_FOUND);
        };
        let mut ps = st.proxy.state();
        let Some(m) = ps.metrics.get_mut(&key) else {
            return Ok(NOT_FOUND);
        };
        let value = value as u64;
        match key.1 {
            MetricType::Counter => m.value = m.value.wrapping_add(value),
            MetricType::Gauge => m.value = value,
            MetricType::Histogram => m.samples.push(value),
        }
        Ok(OK)
    });

    host!(l, s, E, "proxy_get_metric", "ii>i", |mut c: C,
                                                id: i32,
                                                rp: i32|
     -> R {
        enter(&c, E, "proxy_get_metric")?;
        let st = c.data();
        if !matches!(
            MetricType::from_raw(u(id) & 3),
            Some(MetricType::Counter | MetricType::Gauge)
        ) {
            return Ok(BAD_ARGUMENT);
        }
        let Some(key) = st.metric_ids.get(&u(id)).cloned() else {
            return Ok(NOT_FOUND);
        };
        let value = st.proxy.state().metrics.get(&key).map(|m| m.value);
        match value {
            None => Ok(NOT_FOUND),
            Some(v) => Ok(status_of(write_u64(&mut c, rp, v))),
        }
    });

    host!(l, s, E, "proxy_set_effective_context", "i>i", |mut c: C,
                                                          id: i32|
     -> R {
        enter(&c, E, "proxy_set_effective_context")?;
        let st = c.data_mut();
        if !st.live_context(u(id)) {
            return Ok(BAD_ARGUMENT);
        }
        st.effective = u(id);
        Ok(OK)
    });

    host!(l, s, E, "proxy_done", ">i", |mut c: C| -> R {
        enter(&c, E, "proxy_done")?;
        let st = c.data_mut();
        let id = st.context_id();
        match st.root(id) {
            Some(r) if r.state == RootState::PendingDone => {
                st.after_call.push(AfterCall::DeleteRoot(id));
                Ok(OK)
            }
            _ => Ok(NOT_FOUND),
        }
    });

    host!(
        l,
        s,
        E,
        "proxy_call_foreign_function",
        "iiiiii>i",
        |mut c: C, np: i32, ns: i32, ap: i32, asz: i32, rp: i32, rs: i32| -> R {
            enter(&c, E, "proxy_call_foreign_function")?;
            let (Some(name), Some(_args)) = (read(&c, np, ns), read(&c, ap, asz)) else {
                return Ok(IMA);
            };
            if name == b"clear_route_cache" {
                let st = c.data_mut();
                let id = st.context_id();
                let offered = st.proxy.config.clear_route_cache;
                if let Some(h) = st.http(id) {
                    h.clear_route_cache_calls += 1;
                    if offered {
                        h.route_cache_clears += 1;
                    }
                }
                if !offered {
                    // A host without it (Envoy's registry has no such name).
                    return Ok(NOT_FOUND);
                }
                let ok =
                    (rp == 0 || write_u32(&mut c, rp, 0)) && (rs == 0 || write_u32(&mut c, rs, 0));
                return Ok(status_of(ok));
            }
            // Envoy's other foreign functions (compress, expr_*, declare_property,
            // set_envoy_filter_state, …) are not modelled.
            Ok(NOT_FOUND)
        }
    );

    host!(l, s, E, "proxy_continue_stream", "i>i", |mut c: C,
                                                    t: i32|
     -> R {
        enter(&c, E, "proxy_continue_stream")?;
        let Some(t) = StreamType::from_raw(u(t)) else {
            return Ok(BAD_ARGUMENT);
        };
        let st = c.data_mut();
        let id = st.context_id();
        if t == StreamType::Upstream {
            return Ok(UNIMPLEMENTED);
        }
        if let Some(h) = st.http(id) {
            if t == StreamType::Request {
                // Context::continueStream drops its pointers to the request.
                h.request_headers_live = false;
                h.request_trailers_live = false;
                h.request_body_live = false;
            }
            if matches!(t, StreamType::Request | StreamType::Response) {
                st.after_call.push(AfterCall::Continue(id, t));
            }
        }
        Ok(OK)
    });

    host!(l, s, E, "proxy_close_stream", "i>i", |mut c: C,
                                                 t: i32|
     -> R {
        enter(&c, E, "proxy_close_stream")?;
        let Some(t) = StreamType::from_raw(u(t)) else {
            return Ok(BAD_ARGUMENT);
        };
        let st = c.data_mut();
        let id = st.context_id();
        if st.http(id).is_some() && matches!(t, StreamType::Request | StreamType::Response) {
            st.after_call.push(AfterCall::Close(id, t));
        }
        Ok(OK)
    });

    host!(l, s, E, "envoy_resolve_dns", "iii>i", |c: C,
                                                  ap: i32,
                                                  asz: i32,
                                                  _tp: i32|
     -> R {
        enter(&c, E, "envoy_resolve_dns")?;
        if read(&c, ap, asz).is_none() {
            return Ok(IMA);
        }
        c.data().log(
            LogLevel::Warn,
            LogSource::Host,
            "fake host: envoy_resolve_dns is not modelled".into(),
        );
        Ok(UNIMPLEMENTED)
    });
    Ok(())
}

/// `writevImpl`: stdout → info, stderr → error, one trailing newline dropped.
fn fd_write_impl(c: &mut C, fd: i32, iovs: i32, iovs_len: i32) -> Result<usize, i32> {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return Err(WASI_BADF),
    };
    let mut out = Vec::new();
    for k in 0..u(iovs_len) {
        let at = u(iovs).wrapping_add(k.wrapping_mul(8)) as i32;
        let Some(iov) = read(c, at, 8) else {
            return Err(WASI_FAULT);
        };
        let (Some(buf), Some(len)) = (iov.get(0..4), iov.get(4..8)) else {
            return Err(WASI_FAULT);
        };
        let buf = u32::from_le_bytes(buf.try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
        if len != 0 {
            let Some(data) = read(c, buf as i32, len as i32) else {
                return Err(WASI_FAULT);
            };
            out.extend_from_slice(&data);
        }
    }
    let written = out.len();
    if written != 0 {
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        let source = if fd == 1 {
            LogSource::Stdout
        } else {
            LogSource::Stderr
        };
        c.data()
            .log(level, source, String::from_utf8_lossy(&out).into_owned());
    }
    Ok(written)
}

fn std_fd(fd: i32) -> bool {
    fd == 1 || fd == 2
}

#[allow(clippy::too_many_lines)]
fn wasi(l: &mut Linker<HostState>, s: &mut Sigs, m: &'static str) -> Result<(), String> {
    host!(l, s, m, "fd_write", "iiii>i", move |mut c: C,
                                               fd: i32,
                                               iovs: i32,
                                               len: i32,
                                               nw: i32|
          -> R {
        enter(&c, m, "fd_write")?;
        match fd_write_impl(&mut c, fd, iovs, len) {
            Err(e) => Ok(e),
            Ok(w) => Ok(if write_u32(&mut c, nw, n(w) as u32) {
                WASI_SUCCESS
            } else {
                WASI_FAULT
            }),
        }
    });
    host!(l, s, m, "fd_pwrite", "iiiIi>i", move |mut c: C,
                                                 fd: i32,
                                                 iovs: i32,
                                                 len: i32,
                                                 _off: i64,
                                                 nw: i32|
          -> R {
        enter(&c, m, "fd_pwrite")?;
        if !std_fd(fd) {
            return Ok(WASI_BADF);
        }
        match fd_write_impl(&mut c, fd, iovs, len) {
            Err(e) => Ok(e),
            Ok(w) => Ok(if write_u32(&mut c, nw, n(w) as u32) {
                WASI_SUCCESS
            } else {
                WASI_FAULT
            }),
        }
    });
    host!(l, s, m, "fd_read", "iiii>i", move |c: C,
                                              _fd: i32,
                                              _i: i32,
                                              _l: i32,
                                              _n: i32|
          -> R {
        enter(&c, m, "fd_read")?;
        Ok(WASI_NOSYS)
    });
    host!(l, s, m, "fd_pread", "iiiIi>i", move |c: C,
                                                _fd: i32,
                                                _i: i32,
                                                _l: i32,
                                                _o: i64,
                                                _n: i32|
          -> R {
        enter(&c, m, "fd_pread")?;
        Ok(WASI_NOSYS)
    });
    host!(l, s, m, "fd_seek", "iIii>i", move |c: C,
                                              _fd: i32,
                                              _off: i64,
                                              _wh: i32,
                                              _np: i32|
          -> R {
        enter(&c, m, "fd_seek")?;
        // Envoy's Context::error logs this at trace and reports success.
        c.data().log(
            LogLevel::Trace,
            LogSource::Host,
            "wasi_unstable fd_seek".into(),
        );
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "fd_close", "i>i", move |c: C, _fd: i32| -> R {
        enter(&c, m, "fd_close")?;
        c.data().log(
            LogLevel::Trace,
            LogSource::Host,
            "wasi_unstable fd_close".into(),
        );
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "fd_fdstat_get", "ii>i", move |mut c: C,
                                                  fd: i32,
                                                  out: i32|
          -> R {
        enter(&c, m, "fd_fdstat_get")?;
        if !std_fd(fd) {
            return Ok(WASI_BADF);
        }
        // 24 bytes: filetype/flags 0, fs_rights_base = FD_WRITE (64), inheriting 0.
        let mut stat = [0u8; 24];
        if let Some(rights) = stat.get_mut(8..16) {
            rights.copy_from_slice(&64u64.to_le_bytes());
        }
        let _ = write(&mut c, u(out), &stat);
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "fd_fdstat_set_flags", "ii>i", move |c: C,
                                                        _fd: i32,
                                                        _f: i32|
          -> R {
        enter(&c, m, "fd_fdstat_set_flags")?;
        Ok(WASI_NOSYS)
    });
    host!(l, s, m, "fd_fdstat_set_rights", "iII>i", move |c: C,
                                                          fd: i32,
                                                          _b: i64,
                                                          _i: i64|
          -> R {
        enter(&c, m, "fd_fdstat_set_rights")?;
        Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
    });
    host!(l, s, m, "environ_sizes_get", "ii>i", move |mut c: C,
                                                      count: i32,
                                                      size: i32|
          -> R {
        enter(&c, m, "environ_sizes_get")?;
        let env = &c.data().proxy.config.env;
        let total: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        let cnt = env.len();
        let ok =
            write_u32(&mut c, count, n(cnt) as u32) && write_u32(&mut c, size, n(total) as u32);
        Ok(if ok { WASI_SUCCESS } else { WASI_FAULT })
    });
    host!(l, s, m, "environ_get", "ii>i", move |mut c: C,
                                                array: i32,
                                                buf: i32|
          -> R {
        enter(&c, m, "environ_get")?;
        let env = c.data().proxy.config.env.clone();
        let (mut array, mut buf) = (u(array), u(buf));
        for (k, v) in env {
            if !write(&mut c, array, &buf.to_le_bytes()) {
                return Ok(WASI_FAULT);
            }
            let entry = format!("{k}={v}\0");
            if !write(&mut c, buf, entry.as_bytes()) {
                return Ok(WASI_FAULT);
            }
            buf = buf.wrapping_add(n(entry.len()) as u32);
            array = array.wrapping_add(4);
        }
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "args_get", "ii>i", move |c: C,
                                             _a: i32,
                                             _b: i32|
          -> R {
        enter(&c, m, "args_get")?;
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "args_sizes_get", "ii>i", move |mut c: C,
                                                   argc: i32,
                                                   size: i32|
          -> R {
        enter(&c, m, "args_sizes_get")?;
        let ok = write_u32(&mut c, argc, 0) && write_u32(&mut c, size, 0);
        Ok(if ok { WASI_SUCCESS } else { WASI_FAULT })
    });
    host!(
        l,
        s,
        m,
        "clock_time_get",
        "iIi>i",
        move |mut c: C, id: i32, _precision: i64, out: i32| -> R {
            enter(&c, m, "clock_time_get")?;
            let (now, mono, start) = {
                let ps = c.data().proxy.state();
                (ps.wall_ns(), ps.clock_ns, ps.start_ns)
            };
            let value = match id {
                0 => now,
                // Monotonic: an arbitrary origin (one hour of "uptime" at start).
                1 => mono.saturating_sub(start).saturating_add(3_600_000_000_000),
                _ => return Ok(WASI_NOTSUP),
            };
            Ok(if write_u64(&mut c, out, value) {
                WASI_SUCCESS
            } else {
                WASI_FAULT
            })
        }
    );
    host!(l, s, m, "clock_res_get", "ii>i", move |mut c: C,
                                                  id: i32,
                                                  out: i32|
          -> R {
        enter(&c, m, "clock_res_get")?;
        if !matches!(id, 0 | 1) {
            return Ok(WASI_NOTSUP);
        }
        Ok(if write_u64(&mut c, out, 1) {
            WASI_SUCCESS
        } else {
            WASI_FAULT
        })
    });
    host!(l, s, m, "fd_advise", "iIIi>i", move |c: C,
                                                _fd: i32,
                                                _o: i64,
                                                _l: i64,
                                                _a: i32|
          -> R {
        enter(&c, m, "fd_advise")?;
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "fd_allocate", "iII>i", move |c: C,
                                                 fd: i32,
                                                 _o: i64,
                                                 _l: i64|
          -> R {
        enter(&c, m, "fd_allocate")?;
        Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
    });
    host!(l, s, m, "fd_datasync", "i>i", move |c: C, fd: i32| -> R {
        enter(&c, m, "fd_datasync")?;
        Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
    });
    host!(l, s, m, "fd_sync", "i>i", move |c: C, fd: i32| -> R {
        enter(&c, m, "fd_sync")?;
        Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
    });
    host!(l, s, m, "fd_filestat_set_size", "iI>i", move |c: C,
                                                         fd: i32,
                                                         _s: i64|
          -> R {
        enter(&c, m, "fd_filestat_set_size")?;
        Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
    });
    host!(
        l,
        s,
        m,
        "fd_filestat_set_times",
        "iIIi>i",
        move |c: C, fd: i32, _a: i64, _b: i64, _f: i32| -> R {
            enter(&c, m, "fd_filestat_set_times")?;
            Ok(if std_fd(fd) { WASI_SUCCESS } else { WASI_BADF })
        }
    );
    host!(l, s, m, "fd_filestat_get", "ii>i", move |c: C,
                                                    _fd: i32,
                                                    _b: i32|
          -> R {
        enter(&c, m, "fd_filestat_get")?;
        Ok(WASI_BADF)
    });
    host!(l, s, m, "fd_readdir", "iiiIi>i", move |mut c: C,
                                                  _fd: i32,
                                                  _b: i32,
                                                  _l: i32,
                                                  _k: i64,
                                                  np: i32|
          -> R {
        enter(&c, m, "fd_readdir")?;
        if !write_u32(&mut c, np, 0) {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_NOTDIR)
    });
    host!(l, s, m, "fd_renumber", "ii>i", move |c: C,
                                                fd: i32,
                                                to: i32|
          -> R {
        enter(&c, m, "fd_renumber")?;
        Ok(if std_fd(fd) && std_fd(to) {
            WASI_NOTSUP
        } else {
            WASI_BADF
        })
    });
    host!(l, s, m, "fd_tell", "ii>i", move |mut c: C,
                                            fd: i32,
                                            out: i32|
          -> R {
        enter(&c, m, "fd_tell")?;
        if !std_fd(fd) {
            return Ok(WASI_BADF);
        }
        Ok(if write_u64(&mut c, out, 0) {
            WASI_SUCCESS
        } else {
            WASI_FAULT
        })
    });
    host!(l, s, m, "fd_prestat_get", "ii>i", move |c: C,
                                                   _fd: i32,
                                                   _b: i32|
          -> R {
        enter(&c, m, "fd_prestat_get")?;
        Ok(WASI_BADF)
    });
    host!(l, s, m, "fd_prestat_dir_name", "iii>i", move |c: C,
                                                         _fd: i32,
                                                         _p: i32,
                                                         _l: i32|
          -> R {
        enter(&c, m, "fd_prestat_dir_name")?;
        Ok(WASI_NOSYS)
    });
    host!(l, s, m, "path_open", "iiiiiIIii>i", move |c: C,
                                                     _fd: i32,
                                                     _df: i32,
                                                     _p: i32,
                                                     _l: i32,
                                                     _of: i32,
                                                     _rb: i64,
                                                     _ri: i64,
                                                     _ff: i32,
                                                     _r: i32|
          -> R {
        enter(&c, m, "path_open")?;
        Ok(WASI_NOENT)
    });
    host!(
        l,
        s,
        m,
        "path_create_directory",
        "iii>i",
        move |c: C, _fd: i32, _p: i32, _l: i32| -> R {
            enter(&c, m, "path_create_directory")?;
            Ok(WASI_NOTSUP)
        }
    );
    host!(l, s, m, "path_filestat_get", "iiiii>i", move |c: C,
                                                         _fd: i32,
                                                         _f: i32,
                                                         _p: i32,
                                                         _l: i32,
                                                         _b: i32|
          -> R {
        enter(&c, m, "path_filestat_get")?;
        Ok(WASI_NOTSUP)
    });
    host!(
        l,
        s,
        m,
        "path_filestat_set_times",
        "iiiiIIi>i",
        move |c: C, _fd: i32, _f: i32, _p: i32, _l: i32, _a: i64, _b: i64, _ff: i32| -> R {
            enter(&c, m, "path_filestat_set_times")?;
            Ok(WASI_NOTSUP)
        }
    );
    // proxy-wasm-cpp-host registers path_link with 6 parameters (WASI has 7).
    host!(l, s, m, "path_link", "iiiiii>i", move |c: C,
                                                  _a: i32,
                                                  _b: i32,
                                                  _p: i32,
                                                  _l: i32,
                                                  _n: i32,
                                                  _q: i32|
          -> R {
        enter(&c, m, "path_link")?;
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "path_readlink", "iiiiii>i", move |mut c: C,
                                                      _fd: i32,
                                                      _p: i32,
                                                      _l: i32,
                                                      _b: i32,
                                                      _bl: i32,
                                                      r: i32|
          -> R {
        enter(&c, m, "path_readlink")?;
        if !write_u32(&mut c, r, 0) {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_NOTSUP)
    });
    host!(
        l,
        s,
        m,
        "path_remove_directory",
        "iii>i",
        move |c: C, _fd: i32, _p: i32, _l: i32| -> R {
            enter(&c, m, "path_remove_directory")?;
            Ok(WASI_NOTSUP)
        }
    );
    host!(l, s, m, "path_rename", "iiiiii>i", move |c: C,
                                                    _a: i32,
                                                    _b: i32,
                                                    _cc: i32,
                                                    _d: i32,
                                                    _e: i32,
                                                    _f: i32|
          -> R {
        enter(&c, m, "path_rename")?;
        Ok(WASI_NOTSUP)
    });
    // proxy-wasm-cpp-host registers path_symlink with 4 parameters (WASI has 5).
    host!(l, s, m, "path_symlink", "iiii>i", move |c: C,
                                                   _a: i32,
                                                   _b: i32,
                                                   _cc: i32,
                                                   _d: i32|
          -> R {
        enter(&c, m, "path_symlink")?;
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "path_unlink_file", "iii>i", move |c: C,
                                                      _fd: i32,
                                                      _p: i32,
                                                      _l: i32|
          -> R {
        enter(&c, m, "path_unlink_file")?;
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "sock_accept", "iii>i", move |mut c: C,
                                                 _fd: i32,
                                                 _f: i32,
                                                 r: i32|
          -> R {
        enter(&c, m, "sock_accept")?;
        if !write_u64(&mut c, r, 0) {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "sock_recv", "iiiiii>i", move |mut c: C,
                                                  _fd: i32,
                                                  _d: i32,
                                                  _l: i32,
                                                  _f: i32,
                                                  r0: i32,
                                                  r1: i32|
          -> R {
        enter(&c, m, "sock_recv")?;
        if !write_u32(&mut c, r0, 0) || !write(&mut c, u(r1), &0u16.to_le_bytes()) {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "sock_send", "iiiii>i", move |mut c: C,
                                                 _fd: i32,
                                                 _d: i32,
                                                 _l: i32,
                                                 _f: i32,
                                                 r: i32|
          -> R {
        enter(&c, m, "sock_send")?;
        if !write_u32(&mut c, r, 0) {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "sock_shutdown", "ii>i", move |c: C,
                                                  _fd: i32,
                                                  _h: i32|
          -> R {
        enter(&c, m, "sock_shutdown")?;
        Ok(WASI_NOTSUP)
    });
    host!(l, s, m, "random_get", "ii>i", move |mut c: C,
                                               ptr: i32,
                                               len: i32|
          -> R {
        enter(&c, m, "random_get")?;
        let len = u(len) as usize;
        if len > 64 * 1024 {
            return Ok(WASI_INVAL);
        }
        // Deterministic "randomness" (splitmix64): reproducible test runs.
        let mut bytes = Vec::with_capacity(len);
        let st = c.data_mut();
        while bytes.len() < len {
            st.rng = st.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = st.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            bytes.extend_from_slice(&z.to_le_bytes());
        }
        bytes.truncate(len);
        Ok(if write(&mut c, u(ptr), &bytes) {
            WASI_SUCCESS
        } else {
            WASI_FAULT
        })
    });
    host!(l, s, m, "sched_yield", ">i", move |c: C| -> R {
        enter(&c, m, "sched_yield")?;
        Ok(WASI_SUCCESS)
    });
    host!(l, s, m, "poll_oneoff", "iiii>i", move |mut c: C,
                                                  _in: i32,
                                                  _out: i32,
                                                  _n: i32,
                                                  np: i32|
          -> R {
        enter(&c, m, "poll_oneoff")?;
        Ok(if write_u32(&mut c, np, 0) {
            WASI_SUCCESS
        } else {
            WASI_FAULT
        })
    });
    host!(
        l,
        s,
        m,
        "proc_exit",
        "i>",
        move |c: C, code: i32| -> wasmtime::Result<()> {
            enter(&c, m, "proc_exit")?;
            // Envoy only logs "wasi_unstable proc_exit"; wasi-libc follows the call
            // with `unreachable`, so the VM traps either way. Trap here directly.
            Err(wasmtime::Error::msg(format!(
                "proc_exit({code}) called: the plugin exited"
            )))
        }
    );
    Ok(())
}
