//! The agent's key files through a renewal, with real keys and certificates from a real fleet CA:
//! every on-disk state a crash can leave between the steps of a renewal holds a key and
//! certificate that belong together (and that a real TLS handshake accepts), the interrupted
//! switch is finished at the next start, a renewal key is reused when its answer was lost, and
//! certificates or trust bundles that do not fit are refused without touching the files.

use std::path::Path;
use std::sync::Arc;

use gaffer_agent::credentials::{self, CertPair, Credentials, Slot};
use gaffer_agent::datadir::DataDir;
use gaffer_agent::AgentError;
use gaffer_certs::{AgentKey, FleetCa};
use uuid::Uuid;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A data directory holding an enrolled agent's key, certificate and trust bundle, as `enroll`
/// leaves it.
fn enrolled(root: &Path, ca: &FleetCa) -> Result<(DataDir, Uuid, AgentKey), Box<dyn std::error::Error>> {
    let dd = DataDir::new(root.join("agent"));
    gaffer_certs::create_private_dir(dd.root())?;
    let id = Uuid::new_v4();
    let key = AgentKey::generate()?;
    let cert = ca.sign_agent_csr_secs(&key.csr_pem(id)?, id, 3600)?;
    gaffer_certs::write_secret_file(&dd.key_path(), key.key_pem().as_bytes())?;
    gaffer_certs::write_secret_file(&dd.cert_path(), cert.as_bytes())?;
    gaffer_certs::write_secret_file(&dd.ca_path(), ca.cert_pem().as_bytes())?;
    Ok((dd, id, key))
}

/// Copies the key files of `dd` into a fresh directory: what a crash at this point leaves.
fn snapshot(dd: &DataDir, into: &Path) -> Result<DataDir, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(into)?;
    for entry in std::fs::read_dir(dd.root())? {
        let entry = entry?;
        std::fs::copy(entry.path(), into.join(entry.file_name()))?;
    }
    Ok(DataDir::new(into))
}

/// A real mTLS handshake with `pair` against a server trusting `ca` (rustls over in-memory
/// buffers): the pair is one the control plane accepts.
fn handshake_accepts(ca: &FleetCa, dd: &DataDir, pair: &CertPair) -> TestResult {
    #[derive(Debug)]
    struct NoRevocation;
    impl gaffer_certs::ClientCertPolicy for NoRevocation {
        fn is_revoked(&self, _: Uuid, _: &str) -> bool {
            false
        }
        fn refused(&self, reason: gaffer_certs::ClientCertRefusal) {
            panic!("handshake refused: {reason}");
        }
    }
    let server_pair = ca.issue_server_cert(&["localhost".into()])?;
    let server_cfg =
        gaffer_certs::fleet_server_config(&ca.cert_pem(), &server_pair, &ca.cert_pem(), Arc::new(NoRevocation))?;
    let client_cfg = gaffer_certs::client_config_link(&dd.read(&dd.ca_path())?, &pair.cert_pem, &pair.key_pem)?;
    let mut client =
        rustls::ClientConnection::new(Arc::new(client_cfg), rustls::pki_types::ServerName::try_from("localhost")?)?;
    let mut server = rustls::ServerConnection::new(Arc::new(server_cfg))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf)?;
        server.read_tls(&mut buf.as_slice())?;
        server.process_new_packets()?;
        let mut buf = Vec::new();
        server.write_tls(&mut buf)?;
        client.read_tls(&mut buf.as_slice())?;
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            let certs = server.peer_certificates().ok_or("no client certificate")?;
            assert_eq!(gaffer_certs::cert_serial_hex(certs[0].as_ref())?, pair.serial_hex);
            return Ok(());
        }
    }
    Err("handshake did not finish".into())
}

/// The pair a connection attempt would use, checked to work.
fn working_pair(ca: &FleetCa, dd: &DataDir, id: Uuid) -> Result<(Slot, CertPair), Box<dyn std::error::Error>> {
    let creds = Credentials::load(dd, id)?;
    let (slot, pair) = creds.for_connecting(None).ok_or("no working pair on disk")?;
    handshake_accepts(ca, dd, pair)?;
    Ok((slot, pair.clone()))
}

#[test]
fn every_crash_point_of_a_renewal_leaves_a_working_pair_and_the_switch_completes() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ca = FleetCa::generate("test")?;
    let (dd, id, old_key) = enrolled(tmp.path(), &ca)?;
    let old_serial = Credentials::load(&dd, id)?.current.ok_or("no current pair")?.serial_hex;
    let mut states = Vec::new();
    states.push(("enrolled", snapshot(&dd, &tmp.path().join("s0"))?));

    // The renewal key is written before its CSR leaves; asking again reuses it.
    let next = credentials::next_key(&dd)?;
    assert_eq!(credentials::next_key(&dd)?.key_pem(), next.key_pem(), "a lost answer's key is reused");
    assert_ne!(next.key_pem(), old_key.key_pem());
    states.push(("renewal key written", snapshot(&dd, &tmp.path().join("s1"))?));

    let cert = ca.sign_agent_csr_secs(&next.csr_pem(id)?, id, 3600)?;
    let now_ms = gaffer_agent::now_ms();
    let new = credentials::install_next_cert(&dd, id, &cert, now_ms)?;
    states.push(("certificate received", snapshot(&dd, &tmp.path().join("s2"))?));

    // The first step of the switch (the key renamed) and nothing more: the crash in the middle.
    std::fs::rename(dd.next_key_path(), dd.key_path())?;
    states.push(("key switched, certificate not yet", snapshot(&dd, &tmp.path().join("s3"))?));
    std::fs::rename(dd.key_path(), dd.next_key_path())?;

    let promoted = credentials::promote(&dd, id)?;
    assert_eq!(promoted.serial_hex, new.serial_hex);
    states.push(("switched", snapshot(&dd, &tmp.path().join("s4"))?));

    let expected = [
        (Slot::Current, &old_serial),
        (Slot::Current, &old_serial),
        (Slot::Next, &new.serial_hex),
        (Slot::Next, &new.serial_hex),
        (Slot::Current, &new.serial_hex),
    ];
    for ((what, state), (slot, serial)) in states.iter().zip(expected) {
        let (got_slot, pair) = working_pair(&ca, state, id).map_err(|e| format!("{what}: {e}"))?;
        assert_eq!((got_slot, &pair.serial_hex), (slot, serial), "{what}");
        // What the next start does: finish an interrupted switch; the pair still works after.
        let finished = credentials::recover(state, id)?;
        assert_eq!(finished, *what == "key switched, certificate not yet", "{what}");
        let after = Credentials::load(state, id)?;
        let current = after.current.as_ref().ok_or_else(|| format!("{what}: no current pair after recovery"))?;
        handshake_accepts(&ca, state, current)?;
        if finished {
            assert_eq!(current.serial_hex, new.serial_hex, "the interrupted switch ends on the new pair");
            assert!(!state.next_key_path().exists() && !state.next_cert_path().exists());
        }
    }

    // After the switch: the new pair is current, its arrival recorded, nothing left over.
    let creds = Credentials::load(&dd, id)?;
    let current = creds.current.as_ref().ok_or("no current pair")?;
    assert_eq!(current.serial_hex, new.serial_hex);
    assert_eq!(dd.read(&dd.key_path())?, next.key_pem());
    assert!(creds.next.is_none() && !creds.next_key_present);
    assert_eq!(creds.installed_at_ms(current), now_ms);
    assert_eq!(creds.renewal_due_at_ms(current), credentials::renewal_due_at_ms(now_ms, current.not_after_ms));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(dd.key_path())?.permissions().mode() & 0o777, 0o600, "the key stays 0600");
    Ok(())
}

#[test]
fn certificates_that_do_not_fit_are_refused_and_a_refused_one_is_dropped_keeping_its_key() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ca = FleetCa::generate("test")?;
    let (dd, id, old_key) = enrolled(tmp.path(), &ca)?;
    let now_ms = gaffer_agent::now_ms();

    // No renewal key on disk: nothing to pair a certificate with.
    let stray = ca.sign_agent_csr_secs(&AgentKey::generate()?.csr_pem(id)?, id, 3600)?;
    assert!(matches!(credentials::install_next_cert(&dd, id, &stray, now_ms), Err(AgentError::Config(_))));
    let next = credentials::next_key(&dd)?;
    // For another key (the old one), and for another agent: refused, nothing written.
    let for_old_key = ca.sign_agent_csr_secs(&old_key.csr_pem(id)?, id, 3600)?;
    assert!(matches!(credentials::install_next_cert(&dd, id, &for_old_key, now_ms), Err(AgentError::Cert(_))));
    let other = Uuid::new_v4();
    let for_other = ca.sign_agent_csr_secs(&next.csr_pem(other)?, other, 3600)?;
    assert!(matches!(credentials::install_next_cert(&dd, id, &for_other, now_ms), Err(AgentError::Protocol(_))));
    assert!(!dd.next_cert_path().exists());

    // A renewed certificate the control plane refused is dropped; its key stays for the next try,
    // and the current pair is the one to connect with.
    let good = ca.sign_agent_csr_secs(&next.csr_pem(id)?, id, 3600)?;
    let installed = credentials::install_next_cert(&dd, id, &good, now_ms)?;
    let creds = Credentials::load(&dd, id)?;
    assert_eq!(creds.for_connecting(None).map(|(s, _)| s), Some(Slot::Next));
    assert_eq!(
        creds.for_connecting(Some(&installed.serial_hex)).map(|(s, _)| s),
        Some(Slot::Current),
        "a refused renewed certificate is not tried again while the current one exists"
    );
    credentials::discard_next_cert(&dd)?;
    let creds = Credentials::load(&dd, id)?;
    assert!(creds.next.is_none() && creds.next_key_present);
    assert_eq!(credentials::next_key(&dd)?.key_pem(), next.key_pem(), "the renewal key is asked for again");
    assert!(matches!(credentials::promote(&dd, id), Err(AgentError::Config(_))), "nothing to switch to");
    assert_eq!(dd.read(&dd.key_path())?, old_key.key_pem(), "the current key is untouched");
    Ok(())
}

#[test]
fn trust_bundles_are_checked_before_they_replace_ca_pem() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ca = FleetCa::generate("test")?;
    let next_ca = FleetCa::generate("test")?;
    let (dd, id, key) = enrolled(tmp.path(), &ca)?;
    let before = dd.read(&dd.ca_path())?;

    assert!(matches!(credentials::write_trust_bundle(&dd, &[]), Err(AgentError::Config(_))), "empty refused");
    let not_a_ca = ca.sign_agent_csr_secs(&key.csr_pem(id)?, id, 3600)?;
    assert!(credentials::write_trust_bundle(&dd, &[not_a_ca]).is_err(), "a non-CA certificate is refused");
    assert!(credentials::write_trust_bundle(&dd, &["not pem".into()]).is_err());
    let five: Vec<String> = (0..5).map(|_| FleetCa::generate("x").map(|c| c.cert_pem())).collect::<Result<_, _>>()?;
    assert!(credentials::write_trust_bundle(&dd, &five).is_err(), "more than 4 CAs refused");
    assert_eq!(dd.read(&dd.ca_path())?, before, "ca.pem untouched by refusals");

    assert!(!credentials::write_trust_bundle(&dd, &[ca.cert_pem()])?, "the same set changes nothing");
    assert!(credentials::write_trust_bundle(&dd, &[ca.cert_pem(), next_ca.cert_pem()])?);
    let cas = credentials::trust_bundle(&dd)?;
    assert_eq!(cas.len(), 2);
    // The issuer of our certificate is found among them (what bundle export names).
    let pair = Credentials::load(&dd, id)?.current.ok_or("no current pair")?;
    let issuer = credentials::issuer_of(&cas, &pair.cert_pem, id).ok_or("no issuer found")?;
    assert_eq!(gaffer_certs::CaFingerprint::from_cert_pem(issuer)?, ca.fingerprint());
    // The link still connects with a two-CA bundle.
    handshake_accepts(&ca, &dd, &pair)?;
    Ok(())
}

#[test]
fn re_enrolling_an_enrolled_dir_without_renew_is_refused_naming_renew() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ca = FleetCa::generate("test")?;
    let (dd, _, _) = enrolled(tmp.path(), &ca)?;
    std::fs::write(dd.identity_path(), "{}")?;
    match dd.create() {
        Err(e @ AgentError::AlreadyEnrolled { .. }) => assert!(e.to_string().contains("--renew"), "{e}"),
        other => panic!("expected AlreadyEnrolled, got {other:?}"),
    }
    Ok(())
}
