//! What `sofia_text` and `sofia_image` share: the food records a model is
//! asked for, the checks they must pass, and totals computed in code (a
//! model's arithmetic is never trusted).

use serde::{Deserialize, Serialize};

/// One food on the plate, as estimated. Fields a model adds beyond these
/// are dropped, not trusted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Food {
    pub name: String,
    pub portion_g: f64,
    pub kcal: f64,
    pub protein_g: f64,
    pub carbs_g: f64,
    pub fat_g: f64,
    /// 0 to 1: how sure the estimate is.
    pub confidence: f64,
}

/// What the model must answer (a `totals` it adds is ignored: totals are
/// computed here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFoods {
    pub foods: Vec<Food>,
}

/// Sums over the foods, rounded to 0.1.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Totals {
    pub portion_g: f64,
    pub kcal: f64,
    pub protein_g: f64,
    pub carbs_g: f64,
    pub fat_g: f64,
}

pub fn totals(foods: &[Food]) -> Totals {
    let sum = |f: fn(&Food) -> f64| round1(foods.iter().map(f).sum());
    Totals {
        portion_g: sum(|f| f.portion_g),
        kcal: sum(|f| f.kcal),
        protein_g: sum(|f| f.protein_g),
        carbs_g: sum(|f| f.carbs_g),
        fat_g: sum(|f| f.fat_g),
    }
}

pub fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// The rules serde cannot state. The message names the food and the field,
/// so a model asked again knows what to fix.
pub fn check(answer: &ModelFoods) -> Result<(), String> {
    for (i, food) in answer.foods.iter().enumerate() {
        let at = |field: &str| format!("foods[{i}].{field}");
        if food.name.trim().is_empty() {
            return Err(format!("{} is empty", at("name")));
        }
        for (field, value, max) in [
            ("portion_g", food.portion_g, 5000.0),
            ("kcal", food.kcal, 10000.0),
            ("protein_g", food.protein_g, 1000.0),
            ("carbs_g", food.carbs_g, 1000.0),
            ("fat_g", food.fat_g, 1000.0),
            ("confidence", food.confidence, 1.0),
        ] {
            if !value.is_finite() || !(0.0..=max).contains(&value) {
                return Err(format!("{} = {value} is outside 0 to {max}", at(field)));
            }
        }
    }
    Ok(())
}

/// The instructions for a food-analysis model.
pub const SYSTEM_PROMPT: &str = "You are a nutritionist. Identify each food in the meal and estimate its \
portion in grams, its energy in kcal and its protein, carbohydrate and fat in grams, using typical Brazilian \
food-composition values (TACO) where they apply. Answer with only a JSON object of this shape: \
{\"foods\": [{\"name\": string, \"portion_g\": number, \"kcal\": number, \"protein_g\": number, \
\"carbs_g\": number, \"fat_g\": number, \"confidence\": number from 0 to 1}]}. Name foods in the language \
of the request. If there is no food, answer {\"foods\": []}.";

#[cfg(test)]
mod tests {
    use super::*;

    fn food(name: &str, kcal: f64) -> Food {
        Food { name: name.into(), portion_g: 100.0, kcal, protein_g: 2.5, carbs_g: 28.1, fat_g: 0.2, confidence: 0.9 }
    }

    #[test]
    fn totals_are_the_rounded_sums() {
        let t = totals(&[food("arroz", 128.0), food("feijão", 76.33)]);
        assert_eq!(t, Totals { portion_g: 200.0, kcal: 204.3, protein_g: 5.0, carbs_g: 56.2, fat_g: 0.4 });
        assert_eq!(totals(&[]), Totals::default());
    }

    #[test]
    fn checks_name_the_food_and_the_field() {
        let mut answer = ModelFoods { foods: vec![food("arroz", 128.0), food("bife", -5.0)] };
        assert_eq!(check(&answer).unwrap_err(), "foods[1].kcal = -5 is outside 0 to 10000");
        answer.foods[1].kcal = 200.0;
        answer.foods[0].confidence = 1.5;
        assert!(check(&answer).unwrap_err().starts_with("foods[0].confidence"));
        answer.foods[0].confidence = 0.5;
        assert_eq!(check(&answer), Ok(()));
    }

    #[test]
    fn a_missing_field_in_the_model_answer_is_named() {
        let text = r#"{"foods": [{"name": "arroz", "portion_g": 100, "kcal": 128, "protein_g": 2.5, "fat_g": 0.2, "confidence": 0.9}]}"#;
        assert!(serde_json::from_str::<ModelFoods>(text).unwrap_err().to_string().contains("missing field `carbs_g`"));
    }
}
