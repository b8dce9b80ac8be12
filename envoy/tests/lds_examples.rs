//! The file-based LDS examples (envoy/examples/sluice-lds-bootstrap.yaml and
//! sluice-lds-listener.yaml) validate with Envoy, through sluice-lds-check
//! (`envoy --mode validate` alone does not read an LDS file), and a broken
//! listener file is caught with Sluice's reason.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first, and
//! Envoy from `scripts/setup.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_envoy::RunDir;

/// Copies of the two examples in `dir`, pointing at the wasm under test and
/// at the copied listener file. Returns the bootstrap's path.
fn copies(dir: &Path, edit_json: impl Fn(&str) -> String) -> PathBuf {
    let root = sluice_envoy::repo_root();
    let wasm = sluice_envoy::require_wasm().unwrap();
    let listener =
        std::fs::read_to_string(root.join("envoy/examples/sluice-lds-listener.yaml")).unwrap();
    let bootstrap =
        std::fs::read_to_string(root.join("envoy/examples/sluice-lds-bootstrap.yaml")).unwrap();
    let listener_path = dir.join("listener.yaml");
    let listener = listener.replace(
        "filename: target/wasm32-wasip1/release/sluice.wasm",
        &format!("filename: {}", wasm.display()),
    );
    assert!(listener.contains(&wasm.display().to_string()));
    std::fs::write(&listener_path, edit_json(&listener)).unwrap();
    let bootstrap = bootstrap.replace(
        "path: envoy/examples/sluice-lds-listener.yaml",
        &format!("path: {}", listener_path.display()),
    );
    assert!(bootstrap.contains(&listener_path.display().to_string()));
    let bootstrap_path = dir.join("bootstrap.yaml");
    std::fs::write(&bootstrap_path, bootstrap).unwrap();
    bootstrap_path
}

fn check(bootstrap: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-lds-check"))
        .arg(bootstrap)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

#[test]
fn the_lds_examples_validate() {
    let dir = RunDir::new("lds-examples").unwrap();
    let bootstrap = copies(dir.path(), str::to_string);
    let (code, out) = check(&bootstrap);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn a_listener_file_sluice_refuses_is_caught_before_the_push() {
    let dir = RunDir::new("lds-examples-bad").unwrap();
    let bootstrap = copies(dir.path(), |l| {
        let bad = l.replace(
            "\"stable\": \"shop_v1\",",
            "\"stable\": \"shop_v1\", \"wieght\": 5,",
        );
        assert_ne!(bad, l);
        bad
    });
    let (code, out) = check(&bootstrap);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("services[0].wieght: unknown key"),
        "the reason is Sluice's: {out}"
    );
}
