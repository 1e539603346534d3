//! WhatsApp's real caller: Meta calls `whatsapp-nutrition-webhook` itself
//! (seed 001's table: "WhatsApp Webhook | whatsapp-nutrition-webhook |
//! `supabase/functions/whatsapp-nutrition-webhook/index.ts`"), with no JWT:
//! a GET handshake when subscribed, then POSTs of its envelope signed with
//! the app secret (`X-Hub-Signature-256`). quern checks the signature, runs
//! one job per message, and answers 200 at once.

mod support;

use std::time::Duration;

use aws_lc_rs::hmac;
use quern_fakes::{Fake, Kind};
use reqwest::Method;
use serde_json::{Value, json};
use support::db::Db;
use support::server::{Answer, Options, Server, read};
use support::{Reply, Upstream, poll_until};

const APP_SECRET: &str = "meta-app-secret-for-the-webhook-test";
const VERIFY_TOKEN: &str = "verify-token-chosen-by-ops";
const WEBHOOK: &str = "/functions/v1/whatsapp-nutrition-webhook";

/// The shipped manifest, allowed to reach the loopback fakes too.
fn manifest() -> String {
    let shipped = std::fs::read_to_string(support::dist("whatsapp_nutrition_webhook.toml")).unwrap();
    shipped.replace("allowed_hosts = [", "allowed_hosts = [\"127.0.0.1\", ")
}

async fn serve(db: &Db, ollama: &Fake, whatsapp: &Fake, extra: Vec<(&'static str, String)>) -> Server {
    let mut env = vec![
        ("OLLAMA_URL", ollama.url()),
        ("WHATSAPP_API_URL", format!("{}/v21.0", whatsapp.url())),
        ("WHATSAPP_TOKEN", "wa-token-webhook-test".into()),
        ("WHATSAPP_PHONE_NUMBER_ID", "1234567890".into()),
        ("QUERN_HANDLER_ENV", "OLLAMA_URL,WHATSAPP_API_URL,WHATSAPP_TOKEN,WHATSAPP_PHONE_NUMBER_ID".into()),
        // The gateway's secrets, offered as variables; the manifest does not
        // grant them to the handler.
        ("QUERN_VAR_WHATSAPP_APP_SECRET", APP_SECRET.into()),
        ("QUERN_VAR_WHATSAPP_VERIFY_TOKEN", VERIFY_TOKEN.into()),
    ];
    env.extend(extra);
    let options = Options { handlers: vec![("whatsapp_nutrition_webhook", manifest())], env, ..Options::default() };
    let server = Server::start_with(db, options).await;
    server.remember(APP_SECRET.into());
    server.remember(VERIFY_TOKEN.into());
    // What users wrote is job input: never in the log.
    server.remember("almocei arroz e feijão".into());
    server
}

/// Meta's envelope: two text messages, a reaction and a delivery status.
fn envelope() -> Value {
    json!({"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [
        {"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "1234567890"},
            "contacts": [{"profile": {"name": "Ana"}, "wa_id": "5511999998888"}],
            "messages": [
                {"from": "5511999998888", "id": "wamid.A1", "timestamp": "1760000000", "type": "text",
                 "text": {"body": "almocei arroz e feijão"}},
                {"from": "5511988887777", "id": "wamid.B2", "timestamp": "1760000001", "type": "text",
                 "text": {"body": "jantei arroz e feijão"}},
                {"from": "5511999998888", "id": "wamid.C3", "timestamp": "1760000002", "type": "reaction",
                 "reaction": {"message_id": "wamid.X", "emoji": "👍"}}]}},
        {"field": "messages", "value": {"messaging_product": "whatsapp",
            "statuses": [{"id": "wamid.OUT", "status": "delivered", "timestamp": "1760000003",
                          "recipient_id": "5511999998888"}]}}]}]})
}

fn signature(secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex(hmac::sign(&key, body).as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn deliver(server: &Server, body: &[u8], signature: Option<&str>) -> Answer {
    let mut request = server
        .client
        .post(format!("{}{WEBHOOK}", server.base))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("X-Hub-Signature-256", signature);
    }
    read(request.send().await.unwrap()).await
}

async fn handshake(server: &Server, token: &str) -> Answer {
    let url = format!("{}{WEBHOOK}?hub.mode=subscribe&hub.verify_token={token}&hub.challenge=1158201444", server.base);
    read(server.client.get(url).send().await.unwrap()).await
}

async fn job_count(server: &Server) -> usize {
    let jobs = server.get("/v1/jobs", &server.service_token()).await;
    jobs.body["jobs"].as_array().map_or(0, Vec::len)
}

async fn meta_s_calls_are_checked_and_each_message_runs_once(db: &Db) {
    let (ollama, whatsapp) = (Fake::start(Kind::Chat).await, Fake::start(Kind::Whatsapp).await);
    let server = serve(db, &ollama, &whatsapp, Vec::new()).await;

    // The verification handshake: the challenge echoed, only for the token.
    let answer = handshake(&server, VERIFY_TOKEN).await;
    assert_eq!((answer.status.as_u16(), answer.text.as_str()), (200, "1158201444"), "{answer:?}");
    let answer = handshake(&server, "someone-elses-token").await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert!(!answer.text.contains("1158201444"), "no challenge for a wrong token: {}", answer.text);

    // Refused: a wrong secret, the body replayed with one byte changed, no header.
    let body = envelope().to_string().into_bytes();
    let mut changed = body.clone();
    let at = changed.windows(5).position(|w| w == b"arroz").unwrap();
    changed[at] = b'A';
    for (what, body, signature) in [
        ("signed with another secret", body.clone(), Some(signature("not-the-app-secret", &body))),
        ("replayed with one byte changed", changed.clone(), Some(signature(APP_SECRET, &body))),
        ("missing header", body.clone(), None),
        ("not hex", body.clone(), Some("sha256=zz".to_string())),
    ] {
        let answer = deliver(&server, &body, signature.as_deref()).await;
        assert_eq!(answer.status, 401, "{what}: {}", answer.text);
        assert!(answer.body["error"].as_str().unwrap().contains("does not come from the provider"), "{what}");
    }
    assert_eq!(job_count(&server).await, 0, "a refused call makes no job");

    // Signed: 200 at once, one job per text message; the reaction and the
    // status are acknowledged and ignored.
    let answer = deliver(&server, &body, Some(&signature(APP_SECRET, &body))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["ignored"], 1, "the reaction: {}", answer.text);
    let ids: Vec<String> =
        answer.body["jobs"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2, "{}", answer.text);
    let ops = server.service_token();
    let mut senders = Vec::new();
    for id in &ids {
        let job = server.poll_job(&ops, id, Duration::from_secs(30), |job| job["status"] == "completed").await;
        assert_eq!(job["type"], "whatsapp_nutrition_webhook");
        assert_eq!(job["result"]["totals"]["kcal"], 268.0, "{job}");
        senders.push(job["result"]["to"].as_str().unwrap().to_string());
    }
    senders.sort();
    assert_eq!(senders, ["5511988887777", "5511999998888"], "each message answered to its sender");
    let sent = poll_until(Duration::from_secs(10), "two replies", || {
        let sent = whatsapp.seen();
        (sent.len() == 2).then_some(sent)
    })
    .await;
    assert!(sent.iter().all(|s| s.body["text"]["body"].as_str().unwrap().contains("268,0 kcal")), "{sent:?}");
    assert_eq!(job_count(&server).await, 2);
    server.finish().await;
}

on_both_databases!(meta_s_calls_are_checked_and_each_message_runs_once);

/// A webhook is a legacy function too (issue 39's rule): by default it goes
/// to the customer's own, the signature header with it, so their function
/// checks it as before; quern makes no job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_meta_s_call_reaches_the_customer_s_webhook_with_its_signature() {
    let functions = Upstream::start(Vec::new(), Reply::new(200, "EVENT_RECEIVED")).await;
    let (ollama, whatsapp) = (Fake::start(Kind::Chat).await, Fake::start(Kind::Whatsapp).await);
    let db = Db::sqlite().await;
    let server = serve(&db, &ollama, &whatsapp, vec![("SUPABASE_URL", functions.url(""))]).await;
    let body = envelope().to_string().into_bytes();
    let signed = signature(APP_SECRET, &body);
    let answer = deliver(&server, &body, Some(&signed)).await;
    assert_eq!((answer.status.as_u16(), answer.text.as_str()), (200, "EVENT_RECEIVED"));
    let answer = handshake(&server, VERIFY_TOKEN).await;
    assert_eq!(answer.text, "EVENT_RECEIVED", "the handshake too");
    let received = functions.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].path, WEBHOOK);
    assert!(received[0].headers.contains(&("x-hub-signature-256".into(), signed)), "{:?}", received[0].headers);
    assert_eq!(received[0].body.as_bytes(), body.as_slice(), "the raw body, byte for byte");
    assert_eq!(received[1].method, Method::GET.as_str());
    assert!(received[1].query.as_deref().unwrap_or_default().contains("hub.challenge=1158201444"));
    assert_eq!(job_count(&server).await, 0);
    server.finish().await;
    db.cleanup().await;
}
