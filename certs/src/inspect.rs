//! Reading certificates: PEM decoding with limits, the agent identity in the URI SAN, expiry, serial.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::CertError;

/// Largest PEM input (certificate, chain, key or CSR) this crate parses: 64 KiB. Larger inputs are
/// rejected with [`CertError::TooLarge`] before any decoding. Gaffer's own PEM objects are < 2 KiB.
pub const PEM_BYTES_MAX: usize = 64 * 1024;

/// Prefix of the URI SAN that carries an agent's identity; the full SAN is
/// `urn:gaffer:agent:<uuid>` with the UUID in lowercase hyphenated form.
pub const AGENT_URI_SAN_PREFIX: &str = "urn:gaffer:agent:";

/// The URI SAN naming `agent_id`: `urn:gaffer:agent:<uuid>` (lowercase, hyphenated).
pub fn agent_uri_san(agent_id: Uuid) -> String {
    format!("{AGENT_URI_SAN_PREFIX}{}", agent_id.hyphenated())
}

pub(crate) fn check_pem_len(pem: &str, what: &'static str) -> Result<(), CertError> {
    if pem.len() > PEM_BYTES_MAX {
        return Err(CertError::TooLarge { what, len_bytes: pem.len(), max_bytes: PEM_BYTES_MAX });
    }
    Ok(())
}

/// All `CERTIFICATE` blocks of `pem`, in order; at least one.
pub(crate) fn cert_chain_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    check_pem_len(pem, what)?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::InvalidPem { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::InvalidPem { what, reason: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

/// The one `CERTIFICATE` block of `pem`.
pub(crate) fn single_cert_der_from_pem(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, CertError> {
    let mut certs = cert_chain_from_pem(pem, what)?;
    match certs.len() {
        1 => Ok(certs.remove(0)),
        n => Err(CertError::InvalidPem { what, reason: format!("expected exactly one CERTIFICATE block, found {n}") }),
    }
}

/// A PKCS#8 / SEC1 private key from PEM. The error never includes key material.
pub(crate) fn private_key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, CertError> {
    check_pem_len(pem, what)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CertError::InvalidPem { what, reason: "no readable PRIVATE KEY block found".into() })
}

/// PEM-encodes DER with LF line endings.
pub(crate) fn encode_pem(tag: &str, der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new(tag, der), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
}

pub(crate) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(CertError::invalid_cert)?;
    if !rest.is_empty() {
        return Err(CertError::invalid_cert(format!("{} trailing bytes after the certificate", rest.len())));
    }
    Ok(cert)
}

/// The agent id in a certificate's URI SAN `urn:gaffer:agent:<uuid>`.
///
/// This only *reads* the certificate; it does not verify it. Call it on certificates rustls has
/// already verified (see [`peer_agent_id`]).
///
/// Errors: [`CertError::InvalidCertificate`] if `der` is not an X.509 certificate;
/// [`CertError::NoAgentIdentity`] if it has no such SAN, a malformed UUID after the prefix, or two
/// different agent ids.
pub fn agent_id_from_cert_der(der: &[u8]) -> Result<Uuid, CertError> {
    let cert = parse_x509(der)?;
    let san = cert
        .subject_alternative_name()
        .map_err(CertError::invalid_cert)?
        .ok_or_else(|| CertError::NoAgentIdentity { reason: "certificate has no subject alternative names".into() })?;
    let mut found: Option<Uuid> = None;
    for name in &san.value.general_names {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(id) = uri.strip_prefix(AGENT_URI_SAN_PREFIX) else {
            continue;
        };
        let id = Uuid::try_parse(id)
            .map_err(|e| CertError::NoAgentIdentity { reason: format!("malformed agent id in URI SAN: {e}") })?;
        match found {
            Some(prev) if prev != id => {
                return Err(CertError::NoAgentIdentity { reason: "certificate names more than one agent".into() })
            }
            _ => found = Some(id),
        }
    }
    found.ok_or_else(|| CertError::NoAgentIdentity {
        reason: format!("no URI SAN starting with {AGENT_URI_SAN_PREFIX}"),
    })
}

/// For the control plane: the agent id of the peer of an accepted connection, from the first
/// (end-entity) certificate of `peer_certs` (quinn: `Connection::peer_identity()` downcast to
/// `Vec<CertificateDer>`; rustls: `ServerConnection::peer_certificates()`).
///
/// rustls has already verified the chain against the fleet CA by the time this is called, so an `Ok`
/// is an authenticated agent. Errors: [`CertError::NoAgentIdentity`] if the client sent no
/// certificate (an enrollment-style client on `gaffer/1`: close the connection) or the certificate
/// has no agent identity.
pub fn peer_agent_id(peer_certs: &[CertificateDer<'_>]) -> Result<Uuid, CertError> {
    let first = peer_certs
        .first()
        .ok_or_else(|| CertError::NoAgentIdentity { reason: "the peer presented no client certificate".into() })?;
    agent_id_from_cert_der(first)
}

fn der_from_pem_or_der(pem_or_der: &[u8]) -> Result<CertificateDer<'static>, CertError> {
    let trimmed = pem_or_der.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let pem = std::str::from_utf8(pem_or_der)
            .map_err(|_| CertError::InvalidPem { what: "certificate", reason: "not UTF-8".into() })?;
        single_cert_der_from_pem(pem, "certificate")
    } else {
        Ok(CertificateDer::from(pem_or_der.to_vec()))
    }
}

/// The end of a certificate's validity (`notAfter`) as Unix seconds (UTC). Accepts one certificate
/// as PEM text (starting with `-----BEGIN`) or as DER bytes. Used to schedule renewal.
///
/// Errors: [`CertError::InvalidPem`] / [`CertError::InvalidCertificate`] for unreadable input.
pub fn cert_not_after_unix(pem_or_der: &[u8]) -> Result<i64, CertError> {
    let der = der_from_pem_or_der(pem_or_der)?;
    let cert = parse_x509(&der)?;
    Ok(cert.validity().not_after.timestamp())
}

/// A certificate's serial number as lowercase hex of its DER INTEGER content bytes (what
/// [`crate::RevokedCert::serial_hex`] expects). Accepts PEM text or DER bytes like
/// [`cert_not_after_unix`].
pub fn cert_serial_hex(pem_or_der: &[u8]) -> Result<String, CertError> {
    let der = der_from_pem_or_der(pem_or_der)?;
    let cert = parse_x509(&der)?;
    Ok(hex::encode(cert.raw_serial()))
}
