//! Tuples as templates see them — `{ key, value, version }` — converted lazily.
//!
//! A page that lists 10,000 tuples usually prints a field or two of each. Converting every
//! value into minijinja values up front costs an allocation per field of every tuple; these
//! views convert a field only when the template reads it, and share one tuple between all
//! the views into it.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value as JValue};
use sesame_proto::{Tuple, Value};

/// A tuple in a template.
pub fn tuple_value(tuple: Tuple) -> JValue {
    JValue::from_object(TupleView(tuple))
}

#[derive(Debug)]
struct TupleView(Tuple);

impl Object for TupleView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match key.as_str()? {
            "key" => Some(JValue::from(self.0.key.as_str())),
            "value" => Some(view(self, Vec::new(), &self.0.value)),
            "version" => Some(JValue::from(self.0.version)),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["key", "value", "version"])
    }
}

/// One step from a value to a value inside it.
#[derive(Debug, Clone)]
enum Step {
    Field(String),
    Index(usize),
}

/// A map or list inside a tuple's value, named by its path from the value's root.
#[derive(Debug)]
struct ValueView {
    tuple: Arc<TupleView>,
    path: Vec<Step>,
}

impl ValueView {
    fn value(&self) -> &Value {
        let mut value = &self.tuple.0.value;
        for step in &self.path {
            value = match (value, step) {
                (Value::Map(map), Step::Field(field)) => map.get(field),
                (Value::List(items), Step::Index(i)) => items.get(*i),
                _ => None,
            }
            .expect("a view's path is built from the entries of an immutable value");
        }
        value
    }

    fn child(&self, step: Step, value: &Value) -> JValue {
        let mut path = Vec::with_capacity(self.path.len() + 1);
        path.extend(self.path.iter().cloned());
        path.push(step);
        view(&self.tuple, path, value)
    }
}

/// Scalars convert at once; maps and lists become views.
fn view(tuple: &Arc<TupleView>, path: Vec<Step>, value: &Value) -> JValue {
    match value {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Int(i) => JValue::from(*i),
        Value::Float(f) => JValue::from(*f),
        Value::String(s) => JValue::from(s.as_str()),
        Value::Bytes(b) => JValue::from_bytes(b.clone()),
        Value::Map(_) | Value::List(_) => JValue::from_object(ValueView {
            tuple: Arc::clone(tuple),
            path,
        }),
    }
}

impl Object for ValueView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        match self.value() {
            Value::List(_) => ObjectRepr::Seq,
            _ => ObjectRepr::Map,
        }
    }

    fn get_value(self: &Arc<Self>, key: &JValue) -> Option<JValue> {
        match self.value() {
            Value::Map(map) => {
                let field = key.as_str()?;
                let value = map.get(field)?;
                Some(self.child(Step::Field(field.to_string()), value))
            }
            Value::List(items) => {
                let i = key.as_usize()?;
                let value = items.get(i)?;
                Some(self.child(Step::Index(i), value))
            }
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        match self.value() {
            Value::Map(map) => {
                Enumerator::Values(map.keys().map(|k| JValue::from(k.as_str())).collect())
            }
            Value::List(items) => Enumerator::Seq(items.len()),
            _ => Enumerator::Empty,
        }
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        match self.value() {
            Value::Map(map) => Some(map.len()),
            Value::List(items) => Some(items.len()),
            _ => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::Environment;
    use sesame_proto::Home;

    fn render(source: &str, value: serde_json::Value) -> String {
        let tuple = Tuple {
            site: "demo".into(),
            collection: "c".into(),
            key: "k".into(),
            value: Value::from_json(value).unwrap(),
            version: 7,
            origin: None,
            home: Home::Site,
        };
        let env = Environment::new();
        env.render_str(source, minijinja::context! { t => tuple_value(tuple) })
            .unwrap()
    }

    #[test]
    fn fields_lists_and_maps() {
        let v = serde_json::json!({ "name": "A", "tags": ["x", "y"], "n": { "deep": [1, { "z": true }] }, "none": null });
        assert_eq!(
            render("{{ t.key }} {{ t.version }} {{ t.value.name }}", v.clone()),
            "k 7 A"
        );
        assert_eq!(render("{% for x in t.value.tags %}{{ x }}{% endfor %} {{ t.value.tags|length }} {{ t.value.tags[1] }}", v.clone()), "xy 2 y");
        assert_eq!(render("{{ t.value.n.deep[1].z }} {{ t.value.missing is undefined }} {{ t.value.none is none }}", v.clone()), "True True True");
        assert_eq!(
            render("{% for k in t.value %}{{ k }},{% endfor %}", v.clone()),
            "n,name,none,tags,"
        );
        assert_eq!(
            render(
                "{{ t.value.tags|tojson }} {{ t.value.n|tojson }}",
                v.clone()
            ),
            r#"["x","y"] {"deep":[1,{"z":true}]}"#
        );
        assert_eq!(
            render("{{ t|tojson }}", serde_json::json!([])),
            r#"{"key":"k","value":[],"version":7}"#
        );
        assert_eq!(
            render(
                "{{ 'yes' if t.value.tags else 'no' }} {{ 'yes' if t.value.empty else 'no' }}",
                serde_json::json!({"tags": [], "empty": {}})
            ),
            "no no"
        );
        assert_eq!(render("{{ t.value.tags[-1] }}", v), "y");
    }
}
