//! The OCI image end to end: `scripts/oci-image.sh build` writes the compat
//! Wasm image of sluice.wasm as an OCI layout (checked by skopeo and umoci),
//! `roundtrip` pushes it with skopeo to a Debian `docker-registry` that this
//! test starts on loopback with its storage in a run directory, pulls it back
//! and compares plugin.wasm. This test then reads both layouts itself, as
//! Istio's and Envoy Gateway's fetchers do (`pkg/wasm/imagefetcher.go`: an
//! OCI manifest whose one layer is `application/vnd.oci.image.layer.v1.tar+gzip`,
//! a gzip tar holding `plugin.wasm`), and checks that the digest the registry
//! serves is the one `build` printed: the `sha256` a WasmPlugin or an
//! EnvoyExtensionPolicy pins is the MANIFEST digest for an `oci://` image.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first, and
//! skopeo, umoci and docker-registry (`scripts/setup.sh`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_envoy::RunDir;

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found: run scripts/setup.sh (Debian package '{tool}')"
    );
}

/// Runs `scripts/oci-image.sh ARGS`, asserts success, returns stdout.
fn script(args: &[&str]) -> String {
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(sluice_envoy::repo_root().join("scripts/oci-image.sh"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "oci-image.sh {} ({:.1} s):\n{stdout}{stderr}",
        args.first().unwrap_or(&""),
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.status.success(),
        "oci-image.sh {args:?} failed:\n{stdout}{stderr}"
    );
    stdout
}

/// The value after `oci-image: <key> ` on its line of the script's output.
fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    let prefix = format!("oci-image: {key} ");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{stdout}"))
}

fn json_file(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    (serde_json::from_slice(&bytes).unwrap(), bytes)
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    layout.join("blobs/sha256").join(hex)
}

/// What Istio's and Envoy Gateway's fetchers require of an image, read from
/// an OCI layout: returns (manifest digest, the plugin.wasm bytes).
fn read_compat_image(layout: &Path, tag: &str) -> (String, Vec<u8>) {
    let (layout_file, _) = json_file(&layout.join("oci-layout"));
    assert_eq!(layout_file["imageLayoutVersion"], "1.0.0");
    let (index, _) = json_file(&layout.join("index.json"));
    let entries = index["manifests"].as_array().unwrap();
    let entry = entries
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {index}"));
    let digest = entry["digest"].as_str().unwrap().to_string();

    let (manifest, manifest_bytes) = json_file(&blob(layout, &digest));
    assert_eq!(format!("sha256:{}", hex_sha256(&manifest_bytes)), digest);
    assert_eq!(entry["size"].as_u64().unwrap(), manifest_bytes.len() as u64);
    assert_eq!(manifest["schemaVersion"], 2);
    // Not Docker's schema 2 type: the fetchers then take the OCI path, which
    // wants the OCI gzip layer type below.
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest["annotations"]["module.wasm.image/variant"], "compat",
        "{manifest}"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "the compat variant has exactly one layer");
    let layer = &layers[0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    // Every blob is what its descriptor says.
    for descriptor in [&manifest["config"], layer] {
        let d = descriptor["digest"].as_str().unwrap();
        let bytes = std::fs::read(blob(layout, d)).unwrap();
        assert_eq!(format!("sha256:{}", hex_sha256(&bytes)), d);
        assert_eq!(descriptor["size"].as_u64().unwrap(), bytes.len() as u64);
    }

    // The layer: a gzip tar (gzip magic) whose only member is plugin.wasm,
    // and the config's diff_id is the uncompressed tar's digest.
    let layer_path = blob(layout, layer["digest"].as_str().unwrap());
    let gz = std::fs::read(&layer_path).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "the layer is not gzip");
    let tar = Command::new("gzip")
        .arg("-dc")
        .arg(&layer_path)
        .output()
        .unwrap();
    assert!(tar.status.success());
    let (config, _) = json_file(&blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", hex_sha256(&tar.stdout))])
    );
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(&layer_path)
        .output()
        .unwrap();
    assert!(list.status.success());
    assert_eq!(String::from_utf8_lossy(&list.stdout), "plugin.wasm\n");
    let wasm = Command::new("tar")
        .arg("-xzOf")
        .arg(&layer_path)
        .arg("plugin.wasm")
        .output()
        .unwrap();
    assert!(wasm.status.success());
    assert_eq!(
        &wasm.stdout[..4],
        b"\0asm",
        "plugin.wasm is not a Wasm module"
    );
    (digest, wasm.stdout)
}

/// Debian's docker-registry on 127.0.0.1, storage in `dir`; killed on drop.
struct Registry {
    child: Child,
    addr: String,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        // A port the kernel picks, freed just before the registry binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let mut command = Command::new("docker-registry");
        command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // REGISTRY_* variables would override the file (e.g. the address).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(key);
            }
        }
        let child = command.spawn().unwrap();
        let mut registry = Registry { child, addr };
        registry.wait_ready(dir);
        registry
    }

    /// Waits for `GET /v2/` to answer 200 (the registry's API check).
    fn wait_ready(&mut self, dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                panic!("docker-registry exited ({status}):\n{log}");
            }
            if let Ok(mut stream) = TcpStream::connect(&self.addr) {
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let request = format!(
                    "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                    self.addr
                );
                let mut reply = String::new();
                if stream.write_all(request.as_bytes()).is_ok()
                    && stream.read_to_string(&mut reply).is_ok()
                    && reply.starts_with("HTTP/1.1 200")
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry not ready on {} after 20 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_compat_image_survives_a_registry_round_trip_byte_for_byte() {
    let wasm_path = sluice_envoy::require_wasm().unwrap();
    for tool in ["skopeo", "umoci", "docker-registry"] {
        require_tool(tool);
    }
    let wasm = std::fs::read(&wasm_path).unwrap();
    let wasm_sha = hex_sha256(&wasm);
    let dir = RunDir::new("oci-image").unwrap();
    let layout = dir.path().join("layout");
    let pulled = dir.path().join("pulled");
    let wasm_arg = wasm_path.to_str().unwrap();
    let tag = "test";

    // Build: the script's own checks (skopeo, umoci) ran, and it reports the
    // manifest digest and the sha256 of the plugin.wasm it packed.
    let built = script(&[
        "build",
        "--wasm",
        wasm_arg,
        "--out",
        layout.to_str().unwrap(),
        "--tag",
        tag,
    ]);
    assert_eq!(field(&built, "plugin.wasm"), format!("sha256:{wasm_sha}"));
    let manifest_digest = field(&built, "manifest").to_string();
    let (digest, plugin) = read_compat_image(&layout, tag);
    assert_eq!(digest, manifest_digest);
    assert_eq!(hex_sha256(&plugin), wasm_sha);

    // Reproducible: the same module gives the same manifest digest, so the
    // sha256 to pin can be computed without a registry.
    let again = dir.path().join("again");
    let rebuilt = script(&[
        "build",
        "--wasm",
        wasm_arg,
        "--out",
        again.to_str().unwrap(),
        "--tag",
        tag,
    ]);
    assert_eq!(field(&rebuilt, "manifest"), manifest_digest);

    // Push to a registry on loopback and pull back.
    let registry_dir = dir.path().join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let registry = Registry::start(&registry_dir);
    let round = script(&[
        "roundtrip",
        "--registry",
        &registry.addr,
        "--wasm",
        wasm_arg,
        "--out",
        layout.to_str().unwrap(),
        "--pulled",
        pulled.to_str().unwrap(),
        "--tag",
        tag,
    ]);
    assert!(round.contains("oci-image: roundtrip ok"), "{round}");
    assert_eq!(
        field(&round, "pushed"),
        format!(
            "docker://{}/sluice:{tag} manifest {manifest_digest}",
            registry.addr
        )
    );
    assert_eq!(
        field(&round, "pulled"),
        format!("plugin.wasm sha256:{wasm_sha}")
    );

    // The pulled image, read here: the registry kept the manifest byte for
    // byte (same digest, so the pinned sha256 matches), and its plugin.wasm
    // is the build's.
    let (pulled_digest, pulled_plugin) = read_compat_image(&pulled, tag);
    assert_eq!(pulled_digest, manifest_digest);
    assert_eq!(hex_sha256(&pulled_plugin), wasm_sha);
    assert!(
        pulled_plugin == wasm,
        "pulled plugin.wasm differs from {wasm_arg}"
    );

    // The registry kept its blobs in the run directory, the manifest among
    // them byte for byte.
    let hex = &manifest_digest["sha256:".len()..];
    let stored = registry_dir
        .join("storage/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        std::fs::read(blob(&layout, &manifest_digest)).unwrap(),
        "{}",
        stored.display()
    );
    drop(registry);
}
