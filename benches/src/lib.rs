//! Sluice's benchmark support code (see `benches/README.md`):
//!
//! * [`workload`]: the realistic config and requests every benchmark shares,
//!   and the scaled configs of the native benchmark.
//! * [`driver`]: the engine that ships (`sluice::engine::Worker`) over
//!   `sluice::testing::FakeHost`, one request at a time as Envoy calls it,
//!   for `benches/policy.rs`.
//! * [`crossings`]: the engine's host calls per request, by path, counted
//!   natively (`FakeHost::crossings`), for `sluice-native-crossings`
//!   (`benches/tools`).
//! * [`instrument`]: rewrites a proxy-wasm module so that every ABI
//!   crossing logs itself, for counting host calls per request in
//!   `benches/lifecycle.rs`.
//!
//! Tooling code: a benchmark that cannot do what it was asked fails loudly,
//! so the workspace's no-panic lints (meant for the filter) are relaxed here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod crossings;
pub mod driver;
pub mod instrument;
pub mod workload;
