//! rustls configurations for the control plane's endpoint, the agent link and enrollment.
//!
//! All of them use the *ring* provider explicitly, TLS 1.3 only, and no 0-RTT (the server's
//! `max_early_data_size` is 0, the clients' `enable_early_data` false), so they can be handed to
//! quinn (`QuicServerConfig::try_from`, `QuicClientConfig::try_from`) unchanged.

use std::sync::Arc;

use gaffer_protocol::{ALPN_AGENT_LINK, ALPN_ENROLL};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::ca::IssuedKeyPair;
use crate::error::CertError;
use crate::fingerprint::CaFingerprint;
use crate::inspect::{cert_chain_from_pem, private_key_from_pem, single_cert_der_from_pem};

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn fleet_roots(ca_der: CertificateDer<'static>) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der).map_err(CertError::TlsConfig)?;
    Ok(roots)
}

/// Most CA certificates a trust bundle may hold (the current CA, the next one during a rotation,
/// and room for one more).
pub const TRUST_BUNDLE_CAS_MAX: usize = 4;

/// The CA certificates of a trust bundle: one or more PEM `CERTIFICATE` blocks, each a CA
/// certificate (basicConstraints CA:TRUE), at most [`TRUST_BUNDLE_CAS_MAX`].
///
/// Errors: [`CertError::InvalidPem`] / [`CertError::TooLarge`] for unreadable PEM or no
/// certificate; [`CertError::InvalidCertificate`] for a non-CA certificate or too many.
pub fn trust_bundle_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let cas = cert_chain_from_pem(pem, "CA trust bundle")?;
    if cas.len() > TRUST_BUNDLE_CAS_MAX {
        return Err(CertError::invalid_cert(format!(
            "the trust bundle holds {} certificates; at most {TRUST_BUNDLE_CAS_MAX} are allowed",
            cas.len()
        )));
    }
    for ca in &cas {
        if !crate::inspect::parse_x509(ca)?.is_ca() {
            return Err(CertError::invalid_cert("a certificate of the trust bundle is not a CA certificate"));
        }
    }
    Ok(cas)
}

/// The control plane's rustls server config for its QUIC endpoint (agent link and enrollment), as
/// the running control plane builds it (and rebuilds it whenever its server certificate is renewed
/// or the trusted CAs change during a rotation).
///
/// * ALPN `gaffer/1` and `gaffer-enroll/1`; TLS 1.3 only; no 0-RTT.
/// * **No session resumption**: no tickets are sent and no session is cached, so every connection
///   presents and verifies its certificate in full (rustls does not re-verify a resumed client
///   certificate, so an expired or revoked agent could otherwise keep resuming).
/// * Certificate chain sent: `[server, server_ca]` (enrolling agents check `server_ca`'s fingerprint).
/// * Client certificates: optional (enrollment); one that is presented must chain to one of
///   `trusted_pem`'s CAs, be valid now, carry EKU clientAuth, name an agent and not be revoked by
///   `policy`, which is told every refusal's [`crate::ClientCertRefusal`].
///
/// Errors: as [`trust_bundle_from_pem`] for `trusted_pem`; [`CertError::InvalidPem`] for the server
/// certificate, its CA or key; [`CertError::TlsConfig`] if rustls rejects them.
pub fn fleet_server_config(
    trusted_pem: &str,
    server: &IssuedKeyPair,
    server_ca_pem: &str,
    policy: Arc<dyn crate::ClientCertPolicy>,
) -> Result<ServerConfig, CertError> {
    let trusted = trust_bundle_from_pem(trusted_pem)?;
    let server_ca = single_cert_der_from_pem(server_ca_pem, "server certificate's CA")?;
    let provider = ring_provider();
    let verifier = crate::verifier::FleetClientVerifier::new(&trusted, provider.clone(), policy)?;
    link_server_config(provider, Arc::new(verifier), server, server_ca)
}

/// The endpoint config both server configs share: TLS 1.3 only, chain `[server, server_ca]`, both
/// ALPNs, no 0-RTT, no session resumption (no tickets, no session cache).
fn link_server_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    server: &IssuedKeyPair,
    server_ca: CertificateDer<'static>,
) -> Result<ServerConfig, CertError> {
    let mut chain = cert_chain_from_pem(&server.cert_pem, "server certificate")?;
    chain.push(server_ca);
    let key = private_key_from_pem(&server.key_pem, "server private key")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(TLS13_ONLY)
        .map_err(CertError::TlsConfig)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(CertError::TlsConfig)?;
    config.alpn_protocols = vec![ALPN_AGENT_LINK.to_vec(), ALPN_ENROLL.to_vec()];
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// The control plane's rustls server config, serving both ALPNs on one endpoint.
///
/// * ALPN: `gaffer/1` ([`ALPN_AGENT_LINK`]) and `gaffer-enroll/1` ([`ALPN_ENROLL`]); a client that
///   offers neither fails the handshake.
/// * Certificate chain sent: `[server, CA]`, so enrolling agents can check the CA fingerprint.
/// * Client certificates: **optional**. A client without one is accepted (enrollment); a client
///   *with* one must chain to the fleet CA (`ca_pem`), be valid now, carry EKU clientAuth and not be
///   revoked by `crls_der` (pass an empty `Vec` for no revocation checking), or the handshake fails.
///   The caller must close `gaffer/1` connections that [`crate::peer_agent_id`] rejects.
///
/// Errors: [`CertError::InvalidPem`] / [`CertError::TooLarge`] for unreadable PEM;
/// [`CertError::Verifier`] for an unusable CA or CRL; [`CertError::TlsConfig`] if rustls rejects the
/// certificate or key (e.g. the key does not match the certificate).
pub fn server_config(
    ca_pem: &str,
    server: &IssuedKeyPair,
    crls_der: Vec<CertificateRevocationListDer<'static>>,
) -> Result<ServerConfig, CertError> {
    let ca_der = single_cert_der_from_pem(ca_pem, "CA certificate")?;
    let provider = ring_provider();
    let roots = Arc::new(fleet_roots(ca_der.clone())?);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .with_crls(crls_der)
        .build()
        .map_err(CertError::Verifier)?;
    link_server_config(provider, client_verifier, server, ca_der)
}

/// The agent's rustls client config for the mutually authenticated link.
///
/// Trusts **only** the fleet CAs of `ca_pem` (a trust bundle, see [`trust_bundle_from_pem`]: one
/// CA, or two during a CA rotation), presents the agent certificate and key, ALPN `gaffer/1`, no
/// session resumption (every connection authenticates in full). The server name the caller connects
/// with must be one of the server certificate's SANs.
///
/// Errors: [`CertError::InvalidPem`] / [`CertError::TooLarge`] for unreadable PEM;
/// [`CertError::InvalidCertificate`] for a bad trust bundle; [`CertError::TlsConfig`] for an
/// unusable CA, or a key that does not match the certificate.
pub fn client_config_link(ca_pem: &str, agent_cert_pem: &str, agent_key_pem: &str) -> Result<ClientConfig, CertError> {
    let mut roots = RootCertStore::empty();
    for ca in trust_bundle_from_pem(ca_pem)? {
        roots.add(ca).map_err(CertError::TlsConfig)?;
    }
    let chain = cert_chain_from_pem(agent_cert_pem, "agent certificate")?;
    let key = private_key_from_pem(agent_key_pem, "agent private key")?;
    let mut config = ClientConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(TLS13_ONLY)
        .map_err(CertError::TlsConfig)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(CertError::TlsConfig)?;
    config.alpn_protocols = vec![ALPN_AGENT_LINK.to_vec()];
    config.enable_early_data = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The agent's rustls client config for enrollment: ALPN `gaffer-enroll/1`, no client certificate,
/// and the server authenticated by [`EnrollServerVerifier`] against `expected`, the CA fingerprint
/// the operator supplied. Nothing is sent to the server before that verifier has accepted it.
///
/// If the fingerprint does not match, the handshake fails with a rustls error from which
/// [`tls_cert_error`] recovers [`CertError::FingerprintMismatch`] (its `Display`, which quinn puts
/// in the connection error's reason, names both fingerprints).
///
/// Errors: [`CertError::TlsConfig`] only if rustls rejects the protocol versions (not expected).
pub fn client_config_enroll(expected: CaFingerprint) -> Result<ClientConfig, CertError> {
    let provider = ring_provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(TLS13_ONLY)
        .map_err(CertError::TlsConfig)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EnrollServerVerifier { expected, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// The [`CertError`] inside a rustls handshake error, if this crate's verifier caused it (e.g.
/// [`CertError::FingerprintMismatch`] or [`CertError::NoCaInChain`] during enrollment).
pub fn tls_cert_error(err: &rustls::Error) -> Option<&CertError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) | rustls::Error::Other(other) => {
            other.0.downcast_ref::<CertError>()
        }
        _ => None,
    }
}

fn cert_error_to_tls(err: CertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// Server certificate verifier used at enrollment, before the agent trusts any CA.
///
/// It takes the CA certificate from the **end** of the chain the server presented, requires its
/// SHA-256 to equal the expected [`CaFingerprint`] (else [`CertError::FingerprintMismatch`], or
/// [`CertError::NoCaInChain`] if only one certificate was sent), then delegates full verification of
/// the end-entity certificate (chain, validity, server name, EKU, and the TLS 1.3 handshake
/// signature) to a rustls `WebPkiServerVerifier` whose only root is that CA.
#[derive(Debug)]
pub struct EnrollServerVerifier {
    expected: CaFingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EnrollServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((ca, rest)) = intermediates.split_last() else {
            return Err(cert_error_to_tls(CertError::NoCaInChain));
        };
        let got = CaFingerprint::from_cert_der(ca);
        if got != self.expected {
            return Err(cert_error_to_tls(CertError::FingerprintMismatch { expected: self.expected, got }));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, rest, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// After a successful enrollment handshake: the fleet CA certificate (PEM) from the end of the
/// chain the server presented (`peer_certs`, e.g. quinn's `peer_identity()` downcast to
/// `Vec<CertificateDer>`), re-checked against `expected`. The agent stores it for
/// [`client_config_link`].
///
/// Errors: [`CertError::NoCaInChain`] if fewer than two certificates were presented;
/// [`CertError::FingerprintMismatch`] if the last one is not the expected CA.
pub fn enrolled_ca_pem(peer_certs: &[CertificateDer<'_>], expected: CaFingerprint) -> Result<String, CertError> {
    if peer_certs.len() < 2 {
        return Err(CertError::NoCaInChain);
    }
    let ca = peer_certs.last().ok_or(CertError::NoCaInChain)?;
    let got = CaFingerprint::from_cert_der(ca);
    if got != expected {
        return Err(CertError::FingerprintMismatch { expected, got });
    }
    Ok(crate::inspect::encode_pem("CERTIFICATE", ca))
}
