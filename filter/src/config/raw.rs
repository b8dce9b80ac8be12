//! The configuration document as JSON shapes: every object a struct with
//! `deny_unknown_fields`, every key optional, nothing checked but types.
//! `validate` turns these into the runtime types.
//!
//! The leaves are small wrappers (`Text`, `Number`, `Whole`, `Flag`, `List`,
//! `Strings`, `Obj`) rather than `String`, `f64`, `Vec` and the structs
//! themselves, for two reasons:
//! - a wrong type is refused as `must be a string, got a number`, naming the
//!   kinds, not serde's `invalid type: integer `1`, expected a string`, which
//!   would also echo a hostile value at any length;
//! - a key given as `null` is refused (`Opt`), not taken as absent, as
//!   `Option` would.

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Config {
    pub steering_header: Opt<Text>,
    pub services: Opt<List<Obj<Service>>>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Service {
    pub name: Opt<Text>,
    #[serde(rename = "match")]
    pub matcher: Opt<Obj<Match>>,
    pub stable: Opt<Text>,
    pub canary: Opt<Text>,
    pub stable_by_default: Opt<Flag>,
    pub weight: Opt<Number>,
    pub sticky: Opt<Obj<Sticky>>,
    pub rules: Opt<List<Obj<Rule>>>,
    pub retry: Opt<Obj<Retry>>,
    pub breaker: Opt<Obj<Breaker>>,
    pub rollout: Opt<Obj<Rollout>>,
    pub failures: Opt<Obj<Failures>>,
    pub attempt_count_in_response: Opt<Flag>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Failures {
    pub http_statuses: Opt<List<Code>>,
    pub grpc_codes: Opt<List<Code>>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Match {
    pub authority: Opt<Strings>,
    pub path_prefix: Opt<Text>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Sticky {
    pub header: Opt<Text>,
    pub cookie: Opt<Text>,
}

/// One matcher (`header`, `cookie`, `device`), a test for the first two,
/// and one action (`to`, `weight`): which are given is checked later.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Rule {
    pub header: Opt<Text>,
    pub cookie: Opt<Text>,
    pub device: Opt<Text>,
    pub equals: Opt<Strings>,
    pub prefix: Opt<Strings>,
    pub contains: Opt<Strings>,
    pub present: Opt<Flag>,
    pub to: Opt<Text>,
    pub weight: Opt<Number>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Retry {
    pub mode: Opt<Text>,
    pub max_retries: Opt<Whole>,
    pub retry_on: Opt<Text>,
    pub timeout_ms: Opt<Whole>,
    pub per_try_timeout_ms: Opt<Whole>,
    pub budget: Opt<Obj<Budget>>,
    pub deadline_header: Opt<Text>,
    pub idempotent: Opt<Obj<Idempotent>>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Idempotent {
    pub methods: Opt<List<Text>>,
    pub path_prefixes: Opt<List<Text>>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Budget {
    pub ratio: Opt<Number>,
    pub min_per_s: Opt<Whole>,
    pub window_s: Opt<Whole>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Breaker {
    pub window_s: Opt<Whole>,
    pub min_requests: Opt<Whole>,
    pub failure_rate: Opt<Number>,
    pub consecutive_failures: Opt<Whole>,
    pub slow_ms: Opt<Whole>,
    pub slow_rate: Opt<Number>,
    pub open_ms: Opt<Whole>,
    pub max_open_ms: Opt<Whole>,
    pub half_open_requests: Opt<Whole>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Rollout {
    pub steps: Opt<List<Number>>,
    pub step_s: Opt<Whole>,
    pub max_failure_rate: Opt<Number>,
    pub min_requests: Opt<Whole>,
    pub start_unix_s: Opt<Whole>,
}

// ------------------------------------------------------------------ leaves

/// An optional key: absent is `None`; `null` is refused by `T` like any
/// other wrong type.
pub(super) struct Opt<T>(pub Option<T>);

impl<T> Default for Opt<T> {
    fn default() -> Self {
        Opt(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Opt<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(|value| Opt(Some(value)))
    }
}

/// A JSON number as serde_json read it: a whole number that fits a `u64`
/// or an `i64` exactly, else the nearest double.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Num {
    Int(u64),
    Neg(i64),
    Float(f64),
}

pub(super) struct Text(pub String);
/// A number where a fraction may make sense (weights, rates).
pub(super) struct Number(pub Num);
/// A number where only a whole one does (counts, durations); the type
/// only names the kind in the refusal, `validate` refuses fractions.
pub(super) struct Whole(pub Num);
pub(super) struct Flag(pub bool);
pub(super) struct List<T>(pub Vec<T>);
pub(super) struct Obj<T>(pub T);

/// A status or code: a name (`"5xx"`, `"UNAVAILABLE"`) or a number.
pub(super) enum Code {
    Name(String),
    Number(Num),
}

/// A string, or a list of strings meaning "any of these".
pub(super) enum Strings {
    One(String),
    Many(Vec<Text>),
}

/// `must be a string, got a number`.
fn wrong<E: de::Error>(expected: &str, got: &str) -> E {
    E::custom(format_args!("must be {expected}, got {got}"))
}

/// The visitor methods for the kinds a leaf refuses. serde_json's
/// `deserialize_any` calls only these (and `visit_borrowed_str`, which
/// defaults to `visit_str`).
macro_rules! refuse {
    ($expected:expr; $($kind:ident),+) => { $(refuse!(@ $expected, $kind);)+ };
    (@ $expected:expr, boolean) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(wrong($expected, "a boolean"))
        }
    };
    (@ $expected:expr, number) => {
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(wrong($expected, "a number"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(wrong($expected, "a number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(wrong($expected, "a number"))
        }
    };
    (@ $expected:expr, string) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(wrong($expected, "a string"))
        }
    };
    (@ $expected:expr, null) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(wrong($expected, "null"))
        }
    };
    (@ $expected:expr, list) => {
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(wrong($expected, "a list"))
        }
    };
    (@ $expected:expr, object) => {
        fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(wrong($expected, "an object"))
        }
    };
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Text, E> {
                Ok(Text(text.to_string()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Text, E> {
                Ok(Text(text))
            }
            refuse!("a string"; boolean, number, null, list, object);
        }
        deserializer.deserialize_any(TextVisitor)
    }
}

/// Reads any number; `$expected` names the kind in a refusal.
macro_rules! number_leaf {
    ($leaf:ident, $expected:expr) => {
        impl<'de> Deserialize<'de> for $leaf {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct NumVisitor;
                impl<'de> Visitor<'de> for NumVisitor {
                    type Value = $leaf;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expected)
                    }
                    fn visit_u64<E: de::Error>(self, value: u64) -> Result<$leaf, E> {
                        Ok($leaf(Num::Int(value)))
                    }
                    fn visit_i64<E: de::Error>(self, value: i64) -> Result<$leaf, E> {
                        Ok($leaf(match u64::try_from(value) {
                            Ok(value) => Num::Int(value),
                            Err(_) => Num::Neg(value),
                        }))
                    }
                    fn visit_f64<E: de::Error>(self, value: f64) -> Result<$leaf, E> {
                        Ok($leaf(Num::Float(value)))
                    }
                    refuse!($expected; boolean, string, null, list, object);
                }
                deserializer.deserialize_any(NumVisitor)
            }
        }
    };
}

number_leaf!(Number, "a number");
number_leaf!(Whole, "a whole number");

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl<'de> Visitor<'de> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, flag: bool) -> Result<Flag, E> {
                Ok(Flag(flag))
            }
            refuse!("true or false"; number, string, null, list, object);
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = List<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<List<T>, A::Error> {
                items(seq).map(List)
            }
            refuse!("a list"; boolean, number, string, null, object);
        }
        deserializer.deserialize_any(ListVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Strings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "a string or a list of strings";
        struct StringsVisitor;
        impl<'de> Visitor<'de> for StringsVisitor {
            type Value = Strings;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Strings, E> {
                Ok(Strings::One(text.to_string()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Strings, E> {
                Ok(Strings::One(text))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Strings, A::Error> {
                items(seq).map(Strings::Many)
            }
            refuse!(EXPECTED; boolean, number, null, object);
        }
        deserializer.deserialize_any(StringsVisitor)
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = "a string or a number";
        struct CodeVisitor;
        impl<'de> Visitor<'de> for CodeVisitor {
            type Value = Code;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Code, E> {
                Ok(Code::Name(text.to_string()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Code, E> {
                Ok(Code::Number(Num::Int(value)))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Code, E> {
                Ok(Code::Number(match u64::try_from(value) {
                    Ok(value) => Num::Int(value),
                    Err(_) => Num::Neg(value),
                }))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Code, E> {
                Ok(Code::Number(Num::Float(value)))
            }
            refuse!(EXPECTED; boolean, null, list, object);
        }
        deserializer.deserialize_any(CodeVisitor)
    }
}

/// The items of an opened list. No size hint: serde_json gives none, and
/// a hostile one must not allocate up front.
fn items<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<T>, A::Error> {
    let mut items = Vec::new();
    while let Some(item) = seq.next_element()? {
        items.push(item);
    }
    Ok(items)
}

/// An object read into `T` (a struct with `deny_unknown_fields`); anything
/// else is refused as `must be an object, got ...`.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Obj)
            }
            refuse!("an object"; boolean, number, string, null, list);
        }
        deserializer.deserialize_any(ObjVisitor(PhantomData))
    }
}
