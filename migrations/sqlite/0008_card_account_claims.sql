-- Claims per card account (issue 15, points 2 and 3; DESIGN.md I2).
--
-- Every merchant confirms through the one card API secret key of the
-- configuration, so all merchants share one account at the card company,
-- which keeps an orderId and a paymentKey unique per account. paygate claims
-- both permanently, per card account, in the same transaction as the record
-- and its (merchant, orderId) claim in payment_claims, and never moves or
-- deletes a claim. `card_account` is 'default' for the one account there is;
-- several accounts later are new values here, not a new schema.
--
-- kind: 'order_id' or 'payment_key'; value: the orderId or the paymentKey.
CREATE TABLE card_account_claims (
    card_account TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('order_id', 'payment_key')),
    value        TEXT NOT NULL,
    payment_id   TEXT NOT NULL,
    merchant_id  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (card_account, kind, value)
);
CREATE INDEX card_account_claims_payment_id ON card_account_claims (payment_id);

-- Backfill. Every record has its permanent (merchant, orderId) claim in
-- payment_claims; the paymentKey is read from whichever partition holds the
-- record (a record left in two by an interrupted move has one payment_id, so
-- it claims its key once). Where history already holds duplicates (the
-- defect this fixes: two merchants on one orderId, two orders on one
-- paymentKey), the earliest payment keeps the claim and the later ones hold
-- none; their records are untouched and `paygate check` still reports them.
INSERT OR IGNORE INTO card_account_claims (card_account, kind, value, payment_id, merchant_id, created_at)
SELECT 'default', 'order_id', order_id, payment_id, merchant_id, created_at
FROM payment_claims
ORDER BY created_at, payment_id
;

INSERT OR IGNORE INTO card_account_claims (card_account, kind, value, payment_id, merchant_id, created_at)
SELECT 'default', 'payment_key', payment_key, payment_id, merchant_id, created_at
FROM (
    SELECT payment_key, payment_id, merchant_id, created_at FROM realtime_payments
    UNION ALL SELECT payment_key, payment_id, merchant_id, created_at FROM completed_payments
    UNION ALL SELECT payment_key, payment_id, merchant_id, created_at FROM unpaid_payments
) AS records
ORDER BY created_at, payment_id
;
