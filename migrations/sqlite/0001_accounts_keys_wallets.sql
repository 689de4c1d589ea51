-- Accounts, API keys (digests only), wallets, idempotent credits, sealed provider keys.
-- Times are Unix milliseconds.
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled', 'erased')),
    created_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX accounts_email ON accounts (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    name            TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    digest          BLOB NOT NULL UNIQUE,
    created_at      INTEGER NOT NULL,
    last_used_at    INTEGER,
    expires_at      INTEGER,
    revoked_at      INTEGER,
    allowed_models  TEXT NOT NULL DEFAULT '[]',
    rpm_limit       INTEGER,
    tpm_limit       INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE wallets (
    account_id        TEXT PRIMARY KEY REFERENCES accounts (id),
    balance_nano_usd  INTEGER NOT NULL DEFAULT 0 CHECK (balance_nano_usd >= 0),
    updated_at        INTEGER NOT NULL
);

CREATE TABLE wallet_credits (
    kind             TEXT NOT NULL,
    reference        TEXT NOT NULL,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    amount_nano_usd  INTEGER NOT NULL CHECK (amount_nano_usd > 0),
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (kind, reference)
);

CREATE TABLE provider_keys (
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    provider     TEXT NOT NULL,
    key_version  TEXT NOT NULL,
    nonce        BLOB NOT NULL,
    ciphertext   BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, provider)
);
