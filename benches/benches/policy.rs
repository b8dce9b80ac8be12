//! Criterion, native: the engine that ships (`sluice::engine::Worker`) per
//! request, over `sluice::testing::FakeHost` (`sluice_benches::driver`).
//!
//! `lifecycle/s<S>_r<R>`: one whole request as Envoy calls it (context
//! create, request headers, response headers 200 after 1 attempt, log,
//! delete; the root's tick every 250 ms of the clock) for S ∈ {1, 10, 100}
//! services and R ∈ {1, 10, 50} rules. The request goes to the LAST service
//! and matches no rule, so a scan over services or rules would show.
//!
//! `find_service/s<S>`: the host lookup alone, up to 1000 services.
//! `realistic/*`: the realistic config (benches/config/sluice.json): the
//! whole request, the same through `testing::Vm` (harness comparison), the
//! same after a million requests, and pure functions of the request path.
//!
//! cargo bench -p sluice-benches --bench policy
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice::config::Config;
use sluice::engine::HeadersAction;
use sluice::pairs::{self, HeaderPairs};
use sluice::router::{RequestHeaders, Router};
use sluice::testing::{FaultyStore, Vm};
use sluice_benches::driver::{Driver, Prepared, T0};
use sluice_benches::workload::{
    request_headers, scaled_config, scaled_host, scaled_request, user, REALISTIC_CONFIG, USERS,
};
use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::Duration;

/// Requests for `USERS` users (sticky keys), built once.
fn requests(build: impl Fn(&str) -> Vec<(String, String)>) -> Vec<Prepared> {
    (0..USERS)
        .map(|n| Prepared::new(&build(&user(n))))
        .collect()
}

/// Runs lifecycles round-robin over the users, the clock moving 1 ms per
/// request (1000 requests a second: budget and breaker windows roll, the
/// root ticks every 250 requests).
fn bench_lifecycle(driver: &mut Driver, requests: &mut [Prepared], b: &mut criterion::Bencher<'_>) {
    let mut n = 0usize;
    b.iter(|| {
        n = (n + 1) % requests.len();
        driver.advance(1);
        black_box(driver.lifecycle(&mut requests[n], 200, 1))
    });
}

/// Asserts the request is routed (the steering header set), not unmatched.
fn assert_routed(driver: &mut Driver, request: &mut Prepared, steering_header: &str) {
    let mut cluster = None;
    let action = driver.lifecycle_inspect(request, 200, 1, |state| {
        cluster = state.header(steering_header).map(<[u8]>::to_vec);
    });
    assert_eq!(action, HeadersAction::Continue);
    assert!(cluster.is_some(), "the request was not routed");
}

fn lifecycle(c: &mut Criterion) {
    let mut group = c.benchmark_group("lifecycle");
    for services in [1usize, 10, 100] {
        for rules in [1usize, 10, 50] {
            let config = scaled_config(services, rules);
            let mut driver = Driver::new(config.as_bytes(), 1);
            let last = services - 1;
            let mut requests = requests(|u| scaled_request(last, u));
            assert_routed(&mut driver, &mut requests[0], "x-sluice-cluster");
            group.bench_function(
                BenchmarkId::from_parameter(format!("s{services}_r{rules}")),
                |b| bench_lifecycle(&mut driver, &mut requests, b),
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
/// the engine's `RequestView`.
struct Plain<'a>(HeaderPairs<'a>);

impl RequestHeaders for Plain<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}

/// A request's headers as the pairs buffer the host returns.
fn pairs_buffer(headers: &[(String, String)]) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
        .collect();
    pairs::serialize(&pairs)
}

fn realistic(c: &mut Criterion) {
    let mut group = c.benchmark_group("realistic");
    let mut driver = Driver::new(REALISTIC_CONFIG.as_bytes(), 1);
    let mut requests = requests(request_headers);
    assert_routed(&mut driver, &mut requests[0], "x-sluice-cluster");
    // The host calls behind the times below (the table by path:
    // `cargo run --release -p sluice-bench-tools --bin sluice-native-crossings`).
    let before = driver.host().crossings.get();
    for request in &mut requests {
        driver.advance(1);
        driver.lifecycle(request, 200, 1);
    }
    let per_request = (driver.host().crossings.get() - before) as f64 / USERS as f64;
    println!(
        "realistic: {per_request:.2} host calls per request (FakeHost::crossings, mean of {USERS} \
         requests, ticks spread, log lines not counted)"
    );
    group.bench_function("lifecycle", |b| {
        bench_lifecycle(&mut driver, &mut requests, b)
    });

    // The same requests through `testing::Vm`, which builds each stream's
    // headers from string pairs: what `Driver` saves of harness.
    let clock = Rc::new(Cell::new(T0));
    let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::clone(&clock), 1);
    assert!(vm.configure(REALISTIC_CONFIG.as_bytes()));
    let plain: Vec<Vec<(String, String)>> = (0..USERS).map(|n| request_headers(&user(n))).collect();
    group.bench_function("lifecycle_via_vm", |b| {
        let mut n = 0usize;
        let mut next_tick = clock.get();
        b.iter(|| {
            n = (n + 1) % plain.len();
            clock.set(clock.get() + 1);
            if clock.get() >= next_tick {
                vm.tick();
                next_tick = clock.get() + u64::from(sluice::engine::TICK_MS);
                vm.host.events.borrow_mut().clear();
                drop(vm.host.store.take_writes());
            }
            black_box(vm.exchange(&plain[n], 200, 1))
        })
    });

    // The same after a million requests and 1000 s of uptime (budget and
    // breaker windows rolled over a hundred times): history must not cost.
    let mut old = Driver::new(REALISTIC_CONFIG.as_bytes(), 2);
    for n in 0..1_000_000usize {
        old.advance(1);
        old.lifecycle(&mut requests[n % USERS], 200, 1);
    }
    group.bench_function("lifecycle_after_1M_requests", |b| {
        bench_lifecycle(&mut old, &mut requests, b)
    });

    // Pure functions of the request path, each on its own.
    let config = Config::parse(REALISTIC_CONFIG.as_bytes()).unwrap();
    let router = Router::new(config);
    let buffers: Vec<Vec<u8>> = (0..USERS)
        .map(|n| pairs_buffer(&request_headers(&user(n))))
        .collect();
    let mut n = 0usize;
    group.bench_function("find_service+decide", |b| {
        b.iter(|| {
            n = (n + 1) % buffers.len();
            let pairs = HeaderPairs::new(&buffers[n]);
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
