//! Worker VMs racing on their own OS threads against the one shared-data
//! store, as Envoy's workers do, and shared-data writes that lose every CAS
//! race (the fake's `Proxy::fail_shared_sets` fault hook).
//!
//! Shared-data semantics are proxy-wasm-cpp-host's `src/shared_data.cc`: one
//! lock around the map, a `set` with a non-zero CAS that differs from the
//! key's current token fails with `CasMismatch`, CAS 0 writes
//! unconditionally, tokens come from one increasing counter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::thread;

use sluice_host::{require_sluice_wasm, Action, Proxy, Stream, Vm};

/// A service with retries (budget: 20 % of requests plus 10/s over 12 s,
/// longer than the run, so that the end state still holds all of it)
/// and a breaker (50 % failures over 10 s, at least 20 calls).
const SHOP: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local", "path_prefix": "/"},
    "stable": "shop_v1",
    "retry": {"max_retries": 2, "retry_on": "5xx",
              "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 12}},
    "breaker": {"window_s": 10, "min_requests": 20, "failure_rate": 0.5,
                "open_ms": 5000, "max_open_ms": 60000, "half_open_requests": 1}
}]}"#;

const RATIO_PPM: u64 = 200_000;
const MIN_PER_S: u64 = 10;
const WINDOW_S: u64 = 12;

const WORKERS: usize = 4;
const REQUESTS_PER_WORKER: usize = 2_000;
/// Requests each worker serves between two steps of the clock.
const PER_ROUND: usize = 50;
/// The clock moves this much between rounds (one filter tick).
const ROUND_MS: u64 = 250;

fn proxy(config: &str) -> Proxy {
    Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .echo_logs(false)
        .build()
        .unwrap()
}

/// The breaker's key (`breaker::state_key`) and the budget's (`retry::budget_key`).
fn keys(proxy: &Proxy) -> (Vec<u8>, Vec<u8>) {
    let all = proxy.shared_data_keys();
    let find = |needle: &str| {
        all.iter()
            .find(|k| String::from_utf8_lossy(k).contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no key with {needle} in {all:?}"))
    };
    (find("sluice/breaker/"), find("sluice/retry_budget/"))
}

// The filter's shared encodings, decoded here to compare with a replay.
// breaker.rs (VERSION 2): version, mode, streak, succeeded (1 byte each),
// consecutive u32, last_failure_ms u64, until_ms u64, generation u32,
// head u64, slots u128, then 10 buckets of (calls, failures, slow) u32 LE,
// bucket i holding the epoch (ms / bucket length) ≡ i mod 10.
// retry.rs (version 1): version, window, epoch u64, head u64 (seconds), then
// per second slot (s mod window) requests, retries, open: u32 LE.

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

struct BreakerView {
    /// 0 closed, 1 open, 2 half-open (the byte the filter stores).
    mode: u8,
    /// The newest bucket's epoch.
    head: u64,
    /// bucket epoch → (calls, failures), for the epochs in the window.
    buckets: BTreeMap<u64, (u32, u32)>,
}

fn breaker_view(bytes: &[u8]) -> BreakerView {
    assert_eq!(bytes.len(), 52 + 120, "breaker encoding changed");
    assert_eq!(bytes[0], 2, "breaker encoding version changed");
    let head = u64_at(bytes, 28);
    let mut buckets = BTreeMap::new();
    for epoch in head.saturating_sub(9)..=head {
        let at = 52 + (epoch % 10) as usize * 12;
        let calls = u32_at(bytes, at);
        let failures = u32_at(bytes, at + 4);
        if calls > 0 {
            buckets.insert(epoch, (calls, failures));
        }
    }
    BreakerView {
        mode: bytes[1],
        head,
        buckets,
    }
}

/// The newest second, and second → (requests, retries, open) for the
/// seconds in the window.
fn budget_view(bytes: &[u8]) -> (u64, BTreeMap<u64, (u32, u32, u32)>) {
    let window = u64::from(bytes[1]);
    assert_eq!(window, WINDOW_S);
    assert_eq!(
        bytes.len(),
        18 + 12 * window as usize,
        "budget encoding changed"
    );
    let head = u64_at(bytes, 10);
    let mut slots = BTreeMap::new();
    for second in head.saturating_sub(window - 1)..=head {
        let at = 18 + (second % window) as usize * 12;
        let slot = (
            u32_at(bytes, at),
            u32_at(bytes, at + 4),
            u32_at(bytes, at + 8),
        );
        if slot != (0, 0, 0) {
            slots.insert(second, slot);
        }
    }
    (head, slots)
}

/// A small deterministic generator per worker thread.
struct XorShift(u64);

impl XorShift {
    fn chance(&mut self, ppm: u64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % 1_000_000 < ppm
    }
}

/// One request as the simulated router handled it.
#[derive(Debug, Clone, Copy)]
struct Done {
    at_ms: u64,
    granted: u32,
    attempts: u64,
    failed: bool,
}

/// The headers of a request to the shop.
const GET: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "http"),
    (":authority", "shop.local"),
    (":path", "/"),
];

/// The router's work for one request: attempts fail with 10 %, retried up
/// to what the filter granted; the last attempt's status goes downstream.
fn serve(vm: &Vm, proxy: &Proxy, rng: &mut XorShift) -> Result<Done, (Stream, String)> {
    let at_ms = proxy.now_unix_ms();
    let stream = vm.stream();
    let action = stream.request_headers(GET, true);
    if let Some(reply) = stream.local_reply() {
        stream.finish();
        return Err((stream, format!("{reply:?}")));
    }
    assert_eq!(action, Action::Continue);
    assert_eq!(
        stream.request_header("x-sluice-cluster").as_deref(),
        Some("shop_v1")
    );
    let granted: u32 = stream
        .request_header("x-envoy-max-retries")
        .unwrap()
        .parse()
        .unwrap();
    let mut attempts = 0u64;
    let failed = loop {
        attempts += 1;
        if !rng.chance(100_000) {
            break false;
        }
        if attempts > u64::from(granted) {
            break true;
        }
    };
    stream.set_attempt_count(attempts);
    let status = if failed { "503" } else { "200" };
    stream.response_headers(&[(":status", status)], true);
    stream.finish();
    assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    Ok(Done {
        at_ms,
        granted,
        attempts,
        failed,
    })
}

/// The module's bound (retry.rs, "The bound, exactly"), for every interval
/// of seconds `[a, b]`:
/// `retries(a..=b) ≤ ratio × requests(a−W+1 ..= b) + min_per_s × (b − a + W)`.
fn assert_within_budget(done: &[Done]) {
    let mut seconds: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for d in done {
        let e = seconds.entry(d.at_ms / 1_000).or_insert((0, 0));
        e.0 += 1;
        e.1 += d.attempts - 1;
    }
    let (Some(&first), Some(&last)) = (seconds.keys().next(), seconds.keys().last()) else {
        return;
    };
    let at = |s: u64| seconds.get(&s).copied().unwrap_or((0, 0));
    for a in first..=last {
        for b in a..=last {
            let retries: u64 = (a..=b).map(|s| at(s).1).sum();
            let requests: u64 = (a.saturating_sub(WINDOW_S - 1)..=b).map(|s| at(s).0).sum();
            let allowed = RATIO_PPM * requests + MIN_PER_S * (b - a + WINDOW_S) * 1_000_000;
            assert!(
                retries * 1_000_000 <= allowed,
                "seconds {a}..={b}: {retries} retries, allowed {:.1}",
                allowed as f64 / 1e6
            );
        }
    }
}

/// 4 worker threads × 2,000 requests, 10 % of attempts answered 503.
///
/// Checked:
/// - no request is turned away by the breaker while its shared state says
///   closed (with a 10 % failure rate against a 50 % threshold it never
///   leaves closed, so: no rejection at all);
/// - the retries granted stay within the budget's bound;
/// - the end state equals a sequential replay of the same outcomes. "Equal"
///   means: the breaker's window holds, bucket by bucket, exactly the calls
///   and failures of the replayed requests in those buckets (nothing lost or
///   counted twice by racing writers, held successes included once the
///   workers' ticks flushed them), and the budget's slots hold, once the
///   workers' leases are given back, exactly the replayed deposits (one
///   per request) and charges (the retries used: reserved minus refunded),
///   with no reservation left open. Second by second, a deposit lands in
///   its request's second or a later one, at most a second late (with the
///   worker's next write: a tick, every round), and a charge in its
///   request's second or the one before (a lease's slot, the lease living
///   at most a second). The CAS tokens and the order of the writes differ
///   from a sequential run and are not compared.
#[test]
fn racing_workers_keep_one_exact_breaker_and_budget() {
    let proxy = proxy(SHOP);
    let vms = proxy.boot(WORKERS).unwrap();
    let workers: Vec<Vm> = vms[1..].to_vec();
    let rounds = REQUESTS_PER_WORKER / PER_ROUND;
    let start = Arc::new(Barrier::new(WORKERS + 1));
    let end = Arc::new(Barrier::new(WORKERS + 1));
    let (breaker_key, budget_key) = keys(&proxy);

    let handles: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(index, vm)| {
            let vm = vm.clone();
            let proxy = proxy.clone();
            let (start, end) = (Arc::clone(&start), Arc::clone(&end));
            let breaker_key = breaker_key.clone();
            thread::spawn(move || {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) * 7919));
                let mut done = Vec::new();
                for _ in 0..rounds {
                    start.wait();
                    for _ in 0..PER_ROUND {
                        match serve(&vm, &proxy, &mut rng) {
                            Ok(d) => done.push(d),
                            Err((_, reply)) => {
                                let (bytes, _) = proxy.shared_data(&breaker_key).unwrap();
                                let view = breaker_view(&bytes);
                                assert_ne!(
                                    view.mode, 0,
                                    "worker {index}: turned away while the breaker is closed: {reply}"
                                );
                                panic!("worker {index}: unexpected rejection: {reply}");
                            }
                        }
                    }
                    end.wait();
                }
                done
            })
        })
        .collect();
    for _ in 0..rounds {
        start.wait();
        end.wait();
        proxy.advance_ms(ROUND_MS);
    }
    let done: Vec<Done> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    // Every worker's tick writes what it holds.
    proxy.tick_now();
    assert_eq!(done.len(), WORKERS * REQUESTS_PER_WORKER);
    assert!(proxy.trapped_vms().is_empty());

    let lost_races =
        proxy.shared_set_mismatches(&breaker_key) + proxy.shared_set_mismatches(&budget_key);
    println!(
        "{} requests, {} retries, {} failed; {lost_races} CAS mismatches from racing workers",
        done.len(),
        done.iter().map(|d| d.attempts - 1).sum::<u64>(),
        done.iter().filter(|d| d.failed).count()
    );

    // Retries within the bound, and every request that needed one got it
    // while the budget had room (10 % failures against a 20 % budget).
    assert_within_budget(&done);
    let starved = done.iter().filter(|d| d.granted == 0).count();
    assert!(
        starved * 100 < done.len(),
        "{starved} requests got no retry"
    );

    // The breaker never left closed.
    let (bytes, _) = proxy.shared_data(&breaker_key).unwrap();
    let breaker = breaker_view(&bytes);
    assert_eq!(breaker.mode, 0, "breaker not closed");
    assert_eq!(proxy.gauge("sluice.shop.breaker.stable.state"), Some(0));
    assert_eq!(
        proxy
            .counter("sluice.shop.breaker.stable.rejected")
            .unwrap_or(0),
        0
    );

    // Sequential replay of the same outcomes.
    let mut replay_breaker: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    let mut replay_budget: BTreeMap<u64, (u32, u32, u32)> = BTreeMap::new();
    for d in &done {
        let calls = d.attempts as u32;
        let failures = calls - 1 + u32::from(d.failed);
        let b = replay_breaker.entry(d.at_ms / 1_000).or_insert((0, 0));
        b.0 += calls;
        b.1 += failures;
        let s = replay_budget.entry(d.at_ms / 1_000).or_insert((0, 0, 0));
        s.0 += 1;
        s.1 += (d.attempts - 1) as u32;
    }
    // Only what is still in the window is kept by either.
    let head = breaker.head;
    replay_breaker.retain(|epoch, _| *epoch + 10 > head);
    assert_eq!(breaker.buckets, replay_breaker, "breaker window vs replay");
    // Past the leases' lifetime (`retry::LEASE_MS`), the ticks give them
    // back.
    proxy.advance_ms(1_000);
    proxy.tick_now();
    let (bytes, _) = proxy.shared_data(&budget_key).unwrap();
    let (head, budget) = budget_view(&bytes);
    let first = *replay_budget.keys().next().unwrap();
    assert!(first + WINDOW_S > head, "the window holds the whole run");
    let total = |slots: &BTreeMap<u64, (u32, u32, u32)>| {
        slots
            .values()
            .fold((0, 0, 0), |(r, c, o), &(requests, retries, open)| {
                (r + requests, c + retries, o + open)
            })
    };
    assert_eq!(
        total(&budget),
        total(&replay_budget),
        "budget totals vs replay"
    );
    let upto = |slots: &BTreeMap<u64, (u32, u32, u32)>, second: u64| {
        slots
            .range(..=second)
            .fold((0, 0), |(r, c), (_, &(requests, retries, _))| {
                (r + requests, c + retries)
            })
    };
    for second in first..=head {
        let (deposited, charged) = upto(&budget, second);
        let (served, used) = upto(&replay_budget, second);
        let (served_before, _) = upto(&replay_budget, second.saturating_sub(1));
        let (_, used_next) = upto(&replay_budget, second + 1);
        assert!(
            served_before <= deposited && deposited <= served,
            "second {second}: {deposited} deposited, {served_before}..={served} served"
        );
        assert!(
            used <= charged && charged <= used_next,
            "second {second}: {charged} charged, {used}..={used_next} used"
        );
    }
}

/// Every shared-data write of the filter loses its CAS race for a while
/// (the fault hook answers `CasMismatch`, as if other workers always won).
///
/// What the user sees:
/// - breaker closed: requests still go to `shop_v1` (the closed check is a
///   read, no write), with `x-envoy-max-retries: 0` (a reservation that could
///   not be recorded grants nothing: the budget errs towards fewer retries);
///   failures that could not be written are simply not counted;
/// - breaker due for a probe: the admission (a write) is lost, so the
///   request gets the breaker's 503 with `retry-after: 1` and
///   `x-sluice-breaker: open`, never an unconfigured cluster and never a
///   trap;
/// - once writes land again, the next request is admitted as the probe and
///   its success closes the breaker.
#[test]
fn all_cas_retries_lost_for_a_while_still_answers_sensibly() {
    let proxy = proxy(SHOP);
    let vms = proxy.boot(2).unwrap();
    let (w0, w1) = (&vms[1], &vms[2]);
    let (breaker_key, budget_key) = keys(&proxy);

    // Closed breaker, every write lost.
    proxy.fail_shared_sets(&breaker_key, 1_000_000);
    proxy.fail_shared_sets(&budget_key, 1_000_000);
    for i in 0..40 {
        let vm = if i % 2 == 0 { w0 } else { w1 };
        let s = vm.stream();
        assert_eq!(s.request_headers(GET, true), Action::Continue);
        assert_eq!(
            s.request_header("x-sluice-cluster").as_deref(),
            Some("shop_v1")
        );
        assert_eq!(
            s.request_header("x-envoy-max-retries").as_deref(),
            Some("0")
        );
        s.response_headers(&[(":status", "503")], true);
        s.finish();
        proxy.advance_ms(10);
    }
    proxy.tick_now();
    assert!(proxy.trapped_vms().is_empty());
    assert!(proxy.shared_set_mismatches(&budget_key) >= 40 * 16);
    // Nothing could be written: the breaker is still closed and empty.
    let view = breaker_view(&proxy.shared_data(&breaker_key).unwrap().0);
    assert_eq!(view.mode, 0);
    assert!(view.buckets.is_empty());

    // Writes land again: 40 failures trip the breaker.
    proxy.fail_shared_sets(&breaker_key, 0);
    proxy.fail_shared_sets(&budget_key, 0);
    for i in 0..40 {
        let vm = if i % 2 == 0 { w0 } else { w1 };
        let s = vm.stream();
        s.request_headers(GET, true);
        if s.local_reply().is_none() {
            s.response_headers(&[(":status", "503")], true);
        }
        s.finish();
    }
    assert_eq!(
        breaker_view(&proxy.shared_data(&breaker_key).unwrap().0).mode,
        1
    );
    // The open time (5 s, up to 20 % jitter) passes; the probe's admission
    // write is lost on every try.
    proxy.advance_ms(6_100);
    proxy.fail_shared_sets(&breaker_key, 1_000_000);
    for vm in [w0, w1, w0] {
        let s = vm.stream();
        s.request_headers(GET, true);
        let reply = s
            .local_reply()
            .expect("a lost admission must not reach an upstream");
        assert_eq!(reply.status, 503);
        assert!(
            reply.headers.contains(&("retry-after".into(), "1".into())),
            "{reply:?}"
        );
        assert!(
            reply
                .headers
                .contains(&("x-sluice-breaker".into(), "open".into())),
            "{reply:?}"
        );
        assert_eq!(s.request_header("x-sluice-cluster"), None);
        s.finish();
        assert!(vm.trapped().is_none());
    }
    // Writes land again: one probe is admitted and its success closes.
    proxy.fail_shared_sets(&breaker_key, 0);
    proxy.advance_ms(1_000);
    let s = w1.stream();
    assert_eq!(s.request_headers(GET, true), Action::Continue);
    assert_eq!(
        s.request_header("x-sluice-cluster").as_deref(),
        Some("shop_v1")
    );
    s.response_headers(&[(":status", "200")], true);
    s.finish();
    assert_eq!(
        breaker_view(&proxy.shared_data(&breaker_key).unwrap().0).mode,
        0
    );
}
