//! Hostile traffic against Sluice in a real Envoy (`--concurrency 2`, two
//! worker VMs), sent as raw HTTP/1.1 bytes over a `TcpStream`:
//!
//! - every byte value in every header the config reads (rule headers and
//!   cookies, `user-agent`, the sticky header, `grpc-timeout`, the deadline
//!   header), in `Host` and the path, and in the steering and retry headers;
//!   Envoy's codec refuses control bytes with a 400 before any filter runs,
//!   and passes obs-text (0x80-0xFF) on, so Sluice sees invalid UTF-8;
//! - header values of 40 and 56 KiB (`max_request_headers_kb` raised to 96),
//!   5000 cookies in one header, repeated headers, empty `Host`, HTTP/1.0
//!   and HTTP/1.1 without `Host` (Envoy answers 400 `missing host header`
//!   itself: in real Envoy a request without :authority never reaches a
//!   filter; the wasmtime host tests cover that case);
//! - a forged steering header naming a cluster that exists in Envoy but not
//!   in Sluice's config; forged `x-envoy-max-retries: 10` against a failing
//!   upstream (upstream attempts counted) and forged timeouts against a
//!   hanging one.
//!
//! The clients are INTERNAL (`use_remote_address` with 127.0.0.1 as an
//! internal address, as in retry.rs): Envoy strips the `x-envoy-*` retry and
//! timeout headers of external requests by itself, so only with internal
//! clients does the test show that Sluice overwrites them. Control requests
//! to a host no service matches show Envoy obeying the client there; a
//! service without a retry block removes them.
//!
//! Every test ends by checking the worker VMs are healthy: no VM was
//! reloaded or created after start-up (`wasm.sluice.vm_reload*`,
//! `wasm.envoy.wasm.runtime.v8.created`), no wasm error, critical or panic
//! line in Envoy's log, and ordinary requests still routed correctly on
//! connections of BOTH workers.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first, and
//! Envoy from `scripts/setup.sh`.

// A failing harness is a failing test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Client, Envoy, EnvoyConfig, Response, Upstream};

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
                      (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";

/// Sluice's config: a routed service with rules, sticky key, retry and
/// breaker; a failing and a hanging service with retry blocks; control
/// services without one; an any-host service for requests with an empty
/// `Host`.
fn sluice() -> serde_json::Value {
    json!({
        "steering_header": "x-sluice-cluster",
        "services": [
            {
                "name": "shop",
                "match": {"authority": "shop.local"},
                "stable": "shop_v1",
                "canary": "shop_v2",
                "weight": 50,
                "sticky": {"header": "x-user-id"},
                "rules": [
                    {"header": "x-canary", "equals": "always", "to": "canary"},
                    {"header": "x-canary", "equals": "never", "to": "stable"},
                    {"cookie": "beta", "equals": "yes", "to": "canary"},
                    {"device": "mobile", "weight": 50}
                ],
                "retry": {
                    "max_retries": 1,
                    "per_try_timeout_ms": 2000,
                    "timeout_ms": 4000,
                    "deadline_header": "x-request-timeout-ms"
                },
                "breaker": {"min_requests": 1000, "failure_rate": 0.9}
            },
            {
                "name": "flaky",
                "match": {"authority": "flaky.local"},
                "stable": "flaky_v1",
                "retry": {
                    "max_retries": 1,
                    "budget": {"ratio": 1, "min_per_s": 1000, "window_s": 10}
                }
            },
            {
                "name": "slow",
                "match": {"authority": "slow.local"},
                "stable": "slow_v1",
                "retry": {
                    "max_retries": 1,
                    "timeout_ms": 800,
                    "deadline_header": "x-request-timeout-ms"
                }
            },
            {"name": "open", "match": {"authority": "open.local"}, "stable": "flaky_v1"},
            {
                "name": "api",
                "match": {"authority": "*", "path_prefix": "/api/"},
                "stable": "api_v1",
                "retry": {"max_retries": 0}
            }
        ]
    })
}

/// Internal clients, headers up to 96 KiB, HTTP/1.0 parsed (not refused
/// with 426) so that a request without `Host` gets to the header checks.
const HCM: &str = "          codec_type: AUTO
          use_remote_address: true
          internal_address_config:
            cidr_ranges:
            - address_prefix: 127.0.0.1
              prefix_len: 32
          max_request_headers_kb: 96
          http_protocol_options:
            accept_http_10: true
";

/// Envoy's own circuit breaker must never be what limits retries.
const CIRCUIT_BREAKERS: &str = "    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 100000
";

struct Rig {
    stable: Upstream,
    canary: Upstream,
    api: Upstream,
    /// A cluster Envoy has and Sluice's config never names.
    secret: Upstream,
    flaky: Upstream,
    hung: Upstream,
    envoy: Envoy,
    vms_created: u64,
}

impl Rig {
    fn start() -> Rig {
        if let Err(message) = sluice_envoy::require_wasm() {
            panic!("{message}");
        }
        let stable = Upstream::start("stable").unwrap();
        let canary = Upstream::start("canary").unwrap();
        let api = Upstream::start("api").unwrap();
        let secret = Upstream::start("admin_secret").unwrap();
        let flaky = Upstream::start("flaky").unwrap();
        flaky.set_fail_all(true);
        let hung = Upstream::start("hung").unwrap();
        hung.set_hang(true);
        let yaml = EnvoyConfig::from_json(&sluice())
            .upstream("shop_v1", &stable) // first: the fallback route
            .upstream("shop_v2", &canary)
            .upstream("api_v1", &api)
            .upstream("admin_secret", &secret)
            .upstream("flaky_v1", &flaky)
            .upstream("slow_v1", &hung)
            .route_timeout(Duration::from_secs(10))
            .to_yaml();
        assert!(yaml.contains("          codec_type: AUTO\n"), "{yaml}");
        assert!(yaml.contains("    connect_timeout: 1s\n"), "{yaml}");
        let yaml = yaml
            .replace("          codec_type: AUTO\n", HCM)
            .replace("    connect_timeout: 1s\n", CIRCUIT_BREAKERS);
        let envoy =
            Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        let vms_created = envoy
            .stat("wasm.envoy.wasm.runtime.v8.created")
            .unwrap()
            .unwrap_or_else(|| panic!("no wasm VM stat in /stats"));
        Rig {
            stable,
            canary,
            api,
            secret,
            flaky,
            hung,
            envoy,
            vms_created,
        }
    }

    fn client(&self) -> Client {
        self.envoy.client().with_timeout(Duration::from_secs(10))
    }

    fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).unwrap().unwrap_or(0)
    }

    /// The worker VMs are healthy: none trapped (FAIL_RELOAD would have
    /// reloaded it, FAIL_CLOSED failed it: either shows in the stats), the
    /// log has no wasm error, and both workers still route correctly.
    fn assert_healthy(&self) {
        let stats = self.envoy.stats().unwrap();
        for name in [
            "wasm.sluice.vm_reload",
            "wasm.sluice.vm_reload_success",
            "wasm.sluice.vm_reload_failure",
            "wasm.sluice.vm_reload_backoff",
        ] {
            assert_eq!(stats.get(name).copied().unwrap_or(0), 0, "{name}");
        }
        assert_eq!(
            stats.get("wasm.envoy.wasm.runtime.v8.created").copied(),
            Some(self.vms_created),
            "a wasm VM was created after start-up (a reload?)"
        );
        let bad: Vec<String> = self
            .envoy
            .log()
            .lines()
            .filter(|line| {
                line.contains("panicked")
                    || line.contains("wasm_fail_stream")
                    || ((line.contains("][error][") || line.contains("][critical]["))
                        && line.to_ascii_lowercase().contains("wasm"))
                    || (line.contains("][wasm]") && line.contains(" failed"))
            })
            .map(str::to_string)
            .collect();
        assert!(
            bad.is_empty(),
            "wasm errors in Envoy's log:\n{}",
            bad.join("\n")
        );

        // Open connections one at a time and see which worker accepted each,
        // until both workers have one; then route through every one of them.
        let mut clients: Vec<(u32, Client)> = Vec::new();
        for _ in 0..32 {
            let before = self.envoy.worker_connections().unwrap();
            let client = Client::connect(self.envoy.addr())
                .unwrap()
                .with_timeout(Duration::from_secs(10));
            let deadline = Instant::now() + Duration::from_secs(2);
            let worker = loop {
                let now = self.envoy.worker_connections().unwrap();
                let grew: Vec<u32> = now
                    .iter()
                    .filter(|(w, n)| before.get(w).copied().unwrap_or(0) < **n)
                    .map(|(w, _)| *w)
                    .collect();
                if grew.len() == 1 {
                    break Some(grew[0]);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if let Some(worker) = worker {
                clients.push((worker, client));
            }
            let workers: BTreeSet<u32> = clients.iter().map(|(w, _)| *w).collect();
            if workers.len() >= 2 {
                break;
            }
        }
        let workers: BTreeSet<u32> = clients.iter().map(|(w, _)| *w).collect();
        assert!(workers.len() >= 2, "no connection reached both workers");
        for (worker, client) in &mut clients {
            let canary = client
                .get("shop.local", "/", &[("x-canary", "always")])
                .unwrap();
            assert_eq!(
                (canary.status, canary.upstream()),
                (200, Some("canary")),
                "worker {worker}"
            );
            let stable = client
                .get("shop.local", "/", &[("x-canary", "never")])
                .unwrap();
            assert_eq!(
                (stable.status, stable.upstream()),
                (200, Some("stable")),
                "worker {worker}"
            );
            let api = client.get("any.example", "/api/v1", &[]).unwrap();
            assert_eq!(
                (api.status, api.upstream()),
                (200, Some("api")),
                "worker {worker}"
            );
        }
        assert_eq!(self.secret.requests(), 0, "a request reached admin_secret");
    }

    /// Every request an upstream got carries the steering header of exactly
    /// its own cluster, or (stable only, the fallback route) none when it
    /// matched no service.
    fn assert_steering_at_upstreams(&self) {
        for (upstream, cluster) in [
            (&self.stable, "shop_v1"),
            (&self.canary, "shop_v2"),
            (&self.api, "api_v1"),
        ] {
            for record in upstream.recorded() {
                let steering: Vec<&str> = record
                    .headers
                    .iter()
                    .filter(|(k, _)| k == "x-sluice-cluster")
                    .map(|(_, v)| v.as_str())
                    .collect();
                let fallback = upstream.name() == "stable" && steering.is_empty();
                assert!(
                    steering == [cluster] || fallback,
                    "{} got steering {steering:?} (host {:?})",
                    upstream.name(),
                    record.header("host")
                );
            }
        }
        assert_eq!(self.secret.requests(), 0, "a request reached admin_secret");
    }
}

/// Extra headers of a raw request.
type RawHeaders = Vec<(&'static str, &'static [u8])>;

/// A raw request: `GET path` with `host` (if any) and `headers`, bytes as
/// given.
fn raw(version: &str, host: Option<&[u8]>, path: &[u8], headers: &[(&str, &[u8])]) -> Vec<u8> {
    let mut wire = b"GET ".to_vec();
    wire.extend_from_slice(path);
    wire.extend_from_slice(format!(" {version}\r\n").as_bytes());
    if let Some(host) = host {
        wire.extend_from_slice(b"host: ");
        wire.extend_from_slice(host);
        wire.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        wire.extend_from_slice(name.as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

/// Headers for a message: values escaped, long ones cut.
fn show(headers: &[(&str, &[u8])]) -> String {
    let parts: Vec<String> = headers
        .iter()
        .map(|(name, value)| {
            let text: String = value
                .iter()
                .take(24)
                .flat_map(|&b| std::ascii::escape_default(b))
                .map(char::from)
                .collect();
            if value.len() > 24 {
                format!("{name}: {text}... ({} bytes)", value.len())
            } else {
                format!("{name}: {text}")
            }
        })
        .collect();
    parts.join(", ")
}

/// Sends raw requests over `conns` keep-alive connections in parallel;
/// responses in request order.
fn send_all(envoy: &Envoy, conns: usize, requests: &[Vec<u8>]) -> Vec<Response> {
    let mut out: Vec<Option<Response>> = vec![None; requests.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..conns)
            .map(|t| {
                let mut client = envoy.client().with_timeout(Duration::from_secs(10));
                scope.spawn(move || {
                    requests
                        .iter()
                        .enumerate()
                        .skip(t)
                        .step_by(conns)
                        .map(|(i, wire)| {
                            let response = client.send_raw(wire).unwrap_or_else(|e| {
                                panic!(
                                    "request {i} got no response: {e}: {:?}",
                                    String::from_utf8_lossy(&wire[..wire.len().min(200)])
                                )
                            });
                            (i, response)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, response) in handle.join().unwrap() {
                out[i] = Some(response);
            }
        }
    });
    out.into_iter().map(Option::unwrap).collect()
}

/// A response is either an upstream's 200 from one of `allowed`, or Envoy's
/// own 400 for a request its codec refused (no upstream). Returns whether
/// it reached an upstream.
fn accepted_or_refused(what: &str, response: &Response, allowed: &[&str]) -> bool {
    match response.upstream() {
        Some(upstream) => {
            assert_eq!(response.status, 200, "{what}: {}", response.body_text());
            assert!(allowed.contains(&upstream), "{what}: served by {upstream}");
            true
        }
        None => {
            assert_eq!(
                response.status,
                400,
                "{what}: {} not from an upstream: {}",
                response.status,
                response.body_text()
            );
            false
        }
    }
}

#[test]
fn every_byte_in_every_header_never_traps_or_misroutes() {
    let rig = Rig::start();
    let began = Instant::now();
    // (header, a value an attacker would start from)
    let targets: &[(&str, &str)] = &[
        ("x-canary", "always"),
        ("cookie", "beta=yes"),
        ("user-agent", IPHONE),
        ("x-user-id", "alice"),
        ("grpc-timeout", "100m"),
        ("x-request-timeout-ms", "300"),
        ("x-sluice-cluster", "admin_secret"),
        ("x-envoy-max-retries", "10"),
        ("x-envoy-upstream-rq-timeout-ms", "60000"),
        ("x-envoy-retry-on", "5xx"),
    ];
    // (label, raw request, where it may go)
    let mut cases: Vec<(String, Vec<u8>, &[&str])> = Vec::new();
    let shop: &[&str] = &["stable", "canary"];
    for (name, plausible) in targets {
        for byte in 0..=255u8 {
            for (position, value) in [
                ("after", [plausible.as_bytes(), &[byte]].concat()),
                ("before", [&[byte], plausible.as_bytes()].concat()),
            ] {
                let user = format!("u{byte}");
                // The sticky header itself is the hostile one when it is the
                // target (the filter reads the first value).
                let mut headers: Vec<(&str, &[u8])> = vec![(name, &value)];
                if *name != "x-user-id" {
                    headers.insert(0, ("x-user-id", user.as_bytes()));
                }
                cases.push((
                    format!("{name} {byte:#04x} {position}"),
                    raw("HTTP/1.1", Some(b"shop.local"), b"/", &headers),
                    shop,
                ));
            }
        }
    }
    for byte in 0..=255u8 {
        for (position, host) in [
            ("after", [b"shop.local".as_slice(), &[byte]].concat()),
            ("before", [&[byte], b"shop.local".as_slice()].concat()),
        ] {
            cases.push((
                format!("host {byte:#04x} {position}"),
                raw("HTTP/1.1", Some(&host), b"/", &[]),
                shop,
            ));
        }
        for (position, path) in [
            ("after", [b"/api/v".as_slice(), &[byte]].concat()),
            ("inside", [b"/".as_slice(), &[byte], b"api/"].concat()),
        ] {
            cases.push((
                format!("path {byte:#04x} {position}"),
                raw("HTTP/1.1", Some(b"any.example"), &path, &[]),
                &["api", "stable"],
            ));
        }
    }
    let requests: Vec<Vec<u8>> = cases.iter().map(|(_, wire, _)| wire.clone()).collect();
    let responses = send_all(&rig.envoy, 4, &requests);
    let mut accepted: BTreeMap<String, BTreeSet<u8>> = BTreeMap::new();
    for ((label, _, allowed), response) in cases.iter().zip(&responses) {
        if accepted_or_refused(label, response, allowed) {
            let mut parts = label.split(' ');
            let name = parts.next().unwrap().to_string();
            let byte = u8::from_str_radix(parts.next().unwrap().trim_start_matches("0x"), 16);
            accepted.entry(name).or_default().insert(byte.unwrap());
        }
    }
    // Envoy passes obs-text on in header values: the filter really saw
    // bytes 0x80-0xFF (invalid UTF-8) in every one of these headers.
    for (name, _) in targets {
        let bytes = &accepted[*name];
        assert!(
            (0x80..=0xff).all(|b| bytes.contains(&b)),
            "{name}: Envoy refused some obs-text bytes: accepted {bytes:?}"
        );
    }
    let reached = responses.iter().filter(|r| r.upstream().is_some()).count();
    eprintln!(
        "envoy every byte: {} raw requests in {:.1?}, {reached} reached an upstream, {} refused \
         by Envoy's codec (400); accepted bytes per header: {:?}",
        responses.len(),
        began.elapsed(),
        responses.len() - reached,
        accepted
            .iter()
            .map(|(k, v)| (k.as_str(), v.len()))
            .collect::<BTreeMap<_, _>>()
    );
    rig.assert_steering_at_upstreams();
    rig.assert_healthy();
}

#[test]
fn huge_headers_thousands_of_cookies_repeats_and_missing_host() {
    let rig = Rig::start();
    let began = Instant::now();
    let mut client = rig.client();
    let mut send = |what: &str, wire: Vec<u8>| -> Response {
        client
            .send_raw(&wire)
            .unwrap_or_else(|e| panic!("{what}: no response: {e}"))
    };
    let side = |what: &str, r: &Response| -> String {
        assert_eq!(r.status, 200, "{what}: {}", r.body_text());
        r.upstream().unwrap_or("-").to_string()
    };
    let shop = |headers: &[(&str, &[u8])]| raw("HTTP/1.1", Some(b"shop.local"), b"/", headers);

    // 40 and 56 KiB values in every header the config reads.
    for size in [40 * 1024, 56 * 1024] {
        let fillers: [(&str, Vec<u8>); 4] = [
            ("ascii", vec![b'a'; size]),
            ("obs-text", vec![0xff; size]),
            ("always", b"always".repeat(size / 6)),
            (
                "mixed",
                (0x80..=0xffu8)
                    .chain(b'a'..=b'z')
                    .cycle()
                    .take(size)
                    .collect(),
            ),
        ];
        for name in [
            "x-canary",
            "cookie",
            "user-agent",
            "x-user-id",
            "grpc-timeout",
            "x-request-timeout-ms",
            "x-sluice-cluster",
            "x-envoy-max-retries",
        ] {
            for (kind, value) in &fillers {
                let what = format!("{name}: {size} bytes {kind}");
                let r = send(&what, shop(&[(name, value)]));
                let got = side(&what, &r);
                assert!(
                    ["stable", "canary"].contains(&got.as_str()),
                    "{what}: {got}"
                );
            }
        }
        // A huge header does not hide the one that decides.
        let what = format!("{size}-byte user-agent with x-canary: always");
        let r = send(
            &what,
            shop(&[("user-agent", &vec![b'M'; size]), ("x-canary", b"always")]),
        );
        assert_eq!(side(&what, &r), "canary");
    }
    // Over the limit: Envoy's 431, before any filter.
    let r = send("100 KiB", shop(&[("user-agent", &vec![b'a'; 100 * 1024])]));
    assert_eq!((r.status, r.upstream()), (431, None));

    // 5000 cookies in one header (about 45 KiB), the deciding one first,
    // in the middle, last, or absent.
    let filler: Vec<String> = (0..5_000).map(|i| format!("a{i:x}=1")).collect();
    for (place, at) in [
        ("first", Some(0)),
        ("middle", Some(2_500)),
        ("last", Some(5_000)),
        ("absent", None),
    ] {
        let mut cookies = filler.clone();
        if let Some(at) = at {
            cookies.insert(at, "beta=yes".to_string());
        }
        let cookie = cookies.join("; ");
        let what = format!("5000 cookies, beta=yes {place}");
        let r = send(
            &what,
            shop(&[("cookie", cookie.as_bytes()), ("x-canary", b"never")]),
        );
        // x-canary: never is rule 1, before the cookie rule: always stable.
        assert_eq!(side(&what, &r), "stable", "{what}");
        let r = send(
            &what,
            shop(&[("cookie", cookie.as_bytes()), ("x-user-id", b"u1")]),
        );
        let got = side(&what, &r);
        if at.is_some() {
            assert_eq!(got, "canary", "{what}");
        }
    }
    // 5000 cookies of hostile syntax.
    for (kind, cookie) in [
        ("no =", vec!["beta"; 5_000].join("; ")),
        ("empty names", vec!["=yes"; 5_000].join("; ")),
        ("quotes", vec!["beta=\""; 5_000].join("; ")),
        ("separators", ";".repeat(40_000)),
    ] {
        let what = format!("5000 cookies: {kind}");
        let r = send(&what, shop(&[("cookie", cookie.as_bytes())]));
        side(&what, &r);
    }
    // 90 cookie headers (Envoy allows 100 headers): the filter reads the
    // first, as Envoy's header API returns it.
    let mut many: Vec<(&str, Vec<u8>)> = vec![("cookie", b"beta=yes".to_vec())];
    many.extend((0..89).map(|i| ("cookie", format!("c{i}=1").into_bytes())));
    let many: Vec<(&str, &[u8])> = many.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let r = send("90 cookie headers", shop(&many));
    assert_eq!(side("90 cookie headers", &r), "canary");

    // Repeated headers: the first value decides.
    let r = send(
        "x-canary always, never",
        shop(&[("x-canary", b"always"), ("x-canary", b"never")]),
    );
    assert_eq!(side("always, never", &r), "canary");
    let r = send(
        "x-canary never, always",
        shop(&[("x-canary", b"never"), ("x-canary", b"always")]),
    );
    assert_eq!(side("never, always", &r), "stable");
    let r = send(
        "x-canary \\xff, always",
        shop(&[
            ("x-canary", b"\xff"),
            ("x-canary", b"always"),
            ("x-canary", b"never"),
        ]),
    );
    side("\\xff, always", &r);
    for count in [2, 50, 90] {
        for name in [
            "x-sluice-cluster",
            "x-envoy-max-retries",
            "user-agent",
            "x-user-id",
        ] {
            let values: Vec<(&str, &[u8])> = (0..count)
                .map(|i| {
                    (
                        name,
                        if i % 2 == 0 {
                            b"admin_secret".as_slice()
                        } else {
                            b"\xfe\xff".as_slice()
                        },
                    )
                })
                .collect();
            let what = format!("{name} x{count}");
            let r = send(&what, shop(&values));
            let got = side(&what, &r);
            assert!(
                ["stable", "canary"].contains(&got.as_str()),
                "{what}: {got}"
            );
        }
    }

    // Forged steering headers: a cluster Envoy has but Sluice does not name.
    for (what, host, value) in [
        (
            "forged, matched",
            b"shop.local".as_slice(),
            b"admin_secret".as_slice(),
        ),
        ("forged, unmatched", b"elsewhere.local", b"admin_secret"),
        ("forged, empty host, api", b"", b"admin_secret"),
        ("forged upper-case", b"shop.local", b"ADMIN_SECRET"),
        ("forged with obs-text", b"shop.local", b"admin_secret\xff"),
        ("forged huge", b"elsewhere.local", &[b'a'; 50_000]),
    ] {
        let path: &[u8] = if host.is_empty() { b"/api/x" } else { b"/" };
        let r = send(
            what,
            raw("HTTP/1.1", Some(host), path, &[("X-Sluice-Cluster", value)]),
        );
        let got = side(what, &r);
        assert_ne!(got, "admin_secret", "{what}");
    }

    // Missing and empty Host. HTTP/1.1 without Host and HTTP/1.0 without
    // Host: Envoy answers 400 before the filters. An empty Host reaches the
    // filter with an empty :authority: only the any-host service matches.
    let before = rig.stable.requests() + rig.canary.requests() + rig.api.requests();
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        for path in [b"/".as_slice(), b"/api/x"] {
            let what = format!("{version} without Host, {}", String::from_utf8_lossy(path));
            let r = send(
                &what,
                raw(
                    version,
                    None,
                    path,
                    &[("x-sluice-cluster", b"admin_secret")],
                ),
            );
            assert_eq!(
                (r.status, r.upstream()),
                (400, None),
                "{what}: {}",
                r.body_text()
            );
        }
    }
    assert_eq!(
        rig.stable.requests() + rig.canary.requests() + rig.api.requests(),
        before,
        "a request without Host reached an upstream"
    );
    let r = send(
        "HTTP/1.0 with Host",
        raw(
            "HTTP/1.0",
            Some(b"shop.local"),
            b"/",
            &[("x-canary", b"always")],
        ),
    );
    assert_eq!(side("HTTP/1.0 with Host", &r), "canary");
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let what = format!("{version} empty Host, /api/");
        let r = send(
            &what,
            raw(
                version,
                Some(b""),
                b"/api/x",
                &[("x-sluice-cluster", b"admin_secret")],
            ),
        );
        assert_eq!(side(&what, &r), "api", "{what}");
        let what = format!("{version} empty Host, /");
        let r = send(
            &what,
            raw(
                version,
                Some(b""),
                b"/",
                &[("x-sluice-cluster", b"shop_v2")],
            ),
        );
        assert_eq!(side(&what, &r), "stable", "{what}: the fallback route");
    }
    // Absolute-form: the URI's authority is the :authority.
    let r = send(
        "absolute-form",
        raw(
            "HTTP/1.1",
            Some(b"elsewhere.local"),
            b"http://shop.local/",
            &[("x-canary", b"always")],
        ),
    );
    assert_eq!(side("absolute-form", &r), "canary");
    // No headers but Host, and no headers at all but an empty Host.
    let r = send("only host", raw("HTTP/1.1", Some(b"shop.local"), b"/", &[]));
    side("only host", &r);

    eprintln!(
        "envoy huge, cookies, repeats, missing host: done in {:.1?}",
        began.elapsed()
    );
    rig.assert_steering_at_upstreams();
    rig.assert_healthy();
}

#[test]
fn forged_retry_and_timeout_headers_raise_nothing() {
    let rig = Rig::start();
    rig.flaky.set_record_limit(0);
    let mut client = rig.client();

    // Control: where Sluice does not route (a host no service matches, sent
    // to stable by the fallback route, failing for the moment), Envoy obeys
    // an internal client's retry header, so what follows means something.
    let asked: RawHeaders = vec![("x-envoy-max-retries", b"3"), ("x-envoy-retry-on", b"5xx")];
    rig.stable.set_fail_all(true);
    let r = client
        .send_raw(&raw("HTTP/1.1", Some(b"elsewhere.local"), b"/", &asked))
        .unwrap();
    assert_eq!((r.status, r.upstream()), (503, Some("stable")));
    assert_eq!(
        rig.stable.requests(),
        4,
        "Envoy ignored the client's retry headers"
    );
    rig.stable.set_fail_all(false);
    rig.stable.reset_counters();
    // A service without a retry block: Sluice removes them, one attempt.
    let r = client
        .send_raw(&raw("HTTP/1.1", Some(b"open.local"), b"/", &asked))
        .unwrap();
    assert_eq!((r.status, r.upstream()), (503, Some("flaky")));
    assert_eq!(rig.flaky.requests(), 1, "a client added its own retries");
    rig.flaky.reset_counters();

    // max_retries 1 and a budget that never runs dry: exactly 2 attempts per
    // request, whatever the client asks for.
    let forged: Vec<RawHeaders> = vec![
        vec![("x-envoy-max-retries", b"10")],
        vec![
            ("x-envoy-max-retries", b"10"),
            ("x-envoy-retry-on", b"5xx,retriable-4xx,reset"),
        ],
        vec![
            ("x-envoy-max-retries", b"10"),
            ("x-envoy-max-retries", b"10"),
        ],
        vec![("x-envoy-max-retries", b"4294967295")],
        vec![("x-envoy-max-retries", b"18446744073709551616")],
        vec![("x-envoy-max-retries", b"10\xff")],
        vec![("x-envoy-max-retries", b"\xff")],
        vec![("x-envoy-max-retries", b"")],
        vec![("x-envoy-max-retries", b"-1")],
        vec![("x-envoy-max-retries", &[b'9'; 40_000])],
        vec![
            ("x-envoy-max-retries", b"10"),
            ("x-envoy-retriable-status-codes", b"503"),
            ("x-envoy-retry-on", b"retriable-status-codes"),
        ],
        vec![
            ("x-envoy-retry-grpc-on", b"cancelled,unavailable"),
            ("x-envoy-max-retries", b"10"),
        ],
        vec![
            ("x-envoy-hedge-on-per-try-timeout", b"true"),
            ("x-envoy-max-retries", b"10"),
        ],
        vec![
            ("x-envoy-max-retries", b"10"),
            ("x-envoy-upstream-rq-per-try-timeout-ms", b"1"),
            ("x-envoy-retry-on", b"5xx,per_try_timeout"),
        ],
    ];
    let rounds = 3;
    for _ in 0..rounds {
        for headers in &forged {
            let r = client
                .send_raw(&raw("HTTP/1.1", Some(b"flaky.local"), b"/", headers))
                .unwrap();
            assert_eq!(
                (r.status, r.upstream()),
                (503, Some("flaky")),
                "{}",
                show(headers)
            );
        }
    }
    let requests = (rounds * forged.len()) as u64;
    let attempts = rig.flaky.requests();
    eprintln!(
        "envoy forged retries: {requests} requests with x-envoy-max-retries up to 10 against \
         max_retries 1: {attempts} upstream attempts"
    );
    assert_eq!(
        attempts,
        2 * requests,
        "max_retries 1 means 2 attempts each"
    );
    assert_eq!(rig.stat("cluster.flaky_v1.upstream_rq_retry"), requests);

    // Timeouts. Control: Envoy obeys an internal client's timeout header
    // where Sluice does not route (stable hung for the moment).
    rig.stable.set_hang(true);
    let began = Instant::now();
    let r = client
        .send_raw(&raw(
            "HTTP/1.1",
            Some(b"elsewhere.local"),
            b"/",
            &[("x-envoy-upstream-rq-timeout-ms", b"300")],
        ))
        .unwrap();
    assert_eq!(r.status, 504);
    assert!(
        began.elapsed() < Duration::from_millis(700),
        "Envoy ignored the client's timeout header: {:?}",
        began.elapsed()
    );
    rig.stable.set_hang(false);
    // timeout_ms 800 (route: 10 s): every forged way of asking for more time
    // gets 800 ms at most; the deadline header can only shorten it.
    let forged: Vec<(RawHeaders, u64)> = vec![
        (vec![("x-envoy-upstream-rq-timeout-ms", b"60000")], 800),
        (
            vec![
                ("x-envoy-upstream-rq-timeout-ms", b"60000"),
                ("x-envoy-upstream-rq-timeout-ms", b"60000"),
            ],
            800,
        ),
        (vec![("x-envoy-upstream-rq-timeout-ms", b"0")], 800),
        (vec![("x-envoy-upstream-rq-timeout-ms", b"60000\xff")], 800),
        (
            vec![
                ("x-envoy-upstream-rq-per-try-timeout-ms", b"60000"),
                ("x-envoy-max-retries", b"10"),
            ],
            800,
        ),
        (vec![("x-envoy-expected-rq-timeout-ms", b"60000")], 800),
        (vec![("x-envoy-hedge-on-per-try-timeout", b"true")], 800),
        (vec![("grpc-timeout", b"99999999H")], 800),
        (vec![("grpc-timeout", b"\xff1S")], 800),
        (
            vec![("x-request-timeout-ms", b"99999999999999999999999")],
            800,
        ),
        (vec![("x-request-timeout-ms", &[0xff; 40_000])], 800),
        (
            vec![
                ("x-request-timeout-ms", b"300"),
                ("x-envoy-upstream-rq-timeout-ms", b"60000"),
            ],
            300,
        ),
        (
            vec![
                ("grpc-timeout", b"200m"),
                ("x-request-timeout-ms", b"100000"),
            ],
            200,
        ),
    ];
    let results: Vec<(u16, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = forged
            .iter()
            .map(|(headers, _)| {
                let mut client = rig.envoy.client().with_timeout(Duration::from_secs(15));
                let wire = raw("HTTP/1.1", Some(b"slow.local"), b"/", headers);
                scope.spawn(move || {
                    let sent = Instant::now();
                    let r = client.send_raw(&wire).unwrap();
                    (r.status, sent.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((headers, due_ms), (status, took)) in forged.iter().zip(&results) {
        let due = Duration::from_millis(*due_ms);
        let what = show(headers);
        eprintln!(
            "envoy forged timeout [{what}]: {status} after {} ms (due {due_ms})",
            took.as_millis()
        );
        assert_eq!(*status, 504, "{what}");
        assert!(
            *took >= due.saturating_sub(Duration::from_millis(50))
                && *took <= due + Duration::from_millis(700),
            "{what}: answered after {took:?}, due at {due:?}"
        );
    }
    // A global timeout ends the request: one attempt each, no retry.
    assert_eq!(rig.hung.requests(), forged.len() as u64);

    rig.assert_healthy();
}
