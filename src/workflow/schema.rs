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

use super::gates::count_words;
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

/// The review schema for the review step's default output cap
/// (`llm.steps.review.max_output_tokens`); see `review_format_for`.
pub fn review_format() -> StructuredFormat {
    review_format_for(crate::config::StepsConfig::default().review.max_output_tokens)
}

/// The review schema, its lists bounded so that a model filling both to the
/// brim (small ones do) still closes the JSON within `max_output_tokens`:
/// constrained decoding then never runs into the cut-off. Assumes at least
/// 2 characters per token and ~8 tokens of punctuation per item; the rest of
/// the object is allowed 64 tokens. Never more than `REVIEW_ITEMS_MAX` items
/// of `2 * SHORT_TEXT_MAX` characters, never fewer than one of 40.
pub fn review_format_for(max_output_tokens: u32) -> StructuredFormat {
    let per_list = u64::from(max_output_tokens).saturating_sub(64) / 2;
    let items = (per_list / 48).clamp(1, REVIEW_ITEMS_MAX);
    let item_chars = ((per_list / items).saturating_sub(8) * 2).clamp(40, SHORT_TEXT_MAX * 2);
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
        list["maxItems"] = json!(items);
        list["items"]["maxLength"] = json!(item_chars);
    }
    StructuredFormat { name: "review", schema }
}

/// Characters per word assumed when a section's word budget becomes a
/// string length: long words for the lower bound (so a body that reaches
/// `minLength` most likely has enough words), short words for the upper
/// bound (so a body at `maxLength` most likely has not too many).
const CHARS_PER_WORD_LONG: u64 = 7;
const CHARS_PER_WORD_SHORT: u64 = 4;

/// The keys of a structured draft, each with the `## ` heading whose text it
/// holds: one per outline section, in order, then the conclusion. Keys are
/// numbered (`01_…`) so they stay unique and sort in document order (schema
/// objects are sent with their keys sorted, and models write properties in
/// schema order), and carry a slug of the heading so the model sees which
/// section it is writing.
pub fn draft_keys(outline: &Outline) -> Vec<(String, String)> {
    let headings = outline.sections.iter().map(String::as_str).chain(std::iter::once(CONCLUSION));
    headings.enumerate().map(|(i, h)| (format!("{:02}_{}", i + 1, slug(h)), h.to_string())).collect()
}

/// The heading the code adds after the outline's sections.
pub const CONCLUSION: &str = "Conclusion";

/// Lowercase ASCII letters and digits joined by `_`, at most 40 characters.
fn slug(heading: &str) -> String {
    let mut out = String::new();
    for word in heading.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
        if out.len() + word.len() + 1 > 40 {
            break;
        }
        if !out.is_empty() {
            out.push('_');
        }
        out.push_str(&word.to_ascii_lowercase());
    }
    if out.is_empty() {
        out.push_str("section");
    }
    out
}

/// Schema of a structured draft (`kinds.NAME.structured_draft`): an object
/// with one required string per section (see `draft_keys`), each bounded so
/// that the rendered markdown lands near the kind's word range. The code
/// renders the title and headings; the model writes only the text.
pub fn draft_format(kind: &KindConfig, outline: &Outline) -> StructuredFormat {
    let keys = draft_keys(outline);
    let fields = keys.len().max(1) as u64;
    // Title and headings are rendered by the code but count as words.
    let fixed =
        u64::from(count_words(&outline.title)) + keys.iter().map(|(_, h)| u64::from(count_words(h))).sum::<u64>();
    let body_min = u64::from(kind.min_words).saturating_sub(fixed);
    let body_max = u64::from(kind.max_words).saturating_sub(fixed).max(fields);
    let min_chars = (body_min * CHARS_PER_WORD_LONG).div_ceil(fields).max(1);
    let max_chars = (body_max * CHARS_PER_WORD_SHORT / fields).max(min_chars + 40);
    let mut properties = serde_json::Map::new();
    for (key, heading) in &keys {
        properties.insert(
            key.clone(),
            json!({
                "type": "string",
                "description": format!("Prose paragraphs under the heading `## {heading}`, without any heading."),
                "minLength": min_chars,
                "maxLength": max_chars,
            }),
        );
    }
    let mut schema = json!({ "type": "object", "properties": properties });
    strictify(&mut schema);
    StructuredFormat { name: "draft", schema }
}

fn derived<T: JsonSchema>() -> Value {
    let mut value = schemars::schema_for!(T).to_value();
    strictify(&mut value);
    value
}

/// Rewrites a schemars schema in place into the strict subset.
pub fn strictify(value: &mut Value) {
    let Value::Object(map) = value else { return };
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
    for child in subschemas_mut(map) {
        strictify(child);
    }
}

/// The subschemas of a schema node: property schemas, `items`, an
/// `additionalProperties` schema, `anyOf`/`allOf`/`oneOf` branches, `not`
/// and `$defs`. The keys of `properties` and `$defs` are names, not
/// keywords: a walk over the raw JSON would take a property called `title`
/// for the `title` keyword and delete it.
fn subschemas_mut(map: &mut serde_json::Map<String, Value>) -> Vec<&mut Value> {
    let mut out = Vec::new();
    for (key, child) in map.iter_mut() {
        match (key.as_str(), child) {
            ("properties" | "$defs" | "definitions", Value::Object(named)) => out.extend(named.values_mut()),
            ("items" | "additionalProperties" | "not", child @ Value::Object(_)) => out.push(child),
            ("anyOf" | "allOf" | "oneOf" | "prefixItems", Value::Array(branches)) => out.extend(branches.iter_mut()),
            _ => {}
        }
    }
    out
}

/// Removes string length keywords, for providers whose strict mode does not
/// document them (OpenAI lists only `pattern` and `format` for strings). The
/// gates still enforce the same bounds after parsing.
pub fn without_string_lengths(schema: &Value) -> Value {
    fn walk(v: &mut Value) {
        let Value::Object(map) = v else { return };
        map.remove("minLength");
        map.remove("maxLength");
        for child in subschemas_mut(map) {
            walk(child);
        }
    }
    let mut copy = schema.clone();
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
        let Value::Object(map) = v else { return Err(format!("{path}: a schema must be an object")) };
        for key in map.keys() {
            if !ALLOWED_KEYWORDS.contains(&key.as_str()) {
                return Err(format!("{path}: keyword `{key}` is not allowed in strict mode"));
            }
        }
        if !["type", "enum", "const", "anyOf", "$ref"].iter().any(|k| map.contains_key(*k)) {
            return Err(format!("{path}: schema must set `type` (or `enum`, `const`, `anyOf`, `$ref`)"));
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
        if let Some(child) = map.get("items") {
            walk(child, &format!("{path}/items"))?;
        }
        // `false` (required above for objects) is not a subschema.
        if let Some(child @ Value::Object(_)) = map.get("additionalProperties") {
            walk(child, &format!("{path}/additionalProperties"))?;
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
    fn draft_schema_is_strict_and_follows_the_outline() {
        let outline = Outline {
            title: "Heat pumps".into(),
            sections: vec!["How They Work".into(), "Costs & savings?".into(), "¿?".into()],
        };
        let kind = KindConfig { min_words: 60, max_words: 150, structured_draft: true, ..KindConfig::default() };
        let f = draft_format(&kind, &outline);
        assert_eq!(f.name, "draft");
        check_strict(&f.schema).unwrap();
        check_strict(&without_string_lengths(&f.schema)).unwrap();
        let keys: Vec<&String> = f.schema["properties"].as_object().unwrap().keys().collect();
        // Sorted keys are document order.
        assert_eq!(keys, ["01_how_they_work", "02_costs_savings", "03_section", "04_conclusion"]);
        assert_eq!(f.schema["required"].as_array().unwrap().len(), 4);
        for key in keys {
            let field = &f.schema["properties"][key];
            let (min, max) = (field["minLength"].as_u64().unwrap(), field["maxLength"].as_u64().unwrap());
            assert!(0 < min && min < max && max < 1000, "{key}: {min}..{max}");
        }
        // A tiny word range still gives a usable, ordered range.
        let tiny = KindConfig { min_words: 1, max_words: 2, ..KindConfig::default() };
        let t = draft_format(&tiny, &outline);
        let field = &t.schema["properties"]["01_how_they_work"];
        assert!(field["minLength"].as_u64() < field["maxLength"].as_u64());
        let long = "word ".repeat(30);
        assert!(draft_keys(&Outline { title: "t".into(), sections: vec![long] })[0].0.len() <= 43);
    }

    #[test]
    fn checker_rejects_loose_schemas() {
        let cases = [
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": [], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}, "required": ["a"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "string", "default": "x"}}, "required": ["a"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"maxLength": 3}}, "required": ["a"], "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {}}, "required": ["a"], "additionalProperties": false}),
        ];
        for c in cases {
            assert!(check_strict(&c).is_err(), "{c}");
        }
    }

    #[test]
    fn review_lists_fit_the_output_allowance() {
        for tokens in [100, 256, 512, 768, 2000, 16000] {
            let f = review_format_for(tokens);
            check_strict(&f.schema).unwrap();
            let list = &f.schema["properties"]["issues"];
            let (items, chars) = (list["maxItems"].as_u64().unwrap(), list["items"]["maxLength"].as_u64().unwrap());
            assert!((1..=REVIEW_ITEMS_MAX).contains(&items) && (40..=SHORT_TEXT_MAX * 2).contains(&chars));
            // Two full lists at 2 characters and 8 extra tokens per item.
            let worst = 64 + 2 * items * (chars / 2 + 8);
            assert!(worst <= u64::from(tokens) || chars == 40 && items == 1, "{tokens}: {items} x {chars}");
        }
        assert_eq!(review_format_for(2000).schema["properties"]["suggestions"]["maxItems"], REVIEW_ITEMS_MAX);
    }

    #[test]
    fn properties_named_like_keywords_survive() {
        // `Outline` has a property called `title`: it is a name, not noise.
        let o = outline_format(&KindConfig::default());
        assert_eq!(o.schema["properties"]["title"]["type"], "string");
        assert_eq!(o.schema["required"], json!(["sections", "title"]));
        let mut s = json!({"type": "object", "title": "T", "properties": {
            "title": {"type": "string", "title": "x"},
            "maxLength": {"type": "string", "maxLength": 5},
            "default": {"type": "array", "items": {"type": "string", "default": "d"}, "maxItems": 2},
        }});
        strictify(&mut s);
        assert!(s.get("title").is_none());
        assert_eq!(s["properties"]["title"], json!({"type": "string"}));
        assert_eq!(s["properties"]["default"]["items"], json!({"type": "string"}));
        let loose = without_string_lengths(&s);
        assert_eq!(loose["properties"]["maxLength"], json!({"type": "string"}));
        check_strict(&s).unwrap();
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
        assert_eq!(rv.schema["properties"]["issues"]["maxItems"], REVIEW_ITEMS_MAX);
        assert!(rv.schema["properties"]["score"].get("format").is_none());
    }
}
