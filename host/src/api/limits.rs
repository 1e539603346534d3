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

    fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        // Forget idle addresses now and then, so the table does not grow forever.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        self.limiter.check_key(&ip).map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
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

/// Refuses an enqueue past the client's rate, with `Retry-After`.
pub fn check_rate(
    gateway: &Gateway,
    headers: &HeaderMap,
    peer: Option<&ConnectInfo<SocketAddr>>,
) -> Result<(), ApiError> {
    let (Some(limiter), Some(ip)) = (&gateway.limiter, client_ip(gateway, headers, peer)) else { return Ok(()) };
    limiter.check(ip).map_err(|wait| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "too many enqueues from your address: at most {} a minute; retry after the Retry-After seconds",
                limiter.per_minute
            ),
        )
        .with_retry_after(wait)
    })
}
