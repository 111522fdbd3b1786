//! Admission control seen from the real binaries: `gaffer-control serve --enroll-connections-max 1`
//! with its one enrollment place held by an idle QUIC connection (opened here as a stranger
//! would); `gaffer-agent enroll` is turned away with "control plane busy, retry" and a non-zero
//! exit, enrolls once the place is free, and the refusal is counted in `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use gaffer_certs::CaFingerprint;
use gaffer_tests::{wait_for, Agent, ControlPlane, ControlPlaneOptions};

/// A generous bound for the control plane to count something.
const REACTION_BOUND: std::time::Duration = std::time::Duration::from_secs(10);

#[test]
fn enroll_is_told_the_control_plane_is_busy_over_the_enrollment_cap() -> anyhow::Result<()> {
    let cp = ControlPlane::start_with(ControlPlaneOptions {
        serve_args: vec!["--enroll-connections-max".into(), "1".into()],
        ..ControlPlaneOptions::default()
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    // The stranger: an enrollment connection (checked by the CA fingerprint, as an agent would)
    // that never sends its request.
    let fingerprint: CaFingerprint = cp.ca_fingerprint.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let addr: SocketAddr = cp.quic_addr.parse().context("the control plane's QUIC address")?;
    let idle = rt.block_on(async {
        let tls = gaffer_certs::client_config_enroll(fingerprint)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint.connect(addr, "localhost")?.await?;
        anyhow::Ok((endpoint, conn))
    })?;
    wait_for(REACTION_BOUND, "the idle enrollment connection to take the place", || {
        Ok((cp.metric("gaffer_enroll_connections_open")? == 1.0).then_some(()))
    })?;

    let token = cp.token("stage-a", "10m")?;
    let token = token["token"].as_str().context("token")?;
    let dir = tempfile::tempdir()?;
    let busy = Agent::enroll_raw(&dir.path().join("agent"), &cp.quic_addr, token, &cp.ca_fingerprint, None)?;
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "enrolled over the cap: {stderr}");
    assert!(stderr.contains("control plane busy, retry"), "{stderr}");
    assert_eq!(cp.metric("gaffer_admission_refused_total{reason=\"enroll_connections\"}")?, 1.0);

    // The stranger goes; the same token (not spent by the refused attempt) enrolls.
    idle.1.close(0u32.into(), b"bye");
    wait_for(REACTION_BOUND, "the enrollment place to be free", || {
        Ok((cp.metric("gaffer_enroll_connections_open")? == 0.0).then_some(()))
    })?;
    let ok = Agent::enroll_raw(&dir.path().join("agent"), &cp.quic_addr, token, &cp.ca_fingerprint, None)?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    drop(idle);
    Ok(())
}
