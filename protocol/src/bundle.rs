//! Offline-sync bundles: what air-gapped agents and the control plane exchange on removable media.
//!
//! A bundle is one file, written by one side and imported by the other:
//!
//! ```text
//! +--------------------------------------------+
//! | magic: b"GAFFER-BUNDLE-1\n" (16 bytes)     |  \
//! | header_len: u32 BE                         |   |
//! | header: bincode 2 (standard, serde) of     |   |
//! |         BundleHeader (header_len bytes)    |   |  signed part
//! | ciphertext_len: u64 BE                     |   |
//! | ciphertext: an age file (binary, X25519    |   |
//! |         recipient of the importing side)   |  /
//! | signature_len: u16 BE                      |
//! | signature: ECDSA P-256 SHA-256, ASN.1 DER, |
//! |         by the key of header.signer_cert   |
//! +--------------------------------------------+
//! ```
//!
//! The signature covers every byte before `signature_len` (magic, both lengths, header and
//! ciphertext), so no byte of the file can change without the signature failing, and a file cut
//! anywhere is [`BundleError::Truncated`]. Bytes after the signature are [`BundleError::Malformed`].
//!
//! Inside the age encryption is the bincode of the payload: [`AgentBundle`] for
//! [`BundleDirection::AgentToControl`], [`ControlReply`] for [`BundleDirection::ControlToAgent`].
//! bincode has no optional trailing fields, so fields added later are decoded by trying the
//! current layout first and the older one after it ([`AgentBundle::decode`],
//! [`ControlReply::decode`]): a bundle written by an older agent or control plane still imports
//! (without the `agent_version` of an agent bundle, or the `update` of a reply). An older agent
//! cannot decode the newer reply layout, so a control plane answers a bundle without
//! `agent_version` in the older one ([`ControlReply::encode_without_update`]).
//!
//! Limits, checked before anything is allocated for them: the whole file
//! [`BUNDLE_BYTES_MAX`] (256 MiB), the header [`BUNDLE_HEADER_BYTES_MAX`] (64 KiB), the signature
//! [`BUNDLE_SIGNATURE_BYTES_MAX`] (256 bytes), a decrypted payload [`BUNDLE_BYTES_MAX`].
//!
//! What the importing side checks, in this order, before it changes any state (done by
//! `gaffer_certs::verify_bundle` and the importers): size → magic → header → the CA fingerprint in
//! the header is ours ("from another fleet") → the signer certificate chains to our CA, is valid now,
//! is not revoked and names the expected party → the signature → the bundle number against the last
//! one imported from that peer (lower: refused; equal: nothing to do) → decryption → payload.
//!
//! This module does no I/O: it turns bytes into types and back.

use serde::{Deserialize, Serialize};

use crate::messages::{AgentEnvelope, AgentId, Assignment, Capabilities, UpdateOrder};

/// First 16 bytes of every bundle file.
pub const BUNDLE_MAGIC: &[u8; 16] = b"GAFFER-BUNDLE-1\n";
/// Largest bundle file accepted, and largest decrypted payload, bytes: 256 MiB.
pub const BUNDLE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Largest encoded [`BundleHeader`] accepted, bytes: 64 KiB (a header with its certificate is
/// about 700 bytes).
pub const BUNDLE_HEADER_BYTES_MAX: usize = 64 * 1024;
/// Largest signature accepted, bytes (an ECDSA P-256 ASN.1 signature is at most 72 bytes).
pub const BUNDLE_SIGNATURE_BYTES_MAX: usize = 256;
/// Largest release artifact a reply bundle carries ([`BundledRelease::artifact`]), bytes: 192 MiB,
/// which leaves 64 MiB of [`BUNDLE_BYTES_MAX`] for the rest of the reply.
pub const BUNDLE_RELEASE_BYTES_MAX: u64 = 192 * 1024 * 1024;

/// Errors decoding a bundle file or its payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// The file is larger than a limit; it was refused before being read whole.
    #[error("{what} of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        /// What was too large ("bundle", "bundle header", ...).
        what: &'static str,
        /// Its size.
        len_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The file does not start with [`BUNDLE_MAGIC`]: not a Gaffer bundle (or another version).
    #[error("not a Gaffer bundle (the file does not start with GAFFER-BUNDLE-1)")]
    NotABundle,
    /// The file ends before the part its lengths announce: it was cut short (copy interrupted?).
    #[error("bundle is truncated: {0}")]
    Truncated(&'static str),
    /// A part does not decode, or there are bytes after the signature.
    #[error("bundle is malformed: {0}")]
    Malformed(String),
}

/// Which way a bundle travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BundleDirection {
    /// Written by `gaffer-agent bundle export`, imported by `gaffer-control bundle import`.
    AgentToControl,
    /// The reply: written by `gaffer-control bundle import`, imported by `gaffer-agent bundle import`.
    ControlToAgent,
}

/// The bundle header: in clear (so the importer can check who sent it before decrypting) but
/// covered by the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Which way it travels.
    pub direction: BundleDirection,
    /// SHA-256 of the fleet CA certificate (DER) the writer belongs to.
    pub ca_fingerprint: [u8; 32],
    /// The agent the bundle is from (agent → control) or for (control → agent).
    pub agent_id: AgentId,
    /// Strictly increasing per writer and direction: agent bundles count per agent, replies per
    /// agent. Starts at 1.
    pub bundle_number: u64,
    /// When it was written, Unix milliseconds (writer's clock; informational).
    pub created_at_ms: u64,
    /// DER certificate of the signing key: the agent's certificate, or the control plane's server
    /// certificate.
    pub signer_cert_der: Vec<u8>,
}

/// Plaintext of an agent → control plane bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentBundle {
    /// Every outbox entry not yet acknowledged, in sequence order.
    pub envelopes: Vec<AgentEnvelope>,
    /// What the agent can do, when it knows (the control plane uses the volumes to pick jobs for
    /// it); None keeps what the control plane has.
    pub capabilities: Option<Capabilities>,
    /// The version the agent runs (semver of `gaffer-agent`), as its Hello says on a link. None
    /// from agents that predate it (decoded by [`AgentBundle::decode`]).
    pub agent_version: Option<String>,
}

/// The layout of [`AgentBundle`] before `agent_version`.
#[derive(Deserialize)]
struct AgentBundleV1 {
    envelopes: Vec<AgentEnvelope>,
    capabilities: Option<Capabilities>,
}

impl AgentBundle {
    /// Decodes a decrypted agent bundle payload in either layout: this one, or the one of agents
    /// that predate `agent_version` (then it is None).
    ///
    /// # Errors
    /// [`BundleError::Malformed`] when it is neither (the error of the current layout).
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        decode_payload::<AgentBundle>(bytes).or_else(|current| {
            decode_payload::<AgentBundleV1>(bytes)
                .map(|old| AgentBundle {
                    envelopes: old.envelopes,
                    capabilities: old.capabilities,
                    agent_version: None,
                })
                .map_err(|_| current)
        })
    }
}

/// A release carried to an air-gapped agent in a reply bundle: the update order a linked agent
/// would get, and the signed artifact it would fetch. The agent checks the artifact's size and
/// SHA-256 against the order and its signature against the pinned release key, as for a fetch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundledRelease {
    /// The order.
    pub order: UpdateOrder,
    /// The signed artifact (`order.file_name`), at most [`BUNDLE_RELEASE_BYTES_MAX`] bytes.
    pub artifact: Vec<u8>,
}

/// Plaintext of a control plane → agent reply bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    /// Sequence numbers durable at the control plane (applied now or before): the agent removes
    /// them from its outbox.
    pub acks: Vec<u64>,
    /// Jobs leased to the agent: it queues and runs them.
    pub assignments: Vec<Assignment>,
    /// The fleet's current certificate revocation list, PEM (`X509 CRL`).
    pub crl_pem: String,
    /// A new certificate for the agent's existing key, PEM, when its certificate was past half its
    /// lifetime.
    pub renewed_cert_pem: Option<String>,
    /// The CA certificates the agent must trust from now on, PEM, one per entry (two during a CA
    /// rotation). Empty from control planes that predate trust bundles: keep the current set.
    #[serde(default)]
    pub trust_ca_pems: Vec<String>,
    /// A release to update to (air-gapped rollouts), while the agent's target in the rollout has
    /// no outcome reported yet. None from control planes that predate it (decoded by
    /// [`ControlReply::decode`]).
    pub update: Option<BundledRelease>,
}

/// The layout of [`ControlReply`] before `update`.
#[derive(Serialize, Deserialize)]
struct ControlReplyV1 {
    acks: Vec<u64>,
    assignments: Vec<Assignment>,
    crl_pem: String,
    renewed_cert_pem: Option<String>,
    trust_ca_pems: Vec<String>,
}

impl ControlReply {
    /// Decodes a decrypted reply payload in either layout: this one, or the one of control planes
    /// that predate `update` (then it is None).
    ///
    /// # Errors
    /// [`BundleError::Malformed`] when it is neither (the error of the current layout).
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        decode_payload::<ControlReply>(bytes).or_else(|current| {
            decode_payload::<ControlReplyV1>(bytes)
                .map(|old| ControlReply {
                    acks: old.acks,
                    assignments: old.assignments,
                    crl_pem: old.crl_pem,
                    renewed_cert_pem: old.renewed_cert_pem,
                    trust_ca_pems: old.trust_ca_pems,
                    update: None,
                })
                .map_err(|_| current)
        })
    }

    /// Encodes the reply in the layout of control planes that predate `update`, for agents that
    /// cannot decode the current one (their bundles carry no `agent_version`); `update` is left
    /// out.
    ///
    /// # Errors
    /// As [`encode_payload`].
    pub fn encode_without_update(&self) -> Result<Vec<u8>, BundleError> {
        encode_payload(&ControlReplyV1 {
            acks: self.acks.clone(),
            assignments: self.assignments.clone(),
            crl_pem: self.crl_pem.clone(),
            renewed_cert_pem: self.renewed_cert_pem.clone(),
            trust_ca_pems: self.trust_ca_pems.clone(),
        })
    }
}

/// The parts of a bundle file, borrowed from its bytes. Nothing is verified yet but the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedBundle<'a> {
    /// The decoded header.
    pub header: BundleHeader,
    /// Every byte the signature covers.
    pub signed: &'a [u8],
    /// The age ciphertext.
    pub ciphertext: &'a [u8],
    /// The signature (ASN.1 DER ECDSA).
    pub signature: &'a [u8],
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The signed part of a bundle: magic, header and ciphertext with their lengths. Sign it and pass
/// both to [`finish_bundle`].
///
/// # Errors
/// [`BundleError::TooLarge`] if the header or ciphertext is above its limit;
/// [`BundleError::Malformed`] if the header cannot be encoded.
pub fn encode_signed_part(header: &BundleHeader, ciphertext: &[u8]) -> Result<Vec<u8>, BundleError> {
    let header_bytes =
        bincode::serde::encode_to_vec(header, config()).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if header_bytes.len() > BUNDLE_HEADER_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle header",
            len_bytes: header_bytes.len() as u64,
            max_bytes: BUNDLE_HEADER_BYTES_MAX as u64,
        });
    }
    if ciphertext.len() as u64 > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle ciphertext",
            len_bytes: ciphertext.len() as u64,
            max_bytes: BUNDLE_BYTES_MAX,
        });
    }
    let mut out = Vec::with_capacity(16 + 4 + header_bytes.len() + 8 + ciphertext.len() + 2 + 80);
    out.extend_from_slice(BUNDLE_MAGIC);
    // Checked above: fits in u32.
    out.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(&(ciphertext.len() as u64).to_be_bytes());
    out.extend_from_slice(ciphertext);
    Ok(out)
}

/// Appends the signature to the signed part, giving the complete bundle file.
///
/// # Errors
/// [`BundleError::TooLarge`] if the signature is above [`BUNDLE_SIGNATURE_BYTES_MAX`].
pub fn finish_bundle(mut signed: Vec<u8>, signature: &[u8]) -> Result<Vec<u8>, BundleError> {
    if signature.len() > BUNDLE_SIGNATURE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle signature",
            len_bytes: signature.len() as u64,
            max_bytes: BUNDLE_SIGNATURE_BYTES_MAX as u64,
        });
    }
    // Checked above: fits in u16.
    signed.extend_from_slice(&(signature.len() as u16).to_be_bytes());
    signed.extend_from_slice(signature);
    Ok(signed)
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize, what: &'static str) -> Result<&'a [u8], BundleError> {
    let end = at.checked_add(n).ok_or(BundleError::Truncated(what))?;
    let part = bytes.get(*at..end).ok_or(BundleError::Truncated(what))?;
    *at = end;
    Ok(part)
}

/// Splits a bundle file into its parts and decodes the header, checking every length against
/// the bytes present and the limits.
///
/// # Errors
/// [`BundleError::TooLarge`], [`BundleError::NotABundle`], [`BundleError::Truncated`],
/// [`BundleError::Malformed`].
pub fn parse_bundle(bytes: &[u8]) -> Result<ParsedBundle<'_>, BundleError> {
    if bytes.len() as u64 > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle",
            len_bytes: bytes.len() as u64,
            max_bytes: BUNDLE_BYTES_MAX,
        });
    }
    let mut at = 0;
    let magic = bytes.get(..BUNDLE_MAGIC.len()).ok_or(BundleError::NotABundle)?;
    if magic != BUNDLE_MAGIC {
        return Err(BundleError::NotABundle);
    }
    at += BUNDLE_MAGIC.len();
    let header_len = u32::from_be_bytes(
        take(bytes, &mut at, 4, "header length")?.try_into().map_err(|_| BundleError::Truncated("header length"))?,
    ) as usize;
    if header_len > BUNDLE_HEADER_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle header",
            len_bytes: header_len as u64,
            max_bytes: BUNDLE_HEADER_BYTES_MAX as u64,
        });
    }
    let header_bytes = take(bytes, &mut at, header_len, "header")?;
    let ct_len = u64::from_be_bytes(
        take(bytes, &mut at, 8, "ciphertext length")?
            .try_into()
            .map_err(|_| BundleError::Truncated("ciphertext length"))?,
    );
    if ct_len > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle ciphertext",
            len_bytes: ct_len,
            max_bytes: BUNDLE_BYTES_MAX,
        });
    }
    let ciphertext = take(bytes, &mut at, ct_len as usize, "ciphertext")?;
    let signed_end = at;
    let sig_len = u16::from_be_bytes(
        take(bytes, &mut at, 2, "signature length")?
            .try_into()
            .map_err(|_| BundleError::Truncated("signature length"))?,
    ) as usize;
    if sig_len > BUNDLE_SIGNATURE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle signature",
            len_bytes: sig_len as u64,
            max_bytes: BUNDLE_SIGNATURE_BYTES_MAX as u64,
        });
    }
    let signature = take(bytes, &mut at, sig_len, "signature")?;
    if at != bytes.len() {
        return Err(BundleError::Malformed(format!("{} bytes after the signature", bytes.len() - at)));
    }
    let header: BundleHeader = decode_exact(header_bytes, "header")?;
    Ok(ParsedBundle { header, signed: &bytes[..signed_end], ciphertext, signature })
}

fn decode_exact<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, BundleError> {
    let (value, used) = crate::codec::decode_from_slice_bounded::<T, { BUNDLE_BYTES_MAX as usize }>(bytes)
        .map_err(|e| BundleError::Malformed(format!("{what}: {e}")))?;
    if used != bytes.len() {
        return Err(BundleError::Malformed(format!("{what}: {} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}

/// Encodes a payload ([`AgentBundle`] or [`ControlReply`]) for encryption.
///
/// # Errors
/// [`BundleError::TooLarge`] above [`BUNDLE_BYTES_MAX`]; [`BundleError::Malformed`] if it cannot
/// be encoded.
pub fn encode_payload<T: Serialize>(payload: &T) -> Result<Vec<u8>, BundleError> {
    let bytes = bincode::serde::encode_to_vec(payload, config()).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if bytes.len() as u64 > BUNDLE_BYTES_MAX {
        return Err(BundleError::TooLarge {
            what: "bundle payload",
            len_bytes: bytes.len() as u64,
            max_bytes: BUNDLE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// Decodes a decrypted payload; trailing bytes are an error.
///
/// # Errors
/// [`BundleError::Malformed`].
pub fn decode_payload<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, BundleError> {
    decode_exact(bytes, "payload")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BundleHeader {
        BundleHeader {
            direction: BundleDirection::AgentToControl,
            ca_fingerprint: [7; 32],
            agent_id: uuid::Uuid::from_u128(42),
            bundle_number: 3,
            created_at_ms: 1_700_000_000_000,
            signer_cert_der: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip_and_every_truncation_is_refused() -> Result<(), BundleError> {
        let signed = encode_signed_part(&header(), b"ciphertext bytes")?;
        let file = finish_bundle(signed.clone(), &[9; 70])?;
        let parsed = parse_bundle(&file)?;
        assert_eq!(parsed.header, header());
        assert_eq!(parsed.ciphertext, b"ciphertext bytes");
        assert_eq!(parsed.signed, &signed[..]);
        assert_eq!(parsed.signature, &[9; 70]);
        for cut in 0..file.len() {
            assert!(parse_bundle(&file[..cut]).is_err(), "a file cut at {cut} bytes parsed");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(parse_bundle(&longer), Err(BundleError::Malformed(_))));
        let mut bad_magic = file;
        bad_magic[0] ^= 1;
        assert_eq!(parse_bundle(&bad_magic), Err(BundleError::NotABundle));
        Ok(())
    }

    #[derive(Serialize)]
    struct ControlReplyV1Out {
        acks: Vec<u64>,
        assignments: Vec<Assignment>,
        crl_pem: String,
        renewed_cert_pem: Option<String>,
        trust_ca_pems: Vec<String>,
    }

    #[test]
    fn replies_and_agent_bundles_of_both_layouts_decode() -> Result<(), BundleError> {
        let reply = ControlReply {
            acks: vec![1, 2],
            assignments: vec![],
            crl_pem: "crl".into(),
            renewed_cert_pem: None,
            trust_ca_pems: vec!["ca".into()],
            update: Some(BundledRelease {
                order: UpdateOrder {
                    rollout_id: 3,
                    version: "9.1.0".into(),
                    file_name: "gaffer-agent-9.1.0-x86_64-linux.tar.gz".into(),
                    size_bytes: 4,
                    sha256: "ab".repeat(32),
                    health_wait_secs: 6,
                },
                artifact: vec![1, 2, 3, 4],
            }),
        };
        assert_eq!(ControlReply::decode(&encode_payload(&reply)?)?, reply);
        let old = ControlReplyV1Out {
            acks: reply.acks.clone(),
            assignments: vec![],
            crl_pem: reply.crl_pem.clone(),
            renewed_cert_pem: None,
            trust_ca_pems: reply.trust_ca_pems.clone(),
        };
        assert_eq!(ControlReply::decode(&encode_payload(&old)?)?, ControlReply { update: None, ..reply.clone() });
        assert_eq!(reply.encode_without_update()?, encode_payload(&old)?);
        let mut cut = encode_payload(&reply)?;
        cut.pop();
        assert!(ControlReply::decode(&cut).is_err());

        let agent = AgentBundle { envelopes: vec![], capabilities: None, agent_version: Some("0.1.0".into()) };
        assert_eq!(AgentBundle::decode(&encode_payload(&agent)?)?, agent);
        let old_agent: (Vec<AgentEnvelope>, Option<Capabilities>) = (vec![], None);
        assert_eq!(AgentBundle::decode(&encode_payload(&old_agent)?)?, AgentBundle { agent_version: None, ..agent });
        Ok(())
    }
}
