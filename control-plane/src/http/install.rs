//! What a new box needs to install an agent, served without credentials: everything here is
//! public (signed, or checked by a fingerprint the operator pastes), nothing is secret.
//!
//! | route                    | answer |
//! |--------------------------|--------|
//! | `GET /install/agent.sh`  | `installers/install-agent.sh`, compiled in (`text/x-shellscript`) |
//! | `GET /install/ca.pem`    | the fleet CA certificates, PEM: first the CA of the server certificate (the one `token create`'s fingerprint names), then any other CA trusted during a rotation |
//! | `GET /releases/index.json` | `{"release_key_fingerprint", "releases": [{version, arch, file, size_bytes, sha256, added_at, signer_fingerprint}]}`, oldest first, **one release per line** so a POSIX shell installer reads it with `sed` |
//! | `GET /releases/release.pub` | the release public key, 32 bytes (zipsign's format); 404 when this control plane has none |
//! | `GET /releases/{file}`   | the signed artifact `gaffer-agent-VERSION-ARCH-linux.tar.gz`, streamed with `Content-Length`; 404 for any name that is not an added release's |
//!
//! The installer's trust does not rest on this transport alone: it checks `ca.pem` against the
//! fingerprint the operator pasted and then talks HTTPS only with that CA, checks the artifact's
//! SHA-256 against `index.json` and its signature against `release.pub` (see ARCHITECTURE.md,
//! "Installing an agent"). Artifact names are parsed as release names (no `/`, no `..`) and looked
//! up in the index, so no path outside the releases directory is ever opened. The router's body
//! limit and request timeout apply as to every route (the timeout covers the answer's start; the
//! artifact then streams).
//!
//! [`install_command`] is the one-line install `gaffer-control token create` prints.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use gaffer_certs::ReleaseName;

use super::{blocking, AppError, HttpState};
use crate::datadir::DataDir;
use crate::release::{ReleaseError, ReleaseKeySource, ReleaseRecord, Releases};

/// The installer script, as `GET /install/agent.sh` serves it.
pub const INSTALL_AGENT_SH: &str = include_str!("../../../installers/install-agent.sh");

/// Longest artifact name looked up, bytes (a release name is far shorter).
const ARTIFACT_NAME_BYTES_MAX: usize = 200;

/// `GET /install/agent.sh`.
pub(crate) async fn agent_sh() -> Response {
    (
        [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")],
        INSTALL_AGENT_SH,
    )
        .into_response()
}

/// `GET /install/ca.pem`.
pub(crate) async fn ca_pem(State(state): State<HttpState>) -> Result<Response, AppError> {
    let pki = state.app.pki.as_ref().ok_or_else(|| AppError::NotFound("the fleet CA (no PKI loaded)".into()))?;
    let (_, server_ca) = pki.server_pair();
    let mut pem = server_ca.clone();
    for other in pki.trusted_ca_pems() {
        if other != server_ca {
            pem.push_str(&other);
        }
    }
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file"), (header::CACHE_CONTROL, "no-cache")], pem).into_response())
}

fn data_dir(state: &HttpState) -> Result<DataDir, AppError> {
    state
        .app
        .pki
        .as_ref()
        .map(|pki| pki.data_dir().clone())
        .ok_or_else(|| AppError::NotFound("releases (no data directory)".into()))
}

fn release_error(e: ReleaseError) -> AppError {
    AppError::Internal(format!("reading the releases: {e}"))
}

/// `GET /releases/index.json`.
pub(crate) async fn releases_index(State(state): State<HttpState>) -> Result<Response, AppError> {
    let dd = data_dir(&state)?;
    let (records, key) = blocking(move || {
        let key = ReleaseKeySource::open(&dd).map(|source| source.current());
        Releases::new(&dd).list().and_then(|records| Ok((records, key?)))
    })
    .await?
    .map_err(release_error)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")],
        index_json(&records, key.map(|k| k.fingerprint().to_string())),
    )
        .into_response())
}

/// The index as `GET /releases/index.json` writes it: one release per line.
fn index_json(records: &[ReleaseRecord], key_fingerprint: Option<String>) -> String {
    let lines: Vec<String> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "version": r.version,
                "arch": r.arch,
                "file": r.file_name,
                "size_bytes": r.size_bytes,
                "sha256": r.sha256,
                "added_at": crate::admin::rfc3339_ms(r.added_at_ms),
                "signer_fingerprint": r.signer_fingerprint,
            })
            .to_string()
        })
        .collect();
    let head = serde_json::json!({ "release_key_fingerprint": key_fingerprint }).to_string();
    // `{"release_key_fingerprint":…` without its closing brace, then the releases array.
    let head = head.strip_suffix('}').unwrap_or(&head);
    if lines.is_empty() {
        format!("{head},\"releases\":[]}}\n")
    } else {
        format!("{head},\"releases\":[\n{}\n]}}\n", lines.join(",\n"))
    }
}

/// `GET /releases/release.pub`.
pub(crate) async fn release_pub(State(state): State<HttpState>) -> Result<Response, AppError> {
    let dd = data_dir(&state)?;
    let key = blocking(move || ReleaseKeySource::open(&dd).map(|source| source.current()))
        .await?
        .map_err(release_error)?
        .ok_or_else(|| AppError::NotFound("release key".into()))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream"), (header::CACHE_CONTROL, "no-cache")],
        key.as_bytes().to_vec(),
    )
        .into_response())
}

/// `GET /releases/{file}`.
pub(crate) async fn release_file(
    State(state): State<HttpState>,
    Path(file): Path<String>,
) -> Result<Response, AppError> {
    let not_found = || {
        let shown = if file.len() <= ARTIFACT_NAME_BYTES_MAX { file.as_str() } else { "(a long name)" };
        AppError::NotFound(format!("release {shown}"))
    };
    if file.len() > ARTIFACT_NAME_BYTES_MAX {
        return Err(not_found());
    }
    let name = ReleaseName::parse(&file).map_err(|_| not_found())?;
    let releases = Releases::new(&data_dir(&state)?);
    let found = {
        let releases = releases.clone();
        blocking(move || releases.get(&name.version, &name.arch)).await?.map_err(release_error)?
    };
    let record = found.filter(|r| r.file_name == file).ok_or_else(not_found)?;
    let path = releases.artifact_path(&record);
    let opened = tokio::fs::File::open(&path).await;
    let artifact = opened.map_err(|e| AppError::Internal(format!("{}: {e}", path.display())))?;
    let len = artifact.metadata().await.map_err(|e| AppError::Internal(format!("{}: {e}", path.display())))?.len();
    if len != record.size_bytes {
        return Err(AppError::Internal(format!(
            "{} is {len} bytes but the index says {}: the releases directory was changed by hand",
            path.display(),
            record.size_bytes
        )));
    }
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(artifact)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/gzip"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    // A release never changes its bytes (`release add` refuses that).
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400, immutable"));
    Ok(response)
}

/// The one-line install for an enrollment token: fetch `install-agent.sh` from this control plane
/// and run it as root with the token and the CA fingerprint. `url` is the dashboard's base URL
/// (`https://HOST:PORT`), `control` the QUIC `HOST:PORT` agents enroll with.
///
/// Over HTTPS the box does not trust the fleet CA yet, so the line fetches `ca.pem` first, keeps
/// only its first certificate, checks it against the fingerprint, and fetches the script with it
/// as the only trusted CA; over plain HTTP (loopback) it fetches the script directly.
pub fn install_command(url: &str, control: &str, token: &str, ca_fingerprint: &str) -> String {
    let url = url.trim_end_matches('/');
    let args = format!("--url {url} --control {control} --token {token} --ca-fingerprint {ca_fingerprint}");
    if url.starts_with("https://") {
        format!(
            "curl -fsSk {url}/install/ca.pem | openssl x509 -out gaffer-ca.pem && openssl x509 -in gaffer-ca.pem \
             -outform DER | sha256sum | grep -q '^{ca_fingerprint} ' && curl -fsSL --cacert gaffer-ca.pem \
             {url}/install/agent.sh | sudo sh -s -- {args}"
        )
    } else {
        format!("curl -fsSL {url}/install/agent.sh | sudo sh -s -- {args}")
    }
}

/// Where a new box reaches this control plane: `(dashboard base URL, QUIC HOST:PORT)`. From
/// `serve.json` while `serve` runs, else from the configured listen addresses (HTTPS unless the
/// dashboard listens on loopback, as `--http-tls auto` does). A host is the listen address when
/// it is one of the server names, else the first server name.
///
/// # Errors
/// The data directory's configuration cannot be read.
pub fn install_endpoints(dd: &DataDir) -> Result<(String, String), crate::datadir::DataDirError> {
    let config = dd.load_config()?;
    let host = |addr: SocketAddr| -> String {
        let ip = addr.ip().to_string();
        let name = if config.server_names.contains(&ip) {
            if addr.is_ipv6() {
                format!("[{ip}]")
            } else {
                ip
            }
        } else {
            config.server_names.first().cloned().unwrap_or(ip)
        };
        format!("{name}:{}", addr.port())
    };
    let serve: Option<serde_json::Value> =
        std::fs::read(dd.root().join("serve.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let running = serve.as_ref().and_then(|s| {
        let quic: SocketAddr = s["quic_addr"].as_str()?.parse().ok()?;
        let http: SocketAddr = s["http_addr"].as_str()?.parse().ok()?;
        Some((quic, http, s["http_tls"].as_bool()?))
    });
    let (quic, http, tls) =
        running.unwrap_or((config.quic_listen, config.http_listen, !config.http_listen.ip().is_loopback()));
    let scheme = if tls { "https" } else { "http" };
    Ok((format!("{scheme}://{}", host(http)), host(quic)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_json_with_one_release_per_line() -> Result<(), Box<dyn std::error::Error>> {
        let fp: gaffer_certs::ReleaseKeyFingerprint = "ab".repeat(32).parse()?;
        let record = |version: &str| ReleaseRecord {
            version: version.into(),
            arch: "x86_64".into(),
            file_name: format!("gaffer-agent-{version}-x86_64-linux.tar.gz"),
            sha256: "cd".repeat(32),
            size_bytes: 1234,
            added_at_ms: 1_700_000_000_000,
            added_by: "local".into(),
            signer_fingerprint: fp,
        };
        let text = index_json(&[record("1.0.0"), record("1.1.0")], Some(fp.to_string()));
        let v: serde_json::Value = serde_json::from_str(&text)?;
        assert_eq!(v["release_key_fingerprint"], fp.to_string());
        assert_eq!(v["releases"][1]["file"], "gaffer-agent-1.1.0-x86_64-linux.tar.gz");
        assert_eq!(v["releases"][0]["size_bytes"], 1234);
        let release_lines: Vec<&str> = text.lines().filter(|l| l.contains("\"version\"")).collect();
        assert_eq!(release_lines.len(), 2);
        assert!(release_lines[0].contains("\"version\":\"1.0.0\"") && release_lines[0].contains("\"sha256\""));
        let empty: serde_json::Value = serde_json::from_str(&index_json(&[], None))?;
        assert_eq!(empty["releases"], serde_json::json!([]));
        assert!(empty["release_key_fingerprint"].is_null());
        Ok(())
    }

    #[test]
    fn the_install_line_pins_the_ca_over_https_only() {
        let https = install_command("https://gaffer.lan:8080/", "gaffer.lan:7443", "gfe_x", "ab12");
        assert!(https.contains("sha256sum | grep -q '^ab12 '"), "{https}");
        assert!(https.contains("curl -fsSL --cacert gaffer-ca.pem https://gaffer.lan:8080/install/agent.sh"));
        assert!(https
            .ends_with("--url https://gaffer.lan:8080 --control gaffer.lan:7443 --token gfe_x --ca-fingerprint ab12"));
        let http = install_command("http://127.0.0.1:8080", "127.0.0.1:7443", "gfe_x", "ab12");
        assert!(http.starts_with("curl -fsSL http://127.0.0.1:8080/install/agent.sh | sudo sh -s -- --url"), "{http}");
    }
}
