//! A configuration in force on one worker: the compiled router, and per
//! service its metrics, its shared-state keys and what this worker holds
//! back from the shared state (cached verdicts, held successes and
//! settlements, counters).
//!
//! Every decision is taken on the shared state; only its freshness is
//! bounded per worker: a breaker another worker opened is seen within
//! `BREAKER_CACHE_MS` or at this worker's first failure write, much as
//! Envoy's own outlier detection reaches its workers, and held successes,
//! settlements and deposits reach the others within a tick. A worker's
//! lease on a retry budget keeps at most an eighth of its spare tokens
//! from the others, for at most `retry::LEASE_MS` and a tick.

use super::host::{Host, MetricKind, Observed};
use crate::breaker::{
    self, Admission, BreakerConfig, Check, Outcome, PendingSuccesses, ProbeToken,
};
use crate::config::{Config, Service, Side};
use crate::retry::{self, Lease, Pending, Reservation, Settlement};
use crate::rollout::{self, RolloutView};
use crate::router::Router;
use crate::shared;
use crate::sticky::{mix, Rng};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

/// A VM re-reads the shared rollout state at least this often.
pub const ROLLOUT_CACHE_MS: u64 = 1_000;
/// A worker trusts a closed breaker's verdict this long without a read.
pub const BREAKER_CACHE_MS: u64 = 100;
/// A worker writes its held settlements or successes at once beyond this
/// many, whatever the tick: bounded memory and bounded staleness under any
/// load.
pub const MAX_HELD: u64 = 1_024;
/// How long a request waits to retry after a breaker admission that lost
/// every CAS race: the store is hot, so the conservative answer is "later".
const LOST_ADMISSION_RETRY_AFTER_MS: u64 = 1_000;

/// A counter that adds up in the VM and reaches the host on the tick: no
/// host call on the request path.
#[derive(Debug, Default)]
pub struct Counter {
    id: Option<u32>,
    held: Cell<u64>,
}

impl Counter {
    fn define(host: &impl Host, name: &str) -> Self {
        Counter {
            id: host.define_metric(MetricKind::Counter, name),
            held: Cell::new(0),
        }
    }

    pub fn add(&self, amount: u64) {
        self.held.set(self.held.get().saturating_add(amount));
    }

    pub fn increment(&self) {
        self.add(1);
    }

    fn flush(&self, host: &impl Host) {
        let amount = self.held.replace(0);
        if let (Some(id), Ok(amount)) = (self.id, i64::try_from(amount)) {
            if amount > 0 {
                host.increment_metric(id, amount);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Gauge(Option<u32>);

impl Gauge {
    fn define(host: &impl Host, name: &str) -> Self {
        Gauge(host.define_metric(MetricKind::Gauge, name))
    }

    fn set(self, host: &impl Host, value: u64) {
        if let Some(id) = self.0 {
            host.record_metric(id, value);
        }
    }
}

/// A retry policy's runtime handles.
pub struct RetryRuntime {
    pub key: String,
    pub granted: Counter,
    pub denied: Counter,
    pub deadline_cut: Counter,
    /// Requests whose retry conditions were narrowed for safety.
    pub withheld_unsafe: Counter,
    level: Gauge,
    pub last_dry_warning_ms: Cell<Option<u64>>,
    /// Finished requests' reservations (not settled with the current
    /// lease), written with the next write.
    pub held: RefCell<Vec<Settlement>>,
    /// The worker's lease on the budget (`retry::Lease`): until a write
    /// gives it back, it takes back the unused retries of its requests.
    pub lease: Cell<Option<Lease>>,
    /// Requests served since the last write, deposited with the next one.
    pub deposits: Cell<u32>,
}

/// Names leases (`Lease::serial`): distinct within a VM (one wasm memory
/// per VM in Envoy), across its configs.
static NEXT_LEASE: AtomicU64 = AtomicU64::new(1);

fn next_lease_serial() -> u64 {
    NEXT_LEASE.fetch_add(1, Ordering::Relaxed).max(1)
}

impl RetryRuntime {
    /// The request's retries: from the worker's lease with no host call
    /// when it is valid and covers them, else from one write that also
    /// carries what the worker held, gives the lease back and takes a new
    /// one (`retry::renew`). A request that wants no retry is deposited
    /// with the next write.
    pub fn reserve(
        &self,
        host: &impl Host,
        policy: &retry::RetryPolicy,
        now: u64,
        wanted: u32,
    ) -> Reservation {
        self.deposits.set(self.deposits.get().saturating_add(1));
        let mut lease = self.lease.get();
        let local = lease.as_mut().and_then(|lease| lease.grant(now, wanted));
        if let Some(reservation) = local {
            self.lease.set(lease);
            self.observe_reserved(host, policy, &reservation);
            if u64::from(self.deposits.get()) >= MAX_HELD {
                self.write(host, policy, now, false);
            }
            return reservation;
        }
        if wanted == 0 {
            if u64::from(self.deposits.get()) >= MAX_HELD {
                self.write(host, policy, now, false);
            }
            return Reservation::unrecorded(0);
        }
        let serial = next_lease_serial();
        let deposits = self.deposits.get();
        let result = {
            let held = self.held.borrow();
            let pending = Pending {
                settlements: &held,
                returned: lease,
                deposits,
            };
            shared::update(host, &self.key, |bytes| {
                retry::renew(bytes, policy, now, wanted, &pending, serial)
            })
        };
        let Some(renewal) = result else {
            // The deposits wait for the next write; the lease, if any,
            // stays the worker's.
            host.observe(Observed::UpdateLost { key: &self.key });
            return Reservation::unrecorded(wanted);
        };
        self.held.borrow_mut().clear();
        self.deposits.set(0);
        self.lease.set(renewal.lease);
        host.observe(Observed::Deposited {
            key: &self.key,
            budget: policy.budget,
            landed: &renewal.landed,
        });
        if let Some(lease) = &renewal.lease {
            host.observe(Observed::Leased {
                key: &self.key,
                budget: policy.budget,
                lease,
            });
        }
        self.observe_reserved(host, policy, &renewal.reservation);
        renewal.reservation
    }

    fn observe_reserved(
        &self,
        host: &impl Host,
        policy: &retry::RetryPolicy,
        reservation: &Reservation,
    ) {
        host.observe(Observed::Reserved {
            key: &self.key,
            budget: policy.budget,
            reservation,
        });
    }

    /// Books a finished request: the unused retries of one granted from
    /// the current lease go back to it (no host call); anything else is
    /// held for the next write, at once beyond `MAX_HELD`.
    pub fn settle(&self, host: &impl Host, policy: &retry::RetryPolicy, settlement: Settlement) {
        let mut rest = Some(settlement);
        if let Some(mut lease) = self.lease.get() {
            if settlement.reservation.lease == lease.serial {
                rest = lease.settle(&settlement);
                self.lease.set(Some(lease));
            }
        }
        let Some(settlement) = rest else {
            return;
        };
        let count = {
            let mut held = self.held.borrow_mut();
            held.push(settlement);
            held.len()
        };
        if count as u64 >= MAX_HELD {
            self.write(host, policy, host.now_ms(), false);
        }
    }

    /// Writes what the worker holds: settlements, deposits, and its lease
    /// when it has expired (or always, with `retire`: the config is going
    /// away). Nothing to write, no host call.
    pub fn write(&self, host: &impl Host, policy: &retry::RetryPolicy, now: u64, retire: bool) {
        let returned = self
            .lease
            .get()
            .filter(|lease| retire || !lease.valid_at(now));
        if self.held.borrow().is_empty() && self.deposits.get() == 0 && returned.is_none() {
            return;
        }
        let deposits = self.deposits.get();
        let written = {
            let held = self.held.borrow();
            let pending = Pending {
                settlements: &held,
                returned,
                deposits,
            };
            shared::update(host, &self.key, |bytes| {
                retry::write_pending(bytes, policy, now, &pending)
            })
        };
        match written {
            Some(landed) => {
                self.held.borrow_mut().clear();
                self.deposits.set(0);
                if returned.is_some() {
                    self.lease.set(None);
                }
                host.observe(Observed::Deposited {
                    key: &self.key,
                    budget: policy.budget,
                    landed: &landed,
                });
            }
            None => host.observe(Observed::UpdateLost { key: &self.key }),
        }
    }
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
pub struct ServiceRuntime {
    pub routed_stable: Counter,
    pub routed_canary: Counter,
    pub rule_matched: Vec<Counter>,
    pub retry: Option<RetryRuntime>,
    /// Stable, canary.
    breakers: [Option<BreakerRuntime>; 2],
    rollout: Option<RolloutRuntime>,
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
    fn new(host: &impl Host, service: &Service, now: u64) -> Self {
        let prefix = format!("sluice.{}", service.name);
        let retry = service.retry.as_ref().map(|policy| {
            let key = retry::budget_key(&service.name, policy);
            shared::ensure(host, &key, &retry::fresh_state(policy, now));
            RetryRuntime {
                key,
                granted: Counter::define(host, &format!("{prefix}.retry.granted")),
                denied: Counter::define(host, &format!("{prefix}.retry.denied")),
                deadline_cut: Counter::define(host, &format!("{prefix}.retry.deadline_cut")),
                withheld_unsafe: Counter::define(host, &format!("{prefix}.retry.withheld_unsafe")),
                level: Gauge::define(host, &format!("{prefix}.retry.budget_level")),
                last_dry_warning_ms: Cell::new(None),
                held: RefCell::new(Vec::new()),
                lease: Cell::new(None),
                deposits: Cell::new(0),
            }
        });
        let breaker_for = |side: Side| -> Option<BreakerRuntime> {
            let config = service.breaker.as_ref()?;
            if side == Side::Canary && service.canary.is_none() {
                return None;
            }
            let key = breaker::state_key(&service.name, service.cluster(side), config);
            shared::ensure(host, &key, &breaker::initial());
            let name = format!("{prefix}.breaker.{}", side_name(side));
            Some(BreakerRuntime {
                key,
                state: Gauge::define(host, &format!("{name}.state")),
                trips: Counter::define(host, &format!("{name}.trips")),
                rejected: Counter::define(host, &format!("{name}.rejected")),
                cached: Cell::new(None),
                held: RefCell::new(PendingSuccesses::new()),
            })
        };
        let rollout = match (&service.rollout, &service.canary) {
            (Some(config), Some(canary)) => {
                let key = rollout::state_key(&service.name, &service.stable, canary, config);
                shared::ensure(host, &key, &rollout::initial(config, now));
                Some(RolloutRuntime {
                    key,
                    weight_bp: Gauge::define(host, &format!("{prefix}.rollout.weight_bp")),
                    state: Gauge::define(host, &format!("{prefix}.rollout.state")),
                    rollbacks: Counter::define(host, &format!("{prefix}.rollout.rollbacks")),
                    cached: Cell::new(None),
                })
            }
            _ => None,
        };
        ServiceRuntime {
            routed_stable: Counter::define(host, &format!("{prefix}.routed.stable")),
            routed_canary: Counter::define(host, &format!("{prefix}.routed.canary")),
            rule_matched: (0..service.rules.len())
                .map(|index| Counter::define(host, &format!("{prefix}.rule.{index}.matched")))
                .collect(),
            retry,
            breakers: [breaker_for(Side::Stable), breaker_for(Side::Canary)],
            rollout,
        }
    }

    fn breaker(&self, side: Side) -> Option<&BreakerRuntime> {
        let [stable, canary] = &self.breakers;
        match side {
            Side::Stable => stable.as_ref(),
            Side::Canary => canary.as_ref(),
        }
    }

    pub fn has_rollout(&self) -> bool {
        self.rollout.is_some()
    }
}

/// A configuration in force: the compiled router and its runtime handles.
pub struct Active {
    pub router: Router,
    services: Vec<ServiceRuntime>,
    pub unmatched: Counter,
    /// Per-VM randomness for requests without a sticky key and for breaker
    /// jitter, seeded once: no host call on the request path.
    rng: RefCell<Rng>,
    /// The latest clock this VM read.
    pub clock_hint: Cell<u64>,
}

impl Active {
    pub fn new(host: &impl Host, config: Config, now: u64) -> Self {
        let services = config
            .services
            .iter()
            .map(|service| ServiceRuntime::new(host, service, now))
            .collect();
        // The clock separates VMs even if the host gave no randomness.
        let seed = mix(host.random_u64().unwrap_or(0) ^ mix(now));
        Active {
            router: Router::new(config),
            services,
            unmatched: Counter::define(host, "sluice.unmatched"),
            rng: RefCell::new(Rng::new(seed)),
            clock_hint: Cell::new(now),
        }
    }

    pub fn random(&self) -> u64 {
        self.rng.borrow_mut().next_u64()
    }

    pub fn service(&self, index: usize) -> Option<(&Service, &ServiceRuntime)> {
        Some((
            self.router.services().get(index)?,
            self.services.get(index)?,
        ))
    }

    /// The rollout's current view for a service, from this VM's cache when
    /// fresh. A rollback reaches the other VMs within `ROLLOUT_CACHE_MS`.
    pub fn rollout_view(
        &self,
        host: &impl Host,
        service: &Service,
        runtime: &ServiceRuntime,
        now: u64,
    ) -> Option<RolloutView> {
        let config = service.rollout.as_ref()?;
        let rollout_runtime = runtime.rollout.as_ref()?;
        if let Some((view, valid_until)) = rollout_runtime.cached.get() {
            // Further ahead than a view is ever cached: the wall clock
            // stepped back since, so the view is stale (as in `admit`).
            if now < valid_until && valid_until - now <= ROLLOUT_CACHE_MS {
                return Some(view);
            }
        }
        let stored = host.get(&rollout_runtime.key).map(|(bytes, _)| bytes);
        let view = rollout::view(stored.as_deref(), config, now);
        let mut valid_until = now.saturating_add(ROLLOUT_CACHE_MS);
        if let Some(change) = view.next_change_ms {
            valid_until = valid_until.min(change);
        }
        rollout_runtime.cached.set(Some((view, valid_until)));
        Some(view)
    }

    /// Books a canary outcome with the rollout gate, at once: a rollback is
    /// final, so the gate judges on every outcome there is, never on a
    /// worker's partial view (the canary is a small share of the traffic,
    /// so this costs little per request on average).
    pub fn record_rollout(
        &self,
        host: &impl Host,
        service: &Service,
        runtime: &ServiceRuntime,
        now: u64,
        failed: bool,
    ) {
        let (Some(config), Some(rollout_runtime)) =
            (service.rollout.as_ref(), runtime.rollout.as_ref())
        else {
            return;
        };
        let updated = shared::update(host, &rollout_runtime.key, |bytes| {
            rollout::record(bytes, config, now, failed)
        });
        if updated.is_none() {
            host.observe(Observed::UpdateLost {
                key: &rollout_runtime.key,
            });
        }
        if let Some(event) = updated.flatten() {
            if event.is_rollback() {
                rollout_runtime.rollbacks.increment();
                // This VM stops sending cohort traffic at once.
                rollout_runtime.cached.set(None);
                log::warn!("{}", event.log_line(&service.name));
            } else {
                log::info!("{}", event.log_line(&service.name));
            }
        }
    }

    /// Asks a side's breaker whether a request may go to it.
    pub fn admit(
        &self,
        host: &impl Host,
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
        // A cached verdict further ahead than this code ever caches one was
        // taken before the wall clock stepped back: it is stale, not valid
        // for the length of the step (the shared state is read instead,
        // which `breaker::State::load` sanitises the same way).
        match breaker_runtime.cached.get() {
            Some(CachedVerdict::Allowed { until_ms })
                if now < until_ms && until_ms - now <= BREAKER_CACHE_MS =>
            {
                return Admission::Allowed
            }
            Some(CachedVerdict::OpenUntil { until_ms })
                if now < until_ms && until_ms - now <= config.max_open_ms =>
            {
                breaker_runtime.rejected.increment();
                return Admission::Rejected {
                    retry_after_ms: until_ms - now,
                };
            }
            _ => {}
        }
        // The common case, a closed breaker, costs one read a
        // `BREAKER_CACHE_MS` and no write.
        let stored = host.get(&breaker_runtime.key).map(|(bytes, _)| bytes);
        let (check, run) = breaker::check_run(stored.as_deref(), config, now);
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
            shared::update(host, &breaker_runtime.key, |bytes| {
                breaker::admit_held(bytes, config, now, &held)
            })
        };
        let (admission, transition) = match result {
            Some(result) => {
                breaker_runtime.held.borrow_mut().clear();
                result
            }
            None => {
                host.observe(Observed::UpdateLost {
                    key: &breaker_runtime.key,
                });
                (
                    Admission::Rejected {
                        retry_after_ms: LOST_ADMISSION_RETRY_AFTER_MS,
                    },
                    None,
                )
            }
        };
        if let Some(transition) = transition {
            host.observe(Observed::BreakerChanged {
                key: &breaker_runtime.key,
                transition: &transition,
            });
            breaker_runtime.state.set(host, transition.to.gauge());
            log::warn!(
                "{}",
                transition.log_line(&service.name, service.cluster(side))
            );
        }
        if let Admission::Rejected { .. } = admission {
            breaker_runtime.rejected.increment();
        }
        admission
    }

    /// Books a finished request with its side's breaker: a clean success is
    /// held, anything else written at once with the held successes.
    #[allow(clippy::too_many_arguments)]
    pub fn record_breaker(
        &self,
        host: &impl Host,
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
                let now = host.now_ms();
                let released = shared::update(host, &breaker_runtime.key, |bytes| {
                    breaker::release(bytes, config, now, token)
                });
                if released.is_none() {
                    host.observe(Observed::UpdateLost {
                        key: &breaker_runtime.key,
                    });
                }
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
            self.write_breaker(host, service, side, config, breaker_runtime, None);
            return;
        }
        let finished = Some((outcome, probe));
        self.write_breaker(host, service, side, config, breaker_runtime, finished);
    }

    /// One write: the held successes, then the finished request if any.
    fn write_breaker(
        &self,
        host: &impl Host,
        service: &Service,
        side: Side,
        config: &BreakerConfig,
        runtime: &BreakerRuntime,
        finished: Option<(Outcome, Option<ProbeToken>)>,
    ) {
        if finished.is_none() && runtime.held.borrow().is_empty() {
            return;
        }
        let now = host.now_ms();
        let random = self.random();
        let result = {
            let held = runtime.held.borrow();
            shared::update(host, &runtime.key, |bytes| {
                breaker::record_held(bytes, config, now, &held, finished, random)
            })
        };
        let Some((transition, check, run)) = result else {
            host.observe(Observed::UpdateLost { key: &runtime.key });
            return;
        };
        runtime.held.borrow_mut().clear();
        runtime.cached.set(match check {
            Check::Allowed => closed_verdict(run, now),
            _ => None,
        });
        if let Some(transition) = transition {
            host.observe(Observed::BreakerChanged {
                key: &runtime.key,
                transition: &transition,
            });
            runtime.state.set(host, transition.to.gauge());
            if transition.is_trip() {
                runtime.trips.increment();
                if let Some(open_ms) = transition.open_ms {
                    runtime.cached.set(Some(CachedVerdict::OpenUntil {
                        until_ms: now.saturating_add(open_ms),
                    }));
                }
            }
            log::warn!(
                "{}",
                transition.log_line(&service.name, service.cluster(side))
            );
        }
    }

    /// Books a finished request's settlement (`RetryRuntime::settle`).
    pub fn settle(
        &self,
        host: &impl Host,
        service: &Service,
        runtime: &ServiceRuntime,
        settlement: Settlement,
    ) {
        if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
            retry_runtime.settle(host, policy, settlement);
        }
    }

    /// Writes everything held: settlements, deposits, an expired lease
    /// (any lease with `retire`, for a config going away), successes,
    /// counters.
    pub fn flush(&self, host: &impl Host, now: u64, retire: bool) {
        for (service, runtime) in self.router.services().iter().zip(&self.services) {
            if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
                retry_runtime.write(host, policy, now, retire);
                retry_runtime.granted.flush(host);
                retry_runtime.denied.flush(host);
                retry_runtime.deadline_cut.flush(host);
                retry_runtime.withheld_unsafe.flush(host);
            }
            if let Some(config) = &service.breaker {
                for side in [Side::Stable, Side::Canary] {
                    if let Some(breaker_runtime) = runtime.breaker(side) {
                        self.write_breaker(host, service, side, config, breaker_runtime, None);
                        breaker_runtime.trips.flush(host);
                        breaker_runtime.rejected.flush(host);
                    }
                }
            }
            if let Some(rollout_runtime) = &runtime.rollout {
                rollout_runtime.rollbacks.flush(host);
            }
            runtime.routed_stable.flush(host);
            runtime.routed_canary.flush(host);
            for counter in &runtime.rule_matched {
                counter.flush(host);
            }
        }
        self.unmatched.flush(host);
    }

    /// Refreshes gauges and announces rollout steps the clock has reached.
    pub fn refresh(&self, host: &impl Host, now: u64) {
        let stored = |key: &str| host.get(key).map(|(bytes, _)| bytes);
        for (service, runtime) in self.router.services().iter().zip(&self.services) {
            if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
                let level = retry::level(stored(&retry_runtime.key).as_deref(), policy, now);
                retry_runtime.level.set(host, level);
            }
            if let Some(config) = &service.breaker {
                for breaker_runtime in runtime.breakers.iter().flatten() {
                    let state =
                        breaker::state(stored(&breaker_runtime.key).as_deref(), config, now);
                    breaker_runtime.state.set(host, state.gauge());
                }
            }
            if let (Some(config), Some(rollout_runtime)) = (&service.rollout, &runtime.rollout) {
                if rollout::due(stored(&rollout_runtime.key).as_deref(), config, now) {
                    let event = shared::update(host, &rollout_runtime.key, |bytes| {
                        rollout::advance(bytes, config, now)
                    })
                    .flatten();
                    if let Some(event) = event {
                        log::info!("{}", event.log_line(&service.name));
                    }
                }
                rollout_runtime.cached.set(None);
                if let Some(view) = self.rollout_view(host, service, runtime, now) {
                    rollout_runtime
                        .weight_bp
                        .set(host, u64::from(view.weight_bp));
                    rollout_runtime.state.set(host, view.state.gauge());
                }
            }
        }
    }
}
