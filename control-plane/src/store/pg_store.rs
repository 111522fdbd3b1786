//! [`Store`] on PostgreSQL, so several control-plane replicas share one state.
//!
//! `PgStore::connect("postgres://USER:PASSWORD@HOST:PORT/DATABASE", PgOptions::default())` opens a
//! pool ([`PgOptions::pool_size_max`], 16 by default) and applies the schema migrations embedded
//! in the binary (`control-plane/migrations/NNNN_*.sql`, sqlx's migrator, recorded in
//! `_sqlx_migrations`); a database whose schema is newer than this binary is refused
//! ([`StoreError::SchemaTooNew`]). sled ([`super::sled_store::SledStore`]) stays the embedded
//! store of a single control plane; both pass the same contract suite.
//!
//! # Calls
//!
//! The [`Store`] trait is synchronous, and callers use it from blocking threads and from async
//! tasks alike. The store therefore owns a small private tokio runtime (2 worker threads) on which
//! the pool, its connections and the event listener live; each call is spawned there and the
//! calling thread waits for the answer on a plain channel, so no call ever enters a runtime from
//! within one. Every call is bounded by [`PgOptions::call_timeout`] (10 s by default): past it the
//! call fails with [`StoreError::Unavailable`], which names the server (password redacted,
//! [`redact_url`]) and what to check. Read-modify-write closures (`update_job`, `claim_job`,
//! `update_agent`) run on the calling thread while the transaction on the runtime holds the row
//! lock, and exactly once.
//!
//! # Schema
//!
//! One table per record kind (`migrations/0001_initial.sql` documents every column). Each row
//! holds the whole record as the same serde JSON the sled store writes (`record`, a `json`
//! column: an exact copy, so numbers, field order and `\u0000` escapes survive) beside the
//! columns the store looks up, filters or orders by:
//!
//! | table | key | other columns |
//! |---|---|---|
//! | `users` | `name` | `role` (last-admin check) |
//! | `enroll_tokens` | `hash` (SHA-256) | |
//! | `api_tokens` | `hash` (SHA-256) | `name` (unique) |
//! | `sessions` | `id_hash` (SHA-256) | `user_name`, `expires_at_ms` |
//! | `agents` | `id` | `site`, `hostname` (listing order) |
//! | `health` | `(agent, received_at_ms, counter)` | `bytes` |
//! | `health_tally` | `agent` | `samples`, `bytes`: the running totals of `health` |
//! | `jobs` | `id` | `state`, `rank`, `priority`, `created_at_ms`, `seq`, `site`, `agent`, `lease_holder`, `lease_id`, `lease_deadline_ms`, `finished_at_ms` |
//! | `job_counts` | `state` | `jobs`: six rows, jobs per state |
//! | `digests` | `job_id` | |
//! | `agent_seq` | `agent` | `seq`: the applied watermark |
//! | `audit_log` | `id` (identity, increasing) | `at_ms` |
//! | `bundle_numbers`, `revoked_certs`, `rollouts`, `replicas` | agent, serial, id, id | `seen_at_ms` (replicas) |
//! | `webhook_targets` | `id` | |
//! | `webhook_deliveries` (`migrations/0002_webhooks.sql`) | `id` (UUID v7) | `state`, `next_attempt_at_ms` (partial index of pending ones), `created_at_ms` |
//!
//! The job indexes are sled's: `jobs_by_state (state, rank, created_at_ms, seq, id)` with sled's
//! rank (`255 - priority` for queued jobs, 0 otherwise), so [`Store::jobs_in_state`] reads
//! queued jobs in leasing order in O(limit); `jobs_by_created (created_at_ms, seq)` for the
//! newest-first listing, carrying `state` and `agent` so a filtered page is scanned from the
//! index alone. `seq` comes from the sequence `job_seq`.
//!
//! Job counts are kept in `job_counts`, changed in the same transaction as every job write (the
//! counter rows are updated last and in state order, so two transactions never wait on each other
//! in a cycle), which makes [`Store::job_counts`] one six-row read however long the history is:
//! counting from `jobs_by_state` costs a scan of every finished job, which grows with retention
//! (100,000 index entries per call at 100,000 jobs).
//!
//! # Atomicity (what sled's transactions and locks become)
//!
//! * `update_job` / `claim_job`: `BEGIN; SELECT … FOR UPDATE` (`claim_job`: `FOR UPDATE SKIP
//!   LOCKED`, answering `None` at once when another writer holds the row); the closure; `UPDATE`
//!   of the record and its columns if it changed, the counters if the state changed; `COMMIT`.
//! * `commit_agent_message`: one transaction. The watermark row is created or locked first
//!   (`INSERT … ON CONFLICT DO UPDATE … RETURNING`), so two messages of one agent serialize; then
//!   the job row `FOR UPDATE` and the `before` check, and every write. A duplicate or a conflict
//!   rolls everything back.
//! * `consume_enrollment_token`, `update_agent`, `set_user_password`, `touch_api_token`: the row
//!   `FOR UPDATE`, then the write, in one transaction: of two concurrent token consumers (on any
//!   replicas) exactly one sees the token unused.
//! * `remove_user` takes `LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE` (it conflicts with itself
//!   and every user write), so "is this the last admin?" and the removal cannot interleave with
//!   another replica's removal.
//! * `push_health`: the agent's `health_tally` row is upserted first (its lock serializes the
//!   agent's pushes), the sample inserted, the oldest samples deleted while the history is over
//!   `keep_max` samples or `bytes_max` bytes (the newest always kept), and `last_health` set if the
//!   sample is the newest, all in one transaction.
//! * `delete_finished_jobs`: found like sled (each terminal state's index, oldest created first,
//!   within the same scan budget), then deleted 256 at a time, each batch one transaction that
//!   locks its rows in id order and checks each again.
//! * `create_api_token` is one `INSERT … ON CONFLICT DO NOTHING` over both unique keys.
//! * Audit ids come from an identity column: they increase with every append.
//! * [`Store::flush`] does nothing: a committed transaction is durable.
//!
//! # Events between replicas
//!
//! [`Store::publish`] is `NOTIFY gaffer_events` with the envelope as JSON (at most
//! [`super::EVENT_BYTES_MAX`] bytes). One listener connection (`application_name` `gaffer-control
//! events`, outside the pool) `LISTEN`s on the private runtime and feeds a broadcast channel of
//! [`super::EVENT_CHANNEL_CAPACITY`] envelopes that [`Store::subscribe`] hands out; every store
//! on the database, this one included, receives every event. After the listener loses its
//! connection it reconnects (back-off 0.1 s doubling to 5 s) and then sends subscribers a
//! [`StoreEvent::JobsChanged`] from [`STORE_ORIGIN`], since notifications sent meanwhile are lost.

use std::borrow::Cow;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gaffer_protocol::digest::Digest;
use gaffer_protocol::messages::{AgentId, JobId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::Connection as _;
use tokio::sync::broadcast;
use tracing::Instrument as _;
use uuid::Uuid;

use super::sled_store::{delete_scan_budget, finished_time, list_scan_budget, query_matches, state_rank};
use super::{
    AgentCommit, AgentRecord, ApiTokenRecord, AuditEntry, AuditPage, AuditQuery, AuditRecord, BundleNumbers,
    CommitOutcome, EnrollmentTokenRecord, HealthSample, JobCounts, JobCursor, JobPage, JobQuery, JobRecord, JobState,
    ReplicaRecord, RevokedCertRecord, Role, SessionRecord, Store, StoreError, StoreEvent, StoreEventEnvelope,
    StoreResult, UnixMs, UserRecord, UserRemoval, EVENT_CHANNEL_CAPACITY, STORE_ORIGIN,
};

/// The notification channel events travel on.
const EVENTS_CHANNEL: &str = "gaffer_events";
/// How long the calling thread waits past [`PgOptions::call_timeout`] for a call that timed out on
/// the runtime to say so (it only matters if the runtime itself stopped).
const REPLY_GRACE: Duration = Duration::from_secs(2);
/// Rows per batch of `delete_finished_jobs` (one transaction each), as in sled.
const DELETE_BATCH: usize = 256;
/// Health samples read per round while trimming a history.
const TRIM_CHUNK: i64 = 256;
/// Listener reconnect back-off: first wait and cap.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The schema migrations this binary knows, oldest first: (version, description, SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("../../migrations/0001_initial.sql")),
    (2, "webhooks", include_str!("../../migrations/0002_webhooks.sql")),
];

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0)
}

/// Settings of a [`PgStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// Most connections the pool opens (the listener's one is extra). Default 16; at least 1.
    pub pool_size_max: u32,
    /// Longest one store call may take, waiting for a pooled connection included, before it
    /// fails with [`StoreError::Unavailable`]. Default 10 s; more than zero.
    pub call_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { pool_size_max: 16, call_timeout: Duration::from_secs(10) }
    }
}

/// `url` with its password (in the authority or a `password=` parameter) replaced by `***`, for
/// errors, logs and spans. Anything but a `postgres://` or `postgresql://` URL is not shown at
/// all (a mistyped URL may have its password anywhere).
pub fn redact_url(url: &str) -> String {
    let parsed = url::Url::parse(url).ok().filter(|u| matches!(u.scheme(), "postgres" | "postgresql"));
    let Some(mut parsed) = parsed else {
        return "<not a postgres:// URL>".to_owned();
    };
    if parsed.password().is_some() {
        // Fails only for URLs that cannot have a password, which then have none.
        let _ = parsed.set_password(Some("***"));
    }
    let secret = |k: &str| k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword");
    if parsed.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) { "***".to_owned() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// What the futures on the runtime share: the pool and the redacted URL for errors.
#[derive(Clone)]
struct Db {
    pool: PgPool,
    url: Arc<str>,
}

/// An error inside a call: from sqlx (mapped with the URL at the end) or already a store error.
enum PgError {
    Sql(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for PgError {
    fn from(e: sqlx::Error) -> Self {
        PgError::Sql(e)
    }
}

impl From<StoreError> for PgError {
    fn from(e: StoreError) -> Self {
        PgError::Store(e)
    }
}

type PgResult<T> = Result<T, PgError>;

impl PgError {
    fn into_store(self, url: &str) -> StoreError {
        match self {
            PgError::Store(e) => e,
            PgError::Sql(e) => sql_error(url, e),
        }
    }
}

/// SQLSTATE classes that mean "the server cannot be used now": connection exceptions (08),
/// authorization (28), no such database (3D), operator intervention such as a shutdown (57P),
/// too many connections (53300).
fn unreachable_code(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("28")
        || code.starts_with("3D")
        || code.starts_with("57P")
        || code == "53300"
}

fn sql_error(url: &str, e: sqlx::Error) -> StoreError {
    let unavailable = |detail: String| StoreError::Unavailable { url: url.to_owned(), detail };
    match &e {
        sqlx::Error::PoolTimedOut => unavailable(
            "no pooled connection became free in time (the server is slow or unreachable, or every connection of \
             the pool is busy)"
                .into(),
        ),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            unavailable(e.to_string())
        }
        sqlx::Error::Database(db) if db.code().as_deref().is_some_and(unreachable_code) => unavailable(e.to_string()),
        _ => StoreError::Io(format!("PostgreSQL: {e}")),
    }
}

fn timed_out(url: &str, what: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        url: url.to_owned(),
        detail: format!(
            "`{what}` got no answer within {} (a slow or unreachable server, an exhausted pool, or a row another \
             writer holds)",
            humantime::format_duration(timeout)
        ),
    }
}

fn encode<T: Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Io(format!("cannot encode record: {e}")))
}

fn decode<T: DeserializeOwned>(table: &str, key: &dyn Display, text: &str) -> StoreResult<T> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt { key: format!("{table}/{key}"), detail: e.to_string() })
}

/// A u64 the database compares or orders by, as bigint: saturated at `i64::MAX`.
fn ord_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A bigint column written by [`ord_i64`] (never negative), back as u64.
fn ord_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A u64 the database only stores and hands back (compared in Rust), as bigint: the same bits.
fn bits_i64(v: u64) -> i64 {
    v as i64
}

fn bits_u64(v: i64) -> u64 {
    v as u64
}

/// A usize count as bigint.
fn count_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The caller gave up waiting (it timed out, or its closure panicked).
fn caller_gone() -> PgError {
    PgError::Store(StoreError::Io("the calling thread stopped waiting for the database".into()))
}

/// One message from a call on the runtime to the thread waiting for it.
enum Reply<Q, T> {
    /// Compute an answer to this (the closure of a read-modify-write).
    Ask(Q),
    /// The call's result.
    Done(StoreResult<T>),
}

/// Lets a call on the runtime ask the waiting thread to run its closure mid-transaction.
struct Asker<Q, A, T> {
    replies: std::sync::mpsc::Sender<Reply<Q, T>>,
    answers: tokio::sync::mpsc::UnboundedReceiver<A>,
}

impl<Q, A, T> Asker<Q, A, T> {
    async fn ask(&mut self, question: Q) -> PgResult<A> {
        self.replies.send(Reply::Ask(question)).map_err(|_| caller_gone())?;
        self.answers.recv().await.ok_or_else(caller_gone)
    }
}

/// Applies the embedded migrations.
#[derive(Debug)]
struct EmbeddedMigrations;

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send + 's>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// The PostgreSQL-backed store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct PgStore {
    /// The private runtime; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    db: Db,
    call_timeout: Duration,
    events: broadcast::Sender<StoreEventEnvelope>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("url", &&*self.db.url).field("call_timeout", &self.call_timeout).finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Never blocks, so dropping the store on an async worker is fine too.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`, with
    /// `?sslmode=require` and the other libpq URL parameters sqlx understands), applies the
    /// migrations it lacks, and starts listening for events.
    ///
    /// # Errors
    /// [`StoreError::Open`] for a URL that is not a PostgreSQL URL or invalid options;
    /// [`StoreError::Unavailable`] when the server cannot be reached, refuses the credentials or
    /// has no such database (within [`PgOptions::call_timeout`]); [`StoreError::SchemaTooNew`] when
    /// the database was migrated by a newer gaffer-control; [`StoreError::Io`] when a migration
    /// fails.
    pub fn connect(url: &str, opts: PgOptions) -> StoreResult<PgStore> {
        let shown = redact_url(url);
        let open = |detail: String| StoreError::Open { path: shown.clone(), detail };
        if opts.pool_size_max == 0 {
            return Err(open("the pool needs at least one connection (pool_size_max 0)".into()));
        }
        if opts.call_timeout.is_zero() {
            return Err(open("the call timeout must be more than zero".into()));
        }
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| open(format!("not a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE): {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gaffer-pg")
            .enable_all()
            .build()
            .map_err(|e| open(format!("cannot start the database runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let pool_opts = PgPoolOptions::new().max_connections(opts.pool_size_max).acquire_timeout(opts.call_timeout);
        let listen_opts = PgPoolOptions::new().max_connections(1).acquire_timeout(opts.call_timeout);
        let (pool, listen_pool) = {
            let _entered = handle.enter();
            (
                pool_opts.connect_lazy_with(connect.clone().application_name("gaffer-control")),
                listen_opts.connect_lazy_with(connect.clone().application_name("gaffer-control events")),
            )
        };
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let store = PgStore {
            runtime: Some(runtime),
            handle,
            db: Db { pool, url: shown.clone().into() },
            call_timeout: opts.call_timeout,
            events,
        };
        let span = tracing::info_span!("pg_connect", db = %shown);
        let _entered = span.enter();
        // One plain connection first: its error says why (refused, authentication, no such
        // database), where the pool would only time out.
        store.run("connect", move |_db| async move {
            let conn = PgConnection::connect_with(&connect).await?;
            conn.close().await?;
            Ok(())
        })?;
        store.run("migrate", |db| async move { migrate(&db).await })?;
        let events = store.events.clone();
        store.run("listen", move |db| async move {
            let listener = listen(&listen_pool).await?;
            tokio::spawn(listen_loop(listener, listen_pool, events, db.url.clone()).in_current_span());
            Ok(())
        })?;
        tracing::info!(schema = schema_version(), "connected to PostgreSQL");
        drop(_entered);
        Ok(store)
    }

    /// Runs `f` on the private runtime and waits for it (see the module docs): at most
    /// [`PgOptions::call_timeout`].
    fn run<T, F, Fut>(&self, what: &'static str, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = PgResult<T>> + Send + 'static,
    {
        self.run_asking::<(), (), T, _, _>(what, |db, _asker| f(db), &mut |()| ())
    }

    /// Like [`PgStore::run`], but the future may ask the calling thread to `answer` a question
    /// (run a read-modify-write closure) while it holds a transaction open.
    fn run_asking<Q, A, T, F, Fut>(&self, what: &'static str, f: F, answer: &mut dyn FnMut(Q) -> A) -> StoreResult<T>
    where
        Q: Send + 'static,
        A: Send + 'static,
        T: Send + 'static,
        F: FnOnce(Db, Asker<Q, A, T>) -> Fut,
        Fut: Future<Output = PgResult<T>> + Send + 'static,
    {
        let (reply_tx, reply_rx) = std::sync::mpsc::channel::<Reply<Q, T>>();
        let (answer_tx, answer_rx) = tokio::sync::mpsc::unbounded_channel::<A>();
        let url = self.db.url.clone();
        let timeout = self.call_timeout;
        let fut = f(self.db.clone(), Asker { replies: reply_tx.clone(), answers: answer_rx });
        self.handle.spawn(
            async move {
                let out = match tokio::time::timeout(timeout, fut).await {
                    Ok(result) => result.map_err(|e| e.into_store(&url)),
                    Err(_) => Err(timed_out(&url, what, timeout)),
                };
                // The caller may have stopped waiting (its own deadline): nothing to tell then.
                let _ = reply_tx.send(Reply::Done(out));
            }
            .instrument(tracing::Span::current()),
        );
        let deadline = Instant::now() + timeout + REPLY_GRACE;
        loop {
            match reply_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Reply::Ask(question)) => {
                    // A closed channel means the call already gave up; it reports that itself.
                    let _ = answer_tx.send(answer(question));
                }
                Ok(Reply::Done(result)) => return result,
                Err(_) => return Err(timed_out(&self.db.url, what, timeout)),
            }
        }
    }

    /// Read-modify-write of one job: the row `FOR UPDATE` (`SKIP LOCKED` when `skip_locked`),
    /// the closure on this thread, the write.
    fn rmw_job(
        &self,
        what: &'static str,
        id: JobId,
        skip_locked: bool,
        f: &mut dyn FnMut(&mut JobRecord) -> bool,
    ) -> StoreResult<Option<JobRecord>> {
        let mut answer = |old: JobRecord| -> Option<JobRecord> {
            let mut new = old.clone();
            f(&mut new).then_some(new)
        };
        self.run_asking(
            what,
            move |db, mut asker| async move {
                let mut tx = db.pool.begin().await?;
                let Some(old) = job_for_update(&mut tx, id, skip_locked).await? else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                let Some(mut new) = asker.ask(old.clone()).await? else {
                    tx.rollback().await?;
                    return Ok(Some(old));
                };
                // The id and seq are the store's.
                new.id = old.id;
                new.seq = old.seq;
                update_job_row(&mut tx, &new).await?;
                let mut deltas = [0i64; 6];
                move_count(&mut deltas, old.state, new.state);
                add_counts(&mut tx, &deltas).await?;
                tx.commit().await?;
                Ok(Some(new))
            },
            &mut answer,
        )
    }
}

/// Refuses a database migrated by a newer binary, then applies what it lacks.
async fn migrate(db: &Db) -> PgResult<()> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text").fetch_one(&db.pool).await?;
    if exists.is_some() {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(&db.pool).await?;
        if let Some(found) = found.filter(|v| *v > schema_version()) {
            return Err(StoreError::SchemaTooNew { url: db.url.to_string(), found, supported: schema_version() }.into());
        }
    }
    let migrator = Migrator::new(EmbeddedMigrations).await.map_err(|e| StoreError::Io(format!("migrations: {e}")))?;
    migrator.run(&db.pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(found) => {
            PgError::Store(StoreError::SchemaTooNew { url: db.url.to_string(), found, supported: schema_version() })
        }
        sqlx::migrate::MigrateError::Execute(e) => PgError::Sql(e),
        other => PgError::Store(StoreError::Io(format!("applying the schema migrations failed: {other}"))),
    })?;
    Ok(())
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(EVENTS_CHANNEL).await?;
    Ok(listener)
}

/// Feeds notifications to the broadcast channel for as long as the runtime runs; reconnects
/// after a lost connection and then tells subscribers to look again ([`StoreEvent::JobsChanged`]).
async fn listen_loop(
    mut listener: PgListener,
    pool: PgPool,
    events: broadcast::Sender<StoreEventEnvelope>,
    url: Arc<str>,
) {
    let missed = || StoreEventEnvelope { origin: STORE_ORIGIN, event: StoreEvent::JobsChanged };
    loop {
        match listener.try_recv().await {
            Ok(Some(note)) => match serde_json::from_str::<StoreEventEnvelope>(note.payload()) {
                // No subscriber is not an error.
                Ok(ev) => {
                    let _ = events.send(ev);
                }
                Err(e) => tracing::warn!(
                    channel = EVENTS_CHANNEL,
                    bytes = note.payload().len(),
                    error = %e,
                    "ignored a notification that is not a store event"
                ),
            },
            // The connection was lost and sqlx has already opened a new one and listens again.
            Ok(None) => {
                tracing::warn!(db = %url, "lost the event listener's connection; reconnected");
                let _ = events.send(missed());
            }
            Err(e) => {
                tracing::warn!(db = %url, error = %e, "the event listener failed; reconnecting");
                drop(listener);
                let mut wait = LISTEN_BACKOFF_MIN;
                listener = loop {
                    tokio::time::sleep(wait).await;
                    match listen(&pool).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::warn!(db = %url, error = %e, retry_in = ?wait, "cannot listen for events yet");
                            wait = (wait * 2).min(LISTEN_BACKOFF_MAX);
                        }
                    }
                };
                tracing::info!(db = %url, "listening for events again");
                let _ = events.send(missed());
            }
        }
    }
}

// ---- job rows ----

/// The job row `FOR UPDATE` (or `FOR UPDATE SKIP LOCKED`).
async fn job_for_update(conn: &mut PgConnection, id: JobId, skip_locked: bool) -> PgResult<Option<JobRecord>> {
    let sql = if skip_locked {
        "SELECT record::text FROM jobs WHERE id = $1 FOR UPDATE SKIP LOCKED"
    } else {
        "SELECT record::text FROM jobs WHERE id = $1 FOR UPDATE"
    };
    let text: Option<String> = sqlx::query_scalar(sql).bind(id).fetch_optional(conn).await?;
    Ok(text.map(|t| decode("jobs", &id, &t)).transpose()?)
}

/// The columns of a job row, from its record.
struct JobColumns {
    state: i16,
    rank: i16,
    priority: i16,
    created_at_ms: i64,
    seq: i64,
    site: String,
    agent: Option<Uuid>,
    lease_holder: Option<Uuid>,
    lease_id: Option<i64>,
    lease_deadline_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    record: String,
}

impl JobColumns {
    fn of(job: &JobRecord) -> StoreResult<Self> {
        Ok(Self {
            state: job.state.index() as i16,
            rank: i16::from(state_rank(job.state, job.priority)),
            priority: job.priority as i16,
            created_at_ms: ord_i64(job.created_at_ms),
            seq: ord_i64(job.seq),
            site: job.site.clone(),
            agent: job.agent,
            lease_holder: job.lease.map(|l| l.holder),
            lease_id: job.lease.map(|l| bits_i64(l.lease_id)),
            lease_deadline_ms: job.lease.and_then(|l| l.deadline_ms).map(ord_i64),
            finished_at_ms: job.state.is_terminal().then(|| ord_i64(finished_time(job))),
            record: encode(job)?,
        })
    }
}

/// Inserts a job row (its seq already drawn); false if the id exists.
async fn insert_job_row(conn: &mut PgConnection, job: &JobRecord) -> PgResult<bool> {
    let c = JobColumns::of(job)?;
    let done = sqlx::query(
        "INSERT INTO jobs (id, state, rank, priority, created_at_ms, seq, site, agent, lease_holder, lease_id, \
         lease_deadline_ms, finished_at_ms, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
         $13::json) ON CONFLICT (id) DO NOTHING",
    )
    .bind(job.id)
    .bind(c.state)
    .bind(c.rank)
    .bind(c.priority)
    .bind(c.created_at_ms)
    .bind(c.seq)
    .bind(c.site)
    .bind(c.agent)
    .bind(c.lease_holder)
    .bind(c.lease_id)
    .bind(c.lease_deadline_ms)
    .bind(c.finished_at_ms)
    .bind(c.record)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Rewrites an existing job row from its record.
async fn update_job_row(conn: &mut PgConnection, job: &JobRecord) -> PgResult<()> {
    let c = JobColumns::of(job)?;
    sqlx::query(
        "UPDATE jobs SET state = $2, rank = $3, priority = $4, created_at_ms = $5, seq = $6, site = $7, agent = $8, \
         lease_holder = $9, lease_id = $10, lease_deadline_ms = $11, finished_at_ms = $12, record = $13::json \
         WHERE id = $1",
    )
    .bind(job.id)
    .bind(c.state)
    .bind(c.rank)
    .bind(c.priority)
    .bind(c.created_at_ms)
    .bind(c.seq)
    .bind(c.site)
    .bind(c.agent)
    .bind(c.lease_holder)
    .bind(c.lease_id)
    .bind(c.lease_deadline_ms)
    .bind(c.finished_at_ms)
    .bind(c.record)
    .execute(conn)
    .await?;
    Ok(())
}

async fn next_job_seq(conn: &mut PgConnection) -> PgResult<u64> {
    let seq: i64 = sqlx::query_scalar("SELECT nextval('job_seq')").fetch_one(conn).await?;
    Ok(ord_u64(seq))
}

fn move_count(deltas: &mut [i64; 6], from: JobState, to: JobState) {
    if from != to {
        deltas[from.index()] -= 1;
        deltas[to.index()] += 1;
    }
}

/// Applies per-state count changes, in state order (so concurrent writers lock the counter rows
/// in one order), never below zero (as sled).
async fn add_counts(conn: &mut PgConnection, deltas: &[i64; 6]) -> PgResult<()> {
    for (state, delta) in deltas.iter().enumerate() {
        if *delta != 0 {
            sqlx::query("UPDATE job_counts SET jobs = GREATEST(jobs + $2, 0) WHERE state = $1")
                .bind(state as i16)
                .bind(*delta)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Records by id from `SELECT id, record::text` rows.
fn decode_jobs(rows: Vec<(Uuid, String)>) -> StoreResult<std::collections::HashMap<Uuid, JobRecord>> {
    rows.into_iter().map(|(id, text)| Ok((id, decode::<JobRecord>("jobs", &id, &text)?))).collect()
}

/// Writes a delivery's row (state, due time and record).
async fn put_webhook_delivery_row(conn: &mut PgConnection, d: &crate::webhook::WebhookDelivery) -> PgResult<()> {
    sqlx::query("UPDATE webhook_deliveries SET state = $2, next_attempt_at_ms = $3, record = $4::json WHERE id = $1")
        .bind(d.id)
        .bind(d.state.as_str())
        .bind(ord_i64(d.next_attempt_at_ms))
        .bind(encode(d)?)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The agent row `FOR UPDATE`.
async fn agent_for_update(conn: &mut PgConnection, id: AgentId) -> PgResult<Option<AgentRecord>> {
    let text: Option<String> = sqlx::query_scalar("SELECT record::text FROM agents WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(conn)
        .await?;
    Ok(text.map(|t| decode("agents", &id, &t)).transpose()?)
}

/// Writes an agent row (insert or replace) from its record.
async fn put_agent_row(conn: &mut PgConnection, rec: &AgentRecord) -> PgResult<()> {
    sqlx::query(
        "INSERT INTO agents (id, site, hostname, record) VALUES ($1, $2, $3, $4::json) ON CONFLICT (id) DO UPDATE \
         SET site = EXCLUDED.site, hostname = EXCLUDED.hostname, record = EXCLUDED.record",
    )
    .bind(rec.id)
    .bind(rec.site.clone())
    .bind(rec.hostname.clone())
    .bind(encode(rec)?)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reads one record by key.
async fn get_record<T, K>(db: &Db, table: &'static str, sql: &'static str, key: K, shown: String) -> PgResult<Option<T>>
where
    T: DeserializeOwned,
    K: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
{
    let text: Option<String> = sqlx::query_scalar(sql).bind(key).fetch_optional(&db.pool).await?;
    Ok(text.map(|t| decode(table, &shown, &t)).transpose()?)
}

/// Decodes `(key, record)` rows.
fn decode_all<T: DeserializeOwned, K: Display>(table: &str, rows: Vec<(K, String)>) -> StoreResult<Vec<T>> {
    rows.into_iter().map(|(k, text)| decode(table, &k, &text)).collect()
}

impl Store for PgStore {
    fn insert_user(&self, rec: &UserRecord) -> StoreResult<bool> {
        let (name, role, record) = (rec.name.clone(), rec.role as i16, encode(rec)?);
        self.run("insert_user", move |db| async move {
            let done = sqlx::query(
                "INSERT INTO users (name, role, record) VALUES ($1, $2, $3::json) ON CONFLICT (name) DO NOTHING",
            )
            .bind(name)
            .bind(role)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn get_user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        let name = name.to_owned();
        self.run("get_user", move |db| async move {
            let shown = name.clone();
            get_record(&db, "users", "SELECT record::text FROM users WHERE name = $1", name, shown).await
        })
    }

    fn list_users(&self) -> StoreResult<Vec<UserRecord>> {
        self.run("list_users", |db| async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT name, record::text FROM users ORDER BY name").fetch_all(&db.pool).await?;
            Ok(decode_all("users", rows)?)
        })
    }

    fn set_user_password(&self, name: &str, password_phc: &str, now_ms: UnixMs) -> StoreResult<Option<UserRecord>> {
        let (name, phc) = (name.to_owned(), password_phc.to_owned());
        self.run("set_user_password", move |db| async move {
            let mut tx = db.pool.begin().await?;
            let text: Option<String> = sqlx::query_scalar("SELECT record::text FROM users WHERE name = $1 FOR UPDATE")
                .bind(name.clone())
                .fetch_optional(&mut *tx)
                .await?;
            let Some(text) = text else {
                tx.rollback().await?;
                return Ok(None);
            };
            let mut user: UserRecord = decode("users", &name, &text)?;
            user.password_phc = phc;
            user.password_changed_at_ms = now_ms.max(user.password_changed_at_ms + 1);
            sqlx::query("UPDATE users SET record = $2::json WHERE name = $1")
                .bind(name)
                .bind(encode(&user)?)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(user))
        })
    }

    fn remove_user(&self, name: &str) -> StoreResult<UserRemoval> {
        let name = name.to_owned();
        self.run("remove_user", move |db| async move {
            let mut tx = db.pool.begin().await?;
            sqlx::query("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
            let text: Option<String> = sqlx::query_scalar("SELECT record::text FROM users WHERE name = $1")
                .bind(name.clone())
                .fetch_optional(&mut *tx)
                .await?;
            let Some(text) = text else {
                tx.rollback().await?;
                return Ok(UserRemoval::NotFound);
            };
            let user: UserRecord = decode("users", &name, &text)?;
            if user.role == Role::Admin {
                let admins: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE role = $1")
                    .bind(Role::Admin as i16)
                    .fetch_one(&mut *tx)
                    .await?;
                if admins <= 1 {
                    tx.rollback().await?;
                    return Ok(UserRemoval::LastAdmin);
                }
            }
            sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(UserRemoval::Removed(user))
        })
    }

    fn insert_enrollment_token(&self, rec: &EnrollmentTokenRecord) -> StoreResult<()> {
        let (hash, record) = (rec.hash.to_vec(), encode(rec)?);
        self.run("insert_enrollment_token", move |db| async move {
            sqlx::query(
                "INSERT INTO enroll_tokens (hash, record) VALUES ($1, $2::json) ON CONFLICT (hash) DO UPDATE SET \
                 record = EXCLUDED.record",
            )
            .bind(hash)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn consume_enrollment_token(
        &self,
        hash: &[u8; 32],
        agent: AgentId,
        now_ms: UnixMs,
    ) -> StoreResult<EnrollmentTokenRecord> {
        let hash = hash.to_vec();
        self.run("consume_enrollment_token", move |db| async move {
            let mut tx = db.pool.begin().await?;
            let text: Option<String> =
                sqlx::query_scalar("SELECT record::text FROM enroll_tokens WHERE hash = $1 FOR UPDATE")
                    .bind(hash.clone())
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some(text) = text else {
                tx.rollback().await?;
                return Err(StoreError::TokenUnknown.into());
            };
            let mut rec: EnrollmentTokenRecord = decode("enroll_tokens", &hex::encode(&hash), &text)?;
            if rec.used_at_ms.is_some() {
                tx.rollback().await?;
                return Err(StoreError::TokenAlreadyUsed.into());
            }
            if now_ms >= rec.expires_at_ms {
                tx.rollback().await?;
                return Err(StoreError::TokenExpired.into());
            }
            rec.used_at_ms = Some(now_ms);
            rec.used_by = Some(agent);
            sqlx::query("UPDATE enroll_tokens SET record = $2::json WHERE hash = $1")
                .bind(hash)
                .bind(encode(&rec)?)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(rec)
        })
    }

    fn create_api_token(&self, rec: &ApiTokenRecord) -> StoreResult<bool> {
        let (hash, name, record) = (rec.hash.to_vec(), rec.name.clone(), encode(rec)?);
        self.run("create_api_token", move |db| async move {
            let done = sqlx::query(
                "INSERT INTO api_tokens (hash, name, record) VALUES ($1, $2, $3::json) ON CONFLICT DO NOTHING",
            )
            .bind(hash)
            .bind(name)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Option<ApiTokenRecord>> {
        let hash = hash.to_vec();
        self.run("api_token", move |db| async move {
            let shown = hex::encode(&hash);
            get_record(&db, "api_tokens", "SELECT record::text FROM api_tokens WHERE hash = $1", hash, shown).await
        })
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiTokenRecord>> {
        self.run("list_api_tokens", |db| async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT name, record::text FROM api_tokens ORDER BY name").fetch_all(&db.pool).await?;
            Ok(decode_all("api_tokens", rows)?)
        })
    }

    fn revoke_api_token(&self, name: &str) -> StoreResult<Option<ApiTokenRecord>> {
        let name = name.to_owned();
        self.run("revoke_api_token", move |db| async move {
            let text: Option<String> =
                sqlx::query_scalar("DELETE FROM api_tokens WHERE name = $1 RETURNING record::text")
                    .bind(name.clone())
                    .fetch_optional(&db.pool)
                    .await?;
            Ok(text.map(|t| decode("api_tokens", &name, &t)).transpose()?)
        })
    }

    fn touch_api_token(&self, hash: &[u8; 32], now_ms: UnixMs) -> StoreResult<()> {
        let hash = hash.to_vec();
        self.run("touch_api_token", move |db| async move {
            let mut tx = db.pool.begin().await?;
            let text: Option<String> =
                sqlx::query_scalar("SELECT record::text FROM api_tokens WHERE hash = $1 FOR UPDATE")
                    .bind(hash.clone())
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(text) = text {
                let mut rec: ApiTokenRecord = decode("api_tokens", &hex::encode(&hash), &text)?;
                rec.last_used_at_ms = Some(now_ms);
                sqlx::query("UPDATE api_tokens SET record = $2::json WHERE hash = $1")
                    .bind(hash)
                    .bind(encode(&rec)?)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn insert_session(&self, rec: &SessionRecord) -> StoreResult<()> {
        let (hash, user, expires, record) =
            (rec.id_hash.to_vec(), rec.user.clone(), ord_i64(rec.expires_at_ms), encode(rec)?);
        self.run("insert_session", move |db| async move {
            sqlx::query(
                "INSERT INTO sessions (id_hash, user_name, expires_at_ms, record) VALUES ($1, $2, $3, $4::json) \
                 ON CONFLICT (id_hash) DO UPDATE SET user_name = EXCLUDED.user_name, expires_at_ms = \
                 EXCLUDED.expires_at_ms, record = EXCLUDED.record",
            )
            .bind(hash)
            .bind(user)
            .bind(expires)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn get_session(&self, id_hash: &[u8; 32]) -> StoreResult<Option<SessionRecord>> {
        let hash = id_hash.to_vec();
        self.run("get_session", move |db| async move {
            let shown = hex::encode(&hash);
            get_record(&db, "sessions", "SELECT record::text FROM sessions WHERE id_hash = $1", hash, shown).await
        })
    }

    fn delete_session(&self, id_hash: &[u8; 32]) -> StoreResult<()> {
        let hash = id_hash.to_vec();
        self.run("delete_session", move |db| async move {
            sqlx::query("DELETE FROM sessions WHERE id_hash = $1").bind(hash).execute(&db.pool).await?;
            Ok(())
        })
    }

    fn delete_user_sessions(&self, user: &str) -> StoreResult<usize> {
        let user = user.to_owned();
        self.run("delete_user_sessions", move |db| async move {
            let done = sqlx::query("DELETE FROM sessions WHERE user_name = $1").bind(user).execute(&db.pool).await?;
            Ok(done.rows_affected() as usize)
        })
    }

    fn delete_expired_sessions(&self, now_ms: UnixMs) -> StoreResult<usize> {
        self.run("delete_expired_sessions", move |db| async move {
            let done = sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= $1")
                .bind(ord_i64(now_ms))
                .execute(&db.pool)
                .await?;
            Ok(done.rows_affected() as usize)
        })
    }

    fn insert_agent(&self, rec: &AgentRecord) -> StoreResult<()> {
        let rec = rec.clone();
        self.run("insert_agent", move |db| async move {
            let mut conn = db.pool.acquire().await?;
            put_agent_row(&mut conn, &rec).await
        })
    }

    fn get_agent(&self, id: AgentId) -> StoreResult<Option<AgentRecord>> {
        self.run("get_agent", move |db| async move {
            get_record(&db, "agents", "SELECT record::text FROM agents WHERE id = $1", id, id.to_string()).await
        })
    }

    fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        self.run("list_agents", |db| async move {
            let rows: Vec<(Uuid, String)> =
                sqlx::query_as("SELECT id, record::text FROM agents ORDER BY site, hostname, id")
                    .fetch_all(&db.pool)
                    .await?;
            Ok(decode_all("agents", rows)?)
        })
    }

    fn update_agent(&self, id: AgentId, f: &mut dyn FnMut(&mut AgentRecord)) -> StoreResult<Option<AgentRecord>> {
        let mut answer = |mut rec: AgentRecord| -> AgentRecord {
            f(&mut rec);
            rec
        };
        self.run_asking(
            "update_agent",
            move |db, mut asker| async move {
                let mut tx = db.pool.begin().await?;
                let Some(old) = agent_for_update(&mut tx, id).await? else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                let mut new = asker.ask(old).await?;
                new.id = id;
                put_agent_row(&mut tx, &new).await?;
                tx.commit().await?;
                Ok(Some(new))
            },
            &mut answer,
        )
    }

    fn push_health(&self, id: AgentId, sample: &HealthSample, keep_max: usize, bytes_max: usize) -> StoreResult<()> {
        let record = encode(sample)?;
        let sample = sample.clone();
        self.run("push_health", move |db| async move {
            let len = record.len();
            let over = |count: usize, bytes: usize| count > 1 && (count > keep_max || bytes > bytes_max);
            let mut tx = db.pool.begin().await?;
            let (samples, bytes): (i32, i64) = sqlx::query_as(
                "INSERT INTO health_tally (agent, samples, bytes) VALUES ($1, 1, $2) ON CONFLICT (agent) DO UPDATE \
                 SET samples = health_tally.samples + 1, bytes = health_tally.bytes + EXCLUDED.bytes \
                 RETURNING samples, bytes",
            )
            .bind(id)
            .bind(count_i64(len))
            .fetch_one(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO health (agent, received_at_ms, bytes, record) VALUES ($1, $2, $3, $4::json)")
                .bind(id)
                .bind(ord_i64(sample.received_at_ms))
                .bind(i32::try_from(len).unwrap_or(i32::MAX))
                .bind(record)
                .execute(&mut *tx)
                .await?;
            let (mut count, mut total) = (usize::try_from(samples).unwrap_or(0), usize::try_from(bytes).unwrap_or(0));
            if over(count, total) {
                // The oldest samples go first, as long as what is left is over a bound: a prefix
                // of the history, found a chunk at a time.
                let mut cut: Option<(i64, i64)> = None;
                'trim: loop {
                    let chunk: Vec<(i64, i64, i32)> = match cut {
                        None => {
                            sqlx::query_as(
                                "SELECT received_at_ms, counter, bytes FROM health WHERE agent = $1 \
                             ORDER BY received_at_ms, counter LIMIT $2",
                            )
                            .bind(id)
                            .bind(TRIM_CHUNK)
                            .fetch_all(&mut *tx)
                            .await?
                        }
                        Some((at, counter)) => {
                            sqlx::query_as(
                                "SELECT received_at_ms, counter, bytes FROM health WHERE agent = $1 \
                             AND (received_at_ms, counter) > ($2, $3) ORDER BY received_at_ms, counter LIMIT $4",
                            )
                            .bind(id)
                            .bind(at)
                            .bind(counter)
                            .bind(TRIM_CHUNK)
                            .fetch_all(&mut *tx)
                            .await?
                        }
                    };
                    let full = chunk.len() as i64 == TRIM_CHUNK;
                    for (at, counter, b) in chunk {
                        if !over(count, total) {
                            break 'trim;
                        }
                        cut = Some((at, counter));
                        count -= 1;
                        total = total.saturating_sub(usize::try_from(b).unwrap_or(0));
                    }
                    if !full {
                        break;
                    }
                }
                if let Some((at, counter)) = cut {
                    sqlx::query("DELETE FROM health WHERE agent = $1 AND (received_at_ms, counter) <= ($2, $3)")
                        .bind(id)
                        .bind(at)
                        .bind(counter)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("UPDATE health_tally SET samples = $2, bytes = $3 WHERE agent = $1")
                    .bind(id)
                    .bind(i32::try_from(count).unwrap_or(i32::MAX))
                    .bind(count_i64(total))
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(mut agent) = agent_for_update(&mut tx, id).await? {
                if agent.last_health.as_ref().is_none_or(|h| h.received_at_ms <= sample.received_at_ms) {
                    agent.last_health = Some(sample);
                    put_agent_row(&mut tx, &agent).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn health_history(&self, id: AgentId, limit: usize) -> StoreResult<Vec<HealthSample>> {
        self.run("health_history", move |db| async move {
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT counter, record::text FROM health WHERE agent = $1 \
                 ORDER BY received_at_ms DESC, counter DESC LIMIT $2",
            )
            .bind(id)
            .bind(count_i64(limit))
            .fetch_all(&db.pool)
            .await?;
            let mut samples: Vec<HealthSample> = decode_all("health", rows)?;
            samples.reverse();
            Ok(samples)
        })
    }

    fn insert_job(&self, job: &JobRecord) -> StoreResult<bool> {
        let mut job = job.clone();
        self.run("insert_job", move |db| async move {
            let mut tx = db.pool.begin().await?;
            job.seq = next_job_seq(&mut tx).await?;
            if !insert_job_row(&mut tx, &job).await? {
                tx.rollback().await?;
                return Ok(false);
            }
            let mut deltas = [0i64; 6];
            deltas[job.state.index()] += 1;
            add_counts(&mut tx, &deltas).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn get_job(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        self.run("get_job", move |db| async move {
            get_record(&db, "jobs", "SELECT record::text FROM jobs WHERE id = $1", id, id.to_string()).await
        })
    }

    fn list_jobs(&self, query: &JobQuery) -> StoreResult<JobPage> {
        let query = query.clone();
        if query.limit == 0 {
            return Ok(JobPage::default());
        }
        self.run("list_jobs", move |db| async move {
            let cursor = query.after.map(|c| (ord_i64(c.created_at_ms), ord_i64(c.seq)));
            let filtered = query.state.is_some() || query.agent.is_some();
            let mut page = JobPage::default();
            if !filtered {
                // Every entry matches: the page is the next `limit` jobs, and a next cursor when
                // there is one more.
                let want = count_i64(query.limit).saturating_add(1);
                let rows: Vec<(i64, i64, String)> =
                    match cursor {
                        None => sqlx::query_as(
                            "SELECT created_at_ms, seq, record::text FROM jobs ORDER BY created_at_ms DESC, seq DESC \
                         LIMIT $1",
                        )
                        .bind(want)
                        .fetch_all(&db.pool)
                        .await?,
                        Some((c, s)) => sqlx::query_as(
                            "SELECT created_at_ms, seq, record::text FROM jobs WHERE (created_at_ms, seq) < ($1, $2) \
                         ORDER BY created_at_ms DESC, seq DESC LIMIT $3",
                        )
                        .bind(c)
                        .bind(s)
                        .bind(want)
                        .fetch_all(&db.pool)
                        .await?,
                    };
                let more = rows.len() > query.limit;
                for (c, s, text) in rows.into_iter().take(query.limit) {
                    let job: JobRecord = decode("jobs", &format!("{c}-{s}"), &text)?;
                    page.next = Some(JobCursor { created_at_ms: ord_u64(c), seq: ord_u64(s) });
                    page.jobs.push(job);
                }
                if !more {
                    page.next = None;
                }
                return Ok(page);
            }
            // Filtered: sled's bounded scan, from the index alone (state and agent ride along),
            // then the records of the matches.
            let budget = list_scan_budget(query.limit);
            let want = count_i64(budget).saturating_add(1);
            let scanned: Vec<(Uuid, i64, i64, i16, Option<Uuid>)> =
                match cursor {
                    None => sqlx::query_as(
                        "SELECT id, created_at_ms, seq, state, agent FROM jobs ORDER BY created_at_ms DESC, seq DESC \
                     LIMIT $1",
                    )
                    .bind(want)
                    .fetch_all(&db.pool)
                    .await?,
                    Some((c, s)) => sqlx::query_as(
                        "SELECT id, created_at_ms, seq, state, agent FROM jobs WHERE (created_at_ms, seq) < ($1, $2) \
                     ORDER BY created_at_ms DESC, seq DESC LIMIT $3",
                    )
                    .bind(c)
                    .bind(s)
                    .bind(want)
                    .fetch_all(&db.pool)
                    .await?,
                };
            let state = query.state.map(|s| s.index() as i16);
            let mut matched = Vec::new();
            let mut taken = 0usize;
            for (id, _, _, st, agent) in &scanned {
                if matched.len() >= query.limit || taken >= budget {
                    break;
                }
                taken += 1;
                if state.is_none_or(|s| s == *st) && query.agent.is_none_or(|a| *agent == Some(a)) {
                    matched.push(*id);
                }
            }
            if scanned.len() > taken {
                let (_, c, s, _, _) = scanned[taken - 1];
                page.next = Some(JobCursor { created_at_ms: ord_u64(c), seq: ord_u64(s) });
            }
            let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, record::text FROM jobs WHERE id = ANY($1)")
                .bind(matched.clone())
                .fetch_all(&db.pool)
                .await?;
            let mut records = decode_jobs(rows)?;
            // A job deleted or changed since the scan is left out, as sled does.
            page.jobs =
                matched.iter().filter_map(|id| records.remove(id)).filter(|j| query_matches(&query, j)).collect();
            Ok(page)
        })
    }

    fn jobs_in_state(&self, state: JobState, limit: usize) -> StoreResult<Vec<JobRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.run("jobs_in_state", move |db| async move {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, record::text FROM jobs WHERE state = $1 ORDER BY rank, created_at_ms, seq, id LIMIT $2",
            )
            .bind(state.index() as i16)
            .bind(count_i64(limit))
            .fetch_all(&db.pool)
            .await?;
            Ok(decode_all("jobs", rows)?)
        })
    }

    fn jobs_leased_to(&self, holder: AgentId) -> StoreResult<Vec<JobRecord>> {
        self.run("jobs_leased_to", move |db| async move {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, record::text FROM jobs WHERE lease_holder = $1 AND state = ANY($2) \
                 ORDER BY state, created_at_ms, seq, id",
            )
            .bind(holder)
            .bind(vec![JobState::Assigned.index() as i16, JobState::Running.index() as i16])
            .fetch_all(&db.pool)
            .await?;
            Ok(decode_all("jobs", rows)?)
        })
    }

    fn job_counts(&self) -> StoreResult<JobCounts> {
        self.run("job_counts", |db| async move {
            let rows: Vec<(i16, i64)> =
                sqlx::query_as("SELECT state, jobs FROM job_counts").fetch_all(&db.pool).await?;
            let mut counts = JobCounts::default();
            for (state, n) in rows {
                if let Some(slot) = usize::try_from(state).ok().and_then(|i| counts.0.get_mut(i)) {
                    *slot = ord_u64(n);
                }
            }
            Ok(counts)
        })
    }

    fn update_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        self.rmw_job("update_job", id, false, f)
    }

    fn claim_job(&self, id: JobId, f: &mut dyn FnMut(&mut JobRecord) -> bool) -> StoreResult<Option<JobRecord>> {
        self.rmw_job("claim_job", id, true, f)
    }

    fn delete_finished_jobs(&self, finished_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        if limit == 0 {
            return Ok(0);
        }
        let cutoff = ord_i64(finished_before_ms);
        let found: Vec<Uuid> = self.run("delete_finished_jobs", move |db| async move {
            let budget = count_i64(delete_scan_budget(limit));
            // (finished, created, seq, id) of the jobs found finished before the cutoff.
            let mut found: Vec<(i64, i64, i64, Uuid)> = Vec::new();
            for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
                let rows: Vec<(Uuid, i64, i64, Option<i64>)> = sqlx::query_as(
                    "SELECT id, created_at_ms, seq, finished_at_ms FROM jobs WHERE state = $1 \
                     ORDER BY rank, created_at_ms, seq, id LIMIT $2",
                )
                .bind(state.index() as i16)
                .bind(budget)
                .fetch_all(&db.pool)
                .await?;
                for (id, created, seq, finished) in rows {
                    if created >= cutoff {
                        break;
                    }
                    if let Some(finished) = finished.filter(|f| *f < cutoff) {
                        found.push((finished, created, seq, id));
                    }
                }
            }
            found.sort_unstable();
            found.truncate(limit);
            Ok(found.into_iter().map(|f| f.3).collect())
        })?;
        let mut deleted = 0;
        for chunk in found.chunks(DELETE_BATCH) {
            let ids = chunk.to_vec();
            deleted += self.run("delete_finished_jobs", move |db| async move {
                let mut tx = db.pool.begin().await?;
                let rows: Vec<(Uuid, String)> =
                    sqlx::query_as("SELECT id, record::text FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                        .bind(ids)
                        .fetch_all(&mut *tx)
                        .await?;
                let mut gone = Vec::new();
                let mut deltas = [0i64; 6];
                for (id, text) in rows {
                    let job: JobRecord = decode("jobs", &id, &text)?;
                    // Checked again: it may have been retried since the scan.
                    if job.state.is_terminal() && finished_time(&job) < finished_before_ms {
                        deltas[job.state.index()] -= 1;
                        gone.push(id);
                    }
                }
                if gone.is_empty() {
                    tx.rollback().await?;
                    return Ok(0);
                }
                sqlx::query("DELETE FROM digests WHERE job_id = ANY($1)").bind(gone.clone()).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM jobs WHERE id = ANY($1)").bind(gone.clone()).execute(&mut *tx).await?;
                add_counts(&mut tx, &deltas).await?;
                tx.commit().await?;
                Ok(gone.len())
            })?;
        }
        Ok(deleted)
    }

    fn commit_agent_message(&self, commit: &AgentCommit) -> StoreResult<CommitOutcome> {
        let commit = commit.clone();
        let digest = match &commit.digest {
            Some((id, digest)) => Some((*id, encode(digest)?)),
            None => None,
        };
        let audit = commit
            .audit
            .iter()
            .map(|rec| Ok((ord_i64(rec.at_ms), encode(rec)?)))
            .collect::<StoreResult<Vec<(i64, String)>>>()?;
        self.run("commit_agent_message", move |db| async move {
            let mut tx = db.pool.begin().await?;
            // Creates or locks the agent's watermark row: one message of an agent at a time.
            let watermark: Option<i64> = sqlx::query_scalar(
                "INSERT INTO agent_seq (agent, seq) VALUES ($1, NULL) ON CONFLICT (agent) DO UPDATE \
                 SET seq = agent_seq.seq RETURNING seq",
            )
            .bind(commit.agent)
            .fetch_one(&mut *tx)
            .await?;
            if watermark.is_some_and(|w| commit.seq <= bits_u64(w)) {
                tx.rollback().await?;
                return Ok(CommitOutcome::Duplicate);
            }
            let mut deltas = [0i64; 6];
            if let Some(write) = &commit.job {
                let current = job_for_update(&mut tx, write.before.id, false).await?;
                if current.as_ref() != Some(&write.before) {
                    tx.rollback().await?;
                    return Ok(CommitOutcome::Conflict);
                }
                let mut after = write.after.clone();
                after.id = write.before.id;
                after.seq = write.before.seq;
                update_job_row(&mut tx, &after).await?;
                move_count(&mut deltas, write.before.state, after.state);
            }
            if let Some((id, record)) = digest {
                sqlx::query("INSERT INTO digests (job_id, record) VALUES ($1, $2::json) ON CONFLICT DO NOTHING")
                    .bind(id)
                    .bind(record)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(mut job) = commit.new_job.clone() {
                job.seq = next_job_seq(&mut tx).await?;
                if insert_job_row(&mut tx, &job).await? {
                    deltas[job.state.index()] += 1;
                }
            }
            for (at_ms, record) in audit {
                sqlx::query("INSERT INTO audit_log (at_ms, record) VALUES ($1, $2::json)")
                    .bind(at_ms)
                    .bind(record)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(mut agent) = agent_for_update(&mut tx, commit.agent).await? {
                agent.last_seen_ms = Some(commit.now_ms);
                put_agent_row(&mut tx, &agent).await?;
            }
            sqlx::query("UPDATE agent_seq SET seq = $2 WHERE agent = $1")
                .bind(commit.agent)
                .bind(bits_i64(commit.seq))
                .execute(&mut *tx)
                .await?;
            add_counts(&mut tx, &deltas).await?;
            tx.commit().await?;
            Ok(CommitOutcome::Committed)
        })
    }

    fn put_digest(&self, id: JobId, digest: &Digest) -> StoreResult<bool> {
        let record = encode(digest)?;
        self.run("put_digest", move |db| async move {
            let done = sqlx::query("INSERT INTO digests (job_id, record) VALUES ($1, $2::json) ON CONFLICT DO NOTHING")
                .bind(id)
                .bind(record)
                .execute(&db.pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn get_digest(&self, id: JobId) -> StoreResult<Option<Digest>> {
        self.run("get_digest", move |db| async move {
            get_record(&db, "digests", "SELECT record::text FROM digests WHERE job_id = $1", id, id.to_string()).await
        })
    }

    fn last_applied_seq(&self, agent: AgentId) -> StoreResult<Option<u64>> {
        self.run("last_applied_seq", move |db| async move {
            let seq: Option<Option<i64>> = sqlx::query_scalar("SELECT seq FROM agent_seq WHERE agent = $1")
                .bind(agent)
                .fetch_optional(&db.pool)
                .await?;
            Ok(seq.flatten().map(bits_u64))
        })
    }

    fn set_last_applied_seq(&self, agent: AgentId, seq: u64) -> StoreResult<()> {
        self.run("set_last_applied_seq", move |db| async move {
            sqlx::query(
                "INSERT INTO agent_seq (agent, seq) VALUES ($1, $2) ON CONFLICT (agent) DO UPDATE SET seq = EXCLUDED.seq",
            )
            .bind(agent)
            .bind(bits_i64(seq))
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn append_audit(&self, rec: &AuditRecord) -> StoreResult<()> {
        let (at_ms, record) = (ord_i64(rec.at_ms), encode(rec)?);
        self.run("append_audit", move |db| async move {
            sqlx::query("INSERT INTO audit_log (at_ms, record) VALUES ($1, $2::json)")
                .bind(at_ms)
                .bind(record)
                .execute(&db.pool)
                .await?;
            Ok(())
        })
    }

    fn list_audit(&self, limit: usize) -> StoreResult<Vec<AuditRecord>> {
        self.run("list_audit", move |db| async move {
            let rows: Vec<(i64, String)> =
                sqlx::query_as("SELECT id, record::text FROM audit_log ORDER BY id DESC LIMIT $1")
                    .bind(count_i64(limit))
                    .fetch_all(&db.pool)
                    .await?;
            Ok(decode_all("audit_log", rows)?)
        })
    }

    fn query_audit(&self, query: &AuditQuery) -> StoreResult<AuditPage> {
        let query = query.clone();
        self.run("query_audit", move |db| async move {
            let budget = list_scan_budget(query.limit);
            let unfiltered = query.actor.is_none()
                && query.action.is_none()
                && query.agent.is_none()
                && query.job.is_none()
                && query.since_ms.is_none();
            // Without filters every entry matches, so `limit + 1` rows decide the page.
            let want = count_i64(if unfiltered { query.limit } else { budget }).saturating_add(1);
            let rows: Vec<(i64, String)> = match query.after {
                None => {
                    sqlx::query_as("SELECT id, record::text FROM audit_log ORDER BY id DESC LIMIT $1")
                        .bind(want)
                        .fetch_all(&db.pool)
                        .await?
                }
                Some(after) => {
                    sqlx::query_as("SELECT id, record::text FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2")
                        .bind(ord_i64(after))
                        .bind(want)
                        .fetch_all(&db.pool)
                        .await?
                }
            };
            // Exactly sled's loop over the entries it looks at.
            let mut page = AuditPage::default();
            let mut last = None;
            for (looked, (id, text)) in rows.into_iter().enumerate() {
                let id = ord_u64(id);
                if page.entries.len() >= query.limit || looked >= budget {
                    page.next = last;
                    break;
                }
                last = Some(id);
                let record: AuditRecord = decode("audit_log", &id, &text)?;
                if query.matches(&record) {
                    page.entries.push(AuditEntry { id, record });
                }
            }
            Ok(page)
        })
    }

    fn bundle_numbers(&self, agent: AgentId) -> StoreResult<BundleNumbers> {
        self.run("bundle_numbers", move |db| async move {
            let found: Option<BundleNumbers> = get_record(
                &db,
                "bundle_numbers",
                "SELECT record::text FROM bundle_numbers WHERE agent = $1",
                agent,
                agent.to_string(),
            )
            .await?;
            Ok(found.unwrap_or_default())
        })
    }

    fn set_bundle_numbers(&self, agent: AgentId, numbers: &BundleNumbers) -> StoreResult<()> {
        let record = encode(numbers)?;
        self.run("set_bundle_numbers", move |db| async move {
            sqlx::query(
                "INSERT INTO bundle_numbers (agent, record) VALUES ($1, $2::json) ON CONFLICT (agent) DO UPDATE \
                 SET record = EXCLUDED.record",
            )
            .bind(agent)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn insert_revoked_cert(&self, rec: &RevokedCertRecord) -> StoreResult<()> {
        let (serial, record) = (rec.serial_hex.clone(), encode(rec)?);
        self.run("insert_revoked_cert", move |db| async move {
            sqlx::query(
                "INSERT INTO revoked_certs (serial_hex, record) VALUES ($1, $2::json) ON CONFLICT (serial_hex) \
                 DO UPDATE SET record = EXCLUDED.record",
            )
            .bind(serial)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn list_revoked_certs(&self) -> StoreResult<Vec<RevokedCertRecord>> {
        self.run("list_revoked_certs", |db| async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT serial_hex, record::text FROM revoked_certs ORDER BY serial_hex")
                    .fetch_all(&db.pool)
                    .await?;
            Ok(decode_all("revoked_certs", rows)?)
        })
    }

    fn put_rollout(&self, rollout: &crate::rollout::Rollout) -> StoreResult<()> {
        let (id, record) = (bits_i64(rollout.id), encode(rollout)?);
        self.run("put_rollout", move |db| async move {
            sqlx::query(
                "INSERT INTO rollouts (id, record) VALUES ($1, $2::json) ON CONFLICT (id) DO UPDATE \
                 SET record = EXCLUDED.record",
            )
            .bind(id)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn list_rollouts(&self) -> StoreResult<Vec<crate::rollout::Rollout>> {
        self.run("list_rollouts", |db| async move {
            let rows: Vec<(i64, String)> =
                sqlx::query_as("SELECT id, record::text FROM rollouts").fetch_all(&db.pool).await?;
            let mut rollouts: Vec<crate::rollout::Rollout> = rows
                .into_iter()
                .map(|(id, text)| decode("rollouts", &bits_u64(id), &text))
                .collect::<Result<_, _>>()?;
            // By id as u64 (the column holds its bits).
            rollouts.sort_by_key(|r| r.id);
            Ok(rollouts)
        })
    }

    fn delete_rollout(&self, id: u64) -> StoreResult<bool> {
        self.run("delete_rollout", move |db| async move {
            let done = sqlx::query("DELETE FROM rollouts WHERE id = $1").bind(bits_i64(id)).execute(&db.pool).await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn put_webhook_target(&self, target: &crate::webhook::WebhookTarget) -> StoreResult<()> {
        let (id, record) = (target.id, encode(target)?);
        self.run("put_webhook_target", move |db| async move {
            sqlx::query(
                "INSERT INTO webhook_targets (id, record) VALUES ($1, $2::json) ON CONFLICT (id) DO UPDATE \
                 SET record = EXCLUDED.record",
            )
            .bind(id)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn list_webhook_targets(&self) -> StoreResult<Vec<crate::webhook::WebhookTarget>> {
        self.run("list_webhook_targets", |db| async move {
            let rows: Vec<(Uuid, String)> =
                sqlx::query_as("SELECT id, record::text FROM webhook_targets ORDER BY id").fetch_all(&db.pool).await?;
            Ok(decode_all("webhook_targets", rows)?)
        })
    }

    fn delete_webhook_target(&self, id: Uuid) -> StoreResult<bool> {
        self.run("delete_webhook_target", move |db| async move {
            let done = sqlx::query("DELETE FROM webhook_targets WHERE id = $1").bind(id).execute(&db.pool).await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn enqueue_webhook_delivery(
        &self,
        d: &crate::webhook::WebhookDelivery,
        pending_max: usize,
    ) -> StoreResult<Vec<Uuid>> {
        let d = d.clone();
        let record = encode(&d)?;
        let pending_max = count_i64(pending_max.max(1));
        self.run("enqueue_webhook_delivery", move |db| async move {
            let mut tx = db.pool.begin().await?;
            // One enqueuer at a time across replicas, so the bound holds.
            sqlx::query("SELECT pg_advisory_xact_lock(7110451)").execute(&mut *tx).await?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(&mut *tx)
                .await?;
            let mut dropped = Vec::new();
            if pending >= pending_max {
                let rows: Vec<(Uuid, String)> = sqlx::query_as(
                    "SELECT id, record::text FROM webhook_deliveries WHERE state = 'pending' ORDER BY id LIMIT $1 FOR UPDATE",
                )
                .bind(pending + 1 - pending_max)
                .fetch_all(&mut *tx)
                .await?;
                for (id, text) in rows {
                    let mut old: crate::webhook::WebhookDelivery = decode("webhook_deliveries", &id, &text)?;
                    old.state = crate::webhook::DeliveryState::Dropped;
                    old.finished_at_ms = Some(d.created_at_ms);
                    put_webhook_delivery_row(&mut tx, &old).await?;
                    dropped.push(id);
                }
            }
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, state, next_attempt_at_ms, created_at_ms, record) \
                 VALUES ($1, $2, $3, $4, $5::json) ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, \
                 next_attempt_at_ms = EXCLUDED.next_attempt_at_ms, record = EXCLUDED.record",
            )
            .bind(d.id)
            .bind(d.state.as_str())
            .bind(ord_i64(d.next_attempt_at_ms))
            .bind(ord_i64(d.created_at_ms))
            .bind(record)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(dropped)
        })
    }

    fn webhook_deliveries_due(
        &self,
        now_ms: UnixMs,
        limit: usize,
    ) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        let (now, limit) = (ord_i64(now_ms), count_i64(limit));
        self.run("webhook_deliveries_due", move |db| async move {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, record::text FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at_ms <= $1 \
                 ORDER BY next_attempt_at_ms, id LIMIT $2",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(&db.pool)
            .await?;
            Ok(decode_all("webhook_deliveries", rows)?)
        })
    }

    fn update_webhook_delivery(
        &self,
        id: Uuid,
        f: &mut dyn FnMut(&mut crate::webhook::WebhookDelivery) -> bool,
    ) -> StoreResult<Option<crate::webhook::WebhookDelivery>> {
        let mut answer = |old: crate::webhook::WebhookDelivery| -> Option<crate::webhook::WebhookDelivery> {
            let mut new = old.clone();
            f(&mut new).then_some(new)
        };
        self.run_asking(
            "update_webhook_delivery",
            move |db, mut asker| async move {
                let mut tx = db.pool.begin().await?;
                let text: Option<String> =
                    sqlx::query_scalar("SELECT record::text FROM webhook_deliveries WHERE id = $1 FOR UPDATE")
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(text) = text else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                let old: crate::webhook::WebhookDelivery = decode("webhook_deliveries", &id, &text)?;
                let Some(mut new) = asker.ask(old).await? else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                new.id = id;
                put_webhook_delivery_row(&mut tx, &new).await?;
                tx.commit().await?;
                Ok(Some(new))
            },
            &mut answer,
        )
    }

    fn list_webhook_deliveries(&self, limit: usize) -> StoreResult<Vec<crate::webhook::WebhookDelivery>> {
        let limit = count_i64(limit);
        self.run("list_webhook_deliveries", move |db| async move {
            let rows: Vec<(Uuid, String)> =
                sqlx::query_as("SELECT id, record::text FROM webhook_deliveries ORDER BY id DESC LIMIT $1")
                    .bind(limit)
                    .fetch_all(&db.pool)
                    .await?;
            Ok(decode_all("webhook_deliveries", rows)?)
        })
    }

    fn webhook_pending_count(&self) -> StoreResult<u64> {
        self.run("webhook_pending_count", |db| async move {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
                .fetch_one(&db.pool)
                .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    fn delete_finished_webhook_deliveries(&self, created_before_ms: UnixMs, limit: usize) -> StoreResult<usize> {
        let (before, limit) = (ord_i64(created_before_ms), count_i64(limit));
        self.run("delete_finished_webhook_deliveries", move |db| async move {
            let done = sqlx::query(
                "DELETE FROM webhook_deliveries WHERE id IN (SELECT id FROM webhook_deliveries \
                 WHERE state <> 'pending' AND created_at_ms < $1 ORDER BY id LIMIT $2)",
            )
            .bind(before)
            .bind(limit)
            .execute(&db.pool)
            .await?;
            Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
        })
    }

    fn replica_heartbeat(&self, rec: &ReplicaRecord) -> StoreResult<()> {
        let (id, seen, record) = (rec.id, ord_i64(rec.seen_at_ms), encode(rec)?);
        self.run("replica_heartbeat", move |db| async move {
            sqlx::query(
                "INSERT INTO replicas (id, seen_at_ms, record) VALUES ($1, $2, $3::json) ON CONFLICT (id) DO UPDATE \
                 SET seen_at_ms = EXCLUDED.seen_at_ms, record = EXCLUDED.record",
            )
            .bind(id)
            .bind(seen)
            .bind(record)
            .execute(&db.pool)
            .await?;
            Ok(())
        })
    }

    fn list_replicas(&self) -> StoreResult<Vec<ReplicaRecord>> {
        self.run("list_replicas", |db| async move {
            let rows: Vec<(Uuid, String)> =
                sqlx::query_as("SELECT id, record::text FROM replicas ORDER BY id").fetch_all(&db.pool).await?;
            Ok(decode_all("replicas", rows)?)
        })
    }

    fn remove_replica(&self, id: Uuid) -> StoreResult<bool> {
        self.run("remove_replica", move |db| async move {
            let done = sqlx::query("DELETE FROM replicas WHERE id = $1").bind(id).execute(&db.pool).await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn publish(&self, ev: &StoreEventEnvelope) -> StoreResult<()> {
        let payload = ev.to_json()?;
        self.run("publish", move |db| async move {
            sqlx::query("SELECT pg_notify($1, $2)").bind(EVENTS_CHANNEL).bind(payload).execute(&db.pool).await?;
            Ok(())
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEventEnvelope> {
        self.events.subscribe()
    }

    fn flush(&self) -> StoreResult<()> {
        // Every call commits its transaction before it returns: nothing is pending.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_hides_every_password() {
        assert_eq!(
            redact_url("postgres://gaffer:s3cret@db.example:5432/gaffer"),
            "postgres://gaffer:***@db.example:5432/gaffer"
        );
        let q = redact_url("postgres://gaffer@db/gaffer?sslmode=require&password=s3cret&sslpassword=k3y");
        assert!(!q.contains("s3cret") && !q.contains("k3y"), "{q}");
        assert!(q.contains("sslmode=require") && q.contains("password=***"), "{q}");
        assert_eq!(redact_url("postgres://db/gaffer"), "postgres://db/gaffer", "nothing to hide");
        for mistyped in ["gaffer:s3cret at db", "gaffer:s3cret@db/gaffer", "not a URL"] {
            assert_eq!(redact_url(mistyped), "<not a postgres:// URL>", "{mistyped}");
        }
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        let versions: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
        assert_eq!(schema_version(), versions.len() as i64);
    }
}
