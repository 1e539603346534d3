//! A real `quern serve` (or `quern gateway`) process on a loopback port
//! chosen by the OS, on a test database, with a handlers directory of its
//! own. It records every token it mints and every input sent through it, and
//! [`Server::finish`] checks that none of them reached its log.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quern_api::auth::{PremiumRule, mint};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::db::Db;
use super::{cache_dir, dist};

pub const SECRET: &str = "e2e-test-secret-0123456789abcdef";

/// What to start.
pub struct Options {
    /// `serve` (gateway + worker) or `gateway`.
    pub command: &'static str,
    pub env: Vec<(&'static str, String)>,
    /// More handlers: a built component of `handlers-dist/` by job type,
    /// with the manifest to serve it under.
    pub handlers: Vec<(&'static str, String)>,
    /// The process's descriptor limit, when it should be lower than ours.
    pub nofile: Option<u64>,
    /// More handlers from any built component: (job type, path under
    /// `handlers-dist/`, manifest).
    pub components: Vec<(&'static str, &'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self { command: "serve", env: Vec::new(), handlers: Vec::new(), nofile: None, components: Vec::new() }
    }
}

pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    child: Child,
    log: PathBuf,
    /// Tokens minted and inputs sent: none may appear in the log.
    secrets: Mutex<Vec<String>>,
    _dir: tempfile::TempDir,
}

/// A user's token, as every test server verifies it (for a stand-in that
/// hands it out before the server starts; remember it there).
pub fn mint_user_token(user: &str) -> String {
    mint(SECRET.as_bytes(), user, false, None, Duration::from_secs(3600)).unwrap()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// The `code` of an error body.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

/// The handlers every test server has: `echo`, `cached` (echo, cacheable)
/// and `hostile` (sleeps, panics, retries on request).
fn handlers_dir(root: &std::path::Path) -> PathBuf {
    let dir = root.join("handlers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(dist("echo.wasm"), dir.join("echo.wasm")).unwrap();
    std::fs::copy(dist("echo.toml"), dir.join("echo.toml")).unwrap();
    std::fs::copy(dist("echo.wasm"), dir.join("cached.wasm")).unwrap();
    std::fs::write(dir.join("cached.toml"), "type = \"cached\"\nestimated_time_s = 3\ncacheable = true\n").unwrap();
    std::fs::copy(dist("fixtures/hostile.wasm"), dir.join("hostile.wasm")).unwrap();
    std::fs::write(
        dir.join("hostile.toml"),
        "type = \"hostile\"\nestimated_time_s = 2\nmax_attempts = 1\n[limits]\ndeadline_s = 60\n",
    )
    .unwrap();
    dir
}

impl Server {
    pub async fn start(db: &Db) -> Self {
        Self::start_with(db, Options::default()).await
    }

    pub async fn start_with(db: &Db, options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let handlers = handlers_dir(dir.path());
        for (job_type, manifest) in &options.handlers {
            std::fs::copy(dist(&format!("{job_type}.wasm")), handlers.join(format!("{job_type}.wasm"))).unwrap();
            std::fs::write(handlers.join(format!("{job_type}.toml")), manifest).unwrap();
        }
        for (job_type, component, manifest) in &options.components {
            std::fs::copy(dist(component), handlers.join(format!("{job_type}.wasm"))).unwrap();
            std::fs::write(handlers.join(format!("{job_type}.toml")), manifest).unwrap();
        }
        let log = dir.path().join("quern.log");
        let mut command = match options.nofile {
            // The shell lowers the limit, then becomes quern.
            Some(nofile) => {
                let mut shell = Command::new("sh");
                shell.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")]);
                shell.arg(env!("CARGO_BIN_EXE_quern"));
                shell
            }
            None => Command::new(env!("CARGO_BIN_EXE_quern")),
        };
        let child = command
            .arg(options.command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("PORT", "0")
            .env("QUERN_BIND", "127.0.0.1")
            .env("QUERN_JWT_SECRET", SECRET)
            .env("QUERN_HANDLERS_DIR", &handlers)
            .env("QUERN_DATA_DIR", dir.path().join("data"))
            .env("QUERN_CACHE_DIR", cache_dir())
            .env("QUERN_RATE_LIMIT_PER_MIN", "0")
            .env("QUERN_LOG_FORMAT", "json")
            .env("QUERN_LOG", "info")
            .env("WORKER_POLL_INTERVAL_MS", "100")
            .env("WORKER_CONCURRENCY", "4")
            .envs(options.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .find(|line| line["message"] == "gateway listening")
                .and_then(|line| line["addr"].as_str().map(str::to_string))
            {
                break addr;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "quern did not start listening; its log:\n{text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Self { base: format!("http://{addr}"), client, child, log, secrets: Mutex::default(), _dir: dir }
    }

    /// A token for `user`, signed with the server's secret.
    pub fn token(&self, user: &str) -> String {
        self.remember(mint_user_token(user))
    }

    pub fn premium_token(&self, user: &str) -> String {
        let rule = PremiumRule::parse("app_metadata.plan=premium").unwrap();
        self.remember(mint(SECRET.as_bytes(), user, false, Some(&rule), Duration::from_secs(3600)).unwrap())
    }

    pub fn service_token(&self) -> String {
        self.remember(mint(SECRET.as_bytes(), "ops", true, None, Duration::from_secs(3600)).unwrap())
    }

    /// Records a string that must never appear in the server's log.
    pub fn remember(&self, secret: String) -> String {
        self.secrets.lock().unwrap().push(secret.clone());
        secret
    }

    /// The server process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a request; `body` as JSON when given.
    pub async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            // Every job input sent must stay out of the log (trivial ones
            // like `{}` would match by chance and prove nothing).
            if let Some(input) = body.get("input").map(Value::to_string).filter(|input| input.len() >= 6) {
                self.remember(input);
            }
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        read(request.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Enqueues `input` (remembered: it must never be logged) and returns the answer.
    pub async fn enqueue(&self, token: &str, job_type: &str, input: Value) -> Answer {
        self.post("/v1/jobs", token, json!({"type": job_type, "input": input})).await
    }

    /// Polls a job until `check` holds, for at most `deadline`.
    pub async fn poll_job(&self, token: &str, id: &str, deadline: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let answer = self.get(&format!("/v1/jobs/{id}"), token).await;
            assert_eq!(answer.status, 200, "{}", answer.text);
            if check(&answer.body) {
                return answer.body;
            }
            assert!(started.elapsed() < deadline, "timed out after {deadline:?}; last: {}", answer.text);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stops the server with SIGTERM, and checks that no token or job input
    /// reached its log and that every request line carries a request id.
    pub async fn finish(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let started = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(20), "quern did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let log = self.log();
        for secret in self.secrets.lock().unwrap().iter() {
            // Raw, and as it would read inside a JSON string field.
            let quoted = serde_json::to_string(secret).unwrap();
            let escaped = &quoted[1..quoted.len() - 1];
            assert!(
                !log.contains(secret.as_str()) && !log.contains(escaped),
                "the log contains a token or a job input: {secret}"
            );
        }
        for line in log.lines() {
            let entry: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("a log line is not JSON: {line}"));
            if entry["message"] == "finished processing request" {
                assert!(entry["span"]["request_id"].as_str().is_some_and(|id| !id.is_empty()), "no request id: {line}");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn read(response: reqwest::Response) -> Answer {
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status, headers, body, text }
}

/// Runs each named test against a server on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::db::Db::sqlite().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::support::db::Db::postgres().await;
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}
