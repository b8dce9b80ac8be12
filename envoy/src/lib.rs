//! Test harness for running Sluice inside a real Envoy.
//!
//! * [`upstream`]: a multi-threaded HTTP/1.1 upstream server whose behaviour
//!   (fail, fail a fraction, delay, hang) can be switched at run time and
//!   which records what it received.
//! * [`client`]: a small keep-alive HTTP/1.1 client with timeouts.
//! * [`config`]: [`config::EnvoyConfig`], a builder for an Envoy bootstrap
//!   YAML with Sluice in the HTTP filter chain.
//! * [`grpc`]: real gRPC servers and client (Python grpcio, from
//!   `envoy/grpc/`) and the bootstrap for gRPC (h2c listener, HTTP/2
//!   upstream clusters).
//! * [`ecds`]: Envoy running the ECDS example (Sluice's filter config from
//!   a watched file), and config pushes to it.
//! * [`envoy`]: [`envoy::Envoy`] starts a real Envoy process, waits for it to
//!   be ready, finds its ports, reads its stats and log, and kills it on drop.
//! * [`prometheus`]: parses `/stats/prometheus` and finds the metric and
//!   label names a dashboard's PromQL uses.
//!
//! Everything is std-only apart from `serde_json`.
//!
//! This crate is test harness code: a harness that cannot do what it was
//! asked is a failing test, so panicking (`unwrap`, `expect`, indexing) is
//! allowed here, unlike in the filter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub mod client;
pub mod config;
pub mod ecds;
pub mod envoy;
pub mod grpc;
pub mod lds;
pub mod load;
pub mod prometheus;
pub mod upstream;
mod wire;

use std::path::{Path, PathBuf};

pub use client::{Client, Response};
pub use config::{EnvoyConfig, Fallback};
pub use envoy::{Envoy, EnvoyError, EnvoyOptions};
pub use upstream::{RecordedRequest, Upstream};

/// Seconds since the Unix epoch by this machine's clock (the budget's
/// slots are per wall-clock second); 0 if the clock is before 1970.
pub fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where the release build of the filter is expected:
/// `$SLUICE_WASM` if set, else `<repo>/target/wasm32-wasip1/release/sluice.wasm`
/// (or under `$CARGO_TARGET_DIR` when that is set).
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_WASM") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_relative() {
                repo_root().join(p)
            } else {
                p
            }
        })
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("wasm32-wasip1/release/sluice.wasm")
}

/// [`wasm_path`], checked to exist; the error says how to build it.
pub fn require_wasm() -> Result<PathBuf, String> {
    let p = wasm_path();
    if p.is_file() {
        Ok(p)
    } else {
        Err(missing_wasm_message(&p))
    }
}

pub(crate) fn missing_wasm_message(p: &Path) -> String {
    format!(
        "Sluice wasm not found at {}: build it first with \
         `cargo build --release --target wasm32-wasip1 -p sluice` \
         (or point SLUICE_WASM at a built sluice.wasm)",
        p.display()
    )
}

/// A unique directory for one run's files (config, log), under
/// `<repo>/envoy/.run/` (git-ignored). Removed on drop, unless the thread is
/// panicking (a failing test), in which case it is kept for inspection and
/// its path printed.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    /// Create a fresh directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> std::io::Result<RunDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = std::env::var_os("SLUICE_RUN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".run"));
        std::fs::create_dir_all(&base)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{prefix}-{}-{seq}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(RunDir { path, keep: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keep the directory after drop.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.keep || std::thread::panicking() {
            eprintln!("sluice-envoy: kept run files in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
