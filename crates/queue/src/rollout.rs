//! A type's rollout, changed one step at a time: push a version (to all new
//! jobs, or to a share as a canary), roll back, pause, resume, or drop a
//! failing canary (the judge's step). [`apply`] is the state machine, pure;
//! [`change`] reads the stored rollout, applies a step and writes it back
//! only if nobody changed it meanwhile (compare-and-set), reading again and
//! re-applying when someone did. Concurrent operators, or the judge racing
//! an operator, never lose a step: each applies to what the other wrote.

use chrono::Utc;

use quern_store::{Rollout, Store, StoreError};

/// One step of a type's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `version` to `percent` of new jobs: 100 makes it the active version
    /// (the active one becomes the previous), 0 drops the canary, anything
    /// between runs it as a canary beside the active version.
    Push {
        version: String,
        percent: u8,
    },
    /// Drop the canary if there is one, else return to the previous version.
    Rollback,
    Pause,
    Resume,
    /// The canary judge's step: drop `canary` if it is still the canary.
    DropCanary {
        canary: String,
    },
}

/// A step that cannot apply to the rollout as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("`{job_type}` has no version rolled out through the API to run beside a canary: roll one out at 100 first")]
    NoActiveVersion { job_type: String },
    #[error("{version} is the active version of `{job_type}`; a canary must be another")]
    AlreadyActive { job_type: String, version: String },
    #[error("`{job_type}` has no canary and no previous version to return to")]
    NothingToRollBack { job_type: String },
}

/// The rollout after `step`, or `None` when the step changes nothing.
pub fn apply(current: &Rollout, step: &Step) -> Result<Option<Rollout>, Refused> {
    let job_type = &current.job_type;
    let mut next = current.clone();
    match step {
        Step::Push { version, percent: 100 } => {
            if next.active_version.as_deref() != Some(version) {
                next.previous_version = next.active_version.replace(version.clone());
            }
            next.canary_version = None;
            next.canary_percent = 0;
        }
        Step::Push { percent: 0, .. } => {
            next.canary_version = None;
            next.canary_percent = 0;
        }
        Step::Push { version, percent } => {
            match next.active_version.as_deref() {
                None => return Err(Refused::NoActiveVersion { job_type: job_type.clone() }),
                Some(active) if active == version => {
                    return Err(Refused::AlreadyActive { job_type: job_type.clone(), version: version.clone() });
                }
                Some(_) => {}
            }
            next.canary_version = Some(version.clone());
            next.canary_percent = i16::from(*percent);
        }
        Step::Rollback => {
            if next.canary_version.is_some() {
                next.canary_version = None;
                next.canary_percent = 0;
            } else if let Some(previous) = next.previous_version.take() {
                next.previous_version = next.active_version.replace(previous);
            } else {
                return Err(Refused::NothingToRollBack { job_type: job_type.clone() });
            }
        }
        Step::Pause => next.paused = true,
        Step::Resume => next.paused = false,
        Step::DropCanary { canary } => {
            if next.canary_version.as_deref() != Some(canary) {
                return Ok(None);
            }
            next.canary_version = None;
            next.canary_percent = 0;
        }
    }
    Ok((next != *current).then_some(next))
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the rollout of `{0}` kept changing under this step; try again")]
    Contended(String),
}

/// How many times a step is re-applied to a rollout that changed under it.
const ATTEMPTS: usize = 50;

/// Applies `step` to the stored rollout of `job_type` atomically and returns
/// the rollout as it stands after it. `adopt` is the active version taken
/// when the stored rollout names none (a type served from the handlers
/// directory has its version there: a first push makes it the previous one).
pub async fn change(
    store: &dyn Store,
    job_type: &str,
    step: &Step,
    adopt: Option<&str>,
) -> Result<Rollout, ChangeError> {
    for _ in 0..ATTEMPTS {
        let stored = store.rollouts().await?.into_iter().find(|r| r.job_type == job_type);
        let mut current =
            stored.clone().unwrap_or_else(|| Rollout { job_type: job_type.to_string(), ..Rollout::default() });
        // A row may exist without an active version (a directory type paused).
        if current.active_version.is_none() {
            current.active_version = adopt.map(str::to_string);
        }
        let Some(next) = apply(&current, step)? else { return Ok(current) };
        if store.swap_rollout(stored.as_ref(), &next, Utc::now()).await? {
            return Ok(next);
        }
    }
    Err(ChangeError::Contended(job_type.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(active: Option<&str>, previous: Option<&str>, canary: Option<(&str, i16)>) -> Rollout {
        Rollout {
            job_type: "echo".into(),
            active_version: active.map(Into::into),
            previous_version: previous.map(Into::into),
            canary_version: canary.map(|(v, _)| v.into()),
            canary_percent: canary.map_or(0, |(_, p)| p),
            paused: false,
        }
    }

    fn push(version: &str, percent: u8) -> Step {
        Step::Push { version: version.into(), percent }
    }

    #[test]
    fn a_full_push_makes_the_active_version_the_previous_one_and_ends_any_canary() {
        let from = rollout(Some("a"), None, Some(("c", 10)));
        assert_eq!(apply(&from, &push("b", 100)).unwrap(), Some(rollout(Some("b"), Some("a"), None)));
        let first = rollout(None, None, None);
        assert_eq!(apply(&first, &push("a", 100)).unwrap(), Some(rollout(Some("a"), None, None)));
    }

    #[test]
    fn pushing_the_active_version_again_only_ends_the_canary() {
        let from = rollout(Some("a"), Some("z"), Some(("c", 10)));
        assert_eq!(apply(&from, &push("a", 100)).unwrap(), Some(rollout(Some("a"), Some("z"), None)));
        assert_eq!(apply(&rollout(Some("a"), Some("z"), None), &push("a", 100)).unwrap(), None, "nothing changes");
    }

    #[test]
    fn a_canary_needs_an_active_version_other_than_itself() {
        let from = rollout(Some("a"), None, None);
        assert_eq!(apply(&from, &push("b", 25)).unwrap(), Some(rollout(Some("a"), None, Some(("b", 25)))));
        assert_eq!(
            apply(&rollout(None, None, None), &push("b", 25)),
            Err(Refused::NoActiveVersion { job_type: "echo".into() })
        );
        assert_eq!(
            apply(&from, &push("a", 25)),
            Err(Refused::AlreadyActive { job_type: "echo".into(), version: "a".into() })
        );
    }

    #[test]
    fn a_push_at_zero_drops_the_canary() {
        let from = rollout(Some("a"), None, Some(("b", 25)));
        assert_eq!(apply(&from, &push("b", 0)).unwrap(), Some(rollout(Some("a"), None, None)));
        assert_eq!(apply(&rollout(Some("a"), None, None), &push("b", 0)).unwrap(), None);
    }

    #[test]
    fn rollback_drops_the_canary_first_then_returns_to_the_previous_version() {
        let from = rollout(Some("b"), Some("a"), Some(("c", 10)));
        let dropped = apply(&from, &Step::Rollback).unwrap().unwrap();
        assert_eq!(dropped, rollout(Some("b"), Some("a"), None));
        let back = apply(&dropped, &Step::Rollback).unwrap().unwrap();
        assert_eq!(back, rollout(Some("a"), Some("b"), None), "the version rolled back from can be returned to");
        assert_eq!(
            apply(&rollout(Some("a"), None, None), &Step::Rollback),
            Err(Refused::NothingToRollBack { job_type: "echo".into() })
        );
    }

    #[test]
    fn pause_and_resume_touch_nothing_else() {
        let from = rollout(Some("a"), Some("z"), Some(("c", 10)));
        let paused = apply(&from, &Step::Pause).unwrap().unwrap();
        assert_eq!(paused, Rollout { paused: true, ..from.clone() });
        assert_eq!(apply(&paused, &Step::Pause).unwrap(), None);
        assert_eq!(apply(&paused, &Step::Resume).unwrap(), Some(from));
    }

    #[test]
    fn the_judge_drops_only_the_canary_it_judged() {
        let from = rollout(Some("a"), None, Some(("c", 10)));
        let judged = Step::DropCanary { canary: "c".into() };
        assert_eq!(apply(&from, &judged).unwrap(), Some(rollout(Some("a"), None, None)));
        let replaced = rollout(Some("a"), None, Some(("d", 10)));
        assert_eq!(apply(&replaced, &judged).unwrap(), None, "an operator replaced it meanwhile: theirs stands");
    }
}
