//! SHA-256 fingerprints of the fleet CA certificate.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::CertError;
use crate::inspect::single_cert_der_from_pem;

/// SHA-256 of the fleet CA certificate's DER encoding: what the operator copies from the control
/// plane to an agent to authenticate the control plane at enrollment.
///
/// `Display` gives 64 lowercase hex characters without separators. `FromStr` accepts hex in either
/// case, with or without `:` separators between bytes (as `openssl x509 -fingerprint -sha256` prints
/// it), and surrounding whitespace. Serde uses the `Display` form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaFingerprint([u8; 32]);

impl CaFingerprint {
    /// Fingerprint of a DER-encoded certificate (any bytes are hashed; no parsing happens).
    pub fn from_cert_der(der: &[u8]) -> Self {
        CaFingerprint(Sha256::digest(der).into())
    }

    /// Fingerprint of the single certificate in `pem`.
    ///
    /// Errors: [`CertError::TooLarge`] above [`crate::PEM_BYTES_MAX`], [`CertError::InvalidPem`] if
    /// `pem` does not hold exactly one `CERTIFICATE` block.
    pub fn from_cert_pem(pem: &str) -> Result<Self, CertError> {
        let der = single_cert_der_from_pem(pem, "CA certificate")?;
        Ok(Self::from_cert_der(&der))
    }

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CaFingerprint(bytes)
    }

    /// The raw 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CaFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFingerprint({self})")
    }
}

impl FromStr for CaFingerprint {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // 32 bytes as hex with ':' separators is 95 characters; allow some whitespace around it.
        const INPUT_CHARS_MAX: usize = 128;
        if s.len() > INPUT_CHARS_MAX {
            return Err(CertError::InvalidFingerprint {
                reason: format!("{} characters, expected 64 hex digits", s.len()),
            });
        }
        let digits: String = s.trim().chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&digits, &mut bytes)
            .map_err(|e| CertError::InvalidFingerprint { reason: format!("expected 64 hex digits (SHA-256): {e}") })?;
        Ok(CaFingerprint(bytes))
    }
}

impl serde::Serialize for CaFingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CaFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_colons_and_uppercase_and_displays_lowercase() {
        let fp = CaFingerprint::from_cert_der(b"not really a certificate");
        let lower = fp.to_string();
        assert_eq!(lower.len(), 64);
        assert_eq!(lower, lower.to_lowercase());
        let colons_upper = fp.as_bytes().iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
        assert_eq!(colons_upper.parse::<CaFingerprint>().ok(), Some(fp));
        assert_eq!(format!("  {lower}\n").parse::<CaFingerprint>().ok(), Some(fp));
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        let fp = CaFingerprint::from_cert_der(b"x").to_string();
        assert!(matches!(fp[..62].parse::<CaFingerprint>(), Err(CertError::InvalidFingerprint { .. })));
        assert!(matches!(format!("{fp}00").parse::<CaFingerprint>(), Err(CertError::InvalidFingerprint { .. })));
        let non_hex = format!("zz{}", &fp[2..]);
        assert!(matches!(non_hex.parse::<CaFingerprint>(), Err(CertError::InvalidFingerprint { .. })));
        assert!("x".repeat(10_000).parse::<CaFingerprint>().is_err());
    }

    #[test]
    fn serde_round_trip_uses_hex() -> Result<(), serde_json::Error> {
        let fp = CaFingerprint::from_cert_der(b"y");
        let json = serde_json::to_string(&fp)?;
        assert_eq!(json, format!("\"{fp}\""));
        assert_eq!(serde_json::from_str::<CaFingerprint>(&json)?, fp);
        Ok(())
    }
}
