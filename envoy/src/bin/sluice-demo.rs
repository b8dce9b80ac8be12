//! Demo traffic driver: many simulated users send requests through Envoy
//! and Sluice, and a live table shows where each cohort lands.
//!
//! ```text
//! sluice-demo [--addr 127.0.0.1:10000] [--admin 127.0.0.1:9901] [--host shop.local]
//!             [--seconds 18] [--users 1500] [--rps 300] [--connections 6]
//!             [--weight 10] [--mobile-weight 50] [--wait-ready SECS]
//! ```
//!
//! `--wait-ready` first waits up to SECS for Envoy's admin `/ready`.
//!
//! Cohorts (fixed per user): `x-canary: always`, `x-canary: never`, a
//! `beta=yes` cookie, a mobile user agent, and plain desktop users. Every
//! user sends its own `x-user-id`, so the driver also checks stickiness: no
//! user should ever see both sides. `--weight` and `--mobile-weight` are only
//! used to print the expected shares (they match envoy/examples/sluice.yaml).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_envoy::Client;

const USAGE: &str = "usage: sluice-demo [--addr HOST:PORT] [--admin HOST:PORT] [--host AUTHORITY] \
[--seconds S] [--users N] [--rps R] [--connections C] [--weight W] [--mobile-weight W] \
[--wait-ready SECS]";

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 \
(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
const ANDROID: &str = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 \
(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36";
const DESKTOP: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36";
const MAC: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 \
(KHTML, like Gecko) Version/17.4 Safari/605.1.15";

#[derive(Clone, Debug)]
struct Opts {
    addr: SocketAddr,
    admin: SocketAddr,
    host: String,
    seconds: f64,
    users: usize,
    rps: f64,
    connections: usize,
    weight: f64,
    mobile_weight: f64,
    wait_ready: f64,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        addr: ([127, 0, 0, 1], 10000).into(),
        admin: ([127, 0, 0, 1], 9901).into(),
        host: "shop.local".into(),
        seconds: 18.0,
        users: 1500,
        rps: 300.0,
        connections: 6,
        weight: 10.0,
        mobile_weight: 50.0,
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
            "--addr" => o.addr = v.parse().map_err(|e| bad(&e))?,
            "--admin" => o.admin = v.parse().map_err(|e| bad(&e))?,
            "--host" => o.host = v,
            "--seconds" => o.seconds = v.parse().map_err(|e| bad(&e))?,
            "--users" => o.users = v.parse().map_err(|e| bad(&e))?,
            "--rps" => o.rps = v.parse().map_err(|e| bad(&e))?,
            "--connections" => o.connections = v.parse().map_err(|e| bad(&e))?,
            "--weight" => o.weight = v.parse().map_err(|e| bad(&e))?,
            "--mobile-weight" => o.mobile_weight = v.parse().map_err(|e| bad(&e))?,
            "--wait-ready" => o.wait_ready = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if o.users == 0 || o.connections == 0 || o.rps <= 0.0 || o.seconds <= 0.0 {
        return Err("--users, --connections, --rps and --seconds must be positive".into());
    }
    Ok(o)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cohort {
    Always,
    Never,
    Beta,
    Mobile,
    Desktop,
}

const COHORTS: [Cohort; 5] = [
    Cohort::Always,
    Cohort::Never,
    Cohort::Beta,
    Cohort::Mobile,
    Cohort::Desktop,
];

impl Cohort {
    /// Fixed per user: 4% always, 4% never, 10% beta, 30% mobile, rest desktop.
    fn of(user: usize) -> Cohort {
        match (user.wrapping_mul(37)) % 100 {
            0..=3 => Cohort::Always,
            4..=7 => Cohort::Never,
            8..=17 => Cohort::Beta,
            18..=47 => Cohort::Mobile,
            _ => Cohort::Desktop,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Cohort::Always => "x-canary: always",
            Cohort::Never => "x-canary: never",
            Cohort::Beta => "cookie beta=yes",
            Cohort::Mobile => "mobile UA",
            Cohort::Desktop => "desktop UA",
        }
    }

    fn expected(self, o: &Opts) -> f64 {
        match self {
            Cohort::Always | Cohort::Beta => 100.0,
            Cohort::Never => 0.0,
            Cohort::Mobile => o.mobile_weight,
            Cohort::Desktop => o.weight,
        }
    }

    fn headers(self, user: usize) -> Vec<(&'static str, String)> {
        let ua = |a: &str, b: &str| {
            if user.is_multiple_of(2) {
                a.to_string()
            } else {
                b.to_string()
            }
        };
        match self {
            Cohort::Always => vec![
                ("user-agent", ua(DESKTOP, MAC)),
                ("x-canary", "always".into()),
            ],
            Cohort::Never => vec![
                ("user-agent", ua(IPHONE, DESKTOP)),
                ("x-canary", "never".into()),
            ],
            Cohort::Beta => vec![
                ("user-agent", ua(DESKTOP, ANDROID)),
                ("cookie", format!("session=s{user}; beta=yes")),
            ],
            Cohort::Mobile => vec![("user-agent", ua(IPHONE, ANDROID))],
            Cohort::Desktop => vec![("user-agent", ua(DESKTOP, MAC))],
        }
    }
}

/// Which side a user has been seen on: bit 0 stable, bit 1 canary.
#[derive(Default)]
struct Stats {
    /// [cohort][0 = stable, 1 = canary]
    counts: [[u64; 2]; 5],
    users_seen: Vec<u8>,
    errors: u64,
    last_error: String,
    other: u64,
}

impl Stats {
    /// (stable, canary) requests of a cohort.
    fn side_counts(&self, c: Cohort) -> [u64; 2] {
        self.counts.get(c.index()).copied().unwrap_or_default()
    }
    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c[0] + c[1]).sum::<u64>() + self.errors + self.other
    }
    fn switched(&self) -> usize {
        self.users_seen.iter().filter(|s| **s == 3).count()
    }
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

fn worker(id: usize, o: Opts, stats: Arc<Mutex<Stats>>, stop: Arc<AtomicBool>) {
    let mut client = Client::new(o.addr).with_timeout(Duration::from_secs(5));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let interval = Duration::from_secs_f64(o.connections as f64 / o.rps);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let user = (rng.next() % o.users as u64) as usize;
        let cohort = Cohort::of(user);
        let uid = format!("demo-user-{user}");
        let extra = cohort.headers(user);
        let mut headers: Vec<(&str, &str)> = vec![("x-user-id", uid.as_str())];
        headers.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        let result = client.get(&o.host, "/", &headers);
        if let Ok(mut s) = stats.lock() {
            match result {
                Ok(r) if r.status == 200 => {
                    let side = match r.upstream() {
                        Some("stable") => Some(0usize),
                        Some("canary") => Some(1),
                        _ => None,
                    };
                    match side {
                        Some(side) => {
                            if let Some(c) = s.counts.get_mut(cohort.index()) {
                                if let Some(n) = c.get_mut(side) {
                                    *n += 1;
                                }
                            }
                            if let Some(seen) = s.users_seen.get_mut(user) {
                                *seen |= 1 << side;
                            }
                        }
                        None => s.other += 1,
                    }
                }
                Ok(r) => {
                    s.errors += 1;
                    s.last_error = format!("HTTP {} from {:?}", r.status, r.upstream());
                }
                Err(e) => {
                    s.errors += 1;
                    s.last_error = e.to_string();
                }
            }
        }
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // fell behind (e.g. Envoy slow): do not burst
        }
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn bar(p: f64, width: usize) -> String {
    let filled = ((p / 100.0) * width as f64).round() as usize;
    let filled = filled.min(width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn render(o: &Opts, s: &Stats, elapsed: f64) -> Vec<String> {
    let total = s.total();
    let mut lines = vec![
        format!(
            "Sluice demo: {:>5.1}s / {:.0}s   {total} requests ({:.0} req/s)   errors {}",
            elapsed,
            o.seconds,
            total as f64 / elapsed.max(0.001),
            s.errors
        ),
        String::new(),
        format!(
            "{:<16} {:>6} {:>7} {:>7} {:>8}  {:<20} {:>8}",
            "cohort", "users", "stable", "canary", "canary%", "", "expected"
        ),
    ];
    let users_in = |c: Cohort| (0..o.users).filter(|u| Cohort::of(*u) == c).count();
    let (mut st, mut ca) = (0, 0);
    for c in COHORTS {
        let [a, b] = s.side_counts(c);
        st += a;
        ca += b;
        let p = pct(b, a + b);
        lines.push(format!(
            "{:<16} {:>6} {:>7} {:>7} {:>7.1}%  {} {:>7.0}%",
            c.label(),
            users_in(c),
            a,
            b,
            p,
            bar(p, 20),
            c.expected(o)
        ));
    }
    let p = pct(ca, st + ca);
    lines.push(format!(
        "{:<16} {:>6} {:>7} {:>7} {:>7.1}%  {}",
        "all",
        o.users,
        st,
        ca,
        p,
        bar(p, 20)
    ));
    lines.push(String::new());
    let seen = s.users_seen.iter().filter(|x| **x != 0).count();
    lines.push(format!(
        "stickiness: {seen} users seen, {} switched sides (want 0)",
        s.switched()
    ));
    if s.errors > 0 {
        // Cut to keep the live frame within 80 columns (a wrapped line
        // would break the in-place redraw).
        let e: String = s.last_error.chars().take(66).collect();
        lines.push(format!("last error: {e}"));
    }
    lines
}

/// Sluice's own counters from Envoy's admin /stats.
fn sluice_metrics(admin: SocketAddr) -> Vec<(String, u64)> {
    // The filter hands its counters to Envoy on its tick (250 ms): let the
    // last requests' counts arrive.
    std::thread::sleep(sluice_envoy::envoy::SLUICE_TICK + Duration::from_millis(150));
    let mut c = Client::new(admin).with_timeout(Duration::from_secs(3));
    let Ok(r) = c.get("admin", "/stats?filter=wasmcustom", &[]) else {
        return Vec::new();
    };
    sluice_envoy::envoy::parse_stats(&r.body_text())
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("wasmcustom.").map(|k| (k.to_string(), v)))
        .collect()
}

/// Wait for admin /ready to answer 200; false on timeout.
fn wait_ready(admin: SocketAddr, secs: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        let mut c = Client::new(admin).with_timeout(Duration::from_secs(1));
        if c.get("admin", "/ready", &[]).is_ok_and(|r| r.status == 200) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sluice-demo: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if o.wait_ready > 0.0 && !wait_ready(o.admin, o.wait_ready) {
        eprintln!(
            "sluice-demo: Envoy admin {} not ready after {}s",
            o.admin, o.wait_ready
        );
        return ExitCode::from(1);
    }
    let stats = Arc::new(Mutex::new(Stats {
        users_seen: vec![0; o.users],
        ..Stats::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..o.connections)
        .map(|i| {
            let (o, s, st) = (o.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || worker(i, o, s, st))
        })
        .collect();

    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut drawn = 0usize;
    let mut last_plain = Instant::now();
    let mut out = std::io::stdout();
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        let done = elapsed >= o.seconds;
        if done {
            stop.store(true, Ordering::Relaxed);
        }
        let lines = match stats.lock() {
            Ok(s) => render(&o, &s, elapsed.min(o.seconds)),
            Err(_) => break,
        };
        if tty {
            // Redraw in place: move up over the previous frame, clear lines.
            let mut frame = String::new();
            if drawn > 0 {
                frame.push_str(&format!("\x1b[{drawn}A"));
            }
            for l in &lines {
                frame.push_str("\x1b[2K");
                frame.push_str(l);
                frame.push('\n');
            }
            let _ = out.write_all(frame.as_bytes());
            let _ = out.flush();
            drawn = lines.len();
        } else if last_plain.elapsed() >= Duration::from_secs(3) || done {
            // Not a terminal (CI, a pipe): a compact line now and then.
            last_plain = Instant::now();
            if let Some(first) = lines.first() {
                println!("{first}");
            }
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for w in workers {
        let _ = w.join();
    }

    let Ok(s) = stats.lock() else {
        return ExitCode::from(1);
    };
    if !tty {
        println!();
        for l in render(&o, &s, o.seconds) {
            println!("{l}");
        }
    }
    println!();
    println!("Sluice's own counters (Envoy admin /stats, wasmcustom.*):");
    let metrics = sluice_metrics(o.admin);
    if metrics.is_empty() {
        println!("  (none: admin {} unreachable or no metrics yet)", o.admin);
    }
    for (k, v) in &metrics {
        println!("  {k:<40} {v:>8}");
    }
    println!();
    let bad_rules = COHORTS.iter().any(|c| {
        let [a, b] = s.side_counts(*c);
        match c {
            Cohort::Always | Cohort::Beta => a > 0,
            Cohort::Never => b > 0,
            _ => false,
        }
    });
    let ok = s.errors == 0 && s.other == 0 && s.switched() == 0 && !bad_rules && s.total() > 0;
    println!(
        "summary: {} requests, {} errors, {} users switched sides, forced cohorts {}: {}",
        s.total(),
        s.errors,
        s.switched(),
        if bad_rules { "LEAKED" } else { "exact" },
        if ok { "OK" } else { "PROBLEMS (see above)" }
    );
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
