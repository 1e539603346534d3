//! `allowed_hosts` rules: what a handler's manifest may name, parsed once at
//! load. The manifest holds them; the policy in `http` matches requests
//! against them.

use std::fmt;
use std::net::IpAddr;

/// A rule that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allowed host `{rule}`: {reason}")]
pub struct RuleError {
    pub rule: String,
    pub reason: String,
}

/// One `allowed_hosts` entry: `api.example.com`, `*.example.com`, `*`,
/// `127.0.0.1:11434`, `[::1]:8080`. Without a port it matches any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub(super) raw: String,
    pub(super) pattern: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HostPattern {
    Any,
    /// `*.example.com` is stored as `.example.com`: subdomains only.
    Subdomains(String),
    /// A lowercase name, or an IP address in canonical form.
    Exact(String),
}

impl HostRule {
    pub fn parse(raw: &str) -> Result<Self, RuleError> {
        let error = |reason: &str| RuleError { rule: raw.to_string(), reason: reason.to_string() };
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

    pub(super) fn matches(&self, host: &str, port: u16) -> bool {
        let host_matches = match &self.pattern {
            HostPattern::Any => true,
            HostPattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
            HostPattern::Exact(exact) => exact == host,
        };
        host_matches && self.port.is_none_or(|p| p == port)
    }

    pub(super) fn is_exact(&self) -> bool {
        matches!(self.pattern, HostPattern::Exact(_))
    }

    /// The exact host name of this rule, when it names one (not an IP).
    pub(super) fn exact_name(&self) -> Option<&str> {
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
pub(super) fn canonical_host(url: &url::Url) -> Option<String> {
    match url.host()? {
        url::Host::Domain(name) => Some(name.trim_end_matches('.').to_ascii_lowercase()),
        url::Host::Ipv4(ip) => Some(ip.to_string()),
        url::Host::Ipv6(ip) => Some(ip.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_rules_are_refused() {
        for rule in ["http://api.example.com", "api.example.com/v1", "a.*.example.com", "host:99999"] {
            assert!(HostRule::parse(rule).is_err(), "{rule}");
        }
    }
}
