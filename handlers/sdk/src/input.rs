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

/// A word from a closed set, as a form may spell it: any case, spaces or
/// `-` for `_` (`"Feminino"`, `"Moderado"`, `"perder peso"`). Use with
/// `#[serde(deserialize_with = "quern_sdk::input::word")]` on an enum whose
/// names and aliases are lowercase snake_case. The error lists what is
/// expected, never the value.
pub fn word<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let value = match Value::deserialize(deserializer)? {
        Value::String(text) => Value::String(
            text.trim().to_lowercase().chars().map(|c| if c == ' ' || c == '-' { '_' } else { c }).collect(),
        ),
        other => other,
    };
    T::deserialize(value).map_err(|error| {
        let message = error.to_string();
        let expected = message.find("expected").map_or("an unknown value", |at| &message[at..]);
        D::Error::custom(format!("an unknown value: {expected}"))
    })
}

/// A list of words as an app may send it: a JSON array of strings, or one
/// string of items separated by `,` or `;` (`"lactose, glúten"`); null is
/// empty. Items are trimmed; empty ones dropped.
pub fn list<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
where
    D: Deserializer<'de>,
{
    let items = match Value::deserialize(deserializer)? {
        Value::Null => Vec::new(),
        Value::String(text) => text.split([',', ';']).map(str::to_string).collect(),
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Ok(text),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(D::Error::custom("expected a list of words, got an item that is not text")),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(D::Error::custom("expected a list of words or one string of them")),
    };
    Ok(items.into_iter().map(|item| item.trim().to_string()).filter(|item| !item.is_empty()).collect())
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

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Level {
        #[serde(alias = "moderado")]
        Moderate,
        LoseWeight,
    }

    #[derive(serde::Deserialize, Debug)]
    struct Words {
        #[serde(deserialize_with = "super::word")]
        level: Level,
        #[serde(default, deserialize_with = "super::list")]
        items: Vec<String>,
    }

    #[test]
    fn words_come_in_any_case_and_lists_as_lists_or_one_string() {
        let words: Words = serde_json::from_str(r#"{"level": "Moderado", "items": "lactose, glúten;"}"#).unwrap();
        assert_eq!((words.level, words.items), (Level::Moderate, vec!["lactose".into(), "glúten".into()]));
        let words: Words = serde_json::from_str(r#"{"level": "Lose Weight", "items": ["ovo"]}"#).unwrap();
        assert_eq!((words.level, words.items), (Level::LoseWeight, vec!["ovo".to_string()]));
        let error = serde_json::from_str::<Words>(r#"{"level": "Secreto"}"#).unwrap_err().to_string();
        assert!(error.contains("expected one of") && !error.to_lowercase().contains("secreto"), "{error}");
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
