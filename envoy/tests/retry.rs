//! Sluice's retry governance, end to end: a real Envoy (`--concurrency 2`,
//! two worker VMs sharing one budget) loading the release sluice.wasm, a real
//! upstream that fails or hangs on demand and counts every attempt it gets.
//!
//! Sluice decides, Envoy's router executes: the route has no retry policy of
//! its own, so every retry the upstream sees was allowed by the headers the
//! filter wrote. The cluster's circuit breaker is raised
//! (`max_retries` defaults to 3 concurrent retries per cluster, which would
//! deny retries Sluice granted and hide what the budget does).
//!
//! The clients are made INTERNAL (`use_remote_address` with 127.0.0.1 as an
//! internal address): Envoy strips `x-envoy-max-retries` and the other retry
//! and timeout headers from external requests before any filter runs, but
//! honours them from internal callers (a mesh neighbour). That is the case
//! where only Sluice's overwriting stands between a client and its own
//! retries, so that is what the tests run; a control request to a host no
//! service matches shows Envoy really does obey the client there.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`. Run with
//! `cargo test -p sluice-envoy --test retry -- --nocapture` to see the
//! measured amplification and success rate.

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_envoy::config::INTERNAL_CLIENTS;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Envoy, EnvoyConfig, Upstream};

const RATIO: f64 = 0.2;
const RATIO_PPM: u64 = 200_000;
const MIN_PER_S: u64 = 10;
const WINDOW_S: u64 = 10;

/// The example retry block.
fn example_retry() -> Value {
    json!({
        "max_retries": 2,
        "retry_on": "5xx,reset,connect-failure,refused-stream",
        "per_try_timeout_ms": 1000,
        "timeout_ms": 5000,
        "budget": {"ratio": RATIO, "min_per_s": MIN_PER_S, "window_s": WINDOW_S},
        "deadline_header": "x-request-timeout-ms"
    })
}

/// The shop service with `retry`, and a service without a retry block on
/// the same upstream (`open.local`), where the route's settings apply (and
/// a client's retry headers are removed).
fn shop(retry: Value) -> Value {
    json!({
        "steering_header": "x-sluice-cluster",
        "services": [
            {
                "name": "shop",
                "match": {"authority": "shop.local", "path_prefix": "/"},
                "stable": "shop_v1",
                "retry": retry
            },
            {
                "name": "open",
                "match": {"authority": "open.local", "path_prefix": "/"},
                "stable": "shop_v1"
            }
        ]
    })
}

type Headers<'a> = &'a [(&'a str, &'a str)];

/// What a client could send to raise its own retries and timeouts.
const GREEDY: &[(&str, &str)] = &[
    ("x-envoy-max-retries", "10"),
    (
        "x-envoy-retry-on",
        "5xx,gateway-error,reset,connect-failure,retriable-4xx",
    ),
    ("x-envoy-upstream-rq-timeout-ms", "60000"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "60000"),
];

/// Thresholds high enough that Envoy's own circuit breaker never decides.
const CIRCUIT_BREAKERS: &str = "    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 100000
";

/// Envoy with Sluice (`sluice`) in front of `upstream` as cluster shop_v1.
fn start(sluice: &Value, upstream: &Upstream) -> Envoy {
    Envoy::start_yaml(&yaml(sluice, upstream), &EnvoyOptions::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The bootstrap for [`start`].
fn yaml(sluice: &Value, upstream: &Upstream) -> String {
    yaml_with(sluice, upstream, false)
}

/// [`yaml`], the virtual host setting `include_attempt_count_in_response`
/// or not.
fn yaml_with(sluice: &Value, upstream: &Upstream, attempt_count_in_response: bool) -> String {
    if let Err(message) = sluice_envoy::require_wasm() {
        panic!("{message}");
    }
    let yaml = EnvoyConfig::from_json(sluice)
        .upstream("shop_v1", upstream)
        .route_timeout(Duration::from_secs(10))
        .include_attempt_count_in_response(attempt_count_in_response)
        .to_yaml();
    assert!(yaml.contains("    connect_timeout: 1s\n"), "{yaml}");
    assert!(yaml.contains("          codec_type: AUTO\n"), "{yaml}");
    assert!(
        !yaml.contains("retry_policy"),
        "the route must not retry itself"
    );
    yaml.replace("    connect_timeout: 1s\n", CIRCUIT_BREAKERS)
        .replace("          codec_type: AUTO\n", INTERNAL_CLIENTS)
}

fn metric(envoy: &Envoy, name: &str) -> u64 {
    envoy.settled_metric(&format!("sluice.shop.retry.{name}"))
}

/// `clients` keep-alive connections send GETs with `headers` for `duration`;
/// returns every response's status.
fn load(envoy: &Envoy, clients: usize, duration: Duration, headers: &[(&str, &str)]) -> Vec<u16> {
    let until = Instant::now() + duration;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let mut client = envoy.client().with_timeout(Duration::from_secs(10));
                scope.spawn(move || {
                    let mut statuses = Vec::new();
                    while Instant::now() < until {
                        let response = client
                            .get("shop.local", "/", headers)
                            .unwrap_or_else(|e| panic!("request failed: {e}"));
                        statuses.push(response.status);
                    }
                    statuses
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect()
    })
}

#[test]
fn an_outage_stays_within_the_budget_though_clients_ask_for_10_retries() {
    let upstream = Upstream::start("down").unwrap();
    upstream.set_fail_all(true);
    upstream.set_record_limit(0);
    let created_second = sluice_envoy::unix_s();
    let envoy = start(&shop(example_retry()), &upstream);
    // Control: where Sluice does not route (a host no service matches),
    // Envoy obeys the client's headers (three retries here), so the test
    // below is meaningful.
    let control = envoy
        .client()
        .get(
            "elsewhere.local",
            "/",
            &[("x-envoy-max-retries", "3"), ("x-envoy-retry-on", "5xx")],
        )
        .unwrap();
    assert_eq!(control.status, 503);
    assert_eq!(
        upstream.requests(),
        4,
        "Envoy ignored the client's retry headers"
    );
    // A service without a retry block: Sluice removes them, the route's
    // policy (none) stands.
    let open = envoy
        .client()
        .get(
            "open.local",
            "/",
            &[("x-envoy-max-retries", "3"), ("x-envoy-retry-on", "5xx")],
        )
        .unwrap();
    assert_eq!(open.status, 503);
    assert_eq!(upstream.requests(), 5, "a client added its own retries");
    upstream.reset_counters();
    envoy.admin_request("POST", "/reset_counters").unwrap();
    // The budget is fresh: nothing deposited or charged before this second.
    let first_second = sluice_envoy::unix_s();
    let began = Instant::now();
    let statuses = load(&envoy, 8, Duration::from_secs(3), GREEDY);
    let elapsed = began.elapsed();
    let last_second = sluice_envoy::unix_s();

    let requests = statuses.len() as u64;
    let attempts = upstream.requests();
    let retries = attempts - requests;
    assert!(statuses.iter().all(|&status| status == 503));
    assert_eq!(
        envoy.stat_value("http.ingress_http.downstream_rq_total"),
        requests
    );
    assert_eq!(
        envoy.stat_value("cluster.shop_v1.upstream_rq_retry"),
        retries
    );
    assert_eq!(
        envoy.stat_value("cluster.shop_v1.upstream_rq_retry_overflow"),
        0,
        "Envoy's circuit breaker must not be what limits retries"
    );

    // The budget's balance, reserve + ratio × requests − retries, never goes
    // negative. While every second since the state was created is still in
    // the window that is the whole bound: retries ≤ min_per_s × W + ratio ×
    // requests (integer units, as the filter counts). Later, seconds leave
    // the window and the general bound of filter/src/retry.rs applies:
    // retries(a..=b) ≤ ratio × requests + min_per_s × (b − a + W).
    let spanned = last_second - first_second + 1;
    let reserve = if last_second - created_second < WINDOW_S {
        MIN_PER_S * WINDOW_S
    } else {
        MIN_PER_S * (spanned - 1 + WINDOW_S)
    };
    let allowed = requests * RATIO_PPM / 1_000_000 + reserve;
    let amplification = attempts as f64 / requests as f64;
    let bound = 1.0 + (allowed as f64 / requests as f64);
    eprintln!(
        "envoy outage: {requests} requests ({:.0}/s, 8 clients sending x-envoy-max-retries: 10), \
         {attempts} upstream attempts in {elapsed:.1?}: amplification {amplification:.4} \
         (bound 1 + {RATIO} + {reserve}/{requests} = {bound:.4}; granted {}, denied {})",
        requests as f64 / elapsed.as_secs_f64(),
        metric(&envoy, "granted"),
        metric(&envoy, "denied"),
    );
    assert!(
        retries <= allowed,
        "{retries} retries for {requests} requests, the budget allows {allowed}"
    );
    // The budget gives its share, and the router executed what was granted
    // (a retry denied by Envoy rather than Sluice would show up here).
    assert!(
        retries as f64 >= RATIO * requests as f64,
        "only {retries} retries for {requests} requests"
    );
    assert!(metric(&envoy, "granted") >= retries);
    assert!(metric(&envoy, "denied") > 0);
    // The warning is rate-limited: at most once a window per worker VM.
    let warnings = envoy.log_lines_containing("retry budget of service shop ran dry");
    let windows = elapsed.as_secs().div_ceil(WINDOW_S).max(1) as usize;
    assert!(
        (1..=2 * windows).contains(&warnings.len()),
        "{} dry warnings: {warnings:#?}",
        warnings.len()
    );
}

#[test]
fn rare_failures_get_their_retries() {
    let upstream = Upstream::start("flaky").unwrap();
    upstream.set_record_limit(0);
    upstream.set_fail_rate(0.1);
    let envoy = start(&shop(example_retry()), &upstream);
    let began = Instant::now();
    let statuses = load(&envoy, 8, Duration::from_secs(3), &[]);
    let elapsed = began.elapsed();
    let requests = statuses.len() as u64;
    let ok = statuses.iter().filter(|&&status| status == 200).count() as u64;
    let success = ok as f64 / requests as f64;
    let attempts = upstream.requests();
    eprintln!(
        "envoy 10% failures: {requests} requests in {elapsed:.1?}, {attempts} upstream attempts, \
         {} failed attempts; success {:.3}% with max_retries 2 (granted {}, denied {})",
        upstream.failed(),
        success * 100.0,
        metric(&envoy, "granted"),
        metric(&envoy, "denied"),
    );
    assert!(
        upstream.failed() * 20 >= attempts,
        "the upstream should fail 10% of attempts"
    );
    assert!(success > 0.99, "success rate {success}");
    assert_eq!(
        metric(&envoy, "denied"),
        0,
        "every failure gets its retries"
    );
    assert_eq!(
        envoy.stat_value("cluster.shop_v1.upstream_rq_retry"),
        attempts - requests
    );
}

#[test]
fn a_hung_upstream_gets_no_retry_past_the_client_deadline() {
    let upstream = Upstream::start("hung").unwrap();
    upstream.set_hang(true);
    let envoy = start(&shop(example_retry()), &upstream);
    // (id, client headers, deadline ms, attempts that fit the deadline with
    // per_try_timeout_ms 1000)
    let cases: &[(&str, Headers, u64, usize)] = &[
        ("a", &[("x-request-timeout-ms", "300")], 300, 1),
        ("b", &[("grpc-timeout", "1200m")], 1_200, 1),
        (
            "c",
            &[
                ("x-request-timeout-ms", "2500"),
                ("x-envoy-max-retries", "10"),
                ("x-envoy-upstream-rq-timeout-ms", "60000"),
            ],
            2_500,
            2,
        ),
        ("d", &[("x-request-timeout-ms", "3500")], 3_500, 3),
    ];
    let began = Instant::now();
    let results: Vec<(u16, Duration, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(id, headers, _, _)| {
                let mut client = envoy.client().with_timeout(Duration::from_secs(6));
                scope.spawn(move || {
                    let mut all = vec![("x-case", *id)];
                    all.extend_from_slice(headers);
                    let sent = Instant::now();
                    let response = client
                        .get("shop.local", "/", &all)
                        .unwrap_or_else(|e| panic!("case {id}: no answer in 6 s: {e}"));
                    (response.status, sent.elapsed(), sent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let recorded = upstream.recorded();
    for ((id, _, deadline_ms, fit), (status, took, sent)) in cases.iter().zip(&results) {
        let deadline = Duration::from_millis(*deadline_ms);
        let attempts: Vec<Duration> = recorded
            .iter()
            .filter(|r| r.header("x-case") == Some(id))
            .map(|r| r.received_at.saturating_duration_since(*sent))
            .collect();
        eprintln!(
            "envoy deadline {deadline_ms} ms: {status} after {} ms, upstream attempts at {:?} ms",
            took.as_millis(),
            attempts.iter().map(Duration::as_millis).collect::<Vec<_>>()
        );
        assert_eq!(*status, 504, "case {id}");
        // Envoy answers at the deadline, or earlier when the attempts that
        // fit it have all timed out (per try: 1 s, plus a little back-off).
        // Slack for a loaded machine, small enough that case a (300 ms)
        // answered at its per-try timeout (1 s) would fail.
        let due = deadline.min(Duration::from_millis(1_000 * *fit as u64));
        let slack = (due / 4).max(Duration::from_millis(300));
        assert!(
            *took >= due.saturating_sub(Duration::from_millis(100)) && *took <= due + slack,
            "case {id}: answered after {took:?}, due at {due:?}"
        );
        // The exact check: attempts run one after the other, each with a
        // 1 s per-try timeout, so only floor(deadline / 1 s) of them can
        // finish inside the deadline; a third attempt for c would start at
        // ~2 s and be cut off by the deadline at 2.5 s.
        assert_eq!(attempts.len(), *fit, "case {id}: attempts at {attempts:?}");
        // And by the clock, with slack: on a loaded machine Envoy starts a
        // retry late (seen: the third attempt of d at 2.96 s instead of
        // ~2.05 s), which is Envoy's timing, not a grant that did not fit.
        for at in attempts.iter().skip(1) {
            assert!(
                *at + Duration::from_millis(1_000) <= deadline + Duration::from_millis(600),
                "case {id}: a retry at {at:?} could not finish by {deadline:?}"
            );
        }
    }
    assert_eq!(metric(&envoy, "deadline_cut"), 3);
    assert!(began.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_attempt_count_is_final_when_the_response_headers_arrive() {
    // No deposits (ratio 0) and a window longer than the test: the level is
    // exactly the reserve (10 × 60) minus the retries charged. A request is
    // charged at its response headers from `upstream.request_attempt_count`:
    // if the count were not final yet, the retries would be refunded.
    let upstream = Upstream::start("counted").unwrap();
    let envoy = start(
        &shop(json!({
            "max_retries": 2,
            "budget": {"ratio": 0, "min_per_s": 10, "window_s": 60}
        })),
        &upstream,
    );
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    let mut send = |n: usize, want: u16| {
        for _ in 0..n {
            assert_eq!(client.get("shop.local", "/", &[]).unwrap().status, want);
        }
    };
    // Two retries each, none, then one each (every second attempt fails).
    upstream.set_fail_all(true);
    send(20, 503);
    let after_outage = upstream.requests();
    upstream.set_fail_all(false);
    send(20, 200);
    let after_healthy = upstream.requests();
    upstream.set_fail_every(2);
    send(20, 200);
    let attempts = upstream.requests();
    let used = attempts - 60;
    assert_eq!(after_outage, 60, "three attempts each");
    assert_eq!(after_healthy, 80, "one attempt each");
    assert!(
        attempts - after_healthy >= 39,
        "one retry each in the last phase"
    );
    assert_eq!(envoy.stat_value("cluster.shop_v1.upstream_rq_retry"), used);
    assert_eq!(metric(&envoy, "granted"), 120);
    assert_eq!(metric(&envoy, "denied"), 0);

    // The gauge is refreshed every second by each VM's tick.
    let expected = 600 - used;
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut level = metric(&envoy, "budget_level");
    while level != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        level = metric(&envoy, "budget_level");
    }
    eprintln!(
        "envoy attempt count: 60 requests, {used} retries used of 120 granted; \
         budget level {level} (expected {expected})"
    );
    assert_eq!(level, expected, "charged what really happened");
}

/// Envoy with a budget that only charges (ratio 0, a window longer than
/// the test: the level is the reserve, 10 × 60, minus the retries charged)
/// for a service with `key` in front of an upstream that fails every second
/// request and forges `x-envoy-attempt-count: 1` on every answer, the
/// virtual host setting `include_attempt_count_in_response` or not. Sends
/// 20 requests; returns the retries Envoy made, the budget level Sluice
/// settled at, and the `x-envoy-attempt-count` clients saw.
fn charged_with_forged_attempt_count(key: bool, route_writes: bool) -> (u64, u64, Vec<String>) {
    let upstream = Upstream::start("forger").unwrap();
    upstream.set_response_header(Some(("x-envoy-attempt-count", "1")));
    let mut sluice = shop(json!({
        "max_retries": 2,
        "budget": {"ratio": 0, "min_per_s": 10, "window_s": 60}
    }));
    if key {
        sluice["services"][0]["attempt_count_in_response"] = json!(true);
    }
    let yaml = yaml_with(&sluice, &upstream, route_writes);
    assert!(yaml.contains(&format!(
        "include_attempt_count_in_response: {route_writes}"
    )));
    let envoy =
        Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    // The first request is the upstream's first (it succeeds); each one
    // after fails its first attempt and succeeds on the retry.
    upstream.set_fail_every(2);
    let mut seen = Vec::new();
    for _ in 0..20 {
        let response = client.get("shop.local", "/", &[]).unwrap();
        assert_eq!(response.status, 200);
        seen.push(
            response
                .header("x-envoy-attempt-count")
                .unwrap_or("")
                .to_string(),
        );
    }
    let used = envoy.stat_value("cluster.shop_v1.upstream_rq_retry");
    assert!(used >= 19, "a retry each after the first: {used}");
    let expected = 600 - used;
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut level = metric(&envoy, "budget_level");
    while level != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        level = metric(&envoy, "budget_level");
    }
    eprintln!(
        "key {key}, route writes the count {route_writes}: {used} retries, budget level {level} \
         (expected {expected}), clients saw x-envoy-attempt-count {seen:?}"
    );
    (used, level, seen)
}

#[test]
fn the_routers_attempt_count_in_the_response_is_believed_and_an_upstreams_is_not() {
    // The virtual host sets include_attempt_count_in_response and the
    // service says so: Envoy writes its own count over the upstream's
    // forged 1, and Sluice reads the attempts from that header (no property
    // read): every retry used is charged.
    let (used, level, seen) = charged_with_forged_attempt_count(true, true);
    assert_eq!(level, 600 - used, "charged what really happened");
    assert_eq!(
        seen.iter().filter(|count| *count == "2").count() as u64,
        used
    );
    // Neither: the upstream's forged 1 reaches the filter and the client
    // as sent, and is not believed (the property is read): still charged.
    let (used, level, seen) = charged_with_forged_attempt_count(false, false);
    assert_eq!(level, 600 - used, "a forged count refunded retries");
    assert!(seen.iter().all(|count| count == "1"), "{seen:?}");
    // The key on a virtual host that does not set the option (the
    // misconfiguration the README warns of) shows that the header, not
    // the property, is what Sluice read: the forged 1 refunds the retries.
    let (used, level, _) = charged_with_forged_attempt_count(true, false);
    assert!(level > 600 - used, "level {level}: the header was not read");
}

#[test]
fn a_request_that_never_reached_an_upstream_costs_nothing() {
    // The cluster has no endpoints: Envoy's router answers 503 (no healthy
    // upstream) without an attempt. The reservation must come back, or every
    // such request would drain the budget for a window.
    let upstream = Upstream::start("unused").unwrap();
    let full = yaml(
        &shop(json!({
            "max_retries": 2,
            "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 60}
        })),
        &upstream,
    );
    let endpoints = format!(
        "      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              \
         socket_address: {{ address: 127.0.0.1, port_value: {} }}\n",
        upstream.port()
    );
    assert!(full.contains(&endpoints), "{full}");
    let empty = full.replace(&endpoints, "      endpoints: []\n");
    let envoy =
        Envoy::start_yaml(&empty, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    for _ in 0..50 {
        let response = client.get("shop.local", "/", &[]).unwrap();
        assert_eq!(response.status, 503, "{}", response.body_text());
    }
    assert_eq!(upstream.requests(), 0);
    assert_eq!(metric(&envoy, "granted"), 100);
    // The reserve (10 × 60) plus the 50 requests' deposits (0.2 each); the
    // gauge starts at 600, so reaching 610 shows it was refreshed.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut level = metric(&envoy, "budget_level");
    while level != 610 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        level = metric(&envoy, "budget_level");
    }
    eprintln!(
        "envoy no upstream: 50 requests never attempted; budget level {level} (expected 610)"
    );
    assert_eq!(
        level, 610,
        "requests that were never attempted were charged"
    );
}
