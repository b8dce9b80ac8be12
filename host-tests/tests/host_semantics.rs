//! Self-tests of the fake host against a hand-written guest (probe.wat), so
//! they do not depend on Sluice. Each asserts an Envoy behaviour that a
//! regression in the host would break.

// Tests fail by panicking; indexing and unwrap keep them short.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{Action, LogLevel, Proxy, StartError, Status, TrapPolicy};
use std::time::Duration;

fn probe() -> Vec<u8> {
    wat::parse_str(include_str!("probe.wat")).unwrap()
}

fn proxy(mode: &str) -> Proxy {
    Proxy::builder_from_bytes("probe.wat", probe())
        .plugin_config(mode)
        .root_id("probe-root")
        .echo_logs(false)
        .build()
        .unwrap()
}

/// The info-level lines the probe logged (its status reports and values).
fn plugin_lines(p: &Proxy) -> Vec<String> {
    p.logs()
        .into_iter()
        .filter(|l| l.source == sluice_host::LogSource::Plugin && l.level == LogLevel::Info)
        .map(|l| l.message)
        .collect()
}

#[test]
fn shared_data_follows_envoy_cas_rules_across_vms() {
    let p = proxy("c");
    let vm1 = p.start_vm().unwrap();
    let s = vm1.stream();
    s.request_headers(&[(":path", "/")], true);
    assert_eq!(
        plugin_lines(&p),
        vec![
            "a=01", // get on a missing key: NOT_FOUND
            "b=00", // set with cas 0: unconditional
            "c=00", // get returns the value and its cas
            "d=00", // set with the current cas
            "e=08", // set with the now stale cas: CAS_MISMATCH
            "f=00", // cas 0 overwrites regardless
        ]
    );
    let (value, cas) = p.shared_data("k").unwrap();
    assert_eq!(value, b"v4");
    // Fresh CAS per successful write, from one process-wide counter.
    assert_eq!(cas, 3);

    // A second VM (another worker) sees the same data.
    p.clear_logs();
    let vm2 = p.start_vm().unwrap();
    vm2.stream().request_headers(&[], true);
    assert_eq!(plugin_lines(&p)[0], "a=00");

    // Host-side API uses the same rules.
    assert_eq!(p.set_shared_data("k", "x", 1), Status::CasMismatch);
    assert_eq!(
        p.set_shared_data("new", "x", 12345),
        Status::Ok,
        "missing key ignores cas"
    );
}

#[test]
fn header_maps_behave_like_envoys() {
    let p = proxy("h");
    let vm = p.start_vm().unwrap();
    let s = vm.stream();
    let action = s.request_headers(
        &[
            (":path", "/a?b=c"),
            ("x-replaced", "1"),
            ("x-removed", "1"),
            ("x-replaced", "2"),
            ("X-Removed", "2"),
        ],
        true,
    );
    assert_eq!(action, Action::Continue);
    let lines = plugin_lines(&p);
    assert_eq!(lines[..3], ["a=00", "b=00", "c=00"]);
    assert_eq!(
        lines[3], "1",
        "get returns the first value, case-insensitively"
    );
    assert_eq!(
        lines[4], "d=02",
        "response headers are not available in the request phase"
    );
    assert_eq!(lines[5], "e=01", "missing header: NOT_FOUND");
    assert_eq!(lines[6], "f=02", "unknown map type: BAD_ARGUMENT");
    assert_eq!(lines[7], "g=00");
    let req = s.request_header_map();
    assert_eq!(
        req.get_all("x-added"),
        vec!["1", "2"],
        "add appends, key lower-cased"
    );
    assert_eq!(
        req.get_all("x-replaced"),
        vec!["r"],
        "replace removes all then adds"
    );
    assert!(!req.contains("x-removed"), "remove removes every value");
    assert_eq!(
        req.pairs()
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        [":path", "x-added", "x-added", "x-replaced"],
        "set_header_map_pairs round trip keeps order"
    );

    // After Continue, Envoy drops its pointer to the request headers.
    p.clear_logs();
    s.response_headers(&[(":status", "200")], true);
    assert_eq!(plugin_lines(&p), ["h=02"]);
    assert_eq!(s.response_header("x-seen-by-filter").as_deref(), Some("1"));

    // In the access-log phase they are readable again, but not writable.
    p.clear_logs();
    s.finish();
    assert_eq!(plugin_lines(&p), ["/a?b=c", "i=02"]);
    assert!(s.finished());
}

#[test]
fn guest_pointers_are_validated() {
    let p = proxy("m");
    let vm = p.start_vm().unwrap();
    vm.stream().request_headers(&[(":path", "/")], true);
    assert_eq!(
        plugin_lines(&p),
        [
            "a=06", // log message out of bounds
            "b=06", // return pointer out of bounds
            "c=06", // key straddles the end of memory
            "d=02", // log level > critical
            "probe-root",
            "e=01", // unknown property
            "f=06", // u64 written across the end of memory
        ]
    );
    assert!(
        vm.trapped().is_none(),
        "bad pointers are statuses, not traps"
    );
}

#[test]
fn a_trap_panics_with_the_message_and_kills_the_vm() {
    let p = proxy("t");
    let vm = p.start_vm().unwrap();
    let s = vm.stream();
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.request_headers(&[], true);
    }))
    .expect_err("a trap must fail the test");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("proxy_on_request_headers"), "{msg}");
    assert!(msg.contains("unreachable"), "{msg}");
    assert!(
        msg.contains("about to trap"),
        "last log lines are included: {msg}"
    );
    let trap = vm.trapped().expect("the VM is marked failed");
    assert_eq!(trap.function, "proxy_on_request_headers");
}

#[test]
fn fail_closed_policy_answers_503_after_a_trap() {
    let p = Proxy::builder_from_bytes("probe.wat", probe())
        .plugin_config("t")
        .trap_policy(TrapPolicy::FailClosed)
        .echo_logs(false)
        .build()
        .unwrap();
    let vm = p.start_vm().unwrap();
    let s = vm.stream();
    assert_eq!(s.request_headers(&[], true), Action::Pause);
    let reply = s.local_reply().unwrap();
    assert_eq!(
        (reply.status, reply.details.as_str()),
        (503, "wasm_fail_stream")
    );
    assert!(vm.trapped().is_some());
    assert!(p.logged("Wasm VM failed"));
    // Later streams on the dead VM fail the same way without calling it.
    let s2 = vm.stream();
    assert_eq!(s2.request_headers(&[], true), Action::Pause);
    assert_eq!(s2.local_reply().unwrap().status, 503);
}

#[test]
fn refused_configuration_is_an_error_with_the_logs() {
    let p = proxy("r");
    let err = p.start_vm().err().unwrap();
    assert!(matches!(err, StartError::ConfigureFailed { .. }), "{err}");
    assert!(err.logged("bad config: refused"), "{err}");

    // A reconfiguration the canary refuses changes nothing.
    let p = proxy("c");
    let vm = p.start_vm().unwrap();
    let root = vm.root_context_id();
    assert!(p.reconfigure("r").is_err());
    assert_eq!(p.plugin_config(), b"c");
    assert_eq!(vm.root_context_id(), root);
    // An accepted one gives the VM a new root context.
    p.reconfigure("h").unwrap();
    assert_ne!(vm.root_context_id(), root);
}

#[test]
fn local_reply_runs_through_the_filters_encode_path() {
    let p = proxy("l");
    let vm = p.start_vm().unwrap();
    let s = vm.stream();
    // The probe returns Continue; Envoy stops iteration after a local reply.
    assert_eq!(s.request_headers(&[(":path", "/x")], true), Action::Pause);
    let reply = s.local_reply().unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(reply.details, "denied_by_test", "whitespace becomes '_'");
    assert_eq!(reply.body, b"nope");
    assert_eq!(reply.headers, [("x-why".to_string(), "test".to_string())]);
    assert_eq!(reply.grpc_status, None);
    let resp = s.response_header_map();
    assert_eq!(resp.get(":status").as_deref(), Some("403"));
    assert_eq!(resp.get("content-length").as_deref(), Some("4"));
    assert_eq!(resp.get("content-type").as_deref(), Some("text/plain"));
    assert_eq!(resp.get("x-why").as_deref(), Some("test"));
    // The filter's own on_response_headers saw (and edited) the reply; the
    // request headers were still reachable then (the request was stopped).
    assert_eq!(resp.get("x-seen-by-filter").as_deref(), Some("1"));
    assert!(plugin_lines(&p).contains(&"h=00".to_string()));
}

#[test]
fn a_finished_stream_is_freed_from_the_vm_and_its_handle_keeps_the_end_state() {
    let p = proxy("l");
    let vm = p.start_vm().unwrap();
    let open = vm.stream();
    open.request_headers(&[(":path", "/open")], false);
    let mut last = None;
    for _ in 0..1000 {
        let s = vm.stream();
        s.request_headers(&[(":path", "/x")], true);
        s.finish();
        last = Some(s);
    }
    // Like Envoy, the VM holds only the streams still open, however many it
    // has served: nothing it does per call grows with its history.
    assert_eq!(vm.live_streams(), 1);
    let last = last.unwrap();
    assert!(last.finished());
    assert_eq!(last.local_reply().unwrap().status, 403);
    assert_eq!(
        last.response_header_map().get(":status").as_deref(),
        Some("403")
    );
    // Finishing again is a no-op; the open stream is unaffected.
    last.finish();
    assert!(!open.finished());
    open.finish();
    assert_eq!(vm.live_streams(), 0);
}

#[test]
fn ticks_fire_on_the_virtual_clock_and_metrics_are_shared() {
    let p = proxy("k");
    let vms = p.boot(2).unwrap(); // main + 2 workers (+ base and canary)
    assert_eq!(vms.len(), 3);
    assert!(
        plugin_lines(&p).iter().all(|l| l == "a=02"),
        "counter += 0 is BAD_ARGUMENT"
    );
    assert_eq!(vms[0].tick_period(), Some(Duration::from_secs(1)));
    let t0 = p.now_unix_nanos();
    p.advance(Duration::from_millis(3500));
    // 3 ticks on each of the 3 configured VMs (the canary is gone).
    assert_eq!(p.counter("ticks"), Some(9));
    assert_eq!(p.now_unix_nanos() - t0, 3_500_000_000);
    // on_tick wrote to stdout: Envoy logs it at info without the newline.
    assert!(p
        .logs()
        .iter()
        .any(|l| l.message == "hello" && l.source == sluice_host::LogSource::Stdout));
    p.advance(Duration::from_millis(500));
    assert_eq!(p.counter("ticks"), Some(12));
}
