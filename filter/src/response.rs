//! What the response headers tell the engine, read from the one buffer
//! `Host::response_header_pairs` returns. Every value is the upstream's or
//! the proxy's, and hostile until checked: a value that is not exactly what
//! Envoy writes reads as absent, and the engine then asks the host's
//! properties, as it would without the headers.

use crate::pairs::HeaderPairs;
use crate::retry::MAX_MAX_RETRIES;

/// The router's count of the attempts it made, on the response when the
/// route sets `include_attempt_count_in_response` (Envoy then overwrites
/// whatever the upstream sent).
pub const ATTEMPT_COUNT_HEADER: &str = "x-envoy-attempt-count";

/// The most attempts the header is believed for: the first and Sluice's
/// most retries. A route that retries more on its own (no `retry` block)
/// has its count read from the property instead.
pub const MAX_BELIEVED_ATTEMPTS: u64 = 1 + MAX_MAX_RETRIES;

/// A plain decimal of 1 to `max_digits` ASCII digits: no sign, no space,
/// no list.
fn decimal(value: &[u8], max_digits: usize) -> Option<u64> {
    if value.is_empty() || value.len() > max_digits {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &digit| {
        digit
            .is_ascii_digit()
            .then(|| acc * 10 + u64::from(digit - b'0'))
    })
}

/// `:status` (three digits in Envoy; anything else reads as absent).
pub fn status(pairs: &HeaderPairs<'_>) -> Option<u64> {
    pairs
        .get(":status")
        .and_then(|value| decimal(value, 3))
        .filter(|status| *status > 0)
}

/// The `grpc-status` of the header block, when it is one of the 17 codes
/// and given once. Only a header block that ends the stream (a
/// trailers-only answer) holds the call's final code: Envoy prefers the
/// trailers' otherwise.
pub fn grpc_status(pairs: &HeaderPairs<'_>) -> Option<u64> {
    pairs
        .only("grpc-status")
        .and_then(|value| decimal(value, 2))
        .filter(|code| *code < crate::failures::GRPC_CODE_NAMES.len() as u64)
}

/// `x-envoy-attempt-count`, when it is given once and counts 1 to
/// `MAX_BELIEVED_ATTEMPTS`. Trust it only when the route sets
/// `include_attempt_count_in_response`: otherwise the upstream wrote it,
/// and an upstream that says 1 after three attempts would refund retries
/// the budget spent.
pub fn attempt_count(pairs: &HeaderPairs<'_>) -> Option<u64> {
    pairs
        .only(ATTEMPT_COUNT_HEADER)
        .and_then(|value| decimal(value, 2))
        .filter(|attempts| (1..=MAX_BELIEVED_ATTEMPTS).contains(attempts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairs::serialize;

    fn read<T>(headers: &[(&str, &str)], f: impl Fn(&HeaderPairs<'_>) -> T) -> T {
        let pairs: Vec<(&[u8], &[u8])> = headers
            .iter()
            .map(|(name, value)| (name.as_bytes(), value.as_bytes()))
            .collect();
        let buffer = serialize(&pairs);
        f(&HeaderPairs::new(&buffer))
    }

    #[test]
    fn attempt_counts_outside_what_the_router_writes_are_not_believed() {
        let count = |value: &str| read(&[(ATTEMPT_COUNT_HEADER, value)], attempt_count);
        assert_eq!(count("1"), Some(1));
        assert_eq!(count("3"), Some(3));
        assert_eq!(count("11"), Some(MAX_BELIEVED_ATTEMPTS));
        for hostile in [
            "0",
            "12",
            "99",
            "4294967297",
            "",
            "-1",
            "+2",
            " 2",
            "2 ",
            "1,2",
            "x",
            "٣",
        ] {
            assert_eq!(count(hostile), None, "{hostile:?}");
        }
        let repeated = read(
            &[(ATTEMPT_COUNT_HEADER, "1"), (ATTEMPT_COUNT_HEADER, "1")],
            attempt_count,
        );
        assert_eq!(repeated, None);
        assert_eq!(read(&[(":status", "200")], attempt_count), None);
    }

    #[test]
    fn statuses_and_grpc_codes() {
        assert_eq!(read(&[(":status", "200")], status), Some(200));
        assert_eq!(read(&[(":status", "503")], status), Some(503));
        for hostile in ["", "0", "2000", "20x", "-20"] {
            assert_eq!(read(&[(":status", hostile)], status), None, "{hostile:?}");
        }
        let code = |value: &str| read(&[("grpc-status", value)], grpc_status);
        assert_eq!(code("0"), Some(0));
        assert_eq!(code("14"), Some(14));
        assert_eq!(code("16"), Some(16));
        for hostile in ["17", "99", "", "1a", "014", "0,14"] {
            assert_eq!(code(hostile), None, "{hostile:?}");
        }
        let repeated = read(&[("grpc-status", "0"), ("grpc-status", "14")], grpc_status);
        assert_eq!(repeated, None);
    }
}
