//! The two layouts of the enrollment answer (protocol 4 added `release_public_key`): a new
//! control plane answers protocol-3 agents in their layout, a new agent reads both.

use gaffer_protocol::codec::{decode_payload, FrameDecoder, FRAME_HEADER_BYTES};
use gaffer_protocol::enroll::{EnrollResponse, ENROLL_FRAME_BYTES_MAX};
use gaffer_protocol::version::VersionRange;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `EnrollResponse` exactly as a protocol-3 build (before the release key) declared it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum EnrollResponseProtocol3 {
    Enrolled { agent_id: Uuid, site: String, cert_pem: String, ca_pem: String, bundle_recipient: Option<String> },
    Refused { reason: String },
}

fn enrolled(release_public_key: Option<[u8; 32]>) -> EnrollResponse {
    EnrollResponse::Enrolled {
        agent_id: Uuid::from_u128(7),
        site: "studio-a".into(),
        cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        ca_pem: "-----BEGIN CERTIFICATE----- ca".into(),
        bundle_recipient: Some("age1xyz".into()),
        release_public_key,
    }
}

const V3_AGENT: VersionRange = VersionRange { min: 2, max: 3 };
const V4_AGENT: VersionRange = VersionRange { min: 2, max: 4 };

#[test]
fn a_protocol_3_agent_decodes_the_answer_it_is_sent() {
    let frame = enrolled(Some([5; 32])).encode_frame_for(V3_AGENT, ENROLL_FRAME_BYTES_MAX).unwrap();
    let old: EnrollResponseProtocol3 = decode_payload(&frame[FRAME_HEADER_BYTES..]).unwrap();
    assert!(matches!(old, EnrollResponseProtocol3::Enrolled { ref site, ref bundle_recipient, .. }
        if site == "studio-a" && bundle_recipient.as_deref() == Some("age1xyz")));
    // The protocol-4 layout is what it would refuse (trailing bytes).
    let frame = enrolled(Some([5; 32])).encode_frame_for(V4_AGENT, ENROLL_FRAME_BYTES_MAX).unwrap();
    assert!(decode_payload::<EnrollResponseProtocol3>(&frame[FRAME_HEADER_BYTES..]).is_err());
    // Refusals look the same in both layouts.
    let refused = EnrollResponse::Refused { reason: "token used".into() };
    let frame = refused.encode_frame_for(V3_AGENT, ENROLL_FRAME_BYTES_MAX).unwrap();
    assert_eq!(
        decode_payload::<EnrollResponseProtocol3>(&frame[FRAME_HEADER_BYTES..]).unwrap(),
        EnrollResponseProtocol3::Refused { reason: "token used".into() }
    );
}

#[test]
fn a_protocol_4_agent_reads_both_layouts() {
    for key in [Some([5; 32]), None] {
        let frame = enrolled(key).encode_frame_for(V4_AGENT, ENROLL_FRAME_BYTES_MAX).unwrap();
        let mut dec = FrameDecoder::new(ENROLL_FRAME_BYTES_MAX);
        dec.push(&frame);
        let payload = dec.next_payload().unwrap().unwrap();
        assert_eq!(EnrollResponse::decode_payload(&payload).unwrap(), enrolled(key));
        assert_eq!(dec.buffered_bytes(), 0);
    }
    // What a protocol-3 control plane sends: no release key.
    let old = EnrollResponseProtocol3::Enrolled {
        agent_id: Uuid::from_u128(7),
        site: "studio-a".into(),
        cert_pem: "-----BEGIN CERTIFICATE-----".into(),
        ca_pem: "-----BEGIN CERTIFICATE----- ca".into(),
        bundle_recipient: Some("age1xyz".into()),
    };
    let frame = gaffer_protocol::encode_frame(&old, ENROLL_FRAME_BYTES_MAX).unwrap();
    assert_eq!(EnrollResponse::decode_payload(&frame[FRAME_HEADER_BYTES..]).unwrap(), enrolled(None));
    // Neither layout: malformed, not a panic.
    assert!(EnrollResponse::decode_payload(&frame[FRAME_HEADER_BYTES..frame.len() - 3]).is_err());
    assert!(EnrollResponse::decode_payload(&[0xff; 40]).is_err());
}

#[test]
fn next_payload_checks_the_frame_limit_before_buffering() {
    let mut dec = FrameDecoder::new(16);
    dec.push(&(1000u32).to_be_bytes());
    assert!(dec.next_payload().is_err());
    assert!(dec.next_payload().is_err(), "poisoned after an oversize header");
}
