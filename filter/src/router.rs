//! The routing decision: which service a request belongs to, and which side
//! (stable or canary) it goes to.
//!
//! Built once per configuration. Finding the service is a hash lookup on the
//! host (plus one lookup per label for `*.` wildcards), not a scan of the
//! services, so the cost does not grow with the size of the config. Rules are
//! evaluated in order; the first that matches decides.

use crate::codec::{FNV_OFFSET, FNV_PRIME};
use crate::config::{
    Config, HostPattern, Rule, RuleAction, RuleMatch, Service, Side, StickyKey, ValueTest,
};
use crate::device::{classify, DeviceClass};
use crate::sticky;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a for the host tables. The tables are built from the config; a
/// request only looks up, so no client can fill a bucket (the reason for
/// a keyed hash), and a fixed hash is faster on short names and keeps
/// SipHash and its random keys out of the module.
#[derive(Debug, Default)]
pub struct HostHasher(u64);

impl Hasher for HostHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 { FNV_OFFSET } else { self.0 };
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
        }
        self.0 = hash;
    }
}

type HostTable = HashMap<Box<[u8]>, Vec<usize>, BuildHasherDefault<HostHasher>>;

/// Hosts longer than a DNS name can be are not looked up label by label.
const MAX_HOST_LEN: usize = 253;

/// Request headers as the router reads them. The engine's implementation
/// looks them up in the one buffer of every request header it read from the
/// host (`pairs::HeaderPairs`), so a rule costs no host call.
pub trait RequestHeaders {
    /// The first value of a header (lower-case name), if present.
    fn header(&mut self, name: &str) -> Option<&[u8]>;
}

/// What the router decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// No service matched: the filter leaves the request alone.
    Unmatched,
    Routed {
        service: usize,
        side: Side,
        /// Index of the rule that decided, if any.
        rule: Option<usize>,
    },
}

/// A compiled configuration.
#[derive(Debug)]
pub struct Router {
    config: Config,
    exact_hosts: HostTable,
    wildcard_suffixes: HostTable,
    any_host: Vec<usize>,
}

impl Router {
    pub fn new(config: Config) -> Self {
        let mut exact_hosts = HostTable::default();
        let mut wildcard_suffixes = HostTable::default();
        let mut any_host = Vec::new();
        for (index, service) in config.services.iter().enumerate() {
            let patterns = &service.matcher.authorities;
            if patterns.is_empty() || patterns.contains(&HostPattern::Any) {
                any_host.push(index);
                continue;
            }
            for pattern in patterns {
                let (table, key) = match pattern {
                    HostPattern::Exact(host) => (&mut exact_hosts, host),
                    HostPattern::Suffix(suffix) => (&mut wildcard_suffixes, suffix),
                    HostPattern::Any => continue,
                };
                let entry = table.entry(key.as_bytes().into()).or_default();
                // Indices are pushed in config order, so each list stays sorted.
                if entry.last() != Some(&index) {
                    entry.push(index);
                }
            }
        }
        Router {
            config,
            exact_hosts,
            wildcard_suffixes,
            any_host,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn services(&self) -> &[Service] {
        &self.config.services
    }

    /// Finds the first service (in config order) whose match fits.
    pub fn find_service(&self, authority: Option<&[u8]>, path: Option<&[u8]>) -> Option<usize> {
        let path = path.unwrap_or(b"/");
        let mut best: Option<usize> = None;
        let mut consider = |candidates: &[usize]| {
            let limit = best.unwrap_or(usize::MAX);
            if let Some(&index) = candidates
                .iter()
                .take_while(|&&index| index < limit)
                .find(|&&index| self.path_fits(index, path))
            {
                best = Some(index);
            }
        };
        consider(&self.any_host);
        let mut host_buffer = [0u8; MAX_HOST_LEN];
        if let Some(host) = authority.and_then(|raw| normalize_host(raw, &mut host_buffer)) {
            if let Some(candidates) = self.exact_hosts.get(host) {
                consider(candidates);
            }
            if !self.wildcard_suffixes.is_empty() {
                // Every suffix that starts at a dot: a.b.example.com tries
                // .b.example.com, .example.com, .com.
                for (position, &byte) in host.iter().enumerate() {
                    if byte == b'.' {
                        if let Some(candidates) = host
                            .get(position..)
                            .and_then(|suffix| self.wildcard_suffixes.get(suffix))
                        {
                            consider(candidates);
                        }
                    }
                }
            }
        }
        best
    }

    fn path_fits(&self, index: usize, path: &[u8]) -> bool {
        match self
            .config
            .services
            .get(index)
            .and_then(|service| service.matcher.path_prefix.as_deref())
        {
            Some(prefix) => path.starts_with(prefix.as_bytes()),
            None => true,
        }
    }

    /// Decides where a request goes.
    ///
    /// `weight_bp` is the service's current canary weight (the configured
    /// one, or the rollout's). `cohort_weights` is false when percentage
    /// traffic has been withdrawn from the canary (a rolled-back rollout):
    /// cohort `weight` rules then send nobody to canary, while explicit
    /// `to: canary` rules still do, so engineers can reach the canary they
    /// are debugging. `random` is a fresh random word, used when the request
    /// carries no sticky key.
    pub fn decide(
        &self,
        service_index: usize,
        weight_bp: u16,
        cohort_weights: bool,
        request: &mut impl RequestHeaders,
        random: u64,
    ) -> Decision {
        let Some(service) = self.config.services.get(service_index) else {
            return Decision::Unmatched;
        };
        let mut device: Option<DeviceClass> = None;
        let mut chosen_weight = weight_bp;
        let mut deciding_rule = None;
        for (index, rule) in service.rules.iter().enumerate() {
            if rule_matches(rule, request, &mut device) {
                deciding_rule = Some(index);
                match rule.action {
                    RuleAction::To(side) => {
                        return Decision::Routed {
                            service: service_index,
                            side: if service.canary.is_some() {
                                side
                            } else {
                                Side::Stable
                            },
                            rule: deciding_rule,
                        }
                    }
                    RuleAction::Weight(weight) => {
                        chosen_weight = if cohort_weights { weight } else { 0 }
                    }
                }
                break;
            }
        }
        // Full weight needs no key: every bucket is below it.
        let side = if service.canary.is_none() || chosen_weight == 0 {
            Side::Stable
        } else if chosen_weight >= crate::config::FULL_WEIGHT
            || sticky_bucket(service, request, random) < chosen_weight
        {
            Side::Canary
        } else {
            Side::Stable
        };
        Decision::Routed {
            service: service_index,
            side,
            rule: deciding_rule,
        }
    }
}

/// The request's bucket: from its sticky key when it has one, else random.
fn sticky_bucket(service: &Service, request: &mut impl RequestHeaders, random: u64) -> u16 {
    let salt = service.name.as_bytes();
    let keyed = match &service.sticky {
        Some(StickyKey::Header(name)) => request
            .header(name)
            .filter(|key| !key.is_empty())
            .map(|key| sticky::bucket(salt, key)),
        Some(StickyKey::Cookie(name)) => request
            .header("cookie")
            .and_then(|cookies| cookie_value(cookies, name.as_bytes()))
            .filter(|key| !key.is_empty())
            .map(|key| sticky::bucket(salt, key)),
        None => None,
    };
    keyed.unwrap_or_else(|| sticky::random_bucket(random))
}

fn rule_matches(
    rule: &Rule,
    request: &mut impl RequestHeaders,
    device: &mut Option<DeviceClass>,
) -> bool {
    match &rule.matcher {
        RuleMatch::Header { name, test } => value_matches(test, request.header(name)),
        RuleMatch::Cookie { name, test } => {
            let value = request
                .header("cookie")
                .and_then(|cookies| cookie_value(cookies, name.as_bytes()));
            value_matches(test, value)
        }
        RuleMatch::Device(class) => {
            let found = *device.get_or_insert_with(|| classify(request.header("user-agent")));
            found == *class
        }
    }
}

fn value_matches(test: &ValueTest, value: Option<&[u8]>) -> bool {
    match (test, value) {
        (ValueTest::Present(wanted), value) => value.is_some() == *wanted,
        (_, None) => false,
        (ValueTest::Equals(options), Some(value)) => options.iter().any(|option| option == value),
        (ValueTest::Prefix(options), Some(value)) => {
            options.iter().any(|option| value.starts_with(option))
        }
        (ValueTest::Contains(options), Some(value)) => options.iter().any(|option| {
            value
                .windows(option.len())
                .any(|window| window == option.as_slice())
        }),
    }
}

/// The value of cookie `name` in a `Cookie` header (`a=1; b=2`), the first
/// if repeated. Values may be quoted (RFC 6265); the quotes are removed.
pub fn cookie_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&byte| byte == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let equals = pair.iter().position(|&byte| byte == b'=')?;
        let (key, value) = (pair.get(..equals)?, pair.get(equals + 1..)?);
        if key.trim_ascii() != name {
            return None;
        }
        let value = value.trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|inner| inner.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// Lower-cases the host of an authority into `buffer`, without port or
/// trailing dot. Returns `None` for hosts no pattern could match.
fn normalize_host<'b>(authority: &[u8], buffer: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b [u8]> {
    let host = if authority.first() == Some(&b'[') {
        // [v6]:port keeps the brackets, as configs write them.
        let end = authority.iter().position(|&byte| byte == b']')?;
        authority.get(..=end)?
    } else {
        match authority.iter().position(|&byte| byte == b':') {
            Some(colon) => authority.get(..colon)?,
            None => authority,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return None;
    }
    let out = buffer.get_mut(..host.len())?;
    for (slot, &byte) in out.iter_mut().zip(host) {
        *slot = byte.to_ascii_lowercase();
    }
    Some(out)
}
