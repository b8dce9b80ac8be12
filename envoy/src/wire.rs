//! HTTP/1.1 framing shared by the client and the upstream server: a buffered
//! reader that parses a message head and reads Content-Length, chunked or
//! close-delimited bodies.

use std::io::{self, Read};

/// Largest message head accepted (start line plus headers).
const MAX_HEAD: usize = 64 * 1024;
/// Largest body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// A parsed start line and header block. Header names are lower-cased.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Whether the connection must close after this message: `connection:
    /// close`, or HTTP/1.0 without `connection: keep-alive`.
    pub fn wants_close(&self) -> bool {
        let conn = self
            .header("connection")
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default();
        let tokens: Vec<&str> = conn.split(',').map(str::trim).collect();
        if tokens.contains(&"close") {
            return true;
        }
        self.start.contains("HTTP/1.0") && !tokens.contains(&"keep-alive")
    }
}

/// First value of header `name` (case-insensitive) in `headers`.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

pub(crate) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Body framing from headers. `until_close_ok` is true for responses (a
/// response without length runs to EOF) and false for requests (no body).
pub(crate) fn body_kind(head: &Head, until_close_ok: bool) -> io::Result<BodyKind> {
    if let Some(te) = head.header("transfer-encoding") {
        if te
            .to_ascii_lowercase()
            .split(',')
            .any(|t| t.trim() == "chunked")
        {
            return Ok(BodyKind::Chunked);
        }
    }
    if let Some(cl) = head.header("content-length") {
        let n: usize = cl
            .trim()
            .parse()
            .map_err(|_| invalid(format!("bad content-length {cl:?}")))?;
        if n > MAX_BODY {
            return Err(invalid(format!("body too large: {n}")));
        }
        return Ok(BodyKind::Length(n));
    }
    Ok(if until_close_ok {
        BodyKind::UntilClose
    } else {
        BodyKind::None
    })
}

/// A buffered reader over a byte stream.
pub(crate) struct WireReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: std::fmt::Debug> std::fmt::Debug for WireReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireReader")
            .field("inner", &self.inner)
            .field("buffered", &(self.buf.len() - self.pos))
            .finish()
    }
}

impl<R: Read> WireReader<R> {
    pub fn new(inner: R) -> Self {
        WireReader {
            inner,
            buf: Vec::with_capacity(8192),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Bytes buffered but not consumed.
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Read more bytes into the buffer; Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut tmp = [0u8; 8192];
        let n = self.inner.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Read a message head. Ok(None) if the stream ended cleanly before the
    /// first byte of a message (an idle keep-alive connection closing).
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            // Skip stray CRLFs between messages (RFC 9112 2.2).
            while self.pending().starts_with(b"\r\n") {
                self.pos += 2;
            }
            if let Some(end) = find(self.pending(), b"\r\n\r\n") {
                let raw = self.pending()[..end].to_vec();
                self.pos += end + 4;
                return parse_head(&raw).map(Some);
            }
            if self.pending().len() > MAX_HEAD {
                return Err(invalid("message head too large"));
            }
            let had = self.pending().len();
            if self.fill()? == 0 {
                return if had == 0 {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed inside a message head",
                    ))
                };
            }
        }
    }

    /// Read a body of the given kind.
    pub fn read_body(&mut self, kind: BodyKind) -> io::Result<Vec<u8>> {
        match kind {
            BodyKind::None => Ok(Vec::new()),
            BodyKind::Length(n) => self.take(n),
            BodyKind::UntilClose => {
                while self.fill()? > 0 {
                    if self.pending().len() > MAX_BODY {
                        return Err(invalid("body too large"));
                    }
                }
                let out = self.pending().to_vec();
                self.pos = self.buf.len();
                Ok(out)
            }
            BodyKind::Chunked => {
                let mut out = Vec::new();
                loop {
                    let line = self.line()?;
                    let size_hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(size_hex, 16)
                        .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                    if size == 0 {
                        // Trailers, up to an empty line.
                        while !self.line()?.is_empty() {}
                        return Ok(out);
                    }
                    if out.len() + size > MAX_BODY {
                        return Err(invalid("body too large"));
                    }
                    out.extend(self.take(size)?);
                    if !self.line()?.is_empty() {
                        return Err(invalid("missing CRLF after chunk"));
                    }
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.pending().len() < n {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a body",
                ));
            }
        }
        let out = self.pending()[..n].to_vec();
        self.pos += n;
        Ok(out)
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(self.pending(), b"\r\n") {
                let s = String::from_utf8_lossy(&self.pending()[..end]).into_owned();
                self.pos += end + 2;
                return Ok(s);
            }
            if self.pending().len() > MAX_HEAD {
                return Err(invalid("line too long"));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(raw: &[u8]) -> io::Result<Head> {
    // Header values may carry obs-text (bytes 0x80-0xFF), which Envoy
    // forwards; such bytes are decoded lossily (U+FFFD) rather than refused,
    // so an upstream still answers a request that carried them.
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or("").to_string();
    if start.is_empty() {
        return Err(invalid("empty start line"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Head { start, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_messages_and_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc\
HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;x=y\r\nllo\r\n0\r\nT: 1\r\n\r\n\
HTTP/1.0 200 OK\r\n\r\nrest";
        let mut r = WireReader::new(&raw[..]);
        let h = r.read_head().unwrap().unwrap();
        assert_eq!(h.header("x-a"), Some("b"));
        assert_eq!(r.read_body(body_kind(&h, true).unwrap()).unwrap(), b"abc");
        let h = r.read_head().unwrap().unwrap();
        assert_eq!(body_kind(&h, true).unwrap(), BodyKind::Chunked);
        assert_eq!(r.read_body(BodyKind::Chunked).unwrap(), b"hello");
        let h = r.read_head().unwrap().unwrap();
        assert!(h.wants_close());
        assert_eq!(r.read_body(body_kind(&h, true).unwrap()).unwrap(), b"rest");
        assert!(r.read_head().unwrap().is_none());
    }

    #[test]
    fn truncated_head_is_an_error() {
        let mut r = WireReader::new(&b"GET / HTTP/1.1\r\nHost: x"[..]);
        assert!(r.read_head().is_err());
    }
}
