//! Authorization over the real router and a real `SledStore`: every route of
//! `gaffer_control::http::ROUTES` for every role and for no credentials; API tokens that are
//! revoked, expired or of too low a role; sessions that end when their user's password changes or
//! the user goes; login throttling per address and per user name; the audit of it all.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, Response, StatusCode};
use axum::Router;
use gaffer_control::admin;
use gaffer_control::http::{router, Access, ROUTES};
use gaffer_control::scheduler::{JobRequest, SchedulerConfig};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{
    Actor, AgentRecord, ApiTokenRecord, AuditQuery, JobOrigin, JobState, Priority, Role, SessionRecord, Store,
};
use gaffer_control::AppState;
use gaffer_protocol::messages::{Capabilities, Profile};
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;
use uuid::Uuid;

const PASSWORD: &str = "a long enough test password";

/// Who sends a request in the table test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Nobody,
    As(Role),
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<SledStore>,
    state: AppState,
    app: Router,
    agent_id: Uuid,
    /// A bearer token per role.
    tokens: Vec<(Role, String)>,
}

impl Fixture {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(SledStore::open(&dir.path().join("db"))?);
        let root = Actor::OsUser { uid: 0, name: Some("root".into()) };
        let phc = admin::hash_password(PASSWORD)?;
        let mut tokens = Vec::new();
        for role in Role::ALL {
            admin::add_user(store.as_ref(), &root, role.as_str(), role, &phc)?;
            let minted = admin::mint_api_token(store.as_ref(), &root, &format!("{role}-token"), role, 3600)?;
            tokens.push((role, minted.token));
        }
        let agent_id = Uuid::new_v4();
        store.insert_agent(&AgentRecord {
            cert_not_after_unix: 1_800_000_000,
            agent_version: Some("0.1.0".into()),
            capabilities: Some(Capabilities {
                gpus: vec![],
                volumes: vec!["/mnt/media".into()],
                watch_roots: vec![],
                job_slots: 2,
                profiles: vec![Profile::Shots],
                models: vec![],
            }),
            ..AgentRecord::new(agent_id, "stage-a", "gpu-box-01", 1_700_000_000_000)
        })?;
        let shared: Arc<dyn Store> = store.clone();
        let state = AppState::new(shared, SchedulerConfig::default());
        // One router for the whole test: its login throttle lives as long as a server's would.
        let app = router(state.clone());
        Ok(Fixture { _dir: dir, store, state, app, agent_id, tokens })
    }

    async fn send_from(&self, addr: [u8; 4], mut req: Request<Body>) -> Result<Response<Body>> {
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((addr, 40000))));
        Ok(self.app.clone().oneshot(req).await?)
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<Body>> {
        self.send_from([127, 0, 0, 1], req).await
    }

    fn token(&self, role: Role) -> &str {
        self.tokens.iter().find(|(r, _)| *r == role).map(|(_, t)| t.as_str()).unwrap_or_default()
    }

    /// A fresh session of the user named after `role`: (cookie value, CSRF token).
    fn session(&self, role: Role) -> Result<(String, String)> {
        let user = self.store.get_user(role.as_str())?.context("user of the role")?;
        let value = format!("session-{}", Uuid::new_v4());
        let csrf = format!("csrf-{}", Uuid::new_v4());
        let now = gaffer_control::now_ms();
        self.store.insert_session(&SessionRecord {
            id_hash: Sha256::digest(value.as_bytes()).into(),
            csrf_token: csrf.clone(),
            created_at_ms: now,
            expires_at_ms: now + 3_600_000,
            user: user.name,
            role: user.role,
            password_changed_at_ms: user.password_changed_at_ms,
        })?;
        Ok((value, csrf))
    }

    /// A queued job, through the scheduler.
    fn queued_job(&self) -> Result<Uuid> {
        let req = JobRequest {
            path: format!("/mnt/media/{}.mp4", Uuid::new_v4()),
            site: "stage-a".into(),
            agent: None,
            profile: Profile::Shots,
            priority: Priority::Normal,
        };
        Ok(self.state.scheduler.submit(req, JobOrigin::Api, None, gaffer_control::now_ms())?.id)
    }

    /// A fresh enrolled agent with a certificate serial on record (revoke applies).
    fn revocable_agent(&self) -> Result<Uuid> {
        let mut agent = self.store.get_agent(self.agent_id)?.context("the fixture's agent")?;
        agent.id = Uuid::new_v4();
        agent.cert_serial_hex = Some(format!("{:032x}", agent.id.as_u128() >> 1));
        self.store.insert_agent(&agent)?;
        Ok(agent.id)
    }

    fn scheduling(&self, id: Uuid) -> Result<&'static str> {
        Ok(self.store.get_agent(id)?.context("agent")?.scheduling.name())
    }

    fn is_revoked(&self, id: Uuid) -> Result<bool> {
        Ok(self.store.get_agent(id)?.context("agent")?.revoked_at_ms.is_some())
    }

    /// A cancelled job (retry applies).
    fn cancelled_job(&self) -> Result<Uuid> {
        let id = self.queued_job()?;
        self.state.scheduler.cancel(id, "test", gaffer_control::now_ms())?;
        Ok(id)
    }

    /// Whether a webhook target has this name or id.
    fn has_webhook(&self, key: &str) -> Result<bool> {
        Ok(self.store.list_webhook_targets()?.iter().any(|t| t.name == key || t.id.to_string() == key))
    }

    /// Whether a delivery to this target is queued.
    fn webhook_tested(&self, id: Uuid) -> Result<bool> {
        Ok(self.store.list_webhook_deliveries(1000)?.iter().any(|d| d.target_id == id))
    }

    /// A new webhook target; its id.
    fn webhook_target(&self) -> Result<Uuid> {
        let spec = gaffer_control::webhook::TargetSpec {
            name: Some(format!("t-{}", Uuid::new_v4().simple())),
            destination: gaffer_control::webhook::Destination::Http {
                url: "https://hooks.example.com/t".into(),
                format: gaffer_control::webhook::BodyFormat::Json,
            },
            events: vec![gaffer_control::webhook::EventKind::JobFailed],
            secret: None,
        };
        let info = gaffer_control::webhook::add_target(self.store.as_ref(), &Actor::ControlPlane, spec, 1)?;
        Ok(info.id)
    }

    fn job_state(&self, id: Uuid) -> Result<JobState> {
        Ok(self.store.get_job(id)?.context("job")?.state)
    }

    fn job_count(&self) -> Result<u64> {
        Ok(self.store.job_counts()?.0.iter().sum())
    }

    /// The login form's CSRF cookie value.
    async fn login_csrf(&self) -> Result<String> {
        let form = self.send(Request::get("/login").body(Body::empty())?).await?;
        cookie_value(&form, "gaffer_login_csrf").context("the login form sets its CSRF cookie")
    }

    /// Posts the login form for `user` from `addr`; returns the status.
    async fn login_from(&self, addr: [u8; 4], user: &str, password: &str) -> Result<StatusCode> {
        let csrf = self.login_csrf().await?;
        let req = Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::COOKIE, format!("gaffer_login_csrf={csrf}"))
            .body(Body::from(format!("csrf={csrf}&user={user}&password={}", password.replace(' ', "+"))))?;
        Ok(self.send_from(addr, req).await?.status())
    }
}

fn cookie_value(resp: &Response<Body>, name: &str) -> Option<String> {
    resp.headers().get_all(header::SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        let (k, rest) = c.split_once('=')?;
        (k == name).then(|| rest.split(';').next().unwrap_or_default().to_owned()).filter(|v| !v.is_empty())
    })
}

async fn body_text(resp: Response<Body>) -> Result<String> {
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22).await?;
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// What a request of the table test must change (checked after a refused one: nothing).
enum Effect {
    None,
    /// A job is added.
    NewJob,
    /// This job leaves this state.
    JobLeaves(Uuid, JobState),
    /// This agent is revoked.
    AgentRevoked(Uuid),
    /// This agent's scheduling state becomes this (`active`, `cordoned`, `draining`); refused, it
    /// stays what it was (the second name).
    Scheduling(Uuid, &'static str, &'static str),
    /// A webhook target with this name is added.
    WebhookAdded(String),
    /// This webhook target is removed.
    WebhookRemoved(Uuid),
    /// A test delivery to this webhook target is queued.
    WebhookTested(Uuid),
}

/// The policy, written down independently of the crate's table: the lowest role that may use
/// each route (`None`: public). Viewers read; operators also submit, cancel and retry; admins also
/// read the audit log.
fn lowest_role(method: &Method, path: &str) -> Result<Option<Role>> {
    Ok(match (method.as_str(), path) {
        ("GET", "/login") | ("POST", "/login") | ("GET", "/metrics") | ("GET", "/static/app.css") => None,
        // The API's OpenAPI description: it describes the API and holds nothing about the fleet.
        ("GET", "/api/v1/openapi.json") => None,
        // Installing an agent: signed or fingerprint-checked material, public.
        ("GET", "/install/agent.sh")
        | ("GET", "/install/ca.pem")
        | ("GET", "/releases/index.json")
        | ("GET", "/releases/release.pub")
        | ("GET", "/releases/{file}") => None,
        ("GET", "/api/v1/audit") | ("GET", "/audit") => Some(Role::Admin),
        ("POST", "/api/v1/agents/{id}/revoke") | ("POST", "/agents/{id}/revoke") => Some(Role::Admin),
        ("POST", "/rollouts/pause") | ("POST", "/rollouts/resume") | ("POST", "/rollouts/abort") => Some(Role::Admin),
        ("POST", "/api/v1/agents/{id}/drain")
        | ("POST", "/api/v1/agents/{id}/cordon")
        | ("POST", "/api/v1/agents/{id}/uncordon")
        | ("POST", "/agents/{id}/drain")
        | ("POST", "/agents/{id}/cordon")
        | ("POST", "/agents/{id}/uncordon") => Some(Role::Operator),
        ("GET", "/webhooks")
        | ("POST", "/webhooks")
        | ("POST", "/webhooks/{id}/remove")
        | ("POST", "/webhooks/{id}/test") => Some(Role::Admin),
        ("POST", "/api/v1/jobs")
        | ("POST", "/api/v1/jobs/{id}/cancel")
        | ("POST", "/api/v1/jobs/{id}/retry")
        | ("POST", "/jobs")
        | ("GET", "/jobs/new")
        | ("POST", "/jobs/{id}/cancel")
        | ("POST", "/jobs/{id}/retry") => Some(Role::Operator),
        ("GET", "/api/v1/agents")
        | ("GET", "/api/v1/agents/{id}")
        | ("GET", "/api/v1/jobs")
        | ("GET", "/api/v1/jobs/{id}")
        | ("GET", "/api/v1/jobs/{id}/export")
        | ("GET", "/api/v1/jobs/{id}/custody")
        | ("GET", "/jobs/{id}/export")
        | ("GET", "/")
        | ("POST", "/logout")
        | ("GET", "/refresh")
        | ("GET", "/agents/{id}")
        | ("GET", "/jobs")
        | ("GET", "/jobs/{id}")
        | ("GET", "/rollouts") => Some(Role::Viewer),
        (m, p) => bail!("route {m} {p} has no expected role in the table test: add one"),
    })
}

/// The request for one route and caller, the status it gets when allowed, and what it changes.
async fn case(f: &Fixture, method: &Method, path: &str, caller: Caller) -> Result<(Request<Body>, StatusCode, Effect)> {
    let api = path.starts_with("/api/");
    let mut b = Request::builder().method(method.clone());
    // Credentials: API by bearer token, dashboard by a fresh session cookie (+ its CSRF token).
    let mut csrf = String::new();
    if let Caller::As(role) = caller {
        if api {
            b = b.header(header::AUTHORIZATION, format!("Bearer {}", f.token(role)));
        } else {
            let (cookie, token) = f.session(role)?;
            b = b.header(header::COOKIE, format!("gaffer_session={cookie}"));
            csrf = token;
        }
    }
    let form = |b: axum::http::request::Builder, body: String| -> Result<Request<Body>> {
        Ok(b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(Body::from(body))?)
    };
    let empty =
        |b: axum::http::request::Builder, uri: String| -> Result<Request<Body>> { Ok(b.uri(uri).body(Body::empty())?) };
    let agent = f.agent_id;
    Ok(match (method.as_str(), path) {
        ("GET", "/api/v1/agents") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/api/v1/agents/{id}") => (empty(b, format!("/api/v1/agents/{agent}"))?, StatusCode::OK, Effect::None),
        ("GET", "/api/v1/jobs") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("POST", "/api/v1/agents/{id}/revoke") => {
            let id = f.revocable_agent()?;
            (empty(b, format!("/api/v1/agents/{id}/revoke"))?, StatusCode::OK, Effect::AgentRevoked(id))
        }
        ("POST", "/api/v1/agents/{id}/drain" | "/api/v1/agents/{id}/cordon" | "/api/v1/agents/{id}/uncordon")
        | ("POST", "/agents/{id}/drain" | "/agents/{id}/cordon" | "/agents/{id}/uncordon") => {
            let id = f.revocable_agent()?;
            let action = path.rsplit('/').next().unwrap_or_default();
            let (after, before) = match action {
                "drain" => ("draining", "active"),
                "cordon" => ("cordoned", "active"),
                _ => {
                    f.store.update_agent(id, &mut |a| {
                        a.scheduling = gaffer_control::store::Scheduling::Cordoned { by: "op".into(), at_ms: 1 }
                    })?;
                    ("active", "cordoned")
                }
            };
            let uri = path.replace("{id}", &id.to_string());
            if api {
                (empty(b, uri)?, StatusCode::OK, Effect::Scheduling(id, after, before))
            } else {
                (
                    form(b.uri(uri), format!("csrf={csrf}"))?,
                    StatusCode::SEE_OTHER,
                    Effect::Scheduling(id, after, before),
                )
            }
        }
        ("POST", "/api/v1/jobs") => (
            b.uri(path)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"path": "/mnt/media/new.mp4", "site": "stage-a"}"#))?,
            StatusCode::CREATED,
            Effect::NewJob,
        ),
        ("GET", "/api/v1/jobs/{id}") => {
            (empty(b, format!("/api/v1/jobs/{}", f.queued_job()?))?, StatusCode::OK, Effect::None)
        }
        // A queued job's custody has its submission and no hash yet (tests/custody.rs fetches real ones).
        ("GET", "/api/v1/jobs/{id}/custody") => {
            (empty(b, format!("/api/v1/jobs/{}/custody", f.queued_job()?))?, StatusCode::OK, Effect::None)
        }
        // A queued job has no digest yet: an allowed caller gets 409 (tests/exports.rs fetches real ones).
        ("GET", "/api/v1/jobs/{id}/export") => (
            empty(b, format!("/api/v1/jobs/{}/export?format=otio", f.queued_job()?))?,
            StatusCode::CONFLICT,
            Effect::None,
        ),
        ("POST", "/api/v1/jobs/{id}/cancel") => {
            let id = f.queued_job()?;
            (empty(b, format!("/api/v1/jobs/{id}/cancel"))?, StatusCode::OK, Effect::JobLeaves(id, JobState::Queued))
        }
        ("POST", "/api/v1/jobs/{id}/retry") => {
            let id = f.cancelled_job()?;
            (empty(b, format!("/api/v1/jobs/{id}/retry"))?, StatusCode::OK, Effect::JobLeaves(id, JobState::Cancelled))
        }
        ("GET", "/api/v1/audit") => (empty(b, "/api/v1/audit?limit=5".into())?, StatusCode::OK, Effect::None),
        ("GET", "/") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/login") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/install/agent.sh") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        // This fixture runs without a PKI and data directory (tests/tests/install.rs serves them).
        ("GET", "/install/ca.pem") | ("GET", "/releases/index.json") | ("GET", "/releases/release.pub") => {
            (empty(b, path.into())?, StatusCode::NOT_FOUND, Effect::None)
        }
        ("GET", "/releases/{file}") => {
            (empty(b, "/releases/gaffer-agent-1.0.0-x86_64-linux.tar.gz".into())?, StatusCode::NOT_FOUND, Effect::None)
        }
        ("POST", "/login") => {
            // Public: the same valid login whoever sends it.
            let login = f.login_csrf().await?;
            let b = b.uri(path).header(header::COOKIE, format!("gaffer_login_csrf={login}"));
            let body = format!("csrf={login}&user=viewer&password={}", PASSWORD.replace(' ', "+"));
            (form(b, body)?, StatusCode::SEE_OTHER, Effect::None)
        }
        ("POST", "/logout") => (form(b.uri(path), format!("csrf={csrf}"))?, StatusCode::SEE_OTHER, Effect::None),
        ("GET", "/refresh") => {
            (empty(b, "/refresh?auto=off&back=%2Fjobs".into())?, StatusCode::SEE_OTHER, Effect::None)
        }
        ("GET", "/agents/{id}") => (empty(b, format!("/agents/{agent}"))?, StatusCode::OK, Effect::None),
        ("GET", "/jobs") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("POST", "/agents/{id}/revoke") => {
            let id = f.revocable_agent()?;
            let req = form(b.uri(format!("/agents/{id}/revoke")), format!("csrf={csrf}"))?;
            (req, StatusCode::SEE_OTHER, Effect::AgentRevoked(id))
        }
        ("POST", "/jobs") => (
            form(b.uri(path), format!("csrf={csrf}&path=%2Fmnt%2Fmedia%2Fform.mp4&site=stage-a&priority=normal"))?,
            StatusCode::SEE_OTHER,
            Effect::NewJob,
        ),
        ("GET", "/jobs/new") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/jobs/{id}") => (empty(b, format!("/jobs/{}", f.queued_job()?))?, StatusCode::OK, Effect::None),
        ("GET", "/jobs/{id}/export") => {
            (empty(b, format!("/jobs/{}/export?format=edl", f.queued_job()?))?, StatusCode::CONFLICT, Effect::None)
        }
        ("POST", "/jobs/{id}/cancel") => {
            let id = f.queued_job()?;
            let req = form(b.uri(format!("/jobs/{id}/cancel")), format!("csrf={csrf}"))?;
            (req, StatusCode::SEE_OTHER, Effect::JobLeaves(id, JobState::Queued))
        }
        ("POST", "/jobs/{id}/retry") => {
            let id = f.cancelled_job()?;
            let req = form(b.uri(format!("/jobs/{id}/retry")), format!("csrf={csrf}"))?;
            (req, StatusCode::SEE_OTHER, Effect::JobLeaves(id, JobState::Cancelled))
        }
        ("GET", "/audit") => (empty(b, "/audit?action=login".into())?, StatusCode::OK, Effect::None),
        ("GET", "/rollouts") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        // No rollout runs (this app state has no rollouts): an allowed caller gets 409.
        ("POST", "/rollouts/pause") | ("POST", "/rollouts/resume") | ("POST", "/rollouts/abort") => {
            (form(b.uri(path), format!("csrf={csrf}"))?, StatusCode::CONFLICT, Effect::None)
        }
        ("GET", "/webhooks") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("POST", "/webhooks") => {
            // A fresh name per case: an allowed caller adds it, a refused one adds nothing.
            let name = format!("hook-{}", Uuid::new_v4().simple());
            let body = format!("csrf={csrf}&name={name}&url=https%3A%2F%2Fhooks.example.com%2Fx&ev_job_failed=on");
            (form(b.uri(path), body)?, StatusCode::SEE_OTHER, Effect::WebhookAdded(name))
        }
        ("POST", "/webhooks/{id}/remove") | ("POST", "/webhooks/{id}/test") => {
            let id = f.webhook_target()?;
            let action = path.rsplit('/').next().unwrap_or_default();
            let req = form(b.uri(format!("/webhooks/{id}/{action}")), format!("csrf={csrf}"))?;
            let effect = if action == "remove" { Effect::WebhookRemoved(id) } else { Effect::WebhookTested(id) };
            (req, StatusCode::SEE_OTHER, effect)
        }
        ("GET", "/metrics") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/api/v1/openapi.json") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        ("GET", "/static/app.css") => (empty(b, path.into())?, StatusCode::OK, Effect::None),
        (m, p) => bail!("route {m} {p} has no case in the table test: add one (request, status when allowed)"),
    })
}

/// Every route the router serves, for no credentials and for every role: allowed callers get the
/// route's real answer (and its effect happens); API callers without a valid token get 401,
/// dashboard ones a redirect to /login; a role too low gets 403 (JSON or a page) and changes
/// nothing.
#[tokio::test]
async fn every_route_checks_the_role_of_every_caller() -> Result<()> {
    let f = Fixture::new()?;
    let mut seen = HashSet::new();
    let mut checked = 0;
    for spec in ROUTES {
        assert!(seen.insert((spec.method.clone(), spec.path)), "{spec:?} is listed twice");
        let lowest = lowest_role(&spec.method, spec.path)?;
        let declared = match spec.access {
            Access::Public => None,
            Access::Permission(p) => Some(p.min_role()),
        };
        assert_eq!(declared, lowest, "{spec:?}: the route table disagrees with the policy");
        for caller in [Caller::Nobody, Caller::As(Role::Viewer), Caller::As(Role::Operator), Caller::As(Role::Admin)] {
            let (req, allowed_status, effect) = case(&f, &spec.method, spec.path, caller).await?;
            let jobs_before = f.job_count()?;
            let allowed = match (lowest, caller) {
                (None, _) => true,
                (Some(_), Caller::Nobody) => false,
                (Some(min), Caller::As(role)) => role >= min,
            };
            let resp = f.send(req).await?;
            let status = resp.status();
            let what = format!("{spec:?} as {caller:?}");
            let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let content_type =
                resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let body = body_text(resp).await?;
            if allowed {
                assert_eq!(status, allowed_status, "{what}: {body}");
                match effect {
                    Effect::None => {}
                    Effect::NewJob => assert_eq!(f.job_count()?, jobs_before + 1, "{what} adds a job"),
                    Effect::JobLeaves(id, s) => assert_ne!(f.job_state(id)?, s, "{what} changes the job"),
                    Effect::AgentRevoked(id) => assert!(f.is_revoked(id)?, "{what} revokes the agent"),
                    Effect::Scheduling(id, after, _) => assert_eq!(f.scheduling(id)?, after, "{what}"),
                    Effect::WebhookAdded(ref name) => assert!(f.has_webhook(name)?, "{what} adds the target"),
                    Effect::WebhookRemoved(id) => assert!(!f.has_webhook(&id.to_string())?, "{what} removes it"),
                    Effect::WebhookTested(id) => assert!(f.webhook_tested(id)?, "{what} queues a test delivery"),
                }
            } else {
                match (spec.is_api(), caller) {
                    (true, Caller::Nobody) => assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}"),
                    (false, Caller::Nobody) => {
                        assert_eq!(status, StatusCode::SEE_OTHER, "{what}");
                        assert_eq!(location.as_deref(), Some("/login"), "{what}");
                    }
                    (api, Caller::As(role)) => {
                        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {body}");
                        assert!(body.contains(&format!("has role {role}")), "{what} says why: {body}");
                        let expected = if api { "application/json" } else { "text/html" };
                        assert!(content_type.starts_with(expected), "{what}: {content_type}");
                    }
                }
                assert_eq!(f.job_count()?, jobs_before, "{what} was refused but added a job");
                if let Effect::JobLeaves(id, s) = effect {
                    assert_eq!(f.job_state(id)?, s, "{what} was refused but changed the job");
                }
                if let Effect::AgentRevoked(id) = effect {
                    assert!(!f.is_revoked(id)?, "{what} was refused but revoked the agent");
                }
                if let Effect::Scheduling(id, _, before) = effect {
                    assert_eq!(f.scheduling(id)?, before, "{what} was refused but changed the agent");
                }
                match effect {
                    Effect::WebhookAdded(ref name) => assert!(!f.has_webhook(name)?, "{what} was refused but added"),
                    Effect::WebhookRemoved(id) => {
                        assert!(f.has_webhook(&id.to_string())?, "{what} was refused but removed")
                    }
                    Effect::WebhookTested(id) => assert!(!f.webhook_tested(id)?, "{what} was refused but queued"),
                    _ => {}
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len() * 4);
    // The public routes are exactly these; everything else needs a role.
    let public: HashSet<&str> = ROUTES.iter().filter(|r| r.access == Access::Public).map(|r| r.path).collect();
    assert_eq!(
        public,
        HashSet::from([
            "/login",
            "/metrics",
            "/static/app.css",
            "/api/v1/openapi.json",
            "/install/agent.sh",
            "/install/ca.pem",
            "/releases/index.json",
            "/releases/release.pub",
            "/releases/{file}",
        ])
    );
    Ok(())
}

#[tokio::test]
async fn revoked_expired_and_unknown_tokens_are_refused_at_once() -> Result<()> {
    let f = Fixture::new()?;
    let get = |token: &str| -> Result<Request<Body>> {
        Ok(Request::get("/api/v1/jobs").header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty())?)
    };
    let root = Actor::OsUser { uid: 0, name: Some("root".into()) };
    let minted = admin::mint_api_token(f.store.as_ref(), &root, "short-lived", Role::Viewer, 3600)?;
    assert_eq!(f.send(get(&minted.token)?).await?.status(), StatusCode::OK);
    let listed = f.store.list_api_tokens()?;
    let used = listed.iter().find(|t| t.name == "short-lived").context("listed")?;
    assert!(used.last_used_at_ms.is_some(), "last use is recorded");
    admin::revoke_api_token(f.store.as_ref(), &root, "short-lived")?;
    assert_eq!(f.send(get(&minted.token)?).await?.status(), StatusCode::UNAUTHORIZED, "revoked: refused at once");

    // Expired a moment ago.
    let expired = "gfa_expired0123456789abcdefghijklmnopqrstuv";
    f.store.create_api_token(&ApiTokenRecord {
        hash: Sha256::digest(expired.as_bytes()).into(),
        name: "expired".into(),
        role: Role::Admin,
        created_at_ms: 1,
        expires_at_ms: gaffer_control::now_ms() - 1,
        last_used_at_ms: None,
        created_by: "test".into(),
    })?;
    assert_eq!(f.send(get(expired)?).await?.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(f.send(get("gfa_never-minted")?).await?.status(), StatusCode::UNAUTHORIZED);
    // Names are unique; TTLs are bounded.
    assert!(admin::mint_api_token(f.store.as_ref(), &root, "viewer-token", Role::Admin, 60).is_err());
    assert!(admin::mint_api_token(f.store.as_ref(), &root, "too-long", Role::Admin, 400 * 86_400).is_err());
    assert!(admin::mint_api_token(f.store.as_ref(), &root, "Bad Name", Role::Admin, 60).is_err());
    // Minting and revoking are audited with the actor.
    let audit = f.store.list_audit(100)?;
    assert!(audit
        .iter()
        .any(|a| a.action == "api_token_revoke" && a.who == "uid 0 (root)" && a.detail.contains("short-lived")));
    Ok(())
}

#[tokio::test]
async fn a_password_change_or_removal_ends_the_users_sessions() -> Result<()> {
    let f = Fixture::new()?;
    let root = Actor::OsUser { uid: 0, name: Some("root".into()) };
    let page = |cookie: &str| -> Result<Request<Body>> {
        Ok(Request::get("/").header(header::COOKIE, format!("gaffer_session={cookie}")).body(Body::empty())?)
    };
    let (operator, _) = f.session(Role::Operator)?;
    let (other, _) = f.session(Role::Viewer)?;
    let resp = f.send(page(&operator)?).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let html = body_text(resp).await?;
    assert!(html.contains("operator") && html.contains("(operator)"), "the header shows who and the role");
    let change =
        admin::set_password(f.store.as_ref(), &root, "operator", &admin::hash_password("another long password")?)?;
    assert_eq!(change.sessions_ended, 1);
    let resp = f.send(page(&operator)?).await?;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "the old session is over");
    assert_eq!(f.send(page(&other)?).await?.status(), StatusCode::OK, "other users' sessions go on");
    // A session that survived in the store (written before the change) is refused all the same.
    let (stale, _) = f.session(Role::Viewer)?;
    f.store.set_user_password("viewer", &admin::hash_password("a third long password")?, gaffer_control::now_ms())?;
    assert_eq!(f.send(page(&stale)?).await?.status(), StatusCode::SEE_OTHER);

    let (admin_session, _) = f.session(Role::Admin)?;
    // The last admin stays; a removed user's sessions end.
    assert!(admin::remove_user(f.store.as_ref(), &root, "admin").is_err(), "the last admin cannot be removed");
    admin::add_user(f.store.as_ref(), &root, "second-admin", Role::Admin, &admin::hash_password(PASSWORD)?)?;
    let removed = admin::remove_user(f.store.as_ref(), &root, "admin")?;
    assert_eq!(removed.sessions_ended, 1);
    assert_eq!(f.send(page(&admin_session)?).await?.status(), StatusCode::SEE_OTHER);
    let actions: Vec<String> = f.store.list_audit(20)?.into_iter().map(|a| format!("{} {}", a.action, a.who)).collect();
    assert!(actions.contains(&"user_remove uid 0 (root)".to_string()), "{actions:?}");
    assert!(actions.contains(&"user_passwd uid 0 (root)".to_string()), "{actions:?}");
    Ok(())
}

#[tokio::test]
async fn a_viewer_sees_no_buttons_it_may_not_use() -> Result<()> {
    let fixture = Fixture::new()?;
    let f = &fixture;
    let id = f.queued_job()?;
    let page = |role: Role, path: String| async move {
        let (cookie, _) = f.session(role)?;
        let req = Request::get(path).header(header::COOKIE, format!("gaffer_session={cookie}")).body(Body::empty())?;
        body_text(f.send(req).await?).await
    };
    let viewer_job = page(Role::Viewer, format!("/jobs/{id}")).await?;
    assert!(!viewer_job.contains("/cancel"), "no Cancel button for a viewer");
    assert!(!viewer_job.contains("href=\"/jobs/new\""), "no New job link for a viewer");
    assert!(!viewer_job.contains("href=\"/audit\""), "no audit link below admin");
    assert!(viewer_job.contains("viewer <span class=\"muted\">(viewer)</span>"), "who is logged in");
    let operator_job = page(Role::Operator, format!("/jobs/{id}")).await?;
    assert!(operator_job.contains(&format!("action=\"/jobs/{id}/cancel\"")));
    assert!(operator_job.contains("href=\"/jobs/new\"") && !operator_job.contains("href=\"/audit\""));
    let admin_fleet = page(Role::Admin, "/".into()).await?;
    assert!(admin_fleet.contains("href=\"/audit\"") && admin_fleet.contains("Recent operator actions"));
    let viewer_fleet = page(Role::Viewer, "/".into()).await?;
    assert!(!viewer_fleet.contains("Recent operator actions"), "the audit excerpt is for admins");
    Ok(())
}

/// Address A guesses alice's password until it is throttled; address B and another user still
/// log in, and alice herself logs in from B. Then a guess from many addresses locks the name
/// `viewer` for strangers but not for the address it logged in from before.
#[tokio::test]
async fn a_throttled_address_locks_out_no_other_address_or_user() -> Result<()> {
    let f = Fixture::new()?;
    let (a, b, c) = ([192, 0, 2, 1], [198, 51, 100, 2], [203, 0, 113, 3]);
    let free = gaffer_control::http::LoginThrottle::ADDRESS_FREE_FAILURES;
    for i in 0..free {
        assert_eq!(f.login_from(a, "operator", "wrong password").await?, StatusCode::UNAUTHORIZED, "guess {i}");
    }
    assert_eq!(f.login_from(a, "operator", PASSWORD).await?, StatusCode::TOO_MANY_REQUESTS, "A is throttled");
    assert_eq!(f.login_from(a, "viewer", PASSWORD).await?, StatusCode::TOO_MANY_REQUESTS, "A for any user");
    assert_eq!(f.login_from(b, "operator", PASSWORD).await?, StatusCode::SEE_OTHER, "B logs in as the guessed user");
    assert_eq!(f.login_from(c, "viewer", PASSWORD).await?, StatusCode::SEE_OTHER, "another user logs in");
    // Unknown names are refused like wrong passwords, and counted like them.
    assert_eq!(f.login_from(c, "nobody-here", PASSWORD).await?, StatusCode::UNAUTHORIZED);

    // Failed and successful logins are audited with the client address (never the password).
    let q = AuditQuery { action: Some("login_failed".into()), limit: 100, ..AuditQuery::default() };
    let failed = f.store.query_audit(&q)?.entries;
    assert_eq!(failed.len(), free as usize + 1);
    assert!(failed.iter().filter(|e| e.record.who == "operator").all(|e| e.record.detail.contains("192.0.2.1")));
    assert!(failed.iter().any(|e| e.record.who == "(unknown user)" && e.record.detail.contains("203.0.113.3")));
    let all = f.store.list_audit(100)?;
    assert!(all.iter().all(|e| !e.detail.contains(PASSWORD) && !e.detail.contains("wrong password ")));
    let ok = f.store.query_audit(&AuditQuery { action: Some("login".into()), limit: 10, ..AuditQuery::default() })?;
    assert!(ok.entries.iter().any(|e| e.record.who == "operator" && e.record.detail.contains("198.51.100.2")));

    // A distributed guess at `viewer` (one attempt from each of many addresses).
    let user_free = gaffer_control::http::LoginThrottle::USER_FREE_FAILURES;
    for i in 0..user_free {
        let addr = [10, 1, 0, i as u8 + 1];
        assert_eq!(f.login_from(addr, "viewer", "wrong password").await?, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(f.login_from([10, 2, 0, 1], "viewer", PASSWORD).await?, StatusCode::TOO_MANY_REQUESTS, "a stranger");
    assert_eq!(f.login_from(c, "viewer", PASSWORD).await?, StatusCode::SEE_OTHER, "viewer's own address still works");
    assert_eq!(f.login_from([10, 2, 0, 1], "admin", PASSWORD).await?, StatusCode::SEE_OTHER, "other names unaffected");
    Ok(())
}

#[tokio::test]
async fn the_audit_api_filters_and_pages() -> Result<()> {
    let f = Fixture::new()?;
    let token = f.token(Role::Admin).to_owned();
    let get = |uri: &str| -> Result<Request<Body>> {
        Ok(Request::get(uri).header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty())?)
    };
    for _ in 0..3 {
        let id = f.queued_job()?;
        let resp = f.send(get(&format!("/api/v1/jobs/{id}"))?.map(|_| Body::empty())).await?;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut cancel = get(&format!("/api/v1/jobs/{id}/cancel"))?;
        *cancel.method_mut() = Method::POST;
        assert_eq!(f.send(cancel).await?.status(), StatusCode::OK);
    }
    let resp = f.send(get("/api/v1/audit?actor=token:admin-token&action=job_cancel&limit=2")?).await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let link = resp.headers().get(header::LINK).and_then(|v| v.to_str().ok()).map(str::to_owned).context("Link")?;
    let page: serde_json::Value = serde_json::from_str(&body_text(resp).await?)?;
    let entries = page["entries"].as_array().context("entries")?;
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e["actor"] == "token:admin-token" && e["action"] == "job_cancel"));
    assert!(entries[0]["id"].as_u64() > entries[1]["id"].as_u64(), "newest first");
    let next = link.trim_start_matches('<').split('>').next().context("link target")?.to_owned();
    assert!(next.contains("actor=token%3Aadmin-token"), "{next}");
    let rest: serde_json::Value = serde_json::from_str(&body_text(f.send(get(&next)?).await?).await?)?;
    assert_eq!(rest["entries"].as_array().map(Vec::len), Some(1));
    assert_eq!(rest["next"], serde_json::Value::Null);
    let bad = f.send(get("/api/v1/audit?agent=gpu-box")?).await?;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    // The dashboard page takes the same filters.
    let (cookie, _) = f.session(Role::Admin)?;
    let req = Request::get("/audit?action=job_cancel&since=1h")
        .header(header::COOKIE, format!("gaffer_session={cookie}"))
        .body(Body::empty())?;
    let html = body_text(f.send(req).await?).await?;
    assert_eq!(html.matches("<code>job_cancel</code>").count(), 3);
    assert!(!html.contains("<code>user_add</code>"));
    Ok(())
}

#[test]
fn admin_requests_record_the_actor_the_server_decides() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let fp = gaffer_certs::FleetCa::generate("test")?.fingerprint();
    let actor = Actor::OsUser { uid: 1234, name: Some("ops".into()) };
    let phc = admin::hash_password(PASSWORD)?;
    let add = |name: &str, role: Role| {
        admin::handle(
            &store,
            &fp,
            None,
            &actor,
            admin::AdminRequest::AddUser { name: name.into(), role, password_phc: phc.clone() },
        )
    };
    assert!(matches!(add("root", Role::Admin), admin::AdminResponse::UserAdded(_)));
    assert!(matches!(add("root", Role::Viewer), admin::AdminResponse::Error { .. }), "names are unique");
    let resp = admin::handle(&store, &fp, None, &actor, admin::AdminRequest::RemoveUser { name: "root".into() });
    let admin::AdminResponse::Error { message } = resp else { bail!("removed the last admin: {resp:?}") };
    assert!(message.contains("last admin"), "{message}");
    let resp = admin::handle(&store, &fp, None, &actor, admin::AdminRequest::ListUsers);
    let admin::AdminResponse::Users { users } = resp else { bail!("{resp:?}") };
    assert_eq!(users.iter().map(|u| (u.name.as_str(), u.role)).collect::<Vec<_>>(), [("root", Role::Admin)]);
    let resp = admin::handle(
        &store,
        &fp,
        None,
        &actor,
        admin::AdminRequest::CreateApiToken { name: "ci".into(), role: Role::Operator, ttl_secs: 86_400 },
    );
    let admin::AdminResponse::ApiToken(minted) = resp else { bail!("{resp:?}") };
    assert!(minted.token.starts_with("gfa_") && minted.role == Role::Operator);
    let resp = admin::handle(&store, &fp, None, &actor, admin::AdminRequest::ListApiTokens);
    let listing = serde_json::to_string(&resp)?;
    assert!(listing.contains("\"ci\"") && !listing.contains(&minted.token), "listed without the secret");
    let whos: HashSet<String> = store.list_audit(10)?.into_iter().map(|a| a.who).collect();
    assert_eq!(whos, HashSet::from(["uid 1234 (ops)".to_string()]));
    Ok(())
}
