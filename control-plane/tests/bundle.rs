//! Offline-sync bundle import on the control plane, with real keys and certificates, real age
//! encryption, real files and the sled store: the happy path, the refusals (each leaving the store
//! exactly as it was), and idempotent re-import.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gaffer_certs::{AgentKey, BundleKey, BundleSigner, CertError, FleetCa};
use gaffer_control::datadir::DataDir;
use gaffer_control::ingest::Ingest;
use gaffer_control::offline::{ImportReport, OfflineError, OfflineSync};
use gaffer_control::scheduler::SchedulerConfig;
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{BundleNumbers, JobQuery, JobState, Store};
use gaffer_control::AppState;
use gaffer_protocol::bundle::{self, AgentBundle, BundleDirection, BundleError, BundleHeader, ControlReply};
use gaffer_protocol::digest::{Digest, ShotAnalysis, SourceInfo, TechnicalMetadata, DIGEST_SCHEMA_VERSION};
use gaffer_protocol::enroll::{OfflineEnrollGrant, OfflineEnrollReply, OfflineEnrollRequest};
use gaffer_protocol::messages::{AgentEnvelope, AgentId, AgentMessage, Capabilities, Profile, LEASE_ID_NONE};
use gaffer_protocol::version::VersionRange;
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A control plane data dir with its store and offline operations, and one agent enrolled offline
/// (whose keys the test holds, like the agent box would).
struct Fixture {
    dir: tempfile::TempDir,
    ca: Arc<FleetCa>,
    store: Arc<dyn Store>,
    sync: OfflineSync,
    agent_id: AgentId,
    agent_signer: BundleSigner,
    agent_bundle_key: BundleKey,
    cp_recipient: String,
}

/// A control plane's CA, store and offline sync over a fresh data dir.
type ControlPlaneParts = (Arc<FleetCa>, Arc<dyn Store>, OfflineSync);

fn control_plane(dir: &Path) -> Result<ControlPlaneParts, Box<dyn std::error::Error>> {
    let dd = DataDir::new(dir.join("control"));
    dd.create()?;
    let ca = FleetCa::generate("studio")?;
    let server = ca.issue_server_cert(&["localhost".into()])?;
    dd.write_pki(&ca, &server)?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dd.store_path())?);
    let state = AppState::new(store.clone(), SchedulerConfig::default());
    let ingest = Arc::new(Ingest::new(state.clone()));
    let ca = Arc::new(ca);
    let pki = gaffer_control::identity::Pki::open(
        &dd,
        vec!["localhost".into()],
        gaffer_control::identity::AGENT_CERT_TTL_SECS_DEFAULT,
        state.metrics.clone(),
    )?;
    let sync = OfflineSync::open(&dd, pki, state, ingest)?;
    Ok((ca, store, sync))
}

impl Fixture {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let (ca, store, sync) = control_plane(dir.path())?;
        // The agent side of offline enrollment.
        let agent_id = Uuid::new_v4();
        let key = AgentKey::generate()?;
        let agent_bundle_key = BundleKey::generate();
        let req = OfflineEnrollRequest {
            versions: VersionRange::ours(),
            agent_id,
            csr_pem: key.csr_pem(agent_id)?,
            hostname: "gpu-box-9".into(),
            site: "stage-a".into(),
            agent_version: "0.1.0".into(),
            bundle_recipient: agent_bundle_key.recipient(),
        };
        let req_path = dir.path().join("request.json");
        std::fs::write(&req_path, serde_json::to_string(&req)?)?;
        let reply_path = dir.path().join("reply.json");
        let report = sync.enroll_offline(&req_path, &reply_path, "tester")?;
        assert_eq!(report.agent_id, agent_id);
        let reply: OfflineEnrollReply = serde_json::from_str(&std::fs::read_to_string(&reply_path)?)?;
        let grant: OfflineEnrollGrant = serde_json::from_str(&reply.grant_json)?;
        let agent_signer = BundleSigner::from_pem(&grant.cert_pem, &key.key_pem())?;
        let cp_recipient = grant.bundle_recipient.clone();
        Ok(Fixture { dir, ca, store, sync, agent_id, agent_signer, agent_bundle_key, cp_recipient })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An agent bundle numbered `number` carrying `envelopes`, written to a file.
    fn bundle(&self, number: u64, envelopes: Vec<AgentEnvelope>) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let header = BundleHeader {
            direction: BundleDirection::AgentToControl,
            ca_fingerprint: *self.ca.fingerprint().as_bytes(),
            agent_id: self.agent_id,
            bundle_number: number,
            created_at_ms: 0,
            signer_cert_der: vec![],
        };
        let capabilities = Capabilities {
            gpus: vec![],
            volumes: vec!["/media".into()],
            watch_roots: vec![],
            job_slots: 2,
            profiles: vec![Profile::Shots],
            models: vec![],
        };
        let payload = bundle::encode_payload(&AgentBundle {
            envelopes,
            capabilities: Some(capabilities),
            agent_version: Some("0.1.0".into()),
        })?;
        let file = gaffer_certs::seal_bundle(header, &payload, &self.cp_recipient, &self.agent_signer)?;
        let path = self.path(&format!("bundle-{number}.gbundle"));
        std::fs::write(&path, file)?;
        Ok(path)
    }

    fn env(&self, seq: u64, body: AgentMessage) -> AgentEnvelope {
        AgentEnvelope { agent_id: self.agent_id, seq, body }
    }

    /// A watch-folder job run offline: submitted, accepted, finished with a digest.
    fn job_messages(&self, first_seq: u64, path: &str) -> (Uuid, Vec<AgentEnvelope>) {
        let job_id = Uuid::new_v4();
        let msgs = vec![
            self.env(first_seq, AgentMessage::SubmitWatched { job_id, path: path.into(), profile: Profile::Shots }),
            self.env(first_seq + 1, AgentMessage::JobAccepted { job_id, lease_id: LEASE_ID_NONE }),
            self.env(
                first_seq + 2,
                AgentMessage::Digest { job_id, lease_id: LEASE_ID_NONE, digest: Box::new(digest(path)) },
            ),
        ];
        (job_id, msgs)
    }

    /// Everything an import may change.
    fn snapshot(&self) -> Result<Snapshot, Box<dyn std::error::Error>> {
        let jobs = self.store.list_jobs(&JobQuery { limit: 10_000, ..JobQuery::default() })?.jobs;
        let digests = jobs.iter().map(|j| self.store.get_digest(j.id)).collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            jobs: jobs.iter().map(|j| (j.id, j.state, j.attempts)).collect(),
            digests: digests.into_iter().flatten().count(),
            watermark: self.store.last_applied_seq(self.agent_id)?,
            numbers: self.store.bundle_numbers(self.agent_id)?,
            audit_entries: self.store.list_audit(10_000)?.len(),
        })
    }

    fn import(&self, bundle: &Path) -> Result<ImportReport, OfflineError> {
        self.sync.import_bundle(bundle, &self.path("reply.gbundle"), "tester")
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    jobs: Vec<(Uuid, JobState, u32)>,
    digests: usize,
    watermark: Option<u64>,
    numbers: BundleNumbers,
    audit_entries: usize,
}

fn digest(path: &str) -> Digest {
    Digest {
        schema_version: DIGEST_SCHEMA_VERSION,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 1_000, modified_unix_secs: None },
        technical: TechnicalMetadata {
            container: "avi".into(),
            container_long_name: "AVI (Audio Video Interleaved)".into(),
            duration_secs: Some(11.0),
            bit_rate_bps: None,
            streams: vec![],
            primary_video_stream: None,
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 264,
            frames_corrupt: 0,
            cuts: vec![],
            shots: vec![],
        },
        moderation: None,
        text: None,
        speech: None,
        analyzers: vec![],
        analysis_secs: 0.5,
    }
}

fn open_reply(fx: &Fixture) -> Result<(BundleHeader, ControlReply), Box<dyn std::error::Error>> {
    let bytes = std::fs::read(fx.path("reply.gbundle"))?;
    let parsed = bundle::parse_bundle(&bytes)?;
    let reply: ControlReply = bundle::decode_payload(&fx.agent_bundle_key.decrypt(parsed.ciphertext)?)?;
    Ok((parsed.header, reply))
}

#[test]
fn offline_jobs_arrive_once_with_digests_and_a_second_import_changes_nothing() -> TestResult {
    let fx = Fixture::new()?;
    let (job_a, mut envs) = fx.job_messages(1, "/media/a.mov");
    let (job_b, more) = fx.job_messages(4, "/media/b.mov");
    envs.extend(more);
    let file = fx.bundle(1, envs)?;

    let report = fx.import(&file)?;
    let ImportReport::Imported { applied, duplicates, reply_number, .. } = report else {
        panic!("expected an import, got {report:?}");
    };
    assert_eq!((applied, duplicates, reply_number), (6, 0, 1));
    for job in [job_a, job_b] {
        let rec = fx.store.get_job(job)?.ok_or("job missing")?;
        assert_eq!(rec.state, JobState::Succeeded);
        assert_eq!(rec.agent, Some(fx.agent_id));
        assert!(fx.store.get_digest(job)?.is_some());
    }
    // The reply is for this agent, from the control plane, decryptable only with the agent's key,
    // and acknowledges every message.
    let (header, reply) = open_reply(&fx)?;
    assert_eq!(
        (header.direction, header.agent_id, header.bundle_number),
        (BundleDirection::ControlToAgent, fx.agent_id, 1)
    );
    assert_eq!(reply.acks, vec![1, 2, 3, 4, 5, 6]);
    assert!(reply.crl_pem.contains("BEGIN X509 CRL"));
    assert!(BundleKey::generate()
        .decrypt(bundle::parse_bundle(&std::fs::read(fx.path("reply.gbundle"))?)?.ciphertext)
        .is_err());
    // The audit log names the operator and the action.
    let audit = fx.store.list_audit(10)?;
    assert_eq!(audit[0].action, "bundle_import");
    assert_eq!(audit[0].who, "tester");
    assert!(audit.iter().any(|a| a.action == "enroll_offline" && a.agent == Some(fx.agent_id)));

    let before = fx.snapshot()?;
    std::fs::remove_file(fx.path("reply.gbundle"))?;
    let again = fx.import(&file)?;
    assert_eq!(again, ImportReport::AlreadyImported { agent_id: fx.agent_id, bundle_number: 1 });
    assert_eq!(fx.snapshot()?, before, "a second import changed the store");
    assert!(!fx.path("reply.gbundle").exists(), "a second import wrote a reply");

    // The next bundle redelivers the last digest (agent crashed before the reply arrived) and adds
    // a new job: the redelivery is acknowledged, not applied, and no digest is stored twice.
    let (job_c, mut envs) = fx.job_messages(7, "/media/c.mov");
    envs.insert(
        0,
        fx.env(
            6,
            AgentMessage::Digest { job_id: job_b, lease_id: LEASE_ID_NONE, digest: Box::new(digest("/media/b.mov")) },
        ),
    );
    let report = fx.import(&fx.bundle(2, envs)?)?;
    let ImportReport::Imported { applied, duplicates, reply_number, .. } = report else {
        panic!("expected an import, got {report:?}");
    };
    assert_eq!((applied, duplicates, reply_number), (3, 1, 2));
    assert_eq!(fx.store.get_job(job_c)?.map(|j| j.state), Some(JobState::Succeeded));
    assert_eq!(fx.snapshot()?.digests, 3);
    assert_eq!(open_reply(&fx)?.1.acks, vec![6, 7, 8, 9]);
    Ok(())
}

#[test]
fn queued_jobs_for_the_agent_travel_in_the_reply_and_are_leased_to_it() -> TestResult {
    let fx = Fixture::new()?;
    let job = fx.sync_submit_pinned("/media/queued.mov")?;
    // The same eligibility rules as the link's scheduler: a path outside the agent's volumes
    // (it reported /media only) and a profile it does not run stay queued.
    let outside = fx.sync_submit_pinned("/archive/elsewhere.mov")?;
    fx.import(&fx.bundle(1, vec![])?)?;
    let (_, reply) = open_reply(&fx)?;
    assert_eq!(reply.assignments.len(), 1);
    assert_eq!(reply.assignments[0].job_id, job);
    let rec = fx.store.get_job(job)?.ok_or("job missing")?;
    assert_eq!((rec.state, rec.agent), (JobState::Assigned, Some(fx.agent_id)));
    let lease = rec.lease.ok_or("no lease")?;
    assert_eq!(reply.assignments[0].lease_id, lease.lease_id, "the reply carries the lease id");
    assert_eq!(lease.deadline_ms, None, "an air-gapped agent's lease has no deadline");
    assert_eq!(fx.store.get_job(outside)?.map(|j| j.state), Some(JobState::Queued));
    Ok(())
}

impl Fixture {
    fn sync_submit_pinned(&self, path: &str) -> Result<Uuid, Box<dyn std::error::Error>> {
        let state = AppState::new(self.store.clone(), SchedulerConfig::default());
        let job = state.scheduler.submit(
            gaffer_control::scheduler::JobRequest {
                path: path.into(),
                site: "stage-a".into(),
                agent: Some(self.agent_id),
                profile: Profile::Shots,
                priority: Default::default(),
            },
            gaffer_control::store::JobOrigin::Api,
            None,
            gaffer_control::now_ms(),
        )?;
        Ok(job.id)
    }
}

/// Imports `file`, expects a refusal matching `expected`, and checks the store did not change.
fn assert_refused(fx: &Fixture, file: &Path, what: &str, expected: impl Fn(&OfflineError) -> bool) -> TestResult {
    let before = fx.snapshot()?;
    match fx.import(file) {
        Err(e) if expected(&e) => {}
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
    assert_eq!(fx.snapshot()?, before, "{what}: the refused import changed the store");
    Ok(())
}

#[test]
fn tampered_truncated_foreign_revoked_and_older_bundles_are_refused_before_any_change() -> TestResult {
    let fx = Fixture::new()?;
    let (_, envs) = fx.job_messages(1, "/media/a.mov");
    let good = std::fs::read(fx.bundle(5, envs.clone())?)?;
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, std::io::Error> {
        let p = fx.path(name);
        std::fs::write(&p, bytes)?;
        Ok(p)
    };

    // One flipped byte in the header, the ciphertext, the signature.
    let header_len = u32::from_be_bytes(good[16..20].try_into()?) as usize;
    for (what, at) in [
        ("header byte", 20 + header_len / 2),
        ("ciphertext byte", 20 + header_len + 8 + 40),
        ("signature byte", good.len() - 5),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        assert_refused(&fx, &write("tampered", &bad)?, what, |e| {
            matches!(
                e,
                OfflineError::Refused(
                    CertError::BundleSignatureInvalid | CertError::BundleSignerRejected { .. } | CertError::Bundle(_)
                )
            )
        })?;
    }
    // Truncated anywhere.
    for cut in [10, 100, good.len() / 2, good.len() - 1] {
        assert_refused(&fx, &write("truncated", &good[..cut])?, "truncated", |e| {
            matches!(e, OfflineError::Refused(CertError::Bundle(BundleError::Truncated(_) | BundleError::NotABundle)))
        })?;
    }
    // From another fleet (another control plane's agent, encrypted to another control plane).
    let other = Fixture::new()?;
    let (_, other_envs) = other.job_messages(1, "/media/x.mov");
    assert_refused(&fx, &other.bundle(1, other_envs)?, "another fleet", |e| {
        matches!(e, OfflineError::Refused(CertError::BundleFromAnotherFleet { .. }))
    })?;

    // Older than one already imported; equal is a no-op.
    let five = write("five", &good)?;
    fx.import(&five)?;
    let (_, envs4) = fx.job_messages(4, "/media/b.mov");
    assert_refused(&fx, &fx.bundle(4, envs4)?, "older", |e| {
        matches!(e, OfflineError::Outdated { number: 4, last: 5, .. })
    })?;

    // Signed by a revoked agent.
    let revoked = fx.sync.revoke_agent(fx.agent_id, "tester")?;
    assert!(revoked.newly_revoked);
    assert!(!fx.sync.revoke_agent(fx.agent_id, "tester")?.newly_revoked);
    let (_, envs6) = fx.job_messages(4, "/media/b.mov");
    assert_refused(&fx, &fx.bundle(6, envs6)?, "revoked", |e| {
        matches!(e, OfflineError::Refused(CertError::BundleSignerRevoked { .. }))
    })?;
    Ok(())
}
