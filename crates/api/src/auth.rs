//! Who is calling: `Authorization: Bearer <JWT>` (or Supabase's `apikey`
//! header when there is no Authorization), verified with the HS256 secret
//! (`QUERN_JWT_SECRET`, Supabase's JWT secret) or the asymmetric keys of
//! `QUERN_JWKS_URL`. The user id is the token's `sub`, never a field of a
//! body; `role = service_role` sees and manages every job.
//! (Over 400 lines with its tests, which sit beside the rules they pin.)
//!
//! A token's algorithm picks the key family (HS256 → the secret, RS/ES/PS/
//! EdDSA → the JWKS key named by `kid`), so a token cannot make the host
//! verify an HMAC with a public key. `alg: none` does not parse; `exp` is
//! required and enforced.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, decode_header, encode};
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::ApiError;

/// The role that sees and manages every job (Supabase's name for it).
pub const SERVICE_ROLE: &str = "service_role";

/// How a token shows a premium plan: a claim path and the value it must hold,
/// written `app_metadata.plan=premium`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PremiumRule {
    pub path: Vec<String>,
    pub value: String,
}

impl PremiumRule {
    /// Parses `claim.path=value`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (path, value) = text.split_once('=').ok_or_else(|| {
            format!("`{text}` is not a premium rule: write it as claim.path=value, e.g. app_metadata.plan=premium")
        })?;
        let path: Vec<String> = path.trim().split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) || value.trim().is_empty() {
            return Err(format!(
                "`{text}` is not a premium rule: write it as claim.path=value, e.g. app_metadata.plan=premium"
            ));
        }
        Ok(Self { path, value: value.trim().to_string() })
    }
}

impl std::str::FromStr for PremiumRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl PremiumRule {
    fn holds(&self, claims: &Map<String, Value>) -> bool {
        let mut current = claims.get(&self.path[0]);
        for key in &self.path[1..] {
            current = current.and_then(|value| value.get(key));
        }
        current.and_then(Value::as_str) == Some(self.value.as_str())
    }
}

/// Where keys come from.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub hs256_secret: Option<Vec<u8>>,
    pub jwks_url: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    pub premium: PremiumRule,
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub` (`service_role` for a service token without one).
    pub user_id: String,
    pub service: bool,
    pub premium: bool,
}

impl Caller {
    /// Whether this caller may see and manage a job of `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.service || self.user_id == owner
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthError(String);

pub struct Auth {
    secret: Option<DecodingKey>,
    jwks: Option<Jwks>,
    audience: Option<String>,
    premium: PremiumRule,
}

impl Auth {
    pub fn new(settings: AuthSettings) -> Result<Self, reqwest::Error> {
        let jwks = match settings.jwks_url {
            Some(url) => Some(Jwks::new(url)?),
            None => None,
        };
        Ok(Self {
            secret: settings.hs256_secret.as_deref().map(DecodingKey::from_secret),
            jwks,
            audience: settings.audience,
            premium: settings.premium,
        })
    }

    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        self.verify_within(token, None).await
    }

    /// [`Auth::verify`], and the token must expire within `lifetime` of now:
    /// for a token sent in a URL, which proxies and histories may keep.
    pub async fn verify_short_lived(&self, token: &str, lifetime: Duration) -> Result<Caller, AuthError> {
        self.verify_within(token, Some(lifetime)).await
    }

    async fn verify_within(&self, token: &str, lifetime: Option<Duration>) -> Result<Caller, AuthError> {
        let header = decode_header(token).map_err(|e| AuthError(format!("malformed token: {}", describe(&e))))?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.clone().ok_or_else(|| {
                AuthError("HS256 tokens are not accepted here: QUERN_JWT_SECRET is not configured".into())
            })?,
            Algorithm::HS384 | Algorithm::HS512 => {
                return Err(AuthError(format!("algorithm {:?} is not accepted: use HS256 or a JWKS key", header.alg)));
            }
            alg => {
                let jwks = self.jwks.as_ref().ok_or_else(|| {
                    AuthError(format!("{alg:?} tokens are not accepted here: QUERN_JWKS_URL is not configured"))
                })?;
                jwks.key(header.kid.as_deref(), alg).await?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let claims = decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| AuthError(format!("invalid token: {}", describe(&e))))?
            .claims;
        if let Some(lifetime) = lifetime {
            let expires = claims.get("exp").and_then(Value::as_i64).unwrap_or(i64::MAX);
            let latest = jsonwebtoken::get_current_timestamp().saturating_add(lifetime.as_secs()) as i64;
            if expires > latest {
                return Err(AuthError(format!(
                    "a token in the URL must expire within {} s (it may be kept in logs and histories); \
                     use a fresh session token, or send it in the Authorization header",
                    lifetime.as_secs()
                )));
            }
        }
        let service = claims.get("role").and_then(Value::as_str) == Some(SERVICE_ROLE);
        let user_id = match claims.get("sub").and_then(Value::as_str) {
            // The owner of a service caller's own jobs: no user may be it.
            Some(SERVICE_ROLE) if !service => {
                return Err(AuthError(format!(
                    "the subject `{SERVICE_ROLE}` is reserved for service callers; a user token cannot have it"
                )));
            }
            Some(sub) if !sub.is_empty() => sub.to_string(),
            _ if service => SERVICE_ROLE.to_string(),
            _ => {
                return Err(AuthError(
                    "the token has no `sub`: sign in as a user (an anon key alone cannot own jobs)".into(),
                ));
            }
        };
        Ok(Caller { premium: service || self.premium.holds(&claims), user_id, service })
    }
}

fn describe(error: &jsonwebtoken::errors::Error) -> String {
    match error.kind() {
        ErrorKind::ExpiredSignature => "it has expired (`exp` is in the past); get a fresh token".into(),
        ErrorKind::InvalidSignature => "the signature does not verify; was it signed with this server's key?".into(),
        ErrorKind::InvalidAlgorithm => "its algorithm does not match the key".into(),
        ErrorKind::InvalidAudience => "its `aud` is not the one this server expects".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no `{claim}` claim"),
        ErrorKind::ImmatureSignature => "it is not valid yet (`nbf` is in the future)".into(),
        ErrorKind::InvalidToken => "it is not a JWT (three base64url parts separated by dots)".into(),
        _ => error.to_string(),
    }
}

/// Keys from a JWKS URL, cached by `kid` and fetched again when a token names
/// a key not seen yet (at most every 10 s, so bad tokens cannot hammer it).
struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: tokio::sync::RwLock<HashMap<String, JwkEntry>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Clone)]
struct JwkEntry {
    key: DecodingKey,
    /// The algorithm the key is published for, as its debug name (`RS256`).
    alg: Option<String>,
}

const JWKS_REFETCH: Duration = Duration::from_secs(10);

impl Jwks {
    fn new(url: String) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
        Ok(Self { url, client, keys: Default::default(), last_fetch: Default::default() })
    }

    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let kid = kid.ok_or_else(|| AuthError("the token has no `kid` header naming its signing key".into()))?;
        if let Some(entry) = self.keys.read().await.get(kid).cloned() {
            return check_alg(entry, alg);
        }
        self.refetch().await;
        match self.keys.read().await.get(kid).cloned() {
            Some(entry) => check_alg(entry, alg),
            None => Err(AuthError(format!("unknown signing key `{kid}`: it is not in the JWKS"))),
        }
    }

    async fn refetch(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < JWKS_REFETCH) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => *self.keys.write().await = keys,
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "could not fetch the JWKS; keeping the keys already known")
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, JwkEntry>, String> {
        let response = self.client.get(&self.url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("it answered {}", response.status()));
        }
        let bytes = response.bytes().await.map_err(|e| e.to_string())?;
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    let alg = jwk.common.key_algorithm.map(|alg| format!("{alg:?}"));
                    keys.insert(kid, JwkEntry { key, alg });
                }
                Err(error) => tracing::warn!(kid, %error, "skipping a JWKS key that does not load"),
            }
        }
        Ok(keys)
    }
}

fn check_alg(entry: JwkEntry, alg: Algorithm) -> Result<DecodingKey, AuthError> {
    match entry.alg {
        Some(published) if published != format!("{alg:?}") => {
            Err(AuthError(format!("the token says {alg:?} but its key is published for {published}")))
        }
        _ => Ok(entry.key),
    }
}

/// Mints an HS256 token (`quern token`, the first-start banner, tests).
pub fn mint(
    secret: &[u8],
    user: &str,
    service: bool,
    premium: Option<&PremiumRule>,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "sub": user,
        "role": if service { SERVICE_ROLE } else { "authenticated" },
        "aud": "authenticated",
        "iat": now,
        "exp": now + ttl.as_secs() as i64,
    });
    if let Some(rule) = premium {
        let mut at = &mut claims;
        for key in &rule.path {
            at = &mut at[key.as_str()];
        }
        *at = Value::String(rule.value.clone());
    }
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
}

/// The token of a request: `Authorization: Bearer …`, else Supabase's `apikey`.
fn token_of(parts: &Parts) -> Option<&str> {
    if let Some(value) = parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then_some(token.trim());
    }
    parts.headers.get("apikey").and_then(|v| v.to_str().ok()).map(str::trim)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = token_of(parts).filter(|t| !t.is_empty()).ok_or_else(|| {
            ApiError::unauthorized(
                "missing credentials: send `Authorization: Bearer <JWT>` (e.g. from `quern token --user <id>`)",
            )
        })?;
        state.auth.verify(token).await.map_err(|error| ApiError::unauthorized(error.to_string()))
    }
}

/// The caller of an event stream: the `Authorization` header as anywhere
/// else, or, for a browser's `EventSource` (which cannot send headers), a
/// short-lived token in `?access_token=`.
pub struct StreamCaller(pub Caller);

/// The longest a token sent in `?access_token=` may still be valid for:
/// Supabase's session tokens last an hour.
pub const URL_TOKEN_LIFETIME: Duration = Duration::from_secs(3600 + 60);

#[derive(serde::Deserialize)]
struct UrlToken {
    access_token: Option<String>,
}

impl FromRequestParts<AppState> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if token_of(parts).is_some() {
            return Caller::from_request_parts(parts, state).await.map(StreamCaller);
        }
        let token = axum::extract::Query::<UrlToken>::try_from_uri(&parts.uri)
            .ok()
            .and_then(|query| query.0.access_token)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "missing credentials: send `Authorization: Bearer <JWT>`, or from a browser's EventSource \
                     `?access_token=<session JWT>`",
                )
            })?;
        let caller = state.auth.verify_short_lived(&token, URL_TOKEN_LIFETIME).await;
        caller.map(StreamCaller).map_err(|error| ApiError::unauthorized(error.to_string()))
    }
}

/// Only the service role passes.
pub fn require_service(caller: &Caller) -> Result<(), ApiError> {
    if caller.service { Ok(()) } else { Err(ApiError::forbidden("this needs a service_role token")) }
}

/// Compares in constant time, digests of equal length, so the comparison's
/// time says nothing about the secret.
pub fn same_secret(expected: &str, given: &str) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    sha2::Sha256::digest(expected.as_bytes()).ct_eq(&sha2::Sha256::digest(given.as_bytes())).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> PremiumRule {
        PremiumRule::parse("app_metadata.plan=premium").unwrap()
    }

    fn auth(secret: &[u8]) -> Auth {
        Auth::new(AuthSettings { hs256_secret: Some(secret.to_vec()), jwks_url: None, audience: None, premium: rule() })
            .unwrap()
    }

    #[tokio::test]
    async fn a_minted_token_verifies_with_its_claims() {
        let token = mint(b"s3cret", "u1", false, Some(&rule()), Duration::from_secs(60)).unwrap();
        let caller = auth(b"s3cret").verify(&token).await.unwrap();
        assert_eq!(caller, Caller { user_id: "u1".into(), service: false, premium: true });
        let plain = mint(b"s3cret", "u2", false, None, Duration::from_secs(60)).unwrap();
        assert!(!auth(b"s3cret").verify(&plain).await.unwrap().premium);
    }

    #[tokio::test]
    async fn another_key_or_no_signature_is_refused() {
        let token = mint(b"other", "u1", false, None, Duration::from_secs(60)).unwrap();
        let error = auth(b"s3cret").verify(&token).await.unwrap_err().to_string();
        assert!(error.contains("signature"), "{error}");
        let unsigned = format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            base64_url(r#"{"sub":"u1","exp":9999999999}"#)
        );
        let error = auth(b"s3cret").verify(&unsigned).await.unwrap_err().to_string();
        assert!(error.contains("malformed token"), "{error}");
    }

    fn signed(claims: Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"s3cret")).unwrap()
    }

    #[tokio::test]
    async fn a_token_not_valid_yet_is_refused() {
        let now = chrono::Utc::now().timestamp();
        let early = signed(json!({"sub": "u1", "exp": now + 7200, "nbf": now + 3600}));
        let error = auth(b"s3cret").verify(&early).await.unwrap_err().to_string();
        assert!(error.contains("not valid yet"), "{error}");
        let due = signed(json!({"sub": "u1", "exp": now + 7200, "nbf": now - 10}));
        assert_eq!(auth(b"s3cret").verify(&due).await.unwrap().user_id, "u1");
    }

    #[tokio::test]
    async fn no_user_token_owns_the_service_callers_jobs() {
        let now = chrono::Utc::now().timestamp();
        let service = signed(json!({"role": "service_role", "exp": now + 60}));
        assert_eq!(auth(b"s3cret").verify(&service).await.unwrap().user_id, SERVICE_ROLE);
        let impostor = signed(json!({"sub": "service_role", "role": "authenticated", "exp": now + 60}));
        let error = auth(b"s3cret").verify(&impostor).await.unwrap_err().to_string();
        assert!(error.contains("reserved for service callers"), "{error}");
    }

    #[test]
    fn premium_rules_parse_and_name_their_mistakes() {
        assert_eq!(rule().path, ["app_metadata", "plan"]);
        assert!(PremiumRule::parse("plan").unwrap_err().contains("claim.path=value"));
        assert!(PremiumRule::parse("a..b=x").is_err());
    }

    fn base64_url(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }
}
