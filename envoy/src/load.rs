//! A phased load for config pushes under traffic: keep-alive clients that
//! send until stopped, each request tagged with the phase it was sent in
//! (the test moves the phase at each push), so a test can tell what every
//! phase answered and how many connections the clients had to open.

use crate::Client;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// One response as the load saw it: `(status, upstream)` or the error.
#[derive(Debug, Clone)]
pub struct Seen {
    pub phase: usize,
    pub sent_at: Instant,
    pub outcome: Result<(u16, String), String>,
}

/// Keep-alive clients sending to `shop.local` until stopped, each cycling
/// through 5,000 sticky users (`x-user-id`), about one request per 2 ms
/// per client (bounded: a few hundred to a few thousand per second).
pub struct PhasedLoad {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    threads: Vec<thread::JoinHandle<u64>>,
}

impl PhasedLoad {
    /// Starts `clients` clients against `addr`; every request also carries
    /// `headers`.
    pub fn start(addr: SocketAddr, clients: usize, headers: &[(&str, &str)]) -> PhasedLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let extra: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let threads = (0..clients)
            .map(|index| {
                let (stop, phase, seen) = (stop.clone(), phase.clone(), seen.clone());
                let extra = extra.clone();
                thread::spawn(move || {
                    let mut client = Client::new(addr).with_timeout(Duration::from_secs(5));
                    let mut local = Vec::new();
                    let mut user = index * 7_919;
                    while !stop.load(Ordering::Relaxed) {
                        user = (user + 104_729) % 5_000;
                        let id = format!("user-{user}");
                        let mut headers = vec![("x-user-id", id.as_str())];
                        headers.extend(extra.iter().map(|(n, v)| (n.as_str(), v.as_str())));
                        let current = phase.load(Ordering::SeqCst);
                        let sent_at = Instant::now();
                        let outcome = client
                            .get("shop.local", "/", &headers)
                            .map(|r| (r.status, r.upstream().unwrap_or("-").to_string()))
                            .map_err(|e| e.to_string());
                        local.push(Seen {
                            phase: current,
                            sent_at,
                            outcome,
                        });
                        thread::sleep(Duration::from_millis(2));
                    }
                    seen.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend(local);
                    client.connections_opened()
                })
            })
            .collect();
        PhasedLoad {
            stop,
            phase,
            seen,
            threads,
        }
    }

    /// Requests sent from now on belong to `phase`.
    pub fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stops the clients: every response, and the connections they opened.
    pub fn finish(self) -> (Vec<Seen>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let opened = self
            .threads
            .into_iter()
            .map(|thread| thread.join().unwrap_or(0))
            .sum();
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (seen, opened)
    }
}

/// The share of a phase's answered requests that reached `upstream`,
/// counting only those sent at least `settle` after the phase began, and
/// how many that was.
pub fn share_of(
    seen: &[Seen],
    phase: usize,
    began: Instant,
    settle: Duration,
    upstream: &str,
) -> (f64, usize) {
    let settled: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.phase == phase && s.sent_at >= began + settle)
        .collect();
    let hits = settled
        .iter()
        .filter(|s| matches!(&s.outcome, Ok((_, answered)) if answered == upstream))
        .count();
    (hits as f64 / settled.len().max(1) as f64, settled.len())
}
