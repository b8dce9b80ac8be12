//! Sluice's per-request policy work, natively: the sequence of
//! `filter/src/filter.rs` (the proxy-wasm glue) with every host call replaced
//! by its native equivalent: the request headers as the serialised pairs
//! buffer Envoy hands over (read in place with `sluice::pairs::HeaderPairs`,
//! like the glue), shared data from `shared::MemoryStore`, header writes
//! collected in a list, the response status and attempt count given,
//! metrics dropped. What remains is exactly the policy core a request pays for:
//! match a service, apply its rules, hash the sticky key, ask the breakers,
//! reserve retries from the budget, write the retry headers; settle the
//! reservation at the response; book the outcome with the breaker at the
//! end.
//!
//! Keep it in step with `filter.rs` (`on_http_request_headers`,
//! `on_http_response_headers`, `on_log`, `settle_retries`,
//! `govern_retries`, `Active::admit`, `Active::record_breaker`); last synced
//! with the glue that reads the request headers in one call (`HeaderPairs`)
//! and takes the status and attempts from the response headers.

use sluice::breaker::{self, Admission, Check, Outcome, ProbeToken};
use sluice::config::{Config, Service, Side};
use sluice::pairs::HeaderPairs;
use sluice::retry::{self, Reservation};
use sluice::rollout;
use sluice::router::{Decision, RequestHeaders, Router};
use sluice::shared::{self, MemoryStore, SharedStore};
use sluice::sticky::Rng;

/// One request's headers, serialised as Envoy's
/// `proxy_get_header_map_pairs` returns them (built once, outside the
/// measurement, as the host would).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub pairs: Vec<u8>,
}

impl Request {
    pub fn new(headers: &[(&str, &str)]) -> Request {
        let lower: Vec<(String, &str)> = headers
            .iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), *value))
            .collect();
        let mut pairs = Vec::new();
        pairs.extend_from_slice(&(lower.len() as u32).to_le_bytes());
        for (name, value) in &lower {
            pairs.extend_from_slice(&(name.len() as u32).to_le_bytes());
            pairs.extend_from_slice(&(value.len() as u32).to_le_bytes());
        }
        for (name, value) in &lower {
            pairs.extend_from_slice(name.as_bytes());
            pairs.push(0);
            pairs.extend_from_slice(value.as_bytes());
            pairs.push(0);
        }
        Request { pairs }
    }

    pub fn view(&self) -> HeaderPairs<'_> {
        HeaderPairs::new(&self.pairs)
    }
}

/// The glue's `RequestView`.
struct RequestView<'a>(HeaderPairs<'a>);

impl RequestHeaders for RequestView<'_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}

/// The shared-data keys the glue computes once per configuration.
struct Keys {
    retry: Option<String>,
    /// Stable, canary.
    breakers: [Option<String>; 2],
    rollout: Option<String>,
}

/// What a request writes into its headers (the host calls `replace` and
/// `remove`), kept so the work is not optimised away.
pub type Written = Vec<(String, Option<Vec<u8>>)>;

/// The bookkeeping of a routed request (the glue's `Exchange`).
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    service: usize,
    side: Side,
    started_ms: u64,
    responded_ms: Option<u64>,
    probe: Option<ProbeToken>,
    reservation: Option<Reservation>,
    rejected: bool,
    status: Option<u64>,
    attempts: Option<u64>,
}

impl Exchange {
    pub fn side(&self) -> Side {
        self.side
    }
}

/// A configuration in force, with its shared state, as one VM sees it.
pub struct Native {
    router: Router,
    keys: Vec<Keys>,
    store: MemoryStore,
    rng: Rng,
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Stable => 0,
        Side::Canary => 1,
    }
}

impl Native {
    /// Parses the config and creates the shared state (`on_configure`).
    pub fn new(config_json: &[u8], now: u64) -> Result<Native, String> {
        let config = Config::parse(config_json).map_err(|e| e.to_string())?;
        let store = MemoryStore::default();
        let keys = config
            .services
            .iter()
            .map(|service| {
                let retry = service.retry.as_ref().map(|policy| {
                    let key = retry::budget_key(&service.name, policy);
                    shared::ensure(&store, &key, &retry::fresh_state(policy, now));
                    key
                });
                let breaker_for = |side: Side| {
                    let config = service.breaker.as_ref()?;
                    if side == Side::Canary && service.canary.is_none() {
                        return None;
                    }
                    let key = breaker::state_key(&service.name, service.cluster(side), config);
                    shared::ensure(&store, &key, &breaker::initial());
                    Some(key)
                };
                let rollout = match (&service.rollout, &service.canary) {
                    (Some(config), Some(canary)) => {
                        let key =
                            rollout::state_key(&service.name, &service.stable, canary, config);
                        shared::ensure(&store, &key, &rollout::initial(config, now));
                        Some(key)
                    }
                    _ => None,
                };
                Keys {
                    retry,
                    breakers: [breaker_for(Side::Stable), breaker_for(Side::Canary)],
                    rollout,
                }
            })
            .collect();
        Ok(Native {
            router: Router::new(config),
            keys,
            store,
            rng: Rng::new(now),
        })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    fn service(&self, index: usize) -> Option<(&Service, &Keys)> {
        Some((self.router.services().get(index)?, self.keys.get(index)?))
    }

    fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        self.store.get(key).map(|(bytes, _)| bytes)
    }

    /// `on_http_request_headers`.
    pub fn request_headers(
        &mut self,
        request: &Request,
        now: u64,
        written: &mut Written,
    ) -> Option<Exchange> {
        let pairs = request.view();
        let steering = self.router.config().steering_header.clone();
        if pairs.contains(&steering) {
            written.push((steering.clone(), None));
        }
        let index = self
            .router
            .find_service(pairs.get(":authority"), pairs.get(":path"))?;
        let random = self.rng.next_u64();
        let (service, keys) = self.service(index)?;
        // The glue caches the rollout view for a second; without a rollout
        // the configured weight applies.
        let (weight_bp, cohort_weights) = match (&service.rollout, &keys.rollout) {
            (Some(config), Some(key)) => {
                let view = rollout::view(self.bytes(key).as_deref(), config, now);
                (
                    view.weight_bp,
                    !matches!(
                        view.state,
                        rollout::RolloutState::RolledBack { .. } | rollout::RolloutState::Pending
                    ),
                )
            }
            _ => (service.weight_bp, true),
        };
        let mut headers = RequestView(pairs);
        let Decision::Routed { mut side, .. } =
            self.router
                .decide(index, weight_bp, cohort_weights, &mut headers, random)
        else {
            return None;
        };
        let mut probe = None;
        if side == Side::Canary {
            match self.admit(service, keys, Side::Canary, now) {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { .. } => side = Side::Stable,
            }
        }
        if side == Side::Stable {
            match self.admit(service, keys, Side::Stable, now) {
                Admission::Allowed => {}
                Admission::Probe(token) => probe = Some(token),
                Admission::Rejected { .. } => {
                    return Some(Exchange {
                        service: index,
                        side,
                        started_ms: now,
                        responded_ms: None,
                        probe: None,
                        reservation: None,
                        rejected: true,
                        status: None,
                        attempts: None,
                    })
                }
            }
        }
        let reservation = match (&service.retry, &keys.retry) {
            (Some(policy), Some(key)) => {
                Some(self.govern_retries(policy, key, &headers, now, written))
            }
            _ => None,
        };
        written.push((steering, Some(service.cluster(side).as_bytes().to_vec())));
        Some(Exchange {
            service: index,
            side,
            started_ms: now,
            responded_ms: None,
            probe,
            reservation,
            rejected: false,
            status: None,
            attempts: None,
        })
    }

    fn admit(&self, service: &Service, keys: &Keys, side: Side, now: u64) -> Admission {
        let (Some(config), Some(key)) = (
            service.breaker.as_ref(),
            keys.breakers.get(side_index(side)).and_then(Option::as_ref),
        ) else {
            return Admission::Allowed;
        };
        match breaker::check(self.bytes(key).as_deref(), config, now) {
            Check::Allowed => return Admission::Allowed,
            Check::Rejected { retry_after_ms } => return Admission::Rejected { retry_after_ms },
            Check::TryProbe => {}
        }
        shared::update(&self.store, key, |bytes| breaker::admit(bytes, config, now)).map_or(
            Admission::Rejected {
                retry_after_ms: 1_000,
            },
            |(admission, _)| admission,
        )
    }

    fn govern_retries(
        &self,
        policy: &retry::RetryPolicy,
        key: &str,
        headers: &RequestView<'_>,
        now: u64,
        written: &mut Written,
    ) -> Reservation {
        let grpc_timeout = headers.0.get(retry::GRPC_TIMEOUT_HEADER);
        let deadline_header = policy
            .deadline_header
            .as_deref()
            .and_then(|name| headers.0.get(name));
        let deadline = retry::client_deadline_ms(grpc_timeout, deadline_header);
        let plan = retry::plan(policy, deadline);
        let reservation = if policy.max_retries == 0 {
            Reservation::unrecorded(0)
        } else {
            shared::update(&self.store, key, |bytes| {
                retry::reserve(bytes, policy, now, plan.max_retries)
            })
            .unwrap_or_else(|| Reservation::unrecorded(plan.max_retries))
        };
        for (name, value) in retry::request_headers(policy, &plan, reservation.granted) {
            match value {
                Some(value) => written.push((name.to_string(), Some(value.into_bytes()))),
                None if headers.0.contains(name) => written.push((name.to_string(), None)),
                None => {}
            }
        }
        reservation
    }

    /// `on_http_response_headers`: takes the status (from `:status`) and
    /// the attempts (a property), settles the retry reservation.
    pub fn response_headers(
        &mut self,
        exchange: &mut Exchange,
        status: u64,
        attempts: u64,
        now: u64,
    ) {
        if !exchange.rejected && exchange.responded_ms.is_none() {
            exchange.responded_ms = Some(now);
            exchange.status = Some(status);
            exchange.attempts = Some(attempts);
            self.settle(exchange, now);
        }
    }

    fn settle(&self, exchange: &mut Exchange, now: u64) {
        let Some(reservation) = exchange.reservation.take() else {
            return;
        };
        let (Some((service, keys)), true) =
            (self.service(exchange.service), reservation.granted > 0)
        else {
            return;
        };
        let (Some(policy), Some(key)) = (&service.retry, &keys.retry) else {
            return;
        };
        let _ = shared::update(&self.store, key, |bytes| {
            (
                retry::settle(bytes, policy, now, &reservation, exchange.attempts),
                (),
            )
        });
    }

    /// `on_log`: books the outcome with the side's breaker. `status`,
    /// `flags` and `attempts` are what the properties would say when the
    /// response headers never came.
    pub fn log(
        &mut self,
        mut exchange: Exchange,
        status: u64,
        flags: u64,
        attempts: u64,
        now: u64,
    ) {
        self.settle(&mut exchange, now);
        if exchange.rejected {
            return;
        }
        // (The glue draws it only when it records; a xorshift step either way.)
        let random = self.rng.next_u64();
        let Some((service, keys)) = self.service(exchange.service) else {
            return;
        };
        let booked = service.breaker.is_some()
            || (exchange.side == Side::Canary && service.rollout.is_some());
        if !booked {
            return;
        }
        let status = exchange.status.unwrap_or(status);
        let flags = if exchange.status.is_some() { 0 } else { flags };
        let attempts = exchange.attempts.unwrap_or(attempts);
        let failed = breaker::is_failure(u32::try_from(status).ok(), flags);
        let outcome = (attempts > 0 && (status != 0 || failed)).then(|| Outcome {
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            failed,
            duration_ms: exchange
                .responded_ms
                .unwrap_or(now)
                .saturating_sub(exchange.started_ms),
        });
        let (Some(config), Some(key)) = (
            service.breaker.as_ref(),
            keys.breakers
                .get(side_index(exchange.side))
                .and_then(Option::as_ref),
        ) else {
            return;
        };
        match outcome {
            Some(outcome) => {
                let _ = shared::update(&self.store, key, |bytes| {
                    breaker::record(bytes, config, now, outcome, exchange.probe, random)
                });
            }
            None => {
                if let Some(token) = exchange.probe {
                    let _ = shared::update(&self.store, key, |bytes| {
                        breaker::release(bytes, config, now, token)
                    });
                }
            }
        }
    }

    /// One full request: headers, response (200, one attempt), log.
    pub fn lifecycle(
        &mut self,
        request: &Request,
        now: u64,
        written: &mut Written,
    ) -> Option<Side> {
        written.clear();
        let mut exchange = self.request_headers(request, now, written)?;
        self.response_headers(&mut exchange, 200, 1, now);
        let side = exchange.side();
        self.log(exchange, 200, 0, 1, now);
        Some(side)
    }
}
