//! [`Proxy`]: one fake Envoy process — what all its Wasm VMs share.

use crate::abi::{LogLevel, MetricType, Status};
use crate::engine::{self, LoadedModule};
use crate::vm::{StartError, Vm, VmInner};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// 2026-11-01T00:00:00Z: where every [`Proxy`]'s virtual clock starts.
pub const DEFAULT_START_UNIX_SECS: u64 = 1_793_491_200;

/// What happens when the plugin traps (a Rust panic becomes `unreachable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapPolicy {
    /// The default: the VM is marked failed and the call that trapped panics
    /// with the trap message, the wasm backtrace and the plugin's last log
    /// lines, so the test that caused it fails loudly.
    Panic,
    /// Envoy's default `failure_policy: FAIL_CLOSED`: the VM is marked failed
    /// (never called again); streams get a 503 local reply with details
    /// `wasm_fail_stream` (gRPC status UNAVAILABLE).
    FailClosed,
    /// `failure_policy: FAIL_OPEN`: the VM is marked failed and streams
    /// continue as if the filter were absent.
    FailOpen,
    /// `failure_policy: FAIL_RELOAD`: the failed VM's in-flight streams fail
    /// as with `FailClosed`; the next new stream on that worker gets a fresh
    /// VM (new instance, `_initialize`, a root context with `on_vm_start`
    /// and `on_configure`), as Envoy's `maybeReloadHandleIfNeeded` does.
    /// The dead VM is dropped without any callback (no `proxy_on_done` or
    /// `proxy_on_delete`); shared data, metrics and queues stay.
    FailReload,
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// `proxy_log`.
    Plugin,
    /// `fd_write` to stdout (Envoy logs it at `info`).
    Stdout,
    /// `fd_write` to stderr (Envoy logs it at `error`).
    Stderr,
    /// Envoy itself (e.g. "Wasm VM failed ...").
    Host,
}

/// One log line, as Envoy would have printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Label of the VM that logged (`"main"`, `"worker_0"`, `"canary"`, …).
    pub vm: String,
    /// The level it was logged at.
    pub level: LogLevel,
    /// The message (for `fd_write`, without the trailing newline, like Envoy).
    pub message: String,
    /// Who produced it.
    pub source: LogSource,
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}][{}] {}", self.vm, self.level, self.message)
    }
}

/// A metric as Envoy's stats store holds it.
///
/// Envoy names the stat `wasmcustom.<name>` (the `wasmcustom` namespace is
/// stripped again in Prometheus output); the fake keys by the plugin's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    /// The name the plugin defined.
    pub name: String,
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// Counter/gauge value (0 for histograms).
    pub value: u64,
    /// Every value recorded into a histogram, in order.
    pub samples: Vec<u64>,
}

/// An `http_call` the plugin made to a cluster the test declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// The token the plugin got back.
    pub token: u32,
    /// Label of the VM that made it.
    pub vm: String,
    /// The cluster (the `upstream` argument).
    pub cluster: String,
    /// Request headers, in order.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: Vec<(String, String)>,
    /// Timeout the plugin asked for.
    pub timeout: Duration,
}

pub(crate) struct ProxyConfig {
    pub(crate) module: Arc<LoadedModule>,
    pub(crate) vm_id: String,
    pub(crate) root_id: String,
    pub(crate) plugin_name: String,
    pub(crate) vm_config: Vec<u8>,
    pub(crate) log_level: LogLevel,
    pub(crate) trap_policy: TrapPolicy,
    pub(crate) call_timeout: Duration,
    pub(crate) echo_logs: bool,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) clusters: Vec<String>,
    /// Whether the foreign function `clear_route_cache` exists (Envoy: yes).
    pub(crate) clear_route_cache: bool,
}

pub(crate) struct SharedData {
    pub(crate) entries: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    next_cas: u32,
    /// Test fault hook: how many more guest `proxy_set_shared_data` calls on
    /// a key are answered `CasMismatch` (see [`Proxy::fail_shared_sets`]).
    pub(crate) forced_mismatches: HashMap<Vec<u8>, u64>,
    /// Every guest `proxy_set_shared_data` that returned `CasMismatch`
    /// (forced or real), by key.
    pub(crate) mismatches: HashMap<Vec<u8>, u64>,
}

impl SharedData {
    /// `SharedData::nextCas`: one process-wide counter, starting at 1 and
    /// skipping 0 (0 means "no CAS check" in `set`).
    fn next_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        cas
    }

    /// `SharedData::set`: a missing key is always created (whatever `cas`),
    /// an existing key is overwritten when `cas` is 0 or matches, otherwise
    /// `CasMismatch`. Every successful write gets a fresh CAS value.
    pub(crate) fn set(&mut self, key: &[u8], value: &[u8], cas: u32) -> Status {
        if let Some(existing) = self.entries.get(key) {
            if cas != 0 && cas != existing.1 {
                return Status::CasMismatch;
            }
        }
        let new_cas = self.next_cas();
        self.entries.insert(key.to_vec(), (value.to_vec(), new_cas));
        Status::Ok
    }

    /// A guest's `proxy_set_shared_data`: [`set`](Self::set), unless the
    /// test armed a forced mismatch for this key.
    pub(crate) fn guest_set(&mut self, key: &[u8], value: &[u8], cas: u32) -> Status {
        let status = match self.forced_mismatches.get_mut(key) {
            Some(left) if *left > 0 => {
                *left -= 1;
                Status::CasMismatch
            }
            _ => self.set(key, value, cas),
        };
        if status == Status::CasMismatch {
            *self.mismatches.entry(key.to_vec()).or_insert(0) += 1;
        }
        status
    }
}

pub(crate) struct Queue {
    pub(crate) name: Vec<u8>,
    pub(crate) vm: usize,
    pub(crate) context_id: u32,
    pub(crate) items: VecDeque<Vec<u8>>,
}

pub(crate) struct State {
    pub(crate) plugin_config: Vec<u8>,
    /// The monotonic clock (Envoy's `MonotonicTime`): timers and durations
    /// run on it. It starts at the same number as the wall clock.
    pub(crate) clock_ns: u64,
    pub(crate) start_ns: u64,
    /// Wall clock minus monotonic clock: stepped by
    /// [`Proxy::step_wall_clock_back`]/[`forward`](Proxy::step_wall_clock_forward).
    pub(crate) wall_offset_ns: i128,
    /// Seed of this run's `random_get` generators (one stream per VM).
    pub(crate) random_seed: u64,
    pub(crate) shared: SharedData,
    pub(crate) metrics: BTreeMap<(String, MetricType), Metric>,
    pub(crate) logs: Vec<LogEntry>,
    pub(crate) queues: BTreeMap<u32, Queue>,
    pub(crate) next_queue_token: u32,
    pub(crate) queue_ready: VecDeque<(usize, u32, u32)>,
    pub(crate) vms: Vec<(usize, Weak<Mutex<VmInner>>)>,
    pub(crate) next_vm: usize,
    pub(crate) next_worker: usize,
    pub(crate) http_calls: Vec<HttpCall>,
}

impl State {
    pub(crate) fn wall_ns(&self) -> u64 {
        let wall = i128::from(self.clock_ns) + self.wall_offset_ns;
        u64::try_from(wall.max(0)).unwrap_or(u64::MAX)
    }
}

pub(crate) struct ProxyInner {
    pub(crate) config: ProxyConfig,
    state: Mutex<State>,
}

impl ProxyInner {
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a log line if it passes Envoy's log level, echoing it to the
    /// (test-captured) stderr so failing tests show what the plugin said.
    pub(crate) fn log(&self, vm: &str, level: LogLevel, source: LogSource, message: String) {
        if level < self.config.log_level {
            return;
        }
        let entry = LogEntry {
            vm: vm.to_owned(),
            level,
            message,
            source,
        };
        if self.config.echo_logs {
            eprintln!("{entry}");
        }
        self.state().logs.push(entry);
    }

    /// The wall clock (`proxy_get_current_time_nanoseconds`, WASI realtime).
    pub(crate) fn now_ns(&self) -> u64 {
        self.state().wall_ns()
    }

    /// The monotonic clock (timers, durations).
    pub(crate) fn mono_ns(&self) -> u64 {
        self.state().clock_ns
    }
}

/// Builds a [`Proxy`]. Every setting mirrors a field of Envoy's
/// `envoy.extensions.wasm.v3.PluginConfig`, except the test-only ones.
pub struct ProxyBuilder {
    wasm: WasmSource,
    plugin_config: Vec<u8>,
    vm_config: Vec<u8>,
    vm_id: String,
    root_id: String,
    plugin_name: String,
    log_level: LogLevel,
    trap_policy: TrapPolicy,
    call_timeout: Duration,
    echo_logs: bool,
    start_unix_ns: u64,
    env: Vec<(String, String)>,
    clusters: Vec<String>,
    random_seed: Option<u64>,
    clear_route_cache: bool,
}

enum WasmSource {
    Path(PathBuf),
    Bytes(String, Vec<u8>),
}

impl ProxyBuilder {
    /// Plugin configuration (`config.configuration`), what the plugin reads
    /// with `get_plugin_configuration()` during `proxy_on_configure`.
    pub fn plugin_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.plugin_config = config.into();
        self
    }

    /// VM configuration (`vm_config.configuration`), for `proxy_on_vm_start`.
    pub fn vm_config(mut self, config: impl Into<Vec<u8>>) -> Self {
        self.vm_config = config.into();
        self
    }

    /// `vm_config.vm_id` (shared data and queues are scoped by it). Default "".
    pub fn vm_id(mut self, id: impl Into<String>) -> Self {
        self.vm_id = id.into();
        self
    }

    /// `config.root_id`. Default "".
    pub fn root_id(mut self, id: impl Into<String>) -> Self {
        self.root_id = id.into();
        self
    }

    /// `config.name` (the `plugin_name` property). Default "".
    pub fn plugin_name(mut self, name: impl Into<String>) -> Self {
        self.plugin_name = name.into();
        self
    }

    /// Envoy's log level (`--log-level`, default `info`): what
    /// `proxy_get_log_level` returns; lower lines are dropped, as Envoy drops them.
    pub fn log_level(mut self, level: LogLevel) -> Self {
        self.log_level = level;
        self
    }

    /// What a trap does (default [`TrapPolicy::Panic`]).
    pub fn trap_policy(mut self, policy: TrapPolicy) -> Self {
        self.trap_policy = policy;
        self
    }

    /// Wall-clock limit for one guest call before it is interrupted as a
    /// runaway loop (default 10 s). Envoy has no such limit; this only keeps
    /// a buggy plugin from hanging the test run.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Whether log lines are also printed to stderr (default true; libtest
    /// only shows them for failing tests).
    pub fn echo_logs(mut self, echo: bool) -> Self {
        self.echo_logs = echo;
        self
    }

    /// Where the virtual clock starts, in Unix nanoseconds.
    pub fn start_time_unix_nanos(mut self, nanos: u64) -> Self {
        self.start_unix_ns = nanos;
        self
    }

    /// An environment variable exposed through WASI `environ_get`
    /// (`vm_config.environment_variables`). None by default.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Declares an upstream cluster that `proxy_http_call` may target. Calls
    /// to undeclared clusters get `BAD_ARGUMENT`, as in Envoy.
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.clusters.push(name.into());
        self
    }

    /// Seeds `random_get` (default: a fresh seed per proxy, i.e. per run, as
    /// Envoy's `RAND_bytes` differs per run). Every VM still gets its own
    /// stream from the seed. The seed in use is [`Proxy::random_seed`]; set
    /// it to replay a failing run.
    pub fn random_seed(mut self, seed: u64) -> Self {
        self.random_seed = Some(seed);
        self
    }

    /// Removes the foreign function `clear_route_cache`, which Envoy 1.40
    /// offers: `proxy_call_foreign_function("clear_route_cache")` then
    /// answers NOT_FOUND, as from a host that lacks it.
    pub fn without_clear_route_cache(mut self) -> Self {
        self.clear_route_cache = false;
        self
    }

    /// Compiles (once per process) and checks the module, and creates the
    /// process. No VM is started yet: see [`Proxy::start_vm`] and [`Proxy::boot`].
    pub fn build(self) -> Result<Proxy, StartError> {
        let module = match &self.wasm {
            WasmSource::Path(p) => engine::load_path(p),
            WasmSource::Bytes(name, bytes) => engine::load_bytes(name, bytes),
        }
        .map_err(StartError::Load)?;
        let config = ProxyConfig {
            module,
            vm_id: self.vm_id,
            root_id: self.root_id,
            plugin_name: self.plugin_name,
            vm_config: self.vm_config,
            log_level: self.log_level,
            trap_policy: self.trap_policy,
            call_timeout: self.call_timeout,
            echo_logs: self.echo_logs,
            env: self.env,
            clusters: self.clusters,
            clear_route_cache: self.clear_route_cache,
        };
        let state = State {
            plugin_config: self.plugin_config,
            clock_ns: self.start_unix_ns,
            start_ns: self.start_unix_ns,
            wall_offset_ns: 0,
            random_seed: self.random_seed.unwrap_or_else(fresh_seed),
            shared: SharedData {
                entries: HashMap::new(),
                next_cas: 1,
                forced_mismatches: HashMap::new(),
                mismatches: HashMap::new(),
            },
            metrics: BTreeMap::new(),
            logs: Vec::new(),
            queues: BTreeMap::new(),
            next_queue_token: 1,
            queue_ready: VecDeque::new(),
            vms: Vec::new(),
            next_vm: 0,
            next_worker: 0,
            http_calls: Vec::new(),
        };
        Ok(Proxy {
            inner: Arc::new(ProxyInner {
                config,
                state: Mutex::new(state),
            }),
        })
    }
}

/// A seed that differs per call and per process (std's per-process random
/// hasher keys, plus a counter and the time).
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// One fake Envoy process running one Wasm plugin.
///
/// It owns what Envoy shares between the VMs of a plugin: shared data (with
/// CAS), shared queues, the stats store, the log, the (virtual) clock and
/// the plugin configuration. Each [`Vm`] is one thread-local Wasm VM (the
/// main thread's or a worker's) with its own wasmtime store. `Proxy` is a
/// cheap `Arc` handle: clone it freely; tests running in parallel each build
/// their own.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) inner: Arc<ProxyInner>,
}

impl Proxy {
    /// A builder for the module at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> ProxyBuilder {
        Self::new_builder(WasmSource::Path(path.into()))
    }

    /// A builder for an in-memory module (e.g. from `wat::parse_str`);
    /// `name` is used in messages.
    pub fn builder_from_bytes(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> ProxyBuilder {
        Self::new_builder(WasmSource::Bytes(name.into(), bytes.into()))
    }

    fn new_builder(wasm: WasmSource) -> ProxyBuilder {
        ProxyBuilder {
            wasm,
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            vm_id: String::new(),
            root_id: String::new(),
            plugin_name: String::new(),
            log_level: LogLevel::Info,
            trap_policy: TrapPolicy::Panic,
            call_timeout: Duration::from_secs(10),
            echo_logs: true,
            start_unix_ns: DEFAULT_START_UNIX_SECS * 1_000_000_000,
            env: Vec::new(),
            clusters: Vec::new(),
            random_seed: None,
            clear_route_cache: true,
        }
    }

    /// Starts one thread-local VM the way Envoy starts a worker's: instantiate,
    /// `_initialize` (+ `main`), then a root context: `proxy_on_context_create(root, 0)`,
    /// `proxy_on_vm_start`, `proxy_on_configure`. Labelled `worker_<n>` (numbered in start order).
    pub fn start_vm(&self) -> Result<Vm, StartError> {
        let label = {
            let mut st = self.inner.state();
            st.next_worker += 1;
            format!("worker_{}", st.next_worker - 1)
        };
        self.start_vm_named(&label)
    }

    /// Like [`start_vm`](Self::start_vm) with an explicit label for logs.
    pub fn start_vm_named(&self, label: &str) -> Result<Vm, StartError> {
        Vm::start(self.clone(), label, true)
    }

    /// Envoy's start-up sequence for an HTTP Wasm filter with `workers`
    /// worker threads: the base VM (initialised, never configured), the
    /// configuration canary (started, configured, then discarded: its
    /// `proxy_on_vm_start`/`proxy_on_configure` side effects on shared data and
    /// metrics stay, as in Envoy), then one VM for the main thread (`"main"`)
    /// and one per worker (`"worker_<n>"`), each started and configured.
    /// Returns `[main, worker_0, …]`.
    pub fn boot(&self, workers: usize) -> Result<Vec<Vm>, StartError> {
        drop(Vm::start(self.clone(), "base", false)?);
        self.canary()?;
        let mut vms = vec![Vm::start(self.clone(), "main", true)?];
        for _ in 0..workers {
            vms.push(self.start_vm()?);
        }
        Ok(vms)
    }

    /// Envoy's configuration canary (`WasmHandleBase::canary`): a throwaway
    /// VM is started and configured with the current plugin configuration; a
    /// refusal means Envoy rejects the configuration.
    pub fn canary(&self) -> Result<(), StartError> {
        Vm::start(self.clone(), "canary", true).map(drop)
    }

    /// A plugin configuration update (LDS/ECDS), as Envoy applies it: the
    /// canary runs the new configuration first and, if refused, nothing
    /// changes and the error (with the log lines) is returned. Otherwise
    /// every live VM gets a *new* root context (new id, same `root_id`):
    /// `proxy_on_context_create`, `proxy_on_vm_start`, `proxy_on_configure`.
    /// New streams use it; the old root context is shut down
    /// (`proxy_on_done`, then `proxy_on_delete`) once its in-flight streams
    /// have finished, like Envoy draining the old filter chain.
    pub fn reconfigure(&self, plugin_config: impl Into<Vec<u8>>) -> Result<(), StartError> {
        let new = plugin_config.into();
        let old = std::mem::replace(&mut self.inner.state().plugin_config, new.clone());
        if let Err(e) = self.canary() {
            self.inner.state().plugin_config = old;
            return Err(e);
        }
        for vm in self.live_vms() {
            vm.reconfigure_root(&new)?;
        }
        Ok(())
    }

    /// The current plugin configuration.
    pub fn plugin_config(&self) -> Vec<u8> {
        self.inner.state().plugin_config.clone()
    }

    pub(crate) fn register_vm(&self, vm: &Arc<Mutex<VmInner>>) -> usize {
        let mut st = self.inner.state();
        let id = st.next_vm;
        st.next_vm += 1;
        st.vms.push((id, Arc::downgrade(vm)));
        id
    }

    pub(crate) fn live_vms(&self) -> Vec<Vm> {
        let mut st = self.inner.state();
        st.vms.retain(|(_, w)| w.strong_count() > 0);
        st.vms
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .map(|inner| Vm { inner })
            .collect()
    }

    fn vm_by_id(&self, id: usize) -> Option<Vm> {
        let st = self.inner.state();
        st.vms
            .iter()
            .find(|(i, _)| *i == id)
            .and_then(|(_, w)| w.upgrade())
            .map(|inner| Vm { inner })
    }

    /// The traps of the live VMs that failed (empty when none did).
    pub fn trapped_vms(&self) -> Vec<crate::TrapInfo> {
        self.live_vms()
            .into_iter()
            .filter_map(|vm| vm.trapped())
            .collect()
    }

    // ---- clock -------------------------------------------------------------

    /// The virtual wall clock (Unix nanoseconds): what
    /// `proxy_get_current_time_nanoseconds` and WASI `clock_time_get` return.
    pub fn now_unix_nanos(&self) -> u64 {
        self.inner.now_ns()
    }

    /// [`now_unix_nanos`](Self::now_unix_nanos) in milliseconds.
    pub fn now_unix_ms(&self) -> u64 {
        self.now_unix_nanos() / 1_000_000
    }

    /// The virtual monotonic clock (nanoseconds; it starts at the same
    /// number as the wall clock and never jumps).
    pub fn monotonic_nanos(&self) -> u64 {
        self.inner.mono_ns()
    }

    /// Steps the wall clock back by `by` (an NTP correction): what
    /// `proxy_get_current_time_nanoseconds` and WASI realtime return jumps
    /// back; the monotonic clock, timers and ticks do not move. Envoy reads
    /// `std::chrono::system_clock` for the former and its dispatcher's
    /// monotonic clock for the latter, so a plugin sees exactly this.
    pub fn step_wall_clock_back(&self, by: Duration) {
        let mut st = self.inner.state();
        st.wall_offset_ns -= i128::try_from(by.as_nanos()).unwrap_or(i128::MAX / 2);
    }

    /// Steps the wall clock forward by `by` without any time passing: no
    /// tick fires, durations do not grow.
    pub fn step_wall_clock_forward(&self, by: Duration) {
        let mut st = self.inner.state();
        st.wall_offset_ns += i128::try_from(by.as_nanos()).unwrap_or(i128::MAX / 2);
    }

    /// The seed of this proxy's `random_get` (see [`ProxyBuilder::random_seed`]).
    pub fn random_seed(&self) -> u64 {
        self.inner.state().random_seed
    }

    /// Virtual (monotonic) time elapsed since the proxy was built.
    pub fn elapsed(&self) -> Duration {
        let st = self.inner.state();
        Duration::from_nanos(st.clock_ns.saturating_sub(st.start_ns))
    }

    /// Lets `by` pass: both clocks move forward by it. Timers fire in time order, as
    /// Envoy's dispatchers would fire them: a root context with tick period
    /// `p` set at time `t` gets `proxy_on_tick` at `t+p`, `t+2p`, … (the
    /// clock reads the firing time during the call). Pending shared-queue
    /// notifications are delivered first.
    pub fn advance(&self, by: Duration) {
        self.dispatch();
        let target = {
            let st = self.inner.state();
            st.clock_ns
                .saturating_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX))
        };
        loop {
            let next = self
                .live_vms()
                .into_iter()
                .filter_map(|vm| vm.next_tick_due().map(|due| (due, vm)))
                .filter(|(due, _)| *due <= target)
                .min_by_key(|(due, _)| *due);
            let Some((due, vm)) = next else { break };
            {
                let mut st = self.inner.state();
                st.clock_ns = st.clock_ns.max(due);
            }
            vm.fire_due_ticks(due);
            self.dispatch();
        }
        let mut st = self.inner.state();
        st.clock_ns = st.clock_ns.max(target);
    }

    /// Fires every live VM's tick now, without moving the clock: Envoy's
    /// stats show a filter's counters once its tick has flushed them, so a
    /// test lets one tick pass this way before it reads them.
    pub fn tick_now(&self) {
        self.dispatch();
        for vm in self.live_vms() {
            vm.tick();
        }
        self.dispatch();
    }

    /// [`advance`](Self::advance) in milliseconds.
    pub fn advance_ms(&self, ms: u64) {
        self.advance(Duration::from_millis(ms));
    }

    /// Delivers pending `proxy_on_queue_ready` notifications (Envoy posts
    /// them to the registering VM's thread; here they run when the test
    /// calls this, or during [`advance`](Self::advance)).
    pub fn dispatch(&self) {
        loop {
            let next = self.inner.state().queue_ready.pop_front();
            let Some((vm, context_id, token)) = next else {
                break;
            };
            if let Some(vm) = self.vm_by_id(vm) {
                vm.queue_ready(context_id, token);
            }
        }
    }

    // ---- shared data -------------------------------------------------------

    /// Reads shared data: `(value, cas)`.
    pub fn shared_data(&self, key: impl AsRef<[u8]>) -> Option<(Vec<u8>, u32)> {
        self.inner.state().shared.entries.get(key.as_ref()).cloned()
    }

    /// Writes shared data with Envoy's CAS rules (see `proxy_set_shared_data`).
    pub fn set_shared_data(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        cas: u32,
    ) -> Status {
        self.inner
            .state()
            .shared
            .set(key.as_ref(), value.as_ref(), cas)
    }

    /// Fault hook: the next `n` `proxy_set_shared_data` calls on `key` made
    /// by any VM return `CasMismatch` without writing (as if another worker
    /// won every race). Adds to what is still armed; `n` = 0 disarms.
    /// Writes through [`set_shared_data`](Self::set_shared_data) are not
    /// affected.
    pub fn fail_shared_sets(&self, key: impl AsRef<[u8]>, n: u64) {
        let mut st = self.inner.state();
        if n == 0 {
            st.shared.forced_mismatches.remove(key.as_ref());
        } else {
            *st.shared
                .forced_mismatches
                .entry(key.as_ref().to_vec())
                .or_insert(0) += n;
        }
    }

    /// Forced mismatches still armed on `key`.
    pub fn forced_shared_set_failures_left(&self, key: impl AsRef<[u8]>) -> u64 {
        let st = self.inner.state();
        st.shared
            .forced_mismatches
            .get(key.as_ref())
            .copied()
            .unwrap_or(0)
    }

    /// How many guest `proxy_set_shared_data` calls on `key` returned
    /// `CasMismatch` so far (lost races and forced ones).
    pub fn shared_set_mismatches(&self, key: impl AsRef<[u8]>) -> u64 {
        let st = self.inner.state();
        st.shared.mismatches.get(key.as_ref()).copied().unwrap_or(0)
    }

    /// All shared-data keys, sorted.
    pub fn shared_data_keys(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = self.inner.state().shared.entries.keys().cloned().collect();
        keys.sort();
        keys
    }

    // ---- metrics -----------------------------------------------------------

    /// Value of the counter or gauge called `name` (counter first if both
    /// exist); `None` if the plugin never defined it.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let st = self.inner.state();
        [MetricType::Counter, MetricType::Gauge]
            .iter()
            .find_map(|t| st.metrics.get(&(name.to_owned(), *t)).map(|m| m.value))
    }

    /// Value of the counter `name`.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.metric_of(name, MetricType::Counter).map(|m| m.value)
    }

    /// Value of the gauge `name` (Envoy gauges are unsigned).
    pub fn gauge(&self, name: &str) -> Option<u64> {
        self.metric_of(name, MetricType::Gauge).map(|m| m.value)
    }

    /// Samples recorded into the histogram `name`.
    pub fn histogram(&self, name: &str) -> Option<Vec<u64>> {
        self.metric_of(name, MetricType::Histogram)
            .map(|m| m.samples)
    }

    fn metric_of(&self, name: &str, kind: MetricType) -> Option<Metric> {
        self.inner
            .state()
            .metrics
            .get(&(name.to_owned(), kind))
            .cloned()
    }

    /// Every metric, sorted by name then kind.
    pub fn metrics(&self) -> Vec<Metric> {
        self.inner.state().metrics.values().cloned().collect()
    }

    // ---- logs --------------------------------------------------------------

    /// Every log line so far, in order.
    pub fn logs(&self) -> Vec<LogEntry> {
        self.inner.state().logs.clone()
    }

    /// Log lines at `level` or above.
    pub fn logs_at_least(&self, level: LogLevel) -> Vec<LogEntry> {
        self.inner
            .state()
            .logs
            .iter()
            .filter(|l| l.level >= level)
            .cloned()
            .collect()
    }

    /// Whether any log line contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.inner
            .state()
            .logs
            .iter()
            .any(|l| l.message.contains(needle))
    }

    /// Forgets the log so far.
    pub fn clear_logs(&self) {
        self.inner.state().logs.clear();
    }

    // ---- http calls --------------------------------------------------------

    /// `http_call`s made so far (to declared clusters), oldest first.
    pub fn http_calls(&self) -> Vec<HttpCall> {
        self.inner.state().http_calls.clone()
    }

    /// The Proxy-Wasm ABI version the module declares.
    pub fn abi_version(&self) -> crate::AbiVersion {
        self.inner.config.module.abi
    }

    /// How long compiling the module took (once per process; later proxies
    /// report the first compilation).
    pub fn module_compile_time(&self) -> Duration {
        self.inner.config.module.compile_time
    }
}
