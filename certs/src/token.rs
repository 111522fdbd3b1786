//! Bearer tokens (one-time enrollment tokens, API tokens): 256-bit random secrets shown once and
//! stored only as SHA-256 hashes.

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::CertError;

/// Random bytes in every token: 32 (256 bits).
pub const TOKEN_SECRET_BYTES: usize = 32;
/// Length of the base64url (no padding) encoding of [`TOKEN_SECRET_BYTES`].
const TOKEN_SECRET_CHARS: usize = 43;

/// What distinguishes one kind of token from another: its prefix. Implemented by
/// [`EnrollmentTokenKind`] and [`ApiTokenKind`].
pub trait TokenKind {
    /// The prefix every token of this kind starts with, e.g. `"gfe_"`.
    const PREFIX: &'static str;
    /// Human name used in error messages, e.g. `"enrollment token"`.
    const NAME: &'static str;
}

/// Marker for one-time enrollment tokens (prefix `gfe_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentTokenKind {}
impl TokenKind for EnrollmentTokenKind {
    const PREFIX: &'static str = "gfe_";
    const NAME: &'static str = "enrollment token";
}

/// Marker for API bearer tokens (prefix `gfa_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiTokenKind {}
impl TokenKind for ApiTokenKind {
    const PREFIX: &'static str = "gfa_";
    const NAME: &'static str = "API token";
}

/// A one-time enrollment token: `gfe_` + base64url(32 random bytes), 47 characters.
pub type EnrollmentToken = Token<EnrollmentTokenKind>;
/// An API bearer token: `gfa_` + base64url(32 random bytes), 47 characters.
pub type ApiToken = Token<ApiTokenKind>;

/// A bearer token of kind `K`: `K::PREFIX` followed by base64url (no padding) of
/// [`TOKEN_SECRET_BYTES`] random bytes.
///
/// The string is the secret. It is shown to the operator once ([`Token::as_str`]) and stored only as
/// its [`TokenHash`]. `Debug` prints only the prefix; there is deliberately no `Display`.
pub struct Token<K: TokenKind> {
    secret: String,
    kind: PhantomData<K>,
}

impl<K: TokenKind> Token<K> {
    /// Generates a new token from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_SECRET_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes);
        Token { secret: format!("{}{}", K::PREFIX, URL_SAFE_NO_PAD.encode(bytes)), kind: PhantomData }
    }

    /// Parses a token as typed or pasted by a user (surrounding whitespace is ignored).
    ///
    /// Errors: [`CertError::InvalidToken`] if the prefix is not `K::PREFIX`, the length is wrong or
    /// the rest is not base64url of 32 bytes. The error never contains the input.
    pub fn parse(s: &str) -> Result<Self, CertError> {
        let invalid = |reason| CertError::InvalidToken { kind: K::NAME, reason };
        let s = s.trim();
        let rest = s.strip_prefix(K::PREFIX).ok_or_else(|| invalid("it does not start with the expected prefix"))?;
        if rest.len() != TOKEN_SECRET_CHARS {
            return Err(invalid("it has the wrong length"));
        }
        let mut bytes = [0u8; TOKEN_SECRET_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(rest, &mut bytes) {
            Ok(TOKEN_SECRET_BYTES) => {}
            _ => return Err(invalid("it is not base64url of 32 bytes")),
        }
        Ok(Token { secret: s.to_owned(), kind: PhantomData })
    }

    /// The full token string. **Secret**: show it once, never log it.
    pub fn as_str(&self) -> &str {
        &self.secret
    }

    /// SHA-256 of the token string: what the store keeps.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.secret.as_bytes()).into())
    }
}

impl<K: TokenKind> Clone for Token<K> {
    fn clone(&self) -> Self {
        Token { secret: self.secret.clone(), kind: PhantomData }
    }
}

impl<K: TokenKind> fmt::Debug for Token<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}[redacted])", K::PREFIX)
    }
}

impl<K: TokenKind> FromStr for Token<K> {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// SHA-256 of a token string, as stored by the control plane.
///
/// Equality is constant-time (`subtle`). `Display`/`FromStr`/serde use 64 lowercase hex characters.
#[derive(Clone, Copy)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Wraps raw digest bytes (e.g. read back from the store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TokenHash(bytes)
    }

    /// The raw 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `token` hashes to this value (constant-time comparison).
    pub fn matches<K: TokenKind>(&self, token: &Token<K>) -> bool {
        *self == token.hash()
    }
}

impl PartialEq for TokenHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for TokenHash {}

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({self})")
    }
}

impl FromStr for TokenHash {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut bytes)
            .map_err(|e| CertError::InvalidTokenHash { reason: format!("expected 64 hex digits: {e}") })?;
        Ok(TokenHash(bytes))
    }
}

impl serde::Serialize for TokenHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_have_the_documented_shape_and_differ() {
        let a = EnrollmentToken::generate();
        let b = EnrollmentToken::generate();
        assert!(a.as_str().starts_with("gfe_"));
        assert_eq!(a.as_str().len(), 4 + 43);
        assert_ne!(a.as_str(), b.as_str());
        assert_ne!(a.hash(), b.hash());
        assert!(ApiToken::generate().as_str().starts_with("gfa_"));
    }

    #[test]
    fn hash_round_trips_through_parse_and_hex() -> Result<(), CertError> {
        let token = EnrollmentToken::generate();
        let stored = token.hash().to_string();
        assert_eq!(stored.len(), 64);
        // What the user pastes back (with a trailing newline) matches what the store kept.
        let presented = EnrollmentToken::parse(&format!("{}\n", token.as_str()))?;
        let stored: TokenHash = stored.parse()?;
        assert!(stored.matches(&presented));
        assert!(!stored.matches(&EnrollmentToken::generate()));
        Ok(())
    }

    #[test]
    fn parse_errors_are_typed_and_do_not_leak_the_token() {
        let good = EnrollmentToken::generate();
        let secret_part = &good.as_str()[4..];
        let cases = [
            String::new(),
            secret_part.to_string(),                              // no prefix
            format!("gfa_{secret_part}"),                         // API token where enrollment expected
            format!("{}x", good.as_str()),                        // too long
            good.as_str()[..good.as_str().len() - 1].to_string(), // too short
            format!("gfe_{}", "!".repeat(43)),                    // not base64url
            format!("gfe_{}", "A".repeat(1_000_000)),             // huge
        ];
        for case in cases {
            match EnrollmentToken::parse(&case) {
                Err(e @ CertError::InvalidToken { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("enrollment token"), "{msg}");
                    assert!(!msg.contains(secret_part), "error leaks the token: {msg}");
                }
                other => panic!("expected InvalidToken for {:.20}, got {other:?}", case),
            }
        }
        // 32 bytes leave 2 unused low bits in the last base64 character; a canonical encoding has
        // them zero ('B' = 1 has one set), so this string decodes to no canonical token.
        let mut non_canonical = good.as_str().to_string();
        non_canonical.pop();
        non_canonical.push('B');
        assert!(matches!(EnrollmentToken::parse(&non_canonical), Err(CertError::InvalidToken { .. })));
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let token = EnrollmentToken::generate();
        let debug = format!("{token:?}");
        assert!(!debug.contains(&token.as_str()[4..]));
        assert!(debug.contains("gfe_"));
    }

    #[test]
    fn token_hash_rejects_bad_hex() {
        assert!(matches!("abc".parse::<TokenHash>(), Err(CertError::InvalidTokenHash { .. })));
    }
}
