//! Sluice's circuit breakers in a real Envoy (`--concurrency 2`: two worker
//! VMs sharing each breaker), with real upstreams and real HTTP.
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` first (or
//! `SLUICE_WASM`), and Envoy from `scripts/setup.sh`. Every test starts its
//! own upstreams and Envoy on kernel-picked ports on 127.0.0.1, so tests run
//! in parallel. Open times are short (about a second) to keep tests fast;
//! every wait is bounded.

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_envoy::{Client, Envoy, EnvoyConfig, Response, Upstream};

fn require_wasm() {
    if let Err(msg) = sluice_envoy::require_wasm() {
        panic!("{msg}");
    }
}

/// A stable (`shop_v1`) and a canary (`shop_v2`) upstream behind Envoy.
struct Rig {
    stable: Upstream,
    canary: Upstream,
    envoy: Envoy,
}

impl Rig {
    fn start(sluice: &Value, tweak: impl FnOnce(EnvoyConfig) -> EnvoyConfig) -> Rig {
        require_wasm();
        let stable = Upstream::start("stable").unwrap();
        let canary = Upstream::start("canary").unwrap();
        let config = EnvoyConfig::from_json(sluice)
            .upstream("shop_v1", &stable)
            .upstream("shop_v2", &canary);
        let envoy = Envoy::start(&tweak(config)).unwrap_or_else(|e| panic!("{e}"));
        Rig {
            stable,
            canary,
            envoy,
        }
    }

    fn metric(&self, name: &str) -> u64 {
        self.envoy.settled_wasm_metric(name).unwrap().unwrap_or(0)
    }

    fn await_metric(&self, name: &str, value: u64) {
        self.envoy.await_wasm_metric(name, value);
    }

    /// Keep-alive clients until both workers have accepted connections.
    fn clients_on_both_workers(&self) -> Vec<Client> {
        self.envoy.clients_on_both_workers(6)
    }

    /// Envoy log lines of one breaker's state changes (`from -> to: reason`).
    fn breaker_log(&self, cluster: &str) -> Vec<String> {
        let needle = format!("sluice: breaker of service shop, cluster {cluster}: ");
        self.envoy
            .log_lines_containing(&needle)
            .into_iter()
            .map(|line| {
                assert!(line.contains("[warning]"), "not a warning: {line}");
                line.split_once(&needle).unwrap().1.to_string()
            })
            .collect()
    }
}

fn get(client: &mut Client, headers: &[(&str, &str)]) -> Response {
    client
        .get("shop.local", "/", headers)
        .unwrap_or_else(|e| panic!("request {headers:?} failed: {e}"))
}

/// A breaker rejection as the client sees it: 503, `x-sluice-breaker: open`,
/// `retry-after` in seconds, no upstream involved. Returns the retry-after.
fn rejection(r: &Response) -> u64 {
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-sluice-breaker"), Some("open"), "{r:?}");
    assert_eq!(r.upstream(), None, "an upstream answered: {r:?}");
    r.header("retry-after")
        .unwrap_or_else(|| panic!("no retry-after: {r:?}"))
        .parse()
        .unwrap()
}

/// Runs `send` on every client in parallel until `until` (at least once
/// each); returns every response.
fn hammer(
    clients: &mut [Client],
    until: Instant,
    send: impl Fn(&mut Client, usize) -> Response + Sync,
) -> Vec<Response> {
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(c, client)| {
                let send = &send;
                s.spawn(move || {
                    // At least one request each, even on a slow machine.
                    let mut got = vec![send(client, c)];
                    let mut n = c;
                    while Instant::now() < until {
                        n += 17;
                        got.push(send(client, n));
                    }
                    got
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// One request from every client at the same moment; responses in client
/// order.
fn at_once(clients: &mut [Client]) -> Vec<Response> {
    let barrier = std::sync::Barrier::new(clients.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .map(|client| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    get(client, &[])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn breaker(open_ms: u64) -> Value {
    json!({
        "window_s": 10, "min_requests": 20, "failure_rate": 0.5,
        "consecutive_failures": 5, "slow_ms": 2000, "slow_rate": 0.8,
        "open_ms": open_ms, "max_open_ms": 10_000, "half_open_requests": 3
    })
}

#[test]
fn a_failing_canary_is_cut_off_and_its_users_fall_back_to_stable_then_return() {
    let rig = Rig::start(
        &json!({"services": [{
            "name": "shop",
            "match": {"authority": "shop.local"},
            "stable": "shop_v1", "canary": "shop_v2", "weight": 50,
            "sticky": {"header": "x-user-id"},
            "breaker": breaker(1_500)
        }]}),
        |c| c,
    );
    let users: Vec<String> = (0..60).map(|u| format!("user-{u}")).collect();
    let mut client = rig.envoy.client().with_timeout(Duration::from_secs(5));
    let sides = |client: &mut Client| -> BTreeMap<String, String> {
        users
            .iter()
            .map(|id| {
                let r = get(client, &[("x-user-id", id)]);
                assert_eq!(r.status, 200, "{id}: {r:?}");
                (id.clone(), r.upstream().unwrap().to_string())
            })
            .collect()
    };
    let before = sides(&mut client);
    let canary_users: Vec<&String> = users.iter().filter(|id| before[*id] == "canary").collect();
    assert!(
        (15..=45).contains(&canary_users.len()),
        "{} of 60 on canary",
        canary_users.len()
    );

    // The canary breaks. Its users see its errors until five in a row have
    // tripped its breaker, then stable serves them.
    rig.canary.set_fail_all(true);
    rig.canary.reset_counters();
    let mut errors = 0;
    let mut tripped_at = None;
    for id in &canary_users {
        let r = get(&mut client, &[("x-user-id", id)]);
        match (r.status, r.upstream()) {
            (503, Some("canary")) => {
                errors += 1;
                if errors == 5 {
                    tripped_at = Some(Instant::now());
                }
            }
            (200, Some("stable")) => {}
            _ => panic!("{id}: {r:?}"),
        }
    }
    assert_eq!(errors, 5, "errors before the canary was cut off");
    let tripped_at = tripped_at.unwrap();

    // While it is open (1.5 s at least): every user on both workers is
    // served by stable, no errors, and the canary sees nothing at all.
    let mut clients = rig.clients_on_both_workers();
    let during = hammer(
        &mut clients,
        tripped_at + Duration::from_millis(900),
        |client, n| {
            let id = &users[n % users.len()];
            get(client, &[("x-user-id", id)])
        },
    );
    assert!(during.len() >= clients.len());
    for r in &during {
        assert_eq!((r.status, r.upstream()), (200, Some("stable")), "{r:?}");
    }
    assert_eq!(
        rig.canary.requests(),
        5,
        "requests reached the broken canary"
    );
    assert_eq!(rig.metric("sluice.shop.breaker.canary.state"), 1);
    assert!(rig.metric("sluice.shop.breaker.canary.rejected") >= 10);

    // The canary heals; once the open time is over (1.8 s at most) its
    // users probe it, it closes, and every user is back where they were.
    rig.canary.reset_behaviour();
    std::thread::sleep(
        (tripped_at + Duration::from_millis(2_000)).saturating_duration_since(Instant::now()),
    );
    assert_eq!(sides(&mut client), before);
    assert_eq!(
        sides(&mut clients[0]),
        before,
        "the other connections disagree"
    );
    rig.await_metric("sluice.shop.breaker.canary.state", 0);
    assert_eq!(rig.metric("sluice.shop.breaker.canary.trips"), 1);
    assert_eq!(rig.metric("sluice.shop.breaker.stable.trips"), 0);
    assert_eq!(rig.metric("sluice.shop.breaker.stable.rejected"), 0);
    // One line per state change for the whole process, not one per worker.
    let log = rig.breaker_log("shop_v2");
    let changes: Vec<&str> = log
        .iter()
        .map(|line| line.split(':').next().unwrap())
        .collect();
    assert_eq!(
        changes,
        ["closed -> open", "open -> half-open", "half-open -> closed"],
        "{log:?}"
    );
    assert!(
        log[0].starts_with("closed -> open: 5 consecutive failures"),
        "{log:?}"
    );
    assert!(rig.breaker_log("shop_v1").is_empty());
}

#[test]
fn a_failing_stable_is_shielded_clients_get_503_with_retry_after_and_only_probes_reach_it() {
    // Envoy retries 5xx twice: every request the filter sees made three
    // attempts, and the breaker counts each.
    let rig = Rig::start(
        &json!({"services": [{
            "name": "shop",
            "match": {"authority": "shop.local"},
            "stable": "shop_v1",
            "breaker": breaker(1_000)
        }]}),
        |c| c.retry_policy("5xx", 2),
    );
    let mut client = rig.envoy.client().with_timeout(Duration::from_secs(5));
    let r = get(&mut client, &[]);
    assert_eq!((r.status, r.upstream()), (200, Some("stable")));
    rig.stable.set_fail_all(true);
    rig.stable.reset_counters();

    // Two failed requests are six failed calls: over five in a row.
    for _ in 0..2 {
        let r = get(&mut client, &[]);
        assert_eq!((r.status, r.upstream()), (503, Some("stable")), "{r:?}");
    }
    let tripped_at = Instant::now();
    assert_eq!(rig.stable.requests(), 6);
    let wait = rejection(&get(&mut client, &[]));
    assert!((1..=2).contains(&wait), "retry-after {wait}");

    // While open: everyone, on both workers, gets the breaker's 503 at
    // once, and not one request reaches stable.
    let mut clients = rig.clients_on_both_workers();
    let during = hammer(
        &mut clients,
        tripped_at + Duration::from_millis(500),
        |client, _| get(client, &[]),
    );
    assert!(during.len() >= clients.len());
    for r in &during {
        assert!((1..=2).contains(&rejection(r)), "{r:?}");
    }
    assert_eq!(
        rig.stable.requests(),
        6,
        "requests reached stable while open"
    );
    let mut rejected = 1 + during.len() as u64;

    // After the open time (1.2 s at most) one request probes: it fails
    // (its three attempts are all stable sees) and the breaker reopens for
    // twice as long.
    std::thread::sleep(
        (tripped_at + Duration::from_millis(1_300)).saturating_duration_since(Instant::now()),
    );
    let r = get(&mut client, &[]);
    assert_eq!((r.status, r.upstream()), (503, Some("stable")), "{r:?}");
    let reopened_at = Instant::now();
    assert_eq!(rig.stable.requests(), 9);
    let wait = rejection(&get(&mut client, &[]));
    assert!(
        (2..=3).contains(&wait),
        "retry-after {wait} after a failed probe"
    );
    rejected += 1;
    let during = hammer(
        &mut clients,
        reopened_at + Duration::from_millis(1_200),
        |client, _| get(client, &[]),
    );
    for r in &during {
        assert!((1..=3).contains(&rejection(r)), "{r:?}");
    }
    rejected += during.len() as u64;
    assert_eq!(
        rig.stable.requests(),
        9,
        "requests reached stable while open"
    );

    // Stable recovers, but answers slowly. After the doubled open time
    // (2.4 s at most) a burst from every connection, on both workers, lets
    // exactly three probes through; the rest are told to retry in a second.
    rig.stable.reset_behaviour();
    rig.stable.set_delay(Duration::from_millis(1_500));
    std::thread::sleep(
        (reopened_at + Duration::from_millis(2_500)).saturating_duration_since(Instant::now()),
    );
    let burst = at_once(&mut clients);
    let probes = burst.iter().filter(|r| r.upstream().is_some()).count();
    assert_eq!(probes, 3, "{burst:?}");
    for r in &burst {
        match r.upstream() {
            Some(_) => assert_eq!((r.status, r.upstream()), (200, Some("stable")), "{r:?}"),
            None => assert_eq!(rejection(r), 1, "{r:?}"),
        }
    }
    rejected += (burst.len() - probes) as u64;
    assert_eq!(rig.stable.requests(), 12);
    // Three successes closed it: traffic flows again everywhere.
    rig.stable.set_delay(Duration::ZERO);
    let after = hammer(
        &mut clients,
        Instant::now() + Duration::from_millis(200),
        |client, _| get(client, &[]),
    );
    for r in &after {
        assert_eq!((r.status, r.upstream()), (200, Some("stable")), "{r:?}");
    }
    rig.await_metric("sluice.shop.breaker.stable.state", 0);
    assert_eq!(rig.metric("sluice.shop.breaker.stable.trips"), 2);
    assert_eq!(rig.metric("sluice.shop.breaker.stable.rejected"), rejected);
    let log = rig.breaker_log("shop_v1");
    let changes: Vec<&str> = log
        .iter()
        .map(|line| line.split(':').next().unwrap())
        .collect();
    assert_eq!(
        changes,
        [
            "closed -> open",
            "open -> half-open",
            "half-open -> open",
            "open -> half-open",
            "half-open -> closed"
        ],
        "{log:?}"
    );
    // The reason names the attempts, not the two requests.
    assert!(
        log[0].starts_with("closed -> open: 6 consecutive failures"),
        "{log:?}"
    );
}
