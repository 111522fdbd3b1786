//! The OpenAPI description against a live control plane: schemathesis (pinned in
//! tests/python/requirements.txt, run from `$GAFFER_TEST_PYTHON`, which scripts/test-tools.sh
//! exports) generates requests for every operation of `GET /api/v1/openapi.json` — valid and
//! invalid parameters and bodies, missing and wrong credentials, unsupported methods — and runs
//! every check (`--checks all`): no 5xx, every status and body as documented, invalid input
//! refused, valid input accepted (with the allowances in tests/schemathesis.toml).
//!
//! The control plane has real data first: an agent that analyzed a sample clip (so agents, health
//! and a digest are in the answers), a cancelled job and audit entries. Runs take
//! [`MAX_EXAMPLES`] cases per operation (well under 2 minutes); the seed is printed and can be
//! fixed with `GAFFER_SCHEMATHESIS_SEED` to replay a failure. The report (JUnit XML) is written
//! under `$CARGO_TARGET_TMPDIR/schemathesis/`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use gaffer_tests::{media, media_dir, Agent, ControlPlane};
use serde_json::json;

/// Generated cases per API operation.
const MAX_EXAMPLES: u32 = 40;

#[test]
fn schemathesis_finds_no_server_error_and_no_response_off_the_description() -> Result<()> {
    let python = std::env::var_os("GAFFER_TEST_PYTHON")
        .map(PathBuf::from)
        .context("GAFFER_TEST_PYTHON is unset: source scripts/test-tools.sh (it makes the pinned venv)")?;
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    let done = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let job = cp.wait_job(&done, &["succeeded"], Duration::from_secs(120))?;
    assert!(job["digest"]["shots"]["shots"].as_array().is_some_and(|s| !s.is_empty()), "no shots in {job}");
    let waiting = cp.submit_job(&media("bikes.mp4"), "nowhere")?;
    let (status, _) = cp.api_post(&format!("/jobs/{waiting}/cancel"), &json!({}))?;
    assert_eq!(status, 200);

    let seed: u64 = match std::env::var("GAFFER_SCHEMATHESIS_SEED") {
        Ok(s) => s.parse().context("GAFFER_SCHEMATHESIS_SEED must be a whole number")?,
        Err(_) => rand::random::<u32>().into(),
    };
    let report_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    std::fs::create_dir_all(&report_dir)?;
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemathesis.toml");
    let out = Command::new(&python)
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(&config)
        .arg("run")
        .arg(format!("{}/api/v1/openapi.json", cp.http_url))
        .args(["--checks", "all", "--max-examples", &MAX_EXAMPLES.to_string(), "--seed", &seed.to_string()])
        // One worker: CPython 3.11's AST module, which Hypothesis uses to describe strategies, is
        // not safe across threads ("AST constructor recursion depth mismatch").
        .args(["--workers", "1", "--request-timeout", "30", "--no-color", "--report", "junit", "--report-dir"])
        .arg(&report_dir)
        .args(["--header", &format!("Authorization: Bearer {}", cp.api_token)])
        .output()
        .with_context(|| format!("running {} -m schemathesis.cli", python.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "schemathesis failed ({}; seed {seed}: GAFFER_SCHEMATHESIS_SEED={seed} replays it):\n{stdout}\n{}\ncontrol plane log (tail):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            tail(&cp.log(), 4000)
        );
    }
    // It tested every operation of the description, and the control plane is still serving.
    let count = |label: &str| -> Option<String> {
        stdout.lines().find_map(|l| l.trim().strip_prefix(label)).map(|v| v.trim().to_owned())
    };
    let selected = count("Selected:").context("no 'Selected:' line in the summary")?;
    let operations = selected.rsplit('/').next().unwrap_or_default().to_owned();
    assert_eq!(count("Tested:"), Some(operations.clone()), "not every operation was tested:\n{stdout}");
    assert!(operations.parse::<u32>().is_ok_and(|n| n >= 9), "only {operations} operations:\n{stdout}");
    assert!(!cp.log().contains("panicked"), "the control plane panicked:\n{}", cp.log());
    assert_eq!(cp.api_get(&format!("/jobs/{done}"))?["state"], "succeeded");
    println!("schemathesis passed (seed {seed}); report in {}", report_dir.display());
    Ok(())
}

fn tail(s: &str, bytes: usize) -> &str {
    let mut start = s.len().saturating_sub(bytes);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
