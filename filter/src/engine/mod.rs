//! The engine: everything Sluice decides, per worker, behind a small host
//! trait.
//!
//! One `Worker` is one VM's state: its root contexts (one per plugin
//! config the VM serves), the configuration each has in force, and the
//! requests in flight. The shell calls it from the proxy-wasm exports;
//! the fuzzer runs one per simulated worker over one shared store; the
//! native tests and benchmarks run it over a fake host. All of them run
//! this code, so what is fuzzed and benchmarked is what ships.
//!
//! Per request it asks the host for:
//! - every request header, once (`HeaderPairs` reads the buffer in place),
//!   and the clock once when the service has any shared state;
//! - one replace per header it changes, one remove per owned header the
//!   client sent, nothing for a header that needs no change (a
//!   `stable_by_default` service's stable request, route-mode retries);
//!   then one `clear_route_cache` when the steering header changed
//!   (`Worker::request_headers`; never again in a VM whose host lacks it);
//! - no call for the retry budget while the worker's lease on it lasts and
//!   covers the request (`retry::Lease`); else one write, carrying the
//!   settlements and deposits of the worker's finished requests, that
//!   renews the lease or reserves for the request alone (`retry::renew`);
//! - no breaker read while the worker's cached verdict is fresh
//!   (`runtime::BREAKER_CACHE_MS`), and no breaker write for a clean
//!   success: the worker holds those back and books them with its next
//!   write or its tick (`breaker::PendingSuccesses`); failures are written
//!   at once;
//! - no metric call: counters add up in the VM and reach the host on the
//!   tick;
//! - at the response headers, only when an outcome is booked or retries
//!   are to be settled, one read of the response headers (`:status`, a
//!   trailers-only gRPC answer's `grpc-status`, and `x-envoy-attempt-count`
//!   when the service's routes write it), and the attempts property when
//!   they do not;
//! - at the end, the response flags only where they can change the
//!   outcome (no status, or one neither 2xx nor failing), and for a gRPC
//!   request (`content-type` `application/grpc...`, seen in the
//!   request-header buffer already read) `response.grpc_status` unless a
//!   trailers-only answer gave it, the flags only after a code that is
//!   neither OK nor failing, or none.

mod host;
mod runtime;

pub use host::{Host, MetricKind, Observed, Property};
pub use runtime::{BREAKER_CACHE_MS, MAX_HELD, ROLLOUT_CACHE_MS};

use crate::breaker::{self, Admission, Outcome, ProbeToken};
use crate::config::{Config, Service, Side};
use crate::failures::{CLIENT_RESET_FLAGS, GRPC_UNKNOWN};
use crate::pairs::HeaderPairs;
use crate::retry::{self, Reservation, Settlement};
use crate::rollout::RolloutState;
use crate::router::{Decision, RequestHeaders};
use crate::sticky::mix;
use runtime::{Active, RetryRuntime, ServiceRuntime};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;

/// Held outcomes and counters are flushed, gauges refreshed and due rollout
/// steps announced this often. A tick is a handful of host calls per
/// service, against thousands a second on the request path.
pub const TICK_MS: u32 = 250;
/// Header on a local reply that says the breaker, not the upstream, refused.
pub const BREAKER_HEADER: &str = "x-sluice-breaker";
/// gRPC's retry hint on a refusal: milliseconds until the client may try
/// again (gRFC A6).
pub const GRPC_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// What the host should do after the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadersAction {
    /// Let the request go on to the router.
    Continue,
    /// A local reply was sent: stop.
    Stop,
}

/// A root context: one per plugin config the VM serves.
struct Root {
    active: Option<Rc<Active>>,
}

/// The bookkeeping of a routed request, from its headers to its log.
struct Exchange {
    /// The config the request started under: a reload mid-request does
    /// not change where its outcome is booked.
    active: Rc<Active>,
    service: usize,
    side: Side,
    started_ms: u64,
    responded_ms: Option<u64>,
    probe: Option<ProbeToken>,
    /// Retries reserved from the budget; settled at the end.
    reservation: Option<Reservation>,
    /// The breaker refused the request with a local reply.
    rejected: bool,
    /// A gRPC request: its outcome is its `grpc-status`, and a refusal is
    /// a gRPC answer.
    grpc: bool,
    /// A gRPC request's deadline (`grpc-timeout`), read from the header
    /// buffer: a call its client abandoned at the deadline, with no answer,
    /// ended DEADLINE_EXCEEDED.
    grpc_deadline_ms: Option<u64>,
    /// The response status and the attempts, read with the response
    /// headers (the router retries no more once it passes them on). The
    /// status is not read for gRPC, whose outcome comes at the end
    /// (trailers).
    status: Option<u64>,
    attempts: Option<u64>,
    /// A gRPC call's final code from a trailers-only answer's header
    /// block: known at the response headers, no property read at the end.
    grpc_code: Option<u64>,
}

struct Stream {
    root: u32,
    exchange: Option<Exchange>,
}

/// Context ids are small distinct integers: a multiply spreads them well
/// enough, and SipHash on every request would be wasted work.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        self.0 = mix(u64::from(id));
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// One VM's state: what each callback of the proxy-wasm lifecycle does.
#[derive(Default)]
pub struct Worker {
    roots: IdMap<Root>,
    streams: IdMap<Stream>,
    /// The host answered `clear_route_cache` with NotFound (or
    /// Unimplemented): it has no such function, and this VM never asks
    /// again.
    no_route_cache_clear: bool,
}

impl Worker {
    pub fn new() -> Self {
        Worker::default()
    }

    /// `proxy_on_context_create`: a root context (no parent) or a stream.
    pub fn create_context(&mut self, context_id: u32, parent_context_id: u32) {
        if parent_context_id == 0 {
            self.roots.insert(context_id, Root { active: None });
        } else {
            self.streams.insert(
                context_id,
                Stream {
                    root: parent_context_id,
                    exchange: None,
                },
            );
        }
    }

    /// `proxy_on_delete`: a stream is forgotten (Envoy calls `on_log`
    /// first; a stream deleted without it books nothing), a root writes
    /// out what its config held.
    pub fn delete_context(&mut self, host: &impl Host, context_id: u32) {
        if self.streams.remove(&context_id).is_none() {
            if let Some(root) = self.roots.remove(&context_id) {
                if let Some(active) = root.active {
                    active.flush(host, host.now_ms(), true);
                }
            }
        }
    }

    /// `proxy_on_configure`: parses and applies the plugin configuration.
    /// Returns false (the host refuses the config) with one log line saying
    /// why; the config in force, if any, stays.
    pub fn configure(&mut self, host: &impl Host, root_context_id: u32) -> bool {
        let bytes = host.plugin_configuration();
        let config = match Config::parse(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log::error!("sluice: config refused: {err}");
                return false;
            }
        };
        log::info!("sluice: config applied: {}", config.summary());
        let now = host.now_ms();
        let active = Active::new(host, config, now);
        // Every config ticks: counters reach the host on the tick.
        host.set_tick_period_ms(TICK_MS);
        active.refresh(host, now);
        let root = self
            .roots
            .entry(root_context_id)
            .or_insert(Root { active: None });
        // What the old config held goes out now: its state keys may be the
        // new one's (an unchanged block keeps its state).
        if let Some(old) = root.active.replace(Rc::new(active)) {
            old.flush(host, now, true);
        }
        true
    }

    /// `proxy_on_tick`: writes what is held, refreshes gauges, announces
    /// rollout steps.
    pub fn tick(&mut self, host: &impl Host, root_context_id: u32) {
        let Some(active) = self.active(root_context_id) else {
            return;
        };
        let now = host.now_ms();
        active.flush(host, now, false);
        active.refresh(host, now);
    }

    fn active(&self, root_context_id: u32) -> Option<Rc<Active>> {
        self.roots
            .get(&root_context_id)
            .and_then(|root| root.active.clone())
    }

    /// `proxy_on_request_headers`: routes the request.
    pub fn request_headers(&mut self, host: &impl Host, context_id: u32) -> HeadersAction {
        let Some(stream) = self.streams.get_mut(&context_id) else {
            return HeadersAction::Continue;
        };
        let Some(active) = self
            .roots
            .get(&stream.root)
            .and_then(|root| root.active.clone())
        else {
            return HeadersAction::Continue;
        };
        let buffer = host.request_header_pairs();
        let pairs = HeaderPairs::new(&buffer);
        let (exchange, rejected, steered) = route(host, &active, &pairs);
        // A client must never steer: the header names any cluster of the
        // proxy. A steered request had it overwritten; any other loses it
        // (a `stable_by_default` service's stable request included: the
        // route table's default takes it to stable).
        let steering_header = active.router.config().steering_header.as_str();
        let forged = !steered && pairs.contains(steering_header);
        if forged {
            host.remove_request_header(steering_header);
        }
        let grpc = exchange.as_ref().is_some_and(|exchange| exchange.grpc);
        stream.exchange = exchange;
        match rejected {
            Some((service, retry_after_ms)) => {
                // A local reply: no route is selected, nothing to clear.
                reject(host, &service, retry_after_ms, grpc);
                HeadersAction::Stop
            }
            None => {
                // Only the steering header selects a route: retry headers
                // changed alone need no new selection.
                if steered || forged {
                    self.clear_route_cache(host);
                }
                HeadersAction::Continue
            }
        }
    }

    /// Tells the host, once per request and after the last header change,
    /// that the route must be selected again, so that a route matching on
    /// the steering header (a header-match route, or `cluster_header`) sees
    /// what Sluice wrote, not what the client sent.
    ///
    /// Cost and why it is paid: one crossing per request whose steering
    /// header changed (none for a request Sluice leaves alone, keeps on
    /// stable with `stable_by_default`, or refuses), with no
    /// argument and no result, hence no `malloc` callback. Envoy looks the
    /// name up in its table of foreign functions and drops the cached
    /// route. Measured in Envoy 1.40 with the host-call probe (20 calls per
    /// request, one worker, 3 rounds): 0.42 µs a call, against 0.32 µs for
    /// a header replace in the same run
    /// (`benches/results/hostcalls-clear-route-cache.md`), on top of some
    /// 100 µs of Envoy CPU per request with Sluice. It adds no second route
    /// selection: Envoy 1.40
    /// already drops the cached route on every request-header change from
    /// an ABI 0.2.1 module, and selects a route lazily, once, when the
    /// router asks for it after this filter; clearing an already cleared
    /// cache only resets it again. What it buys: the steering keeps working
    /// where that implicit clear does not happen (Envoy stops it for ABI
    /// versions after 0.2.1, and other hosts need not do it). A host without
    /// the function answers NotFound: it is asked once per VM and then never
    /// again, and the route follows whatever its own header writes do.
    fn clear_route_cache(&mut self, host: &impl Host) {
        if self.no_route_cache_clear {
            return;
        }
        if !host.clear_route_cache() {
            self.no_route_cache_clear = true;
            log::info!(
                "sluice: the host offers no clear_route_cache; the route follows Sluice's \
                 headers only where the host re-selects it after a header change"
            );
        }
    }

    /// `proxy_on_response_headers`: the router is done with the request.
    /// `end_of_stream`: the header block ends the response (for gRPC, a
    /// trailers-only answer, whose `grpc-status` is the call's final code).
    ///
    /// At most one read of the response headers gives what is needed: the
    /// status when an outcome is booked, a trailers-only answer's gRPC
    /// code, and the attempts when the service's routes write
    /// `x-envoy-attempt-count` (`attempt_count_in_response`). The attempts
    /// are otherwise `upstream.request_attempt_count`, a property read.
    pub fn response_headers(&mut self, host: &impl Host, context_id: u32, end_of_stream: bool) {
        let Some(exchange) = self
            .streams
            .get_mut(&context_id)
            .and_then(|stream| stream.exchange.as_mut())
        else {
            return;
        };
        if exchange.rejected || exchange.responded_ms.is_some() {
            return;
        }
        let active = Rc::clone(&exchange.active);
        let Some((service, runtime)) = active.service(exchange.service) else {
            return;
        };
        let booked = books_outcome(service, runtime, exchange.side);
        let granted = exchange
            .reservation
            .is_some_and(|reservation| reservation.granted > 0);
        if !booked && !granted {
            return;
        }
        let trusted = service.attempt_count_in_response;
        // A gRPC call's code comes with its trailers, asked for at the end:
        // its header block is worth reading only when it ends the call, or
        // for the attempts.
        let wants_outcome = booked && (!exchange.grpc || end_of_stream);
        let buffer = if wants_outcome || trusted {
            host.response_header_pairs()
        } else {
            Vec::new()
        };
        let pairs = HeaderPairs::new(&buffer);
        let attempts = trusted
            .then(|| crate::response::attempt_count(&pairs))
            .flatten()
            .or_else(|| host.integer_property(Property::AttemptCount));
        exchange.attempts = attempts;
        // Unused retries go back to the budget now, not at the end of a
        // stream that may live for minutes.
        if let Some(reservation) = exchange.reservation.take().filter(|r| r.granted > 0) {
            active.settle(
                host,
                service,
                runtime,
                Settlement {
                    reservation,
                    attempts_made: attempts,
                },
            );
        }
        if !booked {
            return;
        }
        // Slowness is judged to the response headers: a long download is
        // not a slow upstream.
        if service
            .breaker
            .as_ref()
            .is_some_and(|config| config.slow.is_some())
        {
            exchange.responded_ms = Some(host.now_ms());
        } else {
            exchange.responded_ms = Some(exchange.started_ms);
        }
        if exchange.grpc {
            if end_of_stream {
                exchange.grpc_code = crate::response::grpc_status(&pairs);
            }
        } else {
            exchange.status = crate::response::status(&pairs);
        }
    }

    /// `proxy_on_log`: settles and books the finished request.
    pub fn log(&mut self, host: &impl Host, context_id: u32) {
        let Some(stream) = self.streams.get_mut(&context_id) else {
            return;
        };
        let Some(exchange) = stream.exchange.take() else {
            // Unmatched: nothing to settle or book.
            return;
        };
        let current = self
            .roots
            .get(&stream.root)
            .and_then(|root| root.active.as_ref())
            .is_some_and(|active| Rc::ptr_eq(active, &exchange.active));
        finish(host, exchange, current);
    }

    /// Requests in flight (created and not deleted), for tests.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

/// Routes a request: service, side, breakers, retries. Returns the exchange
/// to keep, the service name and retry-after when the stable breaker
/// refuses it, and whether it wrote the steering header.
///
/// Every header it changes is one host call (a replace: 0.46 µs in Envoy,
/// `benches/hostcalls.sh`; writing the whole map back in one
/// `proxy_set_header_map_pairs` costs 2.4 µs, and deletes every header
/// when the map is beyond the host's limits). Envoy re-selects the route
/// once, whatever the number of changes.
fn route(
    host: &impl Host,
    active: &Rc<Active>,
    pairs: &HeaderPairs<'_>,
) -> (Option<Exchange>, Option<(String, u64)>, bool) {
    let Some(index) = active
        .router
        .find_service(pairs.get(":authority"), pairs.get(":path"))
    else {
        active.unmatched.increment();
        return (None, None, false);
    };
    let Some((service, runtime)) = active.service(index) else {
        return (None, None, false);
    };
    let stateful =
        service.retry.is_some() || service.breaker.is_some() || service.rollout.is_some();
    let now = if stateful {
        let now = host.now_ms();
        active.clock_hint.set(now);
        now
    } else {
        0
    };
    let (weight_bp, cohort_weights) = if runtime.has_rollout() {
        match active.rollout_view(host, service, runtime, now) {
            // Before the start and after a rollback no percentage traffic
            // reaches the canary, cohort weights included.
            Some(view) => (
                view.weight_bp,
                !matches!(
                    view.state,
                    RolloutState::RolledBack { .. } | RolloutState::Pending
                ),
            ),
            None => (0, false),
        }
    } else {
        (service.weight_bp, true)
    };
    let mut headers = RequestView(pairs);
    let Decision::Routed { mut side, rule, .. } = active.router.decide(
        index,
        weight_bp,
        cohort_weights,
        &mut headers,
        active.random(),
    ) else {
        return (None, None, false);
    };
    if let Some(counter) = rule.and_then(|rule| runtime.rule_matched.get(rule)) {
        counter.increment();
    }
    let mut exchange = Exchange {
        active: Rc::clone(active),
        service: index,
        side,
        started_ms: now,
        responded_ms: None,
        probe: None,
        reservation: None,
        rejected: false,
        grpc: false,
        grpc_deadline_ms: None,
        status: None,
        attempts: None,
        grpc_code: None,
    };
    if crate::failures::is_grpc_content_type(pairs.get("content-type")) {
        exchange.grpc = true;
        exchange.grpc_deadline_ms = pairs
            .get(retry::GRPC_TIMEOUT_HEADER)
            .and_then(retry::parse_grpc_timeout);
    }
    if side == Side::Canary {
        match active.admit(host, service, runtime, Side::Canary, now) {
            Admission::Allowed => {}
            Admission::Probe(token) => exchange.probe = Some(token),
            Admission::Rejected { .. } => {
                // Users see no error: the canary's traffic goes to stable,
                // and a canary hidden by its breaker still fails the
                // rollout gate.
                side = Side::Stable;
                active.record_rollout(host, service, runtime, now, true);
            }
        }
    }
    exchange.side = side;
    if side == Side::Stable {
        match active.admit(host, service, runtime, Side::Stable, now) {
            Admission::Allowed => {}
            Admission::Probe(token) => exchange.probe = Some(token),
            Admission::Rejected { retry_after_ms } => {
                exchange.rejected = true;
                return (
                    Some(exchange),
                    Some((service.name.clone(), retry_after_ms)),
                    false,
                );
            }
        }
    }
    if let (Some(policy), Some(retry_runtime)) = (&service.retry, &runtime.retry) {
        exchange.reservation = Some(govern_retries(
            host,
            &service.name,
            policy,
            retry_runtime,
            pairs,
            now,
        ));
    } else {
        // No retry block: the route's policy stands, and no client may
        // raise its retries or timeout. Found in the buffer already read,
        // so a request without any costs nothing.
        for name in retry::OWNED_HEADERS {
            if pairs.contains(name) {
                host.remove_request_header(name);
            }
        }
    }
    // With `stable_by_default` the route table's default is stable: a
    // request kept there needs no header (the caller removes a client's).
    let steered = side == Side::Canary || !service.stable_by_default;
    if steered {
        host.set_request_header(
            &active.router.config().steering_header,
            service.cluster(side).as_bytes(),
        );
    }
    match side {
        Side::Stable => runtime.routed_stable.increment(),
        Side::Canary => runtime.routed_canary.increment(),
    }
    (Some(exchange), None, steered)
}

/// Whether a request's outcome is booked anywhere: with its side's breaker,
/// or a canary's with the rollout gate. Only then does the end of a request
/// cost host calls for its status and flags.
fn books_outcome(service: &Service, runtime: &ServiceRuntime, side: Side) -> bool {
    service.breaker.is_some() || (side == Side::Canary && runtime.has_rollout())
}

/// Settles and books a finished request. `current`: its config is still
/// the one in force (otherwise what it leaves is written at once, since the
/// old config will see no more ticks).
fn finish(host: &impl Host, exchange: Exchange, current: bool) {
    if exchange.rejected {
        return;
    }
    let active = Rc::clone(&exchange.active);
    let Some((service, runtime)) = active.service(exchange.service) else {
        return;
    };
    let booked = books_outcome(service, runtime, exchange.side);
    let granted = exchange
        .reservation
        .is_some_and(|reservation| reservation.granted > 0);
    let attempts = match exchange.attempts {
        Some(attempts) => Some(attempts),
        None if booked || granted => host.integer_property(Property::AttemptCount),
        None => None,
    };
    if let Some(reservation) = exchange.reservation.filter(|r| r.granted > 0) {
        active.settle(
            host,
            service,
            runtime,
            Settlement {
                reservation,
                attempts_made: attempts,
            },
        );
    }
    if booked {
        let (known, failed) = if exchange.grpc {
            // Envoy's `response.grpc_status`: the trailers' `grpc-status`,
            // else the trailers-only header block's, else inferred from the
            // HTTP status; absent only when nothing was answered (a reset).
            // A trailers-only answer's code was read with its headers.
            let mut code = exchange
                .grpc_code
                .or_else(|| host.integer_property(Property::GrpcStatus));
            // UNKNOWN may be Envoy's inference for a 200 without any
            // grpc-status: the flags tell whether the client cut it off.
            let unknown = code == Some(GRPC_UNKNOWN);
            let code_failed = code.is_some_and(|code| service.failures.grpc_code_fails(code));
            // Flags only where they can change the outcome: not after OK
            // (the call completed with its trailers) nor after a failing
            // code (failed already). After any other code an upstream
            // failure flag counts whatever the code (a reset is answered by
            // Envoy with UNAVAILABLE, a timeout too); with no code, or
            // UNKNOWN, they tell a reset from a client gone.
            let flags = if code == Some(0) || (code_failed && !unknown) {
                0
            } else {
                host.integer_property(Property::ResponseFlags).unwrap_or(0)
            };
            // Nothing answered, or cut off by the client after the
            // response headers (Envoy: UNKNOWN, flag DR), and no upstream
            // failure: the client reset the stream. At its deadline
            // (Envoy's own timeout from grpc-timeout races the client's,
            // and the client usually wins), that is DEADLINE_EXCEEDED;
            // earlier, the client just went away. One clock read, on this
            // path only.
            let client_reset = flags & CLIENT_RESET_FLAGS != 0;
            if (code.is_none() || (unknown && client_reset))
                && flags & breaker::UPSTREAM_FAILURE_FLAGS == 0
            {
                code = None;
                if let Some(deadline) = exchange.grpc_deadline_ms {
                    let elapsed = host.now_ms().saturating_sub(exchange.started_ms);
                    if elapsed.saturating_add(deadline / 10) >= deadline {
                        code = Some(u64::from(crate::failures::GRPC_DEADLINE_EXCEEDED));
                    }
                }
            }
            (code.is_some(), service.failures.grpc_failed(code, flags))
        } else {
            // Usually known from the response headers; a request that
            // ended without any (reset, timeout before headers, client
            // gone) is asked about here.
            let status = exchange
                .status
                .or_else(|| host.integer_property(Property::ResponseCode))
                .unwrap_or(0);
            // Flags only where they can change the outcome. A failing
            // status has failed already. A 2xx is a success without them:
            // a 2xx whose body the upstream then cuts (flag UC) is not
            // seen, as Envoy's outlier detection does not see it either,
            // and two crossings are saved on every request. With no
            // status they tell a reset or a timeout from a client gone;
            // after any other status (an Envoy 504 of a timeout that the
            // service's `http_statuses` leave out) an upstream failure
            // flag still counts.
            let flags =
                if service.failures.http_status_fails(status) || (200..300).contains(&status) {
                    0
                } else {
                    host.integer_property(Property::ResponseFlags).unwrap_or(0)
                };
            (status != 0, service.failures.http_failed(status, flags))
        };
        let attempts = attempts.unwrap_or(1);
        // No status and no upstream failure: the client went away, or the
        // request never reached an upstream. Neither says anything about the
        // cluster's health.
        let outcome = (attempts > 0 && (known || failed)).then(|| {
            let ended = exchange.responded_ms.unwrap_or_else(|| host.now_ms());
            Outcome {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                failed,
                duration_ms: ended.saturating_sub(exchange.started_ms),
            }
        });
        active.record_breaker(
            host,
            service,
            runtime,
            exchange.side,
            exchange.started_ms,
            outcome,
            exchange.probe,
        );
        if exchange.side == Side::Canary && runtime.has_rollout() {
            if let Some(outcome) = outcome {
                active.record_rollout(host, service, runtime, host.now_ms(), outcome.any_failure());
            }
        }
    }
    if !current {
        active.flush(host, host.now_ms(), true);
    }
}

/// Plans the request's retries and timeouts, takes the retries from the
/// worker's lease on the shared budget or reserves them (settling the
/// worker's finished requests in the same write: `RetryRuntime::reserve`),
/// and writes the headers the router reads for them as the mode says
/// (`retry::for_each_owned_header`), removing the client's others.
fn govern_retries(
    host: &impl Host,
    service: &str,
    policy: &retry::RetryPolicy,
    runtime: &RetryRuntime,
    pairs: &HeaderPairs<'_>,
    now: u64,
) -> Reservation {
    let grpc_timeout = pairs.get(retry::GRPC_TIMEOUT_HEADER);
    let deadline_header = policy
        .deadline_header
        .as_deref()
        .and_then(|name| pairs.get(name));
    let deadline = retry::client_deadline_ms(grpc_timeout, deadline_header);
    // Which conditions the request may have: from the headers already
    // read, no host call (see `retry`, "Which requests are retried").
    let kind = retry::classify(
        policy,
        &retry::RequestFacts {
            method: pairs.get(":method"),
            path: pairs.get(":path"),
            content_type: pairs.get("content-type"),
            idempotency_key: pairs.get(retry::IDEMPOTENCY_KEY_HEADER),
        },
    );
    let plan = retry::plan_for(policy, deadline, kind);
    if plan.deadline_cut {
        runtime.deadline_cut.increment();
    }
    if plan.withheld {
        runtime.withheld_unsafe.increment();
    }
    // Even a request whose deadline (or whose safety) leaves it no retry is
    // deposited: the budget is a share of all requests. Only a policy that
    // never retries skips the store.
    let reservation = if policy.max_retries == 0 {
        Reservation::unrecorded(0)
    } else {
        runtime.reserve(host, policy, now, plan.max_retries)
    };
    runtime.granted.add(u64::from(reservation.granted));
    runtime.denied.add(u64::from(reservation.denied));
    if reservation.dry && retry::dry_warning_due(runtime.last_dry_warning_ms.get(), now, policy) {
        runtime.last_dry_warning_ms.set(Some(now));
        log::warn!(
            "sluice: retry budget of service {service} ran dry: {} of {} retries denied, {} tokens left",
            reservation.denied,
            plan.max_retries,
            reservation.level
        );
    }
    retry::for_each_owned_header(policy, &plan, reservation.granted, |name, value| {
        match value {
            Some(value) => host.set_request_header(name, value),
            // Only what the client sent needs removing.
            None if pairs.contains(name) => host.remove_request_header(name),
            None => {}
        }
    });
    reservation
}

/// Fails a request fast while the stable cluster's breaker is open. A gRPC
/// request gets what gRPC clients understand: Envoy turns a local reply with
/// a gRPC status into a trailers-only answer (HTTP 200, `content-type:
/// application/grpc`, `grpc-status: 14`, the body as `grpc-message`), and
/// `grpc-retry-pushback-ms` tells the client's retry policy when to try
/// again.
fn reject(host: &impl Host, service: &str, retry_after_ms: u64, grpc: bool) {
    let retry_after = breaker::retry_after_seconds(retry_after_ms).to_string();
    if grpc {
        let pushback = retry_after_ms.to_string();
        let message = format!(
            "sluice: circuit breaker of service {service} is open; retry after {retry_after}s"
        );
        host.send_local_response(
            503,
            &[
                (GRPC_PUSHBACK_HEADER, pushback.as_str()),
                (BREAKER_HEADER, "open"),
            ],
            message.as_bytes(),
            Some(crate::failures::GRPC_UNAVAILABLE),
        );
        return;
    }
    let body = format!(
        "sluice: circuit breaker of service {service} is open; retry after {retry_after}s\n"
    );
    host.send_local_response(
        503,
        &[
            ("retry-after", retry_after.as_str()),
            (BREAKER_HEADER, "open"),
            ("content-type", "text/plain"),
        ],
        body.as_bytes(),
        None,
    );
}

/// The request headers, read from the one buffer the host returned.
struct RequestView<'p, 'a>(&'p HeaderPairs<'a>);

impl RequestHeaders for RequestView<'_, '_> {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0.get(name)
    }
}
