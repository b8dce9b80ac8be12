//! Retry governance: how many retries a request may have, and the retry
//! budget that bounds them across the whole proxy.
//!
//! Envoy's router executes retries inside itself; a filter never sees the
//! individual attempts. So Sluice decides up front, in the request headers:
//! it writes `x-envoy-max-retries` (and the retry conditions and timeouts),
//! overwriting whatever the client sent, and learns at the end of the request
//! how many attempts the router made (`upstream.request_attempt_count`).
//!
//! In route mode (`RetryMode::Route`) the route's `retry_policy` and timeout
//! carry the policy and the block states them; Sluice then writes only what
//! lowers them for one request (`for_each_route_header`): fewer retries than
//! the route's, a shorter timeout. A header cannot narrow the route's
//! conditions (Envoy ORs `x-envoy-retry-on` with them), so a request that
//! may not be replayed gets no retry at all when the route's conditions
//! could replay it after the application acted (`plan_for`). In both modes
//! a client's copies of the owned headers are removed.
//!
//! # The budget
//!
//! Like Finagle's and Linkerd's retry budgets (and tower's `TpsBudget`), the
//! retries of a window may be at most `ratio` of its requests, plus a reserve
//! of `min_per_s` per second so that a quiet service can still retry. Because
//! the decision is made before any attempt, the filter cannot withdraw a token
//! per retry as it happens; instead a request RESERVES its retries when it
//! starts and gives back the unused ones when it ends (a `Settlement`). Reserving is
//! what makes the bound exact: every retry the router may still make is
//! already paid for, so however many requests are in flight when an upstream
//! goes down, they cannot retry more than the balance allowed.
//!
//! Accounting is per second of wall time, in a ring of `window_s` slots: a
//! slot holds the requests deposited, the retries charged (reserved, net of
//! refunds) and the reservations still open in that second. A slot leaves the
//! window `window_s` seconds later, taking its deposits and its charges with
//! it; so a reservation leaked by a VM that died (and never settled) expires
//! by itself, and after an outage the balance is back to at least the reserve
//! one window later. The state is a few hundred bytes in shared data, updated
//! with CAS so that every worker of the proxy draws from ONE budget; each
//! update touches at most `window_s` slots, whatever the uptime.
//!
//! ## The bound, exactly
//!
//! Write, per second `s`: `w_s` the retries charged, `d_s = ratio × requests`,
//! `r = min_per_s`, `W = window_s`. A grant is made only while the window's
//! balance `Σ (d_s + r − w_s)` stays ≥ 0 after it. It follows (by induction on
//! the last charged second) that for ANY interval of seconds `[a, b]`:
//!
//! ```text
//! retries(a..=b) ≤ ratio × requests(a−W+1 ..= b) + min_per_s × (b − a + W)
//! ```
//!
//! that is, `ratio` of the interval's requests, plus the reserve over the
//! interval, plus the balance saved up in the `W − 1` seconds before it. Over
//! an outage, attempts/requests ≤ 1 + ratio + min_per_s/rps + slack, where the
//! slack is that saved-up balance (at most `min_per_s × (W − 1)` and `ratio`
//! of the preceding `W − 1` seconds' requests), which amortises away as the
//! outage lasts. Two more documented effects on the bound:
//! - retries are charged to the second they were GRANTED; the router runs
//!   them within the request's lifetime (capped by the upstream timeout), so
//!   on execution time the bound holds shifted by at most that timeout;
//! - a lost CAS race grants nothing and a lost settle refunds nothing: both
//!   only lower the retries. A fresh state (first use, unreadable bytes, a
//!   changed budget block, a clock stepped back by more than a window) starts
//!   at the reserve, forgetting charges still in the window: one extra reserve
//!   (and a lease of the old state still hands out what it was charged
//!   there, at most `LEASE_MAX` tokens per worker, until it expires);
//! - deposits are batched (see "Leases"): a worker deposits its requests
//!   with its next write, at most `δ` later, where `δ` is the time between
//!   its writes (its tick, `engine::TICK_MS`, when nothing else writes; more
//!   only while every CAS attempt is lost). The induction above is on the
//!   state's own accounting, which is unchanged, so it holds with requests
//!   counted by the second they were DEPOSITED in; by the second they were
//!   served, `requests(a−W+1 ..= b)` becomes `requests(a−W+1−δ ..= b)`: a
//!   window longer by `δ` at its old end. A deposit never lands before its
//!   request, so nothing is credited ahead of the traffic.
//!
//! ## Healthy traffic under high concurrency
//!
//! Reserving holds `max_retries` tokens per request in flight, though a
//! healthy request uses almost none; with many slow requests in flight the
//! reservations alone can empty the balance and starve the rare failure of
//! its retry. Granting without reserving while the balance is high cannot
//! keep the bound exact (nothing would pay for the retries of the requests
//! already in flight when the outage starts), so every grant is reserved and
//! the tokens are rationed instead. The first retry carries almost all the
//! value (at a 10 % failure rate one retry leaves 99 % succeeding, a second
//! 99.9 %), so a request gets its first retry while any whole token is left,
//! and its deeper retries only from the balance above a cushion of a quarter
//! token per open reservation, which keeps first retries for the requests
//! that will arrive before those reservations are settled. When tokens are
//! plentiful this changes nothing. Each slot counts its open reservations;
//! settling closes them, and leaked ones leave with their slot.
//!
//! Exactness has a price that no rationing removes: every request in flight
//! holds at least one token. The balance, `ratio × window_s` seconds of
//! traffic plus the reserve, must cover the retries used in a window plus one
//! token per request in flight, roughly `ratio × window_s ≥ failure rate ×
//! window_s + time to response headers`. With the defaults (2 s of traffic)
//! and 10 % failures, that holds up to about 0.9 s to response headers;
//! slower services need a longer window or a higher ratio. Settling as soon as
//! the response headers arrive (not at the end of the stream) keeps
//! reservations short; see `settle`.
//!
//! ## Leases: no shared-data call on the common request
//!
//! A write to the shared state is three crossings (a read, the `malloc`
//! callback that copies it in, a CAS write), a third of a request's. So a
//! worker takes a LEASE: `L` tokens charged in one write to the head slot
//! of the state, as ONE open reservation, which it hands out to its
//! requests with no host call. A request wanting `w ≤ free` retries gets
//! them; its `Reservation` names the lease (`lease`, the lease's serial)
//! and its slot. At its response headers it gives its unused retries back
//! to the lease's free count, in the VM; the ones the router used stay
//! charged. Its deposit waits for the worker's next write too.
//!
//! The bound is untouched: to the state a lease is a reservation of `L`
//! retries made while the balance allowed it, and the lease's requests
//! together never hold more than `L` (a grant takes from `free`, a
//! settlement gives back only what its request was granted and did not
//! use). Only the deposits move, as written under "The bound, exactly".
//!
//! Renewal: when the lease cannot cover a request, or it has expired, one
//! write settles the held settlements, deposits the requests served,
//! gives the old lease back (its free tokens refunded to its slot, its open
//! count closed) and takes a new one (`renew`). Tokens of the old lease's
//! requests still in flight stay charged; each is refunded by its own
//! settlement, held and written as a reservation's, except that it closes
//! no open count (the lease's is closed once, when it is given back). A
//! tick gives back an expired lease (`write_pending`).
//!
//! Lifetime: a lease hands out tokens at `taken ≤ now < expires`, with
//! `expires = min(taken + LEASE_MS, (s + W) × 1000)`, `s` its slot: its slot
//! is in the window whenever one of its tokens is handed out (with
//! `window_s: 1`, a lease ends with its second). A clock that steps back
//! before `taken` makes the lease invalid rather than longer, and the next
//! request renews it. A VM that dies holding a lease leaks its charge,
//! which leaves with its slot like any leaked reservation.
//!
//! Size: `L = min(LEASE_MAX, (tokens − cushion) / LEASE_SHARE)`, an eighth
//! of what the others could use, so each worker holding one leaves the
//! others at least 7/8 of the balance. When that does not cover the
//! request (fewer than `8 × w` spare tokens), no lease is taken and the
//! request reserves alone, with the cushion's rationing: under scarcity
//! the budget behaves exactly as without leases. When tokens are plentiful
//! (the default reserve alone is 100 tokens, a lease of 12), a lease
//! covers a worker's concurrency: unused retries come back to it at each
//! response, so it is renewed about once per `LEASE_MS`. The cushion counts
//! a lease as one open reservation; its requests in flight are paid for
//! by it.
//!
//! Retries beyond the grant: with a route's own retry policy (`retry.mode:
//! "route"`) the router may retry more than Sluice granted. A settlement
//! whose attempts say so CHARGES the extra retries to the slot (for a
//! lease's request too, through the next write): the budget counts the
//! retries the router really made (`Settlement::balance`).
//!
//! # Deadlines
//!
//! A client deadline (`grpc-timeout`, or the configured `deadline_header` in
//! milliseconds) can only LOWER the upstream timeout, to `min(deadline,
//! timeout_ms)`; without `timeout_ms` the route's own timeout (unknown to the
//! filter) stands, since writing the client's value could raise it. With a
//! per-try timeout `p`, no retry is granted that could not finish inside the
//! deadline `d`: at most `max(1, floor(d / p))` attempts. Without a per-try
//! timeout an attempt has no bound of its own, so none can be ruled out: the
//! retries are granted as usual, Envoy's upstream timeout (which covers every
//! attempt) stops them at the deadline, and the unused reservation is
//! refunded. Hostile values (garbage, signs, more than 8 gRPC digits,
//! overflow) are ignored, as if no deadline had been sent.
//!
//! # Which requests are retried
//!
//! A retry sends the request again. For a request that may already have had
//! its effect (an order written, a card charged) that is a duplicate, so the
//! conditions a request is armed with depend on whether replaying it is safe:
//!
//! - a request whose method RFC 9110 (§9.2.2) defines as idempotent (`GET`,
//!   `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`; methods are case-sensitive)
//!   gets the service's conditions as configured;
//! - so does a request the service or the client declares safe: one that
//!   carries an `Idempotency-Key` header (the IETF httpapi draft: the server
//!   deduplicates by it), or whose method or path prefix is listed in the
//!   retry block's `idempotent`;
//! - any other request (`POST`, `PATCH`, an unknown method, no method at
//!   all) gets only the conditions under which it provably never reached the
//!   application: the service's own among `connect-failure`,
//!   `refused-stream` and `reset-before-request` (never one it did not
//!   configure), and no gRPC condition. `reset`, `5xx`, `gateway-error` and
//!   the rest fire after the upstream may have processed the request.
//!
//! gRPC calls (`content-type: application/grpc...`) are all POSTs, and their
//! failures arrive as a `grpc-status` (usually with HTTP 200), so the HTTP
//! conditions are the wrong language for them. A gRPC call gets the gRPC
//! conditions of the block in `x-envoy-retry-grpc-on`: those configured, or
//! `unavailable` alone when none are. gRPC's status-code guide calls
//! UNAVAILABLE "most likely a transient condition, which can be corrected
//! by retrying with a backoff", and it is the code servers and gRPC
//! libraries use for a call that was not processed: a server draining or
//! not serving yet, an overloaded server shedding load, a transport that
//! failed before the call started. (The same guide warns that it is "not
//! always safe to retry non-idempotent operations": a handler that returns
//! UNAVAILABLE after acting breaks that convention, and its service should
//! list its own gRPC conditions, which replace the default.) INTERNAL,
//! CANCELLED, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED say nothing about
//! whether the call had its effect, so they are retried only when the
//! service lists them. A gRPC call's HTTP conditions are narrowed as any
//! POST's (a `reset` mid-call is exactly the case where the server may
//! have acted; gRPC's own transparent retry is likewise limited to calls
//! that never left the client), unless the call is opted in as above.
//!
//! A request whose conditions all go (a service with `retry_on: "5xx"` and
//! a POST) plans no retry: `x-envoy-max-retries: 0`, the condition headers
//! removed, nothing reserved; it is still deposited as a request, as a
//! request whose deadline leaves no retry is. Each request narrowed for
//! safety counts in `sluice.<service>.retry.withheld_unsafe`.

use crate::sticky::mix;

/// Envoy's retry conditions for `x-envoy-retry-on`.
pub const HTTP_POLICIES: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
];

/// Envoy's gRPC retry conditions. Envoy reads these from a separate header,
/// `x-envoy-retry-grpc-on` (in `x-envoy-retry-on` they are ignored), so the
/// configured list is split in two.
pub const GRPC_POLICIES: &[&str] = &[
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The HTTP conditions under which a request provably never reached the
/// application: the connection was never made, the stream was refused
/// before any of it was processed (HTTP/2 `REFUSED_STREAM`, RFC 9113
/// §8.7), or the upstream reset it before the request was sent. These are
/// the only ones a request that is not idempotent keeps.
pub const PRE_REQUEST_CONDITIONS: [&str; 3] =
    ["connect-failure", "refused-stream", "reset-before-request"];

/// The methods RFC 9110 §9.2.2 defines as idempotent (case-sensitive, as
/// methods are).
pub const IDEMPOTENT_METHODS: [&[u8]; 6] =
    [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"];

/// A request carrying it is treated as idempotent (IETF httpapi draft
/// "The Idempotency-Key HTTP Header Field": the server deduplicates by it).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The gRPC conditions of a gRPC call when the service configured none:
/// UNAVAILABLE is what a server answers when it did not process the call.
pub const DEFAULT_GRPC_CALL_RETRY_ON: &str = "unavailable";

/// Bounds on `idempotent`, so that the request path's matching stays short.
pub const MAX_IDEMPOTENT_METHODS: usize = 32;
pub const MAX_IDEMPOTENT_PATH_PREFIXES: usize = 64;
pub const MAX_METHOD_LEN: usize = 64;
pub const MAX_PATH_PREFIX_LEN: usize = 1024;

pub const DEFAULT_RETRY_ON: &str = "5xx,reset,connect-failure,refused-stream";
pub const DEFAULT_MAX_RETRIES: u32 = 2;
pub const MAX_MAX_RETRIES: u64 = 10;
/// An hour: beyond that, a "timeout" is a misconfiguration.
pub const MAX_TIMEOUT_MS: u64 = 3_600_000;
pub const MAX_PER_TRY_TIMEOUT_MS: u64 = 600_000;
pub const DEFAULT_RATIO_PPM: u32 = 200_000;
pub const DEFAULT_MIN_PER_S: u32 = 10;
pub const DEFAULT_WINDOW_S: u32 = 10;
pub const MAX_MIN_PER_S: u64 = 100_000;
pub const MAX_WINDOW_S: u64 = 60;

/// The request headers the filter owns; see `for_each_request_header`.
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";
pub const RETRY_ON_HEADER: &str = "x-envoy-retry-on";
pub const RETRY_GRPC_ON_HEADER: &str = "x-envoy-retry-grpc-on";
pub const TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-timeout-ms";
pub const PER_TRY_TIMEOUT_HEADER: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
/// With it, a per-try timeout starts a parallel attempt instead of replacing
/// the slow one: more load at the worst moment, at the client's request.
pub const HEDGE_HEADER: &str = "x-envoy-hedge-on-per-try-timeout";
/// Envoy takes the timeout from this header instead of ours when the router
/// sets `respect_expected_rq_timeout`.
pub const EXPECTED_TIMEOUT_HEADER: &str = "x-envoy-expected-rq-timeout-ms";
/// These widen the retry conditions; the route's own lists still apply.
pub const RETRIABLE_STATUS_CODES_HEADER: &str = "x-envoy-retriable-status-codes";
pub const RETRIABLE_HEADER_NAMES_HEADER: &str = "x-envoy-retriable-header-names";
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// The request headers the filter writes (see `for_each_request_header`): the
/// deadline cannot be read from any of them. A client's copy is removed on
/// every request of a matched service, with a retry block or without.
pub const OWNED_HEADERS: [&str; 9] = [
    MAX_RETRIES_HEADER,
    RETRY_ON_HEADER,
    RETRY_GRPC_ON_HEADER,
    TIMEOUT_HEADER,
    PER_TRY_TIMEOUT_HEADER,
    HEDGE_HEADER,
    EXPECTED_TIMEOUT_HEADER,
    RETRIABLE_STATUS_CODES_HEADER,
    RETRIABLE_HEADER_NAMES_HEADER,
];

/// `retry.mode`: what carries the retry policy to Envoy's router.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RetryMode {
    /// Sluice writes the retry and timeout headers on every request of the
    /// service (`for_each_request_header`).
    #[default]
    Headers,
    /// The route's `retry_policy` and `timeout` carry the policy, and the
    /// block states them; Sluice writes only what lowers them for one
    /// request (`for_each_route_header`).
    Route,
}

/// A service's retry policy, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub mode: RetryMode,
    /// In route mode: the route's `num_retries`.
    pub max_retries: u32,
    /// The HTTP conditions for `x-envoy-retry-on`, comma-separated; empty
    /// when only gRPC conditions are configured.
    pub retry_on: String,
    /// The gRPC conditions for `x-envoy-retry-grpc-on`; often empty.
    pub retry_grpc_on: String,
    pub per_try_timeout_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub budget: Budget,
    /// Lower-cased; `grpc-timeout` is always read as well.
    pub deadline_header: Option<String>,
    /// What the service declares safe to retry beyond RFC 9110's methods.
    pub idempotent: Idempotent,
    /// Derived from `retry_on` (see `RetryPolicy::set_conditions`): its
    /// `PRE_REQUEST_CONDITIONS`, in the configured order, for requests that
    /// are not idempotent.
    pub safe_retry_on: String,
    /// Derived from `retry_grpc_on`: it, or `unavailable` when empty, for
    /// gRPC calls.
    pub grpc_call_retry_on: String,
}

/// `retry.idempotent`: requests the service declares safe to retry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Idempotent {
    /// Methods, compared case-sensitively (HTTP tokens).
    pub methods: Vec<String>,
    /// `:path` prefixes, each starting with `/`, compared byte for byte.
    pub path_prefixes: Vec<String>,
}

impl RetryPolicy {
    /// Sets the HTTP and gRPC conditions and what is derived from them at
    /// config time, so that the request path only borrows strings.
    pub fn set_conditions(&mut self, retry_on: String, retry_grpc_on: String) {
        self.safe_retry_on = safe_conditions(&retry_on);
        self.grpc_call_retry_on = if retry_grpc_on.is_empty() {
            DEFAULT_GRPC_CALL_RETRY_ON.to_string()
        } else {
            retry_grpc_on.clone()
        };
        self.retry_on = retry_on;
        self.retry_grpc_on = retry_grpc_on;
    }
}

/// The budget parameters. The ratio is kept in millionths so that the
/// accounting is integer and the bound exact (0.2 → 200_000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub ratio_ppm: u32,
    pub min_per_s: u32,
    pub window_s: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            ratio_ppm: DEFAULT_RATIO_PPM,
            min_per_s: DEFAULT_MIN_PER_S,
            window_s: DEFAULT_WINDOW_S,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            mode: RetryMode::Headers,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_on: DEFAULT_RETRY_ON.to_string(),
            retry_grpc_on: String::new(),
            per_try_timeout_ms: None,
            timeout_ms: None,
            budget: Budget::default(),
            deadline_header: None,
            idempotent: Idempotent::default(),
            safe_retry_on: safe_conditions(DEFAULT_RETRY_ON),
            grpc_call_retry_on: DEFAULT_GRPC_CALL_RETRY_ON.to_string(),
        }
    }
}

// ------------------------------------------------------------ safe retries

/// `retry_on`'s conditions under which the request never reached the
/// application (`PRE_REQUEST_CONDITIONS`), in its order: never one it does
/// not list.
pub fn safe_conditions(retry_on: &str) -> String {
    let kept: Vec<&str> = retry_on
        .split(',')
        .map(|item| item.trim_matches([' ', '\t']))
        .filter(|item| PRE_REQUEST_CONDITIONS.contains(item))
        .collect();
    kept.join(",")
}

/// Whether a comma-separated list of conditions (for `x-envoy-retry-on` or
/// `x-envoy-retry-grpc-on`) has any that may retry a request the
/// application already received: any condition outside
/// `PRE_REQUEST_CONDITIONS`, gRPC ones included (a `grpc-status` is a
/// response). For the fuzz oracle: a request that is not idempotent and
/// not opted in must never be armed with such a list, gRPC calls' own
/// `x-envoy-retry-grpc-on` excepted.
pub fn conditions_after_response(conditions: &str) -> bool {
    conditions
        .split(',')
        .map(|item| item.trim_matches([' ', '\t']))
        .any(|item| !item.is_empty() && !PRE_REQUEST_CONDITIONS.contains(&item))
}

/// RFC 9110 §9.2.2: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`,
/// case-sensitively.
pub fn is_idempotent_method(method: &[u8]) -> bool {
    IDEMPOTENT_METHODS.contains(&method)
}

/// The request facts the classification reads, borrowed from the request
/// headers (`None`: absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFacts<'a> {
    pub method: Option<&'a [u8]>,
    pub path: Option<&'a [u8]>,
    pub content_type: Option<&'a [u8]>,
    pub idempotency_key: Option<&'a [u8]>,
}

/// Why a request may be replayed; `None` from `safe_to_replay`: it may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayable {
    /// An RFC 9110 idempotent method.
    Method,
    /// It carries a non-empty `Idempotency-Key`.
    IdempotencyKey,
    /// Its method is in `idempotent.methods`.
    ConfiguredMethod,
    /// Its path starts with one of `idempotent.path_prefixes`.
    ConfiguredPath,
}

/// Whether the request may be replayed, and why. A missing method is an
/// unknown one; an `Idempotency-Key` of only whitespace is none.
pub fn safe_to_replay(policy: &RetryPolicy, request: &RequestFacts<'_>) -> Option<Replayable> {
    let method = request.method.unwrap_or_default();
    if is_idempotent_method(method) {
        return Some(Replayable::Method);
    }
    if request
        .idempotency_key
        .is_some_and(|key| !trim_ows(key).is_empty())
    {
        return Some(Replayable::IdempotencyKey);
    }
    let idempotent = &policy.idempotent;
    if request.method.is_some()
        && idempotent
            .methods
            .iter()
            .any(|listed| listed.as_bytes() == method)
    {
        return Some(Replayable::ConfiguredMethod);
    }
    if let Some(path) = request.path {
        if idempotent
            .path_prefixes
            .iter()
            .any(|prefix| path.starts_with(prefix.as_bytes()))
        {
            return Some(Replayable::ConfiguredPath);
        }
    }
    None
}

/// Which of the policy's condition lists a request is armed with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RequestKind {
    /// Safe to replay, not gRPC: `retry_on` and `retry_grpc_on`, as
    /// configured.
    #[default]
    Replayable,
    /// Not safe to replay, not gRPC: `safe_retry_on` only.
    Unsafe,
    /// A gRPC call safe to replay (opted in): `retry_on` and the gRPC
    /// call conditions.
    GrpcReplayable,
    /// A gRPC call: `safe_retry_on` and the gRPC call conditions.
    Grpc,
}

/// The request's kind (see the module documentation).
pub fn classify(policy: &RetryPolicy, request: &RequestFacts<'_>) -> RequestKind {
    let replayable = safe_to_replay(policy, request).is_some();
    let grpc = crate::failures::is_grpc_content_type(request.content_type);
    match (grpc, replayable) {
        (false, true) => RequestKind::Replayable,
        (false, false) => RequestKind::Unsafe,
        (true, true) => RequestKind::GrpcReplayable,
        (true, false) => RequestKind::Grpc,
    }
}

/// The values of `x-envoy-retry-on` and `x-envoy-retry-grpc-on` for a kind
/// (empty: remove the header), borrowed from the policy.
pub fn conditions(policy: &RetryPolicy, kind: RequestKind) -> (&str, &str) {
    match kind {
        RequestKind::Replayable => (&policy.retry_on, &policy.retry_grpc_on),
        RequestKind::Unsafe => (&policy.safe_retry_on, ""),
        RequestKind::GrpcReplayable => (&policy.retry_on, &policy.grpc_call_retry_on),
        RequestKind::Grpc => (&policy.safe_retry_on, &policy.grpc_call_retry_on),
    }
}

/// Whether a kind's conditions are narrower than the policy's as
/// configured: an HTTP condition dropped, or the gRPC conditions dropped
/// from a request that is not a gRPC call.
fn narrowed(policy: &RetryPolicy, kind: RequestKind) -> bool {
    let http_narrowed = policy.safe_retry_on.len() != policy.retry_on.len();
    match kind {
        RequestKind::Replayable | RequestKind::GrpcReplayable => false,
        RequestKind::Unsafe => http_narrowed || !policy.retry_grpc_on.is_empty(),
        RequestKind::Grpc => http_narrowed,
    }
}

// ---------------------------------------------------------------- deadlines

/// The client's deadline in milliseconds, from `grpc-timeout` and from the
/// configured deadline header; the stricter when both are sent. Unreadable
/// values count as absent.
pub fn client_deadline_ms(
    grpc_timeout: Option<&[u8]>,
    deadline_header: Option<&[u8]>,
) -> Option<u64> {
    let grpc = grpc_timeout.and_then(parse_grpc_timeout);
    let header = deadline_header.and_then(parse_millis);
    match (grpc, header) {
        (Some(grpc), Some(header)) => Some(grpc.min(header)),
        (grpc, header) => grpc.or(header),
    }
}

/// gRPC's `TimeoutValue TimeoutUnit`: 1 to 8 ASCII digits, then one of
/// `H M S m u n`. Rounded down to whole milliseconds.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<u64> {
    let (&unit, digits) = trim_ows(value).split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 99_999_999: no overflow below, even in hours (3.6e14 ms).
    let amount = digits
        .iter()
        .fold(0u64, |total, &digit| total * 10 + u64::from(digit - b'0'));
    match unit {
        b'H' => Some(amount * 3_600_000),
        b'M' => Some(amount * 60_000),
        b'S' => Some(amount * 1_000),
        b'm' => Some(amount),
        b'u' => Some(amount / 1_000),
        b'n' => Some(amount / 1_000_000),
        _ => None,
    }
}

/// A plain decimal count of milliseconds; no sign, no exponent, no overflow.
pub fn parse_millis(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |total, &digit| {
        total.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Strips HTTP's optional whitespace (spaces and tabs, RFC 9110 `OWS`)
/// around a header value.
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |last| last + 1);
    bytes.get(start..end).unwrap_or_default()
}

// -------------------------------------------------------------------- plan

/// What one request may have, before the budget is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Retries wanted: the policy's, cut by the deadline. The budget may
    /// grant fewer; pass this to `reserve_settling` as `wanted`.
    pub max_retries: u32,
    /// For `x-envoy-upstream-rq-timeout-ms`; `None`: remove the header.
    pub timeout_ms: Option<u64>,
    /// For `x-envoy-upstream-rq-per-try-timeout-ms`; `None`: remove it.
    pub per_try_timeout_ms: Option<u64>,
    /// The client's deadline lowered the retries (a metric).
    pub deadline_cut: bool,
    /// Which condition lists the request is armed with.
    pub kind: RequestKind,
    /// Its conditions were narrowed for safety (the `withheld_unsafe`
    /// metric); false for a policy that never retries.
    pub withheld: bool,
}

/// The per-request plan from the policy and the client's deadline, for a
/// request that is safe to replay (the conditions as configured).
pub fn plan(policy: &RetryPolicy, deadline_ms: Option<u64>) -> Plan {
    plan_for(policy, deadline_ms, RequestKind::Replayable)
}

/// How much longer than a gRPC client's deadline Envoy's upstream timeout
/// runs (see `plan_for`): a tenth of it, at least 5 ms and at most 100 ms,
/// enough for the client's own timer to fire first.
pub fn grpc_deadline_grace_ms(deadline_ms: u64) -> u64 {
    (deadline_ms / 10).clamp(5, 100)
}

/// The per-request plan from the policy, the client's deadline and the
/// request's kind (`classify`). A request left with no condition at all
/// plans no retry (and no deadline cut): the budget reserves nothing for it.
pub fn plan_for(policy: &RetryPolicy, deadline_ms: Option<u64>, kind: RequestKind) -> Plan {
    // Envoy reads a timeout of 0 as "no timeout": an expired deadline
    // ("0n") must become the shortest timeout, not an infinite one.
    let deadline = deadline_ms.map(|deadline| deadline.max(1));
    // A gRPC client enforces its own deadline and reports DEADLINE_EXCEEDED;
    // if Envoy's upstream timeout fired at the same instant, the two timers
    // would race and the client would now and then get Envoy's "upstream
    // request timeout" as UNAVAILABLE instead (3 calls in 10 in real Envoy),
    // a code that invites a retry. So Envoy's timeout runs a little longer
    // than the client's deadline; the retries still fit the deadline itself.
    let grace = match kind {
        RequestKind::Grpc | RequestKind::GrpcReplayable => {
            deadline.map_or(0, grpc_deadline_grace_ms)
        }
        RequestKind::Replayable | RequestKind::Unsafe => 0,
    };
    let timeout_ms = match (policy.timeout_ms, deadline) {
        (Some(timeout), Some(deadline)) => Some(timeout.min(deadline.saturating_add(grace))),
        (timeout, _) => timeout,
    };
    let none_left = match policy.mode {
        RetryMode::Headers => {
            let (http, grpc) = conditions(policy, kind);
            http.is_empty() && grpc.is_empty()
        }
        RetryMode::Route => route_replays_unsafely(policy, kind),
    };
    let mut max_retries = if none_left { 0 } else { policy.max_retries };
    let mut deadline_cut = false;
    if let (Some(deadline), Some(per_try)) = (deadline, policy.per_try_timeout_ms) {
        let attempts = (deadline / per_try.max(1)).max(1);
        let fit = u32::try_from(attempts - 1).unwrap_or(u32::MAX);
        if fit < max_retries {
            max_retries = fit;
            deadline_cut = true;
        }
    }
    Plan {
        max_retries,
        timeout_ms,
        per_try_timeout_ms: policy.per_try_timeout_ms,
        deadline_cut,
        kind,
        withheld: policy.max_retries > 0
            && match policy.mode {
                RetryMode::Headers => narrowed(policy, kind),
                RetryMode::Route => none_left,
            },
    }
}

/// Route mode: whether the route's conditions (the block's `retry_on`, which
/// states them) could replay this request after the application may have
/// acted. Headers cannot narrow a route's conditions (Envoy ORs
/// `x-envoy-retry-on` with them), so such a request gets no retry at all.
/// A non-gRPC request that is not safe to replay keeps its retries only
/// when every route condition fires before the request reached the
/// application (gRPC conditions fire on a response, so they count against
/// it); a gRPC call keeps the route's gRPC conditions, as in headers mode,
/// and may not have an HTTP one that fires after a response.
fn route_replays_unsafely(policy: &RetryPolicy, kind: RequestKind) -> bool {
    match kind {
        RequestKind::Replayable | RequestKind::GrpcReplayable => false,
        RequestKind::Unsafe => {
            conditions_after_response(&policy.retry_on) || !policy.retry_grpc_on.is_empty()
        }
        RequestKind::Grpc => conditions_after_response(&policy.retry_on),
    }
}

/// Every request header the filter owns, without allocating: calls
/// `write(name, value)` for each of the nine (`None`: remove it), numbers
/// written into a stack buffer and the policy's lists borrowed (the ones
/// `plan.kind` selects, all prepared at config time). Apply ALL of them to
/// every request of the service: the client's values must never reach the
/// router, whatever they say.
pub fn for_each_request_header(
    policy: &RetryPolicy,
    plan: &Plan,
    granted: u32,
    mut write: impl FnMut(&'static str, Option<&[u8]>),
) {
    let mut digits = [0u8; 20];
    write(
        MAX_RETRIES_HEADER,
        Some(decimal(
            u64::from(granted.min(plan.max_retries)),
            &mut digits,
        )),
    );
    let (http, grpc) = conditions(policy, plan.kind);
    write(RETRY_ON_HEADER, non_empty(http));
    write(RETRY_GRPC_ON_HEADER, non_empty(grpc));
    match plan.timeout_ms {
        Some(ms) => write(TIMEOUT_HEADER, Some(decimal(ms, &mut digits))),
        None => write(TIMEOUT_HEADER, None),
    }
    match plan.per_try_timeout_ms {
        Some(ms) => write(PER_TRY_TIMEOUT_HEADER, Some(decimal(ms, &mut digits))),
        None => write(PER_TRY_TIMEOUT_HEADER, None),
    }
    for name in [
        HEDGE_HEADER,
        EXPECTED_TIMEOUT_HEADER,
        RETRIABLE_STATUS_CODES_HEADER,
        RETRIABLE_HEADER_NAMES_HEADER,
    ] {
        write(name, None);
    }
}

/// The owned request headers for the policy's mode: `for_each_request_header`
/// or `for_each_route_header`. `write(name, None)` means "not ours to set":
/// the caller removes it only if the client sent it.
pub fn for_each_owned_header(
    policy: &RetryPolicy,
    plan: &Plan,
    granted: u32,
    write: impl FnMut(&'static str, Option<&[u8]>),
) {
    match policy.mode {
        RetryMode::Headers => for_each_request_header(policy, plan, granted, write),
        RetryMode::Route => for_each_route_header(policy, plan, granted, write),
    }
}

/// Route mode: the route's `retry_policy` and `timeout` carry the policy,
/// so a request needs a header only where Sluice LOWERS it, and every
/// other owned header is `None` (the client's copy, if any, removed: no
/// client raises its retries or timeout past the route's):
/// - `x-envoy-max-retries: N` when fewer than `max_retries` are granted
///   (the budget, a deadline, or a request the route's conditions must
///   not replay, see `plan_for`); Envoy takes it over `num_retries`;
/// - `x-envoy-upstream-rq-timeout-ms` when a client deadline lowered
///   `timeout_ms` (the route's timeout; without it nothing is known to
///   lower, as in headers mode);
/// - never the conditions (a header can only widen the route's) nor the
///   per-try timeout (a deadline cuts retries instead).
pub fn for_each_route_header(
    policy: &RetryPolicy,
    plan: &Plan,
    granted: u32,
    mut write: impl FnMut(&'static str, Option<&[u8]>),
) {
    let mut digits = [0u8; 20];
    let retries = granted.min(plan.max_retries);
    if retries < policy.max_retries {
        write(
            MAX_RETRIES_HEADER,
            Some(decimal(u64::from(retries), &mut digits)),
        );
    } else {
        write(MAX_RETRIES_HEADER, None);
    }
    match (plan.timeout_ms, policy.timeout_ms) {
        (Some(lowered), Some(route)) if lowered < route => {
            write(TIMEOUT_HEADER, Some(decimal(lowered, &mut digits)));
        }
        _ => write(TIMEOUT_HEADER, None),
    }
    for name in [
        RETRY_ON_HEADER,
        RETRY_GRPC_ON_HEADER,
        PER_TRY_TIMEOUT_HEADER,
        HEDGE_HEADER,
        EXPECTED_TIMEOUT_HEADER,
        RETRIABLE_STATUS_CODES_HEADER,
        RETRIABLE_HEADER_NAMES_HEADER,
    ] {
        write(name, None);
    }
}

fn non_empty(list: &str) -> Option<&[u8]> {
    (!list.is_empty()).then_some(list.as_bytes())
}

/// `value` in decimal, written at the end of `digits`.
fn decimal(mut value: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        if let Some(digit) = digits.get_mut(start) {
            // value % 10 < 10
            *digit = b'0' + (value % 10) as u8;
        }
        value /= 10;
        if value == 0 || start == 0 {
            break;
        }
    }
    digits.get(start..).unwrap_or_default()
}

// ------------------------------------------------------------------ budget

/// Budget units per retry token: deposits are `ratio_ppm` units a request.
pub const TOKEN: u64 = 1_000_000;

const STATE_VERSION: u8 = 1;
/// version, window, epoch (8), head second (8).
const HEADER_LEN: usize = 18;
/// requests, retries, open: three u32.
const SLOT_LEN: usize = 12;

/// One second of the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    /// Requests deposited.
    requests: u32,
    /// Retries charged: reserved, minus the refunds.
    retries: u32,
    /// Reservations not settled yet (for the cushion).
    open: u32,
}

/// The shared state of one service's budget: a ring of per-second slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    /// When this state was created (ms), or just after its predecessor's
    /// epoch if that is later (see `successor`): its identity. A refund only
    /// goes to the state it was taken from, never to a successor that reuses
    /// the slots.
    epoch: u64,
    /// The newest second; the window is `head − W + 1 ..= head`.
    head: u64,
    /// Indexed by `second % W`.
    slots: Vec<Slot>,
}

impl BudgetState {
    pub fn fresh(budget: &Budget, now_ms: u64) -> Self {
        BudgetState {
            epoch: now_ms,
            head: now_ms / 1000,
            slots: vec![Slot::default(); budget.window_s.max(1) as usize],
        }
    }

    /// Reads the state and brings it to `now_ms`. Anything unreadable (a
    /// different version or window, a wrong length, a head far in the
    /// future) gives a fresh state: garbage must never stop requests.
    pub fn decode(bytes: Option<&[u8]>, budget: &Budget, now_ms: u64) -> Self {
        let mut state = bytes
            .and_then(|bytes| Self::parse(bytes, budget, now_ms))
            .unwrap_or_else(|| Self::successor(bytes, budget, now_ms));
        state.advance(now_ms / 1000);
        state
    }

    /// A fresh state to replace `bytes`, with an epoch after theirs (when
    /// they have one): a clock stepped back to the very millisecond the old
    /// state was created must not give the new one the same identity, or
    /// the old state's reservations would be refunded into it.
    fn successor(bytes: Option<&[u8]>, budget: &Budget, now_ms: u64) -> Self {
        let mut state = Self::fresh(budget, now_ms);
        let previous = bytes
            .filter(|bytes| bytes.first() == Some(&STATE_VERSION))
            .and_then(|bytes| bytes.get(2..10))
            .and_then(|field| field.try_into().ok())
            .map(u64::from_le_bytes);
        if let Some(previous) = previous {
            state.epoch = state.epoch.max(previous.saturating_add(1));
        }
        state
    }

    fn parse(bytes: &[u8], budget: &Budget, now_ms: u64) -> Option<Self> {
        let window = budget.window_s.max(1);
        let (header, body) = bytes.split_at_checked(HEADER_LEN)?;
        let [version, stored_window, rest @ ..] = header else {
            return None;
        };
        let (epoch, head) = rest.split_at_checked(8)?;
        let epoch = u64::from_le_bytes(epoch.try_into().ok()?);
        let head = u64::from_le_bytes(head.try_into().ok()?);
        if *version != STATE_VERSION
            || u32::from(*stored_window) != window
            || body.len() != SLOT_LEN * window as usize
            // A head more than a window ahead of the clock would pin the
            // budget in the future, where no slot ever expires.
            || head > now_ms / 1000 + u64::from(window)
        {
            return None;
        }
        let word = |chunk: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(chunk.get(at..at + 4)?.try_into().ok()?))
        };
        let slots = body
            .chunks_exact(SLOT_LEN)
            .map(|chunk| {
                Some(Slot {
                    requests: word(chunk, 0)?,
                    retries: word(chunk, 4)?,
                    open: word(chunk, 8)?,
                })
            })
            .collect::<Option<Vec<Slot>>>()?;
        Some(BudgetState { epoch, head, slots })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + SLOT_LEN * self.slots.len());
        bytes.push(STATE_VERSION);
        // The window is at most 60 slots.
        bytes.push(self.slots.len() as u8);
        bytes.extend_from_slice(&self.epoch.to_le_bytes());
        bytes.extend_from_slice(&self.head.to_le_bytes());
        for slot in &self.slots {
            bytes.extend_from_slice(&slot.requests.to_le_bytes());
            bytes.extend_from_slice(&slot.retries.to_le_bytes());
            bytes.extend_from_slice(&slot.open.to_le_bytes());
        }
        bytes
    }

    fn window(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Moves the head to `now_s`, clearing the seconds that left the window
    /// (at most a window's worth, however long the gap). A clock that went
    /// back keeps the head: the second is counted in the newest slot.
    fn advance(&mut self, now_s: u64) {
        if now_s <= self.head {
            return;
        }
        let window = self.window();
        let stale = (now_s - self.head).min(window);
        for second in now_s - stale + 1..=now_s {
            if let Some(slot) = self.slots.get_mut((second % window) as usize) {
                *slot = Slot::default();
            }
        }
        self.head = now_s;
    }

    /// The slot of `second` if it is still in the window.
    fn slot_mut(&mut self, second: u64) -> Option<&mut Slot> {
        let window = self.window();
        if second > self.head || self.head - second >= window {
            return None;
        }
        self.slots.get_mut((second % window) as usize)
    }

    /// Whole retry tokens available now: the balance over the window
    /// (reserve + deposits − charges, in units) in whole tokens, 0 when it
    /// is negative.
    ///
    /// Sums first, multiplies once: the per-slot products in `i128` were
    /// forty 128-bit multiplications a reservation, a library call each in
    /// wasm. In `u64` nothing overflows within the config's bounds (a
    /// window of at most 60 slots of `u32` counts is under 2^38, times
    /// `ratio_ppm` ≤ 10^6 or `TOKEN` under 2^58). The operations saturate
    /// anyway: a saturated credit could only give fewer tokens than the
    /// exact figure, a saturated debit more, and the bounds rule both out.
    pub fn tokens(&self, budget: &Budget) -> u64 {
        let (requests, retries) =
            self.slots
                .iter()
                .fold((0u64, 0u64), |(requests, retries), slot| {
                    (
                        requests.saturating_add(u64::from(slot.requests)),
                        retries.saturating_add(u64::from(slot.retries)),
                    )
                });
        let reserve = u64::from(budget.min_per_s)
            .saturating_mul(u64::from(budget.window_s))
            .saturating_mul(TOKEN);
        let credit = reserve.saturating_add(requests.saturating_mul(u64::from(budget.ratio_ppm)));
        let debit = retries.saturating_mul(TOKEN);
        credit.saturating_sub(debit) / TOKEN
    }

    fn open(&self) -> u64 {
        self.slots.iter().map(|slot| u64::from(slot.open)).sum()
    }
}

/// The cushion is a token per this many open reservations (see the module
/// documentation). Measured in `tests/retry.rs`: 0 (plain reservation) lets
/// requests go without any retry when tokens are scarce; a whole token per
/// open reservation (or a fair share of the balance among them) withholds
/// second retries while tokens are merely tight; a quarter to an eighth was
/// best at every load tried.
const CUSHION_DIVISOR: u64 = 4;

/// A request's claim on the budget, kept by the stream until `settle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The state it was taken from (see `BudgetState::epoch`).
    pub epoch: u64,
    /// The second (slot) it was charged to.
    pub second: u64,
    /// Retries granted: the `x-envoy-max-retries` to write.
    pub granted: u32,
    /// Retries wanted but refused by the budget (a metric).
    pub denied: u32,
    /// The budget had fewer tokens than wanted: it ran dry (log a warning,
    /// rate-limited with `dry_warning_due`).
    pub dry: bool,
    /// Whole tokens left after this reservation (the gauge); for a grant
    /// from a lease, the lease's free tokens.
    pub level: u64,
    /// The serial of the lease it was granted from; 0 for a reservation of
    /// its own (see `Lease`).
    pub lease: u64,
}

impl Reservation {
    /// For a request whose reservation could not be written (every CAS
    /// attempt lost): no retries, nothing to settle.
    pub fn unrecorded(wanted: u32) -> Self {
        Reservation {
            epoch: 0,
            second: 0,
            granted: 0,
            denied: wanted,
            dry: false,
            level: 0,
            lease: 0,
        }
    }
}

impl BudgetState {
    /// Deposits `requests` requests into the head slot (the current
    /// second): the requests a worker served since its last write.
    fn deposit(&mut self, requests: u32) {
        let second = self.head;
        if let Some(slot) = self.slot_mut(second) {
            slot.requests = slot.requests.saturating_add(requests);
        }
    }

    /// Deposits this request and reserves up to `wanted` retries for it.
    fn reserve(&mut self, budget: &Budget, wanted: u32) -> Reservation {
        self.deposit(1);
        self.grant(budget, wanted)
    }

    /// Reserves up to `wanted` retries for a request already deposited,
    /// with the cushion's rationing (see the module documentation).
    fn grant(&mut self, budget: &Budget, wanted: u32) -> Reservation {
        let second = self.head;
        let available = self.tokens(budget);
        // The first retry takes any whole token; deeper ones only what lies
        // above the cushion kept for the first retries of requests to come.
        let cushion = self.open() / CUSHION_DIVISOR;
        let deep = available.saturating_sub(cushion);
        let mut granted = if available == 0 {
            0
        } else {
            u32::try_from(u64::from(wanted).min(deep.max(1))).unwrap_or(0)
        };
        if granted > 0 && !self.charge(second, granted) {
            granted = 0;
        }
        Reservation {
            epoch: self.epoch,
            second,
            granted,
            denied: wanted - granted,
            dry: available < u64::from(wanted),
            level: self.tokens(budget),
            lease: 0,
        }
    }

    /// Charges `tokens` to the slot of `second` as one open reservation;
    /// false (nothing charged) when the slot is gone or would overflow.
    fn charge(&mut self, second: u64, tokens: u32) -> bool {
        match self.slot_mut(second) {
            Some(slot) => match slot.retries.checked_add(tokens) {
                Some(retries) => {
                    slot.retries = retries;
                    slot.open = slot.open.saturating_add(1);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// The size of a lease taken now: an eighth of the tokens above the
    /// cushion, at most `LEASE_MAX` (see "Leases" in the module docs).
    fn lease_size(&self, budget: &Budget) -> u32 {
        let cushion = self.open() / CUSHION_DIVISOR;
        let spare = self.tokens(budget).saturating_sub(cushion);
        u32::try_from((spare / LEASE_SHARE).min(LEASE_MAX)).unwrap_or(0)
    }

    /// Takes a lease of `lease_size` tokens in the head slot, if that covers
    /// `wanted`; `None` (nothing charged) otherwise.
    fn take_lease(
        &mut self,
        budget: &Budget,
        wanted: u32,
        now_ms: u64,
        serial: u64,
    ) -> Option<Lease> {
        let tokens = self.lease_size(budget);
        if wanted == 0 || tokens < wanted {
            return None;
        }
        let second = self.head;
        if !self.charge(second, tokens) {
            return None;
        }
        // The slot leaves the window at (second + W) s: no token of the
        // lease may be handed out from then on. The head is never behind
        // the clock's second after `advance`, so this is after `now_ms`.
        let slot_ends_ms = second.saturating_add(self.window()).saturating_mul(1000);
        Some(Lease {
            serial,
            epoch: self.epoch,
            second,
            tokens,
            free: tokens,
            taken_ms: now_ms,
            expires_ms: now_ms.saturating_add(LEASE_MS).min(slot_ends_ms),
        })
    }

    /// Gives a lease's free tokens back to its slot and closes its open
    /// reservation, if the slot (of the same state) is still in the window.
    /// Tokens of its requests still in flight stay charged: their own
    /// settlements refund them.
    fn give_back(&mut self, lease: &Lease) {
        if lease.epoch != self.epoch {
            return;
        }
        if let Some(slot) = self.slot_mut(lease.second) {
            slot.retries = slot.retries.saturating_sub(lease.free);
            slot.open = slot.open.saturating_sub(1);
        }
    }

    /// Everything a worker held back: settlements, the lease it gives back,
    /// its requests' deposits.
    fn apply(&mut self, pending: &Pending<'_>) {
        for settlement in pending.settlements {
            self.settle(settlement);
        }
        if let Some(lease) = &pending.returned {
            self.give_back(lease);
        }
        self.deposit(pending.deposits);
    }
}

/// A finished request's reservation and the attempts the router made, kept
/// by the worker until its next write to the budget (or, for a request of
/// the worker's current lease, given back to it: `Lease::settle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub reservation: Reservation,
    /// `upstream.request_attempt_count`; when unknown, nothing is refunded
    /// (the budget errs on the side of fewer retries; the charge expires
    /// with the window).
    pub attempts_made: Option<u64>,
}

impl Settlement {
    /// Retries to give back (`Ok`) or, when the router made more retries
    /// than were granted (a route's own retry policy, `retry.mode:
    /// "route"`), to charge on top (`Err`). Unknown attempts refund nothing.
    pub fn balance(&self) -> Result<u32, u32> {
        let granted = self.reservation.granted;
        match self.attempts_made {
            None => Ok(0),
            Some(attempts) => {
                let used = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                if used <= granted {
                    Ok(granted - used)
                } else {
                    Err(used - granted)
                }
            }
        }
    }
}

impl BudgetState {
    /// Gives back the retries a request did not use to the slot they were
    /// taken from, if that slot (of the same state) is still in the window;
    /// charges the retries the router made beyond its grant. A request's
    /// own reservation closes its open count; one from a lease does not
    /// (the lease's is closed once, when the lease is given back).
    fn settle(&mut self, settlement: &Settlement) {
        let reservation = &settlement.reservation;
        let balance = settlement.balance();
        if reservation.epoch != self.epoch || balance == Ok(0) && reservation.granted == 0 {
            return;
        }
        if let Some(slot) = self.slot_mut(reservation.second) {
            match balance {
                Ok(unused) => slot.retries = slot.retries.saturating_sub(unused),
                Err(extra) => slot.retries = slot.retries.saturating_add(extra),
            }
            if reservation.lease == 0 && reservation.granted > 0 {
                slot.open = slot.open.saturating_sub(1);
            }
        }
    }
}

/// Settles the worker's finished requests, then deposits this request and
/// reserves up to `wanted` retries for it (see the module documentation for
/// the cushion): one write for all of them. Pure: give it to
/// `shared::update`.
///
/// A worker does not write each settlement as it happens: a write is two
/// host calls and a copy, as much as the rest of the request. It keeps them
/// (they are a few words each) and hands them to its next reservation, or to
/// its tick when traffic stops. A refund that waits only ever makes the
/// balance LOWER than it would be (the tokens are still charged), so the
/// bound stays exact; the cost is that a worker's unused retries reach the
/// others a tick late at worst, and sooner under load, when it matters.
pub fn reserve_settling(
    bytes: Option<&[u8]>,
    policy: &RetryPolicy,
    now_ms: u64,
    wanted: u32,
    settlements: &[Settlement],
) -> (Vec<u8>, Reservation) {
    let budget = &policy.budget;
    let mut state = BudgetState::decode(bytes, budget, now_ms);
    for settlement in settlements {
        state.settle(settlement);
    }
    let reservation = state.reserve(budget, wanted);
    (state.encode(), reservation)
}

/// Settles finished requests with no reservation to make (a tick, or a
/// worker that keeps too many). Pure: give it to `shared::update`.
///
/// A settlement gives the retries the router did not use back to the slot
/// they were taken from, if that slot (of the same state) is still in the
/// window. The router is done when the response headers reach the filter
/// (it never retries after passing them on); `attempts_made` is
/// `upstream.request_attempt_count`, and when it is unknown nothing is
/// refunded. A reservation with nothing granted needs no settling.
pub fn settle_all(
    bytes: Option<&[u8]>,
    policy: &RetryPolicy,
    now_ms: u64,
    settlements: &[Settlement],
) -> Vec<u8> {
    let mut state = BudgetState::decode(bytes, &policy.budget, now_ms);
    for settlement in settlements {
        state.settle(settlement);
    }
    state.encode()
}

// ------------------------------------------------------------------ leases

/// A lease holds at most this many tokens: 128 requests in flight at two
/// retries each, the concurrency of a worker at 1,000 requests a second
/// and 128 ms to response headers, without a write.
pub const LEASE_MAX: u64 = 256;
/// A lease takes at most this share (one in `LEASE_SHARE`) of the tokens
/// above the cushion: each worker taking one leaves the others at least
/// (7/8)^workers of the balance, and a lease is only taken while an eighth
/// covers the request, so under scarcity nobody holds one.
pub const LEASE_SHARE: u64 = 8;
/// A lease hands out tokens for at most this long after it was taken.
pub const LEASE_MS: u64 = 1_000;

/// Tokens a worker took from the budget in one write and hands out to its
/// requests with no host call (see "Leases" in the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Names the lease within its VM (never 0): the reservations it grants
    /// carry it.
    pub serial: u64,
    /// The state and the slot it is charged to.
    pub epoch: u64,
    pub second: u64,
    /// Tokens taken.
    pub tokens: u32,
    /// Tokens not handed out (or handed back by settled requests).
    pub free: u32,
    /// It hands out tokens at `taken_ms <= now < expires_ms` only: a clock
    /// that steps back does not extend it.
    pub taken_ms: u64,
    pub expires_ms: u64,
}

impl Lease {
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.taken_ms <= now_ms && now_ms < self.expires_ms
    }

    /// Hands `wanted` retries (at least one) to a request, if the lease is
    /// valid now and has them free; the request's reservation.
    pub fn grant(&mut self, now_ms: u64, wanted: u32) -> Option<Reservation> {
        if wanted == 0 || !self.valid_at(now_ms) || self.free < wanted {
            return None;
        }
        self.free -= wanted;
        Some(Reservation {
            epoch: self.epoch,
            second: self.second,
            granted: wanted,
            denied: 0,
            dry: false,
            level: u64::from(self.free),
            lease: self.serial,
        })
    }

    /// Takes back the retries a finished request of this lease did not
    /// use. Returns the settlement still to write (retries the router made
    /// beyond the grant, to charge), if any.
    pub fn settle(&mut self, settlement: &Settlement) -> Option<Settlement> {
        match settlement.balance() {
            Ok(unused) => {
                self.free = self.free.saturating_add(unused).min(self.tokens);
                None
            }
            Err(_) => Some(*settlement),
        }
    }
}

/// What a worker held back from the budget, written with its next write.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pending<'a> {
    /// Finished requests not settled with a lease.
    pub settlements: &'a [Settlement],
    /// The lease it gives back.
    pub returned: Option<Lease>,
    /// Requests it served since its last write.
    pub deposits: u32,
}

/// Where a write's deposits landed, for observers (the fuzz oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Landed {
    pub epoch: u64,
    pub second: u64,
    pub deposits: u32,
}

/// What a request got from a write: a new lease (with the request's
/// retries taken from it), or a reservation of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub lease: Option<Lease>,
    pub reservation: Reservation,
    pub landed: Landed,
}

/// Writes what the worker held (`pending`, whose deposits include this
/// request) and takes a lease named `serial` that covers `wanted`, handing
/// the request its retries from it; when an eighth of the spare tokens
/// does not cover `wanted`, reserves for the request alone, exactly as
/// `reserve_settling`. Pure: give it to `shared::update`.
pub fn renew(
    bytes: Option<&[u8]>,
    policy: &RetryPolicy,
    now_ms: u64,
    wanted: u32,
    pending: &Pending<'_>,
    serial: u64,
) -> (Vec<u8>, Renewal) {
    let budget = &policy.budget;
    let mut state = BudgetState::decode(bytes, budget, now_ms);
    state.apply(pending);
    let landed = Landed {
        epoch: state.epoch,
        second: state.head,
        deposits: pending.deposits,
    };
    let mut lease = state.take_lease(budget, wanted, now_ms, serial);
    let reservation = match lease.as_mut().and_then(|lease| lease.grant(now_ms, wanted)) {
        Some(reservation) => reservation,
        None => state.grant(budget, wanted),
    };
    (
        state.encode(),
        Renewal {
            lease,
            reservation,
            landed,
        },
    )
}

/// Writes what the worker held, with no request to serve (a tick, a
/// worker that holds too much, a config going away). Pure: give it to
/// `shared::update`.
pub fn write_pending(
    bytes: Option<&[u8]>,
    policy: &RetryPolicy,
    now_ms: u64,
    pending: &Pending<'_>,
) -> (Vec<u8>, Landed) {
    let mut state = BudgetState::decode(bytes, &policy.budget, now_ms);
    state.apply(pending);
    let landed = Landed {
        epoch: state.epoch,
        second: state.head,
        deposits: pending.deposits,
    };
    (state.encode(), landed)
}

/// Whole tokens available now (the gauge).
pub fn level(bytes: Option<&[u8]>, policy: &RetryPolicy, now_ms: u64) -> u64 {
    BudgetState::decode(bytes, &policy.budget, now_ms).tokens(&policy.budget)
}

/// The initial bytes for `shared::ensure`.
pub fn fresh_state(policy: &RetryPolicy, now_ms: u64) -> Vec<u8> {
    BudgetState::fresh(&policy.budget, now_ms).encode()
}

/// The shared-data key of a service's budget. It names the service and
/// hashes the budget parameters (and the state version): a config push that
/// keeps the budget block keeps the budget, one that changes it starts fresh
/// instead of reading counts made under other rules.
pub fn budget_key(service: &str, policy: &RetryPolicy) -> String {
    let budget = &policy.budget;
    let hash = mix(u64::from(STATE_VERSION)
        ^ mix(u64::from(budget.ratio_ppm)
            ^ mix(u64::from(budget.min_per_s) ^ mix(u64::from(budget.window_s)))));
    format!("sluice/retry_budget/{service}/{hash:016x}")
}

/// Whether to log "budget ran dry" now, given when this VM last did for the
/// service: at most once per window, so an outage logs a line per window
/// rather than one per request.
pub fn dry_warning_due(last_warned_ms: Option<u64>, now_ms: u64, policy: &RetryPolicy) -> bool {
    match last_warned_ms {
        None => true,
        // A clock that went back must not silence the warning for as long.
        Some(last) => now_ms < last || now_ms - last >= u64::from(policy.budget.window_s) * 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal_without_allocating() {
        let mut digits = [0u8; 20];
        for (value, text) in [
            (0, "0"),
            (7, "7"),
            (10, "10"),
            (999, "999"),
            (1_000, "1000"),
            (3_600_000, "3600000"),
            (u64::MAX, "18446744073709551615"),
        ] {
            assert_eq!(decimal(value, &mut digits), text.as_bytes());
        }
    }

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn the_state_round_trips_and_stays_compact() {
        let policy = RetryPolicy::default();
        let (bytes, _) = reserve_settling(None, &policy, T0, 2, &[]);
        let state = BudgetState::decode(Some(&bytes), &policy.budget, T0);
        assert_eq!(state.encode(), bytes);
        assert_eq!(bytes.len(), HEADER_LEN + SLOT_LEN * 10);
        let sixty = Budget {
            window_s: 60,
            ..Budget::default()
        };
        assert_eq!(BudgetState::fresh(&sixty, T0).encode().len(), 738);
    }

    #[test]
    fn advancing_clears_only_the_seconds_that_left_the_window() {
        let policy = RetryPolicy::default();
        let mut bytes = Vec::new();
        for second in 0..10u64 {
            bytes = reserve_settling(Some(&bytes), &policy, T0 + second * 1000, 0, &[]).0;
        }
        let mut state = BudgetState::decode(Some(&bytes), &policy.budget, T0 + 9_000);
        assert_eq!(
            state.slots.iter().map(|slot| slot.requests).sum::<u32>(),
            10
        );
        state.advance(T0 / 1000 + 12);
        assert_eq!(state.slots.iter().map(|slot| slot.requests).sum::<u32>(), 7);
        state.advance(T0 / 1000 + 1_000_000);
        assert_eq!(state.slots.iter().map(|slot| slot.requests).sum::<u32>(), 0);
    }

    fn lease_from(bytes: Option<&[u8]>, policy: &RetryPolicy, now: u64) -> (Vec<u8>, Renewal) {
        let pending = Pending {
            deposits: 1,
            ..Pending::default()
        };
        renew(bytes, policy, now, 2, &pending, 7)
    }

    #[test]
    fn a_lease_is_an_eighth_of_the_spare_tokens_charged_as_one_reservation() {
        let policy = RetryPolicy::default();
        let (bytes, renewal) = lease_from(None, &policy, T0 + 300);
        let lease = renewal.lease.unwrap_or_else(|| panic!("no lease"));
        assert_eq!((lease.tokens, lease.free, lease.serial), (12, 10, 7));
        assert_eq!((lease.taken_ms, lease.expires_ms), (T0 + 300, T0 + 1300));
        assert_eq!(renewal.reservation.lease, 7);
        assert_eq!(renewal.reservation.granted, 2);
        let state = BudgetState::decode(Some(&bytes), &policy.budget, T0 + 300);
        assert_eq!(state.open(), 1);
        assert_eq!(state.tokens(&policy.budget), 88);
        // Capped at LEASE_MAX however rich the budget.
        let rich = RetryPolicy {
            budget: Budget {
                min_per_s: 100_000,
                ..Budget::default()
            },
            ..RetryPolicy::default()
        };
        let (_, renewal) = lease_from(None, &rich, T0);
        assert_eq!(renewal.lease.map(|lease| lease.tokens), Some(256));
    }

    #[test]
    fn a_lease_hands_out_only_what_it_has_and_only_while_valid() {
        let policy = RetryPolicy::default();
        let (_, renewal) = lease_from(None, &policy, T0);
        let mut lease = renewal.lease.unwrap_or_else(|| panic!("no lease"));
        let mut granted = 0;
        while let Some(reservation) = lease.grant(T0 + 10, 2) {
            granted += reservation.granted;
        }
        assert_eq!(granted, 10, "the 10 left after the first request");
        assert_eq!(lease.grant(T0 + 10, 0), None);
        let settled = Settlement {
            reservation: renewal.reservation,
            attempts_made: Some(1),
        };
        assert_eq!(lease.settle(&settled), None);
        assert_eq!(lease.free, 2);
        assert!(lease.grant(T0 - 1, 2).is_none(), "a clock stepped back");
        assert!(lease.grant(T0 + LEASE_MS, 2).is_none(), "expired");
        assert!(lease.grant(T0 + LEASE_MS - 1, 2).is_some());
        // With a window of one second the slot's end comes first.
        let short = RetryPolicy {
            budget: Budget {
                window_s: 1,
                min_per_s: 100,
                ..Budget::default()
            },
            ..RetryPolicy::default()
        };
        let (_, renewal) = lease_from(None, &short, T0 + 900);
        assert_eq!(renewal.lease.map(|lease| lease.expires_ms), Some(T0 + 1000));
    }

    #[test]
    fn under_scarcity_no_lease_is_taken_and_the_request_reserves_alone() {
        let policy = RetryPolicy {
            budget: Budget {
                min_per_s: 1,
                ratio_ppm: 0,
                window_s: 15,
            },
            ..RetryPolicy::default()
        };
        // 15 tokens: an eighth (1) does not cover 2 retries.
        let (bytes, renewal) = lease_from(None, &policy, T0);
        assert_eq!(renewal.lease, None);
        assert_eq!(
            (renewal.reservation.granted, renewal.reservation.lease),
            (2, 0)
        );
        let (alone, reservation) = reserve_settling(None, &policy, T0, 2, &[]);
        assert_eq!(bytes, alone, "exactly today's reservation");
        assert_eq!(renewal.reservation, reservation);
    }

    #[test]
    fn a_returned_lease_refunds_its_free_tokens_and_its_requests_refund_their_own() {
        let policy = RetryPolicy::default();
        let (bytes, renewal) = lease_from(None, &policy, T0);
        let lease = renewal.lease.unwrap_or_else(|| panic!("no lease"));
        // Given back with the request (2 tokens) still in flight.
        let pending = Pending {
            returned: Some(lease),
            ..Pending::default()
        };
        let (bytes, _) = write_pending(Some(&bytes), &policy, T0 + 5, &pending);
        let state = BudgetState::decode(Some(&bytes), &policy.budget, T0 + 5);
        assert_eq!((state.tokens(&policy.budget), state.open()), (98, 0));
        // The request ends with one retry used: one token back, and no
        // open count closed twice.
        let settled = Settlement {
            reservation: renewal.reservation,
            attempts_made: Some(2),
        };
        let bytes = settle_all(Some(&bytes), &policy, T0 + 5, &[settled]);
        let state = BudgetState::decode(Some(&bytes), &policy.budget, T0 + 5);
        assert_eq!((state.tokens(&policy.budget), state.open()), (99, 0));
        // Another state (a new epoch) takes nothing back from the old one.
        let other = fresh_state(&policy, T0 + 1);
        let (bytes, _) = write_pending(Some(&other), &policy, T0 + 5, &pending);
        assert_eq!(level(Some(&bytes), &policy, T0 + 5), 100);
    }

    #[test]
    fn retries_the_router_made_beyond_the_grant_are_charged() {
        let policy = RetryPolicy::default();
        // A reservation of its own, granted 2, the router made 4 retries.
        let (bytes, reservation) = reserve_settling(None, &policy, T0, 2, &[]);
        let settled = Settlement {
            reservation,
            attempts_made: Some(5),
        };
        assert_eq!(settled.balance(), Err(2));
        let after = settle_all(Some(&bytes), &policy, T0, &[settled]);
        let state = BudgetState::decode(Some(&after), &policy.budget, T0);
        assert_eq!((state.tokens(&policy.budget), state.open()), (96, 0));
        // One from a lease: the lease keeps nothing back, the extra is
        // charged by the write, and the lease's open count stays.
        let (bytes, renewal) = lease_from(None, &policy, T0);
        let mut lease = renewal.lease.unwrap_or_else(|| panic!("no lease"));
        let settled = Settlement {
            reservation: renewal.reservation,
            attempts_made: Some(4),
        };
        let held = lease.settle(&settled);
        assert_eq!(held, Some(settled));
        assert_eq!(lease.free, 10);
        let after = settle_all(Some(&bytes), &policy, T0, &[settled]);
        let state = BudgetState::decode(Some(&after), &policy.budget, T0);
        assert_eq!((state.tokens(&policy.budget), state.open()), (87, 1));
    }
}
