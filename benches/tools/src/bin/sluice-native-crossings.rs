//! `sluice-native-crossings`: host calls per request, counted natively on the engine that ships, for
//! the common path and the rarer ones: prints the table and writes it to
//! `benches/results/native-crossings.md`.
//!
//! cargo run --release -p sluice-bench-tools --bin sluice-native-crossings
// A tool: it fails loudly.
#![allow(clippy::expect_used)]

use sluice_benches::{crossings, workload};

fn main() {
    let md = crossings::report();
    print!("{md}");
    let path = workload::repo_root().join("benches/results/native-crossings.md");
    std::fs::write(&path, &md).expect("cannot write benches/results/native-crossings.md");
    eprintln!("written to {}", path.display());
}
