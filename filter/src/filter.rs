//! The proxy-wasm shell around the policy modules.
//!
//! Every host call goes through `crate::host`, which handles every status:
//! the SDK's `hostcalls` panic on statuses they did not expect and its trait
//! helpers on non-UTF-8 header values, and a panic here would trap the VM and
//! fail every later request of the worker. Request headers are read in one
//! host call (`HeaderPairs`); only the headers the filter changes cross back.
//!
//! Per request: `on_http_request_headers` picks the service and side, asks
//! the breakers, reserves retries from the budget and writes the steering and
//! retry headers; `on_http_response_headers` settles the retry reservation
//! (the router retries no more once it passes response headers on);
//! `on_log` books the outcome with the breaker and the rollout gate.

use crate::breaker::{self, Admission, Check, Outcome, ProbeToken};
use crate::config::{Config, Service, Side};
use crate::host::{self, LOG_ERROR, LOG_INFO, LOG_WARN, METRIC_COUNTER, METRIC_GAUGE};
use crate::pairs::HeaderPairs;
use crate::retry::{self, Reservation};
use crate::rollout::{self, RolloutState, RolloutView};
use crate::router::{Decision, RequestHeaders, Router};
use crate::shared::{self, CasMismatch, SharedStore};
use crate::sticky::Rng;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SluiceRoot::default()) });
}}

/// Gauges are refreshed and due rollout steps announced this often.
const TICK_MS: u32 = 1_000;
/// A VM re-reads the shared rollout state at least this often.
const ROLLOUT_CACHE_MS: u64 = 1_000;
/// Header on a local reply that says the breaker, not the upstream, refused.
const BREAKER_HEADER: &str = "x-sluice-breaker";

thread_local! {
    /// Per-VM randomness for requests without a sticky key and for breaker
    /// jitter. A VM is single threaded; seeding once keeps host calls off
    /// the request path.
    static RNG: RefCell<Rng> = RefCell::new(Rng::new(initial_seed()));
}

fn initial_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState draws from WASI random_get, which Envoy provides; the
    // clock separates VMs even if it did not.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

fn next_random() -> u64 {
    RNG.with(|rng| rng.borrow_mut().next_u64())
}

fn now_ms() -> u64 {
    host::now_ms()
}

fn log(level: u32, message: &str) {
    host::log(level, message);
}

/// Property paths, their segments joined by NUL as the ABI wants them.
const RESPONSE_CODE: &[u8] = b"response\0code";
const RESPONSE_FLAGS: &[u8] = b"response\0flags";
const ATTEMPT_COUNT: &[u8] = b"upstream\0request_attempt_count";

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

#[derive(Debug, Clone, Copy, Default)]
struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Self {
        Counter(host::define_metric(METRIC_COUNTER, name))
    }

    fn add(self, amount: u64) {
        if let (Some(id), Ok(amount)) = (self.0, i64::try_from(amount)) {
            if amount > 0 {
                host::increment_metric(id, amount);
            }
        }
    }

    fn increment(self) {
        self.add(1);
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

/// A retry policy's runtime handles.
struct RetryRuntime {
    key: String,
    granted: Counter,
    denied: Counter,
    deadline_cut: Counter,
    level: Gauge,
    last_dry_warning_ms: Cell<Option<u64>>,
}

/// One cluster's breaker.
struct BreakerRuntime {
    key: String,
    state: Gauge,
    trips: Counter,
    rejected: Counter,
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
}

impl Active {
    fn new(config: Config) -> Self {
        let now = now_ms();
        let services = config
            .services
            .iter()
            .map(|service| ServiceRuntime::new(service, now))
            .collect();
        Active {
            router: Router::new(config),
            services,
            unmatched: Counter::define("sluice.unmatched"),
        }
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

    /// Books a canary outcome with the rollout gate; logs what it caused.
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
        // The common case, a closed breaker, costs one read and no write.
        match breaker::check(shared_bytes(&breaker_runtime.key).as_deref(), config, now) {
            Check::Allowed => return Admission::Allowed,
            Check::Rejected { retry_after_ms } => {
                breaker_runtime.rejected.increment();
                return Admission::Rejected { retry_after_ms };
            }
            Check::TryProbe => {}
        }
        let result = shared::update(&HostStore, &breaker_runtime.key, |bytes| {
            breaker::admit(bytes, config, now)
        });
        let (admission, transition) = result.unwrap_or((
            Admission::Rejected {
                retry_after_ms: 1_000,
            },
            None,
        ));
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

    /// Books a finished request with its side's breaker.
    fn record_breaker(
        &self,
        service: &Service,
        runtime: &ServiceRuntime,
        side: Side,
        now: u64,
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
                let _ = shared::update(&HostStore, &breaker_runtime.key, |bytes| {
                    breaker::release(bytes, config, now, token)
                });
            }
            return;
        };
        let random = next_random();
        let transition = shared::update(&HostStore, &breaker_runtime.key, |bytes| {
            breaker::record(bytes, config, now, outcome, probe, random)
        })
        .flatten();
        if let Some(transition) = transition {
            breaker_runtime.state.set(transition.to.gauge());
            if transition.is_trip() {
                breaker_runtime.trips.increment();
            }
            log(
                LOG_WARN,
                &transition.log_line(&service.name, service.cluster(side)),
            );
        }
    }

    /// Refreshes gauges and announces rollout steps the clock has reached.
    fn tick(&self, now: u64) {
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

#[derive(Default)]
struct SluiceRoot {
    active: Option<Rc<Active>>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = host::plugin_configuration();
        match Config::parse(&bytes) {
            Ok(config) => {
                log(
                    LOG_INFO,
                    &format!("sluice: config applied: {}", config.summary()),
                );
                let needs_tick = config.services.iter().any(|service| {
                    service.retry.is_some()
                        || service.breaker.is_some()
                        || service.rollout.is_some()
                });
                let active = Active::new(config);
                if needs_tick {
                    host::set_tick_period_ms(TICK_MS);
                    active.tick(now_ms());
                }
                self.active = Some(Rc::new(active));
                true
            }
            Err(err) => {
                log(LOG_ERROR, &format!("sluice: config refused: {err}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(active) = &self.active {
            active.tick(now_ms());
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SluiceStream {
            active: self.active.clone(),
            exchange: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The bookkeeping of a routed request, from its headers to its log.
struct Exchange {
    service: usize,
    side: Side,
    started_ms: u64,
    responded_ms: Option<u64>,
    probe: Option<ProbeToken>,
    /// Retries reserved from the budget; taken when settled.
    reservation: Option<Reservation>,
    /// The breaker refused the request with a local reply.
    rejected: bool,
    /// The response status and upstream attempts, once the response
    /// headers have come (read then, so `on_log` need not ask again).
    status: Option<u64>,
    attempts: Option<u64>,
}

struct SluiceStream {
    active: Option<Rc<Active>>,
    exchange: Option<Exchange>,
}

impl Context for SluiceStream {}

impl HttpContext for SluiceStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        let buffer = host::request_header_pairs();
        let pairs = HeaderPairs::new(&buffer);
        // A client must never steer: the header names any cluster of the
        // proxy. Removed on every request, matched by a service or not.
        let steering_header = &active.router.config().steering_header;
        if pairs.contains(steering_header) {
            host::remove_request_header(steering_header);
        }

        let Some(index) = active
            .router
            .find_service(pairs.get(":authority"), pairs.get(":path"))
        else {
            active.unmatched.increment();
            return Action::Continue;
        };
        let Some((service, runtime)) = active.service(index) else {
            return Action::Continue;
        };
        let now = now_ms();
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
            next_random(),
        ) else {
            return Action::Continue;
        };
        if let Some(counter) = rule.and_then(|rule| runtime.rule_matched.get(rule)) {
            counter.increment();
        }

        let mut probe = None;
        if side == Side::Canary {
            match active.admit(service, runtime, Side::Canary, now) {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { .. } => {
                    // Users see no error: the canary's traffic goes to
                    // stable, and a canary hidden by its breaker still
                    // fails the rollout gate.
                    side = Side::Stable;
                    active.record_rollout(service, runtime, now, true);
                }
            }
        }
        if side == Side::Stable {
            match active.admit(service, runtime, Side::Stable, now) {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { retry_after_ms } => {
                    self.exchange = Some(Exchange {
                        service: index,
                        side,
                        started_ms: now,
                        responded_ms: None,
                        probe: None,
                        reservation: None,
                        rejected: true,
                        status: None,
                        attempts: None,
                    });
                    reject(&service.name, retry_after_ms);
                    return Action::Pause;
                }
            }
        }

        let reservation = match (&service.retry, &runtime.retry) {
            (Some(policy), Some(retry_runtime)) => Some(govern_retries(
                &service.name,
                policy,
                retry_runtime,
                &headers,
                now,
            )),
            _ => None,
        };
        host::set_request_header(steering_header, service.cluster(side).as_bytes());
        match side {
            Side::Stable => runtime.routed_stable.increment(),
            Side::Canary => runtime.routed_canary.increment(),
        }
        self.exchange = Some(Exchange {
            service: index,
            side,
            started_ms: now,
            responded_ms: None,
            probe,
            reservation,
            rejected: false,
            status: None,
            attempts: None,
        });
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(exchange) = self.exchange.as_mut() {
            if !exchange.rejected && exchange.responded_ms.is_none() {
                let now = now_ms();
                exchange.responded_ms = Some(now);
                exchange.status = host::response_status();
                exchange.attempts = host::integer_property(ATTEMPT_COUNT);
                // The router retries no more once it passes response
                // headers on: unused retries go back to the budget now.
                self.settle_retries(now);
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(active) = self.active.clone() else {
            return;
        };
        if self.exchange.is_none() {
            // Unmatched: nothing to settle or book, no clock read.
            return;
        }
        let now = now_ms();
        self.settle_retries(now);
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        if exchange.rejected {
            return;
        }
        let Some((service, runtime)) = active.service(exchange.service) else {
            return;
        };
        let booked = service.breaker.is_some()
            || (exchange.side == Side::Canary && service.rollout.is_some());
        if !booked {
            return;
        }
        // Status and attempts are usually known from the response headers;
        // a request that ended without any (reset, timeout before headers,
        // client gone) is asked about here.
        let status = exchange
            .status
            .or_else(|| host::integer_property(RESPONSE_CODE))
            .unwrap_or(0);
        // Flags are read even after a status: a 200 whose connection the
        // upstream cut mid-body (UC) failed the client all the same.
        let flags = host::integer_property(RESPONSE_FLAGS).unwrap_or(0);
        let attempts = exchange
            .attempts
            .or_else(|| host::integer_property(ATTEMPT_COUNT))
            .unwrap_or(1);
        let failed = breaker::is_failure(u32::try_from(status).ok(), flags);
        // No status and no upstream failure: the client went away, or the
        // request never reached an upstream. Neither says anything about
        // the cluster's health.
        let outcome = (attempts > 0 && (status != 0 || failed)).then(|| Outcome {
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            failed,
            duration_ms: exchange
                .responded_ms
                .unwrap_or(now)
                .saturating_sub(exchange.started_ms),
        });
        active.record_breaker(
            service,
            runtime,
            exchange.side,
            now,
            outcome,
            exchange.probe,
        );
        if exchange.side == Side::Canary {
            if let Some(outcome) = outcome {
                active.record_rollout(service, runtime, now, outcome.any_failure());
            }
        }
    }
}

impl SluiceStream {
    /// Returns the retries the request did not use to the budget, once.
    fn settle_retries(&mut self, now: u64) {
        let Some(active) = self.active.as_deref() else {
            return;
        };
        let Some(exchange) = self.exchange.as_mut() else {
            return;
        };
        let Some(reservation) = exchange.reservation.take() else {
            return;
        };
        let (Some((service, runtime)), true) =
            (active.service(exchange.service), reservation.granted > 0)
        else {
            return;
        };
        let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) else {
            return;
        };
        let attempts = exchange
            .attempts
            .or_else(|| host::integer_property(ATTEMPT_COUNT));
        let _ = shared::update(&HostStore, &retry_runtime.key, |bytes| {
            (
                retry::settle(bytes, policy, now, &reservation, attempts),
                (),
            )
        });
    }
}

/// Plans the request's retries and timeouts, reserves the retries from the
/// shared budget, and writes every header the router reads for them,
/// overwriting whatever the client sent.
fn govern_retries(
    service: &str,
    policy: &retry::RetryPolicy,
    runtime: &RetryRuntime,
    headers: &RequestView,
    now: u64,
) -> Reservation {
    let grpc_timeout = headers.0.get(retry::GRPC_TIMEOUT_HEADER);
    let deadline_header = policy
        .deadline_header
        .as_deref()
        .and_then(|name| headers.0.get(name));
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
        shared::update(&HostStore, &runtime.key, |bytes| {
            retry::reserve(bytes, policy, now, plan.max_retries)
        })
        .unwrap_or_else(|| Reservation::unrecorded(plan.max_retries))
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
    for (name, value) in retry::request_headers(policy, &plan, reservation.granted) {
        match value {
            Some(value) => host::set_request_header(name, value.as_bytes()),
            // Only what the client sent needs removing: a call saved.
            None if headers.0.contains(name) => host::remove_request_header(name),
            None => {}
        }
    }
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
struct RequestView<'a>(HeaderPairs<'a>);

impl RequestHeaders for RequestView<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}
