//! The control plane's HTTP side: the JSON API under `/api/v1` (bearer tokens), the
//! server-rendered dashboard (askama templates from `dashboards/templates`, session cookie +
//! per-session CSRF token), `GET /metrics` (Prometheus; a bearer token if configured) and
//! `GET /static/app.css`.
//!
//! **Who may do what** is one table, [`ROUTES`]: every method and path with its [`Access`]
//! (public, or a [`Permission`] whose lowest role is `viewer`, `operator` or `admin`). The router
//! is built from it and checks the caller of every route before its handler runs: no credentials
//! give 401 (API) or a redirect to `/login` (dashboard), too low a role 403.
//!
//! Build it with [`router`] and serve it with `into_make_service_with_connect_info::<SocketAddr>()`
//! (logins are throttled by client address), or call it directly in tests with
//! `router(state).oneshot(request)` after inserting `axum::extract::ConnectInfo<SocketAddr>` into
//! the request's extensions.
//!
//! Every response that reports a problem goes through one error type, [`AppError`]: clients get
//! `{"error": "..."}` from the API and an HTML error page from the dashboard ([`PageError`]);
//! internal details (store failures) are logged with `tracing::error!` and never shown. Tokens,
//! passwords and cookies are never logged.
//!
//! Limits: request bodies are capped at [`REQUEST_BODY_BYTES_MAX`] (64 KiB, 413 beyond), and
//! every request at [`REQUEST_TIMEOUT_SECS`] (30 s, then 503).
//!
//! Handlers never fsync on an async worker: anything that flushes the store (job submission,
//! cancel, retry) runs through [`blocking`] on tokio's blocking pool; the operator job actions
//! both surfaces share live in `actions`, which also writes their audit entries.

mod actions;
mod api;
/// The API's JSON of a job and an agent, for webhook bodies.
pub(crate) use api::{agent_value, job_value};
mod audit;
mod auth;
mod custody;
mod dashboard;
mod drain;
mod export;
pub mod install;
mod openapi;
mod refresh;
mod rollouts;
mod timeline;
pub mod tls;
mod view;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::scheduler::SubmitError;
use crate::store::StoreError;
use crate::AppState;

pub use auth::{
    Access, LoginThrottle, Permission, Throttled, ThrottledBy, LOGIN_CSRF_COOKIE, LOGIN_CSRF_COOKIE_TLS,
    SESSION_COOKIE, SESSION_COOKIE_TLS, SESSION_TTL_MS,
};
pub use tls::HttpSecurity;

/// Largest accepted request body, bytes (64 KiB).
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest a request may take before it is answered with 503, seconds.
pub const REQUEST_TIMEOUT_SECS: u64 = 30;

/// The dashboard's stylesheet, compiled in and served at `/static/app.css`.
const APP_CSS: &str = include_str!("../../../dashboards/static/app.css");

/// State of the HTTP handlers: the shared [`AppState`] plus what only HTTP needs.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) app: AppState,
    pub(crate) logins: Arc<LoginThrottle>,
    /// Bounded argon2 verifications for logins.
    pub(crate) passwords: Arc<auth::PasswordChecks>,
    /// TLS or not (cookie names and flags), the metrics token.
    pub(crate) security: HttpSecurity,
}

impl HttpState {
    fn new(app: AppState, security: HttpSecurity) -> Self {
        Self {
            app,
            logins: Arc::new(LoginThrottle::default()),
            passwords: Arc::new(auth::PasswordChecks::default()),
            security,
        }
    }
}

/// One route: method, path, who may use it, and its handler. [`ROUTES`] lists every route the
/// router serves; the router is built from it and puts the authorization check of `access` on
/// each one ([`Access`]), so no route exists without a permission.
pub struct RouteSpec {
    /// HTTP method.
    pub method: Method,
    /// Path as axum matches it (`/api/v1/jobs/{id}`). Under `/api/` it is an API route (bearer
    /// tokens, JSON errors), else a dashboard route (session cookie, HTML).
    pub path: &'static str,
    /// Who may use it.
    pub access: Access,
    handler: fn(MethodFilter) -> MethodRouter<HttpState>,
}

impl RouteSpec {
    /// Whether this is an API route (under `/api/`).
    pub fn is_api(&self) -> bool {
        self.path.starts_with("/api/")
    }
}

impl std::fmt::Debug for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({:?})", self.method, self.path, self.access)
    }
}

const fn route(
    method: Method,
    path: &'static str,
    access: Access,
    handler: fn(MethodFilter) -> MethodRouter<HttpState>,
) -> RouteSpec {
    RouteSpec { method, path, access, handler }
}

const VIEW: Access = Access::Permission(Permission::ViewFleet);
const OPERATE: Access = Access::Permission(Permission::OperateJobs);
const AUDIT: Access = Access::Permission(Permission::ReadAudit);
const REVOKE: Access = Access::Permission(Permission::RevokeAgents);
const DRAIN: Access = Access::Permission(Permission::DrainAgents);
const RELEASES: Access = Access::Permission(Permission::ManageReleases);
const WEBHOOKS: Access = Access::Permission(Permission::ManageWebhooks);

/// Every route of [`router_with`], with its permission: the one place that says who may do what
/// over HTTP. (`/metrics` is left out of the router when it has its own listener.)
pub static ROUTES: &[RouteSpec] = &[
    route(Method::GET, "/api/v1/agents", VIEW, |m| on(m, api::list_agents)),
    route(Method::GET, "/api/v1/agents/{id}", VIEW, |m| on(m, api::get_agent)),
    route(Method::POST, "/api/v1/agents/{id}/revoke", REVOKE, |m| on(m, api::revoke_agent)),
    route(Method::POST, "/api/v1/agents/{id}/drain", DRAIN, |m| on(m, drain::api_drain)),
    route(Method::POST, "/api/v1/agents/{id}/cordon", DRAIN, |m| on(m, drain::api_cordon)),
    route(Method::POST, "/api/v1/agents/{id}/uncordon", DRAIN, |m| on(m, drain::api_uncordon)),
    route(Method::GET, "/api/v1/jobs", VIEW, |m| on(m, api::list_jobs)),
    route(Method::POST, "/api/v1/jobs", OPERATE, |m| on(m, api::submit_job)),
    route(Method::GET, "/api/v1/jobs/{id}", VIEW, |m| on(m, api::get_job)),
    route(Method::POST, "/api/v1/jobs/{id}/cancel", OPERATE, |m| on(m, api::cancel_job)),
    route(Method::POST, "/api/v1/jobs/{id}/retry", OPERATE, |m| on(m, api::retry_job)),
    route(Method::GET, "/api/v1/jobs/{id}/export", VIEW, |m| on(m, export::api_export)),
    route(Method::GET, "/api/v1/jobs/{id}/custody", VIEW, |m| on(m, custody::api_custody)),
    route(Method::GET, "/api/v1/audit", AUDIT, |m| on(m, audit::api_list)),
    // The OpenAPI 3.1 description of the routes above (http::openapi): public, it describes the
    // API and holds nothing about the fleet.
    route(Method::GET, "/api/v1/openapi.json", Access::Public, |m| on(m, openapi::openapi_json)),
    route(Method::GET, "/", VIEW, |m| on(m, dashboard::fleet)),
    route(Method::GET, "/login", Access::Public, |m| on(m, dashboard::login_form)),
    route(Method::POST, "/login", Access::Public, |m| on(m, dashboard::login)),
    route(Method::POST, "/logout", VIEW, |m| on(m, dashboard::logout)),
    route(Method::GET, "/refresh", VIEW, |m| on(m, refresh::set_refresh)),
    route(Method::GET, "/agents/{id}", VIEW, |m| on(m, dashboard::agent_page)),
    route(Method::POST, "/agents/{id}/revoke", REVOKE, |m| on(m, dashboard::revoke_agent)),
    route(Method::POST, "/agents/{id}/drain", DRAIN, |m| on(m, drain::drain_agent)),
    route(Method::POST, "/agents/{id}/cordon", DRAIN, |m| on(m, drain::cordon_agent)),
    route(Method::POST, "/agents/{id}/uncordon", DRAIN, |m| on(m, drain::uncordon_agent)),
    route(Method::GET, "/jobs", VIEW, |m| on(m, dashboard::jobs_page)),
    route(Method::POST, "/jobs", OPERATE, |m| on(m, dashboard::submit_job)),
    route(Method::GET, "/jobs/new", OPERATE, |m| on(m, dashboard::new_job_form)),
    route(Method::GET, "/jobs/{id}", VIEW, |m| on(m, dashboard::job_page)),
    route(Method::POST, "/jobs/{id}/cancel", OPERATE, |m| on(m, dashboard::cancel_job)),
    route(Method::POST, "/jobs/{id}/retry", OPERATE, |m| on(m, dashboard::retry_job)),
    route(Method::GET, "/jobs/{id}/export", VIEW, |m| on(m, export::page_export)),
    route(Method::GET, "/audit", AUDIT, |m| on(m, audit::audit_page)),
    route(Method::GET, "/rollouts", VIEW, |m| on(m, rollouts::rollouts_page)),
    route(Method::POST, "/rollouts/pause", RELEASES, |m| on(m, rollouts::pause)),
    route(Method::POST, "/rollouts/resume", RELEASES, |m| on(m, rollouts::resume)),
    route(Method::POST, "/rollouts/abort", RELEASES, |m| on(m, rollouts::abort)),
    route(Method::GET, "/webhooks", WEBHOOKS, |m| on(m, webhooks::webhooks_page)),
    route(Method::POST, "/webhooks", WEBHOOKS, |m| on(m, webhooks::add)),
    route(Method::POST, "/webhooks/{id}/remove", WEBHOOKS, |m| on(m, webhooks::remove)),
    route(Method::POST, "/webhooks/{id}/test", WEBHOOKS, |m| on(m, webhooks::test)),
    route(Method::GET, "/metrics", Access::Public, |m| on(m, metrics)),
    route(Method::GET, "/static/app.css", Access::Public, |m| on(m, stylesheet)),
    // Installing an agent (http::install): public, signed or checked against a pasted fingerprint.
    route(Method::GET, "/install/agent.sh", Access::Public, |m| on(m, install::agent_sh)),
    route(Method::GET, "/install/ca.pem", Access::Public, |m| on(m, install::ca_pem)),
    route(Method::GET, "/releases/index.json", Access::Public, |m| on(m, install::releases_index)),
    route(Method::GET, "/releases/release.pub", Access::Public, |m| on(m, install::release_pub)),
    route(Method::GET, "/releases/{file}", Access::Public, |m| on(m, install::release_file)),
];

/// The method filter of `method` (the methods [`ROUTES`] uses).
fn method_filter(method: &Method) -> MethodFilter {
    match *method {
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    }
}

/// The whole HTTP surface served over plain HTTP ([`HttpSecurity::default`]): see [`router_with`].
pub fn router(state: AppState) -> Router {
    router_with(state, HttpSecurity::default())
}

/// The whole HTTP surface: `/api/v1/*`, the dashboard, `/metrics` (unless
/// [`HttpSecurity::metrics_separate`]; behind its bearer token if one is set),
/// `/static/app.css`, with the body-size limit, the request timeout and request tracing applied.
/// With [`HttpSecurity::tls`], cookies are Secure and `__Host-`/`__Secure-` prefixed and every
/// response carries `Strict-Transport-Security`.
pub fn router_with(state: AppState, security: HttpSecurity) -> Router {
    let tls = security.tls;
    let metrics_here = !security.metrics_separate;
    let state = HttpState::new(state, security);
    let mut app = Router::new();
    for spec in ROUTES {
        if spec.path == "/metrics" && !metrics_here {
            continue;
        }
        let check = axum::middleware::from_fn_with_state(
            state.clone(),
            move |State(state): State<HttpState>, req: Request, next: Next| auth::authorize(state, spec, req, next),
        );
        app = app.route(spec.path, (spec.handler)(method_filter(&spec.method)).route_layer(check));
    }
    let app = app
        .fallback(not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .layer(RequestBodyLimitLayer::new(REQUEST_BODY_BYTES_MAX))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(REQUEST_TIMEOUT_SECS),
        ))
        .layer(TraceLayer::new_for_http());
    tls::with_hsts(app, tls)
}

/// Only `GET /metrics` (behind its bearer token if one is set), for `--metrics-listen`: plain
/// HTTP on an internal interface. Other paths are 404.
pub fn metrics_router(state: AppState, security: HttpSecurity) -> Router {
    let state = HttpState::new(state, security);
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(REQUEST_TIMEOUT_SECS),
        ))
        .layer(TraceLayer::new_for_http())
}

async fn metrics(
    axum::extract::State(state): axum::extract::State<HttpState>,
    headers: axum::http::HeaderMap,
) -> Response {
    if !state.security.metrics_authorized(&headers) {
        return tls::metrics_unauthorized();
    }
    // OpenMetrics unless the client asks for the Prometheus text format only (promtool, curl -H
    // 'Accept: text/plain'); Prometheus itself asks for OpenMetrics first.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if accept.contains("text/plain") && !accept.contains("application/openmetrics-text") {
        let text = state.app.metrics.encode_prometheus_text(state.app.store.as_ref());
        return ([(header::CONTENT_TYPE, crate::metrics::PROMETHEUS_TEXT_CONTENT_TYPE)], text).into_response();
    }
    let text = state.app.metrics.encode(state.app.store.as_ref());
    ([(header::CONTENT_TYPE, crate::metrics::OPENMETRICS_CONTENT_TYPE)], text).into_response()
}

/// Unknown paths: JSON 404 under `/api/`, else the 404 page.
async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        api::not_found().await.into_response()
    } else {
        dashboard::not_found().await.into_response()
    }
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], APP_CSS)
        .into_response()
}

/// Everything an HTTP handler can fail with. The variant says what the client can do about it.
///
/// As a response it is JSON `{"error": "<message>"}` with the variant's status; wrap it in
/// [`PageError`] for an HTML page. [`AppError::Store`] and [`AppError::Internal`] show a generic
/// message and log the detail.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed (bad JSON, malformed id, bad query); fix it and resend. 400.
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but its values are refused (relative path, unknown profile or
    /// agent); fix the named field. 422.
    #[error("{0}")]
    Unprocessable(String),
    /// No valid credentials: send `Authorization: Bearer gfa_…` (API) or log in (dashboard). 401.
    #[error("a valid API token is required (Authorization: Bearer gfa_…); revoked and expired tokens are refused")]
    Unauthorized,
    /// The caller's role does not allow this, or a form's CSRF token did not match the session
    /// (reload the form and submit again); the message says which. 403.
    #[error("{0}")]
    Forbidden(String),
    /// The named thing does not exist. 404.
    #[error("{0} not found")]
    NotFound(String),
    /// The action does not apply to the thing in its current state (cancel a finished job, retry
    /// a queued one); the message says why. 409.
    #[error("{0}")]
    Conflict(String),
    /// Too many failed logins; retry after the given number of seconds. 429.
    #[error("too many failed logins; try again in {0} s")]
    TooManyAttempts(u64),
    /// Too many logins are being checked at once; retry in a few seconds. 503.
    #[error("too many logins are being checked right now; try again in a few seconds")]
    Busy,
    /// The body is larger than [`REQUEST_BODY_BYTES_MAX`]. 413.
    #[error("request body is larger than {REQUEST_BODY_BYTES_MAX} bytes")]
    PayloadTooLarge,
    /// The store failed; retrying later may succeed. 503, detail logged only.
    #[error("the control plane's store is unavailable; try again shortly")]
    Store(#[from] StoreError),
    /// A bug or an unexpected failure. 500, detail logged only.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::TooManyAttempts(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message shown to the user; logs the detail of server-side failures.
    fn public_message(&self) -> String {
        match self {
            AppError::Store(e) => {
                tracing::error!(error = %e, "store failure while serving a request");
                self.to_string()
            }
            AppError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error while serving a request");
                self.to_string()
            }
            other => other.to_string(),
        }
    }
}

impl From<SubmitError> for AppError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(msg) => AppError::Unprocessable(msg),
            e @ SubmitError::UnknownAgent(_) => AppError::Unprocessable(e.to_string()),
            SubmitError::UnknownJob(id) => AppError::NotFound(format!("job {id}")),
            SubmitError::Refused(r) => AppError::Conflict(r.to_string()),
            SubmitError::Store(e) => AppError::Store(e),
        }
    }
}

/// Runs `f` on tokio's blocking pool: for handler work that does store writes with an fsync
/// (scheduler submit/cancel/retry), which must not run on an async worker thread.
///
/// # Errors
/// [`AppError::Internal`] if `f` panicked or the runtime is shutting down.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, AppError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| AppError::Internal(format!("blocking task failed: {e}")))
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, Json(openapi::ErrorBody { error: self.public_message() })).into_response()
    }
}

/// An [`AppError`] shown as an HTML page (the dashboard's error type).
#[derive(Debug)]
pub struct PageError(pub AppError);

impl<E: Into<AppError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let page = view::ErrorPage {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("Error"),
            message: self.0.public_message(),
        };
        let mut response = Page(page).into_response();
        *response.status_mut() = status;
        response
    }
}

/// An askama template rendered as an HTML response: the one place templates become responses.
/// Adds `Cache-Control: no-store` and a Content-Security-Policy that allows only our own
/// stylesheet (no scripts at all).
pub struct Page<T>(pub T);

impl<T: askama::Template> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        match self.0.render() {
            Ok(html) => {
                let mut response = Html(html).into_response();
                let headers = response.headers_mut();
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                headers.insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                    ),
                );
                headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
                response
            }
            Err(e) => {
                tracing::error!(error = %e, "template rendering failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
            }
        }
    }
}
