//! The proxy-wasm shell around the policy modules.
//!
//! Every host call goes through `proxy_wasm::hostcalls` directly and every
//! error is handled: the SDK's trait helpers unwrap host errors and panic on
//! non-UTF-8 header values, and a panic here would trap the VM and fail every
//! later request of the worker.

use crate::config::{Config, Side};
use crate::router::{Decision, RequestHeaders, Router};
use crate::sticky::Rng;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SluiceRoot::default()) });
}}

thread_local! {
    /// Per-VM randomness for requests without a sticky key. A VM is single
    /// threaded; seeding once keeps host calls off the request path.
    static RNG: RefCell<Rng> = RefCell::new(Rng::new(initial_seed()));
}

fn initial_seed() -> u64 {
    let mut seed = [0u8; 8];
    // WASI random_get is provided by Envoy; fall back to the clock.
    let time = hostcalls::get_current_time()
        .ok()
        .and_then(|now| now.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let from_std = {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(time);
        hasher.finish()
    };
    seed.copy_from_slice(&from_std.to_le_bytes());
    u64::from_le_bytes(seed) ^ time
}

fn next_random() -> u64 {
    RNG.with(|rng| rng.borrow_mut().next_u64())
}

fn log(level: LogLevel, message: &str) {
    // Logging must never fail a request.
    let _ = hostcalls::log(level, message);
}

/// A counter defined with the host; `None` if the host refused it.
#[derive(Debug, Clone, Copy, Default)]
struct Counter(Option<u32>);

impl Counter {
    fn define(name: &str) -> Self {
        Counter(hostcalls::define_metric(MetricType::Counter, name).ok())
    }

    fn increment(self) {
        if let Some(id) = self.0 {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// Metrics of one service.
struct ServiceMetrics {
    routed_stable: Counter,
    routed_canary: Counter,
    rule_matched: Vec<Counter>,
}

/// A configuration in force: the compiled router and its metric handles.
struct Active {
    router: Router,
    services: Vec<ServiceMetrics>,
    unmatched: Counter,
}

impl Active {
    fn new(config: Config) -> Self {
        let services = config
            .services
            .iter()
            .map(|service| {
                let prefix = format!("sluice.{}", service.name);
                ServiceMetrics {
                    routed_stable: Counter::define(&format!("{prefix}.routed.stable")),
                    routed_canary: Counter::define(&format!("{prefix}.routed.canary")),
                    rule_matched: (0..service.rules.len())
                        .map(|index| Counter::define(&format!("{prefix}.rule.{index}.matched")))
                        .collect(),
                }
            })
            .collect();
        Active {
            router: Router::new(config),
            services,
            unmatched: Counter::define("sluice.unmatched"),
        }
    }
}

#[derive(Default)]
struct SluiceRoot {
    active: Option<Rc<Active>>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(bytes)) => bytes,
            _ => Vec::new(),
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                log(
                    LogLevel::Info,
                    &format!("sluice: config applied: {}", config.summary()),
                );
                self.active = Some(Rc::new(Active::new(config)));
                true
            }
            Err(err) => {
                log(LogLevel::Error, &format!("sluice: config refused: {err}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SluiceStream {
            active: self.active.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct SluiceStream {
    active: Option<Rc<Active>>,
}

impl Context for SluiceStream {}

impl HttpContext for SluiceStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = self.active.as_deref() else {
            return Action::Continue;
        };
        let steering_header = &active.router.config().steering_header;
        // A client must never steer: the header names any cluster of the
        // proxy. Removed on every request, matched by a service or not.
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, steering_header);

        let mut headers = HostHeaders::default();
        let authority = fetch_request_header(":authority");
        let path = fetch_request_header(":path");
        let Some(service_index) = active
            .router
            .find_service(authority.as_deref(), path.as_deref())
        else {
            active.unmatched.increment();
            return Action::Continue;
        };
        let Some(service) = active.router.services().get(service_index) else {
            return Action::Continue;
        };
        let decision = active.router.decide(
            service_index,
            service.weight_bp,
            &mut headers,
            next_random(),
        );
        let Decision::Routed { side, rule, .. } = decision else {
            return Action::Continue;
        };
        let cluster = service.cluster(side);
        let _ = hostcalls::set_map_value_bytes(
            MapType::HttpRequestHeaders,
            steering_header,
            Some(cluster.as_bytes()),
        );
        if let Some(metrics) = active.services.get(service_index) {
            match side {
                Side::Stable => metrics.routed_stable.increment(),
                Side::Canary => metrics.routed_canary.increment(),
            }
            if let Some(counter) = rule.and_then(|index| metrics.rule_matched.get(index)) {
                counter.increment();
            }
        }
        Action::Continue
    }
}

/// Request headers fetched from the host on first use and cached, so a
/// header read by several rules crosses the ABI once.
#[derive(Default)]
struct HostHeaders {
    cache: Vec<(String, Option<Vec<u8>>)>,
}

fn fetch_request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

impl RequestHeaders for HostHeaders {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        let position = match self.cache.iter().position(|(known, _)| known == name) {
            Some(position) => position,
            None => {
                self.cache
                    .push((name.to_string(), fetch_request_header(name)));
                self.cache.len() - 1
            }
        };
        self.cache
            .get(position)
            .and_then(|(_, value)| value.as_deref())
    }
}
