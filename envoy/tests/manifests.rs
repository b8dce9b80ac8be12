//! The control-plane manifests in `envoy/examples/istio/` and
//! `envoy/examples/gateway/` cannot be applied here (no Kubernetes cluster);
//! this test checks what can be checked without one, so that they cannot
//! drift from Sluice:
//!
//! - the Sluice config each embeds (`WasmPlugin.spec.pluginConfig`,
//!   `EnvoyExtensionPolicy.spec.wasm[].config`) passes Sluice's own config
//!   check, `sluice::config::Config::parse`, as the JSON the control plane
//!   hands the filter; Istio's, also with every number made a double, as its
//!   protobuf `Struct` carries them;
//! - the header-match routes (`VirtualService`, `HTTPRoute`) match the
//!   config's `steering_header` with its `canary` value and send it to the
//!   canary, and send everything else to `stable`; the subsets and backends
//!   they name exist; their hosts are the config's `authority`;
//! - the settings Sluice depends on: an `oci://` image with a `sha256`,
//!   `phase` unset, `failStrategy: FAIL_RELOAD`, `failOpen` never true, the
//!   filter on every route of the HTTPRoute;
//! - no unquoted YAML 1.1 boolean word (`yes`, `on`, …), which Kubernetes'
//!   YAML reader would turn into `true` where Sluice wants a string.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde::Deserialize;
use serde_json::Value;
use sluice::config::Config;
use std::path::PathBuf;

struct Doc {
    file: PathBuf,
    value: Value,
}

/// The `.yaml` files in `dir` (relative to the repo), sorted.
fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = sluice_envoy::repo_root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

/// Every YAML document of every `.yaml` file in `dir` (relative to the repo).
fn docs(dir: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in yaml_files(dir) {
        let text = std::fs::read_to_string(&file).unwrap();
        for de in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

fn one<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.value["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found[0]
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value}"))
}

/// Sluice's own check: the embedded config, as the JSON the filter receives.
fn check_config(doc: &Doc, embedded: &Value) -> Config {
    assert!(
        embedded.is_object(),
        "{}: no Sluice config",
        doc.file.display()
    );
    let json = serde_json::to_string(embedded).unwrap();
    Config::parse(json.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "{}: Sluice refuses the embedded config: {e}\n{json}",
            doc.file.display()
        )
    })
}

/// The value as protobuf's `Struct` carries it: every number a double.
fn as_struct(value: &Value) -> Value {
    match value {
        Value::Number(n) => {
            Value::Number(serde_json::Number::from_f64(n.as_f64().unwrap()).unwrap())
        }
        Value::Array(items) => Value::Array(items.iter().map(as_struct).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), as_struct(v))).collect())
        }
        other => other.clone(),
    }
}

/// What a manifest pins an image with: 64 lower-case hex digits (the form
/// both CRDs validate), the image's manifest digest without `sha256:`.
fn assert_sha256_hex(value: &Value, what: &str) {
    let hex = text(value, what);
    assert!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{what}: not 64 lower-case hex digits: {hex}"
    );
}

/// The one service of the config, and the hosts its `match.authority` names.
fn service_and_hosts<'a>(
    config: &'a Config,
    embedded: &Value,
) -> (&'a sluice::config::Service, Vec<String>) {
    assert_eq!(config.services.len(), 1, "the examples steer one service");
    let service = &config.services[0];
    assert!(service.canary.is_some(), "the examples have a canary");
    let authority = &embedded["services"][0]["match"]["authority"];
    let hosts = match authority {
        Value::String(host) => vec![host.clone()],
        Value::Array(hosts) => hosts
            .iter()
            .map(|h| text(h, "authority").to_string())
            .collect(),
        other => panic!("match.authority: {other}"),
    };
    (service, hosts)
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {value}"))
        .iter()
        .map(|v| text(v, what).to_string())
        .collect()
}

#[test]
fn the_istio_manifests_hold_a_config_sluice_accepts_and_route_by_its_values() {
    let docs = docs("envoy/examples/istio");
    let plugin = one(&docs, "WasmPlugin");
    assert_eq!(plugin.value["apiVersion"], "extensions.istio.io/v1alpha1");
    let spec = &plugin.value["spec"];
    assert!(
        text(&spec["url"], "url").starts_with("oci://"),
        "the WasmPlugin loads the OCI image"
    );
    assert_sha256_hex(&spec["sha256"], "WasmPlugin sha256");
    assert!(
        spec.get("phase").is_none(),
        "phase must stay unset: the filter then runs just before the router"
    );
    assert_eq!(spec["failStrategy"], "FAIL_RELOAD");
    assert_eq!(spec["type"], "HTTP");

    // Sluice's config, as written and as Istio's Struct delivers it.
    let embedded = &spec["pluginConfig"];
    let config = check_config(plugin, embedded);
    let doubled = as_struct(embedded);
    let doubled_json = serde_json::to_string(&doubled).unwrap();
    assert!(
        doubled_json.contains("\"weight\":10.0"),
        "the Struct form has doubles: {doubled_json}"
    );
    assert_eq!(check_config(plugin, &doubled), config);
    let (service, hosts) = service_and_hosts(&config, embedded);
    let stable = service.stable.as_str();
    let canary = service.canary.as_deref().unwrap();

    // The subsets Sluice's values name exist.
    let rule = one(&docs, "DestinationRule");
    let host = text(&rule.value["spec"]["host"], "DestinationRule host");
    let subsets: Vec<&str> = rule.value["spec"]["subsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| text(&s["name"], "subset name"))
        .collect();
    assert!(subsets.contains(&stable), "no subset {stable}: {subsets:?}");
    assert!(subsets.contains(&canary), "no subset {canary}: {subsets:?}");

    // The VirtualService: the steering header's canary value to the canary
    // subset, everything else (the last, match-less route) to stable.
    let vs = one(&docs, "VirtualService");
    let vs_spec = &vs.value["spec"];
    let vs_hosts = strings(&vs_spec["hosts"], "VirtualService hosts");
    assert_eq!(
        vs_hosts, hosts,
        "the VirtualService serves the config's authority"
    );
    let routes = vs_spec["http"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{routes:?}");
    let destination = |route: &Value| {
        let dests = route["route"].as_array().unwrap();
        assert_eq!(dests.len(), 1, "one destination per route: {route}");
        assert_eq!(dests[0]["destination"]["host"], host, "{route}");
        text(&dests[0]["destination"]["subset"], "subset").to_string()
    };
    let canary_route = &routes[0];
    let matches = canary_route["match"].as_array().unwrap();
    assert_eq!(matches.len(), 1, "{canary_route}");
    let headers = matches[0]["headers"].as_object().unwrap();
    assert_eq!(headers.len(), 1, "{canary_route}");
    let (name, test) = headers.iter().next().unwrap();
    assert_eq!(name.to_ascii_lowercase(), config.steering_header);
    assert_eq!(
        test["exact"], canary,
        "the header value is the config's canary"
    );
    assert_eq!(destination(canary_route), canary);
    let default_route = &routes[1];
    assert!(
        default_route.get("match").is_none(),
        "the last route is the default: {default_route}"
    );
    assert_eq!(destination(default_route), stable);
    // The default route is stable, so the config need not write it.
    assert!(service.stable_by_default, "stable_by_default is not set");

    // The VirtualService is bound to the gateway whose pods run the filter.
    let gateway = one(&docs, "Gateway");
    assert_eq!(
        strings(&vs_spec["gateways"], "VirtualService gateways"),
        vec![text(&gateway.value["metadata"]["name"], "Gateway name").to_string()]
    );
    assert_eq!(
        &gateway.value["spec"]["selector"], &spec["selector"]["matchLabels"],
        "the WasmPlugin selects the gateway's pods"
    );
}

#[test]
fn the_envoy_gateway_manifests_hold_a_config_sluice_accepts_and_route_by_its_values() {
    let docs = docs("envoy/examples/gateway");
    let policy = one(&docs, "EnvoyExtensionPolicy");
    assert_eq!(policy.value["apiVersion"], "gateway.envoyproxy.io/v1alpha1");
    let spec = &policy.value["spec"];
    let wasm = spec["wasm"].as_array().unwrap();
    assert_eq!(wasm.len(), 1);
    let entry = &wasm[0];
    assert_eq!(entry["code"]["type"], "Image");
    text(&entry["code"]["image"]["url"], "image url");
    assert_sha256_hex(&entry["code"]["image"]["sha256"], "image sha256");
    assert_ne!(
        entry.get("failOpen"),
        Some(&Value::Bool(true)),
        "failOpen would let a client's steering header through"
    );

    let embedded = &entry["config"];
    let config = check_config(policy, embedded);
    let (service, hosts) = service_and_hosts(&config, embedded);
    let stable = service.stable.as_str();
    let canary = service.canary.as_deref().unwrap();

    // The policy covers the whole HTTPRoute (the filter is enabled per route
    // and must run on every route the header can select).
    let route = one(&docs, "HTTPRoute");
    let route_name = text(&route.value["metadata"]["name"], "HTTPRoute name");
    let targets = spec["targetRefs"].as_array().unwrap();
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0]["kind"], "HTTPRoute");
    assert_eq!(targets[0]["name"], route_name);
    assert!(
        targets[0].get("sectionName").is_none(),
        "target the whole HTTPRoute, not one rule"
    );
    assert_eq!(
        policy.value["metadata"]["namespace"],
        route.value["metadata"]["namespace"]
    );

    let route_spec = &route.value["spec"];
    assert_eq!(
        strings(&route_spec["hostnames"], "HTTPRoute hostnames"),
        hosts,
        "the HTTPRoute serves the config's authority"
    );
    let gateway = one(&docs, "Gateway");
    assert_eq!(
        route_spec["parentRefs"][0]["name"],
        gateway.value["metadata"]["name"]
    );
    let backend = |rule: &Value| {
        let refs = rule["backendRefs"].as_array().unwrap();
        assert_eq!(refs.len(), 1, "one backend per rule: {rule}");
        text(&refs[0]["name"], "backend name").to_string()
    };
    let rules = route_spec["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{rules:?}");
    let (matched, default): (Vec<&Value>, Vec<&Value>) =
        rules.iter().partition(|rule| rule.get("matches").is_some());
    assert_eq!((matched.len(), default.len()), (1, 1), "{rules:?}");
    let matches = matched[0]["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 1);
    let headers = matches[0]["headers"].as_array().unwrap();
    assert_eq!(headers.len(), 1);
    let header = &headers[0];
    assert!(
        header.get("type").is_none() || header["type"] == "Exact",
        "{header}"
    );
    assert_eq!(
        text(&header["name"], "header name").to_ascii_lowercase(),
        config.steering_header
    );
    assert_eq!(
        header["value"], canary,
        "the header value is the config's canary"
    );
    assert_eq!(backend(matched[0]), canary);
    assert_eq!(backend(default[0]), stable);
    // The default rule is stable, so the config need not write it (and
    // may not claim so otherwise).
    assert!(service.stable_by_default, "stable_by_default is not set");
}

/// Kubernetes reads manifests as YAML 1.1, where an unquoted `yes`, `no`,
/// `on`, `off`, `y` or `n` is a boolean; serde_norway (YAML 1.2) reads a
/// string. A Sluice rule `equals: yes` would pass the check above and be
/// refused in the cluster, so such words must be quoted.
#[test]
fn no_manifest_has_an_unquoted_yaml_1_1_boolean() {
    const WORDS: [&str; 6] = ["yes", "no", "on", "off", "y", "n"];
    for dir in ["envoy/examples/istio", "envoy/examples/gateway"] {
        for file in yaml_files(dir) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (number, line) in text.lines().enumerate() {
                let code = line.split(" #").next().unwrap_or("");
                if code.trim_start().starts_with('#') {
                    continue;
                }
                // Each scalar after `: `, `- `, `[`, `{` or `,`.
                let scalars = code.split([',', '[', ']', '{', '}']).map(|part| {
                    let part = part.trim();
                    part.rsplit_once(": ")
                        .map(|(_, v)| v)
                        .or_else(|| part.strip_prefix("- "))
                        .unwrap_or(part)
                        .trim()
                });
                for scalar in scalars {
                    assert!(
                        !WORDS.contains(&scalar.to_ascii_lowercase().as_str()),
                        "{}:{}: quote `{scalar}` (YAML 1.1 reads it as a boolean): {line}",
                        file.display(),
                        number + 1
                    );
                }
            }
        }
    }
}

#[test]
fn the_manifests_are_where_the_readme_says() {
    let root = sluice_envoy::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for (dir, files) in [
        (
            "envoy/examples/istio/",
            &[
                "wasmplugin.yaml",
                "destinationrule.yaml",
                "virtualservice.yaml",
                "gateway.yaml",
            ][..],
        ),
        (
            "envoy/examples/gateway/",
            &[
                "envoyextensionpolicy.yaml",
                "httproute.yaml",
                "gateway.yaml",
            ][..],
        ),
    ] {
        assert!(
            readme.contains(&format!("`{dir}`")),
            "README does not name {dir}"
        );
        let mut present: Vec<String> = yaml_files(dir)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        present.sort();
        let mut named: Vec<String> = files.iter().map(|f| f.to_string()).collect();
        named.sort();
        assert_eq!(present, named, "the files in {dir}");
        for file in files {
            assert!(
                readme.contains(&format!("`{file}`")),
                "README does not name {dir}{file}"
            );
        }
    }
}
