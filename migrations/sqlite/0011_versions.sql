-- Versions (DESIGN.md §1): every payment record, cancel and hold carries an
-- integer that every applied transition and every move between partitions
-- increments. A write that depends on an earlier read is guarded on the
-- version read, never on updated_at: replicas' clocks differ and step
-- back, so two writes can stamp one updated_at, and a later write can
-- carry an earlier one. Existing rows start at 0.
ALTER TABLE realtime_payments ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE completed_payments ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE unpaid_payments ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE payment_cancels ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE holds ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
