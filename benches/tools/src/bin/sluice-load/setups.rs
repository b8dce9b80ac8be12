//! The Envoy bootstrap configs of the load comparison: the upstream, and the
//! five proxies that are compared. Every proxy has the same listener, HTTP
//! connection manager, clusters and timeouts; they differ only in the HTTP
//! filters and routes that make the canary decision.

use std::fmt::Write as _;
use std::path::Path;

/// One proxy setup of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// No filter but the router: the ceiling.
    Ceiling,
    /// The pass-through Wasm module: the Wasm floor.
    Passthrough,
    /// The pass-through module without the SDK, exporting only Sluice's
    /// callbacks: the SDK's extra callbacks (body chunks, trailers,
    /// on_done) priced against `Passthrough` (not in the default set).
    PassthroughRaw,
    /// Sluice with the realistic config.
    Sluice,
    /// Envoy's own features: header-matched routes, weighted_clusters,
    /// retry_policy + retry_budget, outlier_detection.
    Native,
    /// A Lua filter making the same header/percentage canary choice.
    Lua,
    /// Sluice with the sticky split only (no rules, retry or breaker): for
    /// pricing the parts (not in the default set).
    SluiceSplit,
    /// Sluice with rules and breakers but no retry block.
    SluiceNoRetry,
    /// The host-call probe making exactly Sluice's host calls per request
    /// on its common path (kind `sluicelean`), with fixed values and no
    /// policy: what any proxy-wasm filter asking
    /// Envoy for the same things pays, so Sluice minus this is its own code.
    SluiceCalls,
    /// Sluice with the realistic config, from another build
    /// (`$SLUICE_BASELINE_WASM`): the A/B of a change, in the same run as
    /// `Sluice` (not in the default set).
    SluiceBaseline,
    /// Sluice with `stable_by_default` off: the steering header written on
    /// every routed request, as `cluster_header` mode did before it.
    SluiceSteerAll,
    /// Sluice with `benches/config/sluice-headers.json`: the retry policy in
    /// headers on every request and the steering header on every request.
    SluiceHeaders,
}

impl Setup {
    pub const ALL: [Setup; 6] = [
        Setup::Ceiling,
        Setup::Passthrough,
        Setup::SluiceCalls,
        Setup::Sluice,
        Setup::Native,
        Setup::Lua,
    ];

    /// Extra setups, selectable with `--setups`.
    pub const EXTRA: [Setup; 6] = [
        Setup::SluiceSplit,
        Setup::SluiceNoRetry,
        Setup::PassthroughRaw,
        Setup::SluiceBaseline,
        Setup::SluiceSteerAll,
        Setup::SluiceHeaders,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Ceiling => "ceiling",
            Setup::Passthrough => "passthrough",
            Setup::PassthroughRaw => "passthrough-raw",
            Setup::Sluice => "sluice",
            Setup::Native => "native",
            Setup::Lua => "lua",
            Setup::SluiceSplit => "sluice-split",
            Setup::SluiceNoRetry => "sluice-noretry",
            Setup::SluiceCalls => "sluice-calls",
            Setup::SluiceBaseline => "sluice-baseline",
            Setup::SluiceSteerAll => "sluice-steer-all",
            Setup::SluiceHeaders => "sluice-headers",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Setup::Ceiling => "Envoy, router only (no filter): the ceiling",
            Setup::Passthrough => {
                "Envoy + pass-through Wasm module (V8, proxy-wasm SDK: every callback exported): the Wasm floor"
            }
            Setup::PassthroughRaw => {
                "Envoy + pass-through Wasm module without the SDK (V8), exporting only Sluice's callbacks: no body, trailer or on_done callbacks"
            }
            Setup::Sluice => {
                "Envoy + Sluice (V8): header/cookie/device rules, sticky 10 % split, retry budget, breakers"
            }
            Setup::Native => {
                "Envoy native: header-matched routes + weighted_clusters, retry_policy + retry_budget, outlier_detection"
            }
            Setup::Lua => "Envoy + Lua filter: the same header/cookie/UA/sticky-percentage choice",
            Setup::SluiceSplit => "Sluice with the sticky 10 % split only (no rules, retry, breakers)",
            Setup::SluiceNoRetry => "Sluice with rules and breakers, no retry block",
            Setup::SluiceCalls => {
                "Sluice's host calls on its common path and nothing else (the probe module, kind sluicelean: request header pairs and the clock, response header pairs): the floor for what Sluice asks of Envoy"
            }
            Setup::SluiceBaseline => {
                "Sluice from the build at $SLUICE_BASELINE_WASM, with the config at $SLUICE_BASELINE_CONFIG (default: the realistic one): the A/B of a change"
            }
            Setup::SluiceSteerAll => {
                "Sluice with the realistic config but stable_by_default off: the steering header written on every request (cluster_header mode as before)"
            }
            Setup::SluiceHeaders => {
                "Sluice with benches/config/sluice-headers.json: the retry policy written in headers on every request and the steering header on every request"
            }
        }
    }

    pub fn parse(name: &str) -> Option<Setup> {
        Setup::ALL
            .into_iter()
            .chain(Setup::EXTRA)
            .find(|setup| setup.name() == name)
    }

    /// Whether the setup steers `x-canary: always` to shop_v2 (smoke check).
    pub fn steers(self) -> bool {
        matches!(
            self,
            Setup::Sluice
                | Setup::SluiceBaseline
                | Setup::SluiceSteerAll
                | Setup::SluiceHeaders
                | Setup::Native
                | Setup::Lua
                | Setup::SluiceNoRetry
        )
    }

    pub fn is_wasm(self) -> bool {
        matches!(
            self,
            Setup::Passthrough
                | Setup::PassthroughRaw
                | Setup::Sluice
                | Setup::SluiceSplit
                | Setup::SluiceNoRetry
                | Setup::SluiceCalls
                | Setup::SluiceBaseline
                | Setup::SluiceSteerAll
                | Setup::SluiceHeaders
        )
    }
}

/// What the proxy configs need to know.
pub struct Inputs<'a> {
    pub sluice_wasm: &'a Path,
    /// The other build of `SluiceBaseline`.
    pub baseline_wasm: &'a Path,
    pub passthrough_wasm: &'a Path,
    pub passthrough_raw_wasm: &'a Path,
    pub probe_wasm: &'a Path,
    pub sluice_config: &'a str,
    /// The baseline build's config: an older build refuses keys it does
    /// not know.
    pub baseline_config: &'a str,
    /// `benches/config/sluice-headers.json`.
    pub headers_config: &'a str,
    /// Ports of the upstream for shop_v1 and shop_v2.
    pub upstream_ports: (u16, u16),
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
";

/// Envoy refuses a `direct_response` body above this many bytes unless the
/// route config raises `max_direct_response_body_size_bytes`.
const DIRECT_RESPONSE_LIMIT: usize = 4096;

/// The upstream's response body: `ok\n` by default, else `bytes` bytes
/// (`x`s and a final newline).
pub fn response_body(bytes: Option<usize>) -> String {
    match bytes {
        None => "ok\n".to_string(),
        Some(0) => String::new(),
        Some(n) => "x".repeat(n - 1) + "\n",
    }
}

/// The upstream: an Envoy answering every request itself
/// (`direct_response` with `body`, see [`response_body`]), on two listeners
/// (shop_v1 and shop_v2), each adding `x-upstream: v1|v2` so that smoke
/// checks see where a request went.
pub fn upstream_yaml(body: &str) -> String {
    let limit = if body.len() > DIRECT_RESPONSE_LIMIT {
        format!(
            "            max_direct_response_body_size_bytes: {}\n",
            body.len()
        )
    } else {
        String::new()
    };
    let body = if body.is_empty() {
        String::new()
    } else {
        format!(
            "                  body: {{ inline_string: {} }}\n",
            quote(body)
        )
    };
    let mut yaml = String::from(
        "# Generated by sluice-load: the upstream (direct_response).
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 0 }
static_resources:
  listeners:
",
    );
    for name in ["v1", "v2"] {
        let _ = write!(
            yaml,
            "  - name: upstream_{name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": {HCM}
          stat_prefix: upstream_{name}
          codec_type: AUTO
          http_filters:
{ROUTER}          route_config:
            name: upstream_{name}
{limit}            virtual_hosts:
            - name: all
              domains: [\"*\"]
              response_headers_to_add:
              - header: {{ key: x-upstream, value: {name} }}
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              routes:
              - match: {{ prefix: \"/\" }}
                direct_response:
                  status: 200
{body}"
        );
    }
    yaml
}

fn wasm_filter(name: &str, root_id: &str, wasm: &Path, configuration: &str) -> String {
    format!(
        "          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {root_id}
                failure_policy: FAIL_RELOAD
                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: {configuration}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code:
                    local:
                      filename: {wasm}
",
        configuration = quote(configuration),
        wasm = quote(&wasm.to_string_lossy()),
    )
}

/// The Lua equivalent of the realistic Sluice config's routing: the
/// x-canary header (always/never), the beta cookie, a 50 % weight for
/// mobile agents, else 10 %, sticky on x-user-id (djb2 hash; random
/// without a key). It removes a client's steering header like Sluice and
/// clears the route cache so that the cluster_header route sees its choice.
const LUA: &str = r#"function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local cluster = "shop_v1"
  local canary = headers:get("x-canary")
  if canary == "always" then
    cluster = "shop_v2"
  elseif canary ~= "never" then
    local cookie = headers:get("cookie")
    if cookie ~= nil and string.find(cookie, "beta=yes", 1, true) then
      cluster = "shop_v2"
    else
      local weight = 1000
      local agent = headers:get("user-agent")
      if agent ~= nil and string.find(agent, "Mobile", 1, true) then
        weight = 5000
      end
      local key = headers:get("x-user-id")
      local bucket
      if key ~= nil and key ~= "" then
        local h = 5381
        for i = 1, #key do
          h = (h * 33 + string.byte(key, i)) % 4294967296
        end
        bucket = h % 10000
      else
        bucket = math.random(0, 9999)
      end
      if bucket < weight then
        cluster = "shop_v2"
      end
    end
  end
  headers:replace("x-sluice-cluster", cluster)
  request_handle:clearRouteCache()
end
"#;

fn lua_filter() -> String {
    let mut code = String::new();
    for line in LUA.lines() {
        let _ = writeln!(code, "                  {line}");
    }
    format!(
        "          - name: envoy.filters.http.lua
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
{code}"
    )
}

/// Every setup's routes carry the same retry policy and timeout (the
/// realistic config's, which Sluice's `retry.mode: "route"` declares), so
/// that each setup is priced over the same router work: the router keeps
/// retry state for every request of every setup.
const RETRY_POLICY: &str = "                  retry_policy:
                    retry_on: \"5xx,reset,connect-failure,refused-stream\"
                    num_retries: 2
                    per_try_timeout: 1s
";

fn route(matcher: &str, action: &str) -> String {
    format!(
        "              - match:
                  prefix: \"/\"
{matcher}                route:
{action}                  timeout: 5s
{RETRY_POLICY}"
    )
}

fn header_match(name: &str, matcher: &str) -> String {
    format!(
        "                  headers:
                  - name: {name}
                    {matcher}
"
    )
}

fn weighted(stable: u32, canary: u32) -> String {
    format!(
        "                  weighted_clusters:
                    clusters:
                    - {{ name: shop_v1, weight: {stable} }}
                    - {{ name: shop_v2, weight: {canary} }}
"
    )
}

fn cluster_action(name: &str) -> String {
    format!("                  cluster: {name}\n")
}

/// Routes for the setups that steer with a header (Sluice, Lua): the
/// steering header if present, else stable (as `envoy/examples/sluice.yaml`).
fn steering_routes() -> String {
    route(
        &header_match("x-sluice-cluster", "present_match: true"),
        "                  cluster_header: x-sluice-cluster\n",
    ) + &route("", &cluster_action("shop_v1"))
}

fn native_routes() -> String {
    [
        route(
            &header_match("x-canary", "string_match: { exact: always }"),
            &cluster_action("shop_v2"),
        ),
        route(
            &header_match("x-canary", "string_match: { exact: never }"),
            &cluster_action("shop_v1"),
        ),
        route(
            &header_match("cookie", "string_match: { contains: \"beta=yes\" }"),
            &cluster_action("shop_v2"),
        ),
        route(
            &header_match("user-agent", "string_match: { contains: Mobile }"),
            &weighted(50, 50),
        ),
        route("", &weighted(90, 10)),
    ]
    .concat()
}

/// The realistic config without its retry block, and without rules and
/// breaker unless `keep_rules`.
fn reduced_config(config: &str, keep_rules: bool) -> String {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(config) else {
        return config.to_string();
    };
    if let Some(services) = value["services"].as_array_mut() {
        for service in services {
            if let Some(object) = service.as_object_mut() {
                object.remove("retry");
                if !keep_rules {
                    object.remove("rules");
                    object.remove("breaker");
                }
            }
        }
    }
    value.to_string()
}

/// The realistic config with `stable_by_default` off in every service:
/// Sluice writes the steering header on every request it routes, stable
/// included (what it did before the key existed).
fn steer_all_config(config: &str) -> String {
    let Ok(mut value) = serde_json::from_str::<serde_json::Value>(config) else {
        return config.to_string();
    };
    if let Some(services) = value["services"].as_array_mut() {
        for service in services {
            if let Some(object) = service.as_object_mut() {
                object.insert("stable_by_default".to_string(), false.into());
            }
        }
    }
    value.to_string()
}

fn cluster(name: &str, port: u16, native: bool) -> String {
    let extra = if native {
        "    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        retry_budget:
          budget_percent: { value: 20.0 }
          min_retry_concurrency: 10
    outlier_detection:
      consecutive_5xx: 5
      interval: 10s
      base_ejection_time: 5s
      max_ejection_percent: 100
"
    } else {
        ""
    };
    format!(
        "  - name: {name}
    type: STATIC
    connect_timeout: 1s
{extra}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"
    )
}

/// The bootstrap of one proxy setup (admin and listener on port 0).
pub fn proxy_yaml(setup: Setup, inputs: &Inputs<'_>) -> String {
    let (filters, routes) = match setup {
        Setup::Ceiling => (String::new(), route("", &cluster_action("shop_v1"))),
        Setup::Passthrough => (
            wasm_filter("passthrough", "passthrough", inputs.passthrough_wasm, ""),
            route("", &cluster_action("shop_v1")),
        ),
        Setup::PassthroughRaw => (
            wasm_filter(
                "passthrough_raw",
                "passthrough_raw",
                inputs.passthrough_raw_wasm,
                "",
            ),
            route("", &cluster_action("shop_v1")),
        ),
        Setup::Sluice => (
            wasm_filter("sluice", "sluice", inputs.sluice_wasm, inputs.sluice_config),
            steering_routes(),
        ),
        Setup::SluiceBaseline => (
            wasm_filter(
                "sluice",
                "sluice",
                inputs.baseline_wasm,
                inputs.baseline_config,
            ),
            steering_routes(),
        ),
        Setup::SluiceSteerAll => (
            wasm_filter(
                "sluice",
                "sluice",
                inputs.sluice_wasm,
                &steer_all_config(inputs.sluice_config),
            ),
            steering_routes(),
        ),
        Setup::SluiceHeaders => (
            wasm_filter(
                "sluice",
                "sluice",
                inputs.sluice_wasm,
                inputs.headers_config,
            ),
            steering_routes(),
        ),
        Setup::SluiceCalls => (
            wasm_filter("probe", "probe", inputs.probe_wasm, "sluicelean"),
            steering_routes(),
        ),
        Setup::Native => (String::new(), native_routes()),
        Setup::Lua => (lua_filter(), steering_routes()),
        Setup::SluiceSplit | Setup::SluiceNoRetry => {
            let keep_rules = setup == Setup::SluiceNoRetry;
            (
                wasm_filter(
                    "sluice",
                    "sluice",
                    inputs.sluice_wasm,
                    &reduced_config(inputs.sluice_config, keep_rules),
                ),
                steering_routes(),
            )
        }
    };
    let native = setup == Setup::Native;
    format!(
        "# Generated by sluice-load: setup {name} ({describe}).
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: 0 }}
static_resources:
  listeners:
  - name: proxy
    address:
      socket_address: {{ address: 127.0.0.1, port_value: 0 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": {HCM}
          stat_prefix: ingress_http
          codec_type: AUTO
          http_filters:
{filters}{ROUTER}          route_config:
            name: routes
            virtual_hosts:
            - name: shop
              domains: [\"*\"]
              include_attempt_count_in_response: true
              routes:
{routes}  clusters:
{v1}{v2}",
        name = setup.name(),
        describe = setup.describe(),
        v1 = cluster("shop_v1", inputs.upstream_ports.0, native),
        v2 = cluster("shop_v2", inputs.upstream_ports.1, native),
    )
}

/// The wrk script: cycles through `users` pre-formatted requests (one per
/// sticky key) and prints exact percentiles (µs) in `done`.
pub fn wrk_script(host: &str, headers: &[(String, String)], users: usize) -> String {
    let mut fields = String::new();
    for (name, value) in headers {
        if name.starts_with(':') || name == "x-user-id" {
            continue;
        }
        let _ = write!(fields, "[{}] = {}, ", quote(name), quote(value));
    }
    format!(
        r#"-- Generated by sluice-load.
local requests = {{}}
local count = {users}
local n = 0
init = function(args)
  for i = 0, count - 1 do
    requests[i] = wrk.format("GET", "/api/items?page=2", {{
      ["Host"] = {host}, {fields}["x-user-id"] = "user-" .. i,
    }})
  end
end
request = function()
  n = (n + 1) % count
  return requests[n]
end
done = function(summary, latency, requests)
  io.write(string.format(
    "SLUICE-LOAD requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50=%d p90=%d p99=%d p999=%d max=%d mean=%.1f\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"#,
        host = quote(host),
    )
}
