//! From the document to the runtime types: reading it (serde, with the
//! path of any refusal), then every check serde cannot make, each refusal
//! one line `path: reason`.

use super::raw::{self, Flag, List, Num, Number, Obj, Opt, Strings, Text};
use super::{
    policies, Config, ConfigError, HostPattern, Rule, RuleAction, RuleMatch, Service, ServiceMatch,
    Side, StickyKey, ValueTest, DEFAULT_STEERING_HEADER, FULL_WEIGHT,
};
use crate::decimal::{decimal, scaled, Fixed, Rest};
use crate::device::DeviceClass;
use crate::failures::Failures;
use serde_json::error::Category;
use serde_path_to_error::Segment;

pub(super) type Result<T> = std::result::Result<T, ConfigError>;

pub(super) fn error<T>(path: &str, reason: impl Into<String>) -> Result<T> {
    Err(ConfigError {
        path: path.to_string(),
        reason: reason.into(),
    })
}

/// `path.key`, or `key` at the top.
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The value of a required key.
pub(super) fn required<T>(value: Opt<T>, path: &str, key: &str) -> Result<T> {
    match value.0 {
        Some(value) => Ok(value),
        None => error(&join(path, key), "is required"),
    }
}

// ---------------------------------------------------------------- reading

/// Reads the document into its raw shapes. A refusal names the path serde
/// was at; a document that is not JSON has an empty path and the reason
/// `invalid JSON at line L column C: <what>`.
pub(super) fn read(bytes: &[u8]) -> Result<raw::Config> {
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let document: Obj<raw::Config> =
        serde_path_to_error::deserialize(&mut json).map_err(refusal)?;
    json.end().map_err(|err| not_json(&err))?;
    Ok(document.0)
}

fn refusal(err: serde_path_to_error::Error<serde_json::Error>) -> ConfigError {
    let path = json_path(err.path());
    let inner = err.inner();
    let reason = message(inner);
    match inner.classify() {
        // A number past a double's range is valid JSON serde_json cannot
        // hold: said where it is, when that is known.
        Category::Syntax if reason == "number out of range" && !path.is_empty() => ConfigError {
            path,
            reason: "number out of range (beyond what a double holds)".to_string(),
        },
        Category::Syntax | Category::Eof | Category::Io => not_json(inner),
        Category::Data => data_refusal(path, reason),
    }
}

/// serde_json's message without the ` at line L column C` it appends.
fn message(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let place = format!(" at line {} column {}", err.line(), err.column());
    match text.strip_suffix(&place) {
        Some(reason) => reason.to_string(),
        None => text,
    }
}

fn not_json(err: &serde_json::Error) -> ConfigError {
    let mut what = message(err);
    if what == "expected ident" {
        // A word that is not one of JSON's three (`nul`, `not`).
        what = "expected true, false or null".to_string();
    }
    ConfigError {
        path: String::new(),
        reason: format!(
            "invalid JSON at line {} column {}: {what}",
            err.line(),
            err.column()
        ),
    }
}

/// The refusals serde's derive makes, in this crate's words. The leaves
/// (`raw`) word their own; anything else is passed on.
fn data_refusal(path: String, reason: String) -> ConfigError {
    // serde_path_to_error puts the unknown key in the path already.
    if let Some(rest) = reason.strip_prefix("unknown field `") {
        // `x`, expected one of `a`, `b`, `c` / `a` or `b` / `a`
        let known = match rest.rfind("`, expected ") {
            Some(at) => rest.get(at + "`, expected ".len()..).unwrap_or(""),
            None => "",
        };
        let known = known.strip_prefix("one of ").unwrap_or(known);
        let names: Vec<&str> = known
            .split(", ")
            .flat_map(|part| part.split(" or "))
            .map(|name| name.trim_matches('`'))
            .filter(|name| !name.is_empty())
            .collect();
        return ConfigError {
            path,
            reason: format!("unknown key (expected one of: {})", names.join(", ")),
        };
    }
    // The path is the object's; the key is a known one, plain.
    if let Some(key) = reason
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return ConfigError {
            path: join(&path, key),
            reason: "duplicate key".to_string(),
        };
    }
    ConfigError { path, reason }
}

/// `services[0].match.authority`; an odd key JSON-quoted.
fn json_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, &key_segment(key)),
            Segment::Enum { variant } => out = join(&out, &key_segment(variant)),
            Segment::Unknown => out = join(&out, "?"),
        }
    }
    out
}

/// A key as a path segment: plain keys as they are, others JSON-quoted.
fn key_segment(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        key.to_string()
    } else {
        quote(key)
    }
}

// --------------------------------------------------------------- messages

/// Longest rendering of a value in a message, so that a hostile config
/// cannot produce a megabyte log line.
const SHOW_MAX: usize = 80;

/// A string quoted for a message as JSON writes it (`"`, `\` and control
/// characters escaped), bounded: past `SHOW_MAX` bytes it ends in `...`.
pub(super) fn quote(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::from('"');
    for ch in text.chars() {
        if out.len() > SHOW_MAX {
            break;
        }
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\0'..='\u{1f}' => {
                let code = ch as usize;
                out.push_str("\\u00");
                for digit in [code >> 4, code & 0xf] {
                    out.push(char::from(HEX.get(digit).copied().unwrap_or(b'0')));
                }
            }
            _ => out.push(ch),
        }
    }
    out.push('"');
    if out.len() > SHOW_MAX {
        let mut cut = SHOW_MAX - 3;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

// ---------------------------------------------------------------- numbers
//
// serde_json gives a number as a `u64`, an `i64` or a double. A double is
// read back as the shortest decimal that parses to it (`{:e}`: `0.1` is
// `1e-1`, not 0.1000000000000000055...), which is what was written for any
// number of up to 15 significant digits; that decimal is then scaled
// exactly, as the text itself used to be. Float noise from a generator
// (`30.000000000000004`) is handled where it matters (`weight`).

impl Num {
    /// The value as an exact decimal, for `scaled`.
    fn decimal_text(self) -> String {
        match self {
            Num::Int(value) => value.to_string(),
            Num::Neg(value) => value.to_string(),
            Num::Float(value) => format!("{value:e}"),
        }
    }

    /// The value in a message: plain digits, or an exponent for very large
    /// and very small magnitudes (as JavaScript writes numbers).
    pub(super) fn shown(self) -> String {
        match self {
            Num::Int(value) => value.to_string(),
            Num::Neg(value) => value.to_string(),
            Num::Float(value) => {
                let magnitude = value.abs();
                if magnitude == 0.0 || (1e-6..1e21).contains(&magnitude) {
                    format!("{value}")
                } else {
                    format!("{value:e}")
                }
            }
        }
    }
}

/// A number within `[min, max] × 10^-scale`, exactly, scaled by
/// `10^scale`: with scale 6, `0.25` is 250_000 units and `0.1234567` is
/// 123_456 units and a rest above half. What to do with digits beyond the
/// scale (round, refuse) is the caller's choice. The message for a value out
/// of range shows the bounds as decimals (`must be between 0 and 1, got 1.5`).
pub(super) fn fixed_in(number: Num, path: &str, scale: u32, min: u64, max: u64) -> Result<Fixed> {
    match scaled(&number.decimal_text(), scale) {
        Some((false, Some(units), rest))
            if units >= min && (units < max || (units == max && rest == Rest::Zero)) =>
        {
            Ok(Fixed { units, rest })
        }
        _ => error(
            path,
            format!(
                "must be between {} and {}, got {}",
                decimal(min, scale),
                decimal(max, scale),
                number.shown()
            ),
        ),
    }
}

/// A whole number within `[min, max]`. A double with nothing after the
/// point is whole (`10.0`, `1e3`: config that went through a protobuf
/// `Struct` has only doubles); `10.5` and negative numbers are refused.
pub(super) fn whole_in(number: Num, path: &str, min: u64, max: u64) -> Result<u64> {
    let read = match number {
        Num::Int(value) => Some((false, Some(value), Rest::Zero)),
        _ => scaled(&number.decimal_text(), 0),
    };
    match read {
        Some((false, Some(value), Rest::Zero)) if (min..=max).contains(&value) => Ok(value),
        Some((false, _, Rest::Zero)) => error(
            path,
            format!("must be between {min} and {max}, got {}", number.shown()),
        ),
        _ => error(
            path,
            format!(
                "must be a whole number between {min} and {max}, got {}",
                number.shown()
            ),
        ),
    }
}

/// A percentage with 0.01 resolution, returned in basis points.
///
/// Digits beyond the resolution are refused, except float noise: a value
/// within a millionth of a basis point of a multiple (`30.000000000000004`,
/// which a generator's floating-point arithmetic may write) is rounded to it.
pub(super) fn weight(Number(number): Number, path: &str) -> Result<u16> {
    /// Millionths of a basis point: 10^-8 percent.
    const SCALE: u32 = 8;
    const PER_BP: u64 = 1_000_000;
    let percent = fixed_in(number, path, SCALE, 0, u64::from(FULL_WEIGHT) * PER_BP)?;
    let (whole, below) = (percent.units / PER_BP, percent.units % PER_BP);
    let basis_points = if below == 0 || (below == 1 && percent.exact().is_some()) {
        whole
    } else if below >= PER_BP - 1 {
        whole + 1
    } else {
        return error(
            path,
            format!("resolution is 0.01 percent, got {}", number.shown()),
        );
    };
    // In range by the check above: 0..=10_000 fits a u16.
    match u16::try_from(basis_points) {
        Ok(basis_points) => Ok(basis_points),
        Err(_) => error(
            path,
            format!("must be between 0 and 100, got {}", number.shown()),
        ),
    }
}

// -------------------------------------------------------------- the config

pub(super) fn config(raw: raw::Config) -> Result<Config> {
    let steering_header = match raw.steering_header.0 {
        Some(Text(name)) => header_name(&name, "steering_header", false)?,
        None => DEFAULT_STEERING_HEADER.to_string(),
    };
    let List(items) = required(raw.services, "", "services")?;
    if items.is_empty() {
        return error("services", "must list at least one service");
    }
    if items.len() > usize::from(u16::MAX) {
        return error("services", "too many services");
    }
    let mut services: Vec<Service> = Vec::with_capacity(items.len());
    for (index, Obj(item)) in items.into_iter().enumerate() {
        let path = format!("services[{index}]");
        let service = service(item, &path)?;
        if services.iter().any(|other| other.name == service.name) {
            return error(
                &join(&path, "name"),
                format!("duplicate service name {}", quote(&service.name)),
            );
        }
        services.push(service);
    }
    for (index, service) in services.iter().enumerate() {
        if service
            .rules
            .iter()
            .any(|rule| rule_reads_header(rule, &steering_header))
            || service.sticky == Some(StickyKey::Header(steering_header.clone()))
        {
            return error(
                &format!("services[{index}]"),
                format!(
                    "reads the steering header {}, which the filter removes from every request",
                    quote(&steering_header)
                ),
            );
        }
    }
    Ok(Config {
        steering_header,
        services,
    })
}

fn rule_reads_header(rule: &Rule, header: &str) -> bool {
    matches!(&rule.matcher, RuleMatch::Header { name, .. } if name == header)
}

fn service(raw: raw::Service, path: &str) -> Result<Service> {
    let Text(name) = required(raw.name, path, "name")?;
    let name = service_name(&name, &join(path, "name"))?;
    let matcher = match raw.matcher.0 {
        Some(Obj(matcher)) => service_match(matcher, &join(path, "match"))?,
        None => ServiceMatch::default(),
    };
    let Text(stable) = required(raw.stable, path, "stable")?;
    let stable = cluster_name(&stable, &join(path, "stable"))?;
    let canary = match raw.canary.0 {
        Some(Text(canary)) => {
            let canary_path = join(path, "canary");
            let canary = cluster_name(&canary, &canary_path)?;
            if canary == stable {
                return error(&canary_path, "must differ from stable");
            }
            Some(canary)
        }
        None => None,
    };
    let stable_by_default = raw.stable_by_default.0.is_some_and(|Flag(flag)| flag);
    let has_weight = raw.weight.0.is_some();
    let weight_path = join(path, "weight");
    let weight_bp = match raw.weight.0 {
        Some(number) => weight(number, &weight_path)?,
        None => 0,
    };
    if weight_bp > 0 && canary.is_none() {
        return error(&weight_path, "needs a canary cluster to send traffic to");
    }
    let sticky = match raw.sticky.0 {
        Some(Obj(sticky)) => Some(sticky_key(sticky, &join(path, "sticky"))?),
        None => None,
    };
    let rules_path = join(path, "rules");
    let rules = match raw.rules.0 {
        Some(List(items)) => {
            if items.len() > 1000 {
                return error(&rules_path, "too many rules (at most 1000)");
            }
            items
                .into_iter()
                .enumerate()
                .map(|(index, Obj(item))| {
                    rule(item, &format!("{rules_path}[{index}]"), canary.is_some())
                })
                .collect::<Result<Vec<Rule>>>()?
        }
        None => Vec::new(),
    };
    let retry = match raw.retry.0 {
        Some(Obj(retry)) => Some(policies::retry(retry, &join(path, "retry"))?),
        None => None,
    };
    let breaker = match raw.breaker.0 {
        Some(Obj(breaker)) => Some(policies::breaker(breaker, &join(path, "breaker"))?),
        None => None,
    };
    let failures = match raw.failures.0 {
        Some(Obj(failures)) => policies::failures(failures, &join(path, "failures"))?,
        None => Failures::default(),
    };
    let rollout = match raw.rollout.0 {
        Some(Obj(rollout)) => {
            let rollout_path = join(path, "rollout");
            if has_weight {
                return error(
                    &rollout_path,
                    "a service has either \"weight\" or \"rollout\", not both",
                );
            }
            if canary.is_none() {
                return error(&rollout_path, "needs a canary cluster to roll out");
            }
            Some(policies::rollout(rollout, &rollout_path)?)
        }
        None => None,
    };
    let attempt_count_in_response = raw
        .attempt_count_in_response
        .0
        .is_some_and(|Flag(flag)| flag);
    Ok(Service {
        name,
        matcher,
        stable,
        canary,
        stable_by_default,
        weight_bp,
        sticky,
        rules,
        retry,
        breaker,
        rollout,
        failures,
        attempt_count_in_response,
    })
}

/// A string, or a non-empty list of strings, each with its path (the key's
/// for a single string, `key[i]` for a list item).
fn one_or_many(strings: Strings, path: &str) -> Result<Vec<(String, String)>> {
    match strings {
        Strings::One(text) => Ok(vec![(path.to_string(), text)]),
        Strings::Many(items) if items.is_empty() => error(path, "must not be an empty list"),
        Strings::Many(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(index, Text(text))| (format!("{path}[{index}]"), text))
            .collect()),
    }
}

fn service_match(raw: raw::Match, path: &str) -> Result<ServiceMatch> {
    let authorities = match raw.authority.0 {
        Some(names) => one_or_many(names, &join(path, "authority"))?
            .iter()
            .map(|(path, name)| host_pattern(path, name))
            .collect::<Result<Vec<HostPattern>>>()?,
        None => Vec::new(),
    };
    let path_prefix = match raw.path_prefix.0 {
        Some(Text(prefix)) => {
            if !prefix.starts_with('/') {
                return error(
                    &join(path, "path_prefix"),
                    format!("must start with \"/\", got {}", quote(&prefix)),
                );
            }
            Some(prefix)
        }
        None => None,
    };
    Ok(ServiceMatch {
        authorities,
        path_prefix,
    })
}

fn host_pattern(path: &str, name: &str) -> Result<HostPattern> {
    let lower = name.to_ascii_lowercase();
    if lower == "*" {
        return Ok(HostPattern::Any);
    }
    let (wildcard, host) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2 && !wildcard;
    let valid_chars = if bracketed {
        host.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.' || b == b'[' || b == b']')
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    // Every label non-empty: no leading, doubled or (after the one
    // stripped above) trailing dot.
    let empty_label = host.split('.').any(str::is_empty);
    if host.is_empty() || host.len() > 253 || !valid_chars || empty_label {
        let hint = if !bracketed && host.contains(':') {
            " (the port is ignored: name the host alone)"
        } else if host.contains('*') {
            " (a wildcard is allowed only as a leading \"*.\")"
        } else {
            ""
        };
        return error(path, format!("{} is not a host name{hint}", quote(name)));
    }
    Ok(if wildcard {
        HostPattern::Suffix(format!(".{host}"))
    } else {
        HostPattern::Exact(host.to_string())
    })
}

fn sticky_key(raw: raw::Sticky, path: &str) -> Result<StickyKey> {
    match (raw.header.0, raw.cookie.0) {
        (Some(Text(header)), None) => Ok(StickyKey::Header(header_name(
            &header,
            &join(path, "header"),
            true,
        )?)),
        (None, Some(Text(cookie))) => Ok(StickyKey::Cookie(cookie_name(
            &cookie,
            &join(path, "cookie"),
        )?)),
        _ => error(path, "needs exactly one of \"header\" or \"cookie\""),
    }
}

fn rule(raw: raw::Rule, path: &str, has_canary: bool) -> Result<Rule> {
    let matcher = match (raw.header.0, raw.cookie.0, raw.device.0) {
        (Some(Text(header)), None, None) => RuleMatch::Header {
            name: header_name(&header, &join(path, "header"), true)?,
            test: value_test(raw.equals, raw.prefix, raw.contains, raw.present, path)?,
        },
        (None, Some(Text(cookie)), None) => RuleMatch::Cookie {
            name: cookie_name(&cookie, &join(path, "cookie"))?,
            test: value_test(raw.equals, raw.prefix, raw.contains, raw.present, path)?,
        },
        (None, None, Some(Text(device))) => {
            let tests = [
                ("equals", raw.equals.0.is_some()),
                ("prefix", raw.prefix.0.is_some()),
                ("contains", raw.contains.0.is_some()),
                ("present", raw.present.0.is_some()),
            ];
            if let Some((key, _)) = tests.iter().find(|(_, given)| *given) {
                return error(
                    &join(path, key),
                    "a \"device\" rule takes no test (the device class is the test)",
                );
            }
            RuleMatch::Device(device_class(&device, &join(path, "device"))?)
        }
        _ => {
            return error(
                path,
                "needs exactly one matcher: \"header\", \"cookie\" or \"device\"",
            )
        }
    };
    let action = match (raw.to.0, raw.weight.0) {
        (Some(Text(to)), None) => {
            let to_path = join(path, "to");
            let side = match to.as_str() {
                "canary" => Side::Canary,
                "stable" => Side::Stable,
                _ => {
                    return error(
                        &to_path,
                        format!("must be \"canary\" or \"stable\", got {}", quote(&to)),
                    )
                }
            };
            if side == Side::Canary && !has_canary {
                return error(&to_path, "the service has no canary cluster");
            }
            RuleAction::To(side)
        }
        (None, Some(number)) => {
            let weight_path = join(path, "weight");
            let weight_bp = weight(number, &weight_path)?;
            if weight_bp > 0 && !has_canary {
                return error(&weight_path, "the service has no canary cluster");
            }
            RuleAction::Weight(weight_bp)
        }
        _ => return error(path, "needs exactly one action: \"to\" or \"weight\""),
    };
    Ok(Rule { matcher, action })
}

/// Exactly one of `equals`, `prefix`, `contains`, `present`.
fn value_test(
    equals: Opt<Strings>,
    prefix: Opt<Strings>,
    contains: Opt<Strings>,
    present: Opt<Flag>,
    path: &str,
) -> Result<ValueTest> {
    let values = |strings: Strings, key: &str| -> Result<Vec<Vec<u8>>> {
        Ok(one_or_many(strings, &join(path, key))?
            .into_iter()
            .map(|(_, text)| text.into_bytes())
            .collect())
    };
    match (equals.0, prefix.0, contains.0, present.0) {
        (Some(strings), None, None, None) => Ok(ValueTest::Equals(values(strings, "equals")?)),
        (None, Some(strings), None, None) => Ok(ValueTest::Prefix(values(strings, "prefix")?)),
        (None, None, Some(strings), None) => {
            let needles = values(strings, "contains")?;
            if needles.iter().any(Vec::is_empty) {
                return error(
                    &join(path, "contains"),
                    "an empty string would match every value; use \"present\": true",
                );
            }
            Ok(ValueTest::Contains(needles))
        }
        (None, None, None, Some(Flag(present))) => Ok(ValueTest::Present(present)),
        _ => error(
            path,
            "needs exactly one test: \"equals\", \"prefix\", \"contains\" or \"present\"",
        ),
    }
}

fn device_class(name: &str, path: &str) -> Result<DeviceClass> {
    match name {
        "mobile" => Ok(DeviceClass::Mobile),
        "tablet" => Ok(DeviceClass::Tablet),
        "desktop" => Ok(DeviceClass::Desktop),
        "bot" => Ok(DeviceClass::Bot),
        _ => error(
            path,
            format!(
                "must be one of \"mobile\", \"tablet\", \"desktop\", \"bot\", got {}",
                quote(name)
            ),
        ),
    }
}

// ------------------------------------------------------------------ names

/// A byte of an HTTP token (RFC 9110): header and cookie names.
pub(super) fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn non_empty<'t>(text: &'t str, path: &str) -> Result<&'t str> {
    if text.is_empty() {
        return error(path, "must not be empty");
    }
    Ok(text)
}

/// An HTTP header name, lower-cased as Envoy stores them; a pseudo-header
/// (`:path`) only where `allow_pseudo`.
pub(super) fn header_name(name: &str, path: &str, allow_pseudo: bool) -> Result<String> {
    let name = non_empty(name, path)?;
    let body = match name.strip_prefix(':') {
        Some(rest) if allow_pseudo => rest,
        Some(_) => return error(path, "must not be a pseudo-header"),
        None => name,
    };
    if body.is_empty() || name.len() > 256 || !body.bytes().all(is_token_byte) {
        return error(path, format!("{} is not a valid header name", quote(name)));
    }
    Ok(name.to_ascii_lowercase())
}

fn cookie_name(name: &str, path: &str) -> Result<String> {
    let name = non_empty(name, path)?;
    if name.len() > 256 || !name.bytes().all(is_token_byte) {
        return error(path, format!("{} is not a valid cookie name", quote(name)));
    }
    Ok(name.to_string())
}

/// Service names appear in metric names, so they keep to a safe alphabet.
fn service_name(name: &str, path: &str) -> Result<String> {
    let name = non_empty(name, path)?;
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return error(
            path,
            format!(
                "{} must be 1 to 64 letters, digits, '_' or '-' (it names metrics)",
                quote(name)
            ),
        );
    }
    Ok(name.to_string())
}

/// Cluster names are written into a request header, so they must be a valid
/// header value; Envoy's own names never need more than visible ASCII.
fn cluster_name(name: &str, path: &str) -> Result<String> {
    let name = non_empty(name, path)?;
    if name.len() > 256 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return error(
            path,
            format!(
                "{} is not a cluster name (visible ASCII, no spaces)",
                quote(name)
            ),
        );
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_json_and_bounded() {
        assert_eq!(
            quote("a\"b\\c\nd\u{1b}\u{7f}é"),
            "\"a\\\"b\\\\c\\nd\\u001b\u{7f}é\""
        );
        let long = "é".repeat(100);
        let quoted = quote(&long);
        assert!(
            quoted.len() <= SHOW_MAX && quoted.ends_with("..."),
            "{quoted}"
        );
        assert!(quoted.starts_with("\"éé"));
    }

    #[test]
    fn numbers_are_shown_as_written_or_with_an_exponent() {
        assert_eq!(Num::Int(150).shown(), "150");
        assert_eq!(Num::Neg(-1).shown(), "-1");
        assert_eq!(Num::Float(12.345).shown(), "12.345");
        assert_eq!(Num::Float(0.1 + 0.2).shown(), "0.30000000000000004");
        assert_eq!(Num::Float(-0.0).shown(), "-0");
        assert_eq!(Num::Float(1e300).shown(), "1e300");
        assert_eq!(Num::Float(1e-30).shown(), "1e-30");
        assert_eq!(
            Num::Float(f64::MIN_POSITIVE).shown(),
            "2.2250738585072014e-308"
        );
    }

    #[test]
    fn doubles_are_read_as_their_shortest_decimal() {
        let ppm = |value: f64| fixed_in(Num::Float(value), "x", 6, 0, 1_000_000);
        assert_eq!(ppm(0.1).map(|fixed| fixed.units), Ok(100_000));
        assert_eq!(ppm(0.0000005).map(Fixed::rounded), Ok(1));
        assert_eq!(ppm(0.00000049).map(Fixed::rounded), Ok(0));
        assert_eq!(ppm(1e-30).map(Fixed::is_zero), Ok(false));
        assert_eq!(ppm(-0.0).map(Fixed::is_zero), Ok(true));
        assert!(ppm(-1e-30).is_err());
    }

    #[test]
    fn whole_numbers_may_be_written_as_doubles() {
        let whole = |number| whole_in(number, "n", 0, 10).map_err(|err| err.to_string());
        assert_eq!(whole(Num::Int(10)), Ok(10));
        assert_eq!(whole(Num::Float(10.0)), Ok(10));
        assert_eq!(whole(Num::Float(1e1)), Ok(10));
        assert_eq!(whole(Num::Float(-0.0)), Ok(0));
        assert_eq!(
            whole(Num::Int(11)),
            Err("n: must be between 0 and 10, got 11".into())
        );
        assert_eq!(
            whole(Num::Float(1e300)),
            Err("n: must be between 0 and 10, got 1e300".into())
        );
        for (number, shown) in [
            (Num::Float(1.5), "1.5"),
            (Num::Float(10.000001), "10.000001"),
            (Num::Neg(-1), "-1"),
            (Num::Float(-1.0), "-1"),
            (Num::Float(1e-300), "1e-300"),
        ] {
            assert_eq!(
                whole(number),
                Err(format!(
                    "n: must be a whole number between 0 and 10, got {shown}"
                ))
            );
        }
        assert_eq!(whole_in(Num::Int(u64::MAX), "n", 0, u64::MAX), Ok(u64::MAX));
    }
}
