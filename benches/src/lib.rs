//! Sluice's benchmark support code (see `benches/README.md`):
//!
//! * [`workload`]: the realistic config and requests every benchmark shares,
//!   and the scaled configs of the native benchmark.
//! * [`native`]: the filter glue's per-request sequence, natively (the
//!   policy core without host calls), for `benches/policy.rs`.
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

pub mod instrument;
pub mod native;
pub mod workload;
