//! `meal_plan`: a profile → daily energy and macro targets computed here
//! (Mifflin-St Jeor, an activity factor, the goal), and meals for 1 to 14
//! days written by the model. Every meal's and day's totals are summed here
//! from the foods and checked against the targets; a plan more than 20 % off
//! a day's target is sent back once to be fixed.
//!
//! Over 400 lines on purpose: the profile's forgiving reading, the targets,
//! the plan's checks and the prompt are one flow; the last quarter is unit
//! tests.

use quern_ai::{ChatRequest, Message, chat_json};
use quern_sdk::serde_json::{Map, Value};
use quern_sdk::{Failure, Handler, JobInfo, fail};
use serde::{Deserialize, Serialize};

/// How far a day's energy may stray from the target.
pub const TOLERANCE: f64 = 0.20;

/// The app's input: a profile in English or Portuguese, numbers as numbers
/// or as the strings a form sends, words in any case. Nothing the app sends
/// is dropped: fields not read here (preferences, a condition, …) go to the
/// model as what is known about the person; only ids are left out.
#[derive(Debug, Deserialize)]
pub struct Input {
    #[serde(alias = "perfil")]
    pub profile: Profile,
    #[serde(default = "default_days", alias = "dias", deserialize_with = "quern_sdk::input::number")]
    pub days: u32,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Fields that say nothing about the person.
const IDS: [&str; 4] = ["userId", "user_id", "id", "jobId"];

fn default_days() -> u32 {
    7
}

#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    #[serde(alias = "idade")]
    #[serde(deserialize_with = "quern_sdk::input::number")]
    pub age: u32,
    #[serde(alias = "sexo", alias = "genero", alias = "gênero", deserialize_with = "quern_sdk::input::word")]
    pub sex: Sex,
    #[serde(alias = "peso", alias = "weight")]
    #[serde(deserialize_with = "quern_sdk::input::number")]
    pub weight_kg: f64,
    #[serde(alias = "altura", alias = "height")]
    #[serde(deserialize_with = "quern_sdk::input::number")]
    pub height_cm: f64,
    #[serde(alias = "nivel_atividade", alias = "activity_level", deserialize_with = "quern_sdk::input::word")]
    pub activity: Activity,
    #[serde(alias = "objetivo", deserialize_with = "quern_sdk::input::word")]
    pub goal: Goal,
    /// A list, or one string of them (`"lactose, glúten"`).
    #[serde(
        default,
        alias = "restricoes",
        alias = "restrições",
        alias = "restricoes_alimentares",
        alias = "dietary_restrictions",
        deserialize_with = "quern_sdk::input::list"
    )]
    pub restrictions: Vec<String>,
    #[serde(default, alias = "alergias", deserialize_with = "quern_sdk::input::list")]
    pub allergies: Vec<String>,
    /// Everything else the app knows about the person.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    #[serde(alias = "masculino", alias = "homem", alias = "m")]
    Male,
    #[serde(alias = "feminino", alias = "mulher", alias = "f")]
    Female,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    #[serde(alias = "sedentario", alias = "sedentário")]
    Sedentary,
    #[serde(alias = "leve", alias = "levemente_ativo")]
    Light,
    #[serde(alias = "moderado", alias = "moderadamente_ativo")]
    Moderate,
    #[serde(alias = "ativo")]
    Active,
    #[serde(alias = "muito_ativo", alias = "extremamente_ativo")]
    VeryActive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    #[serde(alias = "perder_peso", alias = "emagrecer", alias = "emagrecimento")]
    LoseWeight,
    #[serde(alias = "manter", alias = "manter_peso", alias = "manutencao", alias = "manutenção")]
    Maintain,
    #[serde(alias = "ganhar_peso", alias = "ganhar_massa", alias = "hipertrofia")]
    GainWeight,
}

/// Daily targets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Targets {
    pub kcal: f64,
    pub protein_g: f64,
    pub carbs_g: f64,
    pub fat_g: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFood {
    pub name: String,
    pub portion_g: f64,
    pub kcal: f64,
    pub protein_g: f64,
    pub carbs_g: f64,
    pub fat_g: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelMeal {
    pub name: String,
    pub foods: Vec<PlanFood>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelDay {
    pub day: u32,
    pub meals: Vec<ModelMeal>,
}

/// What the model must answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelPlan {
    pub days: Vec<ModelDay>,
}

#[derive(Debug, Serialize)]
pub struct Meal {
    pub name: String,
    pub foods: Vec<PlanFood>,
    pub kcal: f64,
}

#[derive(Debug, Serialize)]
pub struct Day {
    pub day: u32,
    pub meals: Vec<Meal>,
    pub kcal_total: f64,
    pub protein_g: f64,
    pub carbs_g: f64,
    pub fat_g: f64,
    /// (kcal_total − target) / target, in percent.
    pub deviation_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub targets: Targets,
    pub days: Vec<Day>,
    pub provider: String,
    pub model: String,
}

pub struct MealPlan;

impl Handler for MealPlan {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        check_input(&input)?;
        let targets = targets(&input.profile);
        quern_sdk::progress(10, "planning meals");
        let days = input.days;
        let (plan, reply) = chat_json::<ModelPlan>(&request(&input.profile, days, &targets, &input.other), |plan| {
            check_plan(plan, days, &targets)
        })?;
        quern_sdk::progress(100, "done");
        Ok(Output { days: summarise(plan, &targets), targets, provider: reply.provider.into(), model: reply.model })
    }
}

pub fn check_input(input: &Input) -> Result<(), Failure> {
    let p = &input.profile;
    // A profile's values are personal: named, never quoted.
    let out_of =
        |field: &str, low: f64, high: f64| fail(format!("invalid input: `{field}` is outside {low} to {high}"));
    if !(1..=14).contains(&input.days) {
        return Err(fail(format!("invalid input: `days` = {} is outside 1 to 14", input.days)));
    }
    if !(14..=100).contains(&p.age) {
        return Err(out_of("profile.age", 14.0, 100.0));
    }
    if !(30.0..=300.0).contains(&p.weight_kg) {
        return Err(out_of("profile.weight_kg", 30.0, 300.0));
    }
    if !(120.0..=230.0).contains(&p.height_cm) {
        return Err(out_of("profile.height_cm", 120.0, 230.0));
    }
    Ok(())
}

/// Daily targets: Mifflin-St Jeor resting energy × activity, adjusted for the
/// goal; protein 1.6 g/kg, fat 27 % of energy, the rest carbohydrate.
pub fn targets(p: &Profile) -> Targets {
    let base = 10.0 * p.weight_kg + 6.25 * p.height_cm - 5.0 * f64::from(p.age);
    let resting = match p.sex {
        Sex::Male => base + 5.0,
        Sex::Female => base - 161.0,
    };
    let factor = match p.activity {
        Activity::Sedentary => 1.2,
        Activity::Light => 1.375,
        Activity::Moderate => 1.55,
        Activity::Active => 1.725,
        Activity::VeryActive => 1.9,
    };
    let floor = if p.sex == Sex::Male { 1500.0 } else { 1200.0 };
    let kcal = match p.goal {
        Goal::LoseWeight => (resting * factor - 500.0).max(floor),
        Goal::Maintain => resting * factor,
        Goal::GainWeight => resting * factor + 300.0,
    }
    .round();
    let protein_g = (1.6 * p.weight_kg).round();
    let fat_g = (kcal * 0.27 / 9.0).round();
    let carbs_g = ((kcal - protein_g * 4.0 - fat_g * 9.0) / 4.0).max(0.0).round();
    Targets { kcal, protein_g, carbs_g, fat_g }
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn day_kcal(day: &ModelDay) -> f64 {
    day.meals.iter().flat_map(|m| &m.foods).map(|f| f.kcal).sum()
}

/// The plan's shape and energy, checked against what was asked.
pub fn check_plan(plan: &ModelPlan, days: u32, targets: &Targets) -> Result<(), String> {
    if plan.days.len() != days as usize {
        return Err(format!("the plan has {} days; {days} were asked for", plan.days.len()));
    }
    for day in &plan.days {
        if day.meals.is_empty() {
            return Err(format!("day {} has no meals", day.day));
        }
        for food in day.meals.iter().flat_map(|m| &m.foods) {
            for (field, value) in [
                ("portion_g", food.portion_g),
                ("kcal", food.kcal),
                ("protein_g", food.protein_g),
                ("carbs_g", food.carbs_g),
                ("fat_g", food.fat_g),
            ] {
                if !value.is_finite() || value < 0.0 {
                    return Err(format!("day {}: {}.{field} = {value} is not a quantity", day.day, food.name));
                }
            }
        }
        let kcal = day_kcal(day);
        let deviation = (kcal - targets.kcal) / targets.kcal;
        if deviation.abs() > TOLERANCE {
            return Err(format!(
                "day {}'s foods add up to {kcal:.0} kcal, {:.0} % off the {:.0} kcal target (keep within {:.0} %)",
                day.day,
                deviation * 100.0,
                targets.kcal,
                TOLERANCE * 100.0
            ));
        }
    }
    Ok(())
}

/// Every total computed from the foods.
pub fn summarise(plan: ModelPlan, targets: &Targets) -> Vec<Day> {
    plan.days
        .into_iter()
        .map(|day| {
            let sum = |f: fn(&PlanFood) -> f64| round1(day.meals.iter().flat_map(|m| &m.foods).map(f).sum());
            let kcal_total = sum(|f| f.kcal);
            let (protein_g, carbs_g, fat_g) = (sum(|f| f.protein_g), sum(|f| f.carbs_g), sum(|f| f.fat_g));
            Day {
                day: day.day,
                deviation_pct: round1((kcal_total - targets.kcal) / targets.kcal * 100.0),
                meals: day
                    .meals
                    .into_iter()
                    .map(|meal| Meal {
                        kcal: round1(meal.foods.iter().map(|f| f.kcal).sum()),
                        name: meal.name,
                        foods: meal.foods,
                    })
                    .collect(),
                kcal_total,
                protein_g,
                carbs_g,
                fat_g,
            }
        })
        .collect()
}

pub fn request(profile: &Profile, days: u32, targets: &Targets, extra: &Map<String, Value>) -> ChatRequest {
    let listed = |items: &[String]| if items.is_empty() { "none".to_string() } else { items.join(", ") };
    let (restrictions, allergies) = (listed(&profile.restrictions), listed(&profile.allergies));
    let mut known: Map<String, Value> = profile.other.clone();
    known.extend(extra.iter().map(|(key, value)| (key.clone(), value.clone())));
    known.retain(|key, value| !IDS.contains(&key.as_str()) && !value.is_null());
    let known = if known.is_empty() {
        String::new()
    } else {
        format!(" Also known about the person (as the app sent it, JSON): {}.", Value::Object(known))
    };
    let system = "You are a dietitian planning Brazilian home meals (TACO food-composition values). Answer with only a \
JSON object: {\"days\": [{\"day\": number, \"meals\": [{\"name\": string, \"foods\": [{\"name\": string, \
\"portion_g\": number, \"kcal\": number, \"protein_g\": number, \"carbs_g\": number, \"fat_g\": number}]}]}]}.";
    let user = format!(
        "Plan {days} day(s), numbered from 1, each with breakfast, lunch, snack and dinner. Each day's foods must add up \
to about {:.0} kcal (protein {:.0} g, carbohydrate {:.0} g, fat {:.0} g). Dietary restrictions: {restrictions}. \
Allergies: {allergies}.{known}",
        targets.kcal, targets.protein_g, targets.carbs_g, targets.fat_g
    );
    ChatRequest { temperature: Some(0.4), ..ChatRequest::new(vec![Message::system(system), Message::user(user)]) }
}

quern_sdk::export_handler!(MealPlan);

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            age: 30,
            sex: Sex::Female,
            weight_kg: 70.0,
            height_cm: 165.0,
            activity: Activity::Moderate,
            goal: Goal::LoseWeight,
            restrictions: vec!["lactose".into()],
            allergies: Vec::new(),
            other: Map::new(),
        }
    }

    fn food(kcal: f64) -> PlanFood {
        PlanFood { name: "arroz".into(), portion_g: 100.0, kcal, protein_g: 10.0, carbs_g: 20.0, fat_g: 5.0 }
    }

    fn day(n: u32, kcals: &[f64]) -> ModelDay {
        ModelDay {
            day: n,
            meals: vec![ModelMeal { name: "almoço".into(), foods: kcals.iter().map(|k| food(*k)).collect() }],
        }
    }

    #[test]
    fn targets_follow_mifflin_st_jeor() {
        // 10·70 + 6.25·165 − 5·30 − 161 = 1420.25; × 1.55 = 2201.4; − 500 = 1701.
        let t = targets(&profile());
        assert_eq!(t.kcal, 1701.0);
        assert_eq!(t.protein_g, 112.0);
        assert_eq!(t.fat_g, 51.0);
        assert_eq!(t.carbs_g, 199.0, "(1701 − 112·4 − 51·9) / 4 = 198.5");
    }

    #[test]
    fn totals_are_the_sums_of_the_meals_not_the_model_s() {
        let plan = ModelPlan { days: vec![day(1, &[500.25, 600.0, 600.0])] };
        let days = summarise(plan, &targets(&profile()));
        assert_eq!(days[0].kcal_total, 1700.3);
        assert_eq!(days[0].meals[0].kcal, 1700.3);
        assert_eq!(days[0].protein_g, 30.0);
        assert_eq!(days[0].deviation_pct, 0.0);
    }

    #[test]
    fn a_plan_far_from_the_target_or_of_the_wrong_length_is_sent_back() {
        let t = targets(&profile());
        assert!(check_plan(&ModelPlan { days: vec![day(1, &[1700.0])] }, 2, &t).unwrap_err().contains("2 were asked"));
        let error = check_plan(&ModelPlan { days: vec![day(1, &[3000.0])] }, 1, &t).unwrap_err();
        assert!(error.contains("day 1's foods add up to 3000 kcal, 76 % off the 1701 kcal target"), "{error}");
        assert_eq!(check_plan(&ModelPlan { days: vec![day(1, &[900.0, 900.0])] }, 1, &t), Ok(()));
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let mut input = Input { profile: profile(), days: 15, other: Map::new() };
        let reason = |input: &Input| match check_input(input) {
            Err(Failure::Fail(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(&input).contains("`days` = 15"));
        input.days = 7;
        input.profile.height_cm = 17.0;
        assert!(reason(&input).contains("`profile.height_cm` is outside 120 to 230") && !reason(&input).contains("17"));
    }

    /// Seed 000's processors take what the app sent whole (`async function
    /// processUnifiedAssistant(input: any)`); a profile with `restricoes:
    /// ["lactose"]` once left the prompt saying "Dietary restrictions: none":
    /// for a nutrition app, a safety defect. Portuguese names, any case, and
    /// nothing dropped.
    #[test]
    fn a_brazilian_form_s_profile_reaches_the_prompt_whole() {
        let input: Input = quern_sdk::parse_input(
            r#"{"perfil": {"idade": "30", "sexo": "Feminino", "peso": "70,5", "altura": 165,
                "nivel_atividade": "Moderado", "objetivo": "Perder Peso", "restricoes": ["lactose"],
                "alergias": "amendoim, camarão", "condicao": "diabetes tipo 2"}, "dias": 2,
                "preferencias": {"cozinha": "nordestina"}, "userId": "u-1"}"#,
        )
        .unwrap();
        assert_eq!(
            (input.profile.sex, input.profile.activity, input.profile.goal),
            (Sex::Female, Activity::Moderate, Goal::LoseWeight)
        );
        let request = request(&input.profile, input.days, &targets(&input.profile), &input.other);
        let user = request.body("m")["messages"][1]["content"].as_str().unwrap().to_string();
        assert!(user.contains("Dietary restrictions: lactose."), "{user}");
        assert!(user.contains("Allergies: amendoim, camarão."), "{user}");
        assert!(
            user.contains(r#""condicao":"diabetes tipo 2""#) && user.contains(r#""cozinha":"nordestina""#),
            "{user}"
        );
        assert!(!user.contains("u-1"), "ids say nothing about the person: {user}");
        assert!(user.starts_with("Plan 2 day(s)"), "{user}");
    }
}
