//! `quern:handler/http`: outbound HTTP on a handler's behalf.
//!
//! Built once per process: [`OutboundHttp`], one `reqwest` client (connection
//! pools, TLS) whose DNS resolver refuses non-public addresses for names no
//! handler was granted exactly. Built once per handler version: [`HttpPolicy`],
//! the manifest's allowlist. Per job: [`HttpCap`], the policy plus the
//! transport (the network, or canned responses under `quern_testing`).
//!
//! A request is allowed when its host matches an `allowed_hosts` rule and every
//! address the host resolves to is public; a non-public address (loopback,
//! private, link-local, ...) needs an exact rule (a name or an IP, not a
//! wildcard), and a cloud metadata address needs a rule naming that very IP.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use super::bindings::quern::handler::http as wit;
pub use super::bindings::quern::handler::http::{Error as HttpError, Request, Response};
use super::state::JobState;
use crate::manifest::ManifestError;

/// One `allowed_hosts` entry: `api.example.com`, `*.example.com`, `*`,
/// `127.0.0.1:11434`, `[::1]:8080`. Without a port it matches any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    raw: String,
    pattern: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// `*.example.com` is stored as `.example.com`: subdomains only.
    Subdomains(String),
    /// A lowercase name, or an IP address in canonical form.
    Exact(String),
}

impl HostRule {
    pub fn parse(raw: &str) -> Result<Self, ManifestError> {
        let error = |reason: &str| ManifestError::HostRule { rule: raw.to_string(), reason: reason.to_string() };
        if raw.contains("://") || raw.contains('/') {
            return Err(error("write the host only, as `name`, `name:port` or `*.domain`, without scheme or path"));
        }
        let (wildcard, rest) = match raw {
            "*" => (true, ""),
            _ if raw.starts_with("*:") => (true, &raw[1..]),
            _ => match raw.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, raw),
            },
        };
        if rest.is_empty() || rest.starts_with(':') {
            let port = match rest.strip_prefix(':') {
                Some(port) => Some(port.parse::<u16>().map_err(|_| error("the port is not a number from 0 to 65535"))?),
                None => None,
            };
            return Ok(Self { raw: raw.to_string(), pattern: HostPattern::Any, port });
        }
        let parsed = url::Url::parse(&format!("http://{rest}/")).map_err(|e| error(&e.to_string()))?;
        let host = canonical_host(&parsed).ok_or_else(|| error("it has no host"))?;
        if rest.contains('*') {
            return Err(error("a wildcard may only stand first, as in `*.example.com`"));
        }
        let pattern = if wildcard { HostPattern::Subdomains(format!(".{host}")) } else { HostPattern::Exact(host) };
        Ok(Self { raw: raw.to_string(), pattern, port: parsed.port() })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        let host_matches = match &self.pattern {
            HostPattern::Any => true,
            HostPattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
            HostPattern::Exact(exact) => exact == host,
        };
        host_matches && self.port.is_none_or(|p| p == port)
    }

    fn is_exact(&self) -> bool {
        matches!(self.pattern, HostPattern::Exact(_))
    }

    /// The exact host name of this rule, when it names one (not an IP).
    fn exact_name(&self) -> Option<&str> {
        match &self.pattern {
            HostPattern::Exact(name) if name.parse::<IpAddr>().is_err() => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// The host of a URL, lowercase, IPv6 without brackets.
fn canonical_host(url: &url::Url) -> Option<String> {
    match url.host()? {
        url::Host::Domain(name) => Some(name.trim_end_matches('.').to_ascii_lowercase()),
        url::Host::Ipv4(ip) => Some(ip.to_string()),
        url::Host::Ipv6(ip) => Some(ip.to_string()),
    }
}

/// The IPv4 address an IPv6 address carries, if it carries one: mapped
/// (`::ffff:0:0/96`), compatible (`::/96`, but not `::` or `::1`), or NAT64
/// (`64:ff9b::/96`, and `64:ff9b:1::/48` laid out as RFC 6052 says). Every
/// check classifies this form, so `::ffff:169.254.169.254` is the metadata
/// address it leads to.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let segments = ip.segments();
    if let Some(mapped) = ip.to_ipv4_mapped() {
        return Some(mapped);
    }
    if segments[..6] == [0; 6] && u32::from(last) > 1 {
        return Some(last);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last);
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        return Some(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
    }
    None
}

/// `ip` with an IPv4 address carried in IPv6 written as that IPv4 address.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Why an address is not on the public internet, or `None` when it is.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match normalize(ip) {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    Some(match () {
        _ if is_metadata(IpAddr::V4(ip)) => "a cloud metadata address",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_unspecified() || a == 0 => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        _ if ip.is_multicast() => "multicast",
        _ if a == 100 && (64..128).contains(&b) => "shared (carrier-grade NAT)",
        _ if a >= 240 => "reserved",
        _ => return None,
    })
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    Some(match () {
        _ if is_metadata(IpAddr::V6(ip)) => "a cloud metadata address",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_unique_local() => "private (unique local)",
        _ if ip.is_unicast_link_local() => "link-local",
        _ if ip.is_multicast() => "multicast",
        _ => return None,
    })
}

/// Cloud instance metadata endpoints: they hand out credentials, so only a rule
/// naming the very address reaches them.
pub fn is_metadata(ip: IpAddr) -> bool {
    const METADATA: [IpAddr; 3] = [
        IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
        IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    ];
    METADATA.contains(&normalize(ip))
}

/// A handler version's outbound rules (from its manifest).
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    job_type: String,
    rules: Vec<HostRule>,
}

impl HttpPolicy {
    pub fn new(job_type: &str, rules: Vec<HostRule>) -> Self {
        Self { job_type: job_type.to_string(), rules }
    }

    /// The rule that admits `host:port`, preferring an exact one.
    fn admit(&self, host: &str, port: u16) -> Result<&HostRule, String> {
        let mut matching = self.rules.iter().filter(|rule| rule.matches(host, port));
        let first = matching.next();
        let exact = first
            .filter(|r| r.is_exact())
            .or_else(|| self.rules.iter().find(|r| r.is_exact() && r.matches(host, port)));
        exact.or(first).ok_or_else(|| {
            if self.rules.is_empty() {
                format!(
                    "host {host}:{port} is not allowed: handler `{}` has no [http] allowed_hosts in its handler.toml, so it may not make requests",
                    self.job_type
                )
            } else {
                let listed: Vec<&str> = self.rules.iter().map(|r| r.raw.as_str()).collect();
                format!(
                    "host {host}:{port} is not allowed: it matches none of the allowed_hosts of handler `{}` ({})",
                    self.job_type,
                    listed.join(", ")
                )
            }
        })
    }

    /// Checks one address the request would connect to, under the rule that
    /// admitted its host.
    fn check_address(&self, host: &str, ip: IpAddr, rule: &HostRule) -> Result<(), String> {
        let Some(reason) = non_public_reason(ip) else { return Ok(()) };
        let named_exactly = matches!(&rule.pattern, HostPattern::Exact(exact)
            if exact.parse::<IpAddr>().map(normalize) == Ok(normalize(ip)));
        if is_metadata(ip) && !named_exactly {
            return Err(format!(
                "address {ip} of host {host} is {reason}: only an allowed_hosts entry naming {ip} itself may reach it (rule `{rule}` does not)"
            ));
        }
        if !rule.is_exact() {
            return Err(format!(
                "address {ip} of host {host} is {reason}: the wildcard rule `{rule}` covers public addresses only; list the host exactly to reach it"
            ));
        }
        Ok(())
    }
}

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
    client: reqwest::Client,
    settings: HttpSettings,
    exact_names: Arc<RwLock<HashSet<String>>>,
    lookup: Lookup,
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

/// The cases of [`HttpError`], without their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorKind {
    Denied,
    InvalidRequest,
    Connect,
    Timeout,
    Protocol,
    BodyTooLarge,
}

impl HttpErrorKind {
    pub fn into_error(self, message: String) -> HttpError {
        match self {
            Self::Denied => HttpError::Denied(message),
            Self::InvalidRequest => HttpError::InvalidRequest(message),
            Self::Connect => HttpError::Connect(message),
            Self::Timeout => HttpError::Timeout(message),
            Self::Protocol => HttpError::Protocol(message),
            Self::BodyTooLarge => HttpError::BodyTooLarge(message),
        }
    }
}

/// Answers requests without a network, for tests (see `quern_testing`).
pub trait CannedHttp: Send + Sync {
    fn respond(&self, request: &Request) -> Result<Response, HttpError>;
}

/// Where a job's requests go.
#[derive(Clone)]
pub enum Transport {
    Network(Arc<OutboundHttp>),
    Canned(Arc<dyn CannedHttp>),
}

/// Per job: the policy of the handler version and the transport.
pub struct HttpCap {
    pub policy: Arc<HttpPolicy>,
    pub transport: Transport,
}

impl wit::Host for JobState {
    async fn send(&mut self, request: Request) -> Result<Response, HttpError> {
        let cap = &self.http;
        let url = url::Url::parse(&request.url)
            .map_err(|e| HttpError::InvalidRequest(format!("invalid URL {:?}: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HttpError::InvalidRequest(format!("unsupported scheme `{}`: use http or https", url.scheme())));
        }
        let host = canonical_host(&url).ok_or_else(|| HttpError::InvalidRequest("the URL has no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let rule = cap.policy.admit(&host, port).map_err(HttpError::Denied)?;
        let outcome = match &cap.transport {
            Transport::Canned(canned) => canned.respond(&request),
            Transport::Network(outbound) => {
                check_resolved_addresses(&outbound.lookup, &cap.policy, rule, &url, &host, port).await?;
                send_with_retries(outbound, request, url).await
            }
        };
        let status = outcome.as_ref().map(|r| r.status).ok();
        tracing::debug!(host = %host, status, "outbound request");
        let label = status.map_or_else(|| "error".to_string(), |s| s.to_string());
        metrics::counter!(crate::telemetry::OUTBOUND_CALLS, "host" => host.clone(), "status" => label).increment(1);
        outcome
    }
}

async fn check_resolved_addresses(
    lookup: &Lookup,
    policy: &HttpPolicy,
    rule: &HostRule,
    url: &url::Url,
    host: &str,
    port: u16,
) -> Result<(), HttpError> {
    let addresses: Vec<IpAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        _ => lookup(host.to_string(), port)
            .await
            .map_err(|e| HttpError::Connect(format!("could not resolve {host}: {e}")))?
            .into_iter()
            .map(|addr| addr.ip())
            .collect(),
    };
    for ip in addresses {
        policy.check_address(host, ip, rule).map_err(HttpError::Denied)?;
    }
    Ok(())
}

/// Why one try did not give the final answer.
enum TryError {
    /// A status worth retrying; the response is kept in case tries run out.
    Status {
        response: Response,
        retry_after: Option<Duration>,
    },
    Final(HttpError),
}

async fn send_with_retries(outbound: &OutboundHttp, request: Request, url: url::Url) -> Result<Response, HttpError> {
    let settings = outbound.settings();
    let method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| HttpError::InvalidRequest(format!("invalid method {:?}", request.method)))?;
    let headers = header_map(&request.headers)?;
    let timeout = request
        .timeout_ms
        .map_or(settings.default_timeout, |ms| Duration::from_millis(ms.into()))
        .min(settings.max_timeout);
    let idempotent = request.idempotent.unwrap_or(method.is_idempotent());
    let body = request.body.map(bytes::Bytes::from);

    let try_once = || {
        let builder = outbound.client.request(method.clone(), url.clone()).headers(headers.clone()).timeout(timeout);
        let builder = match &body {
            Some(body) => builder.body(body.clone()),
            None => builder,
        };
        async move {
            let response = builder.send().await.map_err(|e| TryError::Final(classify(e, timeout)))?;
            let status = response.status().as_u16();
            let retry_after = response.headers().get(RETRY_AFTER).and_then(parse_retry_after);
            let response = read_response(response, settings.max_body_bytes).await.map_err(TryError::Final)?;
            let worth_retrying = match status {
                429 | 503 => true,
                502 | 504 => idempotent,
                _ => false,
            };
            if worth_retrying { Err(TryError::Status { response, retry_after }) } else { Ok(response) }
        }
    };

    let backoff = ExponentialBuilder::default()
        .with_min_delay(settings.first_backoff)
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(settings.max_tries.saturating_sub(1))
        .with_jitter();
    let outcome = try_once
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|error| match error {
            TryError::Status { retry_after, .. } => retry_after.is_none_or(|d| d <= settings.max_retry_after),
            TryError::Final(HttpError::Connect(_)) => true,
            TryError::Final(_) => false,
        })
        .adjust(|error, planned| match (error, planned) {
            (TryError::Status { retry_after: Some(wait), .. }, Some(planned)) => Some(planned.max(*wait)),
            (_, planned) => planned,
        })
        .await;
    match outcome {
        Ok(response) | Err(TryError::Status { response, .. }) => Ok(response),
        Err(TryError::Final(error)) => Err(error),
    }
}

fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, HttpError> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| HttpError::InvalidRequest(format!("invalid header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| HttpError::InvalidRequest(format!("invalid value for header {name}")))?;
        map.append(name, value);
    }
    Ok(map)
}

fn classify(error: reqwest::Error, timeout: Duration) -> HttpError {
    if error.is_connect() {
        HttpError::Connect(error_chain(&error))
    } else if error.is_timeout() {
        HttpError::Timeout(format!("no complete response within {} ms", timeout.as_millis()))
    } else if error.is_builder() || error.is_request() && error.url().is_none() {
        HttpError::InvalidRequest(error_chain(&error))
    } else {
        HttpError::Protocol(error_chain(&error))
    }
}

/// The error with its causes, e.g. "error sending request: connection refused".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_response(mut response: reqwest::Response, cap: usize) -> Result<Response, HttpError> {
    let too_large = || HttpError::BodyTooLarge(format!("the response body exceeds the limit of {}", human_bytes(cap)));
    if response.content_length().is_some_and(|len| len > cap as u64) {
        return Err(too_large());
    }
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| {
        if e.is_timeout() { HttpError::Timeout(error_chain(&e)) } else { HttpError::Protocol(error_chain(&e)) }
    })? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Response { status, headers, body })
}

/// `Retry-After` as seconds or an HTTP date.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

pub(crate) fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn policy(rules: &[&str]) -> HttpPolicy {
        HttpPolicy::new("test", rules.iter().map(|r| HostRule::parse(r).unwrap()).collect())
    }

    #[test]
    fn rules_match_exact_wildcard_and_port() {
        let p = policy(&["api.example.com", "*.example.org", "127.0.0.1:11434"]);
        assert!(p.admit("api.example.com", 443).is_ok());
        assert!(p.admit("deep.sub.example.org", 80).is_ok());
        assert!(p.admit("example.org", 80).is_err(), "a wildcard covers subdomains only");
        assert!(p.admit("127.0.0.1", 11434).is_ok());
        assert!(p.admit("127.0.0.1", 11435).is_err());
        assert!(p.admit("evil.com", 443).unwrap_err().contains("evil.com:443"));
    }

    #[test]
    fn malformed_rules_are_refused() {
        for rule in ["http://api.example.com", "api.example.com/v1", "a.*.example.com", "host:99999"] {
            assert!(HostRule::parse(rule).is_err(), "{rule}");
        }
    }

    #[test]
    fn private_address_needs_an_exact_rule() {
        let p = policy(&["*"]);
        let rule = p.admit("10.0.0.5", 80).unwrap();
        let error = p.check_address("10.0.0.5", "10.0.0.5".parse().unwrap(), rule).unwrap_err();
        assert!(error.contains("private") && error.contains("`*`"), "{error}");

        let p = policy(&["ollama.internal:11434"]);
        let rule = p.admit("ollama.internal", 11434).unwrap();
        assert!(p.check_address("ollama.internal", "10.0.0.5".parse().unwrap(), rule).is_ok());
    }

    #[test]
    fn metadata_address_needs_its_own_ip_listed() {
        let p = policy(&["metadata.internal"]);
        let rule = p.admit("metadata.internal", 80).unwrap();
        let error = p.check_address("metadata.internal", "169.254.169.254".parse().unwrap(), rule).unwrap_err();
        assert!(error.contains("metadata"), "{error}");

        let p = policy(&["169.254.169.254"]);
        let rule = p.admit("169.254.169.254", 80).unwrap();
        assert!(p.check_address("169.254.169.254", "169.254.169.254".parse().unwrap(), rule).is_ok());
    }

    #[test]
    fn address_classes() {
        for (ip, public) in [
            ("8.8.8.8", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("169.254.1.1", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("::1", false),
            ("fd12::1", false),
            ("fe80::1", false),
            ("::ffff:127.0.0.1", false),
            ("2606:4700::1111", true),
        ] {
            assert_eq!(non_public_reason(ip.parse().unwrap()).is_none(), public, "{ip}");
        }
    }

    #[test]
    fn ipv4_carried_in_ipv6_is_classified_as_that_ipv4() {
        for (form, carried) in [
            ("::ffff:169.254.169.254", "169.254.169.254"),
            ("::169.254.169.254", "169.254.169.254"),
            ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
            ("64:ff9b:1:a9fe:a9:fe00::", "169.254.169.254"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("64:ff9b::a00:5", "10.0.0.5"),
            ("64:ff9b:1:c0a8:1:100::", "192.168.1.1"),
        ] {
            let ip: IpAddr = form.parse().unwrap();
            assert_eq!(normalize(ip), carried.parse::<IpAddr>().unwrap(), "{form}");
            assert!(non_public_reason(ip).is_some(), "{form} is not public");
        }
        for form in ["::ffff:169.254.169.254", "::169.254.169.254", "64:ff9b::a9fe:a9fe", "64:ff9b:1:a9fe:a9:fe00::"] {
            assert!(is_metadata(form.parse().unwrap()), "{form} is the metadata address");
        }
        assert_eq!(non_public_reason("64:ff9b::808:808".parse().unwrap()), None, "NAT64 of 8.8.8.8 is public");
        assert_eq!(normalize("::1".parse().unwrap()), "::1".parse::<IpAddr>().unwrap(), "IPv6 loopback stays IPv6");
        assert_eq!(normalize("2606:4700::1111".parse().unwrap()), "2606:4700::1111".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_name_rule_never_reaches_metadata_through_an_ipv6_form() {
        let p = policy(&["metadata.example.com", "*"]);
        let rule = p.admit("metadata.example.com", 80).unwrap();
        for form in ["::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"] {
            let error = p.check_address("metadata.example.com", form.parse().unwrap(), rule).unwrap_err();
            assert!(error.contains("metadata"), "{form}: {error}");
        }
        let p = policy(&["169.254.169.254"]);
        let rule = p.admit("169.254.169.254", 80).unwrap();
        assert!(p.check_address("169.254.169.254", "::ffff:169.254.169.254".parse().unwrap(), rule).is_ok());
    }

    /// A resolver whose DNS answers are what a test says.
    fn stub(answers: &'static [&'static str]) -> Lookup {
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

    #[tokio::test]
    async fn the_policy_check_refuses_a_name_resolving_to_mapped_metadata() {
        let p = policy(&["*.example.com"]);
        let url = url::Url::parse("http://imds.example.com/latest/meta-data/").unwrap();
        let rule = p.admit("imds.example.com", 80).unwrap();
        let error =
            check_resolved_addresses(&stub(&["::ffff:169.254.169.254"]), &p, rule, &url, "imds.example.com", 80)
                .await
                .unwrap_err();
        assert!(matches!(&error, HttpError::Denied(message) if message.contains("metadata")), "{error:?}");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after(&HeaderValue::from_static("2")), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }
}
