//! The worker's lease on the retry budget (`retry::Lease`), through the
//! engine over the in-memory host: the common request makes no shared-data
//! call while a lease lasts, leases are renewed when they run out or
//! expire (however the clock steps), their tokens come back exactly once,
//! and under scarcity nobody holds one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::config::Config;
use sluice::retry::{self, RetryPolicy, LEASE_MS};
use sluice::testing::{Ending, Event, FaultyStore, Vm};
use std::cell::Cell;
use std::rc::Rc;

/// A whole second: slot boundaries are easy to place.
const NOW: u64 = 1_800_000_000_000;

fn config(budget: &str) -> String {
    format!(
        r#"{{"services": [{{"name": "shop", "stable": "shop_v1",
            "retry": {{"max_retries": 2, "budget": {budget}}}}}]}}"#
    )
}

/// Workers over one store and one clock, configured alike.
struct Proxy {
    store: Rc<FaultyStore>,
    clock: Rc<Cell<u64>>,
    vms: Vec<Vm>,
    policy: RetryPolicy,
    key: String,
}

impl Proxy {
    fn new(workers: usize, budget: &str) -> Self {
        let json = config(budget);
        let store = Rc::new(FaultyStore::default());
        let clock = Rc::new(Cell::new(NOW));
        let vms = (0..workers)
            .map(|worker| {
                let mut vm = Vm::new(Rc::clone(&store), Rc::clone(&clock), worker as u64);
                assert!(vm.configure(json.as_bytes()), "config refused");
                vm
            })
            .collect();
        let parsed = Config::parse(json.as_bytes()).unwrap();
        let policy = parsed.services[0].retry.clone().unwrap();
        let key = retry::budget_key("shop", &policy);
        store.take_writes();
        Proxy {
            store,
            clock,
            vms,
            policy,
            key,
        }
    }

    fn level(&self) -> u64 {
        retry::level(
            self.store.bytes(&self.key).as_deref(),
            &self.policy,
            self.clock.get(),
        )
    }

    /// A GET that stays in flight: its context and the retries granted.
    fn start(&mut self, worker: usize) -> (u32, u32) {
        let vm = &mut self.vms[worker];
        let (context, _) =
            vm.request(&[(":authority", "shop"), (":path", "/"), (":method", "GET")]);
        let granted = vm.host.streams.borrow()[&context]
            .header(retry::MAX_RETRIES_HEADER)
            .map(|value| String::from_utf8_lossy(value).parse::<u32>().unwrap())
            .unwrap();
        (context, granted)
    }

    /// The response headers after `attempts` attempts, then the end.
    fn finish(&mut self, worker: usize, context: u32, attempts: u64) {
        let vm = &mut self.vms[worker];
        vm.respond(context, 200, Some(attempts));
        vm.end(
            context,
            Ending {
                code: Some(200),
                flags: 0,
                attempts: Some(attempts),
                grpc_status: None,
            },
        );
        vm.forget(context);
    }

    /// Budget writes since the last call.
    fn writes(&self) -> usize {
        self.store
            .take_writes()
            .iter()
            .filter(|write| write.key == self.key)
            .count()
    }

    fn leases(&self, worker: usize) -> Vec<retry::Lease> {
        self.vms[worker]
            .host
            .take_events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Leased { lease, .. } => Some(lease),
                _ => None,
            })
            .collect()
    }
}

const DEFAULT: &str = r#"{"ratio": 0.2, "min_per_s": 10, "window_s": 10}"#;

#[test]
fn the_common_request_makes_no_shared_data_call_while_the_lease_lasts() {
    let mut proxy = Proxy::new(1, DEFAULT);
    let (context, granted) = proxy.start(0);
    assert_eq!(granted, 2);
    proxy.finish(0, context, 1);
    // The first request took a lease: an eighth of the 100 reserve tokens.
    assert_eq!(proxy.writes(), 1);
    let lease = proxy.leases(0);
    assert_eq!(lease.len(), 1);
    assert_eq!(lease[0].tokens, 12);
    assert_eq!(proxy.level(), 88);
    let reads = proxy.store.reads.get();
    let crossings = proxy.vms[0].host.crossings.get();
    for _ in 0..500 {
        let (context, granted) = proxy.start(0);
        assert_eq!(granted, 2, "every request gets its retries");
        proxy.finish(0, context, 1);
    }
    assert_eq!(proxy.writes(), 0, "no write");
    assert_eq!(proxy.store.reads.get(), reads, "no read");
    assert!(proxy.leases(0).is_empty(), "no new lease");
    // Per request: the clock, the headers, three header writes (the
    // steering header, `x-envoy-max-retries`, `x-envoy-retry-on`), the
    // route cache clear and the attempt count at the response headers.
    let per_request = (proxy.vms[0].host.crossings.get() - crossings) / 500;
    assert_eq!(per_request, 7);
    // The deposits land with the tick: 501 requests, 100 tokens' worth.
    proxy.vms[0].tick();
    assert_eq!(proxy.writes(), 1);
    assert_eq!(proxy.level(), 88 + 100);
}

#[test]
fn a_lease_that_runs_out_is_renewed_and_its_tokens_come_back_exactly_once() {
    let mut proxy = Proxy::new(2, DEFAULT);
    // Worker 1 holds a reservation of the same slot, so that a refund
    // given twice would show (the slot's charge cannot go below zero).
    let (other, _) = proxy.start(1);
    assert_eq!(proxy.writes(), 1);
    let before = proxy.level();
    assert_eq!(before, 88);
    // Worker 0: six requests in flight empty its 11-token lease (an eighth
    // of 88) to one token; the seventh cannot be covered: one write
    // renews it.
    let mut flying = Vec::new();
    for _ in 0..5 {
        flying.push(proxy.start(0).0);
    }
    assert_eq!(proxy.writes(), 1, "the lease, at the first request");
    let first = proxy.leases(0);
    assert_eq!(first[0].tokens, 11);
    assert_eq!(proxy.level(), 77);
    flying.push(proxy.start(0).0);
    assert_eq!(proxy.writes(), 1, "the renewal");
    let second = proxy.leases(0);
    assert_eq!(second.len(), 1);
    // The old lease's one free token came back, its ten in flight stay
    // charged: 100 reserve + 8 requests × 0.2 − 12 − 10 = 79 tokens, of
    // which the new lease takes an eighth.
    assert_eq!(second[0].tokens, 9);
    assert_eq!(proxy.level(), 79 - 9);
    // Everything ends with no retry used: the old lease's requests are
    // settled through the tick, the new lease's one gives back to it.
    for context in flying {
        proxy.finish(0, context, 1);
    }
    proxy.vms[0].tick();
    assert_eq!(proxy.level(), 79 - 9 + 10);
    // Past its lifetime the tick gives the new lease back; worker 1's
    // lease (12) is the only charge left in the slot: had anything of
    // worker 0 been refunded twice, it would be eaten into.
    proxy.clock.set(NOW + LEASE_MS);
    proxy.vms[0].tick();
    assert_eq!(proxy.level(), 101 - 12);
    proxy.finish(1, other, 1);
    proxy.vms[1].tick();
    // All back, once: the reserve plus the eight requests' deposits.
    assert_eq!(proxy.level(), 100 + 8 / 5);
}

#[test]
fn a_lease_expires_with_its_slot_and_a_clock_step_never_extends_it() {
    // A window of one second: a lease must not outlive its second.
    let mut proxy = Proxy::new(1, r#"{"ratio": 0.2, "min_per_s": 100, "window_s": 1}"#);
    proxy.clock.set(NOW + 900);
    let (context, _) = proxy.start(0);
    proxy.finish(0, context, 1);
    let lease = proxy.leases(0)[0];
    assert_eq!((lease.taken_ms, lease.expires_ms), (NOW + 900, NOW + 1000));
    proxy.writes();
    proxy.clock.set(NOW + 999);
    let (context, _) = proxy.start(0);
    proxy.finish(0, context, 1);
    assert_eq!(proxy.writes(), 0, "still valid at the last millisecond");
    proxy.clock.set(NOW + 1000);
    let (context, granted) = proxy.start(0);
    proxy.finish(0, context, 1);
    assert_eq!(granted, 2);
    assert_eq!(proxy.writes(), 1, "renewed in the next second");
    let lease = proxy.leases(0)[0];
    assert_eq!(lease.second, NOW / 1000 + 1);
    // The clock steps back: the lease is not trusted, a new one is taken.
    proxy.clock.set(NOW + 500);
    let (context, granted) = proxy.start(0);
    proxy.finish(0, context, 1);
    assert_eq!(granted, 2);
    assert_eq!(proxy.writes(), 1, "a clock stepped back renews");
    // And forward by a minute: renewed again, in the new second.
    proxy.clock.set(NOW + 60_000);
    let (context, granted) = proxy.start(0);
    proxy.finish(0, context, 1);
    assert_eq!(granted, 2);
    assert_eq!(proxy.writes(), 1);
    assert_eq!(proxy.leases(0).pop().unwrap().second, NOW / 1000 + 60);
    // Only the new lease is charged: the reserve less an eighth.
    assert_eq!(proxy.level(), 100 - 12);
}

#[test]
fn under_scarcity_nobody_holds_a_lease_and_every_request_reserves_as_before() {
    // 15 tokens: an eighth (one) does not cover two retries.
    let mut proxy = Proxy::new(2, r#"{"ratio": 0.0, "min_per_s": 3, "window_s": 5}"#);
    let mut granted = Vec::new();
    let mut flying = Vec::new();
    for request in 0..10 {
        let (context, got) = proxy.start(request % 2);
        granted.push(got);
        flying.push((request % 2, context));
    }
    assert!(proxy.leases(0).is_empty() && proxy.leases(1).is_empty());
    assert_eq!(proxy.writes(), 10, "a reservation each, as without leases");
    // The reservations' own rationing: 15 tokens, first retries first.
    assert_eq!(granted.iter().sum::<u32>(), 15, "{granted:?}");
    assert!(granted[..8].iter().all(|&got| got >= 1), "{granted:?}");
    for (worker, context) in flying {
        proxy.finish(worker, context, 1);
    }
    proxy.vms[0].tick();
    proxy.vms[1].tick();
    assert_eq!(proxy.level(), 15);
}

#[test]
fn a_worker_holding_a_lease_leaves_the_others_their_first_retries() {
    // 24 tokens: worker 0's lease takes three.
    let mut proxy = Proxy::new(2, r#"{"ratio": 0.0, "min_per_s": 6, "window_s": 4}"#);
    let (held, _) = proxy.start(0);
    assert_eq!(proxy.leases(0)[0].tokens, 3);
    // Worker 1's requests stay in flight: each still gets a first retry
    // while any token is left outside worker 0's lease.
    let mut granted = Vec::new();
    for _ in 0..11 {
        granted.push(proxy.start(1).1);
    }
    assert_eq!(granted.iter().sum::<u32>(), 21, "{granted:?}");
    assert!(granted.iter().all(|&got| got >= 1), "{granted:?}");
    proxy.finish(0, held, 1);
}

#[test]
fn a_lost_renewal_grants_nothing_and_keeps_the_deposits_for_the_next_write() {
    let mut proxy = Proxy::new(1, DEFAULT);
    proxy.store.lose_next_writes(u32::MAX);
    let (context, granted) = proxy.start(0);
    assert_eq!(granted, 0, "nothing granted without a write");
    proxy.finish(0, context, 1);
    proxy.store.lose_next_writes(0);
    let (context, granted) = proxy.start(0);
    assert_eq!(granted, 2);
    proxy.finish(0, context, 1);
    let deposited: u32 = proxy.vms[0]
        .host
        .take_events()
        .iter()
        .filter_map(|event| match event {
            Event::Deposited { landed, .. } => Some(landed.deposits),
            _ => None,
        })
        .sum();
    assert_eq!(deposited, 2, "both requests, in the write that landed");
}

#[test]
fn retries_the_router_made_beyond_a_lease_grant_are_charged() {
    // A route's own retry policy may retry more than Sluice granted: the
    // budget counts what the router really did.
    let mut proxy = Proxy::new(1, DEFAULT);
    let (context, granted) = proxy.start(0);
    assert_eq!(granted, 2);
    proxy.finish(0, context, 5);
    assert_eq!(proxy.level(), 88, "the lease's 12 tokens");
    proxy.vms[0].tick();
    assert_eq!(proxy.level(), 86, "two retries beyond the grant, charged");
    proxy.clock.set(NOW + LEASE_MS);
    proxy.vms[0].tick();
    assert_eq!(
        proxy.level(),
        100 - 4,
        "the lease back: the four retries made stay"
    );
}
