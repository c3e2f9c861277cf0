-- Operator alerts: written here first, sent to Discord after, marked sent.
-- dedup_key (payment id + reason) makes an operator see one alert per
-- problem, however many times the gateway or the batch raises it.
CREATE TABLE alert_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key   TEXT NOT NULL UNIQUE,
    reason      TEXT NOT NULL,
    payment_id  TEXT,
    payload     TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    sent_at     BIGINT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
);
CREATE INDEX alert_outbox_unsent ON alert_outbox (sent_at, id);
