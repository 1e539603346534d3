//! The customer's app, for real: `@supabase/supabase-js` itself (Node) drives
//! `quern serve` through `functions.invoke`, with the hook's sync fallback
//! (a function a manifest claims) reaching a loopback stand-in for the
//! customer's functions: by default (the flags-off rollback, seed 003: "Set
//! all flags to `false` → Instant rollback"), and from a gateway told to
//! serve it whose workers are stopped (seed 001, AC-1.6: "Se worker estiver
//! offline, usa fluxo síncrono antigo (fallback)").

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::db::Db;
use support::server::{Options, Server};
use support::{Reply, Upstream};

/// The script's directory with its dependencies installed, or why it cannot run.
fn prepared() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/supabase_js");
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|output| output.status.success()) {
        return Err("node is not installed (apt-get install nodejs npm)".into());
    }
    if !dir.join("node_modules/@supabase/supabase-js").exists() {
        let installed = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .map_err(|error| format!("npm is not installed: {error}"))?;
        if !installed.status.success() {
            return Err(format!("npm ci failed: {}", String::from_utf8_lossy(&installed.stderr)));
        }
    }
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_s_app_works_through_supabase_js() {
    let dir = match prepared() {
        Ok(dir) => dir,
        Err(why) if std::env::var_os("CI").is_some() => panic!("supabase-js cannot run: {why}"),
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let functions = Upstream::start(
        Vec::new(),
        Reply::new(200, r#"{"from": "customer-functions", "foods": "arroz"}"#)
            .header("content-type", "application/json"),
    )
    .await;
    // sofia_image claims the hook's sync function, as its real manifest does.
    let claimed = || vec![("sofia_image", "type = \"sofia_image\"\nfunction = \"sofia-image-analysis\"\n".to_string())];
    let db = Db::sqlite().await;
    let options = Options { env: vec![("SUPABASE_URL", functions.url(""))], handlers: claimed(), ..Options::default() };
    let server = Server::start_with(&db, options).await;
    // A gateway whose workers are all stopped (none ever ran on its
    // database), though told to serve the legacy functions itself.
    let offline_db = Db::sqlite().await;
    let offline = Server::start_with(
        &offline_db,
        Options {
            command: "gateway",
            env: vec![("SUPABASE_URL", functions.url("")), ("QUERN_SERVE_LEGACY_FUNCTIONS", "true".into())],
            handlers: claimed(),
            ..Options::default()
        },
    )
    .await;
    let token = server.token("3f1c2a9e-0000-4000-8000-00000000a11c");
    let (base, offline_base) = (server.base.clone(), offline.base.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("app.mjs")
            .current_dir(&dir)
            .env("QUERN_URL", base)
            .env("WORKERS_STOPPED_URL", offline_base)
            .env("USER_TOKEN", token)
            .env("ANON_KEY", "anon-key-of-the-project")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["completed"], "completed", "{seen}");
    assert_eq!(seen["missing"]["error"], "Missing required fields: type, input");
    assert_eq!(seen["workers_stopped"]["from"], "customer-functions", "{seen}");
    let fallback = functions.received();
    assert_eq!(fallback.len(), 2, "each sync fallback reached the customer's functions once");
    for call in &fallback {
        assert_eq!(call.path, "/functions/v1/sofia-image-analysis");
        assert!(call.headers.iter().any(|(name, value)| name == "apikey" && value == "anon-key-of-the-project"));
    }
    server.finish().await;
    offline.finish().await;
    db.cleanup().await;
    offline_db.cleanup().await;
}
