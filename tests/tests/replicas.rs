//! Two control-plane replicas on one real PostgreSQL: three real agents that know both addresses,
//! 30 real `shots` jobs submitted to either replica, and one replica SIGKILLed mid-run. Every job
//! must succeed exactly once (one attempt, one digest) and the dead replica's agents must be
//! linked to the other one within 10 s.
//!
//! The orderings are drawn from a seed (printed; `GAFFER_TEST_SEED=N` replays one): which replica
//! each agent prefers, which replica each job is submitted to, and when the kill comes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gaffer_tests::{bin, media, wait_for, Agent, ControlPlane, ControlPlaneOptions};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// A second `serve` on a copy of a control plane's data directory (keys, config, store.url).
struct Replica {
    dir: tempfile::TempDir,
    child: Option<Child>,
    quic_addr: String,
    http_url: String,
    api_token: String,
}

impl Replica {
    fn of(cp: &ControlPlane) -> anyhow::Result<Replica> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("control");
        std::fs::create_dir(&data)?;
        for entry in std::fs::read_dir(cp.data_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            // The keys, the config and store.url; not the socket, serve.json or sled leftovers.
            if entry.file_type()?.is_file() && !matches!(name.to_str(), Some("serve.json")) {
                std::fs::copy(entry.path(), data.join(&name))?;
            }
        }
        let log = std::fs::File::create(dir.path().join("control.log"))?;
        let child = Command::new(bin("gaffer-control"))
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--lease-grace-secs", "30", "--idle-timeout-secs", "3", "--heartbeat-interval-secs", "1"])
            .env("GAFFER_LOG", "info,gaffer_control=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut r = Replica {
            dir,
            child: Some(child),
            quic_addr: String::new(),
            http_url: String::new(),
            api_token: cp.api_token.clone(),
        };
        let serve_json = data.join("serve.json");
        let info: Value = wait_for(Duration::from_secs(30), "the replica's serve.json", || {
            Ok(std::fs::read(&serve_json).ok().and_then(|b| serde_json::from_slice(&b).ok()))
        })
        .with_context(|| format!("replica did not start; log:\n{}", r.log()))?;
        r.quic_addr = info["quic_addr"].as_str().unwrap_or_default().to_owned();
        r.http_url = format!("http://{}", info["http_addr"].as_str().unwrap_or_default());
        Ok(r)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One replica's HTTP side, whichever kind it is.
#[derive(Clone)]
struct Api {
    http_url: String,
    token: String,
}

impl Api {
    fn client() -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default()
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = Self::client().get(format!("{}/api/v1{path}", self.http_url)).bearer_auth(&self.token).send()?;
        let status = resp.status();
        let body: Value = resp.json()?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    fn submit(&self, path: &Path, site: &str) -> anyhow::Result<String> {
        let body = serde_json::json!({ "path": path, "site": site, "profile": "shots" });
        let resp = Self::client()
            .post(format!("{}/api/v1/jobs", self.http_url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()?;
        let status = resp.status();
        let v: Value = resp.json()?;
        if !status.is_success() {
            bail!("POST /jobs on {}: {status}: {v}", self.http_url);
        }
        v["id"].as_str().map(str::to_owned).context("no job id")
    }

    /// `gaffer_agent_links_open` on this replica: the agent links its endpoint holds now.
    fn links_open(&self) -> anyhow::Result<f64> {
        let text = Self::client().get(format!("{}/metrics", self.http_url)).send()?.text()?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("gaffer_agent_links_open").and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0.0))
    }
}

const JOBS: usize = 30;
const SITE: &str = "stage-r";

#[test]
fn a_replica_killed_mid_run_loses_no_job_and_its_agents_move_to_the_other() -> anyhow::Result<()> {
    let seed = std::env::var("GAFFER_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (GAFFER_TEST_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let db = gaffer_tests::pg::test_database()?;
    let a = ControlPlane::start_with(ControlPlaneOptions {
        lease_grace_secs: 30,
        idle_timeout_secs: 3,
        heartbeat_interval_secs: 1,
        init_args: vec!["--store".into(), db.url().to_owned()],
        ..ControlPlaneOptions::default()
    })?;
    let b = Replica::of(&a)?;
    let apis = [
        Api { http_url: a.http_url.clone(), token: a.api_token.clone() },
        Api { http_url: b.http_url.clone(), token: b.api_token.clone() },
    ];
    // Both replicas answer for the same fleet: a login made on one works on the other's API.
    apis[1].get("/jobs?limit=1").context("the replica serves the shared store's API")?;

    // Three agents; each prefers a replica drawn by the seed, at least one prefers A (the one
    // that dies) so the failover is exercised.
    let media_file = media("bikes.mp4");
    let volume: PathBuf = media_file.parent().context("media dir")?.to_path_buf();
    let mut prefers_a = [rng.gen_bool(0.5), rng.gen_bool(0.5), rng.gen_bool(0.5)];
    prefers_a[rng.gen_range(0..3)] = true;
    let mut agents = Vec::new();
    for prefer_a in prefers_a {
        let mut agent = Agent::enroll(&a, SITE)?;
        let (first, second) = if prefer_a { (&a.quic_addr, &b.quic_addr) } else { (&b.quic_addr, &a.quic_addr) };
        agent.run_args(std::slice::from_ref(&volume), &[], 2, &["--control", first, "--control", second])?;
        agents.push(agent);
    }
    let on_a = prefers_a.iter().filter(|p| **p).count();
    wait_for(Duration::from_secs(60), "every agent linked to its preferred replica", || {
        Ok((apis[0].links_open()? as usize == on_a && apis[1].links_open()? as usize == 3 - on_a).then_some(()))
    })?;

    // Jobs go to either replica; A dies after a drawn number of them has been submitted, while
    // jobs are running.
    let kill_after = rng.gen_range(6..=15);
    let mut ids = Vec::new();
    let mut a = Some(a);
    let mut killed_at = None;
    for n in 0..JOBS {
        let api = if killed_at.is_some() { &apis[1] } else { &apis[rng.gen_range(0..2)] };
        ids.push(api.submit(&media_file, SITE)?);
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        if n + 1 == kill_after {
            let running = wait_for(Duration::from_secs(30), "a job running before the kill", || {
                let jobs = apis[0].get("/jobs?limit=100")?;
                Ok(jobs.as_array().is_some_and(|js| js.iter().any(|j| j["state"] == "running")).then_some(()))
            });
            running?;
            if let Some(mut cp) = a.take() {
                cp.kill();
                killed_at = Some(Instant::now());
                eprintln!("replica A SIGKILLed after {kill_after} jobs");
                // Keep its temp dir (and log) until the end.
                a = Some(cp);
            }
        }
    }
    let killed_at = killed_at.context("A was killed")?;
    let moved = wait_for(Duration::from_secs(30), "all three agents linked to replica B", || {
        Ok((apis[1].links_open()? as usize == 3).then(|| killed_at.elapsed()))
    })
    .with_context(|| format!("replica B log:\n{}", b.log()))?;
    eprintln!("agents back on replica B {:.1} s after the kill", moved.as_secs_f64());
    assert!(moved <= Duration::from_secs(10), "agents took {moved:?} to move to replica B (bound: 10 s)");

    // Every job succeeds, once.
    for id in &ids {
        let job = wait_for(Duration::from_secs(180), &format!("job {id} finished"), || {
            let job = apis[1].get(&format!("/jobs/{id}"))?;
            Ok(matches!(job["state"].as_str(), Some("succeeded" | "failed" | "cancelled")).then_some(job))
        })
        .with_context(|| format!("replica B log:\n{}", b.log()))?;
        assert_eq!(job["state"], "succeeded", "job {id}: {job}");
        assert_eq!(job["attempts"], 1, "job {id} ran more than once: {job}");
        assert!(job["digest"].is_object(), "job {id} has its digest: {job}");
    }
    // Nothing else ran: the database holds exactly these jobs, each succeeded once.
    let counts = db.psql("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")?;
    eprintln!("jobs by state in PostgreSQL:\n{counts}");
    let total: usize = apis[1].get(&format!("/jobs?limit={}", JOBS * 2))?.as_array().map_or(0, Vec::len);
    assert_eq!(total, JOBS, "exactly the submitted jobs exist");
    drop(a);
    Ok(())
}
