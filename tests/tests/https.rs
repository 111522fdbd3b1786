//! HTTPS for the dashboard and API, checked over real TLS with the system `curl` against the
//! real `gaffer-control serve`: the fleet certificate verified with `curl --cacert ca.pem`,
//! `__Host-`/`__Secure-` cookies with Secure, HSTS, refusal of plain HTTP and of unverified
//! clients, an operator's certificate, `--http-tls auto`, and the `/metrics` token and listener.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use gaffer_tests::{csrf_of, ControlPlane, ControlPlaneOptions};
use serde_json::Value;

/// curl's exit code for "the peer's certificate could not be verified".
const CURL_PEER_FAILED_VERIFICATION: i32 = 60;

/// One answer curl got.
struct CurlResponse {
    status: u16,
    /// Header lines, names lowercased (HTTP/2 sends them lowercase anyway).
    headers: Vec<(String, String)>,
    body: String,
    /// The `%{certs}` write-out: the server's chain, each with its PEM.
    certs: String,
}

impl CurlResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The `Set-Cookie` line that sets `name`.
    fn set_cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .map(|(_, v)| v.as_str())
            .find(|v| v.split_once('=').is_some_and(|(k, _)| k == name))
    }

    /// The DER of the leaf certificate the server sent, as base64 without line breaks.
    fn leaf_cert_base64(&self) -> Option<String> {
        pem_body(&self.certs)
    }
}

/// The body of the first PEM `CERTIFICATE` block in `text`, whitespace removed.
fn pem_body(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    Some(text[start..end].chars().filter(|c| !c.is_whitespace()).collect())
}

/// Runs `curl ARGS URL`; `Err` with curl's exit code and message if curl fails.
fn curl(dir: &Path, args: &[&str], url: &str) -> anyhow::Result<Result<CurlResponse, (i32, String)>> {
    let headers_file = dir.join("curl-headers.txt");
    let body_file = dir.join("curl-body.txt");
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "20"])
        .arg("--dump-header")
        .arg(&headers_file)
        .arg("--output")
        .arg(&body_file)
        .args(["--write-out", "%{http_code}\n%{certs}"])
        .args(args)
        .arg(url)
        .output()
        .context("running curl (installed by scripts/setup.sh)")?;
    if !out.status.success() {
        let code = out.status.code().unwrap_or(-1);
        return Ok(Err((code, String::from_utf8_lossy(&out.stderr).into_owned())));
    }
    let write_out = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, certs) = write_out.split_once('\n').unwrap_or((&write_out, ""));
    let headers = std::fs::read_to_string(&headers_file)?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Ok(CurlResponse {
        status: status.trim().parse().with_context(|| format!("curl's status {status:?}"))?,
        headers,
        body: std::fs::read_to_string(&body_file).unwrap_or_default(),
        certs: certs.to_owned(),
    }))
}

/// Like [`curl`], failing the test if curl itself fails.
fn curl_ok(dir: &Path, args: &[&str], url: &str) -> anyhow::Result<CurlResponse> {
    match curl(dir, args, url)? {
        Ok(resp) => Ok(resp),
        Err((code, msg)) => bail!("curl {args:?} {url} failed with exit code {code}: {msg}"),
    }
}

fn start(serve_args: &[&str]) -> anyhow::Result<ControlPlane> {
    ControlPlane::start_with(ControlPlaneOptions {
        serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
        ..ControlPlaneOptions::default()
    })
}

fn serve_json(cp: &ControlPlane) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(cp.data_dir().join("serve.json"))?)?)
}

/// The attributes of a `Set-Cookie` line after the name=value pair, as written.
fn cookie_attributes(set_cookie: &str) -> Vec<String> {
    set_cookie.split(';').skip(1).map(|a| a.trim().to_owned()).collect()
}

fn cookie_value(set_cookie: &str) -> &str {
    set_cookie.split(';').next().and_then(|p| p.split_once('=')).map_or("", |(_, v)| v)
}

fn port_of(url: &str) -> anyhow::Result<u16> {
    let port = url.rsplit(':').next().context("a port in the URL")?;
    Ok(port.trim_end_matches('/').parse()?)
}

fn ca_pem(cp: &ControlPlane) -> PathBuf {
    cp.data_dir().join("ca.pem")
}

#[test]
fn dashboard_over_tls_has_secure_prefixed_cookies_and_hsts() -> anyhow::Result<()> {
    let cp = start(&["--http-tls", "on"])?;
    let dir = cp.dir.path();
    let info = serve_json(&cp)?;
    assert_eq!(info["http_tls"], true, "serve.json: {info}");
    let url = info["dashboard_url"].as_str().unwrap_or_default().to_owned();
    assert!(url.starts_with("https://127.0.0.1:"), "serve.json's dashboard URL is https: {url}");
    assert!(cp.log().contains(&format!("dashboard at {url}")), "the log names the https URL:\n{}", cp.log());
    let base = format!("https://localhost:{}", port_of(&url)?);
    let ca = ca_pem(&cp);
    let ca = ca.to_str().context("utf-8 path")?;

    // The login form, verified against the fleet CA, serving the data dir's server certificate.
    let form = curl_ok(dir, &["--cacert", ca], &format!("{base}/login"))?;
    assert_eq!(form.status, 200);
    let server_pem = std::fs::read_to_string(cp.data_dir().join("server.pem"))?;
    assert_eq!(form.leaf_cert_base64(), pem_body(&server_pem), "the fleet server certificate is served");
    assert_eq!(form.header("strict-transport-security"), Some("max-age=31536000"), "HSTS, this host only");
    let csrf_cookie = form.set_cookie("__Secure-gaffer_login_csrf").with_context(|| {
        format!("the login form sets its CSRF cookie with the __Secure- prefix: {:?}", form.headers)
    })?;
    let attrs = cookie_attributes(csrf_cookie);
    for want in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/login"] {
        assert!(attrs.iter().any(|a| a == want), "{want} in {csrf_cookie}");
    }
    assert!(form.set_cookie("gaffer_login_csrf").is_none(), "no unprefixed cookie under TLS");
    let csrf = cookie_value(csrf_cookie).to_owned();
    assert_eq!(csrf_of(&form.body).as_deref(), Some(csrf.as_str()), "the form's field matches its cookie");

    // Log in through the real form.
    let cookie_header = format!("Cookie: __Secure-gaffer_login_csrf={csrf}");
    let login = curl_ok(
        dir,
        &[
            "--cacert",
            ca,
            "-H",
            &cookie_header,
            "--data-urlencode",
            &format!("csrf={csrf}"),
            "--data-urlencode",
            "user=admin",
            "--data-urlencode",
            &format!("password={}", cp.admin_password),
        ],
        &format!("{base}/login"),
    )?;
    assert_eq!(login.status, 303, "login redirects to the fleet page: {}", login.body);
    assert_eq!(login.header("strict-transport-security"), Some("max-age=31536000"));
    let session_cookie = login
        .set_cookie("__Host-gaffer_session")
        .with_context(|| format!("login sets the __Host- session cookie: {:?}", login.headers))?;
    let attrs = cookie_attributes(session_cookie);
    for want in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.iter().any(|a| a == want), "{want} in {session_cookie}");
    }
    assert!(!attrs.iter().any(|a| a.to_ascii_lowercase().starts_with("domain")), "no Domain: {session_cookie}");
    let session = cookie_value(session_cookie).to_owned();
    assert_eq!(session.len(), 43, "32 random bytes, base64url");

    // The session works under its prefixed name only.
    let fleet = curl_ok(dir, &["--cacert", ca, "-H", &format!("Cookie: __Host-gaffer_session={session}")], &base)?;
    assert_eq!(fleet.status, 200, "the fleet page with the session");
    let plain_name = curl_ok(dir, &["--cacert", ca, "-H", &format!("Cookie: gaffer_session={session}")], &base)?;
    assert_eq!(plain_name.status, 303, "the unprefixed name is not a session under TLS");
    assert_eq!(plain_name.header("location"), Some("/login"));

    // The API over HTTPS with a bearer token.
    let api = curl_ok(
        dir,
        &["--cacert", ca, "-H", &format!("Authorization: Bearer {}", cp.api_token)],
        &format!("{base}/api/v1/agents"),
    )?;
    assert_eq!(api.status, 200, "{}", api.body);
    assert_eq!(api.header("strict-transport-security"), Some("max-age=31536000"), "API responses carry HSTS");

    // Plain HTTP to the TLS port gets no answer.
    match curl(dir, &[], &format!("http://localhost:{}/login", port_of(&url)?))? {
        Ok(resp) => bail!("plain HTTP to the TLS port was answered with {}", resp.status),
        Err((code, _)) => assert_ne!(code, 0),
    }
    // A client that does not trust the fleet CA refuses the certificate.
    match curl(dir, &[], &format!("{base}/login"))? {
        Ok(resp) => bail!("curl without --cacert accepted the fleet certificate ({})", resp.status),
        Err((code, msg)) => assert_eq!(code, CURL_PEER_FAILED_VERIFICATION, "{msg}"),
    }
    // TLS 1.2 and 1.3 both work.
    for version in ["1.2", "1.3"] {
        let args = ["--cacert", ca, "--tls-max", version];
        assert_eq!(curl_ok(dir, &args, &format!("{base}/login"))?.status, 200, "TLS {version}");
    }
    Ok(())
}

#[test]
fn operator_certificate_is_served_instead_of_the_fleet_one() -> anyhow::Result<()> {
    let certs_dir = tempfile::tempdir()?;
    let operator_ca = gaffer_certs::FleetCa::generate("operator's own CA")?;
    let issued = operator_ca.issue_server_cert(&["localhost".into(), "127.0.0.1".into()])?;
    let cert_file = certs_dir.path().join("dashboard.pem");
    let key_file = certs_dir.path().join("dashboard.key");
    let ca_file = certs_dir.path().join("operator-ca.pem");
    std::fs::write(&cert_file, &issued.cert_pem)?;
    gaffer_certs::write_secret_file(&key_file, issued.key_pem.as_bytes())?;
    std::fs::write(&ca_file, operator_ca.cert_pem())?;

    let cp = start(&[
        "--http-tls",
        "on",
        "--http-tls-cert",
        cert_file.to_str().context("utf-8 path")?,
        "--http-tls-key",
        key_file.to_str().context("utf-8 path")?,
    ])?;
    let dir = cp.dir.path();
    let base = format!("https://localhost:{}", port_of(&cp.http_url)?);
    let resp = curl_ok(dir, &["--cacert", ca_file.to_str().context("utf-8 path")?], &format!("{base}/login"))?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.leaf_cert_base64(), pem_body(&issued.cert_pem), "the operator's certificate is served");
    assert!(resp.set_cookie("__Secure-gaffer_login_csrf").is_some());
    match curl(dir, &["--cacert", ca_pem(&cp).to_str().context("utf-8 path")?], &format!("{base}/login"))? {
        Ok(resp) => bail!("the fleet CA verified the operator's certificate ({})", resp.status),
        Err((code, msg)) => assert_eq!(code, CURL_PEER_FAILED_VERIFICATION, "{msg}"),
    }
    assert!(!cp.log().contains("accessible by group or others"), "a 0600 key draws no warning");
    Ok(())
}

#[test]
fn serve_refuses_a_certificate_without_its_key_or_with_the_wrong_key() -> anyhow::Result<()> {
    let certs_dir = tempfile::tempdir()?;
    let ca = gaffer_certs::FleetCa::generate("operator")?;
    let one = ca.issue_server_cert(&["localhost".into()])?;
    let other = ca.issue_server_cert(&["localhost".into()])?;
    let cert_file = certs_dir.path().join("dashboard.pem");
    let key_file = certs_dir.path().join("other.key");
    std::fs::write(&cert_file, &one.cert_pem)?;
    gaffer_certs::write_secret_file(&key_file, other.key_pem.as_bytes())?;
    let data = certs_dir.path().join("control");
    let init = Command::new(gaffer_tests::bin("gaffer-control"))
        .args(["init", "--json", "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()?;
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let serve = |extra: &[&std::ffi::OsStr]| -> anyhow::Result<(bool, String)> {
        let out = Command::new(gaffer_tests::bin("gaffer-control"))
            .args(["serve", "--http-tls", "on", "--data-dir"])
            .arg(&data)
            .args(extra)
            .output()?;
        Ok((out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let (ok, err) = serve(&["--http-tls-cert".as_ref(), cert_file.as_os_str()])?;
    assert!(!ok && err.contains("--http-tls-key"), "a certificate without its key is refused: {err}");
    let (ok, err) =
        serve(&["--http-tls-cert".as_ref(), cert_file.as_os_str(), "--http-tls-key".as_ref(), key_file.as_os_str()])?;
    assert!(!ok && err.contains("does not belong to the certificate"), "a foreign key is refused: {err}");
    assert!(!err.contains("PRIVATE KEY"), "no key material in the error: {err}");
    Ok(())
}

#[test]
fn auto_tls_is_on_for_a_wildcard_address_and_off_for_loopback() -> anyhow::Result<()> {
    let loopback = ControlPlane::start()?;
    let info = serve_json(&loopback)?;
    assert_eq!(info["http_tls"], false, "auto on 127.0.0.1 is plain HTTP: {info}");
    assert!(loopback.http_url.starts_with("http://127.0.0.1:"), "{}", loopback.http_url);
    let plain = curl_ok(loopback.dir.path(), &[], &format!("{}/login", loopback.http_url))?;
    assert_eq!(plain.status, 200);
    assert!(plain.header("strict-transport-security").is_none(), "no HSTS over plain HTTP");
    let csrf_cookie = plain.set_cookie("gaffer_login_csrf").context("the plain-HTTP cookie name")?;
    assert!(!cookie_attributes(csrf_cookie).iter().any(|a| a == "Secure"), "{csrf_cookie}");
    drop(loopback);

    let wildcard = start(&["--http-listen", "0.0.0.0:0"])?;
    let info = serve_json(&wildcard)?;
    assert_eq!(info["http_tls"], true, "auto on 0.0.0.0 is HTTPS: {info}");
    // The URL names a host the certificate is for (its first server name), not 0.0.0.0.
    assert!(wildcard.http_url.starts_with("https://localhost:"), "{}", wildcard.http_url);
    let ca = ca_pem(&wildcard);
    let resp = curl_ok(wildcard.dir.path(), &["--cacert", ca.to_str().context("utf-8 path")?], &wildcard.http_url)?;
    assert_eq!(resp.status, 303, "to /login");
    assert_eq!(resp.header("strict-transport-security"), Some("max-age=31536000"));
    Ok(())
}

#[test]
fn metrics_token_and_metrics_listener() -> anyhow::Result<()> {
    let secrets = tempfile::tempdir()?;
    let token = "metrics-scraper-7f3a9c2e1b5d4860";
    let token_file = secrets.path().join("metrics.token");
    gaffer_certs::write_secret_file(&token_file, format!("{token}\n").as_bytes())?;

    // A token in front of /metrics, on the HTTPS dashboard listener.
    let cp = start(&["--http-tls", "on", "--metrics-token-file", token_file.to_str().context("utf-8 path")?])?;
    let dir = cp.dir.path();
    let ca = ca_pem(&cp);
    let ca = ca.to_str().context("utf-8 path")?;
    let metrics = format!("https://localhost:{}/metrics", port_of(&cp.http_url)?);
    let without = curl_ok(dir, &["--cacert", ca], &metrics)?;
    assert_eq!(without.status, 401, "no token: {}", without.body);
    assert!(without.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
    assert!(!without.body.contains("gaffer_"), "no metrics without the token");
    let wrong =
        curl_ok(dir, &["--cacert", ca, "-H", "Authorization: Bearer metrics-scraper-7f3a9c2e1b5d4861"], &metrics)?;
    assert_eq!(wrong.status, 401, "a wrong token");
    let api_token =
        curl_ok(dir, &["--cacert", ca, "-H", &format!("Authorization: Bearer {}", cp.api_token)], &metrics)?;
    assert_eq!(api_token.status, 401, "an API token is not the metrics token");
    let with = curl_ok(dir, &["--cacert", ca, "-H", &format!("Authorization: Bearer {token}")], &metrics)?;
    assert_eq!(with.status, 200);
    assert!(with.body.contains("gaffer_agents"), "the Prometheus text: {}", with.body);
    assert!(!cp.log().contains(token), "the token is never logged");
    drop(cp);

    // /metrics on its own plain-HTTP listener; the HTTPS dashboard no longer serves it.
    let cp = start(&["--http-tls", "on", "--metrics-listen", "127.0.0.1:0"])?;
    let dir = cp.dir.path();
    let info = serve_json(&cp)?;
    let metrics_addr = info["metrics_addr"].as_str().context("serve.json has metrics_addr")?.to_owned();
    let scraped = curl_ok(dir, &[], &format!("http://{metrics_addr}/metrics"))?;
    assert_eq!(scraped.status, 200);
    assert!(scraped.body.contains("gaffer_agents"), "{}", scraped.body);
    assert_eq!(curl_ok(dir, &[], &format!("http://{metrics_addr}/login"))?.status, 404, "only /metrics there");
    assert_eq!(curl_ok(dir, &[], &format!("http://{metrics_addr}/api/v1/agents"))?.status, 404);
    let ca = ca_pem(&cp);
    let on_dashboard = curl_ok(
        dir,
        &["--cacert", ca.to_str().context("utf-8 path")?],
        &format!("https://localhost:{}/metrics", port_of(&cp.http_url)?),
    )?;
    assert_eq!(on_dashboard.status, 404, "/metrics moved to its own listener");
    Ok(())
}
