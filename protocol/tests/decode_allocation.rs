//! A few bytes announcing a long string must not make the decoder allocate that length: found
//! by the `frame_decoder` fuzz target (`fuzz/`), where a 10-byte frame made the codec allocate
//! up to its 8 MiB decode limit, and a bundle payload up to 256 MiB, before finding the bytes
//! missing.
//!
//! One test in this binary, so nothing else allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gaffer_protocol::bundle::{self, ControlReply};
use gaffer_protocol::codec::{decode_payload, encode_frame, CodecError, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::{ControlMessage, FrameDecoder};

static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Measuring;

// SAFETY: forwards every call to `System`; only records sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Measuring = Measuring;

/// The largest single allocation `f` makes, bytes.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let out = f();
    (out, LARGEST.load(Ordering::Relaxed))
}

/// bincode 2 varint of a length above 2^32 - 1 is `253` and the `u64` little-endian.
fn varint_u64(n: u64) -> Vec<u8> {
    let mut v = vec![253];
    v.extend_from_slice(&n.to_le_bytes());
    v
}

#[test]
fn announced_lengths_do_not_allocate_before_the_bytes_are_there() {
    // ControlMessage::Refused (variant 1) whose reason announces 7 MiB and carries none of it.
    let mut payload = vec![1];
    payload.extend(varint_u64(7 << 20));
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let (result, largest) = largest_allocation(|| {
        let mut dec = FrameDecoder::new(4096);
        dec.push(&frame);
        dec.next_message::<ControlMessage>()
    });
    assert!(matches!(result, Err(CodecError::Malformed(_))), "{result:?}");
    assert!(largest < 64 * 1024, "a {}-byte frame allocated {largest} bytes", frame.len());

    // A reply bundle payload whose CRL announces 200 MiB.
    let mut reply = vec![0, 0]; // no acks, no assignments
    reply.extend(varint_u64(200 << 20));
    let (result, largest) = largest_allocation(|| bundle::decode_payload::<ControlReply>(&reply));
    assert!(result.is_err());
    assert!(largest < 64 * 1024, "a {}-byte payload allocated {largest} bytes", reply.len());

    // Large messages that are really there still decode, up to the frame limit.
    let big = ControlMessage::Refused { reason: "x".repeat(FRAME_BYTES_MAX_DEFAULT - 16) };
    let frame = encode_frame(&big, FRAME_BYTES_MAX_DEFAULT).expect("fits the limit");
    let back: ControlMessage = decode_payload(&frame[4..]).expect("decodes");
    assert_eq!(back, big);
    let reply = ControlReply {
        acks: (1..=100_000).collect(),
        assignments: vec![],
        crl_pem: "y".repeat(20 << 20),
        trust_ca_pems: vec![],
        renewed_cert_pem: None,
        update: None,
    };
    let bytes = bundle::encode_payload(&reply).expect("encodes");
    assert_eq!(bundle::decode_payload::<ControlReply>(&bytes).expect("decodes"), reply);
}
