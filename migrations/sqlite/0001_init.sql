-- paygate schema v1 (sqlite). Timestamps are BIGINT epoch milliseconds (UTC);
-- amounts are BIGINT minor units of currency.

-- Merchants: the API key itself is never stored, only its keyed hash.
CREATE TABLE merchants (
    merchant_id    TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    api_key_prefix TEXT NOT NULL,
    api_key_hash   TEXT NOT NULL UNIQUE,
    created_at     BIGINT NOT NULL,
    revoked_at     BIGINT
);

-- Permanent claims of (merchant, orderId) and (merchant, Idempotency-Key).
-- Written in the same transaction as the realtime record and never moved or
-- deleted, so a record moving between partitions can never open a window in
-- which the same order gets a second payment (invariant I2).
CREATE TABLE payment_claims (
    merchant_id     TEXT NOT NULL,
    order_id        TEXT NOT NULL,
    payment_id      TEXT NOT NULL UNIQUE,
    idempotency_key TEXT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, order_id)
);
CREATE UNIQUE INDEX payment_claims_idempotency_key ON payment_claims (merchant_id, idempotency_key);

CREATE TABLE realtime_payments (
    payment_id          TEXT PRIMARY KEY,
    merchant_id         TEXT NOT NULL,
    order_id            TEXT NOT NULL,
    payment_key         TEXT NOT NULL,
    amount              BIGINT NOT NULL CHECK (amount >= 1),
    currency            TEXT NOT NULL,
    is_paid             BOOLEAN NOT NULL,
    is_saved            BOOLEAN NOT NULL,
    card_status         TEXT NOT NULL,
    approved_at         TEXT,
    save_attempts       BIGINT NOT NULL,
    batch_attempts      BIGINT NOT NULL,
    failure_code        TEXT,
    last_error          TEXT,
    request_fingerprint TEXT NOT NULL,
    idempotency_key     TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    UNIQUE (merchant_id, order_id)
);

CREATE TABLE completed_payments (
    payment_id          TEXT PRIMARY KEY,
    merchant_id         TEXT NOT NULL,
    order_id            TEXT NOT NULL,
    payment_key         TEXT NOT NULL,
    amount              BIGINT NOT NULL CHECK (amount >= 1),
    currency            TEXT NOT NULL,
    is_paid             BOOLEAN NOT NULL,
    is_saved            BOOLEAN NOT NULL,
    card_status         TEXT NOT NULL,
    approved_at         TEXT,
    save_attempts       BIGINT NOT NULL,
    batch_attempts      BIGINT NOT NULL,
    failure_code        TEXT,
    last_error          TEXT,
    request_fingerprint TEXT NOT NULL,
    idempotency_key     TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    UNIQUE (merchant_id, order_id)
);

CREATE TABLE unpaid_payments (
    payment_id          TEXT PRIMARY KEY,
    merchant_id         TEXT NOT NULL,
    order_id            TEXT NOT NULL,
    payment_key         TEXT NOT NULL,
    amount              BIGINT NOT NULL CHECK (amount >= 1),
    currency            TEXT NOT NULL,
    is_paid             BOOLEAN NOT NULL,
    is_saved            BOOLEAN NOT NULL,
    card_status         TEXT NOT NULL,
    approved_at         TEXT,
    save_attempts       BIGINT NOT NULL,
    batch_attempts      BIGINT NOT NULL,
    failure_code        TEXT,
    last_error          TEXT,
    request_fingerprint TEXT NOT NULL,
    idempotency_key     TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    UNIQUE (merchant_id, order_id)
);

-- Append-only log of every downstream request and response (invariant I3).
CREATE TABLE api_logs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id  TEXT NOT NULL,
    target      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    method      TEXT NOT NULL,
    path        TEXT NOT NULL,
    status_code INTEGER,
    body        TEXT,
    latency_ms  BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX api_logs_payment_id ON api_logs (payment_id);
CREATE INDEX api_logs_target_kind_created ON api_logs (target, kind, created_at);
