//! [`EnvoyConfig`]: builds an Envoy bootstrap YAML with Sluice in front of
//! the router, the same shape as `envoy/examples/sluice.yaml`:
//!
//! ```text
//! listener 127.0.0.1:<port>
//!   http_connection_manager
//!     envoy.filters.http.wasm   (V8, sluice.wasm, root_id "sluice",
//!                                failure_policy FAIL_RELOAD, JSON config)
//!     envoy.filters.http.router
//!   route 1: steering header present -> cluster_header: <steering header>
//!   route 2: anything else           -> the fallback (default: first cluster)
//! clusters: one STATIC cluster per name, 127.0.0.1:<port>
//! stats_config: envoy/examples/sluice-stats-tags.yaml (Sluice's metrics as
//!               Prometheus labels), unless turned off
//! ```
//!
//! Why a fallback route: the filter sets the steering header only on requests
//! that match a service. Requests that match none (counted as
//! `sluice.unmatched`) carry no steering header (the filter strips any the
//! client sent), so without a second route they would get a 404 from Envoy.
//! The fallback sends them to a known-safe cluster (a stable one), or, with
//! [`Fallback::DirectResponse`], answers them directly.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where requests go that carry no steering header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// Route them to this cluster.
    Cluster(String),
    /// Answer them from Envoy with this status and body.
    DirectResponse { status: u16, body: String },
}

#[derive(Debug, Clone)]
struct ClusterSpec {
    name: String,
    port: u16,
}

/// Builder for an Envoy bootstrap config running Sluice.
#[derive(Debug, Clone)]
pub struct EnvoyConfig {
    wasm: PathBuf,
    sluice_json: String,
    steering_header: Option<String>,
    clusters: Vec<ClusterSpec>,
    fallback: Option<Fallback>,
    listener_port: u16,
    admin_port: u16,
    route_timeout: Duration,
    retry: Option<(String, u32)>,
    include_attempt_count_in_response: bool,
    failure_policy: String,
    runtime: String,
    stats_tags: bool,
}

/// The steering header Sluice uses when its config names none.
pub const DEFAULT_STEERING_HEADER: &str = "x-sluice-cluster";

/// The HTTP connection manager's `codec_type` line of a bootstrap, with
/// the lines that make Envoy treat loopback clients as internal: it then
/// honours their `x-envoy-*` retry and timeout headers (from an external
/// client it strips them), as it would a mesh neighbour's. Tests that check
/// Sluice against clients asking for more retries replace `codec_type: AUTO`
/// with it, so that only Sluice stands between those headers and the router.
pub const INTERNAL_CLIENTS: &str = "          codec_type: AUTO
          use_remote_address: true
          internal_address_config:
            cidr_ranges:
            - address_prefix: 127.0.0.1
              prefix_len: 32
";

/// The shipped `stats_config` snippet (`envoy/examples/sluice-stats-tags.yaml`):
/// tag extractors that turn Sluice's per-service metric names into labels
/// in `/stats/prometheus`. The generated bootstrap includes it verbatim, so
/// the tests run what users copy.
pub const STATS_TAGS_YAML: &str = include_str!("../examples/sluice-stats-tags.yaml");

impl EnvoyConfig {
    /// A config whose filter gets `sluice_json` verbatim as its
    /// configuration (it need not be valid: tests of rejected configs pass
    /// broken JSON on purpose). The wasm defaults to [`crate::wasm_path`].
    pub fn new(sluice_json: impl Into<String>) -> EnvoyConfig {
        EnvoyConfig {
            wasm: crate::wasm_path(),
            sluice_json: sluice_json.into(),
            steering_header: None,
            clusters: Vec::new(),
            fallback: None,
            listener_port: 0,
            admin_port: 0,
            route_timeout: Duration::from_secs(5),
            retry: None,
            include_attempt_count_in_response: false,
            failure_policy: "FAIL_RELOAD".to_string(),
            runtime: "envoy.wasm.runtime.v8".to_string(),
            stats_tags: true,
        }
    }

    /// Like [`EnvoyConfig::new`] from a JSON value.
    pub fn from_json(sluice: &serde_json::Value) -> EnvoyConfig {
        EnvoyConfig::new(sluice.to_string())
    }

    /// Path of the sluice.wasm Envoy loads.
    pub fn wasm(mut self, path: impl AsRef<Path>) -> Self {
        self.wasm = path.as_ref().to_path_buf();
        self
    }

    /// Add a STATIC cluster `name` -> 127.0.0.1:`port`.
    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push(ClusterSpec {
            name: name.to_string(),
            port,
        });
        self
    }

    /// Add a cluster pointing at a harness upstream.
    pub fn upstream(self, name: &str, upstream: &crate::Upstream) -> Self {
        self.cluster(name, upstream.port())
    }

    /// Where unsteered requests go (default: the first cluster added).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// The header the route's `cluster_header` reads. Defaults to the
    /// `steering_header` in the Sluice JSON, else `x-sluice-cluster`.
    pub fn steering_header(mut self, name: &str) -> Self {
        self.steering_header = Some(name.to_string());
        self
    }

    /// Listener port (default 0: any free port; [`crate::Envoy`] finds it).
    pub fn listener_port(mut self, port: u16) -> Self {
        self.listener_port = port;
        self
    }

    /// Admin port (default 0: any free port; [`crate::Envoy`] finds it).
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_port = port;
        self
    }

    /// Route timeout (default 5 s).
    pub fn route_timeout(mut self, d: Duration) -> Self {
        self.route_timeout = d;
        self
    }

    /// Add a retry policy to both routes.
    pub fn retry_policy(mut self, retry_on: &str, num_retries: u32) -> Self {
        self.retry = Some((retry_on.to_string(), num_retries));
        self
    }

    /// The virtual host sets `include_attempt_count_in_response`: the router
    /// writes `x-envoy-attempt-count` over every response's (default: off,
    /// an upstream's header passes as sent).
    pub fn include_attempt_count_in_response(mut self, on: bool) -> Self {
        self.include_attempt_count_in_response = on;
        self
    }

    /// The wasm plugin's failure_policy (default FAIL_RELOAD).
    pub fn failure_policy(mut self, policy: &str) -> Self {
        self.failure_policy = policy.to_string();
        self
    }

    /// Whether the bootstrap carries [`STATS_TAGS_YAML`] (default: yes).
    pub fn stats_tags(mut self, on: bool) -> Self {
        self.stats_tags = on;
        self
    }

    /// The wasm file the config loads.
    pub fn wasm_file(&self) -> &Path {
        &self.wasm
    }

    /// Replaces the Sluice JSON (for a config push).
    pub fn set_sluice_json(&mut self, sluice_json: impl Into<String>) {
        self.sluice_json = sluice_json.into();
    }

    /// The Sluice JSON given to the filter.
    pub fn sluice_json(&self) -> &str {
        &self.sluice_json
    }

    /// The steering header the route reads.
    pub fn effective_steering_header(&self) -> String {
        if let Some(h) = &self.steering_header {
            return h.clone();
        }
        serde_json::from_str::<serde_json::Value>(&self.sluice_json)
            .ok()
            .and_then(|v| {
                v.get("steering_header")
                    .and_then(|h| h.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| DEFAULT_STEERING_HEADER.to_string())
    }

    /// The bootstrap YAML.
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
        let header = self.effective_steering_header();
        let timeout = format!("{}s", self.route_timeout.as_secs_f64());
        let retry = match &self.retry {
            Some((on, n)) => format!(
                "\n                  retry_policy:\n                    retry_on: {}\n                    num_retries: {n}",
                q(on)
            ),
            None => String::new(),
        };
        let fallback = self.fallback.clone().or_else(|| {
            self.clusters
                .first()
                .map(|c| Fallback::Cluster(c.name.clone()))
        });
        let fallback_action = match fallback {
            Some(Fallback::Cluster(c)) => format!(
                "route:\n                  cluster: {}\n                  timeout: {timeout}{retry}",
                q(&c)
            ),
            Some(Fallback::DirectResponse { status, body }) => format!(
                "direct_response:\n                  status: {status}\n                  body:\n                    inline_string: {}",
                q(&body)
            ),
            None => "direct_response:\n                  status: 404\n                  body:\n                    inline_string: \"no cluster configured\\n\"".to_string(),
        };

        let mut y = String::new();
        let _ = write!(
            y,
            r#"# Generated by sluice-envoy's EnvoyConfig.
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
{stats_tags}static_resources:
  listeners:
  - name: sluice_listener
    stat_prefix: sluice_listener
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress_http
          codec_type: AUTO
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: sluice
                root_id: sluice
                failure_policy: {failure_policy}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json}
                vm_config:
                  vm_id: sluice
                  runtime: {runtime}
                  code:
                    local:
                      filename: {wasm}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: sluice_routes
            virtual_hosts:
            - name: sluice
              domains: ["*"]
              include_attempt_count_in_response: {attempt_count}
              routes:
              - match:
                  prefix: "/"
                  headers:
                  - name: {header}
                    present_match: true
                route:
                  cluster_header: {header}
                  timeout: {timeout}{retry}
              - match:
                  prefix: "/"
                {fallback_action}
  clusters:
"#,
            admin_port = self.admin_port,
            listener_port = self.listener_port,
            failure_policy = self.failure_policy,
            json = q(&self.sluice_json),
            runtime = self.runtime,
            wasm = q(&self.wasm.to_string_lossy()),
            header = q(&header),
            attempt_count = self.include_attempt_count_in_response,
            stats_tags = if self.stats_tags { STATS_TAGS_YAML } else { "" },
        );
        for c in &self.clusters {
            let _ = write!(
                y,
                r#"  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#,
                name = q(&c.name),
                port = c.port,
            );
        }
        if self.clusters.is_empty() {
            y.push_str("  []\n");
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_header_comes_from_the_json() {
        let c = EnvoyConfig::new(r#"{"steering_header": "x-route-to", "services": []}"#);
        assert_eq!(c.effective_steering_header(), "x-route-to");
        let c = EnvoyConfig::new("not json");
        assert_eq!(c.effective_steering_header(), DEFAULT_STEERING_HEADER);
        let y = EnvoyConfig::new("{}")
            .cluster("a", 1)
            .cluster("b", 2)
            .to_yaml();
        assert!(y.contains("cluster_header: \"x-sluice-cluster\""));
        assert!(y.contains("cluster: \"a\""));
        assert!(y.contains("port_value: 2 "));
        assert!(y.contains("\nstats_config:\n  stats_tags:\n"));
        assert!(!EnvoyConfig::new("{}")
            .stats_tags(false)
            .to_yaml()
            .contains("stats_config"));
    }

    #[test]
    fn the_stats_tags_snippet_leaves_the_lds_split_alone() {
        // lds.rs splits the generated YAML at these lines; the snippet, placed
        // before static_resources, must not contain them.
        for marker in ["static_resources:\n", "  listeners:\n", "  clusters:\n"] {
            assert!(!STATS_TAGS_YAML.contains(marker), "{marker:?}");
        }
        assert!(STATS_TAGS_YAML.ends_with('\n'));
    }
}
