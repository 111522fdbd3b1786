//! The real router over a real `SledStore` in a temp dir, driven with `oneshot` requests.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use argon2::password_hash::SaltString;
use argon2::{Argon2, PasswordHasher};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use gaffer_control::scheduler::{JobRequest, SchedulerConfig};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    AgentRecord, AgentState, ApiTokenRecord, HealthSample, JobOrigin, JobRecord, JobState, Priority, Role, Store,
    UserRecord,
};
use gaffer_control::{http::router, AppState};
use gaffer_protocol::digest::{
    AnalyzerInfo, Cut, Digest, Keyframe, Shot, ShotAnalysis, SourceInfo, StreamInfo, StreamKind, TechnicalMetadata,
};
use gaffer_protocol::health::{Health, HealthSource};
use gaffer_protocol::messages::{Capabilities, Profile};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;
use uuid::Uuid;

const PASSWORD: &str = "correct horse battery staple";
const API_TOKEN: &str = "gfa_0123456789abcdefghijklmnopqrstuvwxyz";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    state: AppState,
    agent_id: Uuid,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(&dir.path().join("db"))?);
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let phc = Argon2::default().hash_password(PASSWORD.as_bytes(), &salt).map_err(|e| anyhow!("{e}"))?.to_string();
        assert!(store.insert_user(&UserRecord {
            name: "admin".into(),
            role: Role::Admin,
            password_phc: phc,
            created_at_ms: 1,
            password_changed_at_ms: 1,
        })?);
        assert!(store.create_api_token(&ApiTokenRecord {
            hash: Sha256::digest(API_TOKEN.as_bytes()).into(),
            name: "test-admin".into(),
            role: Role::Admin,
            created_at_ms: 1,
            expires_at_ms: u64::MAX,
            last_used_at_ms: None,
            created_by: "test".into(),
        })?);
        let agent_id = Uuid::new_v4();
        store.insert_agent(&AgentRecord {
            cert_not_after_unix: 1_800_000_000,
            agent_version: Some("0.1.0".into()),
            capabilities: Some(Capabilities {
                gpus: vec![],
                volumes: vec!["/mnt/media".into()],
                watch_roots: vec!["/mnt/media/incoming".into()],
                job_slots: 2,
                profiles: vec![Profile::Shots],
                models: vec![gaffer_protocol::messages::ModelRef {
                    name: "silero-vad".into(),
                    version: "6.2.3".into(),
                    sha256: "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3".into(),
                }],
            }),
            connected: true,
            last_seen_ms: Some(gaffer_control::now_ms()),
            ..AgentRecord::new(agent_id, "stage-a", "gpu-box-07", 1_700_000_000_000)
        })?;
        for i in 0..3u64 {
            store.push_health(
                agent_id,
                &HealthSample {
                    received_at_ms: gaffer_control::now_ms() + i,
                    health: Health {
                        sampled_at_unix_ms: 0,
                        source: HealthSource::CpuOnly {
                            reason: "libnvidia-ml.so: cannot open shared object file".into(),
                        },
                        cpu_percent: 20.0 + i as f32 * 10.0,
                        load_avg_1m: 1.25,
                        memory_used_bytes: 3 << 30,
                        memory_total_bytes: 16 << 30,
                        disks: vec![],
                        inference: Some(gaffer_protocol::health::InferenceProvider {
                            provider: "cpu".into(),
                            runtime_version: "1.31.1".into(),
                            note: "NVML found no GPU: CPU execution provider".into(),
                        }),
                        gpus: vec![],
                        jobs_running: 0,
                        job_slots: 2,
                        jobs_queued: 0,
                        outbox_pending: 0,
                        outbox_full: false,
                    },
                },
                100,
                1 << 20,
            )?;
        }
        let shared: Arc<dyn Store> = store.clone();
        let state = AppState::new(shared, SchedulerConfig::default());
        Ok(Fixture { _dir: dir, store, state, agent_id })
    }

    fn app(&self) -> Router {
        router(self.state.clone())
    }

    /// Sends `req` through a fresh router, from client address 127.0.0.1 unless the request
    /// carries its own `ConnectInfo` ([`from_addr`]).
    async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>> {
        if req.extensions().get::<ConnectInfo<SocketAddr>>().is_none() {
            req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        }
        Ok(self.app().oneshot(req).await?)
    }

    /// Logs in through the real form; returns the session cookie value.
    async fn login(&self) -> Result<String> {
        let form = self.send(get("/login", None)).await?;
        assert_eq!(form.status(), StatusCode::OK);
        let login_csrf = cookie_value(&form, "gaffer_login_csrf").context("login form sets its CSRF cookie")?;
        let body = text(form).await?;
        assert!(body.contains(&login_csrf), "hidden field carries the CSRF token");
        let resp = self
            .send(post_form(
                "/login",
                Some(&format!("gaffer_login_csrf={login_csrf}")),
                &format!("csrf={login_csrf}&user=admin&password={}", urlencode(PASSWORD)),
            ))
            .await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        cookie_value(&resp, "gaffer_session").context("login sets the session cookie")
    }

    /// Queues a normal-priority shots job at `path` in site stage-a through the scheduler.
    fn submit(&self, path: &str) -> Result<JobRecord> {
        let req = JobRequest {
            path: path.into(),
            site: "stage-a".into(),
            agent: None,
            profile: Profile::Shots,
            priority: Priority::Normal,
        };
        Ok(self.state.scheduler.submit(req, JobOrigin::Api, None, gaffer_control::now_ms())?)
    }

    /// Jobs in the store, all states (from the counts).
    fn job_count(&self) -> Result<u64> {
        Ok(self.store.job_counts()?.0.iter().sum())
    }

    /// The session's CSRF token, read from a rendered form.
    async fn csrf(&self, session: &str) -> Result<String> {
        let page = text(self.send(get("/jobs/new", Some(&format!("gaffer_session={session}")))).await?).await?;
        let start = page.find("name=\"csrf\" value=\"").context("csrf field")? + "name=\"csrf\" value=\"".len();
        let end = page[start..].find('"').context("csrf field end")?;
        Ok(page[start..start + end].to_string())
    }
}

fn get(uri: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(uri);
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::empty()).expect("static request")
}

fn api_get(uri: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::get(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("static request")
}

fn api_post(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::AUTHORIZATION, format!("Bearer {API_TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .expect("static request")
}

fn post_form(uri: &str, cookie: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::post(uri).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, c);
    }
    b.body(Body::from(body.to_owned())).expect("static request")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn set_cookies(resp: &Response<Body>) -> Vec<String> {
    resp.headers().get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok().map(str::to_owned)).collect()
}

fn cookie_value(resp: &Response<Body>, name: &str) -> Option<String> {
    set_cookies(resp).iter().find_map(|c| {
        let (pair, _) = c.split_once(';').unwrap_or((c, ""));
        let (n, v) = pair.split_once('=')?;
        (n == name && !v.is_empty()).then(|| v.to_string())
    })
}

async fn text(resp: Response<Body>) -> Result<String> {
    let bytes = axum::body::to_bytes(resp.into_body(), 4 << 20).await?;
    Ok(String::from_utf8(bytes.to_vec())?)
}

async fn json(resp: Response<Body>) -> Result<serde_json::Value> {
    let bytes = axum::body::to_bytes(resp.into_body(), 4 << 20).await?;
    serde_json::from_slice(&bytes).with_context(|| format!("body is not JSON: {}", String::from_utf8_lossy(&bytes)))
}

/// Asserts a JSON error response with `status` and a non-empty "error" string.
async fn assert_json_error(resp: Response<Body>, status: StatusCode) -> Result<String> {
    assert_eq!(resp.status(), status);
    let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let v = json(resp).await?;
    let msg = v["error"].as_str().context("error field is a string")?.to_owned();
    assert!(!msg.is_empty());
    Ok(msg)
}

#[tokio::test]
async fn api_requires_a_valid_bearer_token() -> Result<()> {
    let f = Fixture::new()?;
    assert_json_error(f.send(api_get("/api/v1/jobs", None)).await?, StatusCode::UNAUTHORIZED).await?;
    assert_json_error(f.send(api_get("/api/v1/jobs", Some("gfa_wrong"))).await?, StatusCode::UNAUTHORIZED).await?;
    assert_json_error(f.send(api_get("/api/v1/agents", Some(""))).await?, StatusCode::UNAUTHORIZED).await?;
    let basic =
        Request::get("/api/v1/jobs").header(header::AUTHORIZATION, format!("Basic {API_TOKEN}")).body(Body::empty())?;
    assert_json_error(f.send(basic).await?, StatusCode::UNAUTHORIZED).await?;
    let resp = f.send(api_get("/api/v1/jobs", Some(API_TOKEN))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await?, serde_json::json!([]));
    Ok(())
}

#[tokio::test]
async fn api_submits_lists_and_gets_jobs() -> Result<()> {
    let f = Fixture::new()?;
    let resp = f.send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/reel1.mov", "site": "stage-a"}"#)).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id: Uuid = json(resp).await?["id"].as_str().context("id")?.parse()?;
    let pinned = format!(
        r#"{{"path": "/mnt/media/reel2.mov", "site": "stage-a", "agent": "{}", "profile": "shots"}}"#,
        f.agent_id
    );
    let resp = f.send(api_post("/api/v1/jobs", &pinned)).await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let second: Uuid = json(resp).await?["id"].as_str().context("id")?.parse()?;
    assert_eq!(f.store.get_job(second)?.and_then(|j| j.pinned_agent), Some(f.agent_id));

    let list = json(f.send(api_get("/api/v1/jobs", Some(API_TOKEN))).await?).await?;
    let ids: Vec<&str> = list.as_array().context("array")?.iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids, [second.to_string(), id.to_string()], "newest first");
    let limited = json(f.send(api_get("/api/v1/jobs?limit=1", Some(API_TOKEN))).await?).await?;
    assert_eq!(limited.as_array().map(Vec::len), Some(1));
    assert_json_error(f.send(api_get("/api/v1/jobs?limit=lots", Some(API_TOKEN))).await?, StatusCode::BAD_REQUEST)
        .await?;

    let job = json(f.send(api_get(&format!("/api/v1/jobs/{id}"), Some(API_TOKEN))).await?).await?;
    assert_eq!(job["path"], "/mnt/media/reel1.mov");
    assert_eq!(job["state"], "queued");
    assert_eq!(job["profile"], "shots");
    assert_eq!(job["attempts"], 0);
    assert!(job["digest"].is_null());
    Ok(())
}

#[tokio::test]
async fn api_rejects_bad_job_submissions_with_json_errors() -> Result<()> {
    let f = Fixture::new()?;
    let cases = [
        (r#"{"path": "/mnt/a.mov", "site": "#, StatusCode::BAD_REQUEST, "malformed JSON"),
        (
            r#"{"path": "/mnt/a.mov", "site": "stage-a", "colour": "red"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            r#"{"path": "/mnt/a.mov", "site": "stage-a", "priority": 1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "priority of the wrong type",
        ),
        (r#"{"path": 5, "site": "stage-a"}"#, StatusCode::UNPROCESSABLE_ENTITY, "wrong type"),
        (r#"{"site": "stage-a"}"#, StatusCode::UNPROCESSABLE_ENTITY, "missing path"),
        (r#"{"path": "media/a.mov", "site": "stage-a"}"#, StatusCode::UNPROCESSABLE_ENTITY, "relative path"),
        (r#"{"path": "/mnt/../etc/passwd", "site": "stage-a"}"#, StatusCode::UNPROCESSABLE_ENTITY, "dot-dot path"),
        (r#"{"path": "/mnt/a.mov", "site": "stage a!"}"#, StatusCode::UNPROCESSABLE_ENTITY, "bad site"),
        (
            r#"{"path": "/mnt/a.mov", "site": "stage-a", "agent": "not-a-uuid"}"#,
            StatusCode::BAD_REQUEST,
            "bad agent uuid",
        ),
        (
            r#"{"path": "/mnt/a.mov", "site": "stage-a", "profile": "faces"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown profile",
        ),
    ];
    for (body, status, what) in cases {
        let msg = assert_json_error(f.send(api_post("/api/v1/jobs", body)).await?, status)
            .await
            .with_context(|| what.to_string())?;
        assert!(!msg.contains("internal"), "{what}: {msg}");
    }
    let unknown_agent = format!(r#"{{"path": "/mnt/a.mov", "site": "stage-a", "agent": "{}"}}"#, Uuid::new_v4());
    let msg =
        assert_json_error(f.send(api_post("/api/v1/jobs", &unknown_agent)).await?, StatusCode::UNPROCESSABLE_ENTITY)
            .await?;
    assert!(msg.contains("not enrolled"), "{msg}");
    let no_content_type = Request::post("/api/v1/jobs")
        .header(header::AUTHORIZATION, format!("Bearer {API_TOKEN}"))
        .body(Body::from(r#"{"path": "/mnt/a.mov", "site": "stage-a"}"#))?;
    let resp = f.send(no_content_type).await?;
    assert!(resp.status().is_client_error());
    assert_eq!(f.job_count()?, 0, "no rejected submission created a job");

    let huge = format!(r#"{{"path": "/{}", "site": "stage-a"}}"#, "a".repeat(100 * 1024));
    let resp = f.send(api_post("/api/v1/jobs", &huge)).await?;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    Ok(())
}

#[tokio::test]
async fn api_unknown_and_malformed_ids() -> Result<()> {
    let f = Fixture::new()?;
    assert_json_error(
        f.send(api_get(&format!("/api/v1/jobs/{}", Uuid::new_v4()), Some(API_TOKEN))).await?,
        StatusCode::NOT_FOUND,
    )
    .await?;
    assert_json_error(f.send(api_get("/api/v1/jobs/12345", Some(API_TOKEN))).await?, StatusCode::BAD_REQUEST).await?;
    assert_json_error(
        f.send(api_get(&format!("/api/v1/agents/{}", Uuid::new_v4()), Some(API_TOKEN))).await?,
        StatusCode::NOT_FOUND,
    )
    .await?;
    assert_json_error(f.send(api_get("/api/v1/nope", Some(API_TOKEN))).await?, StatusCode::NOT_FOUND).await?;
    Ok(())
}

#[tokio::test]
async fn api_lists_agents_with_health() -> Result<()> {
    let f = Fixture::new()?;
    let list = json(f.send(api_get("/api/v1/agents", Some(API_TOKEN))).await?).await?;
    assert_eq!(list["counts"]["total"], 1);
    assert_eq!(list["counts"]["online"], 1);
    assert_eq!(list["counts"]["sites"]["stage-a"]["online"], 1);
    assert!(list["next_cursor"].is_null());
    let a = &list["agents"][0];
    assert_eq!(a["id"], f.agent_id.to_string());
    assert_eq!(a["hostname"], "gpu-box-07");
    assert_eq!(a["online"], true);
    assert_eq!(a["state"], "online");
    assert_eq!(a["health_source"], "cpu");
    assert_eq!(a["health"]["cpu_percent"], 40.0);
    assert_eq!(a["jobs_running"], 0);
    assert_eq!(a["capabilities"]["job_slots"], 2);
    assert!(a.get("health_history").is_none());
    let one = json(f.send(api_get(&format!("/api/v1/agents/{}", f.agent_id), Some(API_TOKEN))).await?).await?;
    let history = one["health_history"].as_array().context("history")?;
    assert_eq!(history.len(), 3);
    assert_eq!(history[2]["health"]["cpu_percent"], 40.0, "oldest first");
    Ok(())
}

/// 149 more agents beside the fixture's: sites stage-a and stage-b, every state.
fn add_fleet(f: &Fixture) -> Result<()> {
    for n in 0..149u32 {
        let rec = AgentRecord {
            connected: n % 5 != 0,
            offline: n % 10 == 5,
            revoked_at_ms: (n % 50 == 49).then_some(1),
            ..AgentRecord::new(Uuid::new_v4(), ["stage-a", "stage-b"][n as usize % 2], format!("box-{n:03}"), 1)
        };
        f.store.insert_agent(&rec)?;
    }
    Ok(())
}

/// Follows `GET /api/v1/agents?{query}` through its `next_cursor`s: every agent listed, and the
/// `Link` header of each page but the last.
async fn all_agent_pages(f: &Fixture, query: &str) -> Result<(Vec<serde_json::Value>, usize)> {
    let (mut agents, mut links) = (Vec::new(), 0);
    let mut url = format!("/api/v1/agents?{query}");
    for _ in 0..100 {
        let resp = f.send(api_get(&url, Some(API_TOKEN))).await?;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        let link = next_link(&resp)?;
        let page = json(resp).await?;
        agents.extend(page["agents"].as_array().context("agents")?.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                let link = link.context("a page with a next_cursor has a Link header")?;
                assert!(link.contains(&format!("cursor={cursor}")), "{link}");
                links += 1;
                url = format!("/api/v1/agents?{query}&cursor={cursor}");
            }
            None => {
                assert!(link.is_none(), "the last page has no Link header");
                return Ok((agents, links));
            }
        }
    }
    anyhow::bail!("paging does not end")
}

#[tokio::test]
async fn api_pages_agents_with_site_and_state_filters_and_counts() -> Result<()> {
    let f = Fixture::new()?;
    add_fleet(&f)?;
    let all = f.store.list_agents()?;
    let count = |site: Option<&str>, state: Option<AgentState>| {
        all.iter()
            .filter(|a| site.is_none_or(|s| a.site == s) && state.is_none_or(|st| AgentState::of(a) == st))
            .count()
    };

    // The first page: 100 agents, the whole fleet's counts, a cursor.
    let first = json(f.send(api_get("/api/v1/agents", Some(API_TOKEN))).await?).await?;
    assert_eq!(first["agents"].as_array().map(Vec::len), Some(100));
    assert_eq!(first["counts"]["total"], 150);
    for st in AgentState::ALL {
        assert_eq!(first["counts"][st.as_str()], count(None, Some(st)), "{st}");
        assert_eq!(first["counts"]["sites"]["stage-b"][st.as_str()], count(Some("stage-b"), Some(st)), "{st}");
    }
    assert_eq!(first["counts"]["sites"]["stage-a"]["total"], count(Some("stage-a"), None));
    assert!(first["next_cursor"].is_string());

    // Paging visits every agent once, by site then hostname; so does every filter.
    let (listed, links) = all_agent_pages(&f, "limit=40").await?;
    let ids: Vec<&str> = listed.iter().filter_map(|a| a["id"].as_str()).collect();
    let want: Vec<String> = all.iter().map(|a| a.id.to_string()).collect();
    assert_eq!(ids, want);
    assert_eq!(links, 3);
    for (site, state) in [
        (Some("stage-b"), Some(AgentState::Online)),
        (None, Some(AgentState::Offline)),
        (Some("stage-a"), None),
        (None, Some(AgentState::Revoked)),
        (None, Some(AgentState::AirGapped)),
    ] {
        let mut query = "limit=7".to_owned();
        if let Some(s) = site {
            query.push_str(&format!("&site={s}"));
        }
        if let Some(st) = state {
            query.push_str(&format!("&state={st}"));
        }
        let (listed, _) = all_agent_pages(&f, &query).await?;
        assert_eq!(listed.len(), count(site, state), "{query}");
        assert!(
            listed
                .iter()
                .all(|a| site.is_none_or(|s| a["site"] == s) && state.is_none_or(|st| a["state"] == st.as_str())),
            "{query}"
        );
    }

    // The state is the record's as it is now: a link that goes down is offline at once.
    f.store.update_agent(f.agent_id, &mut |a| a.connected = false)?;
    let (online, _) = all_agent_pages(&f, "state=online&limit=1000").await?;
    assert!(online.iter().all(|a| a["id"] != f.agent_id.to_string() && a["online"] == true));
    let page = json(f.send(api_get("/api/v1/agents?site=stage-a&limit=1", Some(API_TOKEN))).await?).await?;
    assert_eq!(page["counts"]["online"], count(None, Some(AgentState::Online)) - 1);

    // Bad parameters are refused naming what is accepted.
    for (query, says) in [
        ("limit=0", "limit must be 1..=1000"),
        ("limit=1001", "limit must be 1..=1000"),
        ("state=sleeping", "known: online, offline, air_gapped, revoked"),
        ("cursor=bogus", "next_cursor"),
        ("site=no%20spaces", "site"),
        ("limit=many", "limit"),
    ] {
        let msg = assert_json_error(
            f.send(api_get(&format!("/api/v1/agents?{query}"), Some(API_TOKEN))).await?,
            StatusCode::BAD_REQUEST,
        )
        .await?;
        assert!(msg.contains(says), "{query}: {msg}");
    }
    Ok(())
}

#[tokio::test]
async fn fleet_page_filters_by_site_and_state_counts_and_pages() -> Result<()> {
    let f = Fixture::new()?;
    add_fleet(&f)?;
    let all = f.store.list_agents()?;
    let online = all.iter().filter(|a| AgentState::of(a) == AgentState::Online).count();
    let cookie = format!("gaffer_session={}", f.login().await?);
    let rows = |page: &str| page.matches("<td><a href=\"/agents/").count();

    let fleet = text(f.send(get("/", Some(&cookie))).await?).await?;
    assert!(fleet.contains(&format!("{online} of 150 online")), "headline counts the whole fleet");
    assert_eq!(rows(&fleet), 100, "one page of 100");
    assert!(fleet.contains(&format!("<span class=\"n\">{online}</span><span class=\"label\">online</span>")));
    assert!(fleet.contains("<option value=\"stage-b\">stage-b ("), "site filter options");
    let next = fleet
        .split("<a rel=\"next\" href=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("a next-page link")?
        .replace("&amp;", "&");
    let second = text(f.send(get(&next, Some(&cookie))).await?).await?;
    assert_eq!(rows(&second), 50);
    assert!(second.contains("First page") && !second.contains("rel=\"next\""));
    // Every agent on exactly one of the two pages.
    for a in &all {
        let link = format!("href=\"/agents/{}\"", a.id);
        assert_eq!(fleet.contains(&link) as u8 + second.contains(&link) as u8, 1, "{}", a.hostname);
    }

    let filtered = text(f.send(get("/?site=stage-b&state=offline", Some(&cookie))).await?).await?;
    let want: Vec<&AgentRecord> =
        all.iter().filter(|a| a.site == "stage-b" && AgentState::of(a) == AgentState::Offline).collect();
    assert_eq!(rows(&filtered), want.len());
    assert!(want.iter().all(|a| filtered.contains(&format!("href=\"/agents/{}\"", a.id))));
    assert!(filtered.contains("<option value=\"stage-b\" selected>"));
    assert!(filtered.contains("<input type=\"hidden\" name=\"state\" value=\"offline\">"));
    let none = text(f.send(get("/?site=stage-z", Some(&cookie))).await?).await?;
    assert!(none.contains("No agents match in site stage-z."), "{none}");
    assert_eq!(f.send(get("/?state=asleep", Some(&cookie))).await?.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn login_flow_and_dashboard_pages() -> Result<()> {
    let f = Fixture::new()?;
    for page in ["/", "/jobs", "/jobs/new", &format!("/agents/{}", f.agent_id)] {
        let resp = f.send(get(page, None)).await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{page}");
        assert_eq!(resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/login"));
        let resp = f.send(get(page, Some("gaffer_session=forged"))).await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{page} with a forged cookie");
    }

    // Wrong password: refused, no session.
    let form = f.send(get("/login", None)).await?;
    let login_csrf = cookie_value(&form, "gaffer_login_csrf").context("csrf cookie")?;
    let resp = f
        .send(post_form(
            "/login",
            Some(&format!("gaffer_login_csrf={login_csrf}")),
            &format!("csrf={login_csrf}&user=admin&password=hunter2"),
        ))
        .await?;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(cookie_value(&resp, "gaffer_session").is_none());
    assert!(text(resp).await?.contains("Wrong user name or password"));

    // Right password but no login CSRF cookie: refused.
    let resp =
        f.send(post_form("/login", None, &format!("csrf=x&user=admin&password={}", urlencode(PASSWORD)))).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(cookie_value(&resp, "gaffer_session").is_none());

    // Right password: session cookie with the right attributes.
    let form = f.send(get("/login", None)).await?;
    let login_csrf = cookie_value(&form, "gaffer_login_csrf").context("csrf cookie")?;
    let resp = f
        .send(post_form(
            "/login",
            Some(&format!("gaffer_login_csrf={login_csrf}")),
            &format!("csrf={login_csrf}&user=admin&password={}", urlencode(PASSWORD)),
        ))
        .await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = set_cookies(&resp).into_iter().find(|c| c.starts_with("gaffer_session=")).context("session cookie")?;
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    assert!(set.contains("Path=/"), "{set}");
    let session = cookie_value(&resp, "gaffer_session").context("session value")?;
    assert!(session.len() >= 43);
    let cookie = format!("gaffer_session={session}");

    let fleet = f.send(get("/", Some(&cookie))).await?;
    assert_eq!(fleet.status(), StatusCode::OK);
    let csp =
        fleet.headers().get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let body = text(fleet).await?;
    assert!(body.contains("gpu-box-07"));
    assert!(body.contains("online"));
    assert!(body.contains("CPU only: libnvidia-ml.so: cannot open shared object file"));
    assert!(body.contains("just now") || body.contains(" s ago"));
    for page in ["/jobs", "/jobs/new", &format!("/agents/{}", f.agent_id)] {
        let resp = f.send(get(page, Some(&cookie))).await?;
        assert_eq!(resp.status(), StatusCode::OK, "{page}");
    }
    let agent_page = text(f.send(get(&format!("/agents/{}", f.agent_id), Some(&cookie))).await?).await?;
    assert!(agent_page.contains("/mnt/media/incoming"), "watch roots shown");
    assert!(agent_page.contains("<polyline class=\"cpu\""), "sparkline rendered");
    assert!(
        agent_page.contains("Inference: cpu (ONNX Runtime 1.31.1): NVML found no GPU: CPU execution provider"),
        "execution provider and why"
    );
    assert!(agent_page.contains("silero-vad 6.2.3 (1a153a22f450)"), "installed models listed");
    assert!(agent_page.contains("Outbox: 0 pending"), "outbox depth shown");
    let missing = f.send(get(&format!("/jobs/{}", Uuid::new_v4()), Some(&cookie))).await?;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(text(missing).await?.contains("<html"));

    // Logout needs the CSRF token; afterwards the cookie is dead.
    let resp = f.send(post_form("/logout", Some(&cookie), "csrf=wrong")).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let csrf = f.csrf(&session).await?;
    let resp = f.send(post_form("/logout", Some(&cookie), &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(f.send(get("/", Some(&cookie))).await?.status(), StatusCode::SEE_OTHER);
    Ok(())
}

#[tokio::test]
async fn job_form_requires_the_session_csrf_token() -> Result<()> {
    let f = Fixture::new()?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let csrf = f.csrf(&session).await?;
    let fields = "path=%2Fmnt%2Fmedia%2Freel9.mov&site=stage-a&agent=&profile=shots";

    let resp = f.send(post_form("/jobs", Some(&cookie), fields)).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no csrf field");
    let resp = f.send(post_form("/jobs", Some(&cookie), &format!("{fields}&csrf=AAAA{}", &csrf[4..]))).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "wrong csrf");
    let other = f.login().await?;
    let other_csrf = f.csrf(&other).await?;
    let resp = f.send(post_form("/jobs", Some(&cookie), &format!("{fields}&csrf={other_csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "another session's csrf");
    assert_eq!(f.job_count()?, 0);

    let resp = f.send(post_form("/jobs", Some(&cookie), &format!("{fields}&csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).context("location")?.to_owned();
    let id: Uuid = location.strip_prefix("/jobs/").context("job page")?.parse()?;
    let job = f.store.get_job(id)?.context("job exists")?;
    assert_eq!(job.path, "/mnt/media/reel9.mov");
    assert_eq!(job.state, JobState::Queued);

    // An invalid submission re-renders the form with the reason and keeps what was typed.
    let resp =
        f.send(post_form("/jobs", Some(&cookie), &format!("path=relative.mov&site=stage-a&csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = text(resp).await?;
    assert!(body.contains("path must be absolute"), "{body}");
    assert!(body.contains("value=\"relative.mov\""));
    // Without a session, the form post goes to the login page.
    let resp = f.send(post_form("/jobs", None, &format!("{fields}&csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(f.job_count()?, 1);
    Ok(())
}

fn digest(path: &str) -> Digest {
    let shot = |index: u32, start_frame: u64, end_frame: u64, phash: &str| Shot {
        index,
        start_frame,
        end_frame,
        start_secs: start_frame as f64 / 25.0,
        end_secs: end_frame as f64 / 25.0,
        keyframe: Keyframe { frame: start_frame, time_secs: start_frame as f64 / 25.0, phash: phash.into() },
    };
    Digest {
        schema_version: gaffer_protocol::digest::DIGEST_SCHEMA_VERSION,
        moderation: None,
        text: None,
        speech: None,
        profile: "shots".into(),
        source: SourceInfo { path: path.into(), size_bytes: 3_000_000, modified_unix_secs: Some(1_700_000_000) },
        technical: TechnicalMetadata {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            container_long_name: "QuickTime / MOV".into(),
            duration_secs: Some(212.04),
            bit_rate_bps: Some(113_000),
            streams: vec![StreamInfo {
                index: 0,
                kind: StreamKind::Video,
                codec: "h264".into(),
                time_base: (1, 12_800),
                duration_secs: Some(212.04),
                frames_declared: Some(5301),
                width: Some(160),
                height: Some(90),
                frame_rate_fps: Some(25.0),
                pixel_format: Some("yuv420p".into()),
                sample_rate_hz: None,
                channels: None,
                bit_rate_bps: Some(100_000),
                language: Some("und".into()),
            }],
            primary_video_stream: Some(0),
        },
        shots: ShotAnalysis {
            detector: "content".into(),
            threshold: 27.0,
            min_shot_frames: 15,
            frames_decoded: 5301,
            frames_corrupt: 0,
            cuts: vec![
                Cut { frame: 112, time_secs: 4.48, score: 41.5 },
                Cut { frame: 3010, time_secs: 120.4, score: 33.0 },
            ],
            shots: vec![
                shot(0, 0, 112, "c3a5e1f00f1e5a3c"),
                shot(1, 112, 3010, "0f0f0f0ff0f0f0f0"),
                shot(2, 3010, 5301, "ffff0000ffff0000"),
            ],
        },
        analyzers: vec![AnalyzerInfo {
            name: "shots.content".into(),
            version: "1".into(),
            parameters: vec![("threshold".into(), "27".into())],
        }],
        analysis_secs: 9.5,
    }
}

#[tokio::test]
async fn job_page_shows_the_digest_shot_list() -> Result<()> {
    let f = Fixture::new()?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let job = f.submit("/mnt/media/<script>alert(1)</script>.mp4")?;

    let page = text(f.send(get(&format!("/jobs/{}", job.id), Some(&cookie))).await?).await?;
    assert!(page.contains(r#"<meta http-equiv="refresh" content="3">"#), "unfinished job page refreshes");
    assert!(!page.contains("<script>"), "path is escaped");
    assert!(page.contains("&lt;script&gt;") || page.contains("&#60;script&#62;"), "escaped path shown");

    assert!(f.store.put_digest(job.id, &digest(&job.path))?);
    f.store.update_job(job.id, &mut |j| {
        j.state = JobState::Succeeded;
        j.progress = 1.0;
        j.frames_decoded = 5301;
        j.agent = Some(f.agent_id);
        j.finished_at_ms = Some(gaffer_control::now_ms());
        true
    })?;
    let page = text(f.send(get(&format!("/jobs/{}", job.id), Some(&cookie))).await?).await?;
    assert!(!page.contains("http-equiv=\"refresh\""), "finished job page does not refresh");
    for expected in [
        "00:00:04.480",
        "00:02:00.400",
        "00:03:32.040",
        "f112",
        "f3010",
        "c3a5e1f00f1e5a3c",
        "ffff0000ffff0000",
        "QuickTime / MOV",
        "160×90",
        "3 shots",
        "2 cuts",
    ] {
        assert!(page.contains(expected), "job page lacks {expected}");
    }

    // The API returns the same digest.
    let api = json(f.send(api_get(&format!("/api/v1/jobs/{}", job.id), Some(API_TOKEN))).await?).await?;
    assert_eq!(api["state"], "succeeded");
    assert_eq!(api["digest"]["shots"]["shots"].as_array().map(Vec::len), Some(3));
    assert_eq!(serde_json::from_value::<Digest>(api["digest"].clone())?, digest(&job.path));
    Ok(())
}

/// WCAG 2.2.1: every self-reloading page has a control that pauses the reloads, which comes back
/// to the same page (filters kept) and holds on every live page until resumed.
#[tokio::test]
async fn auto_refresh_can_be_paused_and_resumed_from_each_live_page() -> Result<()> {
    let f = Fixture::new()?;
    let session = format!("gaffer_session={}", f.login().await?);
    let job = f.submit("/mnt/media/refresh.mp4")?;
    let live = [
        "/".to_string(),
        "/jobs?state=queued".into(),
        format!("/agents/{}", f.agent_id),
        "/rollouts".into(),
        format!("/jobs/{}", job.id),
    ];
    for page in &live {
        let html = text(f.send(get(page, Some(&session))).await?).await?;
        assert!(html.contains(r#"<meta http-equiv="refresh""#), "{page} reloads itself");
        assert!(html.contains("Pause auto-refresh"), "{page} has no pause control");
    }

    // Pausing on the filtered jobs page comes back to it, filter kept.
    let resp = f.send(get("/refresh?auto=off&back=%2Fjobs%3Fstate%3Dqueued", Some(&session))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/jobs?state=queued"));
    let pref = cookie_value(&resp, "gaffer_refresh").context("no gaffer_refresh cookie set")?;
    assert_eq!(pref, "off");
    let paused = format!("{session}; gaffer_refresh=off");
    for page in &live {
        let html = text(f.send(get(page, Some(&paused))).await?).await?;
        assert!(!html.contains("http-equiv=\"refresh\""), "{page} still reloads while paused");
        assert!(html.contains("Resume auto-refresh"), "{page} offers no way back");
    }

    // Resuming clears the cookie; a foreign `back` goes to the fleet page instead; bad values are 400.
    let resp = f.send(get("/refresh?auto=on&back=%2F%2Fevil.example%2F", Some(&paused))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/"));
    assert!(
        set_cookies(&resp).iter().any(|c| c.starts_with("gaffer_refresh=;") && c.contains("Max-Age=0")),
        "{:?}",
        set_cookies(&resp)
    );
    let resp = f.send(get("/refresh?auto=sometimes", Some(&session))).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Signed out: to the login page, no preference set.
    let resp = f.send(get("/refresh?auto=off", None)).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(cookie_value(&resp, "gaffer_refresh").is_none());
    Ok(())
}

#[tokio::test]
async fn metrics_and_stylesheet_are_public() -> Result<()> {
    let f = Fixture::new()?;
    f.state.metrics.message_received("heartbeat");
    f.send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/a.mov", "site": "stage-a"}"#)).await?;
    let resp = f.send(get("/metrics", None)).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let body = text(resp).await?;
    assert!(body.contains("gaffer_agents{state=\"connected\"} 1"), "{body}");
    assert!(body.contains("gaffer_jobs{state=\"queued\"} 1"), "{body}");
    assert!(body.contains("gaffer_agent_messages_total{kind=\"heartbeat\"} 1"), "{body}");

    let css = f.send(get("/static/app.css", None)).await?;
    assert_eq!(css.status(), StatusCode::OK);
    assert!(text(css).await?.contains(".topbar"));
    Ok(())
}

/// `attr="…"` of the element that starts last before `needle` in `page` (the element whose
/// child or content `needle` is), as a number.
fn attr_before(page: &str, needle: &str, element: &str, attr: &str) -> Result<f64> {
    let at = page.find(needle).with_context(|| format!("page lacks {needle}"))?;
    let start = page[..at].rfind(&format!("<{element} ")).with_context(|| format!("no <{element}> before {needle}"))?;
    let tag = &page[start..at];
    let key = format!(" {attr}=\"");
    let v = tag.find(&key).with_context(|| format!("no {attr} in {tag}"))? + key.len();
    let end = tag[v..].find('"').context("attribute end")?;
    Ok(tag[v..v + end].parse()?)
}

#[tokio::test]
async fn job_page_shows_full_profile_findings_on_a_timeline() -> Result<()> {
    use gaffer_protocol::digest::{
        BoxPx, ModelStamp, ModerationAnalysis, ModerationRange, SpeechAnalysis, SpeechSegment, TextAnalysis,
        TextReading,
    };
    let f = Fixture::new()?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let stamp = |name: &str, version: &str, fill: char| ModelStamp {
        name: name.into(),
        version: version.into(),
        sha256: fill.to_string().repeat(64),
    };
    let bx = |x: f32, y: f32| BoxPx { x, y, width: 40.0, height: 24.0 };
    let range = |label: &str, start_secs: f64, end_secs: f64, peak_score: f32| ModerationRange {
        label: label.into(),
        start_secs,
        end_secs,
        peak_score,
        peak_time_secs: (start_secs + end_secs) / 2.0,
        peak_box: bx(12.0, 30.0),
        frames: 3,
    };
    let reading = |text: &str, start_secs: f64, end_secs: f64, confidence: f32| TextReading {
        text: text.into(),
        start_secs,
        end_secs,
        box_px: bx(8.0, 70.0),
        confidence,
    };
    let submit = |path: &str| f.submit(path);
    let finish = |id: Uuid| {
        f.store.update_job(id, &mut |j| {
            j.state = JobState::Succeeded;
            j.progress = 1.0;
            j.agent = Some(f.agent_id);
            j.finished_at_ms = Some(gaffer_control::now_ms());
            true
        })
    };

    let full_job = submit("/mnt/media/reel-full.mov")?;
    let mut full = digest(&full_job.path);
    full.profile = "full".into();
    full.moderation = Some(ModerationAnalysis {
        model: stamp("nudenet-320n", "3.4.2", 'a'),
        sample_fps: 2.0,
        score_threshold: 0.25,
        frames_analyzed: 430,
        ranges: vec![
            range("FACE_FEMALE", 2.0, 8.0, 0.91),
            range("BELLY_COVERED", 60.0, 61.0, 0.42),
            range("FEMALE_BREAST_EXPOSED", 100.0, 104.5, 0.87),
            range("FACE_FEMALE", 150.0, 150.0, 0.55),
        ],
    });
    full.text = Some(TextAnalysis {
        detector: stamp("ppocrv4-det", "1.4.4", 'b'),
        recognizer: stamp("ppocrv4-rec", "1.4.4", 'c'),
        classifier: Some(stamp("ppocr-mobile-v2-cls", "1.4.4", 'd')),
        frames_analyzed: 430,
        readings: vec![
            reading("EXT. ROOFTOP - NIGHT", 0.5, 3.0, 0.97),
            reading("<script>alert('gaffer')</script>", 30.0, 31.0, 0.88),
            reading("Scene 42 / Take 3", 120.0, 121.0, 0.93),
        ],
    });
    let segments =
        vec![SpeechSegment { start_secs: 10.0, end_secs: 60.0 }, SpeechSegment { start_secs: 70.0, end_secs: 99.515 }];
    let speech_secs: f64 = segments.iter().map(|s| s.end_secs - s.start_secs).sum();
    full.speech = Some(SpeechAnalysis {
        model: stamp("silero-vad", "6.2.3", 'e'),
        audio_stream: 1,
        audio_secs: 212.04,
        speech_fraction: speech_secs / 212.04,
        segments,
    });
    assert!(f.store.put_digest(full_job.id, &full)?);
    finish(full_job.id)?;

    let resp = f.send(get(&format!("/jobs/{}", full_job.id), Some(&cookie))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let csp =
        resp.headers().get(header::CONTENT_SECURITY_POLICY).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(csp.contains("default-src 'none'") && !csp.contains("unsafe-inline"), "CSP stays strict: {csp}");
    let page = text(resp).await?;

    // The timeline: shots, one lane per moderation label, speech, text.
    assert_eq!(page.matches("<svg class=\"timeline\"").count(), 1, "one timeline SVG");
    assert!(!page.contains("style=\""), "no inline styles (CSP style-src 'self')");
    assert_eq!(page.matches("class=\"lane lane-shots\"").count(), 1);
    assert_eq!(page.matches("class=\"lane lane-moderation\"").count(), 3, "one lane per label");
    for label in ["BELLY_COVERED", "FACE_FEMALE", "FEMALE_BREAST_EXPOSED"] {
        assert!(page.contains(&format!(">{label}<title>")), "lane labelled {label}");
    }
    assert_eq!(page.matches("class=\"lane lane-speech\"").count(), 1);
    assert_eq!(page.matches("class=\"lane lane-text\"").count(), 1);
    assert_eq!(page.matches("class=\"mark mod-other\"").count(), 2, "FACE_FEMALE's two ranges");
    assert_eq!(page.matches("class=\"mark speech\"").count(), 2);
    assert_eq!(page.matches("class=\"cut\"").count(), 2, "a mark per cut");
    assert!(page.contains("<title>FEMALE_BREAST_EXPOSED · 00:01:40.000–00:01:44.500 · peak 0.87</title>"), "tooltip");
    // Marks sit where their times are on the axis: 100 s is 100/210 of the way from the
    // 00:00:00 tick to the 00:03:30 tick.
    let x0 = attr_before(&page, ">00:00:00</text>", "text", "x")?;
    let x210 = attr_before(&page, ">00:03:30</text>", "text", "x")?;
    let x100 = attr_before(&page, "<title>FEMALE_BREAST_EXPOSED · 00:01:40", "rect", "x")?;
    let at = (x100 - x0) / (x210 - x0);
    assert!((at - 100.0 / 210.0).abs() < 0.002, "mark at {at} of the axis");
    let w_exposed = attr_before(&page, "<title>FEMALE_BREAST_EXPOSED · 00:01:40", "rect", "width")?;
    assert!((w_exposed / (x210 - x0) - 4.5 / 210.0).abs() < 0.002, "mark width {w_exposed}");
    assert!(
        attr_before(&page, "<title>FACE_FEMALE · 00:02:30.000–00:02:30.000", "rect", "width")? > 1.0,
        "instants stay visible"
    );

    // Tables: moderation, text, speech, model stamps.
    for expected in [
        "4 ranges · 3 labels · 430 frames analyzed",
        "x 12, y 30, 40×24 px",
        "00:01:42.250",
        "EXT. ROOFTOP - NIGHT",
        "Scene 42 / Take 3",
        "0.93",
        "3 readings",
        "2 segments · 37.5% speech",
        "00:01:39.515",
        "nudenet-320n",
        "3.4.2",
        "ppocr-mobile-v2-cls",
        "silero-vad",
        "6.2.3",
        &format!(">{}</code>", "e".repeat(12)),
        &format!(">{}</code>", "a".repeat(12)),
    ] {
        assert!(page.contains(expected), "job page lacks {expected}");
    }
    // Text read on screen is untrusted: shown as text, never as markup.
    assert!(!page.contains("<script"), "on-screen text is escaped");
    let escaped = [
        "&#60;script&#62;alert(&#39;gaffer&#39;)&#60;/script&#62;",
        "&lt;script&gt;alert(&#39;gaffer&#39;)&lt;/script&gt;",
    ];
    assert!(
        escaped.iter().any(|e| page.contains(&format!("<td class=\"reading\">{e}</td>"))),
        "the reading is shown, escaped, in the text table"
    );

    // A shots-only digest: the page renders as before, with a shots lane and no findings.
    let shots_job = submit("/mnt/media/reel-shots.mov")?;
    assert!(f.store.put_digest(shots_job.id, &digest(&shots_job.path))?);
    finish(shots_job.id)?;
    let resp = f.send(get(&format!("/jobs/{}", shots_job.id), Some(&cookie))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = text(resp).await?;
    for expected in ["3 shots", "2 cuts", "c3a5e1f00f1e5a3c", "class=\"lane lane-shots\""] {
        assert!(page.contains(expected), "shots-only job page lacks {expected}");
    }
    for absent in ["lane-moderation", "lane-speech", "lane-text", "<h2>Moderation", "<h2>Speech", "<h2>On-screen text"]
    {
        assert!(!page.contains(absent), "shots-only job page shows {absent}");
    }
    Ok(())
}

#[tokio::test]
async fn audit_log_page_and_fleet_page_show_operator_actions_escaped() -> Result<()> {
    use gaffer_control::store::AuditRecord;
    let f = Fixture::new()?;
    let now = gaffer_control::now_ms();
    // Without a session: to the login page, like every dashboard page.
    for cookie in [None, Some("gaffer_session=forged")] {
        let resp = f.send(get("/audit", cookie)).await?;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "/audit with {cookie:?}");
        assert_eq!(resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/login"));
    }

    f.store.append_audit(&AuditRecord {
        at_ms: now - 120_000,
        who: "o'brien & <ops>".into(),
        action: "enroll_offline".into(),
        agent: Some(f.agent_id),
        site: Some("stage-a".into()),
        detail: "host \"gpu-box-9\", reply written to /tmp/<script>alert(1)</script>.json".into(),
        job: None,
    })?;
    f.store.append_audit(&AuditRecord {
        at_ms: now - 1_000,
        who: "alice".into(),
        action: "bundle_import".into(),
        agent: Some(f.agent_id),
        site: Some("stage-a".into()),
        detail: "bundle 7: 12 applied, 0 duplicates, 0 rejected; reply 7 with 12 acks, 1 jobs".into(),
        job: None,
    })?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");

    let resp = f.send(get("/audit", Some(&cookie))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = text(resp).await?;
    // Escaped, never raw markup from the store.
    assert!(!page.contains("<script>"), "raw markup from an audit entry reached the page");
    assert!(!page.contains("<ops>"));
    assert!(page.contains("&#60;script&#62;alert(1)&#60;/script&#62;"), "detail is shown, escaped");
    assert!(page.contains("o&#39;brien &#38; &#60;ops&#62;"), "who is shown, escaped");
    // Who, what, when, which agent; newest first.
    let newer = page.find("bundle 7: 12 applied").context("newer entry listed")?;
    let older = page.find("<code>enroll_offline</code>").context("older entry listed")?;
    assert!(newer < older, "entries are not newest first");
    assert!(page.contains("alice"));
    assert!(page.contains(&format!("/agents/{}", f.agent_id)), "links to the agent");
    let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now - 1_000) * 1_000_000)?
        .format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC"))?;
    assert!(page.contains(&when), "when, as UTC date-time ({when})");
    assert!(page.contains("2 min ago"), "when, relative");
    assert!(page.contains("href=\"/audit\""), "nav link");

    // The fleet page shows them too, with the nav link.
    let fleet = text(f.send(get("/", Some(&cookie))).await?).await?;
    assert!(fleet.contains("bundle 7: 12 applied"));
    assert!(fleet.contains("o&#39;brien &#38; &#60;ops&#62;"));
    assert!(!fleet.contains("<script>"));
    assert!(fleet.contains("href=\"/audit\""));

    // Only the latest five on the fleet page; the audit page keeps them all.
    for i in 0..5 {
        f.store.append_audit(&AuditRecord {
            at_ms: now + i,
            who: "bob".into(),
            action: "revoke_agent".into(),
            agent: None,
            site: None,
            detail: format!("certificate serial 0{i}ab"),
            job: None,
        })?;
    }
    let fleet = text(f.send(get("/", Some(&cookie))).await?).await?;
    assert_eq!(fleet.matches("revoke_agent").count(), 5);
    assert!(!fleet.contains("bundle 7: 12 applied"), "the fleet page shows more than the latest five");
    let page = text(f.send(get("/audit", Some(&cookie))).await?).await?;
    assert!(page.contains("bundle 7: 12 applied") && page.contains("<code>enroll_offline</code>"));
    assert_eq!(page.matches("<code>revoke_agent</code>").count(), 5);
    Ok(())
}

fn api_post_empty(uri: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::post(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).expect("static request")
}

/// The `rel="next"` target of a response's `Link` header.
fn next_link(resp: &Response<Body>) -> Result<Option<String>> {
    let Some(v) = resp.headers().get(header::LINK) else { return Ok(None) };
    let v = v.to_str()?;
    let url = v.strip_prefix('<').and_then(|r| r.split_once(">; rel=\"next\"")).context("Link header form")?.0;
    Ok(Some(url.to_owned()))
}

/// Follows `GET url` and its `Link: rel="next"` pages to the end: every job's id, and the page
/// sizes.
async fn all_pages(f: &Fixture, url: &str) -> Result<(Vec<Uuid>, Vec<usize>, Vec<String>)> {
    let (mut ids, mut sizes, mut links) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = Some(url.to_owned());
    while let Some(url) = next.take() {
        anyhow::ensure!(sizes.len() < 100, "paging does not end");
        let resp = f.send(api_get(&url, Some(API_TOKEN))).await?;
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        next = next_link(&resp)?;
        if let Some(n) = &next {
            links.push(n.clone());
        }
        let page = json(resp).await?;
        let page = page.as_array().context("a page is a JSON array")?;
        sizes.push(page.len());
        for j in page {
            ids.push(j["id"].as_str().context("id")?.parse()?);
        }
    }
    Ok((ids, sizes, links))
}

/// A fake link for the fixture's agent in the scheduler's fleet (site stage-a, 2 slots, /mnt/media).
fn connect_agent(f: &Fixture) -> Result<()> {
    let caps = f.store.get_agent(f.agent_id)?.and_then(|a| a.capabilities).context("fixture capabilities")?;
    let conn = gaffer_control::scheduler::AgentConn { conn_id: 1, site: "stage-a".into(), capabilities: caps };
    f.state.scheduler.fleet().connect(f.agent_id, conn);
    Ok(())
}

#[tokio::test]
async fn api_submits_with_priority_and_audits_it() -> Result<()> {
    let f = Fixture::new()?;
    let resp = f
        .send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/hot.mov", "site": "stage-a", "priority": "high"}"#))
        .await?;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let high: Uuid = json(resp).await?["id"].as_str().context("id")?.parse()?;
    let resp = f.send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/plain.mov", "site": "stage-a"}"#)).await?;
    let plain: Uuid = json(resp).await?["id"].as_str().context("id")?.parse()?;
    let resp = f
        .send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/later.mov", "site": "stage-a", "priority": "low"}"#))
        .await?;
    let low: Uuid = json(resp).await?["id"].as_str().context("id")?.parse()?;

    let job = json(f.send(api_get(&format!("/api/v1/jobs/{high}"), Some(API_TOKEN))).await?).await?;
    assert_eq!(job["priority"], "high");
    assert_eq!(job["state"], "queued");
    for field in ["lease_id", "lease_deadline_ms", "pending_reason"] {
        assert!(job.get(field).is_some_and(serde_json::Value::is_null), "{field} is present and null: {job}");
    }
    assert_eq!(f.store.get_job(high)?.context("stored")?.priority, Priority::High);
    assert_eq!(f.store.get_job(plain)?.context("stored")?.priority, Priority::Normal, "default priority");
    let list = json(f.send(api_get("/api/v1/jobs", Some(API_TOKEN))).await?).await?;
    let priorities: Vec<&str> =
        list.as_array().context("array")?.iter().filter_map(|j| j["priority"].as_str()).collect();
    assert_eq!(priorities, ["low", "normal", "high"], "newest first, with priorities");
    assert_eq!(
        f.store.jobs_in_state(JobState::Queued, 10)?.iter().map(|j| j.id).collect::<Vec<_>>(),
        [high, plain, low]
    );

    let msg = assert_json_error(
        f.send(api_post("/api/v1/jobs", r#"{"path": "/mnt/media/x.mov", "site": "stage-a", "priority": "urgent"}"#))
            .await?,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await?;
    assert!(msg.contains("priority") && msg.contains("low, normal, high"), "{msg}");
    assert_eq!(f.job_count()?, 3, "the refused submission created no job");

    // Each submission is in the audit log with its actor, site, job and path.
    let audit = f.store.list_audit(10)?;
    assert_eq!(audit.len(), 3);
    let entry = audit.iter().find(|a| a.job == Some(high)).context("audit entry of the high job")?;
    assert_eq!(entry.action, "job_submit");
    assert_eq!(entry.who, "token:test-admin");
    assert_eq!(entry.site.as_deref(), Some("stage-a"));
    assert_eq!(entry.detail, "/mnt/media/hot.mov");
    Ok(())
}

#[tokio::test]
async fn api_lists_jobs_by_state_and_pages_through_link_headers() -> Result<()> {
    let f = Fixture::new()?;
    let base = gaffer_control::now_ms() - 1_000_000;
    let mut expected = Vec::new();
    for i in 0..250u64 {
        let req = JobRequest {
            path: format!("/mnt/media/clip{i:03}.mov"),
            site: "stage-a".into(),
            agent: None,
            profile: Profile::Shots,
            priority: Priority::Normal,
        };
        // Seven jobs per millisecond: pages must also split between jobs created at the same time.
        let job = gaffer_control::scheduler::new_job(req, JobOrigin::Api, None, base + i / 7)?;
        assert!(f.store.insert_job(&job)?);
        expected.push(job.id);
    }
    f.store.flush()?;
    expected.reverse(); // newest first

    let (ids, sizes, links) = all_pages(&f, "/api/v1/jobs?limit=100").await?;
    assert_eq!(ids, expected, "every job once, newest first");
    assert_eq!(sizes[..3], [100, 100, 50], "pages of 100: {sizes:?}");
    assert!(links.iter().all(|l| l.starts_with("/api/v1/jobs?limit=100&") && l.contains("&after=")), "{links:?}");
    // Without a limit: pages of the default 100.
    let resp = f.send(api_get("/api/v1/jobs", Some(API_TOKEN))).await?;
    assert!(next_link(&resp)?.is_some());
    assert_eq!(json(resp).await?.as_array().map(Vec::len), Some(100));
    // A limit above the maximum is capped, and one page then holds everything.
    let resp = f.send(api_get("/api/v1/jobs?limit=5000", Some(API_TOKEN))).await?;
    assert_eq!(next_link(&resp)?, None);
    assert_eq!(json(resp).await?.as_array().map(Vec::len), Some(250));

    // Cancel three, finish one on the agent: the filters find exactly those, and the next
    // links keep the filters.
    let cancelled: Vec<Uuid> = vec![expected[3], expected[120], expected[240]];
    for id in &cancelled {
        f.state.scheduler.cancel(*id, "test", gaffer_control::now_ms())?;
    }
    f.store.update_job(expected[200], &mut |j| {
        j.state = JobState::Succeeded;
        j.agent = Some(f.agent_id);
        j.finished_at_ms = Some(gaffer_control::now_ms());
        true
    })?;
    let (ids, _, links) = all_pages(&f, "/api/v1/jobs?state=cancelled&limit=2").await?;
    assert_eq!(ids, cancelled, "cancelled jobs, newest first");
    assert!(
        !links.is_empty() && links.iter().all(|l| l.contains("state=cancelled") && l.contains("limit=2")),
        "{links:?}"
    );
    let (ids, _, _) = all_pages(&f, "/api/v1/jobs?state=queued&limit=100").await?;
    assert_eq!(ids.len(), 246);
    assert!(ids.iter().all(|id| !cancelled.contains(id) && *id != expected[200]));
    let (ids, _, _) = all_pages(&f, &format!("/api/v1/jobs?agent={}", f.agent_id)).await?;
    assert_eq!(ids, [expected[200]], "the agent filter");
    let resp = f.send(api_get(&format!("/api/v1/jobs?agent={}&state=succeeded", f.agent_id), Some(API_TOKEN))).await?;
    assert_eq!(json(resp).await?[0]["state"], "succeeded");

    // Bad filters: 400 saying what is accepted.
    let msg =
        assert_json_error(f.send(api_get("/api/v1/jobs?state=done", Some(API_TOKEN))).await?, StatusCode::BAD_REQUEST)
            .await?;
    assert!(msg.contains("queued, assigned, running, succeeded, failed, cancelled"), "{msg}");
    let msg = assert_json_error(
        f.send(api_get("/api/v1/jobs?after=yesterday", Some(API_TOKEN))).await?,
        StatusCode::BAD_REQUEST,
    )
    .await?;
    assert!(msg.contains("after") && msg.contains("<created_at_ms>-<seq>"), "{msg}");
    let msg = assert_json_error(
        f.send(api_get("/api/v1/jobs?agent=gpu-box-07", Some(API_TOKEN))).await?,
        StatusCode::BAD_REQUEST,
    )
    .await?;
    assert!(msg.contains("UUID"), "{msg}");
    assert_json_error(f.send(api_get("/api/v1/jobs?limit=0", Some(API_TOKEN))).await?, StatusCode::BAD_REQUEST).await?;
    Ok(())
}

/// A leasing pass reads queued jobs by the free slots (64 at least) and reads further while slots
/// stay free: a job behind more than that many jobs nobody connected can run (another site's, all
/// queued before it) is still leased in the same pass.
#[test]
fn a_placeable_job_behind_a_long_unplaceable_head_is_leased_in_one_pass() -> Result<()> {
    let f = Fixture::new()?;
    connect_agent(&f)?;
    let head = gaffer_control::scheduler::LEASE_PASS_CHUNK_MIN * 3;
    let mut far = Vec::new();
    for n in 0..head {
        let req = JobRequest {
            path: format!("/mnt/media/far-{n}.mov"),
            site: "far-site".into(),
            agent: None,
            profile: Profile::Shots,
            priority: Priority::Normal,
        };
        far.push(f.state.scheduler.submit(req, JobOrigin::Api, None, gaffer_control::now_ms())?);
    }
    let near = f.submit("/mnt/media/near.mov")?;
    assert_eq!(f.state.scheduler.lease_pass(gaffer_control::now_ms())?, 1);
    let near = f.store.get_job(near.id)?.context("stored")?;
    assert_eq!(near.state, JobState::Assigned, "the job of the connected site is leased");
    assert_eq!(near.lease.map(|l| l.holder), Some(f.agent_id));
    let first = f.state.scheduler.pending_reason(far[0].id).context("a reason for the head")?;
    assert!(first.contains("far-site"), "{first}");
    Ok(())
}

#[tokio::test]
async fn api_cancels_and_retries_jobs() -> Result<()> {
    let f = Fixture::new()?;
    connect_agent(&f)?;
    let job = f.submit("/mnt/media/reel1.mov")?;
    let before = gaffer_control::now_ms();
    assert_eq!(f.state.scheduler.lease_pass(before)?, 1);
    // Leased: the JSON shows the lease, and the agent counts it.
    let leased = json(f.send(api_get(&format!("/api/v1/jobs/{}", job.id), Some(API_TOKEN))).await?).await?;
    assert_eq!(leased["state"], "assigned");
    assert_eq!(leased["lease_id"], 1);
    assert_eq!(leased["attempts"], 1);
    let deadline = leased["lease_deadline_ms"].as_u64().context("assignment deadline")?;
    assert!(deadline >= before + 30_000 && deadline <= gaffer_control::now_ms() + 30_000, "{deadline}");
    assert!(leased["pending_reason"].is_null());
    let agents = json(f.send(api_get("/api/v1/agents", Some(API_TOKEN))).await?).await?;
    assert_eq!(agents["agents"][0]["jobs_running"], 1, "the leased job counts for its holder");
    let page = f.login().await?;
    let body = text(f.send(get(&format!("/jobs/{}", job.id), Some(&format!("gaffer_session={page}")))).await?).await?;
    assert!(
        body.contains(&format!(
            "held by <a href=\"/agents/{0}\"><code>{0}</code></a> · lease id 1 · deadline",
            f.agent_id
        )),
        "lease shown"
    );

    // Cancel the assigned job: cancelled, the agent is told, the lease is gone.
    let resp = f.send(api_post_empty(&format!("/api/v1/jobs/{}/cancel", job.id), Some(API_TOKEN))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let cancelled = json(resp).await?;
    assert_eq!(cancelled["id"], job.id.to_string());
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(cancelled["error"], "cancelled by token:test-admin");
    assert!(cancelled["lease_id"].is_null());
    let outgoing = f.state.scheduler.fleet().take_outgoing(f.agent_id, 1, 10);
    assert!(
        outgoing.iter().any(
            |m| matches!(m, gaffer_protocol::messages::ControlMessage::Cancel { job_id, .. } if *job_id == job.id)
        ),
        "the holder is told to stop: {outgoing:?}"
    );
    // Again: 409, nothing changes.
    let msg = assert_json_error(
        f.send(api_post_empty(&format!("/api/v1/jobs/{}/cancel", job.id), Some(API_TOKEN))).await?,
        StatusCode::CONFLICT,
    )
    .await?;
    assert!(msg.contains("cannot cancel") && msg.contains("cancelled"), "{msg}");

    // Retry: queued again with a fresh attempt budget.
    let resp = f.send(api_post_empty(&format!("/api/v1/jobs/{}/retry", job.id), Some(API_TOKEN))).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let retried = json(resp).await?;
    assert_eq!(retried["state"], "queued");
    assert_eq!(retried["attempts"], 0);
    assert!(retried["agent"].is_null());
    assert_eq!(f.store.get_job(job.id)?.context("stored")?.state, JobState::Queued);
    // Retrying a queued job: 409.
    let msg = assert_json_error(
        f.send(api_post_empty(&format!("/api/v1/jobs/{}/retry", job.id), Some(API_TOKEN))).await?,
        StatusCode::CONFLICT,
    )
    .await?;
    assert!(msg.contains("cannot retry") && msg.contains("queued"), "{msg}");

    // Unknown and malformed ids, and no token.
    for action in ["cancel", "retry"] {
        let msg = assert_json_error(
            f.send(api_post_empty(&format!("/api/v1/jobs/{}/{action}", Uuid::new_v4()), Some(API_TOKEN))).await?,
            StatusCode::NOT_FOUND,
        )
        .await?;
        assert!(msg.contains("job"), "{msg}");
        assert_json_error(
            f.send(api_post_empty(&format!("/api/v1/jobs/x/{action}"), Some(API_TOKEN))).await?,
            StatusCode::BAD_REQUEST,
        )
        .await?;
        assert_json_error(
            f.send(api_post_empty(&format!("/api/v1/jobs/{}/{action}", job.id), None)).await?,
            StatusCode::UNAUTHORIZED,
        )
        .await?;
    }
    assert_eq!(f.store.get_job(job.id)?.context("stored")?.state, JobState::Queued, "refused calls changed nothing");

    // Audit: submit (through the scheduler directly: none), cancel and retry by the API (and the
    // dashboard login above).
    let audit: Vec<_> = f.store.list_audit(10)?.into_iter().filter(|a| a.action != "login").collect();
    let actions: Vec<(&str, &str)> = audit.iter().map(|a| (a.action.as_str(), a.who.as_str())).collect();
    assert_eq!(actions, [("job_retry", "token:test-admin"), ("job_cancel", "token:test-admin")], "newest first");
    assert!(audit.iter().all(|a| a.job == Some(job.id) && a.site.as_deref() == Some("stage-a")));
    assert!(audit[1].detail.contains("cancelled by token:test-admin"), "{}", audit[1].detail);
    Ok(())
}

#[tokio::test]
async fn queued_job_says_why_it_waits() -> Result<()> {
    let f = Fixture::new()?;
    let job = f.submit("/mnt/media/waiting.mov")?;
    let url = format!("/api/v1/jobs/{}", job.id);
    let before = json(f.send(api_get(&url, Some(API_TOKEN))).await?).await?;
    assert!(before["pending_reason"].is_null(), "no reason before a leasing pass");
    // No agent connected (the store says "connected", but no link is up).
    assert_eq!(f.state.scheduler.lease_pass(gaffer_control::now_ms())?, 0);
    let reason = "no agent of site stage-a is connected";
    let after = json(f.send(api_get(&url, Some(API_TOKEN))).await?).await?;
    assert_eq!(after["pending_reason"], reason);
    let list = json(f.send(api_get("/api/v1/jobs", Some(API_TOKEN))).await?).await?;
    assert_eq!(list[0]["pending_reason"], reason);

    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let page = text(f.send(get(&format!("/jobs/{}", job.id), Some(&cookie))).await?).await?;
    assert!(page.contains(&format!("<strong>Waiting:</strong> {reason}")), "job page shows the reason");
    assert!(page.contains("<dt>Priority</dt><dd><span class=\"priority priority-normal\">normal</span>"));
    assert!(page.contains("<dt>Attempts</dt><dd>0 of 3</dd>"));
    assert!(page.contains(&format!("action=\"/jobs/{}/cancel\"", job.id)), "cancel button on a queued job");
    assert!(!page.contains("/retry\""), "no retry button on a queued job");
    let jobs = text(f.send(get("/jobs", Some(&cookie))).await?).await?;
    assert!(jobs.contains(&format!("<td class=\"pending\">{reason}</td>")), "jobs page shows the reason");

    // Once cancelled, the reason is gone and the retry button is there.
    f.state.scheduler.cancel(job.id, "test", gaffer_control::now_ms())?;
    let cancelled = json(f.send(api_get(&url, Some(API_TOKEN))).await?).await?;
    assert!(cancelled["pending_reason"].is_null());
    let page = text(f.send(get(&format!("/jobs/{}", job.id), Some(&cookie))).await?).await?;
    assert!(!page.contains("Waiting:"));
    assert!(page.contains(&format!("action=\"/jobs/{}/retry\"", job.id)), "retry button on a cancelled job");
    assert!(!page.contains("/cancel\""), "no cancel button on a cancelled job");
    assert!(page.contains("<strong>Cancelled:</strong> cancelled by test"));
    Ok(())
}

#[tokio::test]
async fn dashboard_cancel_and_retry_need_the_csrf_token() -> Result<()> {
    let f = Fixture::new()?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let csrf = f.csrf(&session).await?;
    let job = f.submit("/mnt/media/reel3.mov")?;
    let cancel = format!("/jobs/{}/cancel", job.id);
    let retry = format!("/jobs/{}/retry", job.id);
    let state = || -> Result<JobState> { Ok(f.store.get_job(job.id)?.context("stored")?.state) };

    // The job page's cancel form carries the session's token.
    let page = text(f.send(get(&format!("/jobs/{}", job.id), Some(&cookie))).await?).await?;
    let form = page.find(&format!("action=\"{cancel}\"")).context("cancel form")?;
    assert!(page[form..].contains(&format!("name=\"csrf\" value=\"{csrf}\"")));

    // Without a token, with a wrong one, without a session: refused, the job stays queued.
    assert_eq!(f.send(post_form(&cancel, Some(&cookie), "")).await?.status(), StatusCode::FORBIDDEN);
    let resp = f.send(post_form(&cancel, Some(&cookie), &format!("csrf=AAAA{}", &csrf[4..]))).await?;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(text(resp).await?.contains("CSRF"), "an HTML page saying why");
    let resp = f.send(post_form(&cancel, None, &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()), Some("/login"));
    assert_eq!(state()?, JobState::Queued);

    // With it: cancelled, back to the job page.
    let resp = f.send(post_form(&cancel, Some(&cookie), &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/jobs/{}", job.id).as_str())
    );
    assert_eq!(state()?, JobState::Cancelled);
    assert_eq!(f.store.get_job(job.id)?.and_then(|j| j.error).as_deref(), Some("cancelled by admin"));
    // Cancelling it again: 409 page with the refusal.
    let resp = f.send(post_form(&cancel, Some(&cookie), &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    let body = text(resp).await?;
    assert!(body.contains("<html") && body.contains("cannot cancel"), "{body}");

    // Retry: same rules.
    assert_eq!(f.send(post_form(&retry, Some(&cookie), "csrf=nope")).await?.status(), StatusCode::FORBIDDEN);
    assert_eq!(state()?, JobState::Cancelled);
    let resp = f.send(post_form(&retry, Some(&cookie), &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some(format!("/jobs/{}", job.id).as_str())
    );
    assert_eq!(state()?, JobState::Queued);
    assert_eq!(f.send(post_form(&retry, Some(&cookie), &format!("csrf={csrf}"))).await?.status(), StatusCode::CONFLICT);
    let resp =
        f.send(post_form(&format!("/jobs/{}/retry", Uuid::new_v4()), Some(&cookie), &format!("csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let audit = f.store.list_audit(10)?;
    let actions: Vec<(&str, &str)> = audit.iter().map(|a| (a.action.as_str(), a.who.as_str())).collect();
    assert_eq!(actions, [("job_retry", "admin"), ("job_cancel", "admin"), ("login", "admin")]);
    // The audit page shows them.
    let page = text(f.send(get("/audit", Some(&cookie))).await?).await?;
    assert!(page.contains("job_cancel") && page.contains("<td>admin</td>"));
    assert!(page.contains(&format!("<a href=\"/jobs/{}\">", job.id)), "audit entries link to their job");
    Ok(())
}

#[tokio::test]
async fn dashboard_job_form_priority_jobs_filter_paging_and_fleet_counts() -> Result<()> {
    let f = Fixture::new()?;
    let session = f.login().await?;
    let cookie = format!("gaffer_session={session}");
    let csrf = f.csrf(&session).await?;

    // The form has a priority select (normal preselected) and takes it.
    let form = text(f.send(get("/jobs/new", Some(&cookie))).await?).await?;
    assert!(form.contains("<select name=\"priority\">"));
    assert!(form.contains("<option value=\"normal\" selected>normal</option>"));
    let fields = "path=%2Fmnt%2Fmedia%2Furgent.mov&site=stage-a&agent=&profile=shots";
    let resp = f.send(post_form("/jobs", Some(&cookie), &format!("{fields}&priority=high&csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).context("location")?.to_owned();
    let id: Uuid = location.strip_prefix("/jobs/").context("job page")?.parse()?;
    assert_eq!(f.store.get_job(id)?.context("stored")?.priority, Priority::High);
    let audit = f.store.list_audit(1)?;
    assert_eq!((audit[0].action.as_str(), audit[0].who.as_str(), audit[0].job), ("job_submit", "admin", Some(id)));
    let resp = f.send(post_form("/jobs", Some(&cookie), &format!("{fields}&priority=asap&csrf={csrf}"))).await?;
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(text(resp).await?.contains("unknown priority"));
    assert_eq!(f.job_count()?, 1);

    // 204 more jobs; cancel one.
    for i in 0..204 {
        f.submit(&format!("/mnt/media/batch{i:03}.mov"))?;
    }
    f.state.scheduler.cancel(id, "test", gaffer_control::now_ms())?;

    // Page 1: 200 rows and a next link; page 2: the other 5, with a link back.
    let rows = |page: &str| page.matches("<tr>\n  <td><span class=\"state").count();
    let first = text(f.send(get("/jobs", Some(&cookie))).await?).await?;
    assert_eq!(rows(&first), 200);
    let start = first.find("<a rel=\"next\" href=\"").context("next page link")? + "<a rel=\"next\" href=\"".len();
    let next = first[start..].split('"').next().context("link end")?.replace("&amp;", "&");
    assert!(next.starts_with("/jobs?after="), "{next}");
    let second = text(f.send(get(&next, Some(&cookie))).await?).await?;
    assert_eq!(rows(&second), 5);
    assert!(!second.contains("rel=\"next\""));
    assert!(second.contains("href=\"/jobs\">First page"));
    assert!(second.contains("urgent.mov"), "the oldest job is on the last page");

    // The state filter: a GET form; only cancelled jobs, shown as cancelled.
    assert!(first.contains("<form class=\"filter\" method=\"get\" action=\"/jobs\">"));
    let cancelled = text(f.send(get("/jobs?state=cancelled", Some(&cookie))).await?).await?;
    assert_eq!(rows(&cancelled), 1);
    assert!(cancelled.contains("<span class=\"state state-cancelled\">cancelled</span>"));
    assert!(cancelled.contains("<option value=\"cancelled\" selected>cancelled</option>"));
    let resp = f.send(get("/jobs?state=bogus", Some(&cookie))).await?;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(text(resp).await?.contains("known: queued"));

    // The fleet page counts all six states from the store's counts.
    let fleet = text(f.send(get("/", Some(&cookie))).await?).await?;
    for (state, n) in
        [("queued", 204), ("assigned", 0), ("running", 0), ("succeeded", 0), ("failed", 0), ("cancelled", 1)]
    {
        let count =
            format!("<a class=\"count state-{state}\" href=\"/jobs?state={state}\"><span class=\"n\">{n}</span>");
        assert!(fleet.contains(&count), "fleet page lacks {count}");
    }
    Ok(())
}
