//! Which outcomes are failures: per service, one classification for the
//! breakers and the rollout gate.
//!
//! A plain HTTP request failed when its status is in `http_statuses`
//! (default: every 5xx). A gRPC request (request `content-type` starting
//! with `application/grpc`) answers with HTTP 200 and reports its outcome in
//! `grpc-status`, in the trailers or, for a trailers-only answer, in the one
//! header block; it failed when that code is in `grpc_codes` (default:
//! UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE;
//! caller errors such as NOT_FOUND or INVALID_ARGUMENT are the caller's,
//! not the service's). Either way an upstream failure flag (reset,
//! connection failure, timeout: `breaker::UPSTREAM_FAILURE_FLAGS`) is a
//! failure, and a request with no status at all is a failure only when
//! such a flag says why, or, for gRPC, when its client reset it at its
//! `grpc-timeout` deadline (then it is DEADLINE_EXCEEDED: in Envoy the
//! client's deadline usually fires before the router's timeout taken from
//! the same header). A gRPC call the client reset after the response
//! headers has no `grpc-status` either, and Envoy infers UNKNOWN from its
//! HTTP 200: that is the client's doing too, not the service's failure.

use crate::breaker::UPSTREAM_FAILURE_FLAGS;

/// The gRPC status codes by number (0–16), as `grpc-status` carries them.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `grpc-status` of a breaker's refusal: UNAVAILABLE, which gRPC clients
/// treat as retryable.
pub const GRPC_UNAVAILABLE: u32 = 14;

/// `grpc-status` of a call whose client gave up at its deadline.
pub const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// `grpc-status` UNKNOWN, also what Envoy's `response.grpc_status` infers
/// for an HTTP 200 that carried no `grpc-status` at all (a call cut off
/// after its response headers).
pub const GRPC_UNKNOWN: u64 = 2;

/// The client went away, in Envoy's `response.flags` bitmask: DC
/// (downstream connection termination, 0x4000) and DR (downstream remote
/// reset, 0x10000000: Envoy 1.40 reports 268435456 for a client's
/// RST_STREAM).
pub const CLIENT_RESET_FLAGS: u64 = 0x4000 | 0x1000_0000;

/// Default failing gRPC codes: UNKNOWN 2, DEADLINE_EXCEEDED 4,
/// RESOURCE_EXHAUSTED 8, INTERNAL 13, UNAVAILABLE 14.
pub const DEFAULT_GRPC_CODES: u32 = (1 << 2) | (1 << 4) | (1 << 8) | (1 << 13) | (1 << 14);

/// HTTP statuses are 100–599; one bit each, from 0.
const STATUS_WORDS: usize = 10;

/// The content type that makes a request gRPC (`application/grpc`,
/// `application/grpc+proto`, `application/grpc-web...` all start with it).
pub const GRPC_CONTENT_TYPE: &[u8] = b"application/grpc";

/// Whether a request `content-type` value makes the request gRPC.
pub fn is_grpc_content_type(value: Option<&[u8]>) -> bool {
    value.is_some_and(|value| {
        value
            .get(..GRPC_CONTENT_TYPE.len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(GRPC_CONTENT_TYPE))
    })
}

/// A service's classification of outcomes (`failures` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failures {
    /// One bit per HTTP status 0–639.
    http: [u64; STATUS_WORDS],
    /// One bit per gRPC code 0–16.
    grpc: u32,
}

impl Default for Failures {
    fn default() -> Self {
        let mut failures = Failures::none();
        failures.add_http_class(5);
        failures.grpc = DEFAULT_GRPC_CODES;
        failures
    }
}

impl Failures {
    /// No status and no code fails; only upstream failure flags do.
    pub fn none() -> Self {
        Failures {
            http: [0; STATUS_WORDS],
            grpc: 0,
        }
    }

    /// Adds one HTTP status (100–599; others are ignored).
    pub fn add_http_status(&mut self, status: u32) {
        if (100..600).contains(&status) {
            if let Some(word) = self.http.get_mut(status as usize / 64) {
                *word |= 1 << (status % 64);
            }
        }
    }

    /// Adds a class: 5 for every 5xx.
    pub fn add_http_class(&mut self, class: u32) {
        for status in class * 100..class * 100 + 100 {
            self.add_http_status(status);
        }
    }

    /// Adds one gRPC code (0–16; others are ignored).
    pub fn add_grpc_code(&mut self, code: u32) {
        if code < GRPC_CODE_NAMES.len() as u32 {
            self.grpc |= 1 << code;
        }
    }

    /// Clears the HTTP statuses (a `http_statuses` list replaces the
    /// default).
    pub fn clear_http(&mut self) {
        self.http = [0; STATUS_WORDS];
    }

    /// Clears the gRPC codes (a `grpc_codes` list replaces the default).
    pub fn clear_grpc(&mut self) {
        self.grpc = 0;
    }

    pub fn http_status_fails(&self, status: u64) -> bool {
        usize::try_from(status)
            .ok()
            .and_then(|status| self.http.get(status / 64).map(|word| (status, word)))
            .is_some_and(|(status, word)| (word >> (status % 64)) & 1 == 1)
    }

    pub fn grpc_code_fails(&self, code: u64) -> bool {
        code < GRPC_CODE_NAMES.len() as u64 && (self.grpc >> code) & 1 == 1
    }

    /// Whether the final attempt of a plain HTTP request failed: `status`
    /// (0: none) in the list, or an upstream failure flag.
    pub fn http_failed(&self, status: u64, response_flags: u64) -> bool {
        self.http_status_fails(status) || response_flags & UPSTREAM_FAILURE_FLAGS != 0
    }

    /// Whether the final attempt of a gRPC request failed: its
    /// `grpc-status` in the list, or an upstream failure flag.
    pub fn grpc_failed(&self, grpc_status: Option<u64>, response_flags: u64) -> bool {
        grpc_status.is_some_and(|code| self.grpc_code_fails(code))
            || response_flags & UPSTREAM_FAILURE_FLAGS != 0
    }

    /// The HTTP statuses as the config writes them (`5xx` for a whole
    /// class), for the summary and messages.
    pub fn http_text(&self) -> String {
        let mut parts = Vec::new();
        for class in 1..6u64 {
            let statuses = class * 100..class * 100 + 100;
            if statuses
                .clone()
                .all(|status| self.http_status_fails(status))
            {
                parts.push(format!("{class}xx"));
            } else {
                parts.extend(
                    statuses
                        .filter(|&status| self.http_status_fails(status))
                        .map(|status| status.to_string()),
                );
            }
        }
        parts.join(",")
    }

    /// The gRPC codes by name, for the summary.
    pub fn grpc_text(&self) -> String {
        GRPC_CODE_NAMES
            .iter()
            .enumerate()
            .filter(|(code, _)| self.grpc_code_fails(*code as u64))
            .map(|(_, name)| *name)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A gRPC code by name (`UNAVAILABLE`, any case) or number text.
pub fn grpc_code_by_name(name: &str) -> Option<u32> {
    GRPC_CODE_NAMES
        .iter()
        .position(|known| known.eq_ignore_ascii_case(name))
        .and_then(|code| u32::try_from(code).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_5xx_and_the_server_side_grpc_codes() {
        let failures = Failures::default();
        assert!(failures.http_failed(500, 0));
        assert!(failures.http_failed(599, 0));
        assert!(!failures.http_failed(429, 0));
        assert!(!failures.http_failed(200, 0));
        assert!(!failures.http_failed(0, 0));
        assert!(failures.http_failed(0, 0x10));
        for (code, fails) in [(0, false), (2, true), (3, false), (4, true), (5, false)] {
            assert_eq!(failures.grpc_failed(Some(code), 0), fails, "{code}");
        }
        for code in [8, 13, 14] {
            assert!(failures.grpc_failed(Some(code), 0));
        }
        assert!(!failures.grpc_failed(Some(17), 0));
        assert!(!failures.grpc_failed(Some(u64::MAX), 0));
        assert!(!failures.grpc_failed(None, 0));
        assert!(failures.grpc_failed(None, 0x20));
        assert!(!failures.http_failed(u64::MAX, 0));
        assert_eq!(failures.http_text(), "5xx");
        assert_eq!(
            failures.grpc_text(),
            "UNKNOWN,DEADLINE_EXCEEDED,RESOURCE_EXHAUSTED,INTERNAL,UNAVAILABLE"
        );
    }

    #[test]
    fn content_types() {
        assert!(is_grpc_content_type(Some(b"application/grpc")));
        assert!(is_grpc_content_type(Some(b"application/grpc+proto")));
        assert!(is_grpc_content_type(Some(b"Application/GRPC")));
        assert!(!is_grpc_content_type(Some(b"application/json")));
        assert!(!is_grpc_content_type(Some(b"application/grp")));
        assert!(!is_grpc_content_type(None));
    }
}
