//! The control plane's client-certificate verifier for the agent link: the fleet's trusted CAs
//! (one, or two during a CA rotation), live revocation, and a reason for every refusal.
//!
//! rustls' `WebPkiClientVerifier` checks the chain, validity and EKU; this wrapper adds what it
//! cannot know: whether the agent the certificate names has been revoked *now* (asked of a
//! [`ClientCertPolicy`] at every handshake, so a revocation bites without rebuilding any CRL), and
//! a [`ClientCertRefusal`] for every refused handshake, which the policy counts (the control plane's
//! `gaffer_link_refused_total{reason}`).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use uuid::Uuid;

use crate::error::CertError;
use crate::inspect::{agent_id_from_cert_der, cert_serial_hex, parse_x509};

/// Why an agent's client certificate was refused in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientCertRefusal {
    /// Past its `notAfter`: the agent was offline past its expiry; re-enroll it with
    /// `gaffer-agent enroll --renew`.
    Expired,
    /// Before its `notBefore` (a clock far behind, or a certificate from the future).
    NotYetValid,
    /// It names an agent that has been revoked.
    Revoked,
    /// Signed by a CA this fleet does not trust (another fleet, or a CA dropped after a rotation).
    ForeignCa,
    /// Self-signed: not issued by any CA.
    SelfSigned,
    /// Not a client certificate (e.g. the control plane's server certificate, EKU serverAuth).
    WrongPurpose,
    /// Chains to the fleet but names no agent (`urn:gaffer:agent:<uuid>` URI SAN missing or malformed).
    NoAgentId,
    /// Any other defect (bad encoding, bad signature, unsupported algorithm).
    Invalid,
}

impl ClientCertRefusal {
    /// Every reason, for exporting zero-valued metrics.
    pub const ALL: [ClientCertRefusal; 8] = [
        ClientCertRefusal::Expired,
        ClientCertRefusal::NotYetValid,
        ClientCertRefusal::Revoked,
        ClientCertRefusal::ForeignCa,
        ClientCertRefusal::SelfSigned,
        ClientCertRefusal::WrongPurpose,
        ClientCertRefusal::NoAgentId,
        ClientCertRefusal::Invalid,
    ];

    /// The metric label: `expired`, `not_yet_valid`, `revoked`, `foreign_ca`, `self_signed`,
    /// `wrong_purpose`, `no_agent_id`, `invalid`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientCertRefusal::Expired => "expired",
            ClientCertRefusal::NotYetValid => "not_yet_valid",
            ClientCertRefusal::Revoked => "revoked",
            ClientCertRefusal::ForeignCa => "foreign_ca",
            ClientCertRefusal::SelfSigned => "self_signed",
            ClientCertRefusal::WrongPurpose => "wrong_purpose",
            ClientCertRefusal::NoAgentId => "no_agent_id",
            ClientCertRefusal::Invalid => "invalid",
        }
    }
}

impl fmt::Display for ClientCertRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the control plane decides at each agent handshake, beyond what the certificate itself says.
/// Called on the handshake path: keep both methods cheap and non-blocking (an in-memory set).
pub trait ClientCertPolicy: Send + Sync + fmt::Debug {
    /// Whether the agent `agent_id` (certificate serial `serial_hex`, as [`crate::cert_serial_hex`])
    /// is revoked now.
    fn is_revoked(&self, agent_id: Uuid, serial_hex: &str) -> bool;
    /// A handshake was refused for `reason` (count it; log it).
    fn refused(&self, reason: ClientCertRefusal);
}

/// The verifier [`crate::fleet_server_config`] installs. Clients without a certificate are accepted
/// (enrollment; the link then refuses them on `gaffer/1`).
#[derive(Debug)]
pub(crate) struct FleetClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    policy: Arc<dyn ClientCertPolicy>,
}

impl FleetClientVerifier {
    /// A verifier trusting exactly `trusted` (DER CA certificates, at least one).
    pub(crate) fn new(
        trusted: &[CertificateDer<'static>],
        provider: Arc<CryptoProvider>,
        policy: Arc<dyn ClientCertPolicy>,
    ) -> Result<Self, CertError> {
        let mut roots = RootCertStore::empty();
        for ca in trusted {
            roots.add(ca.clone()).map_err(CertError::TlsConfig)?;
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(CertError::Verifier)?;
        Ok(Self { inner, policy })
    }
}

/// The refusal reason for a rustls verification error of `end_entity`.
fn classify(err: &rustls::Error, end_entity: &CertificateDer<'_>) -> ClientCertRefusal {
    let rustls::Error::InvalidCertificate(cert_err) = err else { return ClientCertRefusal::Invalid };
    match cert_err {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => ClientCertRefusal::Expired,
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => ClientCertRefusal::NotYetValid,
        CertificateError::Revoked => ClientCertRefusal::Revoked,
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            ClientCertRefusal::WrongPurpose
        }
        CertificateError::UnknownIssuer => match parse_x509(end_entity.as_ref()) {
            Ok(x509) if x509.issuer() == x509.subject() => ClientCertRefusal::SelfSigned,
            _ => ClientCertRefusal::ForeignCa,
        },
        _ => ClientCertRefusal::Invalid,
    }
}

impl ClientCertVerifier for FleetClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => v,
            Err(e) => {
                self.policy.refused(classify(&e, end_entity));
                return Err(e);
            }
        };
        let agent_id = match agent_id_from_cert_der(end_entity.as_ref()) {
            Ok(id) => id,
            Err(_) => {
                self.policy.refused(ClientCertRefusal::NoAgentId);
                return Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
            }
        };
        let serial = cert_serial_hex(end_entity.as_ref()).unwrap_or_default();
        if self.policy.is_revoked(agent_id, &serial) {
            self.policy.refused(ClientCertRefusal::Revoked);
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
