//! The agent's own key: generated on the box, never sent anywhere; only its CSR leaves.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use uuid::Uuid;

use crate::error::CertError;
use crate::inspect::{agent_id_from_cert_der, agent_uri_san, check_pem_len, parse_x509, single_cert_der_from_pem};

/// An agent's ECDSA P-256 private key. `Debug` does not print it.
pub struct AgentKey {
    key: KeyPair,
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey([secret])")
    }
}

impl AgentKey {
    /// Generates a fresh ECDSA P-256 key.
    ///
    /// Errors: [`CertError::Generation`] if the system RNG or rcgen fails.
    pub fn generate() -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::Generation)?;
        Ok(AgentKey { key })
    }

    /// Loads a key written by [`AgentKey::key_pem`] (PKCS#8 PEM).
    ///
    /// Errors: [`CertError::TooLarge`] above [`crate::PEM_BYTES_MAX`]; [`CertError::InvalidPem`] if it
    /// is not a readable PKCS#8 ECDSA P-256 key (the message never contains key material).
    pub fn from_pem(key_pem: &str) -> Result<Self, CertError> {
        check_pem_len(key_pem, "agent private key")?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| CertError::InvalidPem {
            what: "agent private key",
            reason: "not a readable PKCS#8 private key".into(),
        })?;
        if !key.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256) {
            return Err(CertError::InvalidPem { what: "agent private key", reason: "not an ECDSA P-256 key".into() });
        }
        Ok(AgentKey { key })
    }

    /// The private key as PKCS#8 PEM. **Secret**: write it only with [`crate::write_secret_file`]
    /// (mode 0600); it never leaves the box.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate signing request (PEM `CERTIFICATE REQUEST`) for `agent_id`, signed with this
    /// key: CN `gaffer-agent <agent_id>`, URI SAN `urn:gaffer:agent:<agent_id>`. The CA decides the
    /// final contents regardless (see [`crate::FleetCa::sign_agent_csr`]).
    ///
    /// Errors: [`CertError::Generation`] if rcgen fails.
    pub fn csr_pem(&self, agent_id: Uuid) -> Result<String, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("gaffer-agent {}", agent_id.hyphenated()));
        params.distinguished_name = dn;
        let uri = agent_uri_san(agent_id).try_into().map_err(CertError::Generation)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.serialize_request(&self.key).and_then(|csr| csr.pem()).map_err(CertError::Generation)
    }

    /// Checks a certificate returned by enrollment before storing it: it must be for this key and
    /// carry an agent identity, which is returned.
    ///
    /// Errors: [`CertError::InvalidPem`] / [`CertError::InvalidCertificate`] for unreadable input;
    /// [`CertError::KeyMismatch`] if the certificate is for another key;
    /// [`CertError::NoAgentIdentity`] if it has no `urn:gaffer:agent:` URI SAN.
    pub fn check_issued_cert(&self, cert_pem: &str) -> Result<Uuid, CertError> {
        let der = single_cert_der_from_pem(cert_pem, "agent certificate")?;
        let x509 = parse_x509(&der)?;
        if x509.public_key().subject_public_key.data.as_ref() != self.key.public_key_raw() {
            return Err(CertError::KeyMismatch { what: "agent" });
        }
        agent_id_from_cert_der(&der)
    }
}
