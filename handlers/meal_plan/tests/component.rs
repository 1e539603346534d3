//! The built `meal_plan` component against canned chat completions.

use quern_testing::{CannedResponse, Harness};
use serde_json::{Value, json};

use quern_testing::upstreams::OLLAMA_CHAT as OLLAMA;

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_ollama()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

fn profile() -> Value {
    json!({"age": 30, "sex": "female", "weight_kg": 70, "height_cm": 165, "activity": "moderate",
           "goal": "lose_weight", "restrictions": ["lactose"]})
}

fn food(name: &str, kcal: f64) -> Value {
    json!({"name": name, "portion_g": 100, "kcal": kcal, "protein_g": 20, "carbs_g": 40, "fat_g": 10})
}

/// `days` days whose meals add up to `kcal` each; the model's own `kcal_total` lies.
fn plan(days: u32, kcal: f64) -> String {
    let days: Vec<Value> = (1..=days)
        .map(|day| {
            json!({"day": day, "kcal_total": 1234, "meals": [
                {"name": "café da manhã", "foods": [food("pão integral", kcal * 0.25)]},
                {"name": "almoço", "foods": [food("arroz", kcal * 0.2), food("feijão", kcal * 0.15)]},
                {"name": "jantar", "foods": [food("sopa de legumes", kcal * 0.4)]}
            ]})
        })
        .collect();
    json!({"days": days}).to_string()
}

#[tokio::test]
async fn totals_are_computed_from_the_meals_and_match_their_sum() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &plan(2, 1700.0)));
    let run = harness.run(json!({"profile": profile(), "days": 2})).await;
    let output = run.output();
    assert_eq!(output["targets"]["kcal"], 1701.0);
    let days = output["days"].as_array().unwrap();
    assert_eq!(days.len(), 2);
    for day in days {
        let meals_sum: f64 = day["meals"].as_array().unwrap().iter().map(|m| m["kcal"].as_f64().unwrap()).sum();
        let foods_sum: f64 = day["meals"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["foods"].as_array().unwrap())
            .map(|f| f["kcal"].as_f64().unwrap())
            .sum();
        assert_eq!(day["kcal_total"].as_f64().unwrap(), 1700.0, "not the model's 1234");
        assert!((meals_sum - foods_sum).abs() < 0.01 && (day["kcal_total"].as_f64().unwrap() - meals_sum).abs() < 0.01);
    }
    let prompt = run.requests[0].json().unwrap()["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(prompt.contains("1701 kcal") && prompt.contains("lactose"), "{prompt}");
}

#[tokio::test]
async fn the_app_s_portuguese_profile_with_its_extras_and_string_numbers_gives_the_same_plan() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &plan(1, 1700.0)));
    let run = harness
        .run(json!({
            "userId": "u-1",
            "days": "1",
            "profile": {"nome": "Maria", "idade": "30", "sexo": "feminino", "peso": "70", "altura": 165,
                        "nivel_atividade": "moderado", "objetivo": "perder_peso", "restrictions": ["lactose"],
                        "cidade": "Recife"}
        }))
        .await;
    let output = run.output();
    assert_eq!(output["targets"]["kcal"], 1701.0, "the same targets as the English profile: {output}");
    let day = &output["days"][0];
    let meals_sum: f64 = day["meals"].as_array().unwrap().iter().map(|m| m["kcal"].as_f64().unwrap()).sum();
    assert!((day["kcal_total"].as_f64().unwrap() - meals_sum).abs() < 0.01, "{day}");

    let run = self::harness().run(json!({"profile": {"idade": "trinta", "sexo": "feminino"}})).await;
    let failure = run.failure();
    assert!(
        failure.contains("field `profile.idade`: expected u32") && !failure.contains("trinta"),
        "named as sent, never echoed: {failure}"
    );
}

#[tokio::test]
async fn a_plan_off_target_is_sent_back_once_then_refused() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &plan(1, 3200.0)));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &plan(1, 1650.0)));
    let run = harness.run(json!({"profile": profile(), "days": 1})).await;
    assert_eq!(run.output()["days"][0]["kcal_total"], 1650.0);
    let fix = run.requests[1].json().unwrap()["messages"].as_array().unwrap().last().cloned().unwrap();
    assert!(fix["content"].as_str().unwrap().contains("off the 1701 kcal target"), "{fix}");

    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", &plan(3, 1700.0)));
    let run = harness.run(json!({"profile": profile(), "days": 1})).await;
    assert!(run.failure().contains("3 days; 1 were asked for"), "{}", run.failure());
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    let mut bad_sex = profile();
    bad_sex["sex"] = json!("x");
    let mut no_goal = profile();
    no_goal.as_object_mut().unwrap().remove("goal");
    for (input, needle) in [
        (json!({"days": 3}), "missing field `profile`"),
        (json!({"profile": profile(), "days": 0}), "`days` = 0"),
        (json!({"profile": bad_sex}), "field `profile.sex`: an unknown value: expected one of `homem`, `m`, `male`,"),
        (json!({"profile": no_goal}), "missing field `goal`"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
    }
}

#[tokio::test]
async fn upstream_down_failing_or_rate_limited_is_a_retry() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::error(quern_testing::HttpErrorKind::Connect, "refused"));
    assert!(harness.run(json!({"profile": profile()})).await.retry().0.contains("could not connect"));
    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(503, "loading model"));
    assert!(harness.run(json!({"profile": profile()})).await.retry().0.contains("503"));
    let harness = self::harness();
    harness.respond("POST", OLLAMA, CannedResponse::text(429, "busy").with_header("Retry-After", "4"));
    assert_eq!(harness.run(json!({"profile": profile()})).await.retry().1, Some(std::time::Duration::from_secs(4)));
}

#[tokio::test]
async fn malformed_output_is_sent_back_once_then_fails_quoting_it() {
    let harness = harness();
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "Aqui está seu plano: segunda..."));
    harness.respond("POST", OLLAMA, CannedResponse::chat_completion("llama3.2", "Aqui está seu plano: segunda..."));
    let run = harness.run(json!({"profile": profile(), "days": 1})).await;
    assert_eq!(run.requests.len(), 2, "asked once more with the parse error");
    assert!(run.failure().contains("it starts: Aqui está seu plano"), "{}", run.failure());
}
