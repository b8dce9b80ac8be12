//! The config parser: never panics; an accepted config keeps every limit;
//! a refusal is one `path: reason` line (see `src/config_check.rs`).
//!
//! The first byte picks the mode: raw bytes (mutated by libFuzzer from the
//! seed corpus, with `config.dict`), or structured edits of a valid config.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::config_check::{check, mutate, Edit};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Err(violation) = check(rest) {
            panic!("{violation}\ninput: {:?}", String::from_utf8_lossy(rest));
        }
        return;
    }
    let mut u = Unstructured::new(rest);
    let (Ok(seed), Ok(edits)) = (u8::arbitrary(&mut u), Vec::<Edit>::arbitrary(&mut u)) else {
        return;
    };
    let document = mutate(seed, &edits);
    let text = document.to_string();
    if let Err(violation) = check(text.as_bytes()) {
        panic!("{violation}\ninput: {text}");
    }
});
