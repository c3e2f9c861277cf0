-- The operator console.
--
-- operators: console accounts (`paygate operators create NAME --role`).
-- `password_hash` is an argon2id PHC string; `role` is viewer, operator or
-- admin. A disabled operator keeps its row (the audit names it) and cannot
-- log in; its sessions stop working at once.
CREATE TABLE operators (
    name           TEXT PRIMARY KEY,
    role           TEXT NOT NULL,
    password_hash  TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    disabled_at    BIGINT
);

-- console_sessions: one row per logged-in browser. The cookie carries a
-- random token; only its SHA-256 is stored, so a read of this table cannot
-- be replayed as a login. Sessions expire at `expires_at` (epoch ms,
-- absolute: login time plus `console_session_ttl_ms`).
CREATE TABLE console_sessions (
    token_hash  TEXT PRIMARY KEY,
    operator    TEXT NOT NULL REFERENCES operators (name),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);

-- console_audit: every console action and every failed login, with the
-- operator's name (the name typed, for a failed login). Append-only, as
-- payment_resolutions is: the trigger refuses updates and deletes.
CREATE TABLE console_audit (
    id          BIGSERIAL PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    operator    TEXT NOT NULL,
    action      TEXT NOT NULL,
    payment_id  TEXT,
    outcome     TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX console_audit_payment_id ON console_audit (payment_id, id);
CREATE FUNCTION console_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'console_audit is append-only';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER console_audit_append_only
    BEFORE UPDATE OR DELETE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_append_only();

-- job_run_history: every finished batch and reconciliation run (job_runs
-- keeps only the last of each, for /metrics); the console's
-- Reconciliation page lists the recent ones.
CREATE TABLE job_run_history (
    id           BIGSERIAL PRIMARY KEY,
    job          TEXT NOT NULL,
    finished_at  BIGINT NOT NULL,
    summary      TEXT NOT NULL
);
CREATE INDEX job_run_history_job ON job_run_history (job, id);

-- replica_status: what each `serve` replica last said about its
-- downstreams (breaker states, bulkhead use), written every few seconds,
-- so the console (another process) can show them. `updated_at` is the
-- replica's clock: the console shows its age and marks a silent replica.
CREATE TABLE replica_status (
    replica     TEXT PRIMARY KEY,
    updated_at  BIGINT NOT NULL,
    snapshot    TEXT NOT NULL
);
