//! Real TLS 1.3 handshakes between the configs this crate builds, pumped in memory through rustls'
//! `read_tls`/`write_tls` (no sockets), plus the CA's issuance rules seen from outside.

use std::sync::Arc;

use gaffer_certs::{
    agent_id_from_cert_der, cert_not_after_unix, cert_serial_hex, client_config_enroll, client_config_link,
    enrolled_ca_pem, peer_agent_id, server_config, tls_cert_error, AgentKey, CaFingerprint, CertError, FleetCa,
    IssuedKeyPair, RevokedCert,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, ServerConfig, ServerConnection};
use uuid::Uuid;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SERVER_NAME: &str = "control.gaffer.test";

/// What each side saw after pumping the handshake to completion or failure.
struct Handshake {
    client: ClientConnection,
    server: ServerConnection,
    client_err: Option<rustls::Error>,
    server_err: Option<rustls::Error>,
}

impl Handshake {
    fn succeeded(&self) -> bool {
        self.client_err.is_none()
            && self.server_err.is_none()
            && !self.client.is_handshaking()
            && !self.server.is_handshaking()
    }
}

/// Moves all pending TLS records from one side to the other; returns whether any bytes moved.
fn transfer(
    from: &mut dyn FnMut(&mut Vec<u8>) -> bool,
    to: &mut dyn FnMut(&[u8]) -> Option<rustls::Error>,
    to_err: &mut Option<rustls::Error>,
) -> bool {
    let mut buf = Vec::new();
    while from(&mut buf) {}
    if buf.is_empty() {
        return false;
    }
    if to_err.is_none() {
        *to_err = to(&buf);
    }
    true
}

fn handshake(
    client_config: ClientConfig,
    server_config: ServerConfig,
    server_name: &str,
) -> Result<Handshake, Box<dyn std::error::Error>> {
    let name = ServerName::try_from(server_name.to_owned())?;
    let mut client = ClientConnection::new(Arc::new(client_config), name)?;
    let mut server = ServerConnection::new(Arc::new(server_config))?;
    let (mut client_err, mut server_err) = (None, None);
    for _round in 0..32 {
        let to_server = transfer(
            &mut |buf| client.wants_write() && client.write_tls(buf).is_ok_and(|n| n > 0),
            &mut |bytes| {
                let mut rd = bytes;
                while !rd.is_empty() {
                    if let Err(e) = server.read_tls(&mut rd) {
                        return Some(rustls::Error::General(e.to_string()));
                    }
                }
                server.process_new_packets().err()
            },
            &mut server_err,
        );
        let to_client = transfer(
            &mut |buf| server.wants_write() && server.write_tls(buf).is_ok_and(|n| n > 0),
            &mut |bytes| {
                let mut rd = bytes;
                while !rd.is_empty() {
                    if let Err(e) = client.read_tls(&mut rd) {
                        return Some(rustls::Error::General(e.to_string()));
                    }
                }
                client.process_new_packets().err()
            },
            &mut client_err,
        );
        if !to_server && !to_client {
            break;
        }
    }
    Ok(Handshake { client, server, client_err, server_err })
}

/// A fleet: CA, server certificate for `SERVER_NAME` and 127.0.0.1.
struct Fleet {
    ca: FleetCa,
    server: IssuedKeyPair,
}

impl Fleet {
    fn new(name: &str) -> Result<Self, CertError> {
        let ca = FleetCa::generate(name)?;
        let server = ca.issue_server_cert(&[SERVER_NAME.to_owned(), "127.0.0.1".to_owned()])?;
        Ok(Fleet { ca, server })
    }

    fn server_config(&self) -> Result<ServerConfig, CertError> {
        server_config(&self.ca.cert_pem(), &self.server, Vec::new())
    }

    /// Enrolls an agent with this fleet's CA: (agent id, key, certificate PEM).
    fn enroll_agent(&self) -> Result<(Uuid, AgentKey, String), CertError> {
        let agent_id = Uuid::new_v4();
        let key = AgentKey::generate()?;
        let cert = self.ca.sign_agent_csr(&key.csr_pem(agent_id)?, agent_id, 30)?;
        Ok((agent_id, key, cert))
    }
}

fn peer_certs(conn: &ServerConnection) -> Vec<CertificateDer<'static>> {
    conn.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()).unwrap_or_default()
}

#[test]
fn agent_with_fleet_cert_completes_link_handshake_and_server_sees_its_id() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let (agent_id, key, cert) = fleet.enroll_agent()?;
    let client = client_config_link(&fleet.ca.cert_pem(), &cert, &key.key_pem())?;

    let hs = handshake(client, fleet.server_config()?, SERVER_NAME)?;
    assert!(hs.succeeded(), "client: {:?}, server: {:?}", hs.client_err, hs.server_err);
    assert_eq!(hs.server.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(hs.server.alpn_protocol(), Some(gaffer_protocol::ALPN_AGENT_LINK));
    assert_eq!(peer_agent_id(&peer_certs(&hs.server))?, agent_id);

    // The IP SAN works as a server name too.
    let client = client_config_link(&fleet.ca.cert_pem(), &cert, &key.key_pem())?;
    let hs = handshake(client, fleet.server_config()?, "127.0.0.1")?;
    assert!(hs.succeeded(), "{:?} {:?}", hs.client_err, hs.server_err);
    Ok(())
}

#[test]
fn agent_cert_from_another_ca_fails_the_handshake() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let rogue = Fleet::new("rogue")?;
    // Same agent id format, valid signature, but issued by another CA.
    let (_id, key, rogue_cert) = rogue.enroll_agent()?;
    let client = client_config_link(&fleet.ca.cert_pem(), &rogue_cert, &key.key_pem())?;

    let hs = handshake(client, fleet.server_config()?, SERVER_NAME)?;
    assert!(
        matches!(hs.server_err, Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))),
        "server error: {:?}",
        hs.server_err
    );
    assert!(hs.server.is_handshaking());
    // The agent learns it was refused (alert) rather than hanging.
    assert!(hs.client_err.is_some());
    Ok(())
}

#[test]
fn enrollment_with_right_fingerprint_completes_and_yields_the_ca() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let fp: CaFingerprint = fleet.ca.fingerprint().to_string().to_uppercase().parse()?;
    let hs = handshake(client_config_enroll(fp)?, fleet.server_config()?, SERVER_NAME)?;
    assert!(hs.succeeded(), "{:?} {:?}", hs.client_err, hs.server_err);
    assert_eq!(hs.server.alpn_protocol(), Some(gaffer_protocol::ALPN_ENROLL));
    // No client certificate: the control plane must not treat this as an agent.
    assert!(matches!(peer_agent_id(&peer_certs(&hs.server)), Err(CertError::NoAgentIdentity { .. })));
    // The agent takes the CA from the chain and it is the fleet's CA.
    let chain: Vec<CertificateDer<'static>> =
        hs.client.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()).unwrap_or_default();
    let ca_pem = enrolled_ca_pem(&chain, fp)?;
    assert_eq!(CaFingerprint::from_cert_pem(&ca_pem)?, fleet.ca.fingerprint());
    Ok(())
}

#[test]
fn enrollment_with_wrong_fingerprint_fails_with_fingerprint_mismatch() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let other = FleetCa::generate("other")?;
    let hs = handshake(client_config_enroll(other.fingerprint())?, fleet.server_config()?, SERVER_NAME)?;
    let err = hs.client_err.ok_or("client accepted the wrong CA")?;
    match tls_cert_error(&err) {
        Some(CertError::FingerprintMismatch { expected, got }) => {
            assert_eq!(*expected, other.fingerprint());
            assert_eq!(*got, fleet.ca.fingerprint());
        }
        e => panic!("expected FingerprintMismatch, got {e:?} from {err:?}"),
    }
    // quinn reports rustls errors by their Display: it must name both fingerprints.
    let shown = err.to_string();
    assert!(shown.contains(&other.fingerprint().to_string()), "{shown}");
    assert!(shown.contains(&fleet.ca.fingerprint().to_string()), "{shown}");
    assert!(hs.client.is_handshaking());
    Ok(())
}

#[test]
fn enrollment_rejects_a_server_cert_not_issued_by_the_presented_ca() -> TestResult {
    // An impostor appends the real fleet CA certificate to its own chain: the fingerprint matches,
    // but its server certificate does not chain to that CA.
    let fleet = Fleet::new("studio-a")?;
    let impostor = Fleet::new("impostor")?;
    let impostor_server = server_config(&fleet.ca.cert_pem(), &impostor.server, Vec::new())?;
    let hs = handshake(client_config_enroll(fleet.ca.fingerprint())?, impostor_server, SERVER_NAME)?;
    assert!(
        matches!(
            hs.client_err,
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature))
        ),
        "client error: {:?}",
        hs.client_err
    );
    Ok(())
}

#[test]
fn server_name_mismatch_fails_on_link_and_enrollment() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let (_id, key, cert) = fleet.enroll_agent()?;
    let is_name_error = |e: &Option<rustls::Error>| {
        matches!(
            e,
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        )
    };

    let link = client_config_link(&fleet.ca.cert_pem(), &cert, &key.key_pem())?;
    let hs = handshake(link, fleet.server_config()?, "elsewhere.gaffer.test")?;
    assert!(is_name_error(&hs.client_err), "{:?}", hs.client_err);

    let enroll = client_config_enroll(fleet.ca.fingerprint())?;
    let hs = handshake(enroll, fleet.server_config()?, "10.9.9.9")?;
    assert!(is_name_error(&hs.client_err), "{:?}", hs.client_err);
    Ok(())
}

#[test]
fn tls12_clients_are_refused() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(fleet.ca.cert_der().clone())?;
    let mut tls12 = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls12.alpn_protocols = vec![gaffer_protocol::ALPN_ENROLL.to_vec()];

    let hs = handshake(tls12, fleet.server_config()?, SERVER_NAME)?;
    assert!(!hs.succeeded());
    assert!(matches!(hs.server_err, Some(rustls::Error::PeerIncompatible(_))), "server error: {:?}", hs.server_err);
    assert!(hs.client_err.is_some());
    Ok(())
}

#[test]
fn unknown_alpn_is_refused() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let mut enroll = client_config_enroll(fleet.ca.fingerprint())?;
    enroll.alpn_protocols = vec![b"h3".to_vec()];
    let hs = handshake(enroll, fleet.server_config()?, SERVER_NAME)?;
    assert!(matches!(hs.server_err, Some(rustls::Error::NoApplicationProtocol)), "{:?}", hs.server_err);
    Ok(())
}

#[test]
fn revoked_agent_fails_the_handshake_and_others_still_connect() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let (_revoked_id, revoked_key, revoked_cert) = fleet.enroll_agent()?;
    let (good_id, good_key, good_cert) = fleet.enroll_agent()?;
    let crl_pem = fleet.ca.revocation_list_pem(
        &[RevokedCert { serial_hex: cert_serial_hex(revoked_cert.as_bytes())?, revoked_at_unix: 1_700_000_000 }],
        1,
    )?;
    let crls = FleetCa::crls_from_pem(&crl_pem)?;
    assert_eq!(crls.len(), 1);

    let server = server_config(&fleet.ca.cert_pem(), &fleet.server, crls.clone())?;
    let client = client_config_link(&fleet.ca.cert_pem(), &revoked_cert, &revoked_key.key_pem())?;
    let hs = handshake(client, server, SERVER_NAME)?;
    assert!(
        matches!(hs.server_err, Some(rustls::Error::InvalidCertificate(CertificateError::Revoked))),
        "{:?}",
        hs.server_err
    );

    let server = server_config(&fleet.ca.cert_pem(), &fleet.server, crls)?;
    let client = client_config_link(&fleet.ca.cert_pem(), &good_cert, &good_key.key_pem())?;
    let hs = handshake(client, server, SERVER_NAME)?;
    assert!(hs.succeeded(), "{:?} {:?}", hs.client_err, hs.server_err);
    assert_eq!(peer_agent_id(&peer_certs(&hs.server))?, good_id);
    Ok(())
}

#[test]
fn reloaded_ca_issues_certs_the_original_fleet_accepts() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let reloaded = FleetCa::from_pem(&fleet.ca.cert_pem(), &fleet.ca.key_pem())?;
    assert_eq!(reloaded.fingerprint(), fleet.ca.fingerprint());
    let agent_id = Uuid::new_v4();
    let key = AgentKey::from_pem(&AgentKey::generate()?.key_pem())?;
    let cert = reloaded.sign_agent_csr(&key.csr_pem(agent_id)?, agent_id, 1)?;
    assert_eq!(key.check_issued_cert(&cert)?, agent_id);

    let client = client_config_link(&fleet.ca.cert_pem(), &cert, &key.key_pem())?;
    let hs = handshake(client, fleet.server_config()?, SERVER_NAME)?;
    assert!(hs.succeeded(), "{:?} {:?}", hs.client_err, hs.server_err);

    // A key from another CA is refused.
    let other = FleetCa::generate("other")?;
    assert!(matches!(FleetCa::from_pem(&fleet.ca.cert_pem(), &other.key_pem()), Err(CertError::KeyMismatch { .. })));
    // A certificate issued for another key is refused by the agent.
    assert!(matches!(AgentKey::generate()?.check_issued_cert(&cert), Err(CertError::KeyMismatch { .. })));
    // A non-CA certificate cannot be loaded as the CA.
    let server_key = fleet.server.key_pem.clone();
    assert!(matches!(
        FleetCa::from_pem(&fleet.server.cert_pem, &server_key),
        Err(CertError::InvalidCertificate { .. })
    ));
    Ok(())
}

fn pem_to_der(pem_text: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    Ok(pem::parse(pem_text)?.into_contents())
}

#[test]
fn tampered_csr_is_refused() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let agent_id = Uuid::new_v4();
    let csr_pem = AgentKey::generate()?.csr_pem(agent_id)?;
    let der = pem_to_der(&csr_pem)?;

    // Change one character of the requested subject CN: the signature no longer covers the request.
    let needle = b"gaffer-agent";
    let at = der.windows(needle.len()).position(|w| w == needle).ok_or("CN not found in CSR")?;
    let mut subject_tampered = der.clone();
    subject_tampered[at] = b'G';
    // Flip a bit in the last byte, inside the signature value.
    let mut sig_tampered = der.clone();
    let last = sig_tampered.len() - 1;
    sig_tampered[last] ^= 0x01;

    for tampered in [subject_tampered, sig_tampered] {
        let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tampered));
        match fleet.ca.sign_agent_csr(&pem_text, agent_id, 30) {
            Err(CertError::InvalidCsr { .. }) => {}
            other => panic!("expected InvalidCsr, got {other:?}"),
        }
    }
    // Garbage and oversize input are typed errors too.
    assert!(matches!(fleet.ca.sign_agent_csr("not a csr", agent_id, 30), Err(CertError::InvalidCsr { .. })));
    assert!(matches!(fleet.ca.sign_agent_csr(&"A".repeat(100_000), agent_id, 30), Err(CertError::TooLarge { .. })));
    Ok(())
}

#[test]
fn sign_agent_csr_ignores_what_the_csr_asks_for() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let other_id = Uuid::new_v4();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()])?;
    params.subject_alt_names.push(rcgen::SanType::URI(format!("urn:gaffer:agent:{other_id}").try_into()?));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let agent_id = Uuid::new_v4();
    let cert_pem = fleet.ca.sign_agent_csr(&csr_pem, agent_id, 30)?;
    let der = pem_to_der(&cert_pem)?;
    assert_eq!(agent_id_from_cert_der(&der)?, agent_id);

    let (_, cert) = X509Certificate::from_der(&der)?;
    let sans = cert.subject_alternative_name()?.ok_or("no SAN extension")?.value.general_names.clone();
    let expected_uri = format!("urn:gaffer:agent:{agent_id}");
    assert!(matches!(sans.as_slice(), [GeneralName::URI(uri)] if *uri == expected_uri), "SANs: {sans:?}");
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage()?.ok_or("no EKU")?.value;
    assert!(eku.client_auth && !eku.server_auth);
    let cn = cert.subject().iter_common_name().next().ok_or("no CN")?.as_str()?;
    assert_eq!(cn, format!("gaffer-agent {agent_id}"));
    Ok(())
}

#[test]
fn csr_with_a_non_p256_key_is_refused() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let csr_pem = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    assert!(matches!(fleet.ca.sign_agent_csr(&csr_pem, Uuid::new_v4(), 30), Err(CertError::InvalidCsr { .. })));
    Ok(())
}

#[test]
fn validity_periods_follow_the_documented_defaults_and_limits() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let day = 86_400;

    let server_not_after = cert_not_after_unix(fleet.server.cert_pem.as_bytes())?;
    assert!((server_not_after - (now + 365 * day)).abs() < 120);
    let der = pem_to_der(&fleet.server.cert_pem)?;
    assert_eq!(cert_not_after_unix(&der)?, server_not_after);

    let ca_not_after = cert_not_after_unix(fleet.ca.cert_pem().as_bytes())?;
    assert!((ca_not_after - (now + 3650 * day)).abs() < 120);

    let (_id, _key, agent_cert) = fleet.enroll_agent()?;
    assert!((cert_not_after_unix(agent_cert.as_bytes())? - (now + 30 * day)).abs() < 120);

    let key = AgentKey::generate()?;
    let csr = key.csr_pem(Uuid::new_v4())?;
    for days in [0, 826] {
        assert!(matches!(fleet.ca.sign_agent_csr(&csr, Uuid::new_v4(), days), Err(CertError::InvalidValidity { .. })));
    }
    Ok(())
}

#[test]
fn bad_inputs_are_typed_errors() -> TestResult {
    let fleet = Fleet::new("studio-a")?;
    assert!(matches!(fleet.ca.issue_server_cert(&["bad name!".to_owned()]), Err(CertError::InvalidSan { .. })));
    assert!(matches!(fleet.ca.issue_server_cert(&[]), Err(CertError::InvalidSan { .. })));
    assert!(matches!(FleetCa::generate(""), Err(CertError::InvalidFleetName { .. })));
    assert!(matches!(FleetCa::generate("a\nb"), Err(CertError::InvalidFleetName { .. })));
    assert!(matches!(client_config_link("garbage", "garbage", "garbage"), Err(CertError::InvalidPem { .. })));
    assert!(matches!(AgentKey::from_pem(&fleet.ca.cert_pem()), Err(CertError::InvalidPem { .. })));
    assert!(matches!(peer_agent_id(&[]), Err(CertError::NoAgentIdentity { .. })));
    // The server certificate has no agent identity.
    let server_der = pem_to_der(&fleet.server.cert_pem)?;
    assert!(matches!(agent_id_from_cert_der(&server_der), Err(CertError::NoAgentIdentity { .. })));
    assert!(matches!(agent_id_from_cert_der(b"\x30\x03\x02\x01\x01"), Err(CertError::InvalidCertificate { .. })));
    // Debug output never contains private keys.
    let debug = format!("{:?} {:?}", fleet.ca, fleet.server);
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");
    Ok(())
}

#[test]
fn configs_are_accepted_by_quinn() -> TestResult {
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    let fleet = Fleet::new("studio-a")?;
    let (_id, key, cert) = fleet.enroll_agent()?;
    QuicServerConfig::try_from(fleet.server_config()?)?;
    QuicClientConfig::try_from(client_config_link(&fleet.ca.cert_pem(), &cert, &key.key_pem())?)?;
    QuicClientConfig::try_from(client_config_enroll(fleet.ca.fingerprint())?)?;
    Ok(())
}
