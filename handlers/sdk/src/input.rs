//! Inputs as forgiving as the JavaScript app that sends them: a number may
//! come as a string (`"70.5"`, or `"70,5"` as a Brazilian form writes it).
//! Errors say what was expected and what kind of value came, never the value
//! itself (an input may carry personal data).

use std::str::FromStr;

use serde::de::{DeserializeOwned, Error};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A number given as a JSON number or as a numeric string. Use with
/// `#[serde(deserialize_with = "quern_sdk::input::number")]`.
pub fn number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    let parsed = match &value {
        Value::Number(_) => T::deserialize(&value).ok(),
        Value::String(text) => text.trim().replace(',', ".").parse().ok(),
        _ => None,
    };
    parsed.ok_or_else(|| {
        let got = match value {
            Value::Number(_) => "a number out of range or with a fraction",
            Value::String(_) => "a string that is not a number",
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Array(_) => "a sequence",
            Value::Object(_) => "a map",
        };
        D::Error::custom(format!("expected {}, got {got}", std::any::type_name::<T>()))
    })
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct Body {
        #[serde(deserialize_with = "super::number")]
        age: u32,
        #[serde(deserialize_with = "super::number")]
        weight: f64,
    }

    #[test]
    fn numbers_come_as_numbers_or_strings_and_errors_never_quote_the_value() {
        let body: Body = serde_json::from_str(r#"{"age": "30", "weight": "70,5"}"#).unwrap();
        assert_eq!((body.age, body.weight), (30, 70.5));
        let body: Body = serde_json::from_str(r#"{"age": 30, "weight": 70}"#).unwrap();
        assert_eq!((body.age, body.weight), (30, 70.0));
        let error = serde_json::from_str::<Body>(r#"{"age": "trinta", "weight": 1}"#).unwrap_err().to_string();
        assert!(
            error.contains("expected u32, got a string that is not a number") && !error.contains("trinta"),
            "{error}"
        );
        let error = serde_json::from_str::<Body>(r#"{"age": 30.5, "weight": 1}"#).unwrap_err().to_string();
        assert!(error.contains("got a number out of range or with a fraction") && !error.contains("30.5"), "{error}");
    }
}
