//! Sluice's two routing modes in plain Envoy, each run from the example
//! file users copy (only the wasm path and the ports are replaced):
//!
//! * `cluster_header` (`envoy/examples/sluice.yaml`): Sluice writes the
//!   cluster's name, `shop_v1` or `shop_v2`, and one route forwards to the
//!   cluster the header names.
//! * header match (`envoy/examples/sluice-header-match.yaml`): Sluice writes
//!   a value, `v1` or `v2`, and routes matching `x-sluice-cluster` exactly
//!   map each value to a cluster; the default route goes to stable.
//!
//! In both: the sticky split at the example's weight (10 %) and its rules;
//! a client-forged steering header (the canary's value, in any case, twice)
//! never changes the side Sluice chose; a request of a host no service
//! matches arrives at stable with no steering header at all; and the
//! examples' `stats_config` labels the routed counts in `/stats/prometheus`.
//!
//! Both examples ship with `"stable_by_default": true` (their default route
//! is stable): a request Sluice keeps on stable reaches the stable upstream
//! WITHOUT the header, and no upstream ever receives a client's value. Each
//! mode also runs with it turned off, where stable gets Sluice's value.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`.
//!
//! ```sh
//! cargo test -p sluice-envoy --test routing_modes -- --nocapture
//! ```

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Client, Envoy, RecordedRequest, Response, Upstream};

/// One example file running on kernel-picked ports, with its two upstreams.
struct Example {
    stable: Upstream,
    canary: Upstream,
    envoy: Envoy,
}

/// Replaces `from` (which must occur exactly once) with `to`.
fn replace_once(yaml: &str, from: &str, to: &str, file: &str) -> String {
    assert_eq!(
        yaml.matches(from).count(),
        1,
        "{file}: expected {from:?} exactly once"
    );
    yaml.replace(from, to)
}

/// Starts `file` with its wasm path made absolute, its listener and admin
/// ports (`listener`, `admin`) set to 0 (the harness finds them), and the
/// upstream ports 9001 (stable) and 9002 (canary) pointing at real
/// upstreams.
/// `stable_by_default: false` turns off what the example ships with.
fn start_example(file: &str, listener: u16, admin: u16, stable_by_default: bool) -> Example {
    let wasm = sluice_envoy::require_wasm().unwrap_or_else(|m| panic!("{m}"));
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let mut text = std::fs::read_to_string(sluice_envoy::repo_root().join(file)).unwrap();
    if !stable_by_default {
        text = replace_once(
            &text,
            r#""stable_by_default": true,"#,
            r#""stable_by_default": false,"#,
            file,
        );
    }
    let mut yaml = replace_once(
        &text,
        "filename: target/wasm32-wasip1/release/sluice.wasm",
        &format!("filename: {}", wasm.display()),
        file,
    );
    for (from, to) in [
        (listener, 0),
        (admin, 0),
        (9001, stable.port()),
        (9002, canary.port()),
    ] {
        yaml = replace_once(
            &yaml,
            &format!("port_value: {from} }}"),
            &format!("port_value: {to} }}"),
            file,
        );
    }
    let envoy =
        Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    Example {
        stable,
        canary,
        envoy,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Stable,
    Canary,
}

fn side(r: &Response) -> Side {
    assert_eq!(r.status, 200, "{r:?}");
    match r.upstream() {
        Some("stable") => Side::Stable,
        Some("canary") => Side::Canary,
        other => panic!("answered by {other:?}: {r:?}"),
    }
}

/// The steering header values an upstream received.
fn steering(rec: &RecordedRequest) -> Vec<&str> {
    rec.headers
        .iter()
        .filter(|(k, _)| k == "x-sluice-cluster")
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The scenario both modes share. `stable_value` and `canary_value` are
/// what Sluice writes (cluster names in cluster_header mode, route values
/// in header-match mode); with `stable_by_default` it writes nothing for
/// stable, and stable's requests must arrive without the header.
fn check_mode(ex: &Example, stable_value: &str, canary_value: &str, stable_by_default: bool) {
    let mut clients: Vec<Client> = ex.envoy.clients_on_both_workers(2);
    let n = clients.len();
    let users: Vec<String> = (0..400).map(|i| format!("mode-user-{i}")).collect();
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    let mut count = |s: Side| {
        *sent
            .entry(match s {
                Side::Stable => "stable",
                Side::Canary => "canary",
            })
            .or_default() += 1;
    };

    // 1. The sticky split at the example's weight, 10 %.
    let mut sides = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let s = side(
            &clients[i % n]
                .get("shop.local", "/", &[("x-user-id", user.as_str())])
                .unwrap(),
        );
        count(s);
        sides.push(s);
    }
    let canaries = sides.iter().filter(|s| **s == Side::Canary).count();
    let share = 100.0 * canaries as f64 / users.len() as f64;
    eprintln!(
        "canary share at weight 10: {share:.1} % ({canaries} of {})",
        users.len()
    );
    assert!((5.0..=15.0).contains(&share), "canary share {share:.1} %");

    // 2. Forged steering headers: the canary's value, the same in upper
    // case, and twice (canary value then stable's). The side is Sluice's
    // choice for that user every time.
    for (i, user) in users.iter().enumerate() {
        let user = user.as_str();
        let forgeries: [&[(&str, &str)]; 3] = [
            &[("x-user-id", user), ("x-sluice-cluster", canary_value)],
            &[("x-user-id", user), ("X-Sluice-Cluster", canary_value)],
            &[
                ("x-user-id", user),
                ("x-sluice-cluster", canary_value),
                ("x-sluice-cluster", stable_value),
            ],
        ];
        let forged = forgeries[i % 3];
        let s = side(&clients[i % n].get("shop.local", "/", forged).unwrap());
        count(s);
        assert_eq!(s, sides[i], "{forged:?} moved {user}");
    }
    // Forced to stable by a rule, with the canary's value forged.
    for i in 0..20 {
        let s = side(
            &clients[i % n]
                .get(
                    "shop.local",
                    "/",
                    &[("x-canary", "never"), ("x-sluice-cluster", canary_value)],
                )
                .unwrap(),
        );
        count(s);
        assert_eq!(s, Side::Stable);
    }
    // And the rule that chooses the canary does reach it.
    for i in 0..10 {
        let s = side(
            &clients[i % n]
                .get(
                    "shop.local",
                    "/",
                    &[("x-canary", "always"), ("x-sluice-cluster", stable_value)],
                )
                .unwrap(),
        );
        count(s);
        assert_eq!(s, Side::Canary);
    }

    // 3. A host Sluice does not route, with the canary's value forged: the
    // header is removed, the default route (stable) takes it.
    for i in 0..10 {
        let s = side(
            &clients[i % n]
                .get(
                    "elsewhere.local",
                    "/",
                    &[("x-sluice-cluster", canary_value)],
                )
                .unwrap(),
        );
        assert_eq!(s, Side::Stable);
    }

    // What the upstreams received: Sluice's value, once (none for stable
    // with stable_by_default); unmatched requests none; the canary nothing
    // but what Sluice sent there. A client's value never arrives.
    let shop_canary = sent.get("canary").copied().unwrap_or(0);
    let shop_stable = sent.get("stable").copied().unwrap_or(0);
    assert_eq!(ex.canary.requests(), shop_canary);
    for rec in ex.canary.recorded() {
        assert_eq!(steering(&rec), [canary_value], "{rec:?}");
    }
    let stable_expected: &[&str] = if stable_by_default {
        &[]
    } else {
        &[stable_value]
    };
    let mut unmatched = 0;
    for rec in ex.stable.recorded() {
        if rec.header("host") == Some("elsewhere.local") {
            unmatched += 1;
            assert!(
                steering(&rec).is_empty(),
                "unmatched kept a header: {rec:?}"
            );
        } else {
            assert_eq!(steering(&rec), stable_expected, "{rec:?}");
        }
    }
    assert_eq!(unmatched, 10);
    assert_eq!(ex.stable.requests(), shop_stable + 10);

    // 4. The example's stats_config: the counts as labelled series.
    assert_eq!(
        ex.envoy.settled_wasm_metric("sluice.unmatched").unwrap(),
        Some(10)
    );
    let prom = ex.envoy.prometheus().unwrap();
    let shop = ("sluice_service", "shop");
    for (side_name, n) in [("stable", shop_stable), ("canary", shop_canary)] {
        assert_eq!(
            prom.value("sluice_routed", &[shop, ("sluice_side", side_name)]),
            Some(n as f64),
            "sluice_routed{{shop,{side_name}}}"
        );
    }
    assert_eq!(prom.value("sluice_unmatched", &[]), Some(10.0));
    eprintln!(
        "stable {shop_stable}, canary {shop_canary} (+10 unmatched at stable); \
         sluice_routed{{sluice_service=\"shop\",sluice_side=\"canary\"}} {shop_canary}"
    );
}

#[test]
fn cluster_header_mode_example() {
    let ex = start_example("envoy/examples/sluice.yaml", 10000, 9901, true);
    check_mode(&ex, "shop_v1", "shop_v2", true);
}

#[test]
fn header_match_mode_example() {
    let ex = start_example("envoy/examples/sluice-header-match.yaml", 10010, 9921, true);
    check_mode(&ex, "v1", "v2", true);
}

#[test]
fn cluster_header_mode_writing_stable() {
    let ex = start_example("envoy/examples/sluice.yaml", 10000, 9901, false);
    check_mode(&ex, "shop_v1", "shop_v2", false);
}

#[test]
fn header_match_mode_writing_stable() {
    let ex = start_example(
        "envoy/examples/sluice-header-match.yaml",
        10010,
        9921,
        false,
    );
    check_mode(&ex, "v1", "v2", false);
}

/// In header-match mode Sluice's values are not cluster names: a forged
/// header naming the canary's CLUSTER matches no route either.
#[test]
fn header_match_mode_ignores_a_forged_cluster_name() {
    let ex = start_example("envoy/examples/sluice-header-match.yaml", 10010, 9921, true);
    let mut client = ex.envoy.client();
    for host in ["shop.local", "elsewhere.local"] {
        for forged in ["shop_v2", "v2", "V2", " v2"] {
            let r = client
                .get(
                    host,
                    "/",
                    &[("x-canary", "never"), ("x-sluice-cluster", forged)],
                )
                .unwrap();
            assert_eq!(side(&r), Side::Stable, "{host} {forged:?}");
        }
    }
    assert_eq!(ex.canary.requests(), 0);
}
