//! `sluice-bench-report`: turns criterion's last results
//! (`target/criterion/**/new/estimates.json`) into one Markdown page,
//! `benches/results/criterion-<stamp>.md`, with the derived numbers the
//! targets are about: the wasmtime lifecycle ratio Sluice ÷ pass-through,
//! cost against the number of services and rules (native), and growth
//! with workers. `benches/bench.sh` runs it after the benchmarks.
//!
//!     sluice-bench-report [--stamp TEXT] [--out DIR] [--criterion DIR] [--since UNIX_SECS]
//!                         [--load-before LOAD]
//!
//! `--since` keeps only results written since then (criterion keeps the last
//! result of every benchmark ever run, also of ones since removed).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use sluice_benches::workload;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One benchmark's estimate, ns.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    mean: f64,
    low: f64,
    high: f64,
}

fn modified_secs(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn read_estimates(dir: &Path, since: u64, out: &mut BTreeMap<String, Estimate>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let estimates = path.join("new/estimates.json");
        let benchmark = path.join("new/benchmark.json");
        if estimates.is_file() && benchmark.is_file() {
            if modified_secs(&estimates) < since {
                continue;
            }
            let read = |p: &Path| -> Option<serde_json::Value> {
                serde_json::from_slice(&std::fs::read(p).ok()?).ok()
            };
            if let (Some(e), Some(b)) = (read(&estimates), read(&benchmark)) {
                let id = b["full_id"].as_str().unwrap_or_default().to_string();
                let mean = &e["mean"];
                if let (Some(m), Some(l), Some(h)) = (
                    mean["point_estimate"].as_f64(),
                    mean["confidence_interval"]["lower_bound"].as_f64(),
                    mean["confidence_interval"]["upper_bound"].as_f64(),
                ) {
                    out.insert(
                        id,
                        Estimate {
                            mean: m,
                            low: l,
                            high: h,
                        },
                    );
                }
            }
        } else {
            read_estimates(&path, since, out);
        }
    }
}

fn time(ns: f64) -> String {
    if ns >= 1_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let mut stamp = None;
    let mut out = workload::repo_root().join("benches/results");
    let mut criterion = workload::repo_root().join("target/criterion");
    let mut since = 0u64;
    let mut load_before: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stamp" => stamp = args.next(),
            "--out" => out = PathBuf::from(args.next().unwrap_or_default()),
            "--criterion" => criterion = PathBuf::from(args.next().unwrap_or_default()),
            "--since" => since = args.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            "--load-before" => load_before = args.next(),
            _ => {
                eprintln!(
                    "usage: sluice-bench-report [--stamp TEXT] [--out DIR] [--criterion DIR]"
                );
                std::process::exit(2);
            }
        }
    }
    let stamp = stamp.unwrap_or_else(|| "latest".to_string());
    let mut estimates = BTreeMap::new();
    read_estimates(&criterion, since, &mut estimates);
    if estimates.is_empty() {
        eprintln!(
            "sluice-bench-report: no criterion results under {}: run benches/bench.sh",
            criterion.display()
        );
        std::process::exit(1);
    }
    let get = |id: &str| estimates.get(id).copied();
    let load = match &load_before {
        Some(before) => format!(
            "1-minute load average {before} before the benchmarks started, {} when this report \
             was written (the benchmarks themselves keep about one CPU busy)",
            load_average()
        ),
        None => format!(
            "1-minute load average when this report was written: {}",
            load_average()
        ),
    };
    let noisy = load_before
        .as_deref()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l >= 0.5);
    let mut md = format!(
        "# Criterion results — {stamp}\n\n{}- Filter code: {}\n- `sluice.wasm`: {} bytes, digest {}\n\
         - {load}. The numbers are only comparable when the machine was idle (load < 0.5).\n",
        if noisy {
            "> **Noisy run**: other work was running when the benchmarks started; re-run \
             `bash benches/bench.sh` on an idle machine.\n\n"
        } else {
            ""
        },
        workload::filter_revision(),
        std::fs::metadata(workload::sluice_wasm()).map_or(0, |m| m.len()),
        workload::file_digest(&workload::sluice_wasm()),
    );

    // Targets and derived numbers.
    md.push_str("\n## Derived\n\n| what | value | target |\n|---|---:|---|\n");
    if let (Some(s), Some(p)) = (get("wasm/sluice"), get("wasm/passthrough")) {
        let _ = writeln!(
            md,
            "| wasmtime lifecycle, Sluice ÷ pass-through | {:.2} × ({} vs {}) | ≤ 1.5 × |",
            s.mean / p.mean,
            time(s.mean),
            time(p.mean)
        );
    }
    for rules in [1, 10, 50] {
        let row: Vec<Option<Estimate>> = [1, 10, 100]
            .iter()
            .map(|s| get(&format!("lifecycle/s{s}_r{rules}")))
            .collect();
        if let [Some(a), Some(_), Some(c)] = row.as_slice() {
            let _ = writeln!(
                md,
                "| native lifecycle, {rules} rule(s): 100 services ÷ 1 service | {:.2} × | ≈ 1 (a lookup, not a scan) |",
                c.mean / a.mean
            );
        }
    }
    if let (Some(r1), Some(r10), Some(r50)) = (
        get("lifecycle/s1_r1"),
        get("lifecycle/s1_r10"),
        get("lifecycle/s1_r50"),
    ) {
        let _ = writeln!(
            md,
            "| native, per extra rule (1 → 10, 10 → 50 rules) | {} , {} | at most linear: equal steps |",
            time((r10.mean - r1.mean) / 9.0),
            time((r50.mean - r10.mean) / 40.0)
        );
    }
    if let (Some(a), Some(b)) = (get("find_service/s1"), get("find_service/s1000")) {
        let _ = writeln!(
            md,
            "| host lookup, 1000 services ÷ 1 service | {:.2} × | ≈ 1 |",
            b.mean / a.mean
        );
    }
    if let (Some(a), Some(b)) = (
        get("realistic/lifecycle"),
        get("realistic/lifecycle_after_1M_requests"),
    ) {
        let _ = writeln!(
            md,
            "| native lifecycle after 1 M requests / 1000 s of uptime ÷ fresh | {:.2} × | ≈ 1 |",
            b.mean / a.mean
        );
    }
    if let (Some(a), Some(b)) = (get("workers/sluice_1"), get("workers/sluice_4")) {
        let _ = writeln!(
            md,
            "| wasmtime lifecycle, 4 worker VMs ÷ 1 | {:.2} × | ≈ 1 |",
            b.mean / a.mean
        );
    }

    md.push_str("\n## Every benchmark (mean, 95 % interval)\n\n| benchmark | mean | interval |\n|---|---:|---:|\n");
    for (id, e) in &estimates {
        let _ = writeln!(
            md,
            "| `{id}` | {} | {} – {} |",
            time(e.mean),
            time(e.low),
            time(e.high)
        );
    }
    md.push_str(
        "\nSee `benches/README.md` for what each benchmark measures, and \
         `benches/results/wasmtime-crossings.md` for the host calls per request.\n",
    );
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("{}: {e}", out.display());
    }
    let path = out.join(format!("criterion-{stamp}.md"));
    match std::fs::write(&path, &md) {
        Ok(()) => {
            println!("{md}");
            eprintln!("sluice-bench-report: wrote {}", path.display());
        }
        Err(e) => {
            eprintln!("sluice-bench-report: {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
