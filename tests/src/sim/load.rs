//! The load: job submissions through the REST API (`POST /api/v1/jobs`), open loop and evenly
//! paced or as fast as the API accepts, and the sampler that times `GET /api/v1/agents` and the
//! dashboard's fleet page while it runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use super::stats::{ms, Stats};

/// Timeout of one HTTP request, seconds (the control plane's own request timeout is 30 s).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the sampler times the agents API and the fleet page.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// The control plane's HTTP side as the simulator uses it.
#[derive(Clone)]
pub struct Api {
    /// Shared connection pool.
    pub client: reqwest::Client,
    /// `http://HOST:PORT` (no trailing slash).
    pub base: String,
    /// Operator bearer token minted for this run (secret).
    pub token: String,
}

/// How jobs are submitted.
#[derive(Debug, Clone)]
pub struct SubmitPlan {
    /// Jobs per second, evenly paced; 0: as fast as `submitters` clients get answers.
    pub jobs_per_sec: f64,
    /// Stop after this many jobs (None: only the duration stops it).
    pub jobs_total: Option<usize>,
    /// Stop submitting after this long.
    pub duration: Duration,
    /// Concurrent HTTP clients.
    pub submitters: usize,
    /// `site` of every job.
    pub site: String,
    /// `profile` of every job.
    pub profile: String,
}

/// What the submitters saw, besides the job book in [`Stats`].
#[derive(Debug, Default)]
pub struct SubmitOutcome {
    /// POST round trips, milliseconds.
    pub post_ms: Vec<f64>,
    /// How late each paced POST left after its slot, milliseconds (empty when unpaced).
    pub lag_ms: Vec<f64>,
    /// POSTs not answered with 201.
    pub errors: usize,
    /// The first of those, with its status and body.
    pub first_error: Option<String>,
}

/// Submits jobs by `plan` with `plan.submitters` concurrent clients; every 201's job id goes to
/// `stats` with the instant its POST was sent. Paths are `/sim/clip-NNNNNN.mov`, numbered from 0.
pub async fn submit_jobs(api: &Api, plan: &SubmitPlan, stats: &Arc<Stats>) -> SubmitOutcome {
    let outcome = Arc::new(Mutex::new(SubmitOutcome::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let end = start + plan.duration;
    let limit = plan.jobs_total.unwrap_or(usize::MAX);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.submitters.max(1) {
        let (api, plan, stats, outcome, next) =
            (api.clone(), plan.clone(), stats.clone(), outcome.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                // Ticket i is due at start + i / rate (paced) or now (unpaced).
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    return;
                }
                let due = if plan.jobs_per_sec > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / plan.jobs_per_sec);
                    if due >= end {
                        return;
                    }
                    tokio::time::sleep_until(due).await;
                    Some(due)
                } else {
                    if tokio::time::Instant::now() >= end {
                        return;
                    }
                    None
                };
                let sent = Instant::now();
                let result = submit_one(&api, &plan, i).await;
                let post_ms = ms(sent.elapsed());
                let mut out = outcome.lock().unwrap_or_else(|p| p.into_inner());
                out.post_ms.push(post_ms);
                if let Some(due) = due {
                    out.lag_ms.push(ms(sent.saturating_duration_since(due.into_std())));
                }
                match result {
                    Ok(id) => {
                        drop(out);
                        stats.on_submitted(id, sent);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(outcome).map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).unwrap_or_default()
}

async fn submit_one(api: &Api, plan: &SubmitPlan, i: usize) -> anyhow::Result<uuid::Uuid> {
    let body =
        serde_json::json!({ "path": format!("/sim/clip-{i:06}.mov"), "site": plan.site, "profile": plan.profile });
    let resp = api.client.post(format!("{}/api/v1/jobs", api.base)).bearer_auth(&api.token).json(&body).send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    if status != reqwest::StatusCode::CREATED {
        anyhow::bail!("POST /api/v1/jobs: {status}: {}", text.chars().take(300).collect::<String>());
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("POST /api/v1/jobs answered {text:?}"))?;
    v["id"].as_str().and_then(|s| s.parse().ok()).with_context(|| format!("no job id in {text:?}"))
}

/// What the sampler measured.
#[derive(Debug, Default)]
pub struct Samples {
    /// `GET /api/v1/agents` round trips (whole body read), milliseconds.
    pub api_agents_ms: Vec<f64>,
    /// `GET /` (the fleet page, logged in) round trips, milliseconds.
    pub fleet_page_ms: Vec<f64>,
    /// Most agents the API reported online in one answer.
    pub api_agents_online_max: usize,
    /// Answers that were not 200, or unreadable.
    pub errors: usize,
    /// The first of those.
    pub first_error: Option<String>,
    /// Control-plane resident memory, bytes, per sample (when its pid is known).
    pub control_rss_bytes: Vec<u64>,
}

/// Times `GET /api/v1/agents` and `GET /` (with the dashboard `session` cookie) every
/// [`SAMPLE_INTERVAL`] until `stop` turns true, and samples the control plane's RSS.
pub async fn sample(
    api: Api,
    session_cookie: String,
    control_pid: Option<u32>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Samples {
    let mut samples = Samples::default();
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return samples,
        }
        if *stop.borrow() {
            return samples;
        }
        let agents = api.client.get(format!("{}/api/v1/agents", api.base)).bearer_auth(&api.token);
        match timed(agents).await {
            Ok((took_ms, body)) => {
                samples.api_agents_ms.push(took_ms);
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => samples.api_agents_online_max = samples.api_agents_online_max.max(agents_online(&v)),
                    Err(e) => note(&mut samples, format!("GET /api/v1/agents is not JSON: {e}")),
                }
            }
            Err(e) => note(&mut samples, format!("GET /api/v1/agents: {e:#}")),
        }
        let page = api.client.get(format!("{}/", api.base)).header(reqwest::header::COOKIE, &session_cookie);
        match timed(page).await {
            Ok((took_ms, _)) => samples.fleet_page_ms.push(took_ms),
            Err(e) => note(&mut samples, format!("GET / (fleet page): {e:#}")),
        }
        if let Some(rss) = control_pid.and_then(super::stats::rss_bytes) {
            samples.control_rss_bytes.push(rss);
        }
    }
}

fn note(samples: &mut Samples, error: String) {
    samples.errors += 1;
    samples.first_error.get_or_insert(error);
}

/// Sends `req` and reads the whole body; returns the round trip in milliseconds and the body of
/// a 200 answer.
async fn timed(req: reqwest::RequestBuilder) -> anyhow::Result<(f64, Vec<u8>)> {
    let sent = Instant::now();
    let resp = req.send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    let took_ms = ms(sent.elapsed());
    anyhow::ensure!(status == reqwest::StatusCode::OK, "{status}");
    Ok((took_ms, body.to_vec()))
}

/// How many agents a `GET /api/v1/agents` answer reports online: its `counts.online` when it has
/// counts (the paged shape `{agents, counts, next_cursor}`), else the listed agents with
/// `online: true` (a bare array, or the `agents` of the paged shape).
pub fn agents_online(v: &Value) -> usize {
    if let Some(n) = v.pointer("/counts/online").and_then(Value::as_u64) {
        return n as usize;
    }
    let list = v.as_array().or_else(|| v.get("agents").and_then(Value::as_array));
    list.map_or(0, |agents| agents.iter().filter(|a| a["online"] == true).count())
}

/// Logs in to the dashboard through the real form (login CSRF cookie and hidden field) and
/// returns the `Cookie` header value carrying the session.
///
/// # Errors
/// When the form or the login fails (wrong password, throttled).
pub async fn login(client: &reqwest::Client, base: &str, user: &str, password: &str) -> anyhow::Result<String> {
    let form = client.get(format!("{base}/login")).send().await?;
    let csrf = crate::cookie_in(form.headers(), gaffer_control::http::LOGIN_CSRF_COOKIE)
        .context("the login form sets no CSRF cookie")?;
    let resp = client
        .post(format!("{base}/login"))
        .header(reqwest::header::COOKIE, format!("{}={csrf}", gaffer_control::http::LOGIN_CSRF_COOKIE))
        .form(&[("csrf", csrf.as_str()), ("user", user), ("password", password)])
        .send()
        .await?;
    let session = crate::cookie_in(resp.headers(), gaffer_control::http::SESSION_COOKIE)
        .with_context(|| format!("logging in as {user} set no session cookie ({})", resp.status()))?;
    Ok(format!("{}={session}", gaffer_control::http::SESSION_COOKIE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_agents_in_either_answer_shape() {
        let bare = serde_json::json!([{ "online": true }, { "online": false }, { "online": true }]);
        assert_eq!(agents_online(&bare), 2);
        let paged =
            serde_json::json!({ "agents": [{ "online": true }], "counts": { "online": 500 }, "next_cursor": "x" });
        assert_eq!(agents_online(&paged), 500);
        let paged_without_counts = serde_json::json!({ "agents": [{ "online": true }, { "online": true }] });
        assert_eq!(agents_online(&paged_without_counts), 2);
    }
}
