//! Criterion, native: Sluice's policy core per request.
//!
//! `lifecycle/s<S>_r<R>`: one request through the glue's sequence
//! (`sluice_benches::native`: match the service, evaluate the rules, sticky
//! hash, breaker check, budget reserve and retry headers; settle at the
//! response; breaker record at the end) for S ∈ {1, 10, 100} services and
//! R ∈ {1, 10, 50} rules. The request goes to the LAST service and matches
//! no rule, so a scan over services or rules would show.
//!
//! `find_service/s<S>`: the host lookup alone, up to 1000 services.
//! `realistic/*`: the realistic config (benches/config/sluice.json), whole
//! and in parts.
//!
//! cargo bench -p sluice-benches --bench policy
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::breaker::{self, Outcome};
use sluice::config::Config;
use sluice::pairs::HeaderPairs;
use sluice::retry;
use sluice::router::{RequestHeaders, Router};
use sluice::shared::{self, MemoryStore, SharedStore};
use sluice_benches::native::{Native, Request, Written};
use sluice_benches::workload::{
    pairs, request_headers, scaled_config, scaled_host, scaled_request, user, REALISTIC_CONFIG,
    USERS,
};
use std::hint::black_box;
use std::time::Duration;

const T0: u64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z, ms

/// Requests for `USERS` users (sticky keys), built once.
fn requests(build: impl Fn(&str) -> Vec<(String, String)>) -> Vec<Request> {
    (0..USERS)
        .map(|n| Request::new(&pairs(&build(&user(n)))))
        .collect()
}

/// Runs lifecycles round-robin over the users, the clock moving 1 ms per
/// request (1000 requests a second: budget and breaker windows roll).
fn bench_lifecycle(native: &mut Native, requests: &[Request], b: &mut criterion::Bencher<'_>) {
    let mut written: Written = Vec::with_capacity(16);
    let mut n = 0usize;
    let mut now = T0;
    b.iter(|| {
        n = (n + 1) % requests.len();
        now += 1;
        let side = native.lifecycle(&requests[n], now, &mut written);
        black_box((side, written.len()))
    });
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("lifecycle");
    for services in [1usize, 10, 100] {
        for rules in [1usize, 10, 50] {
            let config = scaled_config(services, rules);
            let mut native = Native::new(config.as_bytes(), T0).unwrap();
            let last = services - 1;
            let requests = requests(|u| scaled_request(last, u));
            // The request must be routed (not unmatched) for the bench to mean anything.
            assert!(native
                .lifecycle(&requests[0], T0, &mut Vec::new())
                .is_some());
            group.bench_function(
                BenchmarkId::from_parameter(format!("s{services}_r{rules}")),
                |b| bench_lifecycle(&mut native, &requests, b),
            );
        }
    }
    group.finish();
}

fn find_service(c: &mut Criterion) {
    let mut group = c.benchmark_group("find_service");
    for services in [1usize, 10, 100, 1000] {
        let config = Config::parse(scaled_config(services, 1).as_bytes()).unwrap();
        let router = Router::new(config);
        let host = scaled_host(services - 1);
        assert_eq!(
            router.find_service(Some(host.as_bytes()), Some(b"/")),
            Some(services - 1)
        );
        group.bench_function(BenchmarkId::from_parameter(format!("s{services}")), |b| {
            b.iter(|| router.find_service(Some(black_box(host.as_bytes())), Some(b"/api")))
        });
    }
    group.finish();
}

/// Headers for `Router::decide`, read in place from the pairs buffer like
/// the glue's `RequestView`.
struct Plain<'a>(HeaderPairs<'a>);

impl RequestHeaders for Plain<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}

fn realistic(c: &mut Criterion) {
    let mut group = c.benchmark_group("realistic");
    let mut native = Native::new(REALISTIC_CONFIG.as_bytes(), T0).unwrap();
    let requests = requests(request_headers);
    group.bench_function("lifecycle", |b| bench_lifecycle(&mut native, &requests, b));
    // The same after a million requests and 1000 s of uptime (budget and
    // breaker windows rolled over a hundred times): history must not cost.
    let mut old = Native::new(REALISTIC_CONFIG.as_bytes(), T0).unwrap();
    let mut written: Written = Vec::new();
    for n in 0..1_000_000u64 {
        old.lifecycle(&requests[n as usize % requests.len()], T0 + n, &mut written);
    }
    group.bench_function("lifecycle_after_1M_requests", |b| {
        let mut n = 0usize;
        let mut now = T0 + 1_000_000;
        b.iter(|| {
            n = (n + 1) % requests.len();
            now += 1;
            black_box(old.lifecycle(&requests[n], now, &mut written))
        })
    });

    // The parts, each on its own.
    let config = Config::parse(REALISTIC_CONFIG.as_bytes()).unwrap();
    let service = config.services[0].clone();
    let router = Router::new(config);
    let mut n = 0usize;
    group.bench_function("find_service+decide", |b| {
        b.iter(|| {
            n = (n + 1) % requests.len();
            let pairs = requests[n].view();
            let index = router
                .find_service(pairs.get(":authority"), pairs.get(":path"))
                .unwrap();
            black_box(router.decide(index, 1000, true, &mut Plain(pairs), n as u64))
        })
    });

    // Inside decide: the device rule classifies the user-agent (a desktop
    // agent is the worst case: every marker is searched for), the sticky
    // split hashes the key.
    let agent = request_headers("u")
        .into_iter()
        .find(|(name, _)| name == "user-agent")
        .unwrap()
        .1;
    group.bench_function("device_classify", |b| {
        b.iter(|| sluice::device::classify(Some(black_box(agent.as_bytes()))))
    });
    group.bench_function("sticky_bucket", |b| {
        b.iter(|| sluice::sticky::bucket(b"shop", black_box(b"user-123")))
    });

    let policy = service.retry.clone().unwrap();
    let store = MemoryStore::default();
    let key = retry::budget_key(&service.name, &policy);
    shared::ensure(&store, &key, &retry::fresh_state(&policy, T0));
    let mut now = T0;
    group.bench_function("retry_reserve+headers+settle", |b| {
        b.iter(|| {
            now += 1;
            let plan = retry::plan(&policy, None);
            let reservation = shared::update(&store, &key, |bytes| {
                retry::reserve(bytes, &policy, now, plan.max_retries)
            })
            .unwrap();
            let headers = retry::request_headers(&policy, &plan, reservation.granted);
            shared::update(&store, &key, |bytes| {
                (
                    retry::settle(bytes, &policy, now, &reservation, Some(1)),
                    (),
                )
            });
            black_box(headers)
        })
    });

    let config = service.breaker.clone().unwrap();
    let store = MemoryStore::default();
    let key = breaker::state_key(&service.name, &service.stable, &config);
    shared::ensure(&store, &key, &breaker::initial());
    let mut now = T0;
    group.bench_function("breaker_check+record", |b| {
        b.iter(|| {
            now += 1;
            let bytes = store.get(&key).map(|(bytes, _)| bytes);
            let check = breaker::check(bytes.as_deref(), &config, now);
            let outcome = Outcome {
                attempts: 1,
                failed: false,
                duration_ms: 1,
            };
            let transition = shared::update(&store, &key, |bytes| {
                breaker::record(bytes, &config, now, outcome, None, now)
            });
            black_box((check, transition))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = lifecycle, find_service, realistic
}
criterion_main!(benches);
