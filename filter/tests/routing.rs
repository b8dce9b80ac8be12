//! The routing decision, natively: service matching, rules, sticky split.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::config::{Config, Side};
use sluice::router::{cookie_value, Decision, RequestHeaders, Router};
use std::collections::HashMap;

#[derive(Default)]
struct Headers(HashMap<String, Vec<u8>>);

impl Headers {
    fn with(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.0.insert(name.to_string(), value.as_ref().to_vec());
        self
    }
}

impl RequestHeaders for Headers {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }
}

fn router(json: &str) -> Router {
    Router::new(Config::parse(json.as_bytes()).unwrap())
}

/// Finds the service and decides, as the filter does.
fn route(
    router: &Router,
    mut headers: Headers,
    random: u64,
) -> Option<(String, Side, Option<usize>)> {
    let authority = headers.0.get(":authority").cloned();
    let path = headers.0.get(":path").cloned();
    let index = router.find_service(authority.as_deref(), path.as_deref())?;
    let weight = router.services()[index].weight_bp;
    match router.decide(index, weight, true, &mut headers, random) {
        Decision::Routed {
            service,
            side,
            rule,
        } => Some((router.services()[service].name.clone(), side, rule)),
        Decision::Unmatched => None,
    }
}

const SHOP: &str = r#"{"services": [{
    "name": "shop", "match": {"authority": "shop.local"},
    "stable": "shop_v1", "canary": "shop_v2", "weight": 10,
    "sticky": {"header": "x-user-id"},
    "rules": [
      {"header": "x-canary", "equals": "always", "to": "canary"},
      {"header": "x-canary", "equals": "never", "to": "stable"},
      {"cookie": "beta", "equals": "yes", "to": "canary"},
      {"device": "mobile", "weight": 50}
    ]}]}"#;

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1";

fn shop(extra: Headers) -> Headers {
    extra.with(":authority", "shop.local").with(":path", "/")
}

#[test]
fn header_and_cookie_rules_decide_before_the_weight() {
    let router = router(SHOP);
    for user in 0..200 {
        let id = format!("u{user}");
        let always = route(
            &router,
            shop(
                Headers::default()
                    .with("x-canary", "always")
                    .with("x-user-id", &id),
            ),
            0,
        );
        assert_eq!(always, Some(("shop".into(), Side::Canary, Some(0))));
        let never = route(
            &router,
            shop(
                Headers::default()
                    .with("x-canary", "never")
                    .with("x-user-id", &id),
            ),
            0,
        );
        assert_eq!(never, Some(("shop".into(), Side::Stable, Some(1))));
        let beta = route(
            &router,
            shop(
                Headers::default()
                    .with("cookie", "a=1; beta=yes; c=3")
                    .with("x-user-id", &id),
            ),
            0,
        );
        assert_eq!(beta, Some(("shop".into(), Side::Canary, Some(2))));
    }
    // A value that no rule names falls through to the weight.
    let other = route(
        &router,
        shop(Headers::default().with("x-canary", "Always")),
        0,
    )
    .unwrap();
    assert_eq!(other.2, None);
}

#[test]
fn the_weighted_split_is_sticky_and_close_to_the_weight() {
    let router = router(SHOP);
    let mut canary = 0;
    for user in 0..20_000 {
        let headers = || shop(Headers::default().with("x-user-id", format!("user-{user}")));
        let first = route(&router, headers(), user).unwrap();
        // Same user, different randomness: the same side.
        for random in [1, 99, u64::MAX] {
            assert_eq!(route(&router, headers(), random).unwrap().1, first.1);
        }
        if first.1 == Side::Canary {
            canary += 1;
        }
    }
    let share = f64::from(canary) / 20_000.0;
    assert!((0.09..0.11).contains(&share), "{share}");
}

#[test]
fn the_mobile_cohort_gets_its_own_weight() {
    let router = router(SHOP);
    let canary = (0..10_000)
        .filter(|user| {
            let headers = shop(
                Headers::default()
                    .with("x-user-id", format!("m{user}"))
                    .with("user-agent", IPHONE),
            );
            let (_, side, rule) = route(&router, headers, 0).unwrap();
            assert_eq!(rule, Some(3));
            side == Side::Canary
        })
        .count();
    assert!((4_700..5_300).contains(&canary), "{canary}");
}

#[test]
fn raising_the_weight_only_moves_users_to_canary() {
    let at = |weight: u32| {
        let json = SHOP.replace(r#""weight": 10"#, &format!(r#""weight": {weight}"#));
        let router = router(&json);
        (0..5_000)
            .map(|user| {
                route(
                    &router,
                    shop(Headers::default().with("x-user-id", format!("u{user}"))),
                    7,
                )
                .unwrap()
                .1
            })
            .collect::<Vec<_>>()
    };
    let (low, high) = (at(10), at(40));
    for (before, after) in low.iter().zip(&high) {
        assert!(
            !(*before == Side::Canary && *after == Side::Stable),
            "a canary user went back to stable"
        );
    }
    let count = |sides: &[Side]| sides.iter().filter(|side| **side == Side::Canary).count();
    assert!(count(&high) > 3 * count(&low));
}

#[test]
fn without_a_sticky_key_the_split_is_random_at_the_same_weight() {
    let router = router(SHOP);
    let mut rng = sluice::sticky::Rng::new(3);
    let canary = (0..20_000)
        .filter(|_| {
            route(&router, shop(Headers::default()), rng.next_u64())
                .unwrap()
                .1
                == Side::Canary
        })
        .count();
    assert!((1_800..2_200).contains(&canary), "{canary}");
}

#[test]
fn sticky_cookies_work_like_sticky_headers() {
    let json = SHOP.replace(
        r#""sticky": {"header": "x-user-id"}"#,
        r#""sticky": {"cookie": "uid"}"#,
    );
    let router = router(&json);
    for user in 0..2_000 {
        let cookie = format!("theme=dark; uid={user}; x=y");
        let a = route(&router, shop(Headers::default().with("cookie", &cookie)), 1)
            .unwrap()
            .1;
        let b = route(&router, shop(Headers::default().with("cookie", &cookie)), 2)
            .unwrap()
            .1;
        assert_eq!(a, b);
    }
}

#[test]
fn services_match_by_host_wildcard_and_path_in_config_order() {
    let router = router(
        r#"{"services": [
        {"name": "api", "match": {"authority": "*.example.com", "path_prefix": "/api"}, "stable": "api"},
        {"name": "www", "match": {"authority": ["www.example.com", "Example.com"]}, "stable": "www"},
        {"name": "wild", "match": {"authority": "*.example.com"}, "stable": "wild"},
        {"name": "v6", "match": {"authority": "[::1]"}, "stable": "v6"},
        {"name": "rest", "match": {"path_prefix": "/static"}, "stable": "rest"}
    ]}"#,
    );
    let name = |authority: &str, path: &str| {
        route(
            &router,
            Headers::default()
                .with(":authority", authority)
                .with(":path", path),
            0,
        )
        .map(|r| r.0)
    };
    assert_eq!(name("www.example.com", "/api/v1").as_deref(), Some("api"));
    assert_eq!(name("WWW.Example.COM:8443", "/").as_deref(), Some("www"));
    assert_eq!(name("example.com.", "/").as_deref(), Some("www"));
    assert_eq!(name("a.b.example.com", "/x").as_deref(), Some("wild"));
    assert_eq!(name("[::1]:9000", "/").as_deref(), Some("v6"));
    assert_eq!(name("other.org", "/static/a.css").as_deref(), Some("rest"));
    assert_eq!(name("other.org", "/"), None);
    assert_eq!(name("example.org", "/"), None);
    // The first service in config order wins even when a later one is a
    // more specific host.
    let ordered = self::router(
        r#"{"services": [
        {"name": "all", "stable": "a"},
        {"name": "shop", "match": {"authority": "shop.local"}, "stable": "s"}
    ]}"#,
    );
    let found = route(
        &ordered,
        Headers::default()
            .with(":authority", "shop.local")
            .with(":path", "/"),
        0,
    );
    assert_eq!(found.map(|r| r.0).as_deref(), Some("all"));
}

#[test]
fn hostile_authorities_and_paths_match_nothing_and_do_not_fail() {
    let router = router(SHOP);
    let long_host = "a.".repeat(40_000) + "shop.local";
    for authority in [
        &b""[..],
        b":",
        b"[",
        b"[::1",
        &[0xff, 0xfe, b'.', 0x80],
        long_host.as_bytes(),
        b"shop.local\0",
        b"...",
    ] {
        let found = router.find_service(Some(authority), Some(b"/"));
        assert_eq!(
            found,
            None,
            "{:?}",
            String::from_utf8_lossy(&authority[..authority.len().min(40)])
        );
    }
    assert_eq!(router.find_service(None, None), None);
    assert_eq!(router.find_service(Some(b"shop.local"), None), Some(0));
}

#[test]
fn value_tests_equals_prefix_contains_present_and_lists() {
    let router = router(
        r#"{"services": [{"name": "s", "stable": "v1", "canary": "v2", "rules": [
        {"header": "x-a", "equals": ["one", "two"], "to": "canary"},
        {"header": "x-b", "prefix": "beta-", "to": "canary"},
        {"header": "x-c", "contains": ["qa", "staff"], "to": "canary"},
        {"cookie": "internal", "present": true, "to": "canary"},
        {"header": "x-d", "present": false, "to": "stable"},
        {"header": "x-d", "present": true, "to": "canary"}
    ]}]}"#,
    );
    let rule = |headers: Headers| route(&router, headers.with(":path", "/"), 0).unwrap().2;
    assert_eq!(rule(Headers::default().with("x-a", "two")), Some(0));
    assert_eq!(
        rule(Headers::default().with("x-a", "three").with("x-d", "")),
        Some(5)
    );
    assert_eq!(rule(Headers::default().with("x-b", "beta-7")), Some(1));
    assert_eq!(
        rule(Headers::default().with("x-b", "alpha-beta-7")),
        Some(4)
    );
    assert_eq!(rule(Headers::default().with("x-c", "team=staff")), Some(2));
    assert_eq!(
        rule(Headers::default().with("cookie", "internal=")),
        Some(3)
    );
    assert_eq!(
        rule(Headers::default().with("cookie", "notinternal=1")),
        Some(4)
    );
    assert_eq!(
        rule(Headers::default().with("x-a", [0xff, 0x00, 0x80])),
        Some(4)
    );
}

#[test]
fn cookie_parsing_handles_spacing_quotes_and_garbage() {
    assert_eq!(cookie_value(b"a=1; beta=yes", b"beta"), Some(&b"yes"[..]));
    assert_eq!(
        cookie_value(b"a=1;beta = yes ;", b"beta"),
        Some(&b"yes"[..])
    );
    assert_eq!(cookie_value(b"beta=\"yes\"", b"beta"), Some(&b"yes"[..]));
    assert_eq!(
        cookie_value(b"beta=first; beta=second", b"beta"),
        Some(&b"first"[..])
    );
    assert_eq!(cookie_value(b"xbeta=yes", b"beta"), None);
    assert_eq!(cookie_value(b"beta", b"beta"), None);
    assert_eq!(cookie_value(b"=;;;=\xff", b"beta"), None);
    assert_eq!(cookie_value(b"\"", b"\""), None);
    let many: String = (0..5_000)
        .map(|i| format!("c{i}=v{i}; "))
        .collect::<String>()
        + "beta=yes";
    assert_eq!(cookie_value(many.as_bytes(), b"beta"), Some(&b"yes"[..]));
}

#[test]
fn a_service_without_canary_always_goes_to_stable() {
    let router = router(
        r#"{"services": [{"name": "s", "stable": "only", "rules": [{"header": "x", "present": true, "to": "stable"}]}]}"#,
    );
    for random in 0..1_000 {
        let (_, side, _) = route(&router, Headers::default(), random).unwrap();
        assert_eq!(side, Side::Stable);
    }
    assert_eq!(router.services()[0].cluster(Side::Canary), "only");
}

#[test]
fn weights_zero_and_hundred_are_absolute() {
    for (weight, expected) in [(0, Side::Stable), (100, Side::Canary)] {
        let json = SHOP.replace(r#""weight": 10"#, &format!(r#""weight": {weight}"#));
        let router = router(&json);
        for user in 0..2_000 {
            let headers = shop(Headers::default().with("x-user-id", format!("{user}")));
            assert_eq!(route(&router, headers, user).unwrap().1, expected);
        }
    }
}

#[test]
fn withdrawn_cohort_weights_send_nobody_but_explicit_rules_still_reach_canary() {
    let router = router(SHOP);
    for user in 0..2_000 {
        let mut mobile = shop(
            Headers::default()
                .with("x-user-id", format!("{user}"))
                .with("user-agent", IPHONE),
        );
        let decision = router.decide(0, 0, false, &mut mobile, user);
        assert_eq!(
            decision,
            Decision::Routed {
                service: 0,
                side: Side::Stable,
                rule: Some(3)
            }
        );
    }
    let mut tester = shop(Headers::default().with("x-canary", "always"));
    let decision = router.decide(0, 0, false, &mut tester, 0);
    assert_eq!(
        decision,
        Decision::Routed {
            service: 0,
            side: Side::Canary,
            rule: Some(0)
        }
    );
}
