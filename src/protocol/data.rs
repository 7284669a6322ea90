//! What `data` a publish (or direct message) may carry: any JSON that every
//! reader can parse back, not just JSON that is well-formed.
//!
//! `data` is kept as raw text (`RawValue`), whose parser only checks the
//! syntax. Three things pass that check yet fail a real parse (serde_json's
//! `Value`, JavaScript's `JSON.parse` of a whole page, most client libraries):
//! nesting deeper than a parser's recursion limit, numbers beyond f64
//! (`1e999999`) and lone UTF-16 surrogates (`"\ud800"`). Stored, such a
//! message would break every later history read, so it is refused at publish
//! with `bad_request`.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// The deepest nesting of arrays and objects `data` may have. serde_json
/// stops at 127 levels, and a history page wraps each `data` in three more
/// (page object, `messages` list, `message` object): 100 leaves room.
pub const MAX_DATA_DEPTH: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DataError(String);

/// Parses `data` the way a reader would, keeping nothing: every string is
/// unescaped (lone surrogates fail), every number is converted (out of f64
/// range fails), nesting is counted.
pub fn check_data(data: &RawValue) -> Result<(), DataError> {
    let mut deserializer = serde_json::Deserializer::from_str(data.get());
    Check { depth: 0 }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| DataError(without_position(&e)))
}

/// serde_json's message without "at line 1 column 9": positions within
/// `data` mean little to a client that sent a whole frame.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

#[derive(Clone, Copy)]
struct Check {
    depth: usize,
}

impl Check {
    fn deeper<E: serde::de::Error>(self) -> Result<Check, E> {
        if self.depth >= MAX_DATA_DEPTH {
            Err(E::custom(format!(
                "nested more than {MAX_DATA_DEPTH} levels deep"
            )))
        } else {
            Ok(Check {
                depth: self.depth + 1,
            })
        }
    }
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        // Keys are strings: checking them as values unescapes them too.
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), DataError> {
        check_data(&RawValue::from_string(text.to_owned()).expect("well-formed JSON"))
    }

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn accepts_what_readers_can_parse() {
        for ok in [
            "null",
            "true",
            "-0",
            "1.5e300",
            "18446744073709551616",
            r#""\ud83d\ude00""#,
            r#"{"a":[1,{"b":"c"}],"\u00e9":null}"#,
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
            serde_json::from_str::<serde_json::Value>(ok).expect("a reader parses it");
        }
        check(&nested(MAX_DATA_DEPTH)).expect("the deepest allowed");
    }

    #[test]
    fn refuses_what_raw_json_lets_through_but_readers_cannot_parse() {
        for bad in [
            "1e999999".to_owned(),
            "-1e400".to_owned(),
            r#""\ud800""#.to_owned(),
            r#"{"\udc00":1}"#.to_owned(),
            r#"["ok","\ud800x"]"#.to_owned(),
            nested(MAX_DATA_DEPTH + 1),
            nested(127),
            format!(r#"{{"a":{}}}"#, nested(MAX_DATA_DEPTH)),
        ] {
            let raw = RawValue::from_string(bad.clone()).expect("raw JSON accepts it");
            assert!(check_data(&raw).is_err(), "{bad}");
        }
    }
}
