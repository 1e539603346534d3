//! The per-IP rate limit on enqueue (`QUERN_RATE_LIMIT_PER_MIN`, default 50):
//! a token bucket per client address (`governor`), refilled evenly over the
//! minute. The address is the connection's, or, behind proxies named by
//! `QUERN_TRUST_PROXY`, the rightmost `X-Forwarded-For` entry that no trusted
//! proxy added: entries further left are the client's to write.

use crate::error::ErrorCode;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::auth::Caller;
use super::error::ApiError;
use super::{AppState, Gateway};

pub struct IpLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    per_minute: u32,
}

impl IpLimiter {
    /// `None` for 0: no limit.
    pub fn per_minute(per_minute: u32) -> Option<Self> {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute)?);
        Some(Self { limiter: RateLimiter::keyed(quota), per_minute })
    }

    /// Spends `jobs` of the address's allowance: `Err(Some(wait))` past it,
    /// `Err(None)` when one request asks for more than a minute's allowance.
    fn check(&self, ip: IpAddr, jobs: u32) -> Result<(), Option<Duration>> {
        // Forget idle addresses now and then, so the table does not grow forever.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        let Some(jobs) = NonZeroU32::new(jobs) else { return Ok(()) };
        match self.limiter.check_key_n(&ip, jobs) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(DefaultClock::default().now()))),
            Err(_) => Err(None),
        }
    }
}

/// Which proxies in front of the gateway are believed about the client's
/// address (`QUERN_TRUST_PROXY`).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum TrustProxy {
    /// None: the connection's address is the client's.
    #[default]
    Off,
    /// This many proxies in front, each appending the address it saw.
    Hops(u8),
    /// Proxies at these addresses.
    Networks(Vec<ipnet::IpNet>),
}

impl std::str::FromStr for TrustProxy {
    type Err = String;

    /// `false`/`0`, `true` (one proxy), a hop count, or comma-separated CIDRs.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" | "false" | "0" => Ok(Self::Off),
            "true" => Ok(Self::Hops(1)),
            hops if hops.bytes().all(|b| b.is_ascii_digit()) => {
                hops.parse().map(Self::Hops).map_err(|_| format!("{hops} proxies is too many: use 1 to 255"))
            }
            networks => networks
                .split(',')
                .map(|net| {
                    let net = net.trim();
                    net.parse::<ipnet::IpNet>()
                        .or_else(|_| net.parse::<IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| format!("`{net}` is not an address or a CIDR (e.g. 10.0.0.0/8)"))
                })
                .collect::<Result<_, _>>()
                .map(Self::Networks),
        }
    }
}

/// The client's address, as [`client_ip`] takes it; `None` only where the
/// server was started without connection info (some in-process tests).
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(Self(client_ip(state, &parts.headers, peer)))
    }
}

/// The client's address: the connection's, or behind trusted proxies the
/// rightmost `X-Forwarded-For` entry a trusted proxy did not add.
fn client_ip(gateway: &Gateway, headers: &HeaderMap, peer: Option<&ConnectInfo<SocketAddr>>) -> Option<IpAddr> {
    let peer = peer.map(|ConnectInfo(addr)| addr.ip())?;
    let trust = &gateway.settings.trust_proxy;
    // Every request that may create a job asks; with no proxy trusted (the
    // default) the header is not the client's address, so it is not read.
    if matches!(trust, TrustProxy::Off) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|entry| entry.trim().parse().ok())
        .collect();
    Some(client_address(trust, peer, &forwarded))
}

/// The address the client is taken for, from the connection's `peer` and the
/// forwarded chain, leftmost first.
pub fn client_address(trust: &TrustProxy, peer: IpAddr, forwarded: &[IpAddr]) -> IpAddr {
    match trust {
        TrustProxy::Off => peer,
        // The nearest proxy is the peer; each of the `hops` appended one entry.
        TrustProxy::Hops(hops) => {
            let hops = usize::from(*hops);
            if forwarded.is_empty() {
                return peer;
            }
            forwarded[forwarded.len().saturating_sub(hops)]
        }
        TrustProxy::Networks(networks) => {
            let trusted = |ip: &IpAddr| networks.iter().any(|net| net.contains(ip));
            if !trusted(&peer) {
                return peer;
            }
            forwarded.iter().rev().find(|ip| !trusted(ip)).or(forwarded.first()).copied().unwrap_or(peer)
        }
    }
}

/// Refuses a request that would create `jobs` jobs (a retry, an enqueue and
/// each of its pipeline steps) past the client address's rate, with
/// `Retry-After`. Service callers are trusted backends and not limited here.
pub fn check_rate(gateway: &Gateway, caller: &Caller, client: &ClientIp, jobs: u32) -> Result<(), ApiError> {
    if caller.service {
        return Ok(());
    }
    let (Some(limiter), &ClientIp(Some(ip))) = (&gateway.limiter, client) else { return Ok(()) };
    let per_minute = limiter.per_minute;
    limiter.check(ip, jobs).map_err(|wait| match wait {
        Some(wait) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "too many jobs from your address: at most {per_minute} a minute, pipeline steps and retries included; \
                 retry after the Retry-After seconds"
            ),
        )
        .with_retry_after(wait),
        None => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            format!(
                "this request would create {jobs} jobs, more than the {per_minute} a minute your address may create"
            ),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn a_client_cannot_choose_its_address_behind_a_trusted_proxy() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        // The client sent `X-Forwarded-For: 1.2.3.4`; the proxy appended 203.0.113.9.
        let chain = ips(&["1.2.3.4", "203.0.113.9"]);
        assert_eq!(client_address(&TrustProxy::Off, peer, &chain), peer);
        assert_eq!(client_address(&"true".parse().unwrap(), peer, &chain), chain[1]);
        assert_eq!(
            client_address(&"2".parse().unwrap(), peer, &ips(&["1.2.3.4", "203.0.113.9", "10.0.0.7"])),
            chain[1]
        );
        let networks: TrustProxy = "10.0.0.0/8, 172.16.0.0/12".parse().unwrap();
        assert_eq!(client_address(&networks, peer, &ips(&["1.2.3.4", "203.0.113.9", "172.16.0.3"])), chain[1]);
        let outsider: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(client_address(&networks, outsider, &chain), outsider, "only a trusted peer's header counts");
        assert_eq!(client_address(&networks, peer, &[]), peer);
    }

    #[test]
    fn trust_settings_parse_and_name_their_mistakes() {
        assert_eq!("false".parse::<TrustProxy>().unwrap(), TrustProxy::Off);
        assert_eq!("3".parse::<TrustProxy>().unwrap(), TrustProxy::Hops(3));
        assert!("10.0.0.0/33".parse::<TrustProxy>().unwrap_err().contains("not an address or a CIDR"));
        assert!(matches!("127.0.0.1".parse::<TrustProxy>().unwrap(), TrustProxy::Networks(n) if n.len() == 1));
    }
}
