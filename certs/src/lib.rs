//! Gaffer fleet PKI: the fleet certificate authority, server and agent certificates, enrollment and
//! API bearer tokens, and the rustls configurations both sides of the QUIC link use.
//!
//! # Trust model
//! * The control plane holds the fleet CA ([`FleetCa`], ECDSA P-256, valid 10 years) and its own server
//!   certificate ([`FleetCa::issue_server_cert`], valid 1 year).
//! * An agent generates its key locally ([`AgentKey`]); the key never leaves the box. It sends a CSR
//!   together with a one-time [`EnrollmentToken`]; the control plane answers with a certificate from
//!   [`FleetCa::sign_agent_csr`] whose only identity is the URI SAN `urn:gaffer:agent:<uuid>`.
//! * Before enrolling, the agent authenticates the control plane by the SHA-256 fingerprint of the CA
//!   certificate ([`CaFingerprint`]), which the operator copies from `gaffer-control token create`
//!   ([`client_config_enroll`]).
//! * Offline-sync bundles are encrypted with age to the importer's X25519 [`BundleKey`] and signed
//!   with the writer's TLS key ([`BundleSigner`]); [`verify_bundle`] checks them (see `bundle_sig`).
//! * Agent releases are signed with an Ed25519 release key in zipsign's format
//!   ([`ReleaseSigningKey`], [`sign_release`]); agents pin its public key ([`ReleasePublicKey`])
//!   at enrollment and check every release with [`verify_release`] (see `release`).
//! * All TLS is TLS 1.3 only, with the *ring* provider, and without 0-RTT.
//!
//! # One port, two ALPNs
//! The agent link (`gaffer/1`, [`gaffer_protocol::ALPN_AGENT_LINK`]) and enrollment (`gaffer-enroll/1`,
//! [`gaffer_protocol::ALPN_ENROLL`]) share one UDP port and one [`server_config`]. That config accepts
//! clients *without* a certificate (enrolling agents) but fails the handshake of any client whose
//! certificate does not chain to the fleet CA (or is revoked by a supplied CRL). The control plane must
//! therefore close every `gaffer/1` connection for which [`peer_agent_id`] returns an error.
//!
//! Architecture invariant: this crate does no logging of secrets; private keys and tokens only leave it
//! as return values, and [`write_secret_file`] is the one way it writes them to disk (mode 0600).
#![warn(missing_docs)]

mod agent;
mod bundle_sig;
mod ca;
mod error;
mod fingerprint;
mod inspect;
mod release;
mod secret_file;
mod tls;
mod token;
mod verifier;

pub use agent::AgentKey;
pub use bundle_sig::{
    cert_validity_unix, check_bundle_recipient, encrypt_to_recipient, seal_bundle, verify_bundle,
    verify_detached_signature, verify_signer, BundleKey, BundleSigner, BundleSignerRole, BundleTrust,
};
pub use ca::{
    FleetCa, IssuedKeyPair, RevokedCert, AGENT_CERT_VALIDITY_DAYS_DEFAULT, AGENT_CERT_VALIDITY_DAYS_MAX,
    AGENT_CERT_VALIDITY_SECS_MAX, AGENT_CERT_VALIDITY_SECS_MIN, CA_VALIDITY_DAYS, CLOCK_SKEW_BACKDATE_SECS,
    CRL_NEXT_UPDATE_DAYS, SERVER_CERT_VALIDITY_DAYS,
};
pub use error::CertError;
pub use fingerprint::CaFingerprint;
pub use inspect::{
    agent_id_from_cert_der, agent_uri_san, cert_not_after_unix, cert_serial_hex, peer_agent_id, AGENT_URI_SAN_PREFIX,
    PEM_BYTES_MAX,
};
pub use release::{
    check_version as check_release_version, read_release_file, release_is_signed, sign_bundle_file, sign_release,
    verify_bundle_file, verify_release, ArtifactKind, BundleName, ReleaseInfo, ReleaseKeyFingerprint, ReleaseName,
    ReleasePublicKey, ReleaseSigningKey, BUNDLE_BYTES_MAX, BUNDLE_ENTRIES_MAX, BUNDLE_FILE_PREFIX,
    BUNDLE_INSTALLER_FILE, BUNDLE_SUMS_FILE, BUNDLE_UNPACKED_BYTES_MAX, RELEASE_ARCHES, RELEASE_BYTES_MAX,
    RELEASE_ENTRIES_MAX, RELEASE_FILE_PREFIX, RELEASE_FILE_SUFFIX, RELEASE_KEY_FILE, RELEASE_PUB_FILE,
    RELEASE_UNPACKED_BYTES_MAX, RELEASE_VERSION_BYTES_MAX,
};
pub use secret_file::{create_private_dir, write_secret_file};
pub use tls::{
    client_config_enroll, client_config_link, enrolled_ca_pem, fleet_server_config, server_config, tls_cert_error,
    trust_bundle_from_pem, EnrollServerVerifier, TRUST_BUNDLE_CAS_MAX,
};
pub use token::{
    ApiToken, ApiTokenKind, EnrollmentToken, EnrollmentTokenKind, Token, TokenHash, TokenKind, TOKEN_SECRET_BYTES,
};
pub use verifier::{ClientCertPolicy, ClientCertRefusal};

/// Re-exported so callers can name the CRL and certificate types used in this crate's signatures
/// without depending on `rustls-pki-types` directly.
pub use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
