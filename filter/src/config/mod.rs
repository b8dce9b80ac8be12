//! The plugin configuration: parsed and validated once, in `on_configure`.
//!
//! Everything a request needs is prepared here (lower-cased header names,
//! weights in basis points, host tables) so that the request path does no
//! parsing. Any problem refuses the whole document with one line naming the
//! JSON path and the reason; nothing is half-applied.
//!
//! - `raw`: the document's shapes, read by serde;
//! - `validate`: the checks and the conversion into the types below, for the
//!   top level, services, matches and rules;
//! - `policies`: the same for the `retry`, `breaker`, `rollout` and `failures`
//!   blocks.

mod policies;
mod raw;
mod validate;

use crate::breaker::BreakerConfig;
use crate::device::DeviceClass;
use crate::failures::Failures;
use crate::retry::RetryPolicy;
use crate::rollout::RolloutConfig;
use std::fmt;

/// A refused configuration: where in the JSON document, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `services[0].weight`; empty for a document that is not JSON or not
    /// an object.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Default header the filter writes the chosen cluster into.
pub const DEFAULT_STEERING_HEADER: &str = "x-sluice-cluster";

/// Weights are stored in basis points: 10_000 = 100 %, resolution 0.01 %.
pub const FULL_WEIGHT: u16 = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub steering_header: String,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub matcher: ServiceMatch,
    pub stable: String,
    pub canary: Option<String>,
    /// The route table sends a request without the steering header to
    /// stable (a default route): a request kept on stable needs no write.
    pub stable_by_default: bool,
    /// Canary share in basis points (0..=10_000).
    pub weight_bp: u16,
    pub sticky: Option<StickyKey>,
    pub rules: Vec<Rule>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<BreakerConfig>,
    pub rollout: Option<RolloutConfig>,
    /// Which outcomes count as failures for the breakers and the rollout
    /// gate (`failures` block; default: 5xx, and the server-side gRPC
    /// codes).
    pub failures: Failures,
    /// The service's routes set Envoy's `include_attempt_count_in_response`,
    /// so the router overwrites `x-envoy-attempt-count` on every response
    /// and the engine may take the attempts from it (one read of the
    /// response headers instead of a property read). Without it the header
    /// is whatever the upstream sent, and is never believed.
    pub attempt_count_in_response: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceMatch {
    /// Empty means any authority.
    pub authorities: Vec<HostPattern>,
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `shop.local`, stored lower-case.
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`, lower-case.
    Suffix(String),
    /// `*`: any host.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// Lower-cased header name.
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Stable,
    Canary,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matcher: RuleMatch,
    pub action: RuleAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleMatch {
    Header { name: String, test: ValueTest },
    Cookie { name: String, test: ValueTest },
    Device(DeviceClass),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueTest {
    Equals(Vec<Vec<u8>>),
    Prefix(Vec<Vec<u8>>),
    Contains(Vec<Vec<u8>>),
    /// `present: true` matches when the header or cookie exists (any value);
    /// `present: false` when it does not.
    Present(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    To(Side),
    /// This cohort's own canary share, in basis points, still sticky.
    Weight(u16),
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    ///
    /// serde reads the document into the shapes of `raw` (types only, every
    /// key optional, unknown and repeated keys refused); `validate` checks
    /// every value and every rule across keys, and prepares the runtime form.
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        validate::config(validate::read(bytes)?)
    }

    /// One line summarising the config, logged when it is applied.
    pub fn summary(&self) -> String {
        let services: Vec<String> = self
            .services
            .iter()
            .map(|service| {
                let canary = match &service.canary {
                    Some(canary) => format!(
                        " canary={canary} weight={}%",
                        format_weight(service.weight_bp)
                    ),
                    None => String::new(),
                };
                format!(
                    "{} (stable={}{canary}, {} rules)",
                    service.name,
                    service.stable,
                    service.rules.len()
                )
            })
            .collect();
        format!(
            "{} services via header {}: {}",
            self.services.len(),
            self.steering_header,
            services.join("; ")
        )
    }
}

impl Service {
    /// The cluster for a side; a service without a canary always uses stable.
    pub fn cluster(&self, side: Side) -> &str {
        match (side, &self.canary) {
            (Side::Canary, Some(canary)) => canary,
            _ => &self.stable,
        }
    }
}

/// `1050` basis points → `10.5`.
pub fn format_weight(weight_bp: u16) -> String {
    let whole = weight_bp / 100;
    let fraction = weight_bp % 100;
    if fraction == 0 {
        format!("{whole}")
    } else if fraction.is_multiple_of(10) {
        format!("{whole}.{}", fraction / 10)
    } else {
        format!("{whole}.{fraction:02}")
    }
}
