//! gRPC through the engine over the in-memory host: outcomes are the
//! `grpc-status` (Envoy's `response.grpc_status` at log time), failures are
//! classified per service, a breaker refuses a gRPC request with a gRPC
//! answer, and plain HTTP requests pay no extra host call.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice::config::Config;
use sluice::engine::HeadersAction;
use sluice::testing::{Ending, FaultyStore, Vm};
use std::cell::Cell;
use std::rc::Rc;

const NOW: u64 = 1_800_000_000_000;

fn vm(config: &str) -> Vm {
    let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::new(Cell::new(NOW)), 7);
    assert!(vm.configure(config.as_bytes()), "config refused");
    vm
}

fn grpc_call() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (":authority", b"echo.local".to_vec()),
        (":path", b"/echo.Echo/Say".to_vec()),
        (":method", b"POST".to_vec()),
        ("content-type", b"application/grpc".to_vec()),
        ("te", b"trailers".to_vec()),
    ]
}

fn http_call() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (":authority", b"echo.local".to_vec()),
        (":path", b"/".to_vec()),
        (":method", b"GET".to_vec()),
    ]
}

const CANARY: &str = r#"{"services": [{"name": "echo", "stable": "echo_v1", "canary": "echo_v2",
    "weight": 100, "breaker": {"consecutive_failures": 5, "open_ms": 60000, "max_open_ms": 60000}}]}"#;

fn refused(json: &str) -> String {
    match Config::parse(json.as_bytes()) {
        Ok(_) => panic!("accepted: {json}"),
        Err(err) => err.to_string(),
    }
}

fn failures(block: &str) -> sluice::failures::Failures {
    let json = format!(r#"{{"services": [{{"name": "s", "stable": "a", "failures": {block}}}]}}"#);
    match Config::parse(json.as_bytes()) {
        Ok(config) => config.services.into_iter().next().map(|s| s.failures),
        Err(err) => panic!("refused {block}: {err}"),
    }
    .unwrap_or_default()
}

#[test]
fn failure_lists_take_names_numbers_and_classes_and_replace_the_defaults() {
    let default = failures("{}");
    assert_eq!(default, sluice::failures::Failures::default());
    let custom = failures(
        r#"{"http_statuses": ["5xx", 429], "grpc_codes": ["unavailable", 4, "RESOURCE_EXHAUSTED"]}"#,
    );
    assert!(custom.http_status_fails(429) && custom.http_status_fails(503));
    assert!(!custom.http_status_fails(404));
    assert!(custom.grpc_code_fails(14) && custom.grpc_code_fails(4) && custom.grpc_code_fails(8));
    assert!(!custom.grpc_code_fails(13) && !custom.grpc_code_fails(2));
    // Only the list given is replaced.
    let only_http = failures(r#"{"http_statuses": [502, 503, 504]}"#);
    assert!(!only_http.http_status_fails(500));
    assert!(only_http.grpc_code_fails(13));
    let none = failures(r#"{"http_statuses": [], "grpc_codes": []}"#);
    assert!(!none.http_status_fails(500) && !none.grpc_code_fails(14));
}

#[test]
fn failure_refusals_name_the_path_and_the_reason() {
    let base = |block: &str| {
        format!(r#"{{"services": [{{"name": "s", "stable": "a", "failures": {block}}}]}}"#)
    };
    for (block, expected) in [
        (
            r#"{"http_statuses": [600]}"#,
            "services[0].failures.http_statuses[0]: must be between 100 and 599, got 600",
        ),
        (
            r#"{"http_statuses": ["6xx"]}"#,
            "services[0].failures.http_statuses[0]: must be a status 100-599 or a class \"1xx\"-\"5xx\", got \"6xx\"",
        ),
        (
            r#"{"grpc_codes": [17]}"#,
            "services[0].failures.grpc_codes[0]: must be between 0 and 16, got 17",
        ),
        (
            r#"{"grpc_codes": ["OK", "UNAVAILABLE", "SOMETIMES"]}"#,
            "services[0].failures.grpc_codes[2]: must be a gRPC code 0-16 or its name (UNAVAILABLE, INTERNAL, ...), got \"SOMETIMES\"",
        ),
        (
            r#"{"grpc_codes": [true]}"#,
            "services[0].failures.grpc_codes[0]: must be a string or a number, got a boolean",
        ),
        (
            r#"{"grpc_codes": 14}"#,
            "services[0].failures.grpc_codes: must be a list, got a number",
        ),
        (
            r#"{"http_statuses": [500.5]}"#,
            "services[0].failures.http_statuses[0]: must be a whole number between 100 and 599, got 500.5",
        ),
        (
            r#"{"grpc": []}"#,
            "services[0].failures.grpc: unknown key (expected one of: http_statuses, grpc_codes)",
        ),
    ] {
        let message = refused(&base(block));
        assert_eq!(message, expected, "{block}");
    }
}

#[test]
fn grpc_failures_in_trailers_or_trailers_only_trip_the_canary_breaker() {
    let mut vm = vm(CANARY);
    // HTTP 200 every time; grpc-status 14 (UNAVAILABLE), as the trailers or
    // a trailers-only answer give it: the property is the same either way.
    for _ in 0..5 {
        let stream = vm.grpc_exchange(&grpc_call(), 14, 1);
        assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v2"[..]));
    }
    // Open: the canary's traffic falls back to stable.
    let stream = vm.grpc_exchange(&grpc_call(), 0, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v1"[..]));
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn caller_errors_are_not_the_services_failures() {
    let mut vm = vm(CANARY);
    // NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED, OK: never a failure.
    for code in [5, 3, 7, 0, 5, 3, 7, 0, 16, 6, 9, 11] {
        vm.grpc_exchange(&grpc_call(), code, 1);
    }
    let stream = vm.grpc_exchange(&grpc_call(), 0, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v2"[..]));
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
}

#[test]
fn configured_grpc_codes_decide() {
    let mut vm = vm(
        r#"{"services": [{"name": "echo", "stable": "echo_v1", "canary": "echo_v2", "weight": 100,
        "breaker": {"consecutive_failures": 3}, "failures": {"grpc_codes": ["NOT_FOUND"]}}]}"#,
    );
    for _ in 0..3 {
        vm.grpc_exchange(&grpc_call(), 14, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    for _ in 0..3 {
        vm.grpc_exchange(&grpc_call(), 5, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn configured_http_statuses_decide_for_plain_http() {
    let mut vm = vm(
        r#"{"services": [{"name": "echo", "stable": "echo_v1", "canary": "echo_v2", "weight": 100,
        "breaker": {"consecutive_failures": 3}, "failures": {"http_statuses": [429, 503]}}]}"#,
    );
    for status in [500, 502, 504] {
        vm.exchange(&http_call(), status, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    for status in [429, 503, 429] {
        vm.exchange(&http_call(), status, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn a_reset_grpc_call_without_status_is_a_failure_and_a_client_gone_is_not() {
    let mut vm = vm(CANARY);
    // Upstream reset before any answer: no grpc_status, UR flag.
    for _ in 0..4 {
        let (context, action) = vm.request(&grpc_call());
        assert_eq!(action, HeadersAction::Continue);
        vm.end(
            context,
            Ending {
                code: None,
                flags: 0x10,
                attempts: Some(1),
                grpc_status: None,
            },
        );
        vm.forget(context);
    }
    // The client went away (no status, no upstream flag): not booked.
    for _ in 0..10 {
        let (context, _) = vm.request(&grpc_call());
        vm.end(
            context,
            Ending {
                code: None,
                flags: 0,
                attempts: Some(1),
                grpc_status: None,
            },
        );
        vm.forget(context);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    // The fifth failure in a row trips it.
    let (context, _) = vm.request(&grpc_call());
    vm.end(
        context,
        Ending {
            code: None,
            flags: 0x10,
            attempts: Some(1),
            grpc_status: None,
        },
    );
    vm.forget(context);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn a_streaming_call_is_booked_once_at_its_end() {
    let mut vm = vm(CANARY);
    for _ in 0..5 {
        // Response headers (HTTP 200) arrive early; the outcome comes with
        // the trailers at the end of the stream.
        let (context, _) = vm.request(&grpc_call());
        vm.respond(context, 200, Some(1));
        vm.tick();
        assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
        vm.end(
            context,
            Ending {
                code: Some(200),
                flags: 0,
                attempts: Some(1),
                grpc_status: Some(13),
            },
        );
        vm.forget(context);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn an_open_stable_breaker_refuses_a_grpc_call_with_a_grpc_answer() {
    let mut vm = vm(r#"{"services": [{"name": "echo", "stable": "echo_v1",
        "breaker": {"consecutive_failures": 3, "open_ms": 5000, "max_open_ms": 5000}}]}"#);
    for _ in 0..3 {
        vm.grpc_exchange(&grpc_call(), 14, 1);
    }
    let (context, action) = vm.request(&grpc_call());
    assert_eq!(action, HeadersAction::Stop);
    vm.end(context, Ending::default());
    let stream = vm.forget(context);
    let reply = stream.local_reply.clone().expect("a local reply");
    // Envoy turns this into HTTP 200, content-type application/grpc,
    // grpc-status 14 and the body as grpc-message (checked in envoy/).
    assert_eq!(reply.grpc_status, Some(14));
    assert_eq!(reply.header("grpc-retry-pushback-ms"), Some("5000"));
    assert_eq!(reply.header("x-sluice-breaker"), Some("open"));
    assert_eq!(reply.header("content-type"), None);
    let message = String::from_utf8_lossy(&reply.body).to_string();
    assert_eq!(
        message,
        "sluice: circuit breaker of service echo is open; retry after 5s"
    );
    assert_eq!(stream.header("x-sluice-cluster"), None);

    // The same breaker refuses plain HTTP as before: 503, no gRPC status.
    let (context, action) = vm.request(&http_call());
    assert_eq!(action, HeadersAction::Stop);
    vm.end(context, Ending::default());
    let reply = vm.forget(context).local_reply.expect("a local reply");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.grpc_status, None);
    assert_eq!(reply.header("retry-after"), Some("5"));
}

#[test]
fn the_rollout_gate_counts_grpc_failures() {
    let mut vm = vm(
        r#"{"services": [{"name": "echo", "stable": "echo_v1", "canary": "echo_v2",
        "rollout": {"steps": [100], "step_s": 600, "max_failure_rate": 0.1, "min_requests": 10}}]}"#,
    );
    for _ in 0..10 {
        vm.grpc_exchange(&grpc_call(), 4, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.rollout.rollbacks"), Some(1));
    let stream = vm.grpc_exchange(&grpc_call(), 0, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v1"[..]));
}

#[test]
fn retried_grpc_attempts_count_as_failed_calls() {
    let mut vm = vm(CANARY);
    // A call whose three attempts all answered UNAVAILABLE: three failed
    // calls in a row; a call that failed twice more trips the breaker (five
    // in a row).
    vm.grpc_exchange(&grpc_call(), 14, 3);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    vm.grpc_exchange(&grpc_call(), 14, 2);
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

/// Crossings of one request with the breaker on: a gRPC call answered in
/// its trailers reads `response.grpc_status` at the end instead of the
/// response headers (`:status`), so it costs what plain HTTP costs.
#[test]
fn grpc_outcomes_cost_no_extra_crossing_and_http_pays_nothing_for_them() {
    let config = r#"{"services": [{"name": "echo", "stable": "echo_v1", "canary": "echo_v2",
        "weight": 50, "breaker": {}}]}"#;
    let mut http = vm(config);
    let mut grpc = vm(config);
    http.exchange(&http_call(), 200, 1);
    grpc.grpc_exchange(&grpc_call(), 0, 1);
    let (http_before, grpc_before) = (http.host.crossings.get(), grpc.host.crossings.get());
    for _ in 0..100 {
        http.exchange(&http_call(), 200, 1);
        grpc.grpc_exchange(&grpc_call(), 0, 1);
    }
    let http_calls = http.host.crossings.get() - http_before;
    let grpc_calls = grpc.host.crossings.get() - grpc_before;
    assert_eq!(grpc_calls, http_calls);
    // Headers, clock, steering, `clear_route_cache`; the response headers
    // (HTTP) or the attempts and `response.grpc_status` (gRPC): no flags
    // after a 200 or an OK; now and then a breaker read or write.
    assert!(http_calls <= 100 * 7, "{http_calls}");
}

/// Host calls at the response headers and at the end of one gRPC call
/// answered by `answer` (after a warm-up call, so the breaker's verdict is
/// cached and held successes are not written).
fn grpc_end_crossings(vm: &mut Vm, answer: impl FnOnce(&mut Vm, u32)) -> (u64, u64) {
    vm.grpc_exchange(&grpc_call(), 0, 1);
    let (context, action) = vm.request(&grpc_call());
    assert_eq!(action, HeadersAction::Continue);
    let before = vm.host.crossings.get();
    answer(vm, context);
    let responded = vm.host.crossings.get();
    // The trailers' OK, unless the header block ended the call.
    let trailers_only = vm
        .host
        .streams
        .borrow()
        .get(&context)
        .is_some_and(|stream| stream.grpc_status.is_some());
    vm.end(
        context,
        Ending {
            code: Some(200),
            flags: 0,
            attempts: Some(1),
            grpc_status: (!trailers_only).then_some(0),
        },
    );
    vm.forget(context);
    (responded - before, vm.host.crossings.get() - responded)
}

#[test]
fn a_trailers_only_answer_is_read_with_its_headers_and_ok_reads_no_flags() {
    const STABLE: &str = r#"{"services": [{"name": "echo", "stable": "echo_v1",
        "attempt_count_in_response": true,
        "breaker": {"consecutive_failures": 5, "open_ms": 60000, "max_open_ms": 60000}}]}"#;
    let mut vm = vm(STABLE);
    vm.route_writes_attempt_count = true;
    // OK in the trailers: the header block gives the attempts, the end
    // asks `response.grpc_status` and nothing else (no flags after OK).
    let counts = grpc_end_crossings(&mut vm, |vm, context| vm.respond(context, 200, Some(1)));
    assert_eq!(counts, (1, 1));
    // Trailers-only: the code and the attempts in the one read; nothing
    // is asked at the end.
    let trailers_only = |code: &'static str| {
        move |vm: &mut Vm, context: u32| {
            vm.respond_with(
                context,
                &[(":status", "200"), ("grpc-status", code)],
                Some(1),
                true,
            )
        }
    };
    assert_eq!(grpc_end_crossings(&mut vm, trailers_only("0")), (1, 0));
    assert_eq!(grpc_end_crossings(&mut vm, trailers_only("5")).0, 1);
    // UNAVAILABLE trailers-only, five in a row: booked without a property
    // read, and the breaker opens.
    for _ in 0..5 {
        let stream = vm.grpc_trailers_only(&grpc_call(), 14, 1);
        assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v1"[..]));
    }
    let (context, action) = vm.request(&grpc_call());
    assert_eq!(action, HeadersAction::Stop);
    vm.end(context, Ending::default());
    let reply = vm.forget(context).local_reply.expect("refused");
    assert_eq!(reply.grpc_status, Some(14));
}

#[test]
fn a_grpc_status_in_headers_that_do_not_end_the_call_is_not_its_outcome() {
    // Envoy prefers the trailers' grpc-status: a header block that does not
    // end the stream is not read for it, and the trailers' UNAVAILABLE
    // counts.
    let mut vm = vm(CANARY);
    for _ in 0..5 {
        let (context, _) = vm.request(&grpc_call());
        vm.respond_with(
            context,
            &[(":status", "200"), ("grpc-status", "0")],
            Some(1),
            false,
        );
        vm.end(
            context,
            Ending {
                code: Some(200),
                flags: 0,
                attempts: Some(1),
                grpc_status: Some(14),
            },
        );
        vm.forget(context);
    }
    let stream = vm.grpc_exchange(&grpc_call(), 0, 1);
    assert_eq!(stream.header("x-sluice-cluster"), Some(&b"echo_v1"[..]));
}

#[test]
fn a_trailers_only_code_that_is_not_one_is_asked_of_the_host() {
    // Garbage, out of range or repeated: `response.grpc_status` (Envoy's
    // own reading, InvalidCode included) is asked at the end instead.
    let mut stable = vm(r#"{"services": [{"name": "echo", "stable": "echo_v1", "breaker": {}}]}"#);
    let hostile: [&[(&str, &str)]; 5] = [
        &[(":status", "200"), ("grpc-status", "14x")],
        &[(":status", "200"), ("grpc-status", "")],
        &[(":status", "200"), ("grpc-status", "99")],
        &[(":status", "200"), ("grpc-status", "0,14")],
        &[
            (":status", "200"),
            ("grpc-status", "0"),
            ("grpc-status", "0"),
        ],
    ];
    for headers in hostile {
        let (_, at_end) = grpc_end_crossings(&mut stable, |vm, context| {
            vm.respond_with(context, headers, Some(1), true)
        });
        assert!(at_end >= 1, "{headers:?}: the property was not read");
    }
    let (_, at_end) = grpc_end_crossings(&mut stable, |vm, context| {
        vm.respond_with(
            context,
            &[(":status", "200"), ("grpc-status", "0")],
            Some(1),
            true,
        )
    });
    assert_eq!(at_end, 0);
}

#[test]
fn hostile_grpc_facts_do_not_trap() {
    let mut vm = vm(CANARY);
    for code in [u64::MAX, 17, 1 << 40, 0] {
        vm.grpc_exchange(&grpc_call(), code, u64::MAX);
    }
    for content_type in [
        &b"application/grpc\xff\xfe"[..],
        b"",
        b"APPLICATION/GRPC-WEB+proto",
    ] {
        let mut headers = grpc_call();
        headers.retain(|(name, _)| *name != "content-type");
        headers.push(("content-type", content_type.to_vec()));
        vm.grpc_exchange(&headers, 14, 0);
    }
}

#[test]
fn a_call_its_client_abandoned_at_the_deadline_is_deadline_exceeded() {
    let mut vm = vm(CANARY);
    let mut call = grpc_call();
    call.push(("grpc-timeout", b"200m".to_vec()));
    let abandon = |vm: &mut Vm, after_ms: u64| {
        let (context, _) = vm.request(&call);
        vm.host.clock.set(vm.host.clock.get() + after_ms);
        // Envoy saw the client reset the stream (DR): no status, no
        // upstream failure flag.
        vm.end(context, Ending::default());
        vm.forget(context);
    };
    // Given up early: the client went away, nothing booked.
    for _ in 0..10 {
        abandon(&mut vm, 50);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    // At the deadline (Envoy's clock may read a little under it).
    for _ in 0..5 {
        abandon(&mut vm, 195);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

/// Envoy 1.40: a call the client reset after the response headers has
/// `response.grpc_status` 2 (UNKNOWN, inferred from HTTP 200) and flag DR
/// (0x10000000).
const DR: u64 = 0x1000_0000;

#[test]
fn a_call_the_client_cut_off_after_the_response_headers_is_not_unknown() {
    let mut vm = vm(CANARY);
    let cut_off = |vm: &mut Vm, call: &[(&'static str, Vec<u8>)], after_ms: u64| {
        let (context, _) = vm.request(call);
        vm.respond(context, 200, Some(1));
        vm.host.clock.set(vm.host.clock.get() + after_ms);
        vm.end(
            context,
            Ending {
                code: Some(200),
                flags: DR,
                attempts: Some(1),
                grpc_status: Some(2),
            },
        );
        vm.forget(context);
    };
    for _ in 0..10 {
        cut_off(&mut vm, &grpc_call(), 100);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(0));
    // A real UNKNOWN from the service (in the trailers, stream complete)
    // still fails.
    for _ in 0..5 {
        vm.grpc_exchange(&grpc_call(), 2, 1);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
    // Cut off at its deadline: DEADLINE_EXCEEDED.
    let mut vm = self::vm(CANARY);
    let mut call = grpc_call();
    call.push(("grpc-timeout", b"200m".to_vec()));
    for _ in 0..5 {
        cut_off(&mut vm, &call, 200);
    }
    vm.tick();
    assert_eq!(vm.host.metric("sluice.echo.breaker.canary.trips"), Some(1));
}

#[test]
fn the_grpc_fuzz_seed_parses() {
    let seed = include_str!("../../fuzz/seeds/config/seed-grpc.json");
    let config = Config::parse(seed.as_bytes()).unwrap();
    let failures = &config.services[0].failures;
    assert!(failures.http_status_fails(429) && failures.http_status_fails(500));
    assert!(failures.grpc_code_fails(4) && failures.grpc_code_fails(13));
    assert!(!failures.grpc_code_fails(2));
}
