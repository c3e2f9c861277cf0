-- Inventory and holds (DESIGN.md §3, issue 17: the timestamp rule).
-- Availability of a SKU = stock - sold - SUM(quantity) of its hold_items
-- that are 'during', or 'pre' with expires_at > now: one indexed query on
-- hold_items (merchant_id, sku, state, expires_at). hold_items repeats its
-- hold's state and expires_at so that query needs no join.
CREATE TABLE inventory (
    merchant_id TEXT NOT NULL,
    sku         TEXT NOT NULL,
    stock       BIGINT NOT NULL CHECK (stock >= 0),
    sold        BIGINT NOT NULL DEFAULT 0 CHECK (sold >= 0),
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (merchant_id, sku)
);

CREATE TABLE holds (
    hold_id     TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    state       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (merchant_id, order_id)
);
-- Housekeeping (the batch deletes old released and expired holds).
CREATE INDEX holds_state_expires ON holds (state, expires_at);

CREATE TABLE hold_items (
    hold_id     TEXT NOT NULL REFERENCES holds (hold_id) ON DELETE CASCADE,
    merchant_id TEXT NOT NULL,
    sku         TEXT NOT NULL,
    quantity    BIGINT NOT NULL CHECK (quantity >= 1),
    state       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (hold_id, sku)
);
CREATE INDEX hold_items_availability ON hold_items (merchant_id, sku, state, expires_at);
