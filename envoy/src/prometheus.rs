//! Reading Envoy's `/stats/prometheus` (the Prometheus text exposition
//! format) and the PromQL of a Grafana dashboard, for the tests of Sluice's
//! metrics as labels (`envoy/tests/prometheus.rs`).
//!
//! * [`parse`]: samples (`name{label="value",...} value`) and `# TYPE` lines.
//! * [`promql_refs`]: the metric names and label names a PromQL expression
//!   uses, so that a dashboard can be checked against what Envoy exports.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The label's value, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A parsed exposition: every sample, and each metric family's type.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    /// `# TYPE <name> <type>`: family name to `counter`, `gauge`, ...
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Samples of metric `name`.
    pub fn family<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the sample of `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.family(name)
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// Every metric name that has a sample.
    pub fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }
}

/// Parses the text format. Lines that are neither comments nor samples are
/// an error (the harness wants to know when Envoy's output changes shape).
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if words.next() == Some("TYPE") {
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    out.types.insert(name.to_string(), kind.to_string());
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| format!("line {}: {e}: {line}", number + 1))?;
        out.samples.push(sample);
    }
    Ok(out)
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let consumed = loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => break i + 1,
                None => return Err("unterminated labels".into()),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key}: value not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => return Err("dangling escape".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(format!("label {key}: unterminated value"));
            }
            labels.insert(key.trim().to_string(), value);
        };
        rest = &after[consumed..];
    }
    let value_text = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|e| format!("value {v}: {e}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// What a PromQL expression refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromqlRefs {
    /// Metric names (identifiers that are not functions, keywords or labels).
    pub metrics: BTreeSet<String>,
    /// Label names in selectors (`{name="..."}`) and in `by`/`without`/`on`/
    /// `ignoring`/`group_left`/`group_right` lists.
    pub labels: BTreeSet<String>,
}

/// PromQL keywords and aggregation operators that may stand without
/// parentheses right after them (`sum by (x) (...)`, `a and b`).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "inf",
    "nan",
];

/// The metric and label names `expr` uses. Grafana's `$variables` (and
/// `${variables}`) are skipped, as are string literals, numbers, durations
/// in `[...]`, and function names (an identifier followed by `(`).
pub fn promql_refs(expr: &str) -> PromqlRefs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = PromqlRefs::default();
    let mut i = 0;
    // After by/without/on/...: the next parenthesised list holds labels.
    let mut label_list_next = false;
    let mut in_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // A selector: label names stand before =, !=, =~, !~.
            i += 1;
            while i < chars.len() && chars[i] != '}' {
                if chars[i] == '"' || chars[i] == '\'' || chars[i] == '`' {
                    i = skip_string(&chars, i);
                } else if is_ident_start(chars[i]) {
                    let start = i;
                    while i < chars.len() && is_ident_char(chars[i]) {
                        i += 1;
                    }
                    refs.labels.insert(chars[start..i].iter().collect());
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if c == '(' {
            if label_list_next {
                in_label_list = true;
                label_list_next = false;
            }
            i += 1;
        } else if c == ')' {
            in_label_list = false;
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (is_ident_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            if in_label_list {
                refs.labels.insert(word);
            } else if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                label_list_next = true;
            } else if chars.get(next) == Some(&'(')
                || KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
            {
                // A function, an aggregation or a keyword.
            } else {
                refs.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    refs
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_labels_and_types() {
        let text = "# TYPE sluice_routed counter\n\
                    sluice_routed{sluice_service=\"shop\",sluice_side=\"canary\"} 12\n\
                    sluice_unmatched 3\n\
                    # TYPE envoy_x histogram\n\
                    envoy_x_bucket{le=\"+Inf\",a=\"q\\\"uote\"} 1.5e3\n";
        let e = parse(text).unwrap();
        assert_eq!(e.samples.len(), 3);
        assert_eq!(
            e.value(
                "sluice_routed",
                &[("sluice_service", "shop"), ("sluice_side", "canary")]
            ),
            Some(12.0)
        );
        assert_eq!(e.value("sluice_unmatched", &[]), Some(3.0));
        assert_eq!(e.samples[2].label("a"), Some("q\"uote"));
        assert_eq!(e.samples[2].value, 1500.0);
        assert_eq!(
            e.types.get("sluice_routed").map(String::as_str),
            Some("counter")
        );
        assert!(parse("sluice_routed{sluice_service=\"shop\" 1\n").is_err());
    }

    #[test]
    fn finds_metrics_and_labels_in_promql() {
        let r = promql_refs(
            "sum by (sluice_service, sluice_side) (rate(sluice_routed{sluice_service=~\"$service\"}[$__rate_interval]))",
        );
        assert_eq!(r.metrics, BTreeSet::from(["sluice_routed".to_string()]));
        assert_eq!(
            r.labels,
            BTreeSet::from(["sluice_service".to_string(), "sluice_side".to_string()])
        );
        let r = promql_refs(
            "100 * sum(rate(sluice_routed{sluice_side=\"canary\"}[5m])) / clamp_min(sum(rate(sluice_routed[5m])), 1) \
             or max without (instance) (sluice_rollout_weight_bp) / 100 > bool 0.5e1",
        );
        assert_eq!(
            r.metrics,
            BTreeSet::from([
                "sluice_routed".to_string(),
                "sluice_rollout_weight_bp".to_string()
            ])
        );
        assert_eq!(
            r.labels,
            BTreeSet::from(["sluice_side".to_string(), "instance".to_string()])
        );
        let r = promql_refs("max(sluice_breaker_state) by (sluice_service)");
        assert_eq!(
            r.metrics,
            BTreeSet::from(["sluice_breaker_state".to_string()])
        );
        assert_eq!(r.labels, BTreeSet::from(["sluice_service".to_string()]));
    }
}
