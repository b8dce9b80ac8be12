//! Host crossings per request, counted natively: the engine that ships over
//! `sluice::testing::FakeHost`, which counts every call the engine makes
//! through `engine::Host` (`FakeHost::crossings`), one callback at a time
//! through `sluice::testing::Vm`. Log lines are counted apart: in Envoy
//! each is one `proxy_log` (the shell's `log` facade, level Info and up),
//! natively they go through the `log` crate, not the `Host` trait.
//!
//! Each path is counted on a VM of the realistic config
//! (`benches/config/sluice.json`) warmed with 100 requests, the clock
//! moving 1 ms per request. The paths are checked, not assumed: each
//! scenario asserts what the engine did (cluster chosen, retries granted,
//! local reply) before its count is reported.

use crate::workload::{request_headers, user, HEADERS_CONFIG, REALISTIC_CONFIG, USERS};
use sluice::breaker::UPSTREAM_FAILURE_FLAGS;
use sluice::engine::{HeadersAction, BREAKER_CACHE_MS, BREAKER_HEADER, TICK_MS};
use sluice::retry::{GRPC_TIMEOUT_HEADER, HEDGE_HEADER, MAX_RETRIES_HEADER, TIMEOUT_HEADER};
use sluice::testing::{Ending, FaultyStore, StreamState, Vm};
use std::cell::Cell;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

const T0: u64 = crate::driver::T0;
const STEERING: &str = "x-sluice-cluster";

static LOG_LINES: AtomicU64 = AtomicU64::new(0);

/// Counts log lines as the shell's logger would send them to Envoy.
struct LineCounter;

impl log::Log for LineCounter {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            LOG_LINES.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

/// Installs the line counter (once per process), at the shell's level.
pub fn count_log_lines() {
    if log::set_logger(&LineCounter).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

fn log_lines() -> u64 {
    LOG_LINES.load(Ordering::Relaxed)
}

/// Host calls of one request, by callback.
#[derive(Debug, Clone, Copy, Default)]
pub struct Count {
    pub request: u64,
    pub response: u64,
    /// `on_log` and `on_delete`.
    pub end: u64,
    /// Log lines: one `proxy_log` each in Envoy.
    pub log_lines: u64,
}

impl Count {
    pub fn total(&self) -> u64 {
        self.request + self.response + self.end + self.log_lines
    }
}

/// How the request ends.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Response headers with this status after this many attempts.
    Response { status: u64, attempts: u64 },
    /// A gRPC answer after one attempt: HTTP 200 headers, then this
    /// `grpc-status` in the trailers, or (`trailers_only`) in the one
    /// header block that ends the stream.
    Grpc { code: u64, trailers_only: bool },
    /// No response headers: `on_log` with these response flags, the
    /// attempt count not reported.
    NoResponse { flags: u64 },
}

/// One VM of the realistic config, its clock, and Envoy's tick timer.
struct Scene {
    vm: Vm,
    clock: Rc<Cell<u64>>,
    next_tick_ms: u64,
    /// Host calls made by ticks.
    tick_crossings: u64,
    ticks: u64,
}

fn header(state: &StreamState, name: &str) -> Option<String> {
    state
        .header(name)
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

fn with(mut headers: Vec<(String, String)>, name: &str, value: &str) -> Vec<(String, String)> {
    headers.push((name.to_string(), value.to_string()));
    headers
}

/// The realistic config with `change` applied to its service (a variant
/// row of the table).
fn variant(change: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut value: serde_json::Value =
        serde_json::from_str(REALISTIC_CONFIG).expect("the realistic config is JSON");
    let service = value["services"][0]
        .as_object_mut()
        .expect("the realistic config has a service");
    change(service);
    value.to_string()
}

impl Scene {
    /// Configured at `T0`; `warm` requests of users 0.. already served.
    fn new(warm: usize) -> Scene {
        // The bench routes set Envoy's `include_attempt_count_in_response`,
        // as the realistic config's `attempt_count_in_response` says.
        Scene::with_config(warm, REALISTIC_CONFIG, true)
    }

    /// `new` with `config`; `route_writes_count`: the route sets Envoy's
    /// `include_attempt_count_in_response`.
    fn with_config(warm: usize, config: &str, route_writes_count: bool) -> Scene {
        let clock = Rc::new(Cell::new(T0));
        let mut vm = Vm::new(Rc::new(FaultyStore::default()), Rc::clone(&clock), 7);
        vm.route_writes_attempt_count = route_writes_count;
        assert!(vm.configure(config.as_bytes()), "config refused");
        let mut scene = Scene {
            vm,
            clock,
            next_tick_ms: T0 + u64::from(TICK_MS),
            tick_crossings: 0,
            ticks: 0,
        };
        for n in 0..warm {
            scene.serve(
                &request_headers(&user(n % USERS)),
                Answer::Response {
                    status: 200,
                    attempts: 1,
                },
            );
        }
        scene
    }

    fn crossings(&self) -> u64 {
        self.vm.host.crossings.get()
    }

    fn advance(&mut self, ms: u64) {
        self.clock.set(self.clock.get() + ms);
    }

    /// Envoy's timer: the tick when due, its host calls counted apart.
    fn tick_if_due(&mut self) {
        if self.clock.get() >= self.next_tick_ms {
            self.tick();
        }
    }

    fn tick(&mut self) {
        let before = self.crossings();
        self.vm.tick();
        self.tick_crossings += self.crossings() - before;
        self.ticks += 1;
        self.next_tick_ms = self.clock.get() + u64::from(TICK_MS);
    }

    /// One request 1 ms after the last, as Envoy calls the VM for it; its
    /// host calls by callback, and the stream as the host saw it.
    fn serve(&mut self, headers: &[(String, String)], answer: Answer) -> (Count, StreamState) {
        self.advance(1);
        self.tick_if_due();
        let lines = log_lines();
        let start = self.crossings();
        let (context, action) = self.vm.request(headers);
        let after_request = self.crossings();
        let ending = match answer {
            Answer::Response { status, attempts } => {
                if action == HeadersAction::Continue {
                    self.vm.respond(context, status, Some(attempts));
                }
                Ending {
                    code: Some(status),
                    flags: 0,
                    attempts: Some(attempts),
                    grpc_status: None,
                }
            }
            Answer::Grpc {
                code,
                trailers_only,
            } => {
                if action == HeadersAction::Continue {
                    if trailers_only {
                        let code = code.to_string();
                        self.vm.respond_with(
                            context,
                            &[
                                (":status", "200"),
                                ("content-type", "application/grpc"),
                                ("grpc-status", code.as_str()),
                            ],
                            Some(1),
                            true,
                        );
                    } else {
                        self.vm.respond_with(
                            context,
                            &[(":status", "200"), ("content-type", "application/grpc")],
                            Some(1),
                            false,
                        );
                    }
                }
                Ending {
                    code: Some(200),
                    flags: 0,
                    attempts: Some(1),
                    grpc_status: (!trailers_only).then_some(code),
                }
            }
            Answer::NoResponse { flags } => Ending {
                code: None,
                flags,
                attempts: None,
                grpc_status: None,
            },
        };
        let after_response = self.crossings();
        self.vm.end(context, ending);
        let count = Count {
            request: after_request - start,
            response: after_response - after_request,
            end: self.crossings() - after_response,
            log_lines: log_lines() - lines,
        };
        (count, self.vm.forget(context))
    }

    /// `serve`, just after a request to the same side (`warm`) and a tick:
    /// the tick writes that request's held success, which renews the
    /// worker's cached breaker verdict, so the row shows its own path and
    /// not a cache expiry that happened to fall on it.
    fn serve_warm(
        &mut self,
        warm: &[(String, String)],
        headers: &[(String, String)],
        answer: Answer,
    ) -> (Count, StreamState) {
        self.serve(warm, OK);
        self.tick();
        self.serve(headers, answer)
    }
}

/// A sticky user the realistic split sends to `cluster` (`None`: kept on
/// stable, the route table's default, with no steering header).
fn user_routed_to(cluster: Option<&str>) -> Vec<(String, String)> {
    let mut scene = Scene::new(0);
    for n in 0..USERS {
        let headers = request_headers(&user(n));
        let (_, state) = scene.serve(
            &headers,
            Answer::Response {
                status: 200,
                attempts: 1,
            },
        );
        if header(&state, STEERING).as_deref() == cluster {
            return headers;
        }
    }
    panic!("no user of {USERS} is routed to {cluster:?}");
}

const OK: Answer = Answer::Response {
    status: 200,
    attempts: 1,
};

/// One row of the table: a path, and its count.
pub struct Row {
    pub path: String,
    pub count: Count,
}

fn expect(state: &StreamState, name: &str, value: Option<&str>, path: &str) {
    assert_eq!(
        header(state, name).as_deref(),
        value,
        "{path}: header {name}"
    );
}

/// Every path of the table, counted.
pub fn paths() -> Vec<Row> {
    count_log_lines();
    let stable = user_routed_to(None);
    let mut rows = Vec::new();
    let mut row = |path: &str, count: Count| {
        rows.push(Row {
            path: path.to_string(),
            count,
        })
    };

    // The common path.
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(&stable, &stable, OK);
    let path = "matched, stable, breaker closed (verdict cached), budget with tokens, no client deadline, 200 after 1 attempt";
    // Stable is the route table's default and the route's retry policy
    // stands: nothing written.
    expect(&state, STEERING, None, path);
    expect(&state, MAX_RETRIES_HEADER, None, path);
    assert_eq!(count.log_lines, 0, "{path}");
    row(path, count);

    // The same once the worker's breaker verdict has expired (no tick in
    // between: a tick that writes held successes renews it).
    scene.tick();
    scene.advance(BREAKER_CACHE_MS);
    let (count, state) = scene.serve(&stable, OK);
    let path = "the same, first request after the cached breaker verdict expired (at most once per BREAKER_CACHE_MS = 100 ms)";
    expect(&state, STEERING, None, path);
    row(path, count);

    // Canary by rule; the canary breaker's verdict cached by a first one.
    let canary = with(stable.clone(), "x-canary", "always");
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(&canary, &canary, OK);
    let path = "canary (rule `x-canary: always`), canary breaker verdict cached, 200";
    expect(&state, STEERING, Some("shop_v2"), path);
    row(path, count);

    // A retry granted and used: the first attempt failed, the second
    // answered 200. Two calls, one failed: not a clean success, so the
    // breaker is written at once.
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(
        &stable,
        &stable,
        Answer::Response {
            status: 200,
            attempts: 2,
        },
    );
    let path = "retry granted and used: 200 after 2 attempts (not a clean success: breaker written at once)";
    expect(&state, MAX_RETRIES_HEADER, None, path);
    row(path, count);

    // Retry denied: the budget drained by requests that used their retries
    // (ended without a response, attempts unknown: nothing refunded). A
    // request deposits a fifth of a token, so a denial can be followed by a
    // grant: the run is deterministic, so drain one more request each try
    // until the counted request is denied.
    let mut denied = None;
    for extra in 0..10 {
        let mut scene = Scene::new(100);
        let mut drained = 0;
        for _ in 0..10_000 {
            let (_, state) = scene.serve(&stable, Answer::NoResponse { flags: 0 });
            if header(&state, MAX_RETRIES_HEADER).as_deref() == Some("0") {
                drained += 1;
                if drained > extra {
                    break;
                }
            }
        }
        let (count, state) = scene.serve_warm(&stable, &stable, OK);
        if header(&state, MAX_RETRIES_HEADER).as_deref() == Some("0") {
            denied = Some((count, state));
            break;
        }
    }
    let (count, state) = denied.expect("the retry budget never ran dry");
    let path = "retry denied: the budget is empty (x-envoy-max-retries: 0), 200";
    expect(&state, STEERING, None, path);
    row(path, count);

    // Client deadlines.
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(
        &stable,
        &with(stable.clone(), GRPC_TIMEOUT_HEADER, "1500m"),
        OK,
    );
    let path = "client deadline `grpc-timeout: 1500m` (one try fits: retries cut to 0, timeout 1500 ms), 200";
    expect(&state, TIMEOUT_HEADER, Some("1500"), path);
    expect(&state, MAX_RETRIES_HEADER, Some("0"), path);
    row(path, count);
    let (count, state) = scene.serve_warm(
        &stable,
        &with(stable.clone(), GRPC_TIMEOUT_HEADER, "3S"),
        OK,
    );
    let path = "client deadline `grpc-timeout: 3S` (no cut: the route's 2 retries stand, timeout lowered to 3000 ms), 200";
    expect(&state, TIMEOUT_HEADER, Some("3000"), path);
    expect(&state, MAX_RETRIES_HEADER, None, path);
    row(path, count);

    // A client's own retry header: removed (one call) or overwritten (none).
    let (count, state) = scene.serve_warm(&stable, &with(stable.clone(), HEDGE_HEADER, "true"), OK);
    let path = "client sent `x-envoy-hedge-on-per-try-timeout` (removed), 200";
    expect(&state, HEDGE_HEADER, None, path);
    row(path, count);

    // Failures, up to the trip and the local replies after it.
    let mut scene = Scene::new(100);
    let failed = Answer::Response {
        status: 503,
        attempts: 3,
    };
    // `consecutive_failures: 5` counts failed calls: 3 + 1 + 3 trips it.
    let (count, _) = scene.serve_warm(&stable, &stable, failed);
    let path = "5xx: 503 after 3 attempts, first failure (written to the breaker at once)";
    assert_eq!(count.log_lines, 0, "{path}");
    row(path, count);
    let (count, _) = scene.serve(
        &stable,
        Answer::Response {
            status: 503,
            attempts: 1,
        },
    );
    let path = "5xx again (503 after 1 attempt) while failures come in: no cached verdict, the breaker is read";
    assert_eq!(count.log_lines, 0, "{path}");
    row(path, count);
    let (count, _) = scene.serve(&stable, failed);
    let path =
        "5xx that trips the stable breaker (7 consecutive failed calls; the transition is logged)";
    assert!(count.log_lines > 0, "{path}: the breaker did not trip");
    row(path, count);
    let (count, state) = scene.serve(&stable, OK);
    let path = "breaker open → local reply 503 (verdict cached at the trip)";
    let reply = state.local_reply.as_ref().expect("no local reply");
    assert_eq!(reply.status, 503, "{path}");
    assert!(
        reply
            .headers
            .iter()
            .any(|(name, value)| name == BREAKER_HEADER && value == "open"),
        "{path}"
    );
    row(path, count);

    // No response headers: the upstream reset the stream.
    let mut scene = Scene::new(100);
    let (count, _) = scene.serve_warm(
        &stable,
        &stable,
        Answer::NoResponse {
            flags: UPSTREAM_FAILURE_FLAGS & 0x10,
        },
    );
    row(
        "upstream reset before response headers (flag UR; status and attempts read at the log)",
        count,
    );

    // Steering header forged by the client.
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(&stable, &with(stable.clone(), STEERING, "shop_v2"), OK);
    let path = "forged steering header `x-sluice-cluster: shop_v2`, matched, kept on stable (removed: the default route is stable)";
    expect(&state, STEERING, None, path);
    row(path, count);
    let unmatched: Vec<(String, String)> = stable
        .iter()
        .map(|(name, value)| {
            let value = if name == ":authority" {
                "elsewhere.local".to_string()
            } else {
                value.clone()
            };
            (name.clone(), value)
        })
        .collect();
    let (count, state) = scene.serve(&with(unmatched.clone(), STEERING, "shop_v2"), OK);
    let path = "forged steering header, unmatched host (removed)";
    expect(&state, STEERING, None, path);
    row(path, count);
    let (count, _) = scene.serve(&unmatched, OK);
    row("unmatched host", count);

    // gRPC (content-type application/grpc on the same service).
    let grpc = with(stable.clone(), "content-type", "application/grpc");
    let mut scene = Scene::new(100);
    let (count, state) = scene.serve_warm(
        &grpc,
        &grpc,
        Answer::Grpc {
            code: 0,
            trailers_only: false,
        },
    );
    let path = "gRPC OK in the trailers (attempts with the response headers, `response.grpc_status` at the log, no flags)";
    expect(&state, STEERING, None, path);
    row(path, count);
    let (count, _) = scene.serve_warm(
        &grpc,
        &grpc,
        Answer::Grpc {
            code: 14,
            trailers_only: true,
        },
    );
    row(
        "gRPC trailers-only UNAVAILABLE (the code and the attempts in the one header read; the failure written to the breaker at once)",
        count,
    );

    // gRPC trailers-only OK: everything in the one header read (a fresh
    // VM: the failure above keeps the breaker uncached).
    let mut scene = Scene::new(100);
    let (count, _) = scene.serve_warm(
        &grpc,
        &grpc,
        Answer::Grpc {
            code: 0,
            trailers_only: true,
        },
    );
    row(
        "gRPC trailers-only OK (everything in the one header read)",
        count,
    );

    // Variants of the common path, one lever off at a time.
    let config = variant(|service| {
        service.insert("stable_by_default".to_string(), false.into());
    });
    let mut scene = Scene::with_config(100, &config, true);
    let (count, state) = scene.serve_warm(&stable, &stable, OK);
    let path = "variant `stable_by_default: false` (the steering header written for stable too): the common path";
    expect(&state, STEERING, Some("shop_v1"), path);
    row(path, count);
    let config = variant(|service| {
        service.remove("attempt_count_in_response");
    });
    let mut scene = Scene::with_config(100, &config, false);
    let (count, _) = scene.serve_warm(&stable, &stable, OK);
    row(
        "variant without `attempt_count_in_response` (the attempts from the property): the common path",
        count,
    );
    let config = variant(|service| {
        if let Some(retry) = service.get_mut("retry").and_then(|r| r.as_object_mut()) {
            retry.insert("mode".to_string(), "headers".into());
        }
    });
    let mut scene = Scene::with_config(100, &config, true);
    let (count, state) = scene.serve_warm(&stable, &stable, OK);
    let path = "variant `retry.mode: \"headers\"` (the retry policy written on every request): the common path";
    expect(&state, MAX_RETRIES_HEADER, Some("2"), path);
    row(path, count);
    let steering_user = {
        let mut scene = Scene::with_config(0, HEADERS_CONFIG, false);
        let (_, state) = scene.serve(&stable, OK);
        assert_eq!(header(&state, STEERING).as_deref(), Some("shop_v1"));
        stable.clone()
    };
    let mut scene = Scene::with_config(100, HEADERS_CONFIG, false);
    let (count, state) = scene.serve_warm(&steering_user, &steering_user, OK);
    let path = "the config before issue 13 (`benches/config/sluice-headers.json`: headers mode, steering written for stable, attempts from the property): the common path";
    expect(&state, STEERING, Some("shop_v1"), path);
    expect(&state, MAX_RETRIES_HEADER, Some("2"), path);
    row(path, count);

    rows
}

/// The realistic workload: `requests` requests of users 0.. in turn (10 %
/// sticky canary), 1 ms apart on a fresh VM; the mean per request, and the
/// ticks' host calls spread over them.
pub struct Mean {
    pub requests: u64,
    pub count: Count,
    pub tick_crossings: u64,
    pub ticks: u64,
}

impl Mean {
    pub fn per_request(&self, value: u64) -> f64 {
        value as f64 / self.requests as f64
    }

    /// Host calls (log lines included) per request, ticks spread.
    pub fn total(&self) -> f64 {
        self.per_request(self.count.total() + self.tick_crossings)
    }
}

pub fn realistic_mean(requests: u64) -> Mean {
    count_log_lines();
    let mut scene = Scene::new(0);
    let mut sum = Count::default();
    for n in 0..requests {
        let (count, _) = scene.serve(&request_headers(&user(n as usize % USERS)), OK);
        sum.request += count.request;
        sum.response += count.response;
        sum.end += count.end;
        sum.log_lines += count.log_lines;
    }
    Mean {
        requests,
        count: sum,
        tick_crossings: scene.tick_crossings,
        ticks: scene.ticks,
    }
}

/// The Markdown report (`benches/results/native-crossings.md`).
pub fn report() -> String {
    let rows = paths();
    let mean = realistic_mean(1000);
    let mut md = String::from("# Host calls per request, native (the engine over `FakeHost`)\n\n");
    let _ = writeln!(
        md,
        "Generated by `cargo run --release -p sluice-bench-tools --bin sluice-native-crossings` \
         (writes this file). Filter code: {}.\n",
        crate::workload::filter_revision()
    );
    md.push_str(
        "Every call the engine (`sluice::engine::Worker`, the code `sluice.wasm` runs) makes \
         through `engine::Host`, counted by `sluice::testing::FakeHost::crossings`, one callback \
         at a time as Envoy calls a VM (`sluice::testing::Vm`); plus its log lines, each one \
         `proxy_log` in Envoy (the shell logs Info and up). Not counted here: Envoy's entries \
         into the module (callbacks, and `malloc` for each buffer it returns), see \
         `wasmtime-crossings.md`. Realistic config (`benches/config/sluice.json`), a VM warmed \
         with 100 requests, the clock moving 1 ms per request; a row is \
         counted just after a request to the same side and a tick (the worker's breaker \
         verdict fresh) unless it says otherwise, and the failure rows run in the order shown; each path is asserted \
         (`benches/src/crossings.rs`), not assumed.\n\n",
    );
    md.push_str(
        "| path | request headers | response headers | log + delete | log lines | total |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for row in &rows {
        let c = row.count;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | **{}** |",
            row.path,
            c.request,
            c.response,
            c.end,
            c.log_lines,
            c.total()
        );
    }
    let c = mean.count;
    let _ = writeln!(
        md,
        "\nThe realistic workload ({} requests of 1000 users in turn, 10 % sticky canary, 200 \
         after 1 attempt, 1 ms apart, fresh VM; {} ticks, every {TICK_MS} ms, their host calls \
         spread over the requests):\n\n\
         | request headers | response headers | log + delete | log lines | ticks (spread) | total |\n\
         |---:|---:|---:|---:|---:|---:|\n\
         | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | **{:.2}** |",
        mean.requests,
        mean.ticks,
        mean.per_request(c.request),
        mean.per_request(c.response),
        mean.per_request(c.end),
        mean.per_request(c.log_lines),
        mean.per_request(mean.tick_crossings),
        mean.total(),
    );
    md.push_str(
        "\nThe same workload counted in wasmtime on `sluice.wasm` is in `wasmtime-crossings.md` \
         (its host-call rows, module → host, split by callback as here).\n\n\
         Reading the rows: the common path is one read of every request header and one clock \
         read at the request headers, and nothing else there: stable is the route table's \
         default (`stable_by_default`), so no steering header is written and no route \
         re-selected; the route's retry policy stands (`retry.mode: \"route\"`), so no retry \
         header is written; the retries come from the worker's lease on the budget (its \
         renewal, about once a second, and the deposits and held settlements written on the \
         tick are in the ticks column). At the response headers one read of every response \
         header gives the status and the router's `x-envoy-attempt-count` \
         (`attempt_count_in_response`); nothing at the log (a 2xx is a success without the \
         response flags). The flags are read only when no status came, or one neither 2xx \
         nor failing, and for gRPC after a code that is neither OK nor failing, or none. A \
         trailers-only gRPC answer's code comes with the response headers; a code in the \
         trailers is `response.grpc_status` at the log. A canary request writes the steering \
         header and clears the route cache; it reads the clock at the log only when its \
         service has a rollout (the gate books it). A request with no response headers reads \
         the clock twice at the log (its duration, then the breaker write). The variant rows \
         turn one lever off at a time, and the last row is the config this file measured \
         before (`benches/config/sluice-headers.json`), on today's engine.\n",
    );
    md
}
