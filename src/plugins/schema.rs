//! A small JSON Schema subset for plugin configs.
//!
//! Supported keywords: `type` (one name or a list), `enum`, `const`, `required`, `properties`,
//! `additionalProperties` (boolean or schema), `items`, `minItems`, `maxItems`, `minimum`,
//! `maximum`, `minLength`, `maxLength`. Anything else is ignored, so a full schema still loads
//! and the supported part of it is enforced. A full validator crate was not worth its build
//! cost and dependency tree for configs this small.

use serde_json::Value;

/// Validates `value` against `schema`; the error names the offending path (`$.rules[0].match`).
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "$")
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => true,
    }
}

fn check(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    let Some(schema) = schema.as_object() else {
        // `true` / `{}` accept everything; `false` accepts nothing.
        return match schema {
            Value::Bool(false) => Err(format!("{path} is not allowed")),
            _ => Ok(()),
        };
    };
    match schema.get("type") {
        Some(Value::String(t)) if !type_matches(t, value) => {
            return Err(format!("{path} must be of type {t}"));
        }
        Some(Value::Array(types)) => {
            let names: Vec<&str> = types.iter().filter_map(Value::as_str).collect();
            if !names.iter().any(|t| type_matches(t, value)) {
                return Err(format!("{path} must be of type {}", names.join(" or ")));
            }
        }
        _ => {}
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        if !allowed.contains(value) {
            return Err(format!(
                "{path} must be one of {}",
                Value::Array(allowed.clone())
            ));
        }
    }
    if let Some(expected) = schema.get("const") {
        if expected != value {
            return Err(format!("{path} must equal {expected}"));
        }
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            if n < min {
                return Err(format!("{path} must be at least {min}"));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            if n > max {
                return Err(format!("{path} must be at most {max}"));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            if len < min {
                return Err(format!("{path} must be at least {min} characters"));
            }
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if len > max {
                return Err(format!("{path} must be at most {max} characters"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
            if len < min {
                return Err(format!("{path} must have at least {min} items"));
            }
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
            if len > max {
                return Err(format!("{path} must have at most {max} items"));
            }
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(item_schema, item, &format!("{path}[{i}]"))?;
            }
        }
    }
    if let Some(object) = value.as_object() {
        if let Some(Value::Array(required)) = schema.get("required") {
            for key in required.iter().filter_map(Value::as_str) {
                if !object.contains_key(key) {
                    return Err(format!("{path}.{key} is required"));
                }
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (key, item) in object {
            let child = format!("{path}.{key}");
            match properties.and_then(|p| p.get(key)) {
                Some(prop_schema) => check(prop_schema, item, &child)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("{child} is not an allowed property"));
                    }
                    Some(extra @ Value::Object(_)) => check(extra, item, &child)?,
                    _ => {}
                },
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn data_driven_cases() {
        let schema = json!({
            "type": "object",
            "required": ["rules"],
            "additionalProperties": false,
            "properties": {
                "rules": {"type": "array", "maxItems": 2, "items": {
                    "type": "object", "required": ["match"],
                    "properties": {
                        "match": {"type": "string", "minLength": 1},
                        "action": {"enum": ["rewrite", "veto"]}
                    }
                }},
                "maxChars": {"type": "integer", "minimum": 1, "maximum": 10000}
            }
        });
        let cases = [
            (json!({"rules": []}), None),
            (json!({"rules": [{"match": "x", "action": "veto"}]}), None),
            (json!({}), Some("$.rules is required")),
            (
                json!({"rules": [], "x": 1}),
                Some("$.x is not an allowed property"),
            ),
            (
                json!({"rules": [{"match": ""}]}),
                Some("$.rules[0].match must be at least 1"),
            ),
            (
                json!({"rules": [{"match": "a", "action": "x"}]}),
                Some("$.rules[0].action must be one of"),
            ),
            (
                json!({"rules": [], "maxChars": 0}),
                Some("$.maxChars must be at least 1"),
            ),
            (
                json!({"rules": [], "maxChars": 1.5}),
                Some("$.maxChars must be of type integer"),
            ),
            (
                json!({"rules": [{}, {}, {}]}),
                Some("$.rules must have at most 2 items"),
            ),
            (json!([1]), Some("$ must be of type object")),
        ];
        for (value, expected) in cases {
            let got = validate(&schema, &value);
            match expected {
                None => assert!(got.is_ok(), "{value}: {got:?}"),
                Some(prefix) => {
                    let err = got.err().unwrap_or_default();
                    assert!(
                        err.starts_with(prefix),
                        "{value}: got {err:?}, want {prefix:?}"
                    );
                }
            }
        }
    }
}
