//! `failure_policy: FAIL_RELOAD`, the policy every example uses: after a
//! trap the worker's next request gets a fresh VM (new instance,
//! `on_vm_start`, `on_configure`), shared data is kept, and the dead VM gets
//! no callback at all. Traps are injected by the host (`Vm::trap_next_call`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Action, Proxy, Stream, TrapPolicy, Vm};

const SHOP: &str = r#"{"services": [{
    "name": "shop",
    "match": {"authority": "shop.local"},
    "stable": "shop_v1",
    "retry": {"max_retries": 2, "retry_on": "5xx",
              "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10}},
    "breaker": {"consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 60000,
                "half_open_requests": 1}
}]}"#;

const MAX_OPEN_MS: u64 = 60_000;
const WINDOW_MS: u64 = 10_000;
/// The filter's `MAX_HELD` and tick period (README: what a dead VM loses).
const MAX_HELD: u64 = 1_024;

fn rig() -> (Proxy, Vec<Vm>) {
    let proxy = Proxy::builder(require_sluice_wasm())
        .plugin_config(SHOP)
        .root_id("sluice")
        .trap_policy(TrapPolicy::FailReload)
        .build()
        .unwrap();
    let vms = proxy.boot(2).unwrap().into_iter().skip(1).collect();
    (proxy, vms)
}

fn begin(vm: &Vm) -> Stream {
    let s = vm.stream();
    s.request_headers(
        &[
            (":method", "GET"),
            (":authority", "shop.local"),
            (":path", "/"),
        ],
        true,
    );
    s
}

/// `Ok(cluster)` when the request reached the upstream (which answered
/// `status`), `Err(status)` of the local reply otherwise.
fn send(vm: &Vm, status: &str) -> Result<String, u32> {
    let s = begin(vm);
    if let Some(reply) = s.local_reply() {
        s.finish();
        return Err(reply.status);
    }
    let cluster = s.request_header("x-sluice-cluster").unwrap();
    s.response_headers(&[(":status", status)], true);
    s.finish();
    Ok(cluster)
}

fn breaker_key(proxy: &Proxy) -> Vec<u8> {
    proxy
        .shared_data_keys()
        .into_iter()
        .find(|k| k.starts_with(b"sluice/breaker/"))
        .unwrap()
}

/// (mode, calls in the window) of the shared breaker (breaker.rs encoding,
/// version 2: mode at byte 1, head at 28, 10 buckets of 12 bytes from 52).
fn breaker(proxy: &Proxy) -> (u8, u64) {
    let (b, _) = proxy.shared_data(breaker_key(proxy)).unwrap();
    let calls = (0..10)
        .map(|i| {
            u64::from(u32::from_le_bytes(
                b[52 + i * 12..56 + i * 12].try_into().unwrap(),
            ))
        })
        .sum();
    (b[1], calls)
}

fn level(proxy: &Proxy) -> u64 {
    proxy.tick_now();
    proxy.gauge("sluice.shop.retry.budget_level").unwrap()
}

#[test]
fn a_trapped_vm_is_replaced_on_the_next_request_and_shared_data_stays() {
    let (proxy, w) = rig();
    assert_eq!(send(&w[0], "200"), Ok("shop_v1".into()));
    let keys = proxy.shared_data_keys();
    let first = w[0].current();
    w[0].trap_next_call();
    // The stream that hits the trap fails closed (Envoy's failStream).
    let s = begin(&w[0]);
    let reply = s.local_reply().unwrap();
    assert_eq!(
        (reply.status, reply.details.as_str()),
        (503, "wasm_fail_stream")
    );
    s.finish();
    assert!(w[0].trapped().is_some());
    // The next one gets a fresh VM, configured, on the same shared data.
    assert_eq!(send(&w[0], "200"), Ok("shop_v1".into()));
    assert_eq!(w[0].reloads(), 1);
    assert!(w[0].trapped().is_none());
    // Every handle of the worker now speaks for the fresh VM.
    assert_eq!(first.reloads(), 1);
    assert_eq!(proxy.shared_data_keys(), keys);
    assert!(proxy.logged("reloading"));
    // The other worker never noticed.
    assert_eq!(send(&w[1], "200"), Ok("shop_v1".into()));
    assert_eq!(w[1].reloads(), 0);
}

/// The README's bound (failure policy): a VM that dies loses the clean
/// successes it held — at most its last tick's worth (250 ms), never more
/// than `MAX_HELD` — and never a failure.
#[test]
fn held_successes_lost_in_a_dead_vm_cost_at_most_one_tick_of_them() {
    let (proxy, w) = rig();
    proxy.tick_now();
    for _ in 0..30 {
        assert_eq!(send(&w[1], "200"), Ok("shop_v1".into()));
    }
    // w0's successes since its last tick: held, not written yet.
    for _ in 0..40 {
        assert_eq!(send(&w[0], "200"), Ok("shop_v1".into()));
    }
    assert_eq!(
        send(&w[0], "503"),
        Ok("shop_v1".into()),
        "a failure is written at once"
    );
    for _ in 0..20 {
        assert_eq!(send(&w[0], "200"), Ok("shop_v1".into()));
    }
    // w0 dies on its tick, before it could write what it held.
    w[0].trap_next_call();
    proxy.tick_now();
    assert!(w[0].trapped().is_some());
    let (mode, calls) = breaker(&proxy);
    assert_eq!(mode, 0);
    let served = 30 + 40 + 1 + 20;
    let lost = served - calls;
    println!("window: {calls} calls of {served}; lost with the dead VM: {lost}");
    // Successes held before the failure were written with it, and so was
    // the first success after it (it ends the run of failures); only the
    // 19 after that were lost: what one worker held since its last write,
    // within one tick, below MAX_HELD.
    assert_eq!(lost, 19);
    assert!(lost <= MAX_HELD);
}

/// A trap right after a worker admitted the half-open probe: the probe slot
/// dies with the VM. The breaker still leaves half-open within `max_open_ms`
/// (the slot's lease, 30 s, lets another probe in), and the budget is whole
/// again one window after the trap (the dead VM's reservation expires with
/// its slot).
#[test]
fn a_trap_after_admitting_a_probe_wedges_neither_breaker_nor_budget() {
    let (proxy, w) = rig();
    let whole = level(&proxy);
    for _ in 0..5 {
        assert_eq!(send(&w[1], "503"), Ok("shop_v1".into()));
    }
    assert_eq!(breaker(&proxy).0, 1, "open");
    proxy.advance_ms(6_100);
    // w0 admits the probe; the router forwards it; the VM dies on the
    // response.
    let probe = begin(&w[0]);
    assert!(probe.local_reply().is_none(), "the probe was not admitted");
    assert_eq!(breaker(&proxy).0, 2, "half-open");
    w[0].trap_next_call();
    let action = probe.response_headers(&[(":status", "200")], true);
    assert_eq!(action, Action::Pause);
    assert_eq!(probe.local_reply().unwrap().details, "wasm_fail_stream");
    probe.finish();
    let trap_ms = proxy.monotonic_nanos() / 1_000_000;

    // Every second, a request on each worker (w0 is reloaded on its first).
    let mut closed_after = None;
    let mut whole_after = None;
    for _ in 0..(MAX_OPEN_MS / 1_000 + 5) {
        proxy.advance_ms(1_000);
        let since = proxy.monotonic_nanos() / 1_000_000 - trap_ms;
        if whole_after.is_none() && level(&proxy) >= whole {
            whole_after = Some(since);
        }
        for vm in &w {
            let _ = send(vm, "200");
            assert!(vm.trapped().is_none());
        }
        if closed_after.is_none() && breaker(&proxy).0 == 0 {
            closed_after = Some(since);
        }
    }
    assert_eq!(w[0].reloads(), 1);
    let closed_after = closed_after.expect("the breaker never left half-open");
    println!("closed {closed_after} ms after the trap; budget whole after {whole_after:?} ms");
    assert!(
        closed_after <= MAX_OPEN_MS,
        "closed after {closed_after} ms"
    );
    let whole_after = whole_after.expect("the budget never became whole again");
    assert!(
        whole_after <= WINDOW_MS + 1_000,
        "budget whole after {whole_after} ms"
    );
}
