//! Authentication and authorization: who a request is (API bearer token or dashboard session),
//! what it may do ([`Permission`], checked for every route by [`authorize`] from the one route
//! table [`super::ROUTES`]), CSRF tokens, and login throttling with bounded password checks.
//!
//! * API: `Authorization: Bearer gfa_…`; the SHA-256 of the full token string must be a stored,
//!   unexpired API token ([`crate::store::Store::api_token`]). The token's name and role become the
//!   request's [`ApiCaller`]. No credentials (or a revoked or expired token): 401; a role below the
//!   route's permission: 403.
//! * Dashboard: a session cookie ([`SESSION_COOKIE`], under TLS [`SESSION_COOKIE_TLS`]) holding 32
//!   random bytes (base64url); the store keeps only its SHA-256 ([`crate::store::SessionRecord`]),
//!   the user and the per-session CSRF token that every form carries in a hidden `csrf` field. A
//!   session is valid while it has not expired, its user exists and the user's password has not
//!   changed since it was created. Without one: 303 to `/login`; with a role below the route's
//!   permission: a 403 page. The login form, which has no session yet, uses a double-submit cookie
//!   ([`LOGIN_CSRF_COOKIE`]).
//! * Logins are throttled per client address and per user name ([`LoginThrottle`]), and argon2
//!   verifications run at most [`PasswordChecks::CONCURRENCY_MAX`] at a time on the blocking pool
//!   ([`PasswordChecks`]); unknown user names are verified against a dummy hash, so they cost the
//!   same as known ones.
//!
//! Token, cookie and password values are never logged.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::tls::HttpSecurity;
use super::{AppError, HttpState, PageError, RouteSpec};
use crate::store::{Actor, Role, SessionRecord, UserRecord};

/// Name of the dashboard session cookie.
pub const SESSION_COOKIE: &str = "gaffer_session";
/// Name of the login form's double-submit CSRF cookie.
pub const LOGIN_CSRF_COOKIE: &str = "gaffer_login_csrf";
/// Name of the session cookie under HTTPS: the `__Host-` prefix makes browsers insist on Secure,
/// Path=/ and no Domain, so no other host or plain-HTTP page can set or shadow it.
pub const SESSION_COOKIE_TLS: &str = "__Host-gaffer_session";
/// Name of the login CSRF cookie under HTTPS (`__Secure-`: it has Path=/login, which `__Host-`
/// does not allow).
pub const LOGIN_CSRF_COOKIE_TLS: &str = "__Secure-gaffer_login_csrf";
/// How long a dashboard session lasts, milliseconds (12 h).
pub const SESSION_TTL_MS: u64 = 12 * 3600 * 1000;
/// Longest accepted `Authorization` header or cookie value we hash, bytes.
const CREDENTIAL_BYTES_MAX: usize = 512;
/// An API token's `last_used_at_ms` is written at most this often, ms (1 min).
const TOKEN_TOUCH_INTERVAL_MS: u64 = 60_000;

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

/// What a request may do. Each route of [`super::ROUTES`] names one; a role holds a permission
/// when it is at least the permission's [`Permission::min_role`].
///
/// | permission | lowest role |
/// |---|---|
/// | `ViewFleet` (dashboard pages, `GET` API, log out) | viewer |
/// | `OperateJobs` (submit, cancel, retry), `DrainAgents` | operator |
/// | `RevokeAgents`, `ManageUsers`, `ManageApiTokens`, `ManageReleases`, `ManageCa`, `ReadAudit` | admin |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read the fleet, agents, jobs and digests. Every role holds it, so it also means "signed in".
    ViewFleet,
    /// Submit, cancel and retry jobs.
    OperateJobs,
    /// Drain agents (they finish what they run and take no new jobs).
    DrainAgents,
    /// Revoke agents.
    RevokeAgents,
    /// Add, remove and re-password users.
    ManageUsers,
    /// Mint, list and revoke API tokens.
    ManageApiTokens,
    /// Upload releases and run rollouts.
    ManageReleases,
    /// Rotate the fleet CA.
    ManageCa,
    /// Read the audit log (it names every user, token and address that logged in).
    ReadAudit,
    /// See, add, remove and test webhook and email targets (they say where fleet events go).
    ManageWebhooks,
}

impl Permission {
    /// The lowest role holding this permission.
    pub const fn min_role(self) -> Role {
        match self {
            Permission::ViewFleet => Role::Viewer,
            Permission::OperateJobs | Permission::DrainAgents => Role::Operator,
            Permission::RevokeAgents
            | Permission::ManageUsers
            | Permission::ManageApiTokens
            | Permission::ManageReleases
            | Permission::ManageCa
            | Permission::ReadAudit
            | Permission::ManageWebhooks => Role::Admin,
        }
    }

    /// Whether `role` holds this permission.
    pub fn granted_to(self, role: Role) -> bool {
        role >= self.min_role()
    }

    /// What it allows, for messages ("operating jobs").
    pub fn describe(self) -> &'static str {
        match self {
            Permission::ViewFleet => "viewing the fleet",
            Permission::OperateJobs => "submitting, cancelling and retrying jobs",
            Permission::DrainAgents => "draining agents",
            Permission::RevokeAgents => "revoking agents",
            Permission::ManageUsers => "managing users",
            Permission::ManageApiTokens => "managing API tokens",
            Permission::ManageReleases => "managing releases",
            Permission::ManageCa => "rotating the CA",
            Permission::ReadAudit => "reading the audit log",
            Permission::ManageWebhooks => "managing webhooks",
        }
    }
}

/// Who may use a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials (`/login`, `/metrics`, the stylesheet).
    Public,
    /// A caller (API token or session, by the route's surface) whose role holds the permission.
    Permission(Permission),
}

/// An API request's caller: a valid, unexpired bearer token whose role holds the route's
/// permission. Put in the request by [`authorize`]; a handler of a route without it gets a 500.
#[derive(Debug, Clone)]
pub(crate) struct ApiCaller {
    /// The token's name.
    pub(crate) name: String,
    /// The token's role.
    pub(crate) role: Role,
}

impl ApiCaller {
    /// The audit actor (`token:NAME`).
    pub(crate) fn actor(&self) -> String {
        Actor::ApiToken(self.name.clone()).to_string()
    }

    /// The token as an audit [`Actor`].
    pub(crate) fn audit_actor(&self) -> Actor {
        Actor::ApiToken(self.name.clone())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ApiCaller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        parts
            .extensions
            .get::<ApiCaller>()
            .cloned()
            .ok_or_else(|| AppError::Internal(format!("route {} has no authorization layer", parts.uri.path())))
    }
}

/// A dashboard request from a valid session whose user's role holds the route's permission. Put
/// in the request by [`authorize`].
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) record: SessionRecord,
    /// The user, as stored now.
    pub(crate) user: UserRecord,
    /// This browser lets the live pages reload themselves ([`super::refresh`]).
    pub(crate) auto_refresh: bool,
    /// Path and query of the request (for links back to this page).
    pub(crate) here: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, PageError> {
        parts.extensions.get::<Session>().cloned().ok_or_else(|| {
            PageError(AppError::Internal(format!("route {} has no authorization layer", parts.uri.path())))
        })
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

    /// The user's current role.
    pub(crate) fn role(&self) -> Role {
        self.user.role
    }

    /// The audit actor (the user name).
    pub(crate) fn actor(&self) -> String {
        Actor::User(self.user.name.clone()).to_string()
    }

    /// The signed-in user as an audit [`Actor`].
    pub(crate) fn audit_actor(&self) -> Actor {
        Actor::User(self.user.name.clone())
    }
}

/// The client's address: the TCP peer of the connection (`ConnectInfo<SocketAddr>`, which
/// `into_make_service_with_connect_info::<SocketAddr>()` provides). Without it the request fails
/// with a 500 rather than throttle every client as one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientAddr(pub(crate) IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, PageError> {
        match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => Ok(ClientAddr(addr.ip().to_canonical())),
            None => Err(PageError(AppError::Internal(
                "the HTTP server passes no client address (serve the router with \
                 into_make_service_with_connect_info::<SocketAddr>())"
                    .into(),
            ))),
        }
    }
}

/// The bearer token of `headers`, if any (bounded in size).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?;
    if value.len() > CREDENTIAL_BYTES_MAX {
        return None;
    }
    let token = value.to_str().ok()?.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

/// The API caller of `headers`: `None` without a bearer token, or with one that is unknown,
/// revoked or expired.
fn api_caller(state: &HttpState, headers: &HeaderMap) -> Result<Option<ApiCaller>, AppError> {
    let Some(token) = bearer(headers) else {
        return Ok(None);
    };
    let hash = sha256(token.as_bytes());
    let store = state.app.store.as_ref();
    let Some(rec) = store.api_token(&hash)? else {
        return Ok(None);
    };
    let now = crate::now_ms();
    if rec.expires_at_ms <= now {
        tracing::info!(token = %rec.name, "API request with an expired token refused");
        return Ok(None);
    }
    if rec.last_used_at_ms.is_none_or(|t| now.saturating_sub(t) >= TOKEN_TOUCH_INTERVAL_MS) {
        store.touch_api_token(&hash, now)?;
    }
    Ok(Some(ApiCaller { name: rec.name, role: rec.role }))
}

/// The session of `headers`: `None` without a session cookie, or with one that is unknown,
/// expired, or whose user is gone or has changed password (those are deleted).
fn session_of(state: &HttpState, headers: &HeaderMap) -> Result<Option<Session>, AppError> {
    let jar = CookieJar::from_headers(headers);
    let Some(cookie) = jar.get(state.security.session_cookie_name()) else {
        return Ok(None);
    };
    if cookie.value().len() > CREDENTIAL_BYTES_MAX {
        return Ok(None);
    }
    let id_hash = sha256(cookie.value().as_bytes());
    let store = state.app.store.as_ref();
    let Some(record) = store.get_session(&id_hash)? else {
        return Ok(None);
    };
    let user = if record.expires_at_ms > crate::now_ms() { store.get_user(&record.user)? } else { None };
    match user {
        Some(user) if user.password_changed_at_ms == record.password_changed_at_ms => {
            Ok(Some(Session { record, user, auto_refresh: true, here: "/".into() }))
        }
        _ => {
            store.delete_session(&id_hash)?;
            Ok(None)
        }
    }
}

/// The authorization layer of every route ([`super::router_with`] puts it on each entry of
/// [`super::ROUTES`]): public routes pass; others need a caller whose role holds the route's
/// permission. API (`/api/…`): no valid token 401, role too low 403 (JSON). Dashboard: no valid
/// session 303 to `/login`, role too low a 403 page. The caller ([`ApiCaller`] or [`Session`])
/// goes into the request's extensions for the handler.
pub(crate) async fn authorize(state: HttpState, spec: &'static RouteSpec, mut req: Request, next: Next) -> Response {
    let Access::Permission(permission) = spec.access else {
        return next.run(req).await;
    };
    let refused = |role: Role, who: String| {
        format!(
            "{who} has role {role}; {} needs role {} or above (ask an admin)",
            permission.describe(),
            permission.min_role()
        )
    };
    if spec.is_api() {
        match api_caller(&state, req.headers()) {
            Ok(Some(caller)) if permission.granted_to(caller.role) => {
                req.extensions_mut().insert(caller);
                next.run(req).await
            }
            Ok(Some(caller)) => {
                AppError::Forbidden(refused(caller.role, format!("API token {:?}", caller.name))).into_response()
            }
            Ok(None) => AppError::Unauthorized.into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        match session_of(&state, req.headers()) {
            Ok(Some(mut session)) if permission.granted_to(session.role()) => {
                session.auto_refresh = super::refresh::auto_refresh(req.headers());
                session.here = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
                req.extensions_mut().insert(session);
                next.run(req).await
            }
            Ok(Some(session)) => {
                PageError(AppError::Forbidden(refused(session.role(), format!("user {:?}", session.user.name))))
                    .into_response()
            }
            Ok(None) => Redirect::to("/login").into_response(),
            Err(e) => PageError(e).into_response(),
        }
    }
}

/// The session cookie for a new session: HttpOnly, SameSite=Strict, Path=/, 12 h; under TLS
/// also Secure and named [`SESSION_COOKIE_TLS`].
pub(crate) fn session_cookie(security: &HttpSecurity, value: String) -> Cookie<'static> {
    Cookie::build((security.session_cookie_name(), value))
        .secure(security.tls)
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(time::Duration::milliseconds(SESSION_TTL_MS as i64))
        .build()
}

/// The login form's double-submit CSRF cookie (short-lived, scoped to `/login`); under TLS also
/// Secure and named [`LOGIN_CSRF_COOKIE_TLS`].
pub(crate) fn login_csrf_cookie(security: &HttpSecurity, value: String) -> Cookie<'static> {
    Cookie::build((security.login_csrf_cookie_name(), value))
        .secure(security.tls)
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/login")
        .max_age(time::Duration::hours(1))
        .build()
}

/// A cookie that removes `name` at `path` (Secure under TLS, which `__Host-`/`__Secure-` names
/// need even to be removed).
pub(crate) fn removal_cookie(security: &HttpSecurity, name: &'static str, path: &'static str) -> Cookie<'static> {
    Cookie::build((name, ""))
        .secure(security.tls)
        .path(path)
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(time::Duration::ZERO)
        .build()
}

/// Why [`LoginThrottle::begin`] refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// Seconds until an attempt may be made (≥ 1).
    pub wait_secs: u64,
    /// Which limit: the client address's, or the user name's.
    pub by: ThrottledBy,
}

/// Which limit refused a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottledBy {
    /// Too many failures from this client address (IPv6: its /64).
    Address,
    /// Too many failures for this user name, from addresses it never logged in from.
    User,
}

/// Failures of one key (an address or a user name).
#[derive(Debug, Clone, Copy)]
struct Strikes {
    failures: u32,
    locked_until: Option<Instant>,
    last_at: Instant,
}

impl Strikes {
    /// When this entry may be forgotten: after the lockout and [`LoginThrottle::FORGET_AFTER`]
    /// without a failure.
    fn forget_at(&self) -> Instant {
        let quiet = self.last_at + LoginThrottle::FORGET_AFTER;
        self.locked_until.map_or(quiet, |l| l.max(quiet))
    }
}

/// Failed-login back-off per client address and per user name; never global.
///
/// Every attempt that is let through counts as a failure *before* its password is checked (so a
/// parallel burst is counted in full); [`LoginThrottle::succeeded`] clears the address's and the
/// user's count. An address may fail [`LoginThrottle::ADDRESS_FREE_FAILURES`] times, a user name
/// [`LoginThrottle::USER_FREE_FAILURES`] times; each further failure locks that key for twice as
/// long as the one before (1 s, 2 s, 4 s, … at most [`LoginThrottle::LOCKOUT_SECS_MAX`]), and
/// attempts while it is locked are refused without a password check. A key is forgotten
/// [`LoginThrottle::FORGET_AFTER`] after its last failure.
///
/// A locked user name does not lock out the addresses that user logged in from before (the last
/// [`LoginThrottle::KNOWN_ADDRESSES_MAX`] such pairs, for [`LoginThrottle::KNOWN_ADDRESS_TTL`]):
/// someone guessing a user's password from elsewhere cannot keep the user out. A locked address
/// locks out nobody else.
///
/// Memory is bounded: at most [`LoginThrottle::ENTRIES_MAX`] addresses and as many user names
/// (then the entry closest to being forgotten goes first), and the known pairs above. IPv6
/// addresses count by their /64 (one host usually holds the whole prefix).
///
/// Times are passed in (`now`), so tests drive it with their own clock.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    by_address: HashMap<IpAddr, Strikes>,
    by_user: HashMap<String, Strikes>,
    /// (user, address) pairs that logged in, with when.
    known: HashMap<(String, IpAddr), Instant>,
}

/// `map[key]`, made room for if `map` is full (forgettable entries dropped; if none, the one
/// closest to being forgotten), reset if it was forgettable.
fn strikes_entry<'m, K: Hash + Eq + Clone>(map: &'m mut HashMap<K, Strikes>, key: &K, now: Instant) -> &'m mut Strikes {
    if !map.contains_key(key) && map.len() >= LoginThrottle::ENTRIES_MAX {
        map.retain(|_, s| s.forget_at() > now);
        if map.len() >= LoginThrottle::ENTRIES_MAX {
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.forget_at()).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
    }
    let entry = map.entry(key.clone()).or_insert(Strikes { failures: 0, locked_until: None, last_at: now });
    if entry.forget_at() <= now {
        *entry = Strikes { failures: 0, locked_until: None, last_at: now };
    }
    entry
}

/// Seconds left of `s`'s lockout at `now`, if locked.
fn locked_secs(s: Option<&Strikes>, now: Instant) -> Option<u64> {
    let until = s?.locked_until?;
    (until > now).then(|| (until - now).as_secs_f64().ceil().max(1.0) as u64)
}

/// Counts one more failure of `s` at `now`, locking it past `free` failures.
fn strike(s: &mut Strikes, free: u32, now: Instant) {
    s.failures = s.failures.saturating_add(1);
    s.last_at = now;
    if s.failures >= free {
        let exp = (s.failures - free).min(16);
        let secs = (1u64 << exp).min(LoginThrottle::LOCKOUT_SECS_MAX);
        s.locked_until = Some(now + Duration::from_secs(secs));
    }
}

impl LoginThrottle {
    /// Failures an address may have before lockouts start.
    pub const ADDRESS_FREE_FAILURES: u32 = 5;
    /// Failures a user name may have (from addresses it never logged in from) before lockouts start.
    pub const USER_FREE_FAILURES: u32 = 10;
    /// Longest lockout, seconds.
    pub const LOCKOUT_SECS_MAX: u64 = 300;
    /// A key without a failure for this long (and not locked) is forgotten.
    pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
    /// Most addresses, and most user names, tracked.
    pub const ENTRIES_MAX: usize = 10_000;
    /// Most (user, address) pairs remembered as having logged in.
    pub const KNOWN_ADDRESSES_MAX: usize = 10_000;
    /// How long a (user, address) pair that logged in is remembered.
    pub const KNOWN_ADDRESS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
    /// Delay added to every failed login response.
    pub const FAILURE_DELAY: Duration = Duration::from_millis(300);

    /// The throttle key of an address: IPv4 as is, IPv6 by its /64.
    fn address_key(addr: IpAddr) -> IpAddr {
        match addr.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        }
    }

    /// The throttle key of a user name: at most 64 bytes of it, lowercased.
    fn user_key(user: &str) -> String {
        let mut end = user.len().min(64);
        while !user.is_char_boundary(end) {
            end -= 1;
        }
        user[..end].to_lowercase()
    }

    /// Admits a login attempt for `user` from `addr` at `now` (and counts it as a failure until
    /// [`LoginThrottle::succeeded`] says otherwise), or refuses it while the address, or the user
    /// name (unless `user` logged in from `addr` before), is locked.
    pub fn begin(&self, addr: IpAddr, user: &str, now: Instant) -> Result<(), Throttled> {
        let (addr, user) = (Self::address_key(addr), Self::user_key(user));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(wait_secs) = locked_secs(st.by_address.get(&addr), now) {
            return Err(Throttled { wait_secs, by: ThrottledBy::Address });
        }
        let pair = (user.clone(), addr);
        let known = st.known.get(&pair).is_some_and(|&at| at + Self::KNOWN_ADDRESS_TTL > now);
        if !known {
            if let Some(wait_secs) = locked_secs(st.by_user.get(&user), now) {
                return Err(Throttled { wait_secs, by: ThrottledBy::User });
            }
        }
        strike(strikes_entry(&mut st.by_address, &addr, now), Self::ADDRESS_FREE_FAILURES, now);
        if !known {
            strike(strikes_entry(&mut st.by_user, &user, now), Self::USER_FREE_FAILURES, now);
        }
        Ok(())
    }

    /// Records that the attempt of `user` from `addr` succeeded: clears the address's and the
    /// user's failures and remembers the pair.
    pub fn succeeded(&self, addr: IpAddr, user: &str, now: Instant) {
        let (addr, user) = (Self::address_key(addr), Self::user_key(user));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.by_address.remove(&addr);
        st.by_user.remove(&user);
        if st.known.len() >= Self::KNOWN_ADDRESSES_MAX {
            st.known.retain(|_, at| *at + Self::KNOWN_ADDRESS_TTL > now);
            if st.known.len() >= Self::KNOWN_ADDRESSES_MAX {
                if let Some(oldest) = st.known.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone()) {
                    st.known.remove(&oldest);
                }
            }
        }
        st.known.insert((user, addr), now);
    }

    /// How many addresses, user names and known pairs are tracked (for tests of the bound).
    pub fn tracked(&self) -> (usize, usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.by_address.len(), st.by_user.len(), st.known.len())
    }
}

/// Argon2 verifications, bounded: at most [`PasswordChecks::CONCURRENCY_MAX`] run at once (on the
/// blocking pool), at most [`PasswordChecks::WAITING_MAX`] more wait, each at most
/// [`PasswordChecks::WAIT_MAX`]; anything beyond gets [`AppError::Busy`] (503) at once. A login
/// for an unknown user verifies against a dummy hash with the default parameters, so it costs
/// what a known one does.
#[derive(Debug)]
pub(crate) struct PasswordChecks {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    dummy_phc: Arc<OnceLock<String>>,
}

impl Default for PasswordChecks {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(Self::CONCURRENCY_MAX)),
            waiting: AtomicUsize::new(0),
            dummy_phc: Arc::new(OnceLock::new()),
        }
    }
}

/// Decrements the waiting count when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PasswordChecks {
    /// Verifications running at once.
    pub(crate) const CONCURRENCY_MAX: usize = 2;
    /// Verifications waiting for a slot.
    pub(crate) const WAITING_MAX: usize = 16;
    /// Longest wait for a slot.
    pub(crate) const WAIT_MAX: Duration = Duration::from_secs(5);

    /// Whether `password` matches `phc` (`None`: an unknown user, checked against the dummy hash
    /// and always false).
    ///
    /// # Errors
    /// [`AppError::Busy`] when too many checks run or wait; [`AppError::Internal`] when the stored
    /// hash is unreadable or the blocking task failed.
    pub(crate) async fn verify(&self, phc: Option<String>, password: String) -> Result<bool, AppError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= Self::WAITING_MAX {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(AppError::Busy);
        }
        let waiting = Waiting(&self.waiting);
        let permit = tokio::time::timeout(Self::WAIT_MAX, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| AppError::Busy)?
            .map_err(|_| AppError::Busy)?;
        drop(waiting);
        let dummy = self.dummy_phc.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let known = phc.is_some();
            let phc = match phc {
                Some(p) => p,
                None => dummy.get_or_init(dummy_hash).clone(),
            };
            let hash = PasswordHash::new(&phc)
                .map_err(|e| AppError::Internal(format!("a stored password hash is unreadable: {e}")))?;
            let ok = Argon2::default().verify_password(password.as_bytes(), &hash).is_ok();
            Ok(ok && known)
        })
        .await
        .map_err(|e| AppError::Internal(format!("password check task failed: {e}")))?
    }
}

/// An argon2 hash (default parameters, like every stored password) of a random password nobody
/// knows.
fn dummy_hash() -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default().hash_password(random_token().as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_else(|_| {
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$8tHAM0ugMFr4YuHlNBbR9ScOq4ILX4zmzvFQdbdSvH0".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn an_address_is_locked_after_its_free_failures_with_doubling_lockouts() {
        let t = LoginThrottle::default();
        let a = ip("192.0.2.1");
        let now = Instant::now();
        for i in 0..LoginThrottle::ADDRESS_FREE_FAILURES {
            assert_eq!(t.begin(a, &format!("user{i}"), now), Ok(()), "attempt {i} is free");
        }
        let refused = t.begin(a, "someone", now);
        assert_eq!(refused, Err(Throttled { wait_secs: 1, by: ThrottledBy::Address }));
        // Each further failure doubles the lockout.
        let mut at = now;
        for expected in [2, 4, 8, 16] {
            at += Duration::from_secs(LoginThrottle::LOCKOUT_SECS_MAX);
            assert_eq!(t.begin(a, "x", at), Ok(()));
            assert_eq!(t.begin(a, "x", at).map_err(|e| e.wait_secs), Err(expected));
        }
    }

    #[test]
    fn lockouts_are_capped_and_failures_are_forgotten() {
        let t = LoginThrottle::default();
        let a = ip("192.0.2.2");
        let mut now = Instant::now();
        for _ in 0..40 {
            let _ = t.begin(a, "u", now);
            now += Duration::from_secs(LoginThrottle::LOCKOUT_SECS_MAX);
        }
        let _ = t.begin(a, "u", now);
        assert_eq!(t.begin(a, "u", now).map_err(|e| e.wait_secs), Err(LoginThrottle::LOCKOUT_SECS_MAX));
        let later = now + Duration::from_secs(LoginThrottle::LOCKOUT_SECS_MAX) + LoginThrottle::FORGET_AFTER;
        for _ in 0..LoginThrottle::ADDRESS_FREE_FAILURES {
            assert_eq!(t.begin(a, "u", later), Ok(()), "forgotten after a quiet period");
        }
    }

    #[test]
    fn a_throttled_address_locks_out_neither_another_address_nor_another_user() {
        let t = LoginThrottle::default();
        let (a, b) = (ip("192.0.2.10"), ip("198.51.100.7"));
        let now = Instant::now();
        for _ in 0..LoginThrottle::ADDRESS_FREE_FAILURES {
            t.begin(a, "alice", now).expect("free attempts");
        }
        assert_eq!(t.begin(a, "bob", now).map_err(|e| e.by), Err(ThrottledBy::Address));
        // Another address, as alice (whose name has failures left) and as bob.
        assert_eq!(t.begin(b, "alice", now), Ok(()));
        assert_eq!(t.begin(b, "bob", now), Ok(()));
        t.succeeded(b, "alice", now);
        // The success at b clears alice's name but not a's lock.
        assert!(t.begin(a, "alice", now).is_err());
    }

    #[test]
    fn a_user_name_is_locked_for_strangers_but_not_for_addresses_it_logged_in_from() {
        let t = LoginThrottle::default();
        let home = ip("203.0.113.5");
        let mut now = Instant::now();
        t.begin(home, "alice", now).expect("first login");
        t.succeeded(home, "alice", now);
        // A distributed guess: many addresses, one attempt each.
        for i in 0..LoginThrottle::USER_FREE_FAILURES {
            now += Duration::from_millis(1);
            t.begin(ip(&format!("10.0.{}.{}", i / 250, i % 250 + 1)), "alice", now).expect("each address once");
        }
        let stranger = ip("10.9.9.9");
        assert_eq!(t.begin(stranger, "alice", now).map_err(|e| e.by), Err(ThrottledBy::User));
        assert_eq!(t.begin(stranger, "bob", now), Ok(()), "other names are not affected");
        assert_eq!(t.begin(home, "alice", now), Ok(()), "alice's own address still gets in");
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..LoginThrottle::ADDRESS_FREE_FAILURES {
            t.begin(ip(&format!("2001:db8:1:2::{:x}", i + 1)), &format!("u{i}"), now).expect("free");
        }
        assert!(t.begin(ip("2001:db8:1:2:ffff::1"), "v", now).is_err(), "same /64");
        assert_eq!(t.begin(ip("2001:db8:1:3::1"), "v", now), Ok(()), "another /64");
    }

    #[test]
    fn state_stays_bounded_under_a_flood_of_addresses_and_names() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..(LoginThrottle::ENTRIES_MAX as u32 + 500) {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = t.begin(addr, &format!("name-{i}"), now);
        }
        let (addresses, users, _) = t.tracked();
        assert!(addresses <= LoginThrottle::ENTRIES_MAX, "{addresses} addresses tracked");
        assert!(users <= LoginThrottle::ENTRIES_MAX, "{users} user names tracked");
    }

    #[test]
    fn a_parallel_burst_is_counted_in_full() {
        // Attempts are counted when admitted, not when their check ends: of a burst from one
        // address only the free ones get through.
        let t = LoginThrottle::default();
        let a = ip("192.0.2.77");
        let now = Instant::now();
        let admitted = (0..100).filter(|_| t.begin(a, "alice", now).is_ok()).count();
        assert_eq!(admitted, LoginThrottle::ADDRESS_FREE_FAILURES as usize);
    }

    #[test]
    fn permissions_follow_the_role_order() {
        use Permission::*;
        for p in [ViewFleet, OperateJobs, DrainAgents, RevokeAgents, ManageUsers, ManageApiTokens, ReadAudit] {
            assert!(p.granted_to(Role::Admin), "{p:?}");
        }
        assert!(ViewFleet.granted_to(Role::Viewer));
        assert!(!OperateJobs.granted_to(Role::Viewer) && OperateJobs.granted_to(Role::Operator));
        assert!(DrainAgents.granted_to(Role::Operator));
        assert!(!RevokeAgents.granted_to(Role::Operator) && !ReadAudit.granted_to(Role::Operator));
    }

    #[test]
    fn tokens_compare_by_value() {
        let a = random_token();
        assert_eq!(a.len(), 43);
        assert!(tokens_equal(&a, &a.clone()));
        assert!(!tokens_equal(&a, &random_token()));
        assert!(!tokens_equal(&a, ""));
    }

    #[tokio::test]
    async fn unknown_users_are_checked_against_a_dummy_hash_and_never_match() -> Result<(), AppError> {
        let checks = PasswordChecks::default();
        assert!(!checks.verify(None, "anything".into()).await?);
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let phc = Argon2::default().hash_password(b"pw", &salt).map_err(|e| AppError::Internal(e.to_string()))?;
        assert!(checks.verify(Some(phc.to_string()), "pw".into()).await?);
        assert!(!checks.verify(Some(phc.to_string()), "nope".into()).await?);
        Ok(())
    }
}
