//! Hostile request headers through the real sluice.wasm in the fake Envoy
//! host: any bytes (every one of the 256, invalid UTF-8, NUL), 60 KiB values,
//! 5000 cookies, repeated headers, empty values, missing pseudo-headers and
//! no headers at all, in EVERY header the config reads (rule headers and
//! cookies, `user-agent`, the sticky header and cookie, `grpc-timeout`, the
//! deadline headers, `:authority`, `:path`) and in the headers the filter
//! owns (the steering header and Envoy's retry and timeout headers).
//!
//! One config uses rules, sticky keys (header and cookie), retry, breakers
//! and a rollout. Every request is checked the same way (`Rig::send`):
//!
//! - the VM did not trap (`Vm::trapped()` is `None`; traps are recorded,
//!   `TrapPolicy::FailClosed`, so the failing case is named);
//! - a request that matched no service (`sluice.unmatched` went up) carries
//!   no steering header and the client's retry and timeout headers exactly
//!   as sent (the filter leaves unmatched requests to Envoy);
//! - any other request was steered to exactly ONE cluster of the config, the
//!   one the filter's `routed` metrics say it chose (service and side), or
//!   refused by an open stable breaker with the documented local 503;
//! - a steered request carries exactly one `x-envoy-max-retries`, never above
//!   the service's `max_retries`; its timeouts are the service's or lower,
//!   or absent when the service has none; its retry conditions are the
//!   configured ones; the hedging, expected-timeout and retriable-* headers
//!   a client could add are gone;
//! - nothing else in the request headers changed.
//!
//! The fake host coalesces repeated inline headers (`user-agent`,
//! `grpc-timeout`, the `x-envoy-*` ones) with `,` as Envoy does.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::Instant;

use sluice_host::{require_sluice_wasm, Action, HeaderMap, HeaderMapKind, Proxy, TrapPolicy, Vm};

const CONFIG: &str = r#"{
  "steering_header": "x-sluice-cluster",
  "services": [
    {
      "name": "shop",
      "match": {"authority": ["shop.local", "*.shop.local"], "path_prefix": "/"},
      "stable": "shop_v1",
      "canary": "shop_v2",
      "sticky": {"header": "x-user-id"},
      "rules": [
        {"header": "x-canary", "equals": ["always", "yes"], "to": "canary"},
        {"header": "x-canary", "prefix": "nev", "to": "stable"},
        {"header": "x-beta", "present": true, "weight": 50},
        {"cookie": "beta", "equals": "yes", "to": "canary"},
        {"cookie": "group", "contains": "qa", "weight": 75},
        {"device": "bot", "to": "stable"},
        {"device": "mobile", "weight": 50},
        {"device": "tablet", "weight": 20}
      ],
      "retry": {
        "max_retries": 2,
        "retry_on": "5xx,reset,connect-failure",
        "per_try_timeout_ms": 1000,
        "timeout_ms": 5000,
        "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10},
        "deadline_header": "x-request-timeout-ms"
      },
      "breaker": {"window_s": 10, "min_requests": 20, "failure_rate": 0.5,
                  "consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 20000,
                  "half_open_requests": 3},
      "rollout": {"steps": [10, 50, 100], "step_s": 300, "max_failure_rate": 0.2,
                  "min_requests": 50}
    },
    {
      "name": "cart",
      "match": {"authority": "cart.local", "path_prefix": "/cart"},
      "stable": "cart_v1",
      "canary": "cart_v2",
      "weight": 30,
      "sticky": {"cookie": "sid"},
      "rules": [
        {"cookie": "cart-beta", "present": true, "to": "canary"},
        {"header": "x-tier", "equals": "gold", "to": "stable"},
        {"cookie": "sid", "prefix": "test-", "weight": 100}
      ],
      "retry": {"max_retries": 1, "retry_on": "5xx,cancelled", "timeout_ms": 2000,
                "deadline_header": "x-deadline-ms"},
      "breaker": {"min_requests": 10, "failure_rate": 0.5, "consecutive_failures": 5,
                  "open_ms": 5000}
    },
    {
      "name": "api",
      "match": {"authority": "*", "path_prefix": "/api/"},
      "stable": "api_v1",
      "retry": {"max_retries": 0}
    }
  ]
}"#;

/// What the config allows a steered request, per cluster.
struct Policy {
    clusters: &'static [&'static str],
    max_retries: u32,
    retry_on: &'static str,
    retry_grpc_on: Option<&'static str>,
    timeout_ms: Option<u64>,
    per_try_timeout_ms: Option<u64>,
}

const POLICIES: &[Policy] = &[
    Policy {
        clusters: &["shop_v1", "shop_v2"],
        max_retries: 2,
        retry_on: "5xx,reset,connect-failure",
        retry_grpc_on: None,
        timeout_ms: Some(5_000),
        per_try_timeout_ms: Some(1_000),
    },
    Policy {
        clusters: &["cart_v1", "cart_v2"],
        max_retries: 1,
        retry_on: "5xx",
        retry_grpc_on: Some("cancelled"),
        timeout_ms: Some(2_000),
        per_try_timeout_ms: None,
    },
    Policy {
        clusters: &["api_v1"],
        max_retries: 0,
        retry_on: "5xx,reset,connect-failure,refused-stream",
        retry_grpc_on: None,
        timeout_ms: None,
        per_try_timeout_ms: None,
    },
];

const STEERING: &str = "x-sluice-cluster";

/// The headers the filter owns on a request of a service with `retry`.
const OWNED: &[&str] = &[
    "x-envoy-max-retries",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
];

/// Every header the config reads, and every header the filter writes or
/// removes, each with a plausible value an attacker would start from.
const TARGETS: &[(&str, &str)] = &[
    (":authority", "shop.local"),
    (":path", "/api/v1"),
    (STEERING, "shop_v2"),
    ("x-canary", "always"),
    ("x-beta", "1"),
    ("x-tier", "gold"),
    ("cookie", "beta=yes; group=qa; sid=test-1; cart-beta=1"),
    ("user-agent", IPHONE),
    ("x-user-id", "alice"),
    ("grpc-timeout", "100m"),
    ("x-request-timeout-ms", "300"),
    ("x-deadline-ms", "300"),
    ("x-envoy-max-retries", "10"),
    ("x-envoy-retry-on", "5xx,gateway-error,retriable-4xx"),
    ("x-envoy-retry-grpc-on", "cancelled,unavailable"),
    ("x-envoy-upstream-rq-timeout-ms", "600000"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "600000"),
    ("x-envoy-hedge-on-per-try-timeout", "true"),
    ("x-envoy-expected-rq-timeout-ms", "600000"),
    ("x-envoy-retriable-status-codes", "404,409"),
    ("x-envoy-retriable-header-names", "x-retry-me"),
];

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1";
const DESKTOP: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// 60 KiB: Envoy's default `max_request_headers_kb` for the whole head.
const HUGE: usize = 60 * 1024;

type Pairs = Vec<(&'static str, Vec<u8>)>;

/// Extra request headers of a case.
type Headers = &'static [(&'static str, &'static str)];

/// Ordinary requests of each service (and of none), that the hostile cases
/// start from.
fn bases() -> Vec<(&'static str, Pairs)> {
    let common = |authority: &str, path: &str, extra: &[(&'static str, &str)]| -> Pairs {
        let mut pairs: Pairs = vec![
            (":method", b"GET".to_vec()),
            (":scheme", b"http".to_vec()),
            (":authority", authority.as_bytes().to_vec()),
            (":path", path.as_bytes().to_vec()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.as_bytes().to_vec())));
        pairs
    };
    vec![
        (
            "shop",
            common(
                "shop.local",
                "/",
                &[
                    ("x-user-id", "u-17"),
                    ("user-agent", DESKTOP),
                    ("cookie", "theme=dark; group=dev"),
                ],
            ),
        ),
        (
            "cart",
            common(
                "cart.local",
                "/cart/items",
                &[("cookie", "sid=s-42; theme=dark"), ("user-agent", DESKTOP)],
            ),
        ),
        ("api", common("anything.example", "/api/v1/orders", &[])),
        ("unmatched", common("elsewhere.local", "/", &[])),
    ]
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Unmatched,
    Steered { cluster: String, granted: u32 },
    Rejected,
}

/// How the test's "router" answers a steered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    /// Every attempt fails with a 503 (the router used all granted retries).
    Fail,
}

struct Rig {
    proxy: Proxy,
    workers: Vec<Vm>,
    sent: u64,
    tally: BTreeMap<String, u64>,
}

impl Rig {
    fn start() -> Rig {
        let proxy = Proxy::builder(require_sluice_wasm())
            .plugin_config(CONFIG)
            .root_id("sluice")
            .trap_policy(TrapPolicy::FailClosed)
            .build()
            .unwrap();
        // Envoy's main-thread VM plus two workers (`--concurrency 2`).
        let workers = proxy.boot(2).unwrap().into_iter().skip(1).collect();
        Rig {
            proxy,
            workers,
            sent: 0,
            tally: BTreeMap::new(),
        }
    }

    /// A counter, once the workers' tick has flushed it.
    fn counter(&self, name: &str) -> u64 {
        self.proxy.tick_now();
        self.proxy.counter(name).unwrap_or(0)
    }

    /// The filter's `routed` counters, by the cluster each one stands for.
    fn routed(&self) -> [(&'static str, u64); 5] {
        [
            ("shop_v1", "sluice.shop.routed.stable"),
            ("shop_v2", "sluice.shop.routed.canary"),
            ("cart_v1", "sluice.cart.routed.stable"),
            ("cart_v2", "sluice.cart.routed.canary"),
            ("api_v1", "sluice.api.routed.stable"),
        ]
        .map(|(cluster, metric)| (cluster, self.counter(metric)))
    }

    /// Sends `pairs` (added in order, as Envoy's codec builds the map) and
    /// checks every invariant of the module documentation.
    fn send(&mut self, label: &str, pairs: &[(&str, Vec<u8>)], answer: Answer) -> Outcome {
        let mut before = HeaderMap::new(HeaderMapKind::RequestHeaders);
        for (name, value) in pairs {
            before.add(name, value);
        }
        self.send_map(label, before, answer)
    }

    fn send_map(&mut self, label: &str, before: HeaderMap, answer: Answer) -> Outcome {
        let vm = self.workers[(self.sent % 2) as usize].clone();
        self.sent += 1;
        let unmatched = self.counter("sluice.unmatched");
        let routed_before = self.routed();
        let stream = vm.stream();
        let action = stream.request_headers_map(before.clone(), true);
        if let Some(trap) = vm.trapped() {
            panic!("{label}: the VM trapped: {trap}");
        }
        let after = stream.request_header_map();
        let steered = after.get_all(STEERING);
        let outcome = if let Some(reply) = stream.local_reply() {
            assert_eq!(reply.status, 503, "{label}: {reply:?}");
            assert!(
                reply
                    .headers
                    .contains(&("x-sluice-breaker".to_string(), "open".to_string())),
                "{label}: a local reply that is not the breaker's: {reply:?}"
            );
            assert!(steered.is_empty(), "{label}: rejected but steered");
            assert_eq!(action, Action::Pause, "{label}");
            Outcome::Rejected
        } else if self.counter("sluice.unmatched") > unmatched {
            assert_eq!(action, Action::Continue, "{label}");
            assert!(
                steered.is_empty(),
                "{label}: unmatched but steered to {steered:?}"
            );
            for name in OWNED {
                assert_eq!(
                    after.get_all(name),
                    before.get_all(name),
                    "{label}: the filter changed {name} of an unmatched request"
                );
            }
            Outcome::Unmatched
        } else {
            assert_eq!(action, Action::Continue, "{label}");
            assert_eq!(
                steered.len(),
                1,
                "{label}: steered to {steered:?}, want exactly one cluster"
            );
            let cluster = steered[0].clone();
            let policy = POLICIES
                .iter()
                .find(|p| p.clusters.contains(&cluster.as_str()))
                .unwrap_or_else(|| panic!("{label}: steered to unconfigured {cluster:?}"));
            // The cluster is the one the filter's own metrics say it chose
            // (service and side), not just any configured one.
            let routed: Vec<&str> = self
                .routed()
                .iter()
                .zip(&routed_before)
                .filter(|((_, now), (_, then))| now > then)
                .map(|((cluster, _), _)| *cluster)
                .collect();
            assert_eq!(routed, [cluster.as_str()], "{label}: routed metrics");
            let granted = check_retry_headers(label, &before, &after, policy);
            Outcome::Steered { cluster, granted }
        };
        // Nothing but the steering header and the owned headers changed.
        let rest = |map: &HeaderMap| -> Vec<(Vec<u8>, Vec<u8>)> {
            map.raw_pairs()
                .iter()
                .filter(|(k, _)| {
                    k != STEERING.as_bytes() && !OWNED.iter().any(|o| k == o.as_bytes())
                })
                .cloned()
                .collect()
        };
        assert!(
            rest(&before) == rest(&after),
            "{label}: the filter changed other request headers"
        );

        match &outcome {
            Outcome::Steered { granted, .. } => {
                let (attempts, status) = match answer {
                    Answer::Ok => (1, "200"),
                    Answer::Fail => (u64::from(*granted) + 1, "503"),
                };
                stream.set_attempt_count(attempts);
                stream.response_headers(&[(":status", status)], true);
            }
            Outcome::Unmatched => {
                stream.set_attempt_count(1);
                stream.response_headers(&[(":status", "200")], true);
            }
            Outcome::Rejected => {}
        }
        stream.finish();
        if let Some(trap) = vm.trapped() {
            panic!("{label}: the VM trapped after the request: {trap}");
        }
        let key = match &outcome {
            Outcome::Steered { cluster, .. } => cluster.clone(),
            Outcome::Unmatched => "unmatched".to_string(),
            Outcome::Rejected => "rejected".to_string(),
        };
        *self.tally.entry(key).or_default() += 1;
        outcome
    }

    fn report(&self, test: &str, began: Instant) {
        eprintln!(
            "{test}: {} requests in {:.1?} on 2 worker VMs, no trap; outcomes {:?}",
            self.sent,
            began.elapsed(),
            self.tally
        );
        for vm in &self.workers {
            assert!(vm.trapped().is_none());
        }
    }
}

/// The conditions a request may be armed with (`x-envoy-retry-on`,
/// `x-envoy-retry-grpc-on`), from the safe-retry rules of the README
/// ("Which requests are retried"), independently of the filter's code: an
/// RFC 9110 idempotent method or a non-blank `Idempotency-Key` keeps the
/// policy's conditions; anything else keeps only `connect-failure`,
/// `refused-stream` and `reset-before-request`; a gRPC call gets the gRPC
/// conditions, or `unavailable` when there are none. (This config declares
/// no `idempotent` methods or paths.)
fn expected_conditions(before: &HeaderMap, policy: &Policy) -> (Option<String>, Option<String>) {
    let method = before.get_bytes(":method").unwrap_or_default();
    let replayable = [
        &b"GET"[..],
        b"HEAD",
        b"OPTIONS",
        b"TRACE",
        b"PUT",
        b"DELETE",
    ]
    .contains(&method)
        || before
            .get_bytes("idempotency-key")
            .is_some_and(|key| key.iter().any(|&b| b != b' ' && b != b'\t'));
    let grpc = before.get_bytes("content-type").is_some_and(|value| {
        value.len() >= 16 && value[..16].eq_ignore_ascii_case(b"application/grpc")
    });
    let safe: Vec<&str> = policy
        .retry_on
        .split(',')
        .filter(|c| ["connect-failure", "refused-stream", "reset-before-request"].contains(c))
        .collect();
    let safe = safe.join(",");
    let http = if replayable {
        policy.retry_on.to_string()
    } else {
        safe
    };
    let grpc_on = match (grpc, replayable) {
        (true, _) => Some(policy.retry_grpc_on.unwrap_or("unavailable").to_string()),
        (false, true) => policy.retry_grpc_on.map(str::to_string),
        (false, false) => None,
    };
    ((!http.is_empty()).then_some(http), grpc_on)
}

/// Checks the retry and timeout headers of a steered request against its
/// service's policy; returns the retries granted.
fn check_retry_headers(label: &str, before: &HeaderMap, after: &HeaderMap, policy: &Policy) -> u32 {
    let one = |name: &str| -> Option<String> {
        let values = after.get_all(name);
        assert!(values.len() <= 1, "{label}: {name} repeated: {values:?}");
        values.into_iter().next()
    };
    let max_retries = one("x-envoy-max-retries")
        .unwrap_or_else(|| panic!("{label}: no x-envoy-max-retries on a governed request"));
    let granted: u32 = max_retries
        .parse()
        .unwrap_or_else(|_| panic!("{label}: x-envoy-max-retries {max_retries:?}"));
    assert!(
        granted <= policy.max_retries,
        "{label}: {granted} retries, the service allows {}",
        policy.max_retries
    );
    let (retry_on, retry_grpc_on) = expected_conditions(before, policy);
    if retry_on.is_none() && retry_grpc_on.is_none() {
        assert_eq!(granted, 0, "{label}: retries with every condition withheld");
    }
    assert_eq!(one("x-envoy-retry-on"), retry_on, "{label}");
    assert_eq!(one("x-envoy-retry-grpc-on"), retry_grpc_on, "{label}");
    let millis = |name: &str| -> Option<u64> {
        one(name).map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{label}: {name}: {v:?}"))
        })
    };
    match (millis("x-envoy-upstream-rq-timeout-ms"), policy.timeout_ms) {
        (Some(got), Some(max)) => assert!(
            (1..=max).contains(&got),
            "{label}: timeout {got} ms, the service allows {max}"
        ),
        (None, None) => {}
        (got, max) => panic!("{label}: timeout {got:?}, configured {max:?}"),
    }
    assert_eq!(
        millis("x-envoy-upstream-rq-per-try-timeout-ms"),
        policy.per_try_timeout_ms,
        "{label}: per-try timeout"
    );
    for name in [
        "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
    ] {
        assert!(
            after.get_all(name).is_empty(),
            "{label}: {name} survived: {:?}",
            after.get_all(name)
        );
    }
    granted
}

/// A short printable description of a value for failure messages.
fn show(value: &[u8]) -> String {
    let head: String = value
        .iter()
        .take(24)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if value.len() > 24 {
        format!("\"{head}…\" ({} bytes)", value.len())
    } else {
        format!("\"{head}\"")
    }
}

/// `base` with `name` set to `value` (replacing the base's value).
fn with(base: &Pairs, name: &'static str, value: &[u8]) -> Pairs {
    let mut pairs: Pairs = base.iter().filter(|(k, _)| *k != name).cloned().collect();
    pairs.push((name, value.to_vec()));
    pairs
}

/// Invalid UTF-8 and other byte sequences a decoder might choke on.
fn invalid_utf8() -> Vec<Vec<u8>> {
    vec![
        vec![0x80],
        vec![0xbf, 0x80],
        vec![0xc0, 0x80],
        vec![0xc1, 0xbf],
        vec![0xe0, 0x80, 0x80],
        vec![0xed, 0xa0, 0x80],
        vec![0xed, 0xbf, 0xbf],
        vec![0xf4, 0x90, 0x80, 0x80],
        vec![0xf5, 0x80, 0x80, 0x80],
        vec![0xf8, 0x88, 0x80, 0x80, 0x80],
        vec![0xfe, 0xff],
        vec![0xff, 0xfe, 0x00, 0x00],
        vec![0xe2, 0x82],
        vec![0xf0, 0x9f, 0x98],
        b"always\xe2\x82".to_vec(),
        b"\xef\xbb\xbfalways".to_vec(),
        b"al\x00ways".to_vec(),
        b"\x00".to_vec(),
        "ａｌｗａｙｓ".as_bytes().to_vec(),
        "١٢٣".as_bytes().to_vec(),
        "shop.ＬＯＣＡＬ".as_bytes().to_vec(),
    ]
}

/// Values that are empty, huge, numeric edge cases or syntax edge cases.
fn edge_values() -> Vec<Vec<u8>> {
    let mut values: Vec<Vec<u8>> = [
        "",
        " ",
        "\t",
        "  always  ",
        ",",
        ",,,",
        "always,always",
        "0",
        "-1",
        "+5",
        "1e9",
        "1.5",
        "0x10",
        "007",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "0n",
        "1n",
        "99999999H",
        "100000000S",
        "1S ",
        " 1S",
        "1 S",
        "S",
        "m",
        "99999999m",
        "5000",
        "4999",
        "5001",
        "600000",
        "=",
        "==",
        "\"",
        "\"\"",
        ";",
        "; ;",
        "/",
        "//",
        "*",
        "[",
        "[::1",
        "[::1]:80",
        ":",
        ":80",
        ".",
        "..",
        "shop.local.",
        "SHOP.LOCAL",
        "Shop.Local:8080",
        "a.shop.local",
        ".shop.local",
        "*.shop.local",
        "shop.local,evil.local",
        "evil@shop.local",
        "shop.local:99999999999999999999",
        "cart.local",
        "/cart",
        "/CART",
        "/api",
        "/api/",
        "api/",
        "/api/%00",
        "shop_v1",
        "shop_v2",
        "admin_secret",
        "Googlebot",
        "iPad",
        "Android",
        "Mobile",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    values.push(vec![b'a'; HUGE]);
    values.push(vec![0xff; HUGE]);
    values.push((0..=255u8).cycle().take(HUGE).collect());
    values.push(b"always".repeat(HUGE / 6));
    values.push([b"always".as_slice(), &vec![b' '; HUGE]].concat());
    values.push([vec![b'x'; HUGE], b"Googlebot".to_vec()].concat());
    values.push([b"iPhone ".as_slice(), &vec![0xfe; HUGE]].concat());
    values.push(b"9".repeat(HUGE));
    values.push([b"/api/".as_slice(), &vec![b'a'; HUGE]].concat());
    values.push([vec![b'a'; 300], b".shop.local".to_vec()].concat());
    values.push(b"a.".repeat(HUGE / 2));
    values
}

#[test]
fn every_byte_value_in_every_header_the_filter_reads() {
    let began = Instant::now();
    let mut sent = 0;
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    // A fresh proxy per header: the fake host keeps every finished stream
    // (for its accessors), which makes very long runs on one VM slow.
    for (name, plausible) in TARGETS {
        let mut rig = Rig::start();
        for (base_name, base) in bases() {
            // A request for no service is only read for its host, path and
            // steering header.
            if base_name == "unmatched" && ![":authority", ":path", STEERING].contains(name) {
                continue;
            }
            for byte in 0..=255u8 {
                let values = [
                    vec![byte],
                    [plausible.as_bytes(), &[byte]].concat(),
                    [&[byte], plausible.as_bytes()].concat(),
                ];
                for value in values {
                    let label = format!("{base_name}: {name}: {}", show(&value));
                    let rule_0 = rig.counter("sluice.shop.rule.0.matched");
                    rig.send(&label, &with(&base, name, &value), Answer::Ok);
                    // "always" with any byte added is not "always": the
                    // rule must not fire (no normalisation, no truncation,
                    // no trimming).
                    if *name == "x-canary" {
                        assert_eq!(
                            rig.counter("sluice.shop.rule.0.matched"),
                            rule_0,
                            "{label} matched equals \"always\""
                        );
                    }
                }
            }
        }
        sent += rig.sent;
        for (key, count) in &rig.tally {
            *tally.entry(key.clone()).or_default() += count;
        }
    }
    eprintln!(
        "every byte: {sent} requests (21 headers x 3 services + 3 x no service, x 256 bytes x \
         3 positions) in {:.1?}, no trap; outcomes {tally:?}",
        began.elapsed()
    );
    // Not vacuous: every service was reached and some requests matched none.
    for key in [
        "shop_v1",
        "shop_v2",
        "cart_v1",
        "cart_v2",
        "api_v1",
        "unmatched",
    ] {
        assert!(
            tally.get(key).copied().unwrap_or(0) > 100,
            "{key}: {tally:?}"
        );
    }
}

#[test]
fn invalid_utf8_empty_huge_and_numeric_edge_values_in_every_header() {
    let mut rig = Rig::start();
    let began = Instant::now();
    let values: Vec<Vec<u8>> = invalid_utf8().into_iter().chain(edge_values()).collect();
    for (base_name, base) in bases() {
        for (name, _) in TARGETS {
            for value in &values {
                let label = format!("{base_name}: {name}: {}", show(value));
                rig.send(&label, &with(&base, name, value), Answer::Ok);
            }
        }
    }
    // Every header the config reads, hostile at once, in one request.
    for value in &values {
        for (base_name, base) in bases() {
            let mut pairs = base.clone();
            for (name, _) in TARGETS {
                pairs = with(&pairs, name, value);
            }
            rig.send(
                &format!("{base_name}: all: {}", show(value)),
                &pairs,
                Answer::Ok,
            );
        }
    }
    rig.report("edge values", began);
}

#[test]
fn deadlines_and_forged_timeouts_only_ever_lower_the_timeout() {
    let mut rig = Rig::start();
    let (_, shop) = bases().into_iter().next().unwrap();
    let forged: &[(&str, &str)] = &[
        ("x-envoy-max-retries", "10"),
        ("x-envoy-upstream-rq-timeout-ms", "600000"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "600000"),
        ("x-envoy-expected-rq-timeout-ms", "600000"),
        ("x-envoy-hedge-on-per-try-timeout", "true"),
    ];
    // (deadline headers, the timeout the filter must write, retries at most)
    let cases: &[(Headers, u64, u32)] = &[
        (&[], 5_000, 2),
        (&[("x-request-timeout-ms", "300")], 300, 0),
        (&[("x-request-timeout-ms", "2500")], 2_500, 1),
        (&[("x-request-timeout-ms", "999999999999")], 5_000, 2),
        (
            &[("x-request-timeout-ms", "18446744073709551616")],
            5_000,
            2,
        ),
        (&[("x-request-timeout-ms", "-1")], 5_000, 2),
        (&[("x-request-timeout-ms", "0")], 1, 0),
        (&[("grpc-timeout", "1200m")], 1_200, 0),
        (&[("grpc-timeout", "99999999H")], 5_000, 2),
        (&[("grpc-timeout", "999999999H")], 5_000, 2),
        (&[("grpc-timeout", "0n")], 1, 0),
        (
            &[("grpc-timeout", "3S"), ("x-request-timeout-ms", "2100")],
            2_100,
            1,
        ),
        (&[("grpc-timeout", "3S,1S")], 5_000, 2),
        (&[("grpc-timeout", "\u{ff}1S")], 5_000, 2),
    ];
    for (deadline, timeout, retries) in cases {
        for with_forged in [false, true] {
            let mut pairs = shop.clone();
            for (k, v) in deadline
                .iter()
                .chain(if with_forged { forged } else { &[] })
            {
                pairs.push((*k, v.as_bytes().to_vec()));
            }
            let label = format!("deadline {deadline:?}, forged {with_forged}");
            let vm = rig.workers[0].clone();
            let stream = vm.stream();
            let mut map = HeaderMap::new(HeaderMapKind::RequestHeaders);
            for (k, v) in &pairs {
                map.add(k, v);
            }
            stream.request_headers_map(map, true);
            assert!(vm.trapped().is_none(), "{label}");
            let after = stream.request_header_map();
            assert_eq!(
                after.get_all("x-envoy-upstream-rq-timeout-ms"),
                vec![timeout.to_string()],
                "{label}"
            );
            assert_eq!(
                after.get_all("x-envoy-upstream-rq-per-try-timeout-ms"),
                vec!["1000".to_string()],
                "{label}"
            );
            let granted: u32 = after.get("x-envoy-max-retries").unwrap().parse().unwrap();
            assert!(granted <= *retries, "{label}: {granted} retries");
            assert!(after.get_all("x-envoy-expected-rq-timeout-ms").is_empty());
            assert!(after.get_all("x-envoy-hedge-on-per-try-timeout").is_empty());
            stream.set_attempt_count(1);
            stream.response_headers(&[(":status", "200")], true);
            stream.finish();
        }
    }
    // And through the checks of `Rig::send` on the cart (no per-try timeout,
    // its own deadline header) and the api (no timeout: forged ones removed).
    let all = bases();
    for (base_name, base) in &all[1..3] {
        for (deadline, _, _) in cases {
            let mut pairs = base.clone();
            for (k, v) in deadline.iter().chain(forged) {
                let k: &'static str = if *k == "x-request-timeout-ms" {
                    "x-deadline-ms"
                } else {
                    k
                };
                pairs.push((k, v.as_bytes().to_vec()));
            }
            rig.send(&format!("{base_name}: {deadline:?}"), &pairs, Answer::Ok);
        }
    }
}

#[test]
fn thousands_of_cookies_and_hostile_cookie_syntax() {
    let mut rig = Rig::start();
    let began = Instant::now();
    let filler: Vec<String> = (0..5_000).map(|i| format!("c{i}=v{i}")).collect();
    let join = |parts: &[String]| parts.join("; ").into_bytes();
    let mut cookies: Vec<Vec<u8>> = Vec::new();
    for wanted in [
        "beta=yes",
        "sid=test-9",
        "cart-beta=1",
        "group=qa",
        "sid=s-1",
    ] {
        let mut front = vec![wanted.to_string()];
        front.extend(filler.iter().cloned());
        cookies.push(join(&front));
        let mut back = filler.clone();
        back.push(wanted.to_string());
        cookies.push(join(&back));
        let mut middle = filler.clone();
        middle.insert(2_500, wanted.to_string());
        cookies.push(join(&middle));
        // The same cookie 5000 times.
        cookies.push(join(&vec![wanted.to_string(); 5_000]));
    }
    // 5000 cookies with no `=`, empty names, empty values, quotes, only
    // separators, binary.
    cookies.push(join(&vec!["sid".to_string(); 5_000]));
    cookies.push(join(&vec!["=".to_string(); 5_000]));
    cookies.push(join(&vec!["=x".to_string(); 5_000]));
    cookies.push(join(&vec!["sid=".to_string(); 5_000]));
    cookies.push(join(&vec!["sid=\"".to_string(); 5_000]));
    cookies.push(join(&vec!["sid=\"\"".to_string(); 5_000]));
    cookies.push(b";".repeat(HUGE));
    cookies.push(b"; ".repeat(HUGE / 2));
    cookies.push(b"=".repeat(HUGE));
    cookies.push([b"sid=".as_slice(), &vec![0xff; HUGE]].concat());
    cookies.push([b"beta=".as_slice(), &vec![b'y'; HUGE]].concat());
    cookies.push([b"sid=\"".as_slice(), &vec![b'a'; HUGE], b"\""].concat());
    cookies.push((0..=255u8).cycle().take(HUGE).collect());
    for byte in 0..=255u8 {
        cookies.push([b"beta=yes".as_slice(), &[byte]].concat());
        cookies.push([&[byte], b"beta=yes".as_slice()].concat());
        cookies.push([b"sid=".as_slice(), &[byte], b"; beta=yes"].concat());
        cookies.push([b"be".as_slice(), &[byte], b"ta=yes"].concat());
        cookies.push([b"sid".as_slice(), &[byte], b"=test-1"].concat());
    }
    for (base_name, base) in bases() {
        for value in &cookies {
            rig.send(
                &format!("{base_name}: cookie {}", show(value)),
                &with(&base, "cookie", value),
                Answer::Ok,
            );
        }
    }
    // Many cookie headers (a client may send several; HTTP/2 splits them):
    // 100, 1000 and 5000 of them, the interesting one first or last.
    for count in [100usize, 1_000, 5_000] {
        for (base_name, base) in bases() {
            for wanted_first in [true, false] {
                let mut pairs: Pairs = base
                    .iter()
                    .filter(|(k, _)| *k != "cookie")
                    .cloned()
                    .collect();
                if wanted_first {
                    pairs.push(("cookie", b"sid=test-1; beta=yes".to_vec()));
                }
                for i in 0..count {
                    pairs.push(("cookie", format!("c{i}=v{i}").into_bytes()));
                }
                if !wanted_first {
                    pairs.push(("cookie", b"sid=test-1; beta=yes".to_vec()));
                }
                rig.send(
                    &format!("{base_name}: {count} cookie headers, first {wanted_first}"),
                    &pairs,
                    Answer::Ok,
                );
            }
        }
    }
    rig.report("cookies", began);
}

#[test]
fn repeated_headers_missing_pseudo_headers_and_no_headers_at_all() {
    let mut rig = Rig::start();
    let began = Instant::now();
    let hostile: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0xff, 0xfe],
        b"admin_secret".to_vec(),
        b"10".to_vec(),
        vec![b'z'; HUGE / 4],
    ];
    for (base_name, base) in bases() {
        for (name, plausible) in TARGETS {
            for value in &hostile {
                let plausible = plausible.as_bytes().to_vec();
                // Hostile first, then plausible; plausible first, then
                // hostile; the hostile one 50 times.
                let orders = [
                    vec![value.clone(), plausible.clone()],
                    vec![plausible.clone(), value.clone()],
                    vec![value.clone(); 50],
                ];
                for (index, order) in orders.iter().enumerate() {
                    let mut pairs: Pairs =
                        base.iter().filter(|(k, _)| k != name).cloned().collect();
                    for v in order {
                        pairs.push((*name, v.clone()));
                    }
                    rig.send(
                        &format!("{base_name}: {name} repeated ({index}) {}", show(value)),
                        &pairs,
                        Answer::Ok,
                    );
                }
            }
        }
        // Each pseudo-header missing, and every header missing but one.
        for missing in [":authority", ":path", ":method", ":scheme"] {
            let pairs: Pairs = base
                .iter()
                .filter(|(k, _)| *k != missing)
                .cloned()
                .collect();
            rig.send(&format!("{base_name}: no {missing}"), &pairs, Answer::Ok);
        }
        for (name, value) in &base {
            rig.send(
                &format!("{base_name}: only {name}"),
                &[(*name, value.clone())],
                Answer::Ok,
            );
        }
    }
    // No headers at all, on both workers.
    for index in 0..4 {
        let outcome = rig.send(&format!("no headers {index}"), &[], Answer::Ok);
        // `*` matches any host, but the api's path prefix needs a :path:
        // without one the path counts as "/", so nothing matches.
        assert_eq!(outcome, Outcome::Unmatched);
    }
    // Without :authority, only the any-host service can match.
    let outcome = rig.send(
        "api without :authority",
        &[
            (":path", b"/api/v1".to_vec()),
            ("x-envoy-max-retries", b"10".to_vec()),
        ],
        Answer::Ok,
    );
    assert_eq!(
        outcome,
        Outcome::Steered {
            cluster: "api_v1".into(),
            granted: 0
        }
    );
    // Every target header at once with an empty value.
    for (base_name, base) in bases() {
        let mut pairs = base.clone();
        for (name, _) in TARGETS {
            pairs = with(&pairs, name, b"");
        }
        rig.send(&format!("{base_name}: all empty"), &pairs, Answer::Ok);
    }
    rig.report("repeated and missing", began);
}

#[test]
fn hostile_traffic_through_open_breakers_a_rollback_and_config_pushes() {
    let mut rig = Rig::start();
    let began = Instant::now();
    let values: Vec<Vec<u8>> = invalid_utf8()
        .into_iter()
        .chain([
            Vec::new(),
            vec![0xff; HUGE],
            b"always".to_vec(),
            b"never".to_vec(),
            b"sid=test-1; beta=yes".to_vec(),
            b"admin_secret".to_vec(),
        ])
        .collect();
    let round = |rig: &mut Rig, phase: &str, answer: Answer| {
        for (base_name, base) in bases() {
            for (name, _) in TARGETS {
                for value in &values {
                    rig.send(
                        &format!("{phase}: {base_name}: {name}: {}", show(value)),
                        &with(&base, name, value),
                        answer,
                    );
                }
            }
        }
    };

    // 1. Healthy. It also warms the VMs' heaps up (60 KiB values included).
    round(&mut rig, "healthy", Answer::Ok);
    let memory = |rig: &Rig| -> Vec<usize> { rig.workers.iter().map(Vm::memory_size).collect() };
    let warm = memory(&rig);
    let keys = rig.proxy.shared_data_keys().len();
    // 2. Everything fails: the breakers open (canary traffic moves to
    //    stable, stable answers with the local 503) and the rollout rolls
    //    back; the hostile requests go on.
    round(&mut rig, "outage", Answer::Fail);
    assert!(rig.counter("sluice.shop.breaker.stable.trips") >= 1);
    assert!(rig.counter("sluice.cart.breaker.stable.trips") >= 1);
    assert!(rig.counter("sluice.shop.rollout.rollbacks") >= 1);
    assert!(rig.tally.get("rejected").copied().unwrap_or(0) > 0);
    // 3. Half-open: the probes go out, with hostile headers, and succeed.
    rig.proxy.advance_ms(30_000);
    round(&mut rig, "recovery", Answer::Ok);
    // 4. A config push (the cart's weight) and a refused one, then more.
    let pushed = CONFIG.replace(r#""weight": 30"#, r#""weight": 70"#);
    assert_ne!(pushed, CONFIG);
    rig.proxy.reconfigure(pushed).unwrap();
    let refused = CONFIG.replace(r#""weight": 30"#, r#""weight": 130"#);
    assert!(rig.proxy.reconfigure(refused).is_err());
    round(&mut rig, "after push", Answer::Ok);
    rig.proxy.advance_ms(600_000);
    round(&mut rig, "later", Answer::Ok);
    rig.report("breakers, rollback, pushes", began);
    // Hostile input leaves nothing behind: no per-request shared state, and
    // the VMs' linear memory does not grow after the first round.
    let end = memory(&rig);
    eprintln!(
        "worker linear memory after the first round {warm:?} bytes, at the end {end:?}; \
         shared data keys {keys} -> {}",
        rig.proxy.shared_data_keys().len()
    );
    assert_eq!(rig.proxy.shared_data_keys().len(), keys);
    for (warm, end) in warm.iter().zip(&end) {
        assert!(
            *end <= warm + 64 * 1024,
            "linear memory grew from {warm} to {end}"
        );
    }
}
