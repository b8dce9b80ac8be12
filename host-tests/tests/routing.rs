//! Canary routing through the real sluice.wasm in the fake Envoy host:
//! several worker VMs, header maps, metrics and logs as Envoy keeps them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Action, HeaderMap, HeaderMapKind, Proxy, StartError, Vm};

const SHOP: &str = r#"{
  "services": [{
    "name": "shop",
    "match": {"authority": "shop.local", "path_prefix": "/"},
    "stable": "shop_v1", "canary": "shop_v2", "weight": 10,
    "sticky": {"header": "x-user-id"},
    "rules": [
      {"header": "x-canary", "equals": "always", "to": "canary"},
      {"header": "x-canary", "equals": "never", "to": "stable"},
      {"cookie": "beta", "equals": "yes", "to": "canary"},
      {"device": "mobile", "weight": 50}
    ]
  }]
}"#;

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1";
const DESKTOP: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

fn proxy(config: &str) -> Proxy {
    Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .build()
        .unwrap()
}

/// Envoy's main-thread VM plus two workers, as `--concurrency 2` runs them.
fn workers(proxy: &Proxy) -> Vec<Vm> {
    let vms = proxy.boot(2).unwrap();
    vms.into_iter().skip(1).collect()
}

/// Sends one request through a VM; returns the steering header the router
/// would see. Fails the test if the VM trapped.
fn send(vm: &Vm, extra: &[(&str, &str)]) -> Option<String> {
    let mut headers = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "shop.local"),
        (":path", "/"),
    ];
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    assert_eq!(stream.request_headers(&headers, true), Action::Continue);
    let steered = stream.request_header("x-sluice-cluster");
    // The response code (200) and the attempt count (1) are derived by the
    // fake from the response; setting them after it is refused.
    stream.response_headers(&[(":status", "200")], true);
    stream.finish();
    assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    steered
}

#[test]
fn rules_decide_before_the_weight() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    for user in 0..100 {
        let id = format!("u{user}");
        let vm = &vms[user % 2];
        assert_eq!(
            send(vm, &[("x-canary", "always"), ("x-user-id", &id)]).as_deref(),
            Some("shop_v2")
        );
        assert_eq!(
            send(vm, &[("x-canary", "never"), ("x-user-id", &id)]).as_deref(),
            Some("shop_v1")
        );
        assert_eq!(
            send(
                vm,
                &[("cookie", "theme=dark; beta=yes"), ("x-user-id", &id)]
            )
            .as_deref(),
            Some("shop_v2")
        );
    }
    proxy.tick_now();
    assert_eq!(proxy.counter("sluice.shop.rule.0.matched"), Some(100));
    assert_eq!(proxy.counter("sluice.shop.rule.1.matched"), Some(100));
    assert_eq!(proxy.counter("sluice.shop.rule.2.matched"), Some(100));
    assert_eq!(proxy.counter("sluice.shop.routed.canary"), Some(200));
    assert_eq!(proxy.counter("sluice.shop.routed.stable"), Some(100));
}

#[test]
fn the_split_is_sticky_across_workers_and_near_the_weight() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    let mut canary = 0;
    for user in 0..3_000 {
        let id = format!("user-{user}");
        let first = send(&vms[0], &[("x-user-id", &id), ("user-agent", DESKTOP)]).unwrap();
        let second = send(&vms[1], &[("x-user-id", &id), ("user-agent", DESKTOP)]).unwrap();
        assert_eq!(first, second, "user {id} changed sides between workers");
        if first == "shop_v2" {
            canary += 1;
        }
    }
    let share = f64::from(canary) / 3_000.0;
    assert!((0.08..0.12).contains(&share), "canary share {share}");
    proxy.tick_now();
    let routed = proxy.counter("sluice.shop.routed.canary").unwrap()
        + proxy.counter("sluice.shop.routed.stable").unwrap();
    assert_eq!(routed, 6_000);
}

#[test]
fn mobile_users_get_the_cohort_weight() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    let canary = (0..2_000)
        .filter(|user| {
            send(
                &vms[user % 2],
                &[("x-user-id", &format!("m{user}")), ("user-agent", IPHONE)],
            )
            .as_deref()
                == Some("shop_v2")
        })
        .count();
    assert!(
        (900..1_100).contains(&canary),
        "{canary} of 2000 mobile users on canary"
    );
    proxy.tick_now();
    assert_eq!(proxy.counter("sluice.shop.rule.3.matched"), Some(2_000));
}

#[test]
fn raising_the_weight_by_a_config_push_only_moves_users_to_canary() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    let sides = |vms: &[Vm]| -> Vec<String> {
        (0..2_000)
            .map(|user| send(&vms[user % 2], &[("x-user-id", &format!("u{user}"))]).unwrap())
            .collect()
    };
    let before = sides(&vms);
    proxy
        .reconfigure(SHOP.replace(r#""weight": 10"#, r#""weight": 40"#))
        .unwrap();
    let after = sides(&vms);
    for (user, (was, now)) in before.iter().zip(&after).enumerate() {
        assert!(
            !(was == "shop_v2" && now == "shop_v1"),
            "user u{user} moved back to stable"
        );
    }
    let count = |sides: &[String]| sides.iter().filter(|side| *side == "shop_v2").count();
    assert!(
        count(&after) > 3 * count(&before),
        "{} -> {}",
        count(&before),
        count(&after)
    );
}

#[test]
fn a_client_cannot_steer_matched_or_not() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    // Matched: the forged value is replaced by a configured cluster.
    let steered = send(
        &vms[0],
        &[("x-sluice-cluster", "admin_secret"), ("x-canary", "never")],
    );
    assert_eq!(steered.as_deref(), Some("shop_v1"));
    // Unmatched host: the forged header is removed and nothing is written.
    let stream = vms[1].stream();
    let mut headers = HeaderMap::new(HeaderMapKind::RequestHeaders);
    headers.add(":authority", "other.local");
    headers.add(":path", "/");
    headers.add("x-sluice-cluster", "admin_secret");
    headers.add("x-sluice-cluster", "shop_v2");
    stream.request_headers_map(headers, true);
    assert_eq!(
        stream.request_header_map().get_all("x-sluice-cluster"),
        Vec::<String>::new()
    );
    stream.finish();
    proxy.tick_now();
    assert_eq!(proxy.counter("sluice.unmatched"), Some(1));
}

#[test]
fn hostile_header_bytes_never_trap_and_go_to_a_configured_cluster() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    let huge = vec![b'x'; 64 * 1024];
    let garbage: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let many_cookies: String = (0..5_000)
        .map(|i| format!("c{i}=v{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![
            ("x-user-id", garbage.clone()),
            ("user-agent", garbage.clone()),
            ("cookie", garbage.clone()),
        ],
        vec![
            ("x-user-id", huge.clone()),
            ("user-agent", huge.clone()),
            ("x-canary", huge.clone()),
        ],
        vec![
            ("cookie", many_cookies.clone().into_bytes()),
            ("cookie", b"beta=yes".to_vec()),
        ],
        vec![
            ("x-canary", vec![0xff, 0xfe]),
            ("x-canary", b"always".to_vec()),
        ],
        vec![
            ("x-user-id", Vec::new()),
            ("cookie", b";;;===;beta".to_vec()),
        ],
    ];
    for (index, extra) in cases.iter().enumerate() {
        for authority in [&b"shop.local"[..], b"SHOP.LOCAL:8080", &garbage[..], b""] {
            let stream = vms[index % 2].stream();
            let mut headers = HeaderMap::new(HeaderMapKind::RequestHeaders);
            if !authority.is_empty() {
                headers.add(":authority", authority);
            }
            headers.add(":path", "/");
            for (name, value) in extra {
                headers.add(name, value);
            }
            assert_eq!(stream.request_headers_map(headers, true), Action::Continue);
            let steered = stream.request_header_map().get_all("x-sluice-cluster");
            assert!(
                steered.is_empty()
                    || (steered.len() == 1
                        && ["shop_v1", "shop_v2"].contains(&steered[0].as_str())),
                "case {index}: steered to {steered:?}"
            );
            stream.finish();
            assert!(
                vms[index % 2].trapped().is_none(),
                "case {index} trapped: {:?}",
                vms[index % 2].trapped()
            );
        }
    }
    // A request with no :authority at all, and no headers at all.
    let stream = vms[0].stream();
    stream.request_headers_map(HeaderMap::new(HeaderMapKind::RequestHeaders), true);
    stream.finish();
    assert!(vms[0].trapped().is_none());
}

#[test]
fn a_config_push_that_is_refused_keeps_the_old_config_serving() {
    let proxy = proxy(SHOP);
    let vms = workers(&proxy);
    let refused = proxy.reconfigure(SHOP.replace(r#""weight": 10"#, r#""weight": 150"#));
    let err = refused.expect_err("weight 150 must be refused");
    assert!(
        err.logged("services[0].weight: must be between 0 and 100, got 150"),
        "{err}"
    );
    assert_eq!(
        send(&vms[0], &[("x-canary", "always")]).as_deref(),
        Some("shop_v2")
    );
}

#[test]
fn bad_configs_are_refused_at_start_with_the_path_and_reason() {
    for (config, expected) in [
        ("{", "sluice: config refused: invalid JSON"),
        (
            r#"{"services": []}"#,
            "sluice: config refused: services: must list at least one service",
        ),
        (
            r#"{"services": [{"name": "a", "stable": "v1", "wieght": 5}]}"#,
            "sluice: config refused: services[0].wieght: unknown key",
        ),
        (
            r#"{"services": [{"name": "a", "stable": "v1"}, {"name": "a", "stable": "v2"}]}"#,
            "sluice: config refused: services[1].name: duplicate service name",
        ),
        (
            r#"{"steering_header": "", "services": [{"name": "a", "stable": "v1"}]}"#,
            "sluice: config refused: steering_header: must not be empty",
        ),
        ("", "sluice: config refused: invalid JSON"),
    ] {
        let err = proxy(config)
            .start_vm()
            .err()
            .unwrap_or_else(|| panic!("{config} was accepted"));
        assert!(matches!(err, StartError::ConfigureFailed { .. }), "{err}");
        assert!(err.logged(expected), "{config}: {err}");
    }
}

#[test]
fn applying_a_config_logs_one_summary_line() {
    let proxy = proxy(SHOP);
    let _vms = workers(&proxy);
    assert!(proxy.logged(
        "sluice: config applied: 1 services via header x-sluice-cluster: shop (stable=shop_v1 canary=shop_v2 weight=10%, 4 rules)"
    ));
}

#[test]
fn a_custom_steering_header_is_used_and_the_default_one_is_left_alone() {
    let config = SHOP.replace(
        r#""services""#,
        r#""steering_header": "x-route-to", "services""#,
    );
    let proxy = proxy(&config);
    let vms = workers(&proxy);
    let stream = vms[0].stream();
    stream.request_headers(
        &[
            (":authority", "shop.local"),
            (":path", "/"),
            ("x-route-to", "evil"),
            ("x-canary", "always"),
        ],
        true,
    );
    assert_eq!(
        stream.request_header("x-route-to").as_deref(),
        Some("shop_v2")
    );
    stream.finish();
}
