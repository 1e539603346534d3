//! The process's one outbound client: connection pools, TLS, and a DNS
//! resolver that refuses non-public answers for names no handler was granted
//! exactly.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::HttpPolicy;
use super::address::{is_metadata, non_public_reason};

/// Process-wide outbound HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub max_body_bytes: usize,
    /// Tries per request, the first included.
    pub max_tries: usize,
    pub first_backoff: Duration,
    /// A `Retry-After` longer than this is not waited out in the call: the
    /// response goes back to the handler, which can hand the delay to the queue.
    pub max_retry_after: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(120),
            max_body_bytes: 16 << 20,
            max_tries: 3,
            first_backoff: Duration::from_millis(200),
            max_retry_after: Duration::from_secs(10),
        }
    }
}

/// Resolves a host name: the system's resolver, or a stub in tests.
pub type Lookup = Arc<
    dyn Fn(String, u16) -> futures_util::future::BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync,
>;

/// The system's resolver.
pub fn system_lookup() -> Lookup {
    Arc::new(|host, port| Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) }))
}

/// The shared client.
pub struct OutboundHttp {
    pub(super) client: reqwest::Client,
    pub(super) settings: HttpSettings,
    exact_names: Arc<RwLock<HashSet<String>>>,
    pub(super) lookup: Lookup,
}

impl OutboundHttp {
    pub fn new(settings: HttpSettings) -> Result<Self, reqwest::Error> {
        Self::with_lookup(settings, system_lookup())
    }

    /// The client resolving names with `lookup` (the policy check and the
    /// connection both).
    pub fn with_lookup(settings: HttpSettings, lookup: Lookup) -> Result<Self, reqwest::Error> {
        let exact_names = Arc::new(RwLock::new(HashSet::new()));
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { exact_names: exact_names.clone(), lookup: lookup.clone() }))
            // A redirect could lead anywhere, the metadata address included: the
            // handler sees the 3xx and decides.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("quern/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, settings, exact_names, lookup })
    }

    /// Lets the resolver return non-public addresses for the names a loaded
    /// handler lists exactly.
    pub fn grant_exact_names(&self, policy: &HttpPolicy) {
        let names: Vec<String> = policy.rules.iter().filter_map(|r| r.exact_name().map(str::to_string)).collect();
        if names.is_empty() {
            return;
        }
        let mut granted = self.exact_names.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        granted.extend(names);
    }

    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }
}

/// Resolves names for the shared client and drops non-public addresses unless
/// some handler lists the name exactly. The per-request check already refused
/// such addresses; this catches a name whose DNS answer changed in between.
struct GuardedResolver {
    exact_names: Arc<RwLock<HashSet<String>>>,
    lookup: Lookup,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let granted = self.exact_names.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains(&host);
        let lookup = self.lookup.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = lookup(host.clone(), 0).await?;
            let kept: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|addr| !is_metadata(addr.ip()) && (granted || non_public_reason(addr.ip()).is_none()))
                .collect();
            if kept.is_empty() {
                return Err(format!("{host} resolved to no address this handler may reach").into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::str::FromStr;

    use super::*;

    /// A resolver whose DNS answers are what a test says.
    pub(crate) fn stub(answers: &'static [&'static str]) -> Lookup {
        Arc::new(move |_, port| {
            Box::pin(async move { Ok(answers.iter().map(|ip| SocketAddr::new(ip.parse().unwrap(), port)).collect()) })
        })
    }

    #[tokio::test]
    async fn the_resolver_drops_metadata_answers_in_any_form() {
        use reqwest::dns::Resolve;
        // Even a name some handler lists exactly (which may resolve to a
        // private address) never resolves to the metadata address.
        let granted = Arc::new(RwLock::new(HashSet::from(["evil.example.com".to_string()])));
        let resolver = GuardedResolver { exact_names: granted, lookup: stub(&["::ffff:169.254.169.254"]) };
        let name = reqwest::dns::Name::from_str("evil.example.com").unwrap();
        let error = resolver.resolve(name).await.err().expect("no address left");
        assert!(error.to_string().contains("no address this handler may reach"), "{error}");

        let resolver =
            GuardedResolver { exact_names: Arc::default(), lookup: stub(&["64:ff9b::a9fe:a9fe", "2606:4700::1111"]) };
        let kept: Vec<SocketAddr> =
            resolver.resolve(reqwest::dns::Name::from_str("mixed.example.com").unwrap()).await.unwrap().collect();
        assert_eq!(kept, vec!["[2606:4700::1111]:0".parse().unwrap()], "only the public answer is kept");
    }
}
