-- Webhooks and alert email (crate::webhook).

-- Targets: an HTTP URL or SMTP mailbox with its events and secret (put_webhook_target).
CREATE TABLE webhook_targets (
    id uuid PRIMARY KEY,
    record json NOT NULL
);

-- Deliveries: one event for one target, with every attempt in the record. `id` is a UUID v7
-- (creation order); `state` is pending | delivered | failed | dropped; `next_attempt_at_ms` is
-- when a pending delivery is due (a worker's claim moves it past the attempt).
CREATE TABLE webhook_deliveries (
    id uuid PRIMARY KEY,
    state text NOT NULL,
    next_attempt_at_ms bigint NOT NULL,
    created_at_ms bigint NOT NULL,
    record json NOT NULL
);

-- webhook_deliveries_due: pending ones by due time, without reading finished ones.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at_ms, id) WHERE state = 'pending';
