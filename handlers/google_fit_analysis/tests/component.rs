//! The built `google_fit_analysis` component against canned chat completions.

use quern_testing::{CannedResponse, Harness};
use serde_json::{Value, json};

use quern_testing::upstreams::OLLAMA_CHAT as OLLAMA;

fn harness() -> Harness {
    Harness::of_crate(env!("CARGO_MANIFEST_DIR"))
        .with_ollama()
        .build()
        .expect("build the handlers first: cargo xtask build-handlers")
}

#[tokio::test]
async fn the_app_s_series_give_statistics_in_code_and_a_narrative_that_is_told_them() {
    let harness = harness();
    harness.respond(
        "POST",
        OLLAMA,
        CannedResponse::chat_completion("llama3.2", "Você caminhou em média 7.000 passos por dia."),
    );
    // As the app sends it: camelCase, values under their own names, numbers as strings, its userId.
    let steps: Vec<Value> = [5000, 6000, 7000, 8000, 9000]
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"date": format!("2026-01-0{}", i + 1), "steps": s}))
        .collect();
    let run = harness
        .run(json!({
            "userId": "u-1",
            "steps": steps,
            "heartRate": [{"date": "2026-01-01", "bpm": "64"}, {"date": "2026-01-02", "bpm": 66}],
            "sleep": [{"date": "2026-01-01", "hours": 6.5}, {"date": "2026-01-02", "hours": "7,5"}],
            "goals": {"steps": 7500, "sleepHours": 7}
        }))
        .await;
    let output = run.output();
    let steps = &output["stats"]["steps"];
    let sum: f64 = [5000.0, 6000.0, 7000.0, 8000.0, 9000.0].iter().sum();
    assert_eq!(steps["total"], sum, "the total is the sum of the days");
    assert_eq!((steps["average"].clone(), steps["trend"].clone()), (json!(7000.0), json!("rising")));
    assert_eq!(steps["days_below_goal"], 3, "5000, 6000 and 7000 are under 7500");
    assert_eq!(output["stats"]["heart_rate"]["average"], 65.0);
    assert_eq!(output["stats"]["sleep"]["days_below_goal"], 1);
    assert!(output["stats"].get("activity").is_none(), "a series not given is not made up");
    assert_eq!(output["narrative"], "Você caminhou em média 7.000 passos por dia.");
    let told = run.requests[0].json().unwrap()["messages"][1]["content"].as_str().unwrap().to_string();
    assert!(told.contains("\"total\":35000.0"), "the model is told the computed figures: {told}");
}

#[tokio::test]
async fn invalid_input_fails_permanently_naming_the_field() {
    let harness = harness();
    for (input, needle) in [
        (json!({"userId": "u"}), "give at least one of `steps`"),
        (json!({"steps": [{"date": "2026-01-01", "steps": "muitos"}]}), "field `steps[0].steps`: expected f64"),
        (json!({"steps": [{"steps": 10}]}), "missing field `date`"),
    ] {
        let run = harness.run(input).await;
        assert!(run.failure().contains(needle), "{}", run.failure());
        assert!(!run.failure().contains("muitos"), "never quoted: {}", run.failure());
    }
}
