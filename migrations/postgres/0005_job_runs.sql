-- The last summary of each sidecar job (batch sweep, reconciliation), so
-- that `GET /metrics` of the serving process can expose it: the jobs run in
-- their own short-lived processes that nothing scrapes.
CREATE TABLE job_runs (
    job          TEXT PRIMARY KEY,
    finished_at  BIGINT NOT NULL,
    summary      TEXT NOT NULL
);
