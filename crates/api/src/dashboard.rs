//! The operators' dashboard: one page embedded in the binary (no CDN; it
//! works offline) that polls `/v1/stats`. Operators sign in with a
//! service_role token or the ops password (`QUERN_DASHBOARD_PASSWORD`) and
//! get a session cookie; scripts send the token as a Bearer header. The page
//! shows ids, types, timings and errors, never a job's input or result.
//!
//! Sessions live in this gateway's memory: behind several gateways, pin
//! operators to one or sign in on each.
//!
//! One file over 400 lines on purpose: the page, its sign-in and its sessions
//! are one feature; the figures it shows come from `stats`.

use crate::error::ErrorCode;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::AppState;
use super::auth::same_secret;
use super::auth::{Caller, require_service};
use super::error::{ApiError, ErrorBody};
use super::jobs::AttemptView;
use super::limits::ClientIp;

const PAGE: &str = include_str!("../assets/dashboard.html");
const LOGIN: &str = include_str!("../assets/login.html");
const COOKIE: &str = "quern_dashboard";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Sign-in attempts an address may get wrong before it must wait; each
/// further failure doubles the wait, up to [`MAX_LOCKOUT`].
const FREE_FAILURES: u32 = 5;
const MAX_LOCKOUT: Duration = Duration::from_secs(300);

/// Failed sign-ins by client address, and until when each must wait.
#[derive(Default)]
pub struct SignInThrottle(Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>);

impl SignInThrottle {
    /// How long `ip` must still wait before it may try again, if at all.
    fn wait(&self, ip: std::net::IpAddr) -> Option<Duration> {
        let now = Instant::now();
        self.lock().get(&ip).and_then(|(_, until)| until.checked_duration_since(now)).filter(|wait| !wait.is_zero())
    }

    fn failed(&self, ip: std::net::IpAddr) {
        let now = Instant::now();
        let mut failures = self.lock();
        if failures.len() > 10_000 {
            failures.retain(|_, (_, until)| *until > now);
        }
        let (count, until) = failures.entry(ip).or_insert((0, now));
        *count += 1;
        if *count > FREE_FAILURES {
            let doublings = (*count - FREE_FAILURES - 1).min(16);
            *until = now + Duration::from_secs(1 << doublings).min(MAX_LOCKOUT);
        }
    }

    fn succeeded(&self, ip: std::net::IpAddr) {
        self.lock().remove(&ip);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, (u32, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The pages' content security policy: their one inline script and their
/// inline styles by hash, requests to this server only, never in a frame.
static CONTENT_SECURITY_POLICY: std::sync::LazyLock<HeaderValue> = std::sync::LazyLock::new(|| {
    let hashes = |tag: &str| -> String {
        [PAGE, LOGIN]
            .iter()
            .flat_map(|page| inline_blocks(page, tag))
            .map(|block| {
                use base64::Engine;
                format!(" 'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(block)))
            })
            .collect()
    };
    let policy = format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self' data:; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        hashes("script"),
        hashes("style")
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

/// The contents of each `<tag>…</tag>` of a page.
fn inline_blocks<'a>(page: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut blocks = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        blocks.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    blocks
}

/// What every dashboard answer carries: never stored, never framed, never
/// sniffed, no referrer, and the content security policy.
fn guarded(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY.clone());
    response
}

/// Open dashboard sessions: a random id and when it lapses.
#[derive(Default)]
pub struct Sessions(Mutex<HashMap<String, Instant>>);

impl Sessions {
    fn open(&self) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, lapses| *lapses > now);
        sessions.insert(id.clone(), now + SESSION_TTL);
        id
    }

    fn is_open(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|lapses| *lapses > Instant::now())
    }

    fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn session_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// An operator: a dashboard session, or a service_role token.
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if session_of(&parts.headers).is_some_and(|id| state.sessions.is_open(id)) {
            return Ok(Operator);
        }
        let caller = Caller::from_request_parts(parts, state).await.map_err(|_| {
            ApiError::unauthorized(
                "operators only: sign in at /dashboard, or send `Authorization: Bearer <service_role token>`",
            )
        })?;
        require_service(&caller)?;
        Ok(Operator)
    }
}

/// The dashboard; without a session, the sign-in form (401).
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses(
        (status = 200, description = "The dashboard", content_type = "text/html"),
        (status = 401, description = "The sign-in form", content_type = "text/html"),
        (status = 403, description = "Signed in with a token that is not service_role", content_type = "text/html"),
    ))]
pub async fn page(operator: Result<Operator, ApiError>) -> Response {
    match operator {
        Ok(Operator) => guarded(Html(PAGE).into_response()),
        Err(error) if error.status == StatusCode::FORBIDDEN => {
            login_form(StatusCode::FORBIDDEN, "That token is not a service_role token.")
        }
        Err(_) => login_form(StatusCode::UNAUTHORIZED, ""),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct SignIn {
    /// A service_role token, or the ops password.
    pub secret: String,
}

/// Sign in with a service_role token or the ops password: a session cookie and a redirect to the dashboard.
#[utoipa::path(post, path = "/dashboard/login", tag = "dashboard",
    request_body(content = SignIn, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Signed in: the session cookie is set"),
        (status = 401, description = "Neither the ops password nor a valid token", content_type = "text/html"),
        (status = 403, description = "A valid token that is not service_role", content_type = "text/html"),
        (status = 400, description = "A form without `secret`", body = ErrorBody),
        (status = 415, description = "Not a form", body = ErrorBody),
        (status = 429, description = "Too many failed sign-ins from this address", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    form: Result<axum::Form<SignIn>, axum::extract::rejection::FormRejection>,
) -> Response {
    if let Some(wait) = client.and_then(|ip| state.sign_ins.wait(ip)) {
        tracing::warn!(wait_s = wait.as_secs(), "dashboard sign-in refused: too many failures from this address");
        return guarded(
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManySignIns,
                "too many failed sign-ins from your address; wait for the Retry-After seconds",
            )
            .with_retry_after(wait)
            .into_response(),
        );
    }
    let secret = match form {
        Ok(axum::Form(form)) => form.secret,
        Err(rejection) => {
            // A form that is not one is 415; one that lacks `secret` is a
            // bad request (axum says 422, which clients rarely expect).
            let status = match rejection.status() {
                StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return ApiError::new(
                status,
                ErrorCode::InvalidForm,
                format!("{}: send secret=<token or password> as a form", rejection.body_text()),
            )
            .into_response();
        }
    };
    let secret = secret.trim();
    let by_password =
        state.settings.dashboard_password.as_deref().is_some_and(|password| same_secret(password, secret));
    let allowed = if by_password {
        Ok(())
    } else {
        match state.auth.verify(secret).await {
            Ok(caller) if caller.service => Ok(()),
            Ok(_) => Err((StatusCode::FORBIDDEN, "That token is not a service_role token.")),
            Err(_) => Err((StatusCode::UNAUTHORIZED, "Neither the ops password nor a valid service_role token.")),
        }
    };
    match allowed {
        Ok(()) => {
            if let Some(ip) = client {
                state.sign_ins.succeeded(ip);
            }
            let session = state.sessions.open();
            let secure = if state.settings.secure_cookies { "; Secure" } else { "" };
            let cookie = format!(
                "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
                SESSION_TTL.as_secs()
            );
            redirect_to_dashboard(&cookie)
        }
        Err((status, message)) => {
            if let Some(ip) = client {
                state.sign_ins.failed(ip);
            }
            tracing::warn!(status = status.as_u16(), "dashboard sign-in refused");
            login_form(status, message)
        }
    }
}

/// Sign out: the session ends and its cookie is cleared.
#[utoipa::path(post, path = "/dashboard/logout", tag = "dashboard",
    responses((status = 303, description = "Signed out")))]
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = session_of(&headers) {
        state.sessions.close(id);
    }
    redirect_to_dashboard(&format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"))
}

/// A job as operators see it: no input, no result, no user.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpsJobView {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub job_type: String,
    pub status: String,
    pub error: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub priority: i16,
    pub handler_version: Option<String>,
    pub worker_id: Option<String>,
    pub processing_time_ms: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub history: Vec<AttemptView>,
}

/// One job's timings, attempts and errors, for operators (never its input or result).
#[utoipa::path(get, path = "/dashboard/jobs/{id}", tag = "dashboard", security(("bearer" = [])),
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, body = OpsJobView),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ))]
pub async fn job(
    State(state): State<AppState>,
    _operator: Operator,
    Path(id): Path<String>,
) -> Result<axum::Json<OpsJobView>, ApiError> {
    let uuid = Uuid::parse_str(&id).map_err(|_| ApiError::job_not_found(&id))?;
    let store = state.queue.store();
    let job = store.get(uuid).await?.ok_or_else(|| ApiError::job_not_found(&id))?;
    let history = store.attempts(uuid).await?.into_iter().map(AttemptView::from).collect();
    Ok(axum::Json(OpsJobView {
        id: job.id,
        job_type: job.job_type,
        status: job.status.as_str().to_string(),
        error: job.error,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        priority: job.priority,
        handler_version: job.handler_version,
        worker_id: job.worker_id,
        processing_time_ms: job.processing_time_ms,
        created_at: job.created_at,
        started_at: job.started_at,
        completed_at: job.completed_at,
        history,
    }))
}

fn login_form(status: StatusCode, message: &'static str) -> Response {
    // `message` is one of this file's own sentences: nothing a caller sent.
    guarded((status, Html(LOGIN.replace("{{message}}", message))).into_response())
}

fn redirect_to_dashboard(cookie: &str) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/dashboard")]).into_response();
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    guarded(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts_with_cookie(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        headers
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(session_of(&parts_with_cookie("a=1; quern_dashboard=abc; b=2")), Some("abc"));
        assert_eq!(session_of(&parts_with_cookie("quern_dashboardx=abc")), None);
        assert_eq!(session_of(&parts_with_cookie("a=1")), None);
    }

    #[test]
    fn failed_sign_ins_wait_longer_and_longer() {
        let throttle = SignInThrottle::default();
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            throttle.failed(ip);
        }
        assert_eq!(throttle.wait(ip), None, "the first failures cost nothing");
        throttle.failed(ip);
        let first = throttle.wait(ip).unwrap();
        throttle.failed(ip);
        let second = throttle.wait(ip).unwrap();
        assert!(second > first, "{second:?} after {first:?}");
        assert_eq!(throttle.wait("203.0.113.8".parse().unwrap()), None, "another address is not held up");
        throttle.succeeded(ip);
        assert_eq!(throttle.wait(ip), None);
    }

    #[test]
    fn the_policy_names_each_inline_block_by_hash() {
        assert_eq!(inline_blocks(PAGE, "script").len(), 1);
        let policy = CONTENT_SECURITY_POLICY.to_str().unwrap();
        assert!(policy.contains("frame-ancestors 'none'") && policy.contains("script-src 'sha256-"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
    }

    #[test]
    fn sessions_open_and_close() {
        let sessions = Sessions::default();
        let id = sessions.open();
        assert_eq!(id.len(), 64);
        assert!(sessions.is_open(&id));
        assert!(!sessions.is_open("nope"));
        sessions.close(&id);
        assert!(!sessions.is_open(&id));
    }
}
