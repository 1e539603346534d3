//! Handler versions and their rollouts, on either backend.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{Backend, Param, Role, mapped};
use crate::rows::{Columns, FromColumns};
use crate::{Rollout, StoreError, StoredVersion, VersionInfo, VersionStore, Wakeups};

#[async_trait]
impl<B: Backend> VersionStore for B {
    async fn prune_handler_versions(&self, keep_newest: u32) -> Result<Vec<(String, String)>, StoreError> {
        // A version is among the newest `keep_newest` of its type when fewer
        // than that many others were uploaded at or after it.
        let rows = self
            .fetch(
                Role::Write,
                "DELETE FROM quern_handler_versions AS v \
                 WHERE NOT EXISTS (SELECT 1 FROM quern_handler_rollouts AS r WHERE r.type = v.type \
                                   AND v.version IN (r.active_version, r.canary_version, r.previous_version)) \
                   AND (SELECT count(*) FROM quern_handler_versions AS newer WHERE newer.type = v.type \
                        AND newer.uploaded_at >= v.uploaded_at AND newer.version <> v.version) >= $1 \
                 RETURNING type, version",
                &[keep_newest.into()],
            )
            .await?;
        rows.iter().map(|row| Ok((row.plain("type")?, row.plain("version")?))).collect()
    }

    async fn put_version(&self, version: &StoredVersion) -> Result<bool, StoreError> {
        let inserted = self
            .execute(
                Role::Write,
                "INSERT INTO quern_handler_versions (type, version, sha256, component, manifest, size_bytes, \
                 uploaded_by, uploaded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (type, version) DO NOTHING",
                &[
                    (&version.job_type).into(),
                    (&version.version).into(),
                    (&version.sha256).into(),
                    version.component.as_slice().into(),
                    (&version.manifest).into(),
                    (version.component.len() as i64).into(),
                    (&version.uploaded_by).into(),
                    version.uploaded_at.into(),
                ],
            )
            .await?;
        Ok(inserted == 1)
    }

    async fn version(&self, job_type: &str, version: &str) -> Result<Option<StoredVersion>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT type, version, sha256, component, manifest, uploaded_by, uploaded_at \
                 FROM quern_handler_versions WHERE type = $1 AND version = $2",
                &[job_type.into(), version.into()],
            )
            .await?;
        rows.first().map(StoredVersion::from_columns).transpose()
    }

    async fn versions(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT type, version, sha256, size_bytes, uploaded_by, uploaded_at FROM quern_handler_versions \
                 ORDER BY uploaded_at DESC",
                &[],
            )
            .await?;
        mapped(&rows)
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let rows = self
            .fetch(
                Role::Read,
                "SELECT type, active_version, previous_version, canary_version, canary_percent, paused \
                 FROM quern_handler_rollouts ORDER BY type",
                &[],
            )
            .await?;
        mapped(&rows)
    }

    async fn put_rollout(&self, rollout: &Rollout, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.execute(
            Role::Write,
            "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
             canary_percent, paused, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (type) DO UPDATE SET \
             active_version = excluded.active_version, previous_version = excluded.previous_version, \
             canary_version = excluded.canary_version, canary_percent = excluded.canary_percent, \
             paused = excluded.paused, updated_at = excluded.updated_at",
            &rollout_params(rollout, now),
        )
        .await?;
        self.rollout_written(&rollout.job_type).await;
        Ok(())
    }

    async fn swap_rollout(
        &self,
        expected: Option<&Rollout>,
        next: &Rollout,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let params = rollout_params(next, now);
        let written = match expected {
            None => {
                self.execute(
                    Role::Write,
                    "INSERT INTO quern_handler_rollouts (type, active_version, previous_version, canary_version, \
                     canary_percent, paused, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (type) DO NOTHING",
                    &params,
                )
                .await?
            }
            // The row as it was read: every column a step changes.
            Some(expected) => {
                let [_, active, previous, canary, percent, paused, _] = rollout_params(expected, now);
                self.execute(
                    Role::Write,
                    "UPDATE quern_handler_rollouts SET active_version = $2, previous_version = $3, \
                     canary_version = $4, canary_percent = $5, paused = $6, updated_at = $7 \
                     WHERE type = $1 AND active_version IS NOT DISTINCT FROM $8 \
                       AND previous_version IS NOT DISTINCT FROM $9 AND canary_version IS NOT DISTINCT FROM $10 \
                       AND canary_percent = $11 AND paused = $12",
                    &[&params[..], &[active, previous, canary, percent, paused]].concat(),
                )
                .await?
            }
        };
        if written != 1 {
            return Ok(false);
        }
        self.rollout_written(&next.job_type).await;
        Ok(true)
    }

    async fn rollout_changes(&self) -> Result<Box<dyn Wakeups>, StoreError> {
        self.listen_for_rollouts().await
    }
}

/// A rollout's columns in table order, ending with the time of the write.
fn rollout_params(rollout: &Rollout, now: DateTime<Utc>) -> [Param<'_>; 7] {
    [
        (&rollout.job_type).into(),
        (&rollout.active_version).into(),
        (&rollout.previous_version).into(),
        (&rollout.canary_version).into(),
        rollout.canary_percent.into(),
        rollout.paused.into(),
        now.into(),
    ]
}
