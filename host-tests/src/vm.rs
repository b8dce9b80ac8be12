//! [`Vm`]: one thread-local Wasm VM (wasmtime store + instance) and the
//! per-VM host state Envoy keeps for it (contexts, timers, metric ids, …).

use crate::abi::{Action, LogLevel, MetricType, StreamType};
use crate::engine::{LoadedModule, EPOCH_TICK};
use crate::headers::{HeaderMap, HeaderMapKind};
use crate::property::{path_key, split_path, PropertyValue};
use crate::proxy::{LogEntry, LogSource, Proxy, ProxyInner, TrapPolicy};
use crate::stream::{LocalReply, Stream};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use wasmtime::{Instance, Memory, Store, Trap, TypedFunc, WasmParams, WasmResults};

/// Why a VM could not be started or (re)configured.
#[derive(Debug, Clone)]
pub enum StartError {
    /// The module could not be compiled, declares no supported ABI version,
    /// imports something Envoy does not provide, exports a callback with the
    /// wrong signature, or lacks `malloc`/`proxy_on_memory_allocate`.
    Load(String),
    /// The plugin trapped during start-up.
    Trap(TrapInfo),
    /// `proxy_on_vm_start` returned false ("Failed to start base Wasm").
    VmStartFailed {
        /// VM label.
        vm: String,
        /// What the VM logged while starting.
        logs: Vec<LogEntry>,
    },
    /// `proxy_on_configure` returned false: Envoy rejects the configuration
    /// ("Failed to configure base Wasm plugin").
    ConfigureFailed {
        /// VM label.
        vm: String,
        /// What the VM logged while starting (usually the reason).
        logs: Vec<LogEntry>,
    },
}

impl StartError {
    /// The log lines emitted while starting (empty for load errors).
    pub fn logs(&self) -> &[LogEntry] {
        match self {
            Self::Load(_) => &[],
            Self::Trap(t) => &t.logs,
            Self::VmStartFailed { logs, .. } | Self::ConfigureFailed { logs, .. } => logs,
        }
    }

    /// Whether any start-up log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.logs().iter().any(|l| l.message.contains(needle))
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Load(m) => write!(f, "failed to load the Wasm module: {m}")?,
            Self::Trap(t) => write!(f, "{t}")?,
            Self::VmStartFailed { vm, .. } => write!(f, "[{vm}] proxy_on_vm_start returned false")?,
            Self::ConfigureFailed { vm, .. } => write!(
                f,
                "[{vm}] proxy_on_configure returned false: the plugin refused its configuration"
            )?,
        }
        for l in self.logs() {
            write!(f, "\n  {l}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StartError {}

/// A trap (panic, `unreachable`, out-of-bounds access, runaway loop, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapInfo {
    /// VM label.
    pub vm: String,
    /// The guest export that was running, e.g. `proxy_on_request_headers`.
    pub function: String,
    /// wasmtime's message, with the wasm backtrace.
    pub message: String,
    /// The VM's log lines up to the trap (the Rust SDK logs the panic
    /// message at `critical` just before aborting).
    pub logs: Vec<LogEntry>,
}

impl fmt::Display for TrapInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] Wasm VM failed: Function: {} failed: {}",
            self.vm, self.function, self.message
        )
    }
}

// ---------------------------------------------------------------------------
// Per-VM host state (the wasmtime store's data).

pub(crate) struct RootCtx {
    pub(crate) plugin_config: Vec<u8>,
    /// Envoy's `temp_plugin_`: the plugin configuration buffer is only
    /// readable while the root context is being created or configured.
    pub(crate) configuring: bool,
    pub(crate) state: RootState,
    pub(crate) status: (u32, Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootState {
    Active,
    /// Replaced by a newer configuration; shut down when its streams end.
    Draining,
    /// `proxy_on_done` returned false; waiting for `proxy_done`.
    PendingDone,
}

pub(crate) struct HttpCtx {
    pub(crate) root_id: u32,
    pub(crate) created: bool,
    pub(crate) destroyed: bool,
    /// Monotonic start (for `request.duration`).
    pub(crate) start_ns: u64,
    /// Wall-clock start (`request.time`).
    pub(crate) start_wall_ns: u64,
    pub(crate) end_of_stream: bool,
    pub(crate) access_log: bool,
    pub(crate) request_headers: Option<HeaderMap>,
    pub(crate) request_headers_live: bool,
    pub(crate) request_trailers: Option<HeaderMap>,
    pub(crate) request_trailers_live: bool,
    pub(crate) request_body: Vec<u8>,
    pub(crate) request_body_live: bool,
    pub(crate) request_body_buffering: bool,
    pub(crate) request_body_sent: Vec<u8>,
    pub(crate) response_headers: Option<HeaderMap>,
    pub(crate) response_headers_live: bool,
    pub(crate) response_trailers: Option<HeaderMap>,
    pub(crate) response_trailers_live: bool,
    pub(crate) response_body: Vec<u8>,
    pub(crate) response_body_live: bool,
    pub(crate) response_body_buffering: bool,
    pub(crate) response_body_sent: Vec<u8>,
    pub(crate) response_started: bool,
    pub(crate) local_reply: Option<LocalReply>,
    pub(crate) failure_reply_sent: bool,
    pub(crate) stream_failed: bool,
    pub(crate) request_paused: bool,
    pub(crate) response_paused: bool,
    pub(crate) continued: Vec<StreamType>,
    pub(crate) closed: Vec<StreamType>,
    pub(crate) filter_state: HashMap<Vec<u8>, Vec<u8>>,
    pub(crate) attributes: HashMap<Vec<u8>, PropertyValue>,
    pub(crate) route_cache_clears: u32,
    /// Calls of the foreign function `clear_route_cache` (answered or not).
    pub(crate) clear_route_cache_calls: u32,
    /// Envoy's router made an upstream request (the request headers went
    /// past this filter, or an upstream answered).
    pub(crate) forwarded: bool,
    /// The filter got the response headers (or the stream ended): the
    /// router makes no more attempts and the response code is known, so
    /// the test may no longer change them.
    pub(crate) response_facts_fixed: bool,
    /// `proxy_on_log` ran: nothing about the stream may change any more.
    pub(crate) logged: bool,
    /// The route sets `include_attempt_count_in_response`: Envoy's router
    /// writes `x-envoy-attempt-count` over the upstream's response headers
    /// and on its own replies (its `modify_headers_`). Off (Envoy's
    /// default), an upstream's header of that name passes as sent.
    pub(crate) include_attempt_count_in_response: bool,
}

impl HttpCtx {
    /// The router's attempt count, as `upstream.request_attempt_count`
    /// reports it (a test's `set_attempt_count`, else 1 once forwarded).
    fn attempt_count(&self) -> u64 {
        match self
            .attributes
            .get(&path_key(&["upstream", "request_attempt_count"]))
        {
            Some(PropertyValue::Uint(attempts)) => *attempts,
            _ => u64::from(self.forwarded),
        }
    }

    /// Router's `modify_headers_`: the attempt count on a response, when
    /// the route asks for it and an attempt was made.
    fn write_attempt_count(&self, headers: &mut HeaderMap) {
        let attempts = self.attempt_count();
        if self.include_attempt_count_in_response && attempts > 0 {
            headers.replace("x-envoy-attempt-count", attempts.to_string());
        }
    }
}

pub(crate) enum CtxKind {
    Vm,
    Root(RootCtx),
    Http(Box<HttpCtx>),
}

pub(crate) enum AfterCall {
    LocalReply(u32, LocalReply),
    Continue(u32, StreamType),
    Close(u32, StreamType),
    DeleteRoot(u32),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timer {
    pub(crate) period_ns: u64,
    pub(crate) due_ns: u64,
}

pub(crate) struct PendingCall {
    pub(crate) context_id: u32,
}

/// The current `http_call` response while `proxy_on_http_call_response` runs.
pub(crate) struct CallResponse {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
    pub(crate) trailers: HeaderMap,
}

pub(crate) struct HostState {
    pub(crate) proxy: Arc<ProxyInner>,
    pub(crate) label: String,
    pub(crate) vm_index: usize,
    pub(crate) memory: Option<Memory>,
    pub(crate) malloc: Option<TypedFunc<i32, i32>>,
    pub(crate) contexts: BTreeMap<u32, CtxKind>,
    pub(crate) next_context_id: u32,
    pub(crate) current: u32,
    pub(crate) effective: u32,
    /// Host functions allowed right now (`setRestrictedCallback`); `None` = all.
    pub(crate) restricted: Option<&'static [&'static str]>,
    pub(crate) stop_iteration: bool,
    pub(crate) after_call: Vec<AfterCall>,
    pub(crate) metric_ids: HashMap<u32, (String, MetricType)>,
    pub(crate) next_metric_id: [u32; 3],
    pub(crate) timers: BTreeMap<u32, Timer>,
    pub(crate) http_calls: BTreeMap<u32, PendingCall>,
    pub(crate) next_http_call_id: u32,
    pub(crate) call_response: Option<CallResponse>,
    pub(crate) failed: Option<TrapInfo>,
    /// Test hook: the next guest call into this VM traps.
    pub(crate) trap_next: bool,
    /// State of this VM's `random_get` generator (seeded per VM and per run).
    pub(crate) rng: u64,
}

impl HostState {
    /// `contextOrEffectiveContext()`: the effective context if one was set
    /// during this call and still exists, else the context being called.
    pub(crate) fn context_id(&self) -> u32 {
        if self.effective != 0 && self.live_context(self.effective) {
            self.effective
        } else {
            self.current
        }
    }

    pub(crate) fn live_context(&self, id: u32) -> bool {
        match self.contexts.get(&id) {
            Some(CtxKind::Http(h)) => !h.destroyed,
            Some(_) => true,
            None => false,
        }
    }

    pub(crate) fn http(&mut self, id: u32) -> Option<&mut HttpCtx> {
        match self.contexts.get_mut(&id) {
            Some(CtxKind::Http(h)) => Some(h),
            _ => None,
        }
    }

    pub(crate) fn http_ref(&self, id: u32) -> Option<&HttpCtx> {
        match self.contexts.get(&id) {
            Some(CtxKind::Http(h)) => Some(h),
            _ => None,
        }
    }

    /// The root context a context belongs to (itself for a root).
    pub(crate) fn root_of(&self, id: u32) -> u32 {
        match self.contexts.get(&id) {
            Some(CtxKind::Http(h)) => h.root_id,
            _ => id,
        }
    }

    pub(crate) fn root(&mut self, id: u32) -> Option<&mut RootCtx> {
        match self.contexts.get_mut(&id) {
            Some(CtxKind::Root(r)) => Some(r),
            _ => None,
        }
    }

    pub(crate) fn log(&self, level: LogLevel, source: LogSource, message: String) {
        self.proxy.log(&self.label, level, source, message);
    }

    /// Property lookup, following `Context::getProperty` /
    /// `Context::findValue` and the CEL attribute wrappers.
    pub(crate) fn get_property(&self, path: &[u8]) -> Result<Vec<u8>, crate::abi::Status> {
        self.get_property_of(self.context_id(), path)
    }

    /// [`get_property`](Self::get_property) as context `id` would see it.
    pub(crate) fn get_property_of(
        &self,
        id: u32,
        path: &[u8],
    ) -> Result<Vec<u8>, crate::abi::Status> {
        use crate::abi::Status;
        let segments = split_path(path);
        let Some(first) = segments.first() else {
            return Err(Status::NotFound);
        };
        let cfg = &self.proxy.config;
        match *first {
            b"plugin_name" => return Ok(cfg.plugin_name.clone().into_bytes()),
            b"plugin_root_id" => return Ok(cfg.root_id.clone().into_bytes()),
            b"plugin_vm_id" => return Ok(cfg.vm_id.clone().into_bytes()),
            _ => {}
        }
        let Some(h) = self.http_ref(id) else {
            return Err(Status::NotFound);
        };
        if segments.len() == 1 {
            if let Some(v) = h.filter_state.get(path) {
                return Ok(v.clone());
            }
        }
        let key: Vec<u8> = segments.join(&0u8);
        if let Some(v) = h.attributes.get(&key) {
            return Ok(v.encode());
        }
        let second = segments.get(1).copied();
        let request_headers = h
            .request_headers
            .as_ref()
            .filter(|_| h.request_headers_live || h.access_log);
        let response_headers = h
            .response_headers
            .as_ref()
            .filter(|_| h.response_headers_live || h.access_log);
        let value = match (*first, second) {
            (b"request", Some(field)) => {
                request_attribute(h, request_headers, field, segments.get(2).copied())
            }
            (b"response", Some(field)) => {
                response_attribute(h, response_headers, field, segments.get(2).copied())
            }
            // UpstreamWrapper: attemptCount().value_or(0), a CEL uint. The
            // router sets it to 1 when it creates the first upstream request
            // (`UpstreamRequest` / `Filter::onRequestComplete`), and counts
            // every retry; a test sets retries with `set_attempt_count`.
            (b"upstream", Some(b"request_attempt_count")) => {
                Some(PropertyValue::Uint(u64::from(h.forwarded)))
            }
            (
                b"request" | b"response" | b"upstream" | b"source" | b"destination" | b"connection"
                | b"xds",
                None,
            ) => {
                // A whole attribute map: Envoy's wrappers cannot list their keys.
                return Err(Status::SerializationFailure);
            }
            _ => None,
        };
        value.map(|v| v.encode()).ok_or(Status::NotFound)
    }
}

fn header_value(map: Option<&HeaderMap>, name: &str) -> Option<PropertyValue> {
    map?.get(name).map(PropertyValue::String)
}

fn headers_attribute(map: Option<&HeaderMap>, key: Option<&[u8]>) -> Option<PropertyValue> {
    let map = map?;
    match key {
        // Multiple values are comma-concatenated in the CEL map.
        Some(k) => {
            let all = map.get_all(k);
            (!all.is_empty()).then(|| PropertyValue::String(all.join(",")))
        }
        None => Some(PropertyValue::Map(map.pairs())),
    }
}

fn request_attribute(
    h: &HttpCtx,
    headers: Option<&HeaderMap>,
    field: &[u8],
    sub: Option<&[u8]>,
) -> Option<PropertyValue> {
    match field {
        b"time" => Some(PropertyValue::TimestampNanos(
            i64::try_from(h.start_wall_ns).unwrap_or(i64::MAX),
        )),
        b"protocol" => Some(PropertyValue::String("HTTP/1.1".into())),
        b"headers" => headers_attribute(headers, sub),
        b"path" => header_value(headers, ":path"),
        b"url_path" => header_value(headers, ":path").map(|p| match p {
            PropertyValue::String(s) => {
                PropertyValue::String(s.split('?').next().unwrap_or_default().to_owned())
            }
            other => other,
        }),
        b"query" => headers?.get(":path").map(|p| {
            PropertyValue::String(
                p.split_once('?')
                    .map(|(_, q)| q.to_owned())
                    .unwrap_or_default(),
            )
        }),
        b"host" => header_value(headers, ":authority"),
        b"scheme" => header_value(headers, ":scheme"),
        b"method" => header_value(headers, ":method"),
        b"referer" => header_value(headers, "referer"),
        b"useragent" => header_value(headers, "user-agent"),
        b"id" => header_value(headers, "x-request-id"),
        _ => None,
    }
}

fn response_attribute(
    h: &HttpCtx,
    headers: Option<&HeaderMap>,
    field: &[u8],
    sub: Option<&[u8]>,
) -> Option<PropertyValue> {
    match field {
        b"headers" => headers_attribute(headers, sub),
        b"trailers" => headers_attribute(
            h.response_trailers
                .as_ref()
                .filter(|_| h.response_trailers_live || h.access_log),
            sub,
        ),
        // Envoy always has response flags (a bit vector, 0 when none).
        b"flags" => Some(PropertyValue::Int(0)),
        b"grpc_status" => grpc_status(h),
        _ => None,
    }
}

/// `response.grpc_status` as Envoy derives it (`Grpc::Common::getGrpcStatus`
/// over the trailers, the headers and the stream info): the trailers'
/// `grpc-status`, else the response headers' (a trailers-only answer), else
/// mapped from `response.code` (`Grpc::Utility::httpToGrpcStatus`); absent
/// when there was no response. An unparsable or unknown code is -1
/// (`InvalidCode`). A CEL int.
fn grpc_status(h: &HttpCtx) -> Option<PropertyValue> {
    // Envoy keeps both maps once they arrived, whatever the phase.
    let trailers = h.response_trailers.as_ref();
    let headers = h.response_headers.as_ref();
    let read = |map: Option<&HeaderMap>| {
        map?.get("grpc-status").map(|value| {
            value
                .parse::<u64>()
                .ok()
                .filter(|code| *code <= 16)
                .and_then(|code| i64::try_from(code).ok())
                .unwrap_or(-1)
        })
    };
    let inferred = || match h.attributes.get(&path_key(&["response", "code"])) {
        Some(PropertyValue::Int(code)) if *code > 0 => Some(match code {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        }),
        _ => None,
    };
    read(trailers)
        .or_else(|| read(headers))
        .or_else(inferred)
        .map(PropertyValue::Int)
}

// ---------------------------------------------------------------------------

/// Host functions allowed while `_initialize`/`main` run (`WasmBase::startVm`).
pub(crate) const STARTUP_ALLOWED: &[&str] = &[
    "env.emscripten_notify_memory_growth",
    "env.proxy_log",
    "fd_write",
    "args_sizes_get",
    "args_get",
    "environ_sizes_get",
    "environ_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "poll_oneoff",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_advise",
    "fd_allocate",
    "fd_datasync",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_dir_name",
    "fd_prestat_get",
    "fd_pwrite",
    "fd_readdir",
    "fd_renumber",
    "fd_sync",
    "fd_tell",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Host functions allowed inside `malloc` (`WasmBase::allocMemory`).
pub(crate) const MALLOC_ALLOWED: &[&str] =
    &["env.proxy_log", "fd_write", "clock_time_get", "poll_oneoff"];

/// `proxy_on_http_call_response(context, token, headers, body_size, trailers)`.
type HttpCallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    start: Option<TypedFunc<(), ()>>,
    main: Option<TypedFunc<(i32, i32), i32>>,
    main_void: Option<TypedFunc<(), i32>>,
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    on_configure: Option<TypedFunc<(i32, i32), i32>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_http_call_response: Option<HttpCallResponseFn>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
}

fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, String> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| format!("Bad function signature for: {name}: {e}")),
    }
}

/// Converts a guest int to a u32 argument/result (wasm i32 is untyped).
fn u(v: i32) -> u32 {
    v as u32
}

fn i(v: usize) -> i32 {
    u32::try_from(v).unwrap_or(u32::MAX) as i32
}

pub(crate) struct VmInner {
    store: Store<HostState>,
    ex: Exports,
    proxy: Proxy,
    /// The root context new streams attach to.
    root: u32,
    /// The VM that replaced this one after it failed (`FailReload`).
    successor: Option<Vm>,
    /// How many times this worker's VM was reloaded before this one.
    generation: u32,
}

/// One thread-local Wasm VM: what Envoy runs on the main thread and on each
/// worker. Cheap to clone (a handle); [`Stream`]s hold a handle too, so many
/// streams can be open on one VM at once.
#[derive(Clone)]
pub struct Vm {
    pub(crate) inner: Arc<Mutex<VmInner>>,
}

enum Outcome<R> {
    Missing,
    Done(R),
    Trapped,
}

impl VmInner {
    fn st(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    fn failed(&self) -> bool {
        self.store.data().failed.is_some()
    }

    fn policy(&self) -> TrapPolicy {
        self.proxy.inner.config.trap_policy
    }

    /// Calls a guest export like proxy-wasm-cpp-host's `getModuleFunctionImpl`
    /// wrapper: sets the current context (`SaveRestoreContext`), arms the
    /// watchdog, and turns a trap into a failed VM.
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        name: &str,
        f: Option<TypedFunc<P, R>>,
        ctx: u32,
        args: P,
    ) -> Outcome<R> {
        let Some(f) = f else { return Outcome::Missing };
        if self.failed() {
            return Outcome::Trapped;
        }
        if std::mem::take(&mut self.st().trap_next) {
            self.fail(
                name,
                "wasm trap: host-injected trap (Vm::trap_next_call)".into(),
            );
            return Outcome::Trapped;
        }
        let saved = {
            let st = self.st();
            let saved = (st.current, st.effective);
            st.current = ctx;
            st.effective = 0;
            saved
        };
        let timeout = self.proxy.inner.config.call_timeout;
        let ticks = (timeout.as_millis() / EPOCH_TICK.as_millis().max(1)) as u64 + 1;
        self.store.set_epoch_deadline(ticks);
        let result = f.call(&mut self.store, args);
        {
            let st = self.st();
            st.current = saved.0;
            st.effective = saved.1;
        }
        match result {
            Ok(r) => Outcome::Done(r),
            Err(e) => {
                let mut message = format!("{e:?}");
                if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    message.push_str(&format!(
                        "\n(interrupted after {timeout:?}: runaway loop? see ProxyBuilder::call_timeout)"
                    ));
                }
                self.fail(name, message);
                Outcome::Trapped
            }
        }
    }

    fn fail(&mut self, function: &str, message: String) {
        let label = self.store.data().label.clone();
        self.store.data().log(
            LogLevel::Error,
            LogSource::Host,
            format!("Wasm VM failed Function: {function} failed: {message}"),
        );
        let logs: Vec<LogEntry> = self
            .proxy
            .logs()
            .into_iter()
            .filter(|l| l.vm == label)
            .collect();
        let info = TrapInfo {
            vm: label,
            function: function.to_owned(),
            message,
            logs,
        };
        self.st().failed = Some(info.clone());
        if self.policy() == TrapPolicy::Panic {
            let tail: Vec<String> = info
                .logs
                .iter()
                .rev()
                .take(15)
                .rev()
                .map(|l| format!("  {l}"))
                .collect();
            panic!(
                "{info}\nlast log lines of this VM:\n{}\n(set ProxyBuilder::trap_policy to \
                 TrapPolicy::FailClosed to test Envoy's behaviour after a crash instead)",
                tail.join("\n")
            );
        }
    }

    fn trap_error(&self) -> StartError {
        match &self.store.data().failed {
            Some(t) => StartError::Trap(t.clone()),
            None => StartError::Load("the VM failed".into()),
        }
    }

    fn logs_since(&self, from: usize) -> Vec<LogEntry> {
        let label = &self.store.data().label;
        self.proxy
            .inner
            .state()
            .logs
            .iter()
            .skip(from)
            .filter(|l| &l.vm == label)
            .cloned()
            .collect()
    }

    fn alloc_context(&mut self, kind: CtxKind) -> u32 {
        let st = self.st();
        let id = st.next_context_id;
        st.next_context_id += 1;
        st.contexts.insert(id, kind);
        id
    }

    /// `WasmBase::start` + `configure` for a new root context.
    fn create_root(&mut self, plugin_config: Vec<u8>) -> Result<u32, StartError> {
        let log_start = self.proxy.inner.state().logs.len();
        let label = self.store.data().label.clone();
        let id = self.alloc_context(CtxKind::Root(RootCtx {
            plugin_config,
            configuring: true,
            state: RootState::Active,
            status: (0, Vec::new()),
        }));
        // ContextBase::onStart: temp_plugin_ is set around on_context_create only.
        let f = self.ex.on_context_create.clone();
        if let Outcome::Trapped = self.call("proxy_on_context_create", f, id, (i(id as usize), 0)) {
            return Err(self.trap_error());
        }
        self.after_call();
        if let Some(r) = self.st().root(id) {
            r.configuring = false;
        }
        let vm_config_len = self.proxy.inner.config.vm_config.len();
        let f = self.ex.on_vm_start.clone();
        match self.call(
            "proxy_on_vm_start",
            f,
            id,
            (i(id as usize), i(vm_config_len)),
        ) {
            Outcome::Trapped => return Err(self.trap_error()),
            Outcome::Done(0) => {
                self.after_call();
                return Err(StartError::VmStartFailed {
                    vm: label,
                    logs: self.logs_since(log_start),
                });
            }
            _ => self.after_call(),
        }
        let config_len = match self.st().root(id) {
            Some(r) => {
                r.configuring = true;
                r.plugin_config.len()
            }
            None => 0,
        };
        let f = self.ex.on_configure.clone();
        let outcome = self.call("proxy_on_configure", f, id, (i(id as usize), i(config_len)));
        if let Some(r) = self.st().root(id) {
            r.configuring = false;
        }
        match outcome {
            Outcome::Trapped => Err(self.trap_error()),
            Outcome::Done(0) => {
                self.after_call();
                self.st().log(
                    LogLevel::Error,
                    LogSource::Host,
                    "Failed to configure base Wasm plugin".into(),
                );
                Err(StartError::ConfigureFailed {
                    vm: label,
                    logs: self.logs_since(log_start),
                })
            }
            _ => {
                self.after_call();
                Ok(id)
            }
        }
    }

    /// `WasmBase::startShutdown(plugin_key)` for one root context.
    fn shutdown_root(&mut self, id: u32) {
        let f = self.ex.on_done.clone();
        let done = match self.call("proxy_on_done", f, id, i(id as usize)) {
            Outcome::Done(v) => v != 0,
            Outcome::Missing | Outcome::Trapped => true,
        };
        self.after_call();
        if done {
            self.delete_root(id);
        } else if let Some(r) = self.st().root(id) {
            r.state = RootState::PendingDone;
        }
    }

    fn delete_root(&mut self, id: u32) {
        let f = self.ex.on_delete.clone();
        let _ = self.call("proxy_on_delete", f, id, i(id as usize));
        self.after_call();
        let st = self.st();
        st.contexts.remove(&id);
        st.timers.remove(&id);
    }

    /// Shuts down draining root contexts that no live stream uses any more.
    fn reap_roots(&mut self) {
        let st = self.store.data();
        let draining: Vec<u32> = st
            .contexts
            .iter()
            .filter_map(|(id, c)| match c {
                CtxKind::Root(r) if r.state == RootState::Draining => Some(*id),
                _ => None,
            })
            .filter(|root| {
                !st.contexts.values().any(|c| match c {
                    CtxKind::Http(h) => h.root_id == *root && !h.destroyed,
                    _ => false,
                })
            })
            .collect();
        for id in draining {
            self.shutdown_root(id);
        }
    }

    /// Runs deferred actions (`DeferAfterCallActions`): local replies,
    /// `proxy_continue_stream`/`proxy_close_stream` effects and `proxy_done`.
    fn after_call(&mut self) {
        self.st().stop_iteration = false;
        loop {
            let actions = std::mem::take(&mut self.st().after_call);
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    AfterCall::LocalReply(id, reply) => self.send_local_reply(id, reply),
                    AfterCall::Continue(id, t) => {
                        if let Some(h) = self.st().http(id) {
                            match t {
                                StreamType::Request => {
                                    h.request_paused = false;
                                    h.forwarded |= h.local_reply.is_none();
                                }
                                StreamType::Response => h.response_paused = false,
                                _ => {}
                            }
                            h.continued.push(t);
                        }
                    }
                    AfterCall::Close(id, t) => {
                        if let Some(h) = self.st().http(id) {
                            h.closed.push(t);
                            h.attributes
                                .entry(path_key(&["response", "code_details"]))
                                .or_insert_with(|| {
                                    PropertyValue::String("wasm_close_stream".into())
                                });
                        }
                    }
                    AfterCall::DeleteRoot(id) => self.delete_root(id),
                }
            }
        }
    }

    /// `decoder_callbacks_->sendLocalReply(...)` as Envoy runs it: before the
    /// response started, the reply goes through the encoder filter chain —
    /// including this filter (`proxy_on_response_headers`/`_body`); after,
    /// it replaces the response directly.
    fn send_local_reply(&mut self, id: u32, reply: LocalReply) {
        let Some(h) = self.st().http(id) else { return };
        if h.local_reply.is_some() {
            return; // Envoy ignores a second local reply on the same stream.
        }
        let is_grpc = h.request_headers.as_ref().is_some_and(|m| {
            m.get("content-type").is_some_and(|ct| {
                ct == "application/grpc"
                    || ct.starts_with("application/grpc+")
                    || ct.starts_with("application/grpc;")
            })
        });
        let is_head = h
            .request_headers
            .as_ref()
            .is_some_and(|m| m.get(":method").as_deref() == Some("HEAD"));
        let (headers, body) = reply.encoded_headers(is_grpc, is_head);
        h.attributes.insert(
            path_key(&["response", "code"]),
            PropertyValue::Int(i64::from(reply.status)),
        );
        h.attributes.insert(
            path_key(&["response", "code_details"]),
            PropertyValue::String(reply.details.clone()),
        );
        let through_filter = !h.response_started && h.created && !reply.is_failure;
        h.response_facts_fixed = true;
        h.local_reply = Some(reply);
        h.request_paused = false;
        h.response_started = true;
        let n = headers.len();
        h.response_headers = Some(headers);
        if !through_filter {
            h.response_body_sent = body;
            return;
        }
        h.response_headers_live = true;
        let eos = body.is_empty();
        h.end_of_stream = eos;
        let f = self.ex.on_response_headers.clone();
        let outcome = self.call(
            "proxy_on_response_headers",
            f,
            id,
            (i(id as usize), i(n), i32::from(eos)),
        );
        self.after_call();
        if let Some(h) = self.st().http(id) {
            if matches!(outcome, Outcome::Done(0) | Outcome::Missing) {
                h.response_headers_live = false;
            }
        }
        if eos {
            return;
        }
        if let Some(h) = self.st().http(id) {
            h.response_body = body.clone();
            h.response_body_live = true;
            h.end_of_stream = true;
        }
        let f = self.ex.on_response_body.clone();
        let _ = self.call(
            "proxy_on_response_body",
            f,
            id,
            (i(id as usize), i(body.len()), 1),
        );
        self.after_call();
        if let Some(h) = self.st().http(id) {
            h.response_body_sent = std::mem::take(&mut h.response_body);
            h.response_body_live = false;
        }
    }

    /// `CHECK_FAIL_HTTP`: what a stream gets from a failed VM.
    fn check_fail(&mut self, id: u32) -> Option<Action> {
        if !self.failed() {
            return None;
        }
        if self.policy() == TrapPolicy::FailOpen {
            return Some(Action::Continue);
        }
        let first = self.st().http(id).is_some_and(|h| {
            let first = !h.stream_failed;
            h.stream_failed = true;
            first
        });
        if first {
            self.send_local_reply(id, LocalReply::failure());
            if let Some(h) = self.st().http(id) {
                h.failure_reply_sent = true;
            }
        }
        Some(Action::Pause)
    }

    fn on_create(&mut self, id: u32) {
        let Some(h) = self.st().http(id) else { return };
        if h.created {
            return;
        }
        let root = h.root_id;
        h.created = true;
        if !self.failed() {
            let f = self.ex.on_context_create.clone();
            let _ = self.call(
                "proxy_on_context_create",
                f,
                id,
                (i(id as usize), i(root as usize)),
            );
            self.after_call();
        }
    }

    /// Common shape of the header/trailer/body callbacks.
    fn stream_callback(
        &mut self,
        id: u32,
        name: &str,
        f: Option<TypedFunc<(i32, i32, i32), i32>>,
        size: usize,
        eos: bool,
    ) -> (Action, u32) {
        if let Some(a) = self.check_fail(id) {
            return (a, 1);
        }
        let outcome = self.call(name, f, id, (i(id as usize), i(size), i32::from(eos)));
        if let Some(a) = self.check_fail(id) {
            self.after_call();
            return (a, 1);
        }
        let stopped = self.store.data().stop_iteration;
        let raw = match outcome {
            Outcome::Done(r) => u(r),
            _ => 0,
        };
        self.after_call();
        let action = if stopped || raw != 0 {
            Action::Pause
        } else {
            Action::Continue
        };
        (action, raw)
    }

    fn stream_callback2(
        &mut self,
        id: u32,
        name: &str,
        f: Option<TypedFunc<(i32, i32), i32>>,
        size: usize,
    ) -> Action {
        if let Some(a) = self.check_fail(id) {
            return a;
        }
        let outcome = self.call(name, f, id, (i(id as usize), i(size)));
        if let Some(a) = self.check_fail(id) {
            self.after_call();
            return a;
        }
        let stopped = self.store.data().stop_iteration;
        let raw = match outcome {
            Outcome::Done(r) => u(r),
            _ => 0,
        };
        self.after_call();
        if stopped || raw != 0 {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn http_mut(&mut self, id: u32) -> &mut HttpCtx {
        match self.st().http(id) {
            Some(h) => h,
            None => panic!("stream context {id} does not exist on this VM"),
        }
    }

    pub(crate) fn request_headers(&mut self, id: u32, map: HeaderMap, eos: bool) -> Action {
        let h = self.http_mut(id);
        assert!(!h.destroyed, "request_headers() after finish()");
        assert!(
            h.request_headers.is_none(),
            "request_headers() called twice on one stream"
        );
        let n = map.len();
        h.request_headers = Some(map);
        h.request_headers_live = true;
        h.end_of_stream = eos;
        self.on_create(id);
        let f = self.ex.on_request_headers.clone();
        let (action, _) = self.stream_callback(id, "proxy_on_request_headers", f, n, eos);
        let h = self.http_mut(id);
        if h.local_reply.is_none() {
            h.request_paused =
                action == Action::Pause && !h.continued.contains(&StreamType::Request);
        }
        if action == Action::Continue {
            h.request_headers_live = false;
            h.forwarded |= h.local_reply.is_none();
        }
        action
    }

    /// The test's upstream failed with Envoy response `flags` (UT 0x4, UR
    /// 0x10, UF 0x20, UC 0x40, …): the flags are added to `response.flags`
    /// and, if no response started yet, Envoy's router answers itself
    /// (`Router::Filter::onUpstreamReset`/`onUpstreamTimeoutAbort`): a 504
    /// "upstream request timeout" for UT, else a 503 "upstream connect error
    /// or disconnect/reset before headers", through this filter's response
    /// callbacks like any local reply.
    pub(crate) fn upstream_failure(&mut self, id: u32, flags: u64) {
        let h = self.http_mut(id);
        assert!(!h.logged, "upstream_failed() after finish()");
        assert!(
            h.local_reply.is_none() || h.forwarded,
            "upstream_failed(): the filter answered locally; Envoy never forwarded this request"
        );
        assert!(
            !h.request_paused,
            "upstream_failed(): the filter paused the request and never resumed it"
        );
        h.forwarded = true;
        let key = path_key(&["response", "flags"]);
        let old = match h.attributes.get(&key) {
            Some(PropertyValue::Int(v)) => *v,
            _ => 0,
        };
        h.attributes.insert(
            key,
            PropertyValue::Int(old | i64::try_from(flags).unwrap_or(i64::MAX)),
        );
        if h.response_started {
            return;
        }
        let (status, details, body): (u32, &[u8], &[u8]) = if flags & 0x4 != 0 {
            (
                504,
                b"upstream_response_timeout",
                b"upstream request timeout",
            )
        } else {
            (
                503,
                b"upstream_reset_before_response_started",
                b"upstream connect error or disconnect/reset before headers",
            )
        };
        let h = self.http_mut(id);
        let mut extra = HeaderMap::new(HeaderMapKind::ResponseHeaders);
        h.write_attempt_count(&mut extra);
        let reply = LocalReply::new(status, details, body, extra.raw_pairs().to_vec(), -1);
        self.send_local_reply(id, reply);
    }

    pub(crate) fn request_body(&mut self, id: u32, data: &[u8], eos: bool) -> Action {
        let h = self.http_mut(id);
        assert!(!h.destroyed, "request_body() after finish()");
        if !h.created || h.local_reply.is_some() {
            return Action::Continue;
        }
        if !h.request_body_buffering {
            h.request_body.clear();
        }
        h.request_body.extend_from_slice(data);
        h.request_body_live = true;
        h.end_of_stream = eos;
        let n = h.request_body.len();
        let f = self.ex.on_request_body.clone();
        let (action, raw) = self.stream_callback(id, "proxy_on_request_body", f, n, eos);
        let h = self.http_mut(id);
        h.request_body_buffering = raw == 1;
        if action == Action::Continue {
            let sent = std::mem::take(&mut h.request_body);
            h.request_body_sent.extend_from_slice(&sent);
            h.request_body_live = false;
        }
        action
    }

    pub(crate) fn request_trailers(&mut self, id: u32, map: HeaderMap) -> Action {
        let h = self.http_mut(id);
        if !h.created || h.local_reply.is_some() {
            return Action::Continue;
        }
        let n = map.len();
        h.request_trailers = Some(map);
        h.request_trailers_live = true;
        let f = self.ex.on_request_trailers.clone();
        let action = self.stream_callback2(id, "proxy_on_request_trailers", f, n);
        if action == Action::Continue {
            self.http_mut(id).request_trailers_live = false;
        }
        action
    }

    pub(crate) fn response_headers(&mut self, id: u32, map: HeaderMap, eos: bool) -> Action {
        let h = self.http_mut(id);
        assert!(!h.destroyed, "response_headers() after finish()");
        assert!(
            h.local_reply.is_none(),
            "response_headers(): the filter already sent a local reply ({:?}); Envoy never \
             forwarded this request upstream",
            h.local_reply.as_ref().map(|r| r.status)
        );
        assert!(
            !h.request_paused,
            "response_headers(): the filter paused the request and never resumed it \
             (proxy_continue_stream); Envoy would not have forwarded it upstream"
        );
        if let Some(code) = map.get(":status").and_then(|s| s.parse::<i64>().ok()) {
            h.attributes
                .insert(path_key(&["response", "code"]), PropertyValue::Int(code));
        }
        h.forwarded = true;
        let mut map = map;
        h.write_attempt_count(&mut map);
        let n = map.len();
        h.response_headers = Some(map);
        h.response_started = true;
        h.response_facts_fixed = true;
        if !h.created || h.failure_reply_sent {
            return Action::Continue;
        }
        h.response_headers_live = true;
        h.end_of_stream = eos;
        let f = self.ex.on_response_headers.clone();
        let (action, _) = self.stream_callback(id, "proxy_on_response_headers", f, n, eos);
        let h = self.http_mut(id);
        if h.local_reply.is_none() || !h.response_headers_live {
            h.response_paused = action == Action::Pause;
        }
        if action == Action::Continue {
            h.response_headers_live = false;
        }
        action
    }

    pub(crate) fn response_body(&mut self, id: u32, data: &[u8], eos: bool) -> Action {
        let h = self.http_mut(id);
        if !h.created || h.failure_reply_sent {
            h.response_body_sent.extend_from_slice(data);
            return Action::Continue;
        }
        if !h.response_body_buffering {
            h.response_body.clear();
        }
        h.response_body.extend_from_slice(data);
        h.response_body_live = true;
        h.end_of_stream = eos;
        let n = h.response_body.len();
        let f = self.ex.on_response_body.clone();
        let (action, raw) = self.stream_callback(id, "proxy_on_response_body", f, n, eos);
        let h = self.http_mut(id);
        h.response_body_buffering = raw == 1;
        if action == Action::Continue {
            let sent = std::mem::take(&mut h.response_body);
            h.response_body_sent.extend_from_slice(&sent);
            h.response_body_live = false;
        }
        action
    }

    pub(crate) fn response_trailers(&mut self, id: u32, map: HeaderMap) -> Action {
        let h = self.http_mut(id);
        if !h.created || h.failure_reply_sent {
            return Action::Continue;
        }
        let n = map.len();
        h.response_trailers = Some(map);
        h.response_trailers_live = true;
        let f = self.ex.on_response_trailers.clone();
        let action = self.stream_callback2(id, "proxy_on_response_trailers", f, n);
        if action == Action::Continue {
            self.http_mut(id).response_trailers_live = false;
        }
        action
    }

    /// End of stream: Envoy's access-log pass (`Context::log` → `proxy_on_log`)
    /// then filter destruction (`Context::onDestroy` → `proxy_on_done`, whose
    /// result is ignored for streams, then `proxy_on_delete`).
    pub(crate) fn finish(&mut self, id: u32) {
        let now = self.proxy.inner.mono_ns();
        let h = self.http_mut(id);
        if h.destroyed {
            return;
        }
        let duration_key = path_key(&["request", "duration"]);
        if !h.attributes.contains_key(&duration_key) {
            h.attributes.insert(
                duration_key,
                PropertyValue::Duration(Duration::from_nanos(now.saturating_sub(h.start_ns))),
            );
        }
        self.on_create(id);
        let h = self.http_mut(id);
        h.access_log = true;
        h.response_facts_fixed = true;
        h.logged = true;
        h.request_headers_live = false;
        h.response_headers_live = false;
        h.request_trailers_live = false;
        h.response_trailers_live = false;
        h.request_body_live = false;
        h.response_body_live = false;
        let f = self.ex.on_log.clone();
        let _ = self.call("proxy_on_log", f, id, i(id as usize));
        self.after_call();
        self.http_mut(id).access_log = false;
        let f = self.ex.on_done.clone();
        let _ = self.call("proxy_on_done", f, id, i(id as usize));
        self.after_call();
        let f = self.ex.on_delete.clone();
        let _ = self.call("proxy_on_delete", f, id, i(id as usize));
        self.after_call();
        self.http_mut(id).destroyed = true;
        self.reap_roots();
    }

    /// Takes a finished stream's context out of the VM, as Envoy frees a
    /// stream's context after `proxy_on_delete`: the VM's table then holds
    /// only live contexts, so nothing it does per call grows with the
    /// streams it has served. The [`Stream`](crate::Stream) handle keeps the
    /// context for the test's questions about the end state.
    pub(crate) fn retire(&mut self, id: u32) -> Option<Box<HttpCtx>> {
        let st = self.st();
        if !matches!(st.contexts.get(&id), Some(CtxKind::Http(h)) if h.destroyed) {
            return None;
        }
        match st.contexts.remove(&id) {
            Some(CtxKind::Http(h)) => Some(h),
            _ => None,
        }
    }

    pub(crate) fn property_of(&self, id: u32, path: &[u8]) -> Option<Vec<u8>> {
        self.store.data().get_property_of(id, path).ok()
    }

    pub(crate) fn with_http<R>(&self, id: u32, f: impl FnOnce(&HttpCtx) -> R) -> R {
        match self.store.data().http_ref(id) {
            Some(h) => f(h),
            None => panic!("stream context {id} does not exist on this VM"),
        }
    }

    pub(crate) fn with_http_mut<R>(&mut self, id: u32, f: impl FnOnce(&mut HttpCtx) -> R) -> R {
        f(self.http_mut(id))
    }
}

impl Vm {
    pub(crate) fn lock(&self) -> MutexGuard<'_, VmInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Instantiates and starts a VM. `configure` false = Envoy's base VM,
    /// which is only initialised.
    pub(crate) fn start(proxy: Proxy, label: &str, configure: bool) -> Result<Vm, StartError> {
        let module: Arc<LoadedModule> = proxy.inner.config.module.clone();
        let engine = crate::engine::engine().map_err(StartError::Load)?;
        let mut contexts = BTreeMap::new();
        contexts.insert(0, CtxKind::Vm);
        let state = HostState {
            proxy: proxy.inner.clone(),
            label: label.to_owned(),
            vm_index: 0,
            memory: None,
            malloc: None,
            contexts,
            next_context_id: 1,
            current: 0,
            effective: 0,
            restricted: None,
            stop_iteration: false,
            after_call: Vec::new(),
            metric_ids: HashMap::new(),
            next_metric_id: [0, 1, 2],
            timers: BTreeMap::new(),
            http_calls: BTreeMap::new(),
            next_http_call_id: 0,
            call_response: None,
            failed: None,
            trap_next: false,
            rng: 0,
        };
        let mut store = Store::new(engine, state);
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = module.pre.instantiate(&mut store).map_err(|e| {
            StartError::Load(format!(
                "{}: Failed to create new Wasm instance: {e:?}",
                module.name
            ))
        })?;
        let load = |e: String| StartError::Load(format!("{}: {e}", module.name));
        let memory = instance.get_memory(&mut store, "memory");
        let malloc = match typed::<i32, i32>(&instance, &mut store, "malloc").map_err(load)? {
            Some(m) => Some(m),
            None => typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")
                .map_err(load)?,
        };
        if malloc.is_none() {
            return Err(load("Wasm module is missing malloc function.".into()));
        }
        let initialize = typed(&instance, &mut store, "_initialize").map_err(load)?;
        let (main, main_void, start) = if initialize.is_some() {
            (
                typed(&instance, &mut store, "main").map_err(load)?,
                typed(&instance, &mut store, "__main_void").map_err(load)?,
                None,
            )
        } else {
            (
                None,
                None,
                typed(&instance, &mut store, "_start").map_err(load)?,
            )
        };
        let ex = Exports {
            initialize,
            start,
            main,
            main_void,
            on_context_create: typed(&instance, &mut store, "proxy_on_context_create")
                .map_err(load)?,
            on_vm_start: typed(&instance, &mut store, "proxy_on_vm_start").map_err(load)?,
            on_configure: typed(&instance, &mut store, "proxy_on_configure").map_err(load)?,
            on_tick: typed(&instance, &mut store, "proxy_on_tick").map_err(load)?,
            on_request_headers: typed(&instance, &mut store, "proxy_on_request_headers")
                .map_err(load)?,
            on_request_body: typed(&instance, &mut store, "proxy_on_request_body").map_err(load)?,
            on_request_trailers: typed(&instance, &mut store, "proxy_on_request_trailers")
                .map_err(load)?,
            on_response_headers: typed(&instance, &mut store, "proxy_on_response_headers")
                .map_err(load)?,
            on_response_body: typed(&instance, &mut store, "proxy_on_response_body")
                .map_err(load)?,
            on_response_trailers: typed(&instance, &mut store, "proxy_on_response_trailers")
                .map_err(load)?,
            on_done: typed(&instance, &mut store, "proxy_on_done").map_err(load)?,
            on_log: typed(&instance, &mut store, "proxy_on_log").map_err(load)?,
            on_delete: typed(&instance, &mut store, "proxy_on_delete").map_err(load)?,
            on_http_call_response: typed(&instance, &mut store, "proxy_on_http_call_response")
                .map_err(load)?,
            on_queue_ready: typed(&instance, &mut store, "proxy_on_queue_ready").map_err(load)?,
        };
        {
            let st = store.data_mut();
            st.memory = memory;
            st.malloc = malloc;
        }
        let inner = Arc::new(Mutex::new(VmInner {
            store,
            ex,
            proxy: proxy.clone(),
            root: 0,
            successor: None,
            generation: 0,
        }));
        let index = proxy.register_vm(&inner);
        let vm = Vm { inner };
        {
            let mut g = vm.lock();
            g.st().vm_index = index;
            // Envoy's random_get is RAND_bytes: different in every VM and
            // every run. One splitmix64 stream per VM from the run's seed.
            let seed = proxy.random_seed();
            g.st().rng = seed ^ (index as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F);
            // WasmBase::startVm: _initialize then main()/__main_void(), or _start,
            // with only a few host functions allowed.
            g.st().restricted = Some(STARTUP_ALLOWED);
            let f = g.ex.initialize.clone();
            let mut trapped = matches!(g.call("_initialize", f, 0, ()), Outcome::Trapped);
            if !trapped {
                if g.ex.main.is_some() {
                    let f = g.ex.main.clone();
                    trapped = matches!(g.call("main", f, 0, (0, 0)), Outcome::Trapped);
                } else {
                    let f = g.ex.main_void.clone();
                    trapped = matches!(g.call("__main_void", f, 0, ()), Outcome::Trapped);
                }
                let f = g.ex.start.clone();
                trapped = trapped || matches!(g.call("_start", f, 0, ()), Outcome::Trapped);
            }
            g.st().restricted = None;
            if trapped {
                return Err(g.trap_error());
            }
            if configure {
                let config = proxy.plugin_config();
                let root = g.create_root(config)?;
                g.root = root;
            }
        }
        Ok(vm)
    }

    pub(crate) fn reconfigure_root(&self, config: &[u8]) -> Result<(), StartError> {
        let mut g = self.lock();
        if g.root == 0 || g.failed() {
            return Ok(());
        }
        let old = g.root;
        let new = g.create_root(config.to_vec())?;
        g.root = new;
        if let Some(r) = g.st().root(old) {
            r.state = RootState::Draining;
        }
        g.reap_roots();
        Ok(())
    }

    /// The label used in logs (`"main"`, `"worker_0"`, …).
    pub fn label(&self) -> String {
        self.lock().store.data().label.clone()
    }

    /// The [`Proxy`] this VM belongs to.
    pub fn proxy(&self) -> Proxy {
        self.lock().proxy.clone()
    }

    /// The id of the root context new streams attach to (1 for the first).
    pub fn root_context_id(&self) -> u32 {
        self.lock().root
    }

    /// Opens an HTTP stream on this VM. Like Envoy, the context is created in
    /// the plugin (`proxy_on_context_create(id, root_id)`) lazily, right
    /// before the first callback.
    pub fn stream(&self) -> Stream {
        let current = self.current();
        if current.reload_if_failed() {
            return self.stream();
        }
        if !Arc::ptr_eq(&current.inner, &self.inner) {
            return current.stream();
        }
        let root = self.lock().root;
        self.stream_on(root)
    }

    fn stream_on(&self, root: u32) -> Stream {
        let mut g = self.lock();
        let now = g.proxy.inner.mono_ns();
        let wall = g.proxy.inner.now_ns();
        assert!(root != 0, "this VM has no plugin root context (base VM?)");
        assert!(
            g.store.data().live_context(root)
                && matches!(g.store.data().contexts.get(&root), Some(CtxKind::Root(_))),
            "root context {root} does not exist on this VM"
        );
        let id = g.alloc_context(CtxKind::Http(Box::new(HttpCtx::new(root, now, wall))));
        Stream::new(self.clone(), id)
    }

    /// Another plugin configuration served by this VM: in Envoy every filter
    /// config with the same `vm_id` and code shares one VM per thread (and
    /// one shared-data namespace); `WasmBase::start(plugin)` gives each its
    /// own root context (`proxy_on_context_create`, `proxy_on_vm_start`,
    /// `proxy_on_configure`). Returns its root context id, for
    /// [`stream_for`](Self::stream_for). Shared data, queues and metrics are
    /// the proxy's, so both plugins see the same ones.
    pub fn add_plugin(&self, plugin_config: impl Into<Vec<u8>>) -> Result<u32, StartError> {
        let current = self.current();
        let mut g = current.lock();
        g.create_root(plugin_config.into())
    }

    /// Opens a stream of the plugin whose root context is `root_context_id`
    /// (from [`add_plugin`](Self::add_plugin) or [`root_context_id`](Self::root_context_id)).
    pub fn stream_for(&self, root_context_id: u32) -> Stream {
        self.current().stream_on(root_context_id)
    }

    /// Streams whose context the VM still holds: opened and not finished.
    /// A finished stream's context is freed from the VM (its handle keeps
    /// it), as Envoy frees it after `proxy_on_delete`.
    pub fn live_streams(&self) -> usize {
        self.lock()
            .store
            .data()
            .contexts
            .values()
            .filter(|c| matches!(c, CtxKind::Http(_)))
            .count()
    }

    /// The trap that killed this VM, if any. (After a `FailReload` reload
    /// the worker's handle speaks for the fresh VM: see [`current`](Self::current).)
    pub fn trapped(&self) -> Option<TrapInfo> {
        self.current().lock().store.data().failed.clone()
    }

    /// The VM this worker runs now: this one, or the one that replaced it
    /// after a trap under [`TrapPolicy::FailReload`]. Streams opened before
    /// the reload stay on the VM they were opened on.
    pub fn current(&self) -> Vm {
        let mut vm = self.clone();
        loop {
            let next = vm.lock().successor.clone();
            match next {
                Some(next) => vm = next,
                None => return vm,
            }
        }
    }

    /// How many times this worker's VM was reloaded after a trap.
    pub fn reloads(&self) -> u32 {
        self.current().lock().generation
    }

    /// Test hook: the next guest call into this VM (any callback, including
    /// `malloc` for a returned buffer) traps, as a Rust panic in the plugin
    /// would. With [`TrapPolicy::Panic`] that panics the test.
    pub fn trap_next_call(&self) {
        self.current().lock().st().trap_next = true;
    }

    /// `FailReload`: replaces a failed VM by a fresh one (returns whether it
    /// did). Envoy: `PluginConfig::maybeReloadHandleIfNeeded`, called when a
    /// new stream's filter is created.
    fn reload_if_failed(&self) -> bool {
        let (proxy, label, generation) = {
            let g = self.lock();
            if !g.failed() || g.successor.is_some() || g.policy() != TrapPolicy::FailReload {
                return false;
            }
            (g.proxy.clone(), g.store.data().label.clone(), g.generation)
        };
        proxy.inner.log(
            &label,
            LogLevel::Warn,
            LogSource::Host,
            "Wasm VM failed: reloading it (failure_policy FAIL_RELOAD)".into(),
        );
        match Vm::start(proxy, &label, true) {
            Ok(fresh) => {
                fresh.lock().generation = generation + 1;
                self.lock().successor = Some(fresh);
                true
            }
            // The fresh VM failed to start: the worker stays failed (closed).
            Err(_) => false,
        }
    }

    /// Calls `proxy_on_tick` on every root context that set a tick period,
    /// now, and re-arms their timers from now. (Time-driven ticking is
    /// [`Proxy::advance`].)
    pub fn tick(&self) {
        let current = self.current();
        if !Arc::ptr_eq(&current.inner, &self.inner) {
            return current.tick();
        }
        let mut g = self.lock();
        let now = g.proxy.inner.mono_ns();
        let roots: Vec<u32> = g.store.data().timers.keys().copied().collect();
        for root in roots {
            g.fire_tick(root, now);
        }
    }

    /// The current tick period of the active root context, if set.
    pub fn tick_period(&self) -> Option<Duration> {
        let g = self.lock();
        g.store
            .data()
            .timers
            .get(&g.root)
            .map(|t| Duration::from_nanos(t.period_ns))
    }

    pub(crate) fn next_tick_due(&self) -> Option<u64> {
        let g = self.lock();
        if g.failed() {
            return None;
        }
        g.store.data().timers.values().map(|t| t.due_ns).min()
    }

    pub(crate) fn fire_due_ticks(&self, now: u64) {
        let mut g = self.lock();
        let due: Vec<u32> = g
            .store
            .data()
            .timers
            .iter()
            .filter(|(_, t)| t.due_ns <= now)
            .map(|(id, _)| *id)
            .collect();
        for root in due {
            g.fire_tick(root, now);
        }
    }

    pub(crate) fn queue_ready(&self, context_id: u32, token: u32) {
        let mut g = self.lock();
        if !g.store.data().live_context(context_id) {
            return;
        }
        let f = g.ex.on_queue_ready.clone();
        let _ = g.call(
            "proxy_on_queue_ready",
            f,
            context_id,
            (i(context_id as usize), token as i32),
        );
        g.after_call();
    }

    /// Shuts the VM's plugin down like Envoy on config removal or exit:
    /// `proxy_on_done` on every root context, then `proxy_on_delete` for
    /// those that returned true (the others wait for `proxy_done`).
    pub fn shutdown(&self) {
        let mut g = self.lock();
        let roots: Vec<u32> = g
            .store
            .data()
            .contexts
            .iter()
            .filter_map(|(id, c)| {
                matches!(c, CtxKind::Root(r) if r.state != RootState::PendingDone).then_some(*id)
            })
            .collect();
        for root in roots {
            g.shutdown_root(root);
        }
        g.root = 0;
    }

    /// Delivers the response to a pending `http_call` (see
    /// [`Proxy::http_calls`]): `proxy_on_http_call_response(root, token, …)`.
    /// Envoy issues calls on the root context, so that is the context called.
    pub fn respond_http_call(
        &self,
        token: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        trailers: &[(&str, &str)],
    ) {
        let mut g = self.lock();
        let Some(call) = g.st().http_calls.remove(&token) else {
            panic!("no pending http_call with token {token} on this VM");
        };
        let root = g.store.data().root_of(call.context_id);
        let response = CallResponse {
            headers: HeaderMap::from_pairs(HeaderMapKind::Generic, headers),
            body: body.to_vec(),
            trailers: HeaderMap::from_pairs(HeaderMapKind::Generic, trailers),
        };
        let (nh, nb, nt) = (
            response.headers.len(),
            response.body.len(),
            response.trailers.len(),
        );
        g.st().call_response = Some(response);
        let f = g.ex.on_http_call_response.clone();
        let _ = g.call(
            "proxy_on_http_call_response",
            f,
            root,
            (i(root as usize), token as i32, i(nh), i(nb), i(nt)),
        );
        g.st().call_response = None;
        g.after_call();
    }

    /// Fails a pending `http_call` like an upstream reset: `proxy_get_status`
    /// reports `BrokenConnection` ("reset") and sizes are 0.
    pub fn fail_http_call(&self, token: u32) {
        let mut g = self.lock();
        let Some(call) = g.st().http_calls.remove(&token) else {
            panic!("no pending http_call with token {token} on this VM");
        };
        let root = g.store.data().root_of(call.context_id);
        if let Some(r) = g.st().root(root) {
            r.status = (11, b"reset".to_vec()); // WasmResult::BrokenConnection
        }
        let f = g.ex.on_http_call_response.clone();
        let _ = g.call(
            "proxy_on_http_call_response",
            f,
            root,
            (i(root as usize), token as i32, 0, 0, 0),
        );
        if let Some(r) = g.st().root(root) {
            r.status = (0, Vec::new());
        }
        g.after_call();
    }

    /// Metric ids this VM handed out, by name (Envoy gives every VM its own
    /// ids; the stat behind them is shared by name).
    pub fn metric_ids(&self) -> Vec<(u32, String)> {
        let g = self.lock();
        let mut ids: Vec<(u32, String)> = g
            .store
            .data()
            .metric_ids
            .iter()
            .map(|(id, (name, _))| (*id, name.clone()))
            .collect();
        ids.sort();
        ids
    }

    /// Bytes of guest linear memory (to spot leaks across many streams).
    pub fn memory_size(&self) -> usize {
        let g = self.lock();
        match g.store.data().memory {
            Some(m) => m.data_size(&g.store),
            None => 0,
        }
    }
}

impl VmInner {
    fn fire_tick(&mut self, root: u32, now: u64) {
        if !self.store.data().live_context(root) {
            self.st().timers.remove(&root);
            return;
        }
        let f = self.ex.on_tick.clone();
        let _ = self.call("proxy_on_tick", f, root, i(root as usize));
        self.after_call();
        // Wasm::tickHandler re-arms the timer with the (possibly new) period.
        if let Some(t) = self.st().timers.get_mut(&root) {
            t.due_ns = now.saturating_add(t.period_ns);
        }
    }
}

impl HttpCtx {
    fn new(root_id: u32, now: u64, wall: u64) -> Self {
        Self {
            root_id,
            created: false,
            destroyed: false,
            start_ns: now,
            start_wall_ns: wall,
            end_of_stream: false,
            access_log: false,
            request_headers: None,
            request_headers_live: false,
            request_trailers: None,
            request_trailers_live: false,
            request_body: Vec::new(),
            request_body_live: false,
            request_body_buffering: false,
            request_body_sent: Vec::new(),
            response_headers: None,
            response_headers_live: false,
            response_trailers: None,
            response_trailers_live: false,
            response_body: Vec::new(),
            response_body_live: false,
            response_body_buffering: false,
            response_body_sent: Vec::new(),
            response_started: false,
            local_reply: None,
            failure_reply_sent: false,
            stream_failed: false,
            request_paused: false,
            response_paused: false,
            continued: Vec::new(),
            closed: Vec::new(),
            filter_state: HashMap::new(),
            attributes: HashMap::new(),
            route_cache_clears: 0,
            clear_route_cache_calls: 0,
            forwarded: false,
            response_facts_fixed: false,
            logged: false,
            include_attempt_count_in_response: false,
        }
    }
}
