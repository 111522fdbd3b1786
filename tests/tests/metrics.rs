//! `/metrics` end to end: real `gaffer-control` and `gaffer-agent` processes on loopback, scraped
//! over HTTP as Prometheus would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gaffer_tests::{media_dir, wait_for, Agent, ControlPlane, ControlPlaneOptions};

const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);
/// The control plane's `--idle-timeout-secs` in these tests (the harness default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

fn links_open(cp: &ControlPlane) -> anyhow::Result<f64> {
    cp.metric("gaffer_agent_links_open")
}

/// Waits until the agent's own status says its link is up (its Hello was accepted).
fn wait_link_up(agent: &Agent) -> anyhow::Result<()> {
    wait_for(ONLINE_TIMEOUT, &format!("agent {} link up", agent.agent_id), || {
        Ok(agent.status().ok().filter(|s| s["link"] == "up").map(|_| ()))
    })
}

/// Scrapes `gaffer_agent_links_open` every 50 ms for `how_long` and returns the highest value seen.
fn links_open_max_over(cp: &ControlPlane, how_long: Duration) -> anyhow::Result<f64> {
    let end = Instant::now() + how_long;
    let mut max = 0.0f64;
    while Instant::now() < end {
        max = max.max(links_open(cp)?);
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(max)
}

/// Issue 11: `gaffer_agent_links_open` said 3 with two agents connected after one restarted. An
/// agent that restarts (SIGKILL, or a graceful stop) leaves its old QUIC connection open on the
/// control plane until that connection's idle timeout; the gauge counts agents whose link is up,
/// once each, before, during and after that.
#[test]
fn the_links_gauge_counts_each_agent_once_across_restarts() -> anyhow::Result<()> {
    let cp = ControlPlane::start_with(ControlPlaneOptions {
        idle_timeout_secs: IDLE_TIMEOUT.as_secs(),
        ..ControlPlaneOptions::default()
    })?;
    let mut a = Agent::enroll(&cp, "stage-m")?;
    let mut b = Agent::enroll(&cp, "stage-m")?;
    a.run(&[media_dir()])?;
    b.run(&[media_dir()])?;
    wait_link_up(&a)?;
    wait_link_up(&b)?;
    wait_for(ONLINE_TIMEOUT, "2 links open", || Ok((links_open(&cp)? == 2.0).then_some(())))?;

    for (how, agent) in [("SIGKILL", &mut a), ("SIGTERM", &mut b)] {
        if how == "SIGKILL" {
            agent.kill();
        } else {
            assert!(agent.stop(), "the agent exits on SIGTERM; log:\n{}", agent.log());
        }
        agent.run(&[media_dir()])?;
        wait_link_up(agent).with_context(|| format!("agent log:\n{}", agent.log()))?;
        assert_eq!(links_open(&cp)?, 2.0, "after a {how} restart, with the new link up");
        // Past the old connection's idle timeout (and the session's heartbeat deadline) it is
        // gone whatever happened to it; the gauge never counted it on top of the new one.
        let max = links_open_max_over(&cp, IDLE_TIMEOUT * 2)?;
        assert_eq!(max, 2.0, "the most links_open said within 2 idle timeouts of a {how} restart");
        assert_eq!(links_open(&cp)?, 2.0, "after a {how} restart, past the old connection's idle timeout");
        assert_eq!(cp.metric("gaffer_agents{state=\"connected\"}")?, 2.0);
    }

    // And a stopped agent's link is no longer counted.
    a.kill();
    wait_for(IDLE_TIMEOUT * 4, "1 link open after an agent died", || Ok((links_open(&cp)? == 1.0).then_some(())))
        .with_context(|| format!("control log:\n{}", cp.log()))?;
    Ok(())
}

/// `promtool check metrics` (Prometheus' own linter, which reads the Prometheus text format) on a
/// scrape's text: an error with what it printed on any problem it reports.
fn promtool_check_metrics(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context(
            "promtool (Debian package prometheus) not found: source scripts/test-tools.sh or set GAFFER_PROMTOOL",
        )?;
    child.stdin.take().context("promtool stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\non:\n{text}");
    Ok(())
}

/// The samples of `name` (exactly that metric, any labels) whose label set contains `agent_id`.
fn samples_of<'t>(text: &'t str, name: &str, agent_id: &str) -> Vec<&'t str> {
    let needle = format!("agent_id=\"{agent_id}\"");
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && l.contains(&needle))
        .collect()
}

/// Two real agents: the live `/metrics` passes promtool's lint, and carries every per-agent series
/// for both (CPU-only here: health source `cpu`, no GPU series), the queue depth by site and
/// profile of a queued job, and a revoked agent's series are gone at the next scrape.
#[test]
fn live_metrics_pass_promtool_with_per_agent_series_for_two_agents() -> anyhow::Result<()> {
    let cp = ControlPlane::start()?;
    let mut a = Agent::enroll(&cp, "stage-m")?;
    let mut b = Agent::enroll(&cp, "stage-n")?;
    a.run(&[media_dir()])?;
    b.run(&[media_dir()])?;
    wait_link_up(&a)?;
    wait_link_up(&b)?;
    // A heartbeat of each since the Hello (interval 1 s).
    let text = wait_for(ONLINE_TIMEOUT, "a heartbeat of both agents on /metrics", || {
        let text = cp.metrics_text()?;
        let both =
            [&a, &b].iter().all(|ag| !samples_of(&text, "gaffer_agent_cpu_utilization_ratio", &ag.agent_id).is_empty());
        Ok(both.then_some(text))
    })
    .with_context(|| format!("/metrics:\n{}", cp.metrics_text().unwrap_or_default()))?;
    let prometheus_text = cp.metrics_text_prometheus()?;
    promtool_check_metrics(&prometheus_text)?;
    // Every metric the shipped Grafana dashboard and alert rules query is exported (GPU families
    // too: their `# TYPE` line is there with no GPU on these agents).
    let missing = missing_metrics(&dashboard_and_rules_metric_names()?, &prometheus_text);
    assert!(missing.is_empty(), "the dashboard or the alert rules query metrics /metrics does not export: {missing:?}");
    for (agent, site) in [(&a, "stage-m"), (&b, "stage-n")] {
        for name in [
            "gaffer_agent_connected",
            "gaffer_agent_last_heartbeat_timestamp_seconds",
            "gaffer_agent_health_source",
            "gaffer_agent_cpu_utilization_ratio",
            "gaffer_agent_memory_used_bytes",
            "gaffer_agent_memory_total_bytes",
            "gaffer_agent_disk_available_bytes",
            "gaffer_agent_disk_total_bytes",
            "gaffer_agent_outbox_pending_messages",
            "gaffer_agent_jobs_running",
            "gaffer_agent_job_slots",
        ] {
            let samples = samples_of(&text, name, &agent.agent_id);
            assert!(!samples.is_empty(), "{name} of agent {} missing:\n{text}", agent.agent_id);
            assert!(samples.iter().all(|s| s.contains(&format!("site=\"{site}\""))), "{samples:?}");
        }
        let connected = samples_of(&text, "gaffer_agent_connected", &agent.agent_id);
        assert!(connected[0].ends_with(" 1.0") || connected[0].ends_with(" 1"), "{connected:?}");
        let source = samples_of(&text, "gaffer_agent_health_source", &agent.agent_id);
        assert!(source[0].contains("source=\"cpu\""), "{source:?}");
        let disks = samples_of(&text, "gaffer_agent_disk_total_bytes", &agent.agent_id);
        let volumes = [media_dir(), media_dir().canonicalize()?];
        assert!(
            disks.iter().any(|d| volumes.iter().any(|v| d.contains(&format!("path=\"{}\"", v.display())))),
            "a disk series for the agent's volume: {disks:?}"
        );
        let total = samples_of(&text, "gaffer_agent_memory_total_bytes", &agent.agent_id);
        let bytes: f64 = total[0].rsplit(' ').next().unwrap_or_default().parse()?;
        assert!(bytes > 1e8, "host memory total is the box's: {total:?}");
        assert!(samples_of(&text, "gaffer_gpu_utilization_ratio", &agent.agent_id).is_empty(), "no GPU here");
    }
    assert_eq!(cp.metric("gaffer_agent_links_open")?, 2.0);

    // A job no agent can take (a site without agents) waits in the queue: counted by site and profile.
    cp.submit_job(&gaffer_tests::media("bikes.mp4"), "stage-empty")?;
    let text = cp.metrics_text()?;
    assert!(
        text.lines().any(|l| l.starts_with("gaffer_queue_depth{")
            && l.contains("site=\"stage-empty\"")
            && l.contains("profile=\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    promtool_check_metrics(&cp.metrics_text_prometheus()?)?;

    // A revoked agent's series go; the other's stay, and a dead link shows connected 0.
    cp.cli_json(&["agent", "revoke", "--agent", &b.agent_id])?;
    b.kill();
    wait_for(ONLINE_TIMEOUT, "the revoked agent's series gone", || {
        let text = cp.metrics_text()?;
        Ok(text.lines().all(|l| !l.contains(&b.agent_id)).then_some(()))
    })?;
    a.kill();
    wait_for(IDLE_TIMEOUT * 4, "agent a connected 0", || {
        let text = cp.metrics_text()?;
        let s = samples_of(&text, "gaffer_agent_connected", &a.agent_id);
        Ok(s.first().is_some_and(|l| l.ends_with(" 0.0") || l.ends_with(" 0")).then_some(()))
    })?;
    Ok(())
}

/// promtool: `GAFFER_PROMTOOL` (set by scripts/test-tools.sh), else Debian's `/usr/bin/promtool`.
fn promtool() -> PathBuf {
    std::env::var_os("GAFFER_PROMTOOL").map_or_else(|| PathBuf::from("/usr/bin/promtool"), PathBuf::from)
}

/// The repository's `dashboards/` directory (the Grafana JSON and the Prometheus rules we ship).
fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

const GRAFANA_DASHBOARD: &str = "grafana/gaffer-control.json";
const ALERT_RULES: &str = "prometheus/gaffer-alerts.rules.yml";

/// PromQL words that are not metric names: aggregation operators (followed by `by (…)` or
/// `without (…)` rather than `(` directly), binary and set operators, modifiers and the float literals.
const PROMQL_KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
];

/// The metric names a PromQL expression reads, by an identifier scan: string literals, label
/// matchers `{…}`, range and subquery brackets `[…]`, Grafana variables (`$x`, `${x}`), numbers and
/// durations are skipped; an identifier followed by `(` is a function or an aggregation; the
/// parenthesised label lists after `by`, `without`, `on`, `ignoring`, `group_left` and
/// `group_right` are label names; [`PROMQL_KEYWORDS`] are operators. What is left is a metric name
/// (as written: a histogram's `_bucket`/`_sum`/`_count` series keep their suffix here).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    fn skip_quoted(chars: &[char], mut i: usize, quote: char) -> usize {
        i += 1;
        while i < chars.len() && chars[i] != quote {
            i += if chars[i] == '\\' && quote != '`' { 2 } else { 1 };
        }
        i + 1
    }
    fn skip_to(chars: &[char], mut i: usize, close: char) -> usize {
        while i < chars.len() && chars[i] != close {
            i = match chars[i] {
                q @ ('"' | '\'' | '`') => skip_quoted(chars, i, q),
                _ => i + 1,
            };
        }
        i + 1
    }
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_quoted(&chars, i, c);
        } else if c == '{' {
            i = skip_to(&chars, i, '}');
        } else if c == '[' {
            i = skip_to(&chars, i, ']');
        } else if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                i = skip_to(&chars, i, '}');
            } else {
                while i < chars.len() && is_part(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (is_part(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_part(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let paren_follows = chars.get(next) == Some(&'(');
            let label_list = ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str());
            if label_list && paren_follows {
                i = skip_to(&chars, next, ')');
            } else if !paren_follows && !PROMQL_KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every string value under the key `key` anywhere in `value`.
fn json_strings_under<'v>(value: &'v serde_json::Value, key: &str, out: &mut Vec<&'v str>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s),
                    _ => json_strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_strings_under(v, key, out)),
        _ => {}
    }
}

/// The PromQL of the Grafana dashboard: every panel target's `expr`, and the series selector of
/// each template variable's `label_values(SELECTOR, label)`.
fn grafana_exprs(dashboard_json: &str) -> anyhow::Result<Vec<String>> {
    let dashboard: serde_json::Value = serde_json::from_str(dashboard_json).context("the Grafana JSON")?;
    let mut exprs = Vec::new();
    json_strings_under(&dashboard, "expr", &mut exprs);
    let mut out: Vec<String> = exprs.into_iter().map(str::to_owned).collect();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let Some(def) = var["definition"].as_str() else { continue };
        if let Some(args) = def.strip_prefix("label_values(").and_then(|a| a.strip_suffix(')')) {
            let (selector, _label) = args.rsplit_once(',').context("label_values(SELECTOR, LABEL)")?;
            out.push(selector.to_owned());
        }
    }
    Ok(out)
}

/// The `expr` of every rule in a Prometheus rule file as we write them: `expr: PROMQL` on one line,
/// or `expr: >-` followed by lines indented deeper (folded into one). Not a YAML parser: the test
/// checks that it finds as many expressions as `promtool check rules` finds rules.
fn rule_exprs(rules_yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = rules_yaml.lines().collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest.starts_with('>') || rest.starts_with('|') {
            let indent = line.len() - line.trim_start().len();
            let body: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(body.join(" "));
        } else {
            out.push(rest.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    out
}

/// Every metric name the shipped dashboard and rules read.
fn dashboard_and_rules_metric_names() -> anyhow::Result<BTreeSet<String>> {
    let dir = dashboards_dir();
    let dashboard = std::fs::read_to_string(dir.join(GRAFANA_DASHBOARD))?;
    let rules = std::fs::read_to_string(dir.join(ALERT_RULES))?;
    let names: BTreeSet<String> =
        grafana_exprs(&dashboard)?.iter().chain(&rule_exprs(&rules)).flat_map(|e| promql_metric_names(e)).collect();
    // The scan found the metrics the rows and alerts are about (a scan that finds nothing passes nothing).
    for expected in ["gaffer_agent_connected", "gaffer_gpu_temperature_celsius", "gaffer_gpu_xid_errors_total"] {
        anyhow::ensure!(names.contains(expected), "{expected} not found by the scan: {names:?}");
    }
    Ok(names)
}

/// The names of `referenced` that a scrape in the Prometheus text format does not export: a name
/// exists when it has a `# TYPE` line (counters there carry `_total`), or when it ends in
/// `_bucket`, `_sum` or `_count` and its base name's `# TYPE` is `histogram`.
fn missing_metrics(referenced: &BTreeSet<String>, prometheus_text: &str) -> Vec<String> {
    let types: BTreeMap<&str, &str> = prometheus_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    referenced
        .iter()
        .filter(|name| {
            let histogram_series = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .any(|base| types.get(base) == Some(&"histogram"));
            !types.contains_key(name.as_str()) && !histogram_series
        })
        .cloned()
        .collect()
}

#[test]
fn the_promql_scan_finds_metric_names_only() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.95, sum by (le, profile) (rate(gaffer_job_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))"#
        ),
        ["gaffer_job_duration_seconds_bucket"]
    );
    assert_eq!(
        names("time() - max by (agent_id, agent_name) (gaffer_agent_last_heartbeat_timestamp_seconds) > 120"),
        ["gaffer_agent_last_heartbeat_timestamp_seconds"]
    );
    assert_eq!(
        names(
            r#"a_total / on (job) group_left (site) b{path="}{x"} offset 5m and bool c:rule 1e3 unless sum without(gpu) (d)"#
        ),
        ["a_total", "b", "c:rule", "d"]
    );
    assert_eq!(names(r#"max by(agent_name) (up{agent_name=~"${agent}"}) * 0.5"#), ["up"]);
}

#[test]
fn a_metric_without_its_type_line_is_named_missing() {
    let text = "# HELP gaffer_jobs_finished_total x\n# TYPE gaffer_jobs_finished_total counter\n\
                # TYPE gaffer_job_duration_seconds histogram\n# TYPE gaffer_agents gauge\n";
    let referenced: BTreeSet<String> = [
        "gaffer_jobs_finished_total",
        "gaffer_job_duration_seconds_bucket",
        "gaffer_job_duration_seconds_count",
        "gaffer_agents_count",
        "gaffer_jobs_finished",
        "gaffer_gpu_typo_celsius",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        missing_metrics(&referenced, text),
        ["gaffer_agents_count", "gaffer_gpu_typo_celsius", "gaffer_jobs_finished"]
    );
}

/// The shipped alerting rules pass `promtool check rules`, and the expression scan of the rules
/// file sees every rule promtool counts.
#[test]
fn the_shipped_alert_rules_pass_promtool_check_rules() -> anyhow::Result<()> {
    let path = dashboards_dir().join(ALERT_RULES);
    let out = std::process::Command::new(promtool()).args(["check", "rules"]).arg(&path).output().context(
        "promtool (Debian package prometheus) not found: source scripts/test-tools.sh or set GAFFER_PROMTOOL",
    )?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "promtool check rules {}: {said}", path.display());
    let found: usize = said
        .split_once("SUCCESS: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .context(said.clone())?
        .parse()?;
    let exprs = rule_exprs(&std::fs::read_to_string(&path)?);
    assert_eq!(exprs.len(), found, "rule expressions scanned vs promtool's count: {exprs:?}");
    assert!(found >= 8, "the alerts the dashboard refers to: {said}");
    Ok(())
}
