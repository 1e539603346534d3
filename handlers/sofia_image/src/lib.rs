//! `sofia_image`: a meal photo → foods with portions, calories and
//! macronutrients. The YOLO service (`YOLO_URL` + `/detect`) lists what it
//! sees; a vision model, told those detections, estimates the foods. YOLO is
//! a help, not a requirement: when it is down or unconfigured the analysis
//! goes on without detections and the result says so.
//!
//! The result keeps the seed's fields with the seed's types: `foods` (the
//! model's text), `yolo_detections` (the YOLO service's body as received, or
//! null) and `timestamp` (ISO 8601); the structured analysis is `items` and
//! `totals` (computed here from the items), with `detections`, `provider`,
//! `model` and `meal_type`.

use quern_ai::{ChatRequest, Message, Part, chat_json_or_text};
use quern_nutrition::{Food, ModelFoods, SYSTEM_PROMPT, Totals, check, totals};
use quern_sdk::http::{failure_from_error, post, snippet};
use quern_sdk::{Failure, Handler, JobInfo, config, fail};
use serde::{Deserialize, Serialize};

/// `{"imageUrl": "https://…"}` or `{"imageBase64": "…"}`, and an optional
/// `mealType` in English or Portuguese; other fields (the app sends
/// `userId`) are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    pub image_url: Option<String>,
    pub image_base64: Option<String>,
    pub meal_type: Option<String>,
}

pub const MEAL_TYPES: &[&str] = &["breakfast", "lunch", "dinner", "snack"];

/// The app's Portuguese meal names, as the English ones they mean.
const MEAL_TYPES_PT: &[(&str, &str)] = &[
    ("cafe_da_manha", "breakfast"),
    ("cafe da manha", "breakfast"),
    ("café da manhã", "breakfast"),
    ("cafe", "breakfast"),
    ("café", "breakfast"),
    ("almoco", "lunch"),
    ("almoço", "lunch"),
    ("jantar", "dinner"),
    ("ceia", "dinner"),
    ("lanche", "snack"),
    ("lanche_da_tarde", "snack"),
    ("lanche da tarde", "snack"),
    ("lanche_da_manha", "snack"),
    ("lanche da manha", "snack"),
    ("lanche da manhã", "snack"),
];

/// The longest meal name passed on as the app wrote it.
const MAX_MEAL_CHARS: usize = 40;

/// The image, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Url(String),
    Base64(String),
}

/// One object YOLO saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    #[serde(alias = "class", alias = "name")]
    pub label: String,
    pub confidence: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bbox: Option<Vec<f64>>,
}

/// Whether YOLO helped, and if not, why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct YoloStatus {
    pub available: bool,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Output {
    /// The seed's `foods`: the model's answer as it wrote it.
    pub foods: String,
    /// The seed's `yolo_detections`: YOLO's body as received (null when
    /// YOLO did not answer; `yolo` says why).
    pub yolo_detections: Option<serde_json::Value>,
    /// The seed's `timestamp`: when the analysis finished (ISO 8601, UTC).
    pub timestamp: String,
    pub items: Vec<Food>,
    pub totals: Totals,
    pub detections: Vec<Detection>,
    pub yolo: YoloStatus,
    pub meal_type: Option<String>,
    pub provider: String,
    pub model: String,
}

pub struct SofiaImage;

impl Handler for SofiaImage {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let image = checked_image(&input)?;
        let meal_type = checked_meal_type(&input)?;
        quern_sdk::progress(10, "detecting objects");
        let ((detections, yolo_body), yolo) = match config("YOLO_URL") {
            Some(url) => match detect(&url, &image) {
                Ok(seen) => (seen, YoloStatus { available: true, error: None }),
                Err(error) => {
                    quern_sdk::warn!("continuing without detections: {error}");
                    ((Vec::new(), None), YoloStatus { available: false, error: Some(error) })
                }
            },
            None => {
                ((Vec::new(), None), YoloStatus { available: false, error: Some("YOLO_URL is not configured".into()) })
            }
        };
        quern_sdk::progress(40, "asking the vision model");
        // Prose where JSON was asked for is still the analysis the seed
        // returned (`foods`): kept, with no items to sum.
        let (answer, reply) =
            chat_json_or_text::<ModelFoods>(&request(&image, meal_type.as_deref(), &detections), check)?;
        let items = match answer {
            Ok(answer) => answer.foods,
            Err(error) => {
                quern_sdk::warn!("the model answered prose, kept as `foods`: {error}");
                Vec::new()
            }
        };
        quern_sdk::progress(100, "done");
        Ok(Output {
            foods: reply.content.trim().to_string(),
            yolo_detections: yolo_body,
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            totals: totals(&items),
            items,
            detections,
            yolo,
            meal_type,
            provider: reply.provider.into(),
            model: reply.model,
        })
    }
}

/// Exactly one of `imageUrl` (http or https) and `imageBase64`.
pub fn checked_image(input: &Input) -> Result<Image, Failure> {
    match (input.image_url.as_deref().map(str::trim), input.image_base64.as_deref().map(str::trim)) {
        (Some(url), None) if url.starts_with("https://") || url.starts_with("http://") => Ok(Image::Url(url.into())),
        // The URL is not quoted: it may carry a signed token.
        (Some(_), None) => Err(fail("invalid input: `imageUrl` must be an http or https URL")),
        (None, Some(data)) if !data.is_empty() && data.bytes().all(is_base64) => Ok(Image::Base64(data.into())),
        (None, Some(_)) => {
            Err(fail("invalid input: `imageBase64` is not base64 (no `data:` prefix, just the encoded bytes)"))
        }
        (Some(_), Some(_)) => Err(fail("invalid input: give `imageUrl` or `imageBase64`, not both")),
        (None, None) => Err(fail("invalid input: `imageUrl` or `imageBase64` is required")),
    }
}

fn is_base64(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'+' | b'/' | b'=' | b'-' | b'_' | b'\n' | b'\r')
}

/// The meal type in English, from English or Portuguese (`almoco`,
/// `jantar`, …); a meal the app names otherwise (`pos_treino`, `brunch`) is
/// passed on in its words, which the model reads; an empty one is none.
/// Never a failed job for a value the model could read.
pub fn checked_meal_type(input: &Input) -> Result<Option<String>, Failure> {
    let Some(meal) = input.meal_type.as_deref() else { return Ok(None) };
    let meal = meal.trim().to_lowercase();
    if meal.is_empty() {
        return Ok(None);
    }
    if let Some(english) = MEAL_TYPES.iter().find(|m| **m == meal) {
        return Ok(Some(english.to_string()));
    }
    if let Some((_, english)) = MEAL_TYPES_PT.iter().find(|(pt, _)| *pt == meal) {
        return Ok(Some(english.to_string()));
    }
    if meal.chars().count() > MAX_MEAL_CHARS || meal.chars().any(char::is_control) {
        return Err(fail(format!(
            "invalid input: `mealType` is not a meal's name: use one of {} (or almoco, jantar, lanche, cafe_da_manha), \
             or a name of at most {MAX_MEAL_CHARS} characters",
            MEAL_TYPES.join(", ")
        )));
    }
    Ok(Some(meal.replace('_', " ")))
}

/// YOLO's detections with its body as received, or why there are none.
pub fn detect(yolo_url: &str, image: &Image) -> Result<(Vec<Detection>, Option<serde_json::Value>), String> {
    let body = match image {
        Image::Url(url) => serde_json::json!({ "image_url": url }),
        Image::Base64(data) => serde_json::json!({ "image_base64": data }),
    };
    let request = post(format!("{}/detect", yolo_url.trim_end_matches('/')))
        .json(&body)
        .map_err(|_| "could not encode the YOLO request".to_string())?
        .timeout_ms(10_000)
        .idempotent(true)
        .build();
    let response = quern_sdk::http::send(&request).map_err(|error| match failure_from_error(&request, &error) {
        Failure::Retry(retry) => format!("YOLO is unavailable: {}", retry.reason),
        Failure::Fail(reason) => format!("YOLO could not be asked: {reason}"),
    })?;
    if !(200..300).contains(&response.status) {
        return Err(format!("YOLO answered {}: {}", response.status, snippet(&response.body)));
    }
    let detections = parse_detections(&response.body)?;
    Ok((detections, serde_json::from_slice(&response.body).ok()))
}

/// `{"detections": [{"class" | "label" | "name": …, "confidence": …, "bbox": […]}]}`.
pub fn parse_detections(body: &[u8]) -> Result<Vec<Detection>, String> {
    #[derive(Deserialize)]
    struct Answer {
        detections: Vec<Detection>,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|answer| answer.detections)
        .map_err(|error| format!("YOLO answered something unreadable ({error}): {}", snippet(body)))
}

pub fn request(image: &Image, meal_type: Option<&str>, detections: &[Detection]) -> ChatRequest {
    let seen = if detections.is_empty() {
        "No object detector results are available; rely on the image.".to_string()
    } else {
        let list: Vec<String> = detections.iter().map(|d| format!("{} ({:.2})", d.label, d.confidence)).collect();
        format!("An object detector saw: {}.", list.join(", "))
    };
    let meal = meal_type.map_or(String::new(), |m| format!(" It is a {m}."));
    let image = match image {
        Image::Url(url) => Part::image(url.clone()),
        Image::Base64(data) => Part::image_base64(mime_of(data), data),
    };
    ChatRequest {
        temperature: Some(0.2),
        ..ChatRequest::new(vec![
            Message::system(SYSTEM_PROMPT),
            Message::user_parts(vec![Part::text(format!("Analyse the foods in this meal photo.{meal} {seen}")), image]),
        ])
    }
}

/// The image type from the first bytes of its base64 (JPEG unless it says otherwise).
fn mime_of(base64: &str) -> &'static str {
    match base64.get(..4) {
        Some("iVBO") => "image/png",
        Some("R0lG") => "image/gif",
        Some("UklG") => "image/webp",
        _ => "image/jpeg",
    }
}

quern_sdk::export_handler!(SofiaImage);

#[cfg(test)]
mod tests {
    use super::*;

    fn input(url: Option<&str>, b64: Option<&str>, meal: Option<&str>) -> Input {
        Input { image_url: url.map(Into::into), image_base64: b64.map(Into::into), meal_type: meal.map(Into::into) }
    }

    #[test]
    fn exactly_one_image_is_required() {
        assert_eq!(
            checked_image(&input(Some("https://m/x.jpg"), None, None)).unwrap(),
            Image::Url("https://m/x.jpg".into())
        );
        assert!(
            checked_image(&input(None, None, None))
                .unwrap_err()
                .expect_permanent()
                .contains("`imageUrl` or `imageBase64` is required")
        );
        assert!(
            checked_image(&input(Some("https://m"), Some("AAAA"), None))
                .unwrap_err()
                .expect_permanent()
                .contains("not both")
        );
        assert!(
            checked_image(&input(Some("file:///etc/passwd"), None, None))
                .unwrap_err()
                .expect_permanent()
                .contains("`imageUrl`")
        );
        assert!(
            checked_image(&input(None, Some("data:image/png;base64,AA"), None))
                .unwrap_err()
                .expect_permanent()
                .contains("`imageBase64`")
        );
    }

    #[test]
    fn meal_types_are_checked_in_english_or_portuguese() {
        assert_eq!(checked_meal_type(&input(None, None, Some("lunch"))).unwrap().as_deref(), Some("lunch"));
        assert_eq!(checked_meal_type(&input(None, None, Some("Almoço"))).unwrap().as_deref(), Some("lunch"));
        assert_eq!(checked_meal_type(&input(None, None, Some("jantar"))).unwrap().as_deref(), Some("dinner"));
        // Issue 39: `""`, "lanche da manhã" and "pos_treino" are read, never a failed job.
        assert_eq!(checked_meal_type(&input(None, None, Some(""))).unwrap(), None);
        assert_eq!(checked_meal_type(&input(None, None, Some("Lanche da Manhã"))).unwrap().as_deref(), Some("snack"));
        assert_eq!(checked_meal_type(&input(None, None, Some("pos_treino"))).unwrap().as_deref(), Some("pos treino"));
        let long = "x".repeat(41);
        let error = checked_meal_type(&input(None, None, Some(&long))).unwrap_err().expect_permanent();
        assert!(error.contains("`mealType` is not a meal's name") && !error.contains(&long), "{error}");
    }

    #[test]
    fn detections_accept_the_usual_label_names() {
        let body = br#"{"detections": [{"class": "banana", "confidence": 0.92, "bbox": [1, 2, 3, 4]}, {"label": "rice", "confidence": 0.5}]}"#;
        let detections = parse_detections(body).unwrap();
        assert_eq!(detections[0].label, "banana");
        assert_eq!(detections[1].bbox, None);
        assert!(parse_detections(b"<html>").unwrap_err().contains("unreadable"));
    }

    #[test]
    fn the_request_carries_the_detections_and_the_image() {
        let detections = vec![Detection { label: "rice".into(), confidence: 0.9, bbox: None }];
        let body = request(&Image::Base64("iVBORw0KGgo".into()), Some("lunch"), &detections).body("llava");
        let parts = &body["messages"][1]["content"];
        assert!(parts[0]["text"].as_str().unwrap().contains("rice (0.90)"));
        assert!(parts[0]["text"].as_str().unwrap().contains("lunch"));
        assert_eq!(parts[1]["image_url"]["url"], "data:image/png;base64,iVBORw0KGgo");
    }
}
