//! gRPC through the real sluice.wasm in the fake Envoy host (Envoy's
//! main-thread VM and two workers): outcomes from `grpc-status` in the
//! trailers or in a trailers-only header block (`response.grpc_status`, as
//! the fake derives it like Envoy), per-service failure codes, the breaker's
//! gRPC-shaped refusal, retries and deadlines.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_host::{require_sluice_wasm, Action, Proxy, Stream, Vm};

const ECHO: &str = r#"{
  "services": [{
    "name": "echo",
    "match": {"path_prefix": "/echo.Echo/"},
    "stable": "echo_v1", "canary": "echo_v2", "weight": 100,
    "breaker": {"consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 5000}
  }]
}"#;

/// Envoy response flags (legacy bitmask).
const UR: u64 = 0x10;

/// The worker's cached breaker verdict lives this long (`BREAKER_CACHE_MS`).
const BREAKER_CACHE_MS: u64 = 100;

struct Rig {
    proxy: Proxy,
    vms: Vec<Vm>,
}

impl Rig {
    fn new(config: &str) -> Rig {
        let proxy = Proxy::builder(require_sluice_wasm())
            .plugin_config(config)
            .root_id("sluice")
            .build()
            .unwrap();
        let vms = proxy.boot(2).unwrap();
        Rig { proxy, vms }
    }

    fn w(&self, i: usize) -> &Vm {
        &self.vms[1 + i % (self.vms.len() - 1)]
    }

    fn counter(&self, name: &str) -> u64 {
        self.proxy.tick_now();
        self.proxy.counter(name).unwrap_or(0)
    }
}

/// A gRPC call's request headers went through the filter.
fn begin(vm: &Vm, extra: &[(&str, &str)]) -> (Stream, Action) {
    let mut headers = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "echo.local"),
        (":path", "/echo.Echo/Say"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    headers.extend_from_slice(extra);
    let stream = vm.stream();
    let action = stream.request_headers(&headers, false);
    assert!(vm.trapped().is_none(), "{:?}", vm.trapped());
    (stream, action)
}

/// How the upstream ends the call.
#[derive(Clone, Copy)]
enum Answer {
    /// Response headers, a message, then `grpc-status` in the trailers.
    Trailers(u32),
    /// One header block with `grpc-status` and end of stream.
    TrailersOnly(u32),
    /// No response at all, the upstream reset the stream.
    Reset,
}

fn answer(stream: &Stream, answer: Answer, attempts: u64) {
    stream.set_attempt_count(attempts);
    match answer {
        Answer::Trailers(code) => {
            stream.response_headers(
                &[(":status", "200"), ("content-type", "application/grpc")],
                false,
            );
            stream.response_body(b"\0\0\0\0\x05hello", false);
            stream.response_trailers(&[("grpc-status", &code.to_string())]);
        }
        Answer::TrailersOnly(code) => {
            stream.response_headers(
                &[
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", &code.to_string()),
                    ("grpc-message", "nope"),
                ],
                true,
            );
        }
        Answer::Reset => stream.set_response_flags(UR),
    }
    stream.finish();
    assert!(stream.vm().trapped().is_none());
}

/// One call; which cluster it was steered to.
fn call(rig: &Rig, i: usize, how: Answer) -> String {
    let (stream, action) = begin(rig.w(i), &[]);
    assert_eq!(action, Action::Continue);
    let cluster = stream.request_header("x-sluice-cluster").unwrap();
    answer(&stream, how, 1);
    cluster
}

fn failing_canary_trips(how: Answer) {
    let rig = Rig::new(ECHO);
    for i in 0..5 {
        assert_eq!(call(&rig, i, how), "echo_v2");
    }
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 1);
    // Calls fall back to stable while it is open.
    for i in 0..10 {
        assert_eq!(call(&rig, i, Answer::TrailersOnly(0)), "echo_v1");
    }
}

#[test]
fn unavailable_in_trailers_trips_the_canary_breaker() {
    failing_canary_trips(Answer::Trailers(14));
}

#[test]
fn unavailable_in_a_trailers_only_answer_trips_the_canary_breaker() {
    failing_canary_trips(Answer::TrailersOnly(14));
}

#[test]
fn a_reset_without_any_answer_trips_the_canary_breaker() {
    failing_canary_trips(Answer::Reset);
}

#[test]
fn caller_errors_and_ok_do_not_trip() {
    let rig = Rig::new(ECHO);
    for (i, code) in [0, 3, 5, 7, 16, 6, 9, 11, 0, 5].into_iter().enumerate() {
        let how = if i % 2 == 0 {
            Answer::Trailers(code)
        } else {
            Answer::TrailersOnly(code)
        };
        assert_eq!(call(&rig, i, how), "echo_v2");
    }
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 0);
}

#[test]
fn the_configured_codes_decide() {
    let config = ECHO.replace(
        r#""breaker":"#,
        r#""failures": {"grpc_codes": ["NOT_FOUND"]}, "breaker":"#,
    );
    let rig = Rig::new(&config);
    for i in 0..5 {
        call(&rig, i, Answer::Trailers(14));
    }
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 0);
    for i in 0..5 {
        call(&rig, i, Answer::TrailersOnly(5));
    }
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 1);
}

#[test]
fn a_streaming_call_is_booked_once_at_its_end() {
    let rig = Rig::new(ECHO);
    let calls: Vec<Stream> = (0..5)
        .map(|i| {
            let (stream, _) = begin(rig.w(i), &[]);
            stream.set_attempt_count(1);
            stream.response_headers(
                &[(":status", "200"), ("content-type", "application/grpc")],
                false,
            );
            stream.response_body(b"\0\0\0\0\x01a", false);
            stream
        })
        .collect();
    // Headers and messages so far: nothing booked.
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 0);
    for stream in &calls {
        stream.response_body(b"\0\0\0\0\x01b", false);
        stream.response_trailers(&[("grpc-status", "13"), ("grpc-message", "boom")]);
        stream.finish();
    }
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 1);
}

#[test]
fn an_open_stable_breaker_refuses_grpc_with_a_trailers_only_unavailable() {
    let rig = Rig::new(
        r#"{"services": [{"name": "echo", "match": {"path_prefix": "/echo.Echo/"},
            "stable": "echo_v1",
            "breaker": {"consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 5000}}]}"#,
    );
    for i in 0..5 {
        call(&rig, i, Answer::TrailersOnly(14));
    }
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    let (stream, action) = begin(rig.w(0), &[]);
    assert_eq!(action, Action::Pause);
    let reply = stream.local_reply().expect("a local reply");
    assert_eq!(reply.grpc_status, Some(14));
    // What the client gets, as Envoy's sendLocalReply builds it for gRPC.
    assert_eq!(stream.response_header(":status").as_deref(), Some("200"));
    assert_eq!(
        stream.response_header("content-type").as_deref(),
        Some("application/grpc")
    );
    assert_eq!(stream.response_header("grpc-status").as_deref(), Some("14"));
    let message = stream.response_header("grpc-message").unwrap();
    assert!(
        message.starts_with("sluice: circuit breaker of service echo is open; retry after"),
        "{message}"
    );
    let pushback: u64 = stream
        .response_header("grpc-retry-pushback-ms")
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0 && pushback <= 5000, "{pushback}");
    assert_eq!(
        stream.response_header("x-sluice-breaker").as_deref(),
        Some("open")
    );
    assert!(stream.response_body_forwarded().is_empty());
    assert_eq!(stream.request_header("x-sluice-cluster"), None);
    stream.finish();
    // Plain HTTP to the same service: a 503 as before.
    let http = rig.w(1).stream();
    http.request_headers(
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "echo.local"),
            (":path", "/echo.Echo/Say"),
        ],
        true,
    );
    let reply = http.local_reply().expect("a local reply");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.grpc_status, None);
    assert_eq!(http.response_header(":status").as_deref(), Some("503"));
    http.finish();
}

#[test]
fn grpc_retries_are_granted_on_grpc_conditions_and_retried_attempts_count() {
    let rig = Rig::new(
        r#"{"services": [{"name": "echo", "match": {"path_prefix": "/echo.Echo/"},
            "stable": "echo_v1", "canary": "echo_v2", "weight": 100,
            "retry": {"max_retries": 2, "retry_on": "connect-failure,refused-stream,unavailable"},
            "breaker": {"consecutive_failures": 5}}]}"#,
    );
    let (stream, _) = begin(rig.w(0), &[]);
    assert_eq!(
        stream.request_header("x-envoy-retry-grpc-on").as_deref(),
        Some("unavailable")
    );
    assert_eq!(
        stream.request_header("x-envoy-retry-on").as_deref(),
        Some("connect-failure,refused-stream")
    );
    assert_eq!(
        stream.request_header("x-envoy-max-retries").as_deref(),
        Some("2")
    );
    // Three attempts, the last UNAVAILABLE too: three failed calls.
    answer(&stream, Answer::TrailersOnly(14), 3);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 0);
    // A call whose two attempts both failed: five failed calls in a row.
    let (stream, _) = begin(rig.w(1), &[]);
    answer(&stream, Answer::Trailers(14), 2);
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 1);
}

#[test]
fn a_grpc_deadline_caps_the_timeout_and_a_call_abandoned_at_it_is_a_failure() {
    let rig = Rig::new(
        r#"{"services": [{"name": "echo", "match": {"path_prefix": "/echo.Echo/"},
            "stable": "echo_v1",
            "retry": {"max_retries": 2, "retry_on": "connect-failure,refused-stream,unavailable",
                      "timeout_ms": 5000},
            "breaker": {"consecutive_failures": 5}}]}"#,
    );
    for i in 0..5 {
        let (stream, _) = begin(rig.w(i), &[("grpc-timeout", "200m")]);
        let timeout: u64 = stream
            .request_header("x-envoy-upstream-rq-timeout-ms")
            .unwrap()
            .parse()
            .unwrap();
        // The client's deadline plus a tenth of it: Envoy's timeout must
        // not race the client's own, which reports DEADLINE_EXCEEDED.
        assert_eq!(timeout, 220);
        // The client resets the stream at its deadline: no answer, no
        // upstream failure flag.
        stream.set_attempt_count(1);
        rig.proxy.advance_ms(200);
        stream.finish();
    }
    assert_eq!(rig.counter("sluice.echo.breaker.stable.trips"), 1);
}

#[test]
fn hostile_grpc_statuses_do_not_trap() {
    let rig = Rig::new(ECHO);
    for (i, status) in ["-1", "99999999999999999999", "", "14 ", "abc", "17"]
        .into_iter()
        .enumerate()
    {
        let (stream, _) = begin(rig.w(i), &[]);
        stream.response_headers(&[(":status", "200")], false);
        stream.response_trailers(&[("grpc-status", status)]);
        stream.finish();
        assert!(rig.w(i).trapped().is_none());
    }
}

/// Envoy's flag for a client's RST_STREAM (DR), as Envoy 1.40 reports it.
const DR: u64 = 0x1000_0000;

#[test]
fn a_call_the_client_cut_off_after_the_response_headers_is_not_a_failure() {
    let rig = Rig::new(ECHO);
    for i in 0..10 {
        let (stream, _) = begin(rig.w(i), &[]);
        stream.set_attempt_count(1);
        stream.response_headers(
            &[(":status", "200"), ("content-type", "application/grpc")],
            false,
        );
        // No trailers: the client reset the stream. The fake, like Envoy,
        // infers UNKNOWN from the 200.
        stream.set_response_flags(DR);
        stream.finish();
    }
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 0);
    // UNKNOWN in the trailers of a complete answer is the service's.
    for i in 0..5 {
        call(&rig, i, Answer::Trailers(2));
    }
    rig.proxy.advance_ms(BREAKER_CACHE_MS);
    assert_eq!(rig.counter("sluice.echo.breaker.canary.trips"), 1);
}
