//! `quern:handler/http`: outbound HTTP on a handler's behalf. (Over 400 lines
//! with its tests, which sit beside the rules they pin.)
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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

pub use super::bindings::Method;
use super::bindings::v0_2::quern::handler::http as wit;
pub use super::bindings::v0_2::quern::handler::http::{Error as HttpError, Request, Response};
use super::state::JobState;

mod address;
mod client;
mod rules;

pub use address::{embedded_ipv4, is_metadata, non_public_reason, normalize};
pub use client::{HttpSettings, Lookup, OutboundHttp, system_lookup};
use rules::{HostPattern, canonical_host};
pub use rules::{HostRule, RuleError, Scheme};

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

    /// The rule that admits `scheme://host:port`, preferring an exact one.
    fn admit(&self, scheme: Scheme, host: &str, port: u16) -> Result<&HostRule, String> {
        let mut matching = self.rules.iter().filter(|rule| rule.matches(scheme, host, port));
        let first = matching.next();
        let exact = first
            .filter(|r| r.is_exact())
            .or_else(|| self.rules.iter().find(|r| r.is_exact() && r.matches(scheme, host, port)));
        exact.or(first).ok_or_else(|| {
            if self.rules.is_empty() {
                format!(
                    "host {host}:{port} is not allowed: handler `{}` has no [http] allowed_hosts in its handler.toml, so it may not make requests",
                    self.job_type
                )
            } else {
                let listed: Vec<&str> = self.rules.iter().map(|r| r.raw.as_str()).collect();
                format!(
                    "host {host}:{port} is not allowed over {scheme}: it matches none of the allowed_hosts of handler `{}` ({})",
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
        let scheme = Scheme::parse(url.scheme()).ok_or_else(|| {
            HttpError::InvalidRequest(format!("unsupported scheme `{}`: use http or https", url.scheme()))
        })?;
        let host = canonical_host(&url).ok_or_else(|| HttpError::InvalidRequest("the URL has no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(80);
        let rule = cap.policy.admit(scheme, &host, port).map_err(HttpError::Denied)?;
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
    let method = reqwest::Method::from_bytes(request.method.as_str().as_bytes())
        .map_err(|_| HttpError::InvalidRequest(format!("invalid method {:?}", request.method.as_str())))?;
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
    use super::client::tests::stub;
    use super::*;

    fn policy(rules: &[&str]) -> HttpPolicy {
        HttpPolicy::new("test", rules.iter().map(|r| HostRule::parse(r).unwrap()).collect())
    }

    #[test]
    fn rules_match_exact_wildcard_and_port() {
        let p = policy(&["api.example.com", "*.example.org", "127.0.0.1:11434"]);
        assert!(p.admit(Scheme::Https, "api.example.com", 443).is_ok());
        assert!(p.admit(Scheme::Http, "deep.sub.example.org", 80).is_ok());
        assert!(p.admit(Scheme::Http, "example.org", 80).is_err(), "a wildcard covers subdomains only");
        assert!(p.admit(Scheme::Http, "127.0.0.1", 11434).is_ok());
        assert!(p.admit(Scheme::Http, "127.0.0.1", 11435).is_err());
        assert!(p.admit(Scheme::Https, "evil.com", 443).unwrap_err().contains("evil.com:443"));
    }

    #[test]
    fn a_rule_with_a_scheme_refuses_the_other_scheme_saying_so() {
        let p = policy(&["https://api.example.com"]);
        assert!(p.admit(Scheme::Https, "api.example.com", 443).is_ok());
        let error = p.admit(Scheme::Http, "api.example.com", 80).unwrap_err();
        assert!(
            error.contains("api.example.com:80 is not allowed over http")
                && error.contains("(https://api.example.com)"),
            "{error}"
        );
    }

    #[test]
    fn private_address_needs_an_exact_rule() {
        let p = policy(&["*"]);
        let rule = p.admit(Scheme::Http, "10.0.0.5", 80).unwrap();
        let error = p.check_address("10.0.0.5", "10.0.0.5".parse().unwrap(), rule).unwrap_err();
        assert!(error.contains("private") && error.contains("`*`"), "{error}");

        let p = policy(&["ollama.internal:11434"]);
        let rule = p.admit(Scheme::Http, "ollama.internal", 11434).unwrap();
        assert!(p.check_address("ollama.internal", "10.0.0.5".parse().unwrap(), rule).is_ok());
    }

    #[test]
    fn metadata_address_needs_its_own_ip_listed() {
        let p = policy(&["metadata.internal"]);
        let rule = p.admit(Scheme::Http, "metadata.internal", 80).unwrap();
        let error = p.check_address("metadata.internal", "169.254.169.254".parse().unwrap(), rule).unwrap_err();
        assert!(error.contains("metadata"), "{error}");

        let p = policy(&["169.254.169.254"]);
        let rule = p.admit(Scheme::Http, "169.254.169.254", 80).unwrap();
        assert!(p.check_address("169.254.169.254", "169.254.169.254".parse().unwrap(), rule).is_ok());
    }

    #[test]
    fn a_name_rule_never_reaches_metadata_through_an_ipv6_form() {
        let p = policy(&["metadata.example.com", "*"]);
        let rule = p.admit(Scheme::Http, "metadata.example.com", 80).unwrap();
        for form in ["::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe"] {
            let error = p.check_address("metadata.example.com", form.parse().unwrap(), rule).unwrap_err();
            assert!(error.contains("metadata"), "{form}: {error}");
        }
        let p = policy(&["169.254.169.254"]);
        let rule = p.admit(Scheme::Http, "169.254.169.254", 80).unwrap();
        assert!(p.check_address("169.254.169.254", "::ffff:169.254.169.254".parse().unwrap(), rule).is_ok());
    }

    #[tokio::test]
    async fn the_policy_check_refuses_a_name_resolving_to_mapped_metadata() {
        let p = policy(&["*.example.com"]);
        let url = url::Url::parse("http://imds.example.com/latest/meta-data/").unwrap();
        let rule = p.admit(Scheme::Http, "imds.example.com", 80).unwrap();
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
