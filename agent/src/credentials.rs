//! The agent's key and certificate on disk: the pair in use, the next pair during a renewal, the
//! trust bundle, and when to renew.
//!
//! ```text
//! DATA_DIR/agent.key            current key, 0600
//! DATA_DIR/agent.pem            current certificate
//! DATA_DIR/agent.next.key       renewal key, 0600: made on the box and written BEFORE its CSR is sent;
//!                               reused when an earlier request's answer was lost
//! DATA_DIR/agent.next.pem       the renewal key's certificate, until a connection with it is welcomed
//! DATA_DIR/cert-installed.json  {"serial_hex": "...", "installed_at_ms": N}: when the newest certificate arrived
//! DATA_DIR/ca.pem               trust bundle: 1 to 4 CA certificates (2 during a CA rotation)
//! ```
//!
//! # Renewal
//! A certificate is due for renewal half way between its arrival (`cert-installed.json`, written
//! whenever a certificate is installed; the certificate's `notBefore` when the record is for another
//! certificate, which only moves renewal earlier) and its `notAfter`: [`renewal_due_at_ms`]. The
//! link ([`crate::link`]) asks for a certificate for `agent.next.key` over the link, stores the
//! answer as `agent.next.pem` ([`install_next_cert`]), and connects with the next pair at once;
//! when that connection is welcomed it calls [`promote`]. A next pair the control plane refuses in
//! the handshake is dropped ([`discard_next_cert`]) while the current certificate is still valid.
//! `gaffer-agent enroll --renew` goes through the same files.
//!
//! # Crash safety
//! Every file is replaced by write-to-temporary, fsync, rename, fsync of the directory
//! ([`gaffer_certs::write_secret_file`]), so a file is always either its old or its new content.
//! [`promote`] renames the key first, then the certificate. At every point the directory holds a
//! key and certificate that belong together, and [`Credentials::load`] finds it:
//!
//! | step                                     | agent.key | agent.pem | agent.next.key | agent.next.pem | working pair      |
//! |------------------------------------------|-----------|-----------|----------------|----------------|-------------------|
//! | enrolled / renewed                       | K0        | C0        | -              | -              | K0+C0 (current)   |
//! | renewal key written, CSR sent            | K0        | C0        | K1             | -              | K0+C0             |
//! | certificate received                     | K0        | C0        | K1             | C1             | K1+C1 (next), K0+C0 |
//! | promote: key renamed                     | K1        | C0        | -              | C1             | K1+C1 (agent.key + agent.next.pem) |
//! | promote: certificate renamed             | K1        | C1        | -              | -              | K1+C1 (current)   |
//!
//! A promotion is only ever started after a connection with the next pair was welcomed, so
//! [`recover`] finishes an interrupted one (the fourth row) at the next start.

use std::fmt;
use std::path::Path;

use gaffer_certs::AgentKey;
use gaffer_protocol::messages::AgentId;
use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::AgentError;

/// Shortest wait before asking again after the control plane refused a CSR or a renewed
/// certificate.
pub const RENEWAL_RETRY_MIN_MS: u64 = 5_000;
/// Longest wait before asking again after a refusal (the wait is a tenth of the remaining
/// validity, between [`RENEWAL_RETRY_MIN_MS`] and this).
pub const RENEWAL_RETRY_MAX_MS: u64 = 3_600_000;
/// Largest `cert-installed.json` read, bytes.
const INSTALLED_RECORD_BYTES_MAX: u64 = 4096;

/// When a certificate that arrived at `installed_at_ms` and is valid until `not_after_ms` is due for
/// renewal: half way between the two (Unix milliseconds). An arrival after `notAfter` counts as
/// `notAfter` (due at once).
pub fn renewal_due_at_ms(installed_at_ms: u64, not_after_ms: u64) -> u64 {
    let start = installed_at_ms.min(not_after_ms);
    start + (not_after_ms - start) / 2
}

/// How long to wait before asking again after a refusal at `now_ms` of a certificate valid until
/// `not_after_ms`: a tenth of the remaining validity, at least [`RENEWAL_RETRY_MIN_MS`], at most
/// [`RENEWAL_RETRY_MAX_MS`] (milliseconds).
pub fn renewal_retry_after_ms(now_ms: u64, not_after_ms: u64) -> u64 {
    (not_after_ms.saturating_sub(now_ms) / 10).clamp(RENEWAL_RETRY_MIN_MS, RENEWAL_RETRY_MAX_MS)
}

/// A key and the certificate issued for it, both for this agent. `Debug` does not print the key.
#[derive(Clone)]
pub struct CertPair {
    /// The private key, PKCS#8 PEM (secret).
    pub key_pem: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate's serial, lowercase hex.
    pub serial_hex: String,
    /// Its `notBefore`, Unix milliseconds.
    pub not_before_ms: u64,
    /// Its `notAfter`, Unix milliseconds.
    pub not_after_ms: u64,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("serial_hex", &self.serial_hex)
            .field("not_before_ms", &self.not_before_ms)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// Pairs `key_pem` with `cert_pem` if the certificate is for that key and names `agent_id`.
    ///
    /// # Errors
    /// [`AgentError::Cert`] for unreadable PEM or a certificate for another key;
    /// [`AgentError::Protocol`] for a certificate naming another agent.
    pub fn new(key_pem: String, cert_pem: String, agent_id: AgentId) -> Result<Self, AgentError> {
        let key = AgentKey::from_pem(&key_pem)?;
        let id = key.check_issued_cert(&cert_pem)?;
        if id != agent_id {
            return Err(AgentError::Protocol(format!("the certificate names agent {id}, not this agent ({agent_id})")));
        }
        let der = cert_der(&cert_pem)?;
        let (not_before, not_after) = gaffer_certs::cert_validity_unix(&der)?;
        let serial_hex = gaffer_certs::cert_serial_hex(&der)?;
        let ms = |secs: i64| u64::try_from(secs).unwrap_or(0).saturating_mul(1000);
        Ok(Self { key_pem, cert_pem, serial_hex, not_before_ms: ms(not_before), not_after_ms: ms(not_after) })
    }

    /// Whether the certificate has expired at `now_ms`.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        now_ms >= self.not_after_ms
    }
}

fn cert_der(cert_pem: &str) -> Result<rustls_pki_types::CertificateDer<'static>, AgentError> {
    use rustls_pki_types::pem::PemObject as _;
    if cert_pem.len() > gaffer_certs::PEM_BYTES_MAX {
        return Err(AgentError::Config(format!("certificate of {} bytes: not a certificate", cert_pem.len())));
    }
    rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| AgentError::Config(format!("unreadable certificate: {e}")))
}

/// Which files a pair comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// `agent.key` + `agent.pem`.
    Current,
    /// The renewal: `agent.next.key` + `agent.next.pem`, or `agent.key` + `agent.next.pem` in an
    /// interrupted promotion.
    Next,
}

/// `cert-installed.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstalledRecord {
    /// Serial of the certificate it is about, lowercase hex.
    pub serial_hex: String,
    /// When that certificate arrived on this box, Unix milliseconds.
    pub installed_at_ms: u64,
}

/// What the data directory holds, read without changing anything.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// `agent.key` + `agent.pem`, when they belong together and name this agent.
    pub current: Option<CertPair>,
    /// The renewal's pair, when its certificate has arrived.
    pub next: Option<CertPair>,
    /// `agent.next.key` exists (a renewal was started; its certificate may not have arrived).
    pub next_key_present: bool,
    /// A promotion was interrupted: `agent.key` is the next key and `agent.next.pem` its
    /// certificate ([`recover`] finishes it).
    pub promotion_interrupted: bool,
    /// `cert-installed.json`, if readable.
    pub installed: Option<InstalledRecord>,
}

fn read_optional(path: &Path) -> Result<Option<String>, AgentError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(path, e)),
    }
}

fn pair_of(key: &Option<String>, cert: &Option<String>, agent_id: AgentId) -> Option<CertPair> {
    match (key, cert) {
        (Some(k), Some(c)) => CertPair::new(k.clone(), c.clone(), agent_id).ok(),
        _ => None,
    }
}

impl Credentials {
    /// Reads the key, certificate and renewal files of `dd` for `agent_id`. Files that are missing,
    /// unreadable as PEM or do not belong together simply form no pair.
    ///
    /// # Errors
    /// [`AgentError::Io`] when a file exists but cannot be read.
    pub fn load(dd: &DataDir, agent_id: AgentId) -> Result<Self, AgentError> {
        let key = read_optional(&dd.key_path())?;
        let cert = read_optional(&dd.cert_path())?;
        let next_key = read_optional(&dd.next_key_path())?;
        let next_cert = read_optional(&dd.next_cert_path())?;
        let current = pair_of(&key, &cert, agent_id);
        let mut next = pair_of(&next_key, &next_cert, agent_id);
        let mut promotion_interrupted = false;
        if next.is_none() && current.is_none() {
            next = pair_of(&key, &next_cert, agent_id);
            promotion_interrupted = next.is_some();
        }
        Ok(Self {
            current,
            next,
            next_key_present: next_key.is_some(),
            promotion_interrupted,
            installed: read_installed(dd),
        })
    }

    /// When `pair`'s certificate arrived: the record's time when it is about this certificate,
    /// else the certificate's `notBefore` (earlier than its arrival, so renewal is never late).
    pub fn installed_at_ms(&self, pair: &CertPair) -> u64 {
        match &self.installed {
            Some(r) if r.serial_hex == pair.serial_hex => r.installed_at_ms,
            _ => pair.not_before_ms,
        }
    }

    /// When `pair` is due for renewal ([`renewal_due_at_ms`]), Unix milliseconds.
    pub fn renewal_due_at_ms(&self, pair: &CertPair) -> u64 {
        renewal_due_at_ms(self.installed_at_ms(pair), pair.not_after_ms)
    }

    /// The pair to connect with: the next pair when there is one (a renewed certificate is tried
    /// on the next connection) unless its serial is `refused_next_serial` and a current pair
    /// exists; else the current pair.
    pub fn for_connecting(&self, refused_next_serial: Option<&str>) -> Option<(Slot, &CertPair)> {
        match (&self.next, &self.current) {
            (Some(next), Some(_)) if refused_next_serial != Some(next.serial_hex.as_str()) => Some((Slot::Next, next)),
            (Some(next), None) => Some((Slot::Next, next)),
            (_, Some(current)) => Some((Slot::Current, current)),
            (None, None) => None,
        }
    }

    /// The newest pair: the next one if its certificate has arrived, else the current one.
    pub fn newest(&self) -> Option<&CertPair> {
        self.next.as_ref().or(self.current.as_ref())
    }
}

fn read_installed(dd: &DataDir) -> Option<InstalledRecord> {
    let path = dd.cert_installed_path();
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > INSTALLED_RECORD_BYTES_MAX {
        return None;
    }
    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
}

/// Records that the certificate `serial_hex` arrived at `installed_at_ms` (atomically replaces
/// `cert-installed.json`).
///
/// # Errors
/// [`AgentError::Cert`] (I/O) when it cannot be written.
pub fn record_installed(dd: &DataDir, serial_hex: &str, installed_at_ms: u64) -> Result<(), AgentError> {
    let record = InstalledRecord { serial_hex: serial_hex.to_owned(), installed_at_ms };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| AgentError::Config(e.to_string()))?;
    gaffer_certs::write_secret_file(&dd.cert_installed_path(), &json)?;
    Ok(())
}

/// The renewal key: `agent.next.key` when it exists and is readable (an earlier request's answer
/// was lost: the same key is asked for again), else a new ECDSA P-256 key made here and written
/// 0600 before this returns, so it is on disk before its CSR is sent.
///
/// # Errors
/// [`AgentError::Cert`] when no key can be made or written; [`AgentError::Io`] when the file
/// exists but cannot be read.
pub fn next_key(dd: &DataDir) -> Result<AgentKey, AgentError> {
    let path = dd.next_key_path();
    if let Some(pem) = read_optional(&path)? {
        match AgentKey::from_pem(&pem) {
            Ok(key) => return Ok(key),
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "unreadable renewal key; making a new one"),
        }
    }
    let key = AgentKey::generate()?;
    // An `agent.next.pem` left from an older renewal key pairs with nothing now and is replaced
    // by the answer to this key's request (it is not removed here: in an interrupted promotion
    // it belongs to `agent.key`).
    gaffer_certs::write_secret_file(&path, key.key_pem().as_bytes())?;
    Ok(key)
}

/// Stores a certificate the control plane issued for `agent.next.key` as `agent.next.pem` and
/// records its arrival at `now_ms`. Checks first: it is for that key and names `agent_id`, and has
/// not expired.
///
/// # Errors
/// [`AgentError::Config`] when no renewal key is on disk or the certificate has expired;
/// [`AgentError::Cert`] for a certificate for another key or unreadable PEM;
/// [`AgentError::Protocol`] for a certificate naming another agent; I/O errors.
pub fn install_next_cert(dd: &DataDir, agent_id: AgentId, cert_pem: &str, now_ms: u64) -> Result<CertPair, AgentError> {
    let key_pem = read_optional(&dd.next_key_path())?.ok_or_else(|| {
        AgentError::Config("a certificate arrived but no renewal key (agent.next.key) is on disk".into())
    })?;
    let pair = CertPair::new(key_pem, cert_pem.to_owned(), agent_id)?;
    if pair.expired_at(now_ms) {
        return Err(AgentError::Config(format!("the issued certificate {} has already expired", pair.serial_hex)));
    }
    gaffer_certs::write_secret_file(&dd.next_cert_path(), cert_pem.as_bytes())?;
    record_installed(dd, &pair.serial_hex, now_ms)?;
    Ok(pair)
}

/// Makes the next pair the current one (the key is renamed first, then the certificate; see the
/// module docs), or finishes an interrupted promotion. Call it only once a connection with the
/// next pair has been welcomed (or the control plane handed out its certificate itself: `enroll
/// --renew`, reply bundles). Returns the new current pair.
///
/// # Errors
/// [`AgentError::Config`] when there is no next pair to promote; I/O errors (the directory then
/// still holds a working pair: see the module docs).
pub fn promote(dd: &DataDir, agent_id: AgentId) -> Result<CertPair, AgentError> {
    let creds = Credentials::load(dd, agent_id)?;
    let Some(next) = creds.next else {
        return Err(AgentError::Config("no renewed key and certificate to switch to".into()));
    };
    if !creds.promotion_interrupted {
        rename_synced(dd, &dd.next_key_path(), &dd.key_path())?;
    }
    rename_synced(dd, &dd.next_cert_path(), &dd.cert_path())?;
    Ok(next)
}

/// Finishes a promotion a crash interrupted (see the module docs); returns whether there was one.
///
/// # Errors
/// As [`promote`].
pub fn recover(dd: &DataDir, agent_id: AgentId) -> Result<bool, AgentError> {
    if !Credentials::load(dd, agent_id)?.promotion_interrupted {
        return Ok(false);
    }
    promote(dd, agent_id)?;
    Ok(true)
}

/// Removes `agent.next.pem` (a renewed certificate the control plane refused); the renewal key is
/// kept and asked for again.
///
/// # Errors
/// [`AgentError::Io`].
pub fn discard_next_cert(dd: &DataDir) -> Result<(), AgentError> {
    remove_if_present(&dd.next_cert_path())
}

fn remove_if_present(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::io(path, e)),
    }
}

fn rename_synced(dd: &DataDir, from: &Path, to: &Path) -> Result<(), AgentError> {
    std::fs::rename(from, to).map_err(|e| AgentError::io(from, e))?;
    std::fs::File::open(dd.root()).and_then(|d| d.sync_all()).map_err(|e| AgentError::io(dd.root(), e))
}

/// The CA certificates of `ca.pem`, each as its own PEM text, in file order.
///
/// # Errors
/// [`AgentError::Io`] when it cannot be read; [`AgentError::Cert`] when it is not a trust bundle
/// ([`gaffer_certs::trust_bundle_from_pem`]).
pub fn trust_bundle(dd: &DataDir) -> Result<Vec<String>, AgentError> {
    split_trust_bundle(&dd.read(&dd.ca_path())?)
}

/// Checks `pem` with [`gaffer_certs::trust_bundle_from_pem`] (1 to 4 CA certificates) and returns
/// each certificate as its own PEM text.
///
/// # Errors
/// [`AgentError::Cert`] when it is not a trust bundle.
pub fn split_trust_bundle(pem: &str) -> Result<Vec<String>, AgentError> {
    gaffer_certs::trust_bundle_from_pem(pem)?;
    let blocks = pem::parse_many(pem).map_err(|e| AgentError::Config(format!("unreadable trust bundle: {e}")))?;
    Ok(blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| pem::encode_config(b, pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF)))
        .collect())
}

/// Replaces `ca.pem` with the CAs of `ca_pems` (one PEM certificate each; never empty), atomically,
/// when they differ from what it holds. Returns whether it changed.
///
/// # Errors
/// [`AgentError::Config`] for an empty set; [`AgentError::Cert`] for anything that is not a trust
/// bundle of CA certificates (nothing is written); I/O errors.
pub fn write_trust_bundle(dd: &DataDir, ca_pems: &[String]) -> Result<bool, AgentError> {
    let joined = check_trust_bundle(ca_pems)?;
    let new = gaffer_certs::trust_bundle_from_pem(&joined)?;
    let old = read_optional(&dd.ca_path())?.and_then(|s| gaffer_certs::trust_bundle_from_pem(&s).ok());
    if old.as_deref() == Some(new.as_slice()) {
        return Ok(false);
    }
    gaffer_certs::write_secret_file(&dd.ca_path(), joined.as_bytes())?;
    Ok(true)
}

/// Checks a trust set as the control plane sends it (one PEM CA certificate per entry, 1 to
/// [`gaffer_certs::TRUST_BUNDLE_CAS_MAX`]) and returns it as the text of `ca.pem`.
///
/// # Errors
/// [`AgentError::Config`] for an empty set or an entry that is not exactly one certificate;
/// [`AgentError::Cert`] for a non-CA certificate, too many or unreadable PEM.
pub fn check_trust_bundle(ca_pems: &[String]) -> Result<String, AgentError> {
    if ca_pems.is_empty() {
        return Err(AgentError::Config("the control plane sent an empty trust bundle; keeping ca.pem".into()));
    }
    let mut joined = String::new();
    for pem in ca_pems {
        joined.push_str(pem.trim());
        joined.push('\n');
    }
    let cas = gaffer_certs::trust_bundle_from_pem(&joined)?;
    if ca_pems.len() != cas.len() {
        return Err(AgentError::Config(format!(
            "the trust bundle has {} entries but {} certificates; keeping ca.pem",
            ca_pems.len(),
            cas.len()
        )));
    }
    Ok(joined)
}

/// The CA of `ca_pems` (PEM, one certificate each) that issued `cert_pem` (a certificate of this
/// agent), found by verifying the certificate against each; None when none did (or it expired).
pub fn issuer_of<'a>(ca_pems: &'a [String], cert_pem: &str, agent_id: AgentId) -> Option<&'a String> {
    let der = cert_der(cert_pem).ok()?;
    ca_pems.iter().find(|ca| {
        gaffer_certs::verify_signer(
            gaffer_certs::BundleTrust { ca_pem: ca, crl_pem: "" },
            &der,
            gaffer_certs::BundleSignerRole::Agent(agent_id),
            gaffer_certs::UnixTime::now(),
        )
        .is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_half_way_from_arrival_to_expiry() {
        // 7 days from arrival: due after 3.5 days.
        let day = 86_400_000;
        assert_eq!(renewal_due_at_ms(10 * day, 17 * day), 10 * day + day * 7 / 2);
        // A 60 s certificate backdated by 60 s, arriving now: due in 30 s, not at once.
        let now = 1_700_000_000_000;
        assert_eq!(renewal_due_at_ms(now, now + 60_000), now + 30_000);
        // Arrived after it expired (a clock jump): due at expiry, i.e. now.
        assert_eq!(renewal_due_at_ms(now + 5, now), now);
    }

    #[test]
    fn retry_after_a_refusal_is_a_tenth_of_what_is_left_within_bounds() {
        let now = 1_700_000_000_000;
        assert_eq!(renewal_retry_after_ms(now, now + 600_000), 60_000);
        assert_eq!(renewal_retry_after_ms(now, now + 10_000), RENEWAL_RETRY_MIN_MS);
        assert_eq!(renewal_retry_after_ms(now, now - 10_000), RENEWAL_RETRY_MIN_MS, "expired: the minimum");
        assert_eq!(renewal_retry_after_ms(now, now + 7 * 86_400_000), RENEWAL_RETRY_MAX_MS);
    }
}
