//! `--count-instructions`: instructions per request in a real Envoy, counted
//! by valgrind's callgrind.
//!
//! CPU time on this machine drifts by a third within minutes, so the load
//! run prices setups only as ratios within a round, and a few microseconds
//! (Sluice's own code against its host calls) stay inside the spread.
//! Instructions executed do not drift: the same binary, module and requests
//! give the same count whatever else the machine does. They are not time
//! (a cache miss costs more than an add), so this complements the load run
//! and does not replace it.
//!
//! Callgrind also says WHERE the instructions ran, by object: the Envoy
//! binary (Envoy, V8's runtime and builtins, the allocator), `???` (code in
//! anonymous memory: the modules as V8 compiled them and V8's wrappers
//! around each call; Envoy with no filter runs some too), libc. Between two
//! setups that make the same calls, the difference in `???` is the
//! module's own code, apart from the host's side of its calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Self cost (`Ir`) per object of a callgrind dump, and its total.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dump {
    pub by_object: BTreeMap<String, u64>,
    pub total: u64,
}

/// Parses a callgrind output file (format: valgrind's
/// docs/callgrind-format). Self cost is the cost lines under the current
/// `ob=`; the line after `calls=` is the inclusive cost of a call, already
/// counted in the callee, so it is skipped. Names are compressed: `(id)
/// name` defines an id, `(id)` refers to it, in `ob=` and `cob=` alike.
pub fn parse(text: &str) -> Result<Dump, String> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut current = String::from("?");
    let mut after_calls = false;
    let mut dump = Dump::default();
    let mut totals: Option<u64> = None;
    let define = |value: &str, names: &mut BTreeMap<String, String>| -> String {
        let value = value.trim();
        match value
            .strip_prefix('(')
            .and_then(|rest| rest.split_once(')'))
        {
            Some((id, name)) => {
                let name = name.trim();
                if !name.is_empty() {
                    names.insert(id.to_string(), name.to_string());
                }
                names.get(id).cloned().unwrap_or_else(|| format!("({id})"))
            }
            None => value.to_string(),
        }
    };
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("ob=") {
            current = define(value, &mut names);
        } else if let Some(value) = line.strip_prefix("cob=") {
            define(value, &mut names);
        } else if line.starts_with("calls=") {
            after_calls = true;
        } else if let Some(value) = line.strip_prefix("totals:") {
            totals = value.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            if after_calls {
                after_calls = false;
                continue;
            }
            // "<position> <Ir>": positions are lines (no --dump-instr).
            let cost = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            *dump.by_object.entry(current.clone()).or_default() += cost;
            dump.total += cost;
        }
    }
    match totals {
        Some(totals) if totals == dump.total => Ok(dump),
        Some(totals) => Err(format!(
            "callgrind dump: self costs sum to {} but totals: says {totals}",
            dump.total
        )),
        None => Err("callgrind dump: no totals: line".to_string()),
    }
}

/// One setup's count in one round, per request: in all and by category.
#[derive(Debug, Clone)]
pub struct PerRequest {
    pub total: f64,
    pub by_category: BTreeMap<&'static str, f64>,
}

impl PerRequest {
    pub fn new(dump: &Dump, requests: usize) -> Self {
        let per = |count: u64| count as f64 / requests.max(1) as f64;
        let mut by_category: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (object, cost) in &dump.by_object {
            *by_category.entry(category(object)).or_default() += per(*cost);
        }
        PerRequest {
            total: per(dump.total),
            by_category,
        }
    }

    pub fn category(&self, name: &str) -> f64 {
        self.by_category.get(name).copied().unwrap_or(0.0)
    }
}

/// Where an object's instructions belong in the report.
pub fn category(object: &str) -> &'static str {
    if object == "???" {
        "generated"
    } else if object.ends_with("/envoy") {
        "envoy"
    } else {
        "libraries"
    }
}

/// A shell script that runs Envoy under callgrind with no collection until
/// the first zeroing, writing its dumps into `dir`.
pub fn wrapper(dir: &Path, envoy: &Path) -> Result<PathBuf, String> {
    for tool in ["valgrind", "callgrind_control"] {
        Command::new(tool)
            .arg("--version")
            .output()
            .map_err(|e| format!("{tool}: {e} (apt-get install valgrind)"))?;
    }
    let path = dir.join("envoy-callgrind.sh");
    let script = format!(
        "#!/bin/sh\n\
         # V8 writes the code it compiles: --smc-check makes valgrind see it.\n\
         exec valgrind --tool=callgrind --smc-check=all-non-file \
         --callgrind-out-file={dir}/callgrind.%p.out '{envoy}' \"$@\"\n",
        dir = dir.display(),
        envoy = envoy.display()
    );
    std::fs::write(&path, script).map_err(|e| format!("{}: {e}", path.display()))?;
    let status = Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("chmod +x {}", path.display()));
    }
    Ok(path)
}

/// `callgrind_control <command> <pid>`.
pub fn control(command: &str, pid: u32) -> Result<(), String> {
    let out = Command::new("callgrind_control")
        .arg(command)
        .arg(pid.to_string())
        .output()
        .map_err(|e| format!("callgrind_control: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "callgrind_control {command} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The newest dump of process `pid` in `dir` (`callgrind.<pid>.out.<n>`),
/// waiting for callgrind to finish writing it.
pub fn newest_dump(dir: &Path, pid: u32) -> Result<Dump, String> {
    let prefix = format!("callgrind.{pid}.out.");
    for _ in 0..300 {
        let newest = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().to_string();
                let n: u64 = name.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, entry.path()))
            })
            .max();
        if let Some((_, path)) = newest {
            if let Ok(text) = std::fs::read_to_string(&path) {
                if let Ok(dump) = parse(&text) {
                    return Ok(dump);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Err(format!(
        "no complete callgrind dump {prefix}* in {}",
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump as callgrind writes one: compressed names, a call whose
    /// inclusive cost must not count twice, relative positions.
    const SAMPLE: &str = "version: 1\ncreator: callgrind-3.19.0\npositions: line\nevents: Ir\n\
summary: 0\n\nob=(1) /usr/bin/envoy\nfl=(1) ???\nfn=(1) 0x0001\n0 100\n+2 20\n\
cob=(2) ???\ncfn=(2) 0x0002\ncalls=1 0\n0 500\nob=(2)\nfl=(1)\nfn=(2)\n0 500\n\
ob=(3) /usr/lib/libc.so.6\nfn=(3) malloc\n* 7\nob=(1)\nfn=(1)\n-1 3\n\ntotals: 630\n";

    #[test]
    fn self_cost_per_object_skips_inclusive_call_cost() {
        let dump = parse(SAMPLE).unwrap();
        assert_eq!(dump.total, 630);
        assert_eq!(dump.by_object.get("/usr/bin/envoy"), Some(&123));
        assert_eq!(dump.by_object.get("???"), Some(&500));
        assert_eq!(dump.by_object.get("/usr/lib/libc.so.6"), Some(&7));
    }

    #[test]
    fn a_dump_whose_costs_do_not_add_up_is_refused() {
        let truncated = SAMPLE.replace("totals: 630", "totals: 631");
        assert!(parse(&truncated).is_err());
        assert!(parse("events: Ir\n0 1\n").is_err());
    }

    #[test]
    fn objects_fall_into_the_report_categories() {
        assert_eq!(category("???"), "generated");
        assert_eq!(category("/x/site-packages/envoy/_bin/envoy"), "envoy");
        assert_eq!(category("/usr/lib/x86_64-linux-gnu/libc.so.6"), "libraries");
    }
}
