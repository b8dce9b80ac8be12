//! Soak test: a real Envoy (`--concurrency 2`, listener from file-based LDS)
//! running Sluice, a stable and a canary upstream that fail and answer slowly
//! now and then, keep-alive clients sending a mix of users and cohorts, and a
//! config push every few seconds (weights alternating, one invalid push in
//! the middle that Envoy must reject while the previous config keeps
//! serving).
//!
//! ```text
//! sluice-soak [--requests 1000000] [--clients 8] [--push-every-s 10]
//!             [--max-seconds 3600] [--rss-slack-mib 16] [--warmup 0.2]
//!             [--sample-every-s 2] [--keep-logs] [--pid-file PATH]
//! ```
//!
//! `--pid-file` receives Envoy's process id while it runs (removed at the
//! end), so that a wrapper (scripts/soak.sh) can stop it if this process is
//! killed.
//!
//! The invalid push comes at the first push past half the requests (after at
//! least one valid one), so a short run needs a short `--push-every-s`: at
//! about 3000 requests a second, `--requests 50000 --push-every-s 3`.
//!
//! It reports the Envoy process's resident memory (`VmRSS` of
//! `/proc/<pid>/status`, sampled every `--sample-every-s`) at the start,
//! after warm-up (`--warmup` of the requests sent and at least one push
//! applied) and at the end; the requests that failed because of the filter;
//! and the filter's log lines at error level.
//!
//! A request FAILED BECAUSE OF THE FILTER when
//! - the client got no response (connection error or time-out), or
//! - the response did not come from an upstream (no `x-upstream`) and is not
//!   the documented local 503 of an open stable breaker
//!   (`x-sluice-breaker: open`), or
//! - it came from an upstream the config does not name (the `admin_secret`
//!   cluster Envoy has: some clients forge the steering header to reach it),
//!   or
//! - it went to the canary though its `x-canary: never` rule says stable.
//!
//! An upstream's own failure (its 503 after the retries Sluice granted) is
//! not the filter's and is counted apart. Exit status 0 when nothing failed
//! because of the filter, no request reached an unconfigured cluster, the
//! RSS grew by at most `--rss-slack-mib` after warm-up, every valid push was
//! accepted and the invalid one rejected, no VM was reloaded, and Envoy's log
//! has no wasm error other than the invalid push's refusal; 1 otherwise; 2
//! on a usage error.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_envoy::envoy::EnvoyOptions;
use sluice_envoy::lds::{LdsEnvoy, PushOutcome};
use sluice_envoy::{Client, EnvoyConfig, Response, Upstream};

const USAGE: &str = "usage: sluice-soak [--requests N] [--clients N] [--push-every-s S] \
[--max-seconds S] [--rss-slack-mib M] [--warmup FRACTION] [--sample-every-s S] [--keep-logs] \
[--pid-file PATH]";

/// Failures and slow answers of the upstreams.
const STABLE_FAIL_RATE: f64 = 0.01;
const CANARY_FAIL_RATE: f64 = 0.02;
const SLOW_RATE: f64 = 0.01;
const SLOW_DELAY: Duration = Duration::from_millis(200);
/// Weights of the valid pushes, in turn.
const WEIGHTS: [f64; 2] = [10.0, 30.0];
/// Old listeners (and the connections on them) drain this fast after a push.
const DRAIN_TIME_S: u64 = 2;

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
const DESKTOP: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";

#[derive(Debug, Clone)]
struct Opts {
    requests: u64,
    clients: usize,
    push_every: Duration,
    max_duration: Duration,
    rss_slack_mib: f64,
    warmup: f64,
    sample_every: Duration,
    keep_logs: bool,
    pid_file: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        requests: 1_000_000,
        clients: 8,
        push_every: Duration::from_secs(10),
        max_duration: Duration::from_secs(3_600),
        rss_slack_mib: 16.0,
        warmup: 0.2,
        sample_every: Duration::from_secs(2),
        keep_logs: false,
        pid_file: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--keep-logs" {
            o.keep_logs = true;
            continue;
        }
        if arg == "-h" || arg == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number = |v: &str| -> Result<f64, String> {
            v.replace('_', "")
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| format!("{arg}: not a number: {v}"))
        };
        match arg.as_str() {
            "--requests" => o.requests = number(&value)? as u64,
            "--clients" => o.clients = (number(&value)? as usize).max(1),
            "--push-every-s" => o.push_every = Duration::from_secs_f64(number(&value)?.max(0.5)),
            "--max-seconds" => o.max_duration = Duration::from_secs_f64(number(&value)?),
            "--rss-slack-mib" => o.rss_slack_mib = number(&value)?,
            "--warmup" => o.warmup = number(&value)?.min(0.9),
            "--pid-file" => o.pid_file = Some(value.into()),
            "--sample-every-s" => {
                o.sample_every = Duration::from_secs_f64(number(&value)?.max(0.1))
            }
            _ => return Err(format!("unknown option {arg}")),
        }
    }
    if o.requests == 0 {
        return Err("--requests must be at least 1".into());
    }
    Ok(o)
}

/// Sluice's config: one service with rules, sticky users, retry and
/// breakers. Pushes change only the weight, so breaker and budget state
/// carries over as in production.
fn sluice_config(weight: f64) -> String {
    json!({
        "steering_header": "x-sluice-cluster",
        "services": [{
            "name": "shop",
            "match": {"authority": "shop.local", "path_prefix": "/"},
            "stable": "shop_v1",
            "canary": "shop_v2",
            "weight": weight,
            "sticky": {"header": "x-user-id"},
            "rules": [
                {"header": "x-canary", "equals": "always", "to": "canary"},
                {"header": "x-canary", "equals": "never", "to": "stable"},
                {"cookie": "beta", "equals": "yes", "to": "canary"},
                {"device": "mobile", "weight": 50}
            ],
            "retry": {
                "max_retries": 2,
                "retry_on": "5xx,reset,connect-failure,refused-stream",
                "per_try_timeout_ms": 1000,
                "timeout_ms": 5000,
                "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10}
            },
            "breaker": {
                "window_s": 10, "min_requests": 50, "failure_rate": 0.5,
                "consecutive_failures": 20, "open_ms": 2000, "max_open_ms": 10000
            }
        }]
    })
    .to_string()
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A small xorshift generator: the load mix, per client thread.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1_000 < per_mille
    }
}

/// Latency buckets (upper bounds, ms); the last catches the rest.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000];

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    done: AtomicU64,
    stable_ok: AtomicU64,
    canary_ok: AtomicU64,
    unmatched_ok: AtomicU64,
    upstream_error: AtomicU64,
    breaker_503: AtomicU64,
    filter_failures: AtomicU64,
    latency: [AtomicU64; BUCKETS_MS.len() + 1],
    /// Filter failures by kind, with one example each.
    failures: Mutex<BTreeMap<String, (u64, String)>>,
}

impl Tally {
    fn fail(&self, kind: String, example: String) {
        self.filter_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failures) = self.failures.lock() {
            let entry = failures.entry(kind).or_insert((0, example));
            entry.0 += 1;
        }
    }

    fn latency_quantile(&self, q: f64) -> String {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let wanted = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= wanted.max(1) {
                return match BUCKETS_MS.get(index) {
                    Some(ms) => format!("<= {ms} ms"),
                    None => format!("> {} ms", BUCKETS_MS.last().copied().unwrap_or(0)),
                };
            }
        }
        "-".into()
    }
}

/// What a client sends: a user, sometimes in a cohort, sometimes hostile.
struct Request {
    host: &'static str,
    headers: Vec<(&'static str, String)>,
    never: bool,
}

fn next_request(rng: &mut Rng) -> Request {
    let user = format!("user-{}", rng.next() % 20_000);
    let mut headers = vec![("x-user-id", user)];
    let mut never = false;
    let mut host = "shop.local";
    let roll = rng.next() % 1_000;
    match roll {
        0..=29 => headers.push(("x-canary", "always".into())),
        30..=49 => {
            headers.push(("x-canary", "never".into()));
            never = true;
        }
        50..=69 => headers.push(("cookie", "theme=dark; beta=yes".into())),
        70..=74 => host = "other.local",
        _ => {}
    }
    let agent = if rng.chance(100) { IPHONE } else { DESKTOP };
    headers.push(("user-agent", agent.into()));
    // Clients that try to steer or to raise their retries.
    if rng.chance(10) {
        headers.push(("x-sluice-cluster", "admin_secret".into()));
    }
    if rng.chance(10) {
        headers.push(("x-envoy-max-retries", "10".into()));
        headers.push(("x-envoy-upstream-rq-timeout-ms", "600000".into()));
    }
    Request {
        host,
        headers,
        never,
    }
}

fn classify(tally: &Tally, request: &Request, outcome: Result<Response, std::io::Error>) {
    let response = match outcome {
        Ok(response) => response,
        Err(e) => {
            tally.fail(format!("connection error: {:?}", e.kind()), e.to_string());
            return;
        }
    };
    match response.upstream() {
        Some("stable") if response.status == 200 => {
            let counter = if request.host == "shop.local" {
                &tally.stable_ok
            } else {
                &tally.unmatched_ok
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Some("canary") if request.never => tally.fail(
            "x-canary: never answered by the canary".into(),
            format!("{} {:?}", request.host, request.headers),
        ),
        Some("canary") if response.status == 200 => {
            tally.canary_ok.fetch_add(1, Ordering::Relaxed);
        }
        Some("stable" | "canary") => {
            tally.upstream_error.fetch_add(1, Ordering::Relaxed);
        }
        Some(other) => tally.fail(
            format!("reached unconfigured upstream {other}"),
            format!("{} {:?}", request.host, request.headers),
        ),
        None if response.status == 503 && response.header("x-sluice-breaker") == Some("open") => {
            tally.breaker_503.fetch_add(1, Ordering::Relaxed);
        }
        None => {
            let body = response.body_text();
            let first = body
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect::<String>();
            tally.fail(
                format!("{} not from an upstream: {first}", response.status),
                format!("{} {:?}", request.host, request.headers),
            );
        }
    }
}

fn client_loop(port: u16, seed: u64, tally: &Tally, opts: &Opts, stop: &AtomicBool) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut client = Client::new(addr).with_timeout(Duration::from_secs(10));
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        if tally.sent.fetch_add(1, Ordering::Relaxed) >= opts.requests {
            break;
        }
        let request = next_request(&mut rng);
        let headers: Vec<(&str, &str)> = request
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let began = Instant::now();
        let outcome = client.get(request.host, "/", &headers);
        let ms = began.elapsed().as_millis() as u64;
        let bucket = BUCKETS_MS
            .iter()
            .position(|&bound| ms <= bound)
            .unwrap_or(BUCKETS_MS.len());
        if let Some(counter) = tally.latency.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        classify(tally, &request, outcome);
        tally.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// One RSS sample.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    done: u64,
    rss_kib: u64,
}

/// Lines of Envoy's log that are wasm errors, split into the expected
/// refusal of the invalid push and everything else.
fn scan_log(log: &str) -> (Vec<String>, Vec<String>, usize) {
    let mut expected = Vec::new();
    let mut unexpected = Vec::new();
    let mut warnings = 0;
    for line in log.lines() {
        let lower = line.to_ascii_lowercase();
        let error_level = line.contains("][error][") || line.contains("][critical][");
        let wasm = lower.contains("wasm");
        if line.contains("wasm log") && line.contains("][warning][") {
            warnings += 1;
        }
        if lower.contains("panicked") || (error_level && wasm) {
            // What Envoy 1.40 logs when a pushed config is refused: Sluice's
            // line, then Envoy's own: the base VM failed to configure, the
            // plugin failed to load, and "fail closed failed to load" once
            // per thread (main and each worker) that tried the new listener.
            let refusal = line.contains("sluice: config refused")
                || line.contains("Wasm VM failed Failed to configure base Wasm plugin")
                || line.contains("Plugin sluice failed to load")
                || line.contains("Plugin configured to fail closed failed to load");
            if refusal {
                expected.push(line.to_string());
            } else {
                unexpected.push(line.to_string());
            }
        }
    }
    (expected, unexpected, warnings)
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("sluice-soak: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = run(&opts);
    // Envoy was stopped when `run` returned (its handle dropped).
    if let Some(path) = &opts.pid_file {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sluice-soak: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Opts) -> Result<bool, String> {
    let wasm = sluice_envoy::require_wasm()?;
    let io = |e: std::io::Error| e.to_string();
    let stable = Upstream::start("stable").map_err(io)?;
    let canary = Upstream::start("canary").map_err(io)?;
    let secret = Upstream::start("admin_secret").map_err(io)?;
    for upstream in [&stable, &canary, &secret] {
        upstream.set_record_limit(0);
    }
    stable.set_fail_rate(STABLE_FAIL_RATE);
    canary.set_fail_rate(CANARY_FAIL_RATE);
    stable.set_slow_rate(SLOW_RATE, SLOW_DELAY);
    canary.set_slow_rate(SLOW_RATE, SLOW_DELAY);

    let config = EnvoyConfig::new(sluice_config(WEIGHTS[0]))
        .wasm(&wasm)
        .upstream("shop_v1", &stable)
        .upstream("shop_v2", &canary)
        .upstream("admin_secret", &secret)
        .route_timeout(Duration::from_secs(10));
    let options = EnvoyOptions {
        extra_args: vec!["--drain-time-s".into(), DRAIN_TIME_S.to_string()],
        ..EnvoyOptions::default()
    };
    let mut proxy = LdsEnvoy::start(&config, &options).map_err(|e| e.to_string())?;
    if opts.keep_logs {
        proxy.envoy.keep_run_dir();
    }
    let pid = proxy.envoy.pid();
    if let Some(path) = &opts.pid_file {
        std::fs::write(path, format!("{pid}\n")).map_err(io)?;
    }
    let port = proxy.listener_port();
    let vms_at_start = proxy
        .envoy
        .stat("wasm.envoy.wasm.runtime.v8.created")
        .map_err(io)?
        .unwrap_or(0);
    let vms_active_at_start = proxy
        .envoy
        .stat("wasm.envoy.wasm.runtime.v8.active")
        .map_err(io)?
        .unwrap_or(0);
    let rss_start = rss_kib(pid).ok_or("cannot read Envoy's VmRSS")?;
    eprintln!(
        "sluice-soak: Envoy pid {pid} on 127.0.0.1:{port} (log {}), RSS {:.1} MiB; \
         {} requests, {} clients, a push every {:?}",
        proxy.envoy.log_path().display(),
        mib(rss_start),
        opts.requests,
        opts.clients,
        opts.push_every
    );

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(vec![Sample {
        at: Duration::ZERO,
        done: 0,
        rss_kib: rss_start,
    }]));

    let clients: Vec<_> = (0..opts.clients)
        .map(|index| {
            let (tally, stop, opts) = (tally.clone(), stop.clone(), opts.clone());
            thread::spawn(move || {
                let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(index as u64 + 1);
                client_loop(port, seed, &tally, &opts, &stop);
            })
        })
        .collect();
    let sampler = {
        let (tally, stop, samples) = (tally.clone(), stop.clone(), samples.clone());
        let every = opts.sample_every;
        thread::spawn(move || {
            let mut next = began + every;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    next += every;
                    if let (Some(rss), Ok(mut samples)) = (rss_kib(pid), samples.lock()) {
                        samples.push(Sample {
                            at: began.elapsed(),
                            done: tally.done.load(Ordering::Relaxed),
                            rss_kib: rss,
                        });
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    // Pushes until the clients are done: the weights in turn, and once, past
    // half the requests, an invalid config that must be refused.
    let mut accepted = 0u64;
    let mut wrongly_rejected = 0u64;
    let mut invalid_push: Option<PushOutcome> = None;
    let mut warm: Option<Sample> = None;
    let mut next_push = began + opts.push_every;
    let mut next_progress = began + Duration::from_secs(10);
    let mut timed_out = false;
    let mut push_index = 0usize;
    loop {
        let done = tally.done.load(Ordering::Relaxed);
        if done >= opts.requests || clients.iter().all(|c| c.is_finished()) {
            break;
        }
        if began.elapsed() > opts.max_duration {
            timed_out = true;
            break;
        }
        let now = Instant::now();
        if warm.is_none() && done as f64 >= opts.warmup * opts.requests as f64 && accepted >= 1 {
            if let Some(rss) = rss_kib(pid) {
                warm = Some(Sample {
                    at: began.elapsed(),
                    done,
                    rss_kib: rss,
                });
            }
        }
        if now >= next_push {
            let invalid = invalid_push.is_none() && accepted >= 1 && done * 2 >= opts.requests;
            let json = if invalid {
                sluice_config(150.0)
            } else {
                push_index += 1;
                sluice_config(
                    WEIGHTS
                        .get(push_index % WEIGHTS.len())
                        .copied()
                        .unwrap_or(10.0),
                )
            };
            match proxy.push(&json) {
                Ok(outcome) if invalid => invalid_push = Some(outcome),
                Ok(PushOutcome::Accepted) => accepted += 1,
                Ok(PushOutcome::Rejected) => wrongly_rejected += 1,
                Err(e) => return Err(format!("push failed: {e}")),
            }
            next_push = Instant::now() + opts.push_every;
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(10);
            let elapsed = began.elapsed().as_secs_f64();
            eprintln!(
                "sluice-soak: {:>6.0} s  {done:>9} requests ({:.0}/s)  RSS {:.1} MiB  \
                 pushes {accepted}  filter failures {}",
                elapsed,
                done as f64 / elapsed,
                rss_kib(pid).map(mib).unwrap_or(0.0),
                tally.filter_failures.load(Ordering::Relaxed)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    let elapsed = began.elapsed();
    let _ = sampler.join();
    // A last sample once the traffic stopped and the drains finished.
    thread::sleep(Duration::from_secs(DRAIN_TIME_S + 1));
    let rss_end = rss_kib(pid).ok_or("cannot read Envoy's VmRSS")?;
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();

    // ---- the report -------------------------------------------------------
    let done = tally.done.load(Ordering::Relaxed);
    // The filter's counters reach the stats on its tick.
    proxy.envoy.await_sluice_tick();
    let stats = proxy.envoy.stats().map_err(io)?;
    let stat = |name: &str| stats.get(name).copied().unwrap_or(0);
    let metric = |name: &str| stat(&format!("wasmcustom.sluice.shop.{name}"));
    let log = proxy.envoy.log();
    let (expected_lines, error_lines, warnings) = scan_log(&log);
    let filter_failures = tally.filter_failures.load(Ordering::Relaxed);
    let reloads = stat("wasm.sluice.vm_reload")
        + stat("wasm.sluice.vm_reload_failure")
        + stat("wasm.sluice.vm_reload_success");
    let vms_created = stat("wasm.envoy.wasm.runtime.v8.created");
    let vms_active = stat("wasm.envoy.wasm.runtime.v8.active");

    println!("\n==== sluice-soak report ====");
    println!(
        "requests: {done} of {} in {:.1} s ({:.0} req/s) over {} keep-alive clients{}",
        opts.requests,
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        opts.clients,
        if timed_out {
            " (STOPPED at --max-seconds)"
        } else {
            ""
        }
    );
    println!(
        "upstreams: stable fails {:.0}%, canary {:.0}%, {:.0}% of answers {} ms late; \
         attempts stable {} (failed {}), canary {} (failed {}), admin_secret {}",
        STABLE_FAIL_RATE * 100.0,
        CANARY_FAIL_RATE * 100.0,
        SLOW_RATE * 100.0,
        SLOW_DELAY.as_millis(),
        stable.requests(),
        stable.failed(),
        canary.requests(),
        canary.failed(),
        secret.requests()
    );
    println!(
        "outcomes: 200 from stable {}, from canary {}, unmatched host (fallback route) {}; \
         5xx from an upstream (after the retries Sluice granted; unmatched: none) {}; \
         open-breaker 503 {}",
        tally.stable_ok.load(Ordering::Relaxed),
        tally.canary_ok.load(Ordering::Relaxed),
        tally.unmatched_ok.load(Ordering::Relaxed),
        tally.upstream_error.load(Ordering::Relaxed),
        tally.breaker_503.load(Ordering::Relaxed)
    );
    println!(
        "latency: p50 {}, p99 {}, p99.9 {}, max bucket {}",
        tally.latency_quantile(0.5),
        tally.latency_quantile(0.99),
        tally.latency_quantile(0.999),
        tally.latency_quantile(1.0)
    );
    println!("FAILED BECAUSE OF THE FILTER: {filter_failures}");
    if let Ok(failures) = tally.failures.lock() {
        for (kind, (count, example)) in failures.iter() {
            println!("  {count:>8}  {kind}   e.g. {example}");
        }
    }
    println!(
        "config pushes: {accepted} accepted, {wrongly_rejected} valid ones rejected; \
         the invalid one: {invalid_push:?}"
    );
    println!(
        "filter metrics: routed stable {}, canary {}; retries granted {}, denied {}; \
         breaker trips stable {}, canary {}; unmatched {}",
        metric("routed.stable"),
        metric("routed.canary"),
        metric("retry.granted"),
        metric("retry.denied"),
        metric("breaker.stable.trips"),
        metric("breaker.canary.trips"),
        stat("wasmcustom.sluice.unmatched")
    );
    println!(
        "envoy: retries stable {} (overflow {}), canary {} (overflow {}); wasm VMs created {} \
         (at start {vms_at_start}), active {vms_active} (at start {vms_active_at_start}), \
         reloads {reloads}",
        stat("cluster.shop_v1.upstream_rq_retry"),
        stat("cluster.shop_v1.upstream_rq_retry_overflow"),
        stat("cluster.shop_v2.upstream_rq_retry"),
        stat("cluster.shop_v2.upstream_rq_retry_overflow"),
        vms_created
    );
    let after_warm: Vec<&Sample> = match warm {
        Some(w) => samples.iter().filter(|s| s.at >= w.at).collect(),
        None => Vec::new(),
    };
    let max_after = after_warm
        .iter()
        .map(|s| s.rss_kib)
        .chain([rss_end])
        .max()
        .unwrap_or(rss_end);
    let growth_mib = warm.map(|w| mib(rss_end) - mib(w.rss_kib));
    // Least-squares slope of RSS over requests after warm-up, per 100k.
    let slope = {
        let n = after_warm.len() as f64;
        if n >= 3.0 {
            let mx = after_warm.iter().map(|s| s.done as f64).sum::<f64>() / n;
            let my = after_warm.iter().map(|s| mib(s.rss_kib)).sum::<f64>() / n;
            let sxy: f64 = after_warm
                .iter()
                .map(|s| (s.done as f64 - mx) * (mib(s.rss_kib) - my))
                .sum();
            let sxx: f64 = after_warm
                .iter()
                .map(|s| (s.done as f64 - mx).powi(2))
                .sum();
            (sxx > 0.0).then(|| sxy / sxx * 100_000.0)
        } else {
            None
        }
    };
    match warm {
        Some(w) => println!(
            "Envoy RSS: start {:.1} MiB; after warm-up ({:.0} s, {} requests) {:.1} MiB; \
             end {:.1} MiB; max after warm-up {:.1} MiB; growth after warm-up {:+.1} MiB \
             (allowed {:.0}); trend {} ({} samples)",
            mib(rss_start),
            w.at.as_secs_f64(),
            w.done,
            mib(w.rss_kib),
            mib(rss_end),
            mib(max_after),
            growth_mib.unwrap_or(0.0),
            opts.rss_slack_mib,
            slope
                .map(|s| format!("{s:+.2} MiB per 100k requests"))
                .unwrap_or_else(|| "-".into()),
            after_warm.len()
        ),
        None => println!(
            "Envoy RSS: start {:.1} MiB, end {:.1} MiB; no warm-up point (too few requests \
             or no accepted push)",
            mib(rss_start),
            mib(rss_end)
        ),
    }
    println!(
        "filter logs: {} wasm error lines besides the refusal of the invalid push ({} lines); \
         {warnings} filter warnings (breaker changes, budget running dry)",
        error_lines.len(),
        expected_lines.len()
    );
    for line in error_lines.iter().take(10) {
        println!("  {line}");
    }

    let mut problems = Vec::new();
    if timed_out || done < opts.requests {
        problems.push(format!("only {done} of {} requests sent", opts.requests));
    }
    if filter_failures > 0 {
        problems.push(format!(
            "{filter_failures} requests failed because of the filter"
        ));
    }
    if secret.requests() > 0 {
        problems.push("a request reached the unconfigured cluster admin_secret".into());
    }
    if wrongly_rejected > 0 {
        problems.push(format!("{wrongly_rejected} valid pushes rejected"));
    }
    match invalid_push {
        Some(PushOutcome::Rejected) => {}
        Some(PushOutcome::Accepted) => problems.push("the invalid push was accepted".into()),
        None => problems.push(
            "the invalid push never happened: the run was too short for --push-every-s \
             (it comes at the first push past half the requests, after a valid one)"
                .into(),
        ),
    }
    let refusals = expected_lines
        .iter()
        .filter(|line| line.contains("sluice: config refused"))
        .count();
    if invalid_push == Some(PushOutcome::Rejected) && refusals != 1 {
        problems.push(format!(
            "the invalid push was refused with {refusals} lines of Sluice's (want 1)"
        ));
    }
    // Sluice's line, two of Envoy's, and one per thread (main + 2 workers).
    if expected_lines.len() > 6 * refusals {
        problems.push(format!(
            "{} wasm load failures logged for {refusals} refused push",
            expected_lines.len()
        ));
    }
    if !error_lines.is_empty() {
        problems.push(format!(
            "{} wasm error lines in Envoy's log",
            error_lines.len()
        ));
    }
    if reloads > 0 {
        problems.push(format!("{reloads} wasm VM reloads"));
    }
    match growth_mib {
        Some(growth) if growth > opts.rss_slack_mib => problems.push(format!(
            "Envoy's RSS grew by {growth:.1} MiB after warm-up (allowed {:.0})",
            opts.rss_slack_mib
        )),
        Some(_) => {}
        None => problems.push("no RSS after warm-up to compare with".into()),
    }
    if problems.is_empty() {
        println!("result: PASS");
        Ok(true)
    } else {
        proxy.envoy.keep_run_dir();
        println!(
            "result: FAIL: {}\n(Envoy's log kept in {})",
            problems.join("; "),
            proxy.envoy.run_dir().display()
        );
        Ok(false)
    }
}
