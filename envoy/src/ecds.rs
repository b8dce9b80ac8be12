//! Envoy with Sluice's filter config from a file-based ECDS source, built
//! from the shipped examples `envoy/examples/sluice-ecds-bootstrap.yaml` and
//! `envoy/examples/sluice-ecds-filter.yaml` (so the tests exercise them as
//! an operator would run them): the example's ports, upstream addresses,
//! wasm path and filter-file path are rewritten for the test, nothing else.
//!
//! A push rewrites the Sluice JSON in the filter file and renames it over
//! the watched one; an accepted push shows as
//! `extension_config_discovery.http_filter.<filter>.update_success`, a
//! refused one as `.config_fail` and `.update_rejected` (the previous config
//! keeps serving). Envoy 1.40 counts `.config_reload` for both.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::envoy::{Envoy, EnvoyError, EnvoyOptions};
use crate::lds::PushOutcome;
use crate::{RunDir, Upstream};

/// The example bootstrap, as shipped.
pub fn example_bootstrap() -> io::Result<String> {
    std::fs::read_to_string(crate::repo_root().join("envoy/examples/sluice-ecds-bootstrap.yaml"))
}

/// The example filter (ECDS resource) file, as shipped.
pub fn example_filter() -> io::Result<String> {
    std::fs::read_to_string(crate::repo_root().join("envoy/examples/sluice-ecds-filter.yaml"))
}

/// The line that opens the Sluice JSON block in the filter file, and the one
/// right after the block.
const JSON_START: &str = "        value: |\n";
const JSON_END: &str = "      vm_config:\n";

/// The Sluice JSON embedded in a filter file.
pub fn sluice_json_of(filter: &str) -> Option<String> {
    let start = filter.find(JSON_START)? + JSON_START.len();
    let end = start + filter.get(start..)?.find(JSON_END)?;
    Some(
        filter
            .get(start..end)?
            .lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// `filter` with its Sluice JSON replaced by `sluice_json`.
pub fn with_sluice_json(filter: &str, sluice_json: &str) -> Option<String> {
    let start = filter.find(JSON_START)? + JSON_START.len();
    let end = start + filter.get(start..)?.find(JSON_END)?;
    let mut out = String::from(filter.get(..start)?);
    for line in sluice_json.lines() {
        out.push_str("          ");
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(filter.get(end..)?);
    Some(out)
}

/// Replaces `from` by `to` in `text`, which must contain it exactly once.
pub fn replace_once(text: &str, from: &str, to: &str) -> Result<String, EnvoyError> {
    match text.matches(from).count() {
        1 => Ok(text.replacen(from, to, 1)),
        n => Err(EnvoyError::Io(io::Error::other(format!(
            "the example should hold {from:?} once, holds it {n} times"
        )))),
    }
}

/// The example bootstrap made runnable for a test: any free admin and
/// listener port, the v1 and v2 clusters on the given upstreams, the filter
/// file at `filter_path`.
pub fn bootstrap_for(
    bootstrap: &str,
    v1: &Upstream,
    v2: &Upstream,
    filter_path: &Path,
) -> Result<String, EnvoyError> {
    let y = replace_once(bootstrap, "port_value: 9912 ", "port_value: 0 ")?;
    let y = replace_once(&y, "port_value: 10200 ", "port_value: 0 ")?;
    let y = replace_once(
        &y,
        "port_value: 9201 ",
        &format!("port_value: {} ", v1.port()),
    )?;
    let y = replace_once(
        &y,
        "port_value: 9202 ",
        &format!("port_value: {} ", v2.port()),
    )?;
    replace_once(
        &y,
        "path: envoy/examples/sluice-ecds-filter.yaml",
        &format!(
            "path: {}",
            serde_json::to_string(&filter_path.to_string_lossy()).unwrap_or_default()
        ),
    )
}

/// The example filter file made runnable: the wasm under test.
pub fn filter_for(filter: &str, wasm: &Path) -> Result<String, EnvoyError> {
    replace_once(
        filter,
        "filename: target/wasm32-wasip1/release/sluice.wasm",
        &format!(
            "filename: {}",
            serde_json::to_string(&wasm.to_string_lossy()).unwrap_or_default()
        ),
    )
}

/// An Envoy running the ECDS example, whose filter config a test pushes.
pub struct EcdsEnvoy {
    pub envoy: Envoy,
    filter_path: PathBuf,
    /// The runnable filter file the pushes edit.
    filter: String,
    pushes: u64,
    // Last: removed after Envoy is gone.
    _dir: RunDir,
}

impl EcdsEnvoy {
    /// Starts the example with `v1` and `v2` as its upstreams;
    /// `edit_bootstrap` may change the runnable bootstrap further (e.g. add
    /// a filter).
    pub fn start(
        v1: &Upstream,
        v2: &Upstream,
        opts: &EnvoyOptions,
        edit_bootstrap: impl FnOnce(String) -> Result<String, EnvoyError>,
    ) -> Result<EcdsEnvoy, EnvoyError> {
        let wasm = crate::require_wasm().map_err(EnvoyError::WasmMissing)?;
        let dir = RunDir::new("ecds")?;
        let filter_path = dir.path().join("sluice-ecds-filter.yaml");
        let filter = filter_for(&example_filter()?, &wasm)?;
        std::fs::write(&filter_path, &filter)?;
        let bootstrap =
            edit_bootstrap(bootstrap_for(&example_bootstrap()?, v1, v2, &filter_path)?)?;
        let envoy = Envoy::start_yaml(&bootstrap, opts)?;
        Ok(EcdsEnvoy {
            envoy,
            filter_path,
            filter,
            pushes: 0,
            _dir: dir,
        })
    }

    /// The sum of the ECDS counters called `name` (`update_success`,
    /// `config_fail`, `config_reload`, …) over every discovered filter.
    pub fn ecds_counter(&self, name: &str) -> u64 {
        let suffix = format!(".{name}");
        self.envoy
            .stats()
            .map(|stats| {
                stats
                    .iter()
                    .filter(|(k, _)| {
                        k.starts_with("extension_config_discovery.") && k.ends_with(&suffix)
                    })
                    .map(|(_, v)| *v)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Replaces the filter file with one whose Sluice JSON is `sluice_json`
    /// (atomically: a temporary file in the same directory, renamed over the
    /// watched one) and waits until Envoy accepted or refused it.
    pub fn push(&mut self, sluice_json: &str) -> io::Result<PushOutcome> {
        let successes = self.ecds_counter("update_success");
        let fails = self.ecds_counter("config_fail");
        let filter = with_sluice_json(&self.filter, sluice_json)
            .ok_or_else(|| io::Error::other("the filter file has no Sluice JSON block"))?;
        self.pushes += 1;
        let staging = self
            .filter_path
            .with_extension(format!("yaml.{}", self.pushes));
        std::fs::write(&staging, filter)?;
        std::fs::rename(&staging, &self.filter_path)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            // A refused config counts in config_fail (and update_rejected);
            // only an accepted one in update_success.
            if self.ecds_counter("config_fail") > fails {
                return Ok(PushOutcome::Rejected);
            }
            if self.ecds_counter("update_success") > successes {
                return Ok(PushOutcome::Accepted);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!(
            "Envoy neither accepted nor refused ECDS push {} within 15 s; log tail:\n{}",
            self.pushes,
            crate::envoy::tail(&self.envoy.log(), 20)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sluice_json_of_the_example_is_found_and_replaced() {
        let filter = example_filter().unwrap();
        let json = sluice_json_of(&filter).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["services"][0]["stable"], "v1");
        let pushed = with_sluice_json(&filter, "{\"services\": []}").unwrap();
        assert_eq!(sluice_json_of(&pushed).unwrap(), "{\"services\": []}");
        assert!(pushed.ends_with(filter.get(filter.find(JSON_END).unwrap()..).unwrap()));
    }
}
