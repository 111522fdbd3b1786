//! The crate's one error type.

use std::path::PathBuf;

use crate::fingerprint::CaFingerprint;

/// Everything that can go wrong in `gaffer-certs`. Variants are named for what the caller can do
/// about them; none of them ever carries a private key or a token secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The input is not the PEM object expected (`what` names it, e.g. "CA certificate"). Fix the
    /// file or the copy/paste.
    #[error("invalid PEM for {what}: {reason}")]
    InvalidPem {
        /// What was being parsed.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An input is larger than its limit; it was rejected before being parsed.
    #[error("{what} is {len_bytes} bytes, more than the limit of {max_bytes} bytes")]
    TooLarge {
        /// What was being parsed.
        what: &'static str,
        /// Size of the input in bytes.
        len_bytes: usize,
        /// The limit in bytes.
        max_bytes: usize,
    },
    /// A certificate could not be parsed or lacks something required (e.g. it is not a CA).
    #[error("invalid certificate: {reason}")]
    InvalidCertificate {
        /// Why it was rejected.
        reason: String,
    },
    /// A private key does not belong to the certificate it was paired with. Check that the key file
    /// and the certificate file are from the same issuance.
    #[error("the private key does not match the {what} certificate")]
    KeyMismatch {
        /// Which certificate.
        what: &'static str,
    },
    /// The certificate signing request is malformed, has a bad signature, uses an unsupported key type
    /// (only ECDSA P-256 is accepted) or asks for unsupported extensions. Refuse the enrollment.
    #[error("invalid certificate signing request: {reason}")]
    InvalidCsr {
        /// Why it was rejected.
        reason: String,
    },
    /// The certificate does not carry a Gaffer agent identity (URI SAN `urn:gaffer:agent:<uuid>`),
    /// or the peer presented no certificate at all. On a `gaffer/1` connection: close it.
    #[error("no Gaffer agent identity: {reason}")]
    NoAgentIdentity {
        /// Why no identity was found.
        reason: String,
    },
    /// A requested server SAN is neither an IP address nor a valid DNS name.
    #[error("invalid server name {san:?}: {reason}")]
    InvalidSan {
        /// The rejected name.
        san: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A fleet name is empty, too long or contains control characters.
    #[error("invalid fleet name: {reason}")]
    InvalidFleetName {
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A requested validity period is outside the allowed range.
    #[error("a certificate validity of {validity_secs} s is outside {min_secs}..={max_secs} s (1 minute to 825 days)")]
    InvalidValidity {
        /// The requested validity, seconds.
        validity_secs: u64,
        /// The shortest allowed, seconds.
        min_secs: u64,
        /// The longest allowed, seconds.
        max_secs: u64,
    },
    /// The control plane presented a CA other than the one the operator's fingerprint names. Do not
    /// enroll: either the fingerprint was mistyped or someone is impersonating the control plane.
    #[error("control plane CA fingerprint mismatch: expected {expected}, got {got}")]
    FingerprintMismatch {
        /// The fingerprint the operator supplied.
        expected: CaFingerprint,
        /// SHA-256 of the CA certificate the server presented.
        got: CaFingerprint,
    },
    /// The server's certificate chain did not end with a CA certificate, so there was nothing to
    /// compare against the expected fingerprint.
    #[error("the control plane presented only its own certificate, not the fleet CA certificate")]
    NoCaInChain,
    /// A fingerprint string is not 32 bytes of hex (optionally `:`-separated).
    #[error("invalid CA fingerprint: {reason}")]
    InvalidFingerprint {
        /// Why it was rejected.
        reason: String,
    },
    /// A token string is malformed (wrong prefix, length or encoding). The message never contains
    /// the token itself.
    #[error("invalid {kind}: {reason}")]
    InvalidToken {
        /// Which kind of token ("enrollment token", "API token").
        kind: &'static str,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A token hash string is not 32 bytes of hex.
    #[error("invalid token hash: {reason}")]
    InvalidTokenHash {
        /// Why it was rejected.
        reason: String,
    },
    /// Key generation, certificate or CRL serialization failed inside rcgen. Not caused by input the
    /// caller can fix; report it.
    #[error("certificate generation failed: {0}")]
    Generation(#[source] rcgen::Error),
    /// rustls rejected the configuration (e.g. an unusable key or certificate).
    #[error("TLS configuration rejected: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. an unparsable CRL or CA).
    #[error("client certificate verifier could not be built: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// An offline-sync bundle is not a well-formed bundle: not a bundle at all, cut short,
    /// malformed or over a size limit. Nothing was imported; get an intact copy.
    #[error(transparent)]
    Bundle(#[from] gaffer_protocol::bundle::BundleError),
    /// The bundle travels the other way (e.g. a reply bundle given to the control plane).
    #[error("this bundle goes {got:?}, expected {expected:?}: import it on the other side")]
    BundleWrongDirection {
        /// The direction the importer handles.
        expected: gaffer_protocol::bundle::BundleDirection,
        /// The bundle's direction.
        got: gaffer_protocol::bundle::BundleDirection,
    },
    /// The bundle was written for another fleet (its CA fingerprint is not ours). Nothing was
    /// imported; take it to the control plane of its own fleet.
    #[error("bundle is from another fleet: its CA fingerprint is {got}, ours is {expected}")]
    BundleFromAnotherFleet {
        /// Our CA fingerprint.
        expected: CaFingerprint,
        /// The fingerprint in the bundle.
        got: CaFingerprint,
    },
    /// The bundle's signer certificate is revoked. Nothing was imported.
    #[error("bundle is signed by a revoked certificate (serial {serial_hex}); nothing was imported")]
    BundleSignerRevoked {
        /// Serial number of the revoked certificate, hex.
        serial_hex: String,
    },
    /// The bundle's signer certificate does not chain to our CA, is expired, or names another
    /// party than the bundle claims. Nothing was imported.
    #[error("bundle signer refused: {reason}")]
    BundleSignerRejected {
        /// Why.
        reason: String,
    },
    /// The bundle's signature does not verify: the file was altered after it was written.
    #[error("bundle signature does not verify: the file was altered or damaged; nothing was imported")]
    BundleSignatureInvalid,
    /// The bundle could not be decrypted with our bundle key (encrypted to someone else, or
    /// damaged).
    #[error("bundle cannot be decrypted with this side's bundle key: {reason}")]
    BundleDecryption {
        /// age's message.
        reason: String,
    },
    /// Encrypting or signing a bundle failed inside age or ring (not caused by input).
    #[error("bundle could not be encrypted or signed: {reason}")]
    BundleEncryption {
        /// What failed.
        reason: String,
    },
    /// A bundle key or recipient is not an age X25519 key.
    #[error("invalid bundle key: {reason}")]
    InvalidBundleKey {
        /// Why (never contains key material).
        reason: String,
    },
    /// A release artifact is not one Gaffer publishes: its file name is not
    /// `gaffer-agent-VERSION-ARCH-linux.tar.gz`, it is not a gzip-compressed tar archive, or its
    /// content disagrees with its name (top directory, the binary's architecture). Nothing was
    /// signed or added; build it with `installers/build-packages.sh`.
    #[error("{file_name} is not a Gaffer release: {reason}")]
    InvalidRelease {
        /// The artifact's file name.
        file_name: String,
        /// What does not fit.
        reason: String,
    },
    /// The release artifact carries no signature: sign it with the release key
    /// (`gaffer-control release sign`, or `release add` without `--signature-already-embedded`).
    #[error("{file_name} carries no release signature: sign it with the release key first")]
    ReleaseUnsigned {
        /// The artifact's file name.
        file_name: String,
    },
    /// The release artifact is signed already; signing it again would bury that signature. Add it
    /// as it is (`release add --signature-already-embedded`).
    #[error("{file_name} is already signed: add it with --signature-already-embedded")]
    ReleaseAlreadySigned {
        /// The artifact's file name.
        file_name: String,
    },
    /// No trusted release key's signature verifies: the file was changed after it was signed, it
    /// was signed by another key, or under another file name. Do not install it.
    #[error(
        "the signature of {file_name} does not verify against the trusted release key(s) [{trusted}]: it was \
         altered, signed by another key or renamed after signing; do not install it"
    )]
    ReleaseSignatureInvalid {
        /// The artifact's file name.
        file_name: String,
        /// Fingerprints of the keys tried, comma-separated.
        trusted: String,
    },
    /// A release key file or fingerprint is malformed (never contains key material).
    #[error("invalid release key: {reason}")]
    InvalidReleaseKey {
        /// Why.
        reason: String,
    },
    /// Signing a release failed inside zipsign (not caused by the input). Report it.
    #[error("release signing failed: {reason}")]
    ReleaseSigning {
        /// zipsign's message.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl CertError {
    pub(crate) fn invalid_cert(reason: impl ToString) -> Self {
        CertError::InvalidCertificate { reason: reason.to_string() }
    }

    pub(crate) fn invalid_csr(reason: impl ToString) -> Self {
        CertError::InvalidCsr { reason: reason.to_string() }
    }
}
