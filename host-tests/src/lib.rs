//! A stateful fake of Envoy's Proxy-Wasm host (ABI 0.2.1), on wasmtime.
//!
//! It loads the real `sluice.wasm` and behaves as Envoy 1.40 does (semantics
//! taken from proxy-wasm-cpp-host and `source/extensions/common/wasm/` in
//! Envoy; see README.md). It is not a mock: it keeps header maps,
//! properties, shared data, metrics, logs and a virtual clock, and tests
//! assert on that end state.
//!
//! ```no_run
//! use sluice_host::{Action, Proxy};
//! let proxy = Proxy::builder(sluice_host::sluice_wasm_path())
//!     .plugin_config(r#"{"routes": []}"#)
//!     .build()
//!     .unwrap();
//! let vm = proxy.start_vm().unwrap();
//! let s = vm.stream();
//! assert_eq!(s.request_headers(&[(":path", "/"), (":authority", "a")], true), Action::Continue);
//! s.response_headers(&[(":status", "200")], true);
//! s.finish();
//! println!("{:?} {:?}", proxy.metrics(), proxy.logs());
//! ```
//!
//! # Panics
//!
//! A panicking host is how a test fails: by default a trap in the plugin
//! panics with the trap message, the wasm backtrace and the plugin's last log
//! lines (see [`TrapPolicy`]), and misuse of the fake (e.g. sending response
//! headers for a request the plugin answered locally) panics with an
//! explanation.

// The fake host reports plugin traps and test misuse by panicking, on purpose
// (see "Panics" above); everything else follows the workspace lints.
#![allow(clippy::panic)]

mod abi;
mod engine;
mod headers;
mod imports;
mod property;
mod proxy;
mod stream;
mod vm;

pub use abi::{
    deserialize_pairs, serialize_pairs, Action, BufferType, LogLevel, MapType, MetricType, Status,
    StreamType,
};
pub use engine::AbiVersion;
pub use headers::{HeaderMap, HeaderMapKind};
pub use property::PropertyValue;
pub use proxy::{
    HttpCall, LogEntry, LogSource, Metric, Proxy, ProxyBuilder, TrapPolicy, DEFAULT_START_UNIX_SECS,
};
pub use stream::{LocalReply, Stream};
pub use vm::{StartError, TrapInfo, Vm};

use std::path::PathBuf;

/// Where the tests find `sluice.wasm`: `$SLUICE_WASM` if set, else
/// `<workspace>/target/wasm32-wasip1/release/sluice.wasm`.
pub fn sluice_wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_WASM") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("wasm32-wasip1")
        .join("release")
        .join("sluice.wasm")
}

/// [`sluice_wasm_path`], panicking with the build command if the file is missing.
pub fn require_sluice_wasm() -> PathBuf {
    let path = sluice_wasm_path();
    if !path.is_file() {
        panic!(
            "{} does not exist: build it with \
             `cargo build --release --target wasm32-wasip1 -p sluice` \
             (or point SLUICE_WASM at a build)",
            path.display()
        );
    }
    path
}

/// Worker VMs, their streams and the proxy move to other threads, as
/// Envoy's workers run on their own threads.
#[allow(dead_code)]
fn _assert_send() {
    fn send<T: Send + Sync>() {}
    send::<Proxy>();
    send::<Vm>();
    send::<Stream>();
}
