//! The self-update decisions at start (`gaffer_agent::update`): which binary runs after a crash, a
//! rollback, a confirmation or a package upgrade, decided from `update.json` alone. The real
//! re-exec, watcher and rollback run end to end in tests/tests/rollout.rs.

use std::path::{Path, PathBuf};

use gaffer_agent::datadir::DataDir;
use gaffer_agent::outbox::Outbox;
use gaffer_agent::update::{self, Installed, StartDecision, Trial, UpdateState};
use gaffer_protocol::messages::{AgentMessage, UpdateOrder, UpdateOutcome};

fn order(version: &str) -> UpdateOrder {
    UpdateOrder {
        rollout_id: 7,
        version: version.to_owned(),
        file_name: format!("gaffer-agent-{version}-x86_64-linux.tar.gz"),
        size_bytes: 1,
        sha256: "00".repeat(32),
        health_wait_secs: 60,
    }
}

/// An executable file standing in for an installed version.
fn exe(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b"#!/bin/sh\n").unwrap_or_else(|e| panic!("{e}"));
    p
}

fn trial(dir: &Path, version: &str, fallback: &str, pid: u32) -> Trial {
    Trial {
        order: order(version),
        exe: exe(dir, &format!("agent-{version}")),
        fallback: Installed { version: fallback.to_owned(), exe: exe(dir, &format!("agent-{fallback}")) },
        args: vec!["run".into()],
        pid,
        started_at_ms: 1_000,
    }
}

#[test]
fn no_state_file_runs_the_started_binary() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    assert!(matches!(update::at_start(&dd, "1.0.0", 42, 5_000)?, StartDecision::Run { trial: None }));
    Ok(())
}

#[test]
fn an_unreadable_state_file_is_an_error_the_caller_runs_through() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    std::fs::write(UpdateState::path(&dd), b"{ not json")?;
    let err = update::at_start(&dd, "1.0.0", 42, 5_000).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("update.json"), "{err}");
    Ok(())
}

#[test]
fn the_trial_process_itself_runs_as_the_trial() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let t = trial(tmp.path(), "2.0.0", "1.0.0", 42);
    UpdateState { trial: Some(t.clone()), ..UpdateState::default() }.save(&dd)?;
    match update::at_start(&dd, "2.0.0", 42, 5_000)? {
        StartDecision::Run { trial: Some(got) } => assert_eq!(got, t),
        other => panic!("expected the trial to run, got {other:?}"),
    }
    // Nothing changed on disk.
    assert_eq!(UpdateState::load(&dd)?.trial, Some(t));
    Ok(())
}

/// A start under another pid while a trial is recorded: the trial died (systemd or the watcher
/// started the agent again). Rolled back: the fallback is selected and re-executed, and the failure
/// waits in update.json for the outbox.
#[test]
fn a_start_under_another_pid_rolls_the_dead_trial_back() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let t = trial(tmp.path(), "2.0.0", "1.5.0", 42);
    UpdateState { trial: Some(t.clone()), ..UpdateState::default() }.save(&dd)?;
    // The packaged 1.0.0 binary is what systemd starts.
    match update::at_start(&dd, "1.0.0", 99, 31_000)? {
        StartDecision::Exec { exe, .. } => assert_eq!(exe, t.fallback.exe),
        other => panic!("expected a re-exec into the fallback, got {other:?}"),
    }
    let st = UpdateState::load(&dd)?;
    assert_eq!(st.trial, None);
    assert_eq!(st.current, Some(t.fallback.clone()));
    assert_eq!(st.reports.len(), 1);
    match &st.reports[0].outcome {
        UpdateOutcome::Failed { reason, rolled_back, running_version } => {
            assert!(*rolled_back);
            assert_eq!(running_version, "1.5.0");
            assert!(reason.contains("stopped 30 s after it was started"), "{reason}");
        }
        other => panic!("expected a failure report, got {other:?}"),
    }
    // The fallback itself starting next runs (no loop).
    assert!(matches!(update::at_start(&dd, "1.5.0", 99, 32_000)?, StartDecision::Run { trial: None }));
    Ok(())
}

#[test]
fn the_trial_version_restarted_under_a_new_pid_is_rolled_back_too() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let t = trial(tmp.path(), "2.0.0", "1.5.0", 42);
    UpdateState { trial: Some(t.clone()), ..UpdateState::default() }.save(&dd)?;
    assert!(matches!(update::at_start(&dd, "2.0.0", 43, 5_000)?, StartDecision::Exec { .. }));
    assert_eq!(UpdateState::load(&dd)?.current, Some(t.fallback));
    Ok(())
}

#[test]
fn the_selected_version_is_re_executed_unless_the_started_one_is_newer() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let selected = Installed { version: "2.0.0".into(), exe: exe(tmp.path(), "agent-2.0.0") };
    UpdateState { current: Some(selected.clone()), ..UpdateState::default() }.save(&dd)?;
    // An older packaged binary hands over to the selected version.
    match update::at_start(&dd, "1.0.0", 42, 5_000)? {
        StartDecision::Exec { exe, .. } => assert_eq!(exe, selected.exe),
        other => panic!("expected a re-exec into 2.0.0, got {other:?}"),
    }
    // The selected version runs itself.
    assert!(matches!(update::at_start(&dd, "2.0.0", 42, 5_000)?, StartDecision::Run { trial: None }));
    // A package upgrade to 3.0.0 wins and becomes the selection; 2.0.0 is kept as previous.
    assert!(matches!(update::at_start(&dd, "3.0.0", 42, 5_000)?, StartDecision::Run { trial: None }));
    let st = UpdateState::load(&dd)?;
    assert_eq!(st.current.map(|c| c.version), Some("3.0.0".to_owned()));
    assert_eq!(st.previous, Some(selected));
    Ok(())
}

#[test]
fn a_selected_binary_that_is_gone_leaves_the_started_one_running() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let gone = Installed { version: "2.0.0".into(), exe: tmp.path().join("nowhere/gaffer-agent") };
    UpdateState { current: Some(gone), ..UpdateState::default() }.save(&dd)?;
    assert!(matches!(update::at_start(&dd, "1.0.0", 42, 5_000)?, StartDecision::Run { trial: None }));
    Ok(())
}

#[test]
fn confirming_selects_the_new_version_and_failing_the_fallback() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let t = trial(tmp.path(), "2.0.0", "1.0.0", 42);
    UpdateState { trial: Some(t.clone()), ..UpdateState::default() }.save(&dd)?;
    update::confirm_trial(&dd, &t)?;
    let st = UpdateState::load(&dd)?;
    assert_eq!(st.trial, None);
    assert_eq!(st.current, Some(Installed { version: "2.0.0".into(), exe: t.exe.clone() }));
    assert_eq!(st.previous, Some(t.fallback.clone()));

    let t2 = trial(tmp.path(), "3.0.0", "2.0.0", 42);
    UpdateState { trial: Some(t2.clone()), ..st }.save(&dd)?;
    let back = update::fail_trial(&dd, &t2, "self-test: the built-in clip has 1 cut, this build found 0")?;
    assert_eq!(back, t2.fallback.exe);
    let st = UpdateState::load(&dd)?;
    assert_eq!(st.current, Some(t2.fallback));
    assert_eq!(st.trial, None);
    assert!(matches!(&st.reports[0].outcome, UpdateOutcome::Failed { reason, .. } if reason.contains("self-test")));
    // Remembered: the same order again is answered with this failure, not tried again; another
    // rollout of the same version is a new try.
    assert!(st.failure_of(&t2.order).is_some_and(|f| f.rolled_back && f.reason.contains("self-test")));
    assert!(st.failure_of(&UpdateOrder { rollout_id: 8, ..t2.order.clone() }).is_none());
    Ok(())
}

#[test]
fn pending_reports_move_into_the_outbox_once() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dd = DataDir::new(tmp.path());
    let t = trial(tmp.path(), "2.0.0", "1.0.0", 42);
    UpdateState { trial: Some(t.clone()), ..UpdateState::default() }.save(&dd)?;
    update::fail_trial(&dd, &t, "crashed")?;
    let db = sled::Config::new().path(tmp.path().join("state")).open()?;
    let outbox = Outbox::open(&db)?;
    assert_eq!(update::flush_reports(&dd, &outbox)?, 1);
    assert_eq!(update::flush_reports(&dd, &outbox)?, 0);
    let pending = outbox.pending_after(0, 10)?;
    assert_eq!(pending.len(), 1);
    assert!(matches!(&pending[0].1, AgentMessage::UpdateReport(r) if r.version == "2.0.0"));
    Ok(())
}

#[test]
fn the_self_test_finds_the_built_in_clips_cut() -> anyhow::Result<()> {
    gaffer_agent::analysis::init_ffmpeg()?;
    let tmp = tempfile::tempdir()?;
    update::self_test(&DataDir::new(tmp.path()), None).map_err(anyhow::Error::msg)?;
    Ok(())
}
