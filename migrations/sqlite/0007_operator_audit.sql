-- Operator tools (issue 19).
--
-- payment_resolutions: the append-only audit of what operators decided by
-- hand (`paygate payments resolve`): who, when, the record before and after,
-- the reason, and what the card company's lookup said at the time. Rows are
-- never updated or deleted (the triggers refuse it; `paygate prune` never
-- reads this table).
CREATE TABLE payment_resolutions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    payment_id    TEXT NOT NULL,
    action        TEXT NOT NULL,
    operator      TEXT NOT NULL,
    reason        TEXT NOT NULL,
    forced        BOOLEAN NOT NULL,
    card_evidence TEXT NOT NULL,
    before_state  TEXT NOT NULL,
    after_state   TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
CREATE INDEX payment_resolutions_payment_id ON payment_resolutions (payment_id, id);
CREATE TRIGGER payment_resolutions_no_update BEFORE UPDATE ON payment_resolutions
BEGIN
    SELECT RAISE(ABORT, 'payment_resolutions is append-only');
END;
CREATE TRIGGER payment_resolutions_no_delete BEFORE DELETE ON payment_resolutions
BEGIN
    SELECT RAISE(ABORT, 'payment_resolutions is append-only');
END;

-- An alert an operator has dealt with: resolved_at (epoch ms) and the
-- payment_resolutions row that resolved it, if any. A resolved alert that
-- was not yet delivered is no longer sent, and `paygate payments list
-- --problems` no longer shows it.
ALTER TABLE alert_outbox ADD COLUMN resolved_at BIGINT;
ALTER TABLE alert_outbox ADD COLUMN resolution_id BIGINT;
CREATE INDEX alert_outbox_payment_id ON alert_outbox (payment_id);
