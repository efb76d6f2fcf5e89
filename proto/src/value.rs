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

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = serde_json::Value::deserialize(deserializer)?;
        Value::from_json(json).map_err(serde::de::Error::custom)
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

    #[test]
    fn huge_integers_become_floats() {
        let v = Value::from_json(json!(u64::MAX)).unwrap();
        assert!(matches!(v, Value::Float(_)));
    }
}
