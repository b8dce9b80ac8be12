//! `retry.mode: "route"` end to end: a real Envoy (`--concurrency 2`, two
//! worker VMs sharing one budget) running `envoy/examples/sluice-route-retries.yaml`
//! as shipped (only the wasm path and the ports replaced, and the clients
//! made internal), whose virtual host carries the retry policy
//! (`5xx,reset,connect-failure,refused-stream`, 2 retries, 1 s per try) and
//! whose routes the 5 s timeout. Sluice writes only what lowers them.
//!
//! The clients are INTERNAL (`use_remote_address` with 127.0.0.1 as an
//! internal address, as in `retry.rs`): Envoy would strip their `x-envoy-*`
//! headers otherwise, and it is Sluice's removal that must stop them here.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`.
//!
//! ```sh
//! cargo test -p sluice-envoy --test route_retries -- --nocapture
//! ```

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_envoy::config::INTERNAL_CLIENTS;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::{Envoy, EnvoyConfig, Upstream};

const EXAMPLE: &str = "envoy/examples/sluice-route-retries.yaml";
const RATIO_PPM: u64 = 200_000;
const MIN_PER_S: u64 = 10;
const WINDOW_S: u64 = 10;

/// What a client sends to get more retries and time than the route's.
const GREEDY: &[(&str, &str)] = &[
    ("x-envoy-max-retries", "10"),
    ("x-envoy-retry-on", "5xx,gateway-error,retriable-4xx"),
    ("x-envoy-upstream-rq-timeout-ms", "60000"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "60000"),
];

/// `sluice_envoy::ecds::replace_once`, failing the test when `from` is not
/// there exactly once.
fn replace_once(yaml: &str, from: &str, to: &str) -> String {
    sluice_envoy::ecds::replace_once(yaml, from, to).unwrap_or_else(|e| panic!("{e}"))
}

/// The example with `stable` (and an idle canary) as its upstreams.
fn start_example(stable: &Upstream, canary: &Upstream) -> Envoy {
    let wasm = sluice_envoy::require_wasm().unwrap_or_else(|m| panic!("{m}"));
    let text = std::fs::read_to_string(sluice_envoy::repo_root().join(EXAMPLE)).unwrap();
    let mut yaml = replace_once(
        &text,
        "filename: target/wasm32-wasip1/release/sluice.wasm",
        &format!("filename: {}", wasm.display()),
    );
    for (from, to) in [
        (10020, 0),
        (9931, 0),
        (9001, stable.port()),
        (9002, canary.port()),
    ] {
        yaml = replace_once(
            &yaml,
            &format!("port_value: {from} }}"),
            &format!("port_value: {to} }}"),
        );
    }
    yaml = replace_once(&yaml, "          codec_type: AUTO\n", INTERNAL_CLIENTS);
    Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn metric(envoy: &Envoy, name: &str) -> u64 {
    envoy.settled_metric(&format!("sluice.shop.retry.{name}"))
}

/// Every user is on stable: the canary takes 10 % of sticky users, and these
/// requests carry no sticky key, so a few would land on the canary; pin
/// them with a user whose bucket is stable.
fn stable_user(envoy: &Envoy, canary: &Upstream) -> String {
    let mut client = envoy.client();
    for i in 0..50 {
        let user = format!("route-user-{i}");
        let before = canary.requests();
        client
            .get("shop.local", "/", &[("x-user-id", user.as_str())])
            .unwrap();
        if canary.requests() == before {
            return user;
        }
    }
    panic!("no stable user in 50");
}

/// (a) An outage of stable with both workers: the attempts stay within the
/// budget's bound, though every client asks for 10 retries.
#[test]
fn an_outage_stays_within_the_budget_in_route_mode() {
    let stable = Upstream::start("down").unwrap();
    let canary = Upstream::start("canary").unwrap();
    stable.set_record_limit(0);
    let created_second = sluice_envoy::unix_s();
    let envoy = start_example(&stable, &canary);
    let user = stable_user(&envoy, &canary);
    // The requests that found a stable user were deposited in the budget
    // too: they are in the bound's window.
    let before_outage = stable.requests() + canary.requests();
    stable.set_fail_all(true);
    stable.reset_counters();
    envoy.admin_request("POST", "/reset_counters").unwrap();
    let first_second = sluice_envoy::unix_s();
    let began = Instant::now();
    let until = began + Duration::from_secs(3);
    let mut headers: Vec<(&str, &str)> = GREEDY.to_vec();
    headers.push(("x-user-id", user.as_str()));
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = envoy
            .clients_on_both_workers(8)
            .into_iter()
            .map(|mut client| {
                client.set_timeout(Duration::from_secs(10));
                let headers = &headers;
                scope.spawn(move || {
                    let mut statuses = Vec::new();
                    while Instant::now() < until {
                        statuses.push(client.get("shop.local", "/", headers).unwrap().status);
                    }
                    statuses
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect()
    });
    let elapsed = began.elapsed();
    let last_second = sluice_envoy::unix_s();
    let requests = statuses.len() as u64;
    let attempts = stable.requests();
    let retries = attempts - requests;
    assert!(statuses.iter().all(|&status| status == 503));
    assert_eq!(canary.requests(), 0);
    assert_eq!(
        envoy.stat_value("cluster.shop_v1.upstream_rq_retry"),
        retries
    );
    // The bound of envoy/tests/retry.rs over every request the budget saw:
    // the outage's and the few of `stable_user` before it.
    let spanned = last_second - first_second + 1;
    let reserve = if last_second - created_second < WINDOW_S {
        MIN_PER_S * WINDOW_S
    } else {
        MIN_PER_S * (spanned - 1 + WINDOW_S)
    };
    let allowed = (requests + before_outage) * RATIO_PPM / 1_000_000 + reserve;
    eprintln!(
        "route mode outage: {requests} requests ({:.0}/s, 8 clients on 2 workers sending \
         x-envoy-max-retries: 10), {attempts} attempts in {elapsed:.1?}: amplification {:.4} \
         (allowed retries {allowed}; granted {}, denied {})",
        requests as f64 / elapsed.as_secs_f64(),
        attempts as f64 / requests as f64,
        metric(&envoy, "granted"),
        metric(&envoy, "denied"),
    );
    assert!(
        retries <= allowed,
        "{retries} retries for {requests} requests, the budget allows {allowed}"
    );
    // The budget runs dry and the route's 2 retries are cut: Sluice wrote
    // the lower number.
    assert!(metric(&envoy, "denied") > 0);
    assert!(retries as f64 >= 0.2 * requests as f64, "{retries} retries");
}

/// (b) and (d): a greedy client gets the route's policy, no more; a client
/// deadline lowers the route's timeout.
#[test]
fn a_greedy_client_gets_the_routes_policy_and_a_deadline_lowers_it() {
    let stable = Upstream::start("stable").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let envoy = start_example(&stable, &canary);
    let user = stable_user(&envoy, &canary);

    // Failing: three attempts (the route's two retries), not eleven.
    stable.set_fail_all(true);
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    let mut headers: Vec<(&str, &str)> = GREEDY.to_vec();
    headers.push(("x-user-id", user.as_str()));
    for i in 0..5 {
        let id = format!("fail-{i}");
        let mut all = headers.clone();
        all.push(("x-case", id.as_str()));
        let response = client.get("shop.local", "/", &all).unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.header("x-envoy-attempt-count"), Some("3"), "{id}");
        let seen = stable
            .recorded()
            .iter()
            .filter(|r| r.header("x-case") == Some(id.as_str()))
            .count();
        assert_eq!(seen, 3, "{id}");
    }

    // Hung: the route's per-try timeout (1 s) and three attempts, not the
    // client's 60 s; with a 300 ms deadline, one attempt cut at 300 ms.
    stable.set_fail_all(false);
    stable.set_hang(true);
    let cases: [(&str, Option<&str>, usize, Duration); 2] = [
        ("greedy", None, 3, Duration::from_millis(3_000)),
        ("deadline", Some("300"), 1, Duration::from_millis(300)),
    ];
    let results: Vec<(u16, Duration, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(id, deadline, _, _)| {
                let mut client = envoy.client().with_timeout(Duration::from_secs(8));
                let mut all = headers.clone();
                all.push(("x-case", id));
                if let Some(deadline) = deadline {
                    all.push(("x-request-timeout-ms", deadline));
                }
                scope.spawn(move || {
                    let sent = Instant::now();
                    let response = client
                        .get("shop.local", "/", &all)
                        .unwrap_or_else(|e| panic!("{id}: no answer in 8 s: {e}"));
                    let attempts = response.header("x-envoy-attempt-count").map(String::from);
                    (response.status, sent.elapsed(), attempts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let recorded = stable.recorded();
    for ((id, _, attempts, due), (status, took, counted)) in cases.iter().zip(&results) {
        let seen = recorded
            .iter()
            .filter(|r| r.header("x-case") == Some(id))
            .count();
        eprintln!(
            "route mode {id}: {status} after {} ms, {seen} upstream attempts (x-envoy-attempt-count {counted:?})",
            took.as_millis()
        );
        assert_eq!(*status, 504, "{id}");
        assert_eq!(seen, *attempts, "{id}");
        let slack = (*due / 4).max(Duration::from_millis(300));
        assert!(
            *took + Duration::from_millis(100) >= *due && *took <= *due + slack,
            "{id}: answered after {took:?}, due at {due:?}"
        );
    }
    assert_eq!(metric(&envoy, "deadline_cut"), 1);
}

/// (c) A POST the upstream writes and answers 503 is not replayed (the
/// route retries on 5xx: Sluice writes `x-envoy-max-retries: 0`); the same
/// POST with an `Idempotency-Key` gets the route's two retries.
#[test]
fn a_post_answered_503_after_its_effect_is_not_replayed() {
    let stable = Upstream::start("orders").unwrap();
    let canary = Upstream::start("canary").unwrap();
    let envoy = start_example(&stable, &canary);
    let user = stable_user(&envoy, &canary);
    stable.set_fail_all(true);
    let mut client = envoy.client().with_timeout(Duration::from_secs(10));
    for (label, key) in [("post", false), ("keyed", true)] {
        for i in 0..5 {
            let body = format!("{label}-{i}");
            let mut headers: Vec<(&str, &str)> = GREEDY.to_vec();
            headers.push(("x-user-id", user.as_str()));
            if key {
                headers.push(("idempotency-key", body.as_str()));
            }
            let response = client
                .request("POST", "shop.local", "/orders", &headers, body.as_bytes())
                .unwrap();
            assert_eq!(response.status, 503);
        }
    }
    let mut writes: BTreeMap<String, u64> = BTreeMap::new();
    for request in stable.recorded() {
        let body = String::from_utf8_lossy(&request.body).into_owned();
        if !body.is_empty() {
            *writes.entry(body).or_default() += 1;
        }
    }
    eprintln!("route mode POST writes: {writes:?}");
    for i in 0..5 {
        assert_eq!(writes.get(&format!("post-{i}")), Some(&1), "{writes:?}");
        assert_eq!(writes.get(&format!("keyed-{i}")), Some(&3), "{writes:?}");
    }
    assert_eq!(metric(&envoy, "withheld_unsafe"), 5);
}

/// (e) A service without a retry block: the route's policy stands (here:
/// retry on connect-failure only), and a client cannot add retries with
/// `x-envoy-retry-on` / `x-envoy-max-retries`. A host no service matches
/// is the control: Envoy obeys the same headers there.
#[test]
fn a_service_without_a_retry_block_gets_no_client_retries() {
    let upstream = Upstream::start("plain").unwrap();
    upstream.set_fail_all(true);
    let sluice = json!({
        "services": [{
            "name": "plain",
            "match": {"authority": "plain.local"},
            "stable": "shop_v1",
            "stable_by_default": true
        }]
    });
    let yaml = EnvoyConfig::from_json(&sluice)
        .upstream("shop_v1", &upstream)
        .retry_policy("connect-failure", 1)
        .to_yaml();
    let yaml = replace_once(&yaml, "          codec_type: AUTO\n", INTERNAL_CLIENTS);
    let envoy =
        Envoy::start_yaml(&yaml, &EnvoyOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mut client = envoy.client();
    let forged = [("x-envoy-max-retries", "3"), ("x-envoy-retry-on", "5xx")];
    let control = client.get("elsewhere.local", "/", &forged).unwrap();
    assert_eq!(control.status, 503);
    assert_eq!(upstream.requests(), 4, "Envoy ignored the client's headers");
    for _ in 0..5 {
        let response = client.get("plain.local", "/", &forged).unwrap();
        assert_eq!(response.status, 503);
    }
    assert_eq!(upstream.requests(), 4 + 5, "a client added retries");
}
