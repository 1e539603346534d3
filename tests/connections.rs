//! How the server holds connections, against the real binary: slow and
//! half-sent requests are cut at the header timeout without starving
//! `/health`, and kept-alive connections last as long as pooled clients
//! expect, so a request sent on one never meets it closing.

mod support;

use std::time::Duration;

use serde_json::json;
use support::db::Db;
use support::server::{Options, Server};

const DEADLINE: Duration = Duration::from_secs(30);

fn with_env(env: &[(&'static str, &str)]) -> Options {
    Options { env: env.iter().map(|(k, v)| (*k, v.to_string())).collect(), ..Options::default() }
}

fn id_of(answer: &support::server::Answer) -> String {
    answer.body["id"].as_str().unwrap_or_else(|| panic!("no id in {}", answer.text)).to_string()
}

/// With a descriptor limit of 256, hundreds of connections that send
/// nothing or half a request take no descriptor the database needs, do not
/// stop `/health`, and are closed once the header timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_neither_stop_health_nor_outlive_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = Db::sqlite().await;
    let options = Options { nofile: Some(256), ..with_env(&[("QUERN_HTTP_HEADER_TIMEOUT_S", "1")]) };
    let server = Server::start_with(&db, options).await;
    let token = server.token("alice");
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut attackers = Vec::new();
    for n in 0..400 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if n % 4 == 0 {
            socket
                .write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: quern\r\nContent-Type: application/json\r\n")
                .await
                .unwrap();
        }
        attackers.push(socket);
    }
    // /health answers through the siege (the client's own deadline is far
    // above the header timeout, and far below "never").
    for _ in 0..5 {
        let answer = tokio::time::timeout(Duration::from_secs(10), server.get("/health", &token)).await;
        assert_eq!(answer.expect("/health answered within 10 s").status, 200);
    }
    // The database still opens files: a job runs to its end.
    let job = id_of(&server.enqueue(&token, "echo", json!({"during": "the siege"})).await);
    server.poll_job(&token, &job, DEADLINE, |job| job["status"] == "completed").await;
    // Every attacking connection is closed by the server, none outlives the timeout for long.
    let mut closed = 0;
    for mut socket in attackers {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(15), socket.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            Ok(Ok(_)) => closed += 1, // an error answer, then the close
            Err(_) => {}
        }
    }
    assert_eq!(closed, 400, "the server closed every connection that sent no whole request");
    assert!(!server.log().contains("unable to open database file"), "the database never ran out of descriptors");
    server.finish().await;
}

/// Keep-alive that pooled clients can rely on. A client keeps an idle
/// connection (reqwest: 90 s) and sends its next POST on it; had the server
/// closed it meanwhile, the POST would fail with `IncompleteMessage` and no
/// retry. On the defaults, after idle times real pools reach, on both
/// commands: the same connection answers after 20 s and 61 s
/// (a raw socket, so reuse is certain), and so does a pooled reqwest client.
/// (The idle time is the input here, not a wait for a state.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_answer_after_20_and_61_seconds_idle() {
    let db = Db::sqlite().await;
    let serve = Server::start(&db).await;
    let gateway = Server::start_with(&db, Options { command: "gateway", ..Options::default() }).await;
    let mut checks: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>> = Vec::new();
    for server in [&serve, &gateway] {
        for idle in [Duration::from_secs(20), Duration::from_secs(61)] {
            checks.push(Box::pin(answers_after_idle_on_one_socket(server, idle)));
            checks.push(Box::pin(a_pooled_client_posts_after_idle(server, idle)));
        }
    }
    futures_util::future::join_all(checks).await;
    serve.finish().await;
    gateway.finish().await;
}

/// Past its header timeout (1 s) a kept-alive connection still waits for its
/// next request; past the keep-alive (12 s) the server closes it first, so a
/// pooled client knows before it sends; a kept-alive connection that starts a
/// request and stalls is closed at the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_keep_alive_the_server_closes_first_and_a_stalled_head_is_cut() {
    let db = Db::sqlite().await;
    let env = [("QUERN_HTTP_HEADER_TIMEOUT_S", "1"), ("QUERN_HTTP_KEEP_ALIVE_S", "12")];
    let serve = Server::start_with(&db, with_env(&env)).await;
    let gateway = Server::start_with(&db, Options { command: "gateway", ..with_env(&env) }).await;
    tokio::join!(keep_alive_and_header_timeout_hold(&serve), keep_alive_and_header_timeout_hold(&gateway));
    serve.finish().await;
    gateway.finish().await;
}

async fn keep_alive_and_header_timeout_hold(server: &Server) {
    let token = server.token("keeper");
    let mut kept = Connection::open(server).await;
    assert_eq!(kept.post_job(&token).await, (202, Some("timeout=12".to_string())));
    let pooled = pooled_client();
    assert_eq!(post_job(server, &pooled, &token).await, 202);
    // Three header timeouts of silence between requests: still open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kept.post_job(&token).await.0, 202, "the kept-alive connection answered after 3 s idle");
    let answered = std::time::Instant::now();
    // Closed at the keep-alive (12 s): well before the idle timeout (60 s)
    // that bounded the answer's writing, and well after the header timeout
    // (half the keep-alive is a bound a slow read of the answer cannot cross).
    kept.closed_within(Duration::from_secs(40)).await;
    assert!(answered.elapsed() >= Duration::from_secs(6), "closed before the keep-alive: {:?}", answered.elapsed());
    // The pooled connection, older still, was closed too; the client saw it.
    assert_eq!(post_job(server, &pooled, &token).await, 202);

    let mut stalled = Connection::open(server).await;
    assert_eq!(stalled.post_job(&token).await.0, 202);
    stalled.send(b"POST /v1/jobs HTTP/1.1\r\nHost: quern\r\nContent-Type: application/json\r\n").await;
    let started = std::time::Instant::now();
    stalled.closed_within(Duration::from_secs(60)).await;
    assert!(started.elapsed() < Duration::from_secs(11), "a stalled head lasted {:?}", started.elapsed());
}

fn pooled_client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(90)).build().unwrap()
}

/// A POST of a job through `client`; the status, or a panic that names the
/// error (`IncompleteMessage` is the race this guards against).
async fn post_job(server: &Server, client: &reqwest::Client, token: &str) -> u16 {
    let sent = client
        .post(format!("{}/v1/jobs", server.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(json!({"type": "echo", "input": {}}).to_string())
        .send()
        .await;
    sent.unwrap_or_else(|error| panic!("the POST failed: {error:?}")).status().as_u16()
}

async fn a_pooled_client_posts_after_idle(server: &Server, idle: Duration) {
    let token = server.token("pooled");
    let client = pooled_client();
    assert_eq!(post_job(server, &client, &token).await, 202);
    tokio::time::sleep(idle).await;
    assert_eq!(post_job(server, &client, &token).await, 202, "after {idle:?} idle");
}

async fn answers_after_idle_on_one_socket(server: &Server, idle: Duration) {
    let token = server.token("socket");
    let mut connection = Connection::open(server).await;
    let (status, keep_alive) = connection.post_job(&token).await;
    assert_eq!((status, keep_alive.as_deref()), (202, Some("timeout=75")));
    tokio::time::sleep(idle).await;
    assert_eq!(connection.post_job(&token).await.0, 202, "the same connection answered after {idle:?} idle");
}

/// One HTTP/1.1 connection, spoken by hand so that reuse is certain.
struct Connection(tokio::net::TcpStream);

impl Connection {
    async fn open(server: &Server) -> Self {
        Self(tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap())
    }

    async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.0.write_all(bytes).await.unwrap();
    }

    /// Posts a job and reads the whole answer: its status and `Keep-Alive` header.
    async fn post_job(&mut self, token: &str) -> (u16, Option<String>) {
        use tokio::io::AsyncReadExt;
        let body = r#"{"type":"echo","input":{}}"#;
        let request = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: quern\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(request.as_bytes()).await;
        let mut received = Vec::new();
        let head_end = loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection instead of answering");
            received.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&received[..head_end]).to_string();
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let header = |name: &str| {
            head.lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.trim().to_string())
        };
        let length: usize = header("content-length").and_then(|v| v.parse().ok()).expect("a Content-Length");
        while received.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the server closed the connection inside an answer");
            received.extend_from_slice(&chunk[..n]);
        }
        (status, header("keep-alive"))
    }

    /// Waits until the server closes the connection (EOF or a reset).
    async fn closed_within(&mut self, deadline: Duration) {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(deadline, self.0.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("the server sent bytes on an idle connection"),
            Err(_) => panic!("the server kept the connection open past {deadline:?}"),
        }
    }
}

/// A body refused as too large is answered 413 and the client reads that
/// answer, though it was still sending: the server closes lingering (FIN,
/// then it drains), never with a reset that could destroy the answer in
/// flight. Ten times over, on raw sockets that keep writing. (A guard: an
/// unloaded machine delivers the 413 even to an abrupt close.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_its_413_while_still_being_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = Db::sqlite().await;
    let server = Server::start_with(&db, Options::default()).await;
    let token = server.token("alice");
    let addr = server.base.trim_start_matches("http://").to_string();
    for round in 0..10 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let body_len = 4 << 20;
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nhost: quern\r\nauthorization: Bearer {token}\r\n\
             content-type: application/json\r\ncontent-length: {body_len}\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let (mut reader, mut writer) = socket.into_split();
        // Keep sending the body; the server stops reading at its limit.
        let sender = tokio::spawn(async move {
            let chunk = vec![b' '; 64 << 10];
            let mut sent = 0;
            while sent < body_len {
                if writer.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
        });
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut answer)).await;
        sender.abort();
        let text = String::from_utf8_lossy(&answer);
        assert!(read.is_ok(), "round {round}: no end within 20 s");
        assert!(text.starts_with("HTTP/1.1 413"), "round {round}: the 413 was lost ({read:?}): {text:?}");
    }
    server.finish().await;
    db.cleanup().await;
}
