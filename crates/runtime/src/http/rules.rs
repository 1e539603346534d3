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
///
/// A rule may carry a scheme, `https://api.example.com`: then only that
/// scheme, on the port written or else the scheme's own (443, 80). A rule
/// without one matches http and https alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub(super) raw: String,
    pub(super) pattern: HostPattern,
    port: Option<u16>,
    scheme: Option<Scheme>,
}

/// The scheme a rule is limited to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// `http` or `https`; anything else is no scheme a handler may use.
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "http" => Some(Self::Http),
            "https" => Some(Self::Https),
            _ => None,
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
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
        let (scheme, address) = match raw.split_once("://") {
            Some((name, address)) => {
                let scheme = Scheme::parse(name).ok_or_else(|| {
                    error(&format!("the scheme `{name}` is not one a handler may use: http or https"))
                })?;
                (Some(scheme), address.strip_suffix('/').unwrap_or(address))
            }
            None => (None, raw),
        };
        if address.contains('/') {
            return Err(error(
                "write the host only, as `name`, `name:port`, `*.domain` or `https://name`, without a path",
            ));
        }
        let (wildcard, rest) = match address {
            "*" => (true, ""),
            _ if address.starts_with("*:") => (true, &address[1..]),
            _ => match address.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, address),
            },
        };
        let (pattern, port) = if rest.is_empty() || rest.starts_with(':') {
            let port = match rest.strip_prefix(':') {
                Some(port) => Some(port.parse::<u16>().map_err(|_| error("the port is not a number from 0 to 65535"))?),
                None => None,
            };
            (HostPattern::Any, port)
        } else {
            // Parsed under a scheme without a default port, so `:80` is kept.
            let parsed = url::Url::parse(&format!("rule://{rest}/")).map_err(|e| error(&e.to_string()))?;
            let host = canonical_host(&parsed).ok_or_else(|| error("it has no host"))?;
            if rest.contains('*') {
                return Err(error("a wildcard may only stand first, as in `*.example.com`"));
            }
            let pattern = if wildcard { HostPattern::Subdomains(format!(".{host}")) } else { HostPattern::Exact(host) };
            (pattern, parsed.port())
        };
        let port = port.or(scheme.map(Scheme::default_port));
        Ok(Self { raw: raw.to_string(), pattern, port, scheme })
    }

    pub(super) fn matches(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        let host_matches = match &self.pattern {
            HostPattern::Any => true,
            HostPattern::Subdomains(suffix) => host.ends_with(suffix.as_str()),
            HostPattern::Exact(exact) => exact == host,
        };
        host_matches && self.port.is_none_or(|p| p == port) && self.scheme.is_none_or(|s| s == scheme)
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

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Http => "http",
            Self::Https => "https",
        })
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
        for rule in [
            "ftp://api.example.com",
            "https://api.example.com/v1",
            "api.example.com/v1",
            "a.*.example.com",
            "host:99999",
        ] {
            assert!(HostRule::parse(rule).is_err(), "{rule}");
        }
    }

    #[test]
    fn a_rule_with_a_scheme_admits_that_scheme_on_its_port_only() {
        let rule = HostRule::parse("https://api.example.com").unwrap();
        assert!(rule.matches(Scheme::Https, "api.example.com", 443));
        assert!(!rule.matches(Scheme::Http, "api.example.com", 80), "https://x refuses http://x");
        assert!(!rule.matches(Scheme::Http, "api.example.com", 443), "not even on 443");
        assert!(!rule.matches(Scheme::Https, "api.example.com", 8443), "the scheme's own port unless one is written");
        let on_port = HostRule::parse("http://127.0.0.1:8080/").unwrap();
        assert!(on_port.matches(Scheme::Http, "127.0.0.1", 8080));
        assert!(!on_port.matches(Scheme::Https, "127.0.0.1", 8080));
        let explicit_default = HostRule::parse("http://api.example.com:80").unwrap();
        assert!(explicit_default.matches(Scheme::Http, "api.example.com", 80));
        let wildcard = HostRule::parse("https://*.example.com").unwrap();
        assert!(wildcard.matches(Scheme::Https, "a.example.com", 443));
        assert!(!wildcard.matches(Scheme::Http, "a.example.com", 80));
    }

    #[test]
    fn a_rule_without_a_scheme_keeps_its_meaning() {
        let rule = HostRule::parse("api.example.com").unwrap();
        for (scheme, port) in [(Scheme::Http, 80), (Scheme::Https, 443), (Scheme::Https, 8443)] {
            assert!(rule.matches(scheme, "api.example.com", port));
        }
    }
}
