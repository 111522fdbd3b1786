//! The frame decoder on every stream Gaffer reads frames from: the control plane reading an agent
//! link (`AgentEnvelope`), the agent reading the control plane (`ControlMessage`), and the agent
//! reading an analysis worker's stdout (`WorkerMessage`).
//!
//! Input: byte 0 is the chunk size the stream arrives in (0: all at once), the rest is the
//! stream. Checked for every input: no panic; no allocation beyond what the input's size
//! justifies (a header announcing a large payload, or a payload announcing a long string, must
//! not allocate for it); the decoder never buffers more than one frame after it has handed out
//! every complete one; a decoded message encodes again within the frame limit. Trust sets the
//! control plane sends (`TrustBundle`, `Certificate`) go through the agent's check.
#![no_main]

use gaffer_agent::worker::WorkerMessage;
use gaffer_protocol::codec::{encode_frame, CodecError, FRAME_HEADER_BYTES};
use gaffer_protocol::{AgentEnvelope, ControlMessage, FrameDecoder};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

/// Small, so that announced lengths just above it are cheap for the fuzzer to find.
const FRAME_BYTES_MAX: usize = 4096;

/// Takes every complete message out of `dec`; false once it has failed (the stream is closed).
fn drain<T: DeserializeOwned + Serialize>(dec: &mut FrameDecoder, handle: fn(&T)) -> bool {
    loop {
        let before = dec.buffered_bytes();
        match dec.next_message::<T>() {
            Ok(Some(msg)) => {
                let used = before - dec.buffered_bytes();
                let again = encode_frame(&msg, FRAME_BYTES_MAX)
                    .unwrap_or_else(|e| panic!("a decoded message does not encode again: {e}"));
                assert!(again.len() <= used, "re-encoding a {used}-byte frame gave {} bytes", again.len());
                handle(&msg);
            }
            Ok(None) => {
                assert!(
                    dec.buffered_bytes() < FRAME_HEADER_BYTES + FRAME_BYTES_MAX,
                    "{} bytes buffered without a complete frame (limit {FRAME_BYTES_MAX})",
                    dec.buffered_bytes()
                );
                assert!(dec.bytes_wanted() >= 1);
                return true;
            }
            Err(CodecError::FrameTooLarge { len_bytes, max_bytes }) => {
                assert!(len_bytes > max_bytes);
                assert!(matches!(dec.next_message::<T>(), Err(CodecError::Poisoned)));
                return false;
            }
            Err(CodecError::Malformed(_)) => {
                assert!(matches!(dec.next_message::<T>(), Err(CodecError::Poisoned)));
                return false;
            }
            Err(e) => panic!("unexpected decoder error: {e}"),
        }
    }
}

/// The agent checks a trust set the control plane sends before it replaces `ca.pem` with it.
fn agent_checks_trust_set(msg: &ControlMessage) {
    if let ControlMessage::TrustBundle { ca_pems } | ControlMessage::Certificate { ca_pems, .. } = msg {
        let _ = gaffer_agent::credentials::check_trust_bundle(ca_pems);
    }
}

fn run<T: DeserializeOwned + Serialize>(chunk: usize, stream: &[u8], handle: fn(&T)) {
    let mut dec = FrameDecoder::new(FRAME_BYTES_MAX);
    for piece in stream.chunks(chunk) {
        dec.push(piece);
        if !drain::<T>(&mut dec, handle) {
            return;
        }
    }
    let _ = dec.finish();
}

fuzz_target!(|data: &[u8]| {
    gaffer_fuzz::reset_largest_allocation();
    let Some((&chunk, stream)) = data.split_first() else { return };
    let chunk = if chunk == 0 { stream.len().max(1) } else { usize::from(chunk) };
    run::<AgentEnvelope>(chunk, stream, |_| {});
    run::<ControlMessage>(chunk, stream, agent_checks_trust_set);
    run::<WorkerMessage>(chunk, stream, |_| {});
    gaffer_fuzz::check_allocations(data.len(), "frame decoder");
});
