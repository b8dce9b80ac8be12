//! The `retry`, `breaker` and `rollout` blocks of a service: their checks,
//! and their runtime forms (`RetryPolicy`, `BreakerConfig`, `RolloutConfig`).

use super::format_weight;
use super::raw::{self, Code, List, Number, Obj, Text, Whole};
use super::validate::{
    error, fixed_in, header_name, is_token_byte, join, quote, required, weight, whole_in, Result,
};
use crate::breaker::{BreakerConfig, SlowCalls, DEFAULT_MAX_OPEN_MS, MAX_DURATION_MS};
use crate::decimal::PPM;
use crate::failures::{grpc_code_by_name, Failures};
use crate::retry::{
    Budget, Idempotent, RetryMode, RetryPolicy, DEFAULT_MAX_RETRIES, DEFAULT_MIN_PER_S,
    DEFAULT_RATIO_PPM, DEFAULT_RETRY_ON, DEFAULT_WINDOW_S, GRPC_POLICIES, GRPC_TIMEOUT_HEADER,
    HTTP_POLICIES, MAX_IDEMPOTENT_METHODS, MAX_IDEMPOTENT_PATH_PREFIXES, MAX_MAX_RETRIES,
    MAX_METHOD_LEN, MAX_MIN_PER_S, MAX_PATH_PREFIX_LEN, MAX_PER_TRY_TIMEOUT_MS, MAX_TIMEOUT_MS,
    MAX_WINDOW_S, OWNED_HEADERS,
};
use crate::rollout::{RolloutConfig, DEFAULT_MIN_REQUESTS, MAX_START_S, MAX_STEPS, MAX_STEP_S};

/// A whole number in `[min, max]`, as a `u32` (every caller's `max` fits).
fn whole_u32(Whole(number): Whole, path: &str, min: u64, max: u64) -> Result<u32> {
    let value = whole_in(number, path, min, max)?;
    Ok(u32::try_from(value).unwrap_or(u32::MAX))
}

/// A rate in `[0, 1]` in parts per million: exact decimal arithmetic, more
/// than six decimals rounded to nearest (half up), exponents accepted
/// (`5e-2` is 50_000).
fn rate_ppm(Number(number): Number, path: &str) -> Result<u32> {
    Ok(ppm_u32(fixed_in(number, path, 6, 0, PPM)?.rounded()))
}

/// A rate in `(0, 1]`, in parts per million (rounded, at least 1).
fn positive_rate(Number(number): Number, path: &str) -> Result<u32> {
    let rate = fixed_in(number, path, 6, 0, PPM)?;
    if rate.is_zero() {
        return error(path, "must be above 0 (0 would trip on the first call)");
    }
    Ok(ppm_u32(rate.rounded()).max(1))
}

fn ppm_u32(ppm: u64) -> u32 {
    // At most PPM by the callers' range checks.
    u32::try_from(ppm).unwrap_or(u32::MAX)
}

// ------------------------------------------------------------------ retry

/// A service's `retry` block; every key optional, except that route mode
/// needs `max_retries` and `retry_on` stated: they describe the route's
/// `retry_policy`, and a default could only misstate it (a wrong
/// `retry_on` would let a POST be replayed after the application acted).
pub(super) fn retry(raw: raw::Retry, path: &str) -> Result<RetryPolicy> {
    let mode = match raw.mode.0 {
        Some(Text(mode)) => match mode.as_str() {
            "headers" => RetryMode::Headers,
            "route" => RetryMode::Route,
            _ => {
                return error(
                    &join(path, "mode"),
                    format!("must be \"headers\" or \"route\", got {}", quote(&mode)),
                )
            }
        },
        None => RetryMode::Headers,
    };
    if mode == RetryMode::Route {
        for (key, missing) in [
            ("max_retries", raw.max_retries.0.is_none()),
            ("retry_on", raw.retry_on.0.is_none()),
        ] {
            if missing {
                return error(
                    &join(path, key),
                    "is required in route mode (it states the route's retry_policy)",
                );
            }
        }
    }
    let max_retries = match raw.max_retries.0 {
        Some(number) => whole_u32(number, &join(path, "max_retries"), 0, MAX_MAX_RETRIES)?,
        None => DEFAULT_MAX_RETRIES,
    };
    let (retry_on, retry_grpc_on) = match raw.retry_on.0 {
        Some(Text(text)) => match split_retry_on(&text) {
            Ok(lists) => lists,
            Err(reason) => return error(&join(path, "retry_on"), reason),
        },
        None => (DEFAULT_RETRY_ON.to_string(), String::new()),
    };
    let timeout_ms = match raw.timeout_ms.0 {
        Some(Whole(number)) => Some(whole_in(
            number,
            &join(path, "timeout_ms"),
            1,
            MAX_TIMEOUT_MS,
        )?),
        None => None,
    };
    let per_try_timeout_ms = match raw.per_try_timeout_ms.0 {
        Some(Whole(number)) => {
            let per_try_path = join(path, "per_try_timeout_ms");
            let per_try = whole_in(number, &per_try_path, 1, MAX_PER_TRY_TIMEOUT_MS)?;
            if let Some(timeout) = timeout_ms.filter(|&timeout| per_try > timeout) {
                return error(
                    &per_try_path,
                    format!("must not exceed timeout_ms ({timeout}), got {per_try}"),
                );
            }
            Some(per_try)
        }
        None => None,
    };
    let budget = match raw.budget.0 {
        Some(Obj(budget)) => self::budget(budget, &join(path, "budget"))?,
        None => Budget::default(),
    };
    let deadline_header = match raw.deadline_header.0 {
        Some(Text(name)) => Some(deadline_header_name(&name, &join(path, "deadline_header"))?),
        None => None,
    };
    let idempotent = match raw.idempotent.0 {
        Some(Obj(idempotent)) => self::idempotent(idempotent, &join(path, "idempotent"))?,
        None => Idempotent::default(),
    };
    let mut policy = RetryPolicy {
        mode,
        max_retries,
        per_try_timeout_ms,
        timeout_ms,
        budget,
        deadline_header,
        idempotent,
        ..RetryPolicy::default()
    };
    policy.set_conditions(retry_on, retry_grpc_on);
    Ok(policy)
}

/// `retry.idempotent`: `methods` (HTTP tokens, case-sensitive, as RFC 9110
/// compares methods) and `path_prefixes` (each starting with `/`, visible
/// ASCII); both optional, duplicates refused.
fn idempotent(raw: raw::Idempotent, path: &str) -> Result<Idempotent> {
    let methods = match raw.methods.0 {
        Some(List(items)) => {
            let methods_path = join(path, "methods");
            if items.len() > MAX_IDEMPOTENT_METHODS {
                return error(
                    &methods_path,
                    format!(
                        "too many methods (at most {MAX_IDEMPOTENT_METHODS}), got {}",
                        items.len()
                    ),
                );
            }
            let mut methods: Vec<String> = Vec::with_capacity(items.len());
            for (index, Text(method)) in items.into_iter().enumerate() {
                let item_path = format!("{methods_path}[{index}]");
                if method.is_empty()
                    || method.len() > MAX_METHOD_LEN
                    || !method.bytes().all(is_token_byte)
                {
                    return error(
                        &item_path,
                        format!(
                            "{} is not an HTTP method (1 to {MAX_METHOD_LEN} token characters, case-sensitive)",
                            quote(&method)
                        ),
                    );
                }
                if methods.contains(&method) {
                    return error(&item_path, format!("lists {} twice", quote(&method)));
                }
                methods.push(method);
            }
            methods
        }
        None => Vec::new(),
    };
    let path_prefixes = match raw.path_prefixes.0 {
        Some(List(items)) => {
            let prefixes_path = join(path, "path_prefixes");
            if items.len() > MAX_IDEMPOTENT_PATH_PREFIXES {
                return error(
                    &prefixes_path,
                    format!(
                        "too many path prefixes (at most {MAX_IDEMPOTENT_PATH_PREFIXES}), got {}",
                        items.len()
                    ),
                );
            }
            let mut prefixes: Vec<String> = Vec::with_capacity(items.len());
            for (index, Text(prefix)) in items.into_iter().enumerate() {
                let item_path = format!("{prefixes_path}[{index}]");
                if !prefix.starts_with('/') {
                    return error(
                        &item_path,
                        format!("must start with \"/\", got {}", quote(&prefix)),
                    );
                }
                if prefix.len() > MAX_PATH_PREFIX_LEN
                    || !prefix.bytes().all(|b| b.is_ascii_graphic())
                {
                    return error(
                        &item_path,
                        format!(
                            "{} is not a path prefix (at most {MAX_PATH_PREFIX_LEN} visible ASCII characters, no spaces)",
                            quote(&prefix)
                        ),
                    );
                }
                if prefixes.contains(&prefix) {
                    return error(&item_path, format!("lists {} twice", quote(&prefix)));
                }
                prefixes.push(prefix);
            }
            prefixes
        }
        None => Vec::new(),
    };
    Ok(Idempotent {
        methods,
        path_prefixes,
    })
}

fn budget(raw: raw::Budget, path: &str) -> Result<Budget> {
    let ratio_ppm = match raw.ratio.0 {
        Some(number) => rate_ppm(number, &join(path, "ratio"))?,
        None => DEFAULT_RATIO_PPM,
    };
    let min_per_s = match raw.min_per_s.0 {
        Some(number) => whole_u32(number, &join(path, "min_per_s"), 0, MAX_MIN_PER_S)?,
        None => DEFAULT_MIN_PER_S,
    };
    let window_s = match raw.window_s.0 {
        Some(number) => whole_u32(number, &join(path, "window_s"), 1, MAX_WINDOW_S)?,
        None => DEFAULT_WINDOW_S,
    };
    Ok(Budget {
        ratio_ppm,
        min_per_s,
        window_s,
    })
}

/// Splits Envoy's comma-separated grammar into the HTTP and the gRPC lists.
/// Envoy ignores an unknown condition silently; here it is refused, since a
/// typo (`5xxx`) would otherwise disable retries without a word.
fn split_retry_on(text: &str) -> std::result::Result<(String, String), String> {
    let mut http: Vec<&str> = Vec::new();
    let mut grpc: Vec<&str> = Vec::new();
    for item in text.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() {
            return Err(format!(
                "has an empty condition in {} (a comma-separated list of Envoy retry conditions)",
                quote(text)
            ));
        }
        if http.contains(&item) || grpc.contains(&item) {
            return Err(format!("lists {} twice", quote(item)));
        }
        if HTTP_POLICIES.contains(&item) {
            http.push(item);
        } else if GRPC_POLICIES.contains(&item) {
            grpc.push(item);
        } else {
            return Err(format!(
                "unknown retry condition {} (expected Envoy's: {}, or for gRPC: {})",
                quote(item),
                HTTP_POLICIES.join(", "),
                GRPC_POLICIES.join(", ")
            ));
        }
    }
    Ok((http.join(","), grpc.join(",")))
}

fn deadline_header_name(name: &str, path: &str) -> Result<String> {
    let name = header_name(name, path, false)?;
    if name == GRPC_TIMEOUT_HEADER {
        return error(
            path,
            "must not be \"grpc-timeout\", which is always read (in gRPC's format)",
        );
    }
    if OWNED_HEADERS.contains(&name.as_str()) {
        return error(
            path,
            format!("must not be {}, which the filter overwrites", quote(&name)),
        );
    }
    Ok(name)
}

// ---------------------------------------------------------------- breaker

/// A service's `breaker` block; every key optional.
pub(super) fn breaker(raw: raw::Breaker, path: &str) -> Result<BreakerConfig> {
    let mut config = BreakerConfig::default();
    if let Some(Whole(number)) = raw.window_s.0 {
        config.window_ms = whole_in(number, &join(path, "window_s"), 1, 300)? * 1000;
    }
    if let Some(number) = raw.min_requests.0 {
        config.min_requests = whole_u32(number, &join(path, "min_requests"), 1, 1_000_000)?;
    }
    if let Some(number) = raw.failure_rate.0 {
        config.failure_rate_ppm = positive_rate(number, &join(path, "failure_rate"))?;
    }
    if let Some(number) = raw.consecutive_failures.0 {
        config.consecutive_failures = Some(whole_u32(
            number,
            &join(path, "consecutive_failures"),
            1,
            1_000_000,
        )?);
    }
    config.slow = match (raw.slow_ms.0, raw.slow_rate.0) {
        (Some(Whole(ms)), Some(rate)) => Some(SlowCalls {
            threshold_ms: whole_in(ms, &join(path, "slow_ms"), 1, MAX_DURATION_MS)?,
            rate_ppm: positive_rate(rate, &join(path, "slow_rate"))?,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return error(
                &join(path, "slow_rate"),
                "is required with slow_ms (which share of calls may be slow)",
            )
        }
        (None, Some(_)) => {
            return error(
                &join(path, "slow_ms"),
                "is required with slow_rate (how long a call must take to be slow)",
            )
        }
    };
    if let Some(Whole(number)) = raw.open_ms.0 {
        config.open_ms = whole_in(number, &join(path, "open_ms"), 1, MAX_DURATION_MS)?;
    }
    config.max_open_ms = match raw.max_open_ms.0 {
        Some(Whole(number)) => {
            let max_path = join(path, "max_open_ms");
            let max = whole_in(number, &max_path, 1, MAX_DURATION_MS)?;
            if max < config.open_ms {
                return error(
                    &max_path,
                    format!("must be at least open_ms ({}), got {max}", config.open_ms),
                );
            }
            max
        }
        None => DEFAULT_MAX_OPEN_MS.max(config.open_ms),
    };
    if let Some(Whole(number)) = raw.half_open_requests.0 {
        let requests = whole_in(number, &join(path, "half_open_requests"), 1, 100)?;
        // 1..=100 fits a u8.
        config.half_open_requests = u8::try_from(requests).unwrap_or(u8::MAX);
    }
    Ok(config)
}

// ---------------------------------------------------------------- rollout

/// A service's `rollout` block. `steps`, `step_s` and `max_failure_rate` are
/// required: the failure budget is a policy choice nobody should inherit by
/// default. `min_requests` defaults to 100; `start_unix_s` to when the block
/// was first applied.
///
/// The caller (the service) refuses a service that has both `weight` and
/// `rollout`, or a `rollout` without a canary.
pub(super) fn rollout(raw: raw::Rollout, path: &str) -> Result<RolloutConfig> {
    let steps_path = join(path, "steps");
    let List(steps) = required(raw.steps, path, "steps")?;
    if steps.is_empty() || steps.len() > MAX_STEPS {
        return error(
            &steps_path,
            format!("must list 1 to {MAX_STEPS} steps, got {}", steps.len()),
        );
    }
    let mut steps_bp: Vec<u16> = Vec::with_capacity(steps.len());
    for (index, step) in steps.into_iter().enumerate() {
        let step_path = format!("{steps_path}[{index}]");
        let shown = step.0.shown();
        let step = weight(step, &step_path)?;
        if let Some(&previous) = steps_bp.last() {
            if step < previous {
                return error(
                    &step_path,
                    format!(
                        "must not be below the previous step ({}), got {shown}",
                        format_weight(previous)
                    ),
                );
            }
        }
        steps_bp.push(step);
    }
    let Whole(step_s) = required(raw.step_s, path, "step_s")?;
    let step_ms = whole_in(step_s, &join(path, "step_s"), 1, MAX_STEP_S)? * 1000;
    let max_failure_ppm = rate_ppm(
        required(raw.max_failure_rate, path, "max_failure_rate")?,
        &join(path, "max_failure_rate"),
    )?;
    let min_requests = match raw.min_requests.0 {
        Some(number) => whole_u32(number, &join(path, "min_requests"), 1, 1_000_000_000)?,
        None => DEFAULT_MIN_REQUESTS,
    };
    let start_ms = match raw.start_unix_s.0 {
        Some(Whole(number)) => {
            Some(whole_in(number, &join(path, "start_unix_s"), 0, MAX_START_S)? * 1000)
        }
        None => None,
    };
    Ok(RolloutConfig {
        steps_bp,
        step_ms,
        max_failure_ppm,
        min_requests,
        start_ms,
    })
}

// --------------------------------------------------------------- failures

/// At most this many items in each list: there are 500 statuses and 17
/// codes, so a longer list is a mistake (and a hostile one is not read).
const MAX_FAILURE_ITEMS: usize = 600;

/// A service's `failures` block. A list given replaces its default; an
/// empty list means "none of these fail" (only upstream failure flags do).
pub(super) fn failures(raw: raw::Failures, path: &str) -> Result<Failures> {
    let mut failures = Failures::default();
    if let Some(List(items)) = raw.http_statuses.0 {
        let list_path = join(path, "http_statuses");
        if items.len() > MAX_FAILURE_ITEMS {
            return error(&list_path, "too many items (at most 600)");
        }
        failures.clear_http();
        for (index, item) in items.into_iter().enumerate() {
            let item_path = format!("{list_path}[{index}]");
            match item {
                Code::Number(number) => {
                    let status = whole_in(number, &item_path, 100, 599)?;
                    failures.add_http_status(u32::try_from(status).unwrap_or(0));
                }
                Code::Name(name) => match http_class(&name) {
                    Some(class) => failures.add_http_class(class),
                    None => {
                        return error(
                            &item_path,
                            format!(
                                "must be a status 100-599 or a class \"1xx\"-\"5xx\", got {}",
                                quote(&name)
                            ),
                        )
                    }
                },
            }
        }
    }
    if let Some(List(items)) = raw.grpc_codes.0 {
        let list_path = join(path, "grpc_codes");
        if items.len() > MAX_FAILURE_ITEMS {
            return error(&list_path, "too many items (at most 600)");
        }
        failures.clear_grpc();
        for (index, item) in items.into_iter().enumerate() {
            let item_path = format!("{list_path}[{index}]");
            let code = match item {
                Code::Number(number) => {
                    u32::try_from(whole_in(number, &item_path, 0, 16)?).unwrap_or(0)
                }
                Code::Name(name) => match grpc_code_by_name(&name) {
                    Some(code) => code,
                    None => {
                        return error(
                            &item_path,
                            format!(
                                "must be a gRPC code 0-16 or its name (UNAVAILABLE, INTERNAL, ...), got {}",
                                quote(&name)
                            ),
                        )
                    }
                },
            };
            failures.add_grpc_code(code);
        }
    }
    Ok(failures)
}

/// `"5xx"` (any case) → 5; classes 1xx to 5xx.
fn http_class(name: &str) -> Option<u32> {
    match name.as_bytes() {
        [digit @ b'1'..=b'5', x1, x2]
            if x1.eq_ignore_ascii_case(&b'x') && x2.eq_ignore_ascii_case(&b'x') =>
        {
            Some(u32::from(digit - b'0'))
        }
        _ => None,
    }
}
