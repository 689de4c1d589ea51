-- The usage log, wallet leases, lifetime wallet totals, key budgets and the alert outbox.
CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL,
    key_id             TEXT,
    created_at         INTEGER NOT NULL,
    route              TEXT NOT NULL,
    requested_model    TEXT,
    routed_model       TEXT,
    provider           TEXT,
    task               TEXT,
    status             INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cached_tokens      INTEGER NOT NULL,
    reasoning_tokens   INTEGER NOT NULL,
    cost_nano_usd      INTEGER NOT NULL,
    unbilled_nano_usd  INTEGER NOT NULL DEFAULT 0,
    estimated          INTEGER NOT NULL,
    latency_ms         INTEGER NOT NULL,
    ttfb_ms            INTEGER,
    cache_hit          INTEGER NOT NULL,
    lease_id           TEXT
);
CREATE INDEX usage_account_time ON usage_records (account_id, created_at, request_id);
CREATE INDEX usage_key_time ON usage_records (key_id, created_at, request_id);
CREATE INDEX usage_time ON usage_records (created_at);
CREATE INDEX usage_lease ON usage_records (lease_id) WHERE lease_id IS NOT NULL;

CREATE TABLE wallet_leases (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts (id),
    instance_id       TEXT NOT NULL,
    granted_nano_usd  INTEGER NOT NULL CHECK (granted_nano_usd >= 0),
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    settled_at        INTEGER,
    spent_nano_usd    INTEGER,
    settled_by        TEXT CHECK (settled_by IN ('owner', 'reclaim'))
);
CREATE INDEX wallet_leases_open ON wallet_leases (expires_at) WHERE settled_at IS NULL;

ALTER TABLE wallets ADD COLUMN credited_nano_usd INTEGER NOT NULL DEFAULT 0;
ALTER TABLE wallets ADD COLUMN spent_nano_usd INTEGER NOT NULL DEFAULT 0;
UPDATE wallets SET credited_nano_usd = COALESCE((SELECT sum(amount_nano_usd) FROM wallet_credits c WHERE c.account_id = wallets.account_id), 0);

ALTER TABLE api_keys ADD COLUMN budget_nano_usd INTEGER CHECK (budget_nano_usd > 0);
ALTER TABLE api_keys ADD COLUMN spent_nano_usd INTEGER NOT NULL DEFAULT 0;

CREATE TABLE alert_outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    payload          TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL
);
