-- Gaffer control-plane store, schema 1 (PgStore, control-plane/src/store/pg_store.rs).
-- Applied by `PgStore::connect` through sqlx's migrator (table _sqlx_migrations), in one
-- transaction, under an advisory lock so replicas starting together apply it once.
--
-- Every record is kept whole in `record`: the same serde JSON the sled store writes, in a `json`
-- column (an exact copy of the text: field order, number digits and \u0000 escapes kept, which
-- jsonb would not). The other columns are what the store looks records up by, filters on or
-- orders by; they are written together with `record` in every statement that writes it. Text keys
-- use the "C" collation, so listings come out in byte order, as from sled, whatever the
-- database's locale. u64 times and sequence numbers are stored as bigint, saturated at
-- 2^63 - 1 where they are compared in SQL (no real clock gets there).

CREATE TABLE users (
    name text COLLATE "C" PRIMARY KEY,
    -- Role: 0 viewer, 1 operator, 2 admin.
    role smallint NOT NULL,
    record json NOT NULL
);

CREATE TABLE enroll_tokens (
    -- SHA-256 of the token.
    hash bytea PRIMARY KEY,
    record json NOT NULL
);

CREATE TABLE api_tokens (
    -- SHA-256 of the token.
    hash bytea PRIMARY KEY,
    name text COLLATE "C" NOT NULL UNIQUE,
    record json NOT NULL
);

CREATE TABLE sessions (
    -- SHA-256 of the cookie value.
    id_hash bytea PRIMARY KEY,
    user_name text COLLATE "C" NOT NULL,
    expires_at_ms bigint NOT NULL,
    record json NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_name);
CREATE INDEX sessions_by_expiry ON sessions (expires_at_ms);

CREATE TABLE agents (
    id uuid PRIMARY KEY,
    site text COLLATE "C" NOT NULL,
    hostname text COLLATE "C" NOT NULL,
    record json NOT NULL
);
CREATE INDEX agents_by_site ON agents (site, hostname, id);

-- Health history: per agent, oldest first by (received_at_ms, counter).
CREATE SEQUENCE health_counter;
CREATE TABLE health (
    agent uuid NOT NULL,
    received_at_ms bigint NOT NULL,
    counter bigint NOT NULL DEFAULT nextval('health_counter'),
    -- Length of `record` in bytes (the byte bound of push_health).
    bytes integer NOT NULL,
    record json NOT NULL,
    PRIMARY KEY (agent, received_at_ms, counter)
);
-- Running sample count and byte total of each agent's history, kept exact in every push (whose
-- row lock also serializes one agent's pushes).
CREATE TABLE health_tally (
    agent uuid PRIMARY KEY,
    samples integer NOT NULL,
    bytes bigint NOT NULL
);

-- Jobs. `seq` orders jobs created in the same millisecond (drawn from job_seq at insert).
CREATE SEQUENCE job_seq;
CREATE TABLE jobs (
    id uuid PRIMARY KEY,
    -- JobState index: 0 queued, 1 assigned, 2 running, 3 succeeded, 4 failed, 5 cancelled.
    state smallint NOT NULL,
    -- Leasing order within a state (sled's rank byte): 255 - priority for queued jobs, so an
    -- ascending scan gives high, normal, low; 0 for every other state.
    rank smallint NOT NULL,
    -- Priority: 0 low, 1 normal, 2 high.
    priority smallint NOT NULL,
    created_at_ms bigint NOT NULL,
    seq bigint NOT NULL,
    site text COLLATE "C" NOT NULL,
    -- JobRecord.agent: the lease holder, or the agent that finished it.
    agent uuid,
    lease_holder uuid,
    lease_id bigint,
    lease_deadline_ms bigint,
    -- For finished jobs, when they count as finished for retention: finished_at_ms, or
    -- updated_at_ms when the record has none. NULL for unfinished ones.
    finished_at_ms bigint,
    record json NOT NULL
);
-- Leasing order (queued jobs by priority, then oldest first), and every other state oldest first.
CREATE INDEX jobs_by_state ON jobs (state, rank, created_at_ms, seq, id);
-- Newest-first listing; state and agent ride along so filtered pages are scanned from the index.
CREATE INDEX jobs_by_created ON jobs (created_at_ms, seq) INCLUDE (state, agent);
CREATE INDEX jobs_by_lease_holder ON jobs (lease_holder) WHERE lease_holder IS NOT NULL;

-- Jobs per state, changed in the same transaction as every job write (one row per state).
CREATE TABLE job_counts (
    state smallint PRIMARY KEY,
    jobs bigint NOT NULL
);
INSERT INTO job_counts (state, jobs) VALUES (0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0);

CREATE TABLE digests (
    job_id uuid PRIMARY KEY,
    record json NOT NULL
);

-- Highest applied sequence number per agent (dedupe). NULL only inside the transaction that
-- creates the row.
CREATE TABLE agent_seq (
    agent uuid PRIMARY KEY,
    seq bigint
);

CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms bigint NOT NULL,
    record json NOT NULL
);

CREATE TABLE bundle_numbers (
    agent uuid PRIMARY KEY,
    record json NOT NULL
);

CREATE TABLE revoked_certs (
    serial_hex text COLLATE "C" PRIMARY KEY,
    record json NOT NULL
);

CREATE TABLE rollouts (
    id bigint PRIMARY KEY,
    record json NOT NULL
);

-- Control-plane replicas serving from this database (replica_heartbeat).
CREATE TABLE replicas (
    id uuid PRIMARY KEY,
    seen_at_ms bigint NOT NULL,
    record json NOT NULL
);
