//! The workload every benchmark shares: the realistic Sluice config (also
//! used by the Envoy load run), realistic requests, and the scaled configs
//! of the native benchmark.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The realistic config: one service with header/cookie/device rules, a
/// sticky 10 % split, a retry policy with a budget, and breakers.
pub const REALISTIC_CONFIG: &str = include_str!("../config/sluice.json");
/// The realistic config as Sluice was configured before issue 13: the retry
/// policy written in headers on every request (`retry.mode` "headers") and
/// the steering header written for stable too.
pub const HEADERS_CONFIG: &str = include_str!("../config/sluice-headers.json");

/// The host the realistic config matches.
pub const HOST: &str = "shop.local";

/// How many distinct users the workloads cycle through (sticky keys).
pub const USERS: usize = 1000;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => repo_root().join(dir),
        Some(dir) => dir,
        None => repo_root().join("target"),
    }
}

/// `$SLUICE_WASM`, else the release build of `sluice`.
pub fn sluice_wasm() -> PathBuf {
    std::env::var_os("SLUICE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release/sluice.wasm"))
}

/// `$SLUICE_PASSTHROUGH_WASM`, else the release build of
/// `sluice-passthrough`.
pub fn passthrough_wasm() -> PathBuf {
    std::env::var_os("SLUICE_PASSTHROUGH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release/sluice_passthrough.wasm"))
}

/// `$SLUICE_PASSTHROUGH_RAW_WASM`, else the release build of
/// `sluice-passthrough-raw` (the pass-through without the SDK).
pub fn passthrough_raw_wasm() -> PathBuf {
    std::env::var_os("SLUICE_PASSTHROUGH_RAW_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release/sluice_passthrough_raw.wasm"))
}

/// The host-call probe (`benches/hostcall-probe`), for the load benchmark's
/// `sluice-calls` setup.
pub fn probe_wasm() -> PathBuf {
    std::env::var_os("SLUICE_PROBE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("wasm32-wasip1/release/sluice_hostcall_probe.wasm"))
}

/// Reads a wasm file, or says how to build it.
pub fn read_wasm(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "{}: {e}; build the modules first:\n  cargo build --release --target wasm32-wasip1 \
             -p sluice -p sluice-passthrough -p sluice-passthrough-raw \
             -p sluice-hostcall-probe",
            path.display()
        )
    })
}

/// The sticky key of user `n`.
pub fn user(n: usize) -> String {
    format!("user-{n}")
}

/// A browser's request to the realistic service, as the filter sees it
/// after Envoy's HTTP connection manager (`x-request-id`,
/// `x-forwarded-proto` added). `user` is the sticky key.
pub fn request_headers(user: &str) -> Vec<(String, String)> {
    [
        (":authority", HOST),
        (":path", "/api/items?page=2"),
        (":method", "GET"),
        (":scheme", "http"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("cookie", "session=3f2a9c; theme=dark"),
        ("x-user-id", user),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "0f6a9a43-9f32-4c5e-8a36-5d1f1c0e8b7a"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

/// An upstream's answer, as the filter sees it.
pub fn response_headers() -> Vec<(String, String)> {
    [
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "2"),
        ("date", "Sun, 01 Nov 2026 00:00:00 GMT"),
        ("x-envoy-upstream-service-time", "1"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

/// Borrowed view of owned header pairs.
pub fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// The host of service `index` in a scaled config.
pub fn scaled_host(index: usize) -> String {
    format!("svc-{index}.example.com")
}

/// A config with `services` services (exact hosts `svc-<i>.example.com`),
/// each with `rules` header rules that a normal request does not match (so
/// every rule is evaluated), a sticky 10 % split, a retry budget and
/// breakers: the shape of the realistic config, scaled.
pub fn scaled_config(services: usize, rules: usize) -> String {
    let mut out = String::from("{\"services\": [");
    for index in 0..services {
        if index > 0 {
            out.push(',');
        }
        let mut rule_list = String::new();
        for rule in 0..rules {
            if rule > 0 {
                rule_list.push(',');
            }
            let _ = write!(
                rule_list,
                r#"{{"header": "x-rule-{rule}", "equals": "on", "to": "canary"}}"#
            );
        }
        let _ = write!(
            out,
            r#"{{"name": "svc-{index}", "match": {{"authority": "{host}", "path_prefix": "/"}},
               "stable": "svc-{index}-v1", "canary": "svc-{index}-v2", "weight": 10,
               "sticky": {{"header": "x-user-id"}}, "rules": [{rule_list}],
               "retry": {{"max_retries": 2, "per_try_timeout_ms": 1000, "timeout_ms": 5000,
                          "budget": {{"ratio": 0.2, "min_per_s": 10, "window_s": 10}}}},
               "breaker": {{"window_s": 10, "min_requests": 20, "failure_rate": 0.5,
                            "consecutive_failures": 5, "open_ms": 5000}}}}"#,
            host = scaled_host(index),
        );
    }
    out.push_str("]}");
    out
}

/// A request to service `index` of a scaled config.
pub fn scaled_request(index: usize, user: &str) -> Vec<(String, String)> {
    let mut headers = request_headers(user);
    if let Some(authority) = headers.iter_mut().find(|(name, _)| name == ":authority") {
        authority.1 = scaled_host(index);
    }
    headers
}

/// Which filter code a measurement ran: the commit, and whether
/// `filter/src` had uncommitted changes (e.g. `1dc7ab5+filter-changes`).
pub fn filter_revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(repo_root())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--", "filter/src"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit}+uncommitted filter/src changes")
    } else {
        commit
    }
}

/// A short content hash of a file (FNV-1a 64), to tell builds apart.
pub fn file_digest(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in bytes {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            format!("{hash:016x}")
        }
        Err(_) => "missing".into(),
    }
}
