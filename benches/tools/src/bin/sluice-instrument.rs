//! Writes a copy of a proxy-wasm module whose every host call and callback
//! is logged at trace level first (`hc>name`, `cb<name`), as the wasmtime
//! crossings count uses it; loaded in a real Envoy with
//! `--component-log-level wasm:trace`, its log is the exact sequence of
//! crossings Envoy makes.
//!
//! ```sh
//! cargo run --release -p sluice-bench-tools --bin sluice-instrument -- IN.wasm OUT.wasm
//! ```

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: sluice-instrument IN.wasm OUT.wasm");
        std::process::exit(2);
    };
    let result = std::fs::read(input)
        .map_err(|e| format!("{input}: {e}"))
        .and_then(|wasm| sluice_benches::instrument::instrument(&wasm))
        .and_then(|rewritten| {
            std::fs::write(output, &rewritten.wasm).map_err(|e| format!("{output}: {e}"))
        });
    if let Err(e) = result {
        eprintln!("sluice-instrument: {e}");
        std::process::exit(1);
    }
}
