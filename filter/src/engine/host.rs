//! What the engine asks of its host, and nothing more.
//!
//! In Envoy every call here is a crossing between the proxy and the VM
//! (about a microsecond each, `benches/hostcalls.sh`), so the engine asks
//! lazily: only when it needs the answer, and on the common path never
//! twice for the same fact in one callback (`benches/results/
//! native-crossings.md` counts every path). The shell implements this trait over the raw proxy-wasm
//! calls; native tests, the fuzzer and the benchmarks implement it over
//! plain memory. Calls that act on a request (headers, properties, local
//! replies) act on the stream the host is calling back for, as in Envoy.

use crate::breaker::Transition;
use crate::retry::{Budget, Landed, Lease, Reservation};
use crate::shared::SharedStore;

/// A stream property the engine reads at the end of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// `response.code`: the status sent downstream (0 or absent: none).
    ResponseCode,
    /// `response.flags`: Envoy's response-flag bits (upstream reset,
    /// connection failure, timeout, …).
    ResponseFlags,
    /// `upstream.request_attempt_count`: attempts the router made.
    AttemptCount,
    /// `response.grpc_status`: the gRPC status of the response, from the
    /// trailers, else from the header block of a trailers-only answer, else
    /// inferred from the HTTP status (Envoy's `Grpc::Common::getGrpcStatus`:
    /// 503 is UNAVAILABLE, a 200 without any `grpc-status` is UNKNOWN).
    /// Absent when no response was sent at all (a reset).
    GrpcStatus,
}

/// The kind of a metric, as `proxy_define_metric` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

/// What the engine did, for observers that check it (the fuzzer's oracles,
/// tests). The shell ignores every event: the default `Host::observe` is
/// empty and compiles away.
#[derive(Debug, Clone, Copy)]
pub enum Observed<'a> {
    /// A request got its retries from the budget stored under `key`: a
    /// reservation of its own that landed, or a grant from the worker's
    /// lease (`reservation.lease`). A request that wants no retry and
    /// writes nothing reports nothing.
    Reserved {
        key: &'a str,
        budget: Budget,
        reservation: &'a Reservation,
    },
    /// A write to the budget under `key` landed, with the worker's
    /// requests since its last write deposited where `landed` says.
    Deposited {
        key: &'a str,
        budget: Budget,
        landed: &'a Landed,
    },
    /// The worker took a lease on the budget under `key` (in the write
    /// reported by the `Deposited` just before).
    Leased {
        key: &'a str,
        budget: Budget,
        lease: &'a Lease,
    },
    /// A write to the breaker stored under `key` changed its state; this
    /// VM is the one that reports it.
    BreakerChanged {
        key: &'a str,
        transition: &'a Transition,
    },
    /// A read-modify-write of `key` lost every CAS race and was given up.
    UpdateLost { key: &'a str },
}

/// The host: Envoy through the shell, or a fake.
pub trait Host: SharedStore {
    /// Wall-clock milliseconds since the Unix epoch (Envoy's clock can step
    /// back and forth; the policy modules are written for that).
    fn now_ms(&self) -> u64;
    /// Eight random bytes; `None` if the host refused.
    fn random_u64(&self) -> Option<u64>;
    /// The plugin configuration bytes (empty if there are none).
    fn plugin_configuration(&self) -> Vec<u8>;
    fn set_tick_period_ms(&self, period_ms: u32);
    /// Every request header in the ABI's map encoding, read in place by
    /// `crate::pairs::HeaderPairs`: one crossing instead of one per header.
    fn request_header_pairs(&self) -> Vec<u8>;
    /// Sets a request header to one value, replacing every existing one.
    fn set_request_header(&self, name: &str, value: &[u8]);
    /// Removes every value of a request header.
    fn remove_request_header(&self, name: &str);
    /// Asks the host to select the request's route again after the engine
    /// changed request headers: Envoy's foreign function `clear_route_cache`
    /// (`proxy_call_foreign_function`, empty argument). Returns false when
    /// the host does not offer it (NotFound, Unimplemented); the engine then
    /// never asks again in this VM. True otherwise, whatever it answered.
    fn clear_route_cache(&self) -> bool;
    /// Every response header in the ABI's map encoding, read in place by
    /// `crate::pairs::HeaderPairs`: the status, a trailers-only gRPC
    /// answer's `grpc-status` and the router's `x-envoy-attempt-count` in
    /// one crossing (and its allocation) instead of one each. Empty when the
    /// host has no response headers.
    fn response_header_pairs(&self) -> Vec<u8>;
    /// An integer stream property.
    fn integer_property(&self, property: Property) -> Option<u64>;
    /// Answers the request locally; the request goes no further. With a
    /// `grpc_status` and a gRPC request Envoy sends a trailers-only gRPC
    /// answer (HTTP 200, `content-type: application/grpc`, that
    /// `grpc-status`, the body as `grpc-message`, and `headers`).
    fn send_local_response(
        &self,
        status: u32,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    );
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&self, id: u32, offset: i64);
    fn record_metric(&self, id: u32, value: u64);
    /// Sees what the engine did; the shell does nothing with it.
    fn observe(&self, _event: Observed<'_>) {}
}
