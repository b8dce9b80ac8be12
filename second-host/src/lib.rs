//! Sluice on a second, independent proxy-wasm host: [`proxy-wasm-host`]
//! 0.2.0 (ABI 0.2.1, wasmtime 49, a port of MOSN's Go host), which nobody
//! on this project wrote.
//!
//! `proxy-wasm-host` is a library: it links the 39 `env` host functions and
//! the eight WASI functions of the ABI, marshals guest memory, encodes header
//! maps, keeps contexts, shared data and metrics, and answers the plugin
//! properties; the proxy that embeds it lends each request as a
//! [`StreamState`] and drives the callbacks. This crate is that proxy, kept
//! as thin as an embedder can be:
//!
//! - header maps are the crate's own [`VecHeaderMap`], filled with
//!   lower-cased names as an HTTP/2 codec (and Envoy) gives them, request
//!   headers writable in `proxy_on_request_headers`, readable in
//!   `proxy_on_log`, likewise response headers;
//! - shared data and metrics are the crate's [`InMemoryStore`], observed on
//!   the way through so that tests can read counters;
//! - logs, the clock (the crate's `SystemClock`) and WASI (`random_get` is
//!   the OS's `getrandom`) are the crate's;
//! - properties and foreign functions are NOT served (the crate's default
//!   answer, `NOT_FOUND`), only recorded, so the tests show what Sluice does
//!   without them; `proxy_send_local_response` is served (recorded) unless a
//!   test turns it off ([`Serve`]);
//! - the tick timer is the embedder's: [`Worker::tick`] fires
//!   `proxy_on_tick` when the root asked for a period.
//!
//! [`proxy-wasm-host`]: https://crates.io/crates/proxy-wasm-host

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

pub use proxy_wasm_host::abi::v0_2_1::types::{Action, LogLevel, MapType, MetricType, Status};
use proxy_wasm_host::abi::v0_2_1::{
    Access, Callback, ContextId, ForeignCall, Guest, GuestError, GuestId, Host, InMemoryStore,
    Invocation, LocalResponse, LogContext, LogSink, MetricId, PluginConfig, QueueId,
    SharedServices, SharedValue, Started, StreamKind, StreamState, VmServices,
};
use proxy_wasm_host::{Engine, HeaderMap, HeaderMapExt, Limits, Module, VecHeaderMap};

/// The VM id every worker of a [`SecondHost`] runs under: one shared-data
/// and metrics namespace, as one Envoy `vm_id`.
pub const VM_ID: &str = "sluice";

/// Where the tests find `sluice.wasm`: `$SLUICE_WASM` if set, else
/// `<repository>/target/wasm32-wasip1/release/sluice.wasm`.
pub fn sluice_wasm_path() -> PathBuf {
    if let Some(path) = std::env::var_os("SLUICE_WASM") {
        return PathBuf::from(path);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("wasm32-wasip1")
        .join("release")
        .join("sluice.wasm")
}

/// Why a host or a worker could not be made.
#[derive(Debug)]
pub enum Failure {
    /// `sluice.wasm` could not be read.
    Read(PathBuf, std::io::Error),
    /// The crate refused the module or the engine.
    Runtime(proxy_wasm_host::Error),
    /// A callback failed (a trap, a limit, a refused context).
    Guest(GuestError),
    /// The plugin answered false in `proxy_on_configure` (or `on_vm_start`).
    Refused {
        /// The callback that answered false.
        callback: Callback,
        /// What the VM logged.
        logs: Vec<String>,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Read(path, err) => write!(
                f,
                "cannot read {}: {err} (build it with `cargo build --release \
                 --target wasm32-wasip1 -p sluice`, or point SLUICE_WASM at a build)",
                path.display()
            ),
            Failure::Runtime(err) => write!(f, "proxy-wasm-host: {err}"),
            Failure::Guest(err) => write!(f, "guest: {err}"),
            Failure::Refused { callback, logs } => {
                write!(f, "refused in {callback}; logs: {logs:?}")
            }
        }
    }
}

impl std::error::Error for Failure {}

impl From<GuestError> for Failure {
    fn from(err: GuestError) -> Self {
        Failure::Guest(err)
    }
}

impl From<proxy_wasm_host::Error> for Failure {
    fn from(err: proxy_wasm_host::Error) -> Self {
        Failure::Runtime(err)
    }
}

/// The engine and the compiled module, once per test binary (Cranelift
/// compiles sluice.wasm in a second or two).
fn compiled() -> Result<&'static (Engine, Module), Failure> {
    static COMPILED: OnceLock<(Engine, Module)> = OnceLock::new();
    if let Some(compiled) = COMPILED.get() {
        return Ok(compiled);
    }
    let path = sluice_wasm_path();
    let bytes = std::fs::read(&path).map_err(|err| Failure::Read(path, err))?;
    let engine = Engine::new()?;
    let module = Module::new(&engine, &bytes)?;
    Ok(COMPILED.get_or_init(|| (engine, module)))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every line the guests logged (`proxy_log` and WASI `fd_write`), also
/// echoed to stderr (libtest shows it for a failing test).
#[derive(Debug, Default)]
pub struct Logs {
    lines: Mutex<Vec<(LogLevel, String)>>,
}

impl LogSink for Logs {
    fn log(&self, _: LogContext<'_>, level: LogLevel, message: &[u8]) {
        let line = String::from_utf8_lossy(message).into_owned();
        eprintln!("[second-host {level:?}] {line}");
        lock(&self.lines).push((level, line));
    }
}

impl Logs {
    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines)
            .iter()
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Whether a line contains `text`.
    pub fn contains(&self, text: &str) -> bool {
        lock(&self.lines)
            .iter()
            .any(|(_, line)| line.contains(text))
    }
}

/// The crate's [`InMemoryStore`], with the metric names it was asked to
/// define kept on the way through: the store itself gives no read of a
/// metric by name.
#[derive(Debug, Default)]
pub struct Shared {
    store: InMemoryStore,
    metrics: Mutex<BTreeMap<Vec<u8>, (MetricType, MetricId)>>,
}

impl Shared {
    /// The value of the metric `name` (a counter's sum, a gauge's level),
    /// `None` if no guest defined it.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let (_, id) = *lock(&self.metrics).get(name.as_bytes())?;
        let call = Invocation::new(GuestId::next(), ContextId::try_from(1).ok()?);
        self.store.get_metric(call, id).ok()
    }

    /// The names of every metric defined so far.
    pub fn metric_names(&self) -> Vec<String> {
        lock(&self.metrics)
            .keys()
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect()
    }

    /// A shared-data value, as the guests of [`VM_ID`] see it.
    pub fn data(&self, key: &str) -> Option<SharedValue> {
        let call = Invocation::new(GuestId::next(), ContextId::try_from(1).ok()?);
        self.store
            .get_shared_data(call, VM_ID.as_bytes(), key.as_bytes())
            .ok()
    }
}

impl SharedServices for Shared {
    fn get_shared_data(
        &self,
        call: Invocation,
        vm_id: &[u8],
        key: &[u8],
    ) -> Result<SharedValue, Status> {
        self.store.get_shared_data(call, vm_id, key)
    }

    fn set_shared_data(
        &self,
        call: Invocation,
        vm_id: &[u8],
        key: &[u8],
        value: &[u8],
        cas: Option<u32>,
    ) -> Result<(), Status> {
        self.store.set_shared_data(call, vm_id, key, value, cas)
    }

    fn register_shared_queue(
        &self,
        call: Invocation,
        vm_id: &[u8],
        name: &[u8],
    ) -> Result<QueueId, Status> {
        self.store.register_shared_queue(call, vm_id, name)
    }

    fn resolve_shared_queue(
        &self,
        call: Invocation,
        vm_id: &[u8],
        name: &[u8],
    ) -> Result<QueueId, Status> {
        self.store.resolve_shared_queue(call, vm_id, name)
    }

    fn enqueue_shared_queue(
        &self,
        call: Invocation,
        queue: QueueId,
        value: &[u8],
    ) -> Result<(), Status> {
        self.store.enqueue_shared_queue(call, queue, value)
    }

    fn dequeue_shared_queue(&self, call: Invocation, queue: QueueId) -> Result<Vec<u8>, Status> {
        self.store.dequeue_shared_queue(call, queue)
    }

    fn define_metric(
        &self,
        call: Invocation,
        vm_id: &[u8],
        kind: MetricType,
        name: &[u8],
    ) -> Result<MetricId, Status> {
        let id = self.store.define_metric(call, vm_id, kind, name)?;
        lock(&self.metrics).insert(name.to_vec(), (kind, id));
        Ok(id)
    }

    fn record_metric(&self, call: Invocation, metric: MetricId, value: u64) -> Result<(), Status> {
        self.store.record_metric(call, metric, value)
    }

    fn increment_metric(
        &self,
        call: Invocation,
        metric: MetricId,
        delta: i64,
    ) -> Result<(), Status> {
        self.store.increment_metric(call, metric, delta)
    }

    fn get_metric(&self, call: Invocation, metric: MetricId) -> Result<u64, Status> {
        self.store.get_metric(call, metric)
    }
}

/// One proxy process on proxy-wasm-host: a log sink and one shared store
/// for every worker VM it starts.
pub struct SecondHost {
    host: Host,
    module: Module,
    /// Every guest's log lines.
    pub logs: Arc<Logs>,
    /// Shared data and metrics of every worker (one [`VM_ID`]).
    pub shared: Arc<Shared>,
}

impl SecondHost {
    /// Loads `sluice.wasm` ([`sluice_wasm_path`]); the module is compiled
    /// once per test binary.
    pub fn new() -> Result<Self, Failure> {
        let (engine, module) = compiled()?;
        Ok(SecondHost {
            host: Host::new(engine)?,
            module: module.clone(),
            logs: Arc::new(Logs::default()),
            shared: Arc::new(Shared::default()),
        })
    }

    /// A worker VM: a new instance (`_initialize`), a root context with root
    /// id `sluice`, `proxy_on_vm_start`, then `proxy_on_configure` with
    /// `config` as the plugin configuration. A refused config is
    /// [`Failure::Refused`].
    pub fn worker(&self, config: &str) -> Result<Worker, Failure> {
        let services = VmServices::new(self.logs.clone())
            .with_vm_id(VM_ID)
            .with_shared(self.shared.clone());
        // The crate's default limits, but 10 s instead of 1 s of wall-clock
        // time per guest call (as the fake's runaway watchdog): a loaded CI
        // machine can deschedule a test thread for longer than a second.
        let limits = Limits::default().with_cpu_time(Duration::from_secs(10));
        let mut guest = Guest::new(&self.host, &self.module, services, &limits)?;
        let plugin = PluginConfig::new()
            .with_name("sluice")
            .with_root_id("sluice")
            .with_configuration(config.as_bytes().to_vec());
        match guest.start(plugin)? {
            Started::Serving(root) => Ok(Worker { guest, root }),
            Started::Refused { callback, .. } => Err(Failure::Refused {
                callback,
                logs: self.logs.lines(),
            }),
        }
    }
}

/// What the embedder serves beyond the header maps (see [`Request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serve {
    /// Request and response header maps; without them every header call is
    /// `BAD_ARGUMENT` (the crate's default for an unserved map).
    pub header_maps: bool,
    /// `proxy_send_local_response`; without it `UNIMPLEMENTED` (the crate's
    /// default).
    pub local_response: bool,
}

impl Default for Serve {
    fn default() -> Self {
        Serve {
            header_maps: true,
            local_response: true,
        }
    }
}

/// One request, lent to the guest for its callbacks: the embedder's side
/// of the ABI.
#[derive(Debug, Default)]
pub struct Request {
    /// What the embedder serves.
    pub serve: Serve,
    /// The request headers (what the router sees after the filter).
    pub request_headers: VecHeaderMap,
    /// The response headers, once the upstream answered.
    pub response_headers: VecHeaderMap,
    /// The local reply the guest asked for, if any.
    pub local_reply: Option<LocalResponse<'static>>,
    /// Every property path the guest asked for (segments joined by `.`);
    /// none is served, the guest got `NOT_FOUND`.
    pub properties_asked: Vec<String>,
    /// Every foreign function the guest called (e.g. `clear_route_cache`);
    /// none is served, the guest got `NOT_FOUND`.
    pub foreign_calls: Vec<String>,
}

impl Request {
    /// A request with these headers, names lower-cased as an HTTP/2 codec
    /// and Envoy give them to a filter.
    pub fn new(headers: &[(&str, &str)]) -> Self {
        Request::from_pairs(
            headers
                .iter()
                .map(|(name, value)| {
                    (
                        name.to_ascii_lowercase().into_bytes(),
                        value.as_bytes().to_vec(),
                    )
                })
                .collect(),
        )
    }

    /// A request with exactly these pairs (no lower-casing).
    pub fn from_pairs(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Request {
            request_headers: VecHeaderMap::from(pairs),
            ..Request::default()
        }
    }

    /// Every value of a request header, in order.
    pub fn request_header_values(&self, name: &str) -> Vec<String> {
        self.request_headers
            .get_all(name.as_bytes())
            .into_iter()
            .map(|value| String::from_utf8_lossy(&value).into_owned())
            .collect()
    }

    /// The first value of a request header.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_header_values(name).into_iter().next()
    }
}

impl StreamState for Request {
    fn header_map(
        &mut self,
        call: Invocation,
        access: Access,
        map: MapType,
    ) -> Result<&mut dyn HeaderMap, Status> {
        if !self.serve.header_maps {
            return Err(Status::BadArgument);
        }
        // As Envoy: a map is writable in its own callback and readable in
        // `proxy_on_log`.
        match (map, call.callback, access) {
            (MapType::HttpRequestHeaders, Some(Callback::RequestHeaders), _)
            | (MapType::HttpRequestHeaders, Some(Callback::Log), Access::Read) => {
                Ok(&mut self.request_headers)
            }
            (MapType::HttpResponseHeaders, Some(Callback::ResponseHeaders), _)
            | (MapType::HttpResponseHeaders, Some(Callback::Log), Access::Read) => {
                Ok(&mut self.response_headers)
            }
            _ => Err(Status::BadArgument),
        }
    }

    fn send_local_response(
        &mut self,
        _: Invocation,
        response: LocalResponse<'_>,
    ) -> Result<(), Status> {
        if !self.serve.local_response {
            return Err(Status::Unimplemented);
        }
        self.local_reply = Some(response.into_owned());
        Ok(())
    }

    fn property(&mut self, _: Invocation, path: &[&[u8]], _: &mut Vec<u8>) -> Result<(), Status> {
        let path: Vec<String> = path
            .iter()
            .map(|segment| String::from_utf8_lossy(segment).into_owned())
            .collect();
        self.properties_asked.push(path.join("."));
        Err(Status::NotFound)
    }

    fn call_foreign_function(
        &mut self,
        _: Invocation,
        request: ForeignCall<'_>,
        _: &mut Vec<u8>,
    ) -> Result<(), Status> {
        self.foreign_calls
            .push(String::from_utf8_lossy(&request.name).into_owned());
        Err(Status::NotFound)
    }
}

/// A request after its whole lifecycle on a worker.
#[derive(Debug)]
pub struct Exchange {
    /// What `proxy_on_request_headers` answered.
    pub action: Action,
    /// The request as the filter left it (what the router would route), and
    /// everything the guest asked of the embedder.
    pub request: Request,
}

impl Exchange {
    /// The steering header the router would follow (its first value).
    pub fn steered(&self) -> Option<String> {
        self.request.request_header("x-sluice-cluster")
    }
}

/// One worker VM (one `Guest`) with its root context.
pub struct Worker {
    guest: Guest,
    root: ContextId,
}

impl Worker {
    /// A request through `proxy_on_request_headers`; unless the filter
    /// stopped it, the upstream answers `status`
    /// (`proxy_on_response_headers`); then `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete` (the crate requires the ABI's order: done before
    /// log; Envoy logs first, Sluice exports no `proxy_on_done`).
    pub fn exchange(&mut self, mut request: Request, status: &str) -> Result<Exchange, Failure> {
        let root = self.root;
        let count = u32::try_from(request.request_headers.len()).unwrap_or(u32::MAX);
        let status = status.to_owned();
        // The embedder keeps what the guest left in the request map when it
        // passed the request on (the router's view), whatever later
        // callbacks do.
        let mut routed = VecHeaderMap::default();
        let (answer, back) = self.guest.with(std::mem::take(&mut request), |scope| {
            let stream = scope.on_context_create(Some(root))?;
            scope.expect_stream_kind(stream, StreamKind::Http)?;
            let action = scope.on_request_headers(stream, count, true)?;
            routed = scope.stream().request_headers.clone();
            if action == Action::Continue && scope.stream().local_reply.is_none() {
                scope.stream_mut().response_headers =
                    VecHeaderMap::from(vec![(b":status".to_vec(), status.into_bytes())]);
                scope.on_response_headers(stream, 1, true)?;
            }
            scope.on_done(stream)?;
            scope.on_log(stream)?;
            scope.on_delete(stream)?;
            Ok::<_, GuestError>(action)
        });
        let action = answer?;
        let mut request = back;
        request.request_headers = routed;
        Ok(Exchange { action, request })
    }

    /// [`Worker::exchange`] of a plain request to `shop.local` with these
    /// extra headers, answered 200.
    pub fn send(&mut self, extra: &[(&str, &str)]) -> Result<Exchange, Failure> {
        let mut headers = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "shop.local"),
            (":path", "/"),
        ];
        headers.extend_from_slice(extra);
        self.exchange(Request::new(&headers), "200")
    }

    /// The tick period the root asked for (`proxy_set_tick_period_milliseconds`).
    pub fn tick_period(&self) -> Option<Duration> {
        self.guest.tick_period(self.root)
    }

    /// Fires `proxy_on_tick` if the root asked for ticks (the crate runs no
    /// timer: the embedder does). Returns whether it fired.
    pub fn tick(&mut self) -> Result<bool, Failure> {
        if self.tick_period().is_none() {
            return Ok(false);
        }
        let root = self.root;
        self.guest.enter_root().on_tick(root)?;
        Ok(true)
    }

    /// Whether the guest trapped or ran out of a limit (it then serves
    /// nothing more).
    pub fn is_poisoned(&self) -> bool {
        self.guest.is_poisoned()
    }
}
