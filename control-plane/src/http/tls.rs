//! HTTPS for the dashboard and API, and the `/metrics` access options.
//!
//! [`HttpServer::bind`] binds the dashboard/API listener (and, with `--metrics-listen`, a plain
//! HTTP listener that serves only `/metrics`), decides whether the dashboard speaks TLS
//! ([`HttpTlsMode`]: `auto` is on unless the listen address is a loopback address) and loads the
//! certificate; [`HttpServer::serve`] runs both until shutdown.
//!
//! * TLS is rustls with the *ring* provider, TLS 1.3 and 1.2 (browsers), rustls' default cipher
//!   suites (AEAD only, forward secret), ALPN `h2` and `http/1.1`, no 0-RTT, no client
//!   certificates. Handshakes time out after 10 s; a connection that sends no request within
//!   [`super::REQUEST_TIMEOUT_SECS`] is closed.
//! * Certificate: by default the control plane's server certificate from the fleet CA
//!   (`server.pem` / `server.key` in the data dir, SANs = the server names), held in a
//!   [`ReloadableCert`] so that renewal can swap it without a restart
//!   ([`HttpServer::fleet_cert`]); or an operator's certificate chain and key (PEM files).
//! * Under TLS ([`HttpSecurity::tls`]) the session cookie is `__Host-gaffer_session` (Secure,
//!   Path=/, no Domain), the login CSRF cookie `__Secure-gaffer_login_csrf` (Secure, Path=/login),
//!   and every response carries `Strict-Transport-Security: max-age=31536000` — without
//!   `includeSubDomains`, because the control plane is usually one host on a studio LAN whose
//!   sibling names it does not speak for.
//! * `/metrics` can require `Authorization: Bearer <token>` ([`load_metrics_token`], compared in
//!   constant time) and can move to its own plain-HTTP listener for a scraper on an internal
//!   interface; the dashboard listener then has no `/metrics`.
//!
//! Shutdown is graceful: listeners stop accepting, open requests get up to
//! [`SHUTDOWN_GRACE_SECS`] to finish.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::auth::{LOGIN_CSRF_COOKIE, LOGIN_CSRF_COOKIE_TLS, SESSION_COOKIE, SESSION_COOKIE_TLS};
use crate::datadir::DataDir;
use crate::AppState;

/// How long open requests may take to finish after shutdown was asked for, seconds (30).
pub const SHUTDOWN_GRACE_SECS: u64 = super::REQUEST_TIMEOUT_SECS;
/// The `Strict-Transport-Security` value sent under TLS: one year, this host only.
pub const HSTS_VALUE: &str = "max-age=31536000";
/// Largest certificate or key file read, bytes (the fleet PKI's PEM limit, 64 KiB).
pub const PEM_FILE_BYTES_MAX: u64 = gaffer_certs::PEM_BYTES_MAX as u64;
/// Largest metrics token file read, bytes (1 KiB).
pub const METRICS_TOKEN_FILE_BYTES_MAX: u64 = 1024;
/// Shortest accepted metrics token, characters (16).
pub const METRICS_TOKEN_CHARS_MIN: usize = 16;
/// Longest accepted metrics token, characters (256).
pub const METRICS_TOKEN_CHARS_MAX: usize = 256;
/// How long a TLS handshake may take, seconds (10).
const HANDSHAKE_TIMEOUT_SECS: u64 = 10;

/// Errors setting up the HTTP listeners. Each says which file or address to fix.
#[derive(Debug, thiserror::Error)]
pub enum HttpTlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// A file is larger than its limit.
    #[error("{path} is larger than {limit_bytes} bytes; is it the right file?")]
    FileTooLarge {
        /// The file.
        path: String,
        /// The limit.
        limit_bytes: u64,
    },
    /// A certificate or key is not readable PEM, or the key does not belong to the certificate.
    #[error("{what}: {reason}")]
    InvalidCertificate {
        /// Which certificate or key (with its file, where there is one).
        what: String,
        /// What is wrong; never includes key material.
        reason: String,
    },
    /// The metrics token file does not hold a usable token.
    #[error("{path}: {reason}")]
    InvalidMetricsToken {
        /// The file.
        path: String,
        /// What is wrong; never includes the token.
        reason: String,
    },
    /// The flags contradict each other (e.g. `--http-tls-cert` without `--http-tls-key`, or
    /// with `--http-tls off`).
    #[error("{0}")]
    BadOptions(String),
    /// A listener could not be bound.
    #[error("binding {what} on tcp/{addr}: {source}")]
    Bind {
        /// `HTTP` or `metrics`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// `--http-tls`: whether the dashboard and API speak HTTPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum HttpTlsMode {
    /// Always HTTPS.
    On,
    /// Always plain HTTP.
    Off,
    /// HTTPS unless the listen address is a loopback address (the default).
    #[default]
    Auto,
}

impl HttpTlsMode {
    /// Whether a listener on `listen` speaks TLS in this mode. `auto` is off only for loopback
    /// addresses (`127.0.0.0/8`, `::1`, and IPv4-mapped loopback); the unspecified addresses
    /// (`0.0.0.0`, `::`) reach the network, so TLS is on for them.
    pub fn tls_for(self, listen: SocketAddr) -> bool {
        match self {
            HttpTlsMode::On => true,
            HttpTlsMode::Off => false,
            HttpTlsMode::Auto => !listen.ip().to_canonical().is_loopback(),
        }
    }
}

/// What the router needs to know about how it is served. Default: plain HTTP, `/metrics` open
/// and on the router.
#[derive(Clone, Default)]
pub struct HttpSecurity {
    /// Served over HTTPS: cookies are `Secure` with the `__Host-`/`__Secure-` prefixes and
    /// responses carry HSTS.
    pub tls: bool,
    /// SHA-256 of the bearer token `/metrics` requires ([`load_metrics_token`]); `None`: no token.
    pub metrics_token_sha256: Option<[u8; 32]>,
    /// `/metrics` is served on its own listener (`--metrics-listen`), not on this router.
    pub metrics_separate: bool,
}

impl std::fmt::Debug for HttpSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSecurity")
            .field("tls", &self.tls)
            .field("metrics_token", &self.metrics_token_sha256.map(|_| "<set>"))
            .field("metrics_separate", &self.metrics_separate)
            .finish()
    }
}

impl HttpSecurity {
    /// Name of the session cookie: `__Host-gaffer_session` under TLS, else `gaffer_session`.
    pub fn session_cookie_name(&self) -> &'static str {
        if self.tls {
            SESSION_COOKIE_TLS
        } else {
            SESSION_COOKIE
        }
    }

    /// Name of the login form's CSRF cookie: `__Secure-gaffer_login_csrf` under TLS (it is
    /// scoped to Path=/login, which `__Host-` forbids), else `gaffer_login_csrf`.
    pub fn login_csrf_cookie_name(&self) -> &'static str {
        if self.tls {
            LOGIN_CSRF_COOKIE_TLS
        } else {
            LOGIN_CSRF_COOKIE
        }
    }

    /// Whether a `/metrics` request may be answered: no token is configured, or `headers` carry
    /// `Authorization: Bearer <token>` whose SHA-256 equals the configured one (constant time).
    pub fn metrics_authorized(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.metrics_token_sha256 else {
            return true;
        };
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        if value.len() > "Bearer ".len() + METRICS_TOKEN_CHARS_MAX {
            return false;
        }
        let Some(token) = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        bool::from(presented.ct_eq(expected))
    }
}

/// The 401 answer to a `/metrics` request without the right bearer token.
pub(crate) fn metrics_unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"metrics\""))],
        "a valid metrics token is required: Authorization: Bearer <the token in --metrics-token-file>\n",
    )
        .into_response()
}

/// Reads the `/metrics` bearer token from `path` and returns its SHA-256 (the token itself is
/// not kept). The file holds one token of [`METRICS_TOKEN_CHARS_MIN`]..=[`METRICS_TOKEN_CHARS_MAX`]
/// visible ASCII characters; surrounding whitespace (a trailing newline) is ignored. Warns if the
/// file is readable by group or others.
///
/// Errors: [`HttpTlsError::ReadFile`], [`HttpTlsError::FileTooLarge`] (over
/// [`METRICS_TOKEN_FILE_BYTES_MAX`]), [`HttpTlsError::InvalidMetricsToken`].
pub fn load_metrics_token(path: &Path) -> Result<[u8; 32], HttpTlsError> {
    let bytes = read_bounded(path, METRICS_TOKEN_FILE_BYTES_MAX)?;
    warn_if_shared(path, "metrics token file");
    let bad = |reason: String| HttpTlsError::InvalidMetricsToken { path: path.display().to_string(), reason };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("the token is not UTF-8 text".into()))?;
    let token = text.trim();
    if token.len() < METRICS_TOKEN_CHARS_MIN || token.len() > METRICS_TOKEN_CHARS_MAX {
        return Err(bad(format!(
            "the token must be {METRICS_TOKEN_CHARS_MIN} to {METRICS_TOKEN_CHARS_MAX} characters (it has {}); \
             e.g. `openssl rand -hex 32 > FILE`",
            token.len()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("the token must be visible ASCII characters only (no spaces)".into()));
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

fn read_bounded(path: &Path, limit_bytes: u64) -> Result<Vec<u8>, HttpTlsError> {
    use std::io::Read as _;
    let read_err = |source| HttpTlsError::ReadFile { path: path.display().to_string(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(limit_bytes + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > limit_bytes {
        return Err(HttpTlsError::FileTooLarge { path: path.display().to_string(), limit_bytes });
    }
    Ok(bytes)
}

/// Logs a warning if `path` is readable or writable by group or others (a secret should be
/// 0600 or stricter). Not an error: some setups share keys with a group on purpose.
fn warn_if_shared(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:03o}"),
                "{what} is accessible by group or others; run `chmod 600 {}`",
                path.display()
            );
        }
    }
}

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The HTTPS certificate, swappable while serving: a [`ResolvesServerCert`] that hands every
/// handshake the current chain and key. [`ReloadableCert::reload`] replaces them; handshakes
/// already under way finish with the old one, the next one gets the new one.
#[derive(Debug)]
pub struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
    provider: Arc<CryptoProvider>,
}

impl ReloadableCert {
    /// A certificate from PEM: `cert_pem` holds the chain, leaf first (`CERTIFICATE` blocks);
    /// `key_pem` the leaf's private key (PKCS#8, SEC1 or PKCS#1). `what` names them in errors.
    ///
    /// Errors: [`HttpTlsError::InvalidCertificate`] for unreadable PEM, an unsupported key, or
    /// a key that does not match the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, HttpTlsError> {
        let provider = ring_provider();
        let key = certified_key(&provider, cert_pem, key_pem, what)?;
        Ok(Self { current: RwLock::new(Arc::new(key)), provider })
    }

    /// Replaces the certificate and key (e.g. after renewal), checked the same way as
    /// [`ReloadableCert::from_pem`]. On error the current certificate stays.
    pub fn reload(&self, cert_pem: &str, key_pem: &str) -> Result<(), HttpTlsError> {
        let key = certified_key(&self.provider, cert_pem, key_pem, "renewed HTTPS certificate")?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// The certificate chain and key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn certified_key(
    provider: &CryptoProvider,
    cert_pem: &str,
    key_pem: &str,
    what: &str,
) -> Result<CertifiedKey, HttpTlsError> {
    let bad = |reason: String| HttpTlsError::InvalidCertificate { what: what.to_owned(), reason };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("certificate PEM is unreadable: {e}")))?;
    if chain.is_empty() {
        return Err(bad("no CERTIFICATE block found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| bad("no readable PRIVATE KEY block found".into()))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| bad(format!("the key is unusable or does not belong to the certificate: {e}")))
}

/// The rustls server configuration for HTTPS: ring, TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`,
/// no client authentication, no 0-RTT, certificates from `certs`.
///
/// Errors: [`HttpTlsError::Tls`] if rustls refuses the protocol versions (not expected).
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, HttpTlsError> {
    let mut config = ServerConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// Settings of the dashboard/API and metrics listeners (`serve`'s flags).
#[derive(Debug, Clone)]
pub struct HttpServerOptions {
    /// Dashboard and API address.
    pub listen: SocketAddr,
    /// `--http-tls`.
    pub tls: HttpTlsMode,
    /// `--http-tls-cert`: an operator's certificate chain (PEM, leaf first) instead of the fleet
    /// server certificate. Needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// `--http-tls-key`: the key of `tls_cert_file` (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// `--metrics-token-file`: `/metrics` requires this bearer token.
    pub metrics_token_file: Option<PathBuf>,
    /// `--metrics-listen`: serve `/metrics` (plain HTTP, nothing else) on this address instead.
    pub metrics_listen: Option<SocketAddr>,
}

/// The bound dashboard/API listener (and metrics listener), ready to [`serve`](HttpServer::serve).
pub struct HttpServer {
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    metrics_listener: Option<(std::net::TcpListener, SocketAddr)>,
    security: HttpSecurity,
    tls: Option<Arc<ServerConfig>>,
    fleet_cert: Option<Arc<ReloadableCert>>,
    url_host: String,
}

impl HttpServer {
    /// Loads the certificate and the metrics token and binds the listeners.
    ///
    /// With TLS and no operator certificate, serves the data dir's `server.pem` / `server.key`.
    /// An operator key file readable by group or others is used but warned about.
    ///
    /// Errors: [`HttpTlsError::BadOptions`] for a certificate without its key (or the reverse),
    /// or an operator certificate with TLS off; the file errors of the certificate, key and
    /// token; [`HttpTlsError::Bind`] if an address is taken.
    pub async fn bind(opts: &HttpServerOptions, dd: &DataDir) -> Result<Self, HttpTlsError> {
        let tls_on = opts.tls.tls_for(opts.listen);
        let operator_files = match (&opts.tls_cert_file, &opts.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            _ => {
                return Err(HttpTlsError::BadOptions(
                    "--http-tls-cert and --http-tls-key go together: give both, or neither to serve the fleet's \
                     server certificate"
                        .into(),
                ))
            }
        };
        if operator_files.is_some() && !tls_on {
            return Err(HttpTlsError::BadOptions(format!(
                "--http-tls-cert was given but TLS is off for {} (--http-tls {}); use --http-tls on",
                opts.listen,
                if opts.tls == HttpTlsMode::Off { "off" } else { "auto, on a loopback address" }
            )));
        }
        let (tls, fleet_cert) = if !tls_on {
            (None, None)
        } else if let Some((cert_path, key_path)) = &operator_files {
            let cert_pem = read_pem_file(cert_path)?;
            let key_pem = read_pem_file(key_path)?;
            warn_if_shared(key_path, "HTTPS private key");
            let what = format!("{} / {}", cert_path.display(), key_path.display());
            let certs = Arc::new(ReloadableCert::from_pem(&cert_pem, &key_pem, &what)?);
            (Some(server_config(certs)?), None)
        } else {
            let cert_pem = read_pem_file(&dd.server_cert_path())?;
            let key_pem = read_pem_file(&dd.server_key_path())?;
            let certs = Arc::new(ReloadableCert::from_pem(&cert_pem, &key_pem, "the fleet server certificate")?);
            (Some(server_config(certs.clone())?), Some(certs))
        };
        let metrics_token_sha256 = opts.metrics_token_file.as_deref().map(load_metrics_token).transpose()?;
        let (listener, local_addr) = bind_tcp(opts.listen, "HTTP").await?;
        let metrics_listener = match opts.metrics_listen {
            Some(addr) => Some(bind_tcp(addr, "metrics").await?),
            None => None,
        };
        // A URL a browser can verify: the bound address, or for a wildcard bind under the fleet
        // certificate its first server name (a SAN).
        let url_host = match (local_addr.ip().is_unspecified(), &fleet_cert) {
            (true, Some(_)) => match dd.load_config().ok().and_then(|c| c.server_names.into_iter().next()) {
                Some(name) if name.parse::<std::net::Ipv6Addr>().is_ok() => {
                    format!("[{name}]:{}", local_addr.port())
                }
                Some(name) => format!("{name}:{}", local_addr.port()),
                None => local_addr.to_string(),
            },
            _ => local_addr.to_string(),
        };
        let security =
            HttpSecurity { tls: tls.is_some(), metrics_token_sha256, metrics_separate: metrics_listener.is_some() };
        Ok(Self { listener, local_addr, metrics_listener, security, tls, fleet_cert, url_host })
    }

    /// The dashboard/API listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The `--metrics-listen` listener's address, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// How the router is served (TLS, metrics token, metrics listener).
    pub fn security(&self) -> &HttpSecurity {
        &self.security
    }

    /// The dashboard's URL: `https://HOST:PORT/` under TLS, else `http://HOST:PORT/`.
    pub fn dashboard_url(&self) -> String {
        let scheme = if self.security.tls { "https" } else { "http" };
        format!("{scheme}://{}/", self.url_host)
    }

    /// The fleet server certificate being served, for renewal to [`ReloadableCert::reload`];
    /// `None` with TLS off or an operator certificate.
    pub fn fleet_cert(&self) -> Option<Arc<ReloadableCert>> {
        self.fleet_cert.clone()
    }

    /// Serves the dashboard and API ([`super::router_with`]) and the metrics listener
    /// ([`super::metrics_router`]) until `shutdown` resolves, then stops accepting and gives
    /// open requests [`SHUTDOWN_GRACE_SECS`]. Handlers see the peer address as
    /// `ConnectInfo<SocketAddr>`.
    ///
    /// Errors: an I/O error of a listener (the other is shut down too).
    pub async fn serve(self, state: AppState, shutdown: impl Future<Output = ()> + Send) -> io::Result<()> {
        let control = axum_server::Control::new();
        let app = super::router_with(state.clone(), self.security.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let handle = axum_server::Handle::with_control(control.clone());
        let main: Pin<Box<dyn Future<Output = io::Result<()>> + Send>> = match self.tls {
            Some(config) => {
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
                    axum_server::tls_rustls::RustlsConfig::from_config(config),
                )
                .handshake_timeout(Duration::from_secs(HANDSHAKE_TIMEOUT_SECS));
                let server = axum_server::from_tcp(self.listener)?
                    .acceptor(acceptor)
                    .handle(handle)
                    .first_request_timeout(Duration::from_secs(super::REQUEST_TIMEOUT_SECS))
                    .accept_error_handler(|peer: Option<&SocketAddr>, e: &io::Error| {
                        tracing::debug!(peer = ?peer, error = %e, "HTTPS connection refused (TLS handshake)");
                    });
                Box::pin(server.serve(app))
            }
            None => {
                let server = axum_server::from_tcp(self.listener)?
                    .handle(handle)
                    .first_request_timeout(Duration::from_secs(super::REQUEST_TIMEOUT_SECS));
                Box::pin(server.serve(app))
            }
        };
        let mut servers = tokio::task::JoinSet::new();
        servers.spawn(main);
        if let Some((listener, _)) = self.metrics_listener {
            let app =
                super::metrics_router(state, self.security.clone()).into_make_service_with_connect_info::<SocketAddr>();
            let server = axum_server::from_tcp(listener)?
                .handle(axum_server::Handle::with_control(control.clone()))
                .first_request_timeout(Duration::from_secs(super::REQUEST_TIMEOUT_SECS));
            servers.spawn(server.serve(app));
        }
        let mut result = Ok(());
        tokio::select! {
            _ = shutdown => {}
            Some(ended) = servers.join_next() => {
                result = flatten(ended);
                tracing::error!(result = ?result, "an HTTP listener stopped; shutting down the others");
            }
        }
        control.graceful_shutdown(Some(Duration::from_secs(SHUTDOWN_GRACE_SECS)));
        while let Some(ended) = servers.join_next().await {
            if let Err(e) = flatten(ended) {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

fn flatten(ended: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    ended.map_err(io::Error::other)?
}

fn read_pem_file(path: &Path) -> Result<String, HttpTlsError> {
    let bytes = read_bounded(path, PEM_FILE_BYTES_MAX)?;
    String::from_utf8(bytes).map_err(|_| HttpTlsError::InvalidCertificate {
        what: path.display().to_string(),
        reason: "not PEM text (not UTF-8)".into(),
    })
}

async fn bind_tcp(addr: SocketAddr, what: &'static str) -> Result<(std::net::TcpListener, SocketAddr), HttpTlsError> {
    let bind_err = |source| HttpTlsError::Bind { what, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener.into_std().map_err(bind_err)?, local))
}

/// Adds `Strict-Transport-Security` ([`HSTS_VALUE`]) to every response of `router` when `tls`.
pub(crate) fn with_hsts(router: Router, tls: bool) -> Router {
    if tls {
        router.layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS_VALUE),
        ))
    } else {
        router
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_off_for_loopback_and_on_for_everything_else() {
        let auto = HttpTlsMode::Auto;
        for off in ["127.0.0.1:8080", "127.3.2.1:1", "[::1]:8080", "[::ffff:127.0.0.1]:8080"] {
            assert!(!auto.tls_for(off.parse().unwrap()), "{off} is loopback: auto means plain HTTP");
        }
        for on in ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080", "192.168.1.2:443", "[fd00::1]:8080"] {
            assert!(auto.tls_for(on.parse().unwrap()), "{on} reaches the network: auto means HTTPS");
        }
        assert!(HttpTlsMode::On.tls_for("127.0.0.1:1".parse().unwrap()));
        assert!(!HttpTlsMode::Off.tls_for("0.0.0.0:1".parse().unwrap()));
        assert_eq!(HttpTlsMode::default(), HttpTlsMode::Auto);
    }

    #[test]
    fn cookie_names_follow_tls() {
        let plain = HttpSecurity::default();
        assert_eq!(plain.session_cookie_name(), "gaffer_session");
        assert_eq!(plain.login_csrf_cookie_name(), "gaffer_login_csrf");
        let tls = HttpSecurity { tls: true, ..HttpSecurity::default() };
        assert_eq!(tls.session_cookie_name(), "__Host-gaffer_session");
        assert_eq!(tls.login_csrf_cookie_name(), "__Secure-gaffer_login_csrf");
    }

    #[test]
    fn metrics_token_is_checked_by_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        let security =
            HttpSecurity { metrics_token_sha256: Some(load_metrics_token(&path).unwrap()), ..Default::default() };
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            h
        };
        assert!(security.metrics_authorized(&with("Bearer 0123456789abcdef0123")));
        assert!(!security.metrics_authorized(&with("Bearer 0123456789abcdef0124")));
        assert!(!security.metrics_authorized(&with("0123456789abcdef0123")));
        assert!(!security.metrics_authorized(&HeaderMap::new()));
        assert!(HttpSecurity::default().metrics_authorized(&HeaderMap::new()), "no token configured: open");
        assert!(!format!("{security:?}").contains("0123"), "Debug shows no token material");

        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(load_metrics_token(&path), Err(HttpTlsError::InvalidMetricsToken { .. })));
        std::fs::write(&path, "has a space in the middle of it\n").unwrap();
        assert!(matches!(load_metrics_token(&path), Err(HttpTlsError::InvalidMetricsToken { .. })));
        std::fs::write(&path, vec![b'a'; 2000]).unwrap();
        assert!(matches!(load_metrics_token(&path), Err(HttpTlsError::FileTooLarge { .. })));
    }

    /// Moves everything `from` has to send into `to`.
    fn pump<A, B, DA, DB>(from: &mut A, to: &mut B)
    where
        A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
        B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
    {
        let mut buf = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// A real (in-memory) TLS handshake against `server` by a client trusting only `ca_pem`,
    /// connecting to `localhost`; returns the leaf certificate the server presented.
    fn handshake_leaf(server: Arc<ServerConfig>, ca_pem: &str) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(ring_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
        let mut server = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert!(!client.is_handshaking(), "the handshake completed");
        client.peer_certificates().unwrap()[0].clone().into_owned()
    }

    #[test]
    fn a_reload_is_served_to_the_next_handshake() {
        let ca = gaffer_certs::FleetCa::generate("test").unwrap();
        let first = ca.issue_server_cert(&["localhost".into()]).unwrap();
        let second = ca.issue_server_cert(&["localhost".into()]).unwrap();
        let certs = Arc::new(ReloadableCert::from_pem(&first.cert_pem, &first.key_pem, "first").unwrap());
        let config = server_config(certs.clone()).unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(handshake_leaf(config.clone(), &ca.cert_pem()), der(&first.cert_pem));
        certs.reload(&second.cert_pem, &second.key_pem).unwrap();
        assert_eq!(handshake_leaf(config, &ca.cert_pem()), der(&second.cert_pem), "same config, new certificate");
    }

    #[test]
    fn reloadable_cert_swaps_and_refuses_a_foreign_key() {
        let ca = gaffer_certs::FleetCa::generate("test").unwrap();
        let first = ca.issue_server_cert(&["localhost".into()]).unwrap();
        let second = ca.issue_server_cert(&["localhost".into()]).unwrap();
        let certs = ReloadableCert::from_pem(&first.cert_pem, &first.key_pem, "first").unwrap();
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(certs.current().end_entity_cert().unwrap(), &der(&first.cert_pem));
        // A key that is not the certificate's is refused and the current one stays.
        let err = certs.reload(&second.cert_pem, &first.key_pem).unwrap_err();
        assert!(matches!(err, HttpTlsError::InvalidCertificate { .. }), "{err}");
        assert_eq!(certs.current().end_entity_cert().unwrap(), &der(&first.cert_pem));
        certs.reload(&second.cert_pem, &second.key_pem).unwrap();
        assert_eq!(certs.current().end_entity_cert().unwrap(), &der(&second.cert_pem));
        assert!(ReloadableCert::from_pem("not pem", &first.key_pem, "x").is_err());
    }
}
