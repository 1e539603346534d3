//! `whatsapp_nutrition_webhook`: a WhatsApp message a user sent (a meal in
//! words, or a photo by URL) → the foods with portions, calories and macros
//! (the analysis `sofia_text` and `sofia_image` share; totals summed here)
//! → a reply written here from those figures, sent once. The analysis comes
//! first: a failing model is retried before anything is sent, and once the
//! reply may have left it is never sent again (see `quern-whatsapp`).

use quern_ai::{ChatRequest, Message, Part, chat_json};
use quern_nutrition::{Food, ModelFoods, SYSTEM_PROMPT, Totals, check, totals};
use quern_sdk::{Failure, Handler, JobInfo, fail};
use quern_whatsapp::{media_data_url, send, sender_digits, text_body};
use serde::{Deserialize, Serialize};

pub const MAX_TEXT_CHARS: usize = 4000;

/// `{from, text}` or `{from, imageUrl}`, or a message of Meta's webhook as
/// it comes (`{from, id, type, text: {body}}` or `{…, image: {id, caption}}`:
/// the photo is fetched by its media id). `from` may be digits without `+`.
/// Other fields (`id`, `timestamp`, `type`) say nothing about the meal.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    pub from: String,
    pub text: Option<Text>,
    pub image_url: Option<String>,
    pub image: Option<Media>,
}

/// A photo by its WhatsApp media id, with the words sent beside it.
#[derive(Debug, Deserialize)]
pub struct Media {
    pub id: String,
    pub caption: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Text {
    Plain(String),
    Cloud { body: String },
}

impl Text {
    fn as_str(&self) -> &str {
        match self {
            Text::Plain(text) | Text::Cloud { body: text } => text,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub foods: Vec<Food>,
    pub totals: Totals,
    /// The message sent back.
    pub reply: String,
    pub message_id: String,
    pub to: String,
    pub status: &'static str,
    pub provider: String,
    pub model: String,
}

pub struct WhatsappNutritionWebhook;

impl Handler for WhatsappNutritionWebhook {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let to = sender_digits(&input.from)?;
        let mut input = input;
        if let Some(media) = input.image.take() {
            quern_sdk::progress(5, "fetching the photo");
            input.image_url = Some(media_data_url(&media.id)?);
            input.text = input.text.or(media.caption.map(Text::Plain));
        }
        let request = request(&input)?;
        quern_sdk::progress(10, "analysing the meal");
        let (answer, reply) = chat_json::<ModelFoods>(&request, check)?;
        let totals = totals(&answer.foods);
        let message = reply_text(&answer.foods, &totals);
        quern_sdk::progress(80, "replying");
        let sent = send(&text_body(&to, &message, "reply")?)?;
        Ok(Output {
            foods: answer.foods,
            totals,
            reply: message,
            message_id: sent.message_id,
            to: sent.to,
            status: sent.status,
            provider: reply.provider.into(),
            model: reply.model,
        })
    }
}

/// The analysis request for the meal in the message, or a permanent failure.
pub fn request(input: &Input) -> Result<ChatRequest, Failure> {
    let is_data = |url: &str| url.starts_with("data:image/");
    let user = match (&input.text, &input.image_url) {
        (text, Some(url)) if url.starts_with("https://") || url.starts_with("http://") || is_data(url) => {
            let mut words = String::from(
                "Analyse the foods in this meal photo. No object detector results are available; rely on the image.",
            );
            if let Some(text) = text.as_ref().map(|text| text.as_str().trim()).filter(|text| !text.is_empty()) {
                // The caption the user wrote beside the photo.
                words.push_str(&format!("\nThe user wrote: {}", text.chars().take(MAX_TEXT_CHARS).collect::<String>()));
            }
            Message::user_parts(vec![Part::text(words), Part::image(url.clone())])
        }
        (Some(text), None) => {
            let text = text.as_str().trim();
            if text.is_empty() {
                return Err(fail("invalid input: `text` is empty"));
            }
            if text.chars().count() > MAX_TEXT_CHARS {
                return Err(fail(format!("invalid input: `text` is longer than {MAX_TEXT_CHARS} characters")));
            }
            Message::user(format!("Meal: {text}"))
        }
        (_, Some(_)) => return Err(fail("invalid input: `imageUrl` must be an http or https URL")),
        (None, None) => return Err(fail("invalid input: `text` or `imageUrl` is required")),
    };
    Ok(ChatRequest { temperature: Some(0.2), ..ChatRequest::new(vec![Message::system(SYSTEM_PROMPT), user]) })
}

/// The reply, in Portuguese, from the foods and the totals computed here.
pub fn reply_text(foods: &[Food], totals: &Totals) -> String {
    if foods.is_empty() {
        return "Não encontrei alimentos na sua mensagem. Descreva a refeição (ex.: \"arroz, feijão e frango\") \
ou envie uma foto do prato."
            .to_string();
    }
    let number = |value: f64| format!("{value:.1}").replace('.', ",");
    let mut text = String::from("🍽️ Análise da sua refeição:\n");
    for food in foods {
        text.push_str(&format!("• {} ({} g): {} kcal\n", food.name, number(food.portion_g), number(food.kcal)));
    }
    text.push_str(&format!(
        "Total: {} kcal · proteínas {} g · carboidratos {} g · gorduras {} g\n\n",
        number(totals.kcal),
        number(totals.protein_g),
        number(totals.carbs_g),
        number(totals.fat_g)
    ));
    text.push_str("Estimativa automática; para orientação personalizada, fale com um nutricionista.");
    text
}

quern_sdk::export_handler!(WhatsappNutritionWebhook);

#[cfg(test)]
mod tests {
    use super::*;

    fn food(name: &str, kcal: f64) -> Food {
        Food { name: name.into(), portion_g: 100.0, kcal, protein_g: 1.0, carbs_g: 2.0, fat_g: 0.5, confidence: 0.9 }
    }

    #[test]
    fn the_reply_states_the_totals_computed_from_the_foods() {
        let foods = [food("arroz", 192.0), food("feijão", 76.0)];
        let text = reply_text(&foods, &totals(&foods));
        assert!(text.contains("• arroz (100,0 g): 192,0 kcal"), "{text}");
        assert!(text.contains("Total: 268,0 kcal · proteínas 2,0 g"), "{text}");
    }
}
