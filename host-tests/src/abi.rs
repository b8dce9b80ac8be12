//! Proxy-Wasm ABI 0.2.1 constants and the pairs serialisation, as Envoy
//! (proxy-wasm-cpp-host) defines them.
//!
//! Sources: proxy-wasm/spec `abi-versions/v0.2.1/README.md` ("Types" and
//! "Serialization"), proxy-wasm-cpp-host `include/proxy-wasm/wasm_api_impl.h`
//! and `src/pairs_util.cc`.

use std::fmt;

/// `proxy_status_t`: what every `env.proxy_*` host function returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Status {
    /// `OK`.
    Ok = 0,
    /// `NOT_FOUND`: missing key, property, header, metric or queue.
    NotFound = 1,
    /// `BAD_ARGUMENT`: e.g. a map that is not available in this callback.
    BadArgument = 2,
    /// `SERIALIZATION_FAILURE`: a property that has no byte representation.
    SerializationFailure = 3,
    /// `PARSE_FAILURE`: e.g. a gRPC service that is neither a proto nor a cluster.
    ParseFailure = 4,
    /// `INVALID_MEMORY_ACCESS`: a guest pointer/length outside linear memory.
    InvalidMemoryAccess = 6,
    /// `EMPTY`: an empty shared queue.
    Empty = 7,
    /// `CAS_MISMATCH`: shared data was changed since it was read.
    CasMismatch = 8,
    /// `INTERNAL_FAILURE`.
    InternalFailure = 10,
    /// `UNIMPLEMENTED`.
    Unimplemented = 12,
}

impl Status {
    /// The raw value the guest sees.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// `proxy_log_level_t` (also Envoy's spdlog level numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum LogLevel {
    /// `TRACE` = 0.
    Trace = 0,
    /// `DEBUG` = 1.
    Debug = 1,
    /// `INFO` = 2 (Envoy's default `--log-level`).
    Info = 2,
    /// `WARN` = 3.
    Warn = 3,
    /// `ERROR` = 4.
    Error = 4,
    /// `CRITICAL` = 5 (the Rust SDK logs panics at this level).
    Critical = 5,
}

impl LogLevel {
    /// Decodes a guest value; `None` for values above `CRITICAL`, which
    /// `proxy_log` rejects with `BAD_ARGUMENT`.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Critical => "critical",
        })
    }
}

/// `proxy_map_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapType {
    /// `HTTP_REQUEST_HEADERS` = 0.
    RequestHeaders,
    /// `HTTP_REQUEST_TRAILERS` = 1.
    RequestTrailers,
    /// `HTTP_RESPONSE_HEADERS` = 2.
    ResponseHeaders,
    /// `HTTP_RESPONSE_TRAILERS` = 3.
    ResponseTrailers,
    /// `GRPC_CALL_INITIAL_METADATA` = 4.
    GrpcInitialMetadata,
    /// `GRPC_CALL_TRAILING_METADATA` = 5.
    GrpcTrailingMetadata,
    /// `HTTP_CALL_RESPONSE_HEADERS` = 6.
    HttpCallResponseHeaders,
    /// `HTTP_CALL_RESPONSE_TRAILERS` = 7.
    HttpCallResponseTrailers,
}

impl MapType {
    /// Decodes a guest value; values above 7 are `BAD_ARGUMENT` in Envoy.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            4 => Self::GrpcInitialMetadata,
            5 => Self::GrpcTrailingMetadata,
            6 => Self::HttpCallResponseHeaders,
            7 => Self::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferType {
    /// `HTTP_REQUEST_BODY` = 0.
    HttpRequestBody,
    /// `HTTP_RESPONSE_BODY` = 1.
    HttpResponseBody,
    /// `DOWNSTREAM_DATA` = 2.
    DownstreamData,
    /// `UPSTREAM_DATA` = 3.
    UpstreamData,
    /// `HTTP_CALL_RESPONSE_BODY` = 4.
    HttpCallResponseBody,
    /// `GRPC_CALL_MESSAGE` = 5.
    GrpcCallMessage,
    /// `VM_CONFIGURATION` = 6.
    VmConfiguration,
    /// `PLUGIN_CONFIGURATION` = 7.
    PluginConfiguration,
    /// `FOREIGN_FUNCTION_ARGUMENTS` = 8 (Envoy calls it `CallData`).
    CallData,
}

impl BufferType {
    /// Decodes a guest value; values above 8 are `BAD_ARGUMENT` in Envoy.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::HttpRequestBody,
            1 => Self::HttpResponseBody,
            2 => Self::DownstreamData,
            3 => Self::UpstreamData,
            4 => Self::HttpCallResponseBody,
            5 => Self::GrpcCallMessage,
            6 => Self::VmConfiguration,
            7 => Self::PluginConfiguration,
            8 => Self::CallData,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`. Envoy also encodes it in the low two bits of
/// every metric id it hands out (`kMetricTypeMask = 0x3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricType {
    /// `COUNTER` = 0: only ever increases.
    Counter,
    /// `GAUGE` = 1: set, or moved up and down.
    Gauge,
    /// `HISTOGRAM` = 2: records samples, cannot be read back by the plugin.
    Histogram,
}

impl MetricType {
    /// Decodes a guest value (or the low two bits of a metric id).
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    /// `HTTP_REQUEST` = 0.
    Request,
    /// `HTTP_RESPONSE` = 1.
    Response,
    /// `DOWNSTREAM` = 2.
    Downstream,
    /// `UPSTREAM` = 3.
    Upstream,
}

impl StreamType {
    /// Decodes a guest value; values above 3 are `BAD_ARGUMENT` in Envoy.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Request,
            1 => Self::Response,
            2 => Self::Downstream,
            3 => Self::Upstream,
            _ => return None,
        })
    }
}

/// What a header/body callback told Envoy to do.
///
/// The guest returns `proxy_action_t` (`CONTINUE` = 0, `PAUSE` = 1). Envoy
/// converts `PAUSE` from a headers callback into `StopAllIterationAndWatermark`
/// (proxy-wasm-cpp-host issue #143, `allow_on_headers_stop_iteration` defaults
/// to false), and after `proxy_send_local_response` it stops iteration whatever
/// the guest returned. Both show up here as [`Action::Pause`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Envoy carries on with the next filter.
    Continue,
    /// Envoy stops iterating until the plugin calls `proxy_continue_stream`
    /// (or sends a local reply).
    Pause,
}

/// Serialises header pairs the way proxy-wasm-cpp-host's
/// `PairsUtil::marshalPairs` does: a little-endian `u32` count, then
/// `(u32 key_len, u32 value_len)` for every pair, then every key and value
/// followed by a NUL byte.
pub fn serialize_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in pairs {
        size += 8 + k.as_ref().len() + 1 + v.as_ref().len() + 1;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&len32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len32(k.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&len32(v.as_ref().len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// The most bytes `PairsUtil::toPairs` accepts (`PROXY_WASM_HOST_PAIRS_MAX_BYTES`).
pub const PAIRS_MAX_BYTES: usize = 1024 * 1024;
/// The most pairs `PairsUtil::toPairs` accepts (`PROXY_WASM_HOST_PAIRS_MAX_COUNT`).
pub const PAIRS_MAX_COUNT: usize = 1024;

/// Parses serialised pairs like proxy-wasm-cpp-host's `PairsUtil::toPairs`:
/// any malformed input (wrong lengths, missing NUL terminators, trailing
/// bytes, more than 1024 pairs or 1 MiB) yields an *empty* list, not an
/// error, because that is what Envoy does (it then e.g. replaces the header
/// map with nothing).
pub fn deserialize_pairs(buf: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    parse_pairs(buf).unwrap_or_default()
}

fn parse_pairs(buf: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if buf.len() > PAIRS_MAX_BYTES {
        return None;
    }
    let count = read_u32(buf, 0)? as usize;
    if count > PAIRS_MAX_COUNT {
        return None;
    }
    let mut sizes = Vec::with_capacity(count);
    let mut pos = 4usize;
    for _ in 0..count {
        let k = read_u32(buf, pos)? as usize;
        let v = read_u32(buf, pos + 4)? as usize;
        sizes.push((k, v));
        pos += 8;
    }
    let mut pairs = Vec::with_capacity(count);
    for (k, v) in sizes {
        let key = buf.get(pos..pos.checked_add(k)?)?.to_vec();
        pos += k;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        let value = buf.get(pos..pos.checked_add(v)?)?.to_vec();
        pos += v;
        if buf.get(pos) != Some(&0) {
            return None;
        }
        pos += 1;
        pairs.push((key, value));
    }
    (pos == buf.len()).then_some(pairs)
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Lengths in the pairs format are `u32`; larger inputs cannot come from a
/// 32-bit guest, so saturating is only a guard.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_matches_the_spec_example() {
        // The spec's example: {"a": "1"}, {"b": "22"}.
        let bytes = serialize_pairs(&[("a", "1"), ("b", "22")]);
        assert_eq!(
            bytes,
            [
                2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b',
                0, b'2', b'2', 0
            ]
        );
        assert_eq!(
            deserialize_pairs(&bytes),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"22".to_vec())
            ]
        );
    }

    #[test]
    fn malformed_pairs_are_empty_like_envoy() {
        let mut bytes = serialize_pairs(&[("a", "1")]);
        bytes.push(0); // trailing garbage
        assert!(deserialize_pairs(&bytes).is_empty());
        let mut bytes = serialize_pairs(&[("a", "1")]);
        let last = bytes.len() - 1;
        bytes[last] = b'x'; // missing NUL terminator
        assert!(deserialize_pairs(&bytes).is_empty());
        assert!(deserialize_pairs(&[1, 0]).is_empty());
        assert!(deserialize_pairs(&[]).is_empty());
    }
}
