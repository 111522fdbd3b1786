//! What Gaffer's fuzz targets share: a fixed test fleet, an allocation watch, and the seed corpus.
//!
//! * [`fleet`]: a throwaway fleet (CA, control-plane server certificate, one enrolled agent, both
//!   age bundle keys, a CRL) loaded once per process from `fuzz/fixtures/`. Its keys protect
//!   nothing; they are committed so the committed seed corpus holds bundles and CSRs that really
//!   verify against it, and the fuzzer starts past the signature checks. Verification runs at the
//!   fixed time [`Fleet::now`] (when the fixtures were made), so the seeds stay valid after the
//!   certificates would have expired.
//! * [`CountingAlloc`]: the global allocator of every target; [`check_allocations`] fails an input
//!   that made any single allocation larger than [`allocation_bytes_max`] (what the input's size
//!   justifies), so a few bytes announcing a huge length are caught even when the allocation
//!   would have been freed at once.
//! * [`corpus`]: real inputs made by the real writers, for `write_corpus`.
//!
//! Regenerate fixtures and corpus (after a wire or file format change) from the repository root:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --bin write_corpus            # keep the fleet
//! cargo run --manifest-path fuzz/Cargo.toml --bin write_corpus -- --new-fleet
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::Context as _;
use gaffer_certs::{AgentKey, BundleKey, BundleSigner, FleetCa, RevokedCert, UnixTime};
use uuid::Uuid;

pub mod corpus;

/// Largest allocation any input may cause whatever its size, bytes: 1 MiB, the most serde
/// preallocates for a sequence whose length the input announces (`serde::de::size_hint::cautious`).
pub const ALLOCATION_BYTES_FIXED_MAX: usize = 1024 * 1024;
/// How many bytes of allocation one input byte may justify on top of [`ALLOCATION_BYTES_FIXED_MAX`]
/// (decoded structures are larger than their encoding; buffers double when they grow).
pub const ALLOCATION_BYTES_PER_INPUT_BYTE: usize = 64;

static LARGEST_ALLOCATION_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, recording the largest single allocation since
/// [`reset_largest_allocation`]. Installed as the global allocator of every target.
pub struct CountingAlloc;

// SAFETY: forwards every call unchanged to `System`; only records sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION_BYTES.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION_BYTES.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Starts a new measurement of the largest allocation (call at the start of each input, after
/// [`fleet`]).
pub fn reset_largest_allocation() {
    LARGEST_ALLOCATION_BYTES.store(0, Ordering::Relaxed);
}

/// The largest single allocation since [`reset_largest_allocation`], bytes.
pub fn largest_allocation_bytes() -> usize {
    LARGEST_ALLOCATION_BYTES.load(Ordering::Relaxed)
}

/// The largest single allocation an input of `input_bytes` bytes may cause:
/// [`ALLOCATION_BYTES_FIXED_MAX`] + [`ALLOCATION_BYTES_PER_INPUT_BYTE`] × `input_bytes`.
pub fn allocation_bytes_max(input_bytes: usize) -> usize {
    ALLOCATION_BYTES_FIXED_MAX.saturating_add(ALLOCATION_BYTES_PER_INPUT_BYTE.saturating_mul(input_bytes))
}

/// Panics (a fuzzer finding) if an allocation since [`reset_largest_allocation`] was larger than
/// [`allocation_bytes_max`] of `input_bytes`; `what` names the code path in the message.
pub fn check_allocations(input_bytes: usize, what: &str) {
    let largest = largest_allocation_bytes();
    let max = allocation_bytes_max(input_bytes);
    assert!(
        largest <= max,
        "{what}: an input of {input_bytes} bytes caused an allocation of {largest} bytes (limit {max} bytes)"
    );
}

/// Splits `data` at the first `0xFF` byte (never part of UTF-8 text, so text fields stay intact):
/// two inputs in one, e.g. a certificate and its key. No `0xFF`: everything is the first part.
pub fn split2(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// `fuzz/fixtures/` in the source tree.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `fuzz/corpus/` in the source tree.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// The test fleet (see the module docs).
pub struct Fleet {
    /// The fleet CA.
    pub ca: FleetCa,
    /// Its certificate, PEM.
    pub ca_pem: String,
    /// The control plane's server certificate, PEM.
    pub server_cert_pem: String,
    /// The control plane's server key, PEM (PKCS#8).
    pub server_key_pem: String,
    /// Signs reply bundles and offline enrollment grants (server key + certificate).
    pub server_signer: BundleSigner,
    /// The enrolled agent's id.
    pub agent_id: Uuid,
    /// The agent's key.
    pub agent_key: AgentKey,
    /// The agent's certificate, PEM.
    pub agent_cert_pem: String,
    /// Signs agent bundles (agent key + certificate).
    pub agent_signer: BundleSigner,
    /// The control plane's age identity (agent bundles are encrypted to it).
    pub control_bundle_key: BundleKey,
    /// The agent's age identity (reply bundles are encrypted to it).
    pub agent_bundle_key: BundleKey,
    /// A CRL of the fleet CA revoking one certificate that is not the agent's, PEM.
    pub crl_pem: String,
    /// When the fixtures were made, Unix seconds.
    pub made_at_unix: u64,
}

impl Fleet {
    /// The time every verification runs at: an hour after the fixtures were made, inside every
    /// certificate's validity.
    pub fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(self.made_at_unix + 3600))
    }

    /// A new fleet: fresh CA, server certificate, agent key and certificate (825 days), bundle keys
    /// and a CRL.
    ///
    /// # Errors
    /// When certificate generation fails.
    pub fn generate() -> anyhow::Result<Fleet> {
        let ca = FleetCa::generate("fuzz")?;
        let server = ca.issue_server_cert(&["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        let agent_id = Uuid::new_v4();
        let agent_key = AgentKey::generate()?;
        let agent_cert_pem =
            ca.sign_agent_csr(&agent_key.csr_pem(agent_id)?, agent_id, gaffer_certs::AGENT_CERT_VALIDITY_DAYS_MAX)?;
        let made_at_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let crl_pem = ca.revocation_list_pem(
            &[RevokedCert { serial_hex: "0123456789abcdef".into(), revoked_at_unix: made_at_unix as i64 - 60 }],
            made_at_unix,
        )?;
        Fleet::assemble(
            ca,
            server.cert_pem,
            server.key_pem,
            agent_id,
            agent_key,
            agent_cert_pem,
            BundleKey::generate(),
            BundleKey::generate(),
            crl_pem,
            made_at_unix,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        ca: FleetCa,
        server_cert_pem: String,
        server_key_pem: String,
        agent_id: Uuid,
        agent_key: AgentKey,
        agent_cert_pem: String,
        control_bundle_key: BundleKey,
        agent_bundle_key: BundleKey,
        crl_pem: String,
        made_at_unix: u64,
    ) -> anyhow::Result<Fleet> {
        let server_signer = BundleSigner::from_pem(&server_cert_pem, &server_key_pem)?;
        let agent_signer = BundleSigner::from_pem(&agent_cert_pem, &agent_key.key_pem())?;
        Ok(Fleet {
            ca_pem: ca.cert_pem(),
            ca,
            server_cert_pem,
            server_key_pem,
            server_signer,
            agent_id,
            agent_key,
            agent_cert_pem,
            agent_signer,
            control_bundle_key,
            agent_bundle_key,
            crl_pem,
            made_at_unix,
        })
    }

    /// Loads the fleet written by [`Fleet::save`] from `dir`.
    ///
    /// # Errors
    /// When a file is missing or unreadable.
    pub fn load(dir: &Path) -> anyhow::Result<Fleet> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).with_context(|| format!("{}", dir.join(name).display()))
        };
        let ca = FleetCa::from_pem(&read("ca.pem")?, &read("ca.key")?)?;
        Fleet::assemble(
            ca,
            read("server.pem")?,
            read("server.key")?,
            read("agent-id.txt")?.trim().parse()?,
            AgentKey::from_pem(&read("agent.key")?)?,
            read("agent.pem")?,
            BundleKey::from_secret_str(&read("control-bundle.key")?)?,
            BundleKey::from_secret_str(&read("agent-bundle.key")?)?,
            read("crl.pem")?,
            read("made-at-unix.txt")?.trim().parse()?,
        )
    }

    /// Writes the fleet's files to `dir` (created if missing).
    ///
    /// # Errors
    /// When a file cannot be written.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let files: [(&str, String); 11] = [
            ("ca.pem", self.ca_pem.clone()),
            ("ca.key", self.ca.key_pem()),
            ("server.pem", self.server_cert_pem.clone()),
            ("server.key", self.server_key_pem.clone()),
            ("agent-id.txt", format!("{}\n", self.agent_id)),
            ("agent.key", self.agent_key.key_pem()),
            ("agent.pem", self.agent_cert_pem.clone()),
            ("control-bundle.key", format!("{}\n", self.control_bundle_key.secret_string())),
            ("agent-bundle.key", format!("{}\n", self.agent_bundle_key.secret_string())),
            ("crl.pem", self.crl_pem.clone()),
            ("made-at-unix.txt", format!("{}\n", self.made_at_unix)),
        ];
        for (name, text) in files {
            std::fs::write(dir.join(name), text).with_context(|| format!("{}", dir.join(name).display()))?;
        }
        Ok(())
    }
}

/// The fleet of `fuzz/fixtures/`, loaded on first use. Panics if the fixtures are missing or
/// unreadable (regenerate them: see the module docs).
pub fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| match Fleet::load(&fixtures_dir()) {
        Ok(f) => f,
        Err(e) => panic!("fuzz fixtures unreadable ({e:#}); run `cargo run --manifest-path fuzz/Cargo.toml --bin write_corpus -- --new-fleet`"),
    })
}

/// How each target reads its input: the first byte selects what the rest is (taken modulo the
/// number of choices, so every byte value means something).
pub mod input {
    /// `bundle`: what the bytes after the selector are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BundleMode {
        /// A bundle file, imported by both sides (`verify_bundle` → bundle number → decrypt → payload).
        File = 0,
        /// A decrypted payload ([`gaffer_protocol::bundle::AgentBundle`] / `ControlReply`), as a
        /// fleet member with a valid key could encrypt and sign it.
        Payload = 1,
        /// An age ciphertext, decrypted with both sides' bundle keys.
        Ciphertext = 2,
        /// A payload sealed by the real writer each time, then verified, decrypted and decoded: the
        /// round trip must give the payload back.
        Seal = 3,
    }

    impl BundleMode {
        /// The mode a selector byte names.
        pub fn of(selector: u8) -> Self {
            match selector % 4 {
                0 => BundleMode::File,
                1 => BundleMode::Payload,
                2 => BundleMode::Ciphertext,
                _ => BundleMode::Seal,
            }
        }
    }

    /// `enroll_request`: what the bytes after the selector are.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum EnrollInput {
        /// The bytes of a `gaffer-enroll/1` stream as the control plane reads them (an
        /// `EnrollRequest` frame).
        RequestFrame = 0,
        /// The bytes of the stream as the agent reads them (an `EnrollResponse` frame).
        ResponseFrame = 1,
        /// An offline enrollment request file (`gaffer-control enroll-offline`).
        OfflineRequest = 2,
        /// An offline enrollment reply file (`gaffer-agent enroll --offline-reply`).
        OfflineReply = 3,
        /// A CSR, PEM, signed by the fleet CA.
        Csr = 4,
    }

    impl EnrollInput {
        /// The input a selector byte names.
        pub fn of(selector: u8) -> Self {
            match selector % 5 {
                0 => EnrollInput::RequestFrame,
                1 => EnrollInput::ResponseFrame,
                2 => EnrollInput::OfflineRequest,
                3 => EnrollInput::OfflineReply,
                _ => EnrollInput::Csr,
            }
        }
    }

    /// `config_files`: which file the bytes after the selector are. Pairs (certificate and key)
    /// are split at the first `0xFF` byte ([`crate::split2`]).
    ///
    /// A new configuration file format gets a variant here, an arm in
    /// `fuzz_targets/config_files.rs` calling its real parser, and a seed in
    /// [`crate::corpus::config_files`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ConfigFile {
        /// The control plane's `config.json` (`gaffer_control::datadir::ControlConfig`).
        ControlConfig = 0,
        /// The agent's `agent.json` (`gaffer_agent::datadir::AgentIdentity`).
        AgentIdentity = 1,
        /// An installed model's or runtime's `manifest.json` (`gaffer_agent::models::InstalledManifest`).
        InstalledManifest = 2,
        /// The agent's `capabilities.json` (read into offline bundles).
        Capabilities = 3,
        /// `ca.pem` and `ca.key` (`FleetCa::from_pem`).
        CaPemAndKey = 4,
        /// A CRL file (`crl.pem`, `FleetCa::crls_from_pem`).
        CrlPem = 5,
        /// A CA fingerprint as typed (`--ca-fingerprint`, `agent.json`).
        CaFingerprint = 6,
        /// A CA certificate PEM to fingerprint (`CaFingerprint::from_cert_pem`).
        CaPemFingerprint = 7,
        /// `agent.key` (`AgentKey::from_pem`).
        AgentKeyPem = 8,
        /// A certificate and key pair (`agent.pem` + `agent.key`, `server.pem` + `server.key`:
        /// `BundleSigner::from_pem`).
        SignerPemAndKey = 9,
        /// `bundle.key` (`BundleKey::from_secret_str`).
        BundleKey = 10,
        /// A wheel file name or model name given to `gaffer-agent models`.
        WheelOrItemName = 11,
        /// `/etc/gaffer/agent.toml` (`gaffer_agent::config::check`).
        AgentToml = 12,
        /// `/etc/gaffer/control.toml` (`gaffer_control::config::check`).
        ControlToml = 13,
    }

    impl ConfigFile {
        /// Number of variants.
        pub const COUNT: u8 = 14;

        /// The file a selector byte names.
        pub fn of(selector: u8) -> Self {
            match selector % Self::COUNT {
                0 => ConfigFile::ControlConfig,
                1 => ConfigFile::AgentIdentity,
                2 => ConfigFile::InstalledManifest,
                3 => ConfigFile::Capabilities,
                4 => ConfigFile::CaPemAndKey,
                5 => ConfigFile::CrlPem,
                6 => ConfigFile::CaFingerprint,
                7 => ConfigFile::CaPemFingerprint,
                8 => ConfigFile::AgentKeyPem,
                9 => ConfigFile::SignerPemAndKey,
                10 => ConfigFile::BundleKey,
                11 => ConfigFile::WheelOrItemName,
                12 => ConfigFile::AgentToml,
                _ => ConfigFile::ControlToml,
            }
        }
    }
}
