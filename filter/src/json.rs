//! A small typed reader over `serde_json::Value` that knows where it is.
//!
//! Every configuration error must name the JSON path and the reason in one
//! line (`services[0].weight: must be between 0 and 100, got 150`), and every
//! unknown key must be refused so that a typo cannot pass silently. serde's
//! derive gives neither the path nor a message an operator can act on, so the
//! parser walks the document by hand with these helpers.

use serde_json::{Map, Value};
use std::fmt;

/// A refused configuration: where in the JSON document, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T> = std::result::Result<T, ConfigError>;

pub fn error<T>(path: &str, reason: impl Into<String>) -> Result<T> {
    Err(ConfigError {
        path: path.to_string(),
        reason: reason.into(),
    })
}

/// The JSON type name used in messages (`got a string`).
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A short rendering of a value for messages; bounded so that a hostile
/// config cannot produce a megabyte log line.
fn show(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 80 {
        let mut cut = 77;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// A string quoted for a message, bounded like `show`.
pub fn quote(text: &str) -> String {
    show(&Value::String(text.to_string()))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A field with an owned path (paths are built as the walk descends).
pub struct Node<'a> {
    pub path: String,
    pub value: &'a Value,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            path: String::new(),
            value,
        }
    }

    pub fn fail<T>(&self, reason: impl Into<String>) -> Result<T> {
        error(&self.path, reason)
    }

    fn wrong_type<T>(&self, expected: &str) -> Result<T> {
        self.fail(format!("must be {expected}, got {}", type_name(self.value)))
    }

    pub fn object(&self) -> Result<Obj<'a>> {
        match self.value {
            Value::Object(map) => Ok(Obj {
                path: self.path.clone(),
                map,
                seen: Vec::with_capacity(map.len()),
            }),
            _ => self.wrong_type("an object"),
        }
    }

    pub fn list(&self) -> Result<Vec<Node<'a>>> {
        match self.value {
            Value::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(index, value)| Node {
                    path: format!("{}[{index}]", self.path),
                    value,
                })
                .collect()),
            _ => self.wrong_type("a list"),
        }
    }

    pub fn string(&self) -> Result<&'a str> {
        match self.value {
            Value::String(text) => Ok(text),
            _ => self.wrong_type("a string"),
        }
    }

    /// A string that must not be empty.
    pub fn non_empty_string(&self) -> Result<&'a str> {
        let text = self.string()?;
        if text.is_empty() {
            return self.fail("must not be empty");
        }
        Ok(text)
    }

    pub fn boolean(&self) -> Result<bool> {
        match self.value {
            Value::Bool(flag) => Ok(*flag),
            _ => self.wrong_type("true or false"),
        }
    }

    pub fn number(&self) -> Result<f64> {
        match self.value.as_f64() {
            Some(number) if number.is_finite() => Ok(number),
            _ => self.wrong_type("a number"),
        }
    }

    /// A number within `[min, max]`.
    pub fn number_in(&self, min: f64, max: f64) -> Result<f64> {
        let number = self.number()?;
        if number < min || number > max {
            return self.fail(format!(
                "must be between {min} and {max}, got {}",
                show(self.value)
            ));
        }
        Ok(number)
    }

    /// A whole number within `[min, max]`.
    pub fn integer_in(&self, min: u64, max: u64) -> Result<u64> {
        let Some(number) = self.value.as_u64() else {
            if self.value.is_number() {
                return self.fail(format!(
                    "must be a whole number between {min} and {max}, got {}",
                    show(self.value)
                ));
            }
            return self.wrong_type("a whole number");
        };
        if number < min || number > max {
            return self.fail(format!("must be between {min} and {max}, got {number}"));
        }
        Ok(number)
    }

    /// A string, or a non-empty list of strings meaning "any of these".
    pub fn one_or_many_strings(&self) -> Result<Vec<&'a str>> {
        match self.value {
            Value::String(text) => Ok(vec![text.as_str()]),
            Value::Array(items) => {
                if items.is_empty() {
                    return self.fail("must not be an empty list");
                }
                self.list()?.iter().map(Node::string).collect()
            }
            _ => self.wrong_type("a string or a list of strings"),
        }
    }

    /// Reports the value in an error message.
    pub fn shown(&self) -> String {
        show(self.value)
    }
}

/// An object being read; `finish` refuses the keys nobody asked for.
pub struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn fail<T>(&self, reason: impl Into<String>) -> Result<T> {
        error(&self.path, reason)
    }

    /// An optional key.
    pub fn optional(&mut self, key: &'static str) -> Option<Node<'a>> {
        self.seen.push(key);
        self.map.get(key).map(|value| Node {
            path: join(&self.path, key),
            value,
        })
    }

    /// A required key.
    pub fn required(&mut self, key: &'static str) -> Result<Node<'a>> {
        match self.optional(key) {
            Some(node) => Ok(node),
            None => error(&join(&self.path, key), "is required"),
        }
    }

    /// Whether the object has the key (marks it as known).
    pub fn has(&mut self, key: &'static str) -> bool {
        self.seen.push(key);
        self.map.contains_key(key)
    }

    /// Refuses any key that was not read: typos must not pass silently.
    pub fn finish(self) -> Result<()> {
        for key in self.map.keys() {
            if !self.seen.iter().any(|known| known == key) {
                let mut known: Vec<&str> = self.seen.clone();
                known.sort_unstable();
                known.dedup();
                let plain = !key.is_empty()
                    && key.len() <= 64
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                let shown_key = if plain {
                    key.clone()
                } else {
                    show(&Value::String(key.clone()))
                };
                return error(
                    &join(&self.path, &shown_key),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
        Ok(())
    }
}
