//! Listing jobs, on either backend.

use std::fmt::Write;

use super::{Backend, Param, Role, mapped};
use crate::rows::JOB_COLUMNS;
use crate::{Job, JobFilter, StoreError};

/// The jobs matching `filter`, newest first (by `created_at`, then id). The
/// statement holds only the conditions the filter sets, so each reads
/// through its index; every value is bound, never written into the text.
pub(crate) async fn list_jobs<'f, B: Backend>(backend: &B, filter: &'f JobFilter) -> Result<Vec<Job>, StoreError> {
    let mut sql = format!("SELECT {JOB_COLUMNS} FROM quern_jobs WHERE true");
    let mut params: Vec<Param<'f>> = Vec::new();
    let mut and = |column: &str, value: Param<'f>| {
        params.push(value);
        let _ = write!(sql, " AND {column} = ${}", params.len());
    };
    if let Some(user_id) = &filter.user_id {
        and("user_id", user_id.into());
    }
    if let Some(status) = filter.status {
        and("status", status.as_str().into());
    }
    if let Some(job_type) = &filter.job_type {
        and("type", job_type.into());
    }
    if let Some(root) = filter.pipeline {
        params.extend([Param::Uuid(root), Param::Uuid(root)]);
        let _ = write!(sql, " AND (id = ${} OR root_id = ${})", params.len() - 1, params.len());
    }
    if let Some((created_at, id)) = filter.before {
        params.extend([Param::Time(created_at), Param::Uuid(id)]);
        let _ = write!(sql, " AND (created_at, id) < (${}, ${})", params.len() - 1, params.len());
    }
    params.push(filter.limit.into());
    let _ = write!(sql, " ORDER BY created_at DESC, id DESC LIMIT ${}", params.len());
    let rows = backend.fetch(Role::Read, sqlx::AssertSqlSafe(sql), &params).await?;
    mapped(&rows)
}
