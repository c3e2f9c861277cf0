-- Cancels (refunds) of approved payments (issue 15, point 11). One row per
-- cancel, numbered n = 1, 2, ... within its payment; the unique
-- (payment_id, n) is what makes claiming a cancel atomic with the balance
-- check (see crates/state-store/src/cancels.rs). Amounts are minor units,
-- times epoch milliseconds; canceled_at is the card company's RFC 3339 text.
CREATE TABLE payment_cancels (
    payment_id          TEXT NOT NULL,
    n                   BIGINT NOT NULL CHECK (n >= 1),
    merchant_id         TEXT NOT NULL,
    amount              BIGINT NOT NULL CHECK (amount >= 1),
    reason              TEXT NOT NULL,
    idempotency_key     TEXT,
    request_fingerprint TEXT NOT NULL,
    status              TEXT NOT NULL,
    is_saved            BOOLEAN NOT NULL,
    save_attempts       BIGINT NOT NULL,
    batch_attempts      BIGINT NOT NULL,
    failure_code        TEXT,
    last_error          TEXT,
    canceled_at         TEXT,
    created_at          BIGINT NOT NULL,
    updated_at          BIGINT NOT NULL,
    PRIMARY KEY (payment_id, n)
);
-- The batch's pass over cancels that need work.
CREATE INDEX payment_cancels_open ON payment_cancels (status, is_saved);
