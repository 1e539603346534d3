//! Cache keys: `type:handler_version:sha256(owner, canonical JSON of the input)`.
//!
//! Canonical JSON sorts object keys at every depth and has no whitespace, so
//! two inputs that differ only in key order or spacing share a cache entry.
//! The handler version is part of the key: a new version never serves an old
//! version's result. So is the job's owner, unless the type's manifest says
//! `cache_scope = "global"`: one user never gets another's result by
//! guessing their input.

use serde_json::Value;
use sha2::{Digest, Sha256};

use quern_runtime::manifest::CacheScope;

/// The cache key of `input` for a job of `owner`, under the type's scope.
pub fn cache_key(job_type: &str, version: &str, scope: CacheScope, owner: &str, input: &Value) -> String {
    let mut digest = Sha256::new();
    if scope == CacheScope::User {
        // Length-prefixed, so no owner and input can run into another pair.
        digest.update(format!("user:{}:{owner}\n", owner.len()).as_bytes());
    }
    digest.update(canonical_json(input).as_bytes());
    format!("{job_type}:{version}:{}", hex::encode(digest.finalize()))
}

/// `value` as JSON text with object keys sorted at every depth.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_of(job_type: &str, version: &str, input: &Value) -> String {
        cache_key(job_type, version, CacheScope::Global, "anyone", input)
    }

    #[test]
    fn a_user_scoped_key_belongs_to_its_owner() {
        let input = json!({"exam": "hemograma"});
        let alice = cache_key("medical_exam", "v1", CacheScope::User, "alice", &input);
        assert_ne!(alice, cache_key("medical_exam", "v1", CacheScope::User, "bob", &input));
        assert_eq!(alice, cache_key("medical_exam", "v1", CacheScope::User, "alice", &input));
        assert_ne!(alice, key_of("medical_exam", "v1", &input), "a global key is shared, a user's is not");
        assert_eq!(key_of("t", "v", &input), cache_key("t", "v", CacheScope::Global, "bob", &input));
    }

    #[test]
    fn key_order_and_spacing_do_not_matter_at_any_depth() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 1}], "x": null}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#);
        assert_eq!(key_of("sofia_text", "abc", &a), key_of("sofia_text", "abc", &b));
    }

    #[test]
    fn type_version_and_values_all_count() {
        let input = json!({"text": "arroz"});
        let key = key_of("sofia_text", "v1", &input);
        assert!(key.starts_with("sofia_text:v1:"));
        assert_eq!(key.len(), "sofia_text:v1:".len() + 64);
        assert_ne!(key, key_of("sofia_text", "v2", &input));
        assert_ne!(key, key_of("sofia_image", "v1", &input));
        assert_ne!(key, key_of("sofia_text", "v1", &json!({"text": "feijão"})));
        assert_ne!(key_of("t", "v", &json!([1, 2])), key_of("t", "v", &json!([2, 1])), "array order counts");
    }

    #[test]
    fn strings_are_escaped_canonically() {
        assert_eq!(canonical_json(&json!({"k\"ey": "line\nbreak"})), r#"{"k\"ey":"line\nbreak"}"#);
    }
}
