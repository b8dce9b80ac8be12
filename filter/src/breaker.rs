//! Circuit breakers: one per cluster of a service, shared by every worker.
//!
//! A breaker that lived in one VM would be one per worker: with eight workers
//! a failing cluster would need eight times the evidence to trip, and eight
//! sets of probes would hit it when it recovers. So the state lives in host
//! shared data (one key per service and cluster, see `state_key`) and every
//! change is a pure function from old bytes to new bytes that the engine runs
//! under CAS with `shared::update`. Only the VM whose write lands gets the
//! `Transition` back, so each state change is logged and counted exactly once
//! per process.
//!
//! States:
//! - closed: requests flow; outcomes go into a sliding window of
//!   `BUCKETS` time buckets over `window_s`. It trips to open when, with at
//!   least `min_requests` calls in the window, the failure rate (or the slow
//!   call rate) reaches its threshold, or after `consecutive_failures`
//!   failures in a row, whatever the window holds.
//! - open: requests are turned away until the open time has passed. The open
//!   time doubles with each trip in a row, up to `max_open_ms`, with jitter.
//! - half-open: at most `half_open_requests` probes are in flight at once;
//!   when that many have succeeded the breaker closes, and the first failed
//!   (or slow) probe opens it again for a doubled time.
//!
//! Every upstream attempt is a call: a request that needed two retries made
//! three calls, the two retried ones failed. Envoy retries inside the router,
//! so the filter sees one request; `Outcome` turns what it knows at the end
//! (attempts, final verdict, duration) into calls and failures.
//!
//! What the request path pays is the engine's business (`engine::runtime`:
//! a worker trusts a closed breaker's verdict for a while and holds its
//! clean successes back); this module gives it the pieces: `check_run`, a
//! read-only verdict; `admit_held`, the CAS a half-open probe needs at
//! request start; `record_held`, one CAS booking a worker's held successes
//! and a finished request; `release`, a probe slot given back.

use crate::codec::{Fingerprint, Reader};
use crate::decimal::{ppm_text, ratio_decimal, PPM};
use crate::sticky::mix;
use std::fmt;

/// Time buckets in the sliding window. The window slides by a tenth of its
/// length, so what it covers is between 90 % and 100 % of `window_s`.
pub const BUCKETS: usize = 10;

/// How long a probe slot may be held before it is presumed leaked (its VM
/// died or its end-of-request write lost every CAS race). Reclaiming happens
/// only when every slot is taken and none was granted for this long, so a
/// slow probe can delay recovery by at most this much, and a leak can never
/// wedge the breaker. Requests that legitimately run longer (long polls,
/// downloads) merely let a few more probes through.
pub const PROBE_LEASE_MS: u64 = 30_000;

/// Retry-after for a request turned away because every probe slot is taken:
/// the breaker is probing right now, a slot frees as soon as a probe ends.
pub const PROBES_BUSY_RETRY_MS: u64 = 1_000;

pub const DEFAULT_WINDOW_S: u64 = 10;
pub const DEFAULT_MIN_REQUESTS: u32 = 20;
/// 0.5, in parts per million.
pub const DEFAULT_FAILURE_RATE_PPM: u32 = 500_000;
pub const DEFAULT_OPEN_MS: u64 = 5_000;
/// The default cap; raised to `open_ms` when that alone is longer.
pub const DEFAULT_MAX_OPEN_MS: u64 = 60_000;
pub const DEFAULT_HALF_OPEN_REQUESTS: u8 = 3;

/// Longest open time, slow-call threshold and so on: one hour. Anything
/// longer is a typo, and the bound keeps every sum far from overflow.
pub const MAX_DURATION_MS: u64 = 3_600_000;

/// Byte-encoding version; bytes of any other version are a fresh state.
const VERSION: u8 = 2;

/// Upstream failures in Envoy's `response.flags` attribute (its legacy
/// bitmask): UT request timeout 0x4, UR remote reset 0x10, UF connection
/// failure 0x20, UC connection termination 0x40. LR (local reset, 0x8) is
/// left out: Envoy also resets locally when the client goes away, which says
/// nothing about the upstream. No-healthy-upstream and overflow come with a
/// 503 and are counted by their status.
pub const UPSTREAM_FAILURE_FLAGS: u64 = 0x4 | 0x10 | 0x20 | 0x40;

/// A parsed `breaker` block. Durations in milliseconds, rates in parts per
/// million.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    pub window_ms: u64,
    pub min_requests: u32,
    pub failure_rate_ppm: u32,
    pub consecutive_failures: Option<u32>,
    pub slow: Option<SlowCalls>,
    pub open_ms: u64,
    pub max_open_ms: u64,
    pub half_open_requests: u8,
}

/// `slow_ms` and `slow_rate`: a call taking `threshold_ms` or longer is slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowCalls {
    pub threshold_ms: u64,
    pub rate_ppm: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_ms: DEFAULT_WINDOW_S * 1000,
            min_requests: DEFAULT_MIN_REQUESTS,
            failure_rate_ppm: DEFAULT_FAILURE_RATE_PPM,
            consecutive_failures: None,
            slow: None,
            open_ms: DEFAULT_OPEN_MS,
            max_open_ms: DEFAULT_MAX_OPEN_MS,
            half_open_requests: DEFAULT_HALF_OPEN_REQUESTS,
        }
    }
}

impl BreakerConfig {
    fn bucket_ms(&self) -> u64 {
        // window_ms is a whole number of seconds, so this is exact and >= 100.
        (self.window_ms / BUCKETS as u64).max(1)
    }

    /// A digest of every setting, stable across builds (FNV-1a, not std's
    /// hasher), for the shared-data key: an unchanged block finds its state
    /// again after a config push, a changed one starts fresh.
    pub fn digest(&self) -> u64 {
        let mut print = Fingerprint::new();
        print.u64(self.window_ms);
        print.u64(u64::from(self.min_requests));
        print.u64(u64::from(self.failure_rate_ppm));
        print.u64(self.consecutive_failures.map_or(0, u64::from));
        match self.slow {
            Some(slow) => {
                print.u64(slow.threshold_ms);
                print.u64(u64::from(slow.rate_ppm));
            }
            None => print.u64(u64::MAX),
        }
        print.u64(self.open_ms);
        print.u64(self.max_open_ms);
        print.u64(u64::from(self.half_open_requests));
        print.finish()
    }
}

/// The shared-data key of one cluster's breaker. The digest ties the state to
/// the breaker block, and the encoding version to the code that reads it, so
/// a changed block or a new build starts from a fresh (closed) breaker
/// instead of misreading bytes. Service names cannot contain '/', and the
/// digest has a fixed width, so distinct pairs never share a key.
pub fn state_key(service: &str, cluster: &str, config: &BreakerConfig) -> String {
    format!(
        "sluice/breaker/v{VERSION}/{service}/{cluster}/{:016x}",
        config.digest()
    )
}

/// The bytes of a fresh, closed breaker, for `shared::ensure` when the config
/// is applied: later updates then always have a CAS token to guard them.
pub fn initial() -> Vec<u8> {
    State::fresh().encode()
}

/// The breaker's state, as the metrics gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(BreakerState::Closed),
            1 => Some(BreakerState::Open),
            2 => Some(BreakerState::HalfOpen),
            _ => None,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// What the engine knows about a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Upstream attempts made: 1 plus retries. 0 is read as 1.
    pub attempts: u32,
    /// Whether the final attempt failed (see `is_failure`).
    pub failed: bool,
    /// From request start to the upstream response headers (to the end of
    /// the request when none came). The filter cannot time single attempts,
    /// so slowness is judged on the request and booked on its final attempt.
    pub duration_ms: u64,
}

impl Outcome {
    /// Upstream calls the request made.
    pub fn calls(&self) -> u32 {
        self.attempts.max(1)
    }

    /// Failed calls: every retried attempt, plus the final one if it failed.
    /// (This assumes retries happen on failures only, which is Envoy's
    /// `retry_on: 5xx,reset,connect-failure` setup; a route that also
    /// retries on 4xx would have those counted as failures.)
    pub fn failures(&self) -> u32 {
        self.calls() - 1 + u32::from(self.failed)
    }

    /// Whether any call of the request failed.
    pub fn any_failure(&self) -> bool {
        self.failures() > 0
    }

    /// A success that can change nothing but the counts: one attempt, no
    /// failure, not slow. A worker may hold these back (`PendingSuccesses`).
    pub fn is_clean_success(&self, config: &BreakerConfig) -> bool {
        self.calls() == 1 && !self.failed && !self.slow(config)
    }

    fn slow(&self, config: &BreakerConfig) -> bool {
        config
            .slow
            .is_some_and(|slow| self.duration_ms >= slow.threshold_ms)
    }
}

/// Whether a final attempt of a plain HTTP request failed under the default
/// classification: a 5xx status, or an upstream failure flag
/// (`response.flags`) such as a connection failure, reset or timeout. A
/// service's `failures` block (`crate::failures::Failures`) decides for
/// the engine.
pub fn is_failure(status: Option<u32>, response_flags: u64) -> bool {
    status.is_some_and(|status| (500..600).contains(&status))
        || response_flags & UPSTREAM_FAILURE_FLAGS != 0
}

/// A half-open probe slot: which slot, in which half-open episode. A slot
/// is freed once (a second record or release of the same token finds it
/// free already), and a token from an episode that has ended, or whose slots
/// were reclaimed as leaked, decides nothing. Use each token once: a freed
/// slot is granted again under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeToken {
    generation: u32,
    slot: u8,
}

/// The read-only verdict at request start (`check_run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Closed: send the request, book it at the end with no probe.
    Allowed,
    /// Turn the request away without writing anything.
    Rejected { retry_after_ms: u64 },
    /// A probe slot may be free: run `admit_held` under `shared::update`.
    TryProbe,
}

/// The verdict of `admit_held`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// A half-open probe: keep the token, pass it to `record_held` (or
    /// `release`).
    Probe(ProbeToken),
    Rejected {
        retry_after_ms: u64,
    },
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    FailureRate {
        failures: u64,
        calls: u64,
        threshold_ppm: u32,
        window_s: u64,
    },
    ConsecutiveFailures {
        failures: u32,
    },
    SlowCallRate {
        slow: u64,
        calls: u64,
        threshold_ppm: u32,
        slow_ms: u64,
        window_s: u64,
    },
    /// Open → half-open: the open time has passed.
    OpenTimeElapsed {
        probes: u8,
    },
    /// Half-open → closed.
    ProbesSucceeded {
        probes: u8,
    },
    /// Half-open → open: a probe failed.
    ProbeFailed,
    /// Half-open → open: a probe took `slow_ms` or longer.
    ProbeSlow {
        slow_ms: u64,
    },
}

/// A state change, returned only to the VM whose write made it: log it (warn)
/// and update the metrics there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: Reason,
    /// For a transition to open: how long until probing starts.
    pub open_ms: Option<u64>,
}

impl Transition {
    /// Whether this is a trip (the breaker opened), for the trips counter.
    pub fn is_trip(&self) -> bool {
        self.to == BreakerState::Open
    }

    /// The warn log line.
    pub fn log_line(&self, service: &str, cluster: &str) -> String {
        format!("sluice: breaker of service {service}, cluster {cluster}: {self}")
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}: {}", self.from, self.to, self.reason)?;
        if let Some(open_ms) = self.open_ms {
            write!(f, "; probing again in {}", seconds(open_ms))?;
        }
        Ok(())
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::FailureRate {
                failures,
                calls,
                threshold_ppm,
                window_s,
            } => write!(
                f,
                "failure rate {} >= {} over {calls} requests in {window_s}s",
                ratio_decimal(failures, calls, 2),
                ppm_text(threshold_ppm)
            ),
            Reason::ConsecutiveFailures { failures } => {
                write!(f, "{failures} consecutive failures")
            }
            Reason::SlowCallRate {
                slow,
                calls,
                threshold_ppm,
                slow_ms,
                window_s,
            } => write!(
                f,
                "slow call rate {} >= {} (calls of {slow_ms}ms or more) over {calls} requests in {window_s}s",
                ratio_decimal(slow, calls, 2),
                ppm_text(threshold_ppm)
            ),
            Reason::OpenTimeElapsed { probes } => write!(
                f,
                "open time elapsed, letting up to {probes} probe requests through"
            ),
            Reason::ProbesSucceeded { probes } => write!(f, "{probes} probe requests succeeded"),
            Reason::ProbeFailed => f.write_str("a probe request failed"),
            Reason::ProbeSlow { slow_ms } => {
                write!(f, "a probe request took {slow_ms}ms or more")
            }
        }
    }
}

/// `5300` → `5.3s`, `5000` → `5s`.
fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", ratio_decimal(ms, 1000, 1))
    }
}

/// The `retry-after` header value for a rejection: whole seconds, rounded up,
/// at least 1 (0 would invite an immediate retry that is rejected again).
pub fn retry_after_seconds(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

/// The state as the gauge should show it. An open breaker whose open time
/// has passed shows half-open: the next request will probe.
pub fn state(bytes: Option<&[u8]>, config: &BreakerConfig, now_ms: u64) -> BreakerState {
    let state = State::load(bytes, config, now_ms);
    match state.mode {
        BreakerState::Open if now_ms >= state.until_ms => BreakerState::HalfOpen,
        mode => mode,
    }
}

/// Read-only admission at request start, on the bytes of one `get`, and
/// whether a run of failures is under way (the last outcome written was a
/// failure). Only `Check::TryProbe` needs a write (`admit_held` under CAS);
/// the common closed case and an open breaker cost no write at all. A worker that knows of one neither trusts a
/// cached verdict nor holds its successes back: the breaker may be about to
/// trip, and a success ends the run.
pub fn check_run(bytes: Option<&[u8]>, config: &BreakerConfig, now_ms: u64) -> (Check, bool) {
    let state = State::load(bytes, config, now_ms);
    (state.check(config, now_ms), state.run_under_way())
}

impl State {
    fn check(&self, config: &BreakerConfig, now_ms: u64) -> Check {
        let state = self;
        match state.mode {
            BreakerState::Closed => Check::Allowed,
            BreakerState::Open if now_ms < state.until_ms => Check::Rejected {
                retry_after_ms: state.until_ms - now_ms,
            },
            BreakerState::Open => Check::TryProbe,
            BreakerState::HalfOpen if state.slot_available(config, now_ms) => Check::TryProbe,
            BreakerState::HalfOpen => Check::Rejected {
                retry_after_ms: PROBES_BUSY_RETRY_MS,
            },
        }
    }
}

impl State {
    fn admit(&mut self, config: &BreakerConfig, now_ms: u64) -> (Admission, Option<Transition>) {
        let state = self;
        let mut transition = None;
        match state.mode {
            BreakerState::Closed => return (Admission::Allowed, None),
            BreakerState::Open if now_ms < state.until_ms => {
                let retry_after_ms = state.until_ms - now_ms;
                return (Admission::Rejected { retry_after_ms }, None);
            }
            BreakerState::Open => {
                state.mode = BreakerState::HalfOpen;
                state.generation = state.generation.wrapping_add(1);
                state.slots = 0;
                state.succeeded = 0;
                transition = Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    reason: Reason::OpenTimeElapsed {
                        probes: config.half_open_requests,
                    },
                    open_ms: None,
                });
            }
            BreakerState::HalfOpen => {}
        }
        if state.in_flight() >= config.half_open_requests && now_ms >= state.until_ms {
            // Every slot taken and none granted for a whole lease: presume them
            // leaked. A new generation voids their tokens; successes already
            // reported stay counted.
            state.generation = state.generation.wrapping_add(1);
            state.slots = 0;
        }
        // The lowest free slot; slots at or above half_open_requests are never used.
        let free = (!state.slots).trailing_zeros();
        let admission = if free < u32::from(config.half_open_requests) {
            state.slots |= 1 << free;
            state.until_ms = now_ms.saturating_add(PROBE_LEASE_MS);
            Admission::Probe(ProbeToken {
                generation: state.generation,
                // Below half_open_requests (<= 100), so it fits a u8.
                slot: free as u8,
            })
        } else {
            Admission::Rejected {
                retry_after_ms: PROBES_BUSY_RETRY_MS,
            }
        };
        (admission, transition)
    }
}

impl State {
    fn record(
        &mut self,
        config: &BreakerConfig,
        now_ms: u64,
        outcome: Outcome,
        probe: Option<ProbeToken>,
        random: u64,
    ) -> Option<Transition> {
        let state = self;
        match state.mode {
            BreakerState::Closed => state.record_closed(config, now_ms, outcome, random),
            BreakerState::Open => None,
            BreakerState::HalfOpen => match probe {
                Some(token) if state.free(token) => {
                    let verdict = if outcome.any_failure() {
                        Some(Reason::ProbeFailed)
                    } else if outcome.slow(config) {
                        config.slow.map(|slow| Reason::ProbeSlow {
                            slow_ms: slow.threshold_ms,
                        })
                    } else {
                        None
                    };
                    match verdict {
                        Some(reason) => Some(state.trip(config, now_ms, random, reason)),
                        None => {
                            state.succeeded = state.succeeded.saturating_add(1);
                            if state.succeeded >= config.half_open_requests {
                                state.close(now_ms, config);
                                Some(Transition {
                                    from: BreakerState::HalfOpen,
                                    to: BreakerState::Closed,
                                    reason: Reason::ProbesSucceeded {
                                        probes: config.half_open_requests,
                                    },
                                    open_ms: None,
                                })
                            } else {
                                None
                            }
                        }
                    }
                }
                _ => None,
            },
        }
    }
}

/// Clean successes a worker has seen and not yet written to the shared
/// breaker: a request admitted while closed, answered by its first attempt
/// without failure and not slow. Writing each would cost two host calls and
/// a copy per request, the price of everything else the filter does. A
/// success cannot trip a breaker or change its state, so the worker keeps a
/// count per bucket and books them all with its next write to this breaker
/// (a failure, a probe) or on its tick, whichever comes first: every
/// decision this worker makes sees every success it has seen, and the
/// others see them within a tick. Failures are never held back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSuccesses {
    /// (bucket epoch, successes), oldest first; at most `BUCKETS` entries.
    buckets: Vec<(u64, u32)>,
    /// When the newest was seen.
    last_ms: u64,
}

impl PendingSuccesses {
    pub fn new() -> Self {
        PendingSuccesses {
            buckets: Vec::with_capacity(2),
            last_ms: 0,
        }
    }

    /// Counts one clean success seen at `now_ms`.
    pub fn add(&mut self, config: &BreakerConfig, now_ms: u64) {
        self.last_ms = self.last_ms.max(now_ms);
        let epoch = now_ms / config.bucket_ms();
        if let Some((last, count)) = self.buckets.last_mut() {
            if *last == epoch {
                *count = count.saturating_add(1);
                return;
            }
        }
        if self.buckets.len() >= BUCKETS {
            // Older than the whole window: it would be dropped on booking.
            self.buckets.remove(0);
        }
        self.buckets.push((epoch, 1));
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    pub fn clear(&mut self) {
        self.buckets.clear();
        self.last_ms = 0;
    }

    /// Successes held.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .map(|&(_, count)| u64::from(count))
            .sum()
    }
}

impl State {
    /// Books held successes. Only a closed breaker counts them: while open
    /// or half-open, a request admitted while closed decides nothing (as in
    /// `record_held`). A bucket that has left the window is dropped.
    fn run_under_way(&self) -> bool {
        self.consecutive > 0
    }

    fn book_successes(&mut self, config: &BreakerConfig, pending: &PendingSuccesses) {
        if self.mode != BreakerState::Closed || pending.is_empty() {
            return;
        }
        let span = BUCKETS as u64;
        for &(epoch, count) in &pending.buckets {
            if self.head > epoch && self.head - epoch >= span {
                continue;
            }
            if let Some(bucket) = self.bucket(config, epoch.saturating_mul(config.bucket_ms())) {
                bucket.calls = bucket.calls.saturating_add(count);
            }
        }
        // A success ends the run only if it came after the run's last
        // failure (written by any worker): one held from before it belongs
        // to an earlier run.
        if pending.last_ms > self.last_failure_ms {
            self.consecutive = 0;
        }
    }
}

/// Books a worker's held successes, then (if any) a finished request, in
/// one write; for `shared::update`. Also returns what `check_run` says of
/// the written state, so the worker can cache it.
///
/// A finished request's `probe` is the token `admit_held` gave (None for a
/// request admitted while closed); `random` a fresh random word, used for
/// the open-time jitter when this trips the breaker. While closed, the
/// outcome goes into the window and may trip the breaker. While open,
/// outcomes are ignored: they are requests admitted before the trip, and
/// must not extend it. While half-open, only the outcome of a current probe
/// counts; a request admitted before the trip tells nothing about the
/// recovery the probes are testing.
pub fn record_held(
    bytes: Option<&[u8]>,
    config: &BreakerConfig,
    now_ms: u64,
    pending: &PendingSuccesses,
    finished: Option<(Outcome, Option<ProbeToken>)>,
    random: u64,
) -> (Vec<u8>, (Option<Transition>, Check, bool)) {
    let mut state = State::load(bytes, config, now_ms);
    state.book_successes(config, pending);
    let transition = match finished {
        Some((outcome, probe)) => state.record(config, now_ms, outcome, probe, random),
        None => None,
    };
    let check = state.check(config, now_ms);
    let run = state.run_under_way();
    (state.encode(), (transition, check, run))
}

/// Admission with a write, for `shared::update`, after booking the worker's
/// held successes: moves an open breaker whose time has come to half-open,
/// and takes a probe slot if one is free.
pub fn admit_held(
    bytes: Option<&[u8]>,
    config: &BreakerConfig,
    now_ms: u64,
    pending: &PendingSuccesses,
) -> (Vec<u8>, (Admission, Option<Transition>)) {
    let mut state = State::load(bytes, config, now_ms);
    state.book_successes(config, pending);
    let verdict = state.admit(config, now_ms);
    (state.encode(), verdict)
}

/// Gives a probe slot back without a verdict, for `shared::update` (the
/// result is `()`): the request ended with nothing to learn from it, e.g.
/// the client went away before the upstream answered.
pub fn release(
    bytes: Option<&[u8]>,
    config: &BreakerConfig,
    now_ms: u64,
    probe: ProbeToken,
) -> (Vec<u8>, ()) {
    let mut state = State::load(bytes, config, now_ms);
    if state.mode == BreakerState::HalfOpen {
        state.free(probe);
    }
    (state.encode(), ())
}

/// The open time of the `streak`-th trip in a row (1 for the first): the base
/// `open_ms` doubled per earlier trip, capped at `max_open_ms`, then spread
/// over up to 20 % by `random` so that proxies tripped together do not
/// probe together. The result never leaves `[open_ms, max_open_ms]`: below
/// the cap the spread goes up, at the cap it goes down, so the doubling
/// stays monotonic (the next base is above this spread).
pub fn open_duration(config: &BreakerConfig, streak: u8, random: u64) -> u64 {
    let mut base = config.open_ms;
    for _ in 1..streak {
        if base >= config.max_open_ms {
            break;
        }
        base = base.saturating_mul(2);
    }
    let base = base.min(config.max_open_ms);
    let spread = base / 5;
    let high = base.saturating_add(spread).min(config.max_open_ms);
    let low = high.saturating_sub(spread).max(config.open_ms);
    // high >= base >= open_ms, and low <= high by construction.
    let width = high.saturating_sub(low).saturating_add(1);
    low.saturating_add(mix(random) % width)
}

/// The bits of the slots a config may use.
fn slot_mask(config: &BreakerConfig) -> u128 {
    1u128
        .checked_shl(u32::from(config.half_open_requests))
        .map_or(u128::MAX, |bit| bit - 1)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    calls: u32,
    failures: u32,
    slow: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    calls: u64,
    failures: u64,
    slow: u64,
}

/// The decoded state. `until_ms` means "probing may start" while open, and
/// "the newest probe slot's lease ends" while half-open.
#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    mode: BreakerState,
    /// Trips in a row since the breaker last closed (for the doubling).
    streak: u8,
    consecutive: u32,
    /// When the last failure was written: a held success older than it
    /// came before it, and does not break the run it belongs to.
    last_failure_ms: u64,
    until_ms: u64,
    generation: u32,
    /// Probe slots in flight, one bit each (`half_open_requests` <= 100).
    slots: u128,
    succeeded: u8,
    /// Epoch (time / bucket length) of the newest bucket.
    head: u64,
    buckets: [Bucket; BUCKETS],
}

const HEADER_LEN: usize = 1 + 1 + 1 + 1 + 4 + 8 + 8 + 4 + 8 + 16;
const ENCODED_LEN: usize = HEADER_LEN + BUCKETS * 12;

impl State {
    fn fresh() -> Self {
        State {
            mode: BreakerState::Closed,
            streak: 0,
            consecutive: 0,
            last_failure_ms: 0,
            until_ms: 0,
            generation: 0,
            slots: 0,
            succeeded: 0,
            head: 0,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Decodes and sanitises: unreadable bytes are a fresh closed breaker.
    /// A stored time further ahead than any this code writes (open time
    /// above `max_open_ms`, lease above `PROBE_LEASE_MS`) is corrupt bytes
    /// or a clock stepped back; it is read as already passed. Clamping it to
    /// "now + max" instead would not do: `check_run` never writes, so the clamp
    /// would be redone from every new "now" and the breaker never reopen.
    fn load(bytes: Option<&[u8]>, config: &BreakerConfig, now_ms: u64) -> Self {
        let Some(mut state) = bytes.and_then(Self::decode) else {
            return Self::fresh();
        };
        let longest = match state.mode {
            BreakerState::Open => config.max_open_ms,
            BreakerState::HalfOpen => PROBE_LEASE_MS,
            BreakerState::Closed => u64::MAX,
        };
        if state.until_ms > now_ms.saturating_add(longest) {
            state.until_ms = now_ms;
        }
        state.slots &= slot_mask(config);
        state
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ENCODED_LEN {
            return None;
        }
        let mut reader = Reader::new(bytes);
        if reader.u8()? != VERSION {
            return None;
        }
        let mode = BreakerState::from_code(reader.u8()?)?;
        let streak = reader.u8()?;
        let succeeded = reader.u8()?;
        let consecutive = reader.u32()?;
        let last_failure_ms = reader.u64()?;
        let until_ms = reader.u64()?;
        let generation = reader.u32()?;
        let head = reader.u64()?;
        let slots = reader.u128()?;
        let mut buckets = [Bucket::default(); BUCKETS];
        for bucket in &mut buckets {
            bucket.calls = reader.u32()?;
            bucket.failures = reader.u32()?.min(bucket.calls);
            bucket.slow = reader.u32()?.min(bucket.calls);
        }
        Some(State {
            mode,
            streak,
            consecutive,
            last_failure_ms,
            until_ms,
            generation,
            slots,
            succeeded,
            head,
            buckets,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(VERSION);
        out.push(self.mode.code());
        out.push(self.streak);
        out.push(self.succeeded);
        out.extend_from_slice(&self.consecutive.to_le_bytes());
        out.extend_from_slice(&self.last_failure_ms.to_le_bytes());
        out.extend_from_slice(&self.until_ms.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.head.to_le_bytes());
        out.extend_from_slice(&self.slots.to_le_bytes());
        for bucket in &self.buckets {
            out.extend_from_slice(&bucket.calls.to_le_bytes());
            out.extend_from_slice(&bucket.failures.to_le_bytes());
            out.extend_from_slice(&bucket.slow.to_le_bytes());
        }
        out
    }

    fn in_flight(&self) -> u8 {
        // At most 128 bits set.
        self.slots.count_ones() as u8
    }

    /// Frees the token's slot; false when the token is stale or its slot
    /// was freed already (the token then decides nothing).
    fn free(&mut self, token: ProbeToken) -> bool {
        let bit = 1u128.checked_shl(u32::from(token.slot)).unwrap_or(0);
        if token.generation != self.generation || self.slots & bit == 0 {
            return false;
        }
        self.slots &= !bit;
        true
    }

    fn slot_available(&self, config: &BreakerConfig, now_ms: u64) -> bool {
        self.in_flight() < config.half_open_requests || now_ms >= self.until_ms
    }

    /// The bucket for `now_ms`, rotating the ring forward first. A time a
    /// bucket or so behind the head is a VM that read the clock just before
    /// another wrote: it lands in its own bucket. A time a whole window
    /// behind can only be a clock stepped back; the window restarts there
    /// rather than ignore every call until the clock catches up.
    fn bucket(&mut self, config: &BreakerConfig, now_ms: u64) -> Option<&mut Bucket> {
        let epoch = now_ms / config.bucket_ms();
        let span = BUCKETS as u64;
        if epoch > self.head {
            let gap = (epoch - self.head).min(span);
            for back in 0..gap {
                if let Some(bucket) = self.buckets.get_mut(((epoch - back) % span) as usize) {
                    *bucket = Bucket::default();
                }
            }
            self.head = epoch;
        } else if self.head - epoch >= span {
            self.clear_window(epoch);
        }
        self.buckets.get_mut((epoch % span) as usize)
    }

    fn clear_window(&mut self, epoch: u64) {
        self.buckets = [Bucket::default(); BUCKETS];
        self.head = epoch;
    }

    fn totals(&self) -> Totals {
        self.buckets
            .iter()
            .fold(Totals::default(), |sum, bucket| Totals {
                calls: sum.calls + u64::from(bucket.calls),
                failures: sum.failures + u64::from(bucket.failures),
                slow: sum.slow + u64::from(bucket.slow),
            })
    }

    fn record_closed(
        &mut self,
        config: &BreakerConfig,
        now_ms: u64,
        outcome: Outcome,
        random: u64,
    ) -> Option<Transition> {
        let slow = outcome.slow(config);
        if let Some(bucket) = self.bucket(config, now_ms) {
            bucket.calls = bucket.calls.saturating_add(outcome.calls());
            bucket.failures = bucket.failures.saturating_add(outcome.failures());
            bucket.slow = bucket.slow.saturating_add(u32::from(slow));
        }
        // The retried attempts came before the final one: a success ends the
        // run of failures, a failure extends it by every attempt.
        self.consecutive = if outcome.failed {
            self.last_failure_ms = self.last_failure_ms.max(now_ms);
            self.consecutive.saturating_add(outcome.calls())
        } else {
            0
        };
        let reason = self.trip_reason(config)?;
        Some(self.trip(config, now_ms, random, reason))
    }

    fn trip_reason(&self, config: &BreakerConfig) -> Option<Reason> {
        if let Some(limit) = config.consecutive_failures {
            if self.consecutive >= limit {
                return Some(Reason::ConsecutiveFailures {
                    failures: self.consecutive,
                });
            }
        }
        let totals = self.totals();
        if totals.calls == 0 || totals.calls < u64::from(config.min_requests) {
            return None;
        }
        let window_s = config.window_ms / 1000;
        if totals.failures * PPM >= u64::from(config.failure_rate_ppm) * totals.calls {
            return Some(Reason::FailureRate {
                failures: totals.failures,
                calls: totals.calls,
                threshold_ppm: config.failure_rate_ppm,
                window_s,
            });
        }
        let slow = config.slow?;
        if totals.slow * PPM >= u64::from(slow.rate_ppm) * totals.calls {
            return Some(Reason::SlowCallRate {
                slow: totals.slow,
                calls: totals.calls,
                threshold_ppm: slow.rate_ppm,
                slow_ms: slow.threshold_ms,
                window_s,
            });
        }
        None
    }

    fn trip(
        &mut self,
        config: &BreakerConfig,
        now_ms: u64,
        random: u64,
        reason: Reason,
    ) -> Transition {
        let from = self.mode;
        self.streak = self.streak.saturating_add(1);
        let open_ms = open_duration(config, self.streak, random);
        self.mode = BreakerState::Open;
        self.until_ms = now_ms.saturating_add(open_ms);
        self.slots = 0;
        self.succeeded = 0;
        self.consecutive = 0;
        Transition {
            from,
            to: BreakerState::Open,
            reason,
            open_ms: Some(open_ms),
        }
    }

    /// Closing starts a fresh window: the calls before the trip are what
    /// tripped it, and must not trip it again. (Outcomes are not counted
    /// while open or half-open, so the window is only ever cleared here.)
    fn close(&mut self, now_ms: u64, config: &BreakerConfig) {
        self.mode = BreakerState::Closed;
        self.streak = 0;
        self.consecutive = 0;
        self.slots = 0;
        self.succeeded = 0;
        self.until_ms = 0;
        self.clear_window(now_ms / config.bucket_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_round_trips_and_has_a_fixed_length() {
        let mut state = State::fresh();
        state.mode = BreakerState::HalfOpen;
        state.streak = 3;
        state.consecutive = 7;
        state.until_ms = 123_456_789;
        state.generation = 42;
        state.slots = 0b101;
        state.succeeded = 1;
        state.head = 987_654;
        if let Some(bucket) = state.buckets.get_mut(4) {
            *bucket = Bucket {
                calls: 9,
                failures: 5,
                slow: 2,
            };
        }
        let bytes = state.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(State::decode(&bytes), Some(state));
    }

    #[test]
    fn a_wrong_version_or_mode_does_not_decode() {
        let mut bytes = State::fresh().encode();
        if let Some(version) = bytes.first_mut() {
            *version = VERSION + 1;
        }
        assert_eq!(State::decode(&bytes), None);
        let mut bytes = State::fresh().encode();
        if let Some(mode) = bytes.get_mut(1) {
            *mode = 3;
        }
        assert_eq!(State::decode(&bytes), None);
    }
}
