//! A JSON value that satisfies a JSON schema: tool-call arguments and structured outputs.
//!
//! Deliberately simple, for the schemas clients send with `tools` and `response_format`:
//! `type` (one or a list), `enum`, `const`, `properties`/`required`, `items`/`minItems`/`maxItems`,
//! `minimum`/`maximum`, the first branch of `anyOf`/`oneOf`/`allOf`, and local `$ref`s. Patterns
//! and string lengths are not honoured.

use serde_json::{json, Map, Value};

/// Deeper than any schema a client writes by hand; stops a recursive `$ref` from looping.
const MAX_DEPTH: usize = 16;
/// Arrays get `minItems` items (at least one), but never more than this.
const MAX_ITEMS: u64 = 16;

/// A value matching `schema` (its required properties filled with plausible values by type).
pub fn example(schema: &Value) -> Value {
    Generator { root: schema }.value(schema, "", 0)
}

struct Generator<'a> {
    /// The whole schema, which `$ref`s point into.
    root: &'a Value,
}

impl Generator<'_> {
    /// A value for `schema`; `name` is the property it fills, to pick a plausible string.
    fn value(&self, schema: &Value, name: &str, depth: usize) -> Value {
        let Some(s) = schema.as_object() else {
            // `true` or a missing schema: anything goes.
            return json!(plausible_string(name));
        };
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        if let Some(target) = s.get("$ref").and_then(Value::as_str) {
            return match target.strip_prefix('#').and_then(|p| self.root.pointer(p)) {
                Some(t) => self.value(t, name, depth + 1),
                None => Value::Null,
            };
        }
        if let Some(c) = s.get("const") {
            return c.clone();
        }
        if let Some(first) = s.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            return first.clone();
        }
        for branch in ["anyOf", "oneOf", "allOf"] {
            if let Some(first) = s.get(branch).and_then(Value::as_array).and_then(|a| a.first()) {
                return self.value(first, name, depth + 1);
            }
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            // `["string", "null"]`: a value is more useful to a test than null.
            Some(Value::Array(types)) => types
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("null"),
            _ if s.contains_key("properties") => "object",
            _ if s.contains_key("items") => "array",
            _ => "string",
        };
        match ty {
            "object" => self.object(s, depth),
            "array" => {
                let wanted = s.get("minItems").and_then(Value::as_u64).unwrap_or(1).max(1);
                let allowed = s.get("maxItems").and_then(Value::as_u64).unwrap_or(u64::MAX);
                let item = self.value(s.get("items").unwrap_or(&Value::Bool(true)), name, depth + 1);
                Value::Array(vec![item; wanted.min(allowed).min(MAX_ITEMS) as usize])
            }
            "integer" => json!(number(s, 1.0).ceil() as i64),
            "number" => json!(number(s, 1.5)),
            "boolean" => json!(true),
            "null" => Value::Null,
            _ => json!(plausible_string(name)),
        }
    }

    /// The required properties (all of them when none is marked required), in schema order.
    fn object(&self, s: &Map<String, Value>, depth: usize) -> Value {
        let empty = Map::new();
        let properties = s.get("properties").and_then(Value::as_object).unwrap_or(&empty);
        let required: Vec<&str> = match s.get("required").and_then(Value::as_array) {
            Some(r) => r.iter().filter_map(Value::as_str).collect(),
            None => properties.keys().map(String::as_str).collect(),
        };
        let mut out = Map::new();
        // Schema order reads naturally; a required name without a schema still gets a value.
        for (key, schema) in properties.iter().filter(|(k, _)| required.contains(&k.as_str())) {
            out.insert(key.clone(), self.value(schema, key, depth + 1));
        }
        for key in required.iter().filter(|k| !properties.contains_key(**k)) {
            out.insert((*key).to_owned(), json!(plausible_string(key)));
        }
        Value::Object(out)
    }
}

/// `fallback`, moved inside `minimum`/`maximum` (and their exclusive forms) when it is outside.
fn number(s: &Map<String, Value>, fallback: f64) -> f64 {
    let get = |k: &str| s.get(k).and_then(Value::as_f64);
    let mut n = fallback;
    if let Some(min) = get("minimum") {
        n = n.max(min);
    }
    if let Some(min) = get("exclusiveMinimum") {
        n = n.max(min + 1.0);
    }
    if let Some(max) = get("maximum") {
        n = n.min(max);
    }
    if let Some(max) = get("exclusiveMaximum") {
        n = n.min(max - 1.0);
    }
    n
}

/// A string that reads like what a model would put in a property of this name.
fn plausible_string(name: &str) -> &'static str {
    let name = name.to_ascii_lowercase();
    let known = [
        ("email", "user@example.com"),
        ("url", "https://example.com"),
        ("date", "2024-01-01"),
        ("time", "12:00"),
        ("city", "Paris"),
        ("location", "Paris, France"),
        ("country", "France"),
        ("name", "Ada Lovelace"),
        ("id", "id_123"),
        ("query", "example query"),
    ];
    known
        .iter()
        .find(|(part, _)| name.contains(part))
        .map_or("example", |(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_required_properties_by_type() {
        let schema = json!({
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 3},
                "ratio": {"type": "number", "maximum": 0.5},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "exact": {"type": "boolean"},
                "note": {"type": ["string", "null"]},
                "optional": {"type": "string"}
            },
            "required": ["location", "unit", "days", "ratio", "tags", "exact", "note", "missing"]
        });
        assert_eq!(
            example(&schema),
            json!({
                "location": "Paris, France", "unit": "celsius", "days": 3, "ratio": 0.5,
                "tags": ["example", "example"], "exact": true, "note": "example", "missing": "example"
            })
        );
    }

    #[test]
    fn follows_refs_branches_and_nesting() {
        let schema = json!({
            "type": "object",
            "properties": {
                "person": {"$ref": "#/$defs/person"},
                "kind": {"anyOf": [{"const": "a"}, {"type": "string"}]},
                "loop": {"$ref": "#"}
            },
            "required": ["person", "kind"],
            "$defs": {"person": {"properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}}
        });
        assert_eq!(
            example(&schema),
            json!({"person": {"name": "Ada Lovelace", "age": 1}, "kind": "a"})
        );
        // A schema that refers to itself ends rather than recursing forever.
        let recursive = json!({"type": "object", "properties": {"next": {"$ref": "#"}}});
        let mut v = &example(&recursive);
        let mut depth = 0;
        while let Some(next) = v.get("next") {
            v = next;
            depth += 1;
        }
        assert!(depth <= MAX_DEPTH, "{depth}");
        assert_eq!(example(&json!({})), json!("example"));
    }
}
