//! Fuzz bytes to a lifecycle `Scenario`, with `arbitrary`'s `Unstructured`.
//!
//! Numbers are drawn whole (any value: `Knobs::json` clamps them into the
//! documented ranges); header names mostly from the templates' dictionary so
//! that rules, sticky keys, cookies and deadlines are hit; header values
//! mostly from a small dictionary (so that keys repeat and stickiness is
//! tested), otherwise arbitrary bytes.

use crate::lifecycle::{Event, Knobs, Scenario, AUTHORITIES, HEADER_NAMES, PATHS};
use arbitrary::{Result, Unstructured};

/// Longest scenario: keeps one run (and the oracle's interval check) fast.
pub const MAX_EVENTS: usize = 256;

const VALUES: &[&str] = &[
    "alice",
    "bob",
    "",
    "always",
    "never-ever",
    "yes",
    "uid=alice; beta=1",
    "beta=\"\"; uid=\"bob\"",
    "uid=",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14) Chrome/120",
    "Googlebot/2.1",
    "curl/8.5",
    "1S",
    "250m",
    "99999999H",
    "0n",
    "100",
    "18446744073709551616",
    " 5 ",
    "-1",
    "GET",
    "POST",
    "PUT",
    "get",
    "PATCH",
    "application/grpc",
    "application/grpc+proto",
    "text/plain",
];

fn pick<'a>(u: &mut Unstructured<'_>, list: &[&'a str]) -> Result<&'a str> {
    Ok(u.choose(list).copied().unwrap_or(""))
}

fn bytes(u: &mut Unstructured<'_>, list: &[&str]) -> Result<Vec<u8>> {
    if u.ratio(3u8, 4u8)? {
        Ok(pick(u, list)?.as_bytes().to_vec())
    } else {
        let len = u.int_in_range(0..=64usize)?.min(u.len());
        Ok(u.bytes(len)?.to_vec())
    }
}

fn knobs(u: &mut Unstructured<'_>) -> Result<Knobs> {
    let steps_len = u.int_in_range(0..=6usize)?;
    let mut steps = Vec::with_capacity(steps_len);
    for _ in 0..steps_len {
        steps.push(u.arbitrary()?);
    }
    Ok(Knobs {
        template: u.arbitrary()?,
        weight_bp: u.arbitrary()?,
        rule_weight_bp: u.arbitrary()?,
        max_retries: u.arbitrary()?,
        ratio_ppm: u.arbitrary()?,
        min_per_s: u.arbitrary()?,
        window_s: u.arbitrary()?,
        per_try_ms: u.arbitrary()?,
        timeout_ms: u.arbitrary()?,
        breaker_window_s: u.arbitrary()?,
        min_requests: u.arbitrary()?,
        failure_rate_ppm: u.arbitrary()?,
        consecutive: u.arbitrary()?,
        slow: u.arbitrary()?,
        open_ms: u.arbitrary()?,
        max_open_extra_ms: u.arbitrary()?,
        half_open: u.arbitrary()?,
        steps,
        step_s: u.arbitrary()?,
        max_failure_ppm: u.arbitrary()?,
        rollout_min_requests: u.arbitrary()?,
        start_offset_s: u.arbitrary()?,
        cluster_suffix: u.arbitrary()?,
    })
}

fn request(u: &mut Unstructured<'_>) -> Result<Event> {
    let mut headers = Vec::new();
    if u.ratio(7u8, 8u8)? {
        headers.push((":authority".to_string(), bytes(u, AUTHORITIES)?));
    }
    if u.ratio(7u8, 8u8)? {
        headers.push((":path".to_string(), bytes(u, PATHS)?));
    }
    let extra = u.int_in_range(0..=5usize)?;
    for _ in 0..extra {
        let name = if u.ratio(7u8, 8u8)? {
            pick(u, HEADER_NAMES)?.to_string()
        } else {
            let len = u.int_in_range(0..=8usize)?.min(u.len());
            String::from_utf8_lossy(u.bytes(len)?).to_ascii_lowercase()
        };
        headers.push((name, bytes(u, VALUES)?));
    }
    Ok(Event::Request {
        worker: u.arbitrary()?,
        headers,
        random: u.arbitrary()?,
    })
}

fn attempts(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(if u.ratio(15u8, 16u8)? {
        u.int_in_range(0..=12u64)?
    } else {
        u.arbitrary()?
    })
}

fn event(u: &mut Unstructured<'_>) -> Result<Event> {
    Ok(match u.int_in_range(0..=18u8)? {
        0..=4 => request(u)?,
        5 | 6 => Event::Response {
            pick: u.arbitrary()?,
            attempts: attempts(u)?,
            reported: u.ratio(7u8, 8u8)?,
            // Drawn last, so that older inputs keep their other fields.
            status: *u.choose(&[200u64, 200, 204, 404, 500, 502, 503, 504, 600, 1 << 40])?,
        },
        7..=9 => Event::End {
            pick: u.arbitrary()?,
            status: *u.choose(&[
                0u64,
                200,
                204,
                404,
                499,
                500,
                502,
                503,
                504,
                599,
                600,
                1 << 40,
            ])?,
            flags: *u.choose(&[0u64, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, u64::MAX])?,
            attempts: attempts(u)?,
            reported: u.ratio(7u8, 8u8)?,
        },
        10 => Event::Abandon {
            pick: u.arbitrary()?,
        },
        11 | 12 => Event::Clock {
            delta_ms: match u.int_in_range(0..=7u8)? {
                0..=3 => i64::from(u.int_in_range(0..=2_000u16)?),
                4 => i64::from(u.int_in_range(0..=600_000u32)?),
                5 => -i64::from(u.int_in_range(0..=5_000u16)?),
                6 => -i64::from(u.int_in_range(0..=600_000u32)?),
                _ => u.arbitrary::<i32>().map(i64::from)?,
            },
        },
        13 => Event::Reload {
            worker: u.arbitrary()?,
            variant: u.arbitrary()?,
        },
        14 => Event::Contend {
            failures: u.int_in_range(0..=40u8)?,
        },
        18 => Event::Rewind { to: u.arbitrary()? },
        15 => Event::Tick {
            worker: u.arbitrary()?,
        },
        _ => Event::Burst {
            count: u.arbitrary()?,
            authority: u.arbitrary()?,
            path: u.arbitrary()?,
            status: *u.choose(&[200u64, 200, 503, 500, 0])?,
            attempts: attempts(u)?,
            step_ms: u.arbitrary()?,
            overlap: u.arbitrary()?,
        },
    })
}

/// The whole scenario; events until the input runs out.
pub fn scenario(u: &mut Unstructured<'_>) -> Result<Scenario> {
    let workers = u.int_in_range(1..=4u8)?;
    let seed = u.arbitrary()?;
    let start_offset_ms = u.arbitrary()?;
    let variant_count = u.int_in_range(1..=3usize)?;
    let mut variants = Vec::with_capacity(variant_count);
    for _ in 0..variant_count {
        variants.push(knobs(u)?);
    }
    let mut events = Vec::new();
    while !u.is_empty() && events.len() < MAX_EVENTS {
        events.push(event(u)?);
    }
    Ok(Scenario {
        workers,
        seed,
        start_offset_ms,
        variants,
        events,
    })
}
