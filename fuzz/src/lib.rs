//! Support code of Sluice's fuzz targets (see `fuzz_targets/` and the
//! README's "Fuzzing" section).
//!
//! - `lifecycle`: the request lifecycle through the engine (one
//!   `sluice::testing::Vm` per worker over one store), with its invariants;
//!   shared with `filter/tests/properties.rs`.
//! - `decode`: fuzz bytes to a lifecycle scenario.
//! - `config_check`: the config parser's contract, and a structure-aware
//!   mutator of valid configs.
//!
//! `cargo run --release --example corpus_stats -- corpus/lifecycle` (in
//! `fuzz/`, stable is fine) replays a lifecycle corpus natively and sums what
//! it reached: requests, canary routes, retries granted and denied, breaker
//! trips, half-opens and closes, rollbacks, lost CAS races.

pub mod config_check;
pub mod decode;
pub mod lifecycle;
