-- Accounts, API keys (digests only), wallets, idempotent credits, sealed provider keys.
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    email       TEXT,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled', 'erased')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX accounts_email ON accounts (lower(email)) WHERE email IS NOT NULL;

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    name            TEXT NOT NULL,
    prefix          TEXT NOT NULL,
    digest          BYTEA NOT NULL UNIQUE,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at    TIMESTAMPTZ,
    expires_at      TIMESTAMPTZ,
    revoked_at      TIMESTAMPTZ,
    allowed_models  TEXT[] NOT NULL DEFAULT '{}',
    rpm_limit       INTEGER,
    tpm_limit       INTEGER
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE wallets (
    account_id        TEXT PRIMARY KEY REFERENCES accounts (id),
    balance_nano_usd  BIGINT NOT NULL DEFAULT 0 CHECK (balance_nano_usd >= 0),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every credit, unique per (kind, reference): a replayed Stripe event is a no-op.
CREATE TABLE wallet_credits (
    kind             TEXT NOT NULL,
    reference        TEXT NOT NULL,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    amount_nano_usd  BIGINT NOT NULL CHECK (amount_nano_usd > 0),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, reference)
);

CREATE TABLE provider_keys (
    account_id   TEXT NOT NULL REFERENCES accounts (id),
    provider     TEXT NOT NULL,
    key_version  TEXT NOT NULL,
    nonce        BYTEA NOT NULL,
    ciphertext   BYTEA NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, provider)
);

-- Changes every instance must hear about, whoever makes them (gateway, CLI, plain SQL).
CREATE FUNCTION komilion_notify_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('komilion_' || TG_TABLE_SCHEMA, 'key:' || encode(OLD.digest, 'hex'));
    ELSE
        PERFORM pg_notify('komilion_' || TG_TABLE_SCHEMA, 'key:' || encode(NEW.digest, 'hex'));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER api_keys_changed AFTER INSERT OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION komilion_notify_key();
CREATE TRIGGER api_keys_updated
    AFTER UPDATE OF revoked_at, expires_at, allowed_models, rpm_limit, tpm_limit, account_id ON api_keys
    FOR EACH ROW EXECUTE FUNCTION komilion_notify_key();

CREATE FUNCTION komilion_notify_account() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('komilion_' || TG_TABLE_SCHEMA, 'account:' || NEW.id);
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_status AFTER UPDATE OF status ON accounts
    FOR EACH ROW EXECUTE FUNCTION komilion_notify_account();
