//! Length-prefixed bincode frames.
//!
//! Wire layout of one frame:
//!
//! ```text
//! +----------------------+------------------------------------------+
//! | length: u32 BE       | payload: bincode 2 (standard config,     |
//! | (payload bytes only) | serde) encoding of one message           |
//! +----------------------+------------------------------------------+
//! ```
//!
//! The decoder reads the 4-byte header, checks `length` against its `frame_bytes_max` **before**
//! buffering or allocating the payload, and only then waits for the payload. A payload that does not
//! decode to exactly one message of the expected type, with no trailing bytes, is a
//! [`CodecError::Malformed`]. After any error the decoder is poisoned: the stream is out of sync and
//! the caller must close it.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Size of the frame header (big-endian `u32` payload length), in bytes.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Default largest payload a decoder accepts, in bytes: 8 MiB. A digest of a feature film
/// (thousands of shots) is well under 1 MiB.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;

/// Errors from encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer announced (or we tried to send) a payload above the limit; close the stream.
    #[error("frame of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    FrameTooLarge {
        /// Announced payload length.
        len_bytes: usize,
        /// The decoder's `frame_bytes_max`.
        max_bytes: usize,
    },
    /// The payload is not a valid encoding of the expected message; close the stream.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered_bytes} bytes buffered)")]
    Truncated {
        /// Bytes of the partial frame that were received.
        buffered_bytes: usize,
    },
    /// A previous error left the decoder out of sync; the stream must be closed.
    #[error("decoder is poisoned by an earlier error")]
    Poisoned,
    /// Serializing a message failed (a bug: all protocol types are serializable).
    #[error("could not encode message: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `msg` as one frame (header + payload).
///
/// # Errors
/// [`CodecError::FrameTooLarge`] if the payload exceeds `frame_bytes_max`, so an oversize message is
/// refused by the sender with a clear error instead of being cut off by the receiver.
pub fn encode_frame<T: Serialize>(msg: &T, frame_bytes_max: usize) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(msg, config()).map_err(|e| CodecError::Encode(e.to_string()))?;
    if payload.len() > frame_bytes_max || payload.len() > u32::MAX as usize {
        return Err(CodecError::FrameTooLarge { len_bytes: payload.len(), max_bytes: frame_bytes_max });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    // Checked above: the length fits in u32.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Most bytes bincode counts against its decode limit per byte of input: it counts each value at
/// its in-memory size (a one-byte varint `u128` counts 16), so no valid encoding counts more.
const DECODE_LIMIT_BYTES_PER_INPUT_BYTE: usize = 16;

/// Decodes one `T` from the start of `bytes` (bincode 2 standard, serde), returning it and the
/// bytes used, under a decode limit that follows the input's size: 16 × `bytes.len()` rounded up
/// to 64 KiB, 1, 4, 16 or 64 MiB, and never above `LIMIT_MAX_BYTES`.
///
/// bincode allocates a string's announced length, up to its limit, before it reads the string.
/// With one fixed limit, a few bytes announcing a long string allocate the whole limit; with this
/// one a string longer than the input could hold fails before anything is allocated for it, and
/// no allocation is larger than 64 × the input (or 64 KiB). bincode takes the limit as a
/// constant, hence the steps.
pub(crate) fn decode_from_slice_bounded<T: DeserializeOwned, const LIMIT_MAX_BYTES: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    let wanted = bytes.len().saturating_mul(DECODE_LIMIT_BYTES_PER_INPUT_BYTE);
    macro_rules! first_step_that_fits {
        ($($step:expr),*) => {$(
            if $step < LIMIT_MAX_BYTES && wanted <= $step {
                return bincode::serde::decode_from_slice(bytes, config().with_limit::<{ $step }>());
            }
        )*};
    }
    first_step_that_fits!(1 << 16, 1 << 20, 1 << 22, 1 << 24, 1 << 26);
    bincode::serde::decode_from_slice(bytes, config().with_limit::<LIMIT_MAX_BYTES>())
}

/// Decodes one complete payload (without header) into a message. Nothing is allocated for a
/// length the payload announces beyond what it could hold (see `decode_from_slice_bounded`).
///
/// # Errors
/// [`CodecError::Malformed`] on invalid encodings or trailing bytes.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = decode_from_slice_bounded::<T, FRAME_BYTES_MAX_DEFAULT>(payload)
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Malformed(format!("{} trailing bytes after message", payload.len() - used)));
    }
    Ok(msg)
}

/// Incremental frame decoder: feed it bytes as they arrive, take messages out.
///
/// Buffers at most one frame (`FRAME_HEADER_BYTES + frame_bytes_max`) plus whatever the caller pushed
/// in one [`FrameDecoder::push`] call beyond it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    frame_bytes_max: usize,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `frame_bytes_max` bytes
    /// (see [`FRAME_BYTES_MAX_DEFAULT`]).
    pub fn new(frame_bytes_max: usize) -> Self {
        Self { buf: Vec::new(), frame_bytes_max, poisoned: false }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as a message.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// [`CodecError::FrameTooLarge`] as soon as a header announces an oversize payload (nothing is
    /// allocated for it), [`CodecError::Malformed`] for a bad payload, [`CodecError::Poisoned`] after
    /// any earlier error.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, CodecError> {
        let Some(end) = self.complete_frame_end()? else {
            return Ok(None);
        };
        let result = decode_payload(&self.buf[FRAME_HEADER_BYTES..end]);
        self.buf.drain(..end);
        match result {
            Ok(msg) => Ok(Some(msg)),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Returns the next complete frame's payload (without its header), `Ok(None)` if more bytes
    /// are needed; for messages with more than one layout, which the caller decodes itself (see
    /// [`crate::enroll::EnrollResponse::decode_payload`]).
    ///
    /// # Errors
    /// [`CodecError::FrameTooLarge`] as soon as a header announces an oversize payload (nothing is
    /// allocated for it), [`CodecError::Poisoned`] after any earlier error.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, CodecError> {
        let Some(end) = self.complete_frame_end()? else {
            return Ok(None);
        };
        let payload = self.buf[FRAME_HEADER_BYTES..end].to_vec();
        self.buf.drain(..end);
        Ok(Some(payload))
    }

    /// The end (in `buf`) of the first frame once it is complete; checks the announced length.
    fn complete_frame_end(&mut self) -> Result<Option<usize>, CodecError> {
        if self.poisoned {
            return Err(CodecError::Poisoned);
        }
        let Some(header) = self.buf.get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let mut len_be = [0u8; FRAME_HEADER_BYTES];
        len_be.copy_from_slice(header);
        let len = u32::from_be_bytes(len_be) as usize;
        if len > self.frame_bytes_max {
            self.poisoned = true;
            return Err(CodecError::FrameTooLarge { len_bytes: len, max_bytes: self.frame_bytes_max });
        }
        let end = FRAME_HEADER_BYTES + len;
        Ok((self.buf.len() >= end).then_some(end))
    }

    /// How many more bytes the current frame needs, given what is buffered; at least 1 while the
    /// header is incomplete. Drivers use it to size reads.
    pub fn bytes_wanted(&self) -> usize {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return FRAME_HEADER_BYTES - self.buf.len();
        }
        let mut len_be = [0u8; FRAME_HEADER_BYTES];
        len_be.copy_from_slice(&self.buf[..FRAME_HEADER_BYTES]);
        let len = (u32::from_be_bytes(len_be) as usize).min(self.frame_bytes_max);
        (FRAME_HEADER_BYTES + len).saturating_sub(self.buf.len()).max(1)
    }

    /// Takes every byte buffered and not returned as a message, leaving the decoder empty: for a
    /// stream that carries raw bytes after its frames (the release fetch stream).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Call when the stream has ended: errors if a partial frame is buffered.
    ///
    /// # Errors
    /// [`CodecError::Truncated`] when the stream ended mid-frame.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated { buffered_bytes: self.buf.len() })
        }
    }
}
