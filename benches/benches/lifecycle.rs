//! Criterion, inside wasmtime through the fake Envoy host of `host-tests`:
//! one full request lifecycle (request headers, response headers, then
//! `finish`: log, done, delete) through `sluice.wasm` with the realistic
//! config, against the same lifecycle through the pass-through module
//! (`sluice-passthrough`, every callback returns Continue). The ratio is the
//! cost of Sluice's logic and host calls over the unavoidable cost of the
//! ABI (context creation and six callbacks), on this host.
//!
//! Before the benchmarks it counts every ABI crossing per request (host
//! calls by function, and callbacks/`malloc` calls into the module), with
//! modules rewritten by `sluice_benches::instrument`, and prints the
//! tables (also written to `benches/results/wasmtime-crossings.md`).
//!
//! ```sh
//! cargo build --release --target wasm32-wasip1 -p sluice -p sluice-passthrough
//! cargo bench -p sluice-benches --bench lifecycle
//! SLUICE_CROSSINGS_ONLY=1 cargo bench -p sluice-benches --bench lifecycle   # counts only
//! ```
//!
//! Benchmarks (all per lifecycle):
//! * `wasm/passthrough`, `wasm/sluice`: the comparison.
//! * `wasm/sluice_unmatched`, `_split`, `_rules`, `_breaker`: Sluice with
//!   less to do (unmatched host; sticky split only; + rules; + breakers, no
//!   retry), to see what each part costs.
//! * `phase/<module>/<callback>`: the time of one phase of the lifecycle.
//! * `workers/sluice_<n>`: one or four worker VMs sharing the budget and
//!   breakers, streams spread over them.
//!
//! The report before the benchmarks also times 40 000 requests on ONE VM in
//! blocks (does the per-request cost grow with traffic and uptime?).
//!
//! Each benchmark keeps its VMs for its whole run, as Envoy keeps a worker's
//! VM: the fake host frees a finished stream's context as Envoy does (the
//! test's `Stream` handle keeps it), so nothing it does per call grows with
//! the streams served.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use criterion::Criterion;
use sluice_benches::instrument::{self, instrument, EXPORT_MARK};
use sluice_benches::workload::{
    self, pairs, passthrough_wasm, probe_wasm, read_wasm, request_headers, response_headers,
    sluice_wasm, user, HEADERS_CONFIG, REALISTIC_CONFIG, USERS,
};
use sluice_host::{LogLevel, Proxy, Vm};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

/// Lifecycles between clock advances (1 ms per request: 1000 requests/s).
const BATCH: u64 = 20;

/// A module under test: its wasm, root id and plugin config.
#[derive(Clone)]
struct Module {
    label: &'static str,
    wasm: std::path::PathBuf,
    root_id: &'static str,
    config: String,
}

fn sluice(label: &'static str, config: &str) -> Module {
    Module {
        label,
        wasm: sluice_wasm(),
        root_id: "sluice",
        config: config.to_string(),
    }
}

fn passthrough() -> Module {
    Module {
        label: "passthrough",
        wasm: passthrough_wasm(),
        root_id: "passthrough",
        config: String::new(),
    }
}

/// The host-call probe making exactly Sluice's host calls on its common
/// path with no policy (`benches/hostcall-probe`, kind `sluicelean`): the
/// floor of what Sluice asks of the host, so `wasm/sluice` over this is
/// the cost of Sluice's own code (and of its 10 % canary requests).
fn sluice_calls() -> Module {
    Module {
        label: "sluice_calls",
        wasm: probe_wasm(),
        root_id: "probe",
        config: "sluicelean".to_string(),
    }
}

fn proxy(module: &Module) -> Proxy {
    Proxy::builder(&module.wasm)
        .plugin_config(module.config.clone())
        .root_id(module.root_id)
        .vm_id(module.root_id)
        .echo_logs(false)
        .build()
        .unwrap_or_else(|e| panic!("{}: {e}", module.label))
}

/// The request/response header sets the lifecycles cycle through.
struct Traffic {
    requests: Vec<Vec<(String, String)>>,
    response: Vec<(String, String)>,
}

impl Traffic {
    /// The realistic requests, answered 200 on a route that sets Envoy's
    /// `include_attempt_count_in_response` (as the load run's routes and
    /// the realistic config's `attempt_count_in_response` say): the
    /// response headers carry the router's `x-envoy-attempt-count: 1`.
    fn realistic() -> Traffic {
        let mut traffic = Traffic::with(|n| request_headers(&user(n)));
        traffic
            .response
            .push(("x-envoy-attempt-count".to_string(), "1".to_string()));
        traffic
    }

    fn with(build: impl Fn(usize) -> Vec<(String, String)>) -> Traffic {
        Traffic {
            requests: (0..USERS).map(build).collect(),
            response: response_headers(),
        }
    }
}

/// One request through a VM, as Envoy runs a proxied request: request
/// headers (end of stream), response headers from the upstream (200, one
/// attempt), then log, done and delete.
fn lifecycle(vm: &Vm, request: &[(&str, &str)], response: &[(&str, &str)]) {
    let stream = vm.stream();
    stream.set_attempt_count(1);
    stream.request_headers(request, true);
    stream.response_headers(response, true);
    stream.finish();
}

/// Runs `iters` lifecycles on `vms` (round robin), timing only the
/// lifecycles; the clock moves 1 ms per request (ticks fire outside the
/// timed part).
struct Runner {
    proxy: Proxy,
    vms: Vec<Vm>,
    traffic: Traffic,
    served: u64,
}

impl Runner {
    fn new(module: &Module, traffic: Traffic, workers: usize) -> Runner {
        let proxy = proxy(module);
        let vms = (0..workers).map(|_| proxy.start_vm().unwrap()).collect();
        Runner {
            proxy,
            vms,
            traffic,
            served: 0,
        }
    }

    fn run(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut done = 0;
        let requests: Vec<Vec<(&str, &str)>> =
            self.traffic.requests.iter().map(|r| pairs(r)).collect();
        let response = pairs(&self.traffic.response);
        while done < iters {
            let batch = BATCH.min(iters - done);
            let started = Instant::now();
            for _ in 0..batch {
                let n = self.served as usize;
                let vm = &self.vms[n % self.vms.len()];
                lifecycle(vm, &requests[n % requests.len()], &response);
                self.served += 1;
            }
            total += started.elapsed();
            done += batch;
            self.proxy.advance_ms(batch);
        }
        total
    }
}

impl Runner {
    /// Times one phase of the lifecycle only.
    fn run_phase(&mut self, iters: u64, phase: Phase) -> Duration {
        let requests: Vec<Vec<(&str, &str)>> =
            self.traffic.requests.iter().map(|r| pairs(r)).collect();
        let response = pairs(&self.traffic.response);
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let n = self.served as usize;
            let vm = &self.vms[0];
            let stream = vm.stream();
            stream.set_attempt_count(1);
            let t = Instant::now();
            stream.request_headers(&requests[n % requests.len()], true);
            if phase == Phase::Request {
                total += t.elapsed();
            }
            let t = Instant::now();
            stream.response_headers(&response, true);
            if phase == Phase::Response {
                total += t.elapsed();
            }
            let t = Instant::now();
            stream.finish();
            if phase == Phase::Finish {
                total += t.elapsed();
            }
            self.served += 1;
            if self.served.is_multiple_of(BATCH) {
                self.proxy.advance_ms(BATCH);
            }
        }
        total
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Response,
    Finish,
}

// ------------------------------------------------------------ crossings

/// Crossings per request, by phase, averaged over `requests` lifecycles.
struct Crossings {
    label: String,
    requests: u64,
    /// name → per-phase totals [request, response, finish, ticks]; the
    /// ticks' crossings (flushing what the VM held, refreshing gauges) are
    /// spread over the requests between them (1 ms of clock each).
    counts: BTreeMap<String, [u64; 4]>,
    added_log_import: bool,
    /// All crossings of `requests` requests made after `late_after` others
    /// on the same VM.
    late_total: u64,
    late_after: u64,
}

fn count_crossings(module: &Module, traffic: &Traffic, requests: u64, later: usize) -> Crossings {
    let original = read_wasm(&module.wasm).unwrap();
    let rewritten = instrument(&original).unwrap();
    let proxy =
        Proxy::builder_from_bytes(format!("{} (instrumented)", module.label), rewritten.wasm)
            .plugin_config(module.config.clone())
            .root_id(module.root_id)
            .vm_id(module.root_id)
            .log_level(LogLevel::Trace)
            .echo_logs(false)
            .build()
            .unwrap_or_else(|e| panic!("{} (instrumented): {e}", module.label));
    let vm = proxy.start_vm().unwrap();
    let requests_pairs: Vec<Vec<(&str, &str)>> =
        traffic.requests.iter().map(|r| pairs(r)).collect();
    let response = pairs(&traffic.response);
    // Warm up: first-request effects (lazy statics, the first allocation).
    for n in 0..10 {
        lifecycle(&vm, &requests_pairs[n % requests_pairs.len()], &response);
    }
    proxy.advance_ms(10);
    let mut counts: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    let mut take = |phase: usize, proxy: &Proxy| {
        let logs = proxy.logs();
        let tally = instrument::tally(logs.iter().map(|l| l.message.as_str()));
        for (name, n) in tally {
            counts.entry(name).or_default()[phase] += n;
        }
        proxy.clear_logs();
    };
    // Requests the module steered (the canary's, and with
    // `stable_by_default: false` the stable ones too).
    let mut steered = 0;
    for n in 0..requests as usize {
        let stream = vm.stream();
        stream.set_attempt_count(1);
        proxy.clear_logs();
        stream.request_headers(&requests_pairs[n % requests_pairs.len()], true);
        take(0, &proxy);
        if let Some(cluster) = stream.request_header("x-sluice-cluster") {
            steered += 1;
            assert!(
                cluster == "shop_v1" || cluster == "shop_v2",
                "{}: steered to {cluster}",
                module.label
            );
        }
        stream.response_headers(&response, true);
        take(1, &proxy);
        stream.finish();
        take(2, &proxy);
        // The clock moves outside the request; the ticks that fire are
        // counted apart and spread over the requests.
        proxy.advance_ms(1);
        take(3, &proxy);
    }
    // The rewritten module must still do its job: the realistic split sends
    // a tenth of the users to the canary.
    if module.root_id == "sluice" && module.label != "sluice_unmatched" && requests >= 100 {
        assert!(
            steered > 0,
            "{}: instrumented sluice did not steer",
            module.label
        );
    }
    // The same VM much later: do the crossings per request change with
    // traffic and uptime? (`later` more requests, the clock moving 1 ms each.)
    for n in 0..later {
        lifecycle(&vm, &requests_pairs[n % requests_pairs.len()], &response);
        proxy.advance_ms(1);
        proxy.clear_logs();
    }
    let mut late = 0u64;
    for n in 0..requests as usize {
        lifecycle(&vm, &requests_pairs[n % requests_pairs.len()], &response);
        late += instrument::tally(proxy.logs().iter().map(|l| l.message.as_str()))
            .values()
            .sum::<u64>();
        // Ticks fire here, outside the counted request (as above).
        proxy.advance_ms(1);
        proxy.clear_logs();
    }
    Crossings {
        label: module.label.to_string(),
        requests,
        counts,
        added_log_import: rewritten.added_log_import,
        late_total: late,
        late_after: later as u64 + requests,
    }
}

fn crossings_table(all: &[Crossings]) -> String {
    let mut out = String::new();
    for c in all {
        let per = |n: u64| n as f64 / c.requests as f64;
        let _ = writeln!(
            out,
            "\n### {} — crossings per request (mean of {} requests)\n",
            c.label, c.requests
        );
        out.push_str(
            "| crossing | request headers | response headers | log+done+delete | ticks (spread) | total |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        let mut rows: Vec<(&String, &[u64; 4])> = c.counts.iter().collect();
        rows.sort_by(|a, b| {
            let total = |r: &[u64; 4]| r.iter().sum::<u64>();
            total(b.1).cmp(&total(a.1)).then(a.0.cmp(b.0))
        });
        let mut sums = [[0u64; 4]; 2];
        for (name, phases) in &rows {
            let kind = usize::from(name.starts_with(EXPORT_MARK));
            for (sum, n) in sums[kind].iter_mut().zip(phases.iter()) {
                *sum += n;
            }
            let total: u64 = phases.iter().sum();
            let _ = writeln!(
                out,
                "| `{name}` | {:.2} | {:.2} | {:.2} | {:.3} | **{:.2}** |",
                per(phases[0]),
                per(phases[1]),
                per(phases[2]),
                per(phases[3]),
                per(total)
            );
        }
        for (kind, title) in [
            (0, "host calls (module → host)"),
            (1, "entries (host → module)"),
        ] {
            let s = sums[kind];
            let _ = writeln!(
                out,
                "| **{title}** | {:.2} | {:.2} | {:.2} | {:.3} | **{:.2}** |",
                per(s[0]),
                per(s[1]),
                per(s[2]),
                per(s[3]),
                per(s.iter().sum())
            );
        }
        // Per request (the ticks apart, as in the late count).
        let early: u64 = c.counts.values().flat_map(|p| p.iter().take(3)).sum();
        let _ = writeln!(
            out,
            "\nAll crossings per request: {:.2} in the first {} requests of the VM, {:.2} in \
             {} requests after {} more (the clock at +{} s): {}.",
            per(early),
            c.requests,
            per(c.late_total),
            c.requests,
            c.late_after,
            (c.late_after + c.requests) / 1000,
            if early == c.late_total {
                "the same"
            } else {
                "DIFFERENT"
            }
        );
        if c.added_log_import {
            let _ = writeln!(
                out,
                "\n(the module imports no `proxy_log`; the counter added one, uncounted)"
            );
        }
    }
    out
}

/// Linear memory of a VM after `requests` lifecycles (uninstrumented).
fn memory_after(module: &Module, traffic: Traffic, requests: u64) -> usize {
    let runner = Runner::new(module, traffic, 1);
    let requests_pairs: Vec<Vec<(&str, &str)>> =
        runner.traffic.requests.iter().map(|r| pairs(r)).collect();
    let response = pairs(&runner.traffic.response);
    for n in 0..requests as usize {
        lifecycle(
            &runner.vms[0],
            &requests_pairs[n % requests_pairs.len()],
            &response,
        );
        if n % 1000 == 999 {
            runner.proxy.advance_ms(1000);
        }
    }
    runner.vms[0].memory_size()
}

fn crossings_report() {
    let sluice_config = REALISTIC_CONFIG;
    let modules = [
        sluice("sluice", sluice_config),
        sluice("sluice_headers", HEADERS_CONFIG),
        passthrough(),
    ];
    let mut all = Vec::new();
    for module in &modules {
        all.push(count_crossings(module, &Traffic::realistic(), 1000, 15_000));
    }
    let mut text = String::from(
        "# ABI crossings per request, wasmtime fake host\n\n\
         Generated by `cargo bench -p sluice-benches --bench lifecycle` \
         (`SLUICE_CROSSINGS_ONLY=1` for this part alone). One request = request headers \
         (end of stream), response headers (200), then log, done and delete, as Envoy runs a \
         proxied request; the realistic config `benches/config/sluice.json`, 1000 users \
         (sticky keys) in turn, the clock moving 1 ms per request. `hc>` = the module calls \
         the host (an import); `cb<` = the host calls the module (an export: callbacks, and \
         `malloc` for every buffer the host hands over). Sluice's ticks (every 250 ms: \
         writing what the VM held back, flushing counters, refreshing gauges) are counted \
         apart and spread over the requests between them: at 1000 requests/s here, so in \
         Envoy at 10 000/s per worker they weigh ten times less.\n",
    );
    let _ = write!(text, "\n- Filter code: {}", workload::filter_revision());
    for module in &modules {
        let size = std::fs::metadata(&module.wasm)
            .map(|m| m.len())
            .unwrap_or(0);
        let _ = write!(
            text,
            "\n- `{}`: {} bytes ({:.1} KiB), digest {}",
            module.wasm.display(),
            size,
            size as f64 / 1024.0,
            workload::file_digest(&module.wasm)
        );
    }
    text.push('\n');
    text.push_str(&crossings_table(&all));

    text.push_str(
        "\n### Crossings per request of every `wasm/*` benchmark\n\n\
         | benchmark | host calls | entries (callbacks + malloc) | total |\n|---|---:|---:|---:|\n",
    );
    for (module, traffic) in cases() {
        let c = count_crossings(&module, &traffic, 200, 0);
        let sum = |mark: &str| {
            c.counts
                .iter()
                .filter(|(name, _)| name.starts_with(mark))
                .flat_map(|(_, phases)| phases.iter())
                .sum::<u64>() as f64
                / c.requests as f64
        };
        let (calls, entries) = (sum(instrument::IMPORT_MARK), sum(EXPORT_MARK));
        let _ = writeln!(
            text,
            "| `wasm/{}` | {calls:.2} | {entries:.2} | {:.2} |",
            module.label,
            calls + entries
        );
    }

    text.push_str("\n### Linear memory per VM (wasmtime), after N requests\n\n| module | 0 | 10 000 | 100 000 |\n|---|---:|---:|---:|\n");
    for module in &modules {
        let sizes: Vec<String> = [0u64, 10_000, 100_000]
            .iter()
            .map(|&n| {
                let bytes = memory_after(module, Traffic::realistic(), n);
                format!("{} KiB", bytes / 1024)
            })
            .collect();
        let _ = writeln!(text, "| {} | {} |", module.label, sizes.join(" | "));
    }
    if std::env::var_os("SLUICE_SKIP_GROWTH").is_none() {
        text.push_str(&growth_report());
    }
    println!("{text}");
    let path = workload::repo_root().join("benches/results/wasmtime-crossings.md");
    if let Err(e) = std::fs::write(&path, &text) {
        eprintln!("could not write {}: {e}", path.display());
    } else {
        println!("(written to {})\n", path.display());
    }
}

// ------------------------------------------------------------ benchmarks

/// The realistic config with parts removed, to price each part.
fn reduced_config(keep_rules: bool, keep_breaker: bool, keep_retry: bool) -> String {
    let mut value: serde_json::Value = serde_json::from_str(REALISTIC_CONFIG).unwrap();
    let service = &mut value["services"][0];
    let object = service.as_object_mut().unwrap();
    if !keep_rules {
        object.remove("rules");
    }
    if !keep_breaker {
        object.remove("breaker");
    }
    if !keep_retry {
        object.remove("retry");
    }
    value.to_string()
}

/// The modules the `wasm/*` benchmarks compare, with their traffic.
fn cases() -> Vec<(Module, Traffic)> {
    vec![
        (passthrough(), Traffic::realistic()),
        (sluice_calls(), Traffic::realistic()),
        (sluice("sluice", REALISTIC_CONFIG), Traffic::realistic()),
        // The same policy as configured before issue 13: retry headers and
        // the steering header written on every request.
        (
            sluice("sluice_headers", HEADERS_CONFIG),
            Traffic::realistic(),
        ),
        (
            sluice("sluice_unmatched", REALISTIC_CONFIG),
            Traffic::with(|n| {
                let mut headers = request_headers(&user(n));
                headers[0].1 = "other.local".to_string();
                headers
            }),
        ),
        (
            sluice("sluice_split", &reduced_config(false, false, false)),
            Traffic::realistic(),
        ),
        (
            sluice("sluice_rules", &reduced_config(true, false, false)),
            Traffic::realistic(),
        ),
        (
            sluice("sluice_breaker", &reduced_config(true, true, false)),
            Traffic::realistic(),
        ),
    ]
}

fn wasm(c: &mut Criterion) {
    let mut group = c.benchmark_group("wasm");
    for (module, traffic) in cases() {
        let mut runner = Runner::new(&module, traffic, 1);
        group.bench_function(module.label, |b| b.iter_custom(|iters| runner.run(iters)));
    }
    group.finish();
}

fn phases(c: &mut Criterion) {
    let mut group = c.benchmark_group("phase");
    for module in [passthrough(), sluice("sluice", REALISTIC_CONFIG)] {
        for (name, phase) in [
            ("request_headers", Phase::Request),
            ("response_headers", Phase::Response),
            ("finish", Phase::Finish),
        ] {
            let mut runner = Runner::new(&module, Traffic::realistic(), 1);
            group.bench_function(format!("{}/{name}", module.label), |b| {
                b.iter_custom(|iters| runner.run_phase(iters, phase))
            });
        }
    }
    group.finish();
}

fn workers(c: &mut Criterion) {
    let mut group = c.benchmark_group("workers");
    let module = sluice("sluice", REALISTIC_CONFIG);
    for workers in [1usize, 4] {
        let mut runner = Runner::new(&module, Traffic::realistic(), workers);
        group.bench_function(format!("sluice_{workers}"), |b| {
            b.iter_custom(|iters| runner.run(iters))
        });
    }
    group.finish();
}

/// Per-request time over one VM's lifetime: `blocks` blocks of `per_block`
/// lifecycles on the same VM (no recycling), the clock moving 1 ms per
/// request. Returns, per block, the mean µs of the request+response phases
/// and of `finish` (log, done, delete).
fn growth(module: &Module, blocks: usize, per_block: usize) -> Vec<(f64, f64)> {
    let runner = Runner::new(module, Traffic::realistic(), 1);
    let requests: Vec<Vec<(&str, &str)>> =
        runner.traffic.requests.iter().map(|r| pairs(r)).collect();
    let response = pairs(&runner.traffic.response);
    let vm = &runner.vms[0];
    let mut out = Vec::new();
    let mut n = 0usize;
    for _ in 0..blocks {
        let (mut headers, mut finish) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..per_block {
            let stream = vm.stream();
            stream.set_attempt_count(1);
            let t = Instant::now();
            stream.request_headers(&requests[n % requests.len()], true);
            stream.response_headers(&response, true);
            headers += t.elapsed();
            let t = Instant::now();
            stream.finish();
            finish += t.elapsed();
            n += 1;
            runner.proxy.advance_ms(1);
        }
        let mean = |d: Duration| d.as_secs_f64() * 1e6 / per_block as f64;
        out.push((mean(headers), mean(finish)));
    }
    out
}

fn growth_report() -> String {
    const BLOCKS: usize = 8;
    const PER_BLOCK: usize = 5_000;
    let mut text = format!(
        "\n### Per-request time over a VM's lifetime (wasmtime, µs, one VM, {} requests, \
         1 ms of clock per request)\n\n\
         `headers` = request + response headers phases; `finish` = log, done, delete. \
         The fake host frees a finished stream's context as Envoy does, so a cost that grew \
         here would be the module's. The other checks are the crossings per request early \
         and late in a VM's life (above), its linear memory (above), and the native \
         `realistic/lifecycle_after_1M_requests` benchmark.\n\n\
         | requests served | passthrough headers | sluice headers | passthrough finish | sluice finish | finish Δ |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        BLOCKS * PER_BLOCK
    );
    let base = growth(&passthrough(), BLOCKS, PER_BLOCK);
    let ours = growth(&sluice("sluice", REALISTIC_CONFIG), BLOCKS, PER_BLOCK);
    for (block, (b, o)) in base.iter().zip(&ours).enumerate() {
        let _ = writeln!(
            text,
            "| {}–{} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            block * PER_BLOCK,
            (block + 1) * PER_BLOCK,
            b.0,
            o.0,
            b.1,
            o.1,
            o.1 - b.1
        );
    }
    text
}

fn main() {
    for path in [sluice_wasm(), passthrough_wasm(), probe_wasm()] {
        if let Err(e) = read_wasm(Path::new(&path)) {
            eprintln!("{e}");
            std::process::exit(2);
        }
    }
    crossings_report();
    if std::env::var_os("SLUICE_CROSSINGS_ONLY").is_some() {
        return;
    }
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    wasm(&mut criterion);
    phases(&mut criterion);
    workers(&mut criterion);
    criterion.final_summary();
    black_box(());
}
