//! Stand-ins for the upstreams the customer's handlers call, at `.test`
//! names no resolver answers: each grants its host and sets the variables the
//! handler reads, so a test names the upstream rather than its settings, and
//! answers it with [`Harness::respond`](crate::Harness::respond) at the URL
//! given here.

use crate::HarnessBuilder;

/// Where a handler built with [`HarnessBuilder::with_ollama`] asks for chat
/// completions (`OLLAMA_URL` + `/v1/chat/completions`).
pub const OLLAMA_CHAT: &str = "http://ollama.test/v1/chat/completions";

/// Where a handler built with [`HarnessBuilder::with_gemini`] asks for chat
/// completions (`GEMINI_BASE_URL` + `/chat/completions`).
pub const GEMINI_CHAT: &str = "http://gemini.test/v1/chat/completions";

/// The `GEMINI_API_KEY` granted by [`HarnessBuilder::with_gemini`].
pub const GEMINI_KEY: &str = "gemini-key";

/// Where a handler built with [`HarnessBuilder::with_whatsapp`] sends
/// messages (the Cloud API's `/{phone number id}/messages`).
pub const WHATSAPP_MESSAGES: &str = "http://graph.test/v21.0/1234567890/messages";

/// The `WHATSAPP_TOKEN` granted by [`HarnessBuilder::with_whatsapp`].
pub const WHATSAPP_TOKEN: &str = "wa-token";

impl HarnessBuilder {
    /// Ollama at `http://ollama.test`.
    pub fn with_ollama(self) -> Self {
        self.allow_host("ollama.test").config("OLLAMA_URL", "http://ollama.test")
    }

    /// Gemini's OpenAI-compatible endpoint at `http://gemini.test/v1`, with a key.
    pub fn with_gemini(self) -> Self {
        self.allow_host("gemini.test")
            .config("GEMINI_API_KEY", GEMINI_KEY)
            .config("GEMINI_BASE_URL", "http://gemini.test/v1")
    }

    /// The WhatsApp Cloud API at `http://graph.test/v21.0`, with a token and
    /// the phone number id `1234567890`.
    pub fn with_whatsapp(self) -> Self {
        self.allow_host("graph.test")
            .config("WHATSAPP_API_URL", "http://graph.test/v21.0")
            .config("WHATSAPP_TOKEN", WHATSAPP_TOKEN)
            .config("WHATSAPP_PHONE_NUMBER_ID", "1234567890")
    }
}
