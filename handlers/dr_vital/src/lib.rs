//! `dr_vital`: the app's health assistant ("Dr. Vital"). A message, the
//! conversation so far and the user's health context (measurements, exams,
//! goals) → an answer that uses that context, always with a disclaimer.
//! A message that reads as an emergency is not sent to a model at all: the
//! answer tells the user to seek care now.

use quern_ai::{ChatRequest, Turn, chat, conversation, facts};
use quern_sdk::serde_json::{Map, Value};
use quern_sdk::{Failure, Handler, JobInfo, retry};
use serde::{Deserialize, Serialize};

pub const DISCLAIMER: &str = "Dr. Vital dá orientações gerais e não substitui uma consulta com um profissional de \
saúde. Dr. Vital gives general guidance and does not replace a consultation with a health professional.";

pub const EMERGENCY_ANSWER: &str = "Isso pode ser uma emergência. Procure atendimento agora: ligue 192 (SAMU) ou vá \
ao pronto-socorro mais próximo. Se estiver com alguém, peça ajuda. This may be an emergency: call your local \
emergency number or go to the nearest emergency room now.";

/// Words that mark a message as an emergency (Portuguese and English, without accents).
pub const EMERGENCY_SIGNS: &[&str] = &[
    "dor no peito",
    "aperto no peito",
    "falta de ar",
    "nao consigo respirar",
    "desmaiei",
    "desmaio",
    "infarto",
    "avc",
    "derrame",
    "convulsao",
    "sangramento intenso",
    "suicidio",
    "me matar",
    "overdose",
    "envenenamento",
    "chest pain",
    "can't breathe",
    "cannot breathe",
    "heart attack",
    "stroke",
    "seizure",
    "suicide",
    "kill myself",
];

/// `{message, history?, healthContext?}`: a context of words is read as
/// notes, and the app's other fields go to the model with it (ids aside).
#[derive(Debug, Deserialize)]
pub struct Input {
    pub message: String,
    #[serde(default)]
    pub history: Vec<Turn>,
    /// What the app knows of the user's health: measurements, exams, goals…
    #[serde(alias = "healthContext", alias = "health_context")]
    pub context: Option<Value>,
    /// Everything else the app sent goes to the model as context (ids aside).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Output {
    /// The answer (the seed's `response`).
    pub response: String,
    /// The message read as an emergency: no model was asked.
    pub emergency: bool,
    pub disclaimer: &'static str,
    /// Which parts of the health context the answer was given.
    pub context_used: Vec<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
}

pub const PROMPT: &str = "You are Dr. Vital, the health assistant of a nutrition and health app. Answer in the \
user's language, clearly and kindly, using the user's health data below when it is relevant (name the values you \
use). You give general guidance only: you never diagnose, never prescribe or change medicines, and for worrying \
symptoms you tell the user to see a health professional.";

pub struct DrVital;

impl Handler for DrVital {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let context_used = facts(input.context.as_ref(), &input.rest).keys().cloned().collect();
        if is_emergency(&input.message) {
            return Ok(Output {
                response: EMERGENCY_ANSWER.to_string(),
                emergency: true,
                disclaimer: DISCLAIMER,
                context_used,
                provider: None,
                model: None,
            });
        }
        let request = request(&input)?;
        quern_sdk::progress(10, "thinking");
        let reply = chat(&request)?;
        let text = reply.content.trim();
        if text.is_empty() {
            return Err(retry(format!("{} answered an empty reply", reply.provider)));
        }
        Ok(Output {
            response: text.to_string(),
            emergency: false,
            disclaimer: DISCLAIMER,
            context_used,
            provider: Some(reply.provider.into()),
            model: Some(reply.model),
        })
    }
}

/// Whether a message reads as an emergency (case and accents ignored).
pub fn is_emergency(message: &str) -> bool {
    let plain: String = message.to_lowercase().chars().map(unaccented).collect();
    EMERGENCY_SIGNS.iter().any(|sign| contains_words(&plain, sign))
}

/// `sign` in `text` at word boundaries (so "avc" is not found in "avcalado").
fn contains_words(text: &str, sign: &str) -> bool {
    text.match_indices(sign).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + sign.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

fn unaccented(c: char) -> char {
    match c {
        'á' | 'à' | 'â' | 'ã' => 'a',
        'é' | 'ê' => 'e',
        'í' => 'i',
        'ó' | 'ô' | 'õ' => 'o',
        'ú' | 'ü' => 'u',
        'ç' => 'c',
        other => other,
    }
}

/// The chat request, or a permanent failure naming the bad field.
pub fn request(input: &Input) -> Result<ChatRequest, Failure> {
    let facts = facts(input.context.as_ref(), &input.rest);
    let context = (!facts.is_empty()).then_some(("The user's health data", &facts));
    let messages = conversation(PROMPT, context, &input.history, &input.message)?;
    Ok(ChatRequest { temperature: Some(0.4), ..ChatRequest::new(messages) })
}

quern_sdk::export_handler!(DrVital);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emergencies_are_recognised_in_either_language_at_word_boundaries() {
        assert!(is_emergency("Estou com DOR NO PEITO forte"));
        assert!(is_emergency("acho que tive um AVC"));
        assert!(is_emergency("Não consigo respirar direito"));
        assert!(is_emergency("I have chest pain"));
        assert!(!is_emergency("Quantas calorias tem um pão?"));
        assert!(!is_emergency("meu avcalado"), "not inside a word");
    }
}
