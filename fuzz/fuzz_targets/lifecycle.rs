//! The request lifecycle through the engine that ships, one worker per
//! simulated VM over one shared store: arbitrary header bytes, status codes,
//! response flags, attempt counts, clock steps, ticks, config reloads with
//! requests in flight and lost CAS races. Panics (= a crash for
//! libFuzzer) on the first broken invariant; see `src/lifecycle.rs`.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::decode;
use sluice_fuzz::lifecycle::Sim;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(scenario) = decode::scenario(&mut u) else {
        return;
    };
    if let Err(violation) = Sim::run(&scenario) {
        panic!("invariant broken: {violation}");
    }
});
