//! The test suite's fake upstreams on fixed loopback ports, to try the
//! handlers by hand with `quern run` or `quern serve`:
//!
//! ```sh
//! cargo run -p quern --example fake_upstreams
//! ```
//!
//! YOLO on :18081, an Ollama-like chat API on :18082, a Gemini-like one on
//! :18083 and the WhatsApp Cloud API on :18084, until Ctrl-C.

use quern_fakes::{Fake, Kind};

#[tokio::main]
async fn main() {
    let yolo = Fake::start_on(Kind::Yolo, "127.0.0.1:18081").await;
    let ollama = Fake::start_on(Kind::Chat, "127.0.0.1:18082").await;
    let gemini = Fake::start_on(Kind::Chat, "127.0.0.1:18083").await;
    let whatsapp = Fake::start_on(Kind::Whatsapp, "127.0.0.1:18084").await;
    println!("YOLO_URL={}", yolo.url());
    println!("OLLAMA_URL={}", ollama.url());
    println!("GEMINI_BASE_URL={}/v1beta/openai", gemini.url());
    println!("WHATSAPP_API_URL={}/v21.0", whatsapp.url());
    eprintln!("fake upstreams running; Ctrl-C stops them");
    let _ = tokio::signal::ctrl_c().await;
}
