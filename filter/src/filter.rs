//! The proxy-wasm shell around the policy modules.
//!
//! # Why this shell is shaped the way it is
//!
//! In Envoy, every crossing between the proxy and the VM costs about a
//! microsecond: a host call, a callback, and the `malloc` callback the host
//! makes for every buffer it hands over. The whole policy of a request costs
//! less than three of them natively. So the shell is built to cross as few
//! times as it can, and per request it makes:
//!
//! - one read of every request header (`HeaderPairs` parses the buffer in
//!   place), one clock read when the service has any shared state;
//! - one replace per header it changes (Envoy re-selects the route once);
//! - one write to the retry budget (a reservation, carrying the settlements
//!   of the worker's finished requests: see `retry::reserve_settling`);
//! - no breaker read while the worker's cached verdict is fresh
//!   (`BREAKER_CACHE_MS`), and no breaker write for a clean success: the
//!   worker holds those back and books them with its next write or its tick
//!   (`breaker::PendingSuccesses`); failures are written at once;
//! - no metric call: counters add up in the VM and reach Envoy on the tick;
//! - at the end, the status, the attempts and the response flags.
//!
//! The module exports only the callbacks it uses: Envoy skips a callback a
//! module does not export (body chunks, trailers, `on_done`), which the SDK's
//! dispatcher, exporting all of them, could not avoid. It has its own host
//! calls (`crate::host`) that handle every status: the SDK's `hostcalls`
//! panic on statuses they did not expect, and a panic traps the VM and fails
//! every later request of the worker.
//!
//! Shared state stays per process: every decision is taken on the shared
//! state, only its freshness is bounded per worker (a breaker another worker
//! opened is seen within `BREAKER_CACHE_MS` or at this worker's first failure
//! write, much as Envoy's own outlier detection reaches its workers; held
//! successes reach the others within a tick).

#![allow(unsafe_code)]

use crate::breaker::{self, Admission, Check, Outcome, PendingSuccesses, ProbeToken};
use crate::config::{Config, Service, Side};
use crate::host::{self, LOG_ERROR, LOG_INFO, LOG_WARN, METRIC_COUNTER, METRIC_GAUGE};
use crate::pairs::HeaderPairs;
use crate::retry::{self, Reservation, Settlement};
use crate::rollout::{self, RolloutState, RolloutView};
use crate::router::{Decision, RequestHeaders, Router};
use crate::shared::{self, CasMismatch, SharedStore};
use crate::sticky::{mix, Rng};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::MaybeUninit;
use std::rc::Rc;

/// Held outcomes and counters are flushed, gauges refreshed and due rollout
/// steps announced this often. A tick is a handful of host calls per
/// service, against thousands a second on the request path.
const TICK_MS: u32 = 250;
/// A VM re-reads the shared rollout state at least this often.
const ROLLOUT_CACHE_MS: u64 = 1_000;
/// A worker trusts a closed breaker's verdict this long without a read.
const BREAKER_CACHE_MS: u64 = 100;
/// A worker writes its held settlements or successes at once beyond this
/// many, whatever the tick: bounded memory and bounded staleness under any
/// load.
const MAX_HELD: u64 = 1_024;
/// Header on a local reply that says the breaker, not the upstream, refused.
const BREAKER_HEADER: &str = "x-sluice-breaker";

/// Property paths, their segments joined by NUL as the ABI wants them.
const RESPONSE_CODE: &[u8] = b"response\0code";
const RESPONSE_FLAGS: &[u8] = b"response\0flags";
const ATTEMPT_COUNT: &[u8] = b"upstream\0request_attempt_count";

// ------------------------------------------------------------ ABI exports

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
}

/// Buffers the host hands over (headers, properties, shared data) are
/// allocated here, as a boxed slice of exactly `size` bytes: `host`
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
    with_filter(|filter| filter.create(context_id, parent_context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root_context_id: u32, _configuration_size: usize) -> u32 {
    with_filter(|filter| filter.configure(root_context_id)).map_or(0, u32::from)
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_context_id: u32) {
    with_filter(|filter| filter.tick(root_context_id));
}

/// 0: continue; 1: stop (a local reply was sent).
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    with_filter(|filter| filter.request_headers(context_id)).map_or(0, u32::from)
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    with_filter(|filter| filter.response_headers(context_id));
    0
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with_filter(|filter| filter.log(context_id));
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    with_filter(|filter| filter.delete(context_id));
}

thread_local! {
    /// The VM's state. A VM is single threaded and the host never calls in
    /// while a callback runs (only `proxy_on_memory_allocate`, which does
    /// not touch it), so a borrow is always free; if it were not, the call
    /// is skipped rather than trap.
    static FILTER: RefCell<Filter> = RefCell::new(Filter::default());
}

fn with_filter<T>(call: impl FnOnce(&mut Filter) -> T) -> Option<T> {
    FILTER.with(|cell| {
        cell.try_borrow_mut()
            .ok()
            .map(|mut filter| call(&mut filter))
    })
}

// ------------------------------------------------------------ host glue

fn now_ms() -> u64 {
    host::now_ms()
}

fn log(level: u32, message: &str) {
    host::log(level, message);
}

/// The host's shared data: one store for every VM of the process.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        host::shared_data(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        if host::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(())
        } else {
            Err(CasMismatch)
        }
    }
}

fn shared_bytes(key: &str) -> Option<Vec<u8>> {
    HostStore.get(key).map(|(bytes, _)| bytes)
}

/// A counter that adds up in the VM and reaches Envoy on the tick.
#[derive(Debug, Default)]
struct Counter {
    id: Option<u32>,
    held: Cell<u64>,
}

impl Counter {
    fn define(name: &str) -> Self {
        Counter {
            id: host::define_metric(METRIC_COUNTER, name),
            held: Cell::new(0),
        }
    }

    fn add(&self, amount: u64) {
        self.held.set(self.held.get().saturating_add(amount));
    }

    fn increment(&self) {
        self.add(1);
    }

    fn flush(&self) {
        let amount = self.held.replace(0);
        if let (Some(id), Ok(amount)) = (self.id, i64::try_from(amount)) {
            if amount > 0 {
                host::increment_metric(id, amount);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Gauge(Option<u32>);

impl Gauge {
    fn define(name: &str) -> Self {
        Gauge(host::define_metric(METRIC_GAUGE, name))
    }

    fn set(self, value: u64) {
        if let Some(id) = self.0 {
            host::record_metric(id, value);
        }
    }
}

// ------------------------------------------------------------ runtime

/// A retry policy's runtime handles.
struct RetryRuntime {
    key: String,
    granted: Counter,
    denied: Counter,
    deadline_cut: Counter,
    level: Gauge,
    last_dry_warning_ms: Cell<Option<u64>>,
    /// Finished requests' reservations, written with the next reservation.
    held: RefCell<Vec<Settlement>>,
}

/// What a worker may assume about a breaker without reading it.
#[derive(Debug, Clone, Copy)]
enum CachedVerdict {
    /// Closed, with no failure under way (only then is a verdict cached).
    Allowed { until_ms: u64 },
    /// Open: nothing gets through before `until_ms`.
    OpenUntil { until_ms: u64 },
}

/// What a worker may cache of a closed breaker read at `now`: nothing
/// while failures are coming in (it reads every time), else the verdict
/// for `BREAKER_CACHE_MS`.
fn closed_verdict(run: bool, now: u64) -> Option<CachedVerdict> {
    (!run).then(|| CachedVerdict::Allowed {
        until_ms: now.saturating_add(BREAKER_CACHE_MS),
    })
}

/// One cluster's breaker.
struct BreakerRuntime {
    key: String,
    state: Gauge,
    trips: Counter,
    rejected: Counter,
    cached: Cell<Option<CachedVerdict>>,
    held: RefCell<PendingSuccesses>,
}

struct RolloutRuntime {
    key: String,
    weight_bp: Gauge,
    state: Gauge,
    rollbacks: Counter,
    /// The last view and until when this VM may use it without a read.
    cached: Cell<Option<(RolloutView, u64)>>,
}

/// Everything a service needs at run time beyond its config.
struct ServiceRuntime {
    routed_stable: Counter,
    routed_canary: Counter,
    rule_matched: Vec<Counter>,
    retry: Option<RetryRuntime>,
    /// Indexed by side: stable, canary.
    breakers: [Option<BreakerRuntime>; 2],
    rollout: Option<RolloutRuntime>,
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Stable => 0,
        Side::Canary => 1,
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Stable => "stable",
        Side::Canary => "canary",
    }
}

impl ServiceRuntime {
    /// Defines the service's metrics and creates its shared state if this is
    /// the first VM to apply the block (an unchanged block keeps its state).
    fn new(service: &Service, now: u64) -> Self {
        let prefix = format!("sluice.{}", service.name);
        let retry = service.retry.as_ref().map(|policy| {
            let key = retry::budget_key(&service.name, policy);
            shared::ensure(&HostStore, &key, &retry::fresh_state(policy, now));
            RetryRuntime {
                key,
                granted: Counter::define(&format!("{prefix}.retry.granted")),
                denied: Counter::define(&format!("{prefix}.retry.denied")),
                deadline_cut: Counter::define(&format!("{prefix}.retry.deadline_cut")),
                level: Gauge::define(&format!("{prefix}.retry.budget_level")),
                last_dry_warning_ms: Cell::new(None),
                held: RefCell::new(Vec::new()),
            }
        });
        let breaker_for = |side: Side| -> Option<BreakerRuntime> {
            let config = service.breaker.as_ref()?;
            if side == Side::Canary && service.canary.is_none() {
                return None;
            }
            let key = breaker::state_key(&service.name, service.cluster(side), config);
            shared::ensure(&HostStore, &key, &breaker::initial());
            let name = format!("{prefix}.breaker.{}", side_name(side));
            Some(BreakerRuntime {
                key,
                state: Gauge::define(&format!("{name}.state")),
                trips: Counter::define(&format!("{name}.trips")),
                rejected: Counter::define(&format!("{name}.rejected")),
                cached: Cell::new(None),
                held: RefCell::new(PendingSuccesses::new()),
            })
        };
        let rollout = match (&service.rollout, &service.canary) {
            (Some(config), Some(canary)) => {
                let key = rollout::state_key(&service.name, &service.stable, canary, config);
                shared::ensure(&HostStore, &key, &rollout::initial(config, now));
                Some(RolloutRuntime {
                    key,
                    weight_bp: Gauge::define(&format!("{prefix}.rollout.weight_bp")),
                    state: Gauge::define(&format!("{prefix}.rollout.state")),
                    rollbacks: Counter::define(&format!("{prefix}.rollout.rollbacks")),
                    cached: Cell::new(None),
                })
            }
            _ => None,
        };
        ServiceRuntime {
            routed_stable: Counter::define(&format!("{prefix}.routed.stable")),
            routed_canary: Counter::define(&format!("{prefix}.routed.canary")),
            rule_matched: (0..service.rules.len())
                .map(|index| Counter::define(&format!("{prefix}.rule.{index}.matched")))
                .collect(),
            retry,
            breakers: [breaker_for(Side::Stable), breaker_for(Side::Canary)],
            rollout,
        }
    }

    fn breaker(&self, side: Side) -> Option<&BreakerRuntime> {
        self.breakers.get(side_index(side)).and_then(Option::as_ref)
    }
}

/// A configuration in force: the compiled router and its runtime handles.
struct Active {
    router: Router,
    services: Vec<ServiceRuntime>,
    unmatched: Counter,
    /// Per-VM randomness for requests without a sticky key and for breaker
    /// jitter, seeded once: no host call on the request path.
    rng: RefCell<Rng>,
    /// The latest clock this VM read.
    clock_hint: Cell<u64>,
}

impl Active {
    fn new(config: Config, now: u64) -> Self {
        let services = config
            .services
            .iter()
            .map(|service| ServiceRuntime::new(service, now))
            .collect();
        Active {
            router: Router::new(config),
            services,
            unmatched: Counter::define("sluice.unmatched"),
            rng: RefCell::new(Rng::new(initial_seed(now))),
            clock_hint: Cell::new(now),
        }
    }

    fn random(&self) -> u64 {
        self.rng
            .try_borrow_mut()
            .map_or(0, |mut rng| rng.next_u64())
    }

    fn service(&self, index: usize) -> Option<(&Service, &ServiceRuntime)> {
        Some((
            self.router.services().get(index)?,
            self.services.get(index)?,
        ))
    }

    /// The rollout's current view for a service, from this VM's cache when
    /// fresh. A rollback reaches the other VMs within `ROLLOUT_CACHE_MS`.
    fn rollout_view(
        &self,
        service: &Service,
        runtime: &RolloutRuntime,
        now: u64,
    ) -> Option<RolloutView> {
        let config = service.rollout.as_ref()?;
        if let Some((view, valid_until)) = runtime.cached.get() {
            if now < valid_until {
                return Some(view);
            }
        }
        let view = rollout::view(shared_bytes(&runtime.key).as_deref(), config, now);
        let mut valid_until = now.saturating_add(ROLLOUT_CACHE_MS);
        if let Some(change) = view.next_change_ms {
            valid_until = valid_until.min(change);
        }
        runtime.cached.set(Some((view, valid_until)));
        Some(view)
    }

    /// Books a canary outcome with the rollout gate, at once: a rollback is
    /// final, so the gate judges on every outcome there is, never on a
    /// worker's partial view (the canary is a small share of the traffic,
    /// so this costs little per request on average).
    fn record_rollout(&self, service: &Service, runtime: &ServiceRuntime, now: u64, failed: bool) {
        let (Some(config), Some(rollout_runtime)) =
            (service.rollout.as_ref(), runtime.rollout.as_ref())
        else {
            return;
        };
        let event = shared::update(&HostStore, &rollout_runtime.key, |bytes| {
            rollout::record(bytes, config, now, failed)
        })
        .flatten();
        if let Some(event) = event {
            if event.is_rollback() {
                rollout_runtime.rollbacks.increment();
                // This VM stops sending cohort traffic at once.
                rollout_runtime.cached.set(None);
                log(LOG_WARN, &event.log_line(&service.name));
            } else {
                log(LOG_INFO, &event.log_line(&service.name));
            }
        }
    }

    /// Asks a side's breaker whether a request may go to it.
    fn admit(
        &self,
        service: &Service,
        runtime: &ServiceRuntime,
        side: Side,
        now: u64,
    ) -> Admission {
        let (Some(config), Some(breaker_runtime)) =
            (service.breaker.as_ref(), runtime.breaker(side))
        else {
            return Admission::Allowed;
        };
        match breaker_runtime.cached.get() {
            Some(CachedVerdict::Allowed { until_ms }) if now < until_ms => {
                return Admission::Allowed
            }
            Some(CachedVerdict::OpenUntil { until_ms }) if now < until_ms => {
                breaker_runtime.rejected.increment();
                return Admission::Rejected {
                    retry_after_ms: until_ms - now,
                };
            }
            _ => {}
        }
        // The common case, a closed breaker, costs one read a
        // `BREAKER_CACHE_MS` and no write.
        let (check, run) =
            breaker::check_run(shared_bytes(&breaker_runtime.key).as_deref(), config, now);
        match check {
            Check::Allowed => {
                breaker_runtime.cached.set(closed_verdict(run, now));
                return Admission::Allowed;
            }
            Check::Rejected { retry_after_ms } => {
                breaker_runtime.rejected.increment();
                return Admission::Rejected { retry_after_ms };
            }
            Check::TryProbe => {}
        }
        breaker_runtime.cached.set(None);
        let result = {
            let held = breaker_runtime.held.borrow();
            shared::update(&HostStore, &breaker_runtime.key, |bytes| {
                breaker::admit_held(bytes, config, now, &held)
            })
        };
        let (admission, transition) = match result {
            Some(result) => {
                breaker_runtime.held.borrow_mut().clear();
                result
            }
            None => (
                Admission::Rejected {
                    retry_after_ms: 1_000,
                },
                None,
            ),
        };
        if let Some(transition) = transition {
            breaker_runtime.state.set(transition.to.gauge());
            log(
                LOG_WARN,
                &transition.log_line(&service.name, service.cluster(side)),
            );
        }
        if let Admission::Rejected { .. } = admission {
            breaker_runtime.rejected.increment();
        }
        admission
    }

    /// Books a finished request with its side's breaker: a clean success is
    /// held, anything else written at once with the held successes.
    fn record_breaker(
        &self,
        service: &Service,
        runtime: &ServiceRuntime,
        side: Side,
        started: u64,
        outcome: Option<Outcome>,
        probe: Option<ProbeToken>,
    ) {
        let (Some(config), Some(breaker_runtime)) =
            (service.breaker.as_ref(), runtime.breaker(side))
        else {
            return;
        };
        let Some(outcome) = outcome else {
            // No verdict (the client left first): give back a probe slot.
            if let Some(token) = probe {
                let now = now_ms();
                let _ = shared::update(&HostStore, &breaker_runtime.key, |bytes| {
                    breaker::release(bytes, config, now, token)
                });
            }
            return;
        };
        // A success ends a run of consecutive failures: while this worker
        // knows of one (or knows nothing), it writes the success at once.
        let run_known_clear = matches!(
            breaker_runtime.cached.get(),
            Some(CachedVerdict::Allowed { .. })
        );
        if probe.is_none() && outcome.is_clean_success(config) && run_known_clear {
            let mut held = breaker_runtime.held.borrow_mut();
            // Seen no earlier than the latest clock this VM read (a request
            // start, milliseconds ago under load): no clock read of its own.
            held.add(config, started.max(self.clock_hint.get()));
            if held.count() < MAX_HELD {
                return;
            }
            drop(held);
            self.write_breaker(service, side, config, breaker_runtime, None);
            return;
        }
        let finished = Some((outcome, probe));
        self.write_breaker(service, side, config, breaker_runtime, finished);
    }

    /// One write: the held successes, then the finished request if any.
    fn write_breaker(
        &self,
        service: &Service,
        side: Side,
        config: &breaker::BreakerConfig,
        runtime: &BreakerRuntime,
        finished: Option<(Outcome, Option<ProbeToken>)>,
    ) {
        if finished.is_none() && runtime.held.borrow().is_empty() {
            return;
        }
        let now = now_ms();
        let random = self.random();
        let result = {
            let held = runtime.held.borrow();
            shared::update(&HostStore, &runtime.key, |bytes| {
                breaker::record_held(bytes, config, now, &held, finished, random)
            })
        };
        let Some((transition, check, run)) = result else {
            return;
        };
        runtime.held.borrow_mut().clear();
        runtime.cached.set(match check {
            Check::Allowed => closed_verdict(run, now),
            _ => None,
        });
        if let Some(transition) = transition {
            runtime.state.set(transition.to.gauge());
            if transition.is_trip() {
                runtime.trips.increment();
                if let Some(open_ms) = transition.open_ms {
                    runtime.cached.set(Some(CachedVerdict::OpenUntil {
                        until_ms: now.saturating_add(open_ms),
                    }));
                }
            }
            log(
                LOG_WARN,
                &transition.log_line(&service.name, service.cluster(side)),
            );
        }
    }

    /// Queues a finished request's settlement for the next reservation.
    fn settle(&self, service: &Service, runtime: &ServiceRuntime, settlement: Settlement) {
        let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) else {
            return;
        };
        let count = {
            let mut held = retry_runtime.held.borrow_mut();
            held.push(settlement);
            held.len()
        };
        if count as u64 >= MAX_HELD {
            Self::write_settlements(policy, retry_runtime, now_ms());
        }
    }

    fn write_settlements(policy: &retry::RetryPolicy, runtime: &RetryRuntime, now: u64) {
        if runtime.held.borrow().is_empty() {
            return;
        }
        let written = {
            let held = runtime.held.borrow();
            shared::update(&HostStore, &runtime.key, |bytes| {
                (retry::settle_all(bytes, policy, now, &held), ())
            })
        };
        if written.is_some() {
            runtime.held.borrow_mut().clear();
        }
    }

    /// Writes everything held: settlements, successes, counters.
    fn flush(&self, now: u64) {
        for (service, runtime) in self.router.services().iter().zip(&self.services) {
            if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
                Self::write_settlements(policy, retry_runtime, now);
                retry_runtime.granted.flush();
                retry_runtime.denied.flush();
                retry_runtime.deadline_cut.flush();
            }
            if let Some(config) = &service.breaker {
                for side in [Side::Stable, Side::Canary] {
                    if let Some(breaker_runtime) = runtime.breaker(side) {
                        self.write_breaker(service, side, config, breaker_runtime, None);
                        breaker_runtime.trips.flush();
                        breaker_runtime.rejected.flush();
                    }
                }
            }
            if let Some(rollout_runtime) = &runtime.rollout {
                rollout_runtime.rollbacks.flush();
            }
            runtime.routed_stable.flush();
            runtime.routed_canary.flush();
            for counter in &runtime.rule_matched {
                counter.flush();
            }
        }
        self.unmatched.flush();
    }

    /// Refreshes gauges and announces rollout steps the clock has reached.
    fn refresh(&self, now: u64) {
        for (service, runtime) in self.router.services().iter().zip(&self.services) {
            if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
                let level = retry::level(shared_bytes(&retry_runtime.key).as_deref(), policy, now);
                retry_runtime.level.set(level);
            }
            if let Some(config) = &service.breaker {
                for breaker_runtime in runtime.breakers.iter().flatten() {
                    let state =
                        breaker::state(shared_bytes(&breaker_runtime.key).as_deref(), config, now);
                    breaker_runtime.state.set(state.gauge());
                }
            }
            if let (Some(config), Some(rollout_runtime)) = (&service.rollout, &runtime.rollout) {
                let bytes = shared_bytes(&rollout_runtime.key);
                if rollout::due(bytes.as_deref(), config, now) {
                    let event = shared::update(&HostStore, &rollout_runtime.key, |bytes| {
                        rollout::advance(bytes, config, now)
                    })
                    .flatten();
                    if let Some(event) = event {
                        log(LOG_INFO, &event.log_line(&service.name));
                    }
                }
                rollout_runtime.cached.set(None);
                if let Some(view) = self.rollout_view(service, rollout_runtime, now) {
                    rollout_runtime.weight_bp.set(u64::from(view.weight_bp));
                    rollout_runtime.state.set(view.state.gauge());
                }
            }
        }
    }
}

fn initial_seed(now: u64) -> u64 {
    // The clock separates VMs even if the host gave no randomness.
    mix(host::random_u64().unwrap_or(0) ^ mix(now))
}

// ------------------------------------------------------------ contexts

/// A root context: one per plugin the VM serves.
struct Root {
    active: Option<Rc<Active>>,
}

/// The bookkeeping of a routed request, from its headers to its log.
struct Exchange {
    active: Rc<Active>,
    service: usize,
    side: Side,
    started_ms: u64,
    responded_ms: Option<u64>,
    probe: Option<ProbeToken>,
    /// Retries reserved from the budget; settled at the end.
    reservation: Option<Reservation>,
    /// The breaker refused the request with a local reply.
    rejected: bool,
    /// The response status and the attempts, read with the response
    /// headers (the router retries no more once it passes them on).
    status: Option<u64>,
    attempts: Option<u64>,
}

struct Stream {
    root: u32,
    exchange: Option<Exchange>,
}

/// Context ids are small distinct integers: a multiply spreads them well
/// enough, and SipHash on every request would be wasted work.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = mix(u64::from(id));
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct Filter {
    roots: IdMap<Root>,
    streams: IdMap<Stream>,
}

impl Filter {
    fn create(&mut self, context_id: u32, parent_context_id: u32) {
        if parent_context_id == 0 {
            self.roots.insert(context_id, Root { active: None });
        } else {
            self.streams.insert(
                context_id,
                Stream {
                    root: parent_context_id,
                    exchange: None,
                },
            );
        }
    }

    fn delete(&mut self, context_id: u32) {
        if self.streams.remove(&context_id).is_none() {
            if let Some(root) = self.roots.remove(&context_id) {
                if let Some(active) = root.active {
                    active.flush(now_ms());
                }
            }
        }
    }

    fn configure(&mut self, root_context_id: u32) -> bool {
        let bytes = host::plugin_configuration();
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log(LOG_ERROR, &format!("sluice: config refused: {err}"));
                return false;
            }
        };
        log(
            LOG_INFO,
            &format!("sluice: config applied: {}", config.summary()),
        );
        let now = now_ms();
        let active = Active::new(config, now);
        // Every config ticks: counters reach Envoy on the tick.
        host::set_tick_period_ms(TICK_MS);
        active.refresh(now);
        let root = self
            .roots
            .entry(root_context_id)
            .or_insert(Root { active: None });
        // What the old config held goes out now: its state keys may be the
        // new one's (an unchanged block keeps its state).
        if let Some(old) = root.active.replace(Rc::new(active)) {
            old.flush(now);
        }
        true
    }

    fn tick(&mut self, root_context_id: u32) {
        let Some(active) = self
            .roots
            .get(&root_context_id)
            .and_then(|root| root.active.clone())
        else {
            return;
        };
        let now = now_ms();
        active.flush(now);
        active.refresh(now);
    }

    /// Returns whether the request was answered locally (stop iteration).
    fn request_headers(&mut self, context_id: u32) -> bool {
        let Some(stream) = self.streams.get_mut(&context_id) else {
            return false;
        };
        let Some(active) = self
            .roots
            .get(&stream.root)
            .and_then(|root| root.active.clone())
        else {
            return false;
        };
        let buffer = host::request_header_pairs();
        let pairs = HeaderPairs::new(&buffer);
        let (exchange, rejected) = route(&active, &pairs);
        // A client must never steer: the header names any cluster of the
        // proxy. A steered request had it overwritten; any other loses it.
        let steered = exchange.as_ref().is_some_and(|exchange| !exchange.rejected);
        let steering_header = active.router.config().steering_header.as_str();
        if !steered && pairs.contains(steering_header) {
            host::remove_request_header(steering_header);
        }
        stream.exchange = exchange;
        if let Some((service, retry_after_ms)) = rejected {
            reject(&service, retry_after_ms);
            return true;
        }
        false
    }

    fn response_headers(&mut self, context_id: u32) {
        let Some(exchange) = self
            .streams
            .get_mut(&context_id)
            .and_then(|stream| stream.exchange.as_mut())
        else {
            return;
        };
        if exchange.rejected || exchange.responded_ms.is_some() {
            return;
        }
        let active = Rc::clone(&exchange.active);
        let Some((service, runtime)) = active.service(exchange.service) else {
            return;
        };
        let booked = service.breaker.is_some()
            || (exchange.side == Side::Canary && service.rollout.is_some());
        // Unused retries go back to the budget now, not at the end of a
        // stream that may live for minutes.
        if let Some(reservation) = exchange.reservation.take().filter(|r| r.granted > 0) {
            exchange.attempts = host::integer_property(ATTEMPT_COUNT);
            active.settle(
                service,
                runtime,
                Settlement {
                    reservation,
                    attempts_made: exchange.attempts,
                },
            );
        }
        if !booked {
            return;
        }
        if exchange.attempts.is_none() {
            exchange.attempts = host::integer_property(ATTEMPT_COUNT);
        }
        // Slowness is judged to the response headers: a long download is
        // not a slow upstream.
        if service
            .breaker
            .as_ref()
            .is_some_and(|config| config.slow.is_some())
        {
            exchange.responded_ms = Some(now_ms());
        } else {
            exchange.responded_ms = Some(exchange.started_ms);
        }
        exchange.status = host::response_status();
    }

    fn log(&mut self, context_id: u32) {
        let Some(stream) = self.streams.get_mut(&context_id) else {
            return;
        };
        let Some(exchange) = stream.exchange.take() else {
            // Unmatched: nothing to settle or book.
            return;
        };
        let current = self
            .roots
            .get(&stream.root)
            .and_then(|root| root.active.as_ref())
            .is_some_and(|active| Rc::ptr_eq(active, &exchange.active));
        finish(exchange, current);
    }
}

/// Routes a request: service, side, breakers, retries. Returns the exchange
/// to keep, and the service name and retry-after when the stable breaker
/// refuses it.
///
/// Every header it changes is one host call (a replace: 0.46 µs in Envoy,
/// `benches/hostcalls.sh`; writing the whole map back in one
/// `proxy_set_header_map_pairs` costs 2.4 µs, and deletes every header
/// when the map is beyond the host's limits). Envoy re-selects the route
/// once, whatever the number of changes.
fn route(
    active: &Rc<Active>,
    pairs: &HeaderPairs<'_>,
) -> (Option<Exchange>, Option<(String, u64)>) {
    let Some(index) = active
        .router
        .find_service(pairs.get(":authority"), pairs.get(":path"))
    else {
        active.unmatched.increment();
        return (None, None);
    };
    let Some((service, runtime)) = active.service(index) else {
        return (None, None);
    };
    let stateful =
        service.retry.is_some() || service.breaker.is_some() || service.rollout.is_some();
    let now = if stateful {
        let now = now_ms();
        active.clock_hint.set(now);
        now
    } else {
        0
    };
    let (weight_bp, cohort_weights) = match &runtime.rollout {
        Some(rollout_runtime) => match active.rollout_view(service, rollout_runtime, now) {
            // Before the start and after a rollback no percentage
            // traffic reaches the canary, cohort weights included.
            Some(view) => (
                view.weight_bp,
                !matches!(
                    view.state,
                    RolloutState::RolledBack { .. } | RolloutState::Pending
                ),
            ),
            None => (0, false),
        },
        None => (service.weight_bp, true),
    };
    let mut headers = RequestView(pairs);
    let Decision::Routed { mut side, rule, .. } = active.router.decide(
        index,
        weight_bp,
        cohort_weights,
        &mut headers,
        active.random(),
    ) else {
        return (None, None);
    };
    if let Some(counter) = rule.and_then(|rule| runtime.rule_matched.get(rule)) {
        counter.increment();
    }
    let mut exchange = Exchange {
        active: Rc::clone(active),
        service: index,
        side,
        started_ms: now,
        responded_ms: None,
        probe: None,
        reservation: None,
        rejected: false,
        status: None,
        attempts: None,
    };
    if side == Side::Canary {
        match active.admit(service, runtime, Side::Canary, now) {
            Admission::Allowed => {}
            Admission::Probe(token) => exchange.probe = Some(token),
            Admission::Rejected { .. } => {
                // Users see no error: the canary's traffic goes to stable,
                // and a canary hidden by its breaker still fails the
                // rollout gate.
                side = Side::Stable;
                active.record_rollout(service, runtime, now, true);
            }
        }
    }
    exchange.side = side;
    if side == Side::Stable {
        match active.admit(service, runtime, Side::Stable, now) {
            Admission::Allowed => {}
            Admission::Probe(token) => exchange.probe = Some(token),
            Admission::Rejected { retry_after_ms } => {
                exchange.rejected = true;
                return (Some(exchange), Some((service.name.clone(), retry_after_ms)));
            }
        }
    }
    if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
        exchange.reservation = Some(govern_retries(
            &service.name,
            policy,
            retry_runtime,
            pairs,
            now,
        ));
    }
    host::set_request_header(
        &active.router.config().steering_header,
        service.cluster(side).as_bytes(),
    );
    match side {
        Side::Stable => runtime.routed_stable.increment(),
        Side::Canary => runtime.routed_canary.increment(),
    }
    (Some(exchange), None)
}

/// Settles and books a finished request. `current`: its config is still
/// the one in force (otherwise what it leaves is written at once, since the
/// old config will see no more ticks).
fn finish(exchange: Exchange, current: bool) {
    if exchange.rejected {
        return;
    }
    let active = Rc::clone(&exchange.active);
    let Some((service, runtime)) = active.service(exchange.service) else {
        return;
    };
    let booked =
        service.breaker.is_some() || (exchange.side == Side::Canary && service.rollout.is_some());
    let granted = exchange
        .reservation
        .is_some_and(|reservation| reservation.granted > 0);
    let attempts = match exchange.attempts {
        Some(attempts) => Some(attempts),
        None if booked || granted => host::integer_property(ATTEMPT_COUNT),
        None => None,
    };
    if let Some(reservation) = exchange.reservation.filter(|r| r.granted > 0) {
        active.settle(
            service,
            runtime,
            Settlement {
                reservation,
                attempts_made: attempts,
            },
        );
    }
    if booked {
        // Usually known from the response headers; a request that ended
        // without any (reset, timeout before headers, client gone) is asked
        // about here.
        let status = exchange
            .status
            .or_else(|| host::integer_property(RESPONSE_CODE))
            .unwrap_or(0);
        let server_error = (500..600).contains(&status);
        // Flags are read even after a good status: a 200 whose connection
        // the upstream cut mid-body (UC) failed the client all the same. A
        // 5xx has failed already.
        let flags = if server_error {
            0
        } else {
            host::integer_property(RESPONSE_FLAGS).unwrap_or(0)
        };
        let attempts = attempts.unwrap_or(1);
        let failed = breaker::is_failure(u32::try_from(status).ok(), flags);
        // No status and no upstream failure: the client went away, or the
        // request never reached an upstream. Neither says anything about the
        // cluster's health.
        let outcome = (attempts > 0 && (status != 0 || failed)).then(|| {
            let ended = exchange.responded_ms.unwrap_or_else(now_ms);
            Outcome {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                failed,
                duration_ms: ended.saturating_sub(exchange.started_ms),
            }
        });
        active.record_breaker(
            service,
            runtime,
            exchange.side,
            exchange.started_ms,
            outcome,
            exchange.probe,
        );
        if exchange.side == Side::Canary {
            if let Some(outcome) = outcome {
                active.record_rollout(service, runtime, now_ms(), outcome.any_failure());
            }
        }
    }
    if !current {
        active.flush(now_ms());
    }
}

/// Plans the request's retries and timeouts, reserves the retries from the
/// shared budget (settling the worker's finished requests in the same
/// write), and writes every header the router reads for them, overwriting
/// whatever the client sent.
fn govern_retries(
    service: &str,
    policy: &retry::RetryPolicy,
    runtime: &RetryRuntime,
    pairs: &HeaderPairs<'_>,
    now: u64,
) -> Reservation {
    let grpc_timeout = pairs.get(retry::GRPC_TIMEOUT_HEADER);
    let deadline_header = policy
        .deadline_header
        .as_deref()
        .and_then(|name| pairs.get(name));
    let deadline = retry::client_deadline_ms(grpc_timeout, deadline_header);
    let plan = retry::plan(policy, deadline);
    if plan.deadline_cut {
        runtime.deadline_cut.increment();
    }
    // Even a request whose deadline leaves it no retry is deposited: the
    // budget is a share of all requests. Only a policy that never retries
    // skips the store.
    let reservation = if policy.max_retries == 0 {
        Reservation::unrecorded(0)
    } else {
        let result = {
            let held = runtime.held.borrow();
            shared::update(&HostStore, &runtime.key, |bytes| {
                retry::reserve_settling(bytes, policy, now, plan.max_retries, &held)
            })
        };
        match result {
            Some(reservation) => {
                runtime.held.borrow_mut().clear();
                reservation
            }
            None => Reservation::unrecorded(plan.max_retries),
        }
    };
    runtime.granted.add(u64::from(reservation.granted));
    runtime.denied.add(u64::from(reservation.denied));
    if reservation.dry && retry::dry_warning_due(runtime.last_dry_warning_ms.get(), now, policy) {
        runtime.last_dry_warning_ms.set(Some(now));
        log(
            LOG_WARN,
            &format!(
                "sluice: retry budget of service {service} ran dry: {} of {} retries denied, {} tokens left",
                reservation.denied, plan.max_retries, reservation.level
            ),
        );
    }
    retry::for_each_request_header(policy, &plan, reservation.granted, |name, value| {
        match value {
            Some(value) => host::set_request_header(name, value),
            // Only what the client sent needs removing.
            None if pairs.contains(name) => host::remove_request_header(name),
            None => {}
        }
    });
    reservation
}

/// Fails a request fast while the stable cluster's breaker is open.
fn reject(service: &str, retry_after_ms: u64) {
    let retry_after = breaker::retry_after_seconds(retry_after_ms).to_string();
    let body = format!(
        "sluice: circuit breaker of service {service} is open; retry after {retry_after}s\n"
    );
    host::send_local_response(
        503,
        &[
            ("retry-after", retry_after.as_str()),
            (BREAKER_HEADER, "open"),
            ("content-type", "text/plain"),
        ],
        body.as_bytes(),
    );
}

/// The request headers, read from the one buffer the host returned.
struct RequestView<'p, 'a>(&'p HeaderPairs<'a>);

impl RequestHeaders for RequestView<'_, '_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}
