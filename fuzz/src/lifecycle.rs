//! The request lifecycle through Sluice's engine, the code that ships, with
//! invariants checked from the outside after every callback.
//!
//! `Sim` runs one `sluice::testing::Vm` (an `engine::Worker` over a
//! `FakeHost`) per simulated worker, all over one `FaultyStore` and one
//! clock, and drives every request through the callbacks Envoy makes:
//! `on_request_headers`, `on_response_headers` when a response comes, then
//! `on_log` and `on_delete`, or `on_delete` alone (the request is
//! abandoned: its VM is going away). `Tick` is the worker's `on_tick`,
//! `Reload` its `on_configure` with requests still in flight (they finish
//! under the config they started with, as Envoy's streams do), `Contend`
//! makes the next shared-data writes lose their CAS race, and the shared
//! clock is stepped forward, back and to exact earlier readings. Nothing
//! here decides what the engine decides: the oracles read the host's state
//! (the request headers the engine left, local replies), the store's write
//! log (every write, old and new bytes) and what the engine reported
//! through `Host::observe`, and use only pure code that ships (`Router`,
//! `rollout::view`, the state keys) to interpret them.
//!
//! Invariants, checked after every callback (`Sim::step` returns the first
//! one broken):
//! - only configured clusters are chosen: a routed request carries exactly
//!   one steering header, the stable or canary cluster (canary only when it
//!   has one) of the service a plain scan in config order matches
//!   (`reference_service`); an unmatched request, and one the breaker
//!   refused (a 503 local reply marked by the breaker header), carries none,
//!   a client-forged one included; with `stable_by_default` a stable
//!   request carries none; a service with a retry policy in headers mode
//!   gets one `x-envoy-max-retries`, the retries its reservation granted,
//!   and in route mode that header only when it grants fewer than the
//!   route's `num_retries`; no client-sent retry or timeout header reaches
//!   the router from a matched service (`check_route_mode` for what route
//!   mode may write);
//! - safe retries: a request that may not be replayed is never armed with
//!   a condition that fires after a response (`check_safe_retry`), and in
//!   route mode, whose route conditions no header can narrow, it gets
//!   `x-envoy-max-retries: 0` when those include one;
//! - the split is monotonic (more weight never moves a request from canary
//!   to stable) and sticky (with a sticky key, the random word does not
//!   matter), by `Router::decide` on the parsed config; a rolled-back
//!   rollout sends no weighted traffic to the canary; and end to end, a
//!   sticky request to a service without a rollout lands on the side
//!   `decide` gives on every worker (stable instead of canary only when the
//!   service has a breaker to fall back from);
//! - the retry budget's bound (`filter/src/retry.rs`, "The bound, exactly"):
//!   for every interval of seconds `[a, b]` of one budget state,
//!   `retries(a..=b) ≤ ratio × requests(a−W+1..=b) + min_per_s × (b − a + W)`,
//!   counting per reservation the engine reported (`Observed::Reserved`) the
//!   retries the router really made (all granted ones while it may still
//!   make them), by the second they were charged to (a lease's, for a grant
//!   from a lease), and the requests where the writes that landed deposited
//!   them (`Observed::Deposited`); a write lost to CAS races deposits
//!   nothing;
//! - leases (`retry::Lease`): a lease is taken at the head second the
//!   write deposited in, by the clock of the callback, and leaves at least
//!   `LEASE_SHARE − 1` times its tokens to the others (the level in the
//!   bytes written: no worker starves the rest); a grant from a lease comes
//!   from one this worker took, while the clock is within `LEASE_MS` of
//!   taking it and before its slot leaves the window, and the retries its
//!   requests may still make or made never exceed its tokens;
//! - breaker transitions are only closed→open, open→half-open,
//!   half-open→closed and half-open→open; per callback and per breaker key,
//!   the changes of the stored state are exactly the transitions the engine
//!   reported (`Observed::BreakerChanged`), in order; open → half-open only
//!   once the open time has passed; open times stay within
//!   `[open_ms, max_open_ms]`; the engine writes only state keys its configs
//!   define;
//! - a breaker trips (closed→open) only if, since it last closed or was
//!   created, its cluster was delivered at least one outcome that could
//!   count against it: a 5xx status, an upstream failure flag, an attempt
//!   count above 1, or (with `slow_ms`) start and end clocks `slow_ms` or
//!   more apart in either direction;
//! - a rollback is final for its rollout state;
//! - the engine forgets every stream that ended;
//! - no panic, no arithmetic overflow (the fuzz build has overflow checks).
//!
//! This file is shared: the `lifecycle` fuzz target decodes its input into a
//! `Scenario`, and `filter/tests/properties.rs` includes it (`#[path]`) to
//! drive it from proptest strategies. It depends on `sluice` and std only.

use sluice::breaker::{self, BreakerConfig, BreakerState, Transition};
use sluice::config::{Config, HostPattern, RuleAction, Service, Side, StickyKey};
use sluice::engine::{HeadersAction, BREAKER_HEADER};
use sluice::retry::{self, Budget, Reservation, RetryMode, TOKEN};
use sluice::rollout::{self, RolloutConfig, RolloutState};
use sluice::router::{cookie_value, Decision, RequestHeaders, Router};
use sluice::sticky::{mix, Rng};
use sluice::testing::{self, Ending, FaultyStore, StreamState, Vm, Write};
use std::cell::Cell;
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
    ":method",
    "content-type",
    "idempotency-key",
    "x-envoy-retry-on",
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

/// `Knobs::template`'s bits above the layout (`template % TEMPLATES`):
/// `retry.mode: "route"`, `stable_by_default`, and (in route mode) route
/// conditions that all fire before the request reached the application.
const ROUTE_MODE: u8 = 4;
const STABLE_BY_DEFAULT: u8 = 8;
const PRE_REQUEST_ONLY: u8 = 16;

impl Knobs {
    fn retry_json(&self) -> String {
        let route = self.template & ROUTE_MODE != 0;
        let (mode, retry_on) = match (route, self.template & PRE_REQUEST_ONLY != 0) {
            (false, _) => ("headers", "5xx,reset, connect-failure,unavailable"),
            (true, false) => ("route", "5xx,reset, connect-failure,unavailable"),
            (true, true) => ("route", "connect-failure,refused-stream,unavailable"),
        };
        let mut out = format!(
            r#"{{"mode": "{mode}", "max_retries": {}, "retry_on": "{retry_on}", "budget": {{"ratio": {}, "min_per_s": {}, "window_s": {}}}, "deadline_header": "X-Deadline""#,
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
    ///
    /// The bits above the layout set the retry mode and
    /// `stable_by_default` of every service (see `ROUTE_MODE`).
    pub fn json(&self) -> String {
        let json = self.layout_json();
        if self.template & STABLE_BY_DEFAULT == 0 {
            return json;
        }
        json.replace(r#""stable": "#, r#""stable_by_default": true, "stable": "#)
    }

    fn layout_json(&self) -> String {
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
                  {{"name": "api", "stable": "api_v1", "retry": {{"max_retries": {}}}, "breaker": {breaker},
                    "attempt_count_in_response": true}}]}}"#,
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
    /// A request arrives at a worker (`on_request_headers`). Header names
    /// are lower-cased, as Envoy stores them; `:authority` and `:path` are
    /// headers too. `random` is the word the split oracle gives `decide`
    /// for a request without a key (the engine draws its own).
    Request {
        worker: u8,
        headers: Vec<(String, Vec<u8>)>,
        random: u64,
    },
    /// The response headers of an in-flight request (`pick` modulo the
    /// number in flight) reach the filter (`on_response_headers`, once per
    /// request: a second one is ignored) with this `:status`: the router is
    /// done, having made `attempts` attempts; `reported`: the attempt-count
    /// property is there.
    Response {
        pick: u16,
        attempts: u64,
        reported: bool,
        status: u64,
    },
    /// The request ends (`on_log`, then `on_delete`) with `response.flags`;
    /// `status` (0: none, e.g. a reset) and `attempts` as above unless the
    /// response came first, whose facts stand (as Envoy's properties do).
    End {
        pick: u16,
        status: u64,
        flags: u64,
        attempts: u64,
        reported: bool,
    },
    /// The request vanishes (`on_delete` without `on_log`: its VM is going
    /// away): the engine settles and records nothing.
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
    /// A worker's `on_tick`: held successes and settlements written, gauges
    /// refreshed, due rollout steps announced.
    Tick { worker: u8 },
    /// `count % 32 + 1` requests to `AUTHORITIES[authority]` and `PATHS[path]` from
    /// users `user0`, `user1`, …, spread over the workers, `step_ms` apart,
    /// each answered with `status` (0: no response) after `attempts`
    /// attempts, reported, no response flags. `overlap`:
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

/// What a run did, to see that the fuzzer reaches the interesting states;
/// counted from the host's state, the store's writes and the engine's reports.
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
    pub leases: u64,
}

// ---------------------------------------------------------------- headers

/// The request headers a client sent, read as Envoy's header map gives
/// them: the first value of a (lower-case) name.
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
    /// only lowers the right-hand side), for `b ≥ from`: a charge at
    /// `from` can break only those (a deposit or a refund never breaks
    /// the bound).
    fn check_from(&self, from: u64) -> Result<(), String> {
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
        let ends = rows.partition_point(|&(second, _, _)| second < from);
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
    epoch: u64,
    second: u64,
    granted: u64,
    /// The lease it came from: (worker, serial).
    lease: Option<(usize, u64)>,
}

/// A lease as the oracle tracks it: the retries its requests may still
/// make (granted, in flight) or made.
#[derive(Debug, Clone, Copy)]
struct LeaseTrack {
    lease: retry::Lease,
    outstanding: u64,
}

#[derive(Debug, Default)]
struct BudgetOracle {
    keys: HashMap<String, usize>,
    /// Per key, its lifetimes by epoch (a state's epoch is its identity:
    /// a recreated state gets a later one).
    lifetimes: Vec<BTreeMap<u64, Lifetime>>,
    /// Per (key, worker, serial).
    leases: HashMap<(usize, usize, u64), LeaseTrack>,
}

impl BudgetOracle {
    fn index(&mut self, key: &str) -> usize {
        let next = self.keys.len();
        let index = *self.keys.entry(key.to_string()).or_insert(next);
        if self.lifetimes.len() <= index {
            self.lifetimes.resize_with(index + 1, BTreeMap::new);
        }
        index
    }

    fn lifetime(&mut self, key: usize, budget: Budget, epoch: u64) -> Option<&mut Lifetime> {
        Some(
            self.lifetimes
                .get_mut(key)?
                .entry(epoch)
                .or_insert_with(|| Lifetime {
                    budget,
                    epoch,
                    newest_second: 0,
                    seconds: BTreeMap::new(),
                }),
        )
    }

    /// A write that landed deposited `landed.deposits` requests.
    fn deposit(&mut self, key: &str, budget: Budget, landed: &retry::Landed) {
        let index = self.index(key);
        if let Some(lifetime) = self.lifetime(index, budget, landed.epoch) {
            lifetime.newest_second = lifetime.newest_second.max(landed.second);
            let entry = lifetime.seconds.entry(landed.second).or_default();
            entry.0 += u64::from(landed.deposits);
        }
    }

    /// A lease taken by `worker` at `now`, in the write that deposited at
    /// `landed`; `level_after` is the level its write left.
    fn leased(
        &mut self,
        key: &str,
        worker: usize,
        lease: &retry::Lease,
        now: u64,
        landed: Option<retry::Landed>,
        level_after: u64,
    ) -> Result<(), String> {
        ensure(
            landed
                .is_some_and(|landed| landed.epoch == lease.epoch && landed.second == lease.second)
                && lease.taken_ms == now
                && lease.free <= lease.tokens
                && u64::from(lease.tokens) <= retry::LEASE_MAX,
            || format!("lease {lease:?} taken at {now}, the write deposited at {landed:?}"),
        )?;
        ensure(
            level_after >= (retry::LEASE_SHARE - 1) * u64::from(lease.tokens),
            || format!("lease {lease:?} left {level_after} tokens to the others: it starves them"),
        )?;
        let index = self.index(key);
        self.leases.insert(
            (index, worker, lease.serial),
            LeaseTrack {
                lease: *lease,
                outstanding: 0,
            },
        );
        Ok(())
    }

    /// A request's reservation (one of its own that landed, or a grant
    /// from a lease of `worker`): its retries are charged where it says.
    fn charge(
        &mut self,
        key: &str,
        budget: Budget,
        reservation: &Reservation,
        worker: usize,
        now: u64,
    ) -> Result<Option<Charge>, String> {
        let index = self.index(key);
        let granted = u64::from(reservation.granted);
        let mut lease = None;
        if reservation.lease != 0 {
            let track = self
                .leases
                .get_mut(&(index, worker, reservation.lease))
                .ok_or_else(|| {
                    format!("{reservation:?} from a lease worker {worker} never took")
                })?;
            let taken = track.lease;
            let window = u64::from(budget.window_s.max(1));
            ensure(
                taken.epoch == reservation.epoch && taken.second == reservation.second,
                || format!("{reservation:?} charged elsewhere than its lease {taken:?}"),
            )?;
            ensure(
                taken.taken_ms <= now
                    && now < taken.taken_ms + retry::LEASE_MS
                    && now < (taken.second + window) * 1000,
                || format!("{reservation:?} granted at {now} from an expired lease {taken:?}"),
            )?;
            track.outstanding += granted;
            ensure(track.outstanding <= u64::from(taken.tokens), || {
                format!(
                    "lease {taken:?} handed out {} retries, more than it holds",
                    track.outstanding
                )
            })?;
            lease = Some((worker, reservation.lease));
        }
        if granted == 0 {
            return Ok(None);
        }
        let Some(lifetime) = self.lifetime(index, budget, reservation.epoch) else {
            return Ok(None);
        };
        let entry = lifetime.seconds.entry(reservation.second).or_default();
        entry.1 += granted;
        lifetime.check_from(reservation.second)?;
        Ok(Some(Charge {
            key: index,
            epoch: reservation.epoch,
            second: reservation.second,
            granted,
            lease,
        }))
    }

    /// The router is done: it made `retries` of the granted ones.
    fn executed(&mut self, charge: &Charge, retries: u64) {
        let unused = charge.granted - retries.min(charge.granted);
        if let Some(entry) = self
            .lifetimes
            .get_mut(charge.key)
            .and_then(|lifetimes| lifetimes.get_mut(&charge.epoch))
            .and_then(|lifetime| lifetime.seconds.get_mut(&charge.second))
        {
            entry.1 -= unused;
        }
        if let Some((worker, serial)) = charge.lease {
            if let Some(track) = self.leases.get_mut(&(charge.key, worker, serial)) {
                track.outstanding -= unused;
            }
        }
    }

    /// Every interval of every lifetime (at the end of a run).
    fn check_all(&self) -> Result<(), String> {
        self.lifetimes
            .iter()
            .flat_map(|lifetimes| lifetimes.values())
            .try_for_each(|lifetime| lifetime.check_from(0))
    }
}

// ------------------------------------------------------------ state oracles

/// Key prefixes of the shared states (see each module's `state_key`).
const BREAKER_PREFIX: &str = "sluice/breaker/";
const ROLLOUT_PREFIX: &str = "sluice/rollout/";

/// A shared-state key some variant's config defines, and what it holds.
#[derive(Debug, Clone)]
enum StateKey {
    Budget(Budget),
    Breaker(BreakerConfig),
    Rollout(RolloutConfig),
}

/// Every key the configs define, by the modules' `state_key` functions.
fn state_keys(config: &Config, keys: &mut HashMap<String, StateKey>) {
    for service in &config.services {
        if let Some(policy) = &service.retry {
            keys.insert(
                retry::budget_key(&service.name, policy),
                StateKey::Budget(policy.budget),
            );
        }
        if let Some(breaker_config) = &service.breaker {
            for cluster in std::iter::once(&service.stable).chain(&service.canary) {
                keys.insert(
                    breaker::state_key(&service.name, cluster, breaker_config),
                    StateKey::Breaker(breaker_config.clone()),
                );
            }
        }
        if let (Some(rollout_config), Some(canary)) = (&service.rollout, &service.canary) {
            keys.insert(
                rollout::state_key(&service.name, &service.stable, canary, rollout_config),
                StateKey::Rollout(rollout_config.clone()),
            );
        }
    }
}

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

/// What the breakers' writes must agree with.
#[derive(Debug, Default)]
struct BreakerOracle {
    /// Breakers delivered an outcome that could count against them since
    /// they last closed (or were created).
    evidence: HashSet<String>,
}

impl BreakerOracle {
    /// Checks one callback's writes against the transitions the engine
    /// reported in it: per breaker, each change of the stored mode is legal
    /// and the changes are the reports, in order.
    fn check(
        &mut self,
        writes: &[Write],
        reported: &[(String, Transition)],
        keys: &HashMap<String, StateKey>,
        now: u64,
        stats: &mut Stats,
    ) -> Result<(), String> {
        let mut changes: BTreeMap<&str, Vec<(BreakerState, BreakerState)>> = BTreeMap::new();
        for write in writes.iter().filter(|w| w.key.starts_with(BREAKER_PREFIX)) {
            let key = write.key.as_str();
            let Some(StateKey::Breaker(config)) = keys.get(key) else {
                return Err(format!("breaker {key} written, but no config defines it"));
            };
            let from = breaker_mode(write.old.as_deref())?;
            let to = breaker_mode(Some(&write.new))?;
            if from == to {
                continue;
            }
            if !legal(from, to) {
                return Err(format!(
                    "illegal breaker transition {from} -> {to} at {now} on {key}"
                ));
            }
            match (from, to) {
                (BreakerState::Open, BreakerState::HalfOpen) => {
                    let until = breaker_until(write.old.as_deref()).unwrap_or(0);
                    // Early only when the stored time is no further ahead
                    // than any open time: one further ahead is a clock
                    // stepped back, read as already passed.
                    let early = now < until && until <= now.saturating_add(config.max_open_ms);
                    ensure(!early, || {
                        format!("breaker {key} went half-open at {now}, before its open time ended at {until}")
                    })?;
                }
                (BreakerState::Closed, BreakerState::Open) => {
                    ensure(self.evidence.contains(key), || {
                        format!("breaker {key} tripped (closed -> open) at {now}, but no outcome delivered to its cluster since it last closed was a failure (5xx, failure flag, retried) or could be slow")
                    })?;
                }
                (BreakerState::HalfOpen, BreakerState::Closed) => {
                    // Closing starts a fresh window.
                    self.evidence.remove(key);
                }
                _ => {}
            }
            changes.entry(key).or_default().push((from, to));
        }
        let mut reports: BTreeMap<&str, Vec<&Transition>> = BTreeMap::new();
        for (key, transition) in reported {
            reports.entry(key.as_str()).or_default().push(transition);
        }
        for key in changes.keys().chain(reports.keys()) {
            let made = changes.get(key).map(Vec::as_slice).unwrap_or_default();
            let told = reports.get(key).map(Vec::as_slice).unwrap_or_default();
            let agree = made.len() == told.len()
                && made.iter().zip(told).all(|(&(from, to), transition)| {
                    transition.from == from && transition.to == to
                });
            if !agree {
                return Err(format!(
                    "breaker {key}: the stored state changed {made:?} but the engine reported {told:?}"
                ));
            }
        }
        for (key, transition) in reported {
            match transition.to {
                BreakerState::Open => stats.trips += 1,
                BreakerState::HalfOpen => stats.half_opens += 1,
                BreakerState::Closed => stats.closes += 1,
            }
            if transition.to == BreakerState::Open {
                let Some(StateKey::Breaker(config)) = keys.get(key) else {
                    return Err(format!("a transition of {key}, which no config defines"));
                };
                let open = transition.open_ms.unwrap_or(0);
                if open < config.open_ms || open > config.max_open_ms {
                    return Err(format!(
                        "open time {open} ms of {key} outside [{}, {}]",
                        config.open_ms, config.max_open_ms
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A rollback is final: rollout bytes once rolled back (byte 1) stay so.
/// Returns the keys this callback rolled back.
fn check_rollout_writes(writes: &[Write], stats: &mut Stats) -> Result<Vec<String>, String> {
    let mut rolled_back = Vec::new();
    for write in writes.iter().filter(|w| w.key.starts_with(ROLLOUT_PREFIX)) {
        let was = write.old.as_deref().and_then(|b| b.get(1).copied()) == Some(1);
        let is = write.new.get(1).copied() == Some(1);
        if was && !is {
            return Err(format!("rollout {} un-rolled back", write.key));
        }
        if is && !was {
            stats.rollbacks += 1;
            rolled_back.push(write.key.clone());
        }
    }
    Ok(rolled_back)
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

/// A configuration variant: the JSON `on_configure` reads, and its parsed
/// form for the oracles.
struct Variant {
    json: String,
    router: Router,
}

/// What the router and the upstream did for a request, as the host reports
/// it: at the response headers, or at the end when none came.
#[derive(Debug, Clone, Copy)]
struct Answer {
    clock: u64,
    status: u64,
    attempts: u64,
    /// The attempt-count property is there.
    reported: bool,
}

/// A request in flight.
#[derive(Debug)]
struct Flight {
    worker: usize,
    context: u32,
    /// The breaker its outcome is booked with (its config's, on the side it
    /// was routed to), and that breaker's `slow_ms`.
    breaker: Option<(String, Option<u64>)>,
    /// Its reservation, until the router is done with it.
    charge: Option<Charge>,
    started_ms: u64,
    response: Option<Answer>,
    /// A gRPC call (`content-type: application/grpc…`): its outcome is its
    /// `response.grpc_status`.
    grpc: bool,
}

/// What the engine reported in one callback besides breaker transitions
/// (which `Sim::call` checks): the reservations.
type Reserved = Vec<(String, Budget, Reservation)>;

/// The simulation: one engine per worker over one store and one clock, the
/// requests in flight, and the oracles.
pub struct Sim {
    store: Rc<FaultyStore>,
    clock: Rc<Cell<u64>>,
    vms: Vec<Vm>,
    variants: Vec<Rc<Variant>>,
    /// The variant each worker has in force.
    applied: Vec<usize>,
    /// Every shared-state key the variants define.
    keys: HashMap<String, StateKey>,
    pending: Vec<Flight>,
    budget: BudgetOracle,
    breakers: BreakerOracle,
    rolled_back: HashSet<String>,
    /// The random words of burst requests.
    rng: Rng,
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

/// Every value of a request header the engine left on the stream.
fn values<'s>(stream: &'s StreamState, name: &str) -> Vec<&'s [u8]> {
    stream
        .request_headers
        .iter()
        .filter(|(known, _)| known == name)
        .map(|(_, value)| value.as_slice())
        .collect()
}

/// Safe retries: a request that may already have had its effect (not an
/// idempotent method, no opt-in) is never armed with a condition that
/// retries after a response; a gRPC call's own conditions are its gRPC
/// ones (the configured, else `unavailable`), any other request gets none.
fn check_safe_retry(
    policy: &retry::RetryPolicy,
    headers: &Headers,
    stream: &StreamState,
) -> Result<(), String> {
    let facts = retry::RequestFacts {
        method: headers.get(":method"),
        path: headers.get(":path"),
        content_type: headers.get("content-type"),
        idempotency_key: headers.get(retry::IDEMPOTENCY_KEY_HEADER),
    };
    if retry::safe_to_replay(policy, &facts).is_some() {
        return Ok(());
    }
    let retry_on = values(stream, retry::RETRY_ON_HEADER);
    ensure(retry_on.len() <= 1, || format!("{retry_on:?} written"))?;
    if let Some(conditions) = retry_on.first() {
        let conditions = String::from_utf8_lossy(conditions);
        ensure(!retry::conditions_after_response(&conditions), || {
            format!("a request that may not be replayed ({facts:?}) is armed with {conditions:?}")
        })?;
    }
    let grpc_on = values(stream, retry::RETRY_GRPC_ON_HEADER);
    let grpc_call = sluice::failures::is_grpc_content_type(facts.content_type);
    let expected: Vec<&[u8]> = if grpc_call && policy.max_retries > 0 {
        vec![policy.grpc_call_retry_on.as_bytes()]
    } else if grpc_call {
        grpc_on.clone()
    } else {
        Vec::new()
    };
    ensure(grpc_on == expected, || {
        format!("{facts:?} is armed with gRPC conditions {grpc_on:?}, expected {expected:?}")
    })
}

/// Route mode: the route's `retry_policy` carries the conditions, and the
/// block's `retry_on` states them. Headers can only widen them, so Sluice
/// writes none: only `x-envoy-max-retries` and a lowered
/// `x-envoy-upstream-rq-timeout-ms` may reach the router (a client's others
/// are gone). A request that may not be replayed whose route conditions
/// include any that fires after the application may have acted (an HTTP
/// one past `PRE_REQUEST_CONDITIONS`; a gRPC one, unless the request is a
/// gRPC call) must end with `x-envoy-max-retries: 0`.
fn check_route_mode(
    policy: &retry::RetryPolicy,
    headers: &Headers,
    stream: &StreamState,
) -> Result<(), String> {
    let left: Vec<&str> = retry::OWNED_HEADERS
        .into_iter()
        .filter(|name| {
            *name != retry::MAX_RETRIES_HEADER
                && *name != retry::TIMEOUT_HEADER
                && !values(stream, name).is_empty()
        })
        .collect();
    ensure(left.is_empty(), || {
        format!("route mode, yet the router reads {left:?}")
    })?;
    let timeouts = values(stream, retry::TIMEOUT_HEADER);
    if !timeouts.is_empty() {
        let lowered = match (timeouts.as_slice(), policy.timeout_ms) {
            ([value], Some(route)) => retry::parse_millis(value).is_some_and(|ms| ms < route),
            _ => false,
        };
        ensure(lowered, || {
            format!(
                "route mode with timeout {:?}, yet the router reads {timeouts:?}",
                policy.timeout_ms
            )
        })?;
    }
    let facts = retry::RequestFacts {
        method: headers.get(":method"),
        path: headers.get(":path"),
        content_type: headers.get("content-type"),
        idempotency_key: headers.get(retry::IDEMPOTENCY_KEY_HEADER),
    };
    if retry::safe_to_replay(policy, &facts).is_some() {
        return Ok(());
    }
    let grpc_call = sluice::failures::is_grpc_content_type(facts.content_type);
    let replays_after_response = retry::conditions_after_response(&policy.retry_on)
        || (!grpc_call && !policy.retry_grpc_on.is_empty());
    if replays_after_response && policy.max_retries > 0 {
        let written = values(stream, retry::MAX_RETRIES_HEADER);
        ensure(written == [b"0"], || {
            format!(
                "a request that may not be replayed ({facts:?}) goes to a route retrying on {:?} {:?} with {} {written:?}",
                policy.retry_on,
                policy.retry_grpc_on,
                retry::MAX_RETRIES_HEADER
            )
        })?;
    }
    Ok(())
}

impl Sim {
    /// Parses every variant (a template that does not parse is a failure:
    /// its numbers are within the documented ranges) and applies the first
    /// on every worker.
    pub fn new(scenario: &Scenario) -> Result<Sim, String> {
        let mut variants = Vec::new();
        let mut keys = HashMap::new();
        for knobs in scenario.variants.iter().take(4) {
            let json = knobs.json();
            let config = Config::parse(json.as_bytes())
                .map_err(|err| format!("template refused: {err}\n{json}"))?;
            state_keys(&config, &mut keys);
            variants.push(Rc::new(Variant {
                json,
                router: Router::new(config),
            }));
        }
        ensure(!variants.is_empty(), || {
            "a scenario needs a configuration".to_string()
        })?;
        let store = Rc::new(FaultyStore::default());
        let now = T0 + u64::from(scenario.start_offset_ms);
        let clock = Rc::new(Cell::new(now));
        let count = usize::from(scenario.workers.clamp(1, 8));
        let vms = (0..count)
            .map(|worker| {
                let seed = mix(scenario.seed ^ worker as u64);
                let mut vm = Vm::new(Rc::clone(&store), Rc::clone(&clock), seed);
                // The routes set Envoy's include_attempt_count_in_response:
                // the router's count reaches every response, and the `api`
                // service, which declares it, takes its attempts from it.
                vm.route_writes_attempt_count = true;
                vm
            })
            .collect();
        let mut sim = Sim {
            store,
            clock,
            vms,
            variants,
            applied: vec![0; count],
            keys,
            pending: Vec::new(),
            budget: BudgetOracle::default(),
            breakers: BreakerOracle::default(),
            rolled_back: HashSet::new(),
            rng: Rng::new(scenario.seed),
            readings: vec![now],
            stats: Stats::default(),
        };
        for worker in 0..count {
            sim.configure(worker, 0)
                .map_err(|err| format!("at start: {err}"))?;
        }
        Ok(sim)
    }

    /// Runs a whole scenario; the first violated invariant, with the event.
    pub fn run(scenario: &Scenario) -> Result<Stats, String> {
        let mut sim = Sim::new(scenario)?;
        for (index, event) in scenario.events.iter().enumerate() {
            sim.step(event).map_err(|err| {
                format!("event {index} ({event:?}) at {}: {err}", sim.clock.get())
            })?;
        }
        sim.budget
            .check_all()
            .map_err(|err| format!("at the end: {err}"))?;
        Ok(sim.stats)
    }

    fn worker_index(&self, worker: u8) -> usize {
        usize::from(worker) % self.vms.len().max(1)
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
                status,
            } => match self.pick(*pick) {
                Some(index) => self.respond(index, *status, *attempts, *reported),
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
                    let flight = self.pending.swap_remove(index);
                    self.end(flight, *status, *flags, *attempts, *reported)
                }
                None => Ok(()),
            },
            Event::Abandon { pick } => match self.pick(*pick) {
                Some(index) => {
                    // The router may still use every granted retry: the
                    // charge stays whole.
                    let flight = self.pending.swap_remove(index);
                    let context = flight.context;
                    self.call_quietly(flight.worker, |vm| {
                        vm.abandon(context);
                        vm.forget(context);
                    })?;
                    self.check_streams(flight.worker)
                }
                None => Ok(()),
            },
            Event::Clock { delta_ms } => {
                let now = self.clock.get().saturating_add_signed(*delta_ms).max(1);
                self.clock.set(now);
                self.readings.push(now);
                Ok(())
            }
            Event::Rewind { to } => {
                let back = usize::from(*to) % self.readings.len().max(1);
                if let Some(&then) = self.readings.iter().rev().nth(back) {
                    self.clock.set(then);
                }
                Ok(())
            }
            Event::Reload { worker, variant } => {
                let variant = usize::from(*variant) % self.variants.len().max(1);
                let targets: Vec<usize> = match worker {
                    Some(worker) => vec![self.worker_index(*worker)],
                    None => (0..self.vms.len()).collect(),
                };
                for target in targets {
                    self.configure(target, variant)?;
                }
                Ok(())
            }
            Event::Contend { failures } => {
                self.store.lose_next_writes(u32::from(*failures));
                Ok(())
            }
            Event::Tick { worker } => {
                let worker = self.worker_index(*worker);
                self.call_quietly(worker, Vm::tick)
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

    /// One engine callback on a worker, and every check of what it wrote
    /// and reported: the writes touch only keys the configs define, each
    /// breaker's changes are the transitions reported for it, a rollback
    /// stays a rollback. Returns the callback's result and the reservations
    /// the engine reported.
    fn call<T>(
        &mut self,
        worker: usize,
        callback: impl FnOnce(&mut Vm) -> T,
    ) -> Result<(T, Reserved), String> {
        let stray = self.store.take_writes();
        ensure(stray.is_empty(), || {
            format!("{} writes outside any callback", stray.len())
        })?;
        let now = self.clock.get();
        let vm = self
            .vms
            .get_mut(worker)
            .ok_or_else(|| format!("no worker {worker}"))?;
        let result = callback(vm);
        let events = vm.host.take_events();
        let writes = self.store.take_writes();
        let mut transitions = Vec::new();
        let mut reserved = Vec::new();
        let mut last_landed = None;
        for event in events {
            match event {
                testing::Event::Reserved {
                    key,
                    budget,
                    reservation,
                } => {
                    let known = matches!(self.keys.get(&key), Some(StateKey::Budget(stored)) if *stored == budget);
                    ensure(known, || {
                        format!("a reservation in {key} with {budget:?}, which no config defines")
                    })?;
                    reserved.push((key, budget, reservation));
                }
                testing::Event::Deposited {
                    key,
                    budget,
                    landed,
                } => {
                    self.budget.deposit(&key, budget, &landed);
                    last_landed = Some(landed);
                }
                testing::Event::Leased { key, budget, lease } => {
                    let policy = retry::RetryPolicy {
                        budget,
                        ..retry::RetryPolicy::default()
                    };
                    let written = writes
                        .iter()
                        .rev()
                        .find(|write| write.key == key)
                        .map(|write| write.new.as_slice());
                    let level_after = retry::level(written, &policy, now);
                    self.budget
                        .leased(&key, worker, &lease, now, last_landed, level_after)?;
                    self.stats.leases += 1;
                }
                testing::Event::BreakerChanged { key, transition } => {
                    transitions.push((key, transition));
                }
                testing::Event::UpdateLost { .. } => self.stats.lost_updates += 1,
            }
        }
        for write in &writes {
            ensure(self.keys.contains_key(&write.key), || {
                format!("the engine wrote {}, which no config defines", write.key)
            })?;
        }
        self.breakers
            .check(&writes, &transitions, &self.keys, now, &mut self.stats)?;
        self.rolled_back
            .extend(check_rollout_writes(&writes, &mut self.stats)?);
        for key in &self.rolled_back {
            if let Some(StateKey::Rollout(config)) = self.keys.get(key) {
                let view = rollout::view(self.store.bytes(key).as_deref(), config, now);
                ensure(
                    matches!(view.state, RolloutState::RolledBack { .. }),
                    || format!("rollout {key} rolled back, but the view is {view:?}"),
                )?;
            }
        }
        Ok((result, reserved))
    }

    /// `call` for a callback that reserves nothing.
    fn call_quietly<T>(
        &mut self,
        worker: usize,
        callback: impl FnOnce(&mut Vm) -> T,
    ) -> Result<T, String> {
        let (result, reserved) = self.call(worker, callback)?;
        ensure(reserved.is_empty(), || {
            format!("reservations {reserved:?} outside request headers")
        })?;
        Ok(result)
    }

    /// `on_configure` with a variant; the templates always parse, so the
    /// engine must accept it.
    fn configure(&mut self, worker: usize, variant: usize) -> Result<(), String> {
        let Some(chosen) = self.variants.get(variant).cloned() else {
            return Ok(());
        };
        let accepted = self.call_quietly(worker, |vm| vm.configure(chosen.json.as_bytes()))?;
        ensure(accepted, || {
            format!(
                "worker {worker} refused variant {variant}:\n{}",
                chosen.json
            )
        })?;
        if let Some(slot) = self.applied.get_mut(worker) {
            *slot = variant;
        }
        Ok(())
    }

    /// The engine holds exactly the streams in flight on the worker.
    fn check_streams(&self, worker: usize) -> Result<(), String> {
        let expected = self
            .pending
            .iter()
            .filter(|flight| flight.worker == worker)
            .count();
        let held = self.vms.get(worker).map_or(0, |vm| vm.worker.streams());
        ensure(held == expected, || {
            format!("worker {worker} holds {held} streams, {expected} are in flight")
        })
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
        // Every request of a burst is answered, by its response headers
        // unless it got no response at all.
        let finish = |sim: &mut Sim| -> Result<(), String> {
            let Some(last) = sim.pending.len().checked_sub(1) else {
                return Ok(());
            };
            if status != 0 {
                sim.respond(last, status, attempts, true)?;
            }
            match sim.pending.pop() {
                Some(flight) => sim.end(flight, status, 0, attempts, true),
                None => Ok(()),
            }
        };
        for user in 0..count {
            let headers = Headers(vec![
                (":authority".to_string(), authority.as_bytes().to_vec()),
                (":path".to_string(), path.as_bytes().to_vec()),
                ("x-user".to_string(), format!("user{user}").into_bytes()),
                ("cookie".to_string(), format!("uid=user{user}").into_bytes()),
            ]);
            let worker = user % self.vms.len().max(1);
            let random = self.rng.next_u64();
            let before = self.pending.len();
            self.request(worker, headers, random)?;
            self.advance(step_ms);
            if !overlap && self.pending.len() > before {
                finish(self)?;
            }
        }
        if overlap {
            while self.pending.len() > first {
                finish(self)?;
                self.advance(step_ms);
            }
        }
        Ok(())
    }

    fn advance(&mut self, step_ms: u16) {
        self.clock
            .set(self.clock.get().saturating_add(u64::from(step_ms)));
    }

    /// `on_request_headers` (and, for an unmatched request, its end at
    /// once): what the engine left on the stream, and what it reserved.
    fn request(&mut self, worker: usize, mut headers: Headers, random: u64) -> Result<(), String> {
        let variant = self
            .applied
            .get(worker)
            .and_then(|&variant| self.variants.get(variant))
            .cloned()
            .ok_or_else(|| format!("no config on worker {worker}"))?;
        let router = &variant.router;
        let config = router.config();
        self.stats.requests += 1;
        let now = self.clock.get();
        let expected = reference_service(config, headers.get(":authority"), headers.get(":path"));
        let found = router.find_service(headers.get(":authority"), headers.get(":path"));
        ensure(found == expected, || {
            format!("find_service chose {found:?}, the first service that fits is {expected:?}")
        })?;
        let decided = match expected {
            Some(index) => Some(self.check_split(router, index, &mut headers, random, now)?),
            None => None,
        };

        let ((context, action), reserved) = self.call(worker, |vm| vm.request(&headers.0))?;
        let stream = self
            .vms
            .get(worker)
            .and_then(|vm| vm.host.streams.borrow().get(&context).cloned())
            .unwrap_or_default();
        let steering = values(&stream, &config.steering_header);
        let reply = stream.local_reply.as_ref();
        ensure((action == HeadersAction::Stop) == reply.is_some(), || {
            format!("{action:?} with local reply {reply:?}")
        })?;

        let Some(index) = expected else {
            ensure(steering.is_empty() && reply.is_none(), || {
                format!("an unmatched request left with steering {steering:?}, reply {reply:?}")
            })?;
            ensure(reserved.is_empty(), || {
                format!("an unmatched request reserved {reserved:?}")
            })?;
            self.stats.unmatched += 1;
            // Nothing to answer: it ends at once.
            self.call_quietly(worker, |vm| {
                vm.end(context, Ending::default());
                vm.forget(context);
            })?;
            return self.check_streams(worker);
        };
        let service = config
            .services
            .get(index)
            .ok_or_else(|| format!("service {index} out of range"))?;

        if let Some(reply) = reply {
            ensure(service.breaker.is_some(), || {
                format!(
                    "service {} has no breaker, yet refused a request",
                    service.name
                )
            })?;
            let marked = reply
                .headers
                .iter()
                .any(|(name, value)| name == BREAKER_HEADER && value == "open");
            ensure(reply.status == 503 && marked, || {
                format!("a refusal answered {reply:?}")
            })?;
            ensure(steering.is_empty(), || {
                format!("a refused request carries the steering header {steering:?}")
            })?;
            ensure(reserved.is_empty(), || {
                format!("a refused request reserved {reserved:?}")
            })?;
            self.stats.rejected += 1;
            self.pending.push(Flight {
                worker,
                context,
                breaker: None,
                charge: None,
                started_ms: now,
                response: None,
                grpc: sluice::failures::is_grpc_content_type(headers.get("content-type")),
            });
            return self.check_streams(worker);
        }

        // Only configured clusters are chosen: the matched service's. With
        // `stable_by_default` the route table's default is stable: a stable
        // request carries no steering header at all (a client's removed).
        let side = match steering.as_slice() {
            [] if service.stable_by_default => Side::Stable,
            [cluster] if *cluster == service.stable.as_bytes() && !service.stable_by_default => {
                Side::Stable
            }
            [cluster] if service.canary.as_deref().map(str::as_bytes) == Some(*cluster) => {
                Side::Canary
            }
            other => {
                let shown: Vec<_> = other.iter().map(|v| String::from_utf8_lossy(v)).collect();
                return Err(format!(
                    "a request to service {} left with steering values {shown:?} (stable {:?}, canary {:?})",
                    service.name, service.stable, service.canary
                ));
            }
        };
        if side == Side::Canary {
            self.stats.canary += 1;
        }
        // Sticky end to end: without a rollout the weight is the config's,
        // so a keyed request lands where `decide` puts it on any worker
        // (stable instead of canary only if the canary's breaker refused).
        if let Some(decided) = decided {
            if service.rollout.is_none() && sticky_key(service, &headers).is_some() {
                ensure(
                    side == decided || (decided == Side::Canary && service.breaker.is_some()),
                    || format!("a sticky request went {side:?}, decide says {decided:?}"),
                )?;
            }
        }

        // The reservation, and the retry header the router reads.
        let charge = match &service.retry {
            Some(policy) => {
                let key = retry::budget_key(&service.name, policy);
                let mut granted = 0;
                let mut charge = None;
                for (seen, (reserved_key, budget, reservation)) in reserved.iter().enumerate() {
                    ensure(
                        *reserved_key == key && *budget == policy.budget && seen == 0,
                        || format!("service {} reserved {reserved:?}", service.name),
                    )?;
                    ensure(
                        reservation.granted.saturating_add(reservation.denied)
                            <= policy.max_retries,
                        || {
                            format!(
                                "reservation {reservation:?} for a policy of {} retries",
                                policy.max_retries
                            )
                        },
                    )?;
                    let now = self.clock.get();
                    charge = self
                        .budget
                        .charge(reserved_key, *budget, reservation, worker, now)?;
                    self.stats.budget_checks += 1;
                    self.stats.granted += u64::from(reservation.granted);
                    self.stats.denied += u64::from(reservation.denied);
                    granted = reservation.granted;
                }
                let written = values(&stream, retry::MAX_RETRIES_HEADER);
                let granted_text = granted.to_string();
                // Route mode writes the number only when it lowers the
                // route's `num_retries`; headers mode always.
                let expected: Vec<&[u8]> = match policy.mode {
                    RetryMode::Route if granted >= policy.max_retries => Vec::new(),
                    _ => vec![granted_text.as_bytes()],
                };
                ensure(written == expected, || {
                    format!(
                        "{} granted ({:?} mode, max {}), the router reads {} {written:?}",
                        granted,
                        policy.mode,
                        policy.max_retries,
                        retry::MAX_RETRIES_HEADER
                    )
                })?;
                match policy.mode {
                    RetryMode::Headers => check_safe_retry(policy, &headers, &stream)?,
                    RetryMode::Route => check_route_mode(policy, &headers, &stream)?,
                }
                charge
            }
            None => {
                ensure(reserved.is_empty(), || {
                    format!(
                        "service {} has no retry policy, yet reserved {reserved:?}",
                        service.name
                    )
                })?;
                // No client raises its retries or timeout: the route's
                // policy stands untouched.
                let left: Vec<&str> = retry::OWNED_HEADERS
                    .into_iter()
                    .filter(|name| !values(&stream, name).is_empty())
                    .collect();
                ensure(left.is_empty(), || {
                    format!(
                        "service {} has no retry policy, yet the router reads {left:?}",
                        service.name
                    )
                })?;
                None
            }
        };

        let breaker = service.breaker.as_ref().map(|config| {
            (
                breaker::state_key(&service.name, service.cluster(side), config),
                config.slow.map(|slow| slow.threshold_ms),
            )
        });
        self.pending.push(Flight {
            worker,
            context,
            breaker,
            charge,
            started_ms: now,
            response: None,
            grpc: sluice::failures::is_grpc_content_type(headers.get("content-type")),
        });
        self.check_streams(worker)
    }

    /// The split of a matched request by `decide` on the parsed config:
    /// monotonic in the weight and, with a sticky key, independent of the
    /// random word. Returns the side.
    fn check_split(
        &self,
        router: &Router,
        index: usize,
        headers: &mut Headers,
        random: u64,
        now: u64,
    ) -> Result<Side, String> {
        let service = router
            .services()
            .get(index)
            .ok_or_else(|| format!("service {index} out of range"))?;
        // The weight: configured, or the rollout's as stored.
        let (weight_bp, cohort_weights) = match (&service.rollout, &service.canary) {
            (Some(config), Some(canary)) => {
                let key = rollout::state_key(&service.name, &service.stable, canary, config);
                let view = rollout::view(self.store.bytes(&key).as_deref(), config, now);
                let rolled_back = matches!(view.state, RolloutState::RolledBack { .. });
                ensure(!self.rolled_back.contains(&key) || rolled_back, || {
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

        let decision = router.decide(index, weight_bp, cohort_weights, headers, random);
        let Decision::Routed {
            service: decided,
            side,
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
            let side_at = |weight: u16, headers: &mut Headers| match router.decide(
                index,
                weight,
                cohort_weights,
                headers,
                random,
            ) {
                Decision::Routed { side, .. } => side,
                Decision::Unmatched => Side::Stable,
            };
            if side_at(low, headers) == Side::Canary {
                ensure(side_at(high, headers) == Side::Canary, || {
                    format!("canary at weight {low} bp but stable at {high} bp")
                })?;
            }
        }
        // Sticky: with a key, the random word does not matter.
        if sticky_key(service, headers).is_some() {
            let other = router.decide(
                index,
                weight_bp,
                cohort_weights,
                headers,
                random.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
            );
            ensure(other == decision, || {
                format!("same sticky key, another random word: {other:?} instead of {decision:?}")
            })?;
        }
        Ok(side)
    }

    /// `on_response_headers`, once per request: the router is done, so the
    /// budget oracle counts the retries it made.
    fn respond(
        &mut self,
        index: usize,
        status: u64,
        attempts: u64,
        reported: bool,
    ) -> Result<(), String> {
        let clock = self.clock.get();
        let Some(flight) = self.pending.get_mut(index) else {
            return Ok(());
        };
        if flight.response.is_some() {
            return Ok(());
        }
        flight.response = Some(Answer {
            clock,
            status,
            attempts,
            reported,
        });
        let (worker, context) = (flight.worker, flight.context);
        if let Some(charge) = flight.charge.take() {
            self.budget.executed(&charge, attempts.saturating_sub(1));
        }
        self.call_quietly(worker, |vm| {
            vm.respond(context, status, reported.then_some(attempts));
        })
    }

    /// `on_log` and `on_delete`. The outcome is evidence for its breaker's
    /// trip oracle first if it could count against the cluster.
    fn end(
        &mut self,
        flight: Flight,
        status: u64,
        flags: u64,
        attempts: u64,
        reported: bool,
    ) -> Result<(), String> {
        let now = self.clock.get();
        // The facts the engine sees: the response's when one came.
        let answer = flight.response.unwrap_or(Answer {
            clock: now,
            status,
            attempts,
            reported,
        });
        if let Some(charge) = &flight.charge {
            self.budget
                .executed(charge, answer.attempts.saturating_sub(1));
        }
        // A gRPC upstream answers with a `grpc-status`; Envoy reports it as
        // `response.grpc_status` (OK with a 200, else what Envoy infers from
        // the HTTP status, as `httpToGrpcStatus`), none without an answer.
        let grpc_status = (flight.grpc && answer.status != 0).then_some(match answer.status {
            200 => 0,
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        });
        if let Some((key, slow_ms)) = &flight.breaker {
            // For a gRPC call, any code but OK (or none at all: the deadline
            // may make it DEADLINE_EXCEEDED) may count: a sound, looser test.
            let grpc_failed = flight.grpc && grpc_status != Some(0);
            let failed = grpc_failed
                || (500..600).contains(&answer.status)
                || flags & breaker::UPSTREAM_FAILURE_FLAGS != 0;
            let retried = answer.reported && answer.attempts > 1;
            // Durations run from the start to the response or the end;
            // with the clock stepped back, either way counts.
            let slow = slow_ms.is_some_and(|threshold| {
                [answer.clock, now]
                    .iter()
                    .any(|&clock| clock.abs_diff(flight.started_ms) >= threshold)
            });
            if failed || retried || slow {
                self.breakers.evidence.insert(key.clone());
            }
        }
        let ending = Ending {
            code: (status != 0).then_some(status),
            flags,
            attempts: reported.then_some(attempts),
            grpc_status,
        };
        let context = flight.context;
        self.call_quietly(flight.worker, |vm| {
            vm.end(context, ending);
            vm.forget(context);
        })?;
        self.check_streams(flight.worker)
    }
}
