//! Sluice's metrics as Prometheus labels, in a real Envoy: the bootstrap
//! carries the `stats_config` of `envoy/examples/sluice-stats-tags.yaml` (the
//! harness includes that file verbatim), traffic goes to a stable and a
//! canary, a canary breaker trips, a rollout runs, and `/stats/prometheus`
//! must show `sluice_routed{sluice_service="shop",sluice_side="canary"}` and
//! the like, with exactly the values `/stats` shows under the flat names.
//! The Grafana dashboard (`envoy/examples/grafana/sluice-dashboard.json`)
//! may query only the metric and label names seen here, and must cover
//! every Sluice metric family.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`.
//!
//! ```sh
//! cargo test -p sluice-envoy --test prometheus -- --nocapture
//! ```

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_envoy::config::STATS_TAGS_YAML;
use sluice_envoy::prometheus::{promql_refs, Exposition};
use sluice_envoy::{Client, Envoy, EnvoyConfig, Response, Upstream};

const DASHBOARD: &str = "envoy/examples/grafana/sluice-dashboard.json";

/// What the one Envoy run saw; shared by the tests of this file.
struct Seen {
    prometheus: Exposition,
    /// `/stats`' `wasmcustom.*` metrics, prefix removed.
    flat: BTreeMap<String, u64>,
    sent: Sent,
}

/// Requests the scenario sent, by kind, and where they ended.
#[derive(Debug, Default)]
struct Sent {
    shop: u64,
    shop_canary_answers: u64,
    always: u64,
    never: u64,
    posts: u64,
    cart: u64,
    unmatched: u64,
}

fn sluice_config() -> Value {
    json!({
        "services": [
            {
                "name": "shop",
                "match": {"authority": "shop.local"},
                "stable": "shop_v1",
                "canary": "shop_v2",
                "weight": 30,
                "sticky": {"header": "x-user-id"},
                "rules": [
                    {"header": "x-canary", "equals": "always", "to": "canary"},
                    {"header": "x-canary", "equals": "never", "to": "stable"}
                ],
                "retry": {"max_retries": 1, "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10}},
                // Trips on 3 failures in a row; stays open for the whole test.
                "breaker": {"consecutive_failures": 3, "min_requests": 1000,
                            "open_ms": 60000, "max_open_ms": 60000}
            },
            {
                "name": "cart",
                "match": {"authority": "cart.local"},
                "stable": "cart_v1",
                "canary": "cart_v2",
                "rollout": {"steps": [25, 50, 100], "step_s": 3600,
                            "max_failure_rate": 0.5, "min_requests": 1000}
            }
        ]
    })
}

fn get(client: &mut Client, host: &str, headers: &[(&str, &str)]) -> Response {
    let r = client
        .get(host, "/", headers)
        .unwrap_or_else(|e| panic!("GET {host} {headers:?}: {e}"));
    assert!(
        r.upstream().is_some() || r.status == 503,
        "no upstream answered {host} {headers:?}: {r:?}"
    );
    r
}

fn run_scenario() -> Seen {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let config = EnvoyConfig::from_json(&sluice_config())
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary)
        .upstream("cart_v1", &stable)
        .upstream("cart_v2", &canary);
    let envoy = Envoy::start(&config).unwrap_or_else(|e| panic!("{e}"));
    let mut clients = envoy.clients_on_both_workers(2);
    let n = clients.len();
    let mut sent = Sent::default();

    // 1. The sticky split at weight 30, over both workers.
    for i in 0..200 {
        let user = format!("user-{i}");
        let client = &mut clients[i % n];
        let r = get(client, "shop.local", &[("x-user-id", user.as_str())]);
        assert_eq!(r.status, 200, "{r:?}");
        sent.shop += 1;
        if r.upstream() == Some("canary") {
            sent.shop_canary_answers += 1;
        }
    }
    assert!(
        (30..=90).contains(&sent.shop_canary_answers),
        "canary answered {} of 200 at weight 30",
        sent.shop_canary_answers
    );

    // 2. The canary fails: requests forced there (rule 0) fail, are retried
    // once, and the canary's breaker opens after 3 failures in a row; then
    // its requests go to stable.
    canary.set_fail_all(true);
    let mut diverted = false;
    for _ in 0..20 {
        let r = get(&mut clients[0], "shop.local", &[("x-canary", "always")]);
        sent.shop += 1;
        sent.always += 1;
        if r.upstream() == Some("stable") {
            diverted = true;
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
    }
    assert!(diverted, "the canary's breaker never opened");
    // The other worker may trust its cached "closed" verdict for up to
    // 100 ms (README: a breaker another worker opened is seen within it).
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..4 {
        let r = get(&mut clients[1], "shop.local", &[("x-canary", "always")]);
        assert_eq!(r.upstream(), Some("stable"), "{r:?}");
        sent.shop += 1;
        sent.always += 1;
    }
    canary.set_fail_all(false);

    // 3. POSTs (rule 1, to stable): not idempotent, so their retry
    // conditions are narrowed (retry.withheld_unsafe).
    for _ in 0..5 {
        let r = clients[0]
            .request("POST", "shop.local", "/", &[("x-canary", "never")], b"{}")
            .unwrap();
        assert_eq!(r.upstream(), Some("stable"), "{r:?}");
        sent.shop += 1;
        sent.never += 1;
        sent.posts += 1;
    }

    // 4. The second service, whose rollout is at its first step (25 %).
    for i in 0..20 {
        let r = get(&mut clients[i % n], "cart.local", &[]);
        assert_eq!(r.status, 200, "{r:?}");
        sent.cart += 1;
    }

    // 5. A host no service matches.
    for _ in 0..3 {
        let r = get(&mut clients[1], "elsewhere.local", &[]);
        assert_eq!(r.upstream(), Some("stable"), "{r:?}");
        sent.unmatched += 1;
    }

    // Every worker ticks (counters reach Envoy, gauges are refreshed); then
    // read both pages.
    envoy.await_sluice_tick();
    std::thread::sleep(Duration::from_millis(300));
    let prometheus = envoy.prometheus().unwrap();
    let flat = envoy.wasm_metrics().unwrap();
    Seen {
        prometheus,
        flat,
        sent,
    }
}

fn seen() -> &'static Seen {
    static SEEN: OnceLock<Seen> = OnceLock::new();
    SEEN.get_or_init(run_scenario)
}

/// The labelled series a flat Sluice metric name must become under the
/// shipped tag extractors: written out by hand from the README's metric
/// table, independently of the regexes.
fn expected_series(flat: &str) -> (String, BTreeMap<String, String>) {
    let parts: Vec<&str> = flat.split('.').collect();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    match parts.as_slice() {
        ["sluice", "unmatched"] => ("sluice_unmatched".into(), BTreeMap::new()),
        ["sluice", service, "routed", side] => (
            "sluice_routed".into(),
            labels(&[("sluice_service", *service), ("sluice_side", *side)]),
        ),
        ["sluice", service, "rule", index, "matched"] => (
            "sluice_rule_matched".into(),
            labels(&[("sluice_service", *service), ("sluice_rule", *index)]),
        ),
        ["sluice", service, "breaker", side, metric] => (
            format!("sluice_breaker_{metric}"),
            labels(&[("sluice_service", *service), ("sluice_side", *side)]),
        ),
        ["sluice", service, family @ ("retry" | "rollout"), metric] => (
            format!("sluice_{family}_{metric}"),
            labels(&[("sluice_service", *service)]),
        ),
        _ => panic!("a Sluice metric the README does not list: {flat}"),
    }
}

fn value(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> f64 {
    seen.prometheus.value(name, labels).unwrap_or_else(|| {
        panic!(
            "no {name}{labels:?} in /stats/prometheus; its sluice_ series: {:#?}",
            sluice_samples(seen)
        )
    })
}

fn sluice_samples(seen: &Seen) -> Vec<String> {
    seen.prometheus
        .samples
        .iter()
        .filter(|s| s.name.starts_with("sluice_"))
        .map(|s| {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            format!("{}{{{}}} {}", s.name, labels.join(","), s.value)
        })
        .collect()
}

#[test]
fn prometheus_shows_sluice_metrics_as_labels() {
    let seen = seen();
    let sent = &seen.sent;
    eprintln!("sent: {sent:?}");
    eprintln!("/stats/prometheus, Sluice's series:");
    for line in sluice_samples(seen) {
        eprintln!("  {line}");
    }

    // Every flat metric is one labelled series with the same value (the
    // retry budget's gauge moves with the clock: present is enough).
    let flat: BTreeMap<&String, &u64> = seen
        .flat
        .iter()
        .filter(|(k, _)| k.starts_with("sluice."))
        .collect();
    assert!(flat.len() >= 20, "Sluice's metrics in /stats: {flat:?}");
    let mut expected = BTreeSet::new();
    for (name, v) in &flat {
        let (prom_name, labels) = expected_series(name);
        let sample = seen
            .prometheus
            .family(&prom_name)
            .find(|s| s.labels == labels)
            .unwrap_or_else(|| {
                panic!(
                    "{name} is not {prom_name}{labels:?} in /stats/prometheus: {:#?}",
                    sluice_samples(seen)
                )
            });
        if !name.ends_with(".retry.budget_level") {
            assert_eq!(sample.value, **v as f64, "{name} vs {prom_name}{labels:?}");
        }
        expected.insert((prom_name, labels));
    }
    // And nothing else: no per-service name survived untagged.
    for s in seen.prometheus.samples.iter() {
        if s.name.starts_with("sluice_") {
            assert!(
                expected.contains(&(s.name.clone(), s.labels.clone())),
                "an unexpected series: {} {:?}",
                s.name,
                s.labels
            );
        }
    }
    for (family, kind) in [
        ("sluice_routed", "counter"),
        ("sluice_rule_matched", "counter"),
        ("sluice_unmatched", "counter"),
        ("sluice_breaker_state", "gauge"),
        ("sluice_breaker_trips", "counter"),
        ("sluice_retry_budget_level", "gauge"),
        ("sluice_rollout_weight_bp", "gauge"),
    ] {
        assert_eq!(
            seen.prometheus.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}"
        );
    }

    // What the traffic did, read from the labelled series.
    let shop = ("sluice_service", "shop");
    let cart = ("sluice_service", "cart");
    let stable = ("sluice_side", "stable");
    let canary = ("sluice_side", "canary");
    let routed_canary = value(seen, "sluice_routed", &[shop, canary]);
    let routed_stable = value(seen, "sluice_routed", &[shop, stable]);
    assert_eq!(routed_canary + routed_stable, sent.shop as f64);
    // The split's canary answers, plus the forced requests before the trip.
    assert!(routed_canary > sent.shop_canary_answers as f64);
    assert_eq!(
        value(seen, "sluice_rule_matched", &[shop, ("sluice_rule", "0")]),
        sent.always as f64
    );
    assert_eq!(
        value(seen, "sluice_rule_matched", &[shop, ("sluice_rule", "1")]),
        sent.never as f64
    );
    assert_eq!(value(seen, "sluice_breaker_state", &[shop, canary]), 1.0);
    assert_eq!(value(seen, "sluice_breaker_state", &[shop, stable]), 0.0);
    assert_eq!(value(seen, "sluice_breaker_trips", &[shop, canary]), 1.0);
    assert_eq!(value(seen, "sluice_breaker_trips", &[shop, stable]), 0.0);
    assert!(value(seen, "sluice_breaker_rejected", &[shop, canary]) >= 5.0);
    assert!(value(seen, "sluice_retry_granted", &[shop]) >= 1.0);
    assert_eq!(
        value(seen, "sluice_retry_withheld_unsafe", &[shop]),
        sent.posts as f64
    );
    value(seen, "sluice_retry_denied", &[shop]);
    value(seen, "sluice_retry_deadline_cut", &[shop]);
    assert!(value(seen, "sluice_retry_budget_level", &[shop]) > 0.0);
    assert_eq!(
        value(seen, "sluice_routed", &[cart, stable])
            + value(seen, "sluice_routed", &[cart, canary]),
        sent.cart as f64
    );
    assert_eq!(value(seen, "sluice_rollout_weight_bp", &[cart]), 2500.0);
    assert_eq!(value(seen, "sluice_rollout_state", &[cart]), 0.0);
    assert_eq!(value(seen, "sluice_rollout_rollbacks", &[cart]), 0.0);
    assert_eq!(value(seen, "sluice_unmatched", &[]), sent.unmatched as f64);
    // The service without a breaker or retry block has no such series.
    assert!(seen
        .prometheus
        .family("sluice_breaker_state")
        .all(|s| s.label("sluice_service") == Some("shop")));
}

/// Every PromQL expression of the dashboard (panel targets, nested rows
/// included), with the panel's title.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!("panel {title:?}: a target without a PromQL expr: {target}")
                });
                out.push((title.clone(), expr.to_string()));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn load_dashboard() -> Value {
    let path = sluice_envoy::repo_root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `label_values(metric, label)` of a Grafana query variable.
fn label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (metric, label) = inner.split_once(',')?;
    Some((metric.trim().to_string(), label.trim().to_string()))
}

#[test]
fn the_dashboard_queries_only_series_envoy_exports() {
    let seen = seen();
    let dashboard = load_dashboard();
    let exported = seen.prometheus.names();
    let labels_of = |metric: &str| -> BTreeSet<String> {
        seen.prometheus
            .family(metric)
            .flat_map(|s| s.labels.keys().cloned())
            .collect()
    };
    let mut queried = BTreeSet::new();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, expr) in &queries {
        let refs = promql_refs(expr);
        assert!(
            !refs.metrics.is_empty(),
            "panel {title:?} queries no metric: {expr}"
        );
        let mut labels = BTreeSet::new();
        for metric in &refs.metrics {
            assert!(
                exported.contains(metric),
                "panel {title:?} queries {metric}, which Envoy does not export: {expr}"
            );
            labels.extend(labels_of(metric));
            queried.insert(metric.clone());
        }
        for label in &refs.labels {
            assert!(
                labels.contains(label),
                "panel {title:?} uses label {label}, which {:?} do not carry ({labels:?}): {expr}",
                refs.metrics
            );
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or("");
        if var["type"] == "query" {
            let (metric, label) = label_values(query)
                .unwrap_or_else(|| panic!("variable query not label_values(m, l): {query}"));
            assert!(exported.contains(&metric), "{query}");
            assert!(labels_of(&metric).contains(&label), "{query}");
        }
    }
    // And the dashboard shows every Sluice metric family Envoy exports.
    let families: BTreeSet<String> = exported
        .iter()
        .filter(|n| n.starts_with("sluice_"))
        .cloned()
        .collect();
    let missing: Vec<&String> = families.difference(&queried).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
    eprintln!(
        "dashboard: {} queries over {} metric families, all exported: {queried:?}",
        queries.len(),
        queried.len()
    );
}

#[test]
fn the_dashboard_is_well_formed() {
    let dashboard = load_dashboard();
    assert_eq!(dashboard["uid"], "sluice");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "service"]);
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {panel}"
        );
        let pos = &panel["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{panel}"
        );
        if panel["type"] == "row" {
            continue;
        }
        titles.push(panel["title"].as_str().unwrap().to_string());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{t}");
            assert!(t["expr"].as_str().unwrap().contains("sluice_"), "{t}");
        }
    }
    // The panels the issue asks for.
    for want in [
        "Requests routed, by side",
        "Canary share",
        "Breaker state",
        "Retry budget level",
        "Rollout weight",
        "Retries withheld and cut",
        "Retries granted and denied",
    ] {
        assert!(
            titles.iter().any(|t| t == want),
            "no panel {want:?}: {titles:?}"
        );
    }
}

/// The non-comment lines of the top-level `stats_config:` block of a YAML
/// file.
fn stats_config_block(yaml: &str) -> Vec<String> {
    let mut lines = yaml.lines().skip_while(|l| *l != "stats_config:");
    let mut out = Vec::new();
    if let Some(first) = lines.next() {
        out.push(first.to_string());
    }
    for l in lines {
        if l.trim().is_empty() || l.trim_start().starts_with('#') {
            continue;
        }
        if !l.starts_with(' ') && !l.starts_with('-') {
            break;
        }
        out.push(l.trim_end().to_string());
    }
    out
}

#[test]
fn the_example_bootstraps_carry_the_stats_tags_snippet() {
    let snippet = stats_config_block(STATS_TAGS_YAML);
    assert!(snippet.len() >= 7, "{snippet:?}");
    let root = sluice_envoy::repo_root();
    for example in [
        "envoy/examples/sluice.yaml",
        "envoy/examples/sluice-header-match.yaml",
        "envoy/examples/sluice-lds-bootstrap.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(example)).unwrap();
        assert_eq!(
            stats_config_block(&text),
            snippet,
            "{example}: its stats_config differs from envoy/examples/sluice-stats-tags.yaml"
        );
    }
}

#[test]
fn envoy_accepts_the_snippet_on_its_own() {
    let (status, out) = Envoy::validate_yaml(STATS_TAGS_YAML, None).unwrap();
    assert!(status.success(), "{out}");
}

/// The comparison: without the `stats_config`, Envoy's Prometheus page has
/// one metric name per service and side.
#[test]
fn without_the_tags_each_service_and_side_is_its_own_metric_name() {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let config = EnvoyConfig::from_json(&sluice_config())
        .stats_tags(false)
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary)
        .upstream("cart_v1", &stable)
        .upstream("cart_v2", &canary);
    let envoy = Envoy::start(&config).unwrap_or_else(|e| panic!("{e}"));
    let mut client = envoy.client();
    let r = get(&mut client, "shop.local", &[("x-canary", "always")]);
    assert_eq!(r.upstream(), Some("canary"), "{r:?}");
    envoy.await_sluice_tick();
    let prometheus = envoy.prometheus().unwrap();
    assert_eq!(
        prometheus.value("sluice_shop_routed_canary", &[]),
        Some(1.0)
    );
    assert_eq!(
        prometheus.value("sluice_shop_breaker_canary_state", &[]),
        Some(0.0)
    );
    assert_eq!(prometheus.family("sluice_routed").count(), 0);
}
