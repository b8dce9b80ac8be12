//! The demo's second act: Sluice's configuration changed while traffic
//! flows, with no failed request. Envoy runs with its listener from a
//! watched file (file-based LDS, envoy/examples/sluice-lds-bootstrap.yaml);
//! this program sends steady traffic from simulated users and pushes each
//! change the way an operator would: write the new listener file to a temp
//! file in the same directory and rename it over the watched one. A live
//! table shows which upstream answers, the failed-request count, and each
//! push with Envoy's verdict.
//!
//! ```text
//! sluice-demo-lds --lds DIR/listener.yaml [--envoy-log FILE]
//!                 [--addr 127.0.0.1:10100] [--admin 127.0.0.1:9911] [--host shop.local]
//!                 [--promotion manual|rollout] [--step-seconds 3.5] [--drain-seconds 2]
//!                 [--users 1000] [--rps 300] [--connections 6] [--wait-ready SECS]
//! ```
//!
//! `--drain-seconds` is the `--drain-time-s` Envoy runs with: for a step to
//! end on the new config alone, `--step-seconds` should exceed it by a second.
//!
//! The file at `--lds` when it starts is the first configuration and the
//! template of every push: a push replaces only the Sluice JSON in it (the
//! block under `value: |`). The sequence (each a push unless said otherwise):
//!
//! 1. start: "blue", every user on `shop_v1` (the file Envoy started with);
//! 2. blue → green: `"stable": "shop_v2"`, every user moves at once;
//! 3. `--promotion manual`: canary `shop_v3` at 5 %, 25 %, a push with a typo
//!    (`"wieght"`) that Sluice refuses while 25 % keeps serving, 50 %, 100 %;
//!    `--promotion rollout`: one push of a `rollout` block (5 → 25 → 50 → 100,
//!    one step every `--step-seconds`, rounded) that Sluice steps by itself,
//!    and during it a push with an out-of-range value that is refused;
//! 4. the promotion done: `"stable": "shop_v3"`, the canary removed.
//!
//! Exit status: 0 when no request failed and every push ended as intended
//! (accepted, or refused for the bad one); 1 otherwise; 2 usage.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use sluice_envoy::Client;

const USAGE: &str = "usage: sluice-demo-lds --lds FILE [--envoy-log FILE] [--addr HOST:PORT] \
[--admin HOST:PORT] [--host AUTHORITY] [--promotion manual|rollout] [--step-seconds S] \
[--drain-seconds S] [--users N] [--rps R] [--connections C] [--wait-ready SECS]";

/// The clusters of envoy/examples/sluice-lds-bootstrap.yaml, as the demo's
/// upstreams name themselves (`x-upstream`), with their role.
const UPSTREAMS: [(&str, &str); 3] = [
    ("shop_v1", "blue"),
    ("shop_v2", "green"),
    ("shop_v3", "next"),
];
/// Index of "failed" in the per-bucket counts, after the upstreams.
const FAILED: usize = 3;
/// Width of a share bar.
const BAR: usize = 30;
/// Live shares are over this window.
const WINDOW_S: f64 = 1.0;
/// Statistics are kept per bucket of this many milliseconds (by send time).
const BUCKET_MS: u128 = 100;
/// The weights of the demo's rollout block.
const ROLLOUT_STEPS: [u64; 4] = [5, 25, 50, 100];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promotion {
    Manual,
    Rollout,
}

#[derive(Clone, Debug)]
struct Opts {
    lds: PathBuf,
    envoy_log: Option<PathBuf>,
    addr: SocketAddr,
    admin: SocketAddr,
    host: String,
    promotion: Promotion,
    step: f64,
    drain: f64,
    users: usize,
    rps: f64,
    connections: usize,
    wait_ready: f64,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        lds: PathBuf::new(),
        envoy_log: None,
        addr: ([127, 0, 0, 1], 10100).into(),
        admin: ([127, 0, 0, 1], 9911).into(),
        host: "shop.local".into(),
        promotion: Promotion::Manual,
        step: 3.5,
        drain: 2.0,
        users: 1000,
        rps: 300.0,
        connections: 6,
        wait_ready: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--lds" => o.lds = PathBuf::from(&v),
            "--envoy-log" => o.envoy_log = Some(PathBuf::from(&v)),
            "--addr" => o.addr = v.parse().map_err(|e| bad(&e))?,
            "--admin" => o.admin = v.parse().map_err(|e| bad(&e))?,
            "--host" => o.host = v,
            "--promotion" => {
                o.promotion = match v.as_str() {
                    "manual" => Promotion::Manual,
                    "rollout" => Promotion::Rollout,
                    _ => return Err(format!("--promotion {v}: manual or rollout")),
                }
            }
            "--step-seconds" => o.step = v.parse().map_err(|e| bad(&e))?,
            "--drain-seconds" => o.drain = v.parse().map_err(|e| bad(&e))?,
            "--users" => o.users = v.parse().map_err(|e| bad(&e))?,
            "--rps" => o.rps = v.parse().map_err(|e| bad(&e))?,
            "--connections" => o.connections = v.parse().map_err(|e| bad(&e))?,
            "--wait-ready" => o.wait_ready = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.lds.as_os_str().is_empty() {
        return Err("--lds is required".into());
    }
    if o.users == 0 || o.connections == 0 || o.rps <= 0.0 || o.step < 1.0 {
        return Err(
            "--users, --connections and --rps must be positive, --step-seconds at least 1".into(),
        );
    }
    if o.step < o.drain + 1.0 {
        eprintln!(
            "sluice-demo-lds: note: --step-seconds {} is less than --drain-seconds {} + 1: \
             a step may end before the previous config's connections have drained",
            o.step, o.drain
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// The listener file: a template whose Sluice JSON is replaced on each push.

/// The watched listener file split around the Sluice JSON (the block scalar
/// under `value: |`).
struct Template {
    before: String,
    after: String,
    /// Indentation of the JSON lines.
    indent: usize,
    json: Value,
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("value: |"))
            .ok_or("no `value: |` block (the Sluice JSON) in the listener file")?;
        let key_indent = lines.get(at).map_or(0, |l| indent_of(l));
        let mut end = at + 1;
        while lines
            .get(end)
            .is_some_and(|l| l.trim().is_empty() || indent_of(l) > key_indent)
        {
            end += 1;
        }
        // Blank lines at the end of the block belong to what follows.
        while end > at + 1 && lines.get(end - 1).is_some_and(|l| l.trim().is_empty()) {
            end -= 1;
        }
        let body: String = lines.get(at + 1..end).unwrap_or_default().concat();
        let indent = body
            .lines()
            .find(|l| !l.trim().is_empty())
            .map_or(key_indent + 2, indent_of);
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| format!("the Sluice JSON in the listener file: {e}"))?;
        Ok(Template {
            before: lines.get(..=at).unwrap_or_default().concat(),
            after: lines.get(end..).unwrap_or_default().concat(),
            indent,
            json,
        })
    }

    fn render(&self, json: &Value) -> String {
        let pad = " ".repeat(self.indent);
        let mut out = self.before.clone();
        for line in pretty(json).lines() {
            out.push_str(&pad);
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&self.after);
        out
    }
}

/// JSON on one line with a space after `:` and `,`.
fn compact(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), compact(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(compact).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Keys in the order an operator reads them; the rest after, sorted.
fn ordered<'a>(m: &'a Map<String, Value>, order: &[&str]) -> Vec<(&'a String, &'a Value)> {
    let mut out: Vec<(&String, &Value)> =
        order.iter().filter_map(|k| m.get_key_value(*k)).collect();
    out.extend(m.iter().filter(|(k, _)| !order.contains(&k.as_str())));
    out
}

/// The Sluice JSON as in the example: one key per line for the top level and
/// each service, nested values on one line.
fn pretty(v: &Value) -> String {
    let Value::Object(top) = v else {
        return compact(v);
    };
    let mut out = String::from("{\n");
    let top_keys = ordered(top, &["steering_header", "services"]);
    for (i, (k, v)) in top_keys.iter().enumerate() {
        let comma = if i + 1 < top_keys.len() { "," } else { "" };
        match (k.as_str(), v) {
            ("services", Value::Array(services)) => {
                out.push_str("  \"services\": [\n");
                for (j, s) in services.iter().enumerate() {
                    let scomma = if j + 1 < services.len() { "," } else { "" };
                    match s {
                        Value::Object(svc) => {
                            out.push_str("    {\n");
                            let keys = ordered(
                                svc,
                                &[
                                    "name", "match", "stable", "canary", "weight", "rollout",
                                    "sticky", "rules", "retry", "breaker",
                                ],
                            );
                            for (n, (k, v)) in keys.iter().enumerate() {
                                let c = if n + 1 < keys.len() { "," } else { "" };
                                out.push_str(&format!(
                                    "      {}: {}{c}\n",
                                    Value::from(k.as_str()),
                                    compact(v)
                                ));
                            }
                            out.push_str(&format!("    }}{scomma}\n"));
                        }
                        other => out.push_str(&format!("    {}{scomma}\n", compact(other))),
                    }
                }
                out.push_str(&format!("  ]{comma}\n"));
            }
            _ => out.push_str(&format!(
                "  {}: {}{comma}\n",
                Value::from(k.as_str()),
                compact(v)
            )),
        }
    }
    out.push('}');
    out
}

// ---------------------------------------------------------------------------
// The sequence of changes.

/// A change to the first service of the last accepted config.
type Edit = fn(&mut Map<String, Value>, &Opts);

#[derive(Clone, Copy)]
enum Hold {
    /// Stay in this phase this many step lengths.
    Steps(f64),
    /// Until Sluice reports the rollout promoted (at least one step length).
    UntilPromoted,
}

struct Phase {
    /// Short, for the history table.
    title: &'static str,
    /// What the push changes, as an operator would write it.
    change: String,
    /// `None`: the start (no push).
    edit: Option<Edit>,
    /// Whether Envoy should accept the push.
    accept: bool,
    hold: Hold,
}

fn rollout_block(o: &Opts) -> Value {
    json!({"steps": ROLLOUT_STEPS, "step_s": rollout_step_s(o),
           "max_failure_rate": 0.05, "min_requests": 20})
}

fn rollout_step_s(o: &Opts) -> u64 {
    o.step.round().max(1.0) as u64
}

fn phases(o: &Opts) -> Vec<Phase> {
    let push = |title, change: &str, edit: Edit| Phase {
        title,
        change: change.to_string(),
        edit: Some(edit),
        accept: true,
        hold: Hold::Steps(1.0),
    };
    let mut p = vec![
        Phase {
            title: "blue: every user on shop_v1",
            change: "(the file Envoy started with)".into(),
            edit: None,
            accept: true,
            hold: Hold::Steps(1.0),
        },
        push(
            "blue → green",
            "\"stable\": \"shop_v1\" → \"shop_v2\"",
            |s, _| {
                s.insert("stable".into(), json!("shop_v2"));
            },
        ),
    ];
    match o.promotion {
        Promotion::Manual => {
            p.push(push(
                "canary shop_v3 at 5%",
                "+ \"canary\": \"shop_v3\", \"weight\": 5",
                |s, _| {
                    s.insert("canary".into(), json!("shop_v3"));
                    s.insert("weight".into(), json!(5));
                },
            ));
            p.push(push("canary at 25%", "\"weight\": 5 → 25", |s, _| {
                s.insert("weight".into(), json!(25));
            }));
            p.push(Phase {
                title: "typo: refused, 25% serves on",
                change: "\"weight\": 25 → \"wieght\": 50 (a typo)".into(),
                edit: Some(|s, _| {
                    s.remove("weight");
                    s.insert("wieght".into(), json!(50));
                }),
                accept: false,
                hold: Hold::Steps(1.0),
            });
            p.push(push("canary at 50%", "\"weight\": 25 → 50", |s, _| {
                s.insert("weight".into(), json!(50));
            }));
            p.push(push("canary at 100%", "\"weight\": 50 → 100", |s, _| {
                s.insert("weight".into(), json!(100));
            }));
        }
        Promotion::Rollout => {
            let step_s = rollout_step_s(o);
            p.push(Phase {
                title: "rollout of shop_v3 starts",
                change: format!(
                    "+ \"canary\": \"shop_v3\", \"rollout\": {{\"steps\": [5, 25, 50, 100], \"step_s\": {step_s}, …}}"
                ),
                edit: Some(|s, o| {
                    s.insert("canary".into(), json!("shop_v3"));
                    s.insert("rollout".into(), rollout_block(o));
                }),
                accept: true,
                // The refused push comes 2 s into the rollout's second step.
                hold: Hold::Steps((step_s as f64 + 2.0) / o.step),
            });
            p.push(Phase {
                title: "bad value: refused",
                change: "\"max_failure_rate\": 0.05 → 5 (meant 5 %)".into(),
                edit: Some(|s, o| {
                    let mut r = rollout_block(o);
                    if let Some(m) = r.as_object_mut() {
                        m.insert("max_failure_rate".into(), json!(5));
                    }
                    s.insert("rollout".into(), r);
                }),
                accept: false,
                hold: Hold::UntilPromoted,
            });
        }
    }
    let mut done = push(
        "promoted: shop_v3 is stable",
        "\"stable\": \"shop_v2\" → \"shop_v3\", - \"canary\", - \"weight\"",
        |s, _| {
            s.insert("stable".into(), json!("shop_v3"));
            s.remove("canary");
            s.remove("weight");
            s.remove("rollout");
        },
    );
    if o.promotion == Promotion::Rollout {
        done.change = done.change.replace("\"weight\"", "\"rollout\"");
    }
    p.push(done);
    p
}

/// Percent of traffic each upstream should get under `config` (the first
/// service), with `rollout_weight` (percent) when it has a rollout block.
fn expected(config: &Value, rollout_weight: Option<f64>) -> [f64; 3] {
    let mut out = [0.0; 3];
    let Some(svc) = config.pointer("/services/0") else {
        return out;
    };
    let index = |name: Option<&str>| UPSTREAMS.iter().position(|(n, _)| Some(*n) == name);
    let stable = index(svc.get("stable").and_then(Value::as_str));
    let canary = index(svc.get("canary").and_then(Value::as_str));
    let weight = match (canary, svc.get("rollout")) {
        (None, _) => 0.0,
        (Some(_), Some(_)) => rollout_weight.unwrap_or(0.0),
        (Some(_), None) => svc.get("weight").and_then(Value::as_f64).unwrap_or(0.0),
    };
    if let Some(s) = stable.and_then(|i| out.get_mut(i)) {
        *s += 100.0 - weight;
    }
    if let Some(c) = canary.and_then(|i| out.get_mut(i)) {
        *c += weight;
    }
    out
}

// ---------------------------------------------------------------------------
// Traffic.

#[derive(Default)]
struct Stats {
    /// Per bucket of BUCKET_MS by send time: answers per upstream, failures.
    buckets: Vec<[u64; 4]>,
    failed: u64,
    last_error: String,
}

impl Stats {
    fn record(&mut self, bucket: usize, slot: usize) {
        if self.buckets.len() <= bucket {
            self.buckets.resize(bucket + 1, [0; 4]);
        }
        if let Some(n) = self.buckets.get_mut(bucket).and_then(|b| b.get_mut(slot)) {
            *n += 1;
        }
    }

    /// Counts over [from, to) seconds.
    fn sum(&self, from: f64, to: f64) -> [u64; 4] {
        let a = (from.max(0.0) * 1000.0 / BUCKET_MS as f64) as usize;
        let b = (to.max(0.0) * 1000.0 / BUCKET_MS as f64) as usize;
        let mut out = [0u64; 4];
        for bucket in self.buckets.iter().skip(a).take(b.saturating_sub(a)) {
            for (o, n) in out.iter_mut().zip(bucket) {
                *o += n;
            }
        }
        out
    }

    fn total(&self) -> [u64; 4] {
        self.sum(0.0, f64::MAX / 2.0)
    }
}

/// Shares (percent) of the answered requests among the upstreams.
fn shares(c: [u64; 4]) -> Option<[f64; 3]> {
    let answered: u64 = c.iter().take(3).sum();
    if answered == 0 {
        return None;
    }
    let mut out = [0.0; 3];
    for (o, n) in out.iter_mut().zip(c) {
        *o = 100.0 * n as f64 / answered as f64;
    }
    Some(out)
}

/// xorshift64*: a small deterministic generator for picking users.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn worker(id: usize, o: Opts, start: Instant, stats: Arc<Mutex<Stats>>, stop: Arc<AtomicBool>) {
    // One keep-alive connection per worker, as a browser or a service
    // client keeps one: it stays on the filter chain it was accepted by until
    // Envoy asks it to close (`connection: close`) or closes it when idle;
    // the client then reconnects, and a request that found its reused
    // connection closed before any answer is sent again once, as browsers do.
    let mut client = Client::new(o.addr).with_timeout(Duration::from_secs(5));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let interval = Duration::from_secs_f64(o.connections as f64 / o.rps);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let user = format!("user-{}", rng.next() % o.users as u64);
        let sent = Instant::now();
        let result = client.get(&o.host, "/", &[("x-user-id", user.as_str())]);
        let bucket = ((sent - start).as_millis() / BUCKET_MS) as usize;
        if let Ok(mut s) = stats.lock() {
            let upstream = match &result {
                Ok(r) if r.status == 200 => r
                    .upstream()
                    .and_then(|u| UPSTREAMS.iter().position(|(name, _)| *name == u)),
                _ => None,
            };
            match (upstream, result) {
                (Some(i), _) => s.record(bucket, i),
                (None, Ok(r)) => {
                    s.record(bucket, FAILED);
                    s.failed += 1;
                    s.last_error =
                        format!("HTTP {} from {}", r.status, r.upstream().unwrap_or("Envoy"));
                }
                (None, Err(e)) => {
                    s.record(bucket, FAILED);
                    s.failed += 1;
                    s.last_error = e.to_string();
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // fell behind: do not burst
        }
    }
}

// ---------------------------------------------------------------------------
// Envoy's admin interface.

fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let mut c = Client::new(admin).with_timeout(Duration::from_secs(2));
    match c.get("admin", path, &[]) {
        Ok(r) if r.status == 200 => Some(r.body_text()),
        _ => None,
    }
}

/// The admin stats the demo reads.
#[derive(Clone, Copy, Default, Debug)]
struct Admin {
    lds_success: u64,
    lds_rejected: u64,
    /// Filter chains (and whole listeners) still draining after a push.
    draining: u64,
    /// Sluice's rollout gauges, when there is a rollout.
    rollout_bp: Option<u64>,
    rollout_state: Option<u64>,
    /// Retries Envoy's router made to the shop clusters.
    retries: u64,
}

fn read_admin(admin: SocketAddr) -> Option<Admin> {
    // One small request: a regex filter on the stat names.
    let filter = "^(listener_manager\\.(lds\\.update_(success|rejected)|total_(filter_chains|listeners)_draining)|wasmcustom\\.sluice\\.shop\\.rollout\\.(weight_bp|state)|cluster\\.shop_v[0-9]\\.upstream_rq_retry)$";
    let text = admin_get(admin, &format!("/stats?filter={}", percent_encode(filter)))?;
    let stats = sluice_envoy::envoy::parse_stats(&text);
    let get = |k: &str| stats.get(k).copied();
    Some(Admin {
        lds_success: get("listener_manager.lds.update_success")?,
        lds_rejected: get("listener_manager.lds.update_rejected").unwrap_or(0),
        draining: get("listener_manager.total_filter_chains_draining").unwrap_or(0)
            + get("listener_manager.total_listeners_draining").unwrap_or(0),
        rollout_bp: get("wasmcustom.sluice.shop.rollout.weight_bp"),
        rollout_state: get("wasmcustom.sluice.shop.rollout.state"),
        retries: stats
            .iter()
            .filter(|(k, _)| k.ends_with(".upstream_rq_retry"))
            .map(|(_, v)| v)
            .sum(),
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_.-".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn wait_ready(admin: SocketAddr, secs: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if admin_get(admin, "/ready").is_some() && read_admin(admin).is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Pushes.

#[derive(Clone, Debug)]
struct PushResult {
    accepted: bool,
    /// From the rename to Envoy's verdict in its stats.
    took: f64,
    /// Sluice's (or Envoy's) reason for a refusal, from the log.
    reason: Option<String>,
}

/// Writes `yaml` to a temp file next to `lds` and renames it over `lds`,
/// then waits for Envoy's verdict.
fn push(o: &Opts, yaml: &str, n: usize) -> Result<PushResult, String> {
    let before = read_admin(o.admin).ok_or("admin stats unreachable")?;
    let log_len = o
        .envoy_log
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let dir = o.lds.parent().unwrap_or(Path::new("."));
    let name = o
        .lds
        .file_name()
        .map_or("listener.yaml".into(), |n| n.to_string_lossy().into_owned());
    // Same directory, so the rename is atomic; a name Envoy does not watch.
    let staging = dir.join(format!(".{name}.push-{n}"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&staging)?;
        f.write_all(yaml.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| format!("writing {}: {e}", staging.display()))?;
    let t0 = Instant::now();
    std::fs::rename(&staging, &o.lds)
        .map_err(|e| format!("renaming over {}: {e}", o.lds.display()))?;
    let deadline = t0 + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(now) = read_admin(o.admin) {
            let took = t0.elapsed().as_secs_f64();
            if now.lds_success > before.lds_success {
                return Ok(PushResult {
                    accepted: true,
                    took,
                    reason: None,
                });
            }
            if now.lds_rejected > before.lds_rejected {
                return Ok(PushResult {
                    accepted: false,
                    took,
                    reason: refusal_reason(o, log_len),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!(
        "Envoy neither accepted nor rejected push {n} within 15 s (is it watching {}?)",
        o.lds.display()
    ))
}

/// The refusal in the Envoy log written since `from`: Sluice's line if there
/// is one, else Envoy's.
fn refusal_reason(o: &Opts, from: u64) -> Option<String> {
    let path = o.envoy_log.as_ref()?;
    // The log line can land just after the stat.
    std::thread::sleep(Duration::from_millis(50));
    let bytes = std::fs::read(path).ok()?;
    let new = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned();
    let sluice = new
        .lines()
        .filter_map(|l| l.split_once("config refused: ").map(|(_, r)| r.to_string()))
        .next_back();
    sluice.or_else(|| {
        new.lines()
            .rfind(|l| l.contains("rejected") || l.contains("error"))
            .map(|l| l.split_once("] ").map_or(l, |(_, r)| r).to_string())
    })
}

// ---------------------------------------------------------------------------
// Display.

/// One line of the history table.
struct Entry {
    at: f64,
    /// "start", "push 3", or "Sluice" for a rollout step.
    who: String,
    title: String,
    verdict: String,
    /// Share and expected at the end of the phase (filled when it ends).
    end: Option<([f64; 3], [f64; 3])>,
    /// Why a push was refused.
    reason: Option<String>,
}

struct View {
    tty: bool,
    width: usize,
    height: usize,
    drawn: usize,
    last_plain: f64,
}

fn terminal_size() -> Option<(usize, usize)> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(tty)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut it = text.split_whitespace();
    let rows = it.next()?.parse().ok()?;
    let cols = it.next()?.parse().ok()?;
    Some((rows, cols))
}

fn bar(p: f64, width: usize) -> String {
    let filled = (((p / 100.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn fmt_shares([a, b, c]: [f64; 3]) -> String {
    format!("{a:>3.0} /{b:>4.0} /{c:>4.0}")
}

/// Ends the last history entry: the share of the last second before `t`
/// (when the next entry begins), against what was expected then.
fn close_last(history: &mut [Entry], stats: &Mutex<Stats>, t: f64, want: [f64; 3]) {
    let Some(last) = history.last_mut() else {
        return;
    };
    if last.end.is_none() {
        if let Ok(s) = stats.lock() {
            last.end = Some((shares(s.sum(t - WINDOW_S, t)).unwrap_or([0.0; 3]), want));
        }
    }
}

fn close_enough(share: [f64; 3], want: [f64; 3]) -> bool {
    share.iter().zip(want).all(|(s, w)| (s - w).abs() <= 5.0)
}

struct Live<'a> {
    o: &'a Opts,
    elapsed: f64,
    stats: &'a Stats,
    admin: Admin,
    phase_no: usize,
    phases: usize,
    phase: &'a Phase,
    phase_started: f64,
    last_push: Option<&'a PushResult>,
    want: [f64; 3],
    history: &'a [Entry],
    accepted: usize,
    rejected: usize,
}

fn render(l: &Live) -> (Vec<String>, Vec<String>) {
    let total = l.stats.total();
    let requests: u64 = total.iter().sum();
    let mut head = vec![
        format!(
            "Sluice act 2: config pushes under load   {:>5.1} s   {requests} requests ({:.0}/s)",
            l.elapsed,
            requests as f64 / l.elapsed.max(0.001)
        ),
        format!(
            "FAILED REQUESTS: {}   pushes: {} accepted, {} refused   retries by Envoy: {}",
            l.stats.failed, l.accepted, l.rejected, l.admin.retries
        ),
        String::new(),
        format!(
            "now {}/{}: {}   {}",
            l.phase_no + 1,
            l.phases,
            l.phase.title,
            l.phase.change
        ),
    ];
    let ago = l.elapsed - l.phase_started;
    let mut status = match l.last_push {
        Some(p) if p.accepted => format!(
            "    accepted {ago:.1} s ago (Envoy took {:.0} ms)",
            p.took * 1000.0
        ),
        Some(p) => format!(
            "    REFUSED {ago:.1} s ago ({:.0} ms): the previous config serves on",
            p.took * 1000.0
        ),
        None => "    (no push)".to_string(),
    };
    if l.admin.draining > 0 {
        status.push_str(&format!("; old connections draining (≤ {} s)", l.o.drain));
    }
    head.push(status);
    if let Some(bp) = l
        .admin
        .rollout_bp
        .filter(|_| l.o.promotion == Promotion::Rollout)
    {
        let state = match l.admin.rollout_state {
            Some(0) => "progressing",
            Some(1) => "ROLLED BACK",
            Some(2) => "promoted",
            Some(3) => "pending",
            _ => "?",
        };
        head.push(format!(
            "    Sluice's rollout: {state}, canary weight {:.0}%",
            bp as f64 / 100.0
        ));
    }
    head.push(String::new());
    head.push(format!(
        "{:<17} {:<w$} {:>6} {:>8} {:>9}",
        "upstream",
        "share of the last second",
        "now",
        "expected",
        "requests",
        w = BAR
    ));
    let now = shares(l.stats.sum(l.elapsed - WINDOW_S, l.elapsed)).unwrap_or([0.0; 3]);
    for (i, (name, role)) in UPSTREAMS.iter().enumerate() {
        let p = now.get(i).copied().unwrap_or(0.0);
        head.push(format!(
            "{:<17} {} {:>5.1}% {:>7.0}% {:>9}",
            format!("{name} ({role})"),
            bar(p, BAR),
            p,
            l.want.get(i).copied().unwrap_or(0.0),
            total.get(i).copied().unwrap_or(0)
        ));
    }
    head.push(String::new());
    head.push(format!(
        "{:>6}  {:<7} {:<28} {:<16} {}",
        "t", "", "config", "Envoy", "v1/v2/v3 at end"
    ));
    (head, render_history(l.history, l.stats))
}

fn render_history(entries: &[Entry], stats: &Stats) -> Vec<String> {
    let mut history: Vec<String> = Vec::new();
    for e in entries {
        let end = match e.end {
            Some((s, w)) if close_enough(s, w) => format!("{} ✓", fmt_shares(s)),
            Some((s, w)) => format!("{} (want {})", fmt_shares(s), fmt_shares(w)),
            None => String::new(),
        };
        history.push(format!(
            "{:>5.1}s  {:<7} {:<28} {:<16} {end}",
            e.at, e.who, e.title, e.verdict
        ));
        if let Some(reason) = &e.reason {
            history.push(format!("        refused: {reason}"));
        }
    }
    if stats.failed > 0 {
        history.push(format!("last failure: {}", stats.last_error));
    }
    history
}

impl View {
    fn show(&mut self, l: &Live) {
        let (head, mut history) = render(l);
        if self.tty {
            // Keep the frame within the terminal: cursor-up cannot reach
            // lines that scrolled away. Drop the oldest history lines.
            let room = self.height.saturating_sub(head.len() + 1);
            if history.len() > room {
                history.drain(..history.len() - room);
            }
            let mut frame = String::new();
            if self.drawn > 0 {
                frame.push_str(&format!("\x1b[{}A", self.drawn));
            }
            let mut lines = 0;
            for line in head.iter().chain(history.iter()) {
                frame.push_str("\x1b[2K");
                frame.extend(line.chars().take(self.width));
                frame.push('\n');
                lines += 1;
            }
            // Clear what a longer previous frame left below.
            let extra = self.drawn.saturating_sub(lines);
            for _ in 0..extra {
                frame.push_str("\x1b[2K\n");
            }
            lines += extra;
            let mut out = std::io::stdout();
            let _ = out.write_all(frame.as_bytes());
            let _ = out.flush();
            self.drawn = lines;
        } else if l.elapsed - self.last_plain >= 1.0 {
            // Not a terminal (CI, a pipe): one compact line a second.
            self.last_plain = l.elapsed;
            let [v1, v2, v3] =
                shares(l.stats.sum(l.elapsed - WINDOW_S, l.elapsed)).unwrap_or([0.0; 3]);
            let total: u64 = l.stats.total().iter().sum();
            println!(
                "{:>5.1}s  last 1 s: shop_v1 {v1:>5.1}%  shop_v2 {v2:>5.1}%  shop_v3 {v3:>5.1}%  (expected {})  {total} requests, {} failed{}",
                l.elapsed,
                fmt_shares(l.want).replace(' ', ""),
                l.stats.failed,
                if l.admin.draining > 0 { ", old chain draining" } else { "" }
            );
        }
    }

    /// An event line (non-TTY only: the TTY frame shows the history).
    fn event(&self, elapsed: f64, text: &str) {
        if !self.tty {
            println!("{elapsed:>5.1}s  {text}");
        }
    }
}

// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sluice-demo-lds: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("sluice-demo-lds: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(o: &Opts) -> Result<bool, String> {
    let text = std::fs::read_to_string(&o.lds).map_err(|e| format!("{}: {e}", o.lds.display()))?;
    let template = Template::parse(&text)?;
    if o.wait_ready > 0.0 && !wait_ready(o.admin, o.wait_ready) {
        return Err(format!(
            "Envoy admin {} not ready after {}s",
            o.admin, o.wait_ready
        ));
    }
    let plan = phases(o);
    let tty = std::io::stdout().is_terminal();
    let (height, width) = if tty {
        terminal_size().unwrap_or((24, 80))
    } else {
        (usize::MAX, usize::MAX)
    };
    let mut view = View {
        tty,
        width,
        height,
        drawn: 0,
        last_plain: 0.0,
    };

    let start = Instant::now();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..o.connections)
        .map(|i| {
            let (o, s, st) = (o.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || worker(i, o, start, s, st))
        })
        .collect();

    let mut accepted_config = template.json.clone();
    let mut history: Vec<Entry> = Vec::new();
    let (mut accepted, mut rejected, mut unexpected) = (0usize, 0usize, 0usize);
    let mut pushes = 0usize;
    let mut admin = read_admin(o.admin).unwrap_or_default();
    let initial_success = admin.lds_success;
    let initial_rejected = admin.lds_rejected;
    let mut last_rollout_bp = None;
    let mut rollout_started: Option<f64> = None;
    let mut want = expected(&accepted_config, None);
    let mut error = None;

    'phases: for (no, phase) in plan.iter().enumerate() {
        let phase_started = start.elapsed().as_secs_f64();
        let mut result = None;
        match phase.edit {
            None => history.push(Entry {
                at: phase_started,
                who: "start".into(),
                title: phase.title.into(),
                verdict: "loaded".into(),
                end: None,
                reason: None,
            }),
            Some(edit) => {
                close_last(&mut history, &stats, phase_started, want);
                pushes += 1;
                let mut next = accepted_config.clone();
                if let Some(svc) = next
                    .pointer_mut("/services/0")
                    .and_then(Value::as_object_mut)
                {
                    edit(svc, o);
                }
                let r = match push(o, &template.render(&next), pushes) {
                    Ok(r) => r,
                    Err(e) => {
                        error = Some(e);
                        break 'phases;
                    }
                };
                if r.accepted {
                    accepted += 1;
                    let rollout = next.pointer("/services/0/rollout");
                    if rollout.is_some()
                        && rollout != accepted_config.pointer("/services/0/rollout")
                    {
                        // A new rollout block: Sluice starts it when applied.
                        rollout_started = Some(phase_started + r.took);
                    }
                    accepted_config = next;
                } else {
                    rejected += 1;
                }
                if r.accepted != phase.accept {
                    unexpected += 1;
                }
                let verdict = format!(
                    "{} {:>4.0} ms",
                    if r.accepted { "accepted" } else { "REFUSED " },
                    r.took * 1000.0
                );
                view.event(
                    phase_started,
                    &format!(
                        "push {pushes}: {}: {} -> {}{}",
                        phase.title,
                        phase.change,
                        verdict,
                        r.reason
                            .as_ref()
                            .map(|r| format!("\n        refused: {r}"))
                            .unwrap_or_default()
                    ),
                );
                history.push(Entry {
                    at: phase_started,
                    who: format!("push {pushes}"),
                    title: phase.title.into(),
                    verdict,
                    end: None,
                    reason: r.reason.clone(),
                });
                result = Some(r);
            }
        }

        // Hold: traffic flows, the display refreshes.
        let min_end = phase_started
            + o.step
                * match phase.hold {
                    Hold::Steps(n) => n,
                    Hold::UntilPromoted => 1.0,
                };
        let max_end = match phase.hold {
            Hold::Steps(_) => min_end,
            Hold::UntilPromoted => phase_started + 5.0 * o.step + 5.0,
        };
        let mut promoted_at: Option<f64> = None;
        loop {
            let elapsed = start.elapsed().as_secs_f64();
            if let Some(a) = read_admin(o.admin) {
                admin = a;
            }
            // A rollout step Sluice took by itself.
            if o.promotion == Promotion::Rollout
                && accepted_config.pointer("/services/0/rollout").is_some()
            {
                if let Some(bp) = admin.rollout_bp {
                    if last_rollout_bp.is_some_and(|last| last != bp) {
                        // The gauge is refreshed once a second; the step
                        // itself began on the schedule: k steps after the
                        // rollout was applied.
                        let at = ROLLOUT_STEPS
                            .iter()
                            .position(|w| w * 100 == bp)
                            .zip(rollout_started)
                            .map_or(elapsed, |(k, t)| {
                                (t + (k as u64 * rollout_step_s(o)) as f64).min(elapsed)
                            });
                        close_last(&mut history, &stats, at, want);
                        let title = format!("rollout step: {:.0}%", bp as f64 / 100.0);
                        view.event(at, &format!("Sluice: {title} (no push)"));
                        history.push(Entry {
                            at,
                            who: "Sluice".into(),
                            title,
                            verdict: "(its own clock)".into(),
                            end: None,
                            reason: None,
                        });
                    }
                    last_rollout_bp = Some(bp);
                }
            }
            want = expected(
                &accepted_config,
                admin.rollout_bp.map(|bp| bp as f64 / 100.0),
            );
            let done = match phase.hold {
                Hold::Steps(_) => elapsed >= min_end,
                Hold::UntilPromoted => {
                    if admin.rollout_state == Some(2) {
                        promoted_at.get_or_insert(elapsed);
                    }
                    elapsed >= max_end
                        || (elapsed >= min_end
                            && promoted_at.is_some_and(|t| elapsed >= t + o.step.min(2.0)))
                }
            };
            if done && no + 1 == plan.len() {
                close_last(&mut history, &stats, elapsed, want);
            }
            let Ok(s) = stats.lock() else {
                error = Some("statistics lock poisoned".into());
                break 'phases;
            };
            view.show(&Live {
                o,
                elapsed,
                stats: &s,
                admin,
                phase_no: no,
                phases: plan.len(),
                phase,
                phase_started,
                last_push: result.as_ref(),
                want,
                history: &history,
                accepted,
                rejected,
            });
            drop(s);
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    close_last(&mut history, &stats, start.elapsed().as_secs_f64(), want);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let Ok(s) = stats.lock() else {
        return Err("statistics lock poisoned".into());
    };
    if let Some(a) = read_admin(o.admin) {
        admin = a;
    }
    if !tty {
        // The table the terminal showed live.
        println!();
        for l in render_history(&history, &s) {
            println!("{l}");
        }
    }
    let requests: u64 = s.total().iter().sum();
    let expected_rejected = plan
        .iter()
        .filter(|p| p.edit.is_some() && !p.accept)
        .count();
    let expected_accepted = plan.iter().filter(|p| p.edit.is_some() && p.accept).count();
    println!();
    let ok = s.failed == 0 && unexpected == 0 && error.is_none() && requests > 0;
    println!("act 2 summary");
    println!(
        "  requests  {requests} in {elapsed:.1} s ({:.0}/s), from {} users",
        requests as f64 / elapsed.max(0.001),
        o.users
    );
    println!("  failed    {}", s.failed);
    if s.failed > 0 {
        println!("            last: {}", s.last_error);
    }
    println!(
        "  pushes    {accepted} accepted, {rejected} refused (intended: {expected_accepted} and {expected_rejected})"
    );
    println!(
        "  Envoy     lds.update_success +{}, lds.update_rejected +{}, router retries {}",
        admin.lds_success.saturating_sub(initial_success),
        admin.lds_rejected.saturating_sub(initial_rejected),
        admin.retries
    );
    if let Some(e) = &error {
        println!("  stopped   early: {e}");
    }
    println!(
        "  result    {}",
        if ok {
            "OK: no request failed, every push ended as intended"
        } else {
            "PROBLEMS (see above)"
        }
    );
    Ok(ok)
}
