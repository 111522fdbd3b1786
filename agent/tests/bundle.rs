//! Offline-sync bundles on the agent side, with real keys and certificates from a real fleet CA,
//! real age encryption, real files, the agent's real sled state, and the real control-plane code
//! (`gaffer_control::offline`) enrolling the agent and answering its bundles.
//!
//! `import` must refuse a reply that is tampered with, truncated, from another fleet, not signed by
//! the control plane, addressed to another agent or older than one already applied, each with its
//! own error and with the agent's state byte-for-byte as it was; a second import of the same reply
//! changes nothing; a good reply acknowledges the outbox, queues the jobs and stores the CRL.
//! `export` numbers bundles upward (durably), encrypts them to the control plane only and signs them
//! as the agent.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gaffer_agent::bundle::{self as agent_bundle, ReplyImportReport};
use gaffer_agent::datadir::DataDir;
use gaffer_agent::outbox::Outbox;
use gaffer_agent::AgentError;
use gaffer_certs::{BundleKey, BundleSigner, BundleSignerRole, BundleTrust, CertError, FleetCa, UnixTime};
use gaffer_control::ingest::Ingest;
use gaffer_control::offline::{ImportReport, OfflineSync};
use gaffer_control::scheduler::{JobRequest, SchedulerConfig};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{JobOrigin, Store};
use gaffer_control::AppState;
use gaffer_protocol::bundle::{self, AgentBundle, BundleDirection, BundleError, BundleHeader, ControlReply};
use gaffer_protocol::digest::{Digest, ShotAnalysis, SourceInfo, TechnicalMetadata, DIGEST_SCHEMA_VERSION};
use gaffer_protocol::messages::{AgentId, AgentMessage, Assignment, Capabilities, Profile, LEASE_ID_NONE};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const SITE: &str = "stage-a";

/// A control plane: data dir with CA, server certificate and bundle key, its sled store, and the
/// offline operations an operator runs (`enroll-offline`, `bundle import`, `agent revoke`).
struct ControlPlane {
    dd: gaffer_control::datadir::DataDir,
    ca: Arc<FleetCa>,
    state: AppState,
    sync: OfflineSync,
}

impl ControlPlane {
    fn start(root: &Path, fleet: &str) -> BoxResult<Self> {
        let dd = gaffer_control::datadir::DataDir::new(root.join(format!("control-{fleet}")));
        dd.create()?;
        let ca = FleetCa::generate(fleet)?;
        let server = ca.issue_server_cert(&["localhost".into()])?;
        gaffer_certs::write_secret_file(&dd.ca_key_path(), ca.key_pem().as_bytes())?;
        std::fs::write(dd.ca_cert_path(), ca.cert_pem())?;
        gaffer_certs::write_secret_file(&dd.server_key_path(), server.key_pem.as_bytes())?;
        std::fs::write(dd.server_cert_path(), server.cert_pem)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dd.store_path())?);
        let state = AppState::new(store, SchedulerConfig::default());
        let ingest = Arc::new(Ingest::new(state.clone()));
        let ca = Arc::new(ca);
        let pki = gaffer_control::identity::Pki::open(
            &dd,
            vec!["localhost".into()],
            gaffer_control::identity::AGENT_CERT_TTL_SECS_DEFAULT,
            state.metrics.clone(),
        )?;
        let sync = OfflineSync::open(&dd, pki, state.clone(), ingest)?;
        Ok(ControlPlane { dd, ca, state, sync })
    }

    /// The control plane's own bundle signer (`server.pem` + `server.key`).
    fn server_signer(&self) -> BoxResult<BundleSigner> {
        Ok(BundleSigner::from_pem(
            &std::fs::read_to_string(self.dd.server_cert_path())?,
            &std::fs::read_to_string(self.dd.server_key_path())?,
        )?)
    }

    /// The control plane's age identity (`DATA_DIR/bundle.key`).
    fn bundle_key(&self) -> BoxResult<BundleKey> {
        let path = gaffer_control::offline::bundle_key_path(&self.dd);
        Ok(BundleKey::from_secret_str(&std::fs::read_to_string(path)?)?)
    }

    /// `gaffer-control bundle import BUNDLE --reply-out REPLY`; returns the reply's path.
    fn answer(&self, bundle_path: &Path, reply_path: &Path) -> BoxResult<PathBuf> {
        match self.sync.import_bundle(bundle_path, reply_path, "tester")? {
            ImportReport::Imported { .. } => Ok(reply_path.to_path_buf()),
            other => Err(format!("the control plane did not import {}: {other:?}", bundle_path.display()).into()),
        }
    }

    /// A queued job pinned to `agent_id`; it travels in the agent's next reply.
    fn submit_pinned(&self, agent_id: AgentId, path: &str) -> BoxResult<Uuid> {
        let job = self.state.scheduler.submit(
            JobRequest {
                path: path.into(),
                site: SITE.into(),
                agent: Some(agent_id),
                profile: Profile::Shots,
                priority: Default::default(),
            },
            JobOrigin::Api,
            None,
            gaffer_control::now_ms(),
        )?;
        Ok(job.id)
    }
}

/// An agent enrolled offline with `cp` (`gaffer-agent enroll --offline-request`, the operator's
/// `enroll-offline`, `gaffer-agent enroll --offline-reply`), with its state database open.
struct Agent {
    dd: DataDir,
    db: sled::Db,
    outbox: Outbox,
    id: AgentId,
    scratch: PathBuf,
}

impl Agent {
    fn enroll(cp: &ControlPlane, root: &Path, name: &str) -> BoxResult<Self> {
        let dd = DataDir::new(root.join(format!("agent-{name}")));
        let scratch = root.join(format!("media-{name}"));
        std::fs::create_dir_all(&scratch)?;
        let request = scratch.join("enroll-request.json");
        let req = gaffer_agent::enroll::write_offline_request(&dd, SITE, &request)?;
        let reply = scratch.join("enroll-reply.json");
        cp.sync.enroll_offline(&request, &reply, "tester")?;
        let identity = gaffer_agent::enroll::install_offline_reply(&dd, &reply, cp.ca.fingerprint())?;
        assert_eq!(identity.agent_id, req.agent_id);
        // What `run` writes and `bundle export` carries: the control plane leases an offline
        // agent only what these capabilities allow.
        let capabilities = Capabilities {
            gpus: Vec::new(),
            volumes: vec!["/media".into()],
            watch_roots: Vec::new(),
            job_slots: 4,
            profiles: vec![Profile::Shots],
            models: Vec::new(),
        };
        std::fs::write(dd.capabilities_path(), serde_json::to_vec_pretty(&capabilities)?)?;
        let db = sled::open(dd.state_path())?;
        let outbox = Outbox::open(&db)?;
        Ok(Agent { dd, db, outbox, id: identity.agent_id, scratch })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    /// A watch-folder job run offline: submitted, accepted, finished with a digest. Returns the
    /// sequence numbers.
    fn run_job_offline(&self, media_path: &str) -> BoxResult<Vec<u64>> {
        let job_id = Uuid::new_v4();
        Ok(vec![
            self.outbox.push(&AgentMessage::SubmitWatched {
                job_id,
                path: media_path.into(),
                profile: Profile::Shots,
            })?,
            self.outbox.push(&AgentMessage::JobAccepted { job_id, lease_id: LEASE_ID_NONE })?,
            self.outbox.push(&AgentMessage::Digest {
                job_id,
                lease_id: LEASE_ID_NONE,
                digest: Box::new(digest(media_path)),
            })?,
        ])
    }

    /// `gaffer-agent bundle export --out FILE`.
    fn export(&self, name: &str) -> BoxResult<PathBuf> {
        let out = self.path(name);
        agent_bundle::export(&self.db, &self.dd, &self.outbox, &out)?;
        Ok(out)
    }

    /// `gaffer-agent bundle import REPLY`.
    fn import(&self, reply: &Path) -> Result<ReplyImportReport, AgentError> {
        agent_bundle::import(&self.db, &self.dd, &self.outbox, reply)
    }

    /// Export, and have `cp` answer: the reply bundle's path.
    fn sync_with(&self, cp: &ControlPlane, name: &str) -> BoxResult<PathBuf> {
        let bundle = self.export(&format!("{name}.gbundle"))?;
        cp.answer(&bundle, &self.path(&format!("{name}-reply.gbundle")))
    }

    /// Everything a reply import may change.
    fn snapshot(&self) -> BoxResult<AgentState> {
        let tree_entries = |name: &str| -> BoxResult<Vec<(Vec<u8>, Vec<u8>)>> {
            self.db
                .open_tree(name)?
                .iter()
                .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Into::into))
                .collect()
        };
        let crl = match std::fs::read(agent_bundle::crl_path(&self.dd)) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        Ok(AgentState {
            outbox: tree_entries("outbox")?,
            outbox_pending: self.outbox.len(),
            bundle_meta: tree_entries("bundle_meta")?,
            offline_assignments: tree_entries("offline_assignments")?,
            crl_pem: crl,
            agent_pem: std::fs::read(self.dd.cert_path())?,
        })
    }

    /// The plaintext of a reply addressed to this agent (decrypted with the agent's bundle key).
    fn open_reply(&self, reply: &Path) -> BoxResult<(BundleHeader, ControlReply)> {
        let bytes = std::fs::read(reply)?;
        let parsed = bundle::parse_bundle(&bytes)?;
        let key = agent_bundle::load_bundle_key(&self.dd)?;
        let payload: ControlReply = bundle::decode_payload(&key.decrypt(parsed.ciphertext)?)?;
        Ok((parsed.header, payload))
    }

    fn meta(&self, key: &[u8]) -> BoxResult<Option<u64>> {
        Ok(match self.db.open_tree("bundle_meta")?.get(key)? {
            Some(v) => Some(u64::from_be_bytes(v.as_ref().try_into()?)),
            None => None,
        })
    }

    fn queued_assignments(&self) -> BoxResult<Vec<Assignment>> {
        self.db
            .open_tree("offline_assignments")?
            .iter()
            .map(|item| -> BoxResult<Assignment> {
                let (_, v) = item?;
                Ok(gaffer_protocol::codec::decode_payload(&v)?)
            })
            .collect()
    }
}

/// The agent's state as bytes: outbox, bundle numbers, queued offline jobs, CRL and certificate.
#[derive(Debug, PartialEq)]
struct AgentState {
    outbox: Vec<(Vec<u8>, Vec<u8>)>,
    outbox_pending: u64,
    bundle_meta: Vec<(Vec<u8>, Vec<u8>)>,
    offline_assignments: Vec<(Vec<u8>, Vec<u8>)>,
    crl_pem: Option<Vec<u8>>,
    agent_pem: Vec<u8>,
}

fn digest(path: &str) -> Digest {
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 2_000_000, modified_unix_secs: None },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(5.3),
            bit_rate_bps: None,
            streams: vec![],
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 132,
            frames_corrupt: 0,
            cuts: vec![],
            shots: vec![],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: vec![],
        analysis_secs: 0.4,
    }
}

/// Imports `reply` into `agent`, expects the refusal `expected` accepts, and checks that the
/// agent's state is byte-for-byte what it was.
fn assert_refused(agent: &Agent, reply: &Path, what: &str, expected: impl Fn(&AgentError) -> bool) -> TestResult {
    let before = agent.snapshot()?;
    match agent.import(reply) {
        Err(e) if expected(&e) => {}
        other => panic!("{what}: expected a specific refusal, got {other:?}"),
    }
    assert_eq!(agent.snapshot()?, before, "{what}: the refused reply changed the agent's state");
    Ok(())
}

fn write(dir: &Agent, name: &str, bytes: &[u8]) -> BoxResult<PathBuf> {
    let p = dir.path(name);
    std::fs::write(&p, bytes)?;
    Ok(p)
}

/// A reply bundle sealed by hand: `header` and `reply` as given, encrypted to `agent`'s
/// recipient, signed by `signer`.
fn forge_reply(agent: &Agent, header: BundleHeader, reply: &ControlReply, signer: &BundleSigner) -> BoxResult<Vec<u8>> {
    let recipient = agent_bundle::load_bundle_key(&agent.dd)?.recipient();
    let payload = bundle::encode_payload(reply)?;
    Ok(gaffer_certs::seal_bundle(header, &payload, &recipient, signer)?)
}

fn reply_header(fingerprint: [u8; 32], agent_id: AgentId, number: u64) -> BundleHeader {
    BundleHeader {
        direction: BundleDirection::ControlToAgent,
        ca_fingerprint: fingerprint,
        agent_id,
        bundle_number: number,
        created_at_ms: 0,
        signer_cert_der: vec![],
    }
}

#[test]
fn a_good_reply_acks_the_outbox_queues_jobs_stores_the_crl_and_a_second_import_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    // Another agent of the fleet, revoked: the CRL the reply carries lists it.
    let lost = Agent::enroll(&cp, dir.path(), "lost")?;
    cp.sync.revoke_agent(lost.id, "tester")?;

    let mut seqs = agent.run_job_offline("/media/a.mov")?;
    seqs.extend(agent.run_job_offline("/media/b.mov")?);
    let job = cp.submit_pinned(agent.id, "/media/queued.mov")?;
    let reply = agent.sync_with(&cp, "first")?;
    assert!(agent.snapshot()?.crl_pem.is_none(), "no CRL before the first reply");
    assert_eq!(agent.outbox.len(), 6);

    let report = agent.import(&reply)?;
    assert_eq!(
        report,
        ReplyImportReport::Imported {
            reply_number: 1,
            acked: 6,
            assignments: 1,
            renewed_cert: false,
            outbox_pending: 0,
            release: None
        }
    );
    assert!(agent.outbox.entries()?.is_empty(), "acknowledged messages are still in the outbox");
    let queued = agent.queued_assignments()?;
    assert!(
        matches!(&queued[..], [a] if a.job_id == job && a.path == "/media/queued.mov" && a.profile == Profile::Shots
            && a.lease_id != LEASE_ID_NONE),
        "{queued:?}"
    );
    let (_, sent) = agent.open_reply(&reply)?;
    assert_eq!(sent.acks, seqs);
    let stored_crl = std::fs::read_to_string(agent_bundle::crl_path(&agent.dd))?;
    assert_eq!(stored_crl, sent.crl_pem, "the stored CRL is not the reply's");
    assert_eq!(FleetCa::crls_from_pem(&stored_crl)?.len(), 1);
    // The stored CRL is in force: the revoked agent's signature is no longer accepted here.
    let revoked_signer = BundleSigner::from_pem(
        &std::fs::read_to_string(lost.dd.cert_path())?,
        &std::fs::read_to_string(lost.dd.key_path())?,
    )?;
    let ca_pem = std::fs::read_to_string(agent.dd.ca_path())?;
    assert!(matches!(
        gaffer_certs::verify_signer(
            BundleTrust { ca_pem: &ca_pem, crl_pem: &stored_crl },
            &gaffer_certs::CertificateDer::from(revoked_signer.cert_der()),
            BundleSignerRole::Agent(lost.id),
            UnixTime::now(),
        ),
        Err(CertError::BundleSignerRevoked { .. })
    ));
    assert_eq!(agent.meta(b"last_imported_reply")?, Some(1));

    // The same reply again, now that the agent has moved on (new work in the outbox, the queued
    // job taken by the runner): nothing changes.
    let later = agent.run_job_offline("/media/c.mov")?;
    agent.db.open_tree("offline_assignments")?.clear()?;
    let before = agent.snapshot()?;
    assert_eq!(agent.import(&reply)?, ReplyImportReport::AlreadyImported { reply_number: 1 });
    assert_eq!(agent.snapshot()?, before, "a second import of the same reply changed the agent's state");
    assert_eq!(agent.outbox.entries()?.iter().map(|e| e.seq).collect::<Vec<_>>(), later);
    Ok(())
}

#[test]
fn tampered_and_truncated_replies_are_refused_and_change_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    // Some history first, so there is state to protect: reply 1 applied, new work pending, a job
    // for the agent in reply 2.
    agent.run_job_offline("/media/a.mov")?;
    agent.import(&agent.sync_with(&cp, "first")?)?;
    agent.run_job_offline("/media/b.mov")?;
    cp.submit_pinned(agent.id, "/media/queued.mov")?;
    let reply = agent.sync_with(&cp, "second")?;
    let good = std::fs::read(&reply)?;
    let parsed = bundle::parse_bundle(&good)?;
    assert_eq!(parsed.header.bundle_number, 2);
    let header_len = u32::from_be_bytes(good[16..20].try_into()?) as usize;

    let signature_invalid = |e: &AgentError| matches!(e, AgentError::Cert(CertError::BundleSignatureInvalid));
    // One flipped byte in the ciphertext, in the signature.
    for (what, at) in [("ciphertext byte", 20 + header_len + 8 + 40), ("signature byte", good.len() - 5)] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        assert_refused(&agent, &write(&agent, "tampered.gbundle", &bad)?, what, signature_invalid)?;
    }
    // One flipped byte in the header: inside the signer's certificate, it no longer chains (or
    // no longer parses).
    let mut bad = good.clone();
    bad[20 + header_len - 20] ^= 0x01;
    assert_refused(&agent, &write(&agent, "tampered.gbundle", &bad)?, "header byte (certificate)", |e| {
        matches!(
            e,
            AgentError::Cert(
                CertError::BundleSignerRejected { .. }
                    | CertError::BundleSignatureInvalid
                    | CertError::Bundle(BundleError::Malformed(_))
            )
        )
    })?;
    // The header rewritten (a higher reply number, another agent id), ciphertext and signature kept.
    for (what, header) in [
        ("reply number raised", BundleHeader { bundle_number: 9, ..parsed.header.clone() }),
        ("agent id changed", BundleHeader { agent_id: Uuid::new_v4(), ..parsed.header.clone() }),
    ] {
        let forged = bundle::finish_bundle(bundle::encode_signed_part(&header, parsed.ciphertext)?, parsed.signature)?;
        assert_refused(&agent, &write(&agent, "tampered.gbundle", &forged)?, what, signature_invalid)?;
    }
    // Truncated anywhere, and one byte too many.
    for cut in [0, 10, 100, 20 + header_len + 3, good.len() / 2, good.len() - 1] {
        assert_refused(&agent, &write(&agent, "truncated.gbundle", &good[..cut])?, "truncated", |e| {
            matches!(e, AgentError::Cert(CertError::Bundle(BundleError::Truncated(_) | BundleError::NotABundle)))
        })?;
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_refused(&agent, &write(&agent, "longer.gbundle", &longer)?, "trailing byte", |e| {
        matches!(e, AgentError::Cert(CertError::Bundle(BundleError::Malformed(_))))
    })?;

    // The untouched reply still applies: the refusals were about the damage, nothing else.
    let report = agent.import(&reply)?;
    assert!(matches!(report, ReplyImportReport::Imported { reply_number: 2, acked: 3, assignments: 1, .. }));
    Ok(())
}

#[test]
fn replies_from_another_fleet_or_not_signed_by_the_control_plane_are_refused_and_change_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    let neighbour = Agent::enroll(&cp, dir.path(), "b")?;
    let other_fleet = ControlPlane::start(dir.path(), "elsewhere")?;
    let seqs = agent.run_job_offline("/media/a.mov")?;
    // What every forgery tries to make the agent do: drop its outbox, run a job, take a CRL.
    let tempting = ControlReply {
        acks: seqs,
        assignments: vec![Assignment {
            job_id: Uuid::new_v4(),
            lease_id: 1,
            path: "/etc/shadow".into(),
            profile: Profile::Shots,
        }],
        crl_pem: cp.ca.revocation_list_pem(&[], 1)?,
        renewed_cert_pem: None,
        trust_ca_pems: Vec::new(),
        update: None,
    };
    let ours = *cp.ca.fingerprint().as_bytes();

    // Another fleet's control plane, in its own name.
    let foreign = forge_reply(
        &agent,
        reply_header(*other_fleet.ca.fingerprint().as_bytes(), agent.id, 1),
        &tempting,
        &other_fleet.server_signer()?,
    )?;
    assert_refused(&agent, &write(&agent, "foreign.gbundle", &foreign)?, "another fleet", |e| {
        matches!(e, AgentError::Cert(CertError::BundleFromAnotherFleet { .. }))
    })?;
    // Another fleet's control plane claiming our fleet: its certificate does not chain to our CA.
    let claimed = forge_reply(&agent, reply_header(ours, agent.id, 1), &tempting, &other_fleet.server_signer()?)?;
    assert_refused(&agent, &write(&agent, "claimed.gbundle", &claimed)?, "another fleet's server cert", |e| {
        matches!(e, AgentError::Cert(CertError::BundleSignerRejected { .. }))
    })?;
    // Signed by agent certificates of our own fleet (the agent's own key, and a neighbour's): valid
    // certificates, but not the control plane's.
    for (what, who) in [("signed by this agent", &agent), ("signed by another agent", &neighbour)] {
        let signer = BundleSigner::from_pem(
            &std::fs::read_to_string(who.dd.cert_path())?,
            &std::fs::read_to_string(who.dd.key_path())?,
        )?;
        let forged = forge_reply(&agent, reply_header(ours, agent.id, 1), &tempting, &signer)?;
        assert_refused(&agent, &write(&agent, "agent-signed.gbundle", &forged)?, what, |e| {
            matches!(e, AgentError::Cert(CertError::BundleSignerRejected { .. }))
        })?;
    }
    // An agent→control bundle handed back as a reply.
    let outbound = agent.export("outbound.gbundle")?;
    assert_refused(&agent, &outbound, "an agent bundle", |e| {
        matches!(e, AgentError::Cert(CertError::BundleWrongDirection { .. }))
    })?;

    // The same reply sealed by our control plane's key is accepted: the refusals were about the
    // signer, not the contents.
    let genuine = forge_reply(&agent, reply_header(ours, agent.id, 1), &tempting, &cp.server_signer()?)?;
    let report = agent.import(&write(&agent, "genuine.gbundle", &genuine)?)?;
    assert!(matches!(report, ReplyImportReport::Imported { reply_number: 1, acked: 3, assignments: 1, .. }));
    Ok(())
}

#[test]
fn a_reply_addressed_to_another_agent_is_refused_and_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let a = Agent::enroll(&cp, dir.path(), "a")?;
    let b = Agent::enroll(&cp, dir.path(), "b")?;
    a.run_job_offline("/media/a.mov")?;
    b.run_job_offline("/media/b.mov")?;
    cp.submit_pinned(b.id, "/media/for-b.mov")?;
    let reply_a = a.sync_with(&cp, "a")?;
    let reply_b = b.sync_with(&cp, "b")?;

    assert_refused(
        &a,
        &reply_b,
        "reply for agent b",
        |e| matches!(e, AgentError::BundleNotForThisAgent { agent_id } if *agent_id == b.id),
    )?;
    assert!(matches!(a.import(&reply_a)?, ReplyImportReport::Imported { acked: 3, assignments: 0, .. }));
    assert!(matches!(b.import(&reply_b)?, ReplyImportReport::Imported { acked: 3, assignments: 1, .. }));
    Ok(())
}

#[test]
fn a_reply_older_than_one_already_imported_is_refused_and_cannot_roll_back_the_crl() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    let lost = Agent::enroll(&cp, dir.path(), "lost")?;
    agent.run_job_offline("/media/a.mov")?;
    let job = cp.submit_pinned(agent.id, "/media/queued.mov")?;
    let first = agent.sync_with(&cp, "first")?;
    // Between the two replies an agent is revoked: only the second CRL lists it.
    cp.sync.revoke_agent(lost.id, "tester")?;
    agent.run_job_offline("/media/b.mov")?;
    let second = agent.sync_with(&cp, "second")?;
    assert_ne!(agent.open_reply(&first)?.1.crl_pem, agent.open_reply(&second)?.1.crl_pem);

    assert!(matches!(agent.import(&second)?, ReplyImportReport::Imported { reply_number: 2, acked: 6, .. }));
    // The runner took the job; new work is pending.
    agent.db.open_tree("offline_assignments")?.remove(job.as_bytes())?;
    agent.run_job_offline("/media/c.mov")?;
    assert_refused(&agent, &first, "older reply", |e| matches!(e, AgentError::BundleOutdated { number: 1, last: 2 }))?;
    assert_eq!(
        std::fs::read_to_string(agent_bundle::crl_path(&agent.dd))?,
        agent.open_reply(&second)?.1.crl_pem,
        "the newer CRL was replaced"
    );
    Ok(())
}

#[test]
fn export_numbers_bundles_upward_encrypts_to_the_control_plane_only_and_signs_as_the_agent() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    let seqs = agent.run_job_offline("/media/a.mov")?;
    let entries = agent.outbox.entries()?;

    let first = agent.export("one.gbundle")?;
    let second = agent.export("two.gbundle")?;
    // The number survives a restart of the agent (state reopened).
    let Agent { dd, db, outbox, id, scratch } = agent;
    drop(outbox);
    drop(db);
    let db = gaffer_agent::datadir::open_state_db(&dd.state_path(), std::time::Duration::from_secs(10))?;
    let outbox = Outbox::open(&db)?;
    let agent = Agent { dd, db, outbox, id, scratch };
    let third = agent.export("three.gbundle")?;

    let ca_pem = std::fs::read_to_string(agent.dd.ca_path())?;
    let agent_cert_pem = std::fs::read_to_string(agent.dd.cert_path())?;
    let agent_cert_der = {
        use gaffer_certs::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        CertificateDer::from_pem_slice(agent_cert_pem.as_bytes())?
    };
    let cp_key = cp.bundle_key()?;
    let unrelated_key = ControlPlane::start(dir.path(), "unrelated")?.bundle_key()?;
    for (expected_number, path) in [(1, &first), (2, &second), (3, &third)] {
        assert_eq!(std::fs::metadata(path)?.permissions().mode() & 0o777, 0o600, "bundle file mode");
        let bytes = std::fs::read(path)?;
        let parsed = gaffer_certs::verify_bundle(
            &bytes,
            BundleTrust { ca_pem: &ca_pem, crl_pem: "" },
            BundleDirection::AgentToControl,
            |h| BundleSignerRole::Agent(h.agent_id),
            UnixTime::now(),
        )?;
        assert_eq!(parsed.header.bundle_number, expected_number);
        assert_eq!(parsed.header.agent_id, agent.id);
        assert_eq!(parsed.header.ca_fingerprint, *cp.ca.fingerprint().as_bytes());
        // Signed with the agent's key: its certificate verifies the signature.
        assert_eq!(parsed.header.signer_cert_der, agent_cert_der.as_ref());
        gaffer_certs::verify_detached_signature(&agent_cert_der, parsed.signed, parsed.signature)?;
        // Readable by the control plane, and by nobody else (not even the agent).
        let payload: AgentBundle = bundle::decode_payload(&cp_key.decrypt(parsed.ciphertext)?)?;
        assert_eq!(payload.envelopes.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
        assert_eq!(payload.envelopes.iter().map(|e| e.body.clone()).collect::<Vec<_>>(), {
            entries.iter().map(|e| e.message.clone()).collect::<Vec<_>>()
        });
        assert!(payload.envelopes.iter().all(|e| e.agent_id == agent.id));
        for stranger in [&agent_bundle::load_bundle_key(&agent.dd)?, &BundleKey::generate(), &unrelated_key] {
            assert!(matches!(stranger.decrypt(parsed.ciphertext), Err(CertError::BundleDecryption { .. })));
        }
    }
    assert_eq!(agent.meta(b"last_exported_bundle")?, Some(3));

    // The control plane takes the newest and refuses the older ones after it.
    let reply = cp.answer(&third, &agent.path("reply.gbundle"))?;
    assert!(matches!(
        cp.sync.import_bundle(&second, &agent.path("stale-reply.gbundle"), "tester"),
        Err(gaffer_control::offline::OfflineError::Outdated { number: 2, last: 3, .. })
    ));
    assert!(matches!(agent.import(&reply)?, ReplyImportReport::Imported { acked: 3, outbox_pending: 0, .. }));
    // With nothing left to send, the next export is still a valid bundle, numbered 4.
    let empty = agent.export("four.gbundle")?;
    let parsed_number = bundle::parse_bundle(&std::fs::read(&empty)?)?.header.bundle_number;
    assert_eq!(parsed_number, 4);
    Ok(())
}

/// During a CA rotation `ca.pem` holds two CAs: export and import keep working with it, and a
/// reply carrying the trust set and a certificate for the renewal key the agent made before it
/// went offline installs both (switching to that pair).
#[test]
fn two_cas_keep_bundles_working_and_a_reply_installs_its_trust_set_and_a_renewal_key_certificate() -> TestResult {
    use gaffer_agent::credentials::{self, Credentials};
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::start(dir.path(), "studio")?;
    let agent = Agent::enroll(&cp, dir.path(), "a")?;
    let next_ca = FleetCa::generate("studio")?;
    assert!(credentials::write_trust_bundle(&agent.dd, &[next_ca.cert_pem(), cp.ca.cert_pem()])?);

    // With two CAs in ca.pem (ours second), the export names ours and the real control plane
    // answers it; its reply verifies against the CA it names.
    agent.run_job_offline("/media/during-rotation.mov")?;
    let bundle = agent.export("during-rotation.gbundle")?;
    let header = bundle::parse_bundle(&std::fs::read(&bundle)?)?.header;
    assert_eq!(header.ca_fingerprint, *cp.ca.fingerprint().as_bytes(), "the bundle names the CA that issued us");
    let answer = cp.answer(&bundle, &agent.path("during-rotation-reply.gbundle"))?;
    let report = agent.import(&answer)?;
    assert!(matches!(report, ReplyImportReport::Imported { reply_number: 1, acked: 3, .. }), "{report:?}");

    // A renewal key the agent made (its answer never came) before it went offline.
    let next = credentials::next_key(&agent.dd)?;
    let renewed = cp.ca.sign_agent_csr_secs(&next.csr_pem(agent.id)?, agent.id, 3600)?;
    let reply = ControlReply {
        acks: vec![],
        assignments: vec![],
        crl_pem: String::new(),
        renewed_cert_pem: Some(renewed.clone()),
        trust_ca_pems: vec![cp.ca.cert_pem()],
        update: None,
    };
    let fingerprint = *cp.ca.fingerprint().as_bytes();
    // A trust set that is not one is refused before anything changes.
    let bad = ControlReply { trust_ca_pems: vec![renewed.clone()], ..reply.clone() };
    let sealed = forge_reply(&agent, reply_header(fingerprint, agent.id, 2), &bad, &cp.server_signer()?)?;
    assert_refused(&agent, &write(&agent, "bad-trust.gbundle", &sealed)?, "non-CA trust set", |e| {
        matches!(e, AgentError::Cert(_) | AgentError::Config(_))
    })?;
    let sealed = forge_reply(&agent, reply_header(fingerprint, agent.id, 2), &reply, &cp.server_signer()?)?;
    let report = agent.import(&write(&agent, "rotation-reply.gbundle", &sealed)?)?;
    assert!(matches!(report, ReplyImportReport::Imported { renewed_cert: true, .. }), "{report:?}");
    assert_eq!(credentials::trust_bundle(&agent.dd)?, vec![cp.ca.cert_pem()], "the trust set is installed");
    let creds = Credentials::load(&agent.dd, agent.id)?;
    let current = creds.current.as_ref().ok_or("no current pair")?;
    assert_eq!(current.cert_pem, renewed, "switched to the renewal key's certificate");
    assert_eq!(std::fs::read_to_string(agent.dd.key_path())?, next.key_pem());
    assert!(creds.next.is_none() && !creds.next_key_present);
    Ok(())
}
