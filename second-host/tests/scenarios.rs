//! Sluice's routing, sticky split and forged-header scenarios on
//! proxy-wasm-host, a proxy-wasm host nobody on this project wrote. End
//! state only: the headers the router would see, local replies, metrics,
//! logs. README.md lists where this host differs from Envoy and from the
//! wasmtime fake in `host-tests/`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_second_host::{Action, Failure, Request, SecondHost, Serve, Worker};
use std::time::Duration;

const SHOP: &str = r#"{
  "services": [{
    "name": "shop",
    "match": {"authority": "shop.local", "path_prefix": "/"},
    "stable": "shop_v1", "canary": "shop_v2", "weight": 30,
    "sticky": {"header": "x-user"},
    "rules": [
      {"header": "x-canary", "equals": "always", "to": "canary"},
      {"header": "x-canary", "equals": "never", "to": "stable"}
    ]
  }]
}"#;

/// A host and two worker VMs sharing its store, as `--concurrency 2`.
fn two_workers(config: &str) -> (SecondHost, Worker, Worker) {
    let host = SecondHost::new().unwrap_or_else(|err| panic!("{err}"));
    let first = host.worker(config).unwrap_or_else(|err| panic!("{err}"));
    let second = host.worker(config).unwrap_or_else(|err| panic!("{err}"));
    (host, first, second)
}

/// Sends one request; fails the test if the VM trapped or stopped it.
fn steer(worker: &mut Worker, extra: &[(&str, &str)]) -> Option<String> {
    let exchange = worker.send(extra).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(exchange.action, Action::Continue);
    assert!(!worker.is_poisoned());
    exchange.steered()
}

fn tick(workers: &mut [&mut Worker]) {
    for worker in workers {
        assert!(worker.tick().unwrap(), "Sluice asked for no tick");
    }
}

#[test]
fn a_matched_request_gets_the_configured_cluster() {
    let (host, mut a, mut b) = two_workers(SHOP);
    assert!(host.logs.contains(
        "sluice: config applied: 1 services via header x-sluice-cluster: shop (stable=shop_v1 canary=shop_v2 weight=30%, 2 rules)"
    ));
    for user in 0..50 {
        let id = format!("u{user}");
        let worker = if user % 2 == 0 { &mut a } else { &mut b };
        assert_eq!(
            steer(worker, &[("x-canary", "always"), ("x-user", &id)]).as_deref(),
            Some("shop_v2")
        );
        assert_eq!(
            steer(worker, &[("x-canary", "never"), ("x-user", &id)]).as_deref(),
            Some("shop_v1")
        );
    }
    // Counters are held in the VM and reach the host on the tick.
    assert_eq!(a.tick_period(), Some(Duration::from_millis(250)));
    assert_eq!(host.shared.metric("sluice.shop.routed.canary"), Some(0));
    tick(&mut [&mut a, &mut b]);
    assert_eq!(host.shared.metric("sluice.shop.routed.canary"), Some(50));
    assert_eq!(host.shared.metric("sluice.shop.routed.stable"), Some(50));
    assert_eq!(host.shared.metric("sluice.shop.rule.0.matched"), Some(50));
    assert_eq!(host.shared.metric("sluice.shop.rule.1.matched"), Some(50));
}

#[test]
fn a_forged_steering_header_is_overwritten_when_matched_and_removed_when_not() {
    let (host, mut a, mut b) = two_workers(SHOP);
    // Matched: the forged value is replaced by a configured cluster.
    let matched = a
        .send(&[
            ("x-sluice-cluster", "admin_secret"),
            ("x-sluice-cluster", "shop_v2"),
            ("x-canary", "never"),
        ])
        .unwrap();
    assert_eq!(matched.action, Action::Continue);
    assert_eq!(
        matched.request.request_header_values("x-sluice-cluster"),
        ["shop_v1"]
    );
    // Unmatched host: every forged value is removed and nothing is written.
    let unmatched = b
        .exchange(
            Request::new(&[
                (":method", "GET"),
                (":authority", "other.local"),
                (":path", "/"),
                ("x-sluice-cluster", "admin_secret"),
                ("x-sluice-cluster", "shop_v2"),
            ]),
            "200",
        )
        .unwrap();
    assert_eq!(unmatched.action, Action::Continue);
    assert_eq!(
        unmatched.request.request_header_values("x-sluice-cluster"),
        Vec::<String>::new()
    );
    assert_eq!(
        unmatched.request.request_header(":authority").as_deref(),
        Some("other.local")
    );
    tick(&mut [&mut a, &mut b]);
    assert_eq!(host.shared.metric("sluice.unmatched"), Some(1));
}

#[test]
fn a_sticky_split_keeps_each_user_on_one_side_and_about_30_percent_on_canary() {
    let (host, mut a, mut b) = two_workers(SHOP);
    let users: u32 = 2_000;
    let mut canary = 0;
    for user in 0..users {
        let id = format!("user-{user}");
        let first = steer(&mut a, &[("x-user", &id)]).unwrap();
        let second = steer(&mut b, &[("x-user", &id)]).unwrap();
        let again = steer(&mut a, &[("x-user", &id)]).unwrap();
        assert_eq!(first, second, "{id} changed sides between workers");
        assert_eq!(first, again, "{id} changed sides on one worker");
        assert!(first == "shop_v1" || first == "shop_v2", "{first}");
        if first == "shop_v2" {
            canary += 1;
        }
    }
    let share = f64::from(canary) / f64::from(users);
    eprintln!("sticky split on proxy-wasm-host: {canary} of {users} users on canary ({share:.3})");
    assert!((0.27..=0.33).contains(&share), "canary share {share}");
    tick(&mut [&mut a, &mut b]);
    let routed = host.shared.metric("sluice.shop.routed.canary").unwrap()
        + host.shared.metric("sluice.shop.routed.stable").unwrap();
    assert_eq!(routed, 3 * u64::from(users));
}

#[test]
fn without_a_sticky_key_the_split_is_random_at_the_weight() {
    // No x-user: the bucket comes from WASI random_get (the OS's getrandom
    // on this host).
    let (_host, mut a, mut b) = two_workers(SHOP);
    let requests = 2_000;
    let mut canary = 0;
    for request in 0..requests {
        let worker = if request % 2 == 0 { &mut a } else { &mut b };
        if steer(worker, &[]).as_deref() == Some("shop_v2") {
            canary += 1;
        }
    }
    let share = f64::from(canary) / f64::from(requests);
    // 30 % ± 5 points: 4.9 standard deviations of 2,000 coin flips.
    assert!((0.25..=0.35).contains(&share), "canary share {share}");
}

#[test]
fn an_invalid_config_is_refused_at_configure() {
    let host = SecondHost::new().unwrap();
    for (config, expected) in [
        ("{", "sluice: config refused: invalid JSON"),
        ("", "sluice: config refused: invalid JSON"),
        (
            r#"{"services": []}"#,
            "sluice: config refused: services: must list at least one service",
        ),
        (
            &*SHOP.replace(r#""weight": 30"#, r#""weight": 150"#),
            "sluice: config refused: services[0].weight: must be between 0 and 100, got 150",
        ),
        (
            r#"{"services": [{"name": "a", "stable": "v1", "wieght": 5}]}"#,
            "sluice: config refused: services[0].wieght: unknown key",
        ),
    ] {
        match host.worker(config) {
            Err(Failure::Refused { callback, .. }) => {
                assert_eq!(callback.export_name(), "proxy_on_configure");
                assert!(
                    host.logs.contains(expected),
                    "{config}: {:?}",
                    host.logs.lines()
                );
            }
            Err(err) => panic!("{config}: refused the wrong way: {err}"),
            Ok(_) => panic!("{config} was accepted"),
        }
    }
    // A valid config still starts on the same host.
    assert!(host.worker(SHOP).is_ok());
}

#[test]
fn a_breaker_refusal_is_a_local_reply_and_degrades_without_one() {
    let config = r#"{"services": [{
        "name": "shop", "match": {"authority": "shop.local"}, "stable": "shop_v1",
        "breaker": {"consecutive_failures": 2, "open_ms": 60000}
    }]}"#;
    let (_host, mut a, mut b) = two_workers(config);
    // Two upstream 503s through worker a open the stable breaker in the
    // shared store ...
    for _ in 0..2 {
        let exchange = a
            .exchange(
                Request::new(&[(":authority", "shop.local"), (":path", "/")]),
                "503",
            )
            .unwrap();
        assert_eq!(exchange.steered().as_deref(), Some("shop_v1"));
    }
    // ... which worker b reads: it answers locally, the request stops.
    let refused = b.send(&[]).unwrap();
    assert_eq!(refused.action, Action::Pause);
    let reply = refused.request.local_reply.as_ref().expect("a local reply");
    assert_eq!(reply.status_code, 503);
    assert_eq!(reply.header(b"x-sluice-breaker"), Some(&b"open"[..]));
    assert!(reply.header(b"retry-after").is_some());
    assert_eq!(refused.steered(), None);
    // A host that does not serve proxy_send_local_response answers
    // UNIMPLEMENTED: Sluice still stops the request and does not trap (the
    // embedder must then answer it itself).
    let mut request = Request::new(&[(":authority", "shop.local"), (":path", "/")]);
    request.serve.local_response = false;
    let unanswered = b.exchange(request, "200").unwrap();
    assert_eq!(unanswered.action, Action::Pause);
    assert!(unanswered.request.local_reply.is_none());
    assert!(!b.is_poisoned());
    assert!(b.tick().unwrap());
}

#[test]
fn without_header_maps_sluice_continues_and_never_traps() {
    let (_host, mut a, _b) = two_workers(SHOP);
    let mut request = Request::new(&[
        (":authority", "shop.local"),
        (":path", "/"),
        ("x-sluice-cluster", "admin_secret"),
    ]);
    request.serve = Serve {
        header_maps: false,
        local_response: true,
    };
    let exchange = a.exchange(request, "200").unwrap();
    // Every header call answered BAD_ARGUMENT: Sluice saw no request, so it
    // routed nothing and could remove nothing (the forged header stays: a
    // host must serve the request map for Sluice to protect it).
    assert_eq!(exchange.action, Action::Continue);
    assert!(!a.is_poisoned());
    assert_eq!(exchange.steered().as_deref(), Some("admin_secret"));
    // The same VM serves the next request normally.
    assert_eq!(
        steer(&mut a, &[("x-canary", "always")]).as_deref(),
        Some("shop_v2")
    );
}

#[test]
fn header_names_are_compared_as_bytes_so_the_embedder_must_lower_case_them() {
    // VecHeaderMap compares names byte for byte; Envoy lower-cases every
    // name before a filter sees it. Given a map with a mixed-case forged
    // header, Sluice (which looks for the lower-case name, as Envoy stores
    // it) neither sees nor removes it: it adds its own lower-case header.
    let (_host, mut a, _b) = two_workers(SHOP);
    let pairs = [
        (":authority", "shop.local"),
        (":path", "/"),
        ("X-Sluice-Cluster", "admin_secret"),
        ("x-canary", "never"),
    ]
    .iter()
    .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
    .collect();
    let exchange = a.exchange(Request::from_pairs(pairs), "200").unwrap();
    assert_eq!(
        exchange.request.request_header_values("x-sluice-cluster"),
        ["shop_v1"]
    );
    assert_eq!(
        exchange.request.request_header_values("X-Sluice-Cluster"),
        ["admin_secret"]
    );
    // Lower-cased as a codec gives them (Request::new), the forged header
    // is overwritten.
    let lowered = a
        .send(&[("X-Sluice-Cluster", "admin_secret"), ("x-canary", "never")])
        .unwrap();
    assert_eq!(
        lowered.request.request_header_values("x-sluice-cluster"),
        ["shop_v1"]
    );
}

#[test]
fn what_sluice_asks_of_this_host_besides_headers() {
    // Properties and foreign functions are not served by this embedding
    // (the crate's default: NOT_FOUND); the outcome of a request is then
    // judged from the :status response header alone.
    let config = r#"{"services": [{
        "name": "shop", "match": {"authority": "shop.local"}, "stable": "shop_v1",
        "breaker": {"consecutive_failures": 5}
    }]}"#;
    let (host, mut a, _b) = two_workers(config);
    let exchange = a.send(&[]).unwrap();
    assert_eq!(exchange.steered().as_deref(), Some("shop_v1"));
    eprintln!(
        "properties asked: {:?}; foreign functions called: {:?}",
        exchange.request.properties_asked, exchange.request.foreign_calls
    );
    for path in &exchange.request.properties_asked {
        assert!(
            [
                "response.code",
                "response.flags",
                "response.grpc_status",
                "upstream.request_attempt_count"
            ]
            .contains(&path.as_str()),
            "unexpected property {path}"
        );
    }
    for name in &exchange.request.foreign_calls {
        assert_eq!(name, "clear_route_cache");
    }
    assert!(!a.is_poisoned());
    assert!(a.tick().unwrap());
    let names = host.shared.metric_names();
    assert!(
        names
            .iter()
            .any(|name| name == "sluice.shop.breaker.stable.state"),
        "{names:?}"
    );
    assert_eq!(
        host.shared.metric("sluice.shop.breaker.stable.state"),
        Some(0)
    );
}
