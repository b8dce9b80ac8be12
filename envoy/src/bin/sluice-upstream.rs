//! A stand-alone upstream for the demo and manual tests: the harness's
//! [`sluice_envoy::Upstream`] on `127.0.0.1:<port>`, answering 200 with
//! `x-upstream: <name>` until killed.
//!
//! ```text
//! sluice-upstream --name stable --port 9001 [--fail-rate 0.1] [--fail-every N] [--delay-ms N]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use sluice_envoy::Upstream;

const USAGE: &str = "usage: sluice-upstream --name NAME --port PORT \
                     [--fail-rate FRACTION] [--fail-every N] [--delay-ms MS]\n\
                     Serves HTTP/1.1 on 127.0.0.1:PORT; every response carries \
                     `x-upstream: NAME`.\n  \
                     --fail-rate F   answer this fraction (0..1, evenly spread) with 503\n  \
                     --fail-every N  answer every N-th request with 503\n  \
                     --delay-ms MS   delay every response";

struct Args {
    name: String,
    port: u16,
    fail_rate: f64,
    fail_every: u64,
    delay_ms: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        name: String::new(),
        port: 0,
        fail_rate: 0.0,
        fail_every: 0,
        delay_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--name" => a.name = value,
            "--port" => a.port = value.parse().map_err(|e| bad(&e))?,
            "--fail-rate" => {
                a.fail_rate = value.parse().map_err(|e| bad(&e))?;
                if !(0.0..=1.0).contains(&a.fail_rate) {
                    return Err(format!("--fail-rate {value}: must be between 0 and 1"));
                }
            }
            "--fail-every" => a.fail_every = value.parse().map_err(|e| bad(&e))?,
            "--delay-ms" => a.delay_ms = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.name.is_empty() {
        return Err("--name is required".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sluice-upstream: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let up = match Upstream::start_on(&args.name, args.port) {
        Ok(u) => u,
        Err(e) => {
            eprintln!(
                "sluice-upstream: cannot listen on 127.0.0.1:{}: {e}",
                args.port
            );
            return ExitCode::from(1);
        }
    };
    up.set_record_limit(0);
    up.set_fail_rate(args.fail_rate);
    up.set_fail_every(args.fail_every);
    up.set_delay(Duration::from_millis(args.delay_ms));
    println!(
        "sluice-upstream {} listening on {} (fail-rate {}, fail-every {}, delay {} ms)",
        up.name(),
        up.addr(),
        args.fail_rate,
        args.fail_every,
        args.delay_ms
    );
    // Serve until killed.
    loop {
        std::thread::park();
    }
}
