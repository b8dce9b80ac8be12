//! [`Stream`]: one HTTP request/response going through the filter.

use crate::abi::{Action, StreamType};
use crate::headers::{HeaderMap, HeaderMapKind};
use crate::property::{path_key, PropertyValue};
use crate::vm::{HttpCtx, Vm};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// A local reply the plugin sent with `proxy_send_local_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status code.
    pub status: u32,
    /// Response code details, with whitespace replaced by `_` as Envoy does
    /// (`StringUtil::replaceAllEmptySpace`).
    pub details: String,
    /// Body.
    pub body: Vec<u8>,
    /// The additional headers the plugin passed, lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The gRPC status the plugin passed, if it is a real one (0..=16);
    /// the SDKs pass -1 for "none", which Envoy maps to no `grpc-status`.
    pub grpc_status: Option<u32>,
    pub(crate) is_failure: bool,
}

impl LocalReply {
    pub(crate) fn new(
        status: u32,
        details: &[u8],
        body: &[u8],
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        grpc_status: i32,
    ) -> Self {
        let details: String = String::from_utf8_lossy(details)
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        Self {
            status,
            details,
            body: body.to_vec(),
            headers: headers
                .into_iter()
                .map(|(k, v)| {
                    (
                        String::from_utf8_lossy(&k).to_ascii_lowercase(),
                        String::from_utf8_lossy(&v).into_owned(),
                    )
                })
                .collect(),
            grpc_status: u32::try_from(grpc_status).ok().filter(|s| *s <= 16),
            is_failure: false,
        }
    }

    /// What a failed (fail-closed) VM sends: 503, `wasm_fail_stream`, UNAVAILABLE.
    pub(crate) fn failure() -> Self {
        let mut r = Self::new(503, b"wasm_fail_stream", b"", Vec::new(), 14);
        r.is_failure = true;
        r
    }

    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Response headers and body as `Utility::prepareLocalReply` builds them.
    pub(crate) fn encoded_headers(&self, is_grpc: bool, is_head: bool) -> (HeaderMap, Vec<u8>) {
        let mut h = HeaderMap::new(HeaderMapKind::ResponseHeaders);
        h.add(":status", self.status.to_string());
        for (k, v) in &self.headers {
            h.add(k, v);
        }
        if is_grpc {
            h.replace(":status", "200");
            h.replace("content-type", "application/grpc");
            if !h.contains("grpc-status") {
                let code = self
                    .grpc_status
                    .unwrap_or_else(|| http_to_grpc_status(self.status));
                h.replace("grpc-status", code.to_string());
            }
            if !self.body.is_empty() && !is_head {
                h.replace("grpc-message", percent_encode(&self.body));
            }
            h.remove("content-length");
            return (h, Vec::new());
        }
        if self.body.is_empty() {
            h.remove("content-length");
            h.remove("content-type");
        } else {
            h.replace("content-length", self.body.len().to_string());
            if !h.contains("content-type") {
                h.replace("content-type", "text/plain");
            }
        }
        let body = if is_head {
            Vec::new()
        } else {
            self.body.clone()
        };
        (h, body)
    }
}

/// `Grpc::Utility::httpToGrpcStatus`.
fn http_to_grpc_status(http: u32) -> u32 {
    match http {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `PercentEncoding::encode` for `grpc-message`.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for &b in bytes {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP stream (request + response) through the filter on one [`Vm`].
///
/// Drive it like Envoy's filter manager would: [`request_headers`](Self::request_headers),
/// optionally body/trailers, then [`response_headers`](Self::response_headers)
/// (unless the plugin sent a local reply), then [`finish`](Self::finish). Each
/// call returns what the filter told Envoy; accessors show the end state.
/// A stream is a handle: several can be open on the same VM at once.
pub struct Stream {
    vm: Vm,
    id: u32,
    /// The context after [`finish`](Self::finish): the VM frees it from its
    /// table as Envoy does, and the handle keeps it for the end state.
    retired: Mutex<Option<Box<HttpCtx>>>,
}

fn map_of(kind: HeaderMapKind, headers: &[(&str, &str)]) -> HeaderMap {
    HeaderMap::from_pairs(kind, headers)
}

impl Stream {
    pub(crate) fn new(vm: Vm, id: u32) -> Self {
        Self {
            vm,
            id,
            retired: Mutex::new(None),
        }
    }

    fn retired(&self) -> MutexGuard<'_, Option<Box<HttpCtx>>> {
        self.retired.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the stream's context, live in the VM or retired in the handle.
    fn read<R>(&self, f: impl FnOnce(&HttpCtx) -> R) -> R {
        if let Some(h) = self.retired().as_deref() {
            return f(h);
        }
        self.vm.lock().with_http(self.id, f)
    }

    fn write<R>(&self, f: impl FnOnce(&mut HttpCtx) -> R) -> R {
        if let Some(h) = self.retired().as_deref_mut() {
            return f(h);
        }
        self.vm.lock().with_http_mut(self.id, f)
    }

    /// The context id the plugin sees for this stream.
    pub fn context_id(&self) -> u32 {
        self.id
    }

    /// The VM this stream runs on.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Request headers arrive (`decodeHeaders`): `proxy_on_context_create`
    /// if needed, then `proxy_on_request_headers`. If the plugin sends a local
    /// reply, its response also runs through this filter's
    /// `proxy_on_response_headers` (and `_body`) before this returns, as in Envoy.
    pub fn request_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        self.request_headers_map(
            map_of(HeaderMapKind::RequestHeaders, headers),
            end_of_stream,
        )
    }

    /// [`request_headers`](Self::request_headers) with a prebuilt map (e.g. non-UTF-8 values).
    pub fn request_headers_map(&self, headers: HeaderMap, end_of_stream: bool) -> Action {
        self.vm
            .lock()
            .request_headers(self.id, headers, end_of_stream)
    }

    /// A request body chunk (`decodeData`). After the plugin returned `Pause`
    /// from a body callback Envoy buffers, so the next call sees the whole
    /// body so far.
    pub fn request_body(&self, data: &[u8], end_of_stream: bool) -> Action {
        self.vm.lock().request_body(self.id, data, end_of_stream)
    }

    /// Request trailers (`decodeTrailers`).
    pub fn request_trailers(&self, trailers: &[(&str, &str)]) -> Action {
        self.vm
            .lock()
            .request_trailers(self.id, map_of(HeaderMapKind::RequestTrailers, trailers))
    }

    /// Upstream response headers (`encodeHeaders`). Sets `response.code` from
    /// `:status`, as Envoy's router does before the encoder filters run.
    ///
    /// Panics if the plugin already sent a local reply or left the request
    /// paused: Envoy would never have got an upstream response.
    pub fn response_headers(&self, headers: &[(&str, &str)], end_of_stream: bool) -> Action {
        self.vm.lock().response_headers(
            self.id,
            map_of(HeaderMapKind::ResponseHeaders, headers),
            end_of_stream,
        )
    }

    /// A response body chunk (`encodeData`).
    pub fn response_body(&self, data: &[u8], end_of_stream: bool) -> Action {
        self.vm.lock().response_body(self.id, data, end_of_stream)
    }

    /// Response trailers (`encodeTrailers`).
    pub fn response_trailers(&self, trailers: &[(&str, &str)]) -> Action {
        self.vm
            .lock()
            .response_trailers(self.id, map_of(HeaderMapKind::ResponseTrailers, trailers))
    }

    /// The stream ends: `proxy_on_log` (headers readable, not writable), then
    /// `proxy_on_done` and `proxy_on_delete`. `request.duration` defaults to
    /// the virtual time since [`Vm::stream`]. Idempotent.
    pub fn finish(&self) {
        if self.retired().is_some() {
            return;
        }
        let mut vm = self.vm.lock();
        vm.finish(self.id);
        let context = vm.retire(self.id);
        drop(vm);
        *self.retired() = context;
    }

    // ---- stream info the test controls -------------------------------------

    /// Sets an attribute `proxy_get_property` returns for this stream, e.g.
    /// `set_property(&["upstream", "address"], "10.0.0.7:8080".into())`.
    /// Overrides the computed ones.
    pub fn set_property(&self, path: &[&str], value: PropertyValue) {
        let key = path_key(path);
        let name = path.join(".");
        self.write(|h| {
            let fixed_at_response = matches!(
                name.as_str(),
                "upstream.request_attempt_count" | "response.code" | "response.grpc_status"
            );
            if h.logged {
                panic!(
                    "set_property({name}) after finish(): the filter has read the stream's \
                     facts in proxy_on_log; Envoy changes nothing after the access log"
                );
            }
            if fixed_at_response && h.response_facts_fixed {
                panic!(
                    "set_property({name}) after the response headers reached the filter: \
                     Envoy's router makes no more attempts once it passed them on and the \
                     response code is fixed, and the filter may have read them already. \
                     Set it before response_headers() (or let the fake derive it)"
                );
            }
            h.attributes.insert(key, value)
        });
    }

    /// `response.code` (CEL int: 8 bytes LE).
    pub fn set_response_code(&self, code: u32) {
        self.set_property(&["response", "code"], PropertyValue::Int(i64::from(code)));
    }

    /// `response.code_details` (string).
    pub fn set_response_code_details(&self, details: &str) {
        self.set_property(&["response", "code_details"], details.into());
    }

    /// `response.flags` (CEL int: Envoy's legacy response-flags bit vector).
    pub fn set_response_flags(&self, flags: u64) {
        self.set_property(
            &["response", "flags"],
            PropertyValue::Int(i64::try_from(flags).unwrap_or(i64::MAX)),
        );
    }

    /// The upstream failed with Envoy response `flags` (see
    /// `Vm`'s router behaviour: before any response, Envoy's router sends its
    /// own 503/504, which passes through the filter and is what
    /// [`local_reply`](Self::local_reply) then shows; after, the flags are
    /// only added, as for a reset mid-body).
    pub fn upstream_failed(&self, flags: u64) {
        self.vm.lock().upstream_failure(self.id, flags);
    }

    /// `upstream.request_attempt_count` (CEL uint).
    pub fn set_attempt_count(&self, attempts: u64) {
        self.set_property(
            &["upstream", "request_attempt_count"],
            PropertyValue::Uint(attempts),
        );
    }

    /// The stream's route sets Envoy's `include_attempt_count_in_response`:
    /// the router writes `x-envoy-attempt-count` (the attempt count, see
    /// [`set_attempt_count`](Self::set_attempt_count)) over whatever the
    /// upstream sent, on upstream responses and on its own replies. Without
    /// it an upstream's `x-envoy-attempt-count` reaches the filter as sent.
    pub fn include_attempt_count_in_response(&self) {
        self.write(|h| {
            assert!(
                !h.response_facts_fixed,
                "include_attempt_count_in_response() after the response headers"
            );
            h.include_attempt_count_in_response = true;
        });
    }

    /// `request.duration` (CEL duration: i64 nanoseconds).
    pub fn set_request_duration(&self, duration: Duration) {
        self.set_property(&["request", "duration"], PropertyValue::Duration(duration));
    }

    /// `upstream.address` (string, `ip:port`).
    pub fn set_upstream_address(&self, address: &str) {
        self.set_property(&["upstream", "address"], address.into());
    }

    /// `xds.cluster_name` (string).
    pub fn set_cluster_name(&self, cluster: &str) {
        self.set_property(&["xds", "cluster_name"], cluster.into());
    }

    /// `xds.route_name` (string).
    pub fn set_route_name(&self, route: &str) {
        self.set_property(&["xds", "route_name"], route.into());
    }

    // ---- end state -----------------------------------------------------------

    /// What `proxy_get_property` would return to the plugin on this stream
    /// right now (encoded as Envoy encodes it), or `None` for `NotFound`
    /// and other errors. While the stream is live only; a finished stream's
    /// context is gone from the VM (`None`).
    pub fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        if self.retired().is_some() {
            return None;
        }
        let key = path_key(path);
        self.vm.lock().property_of(self.id, &key)
    }

    /// The request headers as they are now (after the plugin's changes).
    pub fn request_header_map(&self) -> HeaderMap {
        self.read(|h| {
            h.request_headers
                .clone()
                .unwrap_or_else(|| HeaderMap::new(HeaderMapKind::RequestHeaders))
        })
    }

    /// One request header as it is now.
    pub fn request_header(&self, name: &str) -> Option<String> {
        self.request_header_map().get(name)
    }

    /// The response headers as they are now (for a local reply: the reply's
    /// headers after this filter's `proxy_on_response_headers`).
    pub fn response_header_map(&self) -> HeaderMap {
        self.read(|h| {
            h.response_headers
                .clone()
                .unwrap_or_else(|| HeaderMap::new(HeaderMapKind::ResponseHeaders))
        })
    }

    /// One response header as it is now.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_header_map().get(name)
    }

    /// Request trailers as they are now, if any.
    pub fn request_trailer_map(&self) -> Option<HeaderMap> {
        self.read(|h| h.request_trailers.clone())
    }

    /// Response trailers as they are now, if any.
    pub fn response_trailer_map(&self) -> Option<HeaderMap> {
        self.read(|h| h.response_trailers.clone())
    }

    /// Request body bytes the filter let through so far.
    pub fn request_body_forwarded(&self) -> Vec<u8> {
        self.read(|h| h.request_body_sent.clone())
    }

    /// Response body bytes the filter let through so far (for a local reply:
    /// its body).
    pub fn response_body_forwarded(&self) -> Vec<u8> {
        self.read(|h| h.response_body_sent.clone())
    }

    /// The local reply the plugin sent (or the fail-closed 503), if any.
    pub fn local_reply(&self) -> Option<LocalReply> {
        self.read(|h| h.local_reply.clone())
    }

    /// Whether the request is paused: the plugin returned `Pause` and has not
    /// called `proxy_continue_stream(HTTP_REQUEST)` (nor sent a local reply).
    pub fn request_paused(&self) -> bool {
        self.read(|h| h.request_paused)
    }

    /// Whether the response is paused likewise.
    pub fn response_paused(&self) -> bool {
        self.read(|h| h.response_paused)
    }

    /// Streams the plugin resumed with `proxy_continue_stream`, in order.
    pub fn continued(&self) -> Vec<StreamType> {
        self.read(|h| h.continued.clone())
    }

    /// Streams the plugin reset with `proxy_close_stream`, in order.
    pub fn closed(&self) -> Vec<StreamType> {
        self.read(|h| h.closed.clone())
    }

    /// Filter state the plugin set with `proxy_set_property` (raw path → bytes).
    pub fn filter_state(&self, path: &str) -> Option<Vec<u8>> {
        self.read(|h| h.filter_state.get(path.as_bytes()).cloned())
    }

    /// How often the route cache was cleared: by request-header changes (newer
    /// Envoy's `onHeadersModified`) or the `clear_route_cache` foreign function.
    pub fn route_cache_clears(&self) -> u32 {
        self.read(|h| h.route_cache_clears)
    }

    /// How often the plugin called the foreign function `clear_route_cache`
    /// on this stream, whether the host offered it or answered NOT_FOUND
    /// ([`ProxyBuilder::without_clear_route_cache`](crate::ProxyBuilder::without_clear_route_cache)).
    pub fn clear_route_cache_calls(&self) -> u32 {
        self.read(|h| h.clear_route_cache_calls)
    }

    /// Whether [`finish`](Self::finish) ran.
    pub fn finished(&self) -> bool {
        self.read(|h| h.destroyed)
    }
}
