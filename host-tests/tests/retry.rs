//! Retry governance through the real sluice.wasm in the fake Envoy host:
//! several worker VMs drawing from ONE budget in shared data, on the virtual
//! clock.
//!
//! The fake host does not route, so the tests play Envoy's router: for each
//! request they read the `x-envoy-max-retries` the filter wrote, decide how
//! many attempts the router would have made (every attempt fails in an
//! outage; an attempt fails with some probability when healthy), report them
//! through `upstream.request_attempt_count` and answer with the last
//! attempt's status, as Envoy does when it passes the response headers on.
//!
//! Run with `cargo test -p sluice-host-tests --test retry -- --nocapture` to
//! see the measured amplification and success rates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;

use sluice_host::{require_sluice_wasm, Action, LogLevel, Proxy, Stream, Vm};

/// The issue's example retry block.
const EXAMPLE_RETRY: &str = r#"{
    "max_retries": 2,
    "retry_on": "5xx,reset,connect-failure,refused-stream",
    "per_try_timeout_ms": 1000,
    "timeout_ms": 5000,
    "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10},
    "deadline_header": "x-request-timeout-ms"
}"#;

const RATIO: f64 = 0.2;
const RATIO_PPM: u64 = 200_000;
const MIN_PER_S: u64 = 10;
const WINDOW_S: u64 = 10;

type Headers<'a> = &'a [(&'a str, &'a str)];

/// Everything a client could send to raise its retries or timeouts.
const HOSTILE: &[(&str, &str)] = &[
    ("x-envoy-max-retries", "10"),
    ("X-Envoy-Max-Retries", "7"),
    ("x-envoy-retry-on", "5xx,gateway-error,reset,retriable-4xx"),
    ("x-envoy-retry-grpc-on", "cancelled,unavailable"),
    ("x-envoy-upstream-rq-timeout-ms", "600000"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "600000"),
    ("x-envoy-hedge-on-per-try-timeout", "true"),
    ("x-envoy-expected-rq-timeout-ms", "600000"),
    ("x-envoy-retriable-status-codes", "404,409"),
    ("x-envoy-retriable-header-names", "x-retry-me"),
];

fn shop(retry: &str) -> String {
    format!(
        r#"{{"services": [{{
            "name": "shop",
            "match": {{"authority": "shop.local", "path_prefix": "/"}},
            "stable": "shop_v1",
            "retry": {retry}
        }}]}}"#
    )
}

fn proxy(config: &str) -> Proxy {
    Proxy::builder(require_sluice_wasm())
        .plugin_config(config)
        .root_id("sluice")
        .build()
        .unwrap()
}

/// Envoy's main-thread VM plus two workers (`--concurrency 2`); returns the
/// workers.
fn workers(proxy: &Proxy) -> Vec<Vm> {
    proxy.boot(2).unwrap().into_iter().skip(1).collect()
}

fn now_ms(proxy: &Proxy) -> u64 {
    proxy.now_unix_nanos() / 1_000_000
}

/// Starts a request to the shop service; returns the stream and the retries
/// the filter granted (the `x-envoy-max-retries` the router would read).
fn start(vm: &Vm, extra: &[(&str, &str)]) -> (Stream, u32) {
    let mut headers = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "shop.local"),
        (":path", "/"),
    ];
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    assert_eq!(stream.request_headers(&headers, true), Action::Continue);
    let values = stream.request_header_map().get_all("x-envoy-max-retries");
    assert_eq!(
        values.len(),
        1,
        "exactly one x-envoy-max-retries: {values:?}"
    );
    let granted = values[0].parse().unwrap();
    (stream, granted)
}

/// The router is done: `attempts` were made, the last answered `status`.
fn complete(stream: &Stream, attempts: u64, status: u32) {
    stream.set_attempt_count(attempts);
    stream.response_headers(&[(":status", &status.to_string())], true);
    stream.finish();
    assert!(
        stream.vm().trapped().is_none(),
        "{:?}",
        stream.vm().trapped()
    );
}

/// The budget level as the next tick reports it (every worker's tick
/// writes what it holds first; `vm`'s comes last and sets the gauge).
fn level_now(proxy: &Proxy, vm: &Vm) -> u64 {
    proxy.tick_now();
    vm.tick();
    proxy.gauge("sluice.shop.retry.budget_level").unwrap()
}

fn counter(proxy: &Proxy, name: &str) -> u64 {
    proxy.tick_now();
    proxy
        .counter(&format!("sluice.shop.retry.{name}"))
        .unwrap_or(0)
}

/// A small deterministic generator, so runs repeat.
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
    /// Unix time the request arrived (ms); its second is its reservation's slot.
    at_ms: u64,
    granted: u32,
    attempts: u64,
    ok: bool,
}

struct Traffic<'a> {
    proxy: &'a Proxy,
    vms: &'a [Vm],
    /// Requests per second, spread evenly over the VMs in turn.
    rps: u64,
    /// How long every attempt takes (requests overlap: reservations are held
    /// while the router works).
    attempt_ms: u64,
    extra: &'a [(&'a str, &'a str)],
}

impl Traffic<'_> {
    /// Runs `duration_ms` of traffic from now; `fails` decides each attempt.
    /// Returns every request once all have completed.
    fn run(&self, duration_ms: u64, mut fails: impl FnMut() -> bool) -> Vec<Done> {
        let interval = 1_000 / self.rps;
        let begin = now_ms(self.proxy);
        let end = begin + duration_ms;
        let mut next_arrival = begin;
        let mut sent = 0usize;
        let mut in_flight: Vec<(u64, Stream, Done)> = Vec::new();
        let mut done = Vec::new();
        loop {
            let next_completion = in_flight.iter().map(|(at, _, _)| *at).min();
            let arrival = (next_arrival < end).then_some(next_arrival);
            let at = match (arrival, next_completion) {
                (None, None) => break,
                (Some(a), Some(c)) => a.min(c),
                (a, c) => a.or(c).unwrap(),
            };
            let now = now_ms(self.proxy);
            if at > now {
                self.proxy.advance_ms(at - now);
            }
            // Completions first: a response that arrives in the same
            // millisecond as a request has freed its reservation.
            let (due, rest): (Vec<_>, Vec<_>) =
                in_flight.into_iter().partition(|(when, _, _)| *when <= at);
            in_flight = rest;
            for (_, stream, record) in due {
                complete(&stream, record.attempts, if record.ok { 200 } else { 503 });
                done.push(record);
            }
            if arrival == Some(at) {
                let vm = &self.vms[sent % self.vms.len()];
                sent += 1;
                let (stream, granted) = start(vm, self.extra);
                let mut attempts = 0u64;
                let ok = loop {
                    attempts += 1;
                    if !fails() {
                        break true;
                    }
                    if attempts > u64::from(granted) {
                        break false;
                    }
                };
                let record = Done {
                    at_ms: at,
                    granted,
                    attempts,
                    ok,
                };
                in_flight.push((at + attempts * self.attempt_ms, stream, record));
                next_arrival += interval;
            }
        }
        done
    }
}

/// (requests, retries) per second.
fn per_second(done: &[Done]) -> BTreeMap<u64, (u64, u64)> {
    let mut seconds = BTreeMap::new();
    for record in done {
        let entry = seconds.entry(record.at_ms / 1_000).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += record.attempts - 1;
    }
    seconds
}

/// The module's bound, for every interval of seconds `[a, b]`:
/// `retries(a..=b) ≤ ratio × requests(a−W+1 ..= b) + min_per_s × (b − a + W)`,
/// retries counted in the second they were granted (the reservation's slot).
/// The budget was fresh (nothing before `done`).
fn assert_within_budget(done: &[Done]) {
    let seconds = per_second(done);
    let (Some(&first), Some(&last)) = (seconds.keys().next(), seconds.keys().last()) else {
        return;
    };
    let at = |s: u64| seconds.get(&s).copied().unwrap_or((0, 0));
    for a in first..=last {
        for b in a..=last {
            let retries: u64 = (a..=b).map(|s| at(s).1).sum();
            let requests: u64 = (a.saturating_sub(WINDOW_S - 1)..=b).map(|s| at(s).0).sum();
            let allowed_units = RATIO_PPM * requests + MIN_PER_S * (b - a + WINDOW_S) * 1_000_000;
            assert!(
                retries * 1_000_000 <= allowed_units,
                "seconds {}..={}: {retries} retries, allowed {:.1} ({requests} requests)",
                a - first,
                b - first,
                allowed_units as f64 / 1e6
            );
        }
    }
}

fn totals(done: &[Done]) -> (u64, u64) {
    let requests = done.len() as u64;
    let attempts = done.iter().map(|record| record.attempts).sum();
    (requests, attempts)
}

// ------------------------------------------------------------------ tests

#[test]
fn client_retry_and_timeout_headers_are_overwritten_or_removed() {
    let config = format!(
        r#"{{"services": [
            {{"name": "shop", "match": {{"authority": "shop.local"}}, "stable": "shop_v1",
              "retry": {EXAMPLE_RETRY}}},
            {{"name": "bare", "match": {{"authority": "bare.local"}}, "stable": "bare_v1",
              "retry": {{"max_retries": 1, "retry_on": "5xx,unavailable,cancelled"}}}}
        ]}}"#
    );
    let proxy = proxy(&config);
    let vms = workers(&proxy);
    for vm in &vms {
        let (stream, granted) = start(vm, HOSTILE);
        let map = stream.request_header_map();
        assert_eq!(granted, 2);
        let one = |name: &str| {
            let values = map.get_all(name);
            assert!(values.len() <= 1, "{name} twice: {values:?}");
            values.into_iter().next()
        };
        assert_eq!(
            one("x-envoy-retry-on").as_deref(),
            Some("5xx,reset,connect-failure,refused-stream")
        );
        assert_eq!(one("x-envoy-retry-grpc-on"), None);
        assert_eq!(
            one("x-envoy-upstream-rq-timeout-ms").as_deref(),
            Some("5000")
        );
        assert_eq!(
            one("x-envoy-upstream-rq-per-try-timeout-ms").as_deref(),
            Some("1000")
        );
        for removed in [
            "x-envoy-hedge-on-per-try-timeout",
            "x-envoy-expected-rq-timeout-ms",
            "x-envoy-retriable-status-codes",
            "x-envoy-retriable-header-names",
        ] {
            assert_eq!(one(removed), None, "{removed} must not reach the router");
        }
        complete(&stream, 1, 200);

        // No timeouts configured: the client's are removed, the route's stand.
        let stream = vm.stream();
        let mut headers = vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "bare.local"),
            (":path", "/"),
        ];
        headers.extend_from_slice(HOSTILE);
        assert_eq!(stream.request_headers(&headers, true), Action::Continue);
        let map = stream.request_header_map();
        assert_eq!(map.get_all("x-envoy-max-retries"), ["1"]);
        assert_eq!(map.get_all("x-envoy-retry-on"), ["5xx"]);
        assert_eq!(
            map.get_all("x-envoy-retry-grpc-on"),
            ["unavailable,cancelled"]
        );
        for removed in [
            "x-envoy-upstream-rq-timeout-ms",
            "x-envoy-upstream-rq-per-try-timeout-ms",
            "x-envoy-hedge-on-per-try-timeout",
            "x-envoy-expected-rq-timeout-ms",
            "x-envoy-retriable-status-codes",
            "x-envoy-retriable-header-names",
        ] {
            assert!(
                !map.contains(removed),
                "{removed} must not reach the router"
            );
        }
        complete(&stream, 1, 200);
    }
}

#[test]
fn an_outage_across_workers_stays_within_the_one_budget() {
    let proxy = proxy(&shop(EXAMPLE_RETRY));
    let vms = workers(&proxy);
    // 100 requests/s over two workers for 40 s; every attempt fails and takes
    // 150 ms, so ~15-45 requests are in flight holding reservations; every
    // client asks for 10 retries.
    let done = Traffic {
        proxy: &proxy,
        vms: &vms,
        rps: 100,
        attempt_ms: 150,
        extra: HOSTILE,
    }
    .run(40_000, || true);
    let (requests, attempts) = totals(&done);
    let retries = attempts - requests;
    let seconds = per_second(&done);
    let spanned = seconds.len() as u64;
    // Within the window the budget is free to bunch: when the second that
    // spent the reserve leaves the window, the reserve comes back at once.
    let per_s: Vec<u64> = seconds.values().map(|&(_, retries)| retries).collect();
    eprintln!(
        "host outage: retries per second min {} max {} (first 12 s: {:?})",
        per_s.iter().min().unwrap(),
        per_s.iter().max().unwrap(),
        &per_s[..12]
    );
    let amplification = attempts as f64 / requests as f64;
    let allowed = 1.0 + RATIO + (MIN_PER_S * (spanned - 1 + WINDOW_S)) as f64 / requests as f64;
    eprintln!(
        "host outage: {requests} requests, {attempts} attempts over {spanned} s on 2 workers: \
         amplification {amplification:.4} (bound {allowed:.4})"
    );
    assert!(done.iter().all(|record| !record.ok));
    // Both workers draw from one budget: a budget per worker would allow
    // twice the reserve (amplification 1.4 here).
    assert!(
        amplification <= allowed,
        "amplification {amplification} > {allowed}"
    );
    assert_within_budget(&done);
    // The budget gives what it may, not less: at least its ratio.
    assert!(
        retries as f64 >= RATIO * requests as f64,
        "{retries} retries for {requests} requests"
    );
    let last_window: Vec<&Done> = done
        .iter()
        .filter(|record| record.at_ms >= done[0].at_ms + 30_000)
        .collect();
    let window_retries: u64 = last_window.iter().map(|r| r.attempts - 1).sum();
    let window_amplification = 1.0 + window_retries as f64 / last_window.len() as f64;
    eprintln!(
        "host outage, last 10 s (steady state): amplification {window_amplification:.4} \
         (1 + ratio + min_per_s/rps = {:.4})",
        1.0 + RATIO + MIN_PER_S as f64 / 100.0
    );
    let granted = counter(&proxy, "granted");
    let denied = counter(&proxy, "denied");
    assert_eq!(granted, retries, "every granted retry was used");
    assert_eq!(granted + denied, 2 * requests);
}

#[test]
fn rare_failures_get_their_retries() {
    let proxy = proxy(&shop(EXAMPLE_RETRY));
    let vms = workers(&proxy);
    let mut rng = XorShift(0x5eed_1234_abcd_9876);
    // 10 % of attempts fail, independently; 200 requests/s, 100 ms each.
    // The clients ask for no retries: the service's policy decides anyway.
    let done = Traffic {
        proxy: &proxy,
        vms: &vms,
        rps: 200,
        attempt_ms: 100,
        extra: &[("x-envoy-max-retries", "0")],
    }
    .run(30_000, || rng.chance(100_000));
    let (requests, attempts) = totals(&done);
    let ok = done.iter().filter(|record| record.ok).count() as u64;
    let first_failed = done.iter().filter(|record| record.attempts > 1).count() as u64;
    let success = ok as f64 / requests as f64;
    eprintln!(
        "host 10% failures: {requests} requests, {first_failed} failed a first attempt, \
         {attempts} attempts; success {:.3}% (without retries {:.3}%)",
        success * 100.0,
        100.0 - first_failed as f64 * 100.0 / requests as f64
    );
    assert!(success > 0.99, "success rate {success}");
    // Every request got both its retries, so only triple failures fail.
    assert!(done.iter().all(|record| record.granted == 2));
    assert!(done.iter().all(|record| record.ok || record.attempts == 3));
    assert_eq!(counter(&proxy, "denied"), 0);
    assert_eq!(counter(&proxy, "granted"), 2 * requests);
    assert_within_budget(&done);
}

#[test]
fn the_budget_recovers_within_one_window_after_the_outage() {
    let proxy = proxy(&shop(EXAMPLE_RETRY));
    let vms = workers(&proxy);
    let traffic = Traffic {
        proxy: &proxy,
        vms: &vms,
        rps: 100,
        attempt_ms: 50,
        extra: &[],
    };
    let outage = traffic.run(25_000, || true);
    let outage_end = now_ms(&proxy);
    let dry = level_now(&proxy, &vms[0]);
    assert!(
        dry < MIN_PER_S * WINDOW_S / 2,
        "the outage should have emptied the budget, level {dry}"
    );
    // Healthy again: within one window every request gets its retries back
    // and the balance is at least the reserve.
    let healthy = traffic.run(WINDOW_S * 1_000 - 200, || false);
    assert!(healthy.iter().all(|record| record.ok));
    let first_full = healthy
        .iter()
        .find(|record| record.granted == 2)
        .map(|record| record.at_ms - outage_end);
    eprintln!(
        "host recovery: {} outage requests, level {dry} at its end; first request with both \
         retries {first_full:?} ms later",
        outage.len()
    );
    let now = now_ms(&proxy);
    assert!(now - outage_end <= WINDOW_S * 1_000);
    assert!(
        level_now(&proxy, &vms[0]) >= MIN_PER_S * WINDOW_S,
        "level one window after the outage"
    );
    let (stream, granted) = start(&vms[0], &[]);
    assert_eq!(granted, 2);
    complete(&stream, 1, 200);

    // Without any traffic it recovers as well: another outage, then silence.
    traffic.run(15_000, || true);
    let dry = level_now(&proxy, &vms[1]);
    assert!(dry < MIN_PER_S * WINDOW_S / 2, "level {dry}");
    proxy.advance_ms(WINDOW_S * 1_000);
    assert!(level_now(&proxy, &vms[1]) >= MIN_PER_S * WINDOW_S);
}

#[test]
fn unused_reservations_are_refunded_and_used_retries_charged_once() {
    // No deposits (ratio 0): the level is exactly the reserve minus charges.
    let proxy = proxy(&shop(
        r#"{"max_retries": 2, "budget": {"ratio": 0, "min_per_s": 1, "window_s": 10}}"#,
    ));
    let vms = workers(&proxy);
    let (w1, w2) = (&vms[0], &vms[1]);
    assert_eq!(level_now(&proxy, w1), 10);

    // A reservation holds its tokens, for every worker, until settled.
    let (a, granted) = start(w1, &[]);
    assert_eq!(granted, 2);
    assert_eq!(level_now(&proxy, w2), 8);
    complete(&a, 1, 200);
    assert_eq!(level_now(&proxy, w2), 10, "both retries unused: refunded");

    let (b, _) = start(w2, &[]);
    complete(&b, 2, 200);
    assert_eq!(level_now(&proxy, w1), 9, "one retry used: costs one");
    let (c, _) = start(w1, &[]);
    complete(&c, 3, 503);
    assert_eq!(level_now(&proxy, w1), 7, "two used: cost two");

    // Settled at the response headers, once, and not again at the end of
    // the stream. (The old fake let this test raise the attempt count after
    // the response headers; Envoy's router makes no attempt after it passed
    // them on, and the fake now refuses it.)
    let (d, _) = start(w2, &[]);
    d.set_attempt_count(1);
    d.response_headers(&[(":status", "200")], false);
    assert_eq!(level_now(&proxy, w1), 7);
    d.finish();
    assert_eq!(level_now(&proxy, w1), 7, "settled twice");

    // No response headers (the client left): settled at the end of the
    // stream from what the router did.
    let (e, _) = start(w1, &[]);
    e.set_attempt_count(2);
    e.finish();
    assert_eq!(level_now(&proxy, w1), 6);
    // Never attempted (attempt count 0): nothing used.
    let (f, _) = start(w2, &[]);
    f.set_attempt_count(0);
    f.finish();
    assert_eq!(level_now(&proxy, w1), 6);

    // Many open at once on both workers: together they hold at most the 6
    // tokens, whatever the clients ask.
    let open: Vec<(Stream, u32)> = (0..12)
        .map(|i| start(&vms[i % 2], &[("x-envoy-max-retries", "10")]))
        .collect();
    let held: u32 = open.iter().map(|(_, granted)| granted).sum();
    assert_eq!(
        held,
        6,
        "grants while open: {:?}",
        open.iter().map(|o| o.1).collect::<Vec<_>>()
    );
    assert_eq!(level_now(&proxy, w1), 0);
    assert!(open.iter().any(|(_, granted)| *granted == 0));
    for (stream, _) in &open {
        complete(stream, 1, 200);
    }
    assert_eq!(level_now(&proxy, w2), 6, "all refunded");
    let requests = 6 + 12;
    assert_eq!(
        counter(&proxy, "granted") + counter(&proxy, "denied"),
        2 * requests
    );
    assert_eq!(counter(&proxy, "granted"), 2 * 6 + 6);
}

#[test]
fn client_deadlines_cut_the_retries_and_the_timeout() {
    let proxy = proxy(&shop(EXAMPLE_RETRY));
    let vms = workers(&proxy);
    // (client headers, max retries, upstream timeout, cut by the deadline)
    // with per_try_timeout_ms 1000 and timeout_ms 5000.
    let cases: &[(Headers, &str, &str, bool)] = &[
        (&[], "2", "5000", false),
        (&[("grpc-timeout", "1500m")], "0", "1500", true),
        (&[("grpc-timeout", "2S")], "1", "2000", true),
        (&[("grpc-timeout", "2999999u")], "1", "2999", true),
        (&[("x-request-timeout-ms", "3000")], "2", "3000", false),
        (&[("x-request-timeout-ms", "60000")], "2", "5000", false),
        (&[("x-request-timeout-ms", "999")], "0", "999", true),
        // The stricter of the two wins.
        (
            &[("grpc-timeout", "10S"), ("x-request-timeout-ms", "1200")],
            "0",
            "1200",
            true,
        ),
        (
            &[("grpc-timeout", "1M"), ("x-request-timeout-ms", "2100")],
            "1",
            "2100",
            true,
        ),
        // An expired deadline is the shortest timeout, never "no timeout".
        (&[("grpc-timeout", "0n")], "0", "1", true),
        // Garbage is ignored, as if no deadline had been sent.
        (&[("x-request-timeout-ms", "-5")], "2", "5000", false),
        (&[("grpc-timeout", "123456789S")], "2", "5000", false),
        (
            &[("x-request-timeout-ms", "99999999999999999999999")],
            "2",
            "5000",
            false,
        ),
        // A client's own timeout headers neither raise nor replace it.
        (
            &[
                ("x-request-timeout-ms", "2500"),
                ("x-envoy-upstream-rq-timeout-ms", "600000"),
                ("x-envoy-max-retries", "10"),
            ],
            "1",
            "2500",
            true,
        ),
    ];
    let mut cuts = 0;
    for (i, (headers, retries, timeout, cut)) in cases.iter().enumerate() {
        let (stream, granted) = start(&vms[i % 2], headers);
        let map = stream.request_header_map();
        assert_eq!(granted.to_string(), *retries, "case {i}: {headers:?}");
        assert_eq!(
            map.get_all("x-envoy-upstream-rq-timeout-ms"),
            [*timeout],
            "case {i}: {headers:?}"
        );
        assert_eq!(
            map.get_all("x-envoy-upstream-rq-per-try-timeout-ms"),
            ["1000"]
        );
        if *cut {
            cuts += 1;
        }
        assert_eq!(
            counter(&proxy, "deadline_cut"),
            cuts,
            "case {i}: {headers:?}"
        );
        complete(&stream, 1, 200);
    }
    // Only the budget denies: a deadline cut is not a denial.
    assert_eq!(counter(&proxy, "denied"), 0);
}

#[test]
fn the_dry_warning_is_rate_limited() {
    let proxy = proxy(&shop(EXAMPLE_RETRY));
    let vms = workers(&proxy);
    let seconds = 35;
    Traffic {
        proxy: &proxy,
        vms: &vms,
        rps: 100,
        attempt_ms: 20,
        extra: &[],
    }
    .run(seconds * 1_000, || true);
    let denied = counter(&proxy, "denied");
    let warnings: Vec<_> = proxy
        .logs()
        .into_iter()
        .filter(|entry| {
            entry
                .message
                .contains("retry budget of service shop ran dry")
        })
        .collect();
    eprintln!(
        "host dry warnings: {} lines for {denied} denied retries over {seconds} s",
        warnings.len()
    );
    assert!(warnings.iter().all(|entry| entry.level == LogLevel::Warn));
    for vm in &vms {
        let label = vm.label();
        let lines = warnings.iter().filter(|entry| entry.vm == label).count() as u64;
        // At most once a window per VM, and it did warn.
        assert!(
            (1..=seconds.div_ceil(WINDOW_S)).contains(&lines),
            "{label}: {lines} warnings in {seconds} s"
        );
    }
    assert!(denied > 1_000);
}

#[test]
fn the_budget_survives_a_reconfigure_unless_its_block_changes() {
    const SMALL: &str =
        r#"{"max_retries": 2, "budget": {"ratio": 0, "min_per_s": 1, "window_s": 60}}"#;
    let proxy = proxy(&shop(SMALL));
    let vms = workers(&proxy);
    // Spend 58 of the 60 tokens in an outage.
    for i in 0..29 {
        let (stream, granted) = start(&vms[i % 2], &[]);
        assert_eq!(granted, 2);
        complete(&stream, 3, 503);
    }
    // A request in flight across the push holds the last two.
    let (in_flight, granted) = start(&vms[0], &[]);
    assert_eq!(granted, 2);
    assert_eq!(level_now(&proxy, &vms[0]), 0);

    // Another service added, the shop's retry block unchanged: same budget.
    let same = format!(
        r#"{{"services": [
            {{"name": "shop", "match": {{"authority": "shop.local"}}, "stable": "shop_v1",
              "retry": {SMALL}}},
            {{"name": "other", "match": {{"authority": "other.local"}}, "stable": "other_v1"}}
        ]}}"#
    );
    proxy.reconfigure(same).unwrap();
    let (stream, granted) = start(&vms[1], &[]);
    assert_eq!(granted, 0, "the spent budget must carry over");
    complete(&stream, 1, 503);
    assert_eq!(level_now(&proxy, &vms[1]), 0);
    // The old configuration's request settles into the same budget.
    complete(&in_flight, 1, 200);
    assert_eq!(level_now(&proxy, &vms[1]), 2);
    let (stream, granted) = start(&vms[1], &[]);
    assert_eq!(granted, 2);
    complete(&stream, 3, 503);
    assert_eq!(level_now(&proxy, &vms[0]), 0);

    // Other retry settings changed, the budget block not: the counts are
    // still valid and are kept (a fresh budget on every push would hand out
    // a new reserve each time, during an outage too).
    proxy
        .reconfigure(shop(
            r#"{"max_retries": 1, "timeout_ms": 2000, "retry_on": "5xx",
                "budget": {"ratio": 0, "min_per_s": 1, "window_s": 60}}"#,
        ))
        .unwrap();
    let (stream, granted) = start(&vms[0], &[]);
    assert_eq!(granted, 0, "the spent budget must carry over");
    assert_eq!(
        stream
            .request_header("x-envoy-upstream-rq-timeout-ms")
            .as_deref(),
        Some("2000"),
        "the new policy is in force"
    );
    complete(&stream, 1, 503);

    // A changed budget block: a fresh budget (at its reserve).
    proxy
        .reconfigure(shop(
            r#"{"max_retries": 2, "budget": {"ratio": 0, "min_per_s": 2, "window_s": 60}}"#,
        ))
        .unwrap();
    assert_eq!(level_now(&proxy, &vms[0]), 120);
    let (stream, granted) = start(&vms[0], &[]);
    assert_eq!(granted, 2);
    complete(&stream, 3, 503);
    // Plenty of tokens: the worker took a lease of an eighth (15), which
    // holds the unused ones until its tick gives it back, past its second
    // of lifetime; then only the two retries used stay charged.
    assert_eq!(level_now(&proxy, &vms[1]), 105);
    proxy.advance_ms(1_000);
    assert_eq!(level_now(&proxy, &vms[1]), 118);
}
