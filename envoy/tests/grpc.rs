//! gRPC through a real Envoy (1.40, V8, `--concurrency 2`) with the release
//! sluice.wasm: real gRPC servers and a real gRPC client (Python grpcio,
//! `envoy/grpc/`), HTTP/2 on both sides (h2c downstream, HTTP/2 upstream
//! clusters).
//!
//! Needs `cargo build --release --target wasm32-wasip1 -p sluice` and
//! `scripts/setup.sh` (Envoy and grpcio in `.venv`). Run with
//! `cargo test -p sluice-envoy --test grpc -- --nocapture --test-threads 1`
//! to see the measured figures (the README quotes them).

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use serde_json::{json, Value};
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::grpc::{count, run_client, yaml, Behaviour, Calls, GrpcServer};
use sluice_envoy::Envoy;

/// Sluice's retry conditions in these tests, written out so that they hold
/// whatever the default becomes.
const RETRY_ON: &str = "connect-failure,refused-stream,unavailable";

fn start(sluice: &Value, clusters: &[(&str, u16)]) -> Envoy {
    let wasm = sluice_envoy::require_wasm().unwrap_or_else(|message| panic!("{message}"));
    Envoy::start_yaml(
        &yaml(&wasm, &sluice.to_string(), clusters, Duration::from_secs(5)),
        &EnvoyOptions {
            // The access log reaches the file within 0.2 s (default 10 s).
            extra_args: vec!["--file-flush-interval-msec".into(), "200".into()],
            ..EnvoyOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn service(extra: Value) -> Value {
    let mut service = json!({
        "name": "echo",
        "match": {"path_prefix": "/echo.Echo/"},
        "stable": "echo_v1",
    });
    if let (Some(service), Some(extra)) = (service.as_object_mut(), extra.as_object()) {
        for (key, value) in extra {
            service.insert(key.clone(), value.clone());
        }
    }
    json!({"services": [service]})
}

/// Envoy's access-log lines (`ACCESS ...`, see `sluice_envoy::grpc::yaml`).
fn access_lines(envoy: &Envoy) -> Vec<String> {
    envoy
        .log_lines_containing("ACCESS ")
        .into_iter()
        .map(|line| line[line.find("ACCESS ").unwrap()..].to_string())
        .collect()
}

fn metric(envoy: &Envoy, name: &str) -> u64 {
    envoy.settled_metric(&format!("sluice.echo.{name}"))
}

/// What Envoy reports for each way a gRPC call ends, as Sluice reads it
/// (`response.grpc_status` at log time), and whether the breaker counts it.
#[test]
fn envoy_reports_grpc_status_for_trailers_trailers_only_and_resets() {
    let ok = GrpcServer::start("ok", &Behaviour::healthy());
    let trailers = GrpcServer::start("trailers", &Behaviour::failing("UNAVAILABLE", false));
    let trailers_only = GrpcServer::start("only", &Behaviour::failing("UNAVAILABLE", true));
    let not_found = GrpcServer::start("notfound", &Behaviour::failing("NOT_FOUND", true));
    // A port nobody listens on: connection refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    // A server that accepts the connection and closes it at once: the
    // upstream connection ends before any answer.
    let closer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reset_port = closer.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in closer.incoming() {
            drop(stream);
        }
    });
    let cases: [(&str, u16, &str); 6] = [
        ("ok", ok.port(), "OK"),
        ("trailers", trailers.port(), "UNAVAILABLE"),
        ("only", trailers_only.port(), "UNAVAILABLE"),
        ("notfound", not_found.port(), "NOT_FOUND"),
        ("dead", dead_port, "UNAVAILABLE"),
        ("reset", reset_port, "UNAVAILABLE"),
    ];
    let services: Vec<Value> = cases
        .iter()
        .map(|(name, _, _)| {
            json!({
                "name": name,
                "match": {"path_prefix": "/echo.Echo/", "authority": format!("{name}.local")},
                "stable": name,
                "breaker": {"consecutive_failures": 3, "open_ms": 60000, "max_open_ms": 60000}
            })
        })
        .collect();
    let clusters: Vec<(&str, u16)> = cases.iter().map(|(name, port, _)| (*name, *port)).collect();
    let envoy = start(&json!({"services": services}), &clusters);
    for (name, _, expected) in cases {
        let summary = run_client(
            envoy.port(),
            &Calls {
                metadata: vec![],
                ..Calls::new(4)
            }
            .authority(&format!("{name}.local")),
        );
        eprintln!("{name}: client saw {}", summary["codes"]);
        assert_eq!(count(&summary, expected), 4, "{summary}");
        let trips = envoy
            .settled_wasm_metric(&format!("sluice.{name}.breaker.stable.trips"))
            .unwrap()
            .unwrap_or(0);
        let should_trip = matches!(name, "trailers" | "only" | "dead" | "reset");
        assert_eq!(trips, u64::from(should_trip), "{name}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let lines = access_lines(&envoy);
    for line in &lines {
        eprintln!("{line}");
    }
    // What Envoy itself made of each (its response.grpc_status property).
    for (cluster, expected) in [
        ("ok", "grpc_status=0 code=200 flags=-"),
        ("trailers", "grpc_status=14 code=200 flags=-"),
        ("only", "grpc_status=14 code=200 flags=-"),
        ("notfound", "grpc_status=5 code=200 flags=-"),
        ("dead", "grpc_status=14 code=200 flags=UF"),
        ("reset", "grpc_status=14 code=200 flags=U"),
    ] {
        assert!(
            lines.iter().any(
                |line| line.contains(expected) && line.contains(&format!("cluster={cluster} "))
            ),
            "{cluster}: {expected} in {lines:?}"
        );
    }
}

/// The canary breaker's settings in the breaker tests: five failures in a
/// row trip it, it stays open a second, one probe at a time.
fn canary_breaker() -> Value {
    json!({"consecutive_failures": 5, "open_ms": 1000, "max_open_ms": 1000, "half_open_requests": 1})
}

/// A canary answering every call UNAVAILABLE (`trailers_only` or in
/// trailers after response headers): its breaker opens after five failures,
/// calls fall back to stable, and the canary then sees only the probes.
fn failing_canary_falls_back(trailers_only: bool) {
    let stable = GrpcServer::start("echo_v1", &Behaviour::healthy());
    let canary = GrpcServer::start("echo_v2", &Behaviour::failing("UNAVAILABLE", trailers_only));
    let envoy = start(
        &service(json!({"canary": "echo_v2", "weight": 50, "breaker": canary_breaker()})),
        &[("echo_v1", stable.port()), ("echo_v2", canary.port())],
    );
    let calls = 400;
    let summary = run_client(
        envoy.port(),
        &Calls {
            interval_ms: 10,
            ..Calls::new(calls)
        },
    );
    let order: Vec<&str> = summary["codes_in_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let failures = order.iter().filter(|code| **code != "echo_v1").count() as u64;
    // Failures before the breaker opened: those up to the fifth in a row.
    let before_open = 5;
    let after_open = failures.saturating_sub(before_open);
    let elapsed_s = summary["elapsed_ms"].as_f64().unwrap() / 1000.0;
    let trips = metric(&envoy, "breaker.canary.trips");
    eprintln!(
        "failing gRPC canary ({}): {calls} calls in {elapsed_s:.1}s, client saw {failures} failures \
         ({before_open} before the breaker opened, {after_open} probes after), canary got {} calls, \
         stable {}; breaker trips {trips}",
        if trailers_only { "trailers-only" } else { "trailers" },
        canary.calls(),
        stable.calls(),
    );
    assert_eq!(count(&summary, "OK") + failures, u64::from(calls));
    assert!(failures >= before_open, "{summary}");
    // Every call the canary answered failed, and each reached the client.
    assert_eq!(canary.calls(), failures);
    // After the trip: one probe per second open at most (plus one for the
    // edges of the run).
    let probe_bound = elapsed_s.ceil() as u64 + 1;
    assert!(
        after_open <= probe_bound,
        "{after_open} canary calls after the breaker opened in {elapsed_s:.1}s"
    );
    assert!(trips >= 1);
    // Everything else went to stable.
    assert_eq!(stable.calls(), count(&summary, "OK"));
}

#[test]
fn a_grpc_canary_failing_in_trailers_only_answers_trips_its_breaker() {
    failing_canary_falls_back(true);
}

#[test]
fn a_grpc_canary_failing_in_trailers_trips_its_breaker() {
    failing_canary_falls_back(false);
}

/// A failing stable: once its breaker is open, calls are refused at once
/// with a gRPC answer the client understands.
#[test]
fn a_failing_grpc_stable_is_refused_fast_with_unavailable_and_pushback() {
    let stable = GrpcServer::start("echo_v1", &Behaviour::failing("INTERNAL", true));
    let envoy = start(
        &service(
            json!({"breaker": {"consecutive_failures": 5, "open_ms": 5000, "max_open_ms": 5000}}),
        ),
        &[("echo_v1", stable.port())],
    );
    let summary = run_client(envoy.port(), &Calls::new(50));
    assert_eq!(count(&summary, "INTERNAL"), 5, "{summary}");
    assert_eq!(count(&summary, "UNAVAILABLE"), 45, "{summary}");
    assert_eq!(stable.calls(), 5);
    let refusal = summary["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "UNAVAILABLE")
        .cloned()
        .or_else(|| {
            // The sample holds the first five failures: ask once more.
            let again = run_client(envoy.port(), &Calls::new(1));
            again["failures"].as_array().unwrap().first().cloned()
        })
        .unwrap();
    eprintln!("refusal as the gRPC client saw it: {refusal}");
    assert_eq!(refusal["code"], "UNAVAILABLE");
    let details = refusal["details"].as_str().unwrap();
    assert!(
        details.starts_with("sluice: circuit breaker of service echo is open; retry after "),
        "{details}"
    );
    let pushback: u64 = refusal["trailing"]["grpc-retry-pushback-ms"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0 && pushback <= 5000, "{pushback}");
    assert_eq!(refusal["trailing"]["x-sluice-breaker"], "open");
    // Fast: no upstream in the way.
    let ms = refusal["ms"].as_f64().unwrap();
    assert!(ms < 100.0, "{ms} ms");
    assert_eq!(stable.calls(), 5);
}

/// The shape of the refusal on the wire, as Envoy sends it (HTTP/2, h2c
/// prior knowledge with curl if present; otherwise skipped).
#[test]
fn the_refusal_is_a_trailers_only_grpc_answer_on_the_wire() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .map(|out| !String::from_utf8_lossy(&out.stdout).contains("HTTP2"))
        .unwrap_or(true)
    {
        eprintln!("skipped: no curl with HTTP/2");
        return;
    }
    let stable = GrpcServer::start("echo_v1", &Behaviour::failing("UNAVAILABLE", true));
    let envoy = start(
        &service(
            json!({"breaker": {"consecutive_failures": 2, "open_ms": 5000, "max_open_ms": 5000}}),
        ),
        &[("echo_v1", stable.port())],
    );
    run_client(envoy.port(), &Calls::new(2));
    let out = std::process::Command::new("curl")
        .args(["-s", "-i", "--http2-prior-knowledge", "-X", "POST"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args(["--data-binary", "@-"])
        .arg(format!("http://127.0.0.1:{}/echo.Echo/Say", envoy.port()))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    eprintln!("{text}");
    assert!(text.starts_with("http/2 200"), "{text}");
    assert!(
        text.contains("content-type: application/grpc\r\n"),
        "{text}"
    );
    assert!(text.contains("grpc-status: 14\r\n"), "{text}");
    assert!(
        text.contains("grpc-message: sluice: circuit breaker of service echo is open; retry after"),
        "{text}"
    );
    assert!(text.contains("grpc-retry-pushback-ms: "), "{text}");
    assert!(text.contains("x-sluice-breaker: open"), "{text}");
    // Trailers-only: one header block, no body, no second block.
    let (headers, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(headers.matches("grpc-status").count(), 1, "{text}");
    assert_eq!(body, "", "{text}");
}

fn retry(budget: Value) -> Value {
    json!({"max_retries": 2, "retry_on": RETRY_ON, "timeout_ms": 5000, "budget": budget})
}

/// A canary with 10 % UNAVAILABLE answers and two retries: the client sees
/// (almost) no errors.
#[test]
fn grpc_retries_hide_a_tenth_of_unavailable_answers() {
    let stable = GrpcServer::start("echo_v1", &Behaviour::healthy());
    let canary = GrpcServer::start(
        "echo_v2",
        &Behaviour {
            fail_rate: 0.1,
            ..Behaviour::failing("UNAVAILABLE", true)
        },
    );
    let envoy = start(
        &service(json!({
            "canary": "echo_v2",
            "weight": 50,
            "retry": retry(json!({"ratio": 0.2, "min_per_s": 10, "window_s": 10}))
        })),
        &[("echo_v1", stable.port()), ("echo_v2", canary.port())],
    );
    let calls = 2000;
    let summary = run_client(
        envoy.port(),
        &Calls {
            parallel: 4,
            ..Calls::new(calls)
        },
    );
    let attempts = canary.calls();
    let failed_attempts = canary
        .calls_by_code()
        .get("UNAVAILABLE")
        .copied()
        .unwrap_or(0);
    let client_failures = u64::from(calls) - count(&summary, "OK");
    let retries = envoy.stat_value("cluster.echo_v2.upstream_rq_retry");
    eprintln!(
        "gRPC retries at 10% UNAVAILABLE: {calls} calls, {attempts} attempts \
         ({failed_attempts} UNAVAILABLE, {retries} retries), client saw {client_failures} failures: \
         success {:.2}%",
        100.0 * count(&summary, "OK") as f64 / f64::from(calls)
    );
    assert!(
        failed_attempts >= 50,
        "the canary failed only {failed_attempts}"
    );
    // 1000 canary calls failing three times at 10 %: one expected.
    assert!(client_failures <= 5, "{summary}");
    assert_eq!(
        attempts + stable.calls(),
        u64::from(calls) + retries,
        "every call and every retry reached one server"
    );
}

/// Every call UNAVAILABLE: upstream attempts stay within the budget's
/// bound, retries ≤ ratio × calls + min_per_s × (seconds spanned − 1 + W).
#[test]
fn a_grpc_outage_stays_within_the_retry_budget() {
    let stable = GrpcServer::start("echo_v1", &Behaviour::failing("UNAVAILABLE", true));
    let envoy = start(
        &service(json!({"retry": retry(json!({"ratio": 0.1, "min_per_s": 1, "window_s": 10}))})),
        &[("echo_v1", stable.port())],
    );
    let first_second = sluice_envoy::unix_s();
    let calls = 600;
    let summary = run_client(
        envoy.port(),
        &Calls {
            parallel: 4,
            ..Calls::new(calls)
        },
    );
    let spanned = sluice_envoy::unix_s() - first_second + 1;
    let attempts = stable.calls();
    let retries = attempts - u64::from(calls);
    let allowed = u64::from(calls) / 10 + (spanned - 1 + 10) + 10;
    let amplification = attempts as f64 / f64::from(calls);
    eprintln!(
        "gRPC outage: {calls} calls, {attempts} upstream attempts: amplification {amplification:.3} \
         (bound {:.3}; {} s spanned; granted {}, denied {})",
        1.0 + allowed as f64 / f64::from(calls),
        spanned,
        metric(&envoy, "retry.granted"),
        metric(&envoy, "retry.denied"),
    );
    assert_eq!(
        count(&summary, "UNAVAILABLE"),
        u64::from(calls),
        "{summary}"
    );
    assert!(
        retries <= allowed,
        "{retries} retries, the budget allows {allowed}"
    );
    assert!(retries >= u64::from(calls) / 20, "only {retries} retries");
}

/// A 200 ms deadline against an upstream that answers after a second: the
/// call ends near 200 ms, DEADLINE_EXCEEDED, and is not retried past its
/// deadline.
///
/// Sluice caps Envoy's upstream timeout at the client's deadline plus a
/// tenth (`retry::grpc_deadline_grace_ms`): the client's own timer fires
/// first, it cancels the stream and reports DEADLINE_EXCEEDED itself, and
/// Envoy logs a downstream reset (DR) with no status. Capped at exactly the
/// deadline, the two timers raced and 0–3 calls in 10 ended with Envoy's
/// UNAVAILABLE "upstream request timeout" instead. The call ends at ~200 ms
/// with one upstream attempt, and Sluice books it as a failure.
#[test]
fn a_grpc_deadline_ends_the_call_near_200ms_without_retries() {
    let slow = GrpcServer::start(
        "echo_v1",
        &Behaviour {
            delay_ms: 1000,
            ..Behaviour::healthy()
        },
    );
    let envoy = start(
        &service(json!({
            "retry": retry(json!({"ratio": 0.5, "min_per_s": 10, "window_s": 10})),
            "breaker": {"consecutive_failures": 10, "open_ms": 5000, "max_open_ms": 5000}
        })),
        &[("echo_v1", slow.port())],
    );
    let calls = 10;
    let summary = run_client(
        envoy.port(),
        &Calls {
            timeout_ms: 200,
            ..Calls::new(calls)
        },
    );
    let ms: Vec<f64> = summary["ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // Let the server finish (it stops waiting once the call is cancelled).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while slow.calls() < u64::from(calls) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let lines = access_lines(&envoy);
    let envoy_won = lines
        .iter()
        .filter(|line| line.contains("flags=UT"))
        .count() as u64;
    eprintln!(
        "gRPC deadline 200 ms: client saw {}, durations {ms:?} ms, upstream attempts {}, retries {}; Envoy's timeout won {envoy_won} of {calls} races; Envoy logged e.g. {:?}",
        summary["codes"],
        slow.calls(),
        envoy.stat_value("cluster.echo_v1.upstream_rq_retry"),
        lines.first()
    );
    // Envoy's timer never beats the client's: every call is the client's
    // own DEADLINE_EXCEEDED.
    assert_eq!(envoy_won, 0, "{lines:?}");
    assert_eq!(
        count(&summary, "DEADLINE_EXCEEDED"),
        u64::from(calls),
        "{summary}"
    );
    assert!(ms.iter().all(|&ms| (190.0..400.0).contains(&ms)), "{ms:?}");
    assert_eq!(slow.calls(), u64::from(calls), "one attempt per call");
    assert_eq!(envoy.stat_value("cluster.echo_v1.upstream_rq_retry"), 0);
    // Every one of them failed for the breaker: the tenth in a row trips it.
    assert_eq!(metric(&envoy, "breaker.stable.trips"), 1);
}

/// HTTP/2 downstream: many streams on one connection get the same routing,
/// stickiness and anti-forgery as HTTP/1.1 requests.
#[test]
fn http2_streams_on_one_connection_keep_routing_stickiness_and_anti_forgery() {
    let stable = GrpcServer::start("echo_v1", &Behaviour::healthy());
    let canary = GrpcServer::start("echo_v2", &Behaviour::healthy());
    let envoy = start(
        &service(json!({"canary": "echo_v2", "weight": 50, "sticky": {"header": "x-user-id"}})),
        &[("echo_v1", stable.port()), ("echo_v2", canary.port())],
    );
    let calls = Calls {
        parallel: 8,
        users: 40,
        ..Calls::new(400)
    };
    let plain = run_client(envoy.port(), &calls);
    assert_eq!(count(&plain, "OK"), 400, "{plain}");
    let users = plain["users"].as_object().unwrap();
    assert_eq!(users.len(), 40);
    // Each user sticks to one side, across streams in flight together.
    assert!(users
        .values()
        .all(|servers| servers.as_array().unwrap().len() == 1));
    let canary_users = users.values().filter(|s| s[0] == "echo_v2").count();
    assert!(
        (8..=32).contains(&canary_users),
        "{canary_users} of 40 users on canary"
    );
    // A client naming a cluster changes nothing.
    let forged = run_client(
        envoy.port(),
        &Calls {
            metadata: vec![("x-sluice-cluster".into(), "echo_v2".into())],
            ..calls.clone()
        },
    );
    assert_eq!(forged["users"], plain["users"]);
    // An unmatched call keeps no forged header: it goes to the fallback
    // (stable), not to the cluster it names.
    let before = canary.calls();
    let unmatched = std::process::Command::new(sluice_envoy::grpc::python())
        .arg("-c")
        .arg(format!(
            "import grpc\nch = grpc.insecure_channel('127.0.0.1:{}')\n\
             f = ch.unary_unary('/other.Svc/Call', request_serializer=lambda b: b, response_deserializer=lambda b: b)\n\
             print(f(b'x', metadata=[('x-sluice-cluster', 'echo_v2')]).decode())",
            envoy.port()
        ))
        .output()
        .unwrap();
    // The stable server answers any method of echo.Echo only: UNIMPLEMENTED
    // proves the call reached echo_v1 (the fallback) and not the canary.
    assert_eq!(canary.calls(), before);
    assert!(String::from_utf8_lossy(&out_text(&unmatched)).contains("UNIMPLEMENTED"));
    eprintln!(
        "HTTP/2: 400 calls, 8 streams at once on one connection, 40 users: {canary_users} on canary, \
         every user on one side; forged steering header ignored"
    );
}

fn out_text(out: &std::process::Output) -> Vec<u8> {
    let mut text = out.stdout.clone();
    text.extend_from_slice(&out.stderr);
    text
}

/// The commented example in envoy/examples/sluice-grpc.yaml loads.
#[test]
fn the_grpc_example_validates() {
    let root = sluice_envoy::repo_root();
    let wasm = sluice_envoy::require_wasm().unwrap();
    let example = std::fs::read_to_string(root.join("envoy/examples/sluice-grpc.yaml")).unwrap();
    let yaml = example.replace(
        "filename: target/wasm32-wasip1/release/sluice.wasm",
        &format!("filename: {}", wasm.display()),
    );
    assert_ne!(
        yaml, example,
        "the example names the wasm by its usual path"
    );
    let (status, out) = Envoy::validate_yaml(&yaml, None).unwrap();
    assert!(status.success(), "{out}");
    assert!(out.contains("OK"), "{out}");
}

/// A call the client cancels after the response headers came (as a client
/// closing a stream does): Envoy reports no `grpc-status` anywhere, so its
/// `response.grpc_status` is UNKNOWN, inferred from the HTTP 200, with flag
/// DR. Sluice books the client's own cancellations as nothing.
#[test]
fn a_call_the_client_cancels_after_the_response_headers_is_not_a_failure() {
    let slow = GrpcServer::start(
        "echo_v1",
        &Behaviour {
            delay_ms: 1000,
            headers_first: true,
            ..Behaviour::healthy()
        },
    );
    let envoy = start(
        &service(
            json!({"breaker": {"consecutive_failures": 3, "open_ms": 5000, "max_open_ms": 5000}}),
        ),
        &[("echo_v1", slow.port())],
    );
    let summary = run_client(
        envoy.port(),
        &Calls {
            cancel_after_ms: 100,
            ..Calls::new(6)
        },
    );
    assert_eq!(count(&summary, "CANCELLED"), 6, "{summary}");
    std::thread::sleep(Duration::from_millis(500));
    let lines = access_lines(&envoy);
    eprintln!(
        "client cancellations after response headers, as Envoy logged them: {:?}",
        lines.first()
    );
    assert!(
        lines
            .iter()
            .all(|line| line.contains("grpc_status=2 code=200 flags=DR")),
        "{lines:?}"
    );
    assert_eq!(metric(&envoy, "breaker.stable.trips"), 0);
    // The upstream saw every call: none was refused.
    assert_eq!(slow.calls(), 6);
}
