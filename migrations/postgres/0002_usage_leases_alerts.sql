-- The usage log, wallet leases, lifetime wallet totals, key budgets and the alert outbox.
CREATE TABLE usage_records (
    request_id         TEXT PRIMARY KEY,
    account_id         TEXT NOT NULL,
    key_id             TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    route              TEXT NOT NULL,
    requested_model    TEXT,
    routed_model       TEXT,
    provider           TEXT,
    task               TEXT,
    status             INTEGER NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cached_tokens      BIGINT NOT NULL,
    reasoning_tokens   BIGINT NOT NULL,
    cost_nano_usd      BIGINT NOT NULL,
    unbilled_nano_usd  BIGINT NOT NULL DEFAULT 0,
    estimated          BOOLEAN NOT NULL,
    latency_ms         BIGINT NOT NULL,
    ttfb_ms            BIGINT,
    cache_hit          BOOLEAN NOT NULL,
    lease_id           TEXT
);
CREATE INDEX usage_account_time ON usage_records (account_id, created_at, request_id);
CREATE INDEX usage_key_time ON usage_records (key_id, created_at, request_id);
CREATE INDEX usage_time ON usage_records (created_at);
CREATE INDEX usage_lease ON usage_records (lease_id) WHERE lease_id IS NOT NULL;

-- A slice of a wallet an instance spends locally. The granted amount left the wallet when it
-- was leased; settling returns what was not spent.
CREATE TABLE wallet_leases (
    id                TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL REFERENCES accounts (id),
    instance_id       TEXT NOT NULL,
    granted_nano_usd  BIGINT NOT NULL CHECK (granted_nano_usd >= 0),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at        TIMESTAMPTZ NOT NULL,
    settled_at        TIMESTAMPTZ,
    spent_nano_usd    BIGINT,
    settled_by        TEXT CHECK (settled_by IN ('owner', 'reclaim'))
);
CREATE INDEX wallet_leases_open ON wallet_leases (expires_at) WHERE settled_at IS NULL;
CREATE INDEX wallet_leases_account ON wallet_leases (account_id) WHERE settled_at IS NULL;

-- Lifetime totals: what came in, and what usage was billed (as ingested).
ALTER TABLE wallets ADD COLUMN credited_nano_usd BIGINT NOT NULL DEFAULT 0;
ALTER TABLE wallets ADD COLUMN spent_nano_usd BIGINT NOT NULL DEFAULT 0;
UPDATE wallets w SET credited_nano_usd = COALESCE((SELECT sum(amount_nano_usd) FROM wallet_credits c WHERE c.account_id = w.account_id), 0);

ALTER TABLE api_keys ADD COLUMN budget_nano_usd BIGINT CHECK (budget_nano_usd > 0);
ALTER TABLE api_keys ADD COLUMN spent_nano_usd BIGINT NOT NULL DEFAULT 0;

-- Alerts written in the transaction that crossed a threshold; a sender delivers them.
CREATE TABLE alert_outbox (
    id               BIGSERIAL PRIMARY KEY,
    payload          TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
