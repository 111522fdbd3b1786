//! The dashboard in a real browser: Debian's Chromium, headless, driven through chromedriver
//! (WebDriver, via fantoccini) against the real control plane with one real agent. It logs in
//! through the form, walks the fleet, agent, jobs (state filter, pagination), job (exports, cancel,
//! retry), audit, rollouts and webhooks pages, cordons and uncordons the agent with its buttons,
//! saves a PNG screenshot of every page under `$CARGO_TARGET_TMPDIR/browser/`, and runs axe-core
//! on each page, failing on any serious or critical violation. A second session with JavaScript
//! disabled logs in and cancels a job through the same forms.
//!
//! Needs `GAFFER_CHROMEDRIVER` (default `/usr/bin/chromedriver`), `GAFFER_CHROMIUM` (default
//! `/usr/bin/chromium`) and `GAFFER_AXE_JS` (default `tests/browser/node_modules/axe-core/axe.min.js`
//! under the workspace root); `scripts/test-tools.sh` installs and exports them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use fantoccini::{Client, ClientBuilder, Locator};
use gaffer_tests::{media, media_dir, Agent, ControlPlane};
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(180);
const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
const ELEMENT_TIMEOUT: Duration = Duration::from_secs(20);
/// The jobs page shows this many jobs a page (`JOBS_PAGE_MAX` in the dashboard).
const JOBS_PAGE_MAX: usize = 200;

/// chromedriver as a child process on a free loopback port; killed on drop.
struct Chromedriver {
    child: Child,
    url: String,
}

impl Chromedriver {
    fn start() -> anyhow::Result<Self> {
        let path =
            std::env::var_os("GAFFER_CHROMEDRIVER").map_or_else(|| "/usr/bin/chromedriver".into(), PathBuf::from);
        if !path.exists() {
            bail!("chromedriver not found at {}: set GAFFER_CHROMEDRIVER (scripts/test-tools.sh does)", path.display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", path.display()))?;
        let driver = Chromedriver { child, url: format!("http://127.0.0.1:{port}") };
        gaffer_tests::wait_for(Duration::from_secs(20), "chromedriver to listen", || {
            Ok(TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()))
        })?;
        Ok(driver)
    }

    /// A fresh headless Chromium session with its own profile directory; `javascript: false`
    /// blocks JavaScript in pages through Chromium's content settings.
    async fn session(&self, profile: &Path, javascript: bool) -> anyhow::Result<Client> {
        let binary = std::env::var_os("GAFFER_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
        if !binary.exists() {
            bail!("Chromium not found at {}: set GAFFER_CHROMIUM (scripts/test-tools.sh does)", binary.display());
        }
        let mut options = json!({
            "binary": binary,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                format!("--user-data-dir={}", profile.display()), "--window-size=1280,900",
            ],
        });
        if !javascript {
            options["prefs"] = json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
        // fantoccini's rustls client needs a process-wide provider; the workspace builds rustls with ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let client =
            ClientBuilder::rustls()?.capabilities(caps).connect(&self.url).await.context("WebDriver session")?;
        Ok(client)
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Screenshots and axe-core results, collected across pages.
struct Checks {
    shots_dir: PathBuf,
    axe_js: String,
    /// `page: rule (impact): help — targets` for every serious or critical violation.
    serious: Vec<String>,
}

impl Checks {
    fn new() -> anyhow::Result<Self> {
        let axe_path = std::env::var_os("GAFFER_AXE_JS").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/node_modules/axe-core/axe.min.js"),
            PathBuf::from,
        );
        let axe_js = std::fs::read_to_string(&axe_path).with_context(|| {
            format!(
                "reading axe-core at {}: set GAFFER_AXE_JS (scripts/test-tools.sh runs npm ci in tests/browser)",
                axe_path.display()
            )
        })?;
        let shots_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
        std::fs::create_dir_all(&shots_dir)?;
        println!("browser screenshots: {}", shots_dir.display());
        Ok(Checks { shots_dir, axe_js, serious: Vec::new() })
    }

    async fn screenshot(&self, client: &Client, name: &str) -> anyhow::Result<()> {
        let png = client.screenshot().await.with_context(|| format!("screenshot of {name}"))?;
        std::fs::write(self.shots_dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    /// Screenshot, then axe-core on the page as it is now. The page's CSP allows no scripts;
    /// WebDriver's script commands run outside it.
    async fn page(&mut self, client: &Client, name: &str) -> anyhow::Result<()> {
        self.screenshot(client, name).await?;
        client.execute(&self.axe_js, vec![]).await.with_context(|| format!("injecting axe-core on {name}"))?;
        let result = client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 // meta-refresh is off: the live pages (fleet 10 s, jobs 10 s, agent and
                 // rollouts 15 s, an unfinished job 3 s) reload themselves, the dashboard's only
                 // way to stay current without JavaScript, and each has a Pause auto-refresh link
                 // (WCAG 2.2.1 allows a reload the user can turn off; axe flags any short meta
                 // refresh). Every other rule runs.
                 axe.run(document, { resultTypes: ['violations'], rules: { 'meta-refresh': { enabled: false } } })
                   .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                                                             targets: v.nodes.map(n => n.target.join(' ')) }))))
                   .catch(e => done({ error: String(e) }));",
                vec![],
            )
            .await
            .with_context(|| format!("running axe-core on {name}"))?;
        let Some(violations) = result.as_array() else { bail!("axe-core on {name}: {result}") };
        for v in violations {
            let line = format!("{name}: {} ({}): {} — {}", v["id"], v["impact"], v["help"], v["targets"]);
            println!("axe: {line}");
            if matches!(v["impact"].as_str(), Some("serious" | "critical")) {
                self.serious.push(line);
            }
        }
        Ok(())
    }
}

async fn text_of(client: &Client, css: &str) -> anyhow::Result<String> {
    let el =
        client.wait().at_most(ELEMENT_TIMEOUT).for_element(Locator::Css(css)).await.with_context(|| css.to_owned())?;
    Ok(el.text().await?)
}

/// Clicks the submit button matching `css` and waits for the page it leads to.
async fn submit(client: &Client, css: &str) -> anyhow::Result<()> {
    let button = client.find(Locator::Css(css)).await.with_context(|| format!("button {css}"))?;
    button.click().await?;
    // The click waits for the navigation it starts; make sure the old page is gone.
    client.wait().at_most(ELEMENT_TIMEOUT).for_element(Locator::Css("body")).await?;
    Ok(())
}

/// Waits until the job page's state badge reads `state`.
async fn wait_job_state(client: &Client, id: &str, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + ELEMENT_TIMEOUT;
    loop {
        let shown = text_of(client, "h1 .state").await.unwrap_or_default();
        if shown.eq_ignore_ascii_case(state) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("job {id} page shows {shown:?}, expected {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.goto(client.current_url().await?.as_ref()).await?;
    }
}

async fn login(client: &Client, cp: &ControlPlane) -> anyhow::Result<()> {
    client.goto(&format!("{}/login", cp.http_url)).await?;
    client.find(Locator::Css("input[name=user]")).await?.send_keys(&cp.admin_user).await?;
    client.find(Locator::Css("input[name=password]")).await?.send_keys(&cp.admin_password).await?;
    submit(client, "form[action='/login'] button[type=submit]").await?;
    let h1 = text_of(client, "main h1").await?;
    if !h1.starts_with("Fleet") {
        bail!("after logging in the browser shows {h1:?} at {}", client.current_url().await?);
    }
    Ok(())
}

struct Fixture {
    cp: ControlPlane,
    agent: Agent,
    succeeded: String,
    /// Queued jobs on a path no volume covers: the first is cancelled and retried with
    /// JavaScript, the second cancelled without.
    queued: [String; 2],
}

#[test]
fn dashboard_in_chromium() -> anyhow::Result<()> {
    let mut checks = Checks::new()?;
    let driver = Chromedriver::start()?;
    let cp = ControlPlane::start()?;
    let mut agent = Agent::enroll(&cp, "stage-a")?;
    agent.run(&[media_dir()])?;
    cp.wait_agent_online(&agent.agent_id, true, ONLINE_TIMEOUT)?;
    let succeeded = cp.submit_job(&media("bikes.mp4"), "stage-a")?;
    let job = cp.wait_job(&succeeded, &["succeeded", "failed"], JOB_TIMEOUT)?;
    if job["state"] != "succeeded" {
        bail!("bikes.mp4: {job}\nagent log:\n{}", agent.log());
    }
    // One page of jobs and then some, so the jobs page has a next page.
    let nowhere = Path::new("/srv/no-volume-covers-this");
    let mut queued = Vec::new();
    for i in 0..=JOBS_PAGE_MAX {
        queued.push(cp.submit_job(&nowhere.join(format!("waits-{i:03}.mp4")), "stage-a")?);
    }
    cp.wait_job(&queued[0], &["queued"], ONLINE_TIMEOUT)?;
    let fx = Fixture { queued: [queued[0].clone(), queued[1].clone()], cp, agent, succeeded };

    let profiles = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let outcome = rt.block_on(async {
        let client = driver.session(&profiles.path().join("js"), true).await?;
        let walked = walk(&client, &fx, &mut checks).await;
        let _ = client.close().await;
        walked?;
        let client = driver.session(&profiles.path().join("no-js"), false).await?;
        let walked = without_javascript(&client, &fx, &mut checks).await;
        let _ = client.close().await;
        walked
    });
    outcome.with_context(|| format!("control plane log:\n{}", fx.cp.log()))?;
    if !checks.serious.is_empty() {
        bail!("axe-core found serious or critical violations:\n{}", checks.serious.join("\n"));
    }
    Ok(())
}

/// Every page with JavaScript on, as an admin.
async fn walk(client: &Client, fx: &Fixture, checks: &mut Checks) -> anyhow::Result<()> {
    let base = &fx.cp.http_url;
    client.goto(&format!("{base}/login")).await?;
    checks.page(client, "login").await?;
    login(client, &fx.cp).await?;
    checks.page(client, "fleet").await?;

    // The fleet's site filter.
    client.find(Locator::Css("form.filter select[name=site]")).await?.select_by_value("stage-a").await?;
    submit(client, "form.filter button[type=submit]").await?;
    let url = client.current_url().await?;
    if !url.query().unwrap_or_default().contains("site=stage-a") {
        bail!("the fleet's site filter went to {url}");
    }
    checks.screenshot(client, "fleet-site").await?;

    // The agent page, from the fleet's link; cordon and uncordon with its buttons.
    let agent_link = format!("a[href='/agents/{}']", fx.agent.agent_id);
    client.wait().at_most(ELEMENT_TIMEOUT).for_element(Locator::Css(&agent_link)).await?.click().await?;
    checks.page(client, "agent").await?;
    submit(client, &format!("form[action='/agents/{}/cordon'] button", fx.agent.agent_id)).await?;
    let scheduling = text_of(client, "#scheduling").await?;
    if !scheduling.contains("takes no new jobs") {
        bail!("after Cordon the agent page says {scheduling:?}");
    }
    checks.screenshot(client, "agent-cordoned").await?;
    submit(client, &format!("form[action='/agents/{}/uncordon'] button", fx.agent.agent_id)).await?;
    let scheduling = text_of(client, "#scheduling").await?;
    if !scheduling.starts_with("active") {
        bail!("after Uncordon the agent page says {scheduling:?}");
    }

    // Jobs: the state filter, then the next page.
    client.goto(&format!("{base}/jobs")).await?;
    checks.page(client, "jobs").await?;
    client.find(Locator::Css("form.filter select[name=state]")).await?.select_by_value("succeeded").await?;
    submit(client, "form.filter button[type=submit]").await?;
    let rows = client.find_all(Locator::Css("table.jobs tbody tr")).await?;
    let table = text_of(client, "table.jobs tbody").await?;
    if rows.len() != 1 || !table.contains("bikes.mp4") {
        bail!("jobs filtered to succeeded show {} rows: {table}", rows.len());
    }
    checks.screenshot(client, "jobs-succeeded").await?;
    // Pausing the auto-refresh (WCAG 2.2.1) comes back to the filtered page and stops the reloads.
    client.find(Locator::LinkText("Pause auto-refresh")).await?.click().await?;
    let url = client.current_url().await?;
    if !url.query().unwrap_or_default().contains("state=succeeded") {
        bail!("pausing the auto-refresh went to {url}");
    }
    if !client.find_all(Locator::Css("meta[http-equiv=refresh]")).await?.is_empty() {
        bail!("the jobs page still reloads itself after Pause auto-refresh");
    }
    client.find(Locator::LinkText("Resume auto-refresh")).await?.click().await?;
    if client.find_all(Locator::Css("meta[http-equiv=refresh]")).await?.is_empty() {
        bail!("the jobs page does not reload itself after Resume auto-refresh");
    }
    client.find(Locator::Css("form.filter select[name=state]")).await?.select_by_value("queued").await?;
    submit(client, "form.filter button[type=submit]").await?;
    let first_page = client.find_all(Locator::Css("table.jobs tbody tr")).await?.len();
    if first_page != JOBS_PAGE_MAX {
        bail!("the first page of queued jobs has {first_page} rows, expected {JOBS_PAGE_MAX}");
    }
    client.find(Locator::Css("nav.pager a[rel=next]")).await?.click().await?;
    let second_page = client.find_all(Locator::Css("table.jobs tbody tr")).await?.len();
    if second_page != 1 {
        bail!("the second page of queued jobs has {second_page} rows, expected 1");
    }
    checks.page(client, "jobs-page-2").await?;

    // The succeeded job: its export links work for this session.
    client.goto(&format!("{base}/jobs/{}", fx.succeeded)).await?;
    checks.page(client, "job-succeeded").await?;
    let session = client
        .get_named_cookie("gaffer_session")
        .await
        .context("the browser holds the dashboard session cookie")?
        .value()
        .to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
    for format in ["otio", "edl", "csv"] {
        let link = client.find(Locator::Css(&format!("a[href$='/export?format={format}']"))).await?;
        let href = link.prop("href").await?.context("export link href")?;
        let resp = http.get(&href).header(reqwest::header::COOKIE, format!("gaffer_session={session}")).send().await?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() || body.is_empty() {
            bail!("export link {href}: {status}: {body}");
        }
    }

    // The queued job: Cancel, then Retry.
    let id = &fx.queued[0];
    client.goto(&format!("{base}/jobs/{id}")).await?;
    checks.page(client, "job-queued").await?;
    submit(client, &format!("form[action='/jobs/{id}/cancel'] button")).await?;
    wait_job_state(client, id, "cancelled").await?;
    checks.page(client, "job-cancelled").await?;
    submit(client, &format!("form[action='/jobs/{id}/retry'] button")).await?;
    wait_job_state(client, id, "queued").await?;
    checks.screenshot(client, "job-retried").await?;

    for (path, name, heading) in
        [("/audit", "audit", "Audit log"), ("/rollouts", "rollouts", "Rollouts"), ("/webhooks", "webhooks", "Webhooks")]
    {
        client.goto(&format!("{base}{path}")).await?;
        let h1 = text_of(client, "main h1").await?;
        if !h1.starts_with(heading) {
            bail!("{path} shows {h1:?}");
        }
        checks.page(client, name).await?;
    }
    // The audit log recorded what the browser did.
    client.goto(&format!("{base}/audit")).await?;
    let audit = text_of(client, "main").await?;
    for action in ["cordon", "uncordon", "cancel", "retry"] {
        if !audit.contains(action) {
            bail!("the audit log does not mention {action}: {audit}");
        }
    }
    Ok(())
}

/// Log in and cancel a job with JavaScript blocked: the dashboard is plain forms.
async fn without_javascript(client: &Client, fx: &Fixture, checks: &mut Checks) -> anyhow::Result<()> {
    login(client, &fx.cp).await?;
    let id = &fx.queued[1];
    client.goto(&format!("{}/jobs/{id}", fx.cp.http_url)).await?;
    submit(client, &format!("form[action='/jobs/{id}/cancel'] button")).await?;
    wait_job_state(client, id, "cancelled").await?;
    checks.screenshot(client, "no-js-job-cancelled").await?;
    Ok(())
}
