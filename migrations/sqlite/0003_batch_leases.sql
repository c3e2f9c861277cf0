-- One sweep at a time across replicas: a lease with an owner and an expiry
-- (epoch ms). A lease past its expiry may be taken over by another owner.
CREATE TABLE batch_leases (
    name        TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);
