//! The request lifecycle through the policy core: arbitrary header bytes,
//! status codes, attempt counts, clock steps, config reloads and lost CAS
//! races over several workers sharing one store. Panics (= a crash for
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
