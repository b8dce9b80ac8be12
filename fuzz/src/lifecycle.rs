//! The request lifecycle through Sluice's policy core, with the invariants
//! checked after every event.
//!
//! `Sim` does per request what `filter/src/filter.rs` does, minus the host:
//! `Router::find_service` and `Router::decide` over arbitrary header bytes,
//! `breaker::check`/`admit`/`record`/`release`, `retry::plan`/`reserve`/
//! `settle` and `rollout::view`/`record`/`advance`, every shared-state change
//! through `shared::update` on one `MemoryStore` that several simulated
//! workers (VMs) share, with the clock passed in. Config reloads swap a
//! worker's configuration while requests started under the old one are still
//! in flight (as Envoy's streams keep theirs).
//!
//! Invariants, checked after every event (`Sim::step` returns the first one
//! violated):
//! - only configured clusters are chosen: the cluster written is the matched
//!   service's stable or canary, canary only when it has one; the service is
//!   the first (in config order) whose match fits, by a plain scan;
//! - the split is monotonic (more weight never moves a request from canary to
//!   stable) and sticky (with a sticky key, the random word does not matter);
//!   a rolled-back rollout sends no weighted traffic to the canary;
//! - the retry budget's bound (`filter/src/retry.rs`, "The bound, exactly"):
//!   for every interval of seconds `[a, b]` of one budget state,
//!   `retries(a..=b) ≤ ratio × requests(a−W+1..=b) + min_per_s × (b − a + W)`,
//!   counting the retries the router really made (the granted ones while it
//!   may still make them), by the second they were granted in;
//! - breaker transitions are only closed→open, open→half-open,
//!   half-open→closed and half-open→open, every change of the stored state is
//!   reported (once, to the writer) and every report is a change; open →
//!   half-open only once the open time has passed; open times stay within
//!   `[open_ms, max_open_ms]`;
//! - a rollback is final for its rollout state;
//! - no panic, no arithmetic overflow (the fuzz build has overflow checks).
//!
//! This file is shared: the `lifecycle` fuzz target decodes its input into a
//! `Scenario`, and `filter/tests/properties.rs` includes it (`#[path]`) to
//! drive it from proptest strategies. It depends on `sluice` and std only.

use sluice::breaker::{self, Admission, BreakerConfig, BreakerState, Check, Outcome, ProbeToken};
use sluice::config::{Config, HostPattern, RuleAction, Service, Side, StickyKey};
use sluice::retry::{self, Budget, Reservation, RetryPolicy, TOKEN};
use sluice::rollout::{self, RolloutState};
use sluice::router::{cookie_value, Decision, RequestHeaders, Router};
use sluice::shared::{self, CasMismatch, MemoryStore, SharedStore};
use sluice::sticky::Rng;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;

/// The simulated clock starts here (plus the scenario's offset).
pub const T0: u64 = 1_700_000_000_000;

/// Header names the templates read; decoders draw names from this list most
/// of the time so that rules, sticky keys and deadlines are exercised.
pub const HEADER_NAMES: &[&str] = &[
    ":authority",
    ":path",
    "x-user",
    "cookie",
    "user-agent",
    "x-canary",
    "grpc-timeout",
    "x-deadline",
    "x-sluice-cluster",
    "x-envoy-max-retries",
    "x-tenant",
];

/// Authorities and paths the templates match, for the same reason.
pub const AUTHORITIES: &[&str] = &[
    "shop.local",
    "SHOP.local:8080",
    "a.shop.example",
    "shop.example",
    "cart.local.",
    "x.example.com",
    "b.x.example.com",
    "a.local",
    "[::1]:443",
    "[::1",
    ":80",
    "",
];
pub const PATHS: &[&str] = &["/", "/cart/items", "/a/b", "/b", "/api", "", "cart"];

// ------------------------------------------------------------------ config

/// The numbers of a configuration. `Knobs::json` clamps every field into its
/// documented range, so any value is fine; the resulting JSON must parse.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    /// Which template: see `Knobs::json`.
    pub template: u8,
    pub weight_bp: u16,
    pub rule_weight_bp: u16,
    pub max_retries: u8,
    pub ratio_ppm: u32,
    pub min_per_s: u32,
    pub window_s: u8,
    pub per_try_ms: Option<u32>,
    pub timeout_ms: Option<u32>,
    pub breaker_window_s: u16,
    pub min_requests: u32,
    pub failure_rate_ppm: u32,
    pub consecutive: Option<u32>,
    pub slow: Option<(u32, u32)>,
    pub open_ms: u32,
    pub max_open_extra_ms: u32,
    pub half_open: u8,
    pub steps: Vec<u16>,
    pub step_s: u32,
    pub max_failure_ppm: u32,
    pub rollout_min_requests: u32,
    /// `start_unix_s` relative to `T0`, in seconds (modulo 4000); `None`:
    /// when applied.
    pub start_offset_s: Option<i32>,
    /// Varies a canary cluster name, so reloads can start a new rollout.
    pub cluster_suffix: u8,
}

/// Number of templates `Knobs::json` knows.
pub const TEMPLATES: u8 = 4;

fn percent(bp: u16) -> String {
    let bp = bp.min(10_000);
    format!("{}.{:02}", bp / 100, bp % 100)
}

fn rate(ppm: u32) -> String {
    let ppm = ppm % 1_000_001;
    format!("{}.{:06}", ppm / 1_000_000, ppm % 1_000_000)
}

impl Knobs {
    fn retry_json(&self) -> String {
        let mut out = format!(
            r#"{{"max_retries": {}, "retry_on": "5xx,reset, connect-failure,unavailable", "budget": {{"ratio": {}, "min_per_s": {}, "window_s": {}}}, "deadline_header": "X-Deadline""#,
            self.max_retries % 11,
            rate(self.ratio_ppm),
            self.min_per_s % 101,
            u32::from(self.window_s) % 60 + 1
        );
        let timeout = self.timeout_ms.map(|ms| ms % 3_600_000 + 1);
        if let Some(timeout) = timeout {
            let _ = write!(out, r#", "timeout_ms": {timeout}"#);
        }
        if let Some(per_try) = self.per_try_ms {
            let cap = timeout.unwrap_or(600_000).min(600_000);
            let _ = write!(out, r#", "per_try_timeout_ms": {}"#, per_try % cap + 1);
        }
        out.push('}');
        out
    }

    fn breaker_json(&self) -> String {
        let open_ms = self.open_ms % 20_000 + 1;
        let max_open_ms = (open_ms + self.max_open_extra_ms % 120_000).min(3_600_000);
        let mut out = format!(
            r#"{{"window_s": {}, "min_requests": {}, "failure_rate": {}, "open_ms": {open_ms}, "max_open_ms": {max_open_ms}, "half_open_requests": {}"#,
            self.breaker_window_s % 300 + 1,
            self.min_requests % 50 + 1,
            rate(self.failure_rate_ppm % 1_000_000 + 1),
            self.half_open % 100 + 1
        );
        if let Some(consecutive) = self.consecutive {
            let _ = write!(out, r#", "consecutive_failures": {}"#, consecutive % 20 + 1);
        }
        if let Some((slow_ms, slow_rate)) = self.slow {
            let _ = write!(
                out,
                r#", "slow_ms": {}, "slow_rate": {}"#,
                slow_ms % 10_000 + 1,
                rate(slow_rate % 1_000_000 + 1)
            );
        }
        out.push('}');
        out
    }

    fn rollout_json(&self) -> String {
        let mut steps: Vec<u16> = self
            .steps
            .iter()
            .take(rollout::MAX_STEPS)
            .map(|step| step % 10_001)
            .collect();
        if steps.is_empty() {
            steps.push(self.weight_bp % 10_001);
        }
        steps.sort_unstable();
        let steps: Vec<String> = steps.into_iter().map(percent).collect();
        let mut out = format!(
            r#"{{"steps": [{}], "step_s": {}, "max_failure_rate": {}, "min_requests": {}"#,
            steps.join(", "),
            self.step_s % 600 + 1,
            rate(self.max_failure_ppm),
            self.rollout_min_requests % 200 + 1
        );
        if let Some(offset) = self.start_offset_s {
            let start = (T0 / 1000).saturating_add_signed(i64::from(offset % 4000));
            let _ = write!(out, r#", "start_unix_s": {start}"#);
        }
        out.push('}');
        out
    }

    /// The configuration JSON. Templates:
    /// 0. one service: exact and wildcard hosts, weight, sticky header,
    ///    header/cookie/device rules, retry and breaker;
    /// 1. a rollout service (sticky cookie) with retry and breaker, and a
    ///    catch-all stable-only service with its own retry and breaker;
    /// 2. routing: several services with overlapping hosts and paths;
    /// 3. one catch-all service with a tight budget and a breaker on both
    ///    clusters.
    pub fn json(&self) -> String {
        let weight = percent(self.weight_bp);
        let rule_weight = percent(self.rule_weight_bp);
        let retry = self.retry_json();
        let breaker = self.breaker_json();
        match self.template % TEMPLATES {
            0 => format!(
                r#"{{"services": [{{"name": "shop", "match": {{"authority": ["shop.local", "*.Shop.Example."], "path_prefix": "/"}},
                  "stable": "shop_v1", "canary": "shop_v2", "weight": {weight}, "sticky": {{"header": "X-User"}},
                  "rules": [{{"header": "x-canary", "equals": ["always", "yes"], "to": "canary"}},
                            {{"header": "x-canary", "prefix": "never", "to": "stable"}},
                            {{"cookie": "beta", "present": true, "weight": {rule_weight}}},
                            {{"device": "mobile", "weight": {rule_weight}}},
                            {{"header": "user-agent", "contains": "curl", "to": "stable"}}],
                  "retry": {retry}, "breaker": {breaker}}}]}}"#
            ),
            1 => format!(
                r#"{{"steering_header": "x-route", "services": [
                  {{"name": "cart", "match": {{"authority": "cart.local", "path_prefix": "/cart"}},
                    "stable": "cart_v1", "canary": "cart_v{}", "sticky": {{"cookie": "uid"}},
                    "rules": [{{"header": "x-canary", "equals": "always", "to": "canary"}},
                              {{"header": "x-tenant", "present": true, "weight": {rule_weight}}}],
                    "retry": {retry}, "breaker": {breaker}, "rollout": {}}},
                  {{"name": "api", "stable": "api_v1", "retry": {{"max_retries": {}}}, "breaker": {breaker}}}]}}"#,
                u16::from(self.cluster_suffix % 4) + 2,
                self.rollout_json(),
                self.max_retries % 11
            ),
            2 => format!(
                r#"{{"services": [
                  {{"name": "a", "match": {{"authority": ["*.example.com", "A.local"], "path_prefix": "/a"}}, "stable": "a1", "canary": "a2", "weight": {weight}}},
                  {{"name": "b", "match": {{"authority": "*", "path_prefix": "/b"}}, "stable": "b1"}},
                  {{"name": "c", "match": {{"authority": ["x.example.com", "[::1]", "*.local"]}}, "stable": "c1", "canary": "c2",
                    "sticky": {{"cookie": "uid"}}, "weight": {rule_weight}, "retry": {retry}}},
                  {{"name": "d", "match": {{"path_prefix": "/"}}, "stable": "d1", "canary": "d2", "weight": {weight},
                    "sticky": {{"header": "x-user"}}, "rules": [{{"cookie": "beta", "equals": "", "to": "canary"}}]}}]}}"#
            ),
            _ => format!(
                r#"{{"services": [{{"name": "tight", "stable": "t1", "canary": "t2", "weight": {weight},
                  "sticky": {{"header": "x-user"}}, "retry": {retry}, "breaker": {breaker}}}]}}"#
            ),
        }
    }
}

// ------------------------------------------------------------------ events

/// What happens next.
#[derive(Debug, Clone)]
pub enum Event {
    /// A request arrives at a worker (`on_http_request_headers`). Header
    /// names are lower-cased, as Envoy stores them; `:authority` and `:path`
    /// are headers too. `random` is the word for a request without a key.
    Request {
        worker: u8,
        headers: Vec<(String, Vec<u8>)>,
        random: u64,
    },
    /// The response headers of an in-flight request (`pick` modulo the
    /// number in flight) reach the filter: the router is done, having made
    /// `attempts` attempts; `reported`: the attempt-count property is there.
    Response {
        pick: u16,
        attempts: u64,
        reported: bool,
    },
    /// The request ends (`on_log`) with this status (0: none) and
    /// `response.flags`; `attempts` as above unless the response came first.
    End {
        pick: u16,
        status: u64,
        flags: u64,
        attempts: u64,
        reported: bool,
    },
    /// The request vanishes (its VM died): nothing is settled or recorded.
    Abandon { pick: u16 },
    /// The clock moves by this many milliseconds (negative: stepped back).
    Clock { delta_ms: i64 },
    /// The clock is set back (or forward) to an earlier reading: the start,
    /// or the time after an earlier clock event (`to` counts back from the
    /// newest). Clocks stepped by NTP land on exact earlier times, which is
    /// what a state keyed by its creation time must survive.
    Rewind { to: u8 },
    /// A worker (all when `None`) applies configuration variant `variant`.
    Reload { worker: Option<u8>, variant: u8 },
    /// The next `failures` shared-data writes lose their CAS race.
    Contend { failures: u8 },
    /// A worker's `on_tick`: gauges read, due rollout steps announced.
    Tick { worker: u8 },
    /// `count % 32 + 1` requests to `AUTHORITIES[authority]` and `PATHS[path]` from
    /// users `user0`, `user1`, …, spread over the workers, `step_ms` apart,
    /// each answered with `status` after `attempts` attempts. `overlap`:
    /// all are in flight at once (every request starts, then every one
    /// ends), else each ends before the next starts. Reaches the states a
    /// single event rarely does (tripped breakers, drained budgets).
    Burst {
        count: u8,
        authority: u8,
        path: u8,
        status: u64,
        attempts: u64,
        step_ms: u16,
        overlap: bool,
    },
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// 1 to 8 workers.
    pub workers: u8,
    pub seed: u64,
    /// Added to `T0`.
    pub start_offset_ms: u32,
    /// Configuration variants (at least one; the first is applied at start).
    pub variants: Vec<Knobs>,
    pub events: Vec<Event>,
}

/// What a run did, to see that the fuzzer reaches the interesting states.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: u64,
    pub unmatched: u64,
    pub canary: u64,
    pub rejected: u64,
    pub granted: u64,
    pub denied: u64,
    pub trips: u64,
    pub half_opens: u64,
    pub closes: u64,
    pub rollbacks: u64,
    pub budget_checks: u64,
    pub lost_updates: u64,
}

// ------------------------------------------------------------------ store

/// A successful write to the store: the key, and its bytes before and after.
#[derive(Debug, Clone)]
pub struct Write {
    pub key: String,
    pub old: Option<Vec<u8>>,
    pub new: Vec<u8>,
}

/// A `MemoryStore` that can lose CAS races on demand and logs every write,
/// so that each state change can be checked against what was reported.
#[derive(Debug, Default)]
pub struct Store {
    inner: MemoryStore,
    fail_next: Cell<u32>,
    writes: RefCell<Vec<Write>>,
}

impl SharedStore for Store {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
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

impl Store {
    fn take_writes(&self) -> Vec<Write> {
        std::mem::take(&mut *self.writes.borrow_mut())
    }

    fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        self.inner.get(key).map(|(bytes, _)| bytes)
    }
}

// ---------------------------------------------------------------- headers

/// Request headers as Envoy's header map gives them: the first value of a
/// (lower-case) name.
#[derive(Debug, Clone, Default)]
pub struct Headers(pub Vec<(String, Vec<u8>)>);

impl RequestHeaders for Headers {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_slice())
    }
}

impl Headers {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, value)| value.as_slice())
    }
}

// ------------------------------------------------------------ budget oracle

/// One lifetime of one budget state: per second, the requests deposited and
/// the retries the router made (or may still make).
#[derive(Debug, Clone)]
struct Lifetime {
    budget: Budget,
    epoch: u64,
    newest_second: u64,
    seconds: BTreeMap<u64, (u64, u64)>,
}

impl Lifetime {
    /// The bound on the intervals `[a, b]` whose ends hold retries (the
    /// tightest ones: moving an end inwards past seconds without retries
    /// only lowers the right-hand side). `newest_only`: only those ending at
    /// the newest second, the only ones a deposit there can break (seconds
    /// never go back within a lifetime, and a refund only lowers retries).
    fn check(&self, newest_only: bool) -> Result<(), String> {
        let window = u64::from(self.budget.window_s.max(1));
        let rows: Vec<(u64, u64, u64)> = self
            .seconds
            .iter()
            .map(|(&second, &(requests, retries))| (second, requests, retries))
            .collect();
        // Prefix sums: requests and retries of rows[..i].
        let mut requests_before = vec![0u128];
        let mut retries_before = vec![0u128];
        for &(_, requests, retries) in &rows {
            let last_requests = requests_before.last().copied().unwrap_or(0);
            let last_retries = retries_before.last().copied().unwrap_or(0);
            requests_before.push(last_requests + u128::from(requests));
            retries_before.push(last_retries + u128::from(retries));
        }
        let at = |sums: &Vec<u128>, index: usize| sums.get(index).copied().unwrap_or(0);
        let ends = if newest_only {
            rows.len().saturating_sub(1)
        } else {
            0
        };
        for (end, &(b, _, retries_b)) in rows.iter().enumerate().skip(ends) {
            if retries_b == 0 {
                continue;
            }
            for (start, &(a, _, retries_a)) in rows.iter().enumerate().take(end + 1) {
                if retries_a == 0 {
                    continue;
                }
                // First row at or after a − W + 1.
                let from_second = a.saturating_sub(window - 1);
                let first = rows.partition_point(|&(second, _, _)| second < from_second);
                let retries = at(&retries_before, end + 1) - at(&retries_before, start);
                let requests = at(&requests_before, end + 1) - at(&requests_before, first);
                let allowed = requests * u128::from(self.budget.ratio_ppm)
                    + u128::from(self.budget.min_per_s)
                        * u128::from(b - a + window)
                        * u128::from(TOKEN);
                if retries * u128::from(TOKEN) > allowed {
                    return Err(format!(
                        "retry budget bound broken: seconds {a}..={b} (epoch {}) made {retries} retries on {requests} requests, budget {:?} allows {}",
                        self.epoch,
                        self.budget,
                        allowed / u128::from(TOKEN)
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A granted reservation as the oracle tracks it.
#[derive(Debug, Clone, Copy)]
struct Charge {
    key: usize,
    lifetime: usize,
    second: u64,
    granted: u64,
}

#[derive(Debug, Default)]
struct BudgetOracle {
    keys: HashMap<String, usize>,
    /// Per key, its lifetimes; the last is the current one.
    lifetimes: Vec<Vec<Lifetime>>,
}

impl BudgetOracle {
    /// A request deposited by a reservation that landed. A new lifetime
    /// starts when the state's epoch changes or its head goes back (the
    /// state was recreated: the documented "one extra reserve").
    fn deposit(&mut self, key: &str, budget: Budget, reservation: &Reservation) -> Charge {
        let next = self.keys.len();
        let index = *self.keys.entry(key.to_string()).or_insert(next);
        if self.lifetimes.len() <= index {
            self.lifetimes.resize_with(index + 1, Vec::new);
        }
        let mut lifetime_index = 0;
        if let Some(lifetimes) = self.lifetimes.get_mut(index) {
            let renewed = match lifetimes.last() {
                Some(current) => {
                    current.epoch != reservation.epoch
                        || reservation.second < current.newest_second
                        || current.budget != budget
                }
                None => true,
            };
            if renewed {
                lifetimes.push(Lifetime {
                    budget,
                    epoch: reservation.epoch,
                    newest_second: reservation.second,
                    seconds: BTreeMap::new(),
                });
            }
            lifetime_index = lifetimes.len() - 1;
            if let Some(current) = lifetimes.last_mut() {
                current.newest_second = reservation.second;
                let entry = current.seconds.entry(reservation.second).or_default();
                entry.0 += 1;
                entry.1 += u64::from(reservation.granted);
            }
        }
        Charge {
            key: index,
            lifetime: lifetime_index,
            second: reservation.second,
            granted: u64::from(reservation.granted),
        }
    }

    /// The router is done: it made `retries` of the granted ones.
    fn executed(&mut self, charge: &Charge, retries: u64) {
        let unused = charge.granted - retries.min(charge.granted);
        if let Some(entry) = self
            .lifetimes
            .get_mut(charge.key)
            .and_then(|lifetimes| lifetimes.get_mut(charge.lifetime))
            .and_then(|lifetime| lifetime.seconds.get_mut(&charge.second))
        {
            entry.1 -= unused;
        }
    }

    /// The bound after a deposit: the key's current lifetime, at its
    /// newest second.
    fn check(&self, key: usize) -> Result<(), String> {
        match self
            .lifetimes
            .get(key)
            .and_then(|lifetimes| lifetimes.last())
        {
            Some(lifetime) => lifetime.check(true),
            None => Ok(()),
        }
    }

    /// Every interval of every lifetime (at the end of a run).
    fn check_all(&self) -> Result<(), String> {
        self.lifetimes
            .iter()
            .flatten()
            .try_for_each(|lifetime| lifetime.check(false))
    }
}

// ------------------------------------------------------------ breaker oracle

/// Key prefixes of the shared states (see each module's `state_key`).
const BREAKER_PREFIX: &str = "sluice/breaker/";
const ROLLOUT_PREFIX: &str = "sluice/rollout/";

/// The stored mode of breaker bytes (byte 1 of the encoding); no bytes is a
/// fresh, closed breaker.
fn breaker_mode(bytes: Option<&[u8]>) -> Result<BreakerState, String> {
    match bytes.map(|bytes| bytes.get(1).copied()) {
        None => Ok(BreakerState::Closed),
        Some(Some(0)) => Ok(BreakerState::Closed),
        Some(Some(1)) => Ok(BreakerState::Open),
        Some(Some(2)) => Ok(BreakerState::HalfOpen),
        Some(other) => Err(format!("breaker bytes with mode {other:?} were written")),
    }
}

/// `until_ms` of breaker bytes (bytes 16..24): while open, when probing may
/// start.
fn breaker_until(bytes: Option<&[u8]>) -> Option<u64> {
    let field: [u8; 8] = bytes?.get(16..24)?.try_into().ok()?;
    Some(u64::from_le_bytes(field))
}

fn legal(from: BreakerState, to: BreakerState) -> bool {
    use BreakerState::{Closed, HalfOpen, Open};
    matches!(
        (from, to),
        (Closed, Open) | (Open, HalfOpen) | (HalfOpen, Closed) | (HalfOpen, Open)
    )
}

/// Checks the writes of one breaker operation against the transition it
/// reported: each change of the stored mode is legal and reported, each
/// report is a change.
fn check_breaker_writes(
    writes: &[Write],
    reported: Option<breaker::Transition>,
    config: &BreakerConfig,
    now: u64,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut changes = Vec::new();
    for write in writes.iter().filter(|w| w.key.starts_with(BREAKER_PREFIX)) {
        let from = breaker_mode(write.old.as_deref())?;
        let to = breaker_mode(Some(&write.new))?;
        if from == to {
            continue;
        }
        if !legal(from, to) {
            return Err(format!(
                "illegal breaker transition {from} -> {to} at {now} on {}",
                write.key
            ));
        }
        if (from, to) == (BreakerState::Open, BreakerState::HalfOpen) {
            let until = breaker_until(write.old.as_deref()).unwrap_or(0);
            // Early only when the stored time is further ahead than any
            // open time: a clock stepped back, read as already passed.
            if now < until && until <= now.saturating_add(config.max_open_ms) {
                return Err(format!(
                    "breaker {} went half-open at {now}, before its open time ended at {until}",
                    write.key
                ));
            }
        }
        changes.push((from, to));
    }
    match (changes.as_slice(), reported) {
        ([], None) => {}
        ([(from, to)], Some(transition)) if transition.from == *from && transition.to == *to => {
            match transition.to {
                BreakerState::Open => stats.trips += 1,
                BreakerState::HalfOpen => stats.half_opens += 1,
                BreakerState::Closed => stats.closes += 1,
            }
            if transition.to == BreakerState::Open {
                let open = transition.open_ms.unwrap_or(0);
                if open < config.open_ms || open > config.max_open_ms {
                    return Err(format!(
                        "open time {open} ms outside [{}, {}]",
                        config.open_ms, config.max_open_ms
                    ));
                }
            }
        }
        (changes, reported) => {
            return Err(format!(
                "breaker state changes {changes:?} but reported {reported:?}"
            ))
        }
    }
    Ok(())
}

/// A rollback is final: rollout bytes once rolled back (byte 1) stay so.
fn check_rollout_writes(writes: &[Write], stats: &mut Stats) -> Result<(), String> {
    for write in writes.iter().filter(|w| w.key.starts_with(ROLLOUT_PREFIX)) {
        let was = write.old.as_deref().and_then(|b| b.get(1).copied()) == Some(1);
        let is = write.new.get(1).copied() == Some(1);
        if was && !is {
            return Err(format!("rollout {} un-rolled back", write.key));
        }
        if is && !was {
            stats.rollbacks += 1;
        }
    }
    Ok(())
}

// --------------------------------------------------------------- reference

/// The service a request belongs to, by a plain scan in config order: the
/// reference for `Router::find_service`'s hash tables.
pub fn reference_service(
    config: &Config,
    authority: Option<&[u8]>,
    path: Option<&[u8]>,
) -> Option<usize> {
    let path = path.unwrap_or(b"/");
    let host = authority.and_then(reference_host);
    config.services.iter().position(|service| {
        let patterns = &service.matcher.authorities;
        let host_fits = patterns.is_empty()
            || patterns.iter().any(|pattern| match pattern {
                HostPattern::Any => true,
                HostPattern::Exact(exact) => host.as_deref() == Some(exact.as_bytes()),
                HostPattern::Suffix(suffix) => host
                    .as_deref()
                    .is_some_and(|host| host.ends_with(suffix.as_bytes())),
            });
        let path_fits = service
            .matcher
            .path_prefix
            .as_ref()
            .is_none_or(|prefix| path.starts_with(prefix.as_bytes()));
        host_fits && path_fits
    })
}

/// README: host names case-insensitive, port ignored, trailing dot ignored;
/// `[v6]:port` keeps its brackets.
fn reference_host(authority: &[u8]) -> Option<Vec<u8>> {
    let host = if authority.first() == Some(&b'[') {
        let end = authority.iter().position(|&byte| byte == b']')?;
        authority.get(..=end)?
    } else {
        authority.split(|&byte| byte == b':').next()?
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// The request's sticky key, if it has a usable one.
fn sticky_key<'h>(service: &Service, headers: &'h Headers) -> Option<&'h [u8]> {
    let key = match service.sticky.as_ref()? {
        StickyKey::Header(name) => headers.get(name),
        StickyKey::Cookie(name) => headers
            .get("cookie")
            .and_then(|cookies| cookie_value(cookies, name.as_bytes())),
    }?;
    (!key.is_empty()).then_some(key)
}

// -------------------------------------------------------------------- sim

/// A service's shared-data keys, as `ServiceRuntime::new` creates them.
#[derive(Debug)]
struct Runtime {
    retry: Option<String>,
    /// Stable, canary.
    breakers: [Option<String>; 2],
    rollout: Option<String>,
}

/// A configuration in force on a worker.
#[derive(Debug)]
struct Active {
    router: Router,
    runtimes: Vec<Runtime>,
    clusters: HashSet<String>,
}

impl Active {
    /// `Active::new` of the glue: keys derived, states ensured.
    fn new(config: Config, store: &Store, now: u64) -> Self {
        let runtimes = config
            .services
            .iter()
            .map(|service| {
                let retry = service.retry.as_ref().map(|policy| {
                    let key = retry::budget_key(&service.name, policy);
                    shared::ensure(store, &key, &retry::fresh_state(policy, now));
                    key
                });
                let breaker_for = |side: Side| {
                    let config = service.breaker.as_ref()?;
                    if side == Side::Canary && service.canary.is_none() {
                        return None;
                    }
                    let key = breaker::state_key(&service.name, service.cluster(side), config);
                    shared::ensure(store, &key, &breaker::initial());
                    Some(key)
                };
                let rollout = match (&service.rollout, &service.canary) {
                    (Some(config), Some(canary)) => {
                        let key =
                            rollout::state_key(&service.name, &service.stable, canary, config);
                        shared::ensure(store, &key, &rollout::initial(config, now));
                        Some(key)
                    }
                    _ => None,
                };
                Runtime {
                    retry,
                    breakers: [breaker_for(Side::Stable), breaker_for(Side::Canary)],
                    rollout,
                }
            })
            .collect();
        let clusters = config
            .services
            .iter()
            .flat_map(|service| {
                std::iter::once(service.stable.clone()).chain(service.canary.clone())
            })
            .collect();
        Active {
            router: Router::new(config),
            runtimes,
            clusters,
        }
    }

    fn service(&self, index: usize) -> Option<(&Service, &Runtime)> {
        Some((
            self.router.services().get(index)?,
            self.runtimes.get(index)?,
        ))
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Stable => 0,
        Side::Canary => 1,
    }
}

/// A request in flight.
#[derive(Debug)]
struct Exchange {
    active: Rc<Active>,
    worker: usize,
    service: usize,
    side: Side,
    started_ms: u64,
    responded_ms: Option<u64>,
    probe: Option<ProbeToken>,
    reservation: Option<(Reservation, Option<Charge>)>,
    /// Attempts the router made, once known (response or end).
    attempts: Option<u64>,
    rejected: bool,
}

/// The simulation: workers, the shared store, the clock and the oracles.
pub struct Sim {
    store: Store,
    now: u64,
    configs: Vec<Config>,
    workers: Vec<Rc<Active>>,
    rngs: Vec<Rng>,
    pending: Vec<Exchange>,
    budget: BudgetOracle,
    rolled_back: HashSet<String>,
    /// The start and the time after each clock event, for `Rewind`.
    readings: Vec<u64>,
    pub stats: Stats,
}

fn ensure(condition: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(message())
    }
}

impl Sim {
    /// Parses every variant (a template that does not parse is a failure:
    /// its numbers are within the documented ranges) and applies the first
    /// on every worker.
    pub fn new(scenario: &Scenario) -> Result<Sim, String> {
        let mut configs = Vec::new();
        for knobs in scenario.variants.iter().take(4) {
            let json = knobs.json();
            match Config::parse(json.as_bytes()) {
                Ok(config) => configs.push(config),
                Err(err) => return Err(format!("template refused: {err}\n{json}")),
            }
        }
        let first = configs
            .first()
            .cloned()
            .ok_or_else(|| "a scenario needs a configuration".to_string())?;
        let store = Store::default();
        let now = T0 + u64::from(scenario.start_offset_ms);
        let count = usize::from(scenario.workers.clamp(1, 8));
        let workers = (0..count)
            .map(|_| Rc::new(Active::new(first.clone(), &store, now)))
            .collect();
        let rngs = (0..count)
            .map(|worker| Rng::new(scenario.seed ^ worker as u64))
            .collect();
        store.take_writes();
        Ok(Sim {
            store,
            now,
            configs,
            workers,
            rngs,
            pending: Vec::new(),
            budget: BudgetOracle::default(),
            rolled_back: HashSet::new(),
            readings: vec![now],
            stats: Stats::default(),
        })
    }

    /// Runs a whole scenario; the first violated invariant, with the event.
    pub fn run(scenario: &Scenario) -> Result<Stats, String> {
        let mut sim = Sim::new(scenario)?;
        for (index, event) in scenario.events.iter().enumerate() {
            sim.step(event)
                .map_err(|err| format!("event {index} ({event:?}) at {}: {err}", sim.now))?;
        }
        sim.budget
            .check_all()
            .map_err(|err| format!("at the end: {err}"))?;
        Ok(sim.stats)
    }

    fn random(&mut self, worker: usize) -> u64 {
        self.rngs.get_mut(worker).map_or(0, Rng::next_u64)
    }

    fn worker_index(&self, worker: u8) -> usize {
        usize::from(worker) % self.workers.len().max(1)
    }

    fn pick(&self, pick: u16) -> Option<usize> {
        (!self.pending.is_empty()).then(|| usize::from(pick) % self.pending.len())
    }

    /// One event, then every invariant it could affect.
    pub fn step(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::Request {
                worker,
                headers,
                random,
            } => {
                let worker = self.worker_index(*worker);
                self.request(worker, Headers(headers.clone()), *random)
            }
            Event::Response {
                pick,
                attempts,
                reported,
            } => match self.pick(*pick) {
                Some(index) => self.response(index, *attempts, *reported),
                None => Ok(()),
            },
            Event::End {
                pick,
                status,
                flags,
                attempts,
                reported,
            } => match self.pick(*pick) {
                Some(index) => {
                    let exchange = self.pending.swap_remove(index);
                    self.end(exchange, *status, *flags, *attempts, *reported)
                }
                None => Ok(()),
            },
            Event::Abandon { pick } => {
                if let Some(index) = self.pick(*pick) {
                    let exchange = self.pending.swap_remove(index);
                    // The router may still use every granted retry.
                    drop(exchange);
                }
                Ok(())
            }
            Event::Clock { delta_ms } => {
                self.now = self.now.saturating_add_signed(*delta_ms).max(1);
                self.readings.push(self.now);
                Ok(())
            }
            Event::Rewind { to } => {
                let back = usize::from(*to) % self.readings.len().max(1);
                if let Some(&then) = self.readings.iter().rev().nth(back) {
                    self.now = then;
                }
                Ok(())
            }
            Event::Reload { worker, variant } => {
                let Some(config) = self
                    .configs
                    .get(usize::from(*variant) % self.configs.len().max(1))
                    .cloned()
                else {
                    return Ok(());
                };
                let targets: Vec<usize> = match worker {
                    Some(worker) => vec![self.worker_index(*worker)],
                    None => (0..self.workers.len()).collect(),
                };
                for target in targets {
                    let active = Rc::new(Active::new(config.clone(), &self.store, self.now));
                    if let Some(slot) = self.workers.get_mut(target) {
                        *slot = active;
                    }
                }
                let writes = self.store.take_writes();
                check_breaker_writes(
                    &writes,
                    None,
                    &BreakerConfig::default(),
                    self.now,
                    &mut self.stats,
                )?;
                check_rollout_writes(&writes, &mut self.stats)
            }
            Event::Contend { failures } => {
                self.store.fail_next.set(u32::from(*failures));
                Ok(())
            }
            Event::Tick { worker } => {
                let worker = self.worker_index(*worker);
                self.tick(worker)
            }
            Event::Burst {
                count,
                authority,
                path,
                status,
                attempts,
                step_ms,
                overlap,
            } => self.burst(
                *count,
                AUTHORITIES
                    .get(usize::from(*authority) % AUTHORITIES.len())
                    .copied()
                    .unwrap_or(""),
                PATHS
                    .get(usize::from(*path) % PATHS.len())
                    .copied()
                    .unwrap_or("/"),
                *status,
                *attempts,
                *step_ms,
                *overlap,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn burst(
        &mut self,
        count: u8,
        authority: &str,
        path: &str,
        status: u64,
        attempts: u64,
        step_ms: u16,
        overlap: bool,
    ) -> Result<(), String> {
        let count = usize::from(count % 32) + 1;
        let first = self.pending.len();
        for user in 0..count {
            let headers = Headers(vec![
                (":authority".to_string(), authority.as_bytes().to_vec()),
                (":path".to_string(), path.as_bytes().to_vec()),
                ("x-user".to_string(), format!("user{user}").into_bytes()),
                ("cookie".to_string(), format!("uid=user{user}").into_bytes()),
            ]);
            let worker = user % self.workers.len().max(1);
            let random = self.random(worker);
            let before = self.pending.len();
            self.request(worker, headers, random)?;
            self.now = self.now.saturating_add(u64::from(step_ms));
            if !overlap && self.pending.len() > before {
                let last = self.pending.len() - 1;
                self.response(last, attempts, true)?;
                if let Some(exchange) = self.pending.pop() {
                    self.end(exchange, status, 0, attempts, true)?;
                }
            }
        }
        if overlap {
            while self.pending.len() > first {
                let last = self.pending.len() - 1;
                self.response(last, attempts, true)?;
                if let Some(exchange) = self.pending.pop() {
                    self.end(exchange, status, 0, attempts, true)?;
                }
                self.now = self.now.saturating_add(u64::from(step_ms));
            }
        }
        Ok(())
    }

    /// `on_http_request_headers`.
    fn request(&mut self, worker: usize, mut headers: Headers, random: u64) -> Result<(), String> {
        let Some(active) = self.workers.get(worker).cloned() else {
            return Ok(());
        };
        self.stats.requests += 1;
        let now = self.now;
        let authority = headers.get(":authority").map(<[u8]>::to_vec);
        let path = headers.get(":path").map(<[u8]>::to_vec);
        let found = active
            .router
            .find_service(authority.as_deref(), path.as_deref());
        let expected = reference_service(
            active.router.config(),
            authority.as_deref(),
            path.as_deref(),
        );
        ensure(found == expected, || {
            format!("find_service chose {found:?}, the first service that fits is {expected:?}")
        })?;
        let Some(index) = found else {
            self.stats.unmatched += 1;
            return Ok(());
        };
        let Some((service, runtime)) = active.service(index) else {
            return Err(format!("service {index} out of range"));
        };

        // The weight: configured, or the rollout's.
        let (weight_bp, cohort_weights) = match (&service.rollout, &runtime.rollout) {
            (Some(config), Some(key)) => {
                let view = rollout::view(self.store.bytes(key).as_deref(), config, now);
                let rolled_back = matches!(view.state, RolloutState::RolledBack { .. });
                ensure(!self.rolled_back.contains(key) || rolled_back, || {
                    format!("rollout {key} rolled back, but the view is {view:?}")
                })?;
                ensure(
                    view.weight_bp == 0
                        || view.weight_bp == sluice::config::FULL_WEIGHT
                        || config.steps_bp.contains(&view.weight_bp),
                    || {
                        format!(
                            "rollout weight {} is no step of {:?}",
                            view.weight_bp, config.steps_bp
                        )
                    },
                )?;
                (view.weight_bp, !rolled_back)
            }
            _ => (service.weight_bp, true),
        };

        let decision = active
            .router
            .decide(index, weight_bp, cohort_weights, &mut headers, random);
        let Decision::Routed {
            service: decided,
            mut side,
            rule,
        } = decision
        else {
            return Err(format!("decide({index}) left a matched request unrouted"));
        };
        ensure(decided == index, || {
            format!("decided service {decided}, asked {index}")
        })?;
        ensure(rule.is_none_or(|rule| rule < service.rules.len()), || {
            format!("rule {rule:?} of {}", service.rules.len())
        })?;
        ensure(side == Side::Stable || service.canary.is_some(), || {
            "canary chosen for a service without one".to_string()
        })?;
        let weighted = rule
            .and_then(|rule| service.rules.get(rule))
            .is_none_or(|rule| matches!(rule.action, RuleAction::Weight(_)));
        ensure(cohort_weights || !weighted || side == Side::Stable, || {
            "a rolled-back rollout sent weighted traffic to the canary".to_string()
        })?;
        // Monotonic: more weight never takes a request off the canary.
        let more = weight_bp
            .saturating_add((random >> 17) as u16 % 10_001)
            .min(10_000);
        let less = weight_bp.saturating_sub((random >> 33) as u16 % 10_001);
        for (low, high) in [(weight_bp, more), (less, weight_bp)] {
            let side_at = |weight: u16, headers: &mut Headers| match active.router.decide(
                index,
                weight,
                cohort_weights,
                headers,
                random,
            ) {
                Decision::Routed { side, .. } => side,
                Decision::Unmatched => Side::Stable,
            };
            if side_at(low, &mut headers) == Side::Canary {
                ensure(side_at(high, &mut headers) == Side::Canary, || {
                    format!("canary at weight {low} bp but stable at {high} bp")
                })?;
            }
        }
        // Sticky: with a key, the random word does not matter.
        if sticky_key(service, &headers).is_some() {
            let other = active.router.decide(
                index,
                weight_bp,
                cohort_weights,
                &mut headers,
                random.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
            );
            ensure(other == decision, || {
                format!("same sticky key, another random word: {other:?} instead of {decision:?}")
            })?;
        }

        // Breakers, as the glue asks them.
        let mut probe = None;
        if side == Side::Canary {
            match self.admit(&active, index, Side::Canary)? {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { .. } => {
                    side = Side::Stable;
                    self.record_rollout(&active, index, true)?;
                }
            }
        }
        if side == Side::Stable {
            match self.admit(&active, index, Side::Stable)? {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { .. } => {
                    self.stats.rejected += 1;
                    self.pending.push(Exchange {
                        active: active.clone(),
                        worker,
                        service: index,
                        side,
                        started_ms: now,
                        responded_ms: None,
                        probe: None,
                        reservation: None,
                        attempts: None,
                        rejected: true,
                    });
                    return Ok(());
                }
            }
        }

        // Retries.
        let reservation = match (&service.retry, &runtime.retry) {
            (Some(policy), Some(key)) => Some(self.govern_retries(policy, key, &mut headers)?),
            _ => None,
        };

        // Only configured clusters are chosen.
        let cluster = service.cluster(side);
        ensure(active.clusters.contains(cluster), || {
            format!("cluster {cluster:?} is not configured")
        })?;
        ensure(
            match side {
                Side::Stable => cluster == service.stable,
                Side::Canary => Some(cluster) == service.canary.as_deref(),
            },
            || format!("{side:?} of {} is {cluster:?}", service.name),
        )?;
        if side == Side::Canary {
            self.stats.canary += 1;
        }
        self.pending.push(Exchange {
            active: active.clone(),
            worker,
            service: index,
            side,
            started_ms: now,
            responded_ms: None,
            probe,
            reservation,
            attempts: None,
            rejected: false,
        });
        Ok(())
    }

    /// `Active::admit` of the glue: a read, and a CAS only to probe.
    fn admit(&mut self, active: &Active, index: usize, side: Side) -> Result<Admission, String> {
        let Some((service, runtime)) = active.service(index) else {
            return Ok(Admission::Allowed);
        };
        let (Some(config), Some(key)) = (
            service.breaker.as_ref(),
            runtime
                .breakers
                .get(side_index(side))
                .and_then(Option::as_ref),
        ) else {
            return Ok(Admission::Allowed);
        };
        let now = self.now;
        let check = breaker::check(self.store.bytes(key).as_deref(), config, now);
        let stored = breaker_mode(self.store.bytes(key).as_deref())?;
        match check {
            Check::Allowed => {
                ensure(stored == BreakerState::Closed, || {
                    format!("check allowed a request through a {stored} breaker")
                })?;
                return Ok(Admission::Allowed);
            }
            Check::Rejected { retry_after_ms } => {
                ensure(stored != BreakerState::Closed, || {
                    "a closed breaker rejected a request".to_string()
                })?;
                return Ok(Admission::Rejected { retry_after_ms });
            }
            Check::TryProbe => {}
        }
        self.store.take_writes();
        let result = shared::update(&self.store, key, |bytes| breaker::admit(bytes, config, now));
        let writes = self.store.take_writes();
        if result.is_none() {
            self.stats.lost_updates += 1;
        }
        let (admission, transition) = result.unwrap_or((
            Admission::Rejected {
                retry_after_ms: 1_000,
            },
            None,
        ));
        check_breaker_writes(&writes, transition, config, now, &mut self.stats)?;
        Ok(admission)
    }

    /// `govern_retries` of the glue, with the budget oracle.
    fn govern_retries(
        &mut self,
        policy: &RetryPolicy,
        key: &str,
        headers: &mut Headers,
    ) -> Result<(Reservation, Option<Charge>), String> {
        let now = self.now;
        let grpc_timeout = headers.get(retry::GRPC_TIMEOUT_HEADER).map(<[u8]>::to_vec);
        let deadline_header = policy
            .deadline_header
            .as_deref()
            .and_then(|name| headers.get(name))
            .map(<[u8]>::to_vec);
        let deadline =
            retry::client_deadline_ms(grpc_timeout.as_deref(), deadline_header.as_deref());
        let plan = retry::plan(policy, deadline);
        ensure(plan.max_retries <= policy.max_retries, || {
            format!("plan {plan:?} above the policy's {}", policy.max_retries)
        })?;
        if let (Some(timeout), Some(planned)) = (policy.timeout_ms, plan.timeout_ms) {
            ensure(planned <= timeout && planned >= 1, || {
                format!("planned timeout {planned} outside 1..={timeout}")
            })?;
        }
        self.store.take_writes();
        let (reservation, charge) = if policy.max_retries == 0 {
            (Reservation::unrecorded(0), None)
        } else {
            match shared::update(&self.store, key, |bytes| {
                retry::reserve(bytes, policy, now, plan.max_retries)
            }) {
                Some(reservation) => {
                    let charge = self.budget.deposit(key, policy.budget, &reservation);
                    self.stats.budget_checks += 1;
                    self.budget.check(charge.key)?;
                    (reservation, Some(charge))
                }
                None => {
                    self.stats.lost_updates += 1;
                    (Reservation::unrecorded(plan.max_retries), None)
                }
            }
        };
        self.store.take_writes();
        ensure(
            reservation.granted <= plan.max_retries
                && reservation.granted + reservation.denied == plan.max_retries,
            || {
                format!(
                    "reservation {reservation:?} for {} wanted",
                    plan.max_retries
                )
            },
        )?;
        self.stats.granted += u64::from(reservation.granted);
        self.stats.denied += u64::from(reservation.denied);
        let written = retry::request_headers(policy, &plan, reservation.granted);
        for (name, value) in &written {
            let expected = match *name {
                retry::MAX_RETRIES_HEADER => Some(reservation.granted.to_string()),
                retry::HEDGE_HEADER
                | retry::EXPECTED_TIMEOUT_HEADER
                | retry::RETRIABLE_STATUS_CODES_HEADER
                | retry::RETRIABLE_HEADER_NAMES_HEADER => None,
                _ => value.clone(),
            };
            ensure(*value == expected, || {
                format!("header {name} written as {value:?}, expected {expected:?}")
            })?;
        }
        Ok((reservation, charge))
    }

    /// `settle_retries` of the glue: the router is done.
    fn settle(&mut self, index: usize, reported: bool) -> Result<(), String> {
        let now = self.now;
        let Some(exchange) = self.pending.get_mut(index) else {
            return Ok(());
        };
        let Some((reservation, charge)) = exchange.reservation.take() else {
            return Ok(());
        };
        let attempts = exchange.attempts.unwrap_or(1);
        if let Some(charge) = &charge {
            self.budget.executed(charge, attempts.saturating_sub(1));
        }
        if reservation.granted == 0 {
            return Ok(());
        }
        let active = exchange.active.clone();
        let Some((service, runtime)) = active.service(exchange.service) else {
            return Ok(());
        };
        let (Some(policy), Some(key)) = (&service.retry, &runtime.retry) else {
            return Ok(());
        };
        let property = reported.then_some(attempts);
        self.store.take_writes();
        let settled = shared::update(&self.store, key, |bytes| {
            (
                retry::settle(bytes, policy, now, &reservation, property),
                (),
            )
        });
        self.store.take_writes();
        if settled.is_none() {
            self.stats.lost_updates += 1;
        }
        Ok(())
    }

    /// `on_http_response_headers`.
    fn response(&mut self, index: usize, attempts: u64, reported: bool) -> Result<(), String> {
        let now = self.now;
        let Some(exchange) = self.pending.get_mut(index) else {
            return Ok(());
        };
        if exchange.rejected || exchange.responded_ms.is_some() {
            return Ok(());
        }
        exchange.responded_ms = Some(now);
        exchange.attempts = Some(attempts);
        self.settle(index, reported)
    }

    /// `on_log`.
    fn end(
        &mut self,
        mut exchange: Exchange,
        status: u64,
        flags: u64,
        attempts: u64,
        reported: bool,
    ) -> Result<(), String> {
        let now = self.now;
        let attempts = *exchange.attempts.get_or_insert(attempts);
        // Settle first, as on_log does when no response headers came.
        self.pending.push(exchange);
        let last = self.pending.len() - 1;
        self.settle(last, reported)?;
        let Some(exchange) = self.pending.pop() else {
            return Ok(());
        };
        if exchange.rejected {
            return Ok(());
        }
        let property = if reported { attempts } else { 1 };
        let failed = breaker::is_failure(u32::try_from(status).ok(), flags);
        let outcome = (property > 0 && (status != 0 || failed)).then(|| Outcome {
            attempts: u32::try_from(property).unwrap_or(u32::MAX),
            failed,
            duration_ms: exchange
                .responded_ms
                .unwrap_or(now)
                .saturating_sub(exchange.started_ms),
        });
        self.record_breaker(&exchange, outcome)?;
        if exchange.side == Side::Canary {
            if let Some(outcome) = outcome {
                self.record_rollout(&exchange.active, exchange.service, outcome.any_failure())?;
            }
        }
        Ok(())
    }

    /// `Active::record_breaker` of the glue.
    fn record_breaker(
        &mut self,
        exchange: &Exchange,
        outcome: Option<Outcome>,
    ) -> Result<(), String> {
        let now = self.now;
        let Some((service, runtime)) = exchange.active.service(exchange.service) else {
            return Ok(());
        };
        let (Some(config), Some(key)) = (
            service.breaker.as_ref(),
            runtime
                .breakers
                .get(side_index(exchange.side))
                .and_then(Option::as_ref),
        ) else {
            return Ok(());
        };
        self.store.take_writes();
        let transition = match outcome {
            None => {
                if let Some(token) = exchange.probe {
                    if shared::update(&self.store, key, |bytes| {
                        breaker::release(bytes, config, now, token)
                    })
                    .is_none()
                    {
                        self.stats.lost_updates += 1;
                    }
                }
                None
            }
            Some(outcome) => {
                let random = self.random(exchange.worker);
                let result = shared::update(&self.store, key, |bytes| {
                    breaker::record(bytes, config, now, outcome, exchange.probe, random)
                });
                if result.is_none() {
                    self.stats.lost_updates += 1;
                }
                result.flatten()
            }
        };
        let writes = self.store.take_writes();
        check_breaker_writes(&writes, transition, config, now, &mut self.stats)
    }

    /// `Active::record_rollout` of the glue.
    fn record_rollout(
        &mut self,
        active: &Active,
        index: usize,
        failed: bool,
    ) -> Result<(), String> {
        let now = self.now;
        let Some((service, runtime)) = active.service(index) else {
            return Ok(());
        };
        let (Some(config), Some(key)) = (service.rollout.as_ref(), runtime.rollout.as_ref()) else {
            return Ok(());
        };
        self.store.take_writes();
        let event = shared::update(&self.store, key, |bytes| {
            rollout::record(bytes, config, now, failed)
        });
        let writes = self.store.take_writes();
        check_rollout_writes(&writes, &mut self.stats)?;
        if let Some(Some(event)) = event {
            if event.is_rollback() {
                self.rolled_back.insert(key.clone());
            }
        }
        Ok(())
    }

    /// `Active::tick` of the glue.
    fn tick(&mut self, worker: usize) -> Result<(), String> {
        let Some(active) = self.workers.get(worker).cloned() else {
            return Ok(());
        };
        let now = self.now;
        for (service, runtime) in active.router.services().iter().zip(&active.runtimes) {
            if let (Some(policy), Some(key)) = (&service.retry, &runtime.retry) {
                let _ = retry::level(self.store.bytes(key).as_deref(), policy, now);
            }
            if let Some(config) = &service.breaker {
                for key in runtime.breakers.iter().flatten() {
                    let _ = breaker::state(self.store.bytes(key).as_deref(), config, now);
                }
            }
            if let (Some(config), Some(key)) = (&service.rollout, &runtime.rollout) {
                let bytes = self.store.bytes(key);
                if rollout::due(bytes.as_deref(), config, now) {
                    self.store.take_writes();
                    let _ = shared::update(&self.store, key, |bytes| {
                        rollout::advance(bytes, config, now)
                    });
                    let writes = self.store.take_writes();
                    check_rollout_writes(&writes, &mut self.stats)?;
                }
                let view = rollout::view(self.store.bytes(key).as_deref(), config, now);
                ensure(
                    !self.rolled_back.contains(key)
                        || matches!(view.state, RolloutState::RolledBack { .. }),
                    || format!("rollout {key} rolled back, but the view is {view:?}"),
                )?;
            }
        }
        Ok(())
    }
}
