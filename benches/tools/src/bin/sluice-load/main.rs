//! `sluice-load`: Sluice under load in a real Envoy, against the ceiling
//! (no filter), the Wasm floor (a pass-through module), Envoy's native
//! equivalent and a Lua filter. Run it through `benches/load.sh`, which
//! builds what it needs; `--help` lists the options.
//!
//! One run: start a fast upstream (an Envoy answering with
//! `direct_response`, or the harness's upstream), validate and start one
//! Envoy per setup (`--concurrency 1`), smoke-check that each routes as it
//! should, measure the upstream alone, warm every setup up, then run wrk
//! against the setups in alternating rounds (the order rotates every round,
//! so slow drifts of the machine hit every setup alike). Afterwards: the
//! resident memory of every Envoy, its heap (admin `/memory`) and Wasm
//! stats. Writes `<out>/load-<stamp>.md` and `<out>/load-<stamp>.svg`;
//! configs, logs and raw wrk output stay in `target/sluice-load/<stamp>/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod callgrind;
mod chart;
mod setups;

use setups::{Inputs, Setup};
use sluice_benches::workload::{
    self, request_headers, user, HEADERS_CONFIG, HOST, REALISTIC_CONFIG, USERS,
};
use sluice_envoy::{Client, Envoy, EnvoyOptions, Upstream};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const USAGE: &str = "sluice-load: Envoy load comparison (see benches/README.md)

options:
  --rounds N          alternating rounds (default 3)
  --duration S        seconds per wrk run (default 10)
  --warmup S          seconds of unmeasured load per setup before round 1 (default 3)
  --connections N     wrk connections, fixed (default 16)
  --threads N         wrk threads (default 1)
  --setups a,b,...    any of ceiling,passthrough,sluice,native,lua (the default set),
                      sluice-split,sluice-noretry (Sluice with parts removed, to price them)
                      and passthrough-raw (pass-through without the SDK's extra callbacks)
                      and sluice-baseline (Sluice from $SLUICE_BASELINE_WASM, config from
                      $SLUICE_BASELINE_CONFIG or the realistic one: A/B of a build),
                      sluice-steer-all (steering header on every request) and
                      sluice-headers (benches/config/sluice-headers.json: retry headers too)
  --upstream KIND     envoy (direct_response, default) or harness (sluice-envoy's Upstream)
  --response-bytes N  the upstream's response body in bytes (default 3: ok and a newline);
                      envoy upstream only (body chunks per response: benches/README.md)
  --pin               pin the proxies to CPU 1, wrk and the upstream to CPU 0 (taskset)
  --wait-idle S       wait up to S seconds for a 1-minute load average below 0.5
  --quick             smoke run: 1 round of 2 s, 1 s warm-up, 8 connections
  --count-crossings N instead of loading: run each Wasm setup's module in its crossing-logging
                      copy (sluice-instrument) in Envoy with wasm:trace, send N realistic requests
                      one by one, and report the crossings Envoy made per request
                      (envoy-crossings-<stamp>.md)
  --count-instructions N
                      instead of loading: run Envoy under valgrind's callgrind for each setup, send
                      N/2 requests to warm up then N counted ones, one by one, and report the
                      instructions per request, by where they ran (envoy-instructions-<stamp>.md);
                      --rounds repeats the whole sequence (default 1 here)
  --out DIR           where the report goes (default benches/results)
  --stamp TEXT        file name stamp (default: UTC date and time)
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpstreamKind {
    Envoy,
    Harness,
}

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    duration: u64,
    warmup: u64,
    connections: usize,
    threads: usize,
    setups: Vec<Setup>,
    upstream: UpstreamKind,
    /// The upstream's response body size (`None`: `ok\n`).
    response_bytes: Option<usize>,
    pin: bool,
    wait_idle: u64,
    quick: bool,
    out: PathBuf,
    stamp: String,
    /// Count crossings in Envoy over this many requests instead of loading.
    count_crossings: Option<usize>,
    /// Count instructions (callgrind) over this many requests instead.
    count_instructions: Option<usize>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        rounds: 3,
        duration: 10,
        warmup: 3,
        connections: 16,
        threads: 1,
        setups: Setup::ALL.to_vec(),
        upstream: UpstreamKind::Envoy,
        response_bytes: None,
        pin: false,
        wait_idle: 0,
        quick: false,
        out: workload::repo_root().join("benches/results"),
        stamp: utc_stamp(),
        count_crossings: None,
        count_instructions: None,
    };
    let mut args = std::env::args().skip(1);
    let mut explicit = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |text: String| text.parse::<u64>().map_err(|e| format!("{text}: {e}"));
        match arg.as_str() {
            "--rounds" => options.rounds = number(value("--rounds")?)? as usize,
            "--duration" => options.duration = number(value("--duration")?)?,
            "--warmup" => options.warmup = number(value("--warmup")?)?,
            "--connections" => options.connections = number(value("--connections")?)? as usize,
            "--threads" => options.threads = number(value("--threads")?)? as usize,
            "--wait-idle" => options.wait_idle = number(value("--wait-idle")?)?,
            "--setups" => {
                options.setups = value("--setups")?
                    .split(',')
                    .map(|name| Setup::parse(name.trim()).ok_or(format!("unknown setup {name}")))
                    .collect::<Result<_, _>>()?;
            }
            "--upstream" => {
                options.upstream = match value("--upstream")?.as_str() {
                    "envoy" => UpstreamKind::Envoy,
                    "harness" => UpstreamKind::Harness,
                    other => return Err(format!("unknown upstream {other}")),
                }
            }
            "--response-bytes" => {
                options.response_bytes = Some(number(value("--response-bytes")?)? as usize);
            }
            "--count-crossings" => {
                options.count_crossings = Some(number(value("--count-crossings")?)? as usize);
            }
            "--count-instructions" => {
                options.count_instructions = Some(number(value("--count-instructions")?)? as usize);
            }
            "--pin" => options.pin = true,
            "--quick" => options.quick = true,
            "--out" => options.out = PathBuf::from(value("--out")?),
            "--stamp" => options.stamp = value("--stamp")?,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other}\n\n{USAGE}")),
        }
        explicit.push(arg);
    }
    let given = |name: &str| explicit.iter().any(|a| a == name);
    if options.count_instructions.is_some() && !given("--rounds") {
        options.rounds = 1;
    }
    if options.quick {
        if !given("--rounds") {
            options.rounds = 1;
        }
        if !given("--duration") {
            options.duration = 2;
        }
        if !given("--warmup") {
            options.warmup = 1;
        }
        if !given("--connections") {
            options.connections = 8;
        }
    }
    if options.rounds == 0 || options.duration == 0 || options.setups.is_empty() {
        return Err("rounds, duration and setups must not be zero/empty".into());
    }
    if options.response_bytes.is_some() && options.upstream != UpstreamKind::Envoy {
        return Err(
            "--response-bytes needs the envoy upstream (the harness's body is fixed)".into(),
        );
    }
    Ok(options)
}

/// `YYYY-MM-DDTHHMMZ` from the system clock (UTC), without a date crate.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (hour, minute) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}{minute:02}Z")
}

// ---------------------------------------------------------------- machine

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let get = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    match (get(14), get(15)) {
        (Some(user), Some(system)) => (user + system) / ticks,
        _ => f64::NAN,
    }
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':').map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    format!("{cores} × {cpu}, Linux {kernel}")
}

fn pin(pid: u32, cpu: u32) {
    let status = Command::new("taskset")
        .args(["-a", "-c", "-p", &cpu.to_string(), &pid.to_string()])
        .output();
    if !matches!(status, Ok(ref out) if out.status.success()) {
        eprintln!("sluice-load: could not pin pid {pid} to CPU {cpu} (taskset)");
    }
}

// ---------------------------------------------------------------- upstream

enum UpstreamProcess {
    Envoy(Envoy),
    Harness(Upstream, Upstream),
}

impl UpstreamProcess {
    fn start(kind: UpstreamKind, body: &str) -> Result<UpstreamProcess, String> {
        match kind {
            UpstreamKind::Envoy => {
                let yaml = setups::upstream_yaml(body);
                check_valid("upstream", &yaml)?;
                let envoy = Envoy::start_yaml(&yaml, &envoy_options())
                    .map_err(|e| format!("upstream Envoy: {e}"))?;
                Ok(UpstreamProcess::Envoy(envoy))
            }
            UpstreamKind::Harness => {
                let v1 = Upstream::start("v1").map_err(|e| e.to_string())?;
                let v2 = Upstream::start("v2").map_err(|e| e.to_string())?;
                v1.set_record_limit(0);
                v2.set_record_limit(0);
                Ok(UpstreamProcess::Harness(v1, v2))
            }
        }
    }

    fn ports(&self) -> Result<(u16, u16), String> {
        match self {
            UpstreamProcess::Harness(v1, v2) => Ok((v1.port(), v2.port())),
            UpstreamProcess::Envoy(envoy) => {
                let response = envoy
                    .admin_get("/listeners?format=json")
                    .map_err(|e| e.to_string())?;
                let value: serde_json::Value =
                    serde_json::from_slice(&response.body).map_err(|e| e.to_string())?;
                let port = |name: &str| {
                    value["listener_statuses"]
                        .as_array()?
                        .iter()
                        .find(|l| l["name"] == name)?["local_address"]["socket_address"]
                        ["port_value"]
                        .as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                };
                match (port("upstream_v1"), port("upstream_v2")) {
                    (Some(a), Some(b)) => Ok((a, b)),
                    _ => Err(format!("upstream listeners not found in {value}")),
                }
            }
        }
    }

    /// The process whose CPU time the upstream costs.
    fn pid(&self) -> u32 {
        match self {
            UpstreamProcess::Envoy(envoy) => envoy.pid(),
            UpstreamProcess::Harness(..) => std::process::id(),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            UpstreamProcess::Envoy(_) => {
                "Envoy 1.40 (--concurrency 1) answering with direct_response on two listeners"
            }
            UpstreamProcess::Harness(..) => {
                "sluice-envoy's Upstream (thread per connection), in the sluice-load process"
            }
        }
    }
}

fn envoy_options() -> EnvoyOptions {
    EnvoyOptions {
        concurrency: 1,
        log_level: "warning".to_string(),
        ..EnvoyOptions::default()
    }
}

/// `envoy --mode validate` on a config; the error carries Envoy's output.
fn check_valid(name: &str, yaml: &str) -> Result<(), String> {
    let (status, output) = Envoy::validate_yaml(yaml, None).map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "envoy --mode validate refused the {name} config ({status}):\n{}",
            sluice_envoy::envoy::tail(&output, 30)
        ))
    }
}

// ---------------------------------------------------------------- wrk

#[derive(Debug, Clone, Default)]
struct WrkResult {
    requests: u64,
    seconds: f64,
    /// Latency percentiles, µs.
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx.
    errors: u64,
    non_2xx: u64,
}

impl WrkResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }
}

fn parse_wrk(output: &str) -> Result<WrkResult, String> {
    let line = output
        .lines()
        .find(|line| line.starts_with("SLUICE-LOAD "))
        .ok_or_else(|| format!("no result line in wrk output:\n{output}"))?;
    let fields: BTreeMap<&str, f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| {
            let (key, value) = field.split_once('=')?;
            Some((key, value.parse().ok()?))
        })
        .collect();
    let get = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| format!("wrk result without {key}: {line}"))
    };
    Ok(WrkResult {
        requests: get("requests")? as u64,
        seconds: get("duration_us")? / 1e6,
        p50: get("p50")?,
        p90: get("p90")?,
        p99: get("p99")?,
        p999: get("p999")?,
        errors: (get("connect")? + get("read")? + get("write")? + get("timeout")?) as u64,
        non_2xx: get("status")? as u64,
    })
}

struct Wrk<'a> {
    options: &'a Options,
    script: PathBuf,
    raw_dir: PathBuf,
}

impl Wrk<'_> {
    fn run(&self, addr: SocketAddr, seconds: u64, tag: &str) -> Result<WrkResult, String> {
        let mut command = if self.options.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", "wrk"]);
            c
        } else {
            Command::new("wrk")
        };
        command
            .arg(format!("-t{}", self.options.threads))
            .arg(format!("-c{}", self.options.connections))
            .arg(format!("-d{seconds}s"))
            .arg("--latency")
            .arg("-s")
            .arg(&self.script)
            .arg(format!("http://{addr}/"));
        let output = command
            .output()
            .map_err(|e| format!("running wrk: {e} (scripts/setup.sh installs it)"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let _ = std::fs::write(self.raw_dir.join(format!("wrk-{tag}.txt")), &text);
        if !output.status.success() {
            return Err(format!("wrk failed ({}):\n{text}", output.status));
        }
        parse_wrk(&text)
    }
}

// ---------------------------------------------------------------- proxies

struct Proxy {
    setup: Setup,
    envoy: Envoy,
}

/// The baseline build's config: `$SLUICE_BASELINE_CONFIG` (an older build
/// refuses keys it does not know), else the realistic one.
fn baseline_config() -> Result<String, String> {
    match std::env::var_os("SLUICE_BASELINE_CONFIG") {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("SLUICE_BASELINE_CONFIG {}: {e}", Path::new(&path).display())),
        None => Ok(REALISTIC_CONFIG.to_string()),
    }
}

/// What the setups' configs are made of: the modules (Sluice, the baseline
/// build, pass-through, raw pass-through, the probe), the baseline's config
/// and the upstream's ports.
fn inputs<'a>(modules: [&'a Path; 5], baseline_config: &'a str, ports: (u16, u16)) -> Inputs<'a> {
    let [sluice_wasm, baseline_wasm, passthrough_wasm, passthrough_raw_wasm, probe_wasm] = modules;
    Inputs {
        sluice_wasm,
        baseline_wasm,
        passthrough_wasm,
        passthrough_raw_wasm,
        probe_wasm,
        sluice_config: REALISTIC_CONFIG,
        baseline_config,
        headers_config: HEADERS_CONFIG,
        upstream_ports: ports,
    }
}

fn start_proxies(options: &Options, ports: (u16, u16), dir: &Path) -> Result<Vec<Proxy>, String> {
    let sluice_wasm = workload::sluice_wasm();
    let passthrough_wasm = workload::passthrough_wasm();
    let passthrough_raw_wasm = workload::passthrough_raw_wasm();
    let probe_wasm = workload::probe_wasm();
    for path in [&sluice_wasm, &passthrough_wasm, &probe_wasm] {
        workload::read_wasm(path)?;
    }
    if options.setups.contains(&Setup::PassthroughRaw) {
        workload::read_wasm(&passthrough_raw_wasm)?;
    }
    let baseline_wasm = match std::env::var_os("SLUICE_BASELINE_WASM") {
        Some(path) => PathBuf::from(path),
        None if options.setups.contains(&Setup::SluiceBaseline) => return Err(
            "the sluice-baseline setup needs SLUICE_BASELINE_WASM=<the other build's sluice.wasm>"
                .to_string(),
        ),
        None => sluice_wasm.clone(),
    };
    if options.setups.contains(&Setup::SluiceBaseline) {
        workload::read_wasm(&baseline_wasm)?;
    }
    let baseline_config = baseline_config()?;
    let inputs = inputs(
        [
            &sluice_wasm,
            &baseline_wasm,
            &passthrough_wasm,
            &passthrough_raw_wasm,
            &probe_wasm,
        ],
        &baseline_config,
        ports,
    );
    let mut proxies = Vec::new();
    for &setup in &options.setups {
        let yaml = setups::proxy_yaml(setup, &inputs);
        let _ = std::fs::write(dir.join(format!("{}.yaml", setup.name())), &yaml);
        check_valid(setup.name(), &yaml)?;
        let envoy = Envoy::start_yaml(&yaml, &envoy_options())
            .map_err(|e| format!("{}: {e}", setup.name()))?;
        if options.pin {
            pin(envoy.pid(), 1);
        }
        proxies.push(Proxy { setup, envoy });
    }
    Ok(proxies)
}

/// Each setup answers 200 with the upstream's whole body and routes
/// x-canary: always/never as it should.
fn smoke_check(proxy: &Proxy, expected_body: Option<usize>) -> Result<(), String> {
    let mut client = Client::new(proxy.envoy.addr()).with_timeout(Duration::from_secs(5));
    let checks = [
        ("always", if proxy.setup.steers() { "v2" } else { "v1" }),
        ("never", "v1"),
    ];
    for (canary, expected) in checks {
        let response = client
            .get(
                HOST,
                "/api/items?page=2",
                &[("x-canary", canary), ("x-user-id", "user-1")],
            )
            .map_err(|e| format!("{}: smoke request failed: {e}", proxy.setup.name()))?;
        if response.status != 200 || response.upstream() != Some(expected) {
            return Err(format!(
                "{}: x-canary: {canary} answered {} from upstream {:?}, expected 200 from {expected}\n{}",
                proxy.setup.name(),
                response.status,
                response.upstream(),
                sluice_envoy::envoy::tail(&proxy.envoy.log(), 20)
            ));
        }
        if let Some(expected) = expected_body.filter(|&n| n != response.body.len()) {
            return Err(format!(
                "{}: x-canary: {canary} answered a {}-byte body, expected {expected} bytes",
                proxy.setup.name(),
                response.body.len()
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- report

#[derive(Debug, Clone, Default)]
struct Sample {
    round: usize,
    result: WrkResult,
    /// Envoy CPU µs per request during the run.
    cpu_us: f64,
    upstream_cpu_us: f64,
    load: f64,
}

#[derive(Debug, Clone, Default)]
struct Memory {
    rss_start_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    heap_allocated: Option<u64>,
    heap_size: Option<u64>,
    wasm_stats: Vec<String>,
    sluice_metrics: Vec<String>,
    /// Connections opened and requests sent per upstream cluster: a setup
    /// that opened connections under load would pay for it in CPU.
    upstream_stats: Vec<String>,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

struct Summary {
    setup: Setup,
    rps: f64,
    rps_min: f64,
    rps_max: f64,
    p50: f64,
    p99: f64,
    p99_min: f64,
    p99_max: f64,
    cpu_us: f64,
    cpu_min: f64,
    cpu_max: f64,
    /// Median over rounds of Envoy's CPU per request over the upstream's in
    /// the same run: the upstream does the same fixed work per request
    /// whatever the setup, so the ratio cancels how fast the (shared)
    /// machine happened to be during the run.
    cpu_vs_upstream: f64,
    errors: u64,
    non_2xx: u64,
}

fn summarise(setup: Setup, samples: &[Sample]) -> Summary {
    let pick = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { samples.iter().map(f).collect() };
    let mut rps = pick(&|s| s.result.rps());
    let mut p50 = pick(&|s| s.result.p50);
    let mut p99 = pick(&|s| s.result.p99);
    let mut cpu = pick(&|s| s.cpu_us);
    let mut relative = pick(&|s| s.cpu_us / s.upstream_cpu_us.max(f64::MIN_POSITIVE));
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Summary {
        setup,
        rps_min: min(&rps),
        rps_max: max(&rps),
        p99_min: min(&p99),
        p99_max: max(&p99),
        cpu_min: min(&cpu),
        cpu_max: max(&cpu),
        rps: median(&mut rps),
        p50: median(&mut p50),
        p99: median(&mut p99),
        cpu_us: median(&mut cpu),
        cpu_vs_upstream: median(&mut relative),
        errors: samples.iter().map(|s| s.result.errors).sum(),
        non_2xx: samples.iter().map(|s| s.result.non_2xx).sum(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**MISSED**"
    }
}

struct Context {
    machine: String,
    envoy_version: String,
    upstream: String,
    upstream_alone: Option<WrkResult>,
    upstream_alone_cpu_us: f64,
    load_start: f64,
    load_end: f64,
    started: String,
    elapsed: Duration,
    raw_dir: PathBuf,
    wasm_sizes: Vec<(String, u64, String)>,
}

#[allow(clippy::too_many_lines)]
fn report(
    options: &Options,
    context: &Context,
    summaries: &[Summary],
    samples: &BTreeMap<&'static str, Vec<Sample>>,
    memory: &BTreeMap<&'static str, Memory>,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Sluice under load in Envoy — {}\n", options.stamp);
    // Only the load before the run tells about other work: during it, wrk,
    // the upstream and the proxy keep about two CPUs busy themselves.
    let busy = context.load_start >= 0.5;
    if busy {
        let _ = writeln!(
            md,
            "> **Noisy run**: the 1-minute load average was {:.2} before the run started \
             (other work on the machine). Treat these numbers as indicative and re-run \
             `bash benches/load.sh` when `uptime` shows a load below 0.5.\n",
            context.load_start
        );
    }
    if options.quick {
        md.push_str("> **Quick (smoke) run**: too short to compare setups.\n\n");
    }
    let _ = writeln!(
        md,
        "- Machine: {}\n- Envoy: {}\n- Upstream: {}\n- Load: wrk `-t{} -c{} -d{}s --latency`, \
         {} users' requests in turn (sticky key `x-user-id`), host `{HOST}`; {} round(s), \
         order rotating every round, after a {} s warm-up of every setup{}\n- Started {} \
         (UTC), took {:.0} s; 1-minute load average {:.2} before the run (must be < 0.5), \
         {:.2} at its end (this benchmark's own processes keep about 2 CPUs busy)\n- Raw wrk \
         output, configs and logs: \
         `{}`",
        context.machine,
        context.envoy_version,
        context.upstream,
        options.threads,
        options.connections,
        options.duration,
        USERS,
        options.rounds,
        options.warmup,
        if options.pin {
            "; proxies pinned to CPU 1, wrk and upstream to CPU 0"
        } else {
            ""
        },
        context.started,
        context.elapsed.as_secs_f64(),
        context.load_start,
        context.load_end,
        context.raw_dir.display(),
    );
    let _ = writeln!(
        md,
        "- Response body: {}",
        match (options.upstream, options.response_bytes) {
            (UpstreamKind::Harness, _) => "the harness upstream's own (a few bytes)".to_string(),
            (UpstreamKind::Envoy, None) => "3 bytes (`ok\\n`, the default)".to_string(),
            (UpstreamKind::Envoy, Some(n)) => format!("{n} bytes (`--response-bytes {n}`)"),
        }
    );
    let _ = writeln!(md, "- Filter code: {}", workload::filter_revision());
    for (name, size, digest) in &context.wasm_sizes {
        let _ = writeln!(
            md,
            "- `{name}`: {size} bytes ({:.1} KiB), digest {digest}",
            *size as f64 / 1024.0
        );
    }
    if let Some(alone) = &context.upstream_alone {
        let _ = writeln!(
            md,
            "- The upstream alone (wrk straight at it): {:.0} req/s, p99 {:.0} µs, {:.1} µs CPU \
             per request",
            alone.rps(),
            alone.p99,
            context.upstream_alone_cpu_us
        );
    }
    md.push_str("\n## Results (median over rounds)\n\n");
    md.push_str(
        "| setup | req/s | req/s range | × ceiling | p50 µs | p99 µs | p99 range | p99 × ceiling | Envoy CPU µs/req | CPU Δ vs pass-through | CPU ÷ upstream CPU | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ceiling = summaries.iter().find(|s| s.setup == Setup::Ceiling);
    let floor_cpu = summaries
        .iter()
        .find(|s| s.setup == Setup::Passthrough)
        .map(|s| s.cpu_us);
    for s in summaries {
        let (ratio, p99_ratio) = match ceiling {
            Some(c) => (
                format!("{:.3}", s.rps / c.rps),
                format!("{:.2}", s.p99 / c.p99),
            ),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            md,
            "| **{}** | {:.0} | {:.0}–{:.0} | {ratio} | {:.0} | {:.0} | {:.0}–{:.0} | {p99_ratio} | {:.1} ({:.1}–{:.1}) | {} | {:.2} | {} |",
            s.setup.name(),
            s.rps,
            s.rps_min,
            s.rps_max,
            s.p50,
            s.p99,
            s.p99_min,
            s.p99_max,
            s.cpu_us,
            s.cpu_min,
            s.cpu_max,
            floor_cpu.map_or("–".to_string(), |f| format!("{:+.1}", s.cpu_us - f)),
            s.cpu_vs_upstream,
            s.errors + s.non_2xx,
        );
    }
    md.push('\n');
    for setup in &options.setups {
        let _ = writeln!(md, "- **{}**: {}", setup.name(), setup.describe());
    }

    let find = |setup: Setup| summaries.iter().find(|s| s.setup == setup);
    if let (Some(sdk), Some(raw)) = (find(Setup::Passthrough), find(Setup::PassthroughRaw)) {
        let _ = writeln!(
            md,
            "\nDo-nothing module with the SDK (every callback exported) against one exporting \
             only Sluice's callbacks: {:.1} µs against {:.1} µs of Envoy CPU per request, \
             **{:+.1} µs** for the SDK's extra callbacks ({:+.1} µs scaled by the upstream's \
             CPU); throughput {:.3} × raw.",
            sdk.cpu_us,
            raw.cpu_us,
            sdk.cpu_us - raw.cpu_us,
            (sdk.cpu_vs_upstream - raw.cpu_vs_upstream) * raw.cpu_us
                / raw.cpu_vs_upstream.max(f64::MIN_POSITIVE),
            sdk.rps / raw.rps,
        );
    }
    if let (Some(sluice), Some(floor)) = (find(Setup::Sluice), find(Setup::Passthrough)) {
        let throughput = sluice.rps / floor.rps;
        let p99 = sluice.p99 / floor.p99 - 1.0;
        let _ = writeln!(
            md,
            "\n## Targets (Sluice against the pass-through Wasm module)\n\n\
             | target | measured | |\n|---|---:|---|\n\
             | throughput ≥ 0.95 × pass-through | {throughput:.3} × | {} |\n\
             | p99 within 5 % of pass-through | {:+.1} % | {} |\n",
            verdict(throughput >= 0.95),
            p99 * 100.0,
            verdict(p99 <= 0.05),
        );
        let _ = write!(
            md,
            "Envoy CPU per request: Sluice {:.1} µs, pass-through {:.1} µs: Sluice's logic and \
             host calls cost **{:+.1} µs** per request",
            sluice.cpu_us,
            floor.cpu_us,
            sluice.cpu_us - floor.cpu_us
        );
        if let Some(c) = ceiling {
            let _ = write!(
                md,
                "; the Wasm floor (a V8 VM entered six times per request) costs {:+.1} µs over \
                 no filter",
                floor.cpu_us - c.cpu_us
            );
        }
        md.push_str(".\n");
        if let Some(calls) = find(Setup::SluiceCalls) {
            // In µs at the pass-through run's machine speed: the ratio to the
            // upstream's CPU cancels how fast the machine was in each run.
            let scale = floor.cpu_us / floor.cpu_vs_upstream.max(f64::MIN_POSITIVE);
            let steady = |s: &Summary| (s.cpu_vs_upstream - floor.cpu_vs_upstream) * scale;
            let _ = writeln!(
                md,
                "\nSplit of Sluice's cost over the pass-through module, {:+.1} µs per request \
                 ({:+.1} µs scaled by the upstream's CPU, which cancels the machine's speed from \
                 run to run): **{:+.1} µs** ({:+.1} scaled) is what Envoy and the ABI charge for \
                 the host calls Sluice makes and what Envoy then does with them (route \
                 re-selection, retries armed): the `sluice-calls` setup makes exactly those calls \
                 with no policy, and reaches {:.3} × pass-through throughput, the best a \
                 proxy-wasm filter asking Envoy for the same can do. The rest, **{:+.1} µs** \
                 ({:+.1} scaled), is Sluice's own code and memory; against that floor Sluice \
                 runs at {:.3} × its throughput.",
                sluice.cpu_us - floor.cpu_us,
                steady(sluice),
                calls.cpu_us - floor.cpu_us,
                steady(calls),
                calls.rps / floor.rps,
                sluice.cpu_us - calls.cpu_us,
                steady(sluice) - steady(calls),
                sluice.rps / calls.rps,
            );
        }
        if busy {
            md.push_str(
                "\n(The machine was busy during this run: the throughput and p99 ratios above \
                 are not a verdict; CPU µs per request is the steadier measure.)\n",
            );
        }
    }

    md.push_str(
        "\n## Memory after the run\n\n\
         | setup | RSS at start | RSS after | peak RSS | heap allocated (admin /memory) | heap size |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let mib_bytes = |bytes: Option<u64>| {
        bytes.map_or("–".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
        })
    };
    for setup in &options.setups {
        if let Some(m) = memory.get(setup.name()) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                setup.name(),
                mib(m.rss_start_kib),
                mib(m.rss_kib),
                mib(m.hwm_kib),
                mib_bytes(m.heap_allocated),
                mib_bytes(m.heap_size)
            );
        }
    }
    let rss = |setup: Setup| memory.get(setup.name()).map(|m| m.rss_kib as f64 / 1024.0);
    if let (Some(s), Some(p), Some(c)) = (
        rss(Setup::Sluice),
        rss(Setup::Passthrough),
        rss(Setup::Ceiling),
    ) {
        let _ = writeln!(
            md,
            "\nResident memory with Sluice: {:+.1} MiB over no filter, {:+.1} MiB over the \
             pass-through module (one worker: two Sluice VMs, the main thread's and the \
             worker's). Sluice's linear memory per VM is measured in wasmtime \
             (`benches/results/wasmtime-crossings.md`): V8 does not export it as a stat.",
            s - c,
            s - p
        );
    }
    for setup in &options.setups {
        if let Some(m) = memory.get(setup.name()) {
            if !m.wasm_stats.is_empty()
                || !m.sluice_metrics.is_empty()
                || !m.upstream_stats.is_empty()
            {
                let _ = writeln!(md, "\n`{}` stats after the run:\n", setup.name());
                md.push_str("```\n");
                for line in m
                    .upstream_stats
                    .iter()
                    .chain(&m.wasm_stats)
                    .chain(&m.sluice_metrics)
                {
                    let _ = writeln!(md, "{line}");
                }
                md.push_str("```\n");
            }
        }
    }

    md.push_str("\n## Every run\n\n| round | setup | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | Envoy CPU µs/req | upstream CPU µs/req | load avg | errors |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut rows: Vec<(&str, &Sample)> = samples
        .iter()
        .flat_map(|(name, list)| list.iter().map(move |s| (*name, s)))
        .collect();
    rows.sort_by_key(|(_, s)| s.round);
    for (name, s) in rows {
        let _ = writeln!(
            md,
            "| {} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {} |",
            s.round + 1,
            s.result.rps(),
            s.result.p50,
            s.result.p90,
            s.result.p99,
            s.result.p999,
            s.cpu_us,
            s.upstream_cpu_us,
            s.load,
            s.result.errors + s.result.non_2xx
        );
    }
    md.push_str(
        "\nNotes: the load average column is mostly this benchmark's own load. wrk is a \
         closed-loop generator (fixed connections), so latency percentiles \
         are without coordinated-omission correction and p50 ≈ connections ÷ throughput. \
         CPU µs/req is the proxy Envoy's user+system time during the run divided by the \
         requests served; it does not depend on how the scheduler shares the machine and is \
         the steadiest comparison on a busy host. Where the machine itself is a shared VM \
         whose speed drifts by a third from minute to minute, `CPU ÷ upstream CPU` is steadier \
         still: the upstream, an Envoy answering every request itself, does the same work \
         per request whatever the setup and drifts with the machine. The native setup is \
         not sticky (Envoy's \
         weighted_clusters pick at random) and its cookie/device tests are substring matches; \
         the Lua setup hashes the key with djb2.\n",
    );
    md
}

fn chart(options: &Options, summaries: &[Summary], busy: bool) -> String {
    let color = |setup: Setup| {
        let index = Setup::ALL
            .iter()
            .chain(&Setup::EXTRA)
            .position(|s| *s == setup)
            .unwrap_or(0);
        chart::COLORS[index % chart::COLORS.len()]
    };
    let panel = |title: &str, unit, f: &dyn Fn(&Summary) -> (f64, f64, f64)| chart::Panel {
        title: title.to_string(),
        unit,
        bars: summaries
            .iter()
            .map(|s| {
                let (median, min, max) = f(s);
                chart::Bar {
                    label: s.setup.name().to_string(),
                    median,
                    min,
                    max,
                    color: color(s.setup),
                }
            })
            .collect(),
    };
    let panels = [
        panel("Throughput", "req/s", &|s| (s.rps, s.rps_min, s.rps_max)),
        panel("p99 latency", "µs", &|s| (s.p99, s.p99_min, s.p99_max)),
        panel("Envoy CPU per request", "µs", &|s| {
            (s.cpu_us, s.cpu_min, s.cpu_max)
        }),
    ];
    let footnote = format!(
        "Envoy 1.40, --concurrency 1; wrk -t{} -c{} -d{}s, {} round(s), {}-byte responses, median with min–max whiskers.{}",
        options.threads,
        options.connections,
        options.duration,
        options.rounds,
        options.response_bytes.unwrap_or(3),
        if busy {
            " Machine busy before the run (load ≥ 0.5): indicative only."
        } else {
            ""
        }
    );
    chart::render(
        &format!("Sluice under load — {}", options.stamp),
        &footnote,
        &panels,
    )
}

// ---------------------------------------------------------------- main

fn run(options: &Options) -> Result<(), String> {
    let started_at = Instant::now();
    let started = utc_stamp();
    if options.wait_idle > 0 {
        let deadline = Instant::now() + Duration::from_secs(options.wait_idle);
        while load_average() >= 0.5 && Instant::now() < deadline {
            eprintln!(
                "sluice-load: load average {:.2}, waiting for < 0.5 …",
                load_average()
            );
            std::thread::sleep(Duration::from_secs(15));
        }
    }
    let load_start = load_average();
    if load_start >= 0.5 {
        eprintln!(
            "sluice-load: WARNING: load average {load_start:.2} ≥ 0.5: the machine is busy, \
             results will be noisy (re-run when idle, or use --wait-idle)"
        );
    }
    let raw_dir = workload::repo_root()
        .join("target/sluice-load")
        .join(&options.stamp);
    std::fs::create_dir_all(&raw_dir).map_err(|e| format!("{}: {e}", raw_dir.display()))?;
    std::fs::create_dir_all(&options.out).map_err(|e| format!("{}: {e}", options.out.display()))?;

    let envoy_version =
        Command::new(sluice_envoy::envoy::envoy_binary().map_err(|e| e.to_string())?)
            .arg("--version")
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split("version:")
                    .nth(1)
                    .unwrap_or("?")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|e| e.to_string());

    eprintln!(
        "sluice-load: starting the upstream ({:?})",
        options.upstream
    );
    let body = setups::response_body(options.response_bytes);
    let upstream = UpstreamProcess::start(options.upstream, &body)?;
    // The body every response must carry (the harness's is its own).
    let expected_body = match upstream {
        UpstreamProcess::Envoy(_) => {
            let _ = std::fs::write(raw_dir.join("upstream.yaml"), setups::upstream_yaml(&body));
            Some(body.len())
        }
        UpstreamProcess::Harness(..) => None,
    };
    if options.pin {
        if let UpstreamProcess::Envoy(envoy) = &upstream {
            pin(envoy.pid(), 0);
        }
    }
    let ports = upstream.ports()?;
    if let Some(requests) = options.count_crossings {
        return count_crossings(options, ports, &raw_dir, requests, &envoy_version);
    }
    if let Some(requests) = options.count_instructions {
        return count_instructions(options, ports, &raw_dir, requests, &envoy_version);
    }

    let script = raw_dir.join("requests.lua");
    std::fs::write(
        &script,
        setups::wrk_script(HOST, &request_headers("user-0"), USERS),
    )
    .map_err(|e| e.to_string())?;
    let wrk = Wrk {
        options,
        script,
        raw_dir: raw_dir.clone(),
    };

    eprintln!(
        "sluice-load: validating and starting {} setups",
        options.setups.len()
    );
    let proxies = start_proxies(options, ports, &raw_dir)?;
    for proxy in &proxies {
        smoke_check(proxy, expected_body)?;
    }
    let ticks = clock_ticks();
    let mut memory: BTreeMap<&'static str, Memory> = BTreeMap::new();
    for proxy in &proxies {
        memory.entry(proxy.setup.name()).or_default().rss_start_kib =
            memory_kib(proxy.envoy.pid()).0;
    }

    // The upstream alone: it must be well above what the proxies reach.
    let upstream_addr: SocketAddr = format!("127.0.0.1:{}", ports.0)
        .parse()
        .map_err(|e| format!("{e}"))?;
    let before = cpu_seconds(upstream.pid(), ticks);
    let upstream_alone = wrk.run(upstream_addr, options.duration.min(5), "upstream-alone")?;
    let upstream_alone_cpu_us =
        (cpu_seconds(upstream.pid(), ticks) - before) * 1e6 / upstream_alone.requests.max(1) as f64;
    eprintln!(
        "sluice-load: upstream alone: {:.0} req/s, p99 {:.0} µs",
        upstream_alone.rps(),
        upstream_alone.p99
    );

    if options.warmup > 0 {
        for proxy in &proxies {
            eprintln!("sluice-load: warming up {}", proxy.setup.name());
            wrk.run(
                proxy.envoy.addr(),
                options.warmup,
                &format!("warmup-{}", proxy.setup.name()),
            )?;
        }
    }

    let mut samples: BTreeMap<&'static str, Vec<Sample>> = BTreeMap::new();
    for round in 0..options.rounds {
        for offset in 0..proxies.len() {
            let proxy = &proxies[(offset + round) % proxies.len()];
            let load = load_average();
            let pid = proxy.envoy.pid();
            let (cpu_before, upstream_before) =
                (cpu_seconds(pid, ticks), cpu_seconds(upstream.pid(), ticks));
            let result = wrk.run(
                proxy.envoy.addr(),
                options.duration,
                &format!("round{}-{}", round + 1, proxy.setup.name()),
            )?;
            let requests = result.requests.max(1) as f64;
            let cpu_us = (cpu_seconds(pid, ticks) - cpu_before) * 1e6 / requests;
            let upstream_cpu_us =
                (cpu_seconds(upstream.pid(), ticks) - upstream_before) * 1e6 / requests;
            eprintln!(
                "sluice-load: round {}/{} {:<15} {:>8.0} req/s  p50 {:>6.0} µs  p99 {:>6.0} µs  CPU {:>5.1} µs/req  load {:.2}",
                round + 1,
                options.rounds,
                proxy.setup.name(),
                result.rps(),
                result.p50,
                result.p99,
                cpu_us,
                load
            );
            samples.entry(proxy.setup.name()).or_default().push(Sample {
                round,
                result,
                cpu_us,
                upstream_cpu_us,
                load,
            });
        }
    }

    for proxy in &proxies {
        let m = memory.entry(proxy.setup.name()).or_default();
        (m.rss_kib, m.hwm_kib) = memory_kib(proxy.envoy.pid());
        if let Ok(response) = proxy.envoy.admin_get("/memory") {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&response.body) {
                let number = |key: &str| {
                    value[key]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .or_else(|| value[key].as_u64())
                };
                m.heap_allocated = number("allocated");
                m.heap_size = number("heap_size");
            }
        }
        if let Ok(response) = proxy.envoy.admin_get("/stats") {
            let text = response.body_text();
            m.upstream_stats = text
                .lines()
                .filter(|l| {
                    l.starts_with("cluster.shop_v")
                        && [
                            ".upstream_cx_total:",
                            ".upstream_cx_destroy:",
                            ".upstream_rq_total:",
                            ".upstream_rq_retry:",
                        ]
                        .iter()
                        .any(|stat| l.contains(stat))
                })
                .map(str::to_string)
                .collect();
            if proxy.setup.is_wasm() {
                m.wasm_stats = text
                    .lines()
                    .filter(|l| l.starts_with("wasm.") || l.contains("wasm_vm"))
                    .map(str::to_string)
                    .collect();
                m.sluice_metrics = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("wasmcustom.sluice.")
                            && (l.contains("routed") || l.contains("retry.granted"))
                    })
                    .map(str::to_string)
                    .collect();
            }
        }
    }

    let summaries: Vec<Summary> = options
        .setups
        .iter()
        .map(|&setup| summarise(setup, samples.get(setup.name()).map_or(&[], Vec::as_slice)))
        .collect();
    let load_end = load_average();
    let mut wasm_paths = vec![workload::sluice_wasm(), workload::passthrough_wasm()];
    if options.setups.contains(&Setup::PassthroughRaw) {
        wasm_paths.push(workload::passthrough_raw_wasm());
    }
    if let Some(baseline) = std::env::var_os("SLUICE_BASELINE_WASM")
        .filter(|_| options.setups.contains(&Setup::SluiceBaseline))
    {
        wasm_paths.push(PathBuf::from(baseline));
    }
    let wasm_sizes = wasm_paths
        .iter()
        .map(|p| {
            (
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
                workload::file_digest(p),
            )
        })
        .collect();
    let context = Context {
        machine: machine_description(),
        envoy_version,
        upstream: upstream.describe().to_string(),
        upstream_alone: Some(upstream_alone),
        upstream_alone_cpu_us,
        load_start,
        load_end,
        started,
        elapsed: started_at.elapsed(),
        raw_dir: raw_dir.clone(),
        wasm_sizes,
    };
    let md = report(options, &context, &summaries, &samples, &memory);
    let busy = load_start >= 0.5;
    let svg = chart(options, &summaries, busy);
    let md_path = options.out.join(format!("load-{}.md", options.stamp));
    let svg_path = options.out.join(format!("load-{}.svg", options.stamp));
    let md = format!(
        "{md}\nChart: [`{}`]({})\n",
        svg_path.file_name().unwrap_or_default().to_string_lossy(),
        svg_path.file_name().unwrap_or_default().to_string_lossy()
    );
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    std::fs::write(&svg_path, &svg).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!("{md}");
    eprintln!(
        "sluice-load: wrote {} and {}",
        md_path.display(),
        svg_path.display()
    );
    drop(proxies);
    drop(upstream);
    Ok(())
}

/// Sends `count` realistic requests one at a time (users in turn from
/// `first`), each of which must be answered 200.
fn send_sequential(envoy: &Envoy, setup: Setup, first: usize, count: usize) -> Result<(), String> {
    let mut client = Client::new(envoy.addr()).with_timeout(Duration::from_secs(30));
    for n in first..first + count {
        let headers = request_headers(&user(n));
        let plain: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(name, _)| !name.starts_with(':'))
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let response = client
            .get(HOST, "/api/items?page=2", &plain)
            .map_err(|e| format!("{}: request {n}: {e}", setup.name()))?;
        if response.status != 200 {
            return Err(format!(
                "{}: request {n} answered {}",
                setup.name(),
                response.status
            ));
        }
    }
    Ok(())
}

/// `--count-instructions`: see `callgrind.rs`.
fn count_instructions(
    options: &Options,
    ports: (u16, u16),
    raw_dir: &Path,
    requests: usize,
    envoy_version: &str,
) -> Result<(), String> {
    let envoy_binary = sluice_envoy::envoy::envoy_binary().map_err(|e| e.to_string())?;
    let wrapper = callgrind::wrapper(raw_dir, &envoy_binary)?;
    // The harness starts whatever SLUICE_ENVOY names; this process starts
    // nothing else after this point.
    std::env::set_var("SLUICE_ENVOY", &wrapper);
    let baseline_wasm = std::env::var_os("SLUICE_BASELINE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(workload::sluice_wasm);
    let baseline_config = baseline_config()?;
    let (sluice_wasm, passthrough_wasm, passthrough_raw_wasm, probe_wasm) = (
        workload::sluice_wasm(),
        workload::passthrough_wasm(),
        workload::passthrough_raw_wasm(),
        workload::probe_wasm(),
    );
    let inputs = inputs(
        [
            &sluice_wasm,
            &baseline_wasm,
            &passthrough_wasm,
            &passthrough_raw_wasm,
            &probe_wasm,
        ],
        &baseline_config,
        ports,
    );
    let envoy_options = EnvoyOptions {
        concurrency: 1,
        // V8 compiles each module under valgrind: about a minute for Sluice.
        ready_timeout: Duration::from_secs(600),
        ..EnvoyOptions::default()
    };
    let warmup = (requests / 2).max(1);
    let mut rows: BTreeMap<&'static str, Vec<callgrind::PerRequest>> = BTreeMap::new();
    for round in 1..=options.rounds {
        for &setup in &options.setups {
            let yaml = setups::proxy_yaml(setup, &inputs);
            let _ = std::fs::write(
                raw_dir.join(format!("{}.callgrind.yaml", setup.name())),
                &yaml,
            );
            eprintln!(
                "sluice-load: round {round}: {} under callgrind: starting (slow)",
                setup.name()
            );
            let envoy = Envoy::start_yaml(&yaml, &envoy_options)
                .map_err(|e| format!("{}: {e}", setup.name()))?;
            send_sequential(&envoy, setup, 0, warmup)?;
            // Let V8's background tier-up of the hot functions finish.
            std::thread::sleep(Duration::from_secs(2));
            callgrind::control("-z", envoy.pid())?;
            send_sequential(&envoy, setup, warmup, requests)?;
            callgrind::control("-d", envoy.pid())?;
            let dump = callgrind::newest_dump(raw_dir, envoy.pid())?;
            drop(envoy);
            let sample = callgrind::PerRequest::new(&dump, requests);
            eprintln!(
                "sluice-load: round {round}: {}: {:.0} instructions per request",
                setup.name(),
                sample.total
            );
            rows.entry(setup.name()).or_default().push(sample);
        }
    }
    let column = |name: &str, pick: &dyn Fn(&callgrind::PerRequest) -> f64| {
        rows.get(name).map(|samples| {
            let mut values: Vec<f64> = samples.iter().map(pick).collect();
            median(&mut values)
        })
    };
    let total_of = |name: &str| column(name, &|sample| sample.total);
    let generated_of = |name: &str| column(name, &|sample| sample.category("generated"));
    let mut report = format!(
        "# Instructions per request in Envoy (callgrind)\n\n\
         Generated by `bash benches/load.sh --count-instructions {requests} --rounds {rounds} \
         --setups {setups}` on {stamp}: Envoy {envoy_version} under valgrind's callgrind, one worker; \
         for each setup a fresh Envoy, {warmup} realistic requests to warm up (V8 tiers a module's hot \
         functions up), then the counters zeroed, {requests} requests sent one at a time on one \
         connection, and a dump. Every thread of the proxy is counted (the main thread's timers \
         and the modules' ticks included); the upstream and the client are not. `generated` is code \
         in anonymous memory (the modules as V8 compiled them and V8's wrappers around each call; \
         Envoy with no filter runs some too, so read it as differences), `envoy` the Envoy binary (Envoy, V8's \
         runtime and builtins, the allocator), `libraries` libc and the loader. The median over the \
         rounds; the spread is the range.\n\n\
         | setup | instructions per request | envoy | generated | libraries | over passthrough | generated over passthrough | spread over the rounds |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        rounds = options.rounds,
        setups = options
            .setups
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        stamp = options.stamp,
    );
    let passthrough_total = total_of("passthrough");
    let passthrough_generated = generated_of("passthrough");
    for &setup in &options.setups {
        let name = setup.name();
        let Some(samples) = rows.get(name) else {
            continue;
        };
        let total = total_of(name).unwrap_or(0.0);
        let category = |key: &'static str| column(name, &|sample| sample.category(key));
        let low = samples
            .iter()
            .map(|s| s.total)
            .fold(f64::INFINITY, f64::min);
        let high = samples.iter().map(|s| s.total).fold(0.0, f64::max);
        let over = |value: Option<f64>, base: Option<f64>| match (value, base) {
            (Some(value), Some(base)) => format!("{:+.0}", value - base),
            _ => "–".to_string(),
        };
        let _ = writeln!(
            report,
            "| {name} | {total:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0}–{:.0} |",
            category("envoy").unwrap_or(0.0),
            category("generated").unwrap_or(0.0),
            category("libraries").unwrap_or(0.0),
            over(Some(total), passthrough_total),
            over(generated_of(name), passthrough_generated),
            low,
            high,
        );
    }
    let path = options
        .out
        .join(format!("envoy-instructions-{}.md", options.stamp));
    std::fs::write(&path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{report}\n(written to {})", path.display());
    Ok(())
}

/// Crossings per request in a real Envoy: each Wasm setup's module is
/// rewritten by `sluice-instrument` (every host call and callback logs
/// `hc>name` / `cb<name` at trace level first), loaded with `wasm:trace`,
/// and sent `requests` realistic requests one at a time. The lines logged
/// from the first request to a tick after the last, divided by the requests,
/// are the crossings Envoy made per request, ticks included (as in the
/// wasmtime count, `benches/results/wasmtime-crossings.md`).
fn count_crossings(
    options: &Options,
    ports: (u16, u16),
    raw_dir: &Path,
    requests: usize,
    envoy_version: &str,
) -> Result<(), String> {
    let instrumented = |path: &Path, name: &str| -> Result<PathBuf, String> {
        let wasm = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rewritten = sluice_benches::instrument::instrument(&wasm)?;
        let out = raw_dir.join(format!("{name}.instrumented.wasm"));
        std::fs::write(&out, &rewritten.wasm).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(out)
    };
    let sluice_wasm = workload::sluice_wasm();
    let baseline_wasm = std::env::var_os("SLUICE_BASELINE_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| sluice_wasm.clone());
    let baseline_config = baseline_config()?;
    let sluice = instrumented(&sluice_wasm, "sluice")?;
    let baseline = instrumented(&baseline_wasm, "baseline")?;
    let passthrough = instrumented(&workload::passthrough_wasm(), "passthrough")?;
    let passthrough_raw = match instrumented(&workload::passthrough_raw_wasm(), "passthrough_raw") {
        Ok(path) => path,
        Err(_) => passthrough.clone(),
    };
    let probe = instrumented(&workload::probe_wasm(), "probe")?;
    let inputs = inputs(
        [&sluice, &baseline, &passthrough, &passthrough_raw, &probe],
        &baseline_config,
        ports,
    );
    let trace = EnvoyOptions {
        concurrency: 1,
        log_level: "info".to_string(),
        component_log_level: Some("wasm:trace".to_string()),
        ..EnvoyOptions::default()
    };
    let marked = |log: &str| -> Vec<String> {
        log.lines()
            .filter_map(|line| {
                let at = line
                    .find(sluice_benches::instrument::IMPORT_MARK)
                    .or_else(|| line.find(sluice_benches::instrument::EXPORT_MARK))?;
                line.get(at..).map(|message| message.trim().to_string())
            })
            .collect()
    };
    let mut report = format!(
        "# ABI crossings per request in Envoy\n\n\
         Generated by `bash benches/load.sh --count-crossings {requests} --setups {setups}` on {stamp}: \
         Envoy {envoy_version}, one worker, each module rewritten by `sluice-instrument` (every host call \
         `hc>` and callback `cb<`, `malloc` included, logs itself at trace level first), {requests} \
         realistic requests sent one at a time (users in turn, as the load run). Counted from the first \
         request to 600 ms after the last, ticks of both VMs (main thread and worker) included, divided by \
         the requests.\n",
        setups = options
            .setups
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(","),
        stamp = options.stamp,
    );
    for &setup in options.setups.iter().filter(|setup| setup.is_wasm()) {
        let yaml = setups::proxy_yaml(setup, &inputs);
        let _ = std::fs::write(
            raw_dir.join(format!("{}.crossings.yaml", setup.name())),
            &yaml,
        );
        let envoy =
            Envoy::start_yaml(&yaml, &trace).map_err(|e| format!("{}: {e}", setup.name()))?;
        std::thread::sleep(Duration::from_millis(600));
        let before = marked(&envoy.log()).len();
        send_sequential(&envoy, setup, 0, requests)?;
        std::thread::sleep(Duration::from_millis(600));
        let messages = marked(&envoy.log());
        let counted = messages.get(before..).unwrap_or_default();
        let tally = sluice_benches::instrument::tally(counted.iter().map(String::as_str));
        let per = |count: u64| count as f64 / requests as f64;
        let calls: u64 = tally
            .iter()
            .filter(|(name, _)| name.starts_with(sluice_benches::instrument::IMPORT_MARK))
            .map(|(_, count)| count)
            .sum();
        let entries: u64 = tally
            .iter()
            .filter(|(name, _)| name.starts_with(sluice_benches::instrument::EXPORT_MARK))
            .map(|(_, count)| count)
            .sum();
        let _ = write!(
            report,
            "\n### {} ({})\n\n| crossing | per request |\n|---|---:|\n",
            setup.name(),
            setup.describe()
        );
        let mut rows: Vec<(&String, &u64)> = tally.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, count) in rows {
            let _ = writeln!(report, "| `{name}` | {:.2} |", per(*count));
        }
        let _ = writeln!(
            report,
            "| **host calls** | **{:.2}** |\n| **entries (callbacks + malloc)** | **{:.2}** |\n| **all crossings** | **{:.2}** |",
            per(calls),
            per(entries),
            per(calls + entries)
        );
        eprintln!(
            "sluice-load: {}: {:.2} crossings per request in Envoy",
            setup.name(),
            per(calls + entries)
        );
    }
    let path = options
        .out
        .join(format!("envoy-crossings-{}.md", options.stamp));
    std::fs::write(&path, &report).map_err(|e| format!("{}: {e}", path.display()))?;
    println!("{report}\n(written to {})", path.display());
    Ok(())
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("sluice-load: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&options) {
        eprintln!("sluice-load: {e}");
        std::process::exit(1);
    }
}
