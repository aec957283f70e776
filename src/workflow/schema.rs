//! JSON Schemas for structured steps, derived from the Rust types with
//! schemars and then made to fit the subset that OpenAI strict mode and
//! llama.cpp's schema-to-grammar both accept.
//!
//! The rules (OpenAI "Structured Outputs", strict: true): every object sets
//! `additionalProperties: false` and lists every property in `required`;
//! no `format` on integers, no `default`, no `$schema`/`title` noise. We add
//! bounds on every array and string so constrained decoders on small local
//! models cannot loop until `max_tokens`.

use schemars::JsonSchema;
use serde_json::{json, Value};

use super::{Outline, Review, Route};
use crate::config::KindConfig;

/// Longest string we let the model put in a short field (title, heading,
/// review item).
pub const SHORT_TEXT_MAX: u64 = 200;
/// Most review issues/suggestions we accept.
pub const REVIEW_ITEMS_MAX: u64 = 8;

/// A named schema ready for `text.format` / `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredFormat {
    pub name: &'static str,
    pub schema: Value,
}

pub fn route_format(kinds: &[String]) -> StructuredFormat {
    let mut schema = derived::<Route>();
    schema["properties"]["kind"] = json!({
        "type": "string",
        "description": "One of the configured workflow kinds.",
        "enum": kinds,
    });
    StructuredFormat { name: "route", schema }
}

pub fn outline_format(kind: &KindConfig) -> StructuredFormat {
    let mut schema = derived::<Outline>();
    schema["properties"]["title"]["maxLength"] = json!(SHORT_TEXT_MAX);
    schema["properties"]["title"]["minLength"] = json!(1);
    let sections = &mut schema["properties"]["sections"];
    sections["minItems"] = json!(kind.min_sections);
    sections["maxItems"] = json!(kind.max_sections);
    sections["items"]["minLength"] = json!(1);
    sections["items"]["maxLength"] = json!(80);
    StructuredFormat { name: "outline", schema }
}

pub fn review_format() -> StructuredFormat {
    let mut schema = derived::<Review>();
    schema["properties"]["score"] = json!({
        "type": "integer",
        "description": "Overall quality from 0 (unusable) to 10 (excellent).",
        "minimum": 0,
        "maximum": 10,
    });
    for field in ["issues", "suggestions"] {
        let list = &mut schema["properties"][field];
        list["minItems"] = json!(0);
        list["maxItems"] = json!(REVIEW_ITEMS_MAX);
        list["items"]["maxLength"] = json!(SHORT_TEXT_MAX * 2);
    }
    StructuredFormat { name: "review", schema }
}

fn derived<T: JsonSchema>() -> Value {
    let mut value = schemars::schema_for!(T).to_value();
    strictify(&mut value);
    value
}

/// Rewrites a schemars schema in place into the strict subset.
pub fn strictify(value: &mut Value) {
    if let Value::Object(map) = value {
        for noise in ["$schema", "title", "default", "examples"] {
            map.remove(noise);
        }
        if map.get("type") == Some(&json!("integer")) || map.get("type") == Some(&json!("number")) {
            map.remove("format");
        }
        if map.contains_key("properties") {
            let keys: Vec<Value> = map
                .get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().map(Value::String).collect())
                .unwrap_or_default();
            map.insert("required".into(), Value::Array(keys));
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
        for (_, child) in map.iter_mut() {
            strictify(child);
        }
    } else if let Value::Array(items) = value {
        for item in items {
            strictify(item);
        }
    }
}

/// Removes string length keywords, for providers whose strict mode does not
/// document them (OpenAI lists only `pattern` and `format` for strings). The
/// gates still enforce the same bounds after parsing.
pub fn without_string_lengths(schema: &Value) -> Value {
    let mut copy = schema.clone();
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("minLength");
                map.remove("maxLength");
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut copy);
    copy
}

/// Keywords OpenAI strict mode accepts on a schema node.
const ALLOWED_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "description",
    "anyOf",
    "$ref",
    "$defs",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "pattern",
    "format",
    "minLength",
    "maxLength",
];

/// Checks a schema against the strict-mode rules; returns the first breach
/// as a JSON-pointer-ish path and reason. Used by tests and at startup.
pub fn check_strict(schema: &Value) -> Result<(), String> {
    fn walk(v: &Value, path: &str) -> Result<(), String> {
        let Value::Object(map) = v else { return Ok(()) };
        for key in map.keys() {
            if !ALLOWED_KEYWORDS.contains(&key.as_str()) {
                return Err(format!("{path}: keyword `{key}` is not allowed in strict mode"));
            }
        }
        let is_object = map.get("type") == Some(&json!("object")) || map.contains_key("properties");
        if is_object {
            if map.get("additionalProperties") != Some(&Value::Bool(false)) {
                return Err(format!("{path}: object must set additionalProperties: false"));
            }
            let props: Vec<&String> =
                map.get("properties").and_then(Value::as_object).map(|p| p.keys().collect()).unwrap_or_default();
            let required: Vec<&str> = map
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for p in props {
                if !required.contains(&p.as_str()) {
                    return Err(format!("{path}: property `{p}` must be listed in required"));
                }
            }
        }
        if map.get("type") == Some(&json!("array")) && !map.contains_key("maxItems") {
            return Err(format!("{path}: array must be bounded by maxItems"));
        }
        if let Some(props) = map.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                walk(child, &format!("{path}/properties/{name}"))?;
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = map.get(key) {
                walk(child, &format!("{path}/{key}"))?;
            }
        }
        for key in ["anyOf"] {
            if let Some(Value::Array(children)) = map.get(key) {
                for (i, child) in children.iter().enumerate() {
                    walk(child, &format!("{path}/{key}/{i}"))?;
                }
            }
        }
        if let Some(Value::Object(defs)) = map.get("$defs") {
            for (name, child) in defs {
                walk(child, &format!("{path}/$defs/{name}"))?;
            }
        }
        Ok(())
    }
    walk(schema, "#")
}

/// All structured formats for a config, for startup checks and tests.
pub fn all_formats(kinds: &[String], kind_configs: &[&KindConfig]) -> Vec<StructuredFormat> {
    let mut out = vec![route_format(kinds), review_format()];
    out.extend(kind_configs.iter().map(|k| outline_format(k)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_schemas_are_strict() {
        let kind = KindConfig::default();
        for f in all_formats(&["article".into(), "tutorial".into()], &[&kind]) {
            check_strict(&f.schema).unwrap_or_else(|e| panic!("{}: {e}", f.name));
            check_strict(&without_string_lengths(&f.schema)).unwrap();
            assert_eq!(f.schema["type"], "object");
        }
    }

    #[test]
    fn checker_rejects_loose_schemas() {
        let cases = [
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": [], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}, "required": ["a"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "string", "default": "x"}}, "required": ["a"], "additionalProperties": false}),
        ];
        for c in cases {
            assert!(check_strict(&c).is_err(), "{c}");
        }
    }

    #[test]
    fn route_enum_lists_kinds_and_outline_bounds_follow_kind() {
        let r = route_format(&["a".into(), "b".into()]);
        assert_eq!(r.schema["properties"]["kind"]["enum"], json!(["a", "b"]));
        let kind = KindConfig { min_sections: 2, max_sections: 4, ..KindConfig::default() };
        let o = outline_format(&kind);
        assert_eq!(o.schema["properties"]["sections"]["minItems"], 2);
        assert_eq!(o.schema["properties"]["sections"]["maxItems"], 4);
        let rv = review_format();
        assert_eq!(rv.schema["properties"]["score"]["maximum"], 10);
        assert!(rv.schema["properties"]["score"].get("format").is_none());
    }
}
