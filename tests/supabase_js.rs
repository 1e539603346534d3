//! The customer's app, for real: `@supabase/supabase-js` itself (Node) drives
//! `quern serve` through `functions.invoke`, with the hook's sync fallback
//! (a function a manifest claims) reaching the customer's own: with the
//! type's flag off on a quern told to serve it (the rollback, seed 003: "Set
//! all flags to `false` → Instant rollback"), and from a gateway whose
//! workers are stopped (seed 001, AC-1.6: "Se worker estiver offline, usa
//! fluxo síncrono antigo (fallback)"). The same client then signs in,
//! cancels through `analysis_jobs`, uploads and hears the change on Realtime,
//! all at quern's URL, against a stand-in for the customer's Supabase project
//! (fake_supabase.mjs, which speaks PostgREST, GoTrue, Storage and Realtime).

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::db::Db;
use support::server::{Options, Server};
use tokio::io::AsyncBufReadExt;

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
    // The customer's Supabase project: functions, auth, tables, storage, Realtime.
    let user = "3f1c2a9e-0000-4000-8000-00000000a11c";
    let minted = support::server::mint_user_token(user);
    let supabase = FakeSupabase::start(&dir, &minted).await;
    // sofia_image claims the hook's sync function, as its real manifest does.
    let claimed = || vec![("sofia_image", "type = \"sofia_image\"\nfunction = \"sofia-image-analysis\"\n".to_string())];
    let db = Db::sqlite().await;
    // Told to serve the legacy functions, with the type's flag off: the
    // rollback (seed 003: "Set all flags to `false` → Instant rollback").
    let env = vec![
        ("SUPABASE_URL", supabase.url.clone()),
        ("QUERN_SERVE_LEGACY_FUNCTIONS", "true".into()),
        ("QUERN_DISABLED_TYPES", "sofia_image".into()),
    ];
    let options = Options { env, handlers: claimed(), ..Options::default() };
    let server = Server::start_with(&db, options).await;
    // A gateway whose workers are all stopped (none ever ran on its
    // database), though told to serve the legacy functions itself.
    let offline_db = Db::sqlite().await;
    let offline = Server::start_with(
        &offline_db,
        Options {
            command: "gateway",
            env: vec![("SUPABASE_URL", supabase.url.clone()), ("QUERN_SERVE_LEGACY_FUNCTIONS", "true".into())],
            handlers: claimed(),
            ..Options::default()
        },
    )
    .await;
    let token = server.remember(minted.clone());
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
    let received = supabase.seen().await;
    let fallback: Vec<&Value> = received.iter().filter(|r| r["path"] == "/functions/v1/sofia-image-analysis").collect();
    assert_eq!(fallback.len(), 2, "each sync fallback reached the customer's functions once");
    for call in &fallback {
        assert_eq!(call["headers"]["apikey"], "anon-key-of-the-project", "{call}");
    }
    // The one-URL steps reached the project as the app sent them.
    let find = |method: &str, path: &str| {
        received.iter().find(|r| r["method"] == method && r["path"].as_str().is_some_and(|p| p.starts_with(path)))
    };
    let sign_in = find("POST", "/auth/v1/token").expect("the sign-in");
    assert_eq!(sign_in["query"], "?grant_type=password");
    let cancel = find("PATCH", "/rest/v1/analysis_jobs").expect("the cancel");
    assert_eq!(cancel["headers"]["authorization"], format!("Bearer {minted}"), "with the session's token");
    assert_eq!(serde_json::from_str::<Value>(cancel["body"].as_str().unwrap()).unwrap()["status"], "cancelled");
    let upload = find("POST", "/storage/v1/object/meal-photos/").expect("the upload");
    assert!(upload["headers"]["content-length"].is_string(), "sent with its length: {upload}");
    let socket = find("GET", "/realtime/v1/websocket").expect("the Realtime websocket");
    assert_eq!(socket["headers"]["upgrade"], "websocket");
    assert_eq!(seen["one_url"]["realtime"], "cancelled", "{seen}");
    server.finish().await;
    offline.finish().await;
    db.cleanup().await;
    offline_db.cleanup().await;
}

/// `fake_supabase.mjs` on a loopback port, stopped when dropped.
struct FakeSupabase {
    url: String,
    child: tokio::process::Child,
}

impl FakeSupabase {
    async fn start(dir: &std::path::Path, access_token: &str) -> Self {
        let mut child = tokio::process::Command::new("node")
            .arg("fake_supabase.mjs")
            .current_dir(dir)
            .env("FAKE_ACCESS_TOKEN", access_token)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        tokio::io::BufReader::new(stdout).read_line(&mut line).await.expect("the fake prints its port");
        let port = serde_json::from_str::<Value>(&line).map(|v| v["port"].as_u64()).ok().flatten();
        let port = port.unwrap_or_else(|| panic!("the fake printed no port: {line:?}"));
        Self { url: format!("http://127.0.0.1:{port}"), child }
    }

    async fn seen(&self) -> Vec<Value> {
        let answer = reqwest::get(format!("{}/__seen", self.url)).await.unwrap();
        serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap()
    }
}

impl Drop for FakeSupabase {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
