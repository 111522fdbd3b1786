//! Seed inputs for each target, made by the real writers (the codec's `encode_frame`, the agent's
//! `bundle::export`, `seal_bundle`, `AgentKey::csr_pem`, the structs' own serde), in the input
//! layouts the targets read (see [`crate::input`]).

use std::path::PathBuf;

use gaffer_certs::{BundleTrust, EnrollmentToken};
use gaffer_protocol::bundle::{self, BundleDirection, BundleHeader, ControlReply};
use gaffer_protocol::codec::{encode_frame, FRAME_BYTES_MAX_DEFAULT};
use gaffer_protocol::digest::{
    Cut, Digest, Keyframe, ShotAnalysis, SourceInfo, TechnicalMetadata, DIGEST_SCHEMA_VERSION,
};
use gaffer_protocol::enroll::{
    EnrollRequest, EnrollResponse, OfflineEnrollGrant, OfflineEnrollReply, OfflineEnrollRequest, ENROLL_FRAME_BYTES_MAX,
};
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{
    AgentEnvelope, AgentMessage, Assignment, Capabilities, ControlMessage, HeldJob, ModelRef, Profile,
};
use gaffer_protocol::version::VersionRange;
use uuid::Uuid;

use crate::input::{BundleMode, ConfigFile, EnrollInput};
use crate::Fleet;

/// One seed: file name (inside `corpus/<target>/`) and contents.
pub type Seed = (String, Vec<u8>);

fn with_selector(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + bytes.len());
    out.push(selector);
    out.extend_from_slice(bytes);
    out
}

fn frames<T: serde::Serialize>(msgs: &[T]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend(encode_frame(m, FRAME_BYTES_MAX_DEFAULT)?);
    }
    Ok(out)
}

fn capabilities() -> Capabilities {
    Capabilities {
        gpus: Vec::new(),
        volumes: vec!["/media".into(), "/watch".into()],
        watch_roots: vec!["/watch".into()],
        job_slots: 2,
        profiles: vec![Profile::Shots, Profile::Full],
        models: vec![ModelRef { name: "silero-vad".into(), version: "6.2.3".into(), sha256: "ab".repeat(32) }],
    }
}

fn health() -> Health {
    Health {
        sampled_at_unix_ms: 1_700_000_000_000,
        source: HealthSource::CpuOnly { reason: "NVML not found".into() },
        cpu_percent: 12.5,
        load_avg_1m: 0.7,
        memory_used_bytes: 3 << 30,
        memory_total_bytes: 16 << 30,
        disks: Vec::new(),
        gpus: Vec::new(),
        inference: None,
        jobs_running: 1,
        job_slots: 2,
        jobs_queued: 0,
        outbox_pending: 3,
        outbox_full: false,
    }
}

fn digest() -> Digest {
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo {
            path: "/media/a.mov".into(),
            size_bytes: 1 << 20,
            modified_unix_secs: Some(1_700_000_000),
        },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(5.0),
            bit_rate_bps: Some(1_000_000),
            streams: Vec::new(),
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 125,
            frames_corrupt: 0,
            cuts: vec![Cut { frame: 60, time_secs: 2.4, score: 41.0 }],
            shots: vec![gaffer_protocol::digest::Shot {
                index: 0,
                start_frame: 0,
                end_frame: 59,
                start_secs: 0.0,
                end_secs: 2.4,
                keyframe: Keyframe { frame: 30, time_secs: 1.2, phash: "c3a5".repeat(4) },
            }],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: Vec::new(),
        analysis_secs: 0.8,
    }
}

fn assignment() -> Assignment {
    Assignment { job_id: Uuid::from_u128(7), lease_id: 3, path: "/media/a.mov".into(), profile: Profile::Shots }
}

fn agent_messages(fleet: &Fleet) -> anyhow::Result<Vec<AgentEnvelope>> {
    let agent_id = fleet.agent_id;
    let csr_pem = fleet.agent_key.csr_pem(agent_id)?;
    let job_id = Uuid::from_u128(7);
    let bodies = vec![
        AgentMessage::Hello {
            versions: VersionRange::ours(),
            agent_version: "0.1.0".into(),
            hostname: "gpu-box-1".into(),
            capabilities: capabilities(),
            running_jobs: vec![HeldJob { job_id, lease_id: 3 }],
        },
        AgentMessage::Heartbeat(health()),
        AgentMessage::JobAccepted { job_id, lease_id: 3 },
        AgentMessage::Progress { job_id, lease_id: 3, fraction: 0.5, frames_decoded: 60 },
        AgentMessage::Digest { job_id, lease_id: 3, digest: Box::new(digest()) },
        AgentMessage::JobFailed { job_id, lease_id: 3, reason: "not a media file".into(), retryable: false },
        AgentMessage::JobRejected { job_id, lease_id: 3, reason: "no free slot".into() },
        AgentMessage::SubmitWatched { job_id, path: "/watch/b.mxf".into(), profile: Profile::Full },
        AgentMessage::CertificateRequest { csr_pem },
    ];
    Ok(bodies.into_iter().enumerate().map(|(i, body)| AgentEnvelope { agent_id, seq: i as u64, body }).collect())
}

fn control_messages(fleet: &Fleet) -> Vec<ControlMessage> {
    vec![
        ControlMessage::Welcome {
            protocol_version: VersionRange::ours().max,
            server_version: "0.1.0".into(),
            heartbeat_interval_secs: 5,
        },
        ControlMessage::Assign(assignment()),
        ControlMessage::Cancel { job_id: Uuid::from_u128(7), reason: "cancelled by an operator".into() },
        ControlMessage::Ack { seq: 4 },
        ControlMessage::Error { seq: 5, message: "store error".into(), retry: true },
        ControlMessage::Refused { reason: "agent is revoked".into() },
        ControlMessage::Certificate { cert_pem: fleet.agent_cert_pem.clone(), ca_pems: vec![fleet.ca_pem.clone()] },
        ControlMessage::CertificateRefused { reason: "CSR key is not ECDSA P-256".into() },
        ControlMessage::TrustBundle { ca_pems: vec![fleet.ca_pem.clone()] },
        ControlMessage::RenewCertificate { reason: "CA rotation".into() },
    ]
}

/// Seeds of `frame_decoder`: a chunk-size byte, then a stream of frames of one direction.
///
/// # Errors
/// When encoding fails.
pub fn frame_decoder(fleet: &Fleet) -> anyhow::Result<Vec<Seed>> {
    let agent = agent_messages(fleet)?;
    let control = control_messages(fleet);
    let worker = vec![
        gaffer_agent::worker::WorkerMessage::Opened { duration_secs: Some(5.0) },
        gaffer_agent::worker::WorkerMessage::Progress { fraction: 0.25, frames_decoded: 30 },
        gaffer_agent::worker::WorkerMessage::Done { digest: Box::new(digest()) },
        gaffer_agent::worker::WorkerMessage::Failed { reason: "decoder error".into(), retryable: true },
    ];
    let mut seeds = vec![
        ("agent-stream-whole".to_owned(), with_selector(0, &frames(&agent)?)),
        ("agent-stream-chunked-7".to_owned(), with_selector(7, &frames(&agent)?)),
        ("control-stream".to_owned(), with_selector(0, &frames(&control)?)),
        ("control-stream-chunked-3".to_owned(), with_selector(3, &frames(&control)?)),
        ("worker-stream".to_owned(), with_selector(0, &frames(&worker)?)),
    ];
    for (i, env) in agent.iter().enumerate() {
        seeds.push((format!("agent-{i}-{}", env.body.kind()), with_selector(0, &frames(std::slice::from_ref(env))?)));
    }
    Ok(seeds)
}

/// An agent data dir for `fleet`'s agent, with `messages` in its outbox, exported with the
/// agent's own `bundle export` code.
fn exported_agent_bundle(fleet: &Fleet, messages: &[AgentMessage]) -> anyhow::Result<Vec<u8>> {
    use gaffer_agent::datadir::DataDir;
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path().join("agent"));
    dd.create()?;
    std::fs::write(dd.identity_path(), serde_json::to_vec_pretty(&agent_identity(fleet, "127.0.0.1:7443")?)?)?;
    std::fs::write(dd.cert_path(), &fleet.agent_cert_pem)?;
    std::fs::write(dd.key_path(), fleet.agent_key.key_pem())?;
    std::fs::write(dd.ca_path(), &fleet.ca_pem)?;
    std::fs::write(dd.capabilities_path(), serde_json::to_vec(&capabilities())?)?;
    let db = gaffer_agent::datadir::open_state_db(&dd.state_path(), std::time::Duration::from_secs(5))?;
    let outbox = gaffer_agent::outbox::Outbox::open(&db)?;
    for m in messages {
        outbox.push(m)?;
    }
    let out: PathBuf = tmp.path().join("bundle.gfb");
    gaffer_agent::bundle::export(&db, &dd, &outbox, &out)?;
    Ok(std::fs::read(out)?)
}

/// The fleet agent's `agent.json`, through its own serde.
fn agent_identity(fleet: &Fleet, control_addr: &str) -> anyhow::Result<gaffer_agent::datadir::AgentIdentity> {
    Ok(serde_json::from_value(serde_json::json!({
        "agent_id": fleet.agent_id,
        "site": "studio-a",
        "control_addr": control_addr,
        "ca_fingerprint": fleet.ca.fingerprint().to_string(),
        "enrolled_at_ms": fleet.made_at_unix * 1000,
        "bundle_recipient": fleet.control_bundle_key.recipient(),
    }))?)
}

fn reply_bundle(fleet: &Fleet, reply: &ControlReply, number: u64) -> anyhow::Result<Vec<u8>> {
    let header = BundleHeader {
        direction: BundleDirection::ControlToAgent,
        ca_fingerprint: *fleet.ca.fingerprint().as_bytes(),
        agent_id: fleet.agent_id,
        bundle_number: number,
        created_at_ms: fleet.made_at_unix * 1000,
        signer_cert_der: Vec::new(),
    };
    let payload = bundle::encode_payload(reply)?;
    Ok(gaffer_certs::seal_bundle(header, &payload, &fleet.agent_bundle_key.recipient(), &fleet.server_signer)?)
}

/// Seeds of `bundle`: real agent bundles (from `gaffer-agent bundle export`), real replies (sealed
/// as `gaffer-control bundle import` seals them), their decrypted payloads and ciphertexts.
///
/// # Errors
/// When a writer fails, or a seed does not verify against the fleet (a broken fixture).
pub fn bundle(fleet: &Fleet) -> anyhow::Result<Vec<Seed>> {
    let job_id = Uuid::from_u128(7);
    let messages = vec![
        AgentMessage::JobAccepted { job_id, lease_id: 3 },
        AgentMessage::Progress { job_id, lease_id: 3, fraction: 0.5, frames_decoded: 60 },
        AgentMessage::Digest { job_id, lease_id: 3, digest: Box::new(digest()) },
        AgentMessage::SubmitWatched {
            job_id: Uuid::from_u128(8),
            path: "/watch/b.mxf".into(),
            profile: Profile::Shots,
        },
    ];
    let agent_full = exported_agent_bundle(fleet, &messages)?;
    let agent_empty = exported_agent_bundle(fleet, &[])?;
    let renewed = fleet.ca.sign_agent_csr(&fleet.agent_key.csr_pem(fleet.agent_id)?, fleet.agent_id, 90)?;
    let reply = ControlReply {
        acks: vec![1, 2, 3, 4],
        assignments: vec![assignment()],
        crl_pem: fleet.crl_pem.clone(),
        renewed_cert_pem: Some(renewed),
        trust_ca_pems: vec![fleet.ca.cert_pem()],
        update: None,
    };
    let reply_file = reply_bundle(fleet, &reply, 1)?;
    let plain_reply = ControlReply {
        acks: vec![],
        assignments: vec![],
        crl_pem: fleet.crl_pem.clone(),
        renewed_cert_pem: None,
        trust_ca_pems: Vec::new(),
        update: None,
    };
    let plain_reply_file = reply_bundle(fleet, &plain_reply, 2)?;

    // Check the seeds reach the end of the import checks, as the target runs them.
    let agent_trust = BundleTrust { ca_pem: &fleet.ca_pem, crl_pem: &fleet.crl_pem };
    let parsed = gaffer_certs::verify_bundle(
        &agent_full,
        agent_trust,
        BundleDirection::AgentToControl,
        |h| gaffer_certs::BundleSignerRole::Agent(h.agent_id),
        fleet.now(),
    )?;
    let agent_ciphertext = parsed.ciphertext.to_vec();
    let agent_payload = fleet.control_bundle_key.decrypt(parsed.ciphertext)?;
    let parsed = gaffer_certs::verify_bundle(
        &reply_file,
        agent_trust,
        BundleDirection::ControlToAgent,
        |_| gaffer_certs::BundleSignerRole::ControlPlane,
        fleet.now(),
    )?;
    let reply_ciphertext = parsed.ciphertext.to_vec();
    let reply_payload = fleet.agent_bundle_key.decrypt(parsed.ciphertext)?;

    Ok(vec![
        ("agent-bundle-4-messages".into(), with_selector(BundleMode::File as u8, &agent_full)),
        ("agent-bundle-empty".into(), with_selector(BundleMode::File as u8, &agent_empty)),
        ("reply-bundle-renewal".into(), with_selector(BundleMode::File as u8, &reply_file)),
        ("reply-bundle-crl-only".into(), with_selector(BundleMode::File as u8, &plain_reply_file)),
        ("agent-payload".into(), with_selector(BundleMode::Payload as u8, &agent_payload)),
        ("reply-payload".into(), with_selector(BundleMode::Payload as u8, &reply_payload)),
        ("agent-ciphertext".into(), with_selector(BundleMode::Ciphertext as u8, &agent_ciphertext)),
        ("reply-ciphertext".into(), with_selector(BundleMode::Ciphertext as u8, &reply_ciphertext)),
        ("seal-agent-payload".into(), with_selector(BundleMode::Seal as u8, &agent_payload)),
    ])
}

/// Seeds of `enroll_request`: enrollment request and response frames, offline enrollment request
/// and reply files, a CSR.
///
/// # Errors
/// When a writer fails.
pub fn enroll_request(fleet: &Fleet) -> anyhow::Result<Vec<Seed>> {
    use base64::Engine as _;
    let agent_id = fleet.agent_id;
    let csr_pem = fleet.agent_key.csr_pem(agent_id)?;
    let request = EnrollRequest {
        versions: VersionRange::ours(),
        token: EnrollmentToken::generate().as_str().to_owned(),
        agent_id,
        csr_pem: csr_pem.clone(),
        hostname: "gpu-box-1".into(),
        site: Some("studio-a".into()),
        agent_version: "0.1.0".into(),
        bundle_recipient: Some(fleet.agent_bundle_key.recipient()),
        renew: false,
    };
    let old_agent = EnrollRequest { site: None, bundle_recipient: None, ..request.clone() };
    let enrolled = EnrollResponse::Enrolled {
        agent_id,
        site: "studio-a".into(),
        cert_pem: fleet.agent_cert_pem.clone(),
        ca_pem: fleet.ca_pem.clone(),
        bundle_recipient: Some(fleet.control_bundle_key.recipient()),
        release_public_key: Some([7; 32]),
    };
    let refused = EnrollResponse::Refused { reason: "the token was already used".into() };
    let offline_request = OfflineEnrollRequest {
        versions: VersionRange::ours(),
        agent_id,
        csr_pem: csr_pem.clone(),
        hostname: "gpu-box-2".into(),
        site: "air-gapped".into(),
        agent_version: "0.1.0".into(),
        bundle_recipient: fleet.agent_bundle_key.recipient(),
    };
    let grant = OfflineEnrollGrant {
        agent_id,
        site: "air-gapped".into(),
        cert_pem: fleet.agent_cert_pem.clone(),
        ca_pem: fleet.ca_pem.clone(),
        server_cert_pem: fleet.server_cert_pem.clone(),
        bundle_recipient: fleet.control_bundle_key.recipient(),
        granted_at_ms: fleet.made_at_unix * 1000,
        release_public_key: None,
    };
    let grant_json = serde_json::to_string(&grant)?;
    let signature = fleet.server_signer.sign(grant_json.as_bytes())?;
    let reply =
        OfflineEnrollReply { grant_json, signature_b64: base64::engine::general_purpose::STANDARD.encode(signature) };
    Ok(vec![
        ("enroll-request".into(), with_selector(EnrollInput::RequestFrame as u8, &frame(&request)?)),
        ("enroll-request-old-agent".into(), with_selector(EnrollInput::RequestFrame as u8, &frame(&old_agent)?)),
        ("enroll-response-enrolled".into(), with_selector(EnrollInput::ResponseFrame as u8, &frame(&enrolled)?)),
        ("enroll-response-refused".into(), with_selector(EnrollInput::ResponseFrame as u8, &frame(&refused)?)),
        (
            "offline-request".into(),
            with_selector(
                EnrollInput::OfflineRequest as u8,
                serde_json::to_string_pretty(&offline_request)?.as_bytes(),
            ),
        ),
        (
            "offline-reply".into(),
            with_selector(EnrollInput::OfflineReply as u8, serde_json::to_string_pretty(&reply)?.as_bytes()),
        ),
        ("csr".into(), with_selector(EnrollInput::Csr as u8, csr_pem.as_bytes())),
    ])
}

fn frame<T: serde::Serialize>(msg: &T) -> anyhow::Result<Vec<u8>> {
    Ok(encode_frame(msg, ENROLL_FRAME_BYTES_MAX)?)
}

/// Seeds of `config_files`: every file format of [`ConfigFile`], as the programs write them.
///
/// # Errors
/// When a writer fails.
pub fn config_files(fleet: &Fleet) -> anyhow::Result<Vec<Seed>> {
    use gaffer_agent::models::InstalledManifest;
    // Built through their own serde (fields with defaults may be added without touching this).
    let control_config: gaffer_control::datadir::ControlConfig = serde_json::from_value(serde_json::json!({
        "quic_listen": "0.0.0.0:7443",
        "http_listen": "127.0.0.1:8080",
        "server_names": ["localhost", "127.0.0.1", "gaffer.studio.lan"],
        "fleet_name": "studio",
    }))?;
    let identity = agent_identity(fleet, "gaffer.studio.lan:7443")?;
    let item = gaffer_agent::models::known_item("silero-vad")?;
    let installed = InstalledManifest {
        name: item.name.into(),
        kind: "model".into(),
        version: item.version.into(),
        source: item.source(),
        wheel_file: item.wheel_file.into(),
        wheel_sha256: item.wheel_sha256.into(),
        sha256: item.sha256().into(),
        files: item.members.iter().map(|m| m.file_name().to_owned()).collect(),
        license: item.license.into(),
        installed_at_ms: fleet.made_at_unix * 1000,
    };
    let pair = |a: &str, b: &str| {
        let mut v = a.as_bytes().to_vec();
        v.push(0xFF);
        v.extend_from_slice(b.as_bytes());
        v
    };
    let sel = |f: ConfigFile, bytes: &[u8]| with_selector(f as u8, bytes);
    Ok(vec![
        ("control-config.json".into(), sel(ConfigFile::ControlConfig, &serde_json::to_vec_pretty(&control_config)?)),
        ("agent.json".into(), sel(ConfigFile::AgentIdentity, &serde_json::to_vec_pretty(&identity)?)),
        ("model-manifest.json".into(), sel(ConfigFile::InstalledManifest, &serde_json::to_vec_pretty(&installed)?)),
        ("capabilities.json".into(), sel(ConfigFile::Capabilities, &serde_json::to_vec(&capabilities())?)),
        ("ca-pem-and-key".into(), sel(ConfigFile::CaPemAndKey, &pair(&fleet.ca_pem, &fleet.ca.key_pem()))),
        ("crl.pem".into(), sel(ConfigFile::CrlPem, fleet.crl_pem.as_bytes())),
        ("ca-fingerprint".into(), sel(ConfigFile::CaFingerprint, fleet.ca.fingerprint().to_string().as_bytes())),
        ("ca-pem-fingerprint".into(), sel(ConfigFile::CaPemFingerprint, fleet.ca_pem.as_bytes())),
        ("agent.key".into(), sel(ConfigFile::AgentKeyPem, fleet.agent_key.key_pem().as_bytes())),
        (
            "agent-cert-and-key".into(),
            sel(ConfigFile::SignerPemAndKey, &pair(&fleet.agent_cert_pem, &fleet.agent_key.key_pem())),
        ),
        (
            "server-cert-and-key".into(),
            sel(ConfigFile::SignerPemAndKey, &pair(&fleet.server_cert_pem, &fleet.server_key_pem)),
        ),
        ("bundle.key".into(), sel(ConfigFile::BundleKey, fleet.agent_bundle_key.secret_string().as_bytes())),
        ("wheel-name".into(), sel(ConfigFile::WheelOrItemName, item.wheel_file.as_bytes())),
        // The shipped examples, and settings as `--print-config` prints them (every key set).
        ("agent.toml".into(), sel(ConfigFile::AgentToml, include_bytes!("../../installers/config/agent.toml"))),
        ("agent-settings.toml".into(), sel(ConfigFile::AgentToml, agent_settings().to_toml().as_bytes())),
        ("control.toml".into(), sel(ConfigFile::ControlToml, include_bytes!("../../installers/config/control.toml"))),
        ("control-settings.toml".into(), sel(ConfigFile::ControlToml, control_settings()?.to_toml().as_bytes())),
    ])
}

/// `gaffer-agent run`'s settings with every optional one set.
fn agent_settings() -> gaffer_agent::config::RunSettings {
    gaffer_agent::config::RunSettings {
        data_dir: "/var/lib/gaffer-agent".into(),
        volume: vec!["/mnt/media".into(), "/mnt/archive".into()],
        watch: vec!["/mnt/ingest".into()],
        slots: 2,
        watch_settle_secs: 5,
        watch_profile: Profile::Full,
        offline: false,
        job_timeout: Some(std::time::Duration::from_secs(90 * 60)),
        job_memory_max: Some(6 << 30),
        control: vec!["control-a.studio.internal:7443".into(), "control-b.studio.internal:7443".into()],
    }
}

/// `gaffer-control serve`'s settings with every optional one set.
fn control_settings() -> anyhow::Result<gaffer_control::config::ServeSettings> {
    Ok(gaffer_control::config::ServeSettings {
        data_dir: "/var/lib/gaffer-control".into(),
        agent_cert_ttl: Some(std::time::Duration::from_secs(7 * 86_400)),
        quic_listen: Some("0.0.0.0:7443".parse()?),
        http_listen: Some("[::]:8443".parse()?),
        lease_grace_secs: 30,
        assign_timeout_secs: 30,
        max_attempts: 3,
        finished_job_retention: std::time::Duration::from_secs(30 * 86_400),
        heartbeat_interval_secs: 5,
        idle_timeout_secs: 10,
        wire_audit_log: Some("/var/lib/gaffer-control/wire-audit.jsonl".into()),
        http_tls: gaffer_control::http::tls::HttpTlsMode::On,
        http_tls_cert: Some("/etc/gaffer/dashboard.pem".into()),
        http_tls_key: Some("/etc/gaffer/dashboard.key".into()),
        metrics_token_file: Some("/etc/gaffer/metrics.token".into()),
        metrics_listen: Some("10.0.0.5:9090".parse()?),
        admission: gaffer_control::admission::AdmissionConfig {
            quic_retry: false,
            handshakes_max: 512,
            enroll_connections_max: 16,
        },
    })
}
