-- The card company's webhooks (Toss Payments `PAYMENT_STATUS_CHANGED`), as
-- received on `POST /v1/webhooks/card`: a durable receipt before the 200,
-- deduplicated by (paymentKey, status, the event's createdAt), so a
-- redelivery of the same change is one row. A receipt is never trusted: the
-- worker that takes it looks the payment up and acts on the lookup alone.
--
-- A receipt is open until `done_at` is set; `next_at` (epoch ms) is when a
-- worker may take it next: taking it moves `next_at` ahead by the worker's
-- lease, so a worker that dies leaves it to another once the lease passes
-- (its work is a lookup and guarded transitions, so a second worker doing
-- the same is harmless).
CREATE TABLE card_webhooks (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key   TEXT NOT NULL UNIQUE,
    event_type  TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    payment_key TEXT NOT NULL,
    status      TEXT NOT NULL,
    event_at    TEXT NOT NULL,
    body        TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 1,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     BIGINT NOT NULL,
    done_at     BIGINT,
    outcome     TEXT,
    last_error  TEXT
);
CREATE INDEX card_webhooks_open ON card_webhooks (next_at) WHERE done_at IS NULL;
CREATE INDEX card_webhooks_order ON card_webhooks (order_id, id);
