//! One URL for the whole app: what quern does not serve goes to the
//! customer's Supabase project (PostgREST, GoTrue, Storage; the functions
//! and the Realtime websocket are driven through supabase-js in
//! tests/supabase_js.rs).

mod support;

use support::db::Db;
use support::server::{Options, Server, read};
use support::{Reply, Upstream};

/// The hook's one client also cancels (seed 000's useAsyncAnalysis:
/// `.from('analysis_jobs')` … `.update({ status: 'cancelled' })`): PostgREST,
/// GoTrue and Storage are passed through by the functions' rule: method,
/// path, query and body as sent; only the headers each API reads; the
/// answer's own headers (PostgREST's `Content-Range`) back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_s_other_supabase_apis_reach_its_project_through_quern() {
    let project = Upstream::start(
        Vec::new(),
        Reply::new(200, r#"[{"id": "a", "status": "cancelled"}]"#)
            .header("content-type", "application/json")
            .header("content-range", "0-0/1")
            .header("access-control-allow-origin", "https://evil.example"),
    )
    .await;
    let db = Db::sqlite().await;
    let server =
        Server::start_with(&db, Options { env: vec![("SUPABASE_URL", project.url(""))], ..Options::default() }).await;
    let token = server.token("3f1c2a9e-0000-4000-8000-00000000a11c");
    let answer = read(
        server
            .client
            .patch(format!("{}/rest/v1/analysis_jobs?id=eq.a", server.base))
            .bearer_auth(&token)
            .header("apikey", "anon-key")
            .header("prefer", "return=representation")
            .header("cookie", "session=never-passed-on")
            .header("content-type", "application/json")
            .body(r#"{"status":"cancelled"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body[0]["status"], "cancelled");
    assert_eq!(answer.headers["content-range"], "0-0/1", "PostgREST's count reaches supabase-js");
    assert!(answer.headers.get("access-control-allow-origin").is_none_or(|v| v != "https://evil.example"));
    let token_answer = read(
        server
            .client
            .post(format!("{}/auth/v1/token?grant_type=password", server.base))
            .header("apikey", "anon-key")
            .header("x-supabase-api-version", "2024-01-01")
            .header("content-type", "application/json")
            .body(r#"{"email":"a@b.c","password":"p"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(token_answer.status, 200);
    let photo = vec![b'j'; 300 * 1024];
    let upload = read(
        server
            .client
            .post(format!("{}/storage/v1/object/meal-photos/u/lunch.jpg", server.base))
            .bearer_auth(&token)
            .header("content-type", "image/jpeg")
            .header("x-upsert", "true")
            .body(photo.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(upload.status, 200, "a photo past the 256 KiB API limit streams through: {}", upload.text);
    let seen = project.received();
    assert_eq!(seen.len(), 3);
    let header = |i: usize, name: &str| seen[i].headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("PATCH", "/rest/v1/analysis_jobs"));
    assert_eq!(seen[0].query.as_deref(), Some("id=eq.a"));
    assert_eq!(seen[0].body, r#"{"status":"cancelled"}"#);
    assert_eq!(header(0, "prefer").as_deref(), Some("return=representation"));
    assert_eq!(header(0, "authorization"), Some(format!("Bearer {token}")));
    assert_eq!(header(0, "cookie"), None, "only the headers the API reads");
    assert_eq!((seen[1].path.as_str(), seen[1].query.as_deref()), ("/auth/v1/token", Some("grant_type=password")));
    assert_eq!(header(1, "x-supabase-api-version").as_deref(), Some("2024-01-01"));
    assert_eq!(seen[2].path, "/storage/v1/object/meal-photos/u/lunch.jpg");
    assert_eq!(header(2, "x-upsert").as_deref(), Some("true"));
    assert_eq!(header(2, "content-length"), Some(photo.len().to_string()), "sent with its length");
    assert_eq!(seen[2].body.len(), photo.len());
    server.finish().await;

    // Without SUPABASE_URL there is nothing to pass to: 404 naming it.
    let alone = Server::start_with(&db, Options::default()).await;
    let answer = alone.get("/rest/v1/analysis_jobs", &alone.token("a")).await;
    assert_eq!(answer.status, 404);
    assert!(answer.error().contains("set SUPABASE_URL"), "{}", answer.text);
    alone.finish().await;
    db.cleanup().await;
}

/// What the customer's project answers is inert on quern's origin, which the
/// dashboard shares: no cookie, no HSTS, no header its `Connection` names,
/// and a sandbox CSP with nosniff on an HTML page; the project learns the
/// client's address as quern judged it, not as the client wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_project_s_answers_cannot_act_on_quern_s_origin() {
    let project = Upstream::start(
        Vec::new(),
        Reply::new(200, "<script>fetch('/dashboard')</script>")
            .header("content-type", "text/html")
            .header("set-cookie", "quern_dashboard=stolen; Path=/")
            .header("strict-transport-security", "max-age=0")
            .header("connection", "x-hop")
            .header("x-hop", "hop-only"),
    )
    .await;
    let db = Db::sqlite().await;
    let server =
        Server::start_with(&db, Options { env: vec![("SUPABASE_URL", project.url(""))], ..Options::default() }).await;
    let answer = read(
        server
            .client
            .get(format!("{}/storage/v1/object/public/site/page.html", server.base))
            .header("x-forwarded-for", "6.6.6.6")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 200);
    for name in ["set-cookie", "strict-transport-security", "x-hop"] {
        assert!(answer.headers.get(name).is_none(), "{name} relayed: {:?}", answer.headers);
    }
    assert_eq!(answer.headers["content-security-policy"], "sandbox");
    assert_eq!(answer.headers["x-content-type-options"], "nosniff");
    let seen = project.received();
    let forwarded: Vec<&str> =
        seen[0].headers.iter().filter(|(name, _)| name == "x-forwarded-for").map(|(_, v)| v.as_str()).collect();
    assert_eq!(forwarded, ["127.0.0.1"], "quern's judgement of the client, not the client's own claim");
    server.finish().await;
    db.cleanup().await;
}
