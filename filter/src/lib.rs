//! Sluice: canary routing, retry budgets and circuit breakers for Envoy, as a
//! proxy-wasm filter.
//!
//! Two layers with a hard line between them:
//!
//! - the policy modules and the engine, plain Rust that takes time,
//!   randomness and the host as arguments, so they are unit tested, fuzzed
//!   and benchmarked natively exactly as they ship:
//!   - `config`: the plugin configuration, parsed and validated once;
//!   - `router` (with `device`, `sticky`, `pairs`): which service and which
//!     side a request goes to;
//!   - `retry`: the retry budget and the retry headers;
//!   - `breaker`: the circuit breakers;
//!   - `failures`: which outcomes (HTTP statuses, gRPC codes) are failures;
//!   - `response`: the status, gRPC code and attempt count the response
//!     headers tell, each checked;
//!   - `rollout`: the weight schedule and its rollback gate;
//!   - `shared`: read-modify-write of process-wide state with CAS;
//!   - `codec`, `decimal`: the byte encoding of shared state and the exact
//!     decimals of the config (private helpers);
//!   - `engine`: one worker's state, combining all of the above behind the
//!     `engine::Host` trait;
//!   - `testing`: the in-memory host the native tests, the fuzz targets and
//!     the benchmarks drive the engine with (nothing in the shell uses it,
//!     so it never reaches `sluice.wasm`);
//! - `shell` (built only for wasm32): the proxy-wasm exports and `Host`
//!   over the raw host calls. It is the only code that touches the ABI, and
//!   it decides nothing.

pub mod breaker;
mod codec;
pub mod config;
mod decimal;
pub mod device;
pub mod engine;
pub mod failures;
pub mod pairs;
pub mod response;
pub mod retry;
pub mod rollout;
pub mod router;
pub mod shared;
pub mod sticky;
pub mod testing;

#[cfg(target_arch = "wasm32")]
mod shell;
