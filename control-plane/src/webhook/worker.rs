//! The delivery worker: every second it runs the offline timer of the alert rules, claims the due
//! deliveries (at most [`DUE_BATCH_MAX`] a pass), and sends each on its own task, at most
//! [`CONCURRENT_MAX`] at a time. A claim moves the delivery's `next_attempt_at_ms` [`CLAIM_MS`]
//! ahead in the store, so another replica (or this one, after a crash mid-attempt) tries it again
//! only once that has passed. Every attempt is recorded; see the module docs of [`super`] for the
//! retry schedule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use tracing::Instrument as _;

use super::{
    signature, DeliveryAttempt, DeliveryState, Destination, WebhookDelivery, WebhookTarget, Webhooks,
    ATTEMPTS_KEPT_MAX, ATTEMPT_NOTE_BYTES_MAX, DELIVERY_TIMEOUT, FINISHED_KEPT_MS, RESPONSE_BODY_BYTES_MAX,
};
use crate::store::UnixMs;

/// Most deliveries claimed in one pass.
pub const DUE_BATCH_MAX: usize = 64;
/// Most deliveries in flight at once.
pub const CONCURRENT_MAX: usize = 8;
/// How far a claim moves a delivery's next attempt ahead, ms: the attempt's timeout with room.
pub const CLAIM_MS: u64 = DELIVERY_TIMEOUT.as_millis() as u64 + 5_000;
/// How often the worker looks for due deliveries and runs the offline timer.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most finished deliveries deleted per pass of the retention sweep (hourly).
const PRUNE_BATCH_MAX: usize = 1000;

/// Runs the worker until the task is dropped.
pub async fn run(hooks: Arc<Webhooks>) {
    let client = match reqwest::Client::builder()
        .timeout(DELIVERY_TIMEOUT)
        .connect_timeout(DELIVERY_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(format!("gaffer-control/{}", crate::build_version()))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook HTTP client could not be built; no webhook will be delivered");
            return;
        }
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_MAX));
    let mut every = tokio::time::interval(POLL_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune_ms = 0;
    loop {
        every.tick().await;
        let h = hooks.clone();
        let claimed = tokio::task::spawn_blocking(move || {
            pass(&h, crate::now_ms(), &mut last_prune_ms).map(|c| (c, last_prune_ms))
        })
        .await;
        let claimed = match claimed {
            Ok(Ok((claimed, pruned_at))) => {
                last_prune_ms = pruned_at;
                claimed
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "webhook pass failed; retrying in a second");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "webhook pass panicked");
                continue;
            }
        };
        for (delivery, target) in claimed {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let (h, client) = (hooks.clone(), client.clone());
            let span = tracing::info_span!("webhook", delivery_id = %delivery.id, target = %delivery.target_name, event = %delivery.event);
            tokio::spawn(
                async move {
                    let _permit = permit;
                    attempt(&h, &client, delivery, target).await;
                }
                .instrument(span),
            );
        }
    }
}

/// One pass (blocking): the offline timer, the pending gauge, the hourly retention sweep, and
/// the claims of due deliveries with their targets (deliveries whose target is gone are dropped).
fn pass(
    hooks: &Webhooks,
    now_ms: UnixMs,
    last_prune_ms: &mut UnixMs,
) -> Result<Vec<(WebhookDelivery, WebhookTarget)>, crate::store::StoreError> {
    hooks.tick(now_ms);
    let store = hooks.store();
    hooks.metrics().set_webhook_pending(store.webhook_pending_count()?);
    if now_ms.saturating_sub(*last_prune_ms) >= 3_600_000 {
        *last_prune_ms = now_ms;
        let n = store.delete_finished_webhook_deliveries(now_ms.saturating_sub(FINISHED_KEPT_MS), PRUNE_BATCH_MAX)?;
        if n > 0 {
            tracing::info!(deleted = n, "finished webhook deliveries past their retention deleted");
        }
    }
    let due = store.webhook_deliveries_due(now_ms, DUE_BATCH_MAX)?;
    if due.is_empty() {
        return Ok(Vec::new());
    }
    let targets = store.list_webhook_targets()?;
    let mut claimed = Vec::new();
    for d in due {
        let target = targets.iter().find(|t| t.id == d.target_id).cloned();
        let got = store.update_webhook_delivery(d.id, &mut |rec| {
            if rec.state != DeliveryState::Pending || rec.next_attempt_at_ms > now_ms {
                return false;
            }
            if target.is_none() {
                rec.state = DeliveryState::Dropped;
                rec.finished_at_ms = Some(now_ms);
            } else {
                rec.next_attempt_at_ms = now_ms + CLAIM_MS;
            }
            true
        })?;
        match (got, target) {
            (Some(rec), Some(t)) => claimed.push((rec, t)),
            (Some(rec), None) => {
                hooks.metrics().webhook_delivery("dropped");
                tracing::warn!(delivery_id = %rec.id, target = %rec.target_name, "webhook delivery dropped: its target was removed");
            }
            (None, _) => {}
        }
    }
    Ok(claimed)
}

/// What one attempt came to.
struct Outcome {
    ok: bool,
    status: Option<u16>,
    error: Option<String>,
}

async fn attempt(hooks: &Arc<Webhooks>, client: &reqwest::Client, delivery: WebhookDelivery, target: WebhookTarget) {
    let started_ms = crate::now_ms();
    let started = Instant::now();
    let outcome = match &target.destination {
        Destination::Http { url, .. } => post(client, url, &delivery, target.secret.as_deref()).await,
        Destination::Email { smtp_url, from, to } => {
            email(smtp_url, from, to, target.secret.as_deref(), &delivery).await
        }
    };
    let rec = DeliveryAttempt {
        at_ms: started_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        status: outcome.status,
        error: outcome.error.clone(),
    };
    let settings = hooks.settings();
    let jitter = rand::thread_rng().gen_range(0.8..=1.2);
    let h = hooks.clone();
    let id = delivery.id;
    let result = tokio::task::spawn_blocking(move || {
        let store = h.store();
        let now = crate::now_ms();
        let mut outcome_label = "retry";
        let updated = store.update_webhook_delivery(id, &mut |d| {
            if d.state != DeliveryState::Pending {
                return false;
            }
            d.attempts_total = d.attempts_total.saturating_add(1);
            d.attempts.push(rec.clone());
            if d.attempts.len() > ATTEMPTS_KEPT_MAX {
                let extra = d.attempts.len() - ATTEMPTS_KEPT_MAX;
                d.attempts.drain(..extra);
            }
            if outcome.ok {
                d.state = DeliveryState::Delivered;
                d.finished_at_ms = Some(now);
                outcome_label = "delivered";
            } else if now.saturating_sub(d.created_at_ms) >= settings.retry_for_secs.saturating_mul(1000) {
                d.state = DeliveryState::Failed;
                d.finished_at_ms = Some(now);
                outcome_label = "failed";
            } else {
                d.next_attempt_at_ms = now + settings.retry_delay_ms(d.attempts_total, jitter);
                outcome_label = "retry";
            }
            true
        });
        store.flush()?;
        updated.map(|u| (u, outcome_label))
    })
    .await;
    match result {
        Ok(Ok((Some(d), label))) => {
            hooks.metrics().webhook_delivery(label);
            match label {
                "delivered" => tracing::info!(attempts = d.attempts_total, "webhook delivered"),
                "failed" => {
                    tracing::warn!(attempts = d.attempts_total, error = ?outcome.error, status = ?outcome.status, "webhook delivery failed for good")
                }
                _ => tracing::info!(
                    attempts = d.attempts_total,
                    status = ?outcome.status,
                    error = ?outcome.error,
                    next_in_secs = d.next_attempt_at_ms.saturating_sub(crate::now_ms()) / 1000,
                    "webhook attempt failed; will retry"
                ),
            }
        }
        Ok(Ok((None, _))) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "webhook attempt not recorded; it will be tried again"),
        Err(e) => tracing::error!(error = %e, "webhook attempt record panicked"),
    }
}

async fn post(client: &reqwest::Client, url: &str, d: &WebhookDelivery, secret: Option<&str>) -> Outcome {
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Gaffer-Event", d.event.as_str())
        .header("X-Gaffer-Delivery", d.id.to_string())
        .header("X-Gaffer-Timestamp", (crate::now_ms() / 1000).to_string());
    if let Some(secret) = secret {
        req = req.header("X-Gaffer-Signature-256", signature(secret.as_bytes(), d.payload.as_bytes()));
    }
    match req.body(d.payload.clone()).send().await {
        Ok(mut resp) => {
            let status = resp.status();
            let mut body = Vec::new();
            while body.len() < RESPONSE_BODY_BYTES_MAX {
                match resp.chunk().await {
                    Ok(Some(chunk)) => {
                        body.extend_from_slice(&chunk[..chunk.len().min(RESPONSE_BODY_BYTES_MAX - body.len())])
                    }
                    _ => break,
                }
            }
            if status.is_success() {
                Outcome { ok: true, status: Some(status.as_u16()), error: None }
            } else {
                let text = String::from_utf8_lossy(&body);
                let note = format!("HTTP {status}: {}", text.trim());
                Outcome {
                    ok: false,
                    status: Some(status.as_u16()),
                    error: Some(crate::ingest::truncate(&note, ATTEMPT_NOTE_BYTES_MAX)),
                }
            }
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("timed out after {} s", DELIVERY_TIMEOUT.as_secs())
            } else if e.is_connect() {
                format!("could not connect: {}", error_chain(&e))
            } else {
                error_chain(&e)
            };
            Outcome { ok: false, status: None, error: Some(crate::ingest::truncate(&what, ATTEMPT_NOTE_BYTES_MAX)) }
        }
    }
}

/// An error and its sources, `a: b: c` (reqwest's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

async fn email(smtp_url: &str, from: &str, to: &[String], password: Option<&str>, d: &WebhookDelivery) -> Outcome {
    use lettre::message::header::ContentType;
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let fail = |e: String| Outcome {
        ok: false,
        status: None,
        error: Some(crate::ingest::truncate(&e, ATTEMPT_NOTE_BYTES_MAX)),
    };
    let mut builder = match AsyncSmtpTransport::<Tokio1Executor>::from_url(smtp_url) {
        Ok(b) => b.timeout(Some(DELIVERY_TIMEOUT)),
        Err(e) => return fail(format!("bad SMTP URL: {e}")),
    };
    if let (Some(password), Ok(u)) = (password, url::Url::parse(smtp_url)) {
        if !u.username().is_empty() {
            builder = builder.credentials(Credentials::new(u.username().to_owned(), password.to_owned()));
        }
    }
    let transport = builder.build();
    let mut msg = Message::builder().subject(crate::ingest::truncate(&d.summary, 200)).header(ContentType::TEXT_PLAIN);
    match from.parse() {
        Ok(f) => msg = msg.from(f),
        Err(e) => return fail(format!("bad sender {from:?}: {e}")),
    }
    for t in to {
        match t.parse() {
            Ok(a) => msg = msg.to(a),
            Err(e) => return fail(format!("bad recipient {t:?}: {e}")),
        }
    }
    let pretty = serde_json::from_str::<serde_json::Value>(&d.payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| d.payload.clone());
    let body = format!("{}\n\nEvent {} (delivery {})\n\n{pretty}\n", d.summary, d.event, d.id);
    let message = match msg.body(body) {
        Ok(m) => m,
        Err(e) => return fail(format!("building the message: {e}")),
    };
    match tokio::time::timeout(DELIVERY_TIMEOUT * 3, transport.send(message)).await {
        Ok(Ok(resp)) => Outcome { ok: true, status: Some(u16::from(resp.code())), error: None },
        Ok(Err(e)) => fail(format!("SMTP: {}", error_chain(&e))),
        Err(_) => fail(format!("SMTP timed out after {} s", (DELIVERY_TIMEOUT * 3).as_secs())),
    }
}
