//! Envoy with its listener from a file-based LDS source, so that Sluice's
//! configuration can be changed while traffic flows, as an operator would:
//! write the new listener to a temporary file in the same directory and
//! rename it over the watched one (an atomic replace Envoy picks up).
//!
//! An accepted push shows as `listener_manager.lds.update_success`, a refused
//! one (Sluice's `on_configure` said no) as `listener_manager.lds.update_rejected`;
//! on a refusal the previous listener keeps serving.

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::config::EnvoyConfig;
use crate::envoy::{Envoy, EnvoyError, EnvoyOptions};

/// An Envoy whose listener comes from `lds.yaml` in its run directory.
pub struct LdsEnvoy {
    pub envoy: Envoy,
    lds_path: PathBuf,
    base: EnvoyConfig,
    listener_port: u16,
    pushes: u64,
}

/// How a push ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Accepted,
    Rejected,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Splits the static bootstrap `EnvoyConfig` generates into the listener
/// block (as an LDS resource) and the rest.
fn split(yaml: &str) -> (String, String) {
    let start = yaml.find("  listeners:\n").unwrap_or(yaml.len());
    let end = yaml.find("  clusters:\n").unwrap_or(yaml.len());
    let listener_block = yaml.get(start + "  listeners:\n".len()..end).unwrap_or("");
    let mut resource = String::from("resources:\n");
    for (index, line) in listener_block.lines().enumerate() {
        let line = line.strip_prefix("  ").unwrap_or(line);
        if index == 0 {
            resource
                .push_str("- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n");
            resource.push_str("  ");
            resource.push_str(line.trim_start_matches("- "));
        } else {
            resource.push_str(line);
        }
        resource.push('\n');
    }
    let rest = format!("{}{}", &yaml[..start], &yaml[end..]);
    (rest, resource)
}

impl LdsEnvoy {
    /// Starts Envoy with `config`'s clusters static and its listener from a
    /// watched file. The listener port is fixed up front: a listener update
    /// must not move it.
    pub fn start(config: &EnvoyConfig, opts: &EnvoyOptions) -> Result<LdsEnvoy, EnvoyError> {
        let listener_port = free_port()?;
        let base = config.clone().listener_port(listener_port);
        let dir = std::env::temp_dir().join(format!(
            "sluice-lds-{}-{}",
            std::process::id(),
            listener_port
        ));
        std::fs::create_dir_all(&dir)?;
        let lds_path = dir.join("lds.yaml");
        let (bootstrap, resource) = split(&base.to_yaml());
        std::fs::write(&lds_path, resource)?;
        let bootstrap = bootstrap.replacen(
            "static_resources:\n",
            &format!(
                "node: {{ id: sluice-test, cluster: sluice-test }}\n\
                 dynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    \
                 path_config_source:\n      path: {}\nstatic_resources:\n",
                serde_json::to_string(&lds_path.to_string_lossy()).unwrap_or_default()
            ),
            1,
        );
        let envoy = Envoy::start_yaml(&bootstrap, opts)?;
        Ok(LdsEnvoy {
            envoy,
            lds_path,
            base,
            listener_port,
            pushes: 0,
        })
    }

    pub fn listener_port(&self) -> u16 {
        self.listener_port
    }

    fn counter(&self, name: &str) -> u64 {
        self.envoy.stat(name).ok().flatten().unwrap_or(0)
    }

    /// Replaces the listener with one whose Sluice config is `sluice_json`
    /// and waits until Envoy accepted or rejected it.
    pub fn push(&mut self, sluice_json: &str) -> io::Result<PushOutcome> {
        let success = self.counter("listener_manager.lds.update_success");
        let rejected = self.counter("listener_manager.lds.update_rejected");
        let mut config = self.base.clone();
        config.set_sluice_json(sluice_json);
        let (_, resource) = split(&config.to_yaml());
        self.pushes += 1;
        let staging = self
            .lds_path
            .with_extension(format!("yaml.{}", self.pushes));
        std::fs::write(&staging, resource)?;
        std::fs::rename(&staging, &self.lds_path)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.counter("listener_manager.lds.update_success") > success {
                return Ok(PushOutcome::Accepted);
            }
            if self.counter("listener_manager.lds.update_rejected") > rejected {
                return Ok(PushOutcome::Rejected);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!(
            "Envoy neither accepted nor rejected push {} within 15 s; log tail:\n{}",
            self.pushes,
            crate::envoy::tail(&self.envoy.log(), 20)
        )))
    }
}

impl Drop for LdsEnvoy {
    fn drop(&mut self) {
        if let Some(dir) = self.lds_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_becomes_an_lds_resource_and_the_rest_stays() {
        let yaml = EnvoyConfig::new("{}").cluster("a", 1).to_yaml();
        let (rest, resource) = split(&yaml);
        assert!(resource.starts_with(
            "resources:\n- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  name: sluice_listener\n"
        ));
        assert!(resource.contains("\n  filter_chains:\n  - filters:\n"));
        assert!(!rest.contains("sluice_listener"));
        assert!(rest.contains("  clusters:\n  - name: \"a\""));
    }
}
