-- The end user a client names (OpenAI's `user`), bounds on the text a usage record carries (the
-- gateway checks them at the edge; the store is the last line, and a record it refuses goes to
-- the spool's dead-letter file instead of blocking the records behind it), and Stripe payments
-- that name no known account (kept for an operator, never dropped).
ALTER TABLE usage_records ADD COLUMN end_user TEXT;
ALTER TABLE usage_records ADD CONSTRAINT usage_text_bounded CHECK (
    octet_length(route) <= 64
    AND coalesce(octet_length(requested_model), 0) <= 256
    AND coalesce(octet_length(routed_model), 0) <= 256
    AND coalesce(octet_length(provider), 0) <= 64
    AND coalesce(octet_length(task), 0) <= 64
    AND coalesce(octet_length(end_user), 0) <= 256
) NOT VALID;

CREATE TABLE stripe_unmatched (
    event_id         TEXT PRIMARY KEY,
    event_type       TEXT NOT NULL,
    -- What the event named as the account (metadata.account_id), if anything; bounded.
    account_ref      TEXT,
    amount_nano_usd  BIGINT NOT NULL,
    reason           TEXT NOT NULL,
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
