//! A small JSON parser, and a typed reader over its values that knows where
//! it is.
//!
//! Every configuration error must name the JSON path and the reason in one
//! line (`services[0].weight: must be between 0 and 100, got 150`), and every
//! unknown key must be refused so that a typo cannot pass silently. A derive
//! gives neither the path nor a message an operator can act on, so the config
//! parser walks the document by hand with `Node` and `Obj`.
//!
//! The parser is hand-written rather than serde_json to keep `sluice.wasm`
//! small, and it never touches floating point: a number keeps its source
//! text, and is read as a whole number (`Node::integer_in`) or as an exact
//! fixed-point decimal (`Node::fixed_in`). Core's float parsing and
//! formatting alone would be about 25 KB of wasm.
//!
//! The parser takes RFC 8259 JSON: UTF-8 text (invalid UTF-8 is refused),
//! strings with every escape, `\uXXXX` surrogate pairs combined (a lone
//! surrogate is refused), numbers with fraction and exponent, `true`,
//! `false`, `null`, and whitespace between tokens. It refuses nesting deeper
//! than `MAX_DEPTH` lists and objects, so that a hostile document cannot
//! overflow the stack, and anything after the document. Object members are
//! kept in document order; a repeated key is refused by `Obj::finish`, which
//! every object the config parser reads goes through, with the key's path
//! (`services[0].weight: duplicate key`). An object the config parser does not
//! read is refused anyway (an unknown key, or the wrong type). A syntax error
//! is one line: `invalid JSON at line 3 column 14: expected ',' or '}'`
//! (columns count characters, from 1).

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

// ------------------------------------------------------------------ values

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Bool(bool),
    /// The number's source text, exactly as written (`12.50`, `1e-1`).
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Members in document order, repeated keys included (`Obj::finish`
    /// refuses them).
    Object(Vec<(String, Value)>),
}

/// The deepest nesting of lists and objects the parser accepts. Sluice's own
/// configuration nests six deep.
pub const MAX_DEPTH: usize = 64;

/// Parses a JSON document. A refusal has an empty path and the reason
/// `invalid JSON at line L column C: <what>`.
pub fn parse(bytes: &[u8]) -> Result<Value> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let valid = bytes.get(..err.valid_up_to()).unwrap_or_default();
            let before = std::str::from_utf8(valid).unwrap_or("");
            return syntax_error(before, "invalid UTF-8");
        }
    };
    let mut parser = Parser {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let parsed = parser.value(0).and_then(|value| {
        parser.skip_whitespace();
        if parser.at < parser.bytes.len() {
            Err(Syntax::new(
                parser.at,
                format!("unexpected {} after the document", parser.describe_next()),
            ))
        } else {
            Ok(value)
        }
    });
    parsed.or_else(|syntax| syntax_error(text.get(..syntax.at).unwrap_or(text), syntax.reason))
}

/// The refusal of a document whose error is right after `before`.
fn syntax_error<T>(before: &str, reason: impl fmt::Display) -> Result<T> {
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before.get(line_start..).unwrap_or("").chars().count() + 1;
    error(
        "",
        format!("invalid JSON at line {line} column {column}: {reason}"),
    )
}

/// A syntax error at byte offset `at`.
struct Syntax {
    at: usize,
    reason: String,
}

impl Syntax {
    fn new(at: usize, reason: impl Into<String>) -> Self {
        Syntax {
            at,
            reason: reason.into(),
        }
    }
}

type Parsed<T> = std::result::Result<T, Syntax>;

struct Parser<'t> {
    text: &'t str,
    bytes: &'t [u8],
    /// Byte offset of the next unread byte; always on a char boundary
    /// between tokens.
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// What is next, for a message: `end of input`, `'}'`, `"nul"`.
    fn describe_next(&self) -> String {
        let rest = self.text.get(self.at..).unwrap_or("");
        let word_len = rest
            .bytes()
            .take(16)
            .take_while(u8::is_ascii_alphanumeric)
            .count();
        match (rest.get(..word_len), rest.chars().next()) {
            (Some(word), _) if word_len > 1 => format!("{word:?}"),
            (_, Some(next)) => format!("{next:?}"),
            (_, None) => "end of input".to_string(),
        }
    }

    fn unexpected<T>(&self, expected: &str) -> Parsed<T> {
        Err(Syntax::new(
            self.at,
            format!("expected {expected}, found {}", self.describe_next()),
        ))
    }

    /// A value at nesting `depth` (the number of lists and objects around
    /// it), after optional whitespace.
    fn value(&mut self, depth: usize) -> Parsed<Value> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            _ => self.unexpected("a value"),
        }
    }

    fn enter(&self, depth: usize) -> Parsed<()> {
        if depth > MAX_DEPTH {
            return Err(Syntax::new(
                self.at,
                format!("nested deeper than {MAX_DEPTH} lists and objects"),
            ));
        }
        Ok(())
    }

    fn literal(&mut self, word: &str, value: Value) -> Parsed<Value> {
        let end = self.at + word.len();
        let follows_word = self
            .bytes
            .get(end)
            .is_some_and(|b| b.is_ascii_alphanumeric());
        if self.bytes.get(self.at..end) != Some(word.as_bytes()) || follows_word {
            return self.unexpected("a value");
        }
        self.at = end;
        Ok(value)
    }

    fn object(&mut self, depth: usize) -> Parsed<Value> {
        self.enter(depth)?;
        self.at += 1; // '{'
        let mut members = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_whitespace();
            if self.peek() != Some(b'"') {
                return self.unexpected("a string key");
            }
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return self.unexpected("':' after the key");
            }
            self.at += 1;
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Value::Object(members));
                }
                _ => return self.unexpected("',' or '}'"),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Parsed<Value> {
        self.enter(depth)?;
        self.at += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Value::Array(items));
                }
                _ => return self.unexpected("',' or ']'"),
            }
        }
    }

    /// A string, from its opening quote.
    fn string(&mut self) -> Parsed<String> {
        let open = self.at;
        self.at += 1; // '"'
        let mut out = String::new();
        loop {
            let start = self.at;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            // `at` stopped at an ASCII byte or the end: a char boundary.
            out.push_str(self.text.get(start..self.at).unwrap_or(""));
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => out.push(self.escape()?),
                Some(_) => {
                    return Err(Syntax::new(
                        self.at,
                        "control character in a string (write it as an escape, like \\n)",
                    ))
                }
                None => return Err(Syntax::new(open, "string not closed")),
            }
        }
    }

    /// One escape, from its backslash.
    fn escape(&mut self) -> Parsed<char> {
        let backslash = self.at;
        let simple = match self.bytes.get(backslash + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => return self.unicode_escape(),
            _ => {
                return Err(Syntax::new(
                    backslash,
                    "invalid escape (one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)",
                ))
            }
        };
        self.at += 2;
        Ok(simple)
    }

    /// `\uXXXX`, or a surrogate pair `\uD83D\uDE00`, from the backslash.
    fn unicode_escape(&mut self) -> Parsed<char> {
        let start = self.at;
        let high = self.hex4(start)?;
        self.at += 6;
        let code = match high {
            0xD800..=0xDBFF => {
                let low = match (self.peek(), self.bytes.get(self.at + 1)) {
                    (Some(b'\\'), Some(b'u')) => self.hex4(self.at)?,
                    _ => return Err(Syntax::new(start, "lone surrogate in a \\u escape")),
                };
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err(Syntax::new(start, "lone surrogate in a \\u escape"));
                }
                self.at += 6;
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(Syntax::new(start, "lone surrogate in a \\u escape")),
            _ => high,
        };
        char::from_u32(code).ok_or_else(|| Syntax::new(start, "invalid \\u escape"))
    }

    /// The four hex digits of the `\u` escape whose backslash is at `at`.
    fn hex4(&self, at: usize) -> Parsed<u32> {
        let mut code = 0;
        for offset in 2..6 {
            let digit = self
                .bytes
                .get(at + offset)
                .and_then(|&b| char::from(b).to_digit(16))
                .ok_or_else(|| Syntax::new(at, "\\u must be followed by four hex digits"))?;
            code = code * 16 + digit;
        }
        Ok(code)
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        self.at - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, kept as text.
    fn number(&mut self) -> Parsed<Value> {
        let start = self.at;
        let invalid = |at| Err(Syntax::new(at, "invalid number"));
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.at += 1;
                if self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    return Err(Syntax::new(start, "invalid number (leading zero)"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return invalid(start),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return invalid(start);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return invalid(start);
            }
        }
        let text = self.text.get(start..self.at).unwrap_or("");
        Ok(Value::Number(text.to_string()))
    }
}

// ------------------------------------------------------- showing a value

/// Longest rendering of a value in a message.
const SHOW_MAX: usize = 80;

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

/// Compact JSON for `value` (numbers as written), stopping soon after
/// `SHOW_MAX` bytes: `show` cuts there anyway.
fn write_value(value: &Value, out: &mut String) {
    if out.len() > SHOW_MAX {
        return;
    }
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
        Value::Number(text) => {
            for ch in text.chars() {
                if out.len() > SHOW_MAX {
                    return;
                }
                out.push(ch);
            }
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if out.len() > SHOW_MAX {
                    return;
                }
                if index > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (index, (key, item)) in members.iter().enumerate() {
                if out.len() > SHOW_MAX {
                    return;
                }
                if index > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_value(item, out);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal, escaped as serde_json did: `"` and `\`, control
/// characters (`\n`, `\u001b`); everything else as is.
fn write_string(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for ch in text.chars() {
        if out.len() > SHOW_MAX {
            return;
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
}

/// Cuts a rendering to `SHOW_MAX` bytes, `...` marking the cut.
fn bounded(mut text: String) -> String {
    if text.len() > SHOW_MAX {
        let mut cut = SHOW_MAX - 3;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// A short rendering of a value for messages; bounded so that a hostile
/// config cannot produce a megabyte log line.
fn show(value: &Value) -> String {
    let mut text = String::new();
    write_value(value, &mut text);
    bounded(text)
}

/// A string quoted for a message, bounded like `show`.
pub fn quote(text: &str) -> String {
    let mut quoted = String::new();
    write_string(text, &mut quoted);
    bounded(quoted)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
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

// ------------------------------------------------ decimals, no floats

/// `units × 10^-places` as a decimal, trailing zeros dropped:
/// `decimal(250_000, 6)` is `0.25`, `decimal(1_000_000, 6)` is `1`.
pub fn decimal(units: u64, places: u32) -> String {
    let mut text = fixed_decimal(units, places);
    if text.contains('.') {
        let kept = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(kept);
    }
    text
}

/// `units × 10^-places` with exactly `places` decimals: `(30, 3)` is `0.030`.
fn fixed_decimal(units: u64, places: u32) -> String {
    let Some(scale) = 10u64.checked_pow(places) else {
        return units.to_string();
    };
    if places == 0 {
        return units.to_string();
    }
    let width = places as usize;
    format!("{}.{:0width$}", units / scale, units % scale)
}

/// `part / whole` with exactly `places` decimals, rounded to nearest (ties
/// to even, as Rust's float formatting does): `ratio_decimal(1, 40, 2)` is
/// `0.02`, `ratio_decimal(3, 100, 3)` is `0.030`. A zero `whole` gives zero.
pub fn ratio_decimal(part: u64, whole: u64, places: u32) -> String {
    let places = places.min(19);
    let scale = 10u64.pow(places);
    let (Some(mut int), Some(rest)) = (part.checked_div(whole), part.checked_rem(whole)) else {
        return fixed_decimal(0, places);
    };
    // The decimals: rest × 10^places / whole, below 10^places. The product
    // may pass u64::MAX, so it is taken as a u128, once.
    let scaled = u128::from(rest) * u128::from(scale);
    let (quotient, left) = (scaled / u128::from(whole), scaled % u128::from(whole));
    let mut frac = u64::try_from(quotient).unwrap_or(0);
    let last_digit = if places == 0 { int } else { frac };
    let left_twice = left * 2;
    if left_twice > u128::from(whole) || (left_twice == u128::from(whole) && last_digit % 2 == 1) {
        frac += 1;
    }
    if frac == scale {
        // Rounding carried; `int` is at most u64::MAX / 2 when anything is left.
        int = int.saturating_add(1);
        frac = 0;
    }
    if places == 0 {
        return int.to_string();
    }
    let width = places as usize;
    format!("{int}.{frac:0width$}")
}

/// What a fixed-point conversion left below its last unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rest {
    Zero,
    BelowHalf,
    Half,
    AboveHalf,
}

/// A non-negative number scaled by `10^scale`: `units` whole units, and
/// what the decimal had beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    pub units: u64,
    pub rest: Rest,
}

impl Fixed {
    /// The units, rounded to nearest, half away from zero (as the float code
    /// this replaced rounded).
    pub fn rounded(self) -> u64 {
        self.units
            .saturating_add(u64::from(self.rest >= Rest::Half))
    }

    /// The units, if the decimal had no digit beyond the scale.
    pub fn exact(self) -> Option<u64> {
        (self.rest == Rest::Zero).then_some(self.units)
    }

    pub fn is_zero(self) -> bool {
        self.units == 0 && self.rest == Rest::Zero
    }
}

/// A JSON number's exact value times `10^scale`: `None` if `text` is not a
/// JSON number; otherwise whether it is below zero (and not zero), the whole
/// units (`None` past `u64::MAX`), and the rest.
fn scaled(text: &str, scale: u32) -> Option<(bool, Option<u64>, Rest)> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, text),
    };
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (mantissa, None),
    };
    let all_digits =
        |digits: &str| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !frac.is_none_or(all_digits) {
        return None;
    }
    let frac = frac.unwrap_or("");
    // The exponent saturates far beyond anything that fits a u64.
    let mut exp: i64 = 0;
    if let Some(exponent) = exponent {
        let (sign, digits) = match exponent.as_bytes().first() {
            Some(b'-') => (-1, exponent.get(1..).unwrap_or("")),
            Some(b'+') => (1, exponent.get(1..).unwrap_or("")),
            _ => (1, exponent),
        };
        if !all_digits(digits) {
            return None;
        }
        for b in digits.bytes() {
            exp = (exp * 10 + i64::from(b - b'0')).min(1_000_000_000_000);
        }
        exp *= sign;
    }
    // How many of the digits (integer part, then fraction) are whole units.
    let point = i64::try_from(int.len())
        .unwrap_or(i64::MAX)
        .saturating_add(exp)
        .saturating_add(i64::from(scale));
    let mut units = Some(0u64);
    let mut rest = Rest::Zero;
    let mut count: i64 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        let digit = b - b'0';
        if count < point {
            units = units
                .and_then(|units| units.checked_mul(10))
                .and_then(|units| units.checked_add(u64::from(digit)));
        } else if count == point {
            rest = match digit {
                0 => Rest::Zero,
                1..=4 => Rest::BelowHalf,
                5 => Rest::Half,
                _ => Rest::AboveHalf,
            };
        } else if digit != 0 {
            rest = match rest {
                Rest::Zero => Rest::BelowHalf,
                Rest::Half => Rest::AboveHalf,
                other => other,
            };
        }
        count += 1;
    }
    // Zeros the exponent adds after the digits (a u64 overflows within 20).
    let mut zeros = point.saturating_sub(count);
    while zeros > 0 && units.is_some_and(|units| units != 0) {
        units = units.and_then(|units| units.checked_mul(10));
        zeros -= 1;
    }
    let nonzero = units != Some(0) || rest != Rest::Zero;
    Some((negative && nonzero, units, rest))
}

// ------------------------------------------------------------ the reader

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
            Value::Object(members) => Ok(Obj {
                path: self.path.clone(),
                members,
                seen: Vec::with_capacity(members.len()),
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

    /// A number within `[min, max] × 10^-scale`, exactly, as a fixed-point
    /// value scaled by `10^scale`: with scale 6, `0.25` is 250_000 units and
    /// `0.1234567` is 123_456 units and a rest above half. What to do with
    /// digits beyond the scale (round, refuse) is the caller's choice.
    ///
    /// Exponents are accepted and exact: `1e-1` is `0.1`, `5E+1` is `50`.
    /// The message for a value out of range shows the bounds as decimals
    /// (`must be between 0 and 1, got 1.5`).
    pub fn fixed_in(&self, scale: u32, min: u64, max: u64) -> Result<Fixed> {
        let Value::Number(text) = self.value else {
            return self.wrong_type("a number");
        };
        let Some((negative, units, rest)) = scaled(text, scale) else {
            return self.wrong_type("a number");
        };
        match units {
            Some(units)
                if !negative
                    && units >= min
                    && (units < max || (units == max && rest == Rest::Zero)) =>
            {
                Ok(Fixed { units, rest })
            }
            _ => self.fail(format!(
                "must be between {} and {}, got {}",
                decimal(min, scale),
                decimal(max, scale),
                show(self.value)
            )),
        }
    }

    /// A whole number within `[min, max]`, written without a fraction or
    /// exponent (`1.0` and `1e3` are refused, as they always were).
    pub fn integer_in(&self, min: u64, max: u64) -> Result<u64> {
        let Value::Number(text) = self.value else {
            return self.wrong_type("a whole number");
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return self.fail(format!(
                "must be a whole number between {min} and {max}, got {}",
                show(self.value)
            ));
        }
        let number = text.bytes().try_fold(0u64, |number, b| {
            number.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        });
        match number {
            Some(number) if (min..=max).contains(&number) => Ok(number),
            _ => self.fail(format!(
                "must be between {min} and {max}, got {}",
                show(self.value)
            )),
        }
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

/// An object being read; `finish` refuses the keys nobody asked for, and
/// repeated keys.
pub struct Obj<'a> {
    path: String,
    members: &'a [(String, Value)],
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
        self.members
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| Node {
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
        self.members.iter().any(|(name, _)| name == key)
    }

    /// Refuses any key that was not read (typos must not pass silently) and
    /// any key given twice (which one would win is anyone's guess), the
    /// first such in document order.
    pub fn finish(self) -> Result<()> {
        for (index, (key, _)) in self.members.iter().enumerate() {
            if !self.seen.iter().any(|known| known == key) {
                // The keys in the order the parser asked for them.
                let mut known: Vec<&str> = Vec::with_capacity(self.seen.len());
                for &key in &self.seen {
                    if !known.contains(&key) {
                        known.push(key);
                    }
                }
                return error(
                    &join(&self.path, &key_segment(key)),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
            // Every key so far is known, so this scan is as short as the
            // list of known keys (a longer run must repeat one).
            if self
                .members
                .iter()
                .take(index)
                .any(|(other, _)| other == key)
            {
                return error(&join(&self.path, &key_segment(key)), "duplicate key");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Value {
        match parse(text.as_bytes()) {
            Ok(value) => value,
            Err(err) => panic!("{text:?} refused: {err}"),
        }
    }

    /// The one-line refusal of a document that is not JSON.
    fn refused(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(value) => panic!("{:?} accepted as {value:?}", String::from_utf8_lossy(bytes)),
            Err(err) => {
                assert!(err.path.is_empty(), "{err}");
                let line = err.to_string();
                assert!(line.starts_with("invalid JSON at line "), "{line}");
                assert!(!line.contains(['\n', '\r']), "{line:?}");
                line
            }
        }
    }

    fn string(text: &str) -> Value {
        Value::String(text.to_string())
    }

    fn number(text: &str) -> Value {
        Value::Number(text.to_string())
    }

    #[test]
    fn values_and_whitespace() {
        assert_eq!(
            parsed(
                " \t\r\n{ \"a\" : [ 1 , -2.5e3 , true , false , null , \"x\" , { } , [ ] ] } \n"
            ),
            Value::Object(vec![(
                "a".into(),
                Value::Array(vec![
                    number("1"),
                    number("-2.5e3"),
                    Value::Bool(true),
                    Value::Bool(false),
                    Value::Null,
                    string("x"),
                    Value::Object(Vec::new()),
                    Value::Array(Vec::new()),
                ])
            )])
        );
        // Any value may be the document.
        assert_eq!(parsed("7"), number("7"));
        assert_eq!(parsed("\"\""), string(""));
        // Members keep document order.
        let Value::Object(members) = parsed(r#"{"b": 1, "a": 2, "c": 3}"#) else {
            panic!("not an object");
        };
        let keys: Vec<&str> = members.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(keys, ["b", "a", "c"]);
        // Only JSON's four whitespace characters.
        refused(b"\x0c{}");
        refused("\u{a0}{}".as_bytes());
        refused("\u{feff}{}".as_bytes());
    }

    #[test]
    fn string_escapes() {
        assert_eq!(
            parsed(r#""\"\\\/\b\f\n\r\t\u0041\u00e9\u20AC""#),
            string("\"\\/\u{8}\u{c}\n\r\t\u{41}é€")
        );
        assert_eq!(parsed(r#""\u0000""#), string("\0"));
        // Raw non-ASCII and DEL need no escape.
        assert_eq!(parsed("\"é€😀\u{7f}\""), string("é€😀\u{7f}"));
        assert!(refused(br#""\x""#).ends_with(
            "column 2: invalid escape (one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)"
        ));
        assert!(refused(br#""\u12""#).ends_with("\\u must be followed by four hex digits"));
        assert!(refused(br#""\u12G4""#).ends_with("\\u must be followed by four hex digits"));
        assert!(refused(br#""\"#)
            .ends_with("invalid escape (one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)"));
        assert!(refused(br#""abc"#).ends_with("line 1 column 1: string not closed"));
        assert!(refused(b"\"a\nb\"").ends_with(
            "line 1 column 3: control character in a string (write it as an escape, like \\n)"
        ));
        refused(b"\"\t\"");
        refused(b"'a'");
    }

    #[test]
    fn surrogate_pairs_combine_and_lone_surrogates_are_refused() {
        assert_eq!(parsed(r#""\ud83d\ude00""#), string("😀"));
        assert_eq!(parsed(r#""\uD834\uDD1E""#), string("𝄞"));
        assert_eq!(parsed(r#""\uDBFF\uDFFF""#), string("\u{10ffff}"));
        for lone in [
            r#""\ud83d""#,
            r#""\ud83dx""#,
            r#""\ud83d\u0041""#,
            r#""\ud83d\ud83d""#,
            r#""\ud83d\n""#,
            r#""\ude00""#,
            r#""\ude00\ud83d""#,
        ] {
            let line = refused(lone.as_bytes());
            assert!(
                line.ends_with("column 2: lone surrogate in a \\u escape"),
                "{lone}: {line}"
            );
        }
        // A surrogate written as UTF-8 bytes is not UTF-8.
        assert!(refused(b"\"\xed\xa0\xbd\"").ends_with("invalid UTF-8"));
    }

    #[test]
    fn invalid_utf8_is_refused_where_it_is() {
        assert_eq!(
            refused(b"{\"a\": \"\xff\"}"),
            "invalid JSON at line 1 column 8: invalid UTF-8"
        );
        assert_eq!(
            refused(b"{\n \"\xc3\xa9\": \"x\xc3\"}"),
            "invalid JSON at line 2 column 9: invalid UTF-8"
        );
        // Overlong and truncated sequences.
        refused(b"\"\xc0\xaf\"");
        refused(b"\"\xe2\x82\"");
        refused(b"\xff");
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            refused(nested(MAX_DEPTH + 1).as_bytes()),
            "invalid JSON at line 1 column 65: nested deeper than 64 lists and objects"
        );
        let objects = format!("{}1{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(parse(objects.as_bytes()).is_ok());
        let objects = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(refused(objects.as_bytes()).ends_with("nested deeper than 64 lists and objects"));
        // Far deeper than any stack would take: refused, not a crash.
        refused("[".repeat(1_000_000).as_bytes());
        refused(r#"{"a":["#.repeat(200_000).as_bytes());
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert_eq!(
            refused(b"{} x"),
            "invalid JSON at line 1 column 4: unexpected 'x' after the document"
        );
        assert!(refused(b"{}{}").ends_with("column 3: unexpected '{' after the document"));
        assert!(refused(b"1 2").ends_with("unexpected '2' after the document"));
        assert!(refused(b"[1]]").ends_with("unexpected ']' after the document"));
        assert!(refused(b"{}\0").ends_with("unexpected '\\0' after the document"));
        assert!(refused(b"truex").ends_with("expected a value, found \"truex\""));
        assert!(refused(b"nul").ends_with("column 1: expected a value, found \"nul\""));
        assert!(parse(b"{} \n\t").is_ok());
    }

    #[test]
    fn structure_errors_say_what_was_expected_where() {
        assert_eq!(
            refused(b""),
            "invalid JSON at line 1 column 1: expected a value, found end of input"
        );
        assert_eq!(
            refused(b"{\n  \"a\": 1\n  \"b\": 2\n}"),
            "invalid JSON at line 3 column 3: expected ',' or '}', found '\"'"
        );
        assert!(refused(b"[1,]").ends_with("column 4: expected a value, found ']'"));
        assert!(refused(b"[1 2]").ends_with("expected ',' or ']', found '2'"));
        assert!(refused(b"{\"a\" 1}").ends_with("expected ':' after the key, found '1'"));
        assert!(refused(b"{a: 1}").ends_with("expected a string key, found 'a'"));
        assert!(refused(b"{\"a\": 1,}").ends_with("expected a string key, found '}'"));
        assert!(refused(b"[").ends_with("expected a value, found end of input"));
        assert!(refused(b"{\"a\": 1").ends_with("expected ',' or '}', found end of input"));
        // Columns count characters, not bytes.
        assert!(refused("[\"é€\", x]".as_bytes()).starts_with("invalid JSON at line 1 column 8:"));
    }

    #[test]
    fn number_syntax() {
        for good in [
            "0",
            "-0",
            "7",
            "-12",
            "1.5",
            "0.001",
            "1e5",
            "1E+5",
            "2.5e-3",
            "-0.0e0",
            "123456789012345678901234567890",
        ] {
            assert_eq!(parsed(good), number(good));
        }
        for bad in [
            "01",
            "-01",
            "1.",
            ".5",
            "-",
            "1e",
            "1e+",
            "+1",
            "1.e5",
            "--1",
            "0x10",
            "NaN",
            "Infinity",
            "-Infinity",
            "1_000",
        ] {
            let line = refused(bad.as_bytes());
            assert!(!line.is_empty(), "{bad}");
        }
        assert!(refused(b"[01]").ends_with("column 2: invalid number (leading zero)"));
        assert!(refused(b"[1.]").ends_with("column 2: invalid number"));
    }

    fn fixed(text: &str, scale: u32, min: u64, max: u64) -> std::result::Result<Fixed, String> {
        let value = parsed(text);
        let node = Node {
            path: "x".into(),
            value: &value,
        };
        node.fixed_in(scale, min, max)
            .map_err(|err| err.to_string())
    }

    fn exact(units: u64) -> std::result::Result<Fixed, String> {
        Ok(Fixed {
            units,
            rest: Rest::Zero,
        })
    }

    #[test]
    fn fixed_point_is_exact_without_floats() {
        let pct = |text| fixed(text, 2, 0, 10_000);
        assert_eq!(pct("12.34"), exact(1234));
        assert_eq!(pct("0.01"), exact(1));
        assert_eq!(pct("100"), exact(10_000));
        assert_eq!(pct("100.000"), exact(10_000));
        assert_eq!(pct("0"), exact(0));
        assert_eq!(pct("-0"), exact(0));
        assert_eq!(pct("-0.000"), exact(0));
        assert_eq!(pct("99.99"), exact(9999));
        // Digits beyond the scale are reported, for the caller to round or refuse.
        let rest = |text| pct(text).map(|fixed| (fixed.units, fixed.rest));
        assert_eq!(rest("12.345"), Ok((1234, Rest::Half)));
        assert_eq!(rest("12.3450000001"), Ok((1234, Rest::AboveHalf)));
        assert_eq!(rest("12.3449999"), Ok((1234, Rest::BelowHalf)));
        assert_eq!(rest("12.346"), Ok((1234, Rest::AboveHalf)));
        assert_eq!(
            rest("12.3400000000000000000000001"),
            Ok((1234, Rest::BelowHalf))
        );
        assert_eq!(rest("0.001"), Ok((0, Rest::BelowHalf)));
        assert_eq!(pct("12.345").map(Fixed::rounded), Ok(1235));
        assert_eq!(pct("12.3449").map(Fixed::rounded), Ok(1234));
        assert_eq!(pct("12.345").map(Fixed::exact), Ok(None));
        // Exponents are exact too.
        assert_eq!(pct("1.234e1"), exact(1234));
        assert_eq!(pct("1E2"), exact(10_000));
        assert_eq!(pct("1e+1"), exact(1000));
        assert_eq!(pct("1000e-2"), exact(1000));
        assert_eq!(pct("0.00001e3"), exact(1));
        assert_eq!(rest("1e-1000000000000000000000"), Ok((0, Rest::BelowHalf)));
        assert_eq!(pct("0e1000000000000000000000"), exact(0));
        assert_eq!(pct("0.0e-5"), exact(0));
        let ratio = |text| fixed(text, 6, 0, 1_000_000);
        assert_eq!(ratio("0.29"), exact(290_000));
        assert_eq!(ratio("0.1"), exact(100_000));
        assert_eq!(ratio("1e-1"), exact(100_000));
        assert_eq!(ratio("0.000001"), exact(1));
        assert_eq!(ratio("0.3333333").map(Fixed::rounded), Ok(333_333));
        assert_eq!(ratio("0.0000005").map(Fixed::rounded), Ok(1));
        assert_eq!(ratio("0.0000001").map(Fixed::is_zero), Ok(false));
        assert_eq!(ratio("0.0000000").map(Fixed::is_zero), Ok(true));
    }

    #[test]
    fn fixed_point_ranges_are_exact() {
        let pct = |text| fixed(text, 2, 0, 10_000);
        let out = |got: &str| Err(format!("x: must be between 0 and 100, got {got}"));
        assert_eq!(pct("150"), out("150"));
        assert_eq!(pct("-1"), out("-1"));
        assert_eq!(pct("-0.001"), out("-0.001"));
        assert_eq!(pct("100.0000000001"), out("100.0000000001"));
        assert_eq!(pct("1e3"), out("1e3"));
        assert_eq!(
            pct("1e1000000000000000000000"),
            out("1e1000000000000000000000")
        );
        assert_eq!(pct("-1e-1000"), out("-1e-1000"));
        assert_eq!(
            pct("123456789012345678901234567890"),
            out("123456789012345678901234567890")
        );
        let long = format!("1{}", "0".repeat(200));
        assert_eq!(pct(&long), out(&format!("1{}...", "0".repeat(76))));
        assert_eq!(
            fixed("1.5", 6, 0, 1_000_000),
            Err("x: must be between 0 and 1, got 1.5".into())
        );
        assert_eq!(
            fixed("0.05", 6, 100_000, 1_000_000),
            Err("x: must be between 0.1 and 1, got 0.05".into())
        );
        assert_eq!(
            fixed("\"1\"", 2, 0, 1),
            Err("x: must be a number, got a string".into())
        );
        assert_eq!(
            fixed("null", 2, 0, 1),
            Err("x: must be a number, got null".into())
        );
    }

    fn integer(text: &str, min: u64, max: u64) -> std::result::Result<u64, String> {
        let value = parsed(text);
        let node = Node {
            path: "n".into(),
            value: &value,
        };
        node.integer_in(min, max).map_err(|err| err.to_string())
    }

    #[test]
    fn integers_are_plain_digits() {
        assert_eq!(integer("0", 0, 10), Ok(0));
        assert_eq!(integer("10", 0, 10), Ok(10));
        assert_eq!(integer("18446744073709551615", 0, u64::MAX), Ok(u64::MAX));
        assert_eq!(
            integer("11", 0, 10),
            Err("n: must be between 0 and 10, got 11".into())
        );
        assert_eq!(
            integer("18446744073709551616", 0, u64::MAX),
            Err("n: must be between 0 and 18446744073709551615, got 18446744073709551616".into())
        );
        for not_whole in ["1.5", "1.0", "1e2", "-1", "-0"] {
            assert_eq!(
                integer(not_whole, 0, 10),
                Err(format!(
                    "n: must be a whole number between 0 and 10, got {not_whole}"
                ))
            );
        }
        assert_eq!(
            integer("true", 0, 10),
            Err("n: must be a whole number, got a boolean".into())
        );
    }

    #[test]
    fn decimals_are_written_without_floats() {
        assert_eq!(decimal(250_000, 6), "0.25");
        assert_eq!(decimal(1_000_000, 6), "1");
        assert_eq!(decimal(1, 6), "0.000001");
        assert_eq!(decimal(0, 6), "0");
        assert_eq!(decimal(1050, 2), "10.5");
        assert_eq!(decimal(10_000_000_000, 8), "100");
        assert_eq!(decimal(42, 0), "42");
        assert_eq!(ratio_decimal(11, 22, 2), "0.50");
        assert_eq!(ratio_decimal(3, 100, 3), "0.030");
        assert_eq!(ratio_decimal(1, 3, 2), "0.33");
        assert_eq!(ratio_decimal(2, 3, 2), "0.67");
        assert_eq!(ratio_decimal(22, 22, 2), "1.00");
        assert_eq!(ratio_decimal(0, 0, 2), "0.00");
        assert_eq!(ratio_decimal(5300, 1000, 1), "5.3");
        assert_eq!(ratio_decimal(5960, 1000, 1), "6.0");
        // Ties go to even, as `{:.2}` of the same (exact) float did.
        assert_eq!(ratio_decimal(1, 8, 2), "0.12");
        assert_eq!(ratio_decimal(3, 8, 2), "0.38");
        assert_eq!(ratio_decimal(5250, 1000, 1), "5.2");
        assert_eq!(ratio_decimal(5750, 1000, 1), "5.8");
        assert_eq!(ratio_decimal(u64::MAX, u64::MAX, 3), "1.000");
        assert_eq!(ratio_decimal(u64::MAX, 1, 1), format!("{}.0", u64::MAX));
        assert_eq!(ratio_decimal(u64::MAX, 2, 1), format!("{}.5", u64::MAX / 2));
        assert_eq!(ratio_decimal(999, 1000, 2), "1.00");
        assert_eq!(ratio_decimal(7, 2, 0), "4");
        assert_eq!(ratio_decimal(5, 2, 0), "2");
        assert_eq!(ratio_decimal(5, 3, 0), "2");
    }

    #[test]
    fn shown_values_are_compact_json_and_bounded() {
        assert_eq!(
            show(&parsed(r#"{ "a" : [1, 2.50, "x"], "b": null }"#)),
            r#"{"a":[1,2.50,"x"],"b":null}"#
        );
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
        let list = parsed(&format!("[{}1]", "1,".repeat(100_000)));
        assert_eq!(show(&list), format!("[{}...", "1,".repeat(38)));
    }

    fn refusal_of_object(text: &str, keys: &[&'static str]) -> String {
        let value = parsed(text);
        let node = Node {
            path: "services[0]".into(),
            value: &value,
        };
        let mut object = node.object().unwrap();
        for key in keys {
            let _ = object.optional(key);
        }
        match object.finish() {
            Ok(()) => panic!("{text} accepted"),
            Err(err) => {
                let line = err.to_string();
                assert!(!line.contains('\n'), "{line:?}");
                line
            }
        }
    }

    #[test]
    fn objects_refuse_duplicate_and_unknown_keys() {
        assert_eq!(
            refusal_of_object(
                r#"{"name": "a", "weight": 1, "weight": 2}"#,
                &["name", "weight"]
            ),
            "services[0].weight: duplicate key"
        );
        // Found even among many keys, and odd keys are quoted in the path.
        assert_eq!(
            refusal_of_object(r#"{"a b": 1, "a b": 1}"#, &["a b"]),
            "services[0].\"a b\": duplicate key"
        );
        // The first problem in document order.
        assert_eq!(
            refusal_of_object(r#"{"x": 1, "x": 2, "typo": 3}"#, &["x"]),
            "services[0].x: duplicate key"
        );
        assert_eq!(
            refusal_of_object(r#"{"typo": 3, "x": 1, "x": 2}"#, &["x"]),
            "services[0].typo: unknown key (expected one of: x)"
        );
        // Known keys in the order they were asked for, each once.
        assert_eq!(
            refusal_of_object(
                r#"{"zz": 1}"#,
                &["name", "match", "stable", "match", "canary", "name"]
            ),
            "services[0].zz: unknown key (expected one of: name, match, stable, canary)"
        );
        assert_eq!(
            refusal_of_object("{\"bad\\nkey\": 1}", &["a"]),
            "services[0].\"bad\\nkey\": unknown key (expected one of: a)"
        );
        // The first of repeated keys is the one read (the object is refused anyway).
        let value = parsed(r#"{"k": 1, "k": 2}"#);
        let mut object = Node::root(&value).object().unwrap();
        assert_eq!(
            object.optional("k").map(|node| node.shown()),
            Some("1".into())
        );
        assert!(object.has("k"));
        assert_eq!(object.finish().unwrap_err().to_string(), "k: duplicate key");
        // A large object of one repeated key costs a short scan per key.
        let many = format!("{{{}\"k\": 0}}", "\"k\": 0, ".repeat(50_000));
        assert_eq!(
            refusal_of_object(&many, &["k"]),
            "services[0].k: duplicate key"
        );
    }

    #[test]
    fn every_syntax_error_is_one_line_with_its_place() {
        let documents: &[&[u8]] = &[
            b"",
            b" ",
            b"{",
            b"}",
            b"[",
            b"]",
            b"{\"a\"",
            b"{\"a\":",
            b"{\"a\":1,",
            b"\"\\u\"",
            b"\"\n\"",
            b"\"\r\"",
            b"\"\\\n\"",
            b"tru",
            b"nulll",
            b"-",
            b"1.",
            b"\xff",
            b"[\"\xc3\"]",
            b"{\"a\":1}\n\n x",
            b"\"\\ud800\"",
            b"\"\\udc00\"",
        ];
        for document in documents {
            let line = refused(document);
            assert!(line.contains(" column "), "{line}");
        }
    }
}
