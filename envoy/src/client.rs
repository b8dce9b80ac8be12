//! A minimal HTTP/1.1 keep-alive client over `TcpStream`.
//!
//! One [`Client`] is one connection, reused for every request and reopened
//! when the server closed it (a request on a reused connection that fails
//! before any response byte arrived is sent again once on a new one, the
//! usual keep-alive race). Reads and writes are bounded by a timeout.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::wire::{body_kind, invalid, BodyKind, WireReader};

/// Default connect/read/write timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::wire::header(&self.headers, name)
    }

    /// The `x-upstream` header the harness's upstreams set: which upstream
    /// served the request.
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream")
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive connection to `addr`.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<WireReader<TcpStream>>,
    /// Connections opened so far (1 after the first request).
    opened: u64,
}

impl Client {
    /// A client for `addr`; connects lazily on the first request.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            timeout: DEFAULT_TIMEOUT,
            conn: None,
            opened: 0,
        }
    }

    /// A client that connects now (so the connection exists before the first
    /// request, e.g. to spread connections over Envoy's workers).
    pub fn connect(addr: SocketAddr) -> io::Result<Client> {
        let mut c = Client::new(addr);
        c.ensure_connected()?;
        Ok(c)
    }

    /// Set the connect/read/write timeout (applies to the next connection and
    /// the current one).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.set_timeout(timeout);
        self
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        if let Some(c) = &self.conn {
            let _ = c.get_ref().set_read_timeout(Some(timeout));
            let _ = c.get_ref().set_write_timeout(Some(timeout));
        }
    }

    /// How many TCP connections this client has opened.
    pub fn connections_opened(&self) -> u64 {
        self.opened
    }

    /// Local address of the current connection, if connected.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.conn
            .as_ref()
            .and_then(|c| c.get_ref().local_addr().ok())
    }

    /// Drop the current connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    fn ensure_connected(&mut self) -> io::Result<&mut WireReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
            self.opened += 1;
            self.conn = Some(WireReader::new(s));
        }
        self.conn
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))
    }

    /// `GET path` with `Host: host` and extra headers.
    pub fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        self.request("GET", host, path, headers, &[])
    }

    /// Send a request and read its response. `Host` and (when there is a
    /// body) `Content-Length` are added; `headers` are sent as given.
    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut wire = head.into_bytes();
        wire.extend_from_slice(body);
        self.send_wire(&wire, method == "HEAD")
    }

    /// Send `wire` exactly as given (a whole request: any bytes, e.g.
    /// obs-text or invalid UTF-8 in header values, no `Host`, HTTP/1.0) and
    /// read one response. Nothing is added; the caller frames the request.
    /// A connection the server closes (e.g. after a 400) is reopened for the
    /// next request.
    pub fn send_raw(&mut self, wire: &[u8]) -> io::Result<Response> {
        let head_only = wire.starts_with(b"HEAD ");
        self.send_wire(wire, head_only)
    }

    fn send_wire(&mut self, wire: &[u8], head_only: bool) -> io::Result<Response> {
        let reused = self.conn.is_some();
        match self.exchange(wire, head_only) {
            Ok(r) => Ok(r),
            Err((e, got_bytes)) => {
                self.conn = None;
                // A reused keep-alive connection the server had closed: retry
                // once on a fresh connection.
                if reused && !got_bytes && is_stale_connection(&e) {
                    self.exchange(wire, head_only).map_err(|(e, _)| {
                        self.conn = None;
                        e
                    })
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Write the request, read the response. On error, also says whether any
    /// response byte had arrived.
    fn exchange(&mut self, wire: &[u8], head_only: bool) -> Result<Response, (io::Error, bool)> {
        let conn = self.ensure_connected().map_err(|e| (e, false))?;
        (conn.get_ref()).write_all(wire).map_err(|e| (e, false))?;
        let head = match conn.read_head() {
            Ok(Some(h)) => h,
            Ok(None) => {
                return Err((
                    io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "connection closed before a response",
                    ),
                    false,
                ))
            }
            Err(e) => return Err((e, false)),
        };
        let status = parse_status(&head.start).map_err(|e| (e, true))?;
        let kind = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            BodyKind::None
        } else {
            body_kind(&head, true).map_err(|e| (e, true))?
        };
        let body = conn.read_body(kind).map_err(|e| (e, true))?;
        if head.wants_close() || kind == BodyKind::UntilClose {
            self.conn = None;
        }
        Ok(Response {
            status,
            headers: head.headers,
            body,
        })
    }
}

fn is_stale_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

fn parse_status(start: &str) -> io::Result<u16> {
    let mut parts = start.split_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("bad status line {start:?}")));
    }
    parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {start:?}")))
}
