//! Sluice: canary routing, retry budgets and circuit breakers for Envoy, as a
//! proxy-wasm filter.
//!
//! The policy logic lives in plain modules that take their inputs (headers,
//! time, randomness) as arguments and never call the host, so they are unit
//! tested and benchmarked natively. The proxy-wasm glue in `filter` (built
//! only for wasm32) is a thin shell that fetches inputs from Envoy, calls the
//! policy, and writes the decision back.

pub mod breaker;
mod codec;
pub mod config;
mod decimal;
pub mod device;
pub mod pairs;
pub mod retry;
pub mod rollout;
pub mod router;
pub mod shared;
pub mod sticky;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
