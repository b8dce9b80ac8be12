//! The plugin configuration: parsed and validated once, in `on_configure`.
//!
//! Everything a request needs is prepared here (lower-cased header names,
//! weights in basis points, host tables) so that the request path does no
//! parsing. Any problem refuses the whole document with one line naming the
//! JSON path and the reason; nothing is half-applied.

use crate::breaker::{self, BreakerConfig};
use crate::device::DeviceClass;
use crate::json::{self, error, quote, ConfigError, Node, Obj, Result, Value};
use crate::retry::{self, RetryPolicy};
use crate::rollout::{self, RolloutConfig};

/// Default header the filter writes the chosen cluster into.
pub const DEFAULT_STEERING_HEADER: &str = "x-sluice-cluster";

/// Weights are stored in basis points: 10_000 = 100 %, resolution 0.01 %.
pub const FULL_WEIGHT: u16 = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub steering_header: String,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub matcher: ServiceMatch,
    pub stable: String,
    pub canary: Option<String>,
    /// Canary share in basis points (0..=10_000).
    pub weight_bp: u16,
    pub sticky: Option<StickyKey>,
    pub rules: Vec<Rule>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<BreakerConfig>,
    pub rollout: Option<RolloutConfig>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceMatch {
    /// Empty means any authority.
    pub authorities: Vec<HostPattern>,
    pub path_prefix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `shop.local`, stored lower-case.
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`, lower-case.
    Suffix(String),
    /// `*`: any host.
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// Lower-cased header name.
    Header(String),
    Cookie(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Stable,
    Canary,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matcher: RuleMatch,
    pub action: RuleAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleMatch {
    Header { name: String, test: ValueTest },
    Cookie { name: String, test: ValueTest },
    Device(DeviceClass),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValueTest {
    Equals(Vec<Vec<u8>>),
    Prefix(Vec<Vec<u8>>),
    Contains(Vec<Vec<u8>>),
    /// `present: true` matches when the header or cookie exists (any value);
    /// `present: false` when it does not.
    Present(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    To(Side),
    /// This cohort's own canary share, in basis points, still sticky.
    Weight(u16),
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Config, ConfigError> {
        let document = json::parse(bytes)?;
        parse_config(&Node::root(&document))
    }

    /// One line summarising the config, logged when it is applied.
    pub fn summary(&self) -> String {
        let services: Vec<String> = self
            .services
            .iter()
            .map(|service| {
                let canary = match &service.canary {
                    Some(canary) => format!(
                        " canary={canary} weight={}%",
                        format_weight(service.weight_bp)
                    ),
                    None => String::new(),
                };
                format!(
                    "{} (stable={}{canary}, {} rules)",
                    service.name,
                    service.stable,
                    service.rules.len()
                )
            })
            .collect();
        format!(
            "{} services via header {}: {}",
            self.services.len(),
            self.steering_header,
            services.join("; ")
        )
    }
}

impl Service {
    /// The cluster for a side; a service without a canary always uses stable.
    pub fn cluster(&self, side: Side) -> &str {
        match (side, &self.canary) {
            (Side::Canary, Some(canary)) => canary,
            _ => &self.stable,
        }
    }
}

/// `1050` basis points → `10.5`.
pub fn format_weight(weight_bp: u16) -> String {
    let whole = weight_bp / 100;
    let fraction = weight_bp % 100;
    if fraction == 0 {
        format!("{whole}")
    } else if fraction.is_multiple_of(10) {
        format!("{whole}.{}", fraction / 10)
    } else {
        format!("{whole}.{fraction:02}")
    }
}

fn parse_config(root: &Node) -> Result<Config> {
    let mut object = root.object()?;
    let steering_header = match object.optional("steering_header") {
        Some(node) => header_name(&node, false)?,
        None => DEFAULT_STEERING_HEADER.to_string(),
    };
    let services_node = object.required("services")?;
    let service_nodes = services_node.list()?;
    if service_nodes.is_empty() {
        return services_node.fail("must list at least one service");
    }
    let mut services: Vec<Service> = Vec::with_capacity(service_nodes.len());
    for node in &service_nodes {
        let service = parse_service(node)?;
        if services.iter().any(|other| other.name == service.name) {
            return error(
                &format!("{}.name", node.path),
                format!("duplicate service name {:?}", service.name),
            );
        }
        services.push(service);
    }
    if services.len() > usize::from(u16::MAX) {
        return services_node.fail("too many services");
    }
    object.finish()?;
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
                    "reads the steering header {steering_header:?}, which the filter removes from every request"
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

fn parse_service(node: &Node) -> Result<Service> {
    let mut object = node.object()?;
    let name = service_name(&object.required("name")?)?;
    let matcher = match object.optional("match") {
        Some(node) => parse_match(&node)?,
        None => ServiceMatch::default(),
    };
    let stable = cluster_name(&object.required("stable")?)?;
    let canary = match object.optional("canary") {
        Some(node) => {
            let canary = cluster_name(&node)?;
            if canary == stable {
                return node.fail("must differ from stable");
            }
            Some(canary)
        }
        None => None,
    };
    let weight_node = object.optional("weight");
    let object_has_weight = weight_node.is_some();
    let weight_bp = match weight_node {
        Some(node) => weight(&node)?,
        None => 0,
    };
    if weight_bp > 0 && canary.is_none() {
        return error(
            &format!("{}.weight", object.path()),
            "needs a canary cluster to send traffic to",
        );
    }
    let sticky = match object.optional("sticky") {
        Some(node) => Some(parse_sticky(&node)?),
        None => None,
    };
    let rules = match object.optional("rules") {
        Some(node) => node
            .list()?
            .iter()
            .map(|rule| parse_rule(rule, canary.is_some()))
            .collect::<Result<Vec<Rule>>>()?,
        None => Vec::new(),
    };
    if rules.len() > 1000 {
        return error(
            &format!("{}.rules", object.path()),
            "too many rules (at most 1000)",
        );
    }
    let retry = match object.optional("retry") {
        Some(node) => Some(retry::parse(&node)?),
        None => None,
    };
    let breaker = match object.optional("breaker") {
        Some(node) => Some(breaker::parse(&node)?),
        None => None,
    };
    let rollout = match object.optional("rollout") {
        Some(node) => {
            if object_has_weight {
                return node.fail("a service has either \"weight\" or \"rollout\", not both");
            }
            if canary.is_none() {
                return node.fail("needs a canary cluster to roll out");
            }
            Some(rollout::parse(&node)?)
        }
        None => None,
    };
    object.finish()?;
    Ok(Service {
        name,
        matcher,
        stable,
        canary,
        weight_bp,
        sticky,
        rules,
        retry,
        breaker,
        rollout,
    })
}

fn parse_match(node: &Node) -> Result<ServiceMatch> {
    let mut object = node.object()?;
    let authorities = match object.optional("authority") {
        Some(node) => {
            let names = node.one_or_many_strings()?;
            let mut patterns = Vec::with_capacity(names.len());
            for (index, name) in names.iter().enumerate() {
                let path = if matches!(node.value, Value::Array(_)) {
                    format!("{}[{index}]", node.path)
                } else {
                    node.path.clone()
                };
                patterns.push(host_pattern(&path, name)?);
            }
            patterns
        }
        None => Vec::new(),
    };
    let path_prefix = match object.optional("path_prefix") {
        Some(node) => {
            let prefix = node.string()?;
            if !prefix.starts_with('/') {
                return node.fail(format!("must start with \"/\", got {}", node.shown()));
            }
            Some(prefix.to_string())
        }
        None => None,
    };
    object.finish()?;
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

fn parse_sticky(node: &Node) -> Result<StickyKey> {
    let mut object = node.object()?;
    let header = object.optional("header");
    let cookie = object.optional("cookie");
    let key = match (header, cookie) {
        (Some(header), None) => StickyKey::Header(header_name(&header, true)?),
        (None, Some(cookie)) => StickyKey::Cookie(cookie_name(&cookie)?),
        _ => return object.fail("needs exactly one of \"header\" or \"cookie\""),
    };
    object.finish()?;
    Ok(key)
}

fn parse_rule(node: &Node, has_canary: bool) -> Result<Rule> {
    let mut object = node.object()?;
    let header = object.optional("header");
    let cookie = object.optional("cookie");
    let device = object.optional("device");
    let matcher = match (header, cookie, device) {
        (Some(header), None, None) => RuleMatch::Header {
            name: header_name(&header, true)?,
            test: parse_value_test(&mut object)?,
        },
        (None, Some(cookie), None) => RuleMatch::Cookie {
            name: cookie_name(&cookie)?,
            test: parse_value_test(&mut object)?,
        },
        (None, None, Some(device)) => RuleMatch::Device(device_class(&device)?),
        _ => return object.fail("needs exactly one matcher: \"header\", \"cookie\" or \"device\""),
    };
    let to = object.optional("to");
    let weight_node = object.optional("weight");
    let action = match (to, weight_node) {
        (Some(to), None) => {
            let side = match to.string()? {
                "canary" => Side::Canary,
                "stable" => Side::Stable,
                _ => {
                    return to.fail(format!(
                        "must be \"canary\" or \"stable\", got {}",
                        to.shown()
                    ))
                }
            };
            if side == Side::Canary && !has_canary {
                return to.fail("the service has no canary cluster");
            }
            RuleAction::To(side)
        }
        (None, Some(weight_node)) => {
            let weight_bp = weight(&weight_node)?;
            if weight_bp > 0 && !has_canary {
                return weight_node.fail("the service has no canary cluster");
            }
            RuleAction::Weight(weight_bp)
        }
        _ => return object.fail("needs exactly one action: \"to\" or \"weight\""),
    };
    object.finish()?;
    Ok(Rule { matcher, action })
}

/// Reads exactly one of `equals`, `prefix`, `contains`, `present`.
fn parse_value_test(object: &mut Obj) -> Result<ValueTest> {
    let equals = object.optional("equals");
    let prefix = object.optional("prefix");
    let contains = object.optional("contains");
    let present = object.optional("present");
    let given = [&equals, &prefix, &contains, &present]
        .iter()
        .filter(|node| node.is_some())
        .count();
    if given != 1 {
        return object
            .fail("needs exactly one test: \"equals\", \"prefix\", \"contains\" or \"present\"");
    }
    let values = |node: &Node| -> Result<Vec<Vec<u8>>> {
        Ok(node
            .one_or_many_strings()?
            .iter()
            .map(|text| text.as_bytes().to_vec())
            .collect())
    };
    if let Some(node) = equals {
        return Ok(ValueTest::Equals(values(&node)?));
    }
    if let Some(node) = prefix {
        return Ok(ValueTest::Prefix(values(&node)?));
    }
    if let Some(node) = contains {
        let needles = values(&node)?;
        if needles.iter().any(Vec::is_empty) {
            return node.fail("an empty string would match every value; use \"present\": true");
        }
        return Ok(ValueTest::Contains(needles));
    }
    match present {
        Some(node) => Ok(ValueTest::Present(node.boolean()?)),
        None => object.fail("needs a test"),
    }
}

fn device_class(node: &Node) -> Result<DeviceClass> {
    match node.string()? {
        "mobile" => Ok(DeviceClass::Mobile),
        "tablet" => Ok(DeviceClass::Tablet),
        "desktop" => Ok(DeviceClass::Desktop),
        "bot" => Ok(DeviceClass::Bot),
        _ => node.fail(format!(
            "must be one of \"mobile\", \"tablet\", \"desktop\", \"bot\", got {}",
            node.shown()
        )),
    }
}

/// A percentage with 0.01 resolution, returned in basis points.
///
/// The decimal is read exactly (exponents too: `1.25e1` is 12.5). Digits
/// beyond the resolution are refused, except float noise: a value within a
/// millionth of a basis point of a multiple (`30.000000000000004`, which a
/// generator's floating-point arithmetic may write) is rounded to it, as the
/// floating-point parser this replaced did.
pub fn weight(node: &Node) -> Result<u16> {
    /// Millionths of a basis point: 10^-8 percent.
    const SCALE: u32 = 8;
    const PER_BP: u64 = 1_000_000;
    let percent = node.fixed_in(SCALE, 0, u64::from(FULL_WEIGHT) * PER_BP)?;
    let (whole, below) = (percent.units / PER_BP, percent.units % PER_BP);
    let basis_points = if below == 0 || (below == 1 && percent.exact().is_some()) {
        whole
    } else if below >= PER_BP - 1 {
        whole + 1
    } else {
        return node.fail(format!("resolution is 0.01 percent, got {}", node.shown()));
    };
    // In range by the check above: 0..=10_000 fits a u16.
    match u16::try_from(basis_points) {
        Ok(basis_points) => Ok(basis_points),
        Err(_) => node.fail(format!("must be between 0 and 100, got {}", node.shown())),
    }
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// An HTTP header name, lower-cased as Envoy stores them.
fn header_name(node: &Node, allow_pseudo: bool) -> Result<String> {
    let name = node.non_empty_string()?;
    let body = match name.strip_prefix(':') {
        Some(rest) if allow_pseudo => rest,
        Some(_) => return node.fail("must not be a pseudo-header"),
        None => name,
    };
    if body.is_empty() || name.len() > 256 || !body.bytes().all(is_token_byte) {
        return node.fail(format!("{} is not a valid header name", quote(name)));
    }
    Ok(name.to_ascii_lowercase())
}

fn cookie_name(node: &Node) -> Result<String> {
    let name = node.non_empty_string()?;
    if name.len() > 256 || !name.bytes().all(is_token_byte) {
        return node.fail(format!("{} is not a valid cookie name", quote(name)));
    }
    Ok(name.to_string())
}

/// Service names appear in metric names, so they keep to a safe alphabet.
fn service_name(node: &Node) -> Result<String> {
    let name = node.non_empty_string()?;
    if name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return node.fail(format!(
            "{} must be 1 to 64 letters, digits, '_' or '-' (it names metrics)",
            quote(name)
        ));
    }
    Ok(name.to_string())
}

/// Cluster names are written into a request header, so they must be a valid
/// header value; Envoy's own names never need more than visible ASCII.
fn cluster_name(node: &Node) -> Result<String> {
    let name = node.non_empty_string()?;
    if name.len() > 256 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return node.fail(format!(
            "{} is not a cluster name (visible ASCII, no spaces)",
            quote(name)
        ));
    }
    Ok(name.to_string())
}
