//! `quern migrate --supabase` where the customer's own tables stand: the
//! plan is printed first, and the seed's tables are moved (or, with
//! `--revert`, moved back) only with `--apply`.

use std::process::ExitCode;

use quern_store::{PostgresStore, SeedRows, SeedSchema};

pub async fn migrate_supabase(store: &PostgresStore, apply: bool, revert: bool) -> anyhow::Result<ExitCode> {
    let seed = store.seed_schema().await?;
    if revert {
        let SeedSchema::Moved(rows) = seed else {
            anyhow::bail!(
                "--revert brings back the seed's tables that --apply moved aside, and there is no analysis_jobs_seed \
                 here: nothing to revert"
            );
        };
        return move_back(store, &rows, apply).await;
    }
    match seed {
        SeedSchema::InPlace(rows) => move_aside(store, &rows, apply).await,
        SeedSchema::Absent | SeedSchema::Moved(_) => {
            store.apply_supabase_compat().await?;
            eprintln!("migrations applied (postgres), with the Supabase analysis_jobs view and row-level security");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn move_aside(store: &PostgresStore, rows: &SeedRows, apply: bool) -> anyhow::Result<ExitCode> {
    let cache = match rows.cache {
        Some(n) => format!(
            "\n  - analysis_cache (the seed's table, {n} entries) becomes analysis_cache_seed; its entries are imported into quern's cache"
        ),
        None => String::new(),
    };
    eprintln!(
        "analysis_jobs here is the seed's own table (seed 000's 20260117_create_async_jobs_system.sql), with {} jobs.\n\
         {} will, in one transaction:\n  \
         - rename it analysis_jobs_seed, every row, index, policy and trigger kept, for the way back;\n  \
         - import its {} finished jobs as history, its {} pending jobs as jobs that run, and its {} processing jobs \
         (their worker gone) as pending again, attempts kept;{cache}\n  \
         - put quern's analysis_jobs and analysis_cache views in their place, with row-level security.\n\
         Stop the seed's worker first. The way back: quern migrate --supabase --revert --apply.",
        rows.pending + rows.processing + rows.finished,
        if apply { "This" } else { "quern migrate --supabase --apply" },
        rows.finished,
        rows.pending,
        rows.processing,
    );
    if !apply {
        eprintln!(
            "dry run: the seed's tables are unchanged (quern's own tables are migrated). Run again with --apply."
        );
        return Ok(ExitCode::SUCCESS);
    }
    store.move_seed_schema().await?;
    eprintln!("moved: the seed's tables are analysis_jobs_seed and analysis_cache_seed; quern serves analysis_jobs");
    Ok(ExitCode::SUCCESS)
}

async fn move_back(store: &PostgresStore, rows: &SeedRows, apply: bool) -> anyhow::Result<ExitCode> {
    let plan = store.revert_plan().await?;
    eprintln!(
        "analysis_jobs_seed holds the seed's table as --apply moved it ({} jobs). {} will, in one transaction:\n  \
         - write into it the {} jobs quern holds that it can hold (the seed's six types, users in auth.users), with \
         their outcome in quern; {} jobs it cannot hold stay in quern only;\n  \
         - cancel in quern the {} of those not yet finished, so none runs in both;\n  \
         - drop quern's analysis_jobs and analysis_cache views and give the seed's tables their names back.",
        rows.pending + rows.processing + rows.finished,
        if apply { "This" } else { "quern migrate --supabase --revert --apply" },
        plan.back,
        plan.staying,
        plan.unfinished,
    );
    if !apply {
        eprintln!("dry run: nothing was changed. Run again with --apply.");
        return Ok(ExitCode::SUCCESS);
    }
    store.revert_seed_schema().await?;
    eprintln!("reverted: analysis_jobs and analysis_cache are the seed's tables again; start the seed's worker");
    Ok(ExitCode::SUCCESS)
}
