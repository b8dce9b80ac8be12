//! A host in memory for the engine, shared by the native tests, the fuzz
//! targets and the benchmarks, so that each of them drives the engine that
//! ships rather than a copy of its logic.
//!
//! - `FaultyStore`: Envoy's shared-data rules (`shared::MemoryStore`), plus
//!   CAS races lost on demand and a log of every write, so an oracle can
//!   check each state change against what the engine reported;
//!   `Interleaved`: another writer slipped in between a read and its write.
//! - `FakeHost`: one VM's view of the host: the shared store and clock
//!   (both shared with the other simulated VMs), its own randomness, the
//!   state of each stream (request headers as the filter left them,
//!   response facts, a local reply), metrics, and every host crossing
//!   counted.
//! - `Vm`: a `Worker` with its `FakeHost`, driven through the proxy-wasm
//!   lifecycle one callback at a time.
//!
//! Nothing here is used by the shell, so none of it reaches `sluice.wasm`
//! (the linker drops it).

use crate::breaker::Transition;
use crate::engine::{HeadersAction, Host, MetricKind, Observed, Property, Worker};
use crate::retry::{Budget, Landed, Lease, Reservation};
use crate::shared::{CasMismatch, MemoryStore, SharedStore};
use crate::sticky::Rng;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// A successful write to the store: the key, and its bytes before and after.
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    pub old: Option<Vec<u8>>,
    pub new: Vec<u8>,
}

/// Envoy's shared data for every simulated VM of a process, with CAS races
/// lost on demand and every write logged.
#[derive(Debug, Default)]
pub struct FaultyStore {
    inner: MemoryStore,
    fail_next: Cell<u32>,
    writes: RefCell<Vec<Write>>,
    /// Every read (`get`), by any VM.
    pub reads: Cell<u64>,
}

impl FaultyStore {
    /// The next `count` writes lose their CAS race, whatever their token.
    pub fn lose_next_writes(&self, count: u32) {
        self.fail_next.set(count);
    }

    /// The writes since the last call.
    pub fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.borrow_mut())
    }

    pub fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        self.inner.get(key).map(|(bytes, _)| bytes)
    }
}

impl SharedStore for FaultyStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.reads.set(self.reads.get() + 1);
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let failing = self.fail_next.get();
        if failing > 0 {
            self.fail_next.set(failing - 1);
            return Err(CasMismatch);
        }
        let old = self.inner.get(key).map(|(bytes, _)| bytes);
        self.inner.set(key, value, cas)?;
        self.writes.borrow_mut().push(Write {
            key: key.to_string(),
            old,
            new: value.to_vec(),
        });
        Ok(())
    }
}

/// A store in which another writer runs between a `get` and the `set` that
/// follows it, once: the interleaving CAS exists to survive. `meddle` is
/// that other writer (it writes to `inner` itself).
pub struct Interleaved<'a, S: SharedStore> {
    pub inner: &'a S,
    meddle: RefCell<Option<Box<dyn FnOnce() + 'a>>>,
}

impl<'a, S: SharedStore> Interleaved<'a, S> {
    pub fn new(inner: &'a S, meddle: impl FnOnce() + 'a) -> Self {
        Interleaved {
            inner,
            meddle: RefCell::new(Some(Box::new(meddle))),
        }
    }
}

impl<S: SharedStore> SharedStore for Interleaved<'_, S> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let found = self.inner.get(key);
        let meddle = self.meddle.borrow_mut().take();
        if let Some(meddle) = meddle {
            meddle();
        }
        found
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        self.inner.set(key, value, cas)
    }
}

/// A local reply the engine sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The gRPC status asked for (Envoy then answers a gRPC request
    /// trailers-only with HTTP 200 and this `grpc-status`).
    pub grpc_status: Option<u32>,
}

impl LocalReply {
    /// The first value of a header of the reply.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_str())
    }
}

/// One stream as the host sees it.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    /// The request headers, lower-case names, as the filter left them.
    pub request_headers: Vec<(String, Vec<u8>)>,
    /// The response headers as they reached the filter (`None`: none did,
    /// e.g. a reset): the upstream's, with the router's
    /// `x-envoy-attempt-count` written over them when the route asks for it
    /// (`Vm::route_writes_attempt_count`).
    pub response_headers: Option<Vec<(String, Vec<u8>)>>,
    /// The `response.code` property.
    pub response_code: Option<u64>,
    /// The `response.flags` property.
    pub response_flags: Option<u64>,
    /// The `upstream.request_attempt_count` property.
    pub attempts: Option<u64>,
    /// The `response.grpc_status` property.
    pub grpc_status: Option<u64>,
    pub local_reply: Option<LocalReply>,
    /// Request-header writes and removals on this stream.
    pub header_changes: u32,
    /// Calls of `clear_route_cache` for this stream (answered or not).
    pub route_cache_clears: u32,
    /// `header_changes` when `clear_route_cache` was last called: equal to
    /// it when no change came after the clear.
    pub changes_before_clear: Option<u32>,
}

impl StreamState {
    /// The first value of a request header.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.request_headers
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_slice())
    }

    /// The first value of a response header.
    pub fn response_header(&self, name: &str) -> Option<&[u8]> {
        self.response_headers
            .as_ref()?
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_slice())
    }
}

/// What the engine reported through `Host::observe`, owned.
#[derive(Debug, Clone)]
pub enum Event {
    Reserved {
        key: String,
        budget: Budget,
        reservation: Reservation,
    },
    Deposited {
        key: String,
        budget: Budget,
        landed: Landed,
    },
    Leased {
        key: String,
        budget: Budget,
        lease: Lease,
    },
    BreakerChanged {
        key: String,
        transition: Transition,
    },
    UpdateLost {
        key: String,
    },
}

/// A metric the engine defined, and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub kind: MetricKind,
    pub name: String,
    pub value: i64,
}

/// One VM's view of the host.
#[derive(Debug)]
pub struct FakeHost {
    pub store: Rc<FaultyStore>,
    pub clock: Rc<Cell<u64>>,
    rng: RefCell<Rng>,
    pub configuration: RefCell<Vec<u8>>,
    pub tick_period_ms: Cell<Option<u32>>,
    pub streams: RefCell<HashMap<u32, StreamState>>,
    /// The stream the host is calling back for.
    pub current: Cell<u32>,
    pub metrics: RefCell<Vec<Metric>>,
    pub events: RefCell<Vec<Event>>,
    /// Every call into the host (each is a crossing in Envoy).
    pub crossings: Cell<u64>,
    /// Whether the host offers `clear_route_cache` (Envoy does; set false
    /// for a host that answers NotFound).
    pub offers_clear_route_cache: Cell<bool>,
    /// Every call of `clear_route_cache`, offered or not.
    pub route_cache_calls: Cell<u64>,
}

impl FakeHost {
    pub fn new(store: Rc<FaultyStore>, clock: Rc<Cell<u64>>, seed: u64) -> Self {
        FakeHost {
            store,
            clock,
            rng: RefCell::new(Rng::new(seed)),
            configuration: RefCell::new(Vec::new()),
            tick_period_ms: Cell::new(None),
            streams: RefCell::new(HashMap::new()),
            current: Cell::new(0),
            metrics: RefCell::new(Vec::new()),
            events: RefCell::new(Vec::new()),
            crossings: Cell::new(0),
            offers_clear_route_cache: Cell::new(true),
            route_cache_calls: Cell::new(0),
        }
    }

    fn cross(&self) {
        self.crossings.set(self.crossings.get() + 1);
    }

    fn with_stream<T>(&self, call: impl FnOnce(&mut StreamState) -> T) -> T {
        let mut streams = self.streams.borrow_mut();
        call(streams.entry(self.current.get()).or_default())
    }

    /// A metric's value by name (counters: the sum flushed so far).
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.metrics
            .borrow()
            .iter()
            .find(|metric| metric.name == name)
            .map(|metric| metric.value)
    }

    pub fn take_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.borrow_mut())
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.cross();
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        self.cross();
        self.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.cross();
        self.clock.get()
    }

    fn random_u64(&self) -> Option<u64> {
        self.cross();
        Some(self.rng.borrow_mut().next_u64())
    }

    fn plugin_configuration(&self) -> Vec<u8> {
        self.cross();
        self.configuration.borrow().clone()
    }

    fn set_tick_period_ms(&self, period_ms: u32) {
        self.cross();
        self.tick_period_ms.set(Some(period_ms));
    }

    fn request_header_pairs(&self) -> Vec<u8> {
        self.cross();
        self.with_stream(|stream| {
            let pairs: Vec<(&[u8], &[u8])> = stream
                .request_headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_slice()))
                .collect();
            crate::pairs::serialize(&pairs)
        })
    }

    fn set_request_header(&self, name: &str, value: &[u8]) {
        self.cross();
        self.with_stream(|stream| {
            stream.header_changes = stream.header_changes.saturating_add(1);
            stream.request_headers.retain(|(known, _)| known != name);
            stream
                .request_headers
                .push((name.to_string(), value.to_vec()));
        });
    }

    fn remove_request_header(&self, name: &str) {
        self.cross();
        self.with_stream(|stream| {
            stream.header_changes = stream.header_changes.saturating_add(1);
            stream.request_headers.retain(|(known, _)| known != name);
        });
    }

    fn clear_route_cache(&self) -> bool {
        self.cross();
        self.route_cache_calls
            .set(self.route_cache_calls.get().saturating_add(1));
        self.with_stream(|stream| {
            stream.route_cache_clears = stream.route_cache_clears.saturating_add(1);
            stream.changes_before_clear = Some(stream.header_changes);
        });
        self.offers_clear_route_cache.get()
    }

    fn response_header_pairs(&self) -> Vec<u8> {
        self.cross();
        self.with_stream(|stream| {
            // Envoy serialises an unavailable map as nothing at all.
            let Some(headers) = &stream.response_headers else {
                return Vec::new();
            };
            let pairs: Vec<(&[u8], &[u8])> = headers
                .iter()
                .map(|(name, value)| (name.as_bytes(), value.as_slice()))
                .collect();
            crate::pairs::serialize(&pairs)
        })
    }

    fn integer_property(&self, property: Property) -> Option<u64> {
        self.cross();
        self.with_stream(|stream| match property {
            Property::ResponseCode => stream.response_code,
            Property::ResponseFlags => stream.response_flags,
            Property::AttemptCount => stream.attempts,
            Property::GrpcStatus => stream.grpc_status,
        })
    }

    fn send_local_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) {
        self.cross();
        self.with_stream(|stream| {
            stream.local_reply = Some(LocalReply {
                status,
                headers: headers
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
                body: body.to_vec(),
                grpc_status,
            });
        });
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32> {
        self.cross();
        let mut metrics = self.metrics.borrow_mut();
        // Envoy returns the same id for a name defined again.
        if let Some(id) = metrics.iter().position(|metric| metric.name == name) {
            return u32::try_from(id).ok();
        }
        metrics.push(Metric {
            kind,
            name: name.to_string(),
            value: 0,
        });
        u32::try_from(metrics.len() - 1).ok()
    }

    fn increment_metric(&self, id: u32, offset: i64) {
        self.cross();
        if let Some(metric) = self.metrics.borrow_mut().get_mut(id as usize) {
            metric.value = metric.value.saturating_add(offset);
        }
    }

    fn record_metric(&self, id: u32, value: u64) {
        self.cross();
        if let Some(metric) = self.metrics.borrow_mut().get_mut(id as usize) {
            metric.value = i64::try_from(value).unwrap_or(i64::MAX);
        }
    }

    fn observe(&self, event: Observed<'_>) {
        let owned = match event {
            Observed::Reserved {
                key,
                budget,
                reservation,
            } => Event::Reserved {
                key: key.to_string(),
                budget,
                reservation: *reservation,
            },
            Observed::Deposited {
                key,
                budget,
                landed,
            } => Event::Deposited {
                key: key.to_string(),
                budget,
                landed: *landed,
            },
            Observed::Leased { key, budget, lease } => Event::Leased {
                key: key.to_string(),
                budget,
                lease: *lease,
            },
            Observed::BreakerChanged { key, transition } => Event::BreakerChanged {
                key: key.to_string(),
                transition: *transition,
            },
            Observed::UpdateLost { key } => Event::UpdateLost {
                key: key.to_string(),
            },
        };
        self.events.borrow_mut().push(owned);
    }
}

/// The root context id every `Vm` configures.
pub const ROOT_CONTEXT: u32 = 1;

/// How a request ended, as Envoy reports it at `on_log`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ending {
    /// `response.code` (`None`: no response, e.g. a reset).
    pub code: Option<u64>,
    /// `response.flags`.
    pub flags: u64,
    /// `upstream.request_attempt_count` (`None`: not reported).
    pub attempts: Option<u64>,
    /// `response.grpc_status` (`None`: no response at all). Set when the
    /// stream ends (trailers, or the trailers-only header block).
    pub grpc_status: Option<u64>,
}

/// A worker and its host, driven one callback at a time as Envoy does.
pub struct Vm {
    pub worker: Worker,
    pub host: FakeHost,
    /// The route sets Envoy's `include_attempt_count_in_response`: the
    /// router writes `x-envoy-attempt-count` over whatever the upstream
    /// sent. Off (Envoy's default), an upstream's own header reaches the
    /// filter as sent.
    pub route_writes_attempt_count: bool,
    next_context: u32,
}

impl Vm {
    /// A VM with a root context, not yet configured.
    pub fn new(store: Rc<FaultyStore>, clock: Rc<Cell<u64>>, seed: u64) -> Self {
        let mut worker = Worker::new();
        worker.create_context(ROOT_CONTEXT, 0);
        Vm {
            worker,
            host: FakeHost::new(store, clock, seed),
            route_writes_attempt_count: false,
            next_context: ROOT_CONTEXT + 1,
        }
    }

    /// `on_configure` with this configuration; whether it was accepted.
    pub fn configure(&mut self, json: &[u8]) -> bool {
        *self.host.configuration.borrow_mut() = json.to_vec();
        self.worker.configure(&self.host, ROOT_CONTEXT)
    }

    pub fn tick(&mut self) {
        self.worker.tick(&self.host, ROOT_CONTEXT);
    }

    /// A new stream through `on_request_headers`; its context id and what
    /// the engine answered.
    pub fn request<N: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        headers: &[(N, V)],
    ) -> (u32, HeadersAction) {
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        self.worker.create_context(context, ROOT_CONTEXT);
        let state = StreamState {
            request_headers: headers
                .iter()
                .map(|(name, value)| (name.as_ref().to_string(), value.as_ref().to_vec()))
                .collect(),
            ..StreamState::default()
        };
        self.host.streams.borrow_mut().insert(context, state);
        self.host.current.set(context);
        let action = self.worker.request_headers(&self.host, context);
        (context, action)
    }

    /// `on_response_headers` with this `:status` (more to come: a body,
    /// trailers), after the router made `attempts` attempts (`None`: the
    /// property is not reported).
    pub fn respond(&mut self, context: u32, status: u64, attempts: Option<u64>) {
        let status = status.to_string();
        self.respond_with(context, &[(":status", status.as_str())], attempts, false);
    }

    /// `on_response_headers` with the headers the upstream sent (`:status`
    /// among them), after the router made `attempts` attempts.
    /// `end_of_stream`: the block ends the response (for gRPC, a
    /// trailers-only answer). As in Envoy, `response.code` follows
    /// `:status`, and a trailers-only `grpc-status` is what
    /// `response.grpc_status` reports (-1, `InvalidCode`, when it is not a
    /// number 0-16). The router writes `x-envoy-attempt-count` over the
    /// upstream's only when `route_writes_attempt_count`.
    pub fn respond_with<N: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        context: u32,
        upstream: &[(N, V)],
        attempts: Option<u64>,
        end_of_stream: bool,
    ) {
        self.host.current.set(context);
        let mut headers: Vec<(String, Vec<u8>)> = upstream
            .iter()
            .map(|(name, value)| (name.as_ref().to_string(), value.as_ref().to_vec()))
            .collect();
        if self.route_writes_attempt_count {
            headers.retain(|(name, _)| name != crate::response::ATTEMPT_COUNT_HEADER);
            if let Some(attempts) = attempts {
                headers.push((
                    crate::response::ATTEMPT_COUNT_HEADER.to_string(),
                    attempts.to_string().into_bytes(),
                ));
            }
        }
        let number = |name: &str| {
            headers
                .iter()
                .find(|(known, _)| known == name)
                .map(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
        };
        let code = number(":status").flatten();
        let grpc_status = if end_of_stream {
            number("grpc-status").map(|code| code.filter(|code| *code <= 16).unwrap_or(u64::MAX))
        } else {
            None
        };
        if let Some(stream) = self.host.streams.borrow_mut().get_mut(&context) {
            stream.response_code = code;
            stream.attempts = attempts;
            if grpc_status.is_some() {
                stream.grpc_status = grpc_status;
            }
            stream.response_headers = Some(headers);
        }
        self.worker
            .response_headers(&self.host, context, end_of_stream);
    }

    /// `on_log` then `on_delete`. Facts the response headers already gave
    /// stay as they were (Envoy's properties do not change after them).
    pub fn end(&mut self, context: u32, ending: Ending) {
        self.host.current.set(context);
        if let Some(stream) = self.host.streams.borrow_mut().get_mut(&context) {
            if stream.response_headers.is_none() {
                stream.response_code = ending.code;
                stream.attempts = ending.attempts;
            }
            stream.response_flags = Some(ending.flags);
            if ending.grpc_status.is_some() {
                stream.grpc_status = ending.grpc_status;
            }
        }
        self.worker.log(&self.host, context);
        self.worker.delete_context(&self.host, context);
    }

    /// The stream is deleted without `on_log` (its VM is going away).
    pub fn abandon(&mut self, context: u32) {
        self.host.current.set(context);
        self.worker.delete_context(&self.host, context);
    }

    /// A whole request: headers, response headers with `status` after
    /// `attempts` attempts, log. Returns the stream as the host saw it.
    pub fn exchange<N: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        headers: &[(N, V)],
        status: u64,
        attempts: u64,
    ) -> StreamState {
        let (context, action) = self.request(headers);
        if action == HeadersAction::Continue {
            self.respond(context, status, Some(attempts));
        }
        self.end(
            context,
            Ending {
                code: Some(status),
                flags: 0,
                attempts: Some(attempts),
                grpc_status: None,
            },
        );
        self.forget(context)
    }

    /// A whole gRPC call: headers, response headers (HTTP 200 after
    /// `attempts` attempts), log with `grpc_status` (from the trailers or a
    /// trailers-only answer; Envoy's `response.grpc_status`). Returns the
    /// stream as the host saw it.
    pub fn grpc_exchange<N: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        headers: &[(N, V)],
        grpc_status: u64,
        attempts: u64,
    ) -> StreamState {
        let (context, action) = self.request(headers);
        let ending = if action == HeadersAction::Continue {
            self.respond(context, 200, Some(attempts));
            Ending {
                code: Some(200),
                flags: 0,
                attempts: Some(attempts),
                grpc_status: Some(grpc_status),
            }
        } else {
            Ending::default()
        };
        self.end(context, ending);
        self.forget(context)
    }

    /// A whole gRPC call answered trailers-only: one header block (HTTP
    /// 200, `grpc-status`, end of stream) after `attempts` attempts, then
    /// the log. Returns the stream as the host saw it.
    pub fn grpc_trailers_only<N: AsRef<str>, V: AsRef<[u8]>>(
        &mut self,
        headers: &[(N, V)],
        grpc_status: u64,
        attempts: u64,
    ) -> StreamState {
        let (context, action) = self.request(headers);
        let ending = if action == HeadersAction::Continue {
            let code = grpc_status.to_string();
            self.respond_with(
                context,
                &[
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", code.as_str()),
                ],
                Some(attempts),
                true,
            );
            Ending {
                code: Some(200),
                flags: 0,
                attempts: Some(attempts),
                grpc_status: None,
            }
        } else {
            Ending::default()
        };
        self.end(context, ending);
        self.forget(context)
    }

    /// Removes a finished stream's host state and returns it.
    pub fn forget(&mut self, context: u32) -> StreamState {
        self.host
            .streams
            .borrow_mut()
            .remove(&context)
            .unwrap_or_default()
    }
}
