//! The per-IP rate limit on enqueue (`QUERN_RATE_LIMIT_PER_MIN`, default 50):
//! a token bucket per client address (`governor`), refilled evenly over the
//! minute. The address is the connection's, or the first `X-Forwarded-For`
//! entry when `QUERN_TRUST_PROXY` says a proxy in front sets it honestly.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::Gateway;
use super::auth::Caller;
use super::error::ApiError;

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

/// The client's address: the connection's, or `X-Forwarded-For`'s first
/// entry when the proxy is trusted.
pub fn client_ip(gateway: &Gateway, headers: &HeaderMap, peer: Option<&ConnectInfo<SocketAddr>>) -> Option<IpAddr> {
    if gateway.settings.trust_proxy
        && let Some(forwarded) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok())
        && let Some(ip) = forwarded.split(',').next().and_then(|first| first.trim().parse().ok())
    {
        return Some(ip);
    }
    peer.map(|ConnectInfo(addr)| addr.ip())
}

/// Refuses a request that would create `jobs` jobs (a retry, an enqueue and
/// each of its pipeline steps) past the client address's rate, with
/// `Retry-After`. Service callers are trusted backends and not limited here.
pub fn check_rate(
    gateway: &Gateway,
    caller: &Caller,
    headers: &HeaderMap,
    peer: Option<&ConnectInfo<SocketAddr>>,
    jobs: u32,
) -> Result<(), ApiError> {
    if caller.service {
        return Ok(());
    }
    let (Some(limiter), Some(ip)) = (&gateway.limiter, client_ip(gateway, headers, peer)) else { return Ok(()) };
    let per_minute = limiter.per_minute;
    limiter.check(ip, jobs).map_err(|wait| match wait {
        Some(wait) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many jobs from your address: at most {per_minute} a minute, pipeline steps and retries included; \
                 retry after the Retry-After seconds"
            ),
        )
        .with_retry_after(wait),
        None => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("this request would create {jobs} jobs, more than the {per_minute} a minute your address may create"),
        ),
    })
}
