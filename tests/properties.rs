//! Hostile input, by property: cache keys, handler manifests and tokens
//! are parsed from whatever arrives, and must never panic, never accept what
//! they should refuse, and never let key order change a cache key.

use proptest::prelude::*;
use quern_api::auth::{Auth, AuthSettings, PremiumRule, mint};
use quern_queue::cache_key::{cache_key, canonical_json};
use quern_runtime::manifest::CacheScope;
use quern_runtime::manifest::Manifest;
use serde_json::{Map, Value};

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((".{0,8}", inner), 0..6).prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// The same object with its keys inserted in the reverse order, at every depth.
fn reversed(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, inner) in map.iter().rev() {
                out.insert(key.clone(), reversed(inner));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(reversed).collect()),
        other => other.clone(),
    }
}

fn auth() -> Auth {
    Auth::new(AuthSettings {
        hs256_secret: Some(b"property-secret".to_vec()),
        jwks_url: None,
        audience: None,
        premium: PremiumRule::parse("app_metadata.plan=premium").unwrap(),
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn canonical_json_reads_back_as_the_same_value(value in json()) {
        let text = canonical_json(&value);
        let back: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &value);
        prop_assert_eq!(canonical_json(&back), text);
    }

    #[test]
    fn key_order_never_changes_a_cache_key(value in json()) {
        prop_assert_eq!(
            cache_key("t", "v1", CacheScope::User, "u", &value),
            cache_key("t", "v1", CacheScope::User, "u", &reversed(&value))
        );
    }

    #[test]
    fn any_text_as_a_manifest_parses_or_names_its_problem(text in ".{0,200}") {
        if let Err(error) = Manifest::parse(&text) {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn manifests_with_arbitrary_values_never_grant_host_secrets(
        job_type in "[a-z][a-z0-9_]{0,20}",
        key in "[A-Za-z_]{1,24}",
        host in "[a-z0-9.*:-]{0,30}",
        memory in any::<u32>(),
    ) {
        let text = format!(
            "type = \"{job_type}\"\n[http]\nallowed_hosts = [\"{host}\"]\n[config]\nkeys = [\"{key}\"]\n[limits]\nmemory_mb = {memory}\n"
        );
        if let Ok(manifest) = Manifest::parse(&text) {
            let upper = manifest.config_keys[0].to_ascii_uppercase();
            prop_assert!(!upper.starts_with("QUERN_") && !upper.starts_with("PG") && upper != "DATABASE_URL");
            prop_assert!((1..=quern_runtime::manifest::MAX_MEMORY_MB).contains(&memory));
        }
    }

    #[test]
    fn arbitrary_tokens_are_refused_without_panicking(token in ".{0,300}") {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        prop_assert!(runtime.block_on(auth().verify(&token)).is_err());
    }

    #[test]
    fn a_token_with_one_byte_changed_is_refused(user in "[a-z0-9-]{1,20}", at in any::<prop::sample::Index>()) {
        let token = mint(b"property-secret", &user, false, None, std::time::Duration::from_secs(60)).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        prop_assert_eq!(runtime.block_on(auth().verify(&token)).unwrap().user_id, user);
        let mut bytes = token.into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        prop_assert!(runtime.block_on(auth().verify(&tampered)).is_err(), "{}", tampered);
    }
}
