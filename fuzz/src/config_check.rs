//! The config parser's contract, checked on any input:
//! - it never panics;
//! - an accepted config satisfies every documented limit (weights ≤ 10000
//!   bp, names of the documented alphabet and length, unique services,
//!   canary ≠ stable, host patterns normalised, rules and steps in range,
//!   retry, breaker and rollout numbers in range, no rule or sticky key
//!   reading the steering header, no empty `contains` needle) and compiles
//!   into a router that routes a few requests without panicking;
//! - a refusal is one line, `path: reason` (only a document that is not
//!   JSON, or not an object, has an empty path), bounded in length, with a
//!   path that is a JSON path (`services[0].retry.budget.ratio`).
//!
//! `mutate` is the structure-aware half of the `config` target: it takes a
//! valid config and applies a list of edits (set, remove, add a key, swap a
//! type, duplicate a list item) at paths that exist in the document.

use serde_json::{Map, Value};
use sluice::config::{
    Config, HostPattern, RuleAction, RuleMatch, StickyKey, ValueTest, FULL_WEIGHT,
};
use sluice::retry;
use sluice::router::{Decision, RequestHeaders, Router};

/// Valid configurations the mutator starts from (also the seed corpus).
pub const SEEDS: &[&str] = &[
    r#"{"steering_header": "x-sluice-cluster", "services": [{"name": "shop", "match": {"authority": "shop.local", "path_prefix": "/"},
       "stable": "shop_v1", "canary": "shop_v2", "weight": 10, "sticky": {"header": "x-user-id"},
       "rules": [{"header": "x-canary", "equals": "always", "to": "canary"}, {"header": "x-canary", "equals": "never", "to": "stable"},
                 {"cookie": "beta", "equals": "yes", "to": "canary"}, {"device": "mobile", "weight": 50}]}]}"#,
    r#"{"services": [{"name": "shop", "stable": "shop_v1", "canary": "shop_v2", "weight": 12.5,
       "retry": {"max_retries": 2, "retry_on": "5xx,reset,connect-failure,refused-stream", "per_try_timeout_ms": 1000, "timeout_ms": 5000,
                 "budget": {"ratio": 0.2, "min_per_s": 10, "window_s": 10}, "deadline_header": "x-request-timeout-ms"},
       "breaker": {"window_s": 10, "min_requests": 20, "failure_rate": 0.5, "consecutive_failures": 5, "slow_ms": 1000, "slow_rate": 0.8,
                   "open_ms": 5000, "max_open_ms": 60000, "half_open_requests": 3}}]}"#,
    r#"{"services": [{"name": "cart", "match": {"authority": ["cart.local", "*.cart.example.com"], "path_prefix": "/cart"},
       "stable": "cart_v1", "canary": "cart_v2", "sticky": {"cookie": "uid"},
       "rules": [{"header": ":path", "prefix": ["/cart/beta", "/cart/new"], "to": "canary"}, {"cookie": "tier", "contains": "gold", "weight": 100},
                 {"header": "x-debug", "present": false, "weight": 0}],
       "rollout": {"steps": [5, 25, 50, 100], "step_s": 300, "max_failure_rate": 0.02, "min_requests": 100, "start_unix_s": 1795000000}},
      {"name": "api", "match": {"authority": "*"}, "stable": "api_v1", "retry": {}, "breaker": {}}]}"#,
];

/// Values the mutator writes: boundaries, wrong types, hostile strings.
fn interesting(choice: u8, text: &str) -> Value {
    match choice % 32 {
        0 => Value::Null,
        1 => Value::Bool(true),
        2 => Value::Bool(false),
        3 => Value::from(0),
        4 => Value::from(-1),
        5 => Value::from(100),
        6 => Value::from(100.01),
        7 => Value::from(0.005),
        8 => Value::from(1e300),
        9 => Value::from(u64::MAX),
        10 => Value::from(i64::MIN),
        11 => Value::from(10_001),
        12 => Value::from(3_600_001),
        13 => Value::from(0.1 + 0.2),
        14 => Value::from(""),
        15 => Value::from("*"),
        16 => Value::from("*.x"),
        17 => Value::from(":path"),
        18 => Value::from("x-sluice-cluster"),
        19 => Value::from("5xx,,reset"),
        20 => Value::from("a\nb"),
        21 => Value::from("é"),
        22 => Value::from("x".repeat(300)),
        23 => Value::Array(Vec::new()),
        24 => Value::Object(Map::new()),
        25 => Value::Array(vec![Value::from("a"), Value::from(1)]),
        26 => Value::from(1e-7),
        27 => Value::from(60),
        28 => Value::from(text),
        29 => Value::Array(vec![Value::from(text)]),
        30 => Value::from(u32::MAX),
        _ => Value::from(f64::MIN_POSITIVE),
    }
}

/// Keys the mutator adds: known ones in the wrong place, typos, odd bytes.
const KEYS: &[&str] = &[
    "name", "weight", "canary", "stable", "rules", "retry", "breaker", "rollout", "sticky",
    "match", "header", "cookie", "device", "to", "equals", "present", "budget", "steps", "Weight",
    "wieght", "", "a b", "\u{0}", "services",
];

/// One edit, decoded from fuzz bytes by the target.
#[derive(Debug, Clone, arbitrary::Arbitrary)]
pub struct Edit {
    /// Which node of the document (by pre-order position, modulo the count).
    pub node: u16,
    pub kind: u8,
    pub choice: u8,
    pub text: String,
}

/// Applies the edits to a copy of seed `seed`.
pub fn mutate(seed: u8, edits: &[Edit]) -> Value {
    let text = SEEDS
        .get(usize::from(seed) % SEEDS.len())
        .copied()
        .unwrap_or("{}");
    let mut document: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    for edit in edits {
        let count = count_nodes(&document);
        let mut target = usize::from(edit.node) % count.max(1);
        if let Some(node) = nth_node(&mut document, &mut target) {
            apply(node, edit);
        }
    }
    document
}

fn count_nodes(value: &Value) -> usize {
    1 + match value {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(map) => map.values().map(count_nodes).sum(),
        _ => 0,
    }
}

fn nth_node<'v>(value: &'v mut Value, index: &mut usize) -> Option<&'v mut Value> {
    if *index == 0 {
        return Some(value);
    }
    *index -= 1;
    match value {
        Value::Array(items) => {
            for item in items {
                if let Some(found) = nth_node(item, index) {
                    return Some(found);
                }
            }
            None
        }
        Value::Object(map) => {
            for item in map.values_mut() {
                if let Some(found) = nth_node(item, index) {
                    return Some(found);
                }
            }
            None
        }
        _ => None,
    }
}

fn apply(node: &mut Value, edit: &Edit) {
    match edit.kind % 6 {
        // Replace the node.
        0 | 1 => *node = interesting(edit.choice, &edit.text),
        // Remove a key or an item.
        2 => match node {
            Value::Object(map) => {
                let keys: Vec<String> = map.keys().cloned().collect();
                if let Some(key) = keys.get(usize::from(edit.choice) % keys.len().max(1)) {
                    map.remove(key);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                let at = usize::from(edit.choice) % items.len();
                items.remove(at);
            }
            _ => *node = Value::from(edit.text.clone()),
        },
        // Add a key (or an item).
        3 => match node {
            Value::Object(map) => {
                let key = KEYS
                    .get(usize::from(edit.choice) % KEYS.len())
                    .map_or_else(|| edit.text.clone(), |key| (*key).to_string());
                map.insert(key, interesting(edit.choice / 3, &edit.text));
            }
            Value::Array(items) => items.push(interesting(edit.choice, &edit.text)),
            _ => {}
        },
        // Duplicate a list item (duplicate services, rules, steps).
        4 => {
            if let Value::Array(items) = node {
                if let Some(item) = items.get(usize::from(edit.choice) % items.len().max(1)) {
                    let copy = item.clone();
                    items.push(copy);
                }
            }
        }
        // Perturb a number or a string.
        _ => match node {
            Value::Number(number) => {
                let value = number.as_f64().unwrap_or(0.0);
                let factor = [0.5, 2.0, -1.0, 1.000_001, 100.0, 0.01];
                let scaled = value
                    * factor
                        .get(usize::from(edit.choice) % 6)
                        .copied()
                        .unwrap_or(1.0);
                *node = serde_json::Number::from_f64(scaled).map_or(Value::Null, Value::Number);
            }
            Value::String(text) => {
                text.push_str(&edit.text);
            }
            _ => *node = interesting(edit.choice, &edit.text),
        },
    }
}

/// A few requests through the compiled router.
struct Probe(Vec<(&'static str, Vec<u8>)>);

impl RequestHeaders for Probe {
    fn header(&mut self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, value)| value.as_slice())
    }
}

fn valid_header_name(name: &str, allow_pseudo: bool) -> bool {
    let body = match name.strip_prefix(':') {
        Some(rest) if allow_pseudo => rest,
        Some(_) => return false,
        None => name,
    };
    !body.is_empty()
        && name.len() <= 256
        && name == name.to_ascii_lowercase()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_cookie(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_cluster(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && name.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `path` is a JSON path as the parser writes them: keys joined by
/// dots, `[index]` for list items, a refused odd key shown JSON-quoted.
fn json_path(path: &str) -> bool {
    let mut rest = path;
    let mut first = true;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return false;
            };
            let digits = after.get(..end).unwrap_or("");
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return false;
            }
            rest = after.get(end + 1..).unwrap_or("");
            first = false;
            continue;
        }
        if !first {
            match rest.strip_prefix('.') {
                Some(after) => rest = after,
                None => return false,
            }
        }
        first = false;
        if rest.starts_with('"') {
            // A quoted key: the rest of the path (it is the last segment).
            return rest.len() >= 2;
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let key = rest.get(..end).unwrap_or("");
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return false;
        }
        rest = rest.get(end..).unwrap_or("");
    }
    true
}

/// Parses `bytes` and checks the contract; `Err` names the broken invariant.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    match Config::parse(bytes) {
        Ok(config) => check_accepted(&config),
        Err(err) => {
            let line = err.to_string();
            if line.contains(['\n', '\r']) {
                return Err(format!("refusal is not one line: {line:?}"));
            }
            if line.len() > 2048 {
                return Err(format!("refusal of {} bytes", line.len()));
            }
            if err.reason.is_empty() {
                return Err(format!("refusal without a reason: {line:?}"));
            }
            if err.path.is_empty() {
                if !(err.reason.starts_with("invalid JSON at line ")
                    || err.reason.starts_with("must be an object"))
                {
                    return Err(format!("refusal without a path: {line:?}"));
                }
            } else {
                if line != format!("{}: {}", err.path, err.reason) {
                    return Err(format!("refusal not `path: reason`: {line:?}"));
                }
                if !json_path(&err.path) {
                    return Err(format!("refusal path is not a JSON path: {line:?}"));
                }
            }
            Ok(())
        }
    }
}

fn check_accepted(config: &Config) -> Result<(), String> {
    let fail = |what: String| Err(format!("accepted config breaks a limit: {what}"));
    if !valid_header_name(&config.steering_header, false) {
        return fail(format!("steering header {:?}", config.steering_header));
    }
    if config.services.is_empty() || config.services.len() > usize::from(u16::MAX) {
        return fail(format!("{} services", config.services.len()));
    }
    for (index, service) in config.services.iter().enumerate() {
        let name = &service.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return fail(format!("service name {name:?}"));
        }
        if config
            .services
            .iter()
            .skip(index + 1)
            .any(|other| other.name == *name)
        {
            return fail(format!("duplicate service {name:?}"));
        }
        if !valid_cluster(&service.stable)
            || service
                .canary
                .as_deref()
                .is_some_and(|canary| !valid_cluster(canary) || canary == service.stable)
        {
            return fail(format!(
                "clusters of {name}: {:?} {:?}",
                service.stable, service.canary
            ));
        }
        if service.weight_bp > FULL_WEIGHT || (service.weight_bp > 0 && service.canary.is_none()) {
            return fail(format!("weight {} of {name}", service.weight_bp));
        }
        for pattern in &service.matcher.authorities {
            let host = match pattern {
                HostPattern::Any => continue,
                HostPattern::Exact(host) => host.as_str(),
                HostPattern::Suffix(suffix) => match suffix.strip_prefix('.') {
                    Some(host) => host,
                    None => return fail(format!("wildcard suffix {suffix:?}")),
                },
            };
            if host.is_empty()
                || host.len() > 253
                || host != host.to_ascii_lowercase()
                || host.split('.').any(str::is_empty)
                || host.contains(['*', ':']) && !host.starts_with('[')
            {
                return fail(format!("host pattern {pattern:?}"));
            }
        }
        if let Some(prefix) = &service.matcher.path_prefix {
            if !prefix.starts_with('/') {
                return fail(format!("path prefix {prefix:?}"));
            }
        }
        match &service.sticky {
            Some(StickyKey::Header(header))
                if !valid_header_name(header, true) || *header == config.steering_header =>
            {
                return fail(format!("sticky header {header:?}"));
            }
            Some(StickyKey::Cookie(cookie)) if !valid_cookie(cookie) => {
                return fail(format!("sticky cookie {cookie:?}"))
            }
            _ => {}
        }
        if service.rules.len() > 1000 {
            return fail(format!("{} rules", service.rules.len()));
        }
        for rule in &service.rules {
            let test = match &rule.matcher {
                RuleMatch::Header { name: header, test } => {
                    if !valid_header_name(header, true) || *header == config.steering_header {
                        return fail(format!("rule header {header:?}"));
                    }
                    Some(test)
                }
                RuleMatch::Cookie { name: cookie, test } => {
                    if !valid_cookie(cookie) {
                        return fail(format!("rule cookie {cookie:?}"));
                    }
                    Some(test)
                }
                RuleMatch::Device(_) => None,
            };
            match test {
                Some(ValueTest::Equals(options) | ValueTest::Prefix(options))
                    if options.is_empty() =>
                {
                    return fail("a rule test without values".into())
                }
                Some(ValueTest::Contains(needles))
                    if needles.is_empty() || needles.iter().any(Vec::is_empty) =>
                {
                    return fail(format!("contains needles {needles:?}"))
                }
                _ => {}
            }
            match rule.action {
                RuleAction::Weight(weight)
                    if weight > FULL_WEIGHT || (weight > 0 && service.canary.is_none()) =>
                {
                    return fail(format!("rule weight {weight}"))
                }
                RuleAction::To(sluice::config::Side::Canary) if service.canary.is_none() => {
                    return fail("rule to a missing canary".into())
                }
                _ => {}
            }
        }
        if let Some(policy) = &service.retry {
            let budget = policy.budget;
            let known = |list: &str, names: &[&str]| {
                list.is_empty() || list.split(',').all(|item| names.contains(&item))
            };
            if u64::from(policy.max_retries) > retry::MAX_MAX_RETRIES
                || budget.ratio_ppm > 1_000_000
                || u64::from(budget.min_per_s) > retry::MAX_MIN_PER_S
                || budget.window_s == 0
                || u64::from(budget.window_s) > retry::MAX_WINDOW_S
                || policy
                    .timeout_ms
                    .is_some_and(|ms| ms == 0 || ms > retry::MAX_TIMEOUT_MS)
                || policy.per_try_timeout_ms.is_some_and(|ms| {
                    ms == 0
                        || ms > retry::MAX_PER_TRY_TIMEOUT_MS
                        || policy.timeout_ms.is_some_and(|t| ms > t)
                })
                || !known(&policy.retry_on, retry::HTTP_POLICIES)
                || !known(&policy.retry_grpc_on, retry::GRPC_POLICIES)
                || (policy.retry_on.is_empty() && policy.retry_grpc_on.is_empty())
                || policy.deadline_header.as_deref().is_some_and(|header| {
                    !valid_header_name(header, false) || header == retry::GRPC_TIMEOUT_HEADER
                })
            {
                return fail(format!("retry policy of {name}: {policy:?}"));
            }
        }
        if let Some(breaker) = &service.breaker {
            let rate_ok = |ppm: u32| (1..=1_000_000).contains(&ppm);
            if breaker.window_ms == 0
                || breaker.window_ms > 300_000
                || breaker.window_ms % 1000 != 0
                || breaker.min_requests == 0
                || !rate_ok(breaker.failure_rate_ppm)
                || breaker.consecutive_failures == Some(0)
                || breaker
                    .slow
                    .is_some_and(|slow| slow.threshold_ms == 0 || !rate_ok(slow.rate_ppm))
                || breaker.open_ms == 0
                || breaker.open_ms > breaker.max_open_ms
                || breaker.max_open_ms > 3_600_000
                || !(1..=100).contains(&breaker.half_open_requests)
            {
                return fail(format!("breaker of {name}: {breaker:?}"));
            }
        }
        if let Some(rollout) = &service.rollout {
            let steps = &rollout.steps_bp;
            if service.canary.is_none()
                || service.weight_bp != 0
                || steps.is_empty()
                || steps.len() > sluice::rollout::MAX_STEPS
                || steps.iter().any(|&step| step > FULL_WEIGHT)
                || steps.windows(2).any(|pair| pair.first() > pair.get(1))
                || rollout.step_ms == 0
                || rollout.max_failure_ppm > 1_000_000
                || rollout.min_requests == 0
            {
                return fail(format!("rollout of {name}: {rollout:?}"));
            }
        }
    }
    let summary = config.summary();
    if summary.contains(['\n', '\r']) {
        return fail(format!("summary is not one line: {summary:?}"));
    }
    // The compiled router routes a few requests without panicking, and
    // only to configured clusters.
    let router = Router::new(config.clone());
    for (authority, path) in [
        ("shop.local", "/"),
        ("a.cart.example.com:80", "/cart/x"),
        ("[::1]", "/"),
        ("", ""),
    ] {
        let mut probe = Probe(vec![
            (":authority", authority.as_bytes().to_vec()),
            (":path", path.as_bytes().to_vec()),
            ("cookie", b"uid=7; beta=yes; tier=gold".to_vec()),
            ("user-agent", b"Mozilla/5.0 (iPhone) Mobile".to_vec()),
            ("x-user-id", b"alice".to_vec()),
        ]);
        let Some(index) = router.find_service(Some(authority.as_bytes()), Some(path.as_bytes()))
        else {
            continue;
        };
        let Some(service) = router.services().get(index) else {
            return fail(format!("find_service returned {index}"));
        };
        for weight in [0, service.weight_bp, FULL_WEIGHT] {
            if let Decision::Routed { side, .. } = router.decide(index, weight, true, &mut probe, 7)
            {
                if side == sluice::config::Side::Canary && service.canary.is_none() {
                    return fail(format!(
                        "{name} routed to a missing canary",
                        name = service.name
                    ));
                }
            }
        }
    }
    Ok(())
}
