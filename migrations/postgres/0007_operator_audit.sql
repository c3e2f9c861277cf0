-- Operator tools (issue 19).
--
-- payment_resolutions: the append-only audit of what operators decided by
-- hand (`paygate payments resolve`): who, when, the record before and after,
-- the reason, and what the card company's lookup said at the time. Rows are
-- never updated or deleted (the trigger refuses it; `paygate prune` never
-- reads this table).
CREATE TABLE payment_resolutions (
    id            BIGSERIAL PRIMARY KEY,
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
CREATE FUNCTION payment_resolutions_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'payment_resolutions is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER payment_resolutions_append_only
    BEFORE UPDATE OR DELETE ON payment_resolutions
    FOR EACH ROW EXECUTE FUNCTION payment_resolutions_append_only();

-- An alert an operator has dealt with: resolved_at (epoch ms) and the
-- payment_resolutions row that resolved it, if any. A resolved alert that
-- was not yet delivered is no longer sent, and `paygate payments list
-- --problems` no longer shows it.
ALTER TABLE alert_outbox ADD COLUMN resolved_at BIGINT;
ALTER TABLE alert_outbox ADD COLUMN resolution_id BIGINT;
CREATE INDEX alert_outbox_payment_id ON alert_outbox (payment_id);
