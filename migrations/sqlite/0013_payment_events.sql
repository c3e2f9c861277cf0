-- The events of applied transitions (payment.approved, payment.declined,
-- payment.unknown, payment.canceled, payment.partially_canceled), written
-- in the same transaction as their transition (a MongoDB state store
-- writes them into the payment's document and a relay copies them here).
-- `event_id` is derived from the payment and its version (or cancel
-- number), so a copy relayed twice is one row.
--
-- `seq` numbers events for `GET /v1/events?after=` and for delivery. It is
-- NULL until the sequencer numbers the event: writers' own sequence values
-- would commit out of order (a reader at `after=11` would never see a 10
-- that committed later), so numbering is done by one transaction at a
-- time, each above every number already committed, and readers see only
-- numbered events. Within a payment it follows (version, cancel_n).
--
-- `delivery` is the merchant webhook's state: `pending` (to send; `next_at`
-- epoch ms is when a worker may take it, taking it moves `next_at` on by a
-- lease), `delivered`, `failed` (gave up after its retries; `paygate
-- webhooks resend` puts it back), or `no_endpoint` (the merchant had none
-- when it was numbered).
CREATE TABLE payment_events (
    event_id     TEXT PRIMARY KEY,
    merchant_id  TEXT NOT NULL,
    payment_id   TEXT NOT NULL,
    type         TEXT NOT NULL,
    version      BIGINT NOT NULL,
    cancel_n     BIGINT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    seq          BIGINT UNIQUE,
    delivery     TEXT NOT NULL DEFAULT 'pending',
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL DEFAULT 0,
    last_status  INTEGER,
    last_error   TEXT,
    delivered_at BIGINT
);
CREATE INDEX payment_events_unnumbered ON payment_events (payment_id, version, cancel_n) WHERE seq IS NULL;
CREATE INDEX payment_events_merchant ON payment_events (merchant_id, seq);
CREATE INDEX payment_events_due ON payment_events (next_at) WHERE delivery = 'pending';
CREATE INDEX payment_events_payment ON payment_events (payment_id, seq);

-- One webhook endpoint per merchant. The signing secret is sealed with
-- PAYGATE_SECRETS_KEY (XChaCha20-Poly1305; nonce and ciphertext, base64)
-- and never stored or logged in the clear.
CREATE TABLE webhook_endpoints (
    merchant_id   TEXT PRIMARY KEY,
    url           TEXT NOT NULL,
    secret_sealed TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
