//! `google_fit_analysis`: Google Fit series (steps, heart rate, sleep,
//! activity) → statistics computed here (totals, averages, extremes, the
//! trend per day, days below the goal) and a narrative by the AI provider
//! chain, told those statistics and asked to cite them. The model never
//! does arithmetic: every number in `stats` is computed in code.

use std::collections::BTreeMap;

use quern_ai::{ChatRequest, Message, chat};
use quern_sdk::{Failure, Handler, JobInfo, fail, retry};
use serde::{Deserialize, Serialize};

/// The most points a series may have (a year of days).
pub const MAX_POINTS: usize = 366;

/// The app's series; other fields (`userId`, the period's label…) are ignored.
#[derive(Debug, Deserialize)]
pub struct Input {
    #[serde(default)]
    pub steps: Vec<Point>,
    #[serde(default, alias = "heartRate")]
    pub heart_rate: Vec<Point>,
    #[serde(default)]
    pub sleep: Vec<Point>,
    #[serde(default)]
    pub activity: Vec<Point>,
    #[serde(default)]
    pub goals: Goals,
}

/// One day's value: `{date, value}`, or the value under its own name
/// (`steps`, `bpm`, `hours`, `minutes`), as a number or a numeric string.
#[derive(Debug, Clone, Deserialize)]
pub struct Point {
    pub date: String,
    #[serde(
        alias = "steps",
        alias = "bpm",
        alias = "avg",
        alias = "hours",
        alias = "minutes",
        alias = "count",
        deserialize_with = "quern_sdk::input::number"
    )]
    pub value: f64,
}

/// Daily goals; the days below them are counted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Goals {
    #[serde(deserialize_with = "quern_sdk::input::number")]
    pub steps: f64,
    #[serde(alias = "sleepHours", deserialize_with = "quern_sdk::input::number")]
    pub sleep_hours: f64,
    #[serde(alias = "activityMinutes", deserialize_with = "quern_sdk::input::number")]
    pub activity_minutes: f64,
}

impl Default for Goals {
    fn default() -> Self {
        Self { steps: 8000.0, sleep_hours: 7.0, activity_minutes: 30.0 }
    }
}

/// One series, summed up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesStats {
    pub days: usize,
    pub total: f64,
    pub average: f64,
    pub min: f64,
    pub max: f64,
    /// Least-squares slope, per day, in the series' unit.
    pub trend_per_day: f64,
    /// `rising`, `falling` or `steady` (less than 1 % of the average per day).
    pub trend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_below_goal: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct Output {
    /// By series name (`steps`, `heart_rate`, `sleep`, `activity`), those given.
    pub stats: BTreeMap<&'static str, SeriesStats>,
    /// The model's reading of `stats`, in the user's language.
    pub narrative: String,
    pub provider: String,
    pub model: String,
}

pub const PROMPT: &str = "You are the health coach of a nutrition and health app. You are given statistics \
computed from the user's Google Fit data. Write a short analysis (at most six sentences, in Brazilian Portuguese) \
that cites the numbers given, says what is going well and suggests one or two realistic improvements. Do not \
compute new numbers and do not diagnose.";

pub struct GoogleFitAnalysis;

impl Handler for GoogleFitAnalysis {
    type Input = Input;
    type Output = Output;

    fn handle(_job: &JobInfo, input: Input) -> Result<Output, Failure> {
        let stats = statistics(&input)?;
        quern_sdk::progress(30, "writing the analysis");
        let reply = chat(&request(&stats))?;
        let narrative = reply.content.trim().to_string();
        if narrative.is_empty() {
            return Err(retry(format!("{} answered an empty analysis", reply.provider)));
        }
        Ok(Output { stats, narrative, provider: reply.provider.into(), model: reply.model })
    }
}

/// Every series given, summed up; a permanent failure naming the series
/// when none is given or one is too long.
pub fn statistics(input: &Input) -> Result<BTreeMap<&'static str, SeriesStats>, Failure> {
    let goals = &input.goals;
    let series: [(&'static str, &[Point], Option<f64>); 4] = [
        ("steps", &input.steps, Some(goals.steps)),
        ("heart_rate", &input.heart_rate, None),
        ("sleep", &input.sleep, Some(goals.sleep_hours)),
        ("activity", &input.activity, Some(goals.activity_minutes)),
    ];
    let mut stats = BTreeMap::new();
    for (name, points, goal) in series {
        if points.len() > MAX_POINTS {
            return Err(fail(format!("invalid input: `{name}` has more than {MAX_POINTS} days; send a year at most")));
        }
        if let Some(summary) = summarize(points, goal) {
            stats.insert(name, summary);
        }
    }
    if stats.is_empty() {
        return Err(fail("invalid input: give at least one of `steps`, `heartRate`, `sleep` or `activity`"));
    }
    Ok(stats)
}

/// The statistics of one series, in date order; `None` when it is empty.
pub fn summarize(points: &[Point], goal: Option<f64>) -> Option<SeriesStats> {
    let mut points = points.to_vec();
    points.sort_by(|a, b| a.date.cmp(&b.date));
    let values: Vec<f64> = points.iter().map(|p| p.value).collect();
    let days = values.len();
    if days == 0 {
        return None;
    }
    let total: f64 = values.iter().sum();
    let average = total / days as f64;
    let slope = slope(&values);
    let trend = if slope.abs() < 0.01 * average.abs() {
        "steady"
    } else if slope > 0.0 {
        "rising"
    } else {
        "falling"
    };
    Some(SeriesStats {
        days,
        total: round1(total),
        average: round1(average),
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        trend_per_day: round1(slope),
        trend,
        goal,
        days_below_goal: goal.map(|goal| values.iter().filter(|v| **v < goal).count()),
    })
}

/// The least-squares slope of `values` against their index (0 for one value).
fn slope(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    if values.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = values.iter().sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for (i, y) in values.iter().enumerate() {
        let dx = i as f64 - mean_x;
        covariance += dx * (y - mean_y);
        variance += dx * dx;
    }
    covariance / variance
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

pub fn request(stats: &BTreeMap<&'static str, SeriesStats>) -> ChatRequest {
    let figures = serde_json::to_string(stats).unwrap_or_default();
    ChatRequest {
        temperature: Some(0.4),
        ..ChatRequest::new(vec![Message::system(PROMPT), Message::user(format!("Statistics (JSON): {figures}"))])
    }
}

quern_sdk::export_handler!(GoogleFitAnalysis);

#[cfg(test)]
mod tests {
    use super::*;

    fn points(values: &[f64]) -> Vec<Point> {
        values.iter().enumerate().map(|(i, v)| Point { date: format!("2026-01-{:02}", i + 1), value: *v }).collect()
    }

    #[test]
    fn statistics_are_computed_in_code() {
        let stats = summarize(&points(&[6000.0, 7000.0, 8000.0, 9000.0, 10000.0]), Some(8000.0)).unwrap();
        assert_eq!((stats.days, stats.total, stats.average), (5, 40000.0, 8000.0));
        assert_eq!((stats.min, stats.max), (6000.0, 10000.0));
        assert_eq!((stats.trend_per_day, stats.trend), (1000.0, "rising"));
        assert_eq!(stats.days_below_goal, Some(2));
        let flat = summarize(&points(&[62.0, 61.0, 62.0, 61.0]), None).unwrap();
        assert_eq!((flat.trend, flat.days_below_goal), ("steady", None));
        assert!(summarize(&[], None).is_none());
    }

    #[test]
    fn days_are_taken_in_date_order() {
        let mut shuffled = points(&[1.0, 2.0, 3.0]);
        shuffled.reverse();
        assert_eq!(summarize(&shuffled, None).unwrap().trend, "rising");
    }
}
