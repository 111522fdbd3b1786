//! Authentication: API bearer tokens, dashboard sessions, CSRF tokens and failed-login backoff.
//!
//! * API: `Authorization: Bearer gfa_…`; the SHA-256 of the full token string must be a stored
//!   API token hash ([`crate::store::Store::api_token_exists`]).
//! * Dashboard: a session cookie [`SESSION_COOKIE`] holding 32 random bytes (base64url); the store
//!   keeps only its SHA-256 ([`crate::store::SessionRecord`]) and a per-session CSRF token that every
//!   form carries in a hidden `csrf` field. The login form, which has no session yet, uses a
//!   double-submit cookie ([`LOGIN_CSRF_COOKIE`]).
//!
//! Token, cookie and password values are never logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::{AppError, HttpState, PageError};
use crate::store::SessionRecord;

/// Name of the dashboard session cookie.
pub const SESSION_COOKIE: &str = "gaffer_session";
/// Name of the login form's double-submit CSRF cookie.
pub const LOGIN_CSRF_COOKIE: &str = "gaffer_login_csrf";
/// How long a dashboard session lasts, milliseconds (12 h).
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// Longest accepted `Authorization` header or cookie value we hash, bytes.
const CREDENTIAL_BYTES_MAX: usize = 512;

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// 32 random bytes from the OS, base64url without padding (43 characters).
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Constant-time string equality (for CSRF tokens).
pub(crate) fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// An API request that presented a valid bearer token.
pub(crate) struct ApiCaller;

impl FromRequestParts<HttpState> for ApiCaller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, AppError> {
        let value = parts.headers.get(header::AUTHORIZATION).ok_or(AppError::Unauthorized)?;
        if value.len() > CREDENTIAL_BYTES_MAX {
            return Err(AppError::Unauthorized);
        }
        let value = value.to_str().map_err(|_| AppError::Unauthorized)?;
        let token = value.strip_prefix("Bearer ").map(str::trim).ok_or(AppError::Unauthorized)?;
        if token.is_empty() {
            return Err(AppError::Unauthorized);
        }
        if state.app.store.api_token_exists(&sha256(token.as_bytes()))? {
            Ok(ApiCaller)
        } else {
            Err(AppError::Unauthorized)
        }
    }
}

/// A dashboard request from a logged-in session. Without one, the request is redirected to
/// `/login` (303).
pub(crate) struct Session {
    pub(crate) record: SessionRecord,
}

impl FromRequestParts<HttpState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, Response> {
        let jar = CookieJar::from_headers(&parts.headers);
        let to_login = || Redirect::to("/login").into_response();
        let Some(cookie) = jar.get(SESSION_COOKIE) else {
            return Err(to_login());
        };
        if cookie.value().len() > CREDENTIAL_BYTES_MAX {
            return Err(to_login());
        }
        let id_hash = sha256(cookie.value().as_bytes());
        let record = state.app.store.get_session(&id_hash).map_err(|e| PageError::from(e).into_response())?;
        match record {
            Some(record) if record.expires_at_ms > crate::now_ms() => Ok(Session { record }),
            Some(_) => {
                state.app.store.delete_session(&id_hash).map_err(|e| PageError::from(e).into_response())?;
                Err(to_login())
            }
            None => Err(to_login()),
        }
    }
}

impl Session {
    /// Checks a submitted form's CSRF field against this session's token.
    pub(crate) fn check_csrf(&self, submitted: &str) -> Result<(), AppError> {
        if tokens_equal(submitted, &self.record.csrf_token) {
            Ok(())
        } else {
            Err(AppError::Forbidden(
                "the form's CSRF token does not match your session; reload the page and retry".into(),
            ))
        }
    }
}

/// The session cookie for a new session: HttpOnly, SameSite=Strict, Path=/, 12 h.
pub(crate) fn session_cookie(value: String) -> Cookie<'static> {
    Cookie::build((SESSION_COOKIE, value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(time::Duration::milliseconds(SESSION_TTL_MS as i64))
        .build()
}

/// The login form's double-submit CSRF cookie (short-lived, scoped to `/login`).
pub(crate) fn login_csrf_cookie(value: String) -> Cookie<'static> {
    Cookie::build((LOGIN_CSRF_COOKIE, value))
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/login")
        .max_age(time::Duration::hours(1))
        .build()
}

/// A cookie that removes `name` at `path`.
pub(crate) fn removal_cookie(name: &'static str, path: &'static str) -> Cookie<'static> {
    Cookie::build((name, ""))
        .path(path)
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(time::Duration::ZERO)
        .build()
}

/// Failed-login backoff, shared by all clients of this control plane (there is one admin account).
///
/// The first [`LoginThrottle::FREE_FAILURES`] consecutive failures cost nothing but a fixed delay
/// in the response; after that, logins are refused without checking the password for
/// 2^(failures − FREE_FAILURES) seconds, at most [`LoginThrottle::LOCKOUT_SECS_MAX`]. A successful
/// login resets it.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    consecutive_failures: u32,
    locked_until: Option<Instant>,
}

impl LoginThrottle {
    /// Consecutive failures allowed before lockouts start.
    pub const FREE_FAILURES: u32 = 5;
    /// Longest lockout, seconds.
    pub const LOCKOUT_SECS_MAX: u64 = 300;
    /// Delay added to every failed login response.
    pub const FAILURE_DELAY: Duration = Duration::from_millis(300);

    /// `Ok` if a login attempt may be checked now, else the seconds to wait.
    pub fn check(&self, now: Instant) -> Result<(), u64> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.locked_until {
            Some(until) if until > now => Err((until - now).as_secs().max(1)),
            _ => Ok(()),
        }
    }

    /// Records a failed login at `now`.
    pub fn failed(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        if state.consecutive_failures >= Self::FREE_FAILURES {
            let exp = (state.consecutive_failures - Self::FREE_FAILURES).min(16);
            let secs = (1u64 << exp).min(Self::LOCKOUT_SECS_MAX);
            state.locked_until = Some(now + Duration::from_secs(secs));
        }
    }

    /// Records a successful login: clears failures and any lockout.
    pub fn succeeded(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *state = ThrottleState::default();
    }
}

/// Response status for a failed login form (used by the dashboard to re-render the form).
pub(crate) const LOGIN_FAILED_STATUS: StatusCode = StatusCode::UNAUTHORIZED;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_locks_out_after_free_failures_and_resets_on_success() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..LoginThrottle::FREE_FAILURES - 1 {
            t.failed(now);
            assert_eq!(t.check(now), Ok(()));
        }
        t.failed(now);
        assert_eq!(t.check(now), Err(1));
        assert_eq!(t.check(now + Duration::from_secs(2)), Ok(()));
        t.failed(now);
        assert_eq!(t.check(now + Duration::from_millis(500)), Err(1));
        assert!(t.check(now + Duration::from_millis(1500)).is_err());
        for _ in 0..40 {
            t.failed(now);
        }
        assert_eq!(t.check(now), Err(LoginThrottle::LOCKOUT_SECS_MAX));
        t.succeeded();
        assert_eq!(t.check(now), Ok(()));
    }

    #[test]
    fn tokens_compare_by_value() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert!(tokens_equal(&a, &a.clone()));
        assert!(!tokens_equal(&a, &random_token()));
        assert!(!tokens_equal(&a, ""));
    }
}
