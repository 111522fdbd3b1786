//! Offline-sync bundle crypto: age (X25519) encryption to the importing side, ECDSA P-256 signatures
//! with the parties' existing TLS keys, and the signer checks, all with well-kept crates.
//!
//! * Encryption: [`BundleKey`] is an age X25519 identity (`AGE-SECRET-KEY-1...`, a secret: write it
//!   with [`crate::write_secret_file`]); its recipient (`age1...`) is public and travels in enrollment.
//!   [`encrypt_to_recipient`] / [`BundleKey::decrypt`] are `age::encrypt` / `age::decrypt`.
//! * Signing: [`BundleSigner`] signs with *ring*'s `ECDSA_P256_SHA256_ASN1_SIGNING` using the agent's
//!   `agent.key` or the control plane's `server.key`, and carries the matching certificate.
//! * Verification: [`verify_bundle`] applies the importer's checks in order (layout and limits →
//!   fleet fingerprint → signer certificate chains to the fleet CA with `rustls-webpki`, valid now,
//!   not revoked by the supplied CRL, names the expected party → signature). The bundle number and
//!   decryption are the importer's next steps.

use std::fmt;
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use gaffer_protocol::bundle::{self, BundleDirection, BundleHeader, ParsedBundle};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls_pki_types::{CertificateDer, UnixTime};
use uuid::Uuid;

use crate::error::CertError;
use crate::fingerprint::CaFingerprint;
use crate::inspect::{
    agent_id_from_cert_der, cert_serial_hex, check_pem_len, parse_x509, private_key_from_pem, single_cert_der_from_pem,
};

/// An age X25519 identity used to decrypt bundles sent to this side. `Debug` does not print it.
pub struct BundleKey {
    identity: age::x25519::Identity,
}

impl fmt::Debug for BundleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleKey(recipient {}, [secret])", self.recipient())
    }
}

impl BundleKey {
    /// A fresh identity from the system RNG.
    pub fn generate() -> Self {
        BundleKey { identity: age::x25519::Identity::generate() }
    }

    /// Parses a key file written from [`BundleKey::secret_string`] (surrounding whitespace ignored).
    ///
    /// Errors: [`CertError::TooLarge`] above [`crate::PEM_BYTES_MAX`]; [`CertError::InvalidBundleKey`]
    /// if it is not an age X25519 secret key (the message never contains key material).
    pub fn from_secret_str(text: &str) -> Result<Self, CertError> {
        check_pem_len(text, "bundle key")?;
        let identity = age::x25519::Identity::from_str(text.trim())
            .map_err(|_| CertError::InvalidBundleKey { reason: "not an age X25519 secret key".into() })?;
        Ok(BundleKey { identity })
    }

    /// The secret key as text (`AGE-SECRET-KEY-1...`). **Secret**: write it only with
    /// [`crate::write_secret_file`] (mode 0600) and never log it.
    pub fn secret_string(&self) -> String {
        self.identity.to_string().expose_secret().to_owned()
    }

    /// The public recipient (`age1...`) others encrypt to.
    pub fn recipient(&self) -> String {
        self.identity.to_public().to_string()
    }

    /// Decrypts an age file encrypted to [`BundleKey::recipient`].
    ///
    /// Errors: [`CertError::BundleDecryption`] if it is not an age file for this key, or its
    /// authentication fails.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, CertError> {
        age::decrypt(&self.identity, ciphertext).map_err(|e| CertError::BundleDecryption { reason: e.to_string() })
    }
}

/// Checks that `recipient` is an age X25519 recipient (`age1...`).
///
/// Errors: [`CertError::InvalidBundleKey`].
pub fn check_bundle_recipient(recipient: &str) -> Result<(), CertError> {
    parse_recipient(recipient).map(|_| ())
}

fn parse_recipient(recipient: &str) -> Result<age::x25519::Recipient, CertError> {
    if recipient.len() > 256 {
        return Err(CertError::InvalidBundleKey { reason: "recipient is longer than 256 characters".into() });
    }
    age::x25519::Recipient::from_str(recipient.trim())
        .map_err(|e| CertError::InvalidBundleKey { reason: format!("not an age X25519 recipient: {e}") })
}

/// Encrypts `plaintext` to an age X25519 `recipient` (`age1...`), binary age format.
///
/// Errors: [`CertError::InvalidBundleKey`] for a bad recipient; [`CertError::BundleDecryption`]
/// is never returned; an age failure is [`CertError::BundleEncryption`].
pub fn encrypt_to_recipient(recipient: &str, plaintext: &[u8]) -> Result<Vec<u8>, CertError> {
    let recipient = parse_recipient(recipient)?;
    age::encrypt(&recipient, plaintext).map_err(|e| CertError::BundleEncryption { reason: e.to_string() })
}

/// A signing key with its certificate: the agent's (`agent.key` + `agent.pem`) or the control
/// plane's (`server.key` + `server.pem`). `Debug` does not print the key.
pub struct BundleSigner {
    key: EcdsaKeyPair,
    cert_der: CertificateDer<'static>,
}

impl fmt::Debug for BundleSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BundleSigner([secret])")
    }
}

impl BundleSigner {
    /// Loads an ECDSA P-256 PKCS#8 key and its certificate (one PEM `CERTIFICATE`).
    ///
    /// Errors: [`CertError::InvalidPem`] / [`CertError::TooLarge`] for unreadable input;
    /// [`CertError::KeyMismatch`] if the key is not the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let cert_der = single_cert_der_from_pem(cert_pem, "signer certificate")?;
        let key_der = private_key_from_pem(key_pem, "signer private key")?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_der.secret_der(), &SystemRandom::new())
            .map_err(|_| CertError::InvalidPem {
                what: "signer private key",
                reason: "not a PKCS#8 ECDSA P-256 key".into(),
            })?;
        let x509 = parse_x509(&cert_der)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(CertError::KeyMismatch { what: "signer" });
        }
        Ok(BundleSigner { key, cert_der })
    }

    /// The signer's certificate, DER (goes into [`BundleHeader::signer_cert_der`]).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// ECDSA P-256 SHA-256 signature (ASN.1 DER) over `msg`.
    ///
    /// Errors: [`CertError::BundleEncryption`] if *ring* fails (RNG failure).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CertError> {
        self.key
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| CertError::BundleEncryption { reason: "ECDSA signing failed".into() })
    }
}

/// Who must have signed a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleSignerRole {
    /// The agent with this id: a client certificate (EKU clientAuth) with URI SAN
    /// `urn:gaffer:agent:<id>`.
    Agent(Uuid),
    /// The control plane: a server certificate (EKU serverAuth) with no agent identity.
    ControlPlane,
}

/// Everything the verifier needs about our fleet.
#[derive(Debug, Clone, Copy)]
pub struct BundleTrust<'a> {
    /// The fleet CA certificate, PEM: the only trust anchor.
    pub ca_pem: &'a str,
    /// Current revocation list(s), PEM `X509 CRL` blocks; empty for none.
    pub crl_pem: &'a str,
}

/// Builds, encrypts and signs a bundle file.
///
/// `header.signer_cert_der` is overwritten with the signer's certificate. `payload` is the
/// bincode payload ([`gaffer_protocol::bundle::encode_payload`]), encrypted to `recipient`.
///
/// Errors: [`CertError::InvalidBundleKey`] for a bad recipient; [`CertError::Bundle`] if a part
/// is over its limit; [`CertError::BundleEncryption`] if age or signing fails.
pub fn seal_bundle(
    mut header: BundleHeader,
    payload: &[u8],
    recipient: &str,
    signer: &BundleSigner,
) -> Result<Vec<u8>, CertError> {
    header.signer_cert_der = signer.cert_der().to_vec();
    let ciphertext = encrypt_to_recipient(recipient, payload)?;
    let signed = bundle::encode_signed_part(&header, &ciphertext)?;
    let signature = signer.sign(&signed)?;
    Ok(bundle::finish_bundle(signed, &signature)?)
}

/// Verifies a bundle file up to (not including) the bundle number and decryption, in this order:
/// layout and limits → `direction` → the header's CA fingerprint is ours → the signer certificate
/// chains to our CA, is valid at `now`, is not revoked by `trust.crl_pem`, and is the party
/// `expected(header)` names → the signature over the signed part.
///
/// Errors: [`CertError::Bundle`] (not a bundle, truncated, malformed, too large);
/// [`CertError::BundleWrongDirection`]; [`CertError::BundleFromAnotherFleet`];
/// [`CertError::BundleSignerRevoked`]; [`CertError::BundleSignerRejected`];
/// [`CertError::BundleSignatureInvalid`]; [`CertError::InvalidPem`] for a bad CA or CRL of ours.
pub fn verify_bundle<'a>(
    bytes: &'a [u8],
    trust: BundleTrust<'_>,
    direction: BundleDirection,
    expected: impl FnOnce(&BundleHeader) -> BundleSignerRole,
    now: UnixTime,
) -> Result<ParsedBundle<'a>, CertError> {
    let parsed = bundle::parse_bundle(bytes)?;
    if parsed.header.direction != direction {
        return Err(CertError::BundleWrongDirection { expected: direction, got: parsed.header.direction });
    }
    let ours = CaFingerprint::from_cert_pem(trust.ca_pem)?;
    let theirs = CaFingerprint::from_bytes(parsed.header.ca_fingerprint);
    if ours != theirs {
        return Err(CertError::BundleFromAnotherFleet { expected: ours, got: theirs });
    }
    let role = expected(&parsed.header);
    let signer = CertificateDer::from(parsed.header.signer_cert_der.as_slice());
    verify_signer(trust, &signer, role, now)?;
    let ee = webpki::EndEntityCert::try_from(&signer)
        .map_err(|e| CertError::BundleSignerRejected { reason: format!("unreadable certificate: {e}") })?;
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, parsed.signed, parsed.signature)
        .map_err(|_| CertError::BundleSignatureInvalid)?;
    Ok(parsed)
}

/// Checks that `signer` chains to the fleet CA (the only anchor), is valid at `now`, is not revoked
/// by `trust.crl_pem` and is the party `role` names.
///
/// Errors: [`CertError::BundleSignerRevoked`], [`CertError::BundleSignerRejected`];
/// [`CertError::InvalidPem`] for an unreadable CA or CRL.
pub fn verify_signer(
    trust: BundleTrust<'_>,
    signer: &CertificateDer<'_>,
    role: BundleSignerRole,
    now: UnixTime,
) -> Result<(), CertError> {
    let rejected = |reason: String| CertError::BundleSignerRejected { reason };
    let ca_der = single_cert_der_from_pem(trust.ca_pem, "CA certificate")?;
    let anchor = webpki::anchor_from_trusted_cert(&ca_der)
        .map_err(|e| CertError::InvalidPem { what: "CA certificate", reason: e.to_string() })?;
    let crls = crate::FleetCa::crls_from_pem(trust.crl_pem)?
        .iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| CertError::InvalidPem { what: "certificate revocation list", reason: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    let revocation = match webpki::RevocationOptionsBuilder::new(&crl_refs) {
        Ok(b) => Some(b.with_depth(webpki::RevocationCheckDepth::EndEntity).build()),
        Err(_) => None, // no CRL: nothing revoked yet
    };
    let ee = webpki::EndEntityCert::try_from(signer).map_err(|e| rejected(format!("unreadable certificate: {e}")))?;
    let usage = match role {
        BundleSignerRole::Agent(_) => webpki::KeyUsage::client_auth(),
        BundleSignerRole::ControlPlane => webpki::KeyUsage::server_auth(),
    };
    match ee.verify_for_usage(&[webpki::ring::ECDSA_P256_SHA256], &[anchor], &[], now, usage, revocation, None) {
        Ok(_) => {}
        Err(webpki::Error::CertRevoked) => {
            return Err(CertError::BundleSignerRevoked {
                serial_hex: cert_serial_hex(signer.as_ref()).unwrap_or_default(),
            })
        }
        Err(webpki::Error::UnknownIssuer) => {
            return Err(rejected("the signer's certificate was not issued by this fleet's CA".into()))
        }
        Err(e) => return Err(rejected(format!("the signer's certificate is not acceptable: {e:?}"))),
    }
    let identity = agent_id_from_cert_der(signer.as_ref());
    match (role, identity) {
        (BundleSignerRole::Agent(want), Ok(got)) if want == got => Ok(()),
        (BundleSignerRole::Agent(want), Ok(got)) => {
            Err(rejected(format!("signed by agent {got}, but the bundle claims to be from agent {want}")))
        }
        (BundleSignerRole::Agent(_), Err(e)) => Err(rejected(format!("the signer is not an agent: {e}"))),
        (BundleSignerRole::ControlPlane, Ok(got)) => {
            Err(rejected(format!("signed by agent {got}, not by the control plane")))
        }
        (BundleSignerRole::ControlPlane, Err(_)) => Ok(()),
    }
}

/// A certificate's validity as (`notBefore`, `notAfter`) Unix seconds (UTC), from DER. Used to
/// decide renewal (past half the lifetime).
///
/// Errors: [`CertError::InvalidCertificate`] for an unreadable certificate.
pub fn cert_validity_unix(cert_der: &[u8]) -> Result<(i64, i64), CertError> {
    let x509 = parse_x509(cert_der)?;
    Ok((x509.validity().not_before.timestamp(), x509.validity().not_after.timestamp()))
}

/// Verifies a detached ECDSA P-256 SHA-256 signature (ASN.1 DER) by the key of `signer` (a
/// certificate, DER) over `msg`. Does not check the certificate itself: call [`verify_signer`].
///
/// Errors: [`CertError::BundleSignerRejected`] for an unreadable certificate;
/// [`CertError::BundleSignatureInvalid`].
pub fn verify_detached_signature(signer: &CertificateDer<'_>, msg: &[u8], signature: &[u8]) -> Result<(), CertError> {
    let ee = webpki::EndEntityCert::try_from(signer)
        .map_err(|e| CertError::BundleSignerRejected { reason: format!("unreadable certificate: {e}") })?;
    ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, signature).map_err(|_| CertError::BundleSignatureInvalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentKey, FleetCa, RevokedCert};
    use gaffer_protocol::bundle::BundleError;

    fn agent(ca: &FleetCa) -> Result<(Uuid, BundleSigner), CertError> {
        let id = Uuid::new_v4();
        let key = AgentKey::generate()?;
        let cert = ca.sign_agent_csr(&key.csr_pem(id)?, id, 90)?;
        Ok((id, BundleSigner::from_pem(&cert, &key.key_pem())?))
    }

    fn header(ca: &FleetCa, id: Uuid) -> BundleHeader {
        BundleHeader {
            direction: BundleDirection::AgentToControl,
            ca_fingerprint: *ca.fingerprint().as_bytes(),
            agent_id: id,
            bundle_number: 1,
            created_at_ms: 0,
            signer_cert_der: vec![],
        }
    }

    #[test]
    fn sealed_bundle_verifies_decrypts_and_refuses_tampering_revocation_and_strangers(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let ca = FleetCa::generate("test")?;
        let ca_pem = ca.cert_pem();
        let (id, signer) = agent(&ca)?;
        let cp_key = BundleKey::generate();
        let file = seal_bundle(header(&ca, id), b"the payload", &cp_key.recipient(), &signer)?;
        let trust = BundleTrust { ca_pem: &ca_pem, crl_pem: "" };
        let role = |h: &BundleHeader| BundleSignerRole::Agent(h.agent_id);
        let parsed = verify_bundle(&file, trust, BundleDirection::AgentToControl, role, UnixTime::now())?;
        assert_eq!(cp_key.decrypt(parsed.ciphertext)?, b"the payload");
        // Wrong key cannot decrypt.
        assert!(matches!(BundleKey::generate().decrypt(parsed.ciphertext), Err(CertError::BundleDecryption { .. })));

        // Every single flipped byte is refused.
        for i in (0..file.len()).step_by(7) {
            let mut bad = file.clone();
            bad[i] ^= 0x40;
            assert!(
                verify_bundle(&bad, trust, BundleDirection::AgentToControl, role, UnixTime::now()).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
        // Truncated.
        let cut = &file[..file.len() - 10];
        assert!(matches!(
            verify_bundle(cut, trust, BundleDirection::AgentToControl, role, UnixTime::now()),
            Err(CertError::Bundle(BundleError::Truncated(_)))
        ));
        // Revoked.
        let serial = cert_serial_hex(signer.cert_der())?;
        let crl = ca.revocation_list_pem(&[RevokedCert { serial_hex: serial, revoked_at_unix: 1_700_000_000 }], 1)?;
        let revoked_trust = BundleTrust { ca_pem: &ca_pem, crl_pem: &crl };
        assert!(matches!(
            verify_bundle(&file, revoked_trust, BundleDirection::AgentToControl, role, UnixTime::now()),
            Err(CertError::BundleSignerRevoked { .. })
        ));
        // Another fleet: same layout, other CA.
        let other = FleetCa::generate("other")?;
        let (oid, osigner) = agent(&other)?;
        let foreign = seal_bundle(header(&other, oid), b"x", &cp_key.recipient(), &osigner)?;
        assert!(matches!(
            verify_bundle(&foreign, trust, BundleDirection::AgentToControl, role, UnixTime::now()),
            Err(CertError::BundleFromAnotherFleet { .. })
        ));
        // Another fleet's agent claiming our fingerprint: its certificate does not chain.
        let mut forged = header(&ca, oid);
        forged.ca_fingerprint = *ca.fingerprint().as_bytes();
        let forged = seal_bundle(forged, b"x", &cp_key.recipient(), &osigner)?;
        assert!(matches!(
            verify_bundle(&forged, trust, BundleDirection::AgentToControl, role, UnixTime::now()),
            Err(CertError::BundleSignerRejected { .. })
        ));
        // One agent's certificate signing for another agent id.
        let (_, other_signer) = agent(&ca)?;
        let impostor = seal_bundle(header(&ca, id), b"x", &cp_key.recipient(), &other_signer)?;
        assert!(matches!(
            verify_bundle(&impostor, trust, BundleDirection::AgentToControl, role, UnixTime::now()),
            Err(CertError::BundleSignerRejected { .. })
        ));
        // Wrong direction.
        assert!(matches!(
            verify_bundle(
                &file,
                trust,
                BundleDirection::ControlToAgent,
                |_| BundleSignerRole::ControlPlane,
                UnixTime::now()
            ),
            Err(CertError::BundleWrongDirection { .. })
        ));
        Ok(())
    }

    #[test]
    fn bundle_key_round_trips_and_debug_hides_the_secret() -> Result<(), CertError> {
        let key = BundleKey::generate();
        let again = BundleKey::from_secret_str(&format!("{}\n", key.secret_string()))?;
        assert_eq!(again.recipient(), key.recipient());
        assert!(!format!("{key:?}").contains("AGE-SECRET-KEY"));
        assert!(BundleKey::from_secret_str("AGE-SECRET-KEY-1NOPE").is_err());
        Ok(())
    }
}
