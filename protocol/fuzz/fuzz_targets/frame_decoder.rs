//! Feeds arbitrary bytes, in arbitrary chunk sizes, to the frame decoder in both directions.
//! Run: `cd protocol/fuzz && cargo +nightly fuzz run frame_decoder`.
#![no_main]

use gaffer_protocol::{AgentEnvelope, ControlMessage, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = usize::from(chunk.max(1));
    let mut agent_side = FrameDecoder::new(64 * 1024);
    let mut control_side = FrameDecoder::new(64 * 1024);
    for piece in rest.chunks(chunk) {
        agent_side.push(piece);
        control_side.push(piece);
        while let Ok(Some(_)) = agent_side.next_message::<ControlMessage>() {}
        while let Ok(Some(_)) = control_side.next_message::<AgentEnvelope>() {}
    }
    let _ = agent_side.finish();
});
