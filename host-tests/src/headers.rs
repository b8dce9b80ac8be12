//! An ordered multimap with the semantics of Envoy's `Http::HeaderMapImpl`,
//! as far as a proxy-wasm plugin can observe them.

use std::fmt;

/// Which Envoy header map this is. It decides which headers are "inline"
/// (O(1) slots in Envoy): adding an inline header that is already present
/// appends `,value` to the existing entry instead of adding a second entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderMapKind {
    /// `RequestHeaderMapImpl`.
    RequestHeaders,
    /// `RequestTrailerMapImpl` (no inline headers).
    RequestTrailers,
    /// `ResponseHeaderMapImpl`.
    ResponseHeaders,
    /// `ResponseTrailerMapImpl`.
    ResponseTrailers,
    /// A map without inline headers (e.g. an `http_call` response we build).
    Generic,
}

/// Envoy's inline request headers (`INLINE_REQ_STRING_HEADERS`,
/// `INLINE_REQ_NUMERIC_HEADERS` and `INLINE_REQ_RESP_*` in
/// `envoy/http/header_map.h`). Extensions can register more "custom inline"
/// headers at runtime; those are not modelled.
const INLINE_REQUEST: &[&str] = &[
    ":authority",
    ":method",
    ":path",
    ":protocol",
    ":scheme",
    "expect",
    "grpc-timeout",
    "te",
    "user-agent",
    "x-client-trace-id",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-path",
    "x-envoy-original-url",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-stream-duration-ms",
    "x-forwarded-client-cert",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// `INLINE_REQ_RESP_*`: inline in both request and response header maps.
const INLINE_REQUEST_RESPONSE: &[&str] = &[
    "connection",
    "content-length",
    "content-type",
    "keep-alive",
    "proxy-connection",
    "proxy-status",
    "transfer-encoding",
    "upgrade",
    "via",
    "x-envoy-attempt-count",
    "x-envoy-decorator-operation",
    "x-request-id",
];

/// `INLINE_RESP_*` (headers) and `INLINE_RESP_*_HEADERS_TRAILERS`.
const INLINE_RESPONSE: &[&str] = &[
    ":status",
    "date",
    "grpc-message",
    "grpc-status",
    "location",
    "server",
    "x-envoy-degraded",
    "x-envoy-immediate-health-check-fail",
    "x-envoy-ratelimited",
    "x-envoy-upstream-canary",
    "x-envoy-upstream-healthchecked-cluster",
    "x-envoy-upstream-service-time",
];

/// `INLINE_RESP_*_HEADERS_TRAILERS`: the inline response trailers.
const INLINE_RESPONSE_TRAILERS: &[&str] = &["grpc-message", "grpc-status"];

impl HeaderMapKind {
    fn is_inline(self, key: &[u8]) -> bool {
        let Ok(key) = std::str::from_utf8(key) else {
            return false;
        };
        match self {
            Self::RequestHeaders => {
                INLINE_REQUEST.contains(&key) || INLINE_REQUEST_RESPONSE.contains(&key)
            }
            Self::ResponseHeaders => {
                INLINE_RESPONSE.contains(&key) || INLINE_REQUEST_RESPONSE.contains(&key)
            }
            Self::ResponseTrailers => INLINE_RESPONSE_TRAILERS.contains(&key),
            Self::RequestTrailers | Self::Generic => false,
        }
    }
}

/// An HTTP header (or trailer) map.
///
/// Semantics copied from Envoy because plugins can observe them:
/// * keys are lower-cased on every operation (`Http::LowerCaseString`);
/// * entries keep insertion order, except that pseudo-headers (`:path`, …)
///   are kept in front of regular headers (`HeaderList::insert`);
/// * [`add`](Self::add) appends a new entry, except for Envoy's *inline*
///   headers (e.g. `:path`, `content-type`, `x-request-id`), where the value
///   is appended to the existing entry after a `,`;
/// * [`get`](Self::get) returns the first entry only (Envoy's
///   `getHeaderMapValue` does `entry[0]`);
/// * [`replace`](Self::replace) removes every entry for the key and adds one
///   (`setCopy`), so the header moves to the end;
/// * [`remove`](Self::remove) removes every entry for the key.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderMap {
    kind: HeaderMapKind,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl HeaderMap {
    /// An empty map of the given kind.
    pub fn new(kind: HeaderMapKind) -> Self {
        Self {
            kind,
            entries: Vec::new(),
        }
    }

    /// A map built like Envoy's codec builds it: every pair is `add`ed.
    pub fn from_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        kind: HeaderMapKind,
        pairs: &[(K, V)],
    ) -> Self {
        let mut map = Self::new(kind);
        for (k, v) in pairs {
            map.add(k.as_ref(), v.as_ref());
        }
        map
    }

    /// Which Envoy map this models.
    pub fn kind(&self) -> HeaderMapKind {
        self.kind
    }

    /// `addCopy`: appends an entry (or extends an inline header, see the type docs).
    pub fn add(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let key = key.as_ref().to_ascii_lowercase();
        let value = value.as_ref();
        if self.kind.is_inline(&key) {
            if let Some((_, existing)) = self.entries.iter_mut().find(|(k, _)| *k == key) {
                existing.push(b',');
                existing.extend_from_slice(value);
                return;
            }
        }
        let entry = (key, value.to_vec());
        if entry.0.first() == Some(&b':') {
            let at = self
                .entries
                .iter()
                .position(|(k, _)| k.first() != Some(&b':'))
                .unwrap_or(self.entries.len());
            self.entries.insert(at, entry);
        } else {
            self.entries.push(entry);
        }
    }

    /// `setCopy`: removes every entry for `key`, then adds one.
    pub fn replace(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.remove(key.as_ref());
        self.add(key, value);
    }

    /// `remove`: removes every entry for `key`; returns how many there were.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> usize {
        let key = key.as_ref().to_ascii_lowercase();
        let before = self.entries.len();
        self.entries.retain(|(k, _)| *k != key);
        before - self.entries.len()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The first value for `key` as raw bytes.
    pub fn get_bytes(&self, key: impl AsRef<[u8]>) -> Option<&[u8]> {
        let key = key.as_ref().to_ascii_lowercase();
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// The first value for `key` (lossy UTF-8), like `proxy_get_header_map_value`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<String> {
        self.get_bytes(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Every value for `key`, in order.
    pub fn get_all(&self, key: impl AsRef<[u8]>) -> Vec<String> {
        let key = key.as_ref().to_ascii_lowercase();
        self.entries
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// Whether any entry has this key.
    pub fn contains(&self, key: impl AsRef<[u8]>) -> bool {
        self.get_bytes(key).is_some()
    }

    /// Number of entries (Envoy's `size()`, what `proxy_on_*_headers` receive).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of key and value lengths: Envoy's `byteSize()`, which is what
    /// `proxy_get_header_map_size` returns.
    pub fn byte_size(&self) -> usize {
        self.entries.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// All entries in order, as (lossy UTF-8) strings.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    /// All entries in order, as raw bytes.
    pub fn raw_pairs(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.entries
    }
}

impl fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries
                    .iter()
                    .map(|(k, v)| (String::from_utf8_lossy(k), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_lowercased_and_get_returns_the_first_value() {
        let mut m = HeaderMap::new(HeaderMapKind::RequestHeaders);
        m.add("X-Foo", "1");
        m.add("x-foo", "2");
        assert_eq!(m.get("X-FOO").as_deref(), Some("1"));
        assert_eq!(m.get_all("x-foo"), vec!["1", "2"]);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn replace_removes_all_and_moves_to_the_end() {
        let mut m = HeaderMap::new(HeaderMapKind::RequestHeaders);
        m.add("x-foo", "1");
        m.add("x-bar", "b");
        m.add("x-foo", "2");
        m.replace("X-Foo", "3");
        assert_eq!(
            m.pairs(),
            vec![("x-bar".into(), "b".into()), ("x-foo".into(), "3".into())]
        );
        assert_eq!(m.remove("x-foo"), 1);
        assert!(!m.contains("x-foo"));
    }

    #[test]
    fn inline_headers_are_coalesced_and_pseudo_headers_stay_first() {
        let mut m = HeaderMap::new(HeaderMapKind::RequestHeaders);
        m.add("x-a", "1");
        m.add(":path", "/");
        m.add("x-request-id", "a");
        m.add("x-request-id", "b");
        assert_eq!(m.get_all("x-request-id"), vec!["a,b"]);
        assert_eq!(m.pairs().first().map(|p| p.0.as_str()), Some(":path"));
        // Not inline in a response map.
        let mut r = HeaderMap::new(HeaderMapKind::ResponseHeaders);
        r.add("user-agent", "a");
        r.add("user-agent", "b");
        assert_eq!(r.len(), 2);
        assert_eq!(r.byte_size(), 2 * ("user-agent".len() + 1));
    }
}
