//! Tuple values: JSON-like (null, bool, int, float, string, bytes, list, map).
//!
//! In JSON, bytes are written `{ "$bytes": "<base64>" }`; every other JSON value maps to the
//! variant of the same shape. The binary form is bincode's derive (see [`crate::codec`]).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Deepest nesting of lists and maps a value may have. Bounds recursion in every codec.
pub const VALUE_DEPTH_MAX: usize = 64;

/// The JSON object key that marks a byte string.
pub const BYTES_TAG: &str = "$bytes";

/// A tuple's value.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// Converts from JSON. A one-entry object `{ "$bytes": "<base64>" }` becomes bytes.
    pub fn from_json(json: serde_json::Value) -> Result<Value, String> {
        Self::from_json_at(json, 0)
    }

    fn from_json_at(json: serde_json::Value, depth: usize) -> Result<Value, String> {
        if depth > VALUE_DEPTH_MAX {
            return Err(format!("value nests deeper than {VALUE_DEPTH_MAX} levels"));
        }
        Ok(match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().ok_or("number is out of range")?),
            },
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(items) => Value::List(
                items
                    .into_iter()
                    .map(|v| Self::from_json_at(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            ),
            serde_json::Value::Object(map) => {
                if map.len() == 1 {
                    if let Some(serde_json::Value::String(b64)) = map.get(BYTES_TAG) {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64)
                            .map_err(|e| format!("invalid base64 in {BYTES_TAG}: {e}"))?;
                        return Ok(Value::Bytes(bytes));
                    }
                }
                Value::Map(
                    map.into_iter()
                        .map(|(k, v)| Ok((k, Self::from_json_at(v, depth + 1)?)))
                        .collect::<Result<_, String>>()?,
                )
            }
        })
    }

    /// Converts to JSON. Non-finite floats (which JSON cannot hold) become null.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Bytes(b) => serde_json::json!({
                BYTES_TAG: base64::engine::general_purpose::STANDARD.encode(b)
            }),
            Value::List(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_json).collect())
            }
            Value::Map(map) => serde_json::Value::Object(
                map.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
            ),
        }
    }

    /// How deeply lists and maps nest (a scalar is depth 0).
    pub fn depth(&self) -> usize {
        match self {
            Value::List(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Map(map) => 1 + map.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The value under `field` if this is a map.
    pub fn get(&self, field: &str) -> Option<&Value> {
        match self {
            Value::Map(map) => map.get(field),
            _ => None,
        }
    }

    /// The string inside, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Written as its JSON form (see [`Value::to_json`]) without building that form first.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap as _, SerializeSeq as _};
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(i) => serializer.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => serializer.serialize_f64(*f),
            Value::Float(_) => serializer.serialize_unit(),
            Value::String(s) => serializer.serialize_str(s),
            Value::Bytes(b) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(
                    BYTES_TAG,
                    &base64::engine::general_purpose::STANDARD.encode(b),
                )?;
                map.end()
            }
            Value::List(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    out.serialize_entry(k, v)?;
                }
                out.end()
            }
        }
    }
}

/// Read from its JSON form (see [`Value::from_json`]) without building that form first:
/// the same values, the same `$bytes` rule and the same depth limit.
impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::DeserializeSeed as _;
        ValueSeed { depth: 0 }.deserialize(deserializer)
    }
}

/// Deserializes one value at a nesting depth.
struct ValueSeed {
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed {
    /// The seed for a list item or map value inside this one.
    fn inner<E: serde::de::Error>(&self) -> Result<ValueSeed, E> {
        let depth = self.depth + 1;
        if depth > VALUE_DEPTH_MAX {
            return Err(E::custom(format!(
                "value nests deeper than {VALUE_DEPTH_MAX} levels"
            )));
        }
        Ok(ValueSeed { depth })
    }
}

impl<'de> serde::de::Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, deserializer)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        // As serde_json's `as_i64`: past i64 a whole number is a float.
        Ok(i64::try_from(u).map_or(Value::Float(u as f64), Value::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(self.inner()?)? {
            items.push(item);
        }
        Ok(Value::List(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.inner()?)?;
            out.insert(key, value);
        }
        if out.len() == 1 {
            if let Some(Value::String(b64)) = out.get(BYTES_TAG) {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| {
                        serde::de::Error::custom(format!("invalid base64 in {BYTES_TAG}: {e}"))
                    })?;
                return Ok(Value::Bytes(bytes));
            }
        }
        Ok(Value::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trip() {
        let j = json!({
            "name": "Alice", "age": 33, "ratio": 0.5, "ok": true, "none": null,
            "links": ["a", "b"], "pic": { "$bytes": "AAEC" }
        });
        let v = Value::from_json(j.clone()).unwrap();
        assert_eq!(v.get("pic"), Some(&Value::Bytes(vec![0, 1, 2])));
        assert_eq!(v.get("age"), Some(&Value::Int(33)));
        assert_eq!(v.get("ratio"), Some(&Value::Float(0.5)));
        assert_eq!(v.to_json(), j);
    }

    #[test]
    fn bytes_tag_needs_valid_base64() {
        let err = Value::from_json(json!({ "$bytes": "!!" })).unwrap_err();
        assert!(err.contains("base64"), "{err}");
        // With a second field it is an ordinary map.
        let v = Value::from_json(json!({ "$bytes": "!!", "x": 1 })).unwrap();
        assert!(matches!(v, Value::Map(_)));
    }

    #[test]
    fn depth_is_bounded() {
        let mut j = json!(1);
        for _ in 0..VALUE_DEPTH_MAX {
            j = json!([j]);
        }
        assert_eq!(
            Value::from_json(j.clone()).unwrap().depth(),
            VALUE_DEPTH_MAX
        );
        let err = Value::from_json(json!([j])).unwrap_err();
        assert!(err.contains("deeper"), "{err}");
    }

    /// Reading JSON text straight into a value, and writing it back, agree with the
    /// conversions through `serde_json::Value` on every shape and edge.
    #[test]
    fn direct_serde_agrees_with_the_json_conversions() {
        let docs = [
            r#"{"name":"Alice","age":33,"ratio":0.5,"ok":true,"none":null,"links":["a",{"b":[]}]}"#,
            r#"{"$bytes":"AAEC"}"#,
            r#"{"$bytes":"AAEC","x":1}"#,
            r#"{"$bytes":5}"#,
            r#"{"$bytes":"AA","$bytes":"AAEC"}"#,
            r#"{"a":1,"a":2}"#,
            "18446744073709551615",
            "-9223372036854775808",
            "9223372036854775807",
            "1.0",
            "-0.0",
            "1e300",
            r#""snow ☃ \u0000""#,
            "[]",
            "{}",
            "null",
        ];
        for doc in docs {
            let direct: Value = serde_json::from_str(doc).unwrap();
            let via = Value::from_json(serde_json::from_str(doc).unwrap()).unwrap();
            assert_eq!(direct, via, "{doc}");
            assert_eq!(
                serde_json::to_string(&direct).unwrap(),
                serde_json::to_string(&direct.to_json()).unwrap(),
                "{doc}"
            );
        }
        for bad in [r#"{"$bytes":"!!"}"#, "1e400", "[1,", r#"{"a"}"#] {
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
        }
        let mut deep = "1".to_string();
        for _ in 0..VALUE_DEPTH_MAX {
            deep = format!("[{deep}]");
        }
        let v: Value = serde_json::from_str(&deep).unwrap();
        assert_eq!(v.depth(), VALUE_DEPTH_MAX);
        let err = serde_json::from_str::<Value>(&format!("[{deep}]")).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
        let err =
            serde_json::from_str::<Value>(&format!(r#"{{"a":{deep}}}"#).replacen('1', "[1]", 1))
                .unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
        // Non-finite floats are written as null, as `to_json` does.
        assert_eq!(
            serde_json::to_string(&Value::Float(f64::NAN)).unwrap(),
            "null"
        );
    }

    #[test]
    fn huge_integers_become_floats() {
        let v = Value::from_json(json!(u64::MAX)).unwrap();
        assert!(matches!(v, Value::Float(_)));
    }
}
