//! One URL for the whole app: what quern does not serve itself goes to the
//! customer's Supabase project at `SUPABASE_URL`, so the app changes its
//! Supabase URL and nothing else. The hook uses one client for
//! `functions.invoke` and for `.from('analysis_jobs').update(…)` (its
//! cancel); sign-in, storage and Realtime go through the same client.
//!
//! - `/functions/v1/<name>` that quern does not answer (functions.rs);
//! - `/rest/v1/*` (PostgREST), `/auth/v1/*` (GoTrue), `/storage/v1/*`;
//! - `/realtime/v1/*`, its websocket included: the upgrade is relayed and the
//!   two sockets joined byte for byte.
//!
//! One rule for all: the request's method, path under the prefix, query and
//! body go on (a body sent with its length keeps it, not re-framed as
//! chunked); of its headers only those the API reads (authorization, apikey,
//! x-client-info, content-type and the API's own, below), and the client's
//! address as quern judged it in `X-Forwarded-For`; the answer comes back
//! minus hop-by-hop, CORS and origin-changing headers (cookies, HSTS), and
//! inert (a sandbox CSP, nosniff): quern's origin is also the dashboard's.
//! No redirect is followed, so the configured host is the only one ever
//! contacted.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use hyper_util::rt::TokioIo;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::limits::ClientIp;

/// The request headers every API reads.
const PASSED_ON: [&str; 5] = ["authorization", "apikey", "x-client-info", "content-type", "accept"];

/// Connection-level headers, which belong to one hop and are never relayed.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The Supabase APIs passed through, each with the headers of its own that
/// its clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Functions,
    Rest,
    Auth,
    Storage,
    Realtime,
}

impl Api {
    pub const ALL: [Api; 5] = [Api::Functions, Api::Rest, Api::Auth, Api::Storage, Api::Realtime];

    /// `/rest/v1`, …: the path prefix on both sides.
    pub fn prefix(self) -> &'static str {
        match self {
            Api::Functions => "/functions/v1",
            Api::Rest => "/rest/v1",
            Api::Auth => "/auth/v1",
            Api::Storage => "/storage/v1",
            Api::Realtime => "/realtime/v1",
        }
    }

    /// Headers this API reads beyond [`PASSED_ON`].
    fn own_headers(self) -> &'static [&'static str] {
        match self {
            Api::Functions => &[],
            // PostgREST: the representation asked for, ranges, the schema.
            Api::Rest => &["prefer", "range", "range-unit", "accept-profile", "content-profile"],
            Api::Auth => &["x-supabase-api-version"],
            Api::Storage => &["x-upsert", "cache-control", "x-metadata"],
            Api::Realtime => {
                &["sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol", "sec-websocket-extensions"]
            }
        }
    }

    /// Every header a browser may send to some API (for CORS).
    pub fn browser_headers() -> impl Iterator<Item = &'static str> {
        Self::ALL.into_iter().filter(|api| *api != Api::Realtime).flat_map(|api| api.own_headers().iter().copied())
    }
}

/// Whether a path is one of the passed-through APIs (CORS answers for them).
pub fn is_supabase_path(path: &str) -> bool {
    Api::ALL.iter().any(|api| path.strip_prefix(api.prefix()).is_some_and(|rest| rest.starts_with('/')))
}

/// The client that reaches the customer's project: no redirects followed,
/// so no host but the configured one is ever contacted; HTTP/1.1 only, so
/// a websocket upgrade can be relayed.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .read_timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .http1_only()
        .build()
        .expect("a TLS backend is compiled in")
}

/// `ANY /rest/v1/{*path}`, `/auth/v1/…`, `/storage/v1/…`, `/realtime/v1/…`.
pub async fn serve(State(state): State<AppState>, client: ClientIp, request: Request) -> Result<Response, ApiError> {
    let path = request.uri().path().to_string();
    let api = Api::ALL
        .into_iter()
        .find(|api| path.starts_with(&format!("{}/", api.prefix())))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NoRoute, "no such API"))?;
    let rest = &path[api.prefix().len() + 1..];
    forward(&state, api, rest, None, &client, request).await
}

/// Streams the request to the customer's project and its answer back;
/// `extra` names one more header to pass on (a webhook's proof).
pub async fn forward(
    state: &AppState,
    api: Api,
    path: &str,
    extra: Option<&str>,
    client: &ClientIp,
    mut request: Request,
) -> Result<Response, ApiError> {
    let Some(upstream) = &state.settings.functions_upstream else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NoFunction,
            format!(
                "quern does not serve {}/{path}: set SUPABASE_URL to pass what it does not serve through to your \
                 Supabase project",
                api.prefix()
            ),
        ));
    };
    let mut url = upstream.clone();
    url.set_path(&format!("{}{}/{path}", upstream.path().trim_end_matches('/'), api.prefix()));
    url.set_query(request.uri().query());
    let method = reqwest::Method::from_bytes(request.method().as_str().as_bytes())
        .map_err(|_| ApiError::bad_request(ErrorCode::InvalidMethod, "an unknown HTTP method"))?;
    let mut outgoing = state.functions.request(method, url.clone());
    for name in PASSED_ON.iter().chain(api.own_headers()).copied().chain(extra) {
        for value in request.headers().get_all(name) {
            outgoing = outgoing.header(name, value.as_bytes());
        }
    }
    // The client's address as quern judged it (its trusted proxies
    // considered), never what the client wrote itself.
    if let ClientIp(Some(address)) = client {
        outgoing = outgoing.header("x-forwarded-for", address.to_string());
    }
    let upgrade = (api == Api::Realtime && wants_websocket(request.headers()))
        .then(|| request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten();
    if upgrade.is_some() {
        outgoing = outgoing.header(CONNECTION, "upgrade").header(UPGRADE, "websocket");
    } else {
        // A body sent with its length goes on with it (hyper already holds
        // the incoming body to that length), not re-framed as chunked.
        let length = request.headers().get(CONTENT_LENGTH).cloned();
        if let Some(length) = &length {
            outgoing = outgoing.header(CONTENT_LENGTH, length.as_bytes());
        }
        // A request without a body (a GET, a DELETE) is sent without one.
        if length.is_some() || request.headers().contains_key(TRANSFER_ENCODING) {
            outgoing = outgoing.body(reqwest::Body::wrap_stream(request.into_body().into_data_stream()));
        }
    }
    let host = url.host_str().unwrap_or_default().to_string();
    let shown = format!("{}/{path}", api.prefix());
    let answer = tokio::time::timeout(state.settings.functions_timeout, outgoing.send())
        .await
        .map_err(|_| unanswered(&host, &shown, true, "timed out"))?
        .map_err(|error| unanswered(&host, &shown, error.is_timeout(), &error.to_string()))?;
    let status = answer.status().as_u16();
    let mut response = Response::builder().status(status);
    if let Some(headers) = response.headers_mut() {
        relay_headers(answer.headers(), headers);
    }
    match upgrade {
        Some(client) if status == 101 => {
            let response = response
                .header(CONNECTION, "upgrade")
                .header(UPGRADE, "websocket")
                .body(Body::empty())
                .map_err(|error| unreadable(&error.to_string()))?;
            let upstream = answer.upgrade().await.map_err(|error| unreadable(&error.to_string()))?;
            tokio::spawn(join(client, upstream, shown));
            Ok(response)
        }
        _ => response.body(Body::from_stream(answer.bytes_stream())).map_err(|error| unreadable(&error.to_string())),
    }
}

/// Relays bytes both ways until either side closes.
async fn join(client: hyper::upgrade::OnUpgrade, mut upstream: reqwest::Upgraded, path: String) {
    let mut client = match client.await {
        Ok(client) => TokioIo::new(client),
        Err(error) => {
            tracing::debug!(%error, path, "a websocket client left before its upgrade");
            return;
        }
    };
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, path, "a passed-through websocket ended with an error");
    }
}

/// `Connection: upgrade` with `Upgrade: websocket`.
fn wants_websocket(headers: &HeaderMap) -> bool {
    let has = |name: HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .any(|value| value.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
    };
    has(CONNECTION, "upgrade") && has(UPGRADE, "websocket")
}

fn unanswered(host: &str, path: &str, timed_out: bool, error: &str) -> ApiError {
    let (status, code, what) = if timed_out {
        (StatusCode::GATEWAY_TIMEOUT, ErrorCode::FunctionTimeout, "timed out")
    } else {
        (StatusCode::BAD_GATEWAY, ErrorCode::FunctionUnreachable, "could not be reached")
    };
    tracing::warn!(%host, path, error, "a passed-through call did not answer");
    let subject = match path.strip_prefix("/functions/v1/") {
        Some(function) => format!("the Supabase function {function}"),
        None => format!("Supabase's {path}"),
    };
    ApiError::new(status, code, format!("{subject} at {host} did not answer ({what}); try again"))
}

fn unreadable(error: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::FunctionUnreadable, error.to_string())
}

/// Answer headers never relayed: they would act on quern's own origin (the
/// dashboard's session cookie, its HSTS), or quern sets them itself.
const NOT_RELAYED: [&str; 5] =
    ["set-cookie", "set-cookie2", "strict-transport-security", "content-security-policy", "x-content-type-options"];

/// The upstream's answer headers minus hop-by-hop ones (and those its
/// `Connection` names), its CORS headers (quern answers CORS itself) and
/// [`NOT_RELAYED`]. Whatever the upstream serves is then inert on quern's
/// origin, which the dashboard shares: a sandbox CSP (an HTML or SVG page
/// runs no script and has no origin) and `nosniff`.
fn relay_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap) {
    let listed: Vec<String> = from
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(',').map(|name| name.trim().to_ascii_lowercase()))
        .collect();
    for (name, value) in from {
        let name = name.as_str();
        if HOP_BY_HOP.contains(&name)
            || NOT_RELAYED.contains(&name)
            || listed.iter().any(|listed| listed == name)
            || name.starts_with("access-control-")
        {
            continue;
        }
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
        {
            to.append(name, value);
        }
    }
    to.insert(HeaderName::from_static("content-security-policy"), HeaderValue::from_static("sandbox"));
    to.insert(HeaderName::from_static("x-content-type-options"), HeaderValue::from_static("nosniff"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apis_paths_pass() {
        for path in ["/rest/v1/analysis_jobs", "/auth/v1/token", "/storage/v1/object/a/b", "/realtime/v1/websocket"] {
            assert!(is_supabase_path(path), "{path}");
        }
        for path in ["/rest/v1", "/rest/v2/x", "/v1/jobs", "/restv1/x"] {
            assert!(!is_supabase_path(path), "{path}");
        }
    }
}
