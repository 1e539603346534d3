//! `sofia_text`: a meal described in words → foods with portions, calories
//! and macronutrients, estimated by the AI provider chain; totals computed
//! here from the foods.

use quern_ai::{ChatRequest, Message, chat_json};
use quern_nutrition::{Food, ModelFoods, SYSTEM_PROMPT, Totals, check, totals};
use quern_sdk::{Failure, Handler, JobInfo, fail};
use serde::{Deserialize, Serialize};

/// The longest description accepted.
pub const MAX_TEXT_CHARS: usize = 4000;

/// `{"text": "arroz, feijão e um bife"}`; other fields (the app sends
/// `userId`) are ignored.
#[derive(Debug, Deserialize)]
pub struct Input {
    pub text: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Output {
    pub foods: Vec<Food>,
    pub totals: Totals,
    pub provider: String,
    pub model: String,
}

pub struct SofiaText;

impl Handler for SofiaText {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let text = checked_text(&input)?;
        quern_sdk::progress(10, "asking the model");
        let (answer, reply) = chat_json::<ModelFoods>(&request(text), check)?;
        quern_sdk::progress(100, "done");
        Ok(Output {
            totals: totals(&answer.foods),
            foods: answer.foods,
            provider: reply.provider.into(),
            model: reply.model,
        })
    }
}

/// The description, trimmed, or a permanent failure naming the field.
pub fn checked_text(input: &Input) -> Result<&str, Failure> {
    let text = input.text.trim();
    if text.is_empty() {
        return Err(fail("invalid input: `text` is empty; describe the meal, e.g. \"arroz, feijão e um bife\""));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(fail(format!("invalid input: `text` has {chars} characters; at most {MAX_TEXT_CHARS}")));
    }
    Ok(text)
}

pub fn request(text: &str) -> ChatRequest {
    ChatRequest {
        temperature: Some(0.2),
        ..ChatRequest::new(vec![Message::system(SYSTEM_PROMPT), Message::user(format!("Meal: {text}"))])
    }
}

quern_sdk::export_handler!(SofiaText);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_huge_text_is_refused_naming_the_field() {
        let error = checked_text(&Input { text: "   ".into() }).unwrap_err().expect_permanent();
        assert!(error.contains("`text` is empty"), "{error}");
        let error = checked_text(&Input { text: "a".repeat(MAX_TEXT_CHARS + 1) }).unwrap_err().expect_permanent();
        assert!(error.contains("4001 characters"), "{error}");
        assert_eq!(checked_text(&Input { text: " pão ".into() }).unwrap(), "pão");
    }

    #[test]
    fn a_missing_text_field_is_named_by_the_sdk() {
        let error = quern_sdk::parse_input::<Input>(r#"{"userId": "u1"}"#).unwrap_err().expect_permanent();
        assert!(error.contains("missing field `text`"), "{error}");
    }

    #[test]
    fn the_request_carries_the_instructions_and_the_meal() {
        let body = request("arroz e feijão").body("m");
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "Meal: arroz e feijão");
    }
}
