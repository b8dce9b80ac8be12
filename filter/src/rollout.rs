//! Progressive rollout: the canary weight follows a schedule of steps, and a
//! canary that fails too often is rolled back to weight 0.
//!
//! The weight is a function of the config and the clock: step `k` holds
//! during the `k`-th `step_s` interval after the start, and after the last
//! step the canary is promoted (weight 100 %). So every proxy of a fleet with
//! the same config is on the same step at the same time, without a
//! controller. The start is `start_unix_s`, or by default the moment this
//! process first applied the block (recorded in shared data by `initial`);
//! fleets that want their proxies in lockstep should give `start_unix_s`.
//!
//! The gate: each proxy counts the canary's requests and failures in the
//! current step, and rolls the rollout back as soon as the failure rate is
//! above `max_failure_rate` over at least `min_requests` requests. It rolls
//! back early when the failures seen already guarantee that outcome (more
//! failures than `max_failure_rate × min_requests`), so a canary that fails
//! outright is pulled after a handful of requests, not after a hundred.
//!
//! A step that ends without `min_requests` does not hold the schedule: the
//! schedule is the clock's, and holding a step on one proxy for want of
//! traffic would put the fleet on different weights with nothing to bring
//! them back together. Instead the step's counts carry over into the next
//! step, so evidence keeps accumulating on quiet proxies until it is enough
//! to judge; counts restart only at a step boundary where they had reached
//! `min_requests` (and so had passed the gate). The gate thus only ever acts
//! on evidence; a proxy that never sees `min_requests` canary requests
//! follows the clock to promotion, like the rest of the fleet.
//!
//! Rollback and promotion are final for the block: a rolled-back canary
//! stays at weight 0 until the block (or either cluster) changes, a promoted
//! one at 100 %. The state lives under a key derived from the service, the
//! clusters and the block (`state_key`), so a config push that leaves them
//! unchanged keeps the rollout where it is, and any change starts a new one.
//! Shared data is per process: each proxy judges its own canary traffic.

use crate::codec::{Fingerprint, Reader};
use crate::config::{format_weight, FULL_WEIGHT};
use crate::decimal::{ppm_text, ratio_decimal, PPM};
use std::fmt;

/// Byte-encoding version; bytes of any other version are a fresh state.
const VERSION: u8 = 1;
const ENCODED_LEN: usize = 1 + 1 + 8 + 2 + 4 + 4 + 2 + 2;

pub const DEFAULT_MIN_REQUESTS: u32 = 100;
pub const MAX_STEPS: usize = 100;
/// A year: longer steps are a typo, and the bound keeps the schedule's
/// arithmetic (100 steps from any start) far from overflow.
pub const MAX_STEP_S: u64 = 365 * 24 * 3600;
/// The latest `start_unix_s`: 1 January 3000.
pub const MAX_START_S: u64 = 32_503_680_000;

/// A parsed `rollout` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutConfig {
    /// Canary weight of each step, in basis points, non-decreasing.
    pub steps_bp: Vec<u16>,
    pub step_ms: u64,
    /// The largest tolerated failure rate, in parts per million.
    pub max_failure_ppm: u32,
    pub min_requests: u32,
    /// `start_unix_s` in milliseconds; `None` means "when first applied".
    pub start_ms: Option<u64>,
}

impl RolloutConfig {
    fn digest(&self, stable: &str, canary: &str) -> u64 {
        let mut print = Fingerprint::new();
        print.text(stable);
        print.text(canary);
        print.u64(self.steps_bp.len() as u64);
        for &step in &self.steps_bp {
            print.u64(u64::from(step));
        }
        print.u64(self.step_ms);
        print.u64(u64::from(self.max_failure_ppm));
        print.u64(u64::from(self.min_requests));
        match self.start_ms {
            Some(start) => {
                print.u64(1);
                print.u64(start);
            }
            None => print.u64(0),
        }
        print.finish()
    }

    fn step_count(&self) -> u16 {
        // At most MAX_STEPS entries.
        self.steps_bp.len() as u16
    }
}

/// The shared-data key of a service's rollout. It covers the block and both
/// cluster names: a new canary build deployed under a new cluster name with
/// the same schedule must start a new rollout, not inherit the last one's
/// promotion or rollback.
pub fn state_key(service: &str, stable: &str, canary: &str, config: &RolloutConfig) -> String {
    format!(
        "sluice/rollout/{service}/{:016x}",
        config.digest(stable, canary)
    )
}

/// The bytes to create the key with when the config is applied (with
/// `shared::ensure`, so only the first VM's start time sticks).
pub fn initial(config: &RolloutConfig, now_ms: u64) -> Vec<u8> {
    State::fresh(config, now_ms).encode()
}

/// Where the rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    /// `start_unix_s` is in the future: canary weight 0.
    Pending,
    /// On step `step` (0-based).
    Progressing { step: u16 },
    /// Rolled back during step `step`: canary weight 0.
    RolledBack { step: u16 },
    /// Past the last step: canary weight 100 %.
    Promoted,
}

impl RolloutState {
    /// The gauge value: 0 progressing, 1 rolled back, 2 promoted, 3 pending.
    pub fn gauge(self) -> u64 {
        match self {
            RolloutState::Progressing { .. } => 0,
            RolloutState::RolledBack { .. } => 1,
            RolloutState::Promoted => 2,
            RolloutState::Pending => 3,
        }
    }
}

/// What the request path needs from the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutView {
    /// The canary weight in basis points (10_000 = 100 %).
    pub weight_bp: u16,
    pub state: RolloutState,
    /// When the clock alone will next change the weight (the next step
    /// boundary), if ever. A cached view is good until then, or until a
    /// rollback, which only a write to the key can bring.
    pub next_change_ms: Option<u64>,
}

/// Announcements and the rollback, returned only to the VM whose write made
/// them, so each is logged once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutEvent {
    /// Step `step` (0-based) of `steps` began.
    Step {
        step: u16,
        steps: u16,
        weight_bp: u16,
    },
    Promoted,
    RolledBack {
        step: u16,
        steps: u16,
        weight_bp: u16,
        requests: u32,
        failures: u32,
        max_failure_ppm: u32,
        min_requests: u32,
    },
}

impl RolloutEvent {
    /// A rollback is logged at warn level; steps and promotion at info.
    pub fn is_rollback(&self) -> bool {
        matches!(self, RolloutEvent::RolledBack { .. })
    }

    pub fn log_line(&self, service: &str) -> String {
        format!("sluice: rollout of service {service}: {self}")
    }
}

impl fmt::Display for RolloutEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RolloutEvent::Step {
                step,
                steps,
                weight_bp,
            } => write!(
                f,
                "step {}/{steps}, canary weight {}%",
                step + 1,
                format_weight(weight_bp)
            ),
            RolloutEvent::Promoted => f.write_str("promoted, canary weight 100%"),
            RolloutEvent::RolledBack {
                step,
                steps,
                weight_bp,
                requests,
                failures,
                max_failure_ppm,
                min_requests,
            } => {
                write!(
                    f,
                    "rolled back at step {}/{steps} ({}%): ",
                    step + 1,
                    format_weight(weight_bp)
                )?;
                let limit = ppm_text(max_failure_ppm);
                if requests >= min_requests {
                    write!(
                        f,
                        "canary failure rate {} > {limit} over {requests} requests",
                        ratio_decimal(u64::from(failures), u64::from(requests), 3)
                    )?;
                } else {
                    write!(
                        f,
                        "{failures} canary failures in {requests} requests already exceed {limit} of {min_requests}"
                    )?;
                }
                f.write_str("; canary weight 0 until the rollout block or the clusters change")
            }
        }
    }
}

/// The current weight and state: a pure read of one `get`, cheap enough for
/// every request. Missing or unreadable bytes read as a rollout starting now
/// (`record` and `advance` then write such a state).
pub fn view(bytes: Option<&[u8]>, config: &RolloutConfig, now_ms: u64) -> RolloutView {
    let state = State::load(bytes, config, now_ms);
    let phase = state.phase(config, now_ms);
    if state.rolled_back {
        return RolloutView {
            weight_bp: 0,
            state: RolloutState::RolledBack {
                step: state.rollback_step,
            },
            next_change_ms: None,
        };
    }
    match phase {
        Phase::Pending { starts_ms } => RolloutView {
            weight_bp: 0,
            state: RolloutState::Pending,
            next_change_ms: Some(starts_ms),
        },
        Phase::Step { index, ends_ms } => RolloutView {
            weight_bp: config
                .steps_bp
                .get(usize::from(index))
                .copied()
                .unwrap_or(0),
            state: RolloutState::Progressing { step: index },
            next_change_ms: Some(ends_ms),
        },
        Phase::Promoted => RolloutView {
            weight_bp: FULL_WEIGHT,
            state: RolloutState::Promoted,
            next_change_ms: None,
        },
    }
}

/// Records one canary request, for `shared::update`. Returns the rollback
/// when this request decided it, else a due step or promotion announcement.
pub fn record(
    bytes: Option<&[u8]>,
    config: &RolloutConfig,
    now_ms: u64,
    failed: bool,
) -> (Vec<u8>, Option<RolloutEvent>) {
    let mut state = State::load(bytes, config, now_ms);
    let announcement = state.announce(config, now_ms);
    if state.rolled_back {
        return (state.encode(), announcement);
    }
    let Phase::Step { index, .. } = state.phase(config, now_ms) else {
        return (state.encode(), announcement);
    };
    if state.count_step != index {
        if state.requests >= config.min_requests {
            state.requests = 0;
            state.failures = 0;
        }
        state.count_step = index;
    }
    state.requests = state.requests.saturating_add(1);
    state.failures = state.failures.saturating_add(u32::from(failed));
    let judged = u64::from(state.requests.max(config.min_requests));
    if u64::from(state.failures) * PPM > u64::from(config.max_failure_ppm) * judged {
        state.rolled_back = true;
        state.rollback_step = index;
        let event = RolloutEvent::RolledBack {
            step: index,
            steps: config.step_count(),
            weight_bp: config
                .steps_bp
                .get(usize::from(index))
                .copied()
                .unwrap_or(0),
            requests: state.requests,
            failures: state.failures,
            max_failure_ppm: config.max_failure_ppm,
            min_requests: config.min_requests,
        };
        return (state.encode(), Some(event));
    }
    (state.encode(), announcement)
}

/// Whether `advance` has something to write: a step or promotion not yet
/// announced, or a missing or unreadable state. Read-only, for `on_tick`.
pub fn due(bytes: Option<&[u8]>, config: &RolloutConfig, now_ms: u64) -> bool {
    match bytes.and_then(State::decode) {
        Some(state) => {
            !state.rolled_back && state.phase(config, now_ms).number(config) > state.announced
        }
        None => true,
    }
}

/// Announces a step or promotion the clock has reached, for `shared::update`
/// from `on_tick` when `due`: steps are then logged when they begin, not
/// when the next canary request happens to end.
pub fn advance(
    bytes: Option<&[u8]>,
    config: &RolloutConfig,
    now_ms: u64,
) -> (Vec<u8>, Option<RolloutEvent>) {
    let mut state = State::load(bytes, config, now_ms);
    let event = state.announce(config, now_ms);
    (state.encode(), event)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending { starts_ms: u64 },
    Step { index: u16, ends_ms: u64 },
    Promoted,
}

impl Phase {
    /// 0 pending, `k + 1` for step `k`, steps + 1 promoted: the order in
    /// which phases are announced.
    fn number(self, config: &RolloutConfig) -> u16 {
        match self {
            Phase::Pending { .. } => 0,
            Phase::Step { index, .. } => index.saturating_add(1),
            Phase::Promoted => config.step_count().saturating_add(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    /// The start recorded when the block was first applied (used when the
    /// block gives no `start_unix_s`).
    start_ms: u64,
    rolled_back: bool,
    rollback_step: u16,
    /// The step the counts were last added in.
    count_step: u16,
    requests: u32,
    failures: u32,
    /// The highest phase number announced.
    announced: u16,
}

impl State {
    fn fresh(config: &RolloutConfig, now_ms: u64) -> Self {
        State {
            start_ms: config.start_ms.unwrap_or(now_ms),
            rolled_back: false,
            rollback_step: 0,
            count_step: 0,
            requests: 0,
            failures: 0,
            announced: 0,
        }
    }

    fn load(bytes: Option<&[u8]>, config: &RolloutConfig, now_ms: u64) -> Self {
        bytes
            .and_then(Self::decode)
            .unwrap_or_else(|| Self::fresh(config, now_ms))
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ENCODED_LEN {
            return None;
        }
        let mut reader = Reader::new(bytes);
        if reader.u8()? != VERSION {
            return None;
        }
        let flags = reader.u8()?;
        if flags > 1 {
            return None;
        }
        let start_ms = reader.u64()?;
        let count_step = reader.u16()?;
        let requests = reader.u32()?;
        let failures = reader.u32()?.min(requests);
        let announced = reader.u16()?;
        let rollback_step = reader.u16()?;
        Some(State {
            start_ms,
            rolled_back: flags == 1,
            rollback_step,
            count_step,
            requests,
            failures,
            announced,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(VERSION);
        out.push(u8::from(self.rolled_back));
        out.extend_from_slice(&self.start_ms.to_le_bytes());
        out.extend_from_slice(&self.count_step.to_le_bytes());
        out.extend_from_slice(&self.requests.to_le_bytes());
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.announced.to_le_bytes());
        out.extend_from_slice(&self.rollback_step.to_le_bytes());
        out
    }

    fn phase(&self, config: &RolloutConfig, now_ms: u64) -> Phase {
        let start = config.start_ms.unwrap_or(self.start_ms);
        let step_ms = config.step_ms.max(1);
        if now_ms < start {
            if config.start_ms.is_some() {
                return Phase::Pending { starts_ms: start };
            }
            // A recorded start ahead of the clock: the clock stepped back
            // (or the bytes are odd). Stay on the first step.
            return Phase::Step {
                index: 0,
                ends_ms: start.saturating_add(step_ms),
            };
        }
        let index = (now_ms - start) / step_ms;
        if index >= u64::from(config.step_count()) {
            return Phase::Promoted;
        }
        Phase::Step {
            // Below the step count, which fits a u16.
            index: index as u16,
            ends_ms: start.saturating_add((index + 1).saturating_mul(step_ms)),
        }
    }

    /// Marks the current phase announced; returns its event if it was not.
    fn announce(&mut self, config: &RolloutConfig, now_ms: u64) -> Option<RolloutEvent> {
        if self.rolled_back {
            return None;
        }
        let phase = self.phase(config, now_ms);
        let number = phase.number(config);
        if number <= self.announced {
            return None;
        }
        self.announced = number;
        match phase {
            Phase::Pending { .. } => None,
            Phase::Step { index, .. } => Some(RolloutEvent::Step {
                step: index,
                steps: config.step_count(),
                weight_bp: config
                    .steps_bp
                    .get(usize::from(index))
                    .copied()
                    .unwrap_or(0),
            }),
            Phase::Promoted => Some(RolloutEvent::Promoted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoding_round_trips_and_has_a_fixed_length() {
        let state = State {
            start_ms: 1_795_000_000_000,
            rolled_back: true,
            rollback_step: 2,
            count_step: 3,
            requests: 130,
            failures: 4,
            announced: 3,
        };
        let bytes = state.encode();
        assert_eq!(bytes.len(), ENCODED_LEN);
        assert_eq!(State::decode(&bytes), Some(state));
    }
}
