//! A real HTTP/1.1 upstream server for tests and the demo.
//!
//! [`Upstream::start`] binds `127.0.0.1:0` and serves every connection on its
//! own thread (keep-alive, Content-Length or chunked request bodies), so it
//! copes with however many connections Envoy's workers open. Every response
//! carries `x-upstream: <name>` and a small body naming the upstream.
//!
//! Its behaviour is switched at run time through atomics (callable from any
//! thread while traffic flows): fail everything, fail every n-th request,
//! fail an exact fraction, delay, or hang. It counts the attempts it received
//! and records their heads (method, path, headers) for assertions.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wire::{body_kind, WireReader};

/// How often blocked connection threads look at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);

/// Requests recorded at most (counters keep counting past it).
pub const DEFAULT_RECORD_LIMIT: usize = 200_000;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 1-based arrival number at this upstream.
    pub seq: u64,
    pub method: String,
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    /// The request body, as received (every attempt's: for an upstream that
    /// counts side effects, each body it accepted is one write).
    pub body: Vec<u8>,
    /// Status this upstream answered with (0 if it hung and never answered).
    pub status: u16,
    /// Which accepted connection (1-based) carried it.
    pub connection: u64,
    pub received_at: Instant,
}

impl RecordedRequest {
    /// First value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::wire::header(&self.headers, name)
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    shutdown: AtomicBool,
    // Behaviour.
    fail_all: AtomicBool,
    fail_every: AtomicU64,
    fail_ppm: AtomicU64,
    fail_status: AtomicU16,
    delay_ms: AtomicU64,
    slow_ppm: AtomicU64,
    slow_delay_ms: AtomicU64,
    slow_seq: AtomicU64,
    hang: AtomicBool,
    /// An extra header on injected failures (e.g. `grpc-status`).
    fail_header: Mutex<Option<(String, String)>>,
    /// An extra header on every response (e.g. a forged `x-envoy-*`).
    response_header: Mutex<Option<(String, String)>>,
    // Counters.
    requests: AtomicU64,
    failed: AtomicU64,
    fraction_seq: AtomicU64,
    connections: AtomicU64,
    open_connections: AtomicU64,
    record_limit: AtomicU64,
    records: Mutex<Vec<RecordedRequest>>,
}

/// A running upstream server; stops on drop.
#[derive(Debug)]
pub struct Upstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Start an upstream named `name` on `127.0.0.1:0`.
    pub fn start(name: &str) -> io::Result<Upstream> {
        Upstream::start_on(name, 0)
    }

    /// Start an upstream named `name` on `127.0.0.1:port` (0 = any free port).
    pub fn start_on(name: &str, port: u16) -> io::Result<Upstream> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            shutdown: AtomicBool::new(false),
            fail_all: AtomicBool::new(false),
            fail_every: AtomicU64::new(0),
            fail_ppm: AtomicU64::new(0),
            fail_status: AtomicU16::new(503),
            delay_ms: AtomicU64::new(0),
            slow_ppm: AtomicU64::new(0),
            slow_delay_ms: AtomicU64::new(0),
            slow_seq: AtomicU64::new(0),
            hang: AtomicBool::new(false),
            fail_header: Mutex::new(None),
            response_header: Mutex::new(None),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            fraction_seq: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open_connections: AtomicU64::new(0),
            record_limit: AtomicU64::new(DEFAULT_RECORD_LIMIT as u64),
            records: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("upstream-{name}"))
            .spawn(move || accept_loop(listener, s))?;
        Ok(Upstream {
            shared,
            addr,
            acceptor: Some(acceptor),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    // ---- behaviour -------------------------------------------------------

    /// Answer every request with the failure status (503 unless changed).
    pub fn set_fail_all(&self, on: bool) {
        self.shared.fail_all.store(on, Ordering::SeqCst);
    }

    /// Fail every `n`-th request this upstream receives (counted from its
    /// first request; 0 turns it off).
    pub fn set_fail_every(&self, n: u64) {
        self.shared.fail_every.store(n, Ordering::SeqCst);
    }

    /// Fail an exact, evenly spread fraction of requests (0.0..=1.0),
    /// deterministically: of the first k requests after this call,
    /// `floor(k * rate)` fail.
    pub fn set_fail_rate(&self, rate: f64) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
        self.shared.fraction_seq.store(0, Ordering::SeqCst);
        self.shared.fail_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Status used for injected failures (default 503).
    pub fn set_fail_status(&self, status: u16) {
        self.shared.fail_status.store(status, Ordering::SeqCst);
    }

    /// An extra header on injected failures (`None`: none): with
    /// `set_fail_status(200)` and `grpc-status: 14`, a failure looks like a
    /// gRPC trailers-only UNAVAILABLE to Envoy's router (which reads the
    /// status from the response headers, whatever the protocol).
    pub fn set_fail_header(&self, header: Option<(&str, &str)>) {
        if let Ok(mut slot) = self.shared.fail_header.lock() {
            *slot = header.map(|(name, value)| (name.to_string(), value.to_string()));
        }
    }

    /// An extra header on every response, failed or not (`None`: none),
    /// e.g. an `x-envoy-attempt-count` the upstream forges.
    pub fn set_response_header(&self, header: Option<(&str, &str)>) {
        if let Ok(mut slot) = self.shared.response_header.lock() {
            *slot = header.map(|(name, value)| (name.to_string(), value.to_string()));
        }
    }

    /// Delay every response by `d`.
    pub fn set_delay(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Delay an exact, evenly spread fraction of responses (0.0..=1.0) by
    /// `delay`, deterministically like [`Upstream::set_fail_rate`]; on top of
    /// [`Upstream::set_delay`]. A rate of 0 turns it off.
    pub fn set_slow_rate(&self, rate: f64, delay: Duration) {
        let ppm = (rate.clamp(0.0, 1.0) * 1_000_000.0).round() as u64;
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.slow_seq.store(0, Ordering::SeqCst);
        self.shared.slow_delay_ms.store(ms, Ordering::SeqCst);
        self.shared.slow_ppm.store(ppm, Ordering::SeqCst);
    }

    /// Hang: read requests but do not answer until hanging is turned off (a
    /// hung request is then answered) or the upstream stops.
    pub fn set_hang(&self, on: bool) {
        self.shared.hang.store(on, Ordering::SeqCst);
    }

    /// Back to answering 200 at once.
    pub fn reset_behaviour(&self) {
        self.set_fail_all(false);
        self.set_fail_every(0);
        self.set_fail_rate(0.0);
        self.set_fail_status(503);
        self.set_delay(Duration::ZERO);
        self.set_slow_rate(0.0, Duration::ZERO);
        self.set_hang(false);
        self.set_fail_header(None);
        self.set_response_header(None);
    }

    // ---- observation -----------------------------------------------------

    /// Requests received (attempts, whatever they were answered with).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests answered with an injected failure.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// TCP connections currently open.
    pub fn open_connections(&self) -> u64 {
        self.shared.open_connections.load(Ordering::SeqCst)
    }

    /// Copies of the recorded requests (at most the record limit).
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared
            .records
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many recorded requests carried each value of header `name`
    /// (requests without it are counted under `""`).
    pub fn counts_by_header(&self, name: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if let Ok(records) = self.shared.records.lock() {
            for r in records.iter() {
                *out.entry(r.header(name).unwrap_or("").to_string())
                    .or_insert(0) += 1;
            }
        }
        out
    }

    /// Change how many requests are recorded (0 = none).
    pub fn set_record_limit(&self, limit: usize) {
        self.shared
            .record_limit
            .store(limit as u64, Ordering::SeqCst);
    }

    /// Zero the counters and forget recorded requests.
    pub fn reset_counters(&self) {
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.failed.store(0, Ordering::SeqCst);
        self.shared.fraction_seq.store(0, Ordering::SeqCst);
        if let Ok(mut r) = self.shared.records.lock() {
            r.clear();
        }
    }

    /// Wait until `requests() >= n` or `timeout` passes; returns requests().
    pub fn wait_for_requests(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.requests() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.requests()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the acceptor blocked in accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = conn else {
            // Out of file descriptors and the like: back off, keep serving.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("upstream-{}-{id}", shared.name))
            .spawn(move || {
                s.open_connections.fetch_add(1, Ordering::SeqCst);
                let _ = serve(stream, &s, id);
                s.open_connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A stream whose reads wait out read time-outs until shutdown.
struct Patient<'a> {
    stream: &'a TcpStream,
    shutdown: &'a AtomicBool,
}

impl Read for Patient<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&*self.stream).read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "shutdown"));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Sleep for `d`, in slices, returning false early on shutdown.
fn sleep_unless_shutdown(d: Duration, shutdown: &AtomicBool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
    }
}

fn serve(stream: TcpStream, shared: &Shared, conn_id: u64) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_nodelay(true)?;
    let mut reader = WireReader::new(Patient {
        stream: &stream,
        shutdown: &shared.shutdown,
    });
    loop {
        let Some(head) = reader.read_head()? else {
            return Ok(());
        };
        let body = reader.read_body(body_kind(&head, false)?)?;
        let seq = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut parts = head.start.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let close = head.wants_close();

        // Decide the answer.
        let every = shared.fail_every.load(Ordering::SeqCst);
        let ppm = shared.fail_ppm.load(Ordering::SeqCst);
        let fraction_fail = ppm > 0 && {
            let k = shared.fraction_seq.fetch_add(1, Ordering::SeqCst);
            (k + 1) * ppm / 1_000_000 > k * ppm / 1_000_000
        };
        let fail = shared.fail_all.load(Ordering::SeqCst)
            || (every > 0 && seq.is_multiple_of(every))
            || fraction_fail;
        let status = if fail {
            shared.fail_status.load(Ordering::SeqCst)
        } else {
            200
        };

        let record_at = {
            let limit = shared.record_limit.load(Ordering::SeqCst) as usize;
            let mut records = shared
                .records
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?;
            if records.len() < limit {
                records.push(RecordedRequest {
                    seq,
                    method: method.clone(),
                    path,
                    headers: head.headers.clone(),
                    body_len: body.len(),
                    body: body.clone(),
                    status: 0,
                    connection: conn_id,
                    received_at: Instant::now(),
                });
                Some(records.len() - 1)
            } else {
                None
            }
        };

        while shared.hang.load(Ordering::SeqCst) {
            if !sleep_unless_shutdown(Duration::from_millis(20), &shared.shutdown) {
                return Ok(());
            }
        }
        let slow_ppm = shared.slow_ppm.load(Ordering::SeqCst);
        let slow = slow_ppm > 0 && {
            let k = shared.slow_seq.fetch_add(1, Ordering::SeqCst);
            (k + 1) * slow_ppm / 1_000_000 > k * slow_ppm / 1_000_000
        };
        let mut delay = shared.delay_ms.load(Ordering::SeqCst);
        if slow {
            delay = delay.saturating_add(shared.slow_delay_ms.load(Ordering::SeqCst));
        }
        if delay > 0 && !sleep_unless_shutdown(Duration::from_millis(delay), &shared.shutdown) {
            return Ok(());
        }

        if fail {
            shared.failed.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(i) = record_at {
            if let Ok(mut records) = shared.records.lock() {
                if let Some(r) = records.get_mut(i) {
                    if r.seq == seq {
                        r.status = status;
                    }
                }
            }
        }
        let name = &shared.name;
        let text = if fail {
            format!("{name}: injected failure\n")
        } else {
            format!("hello from {name}\n")
        };
        let reason = match status {
            200 => "OK",
            500 => "Internal Server Error",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            504 => "Gateway Timeout",
            _ => "Status",
        };
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\nx-upstream: {name}\r\n\
             x-upstream-seq: {seq}\r\ncontent-length: {}\r\n",
            if method == "HEAD" { 0 } else { text.len() }
        );
        if fail {
            if let Some((name, value)) = shared.fail_header.lock().ok().and_then(|h| h.clone()) {
                out.push_str(&format!("{name}: {value}\r\n"));
            }
        }
        if let Some((name, value)) = shared.response_header.lock().ok().and_then(|h| h.clone()) {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if close {
            out.push_str("connection: close\r\n");
        }
        out.push_str("\r\n");
        if method != "HEAD" {
            out.push_str(&text);
        }
        (&stream).write_all(out.as_bytes())?;
        if close {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}
