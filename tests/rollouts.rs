//! A type's rollout changes atomically: concurrent steps never lose one,
//! and the canary judge never undoes an operator's step, on both databases.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use quern_queue::rollout::{self, Step};
use quern_store::{Rollout, StoredVersion};
use support::db::Db;

async fn store_versions(db: &Db, count: usize) -> Vec<String> {
    let component = std::fs::read(support::dist("echo.wasm")).unwrap();
    let mut versions = Vec::new();
    for n in 0..count {
        let version = format!("v{n:02}");
        let stored = StoredVersion {
            job_type: "echo".into(),
            version: version.clone(),
            sha256: format!("{n:064}"),
            component: component.clone(),
            manifest: "type = \"echo\"\n".into(),
            uploaded_by: "ops".into(),
            uploaded_at: chrono::Utc::now(),
        };
        db.store.put_version(&stored).await.unwrap();
        versions.push(version);
    }
    versions
}

async fn concurrent_pushes_apply_one_after_another(db: Db) {
    let versions = store_versions(&db, 12).await;
    let pushes = versions.iter().map(|version| {
        let store = db.store.clone();
        let step = Step::Push { version: version.clone(), percent: 100 };
        tokio::spawn(async move { rollout::change(store.as_ref(), "echo", &step, None).await })
    });
    let results: Vec<Rollout> =
        futures_util::future::join_all(pushes).await.into_iter().map(|r| r.unwrap().unwrap()).collect();

    // Applied one after another, each push replaced a different version:
    // the (active ← previous) links form one chain through all twelve.
    let previous_of: BTreeMap<String, Option<String>> =
        results.iter().map(|r| (r.active_version.clone().unwrap(), r.previous_version.clone())).collect();
    assert_eq!(previous_of.len(), 12);
    let replaced: Vec<_> = previous_of.values().flatten().collect();
    assert_eq!(
        replaced.iter().collect::<BTreeSet<_>>().len(),
        11,
        "a version replaced twice is a lost step: {previous_of:?}"
    );
    let stored = db.store.rollouts().await.unwrap().into_iter().find(|r| r.job_type == "echo").unwrap();
    let mut seen = BTreeSet::new();
    let mut at = stored.active_version.clone();
    while let Some(version) = at {
        assert!(seen.insert(version.clone()), "a loop at {version}");
        at = previous_of[&version].clone();
    }
    assert_eq!(seen.len(), 12, "the chain from the stored rollout visits every push: {previous_of:?}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_apply_one_after_another_sqlite() {
    concurrent_pushes_apply_one_after_another(Db::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_apply_one_after_another_postgres() {
    concurrent_pushes_apply_one_after_another(Db::postgres().await).await;
}

async fn a_write_from_a_stale_read_is_refused_and_the_judge_yields(db: Db) {
    store_versions(&db, 3).await;
    let first = Step::Push { version: "v00".into(), percent: 100 };
    rollout::change(db.store.as_ref(), "echo", &first, None).await.unwrap();
    let canary = Step::Push { version: "v01".into(), percent: 10 };
    let judged = rollout::change(db.store.as_ref(), "echo", &canary, None).await.unwrap();

    // An operator replaces the canary after the judge read the rollout.
    let replace = Step::Push { version: "v02".into(), percent: 20 };
    rollout::change(db.store.as_ref(), "echo", &replace, None).await.unwrap();
    let stale_write = Rollout { canary_version: None, canary_percent: 0, ..judged.clone() };
    assert!(!db.store.swap_rollout(Some(&judged), &stale_write, chrono::Utc::now()).await.unwrap());

    let drop = Step::DropCanary { canary: "v01".into() };
    let after = rollout::change(db.store.as_ref(), "echo", &drop, None).await.unwrap();
    assert_eq!(
        (after.canary_version.as_deref(), after.canary_percent),
        (Some("v02"), 20),
        "the operator's canary stands"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn a_write_from_a_stale_read_is_refused_and_the_judge_yields_sqlite() {
    a_write_from_a_stale_read_is_refused_and_the_judge_yields(Db::sqlite().await).await;
}

#[tokio::test]
async fn a_write_from_a_stale_read_is_refused_and_the_judge_yields_postgres() {
    a_write_from_a_stale_read_is_refused_and_the_judge_yields(Db::postgres().await).await;
}
