//! `medical_exam`: a lab exam, as a photo or as text → its values with
//! units and reference ranges, a summary and a disclaimer. Each value's flag
//! (low, normal, high) is computed here from the value and its range when
//! the range is readable; the model's flag is used only when it is not.

use quern_ai::{ChatRequest, Message, Part, chat_json};
use quern_sdk::{Failure, Handler, JobInfo, fail};
use serde::{Deserialize, Serialize};

pub const DISCLAIMER: &str = "Esta leitura é informativa e não substitui a avaliação de um profissional de saúde. \
This reading is for information only and does not replace a health professional's assessment.";

pub const MAX_TEXT_CHARS: usize = 20_000;

/// One of `imageUrl`, `imageBase64` or `text`, and an optional `examType`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    pub image_url: Option<String>,
    pub image_base64: Option<String>,
    pub text: Option<String>,
    pub exam_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    ImageUrl(String),
    ImageBase64(String),
    Text(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flag {
    Low,
    Normal,
    High,
    Unknown,
}

/// A measured value: a number, or a qualitative result (`negativo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Measured {
    Number(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExamValue {
    pub name: String,
    pub value: Measured,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub reference_range: Option<String>,
    #[serde(default = "unknown")]
    pub flag: Flag,
}

fn unknown() -> Flag {
    Flag::Unknown
}

/// What the model must answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelExam {
    pub exam_type: String,
    pub values: Vec<ExamValue>,
    pub summary: String,
}

#[derive(Debug, Serialize)]
pub struct Output {
    /// The reading as one text (the seed's `analysis`): the summary, the
    /// values outside their range (flagged here, not by the model) and the
    /// disclaimer.
    pub analysis: String,
    pub exam_type: String,
    pub values: Vec<ExamValue>,
    pub summary: String,
    pub disclaimer: &'static str,
    pub provider: String,
    pub model: String,
}

pub struct MedicalExam;

impl Handler for MedicalExam {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let source = checked_source(&input)?;
        quern_sdk::progress(10, "reading the exam");
        let (exam, reply) = chat_json::<ModelExam>(&request(&source, input.exam_type.as_deref()), check)?;
        quern_sdk::progress(100, "done");
        let values: Vec<ExamValue> = exam.values.into_iter().map(reflag).collect();
        Ok(Output {
            analysis: analysis(&exam.summary, &values),
            exam_type: exam.exam_type,
            values,
            summary: exam.summary,
            disclaimer: DISCLAIMER,
            provider: reply.provider.into(),
            model: reply.model,
        })
    }
}

/// The seed's `analysis` text: the summary, each value outside its range,
/// and the disclaimer.
pub fn analysis(summary: &str, values: &[ExamValue]) -> String {
    let mut text = summary.trim().to_string();
    let outside: Vec<String> = values
        .iter()
        .filter(|v| matches!(v.flag, Flag::Low | Flag::High))
        .map(|v| {
            let value = match &v.value {
                Measured::Number(n) => n.to_string(),
                Measured::Text(t) => t.clone(),
            };
            let unit = v.unit.as_deref().map_or(String::new(), |u| format!(" {u}"));
            let range = v.reference_range.as_deref().map_or(String::new(), |r| format!(", referência {r}"));
            let side = if v.flag == Flag::High { "alto" } else { "baixo" };
            format!("- {}: {value}{unit} ({side}{range})", v.name)
        })
        .collect();
    if !outside.is_empty() {
        text.push_str("\n\nFora da faixa de referência:\n");
        text.push_str(&outside.join("\n"));
    }
    text.push_str("\n\n");
    text.push_str(DISCLAIMER);
    text
}

pub fn checked_source(input: &Input) -> Result<Source, Failure> {
    let given = [input.image_url.is_some(), input.image_base64.is_some(), input.text.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(fail("invalid input: give exactly one of `imageUrl`, `imageBase64` or `text`"));
    }
    if let Some(url) = &input.image_url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(fail("invalid input: `imageUrl` must be an http or https URL"));
        }
        return Ok(Source::ImageUrl(url.clone()));
    }
    if let Some(data) = &input.image_base64 {
        if data.is_empty() || data.starts_with("data:") {
            return Err(fail("invalid input: `imageBase64` must be the base64 bytes, without a `data:` prefix"));
        }
        return Ok(Source::ImageBase64(data.clone()));
    }
    let text = input.text.as_deref().unwrap_or_default().trim();
    if text.is_empty() {
        return Err(fail("invalid input: `text` is empty"));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(fail(format!("invalid input: `text` is longer than {MAX_TEXT_CHARS} characters")));
    }
    Ok(Source::Text(text.to_string()))
}

const PROMPT: &str = "You read clinical laboratory exams. Extract every measured value with its unit and \
the reference range printed on the exam. Answer with only a JSON object: {\"exam_type\": string, \"values\": \
[{\"name\": string, \"value\": number or string, \"unit\": string or null, \"reference_range\": string or null \
(as printed, e.g. \"70-99\", \"< 200\"), \"flag\": \"low\" | \"normal\" | \"high\" | \"unknown\"}], \"summary\": \
string (two or three plain sentences in the exam's language, no diagnosis)}.";

pub fn request(source: &Source, exam_type: Option<&str>) -> ChatRequest {
    let hint = exam_type.map_or(String::new(), |t| format!(" The exam is said to be: {t}."));
    let user = match source {
        Source::Text(text) => Message::user(format!("The exam's text:{hint}\n\n{text}")),
        Source::ImageUrl(url) => {
            Message::user_parts(vec![Part::text(format!("The exam's photo.{hint}")), Part::image(url.clone())])
        }
        Source::ImageBase64(data) => Message::user_parts(vec![
            Part::text(format!("The exam's photo.{hint}")),
            Part::image_base64("image/jpeg", data),
        ]),
    };
    ChatRequest { temperature: Some(0.0), ..ChatRequest::new(vec![Message::system(PROMPT), user]) }
}

pub fn check(exam: &ModelExam) -> Result<(), String> {
    if exam.exam_type.trim().is_empty() {
        return Err("`exam_type` is empty".into());
    }
    for (i, value) in exam.values.iter().enumerate() {
        if value.name.trim().is_empty() {
            return Err(format!("values[{i}].name is empty"));
        }
        if let Measured::Number(number) = value.value
            && !number.is_finite()
        {
            return Err(format!("values[{i}].value is not a finite number"));
        }
    }
    Ok(())
}

/// The flag from the value and its range when both are readable; the
/// model's otherwise.
pub fn reflag(mut value: ExamValue) -> ExamValue {
    if let (Measured::Number(number), Some(range)) = (&value.value, value.reference_range.as_deref())
        && let Some((low, high)) = parse_range(range)
    {
        value.flag = if low.is_some_and(|low| *number < low) {
            Flag::Low
        } else if high.is_some_and(|high| *number > high) {
            Flag::High
        } else {
            Flag::Normal
        };
    }
    value
}

/// `70-99`, `70 a 99`, `< 200`, `até 200`, `> 40`, `acima de 40` → bounds.
pub fn parse_range(range: &str) -> Option<(Option<f64>, Option<f64>)> {
    let text = range.trim().to_lowercase().replace(',', ".");
    let number = |s: &str| s.trim().trim_end_matches(|c: char| !c.is_ascii_digit()).trim().parse::<f64>().ok();
    for prefix in ["<=", "≤", "<", "até", "inferior a", "menor que", "up to"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return Some((None, Some(number(rest)?)));
        }
    }
    for prefix in [">=", "≥", ">", "acima de", "superior a", "maior que", "above"] {
        if let Some(rest) = text.strip_prefix(prefix) {
            return Some((Some(number(rest)?), None));
        }
    }
    for separator in [" a ", " to ", "–", "-"] {
        if let Some((low, high)) = text.split_once(separator) {
            return Some((Some(number(low)?), Some(number(high)?)));
        }
    }
    None
}

quern_sdk::export_handler!(MedicalExam);

#[cfg(test)]
mod tests {
    use super::*;

    fn value(number: f64, range: &str, model_flag: Flag) -> ExamValue {
        ExamValue {
            name: "Glicose".into(),
            value: Measured::Number(number),
            unit: Some("mg/dL".into()),
            reference_range: Some(range.into()),
            flag: model_flag,
        }
    }

    #[test]
    fn ranges_are_read_in_both_languages() {
        assert_eq!(parse_range("70-99"), Some((Some(70.0), Some(99.0))));
        assert_eq!(parse_range("70 a 99 mg/dL"), Some((Some(70.0), Some(99.0))));
        assert_eq!(parse_range("< 200"), Some((None, Some(200.0))));
        assert_eq!(parse_range("Até 5,7"), Some((None, Some(5.7))));
        assert_eq!(parse_range("> 40"), Some((Some(40.0), None)));
        assert_eq!(parse_range("negativo"), None);
    }

    #[test]
    fn flags_come_from_the_range_not_the_model() {
        assert_eq!(reflag(value(126.0, "70-99", Flag::Normal)).flag, Flag::High);
        assert_eq!(reflag(value(65.0, "70-99", Flag::Normal)).flag, Flag::Low);
        assert_eq!(reflag(value(85.0, "70-99", Flag::High)).flag, Flag::Normal);
        assert_eq!(reflag(value(85.0, "ver laudo", Flag::High)).flag, Flag::High, "unreadable range: the model's flag");
    }

    #[test]
    fn exactly_one_source_is_required() {
        let input = |url: Option<&str>, text: Option<&str>| Input {
            image_url: url.map(Into::into),
            image_base64: None,
            text: text.map(Into::into),
            exam_type: None,
        };
        assert_eq!(checked_source(&input(None, Some(" Glicose 90 "))).unwrap(), Source::Text("Glicose 90".into()));
        for bad in [input(None, None), input(Some("https://x"), Some("t"))] {
            match checked_source(&bad) {
                Err(Failure::Fail(reason)) => assert!(reason.contains("exactly one of"), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
