//! Self-tests of the harness: the upstream's switchable behaviours and the
//! client, over real sockets, without Envoy (fast, no wasm needed).

// A failing harness is a failing test (see routing.rs).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sluice_envoy::{Client, Upstream};

#[test]
fn upstream_answers_with_its_name_over_keep_alive() {
    let up = Upstream::start("stable").unwrap();
    let mut c = Client::new(up.addr());
    for i in 0..20 {
        let id = format!("u{}", i % 3);
        let r = c.get("shop.local", "/x", &[("x-user-id", &id)]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.upstream(), Some("stable"));
        assert_eq!(r.body_text(), "hello from stable\n");
    }
    assert_eq!(
        c.connections_opened(),
        1,
        "keep-alive should reuse one connection"
    );
    assert_eq!(up.requests(), 20);
    assert_eq!(up.connections(), 1);
    let counts = up.counts_by_header("x-user-id");
    assert_eq!(counts.get("u0"), Some(&7));
    assert_eq!(counts.get("u1"), Some(&7));
    assert_eq!(counts.get("u2"), Some(&6));
    let rec = up.recorded();
    assert_eq!(rec[0].method, "GET");
    assert_eq!(rec[0].path, "/x");
    assert_eq!(rec[0].header("HOST"), Some("shop.local"));
    assert!(rec.iter().all(|r| r.status == 200));
}

#[test]
fn failure_modes_switch_at_run_time() {
    let up = Upstream::start("canary").unwrap();
    let mut c = Client::new(up.addr());
    let mut statuses = |n: usize| -> Vec<u16> {
        (0..n)
            .map(|_| c.get("h", "/", &[]).unwrap().status)
            .collect()
    };

    up.set_fail_all(true);
    assert!(statuses(5).iter().all(|s| *s == 503));
    up.set_fail_all(false);
    assert!(statuses(5).iter().all(|s| *s == 200));

    up.reset_counters();
    up.set_fail_every(4);
    let s = statuses(12);
    assert_eq!(
        s.iter().filter(|x| **x == 503).count(),
        3,
        "every 4th of 12: {s:?}"
    );
    assert_eq!(s[3], 503);
    up.set_fail_every(0);

    up.set_fail_rate(0.1);
    let s = statuses(100);
    assert_eq!(s.iter().filter(|x| **x == 503).count(), 10, "exactly 10%");
    up.set_fail_rate(0.0);

    up.set_fail_status(500);
    up.set_fail_all(true);
    let r = c.get("h", "/", &[]).unwrap();
    assert_eq!((r.status, r.upstream()), (500, Some("canary")));
    up.reset_behaviour();
    assert_eq!(c.get("h", "/", &[]).unwrap().status, 200);
    // Counted since reset_counters(): every-4th, the 10%, the one 500.
    assert_eq!(up.failed(), 3 + 10 + 1);
}

#[test]
fn delay_and_hang() {
    let up = Upstream::start("slow").unwrap();
    let mut c = Client::new(up.addr()).with_timeout(Duration::from_millis(400));

    up.set_delay(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(c.get("h", "/", &[]).unwrap().status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));
    up.set_delay(Duration::ZERO);

    up.set_hang(true);
    let t = Instant::now();
    let err = c.get("h", "/", &[]).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    // The hung request was received (an attempt) but not answered.
    assert_eq!(up.wait_for_requests(2, Duration::from_secs(1)), 2);
    up.set_hang(false);
    // A new connection works again at once.
    assert_eq!(c.get("h", "/", &[]).unwrap().status, 200);
}

#[test]
fn request_bodies_and_connection_close() {
    let up = Upstream::start("body").unwrap();
    // Content-Length body through the client.
    let mut c = Client::new(up.addr());
    let r = c
        .request(
            "POST",
            "h",
            "/p",
            &[("content-type", "text/plain")],
            b"12345",
        )
        .unwrap();
    assert_eq!(r.status, 200);
    // A chunked body and `connection: close`, by hand.
    let mut s = TcpStream::connect(up.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
          3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap(); // returns: the server closed
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("connection: close"));
    let rec = up.recorded();
    assert_eq!(rec.iter().map(|r| r.body_len).collect::<Vec<_>>(), [5, 7]);
}

#[test]
fn client_reconnects_after_the_server_closes_an_idle_connection() {
    // A server that answers one request per connection, then closes it
    // without saying so (no `connection: close`), like an idle timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for n in 1..=2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..k]);
            }
            let body = format!("conn {n}");
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
    });
    let mut c = Client::new(addr);
    assert_eq!(c.get("h", "/", &[]).unwrap().body_text(), "conn 1");
    std::thread::sleep(Duration::from_millis(50));
    // The reused connection is dead: the client retries once on a new one.
    assert_eq!(c.get("h", "/", &[]).unwrap().body_text(), "conn 2");
    assert_eq!(c.connections_opened(), 2);
    server.join().unwrap();
}

#[test]
fn many_concurrent_connections() {
    let up = Upstream::start("many").unwrap();
    std::thread::scope(|s| {
        for t in 0..32 {
            let addr = up.addr();
            s.spawn(move || {
                let mut c = Client::new(addr);
                for i in 0..20 {
                    let id = format!("{t}-{i}");
                    let r = c.get("h", "/", &[("x-id", &id)]).unwrap();
                    assert_eq!(r.status, 200);
                }
            });
        }
    });
    assert_eq!(up.requests(), 640);
    assert_eq!(up.connections(), 32);
}
