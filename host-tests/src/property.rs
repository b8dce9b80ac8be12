//! Property (CEL attribute) values and their wire encoding.
//!
//! Envoy's `serializeValue` (source/extensions/common/wasm/context.cc) sends
//! strings and bytes as-is, `int`/`uint`/`double` as 8 raw little-endian
//! bytes, `bool` as 1 byte, durations and timestamps as `int64` nanoseconds,
//! and maps/lists in the pairs format.

use crate::abi::serialize_pairs;
use std::time::Duration;

/// A typed attribute value, encoded the way Envoy hands it to the plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum PropertyValue {
    /// CEL `string`: raw UTF-8 bytes.
    String(String),
    /// CEL `bytes`: raw bytes.
    Bytes(Vec<u8>),
    /// CEL `int`: 8 bytes, little-endian two's complement
    /// (e.g. `response.code`, `response.flags`, `source.port`).
    Int(i64),
    /// CEL `uint`: 8 bytes, little-endian
    /// (e.g. `upstream.request_attempt_count`, `connection.id`).
    Uint(u64),
    /// CEL `double`: 8 bytes, little-endian IEEE 754.
    Double(f64),
    /// CEL `bool`: one byte, 0 or 1.
    Bool(bool),
    /// CEL `duration`: `int64` nanoseconds (e.g. `request.duration`).
    Duration(Duration),
    /// CEL `timestamp`: `int64` nanoseconds since the Unix epoch (e.g. `request.time`).
    TimestampNanos(i64),
    /// CEL `map<string, string>`: the pairs format.
    Map(Vec<(String, String)>),
    /// CEL `list`: the pairs format with empty values (Envoy's quirk).
    List(Vec<String>),
}

impl PropertyValue {
    /// The bytes `proxy_get_property` writes into guest memory.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::String(s) => s.as_bytes().to_vec(),
            Self::Bytes(b) => b.clone(),
            Self::Int(i) => i.to_le_bytes().to_vec(),
            Self::Uint(u) => u.to_le_bytes().to_vec(),
            Self::Double(d) => d.to_le_bytes().to_vec(),
            Self::Bool(b) => vec![u8::from(*b)],
            Self::Duration(d) => i64::try_from(d.as_nanos())
                .unwrap_or(i64::MAX)
                .to_le_bytes()
                .to_vec(),
            Self::TimestampNanos(t) => t.to_le_bytes().to_vec(),
            Self::Map(pairs) => serialize_pairs(pairs),
            Self::List(items) => {
                let pairs: Vec<(&str, &str)> = items.iter().map(|i| (i.as_str(), "")).collect();
                serialize_pairs(&pairs)
            }
        }
    }
}

impl From<&str> for PropertyValue {
    fn from(s: &str) -> Self {
        Self::String(s.to_owned())
    }
}

impl From<String> for PropertyValue {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}

impl From<i64> for PropertyValue {
    fn from(i: i64) -> Self {
        Self::Int(i)
    }
}

impl From<u64> for PropertyValue {
    fn from(u: u64) -> Self {
        Self::Uint(u)
    }
}

impl From<bool> for PropertyValue {
    fn from(b: bool) -> Self {
        Self::Bool(b)
    }
}

impl From<Duration> for PropertyValue {
    fn from(d: Duration) -> Self {
        Self::Duration(d)
    }
}

/// Joins path segments the way the SDKs serialise a property path
/// (`"a\0b"`); used as the key of the per-stream attribute table.
pub(crate) fn path_key<S: AsRef<str>>(segments: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(s.as_ref().as_bytes());
    }
    out
}

/// Splits a guest path at NUL bytes like `Context::getProperty` does: a
/// trailing NUL does not create an empty last segment.
pub(crate) fn split_path(path: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    if parts.len() > 1 && parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_eight_little_endian_bytes() {
        assert_eq!(PropertyValue::Int(503).encode(), 503i64.to_le_bytes());
        assert_eq!(PropertyValue::Uint(2).encode(), [2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PropertyValue::Bool(true).encode(), [1]);
        assert_eq!(
            PropertyValue::Duration(Duration::from_millis(3)).encode(),
            3_000_000i64.to_le_bytes()
        );
    }

    #[test]
    fn paths_split_on_nul() {
        assert_eq!(
            split_path(b"request\0path"),
            vec![&b"request"[..], &b"path"[..]]
        );
        assert_eq!(split_path(b"a\0"), vec![&b"a"[..]]);
        assert_eq!(path_key(&["a", "b"]), b"a\0b");
    }
}
