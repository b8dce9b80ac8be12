//! The engine that ships (`sluice::engine::Worker`), driven natively over
//! `sluice::testing::FakeHost` exactly as Envoy calls a VM for a proxied
//! request: context create, request headers, response headers, log,
//! delete; and the root's tick whenever `engine::TICK_MS` of the clock has
//! passed, as Envoy's timer would. Nothing of the per-request logic is
//! copied here: every decision, host call and shared-state write is the
//! engine's.
//!
//! Why not `testing::Vm`: `Vm::request` builds the stream's headers from
//! string pairs on every call (two allocations a header), and the fake
//! store and host keep a log of every write and event that grows without
//! end. `Driver` keeps each request's host-side state prebuilt and restores
//! it in place after the request (no allocation once warm), and empties the
//! logs at each tick. What remains of the harness per request: the fake
//! host's own work in each call (a `HashMap` lookup of the stream, the pairs
//! buffer serialised, a header written into a `Vec`, a copy of the key and
//! bytes of each store write into its log). `policy`'s
//! `realistic/lifecycle_via_vm` measures the same requests through `Vm`
//! for comparison.

use sluice::engine::{HeadersAction, Worker, TICK_MS};
use sluice::testing::{FakeHost, FaultyStore, StreamState, ROOT_CONTEXT};
use std::cell::Cell;
use std::rc::Rc;

/// 2026-11-01T00:00:00Z, ms: where every benchmark's clock starts.
pub const T0: u64 = 1_793_491_200_000;

/// One request's host-side state, built once: the request headers as the
/// host holds them, restored after each lifecycle.
#[derive(Debug, Clone)]
pub struct Prepared {
    original: Vec<(String, Vec<u8>)>,
    state: StreamState,
}

impl Prepared {
    /// `headers` as Envoy hands them over (names in lower case).
    pub fn new(headers: &[(String, String)]) -> Prepared {
        let original: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), value.as_bytes().to_vec()))
            .collect();
        let state = StreamState {
            request_headers: original.clone(),
            ..StreamState::default()
        };
        Prepared { original, state }
    }

    /// Back to the request as the client sent it, reusing the buffers: the
    /// engine appended and replaced headers, the host recorded a response.
    fn restore(&mut self) {
        let headers = &mut self.state.request_headers;
        headers.truncate(self.original.len());
        for (slot, (name, value)) in headers.iter_mut().zip(&self.original) {
            slot.0.clone_from(name);
            slot.1.clone_from(value);
        }
        for (name, value) in self.original.iter().skip(headers.len()) {
            headers.push((name.clone(), value.clone()));
        }
        self.state.response_headers = None;
        self.state.response_code = None;
        self.state.response_flags = None;
        self.state.attempts = None;
        self.state.local_reply = None;
        self.state.header_changes = 0;
        self.state.route_cache_clears = 0;
        self.state.changes_before_clear = None;
    }
}

/// One VM: a configured `Worker` over its `FakeHost`.
pub struct Driver {
    worker: Worker,
    host: FakeHost,
    clock: Rc<Cell<u64>>,
    next_context: u32,
    next_tick_ms: u64,
}

impl Driver {
    /// A VM with `config` applied at `T0`.
    ///
    /// # Panics
    /// If the engine refuses the config.
    pub fn new(config: &[u8], seed: u64) -> Driver {
        let clock = Rc::new(Cell::new(T0));
        let host = FakeHost::new(Rc::new(FaultyStore::default()), Rc::clone(&clock), seed);
        *host.configuration.borrow_mut() = config.to_vec();
        let mut worker = Worker::new();
        worker.create_context(ROOT_CONTEXT, 0);
        assert!(
            worker.configure(&host, ROOT_CONTEXT),
            "the engine refused the config"
        );
        Driver {
            worker,
            host,
            clock,
            next_context: ROOT_CONTEXT + 1,
            next_tick_ms: T0 + u64::from(TICK_MS),
        }
    }

    pub fn host(&self) -> &FakeHost {
        &self.host
    }

    pub fn now(&self) -> u64 {
        self.clock.get()
    }

    /// Moves the clock on; the next lifecycle ticks first if a tick is due.
    pub fn advance(&mut self, ms: u64) {
        self.clock.set(self.clock.get() + ms);
    }

    /// One request, as Envoy runs it: the tick if one is due, then context
    /// create, request headers, response headers (`status` after `attempts`
    /// upstream attempts; skipped after a local reply), log, delete.
    pub fn lifecycle(
        &mut self,
        request: &mut Prepared,
        status: u64,
        attempts: u64,
    ) -> HeadersAction {
        self.lifecycle_inspect(request, status, attempts, |_| {})
    }

    /// `lifecycle`, showing `inspect` the stream as the host saw it at the
    /// end (headers as the filter left them, local reply).
    pub fn lifecycle_inspect(
        &mut self,
        request: &mut Prepared,
        status: u64,
        attempts: u64,
        inspect: impl FnOnce(&StreamState),
    ) -> HeadersAction {
        let now = self.clock.get();
        if now >= self.next_tick_ms {
            self.worker.tick(&self.host, ROOT_CONTEXT);
            self.next_tick_ms = now + u64::from(TICK_MS);
            // The fake host's logs, for tests' oracles: kept from growing.
            self.host.events.borrow_mut().clear();
            drop(self.host.store.take_writes());
        }
        let context = self.next_context;
        self.next_context = self.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        self.worker.create_context(context, ROOT_CONTEXT);
        self.host
            .streams
            .borrow_mut()
            .insert(context, std::mem::take(&mut request.state));
        self.host.current.set(context);
        let action = self.worker.request_headers(&self.host, context);
        if action == HeadersAction::Continue {
            if let Some(stream) = self.host.streams.borrow_mut().get_mut(&context) {
                stream.response_headers = Some(vec![(
                    ":status".to_string(),
                    status.to_string().into_bytes(),
                )]);
                stream.response_code = Some(status);
                stream.attempts = Some(attempts);
            }
            self.worker.response_headers(&self.host, context, true);
        }
        if let Some(stream) = self.host.streams.borrow_mut().get_mut(&context) {
            if stream.response_code.is_none() {
                stream.response_code = stream.local_reply.as_ref().map(|r| u64::from(r.status));
            }
            stream.response_flags = Some(0);
        }
        self.worker.log(&self.host, context);
        self.worker.delete_context(&self.host, context);
        let state = self.host.streams.borrow_mut().remove(&context);
        if let Some(state) = state {
            inspect(&state);
            request.state = state;
        }
        request.restore();
        action
    }
}
