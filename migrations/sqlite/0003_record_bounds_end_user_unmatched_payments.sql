-- The end user a client names (OpenAI's `user`), bounds on the text a usage record carries (the
-- gateway checks them at the edge; the store is the last line, and a record it refuses goes to
-- the spool's dead-letter file instead of blocking the records behind it), and Stripe payments
-- that name no known account (kept for an operator, never dropped).
ALTER TABLE usage_records ADD COLUMN end_user TEXT;

-- Bytes, not characters (SQLite's length() of text stops at a NUL), and no NUL at all, as in
-- PostgreSQL's text.
CREATE TRIGGER usage_text_bounded BEFORE INSERT ON usage_records
WHEN length(CAST(NEW.route AS BLOB)) > 64
  OR coalesce(length(CAST(NEW.requested_model AS BLOB)), 0) > 256
  OR coalesce(length(CAST(NEW.routed_model AS BLOB)), 0) > 256
  OR coalesce(length(CAST(NEW.provider AS BLOB)), 0) > 64
  OR coalesce(length(CAST(NEW.task AS BLOB)), 0) > 64
  OR coalesce(length(CAST(NEW.end_user AS BLOB)), 0) > 256
  OR instr(CAST(NEW.route || '|' || coalesce(NEW.requested_model, '') || '|' || coalesce(NEW.routed_model, '')
               || '|' || coalesce(NEW.provider, '') || '|' || coalesce(NEW.task, '') || '|'
               || coalesce(NEW.end_user, '') AS BLOB), x'00') > 0
BEGIN
    SELECT RAISE(ABORT, 'usage record rejected: a text field is over its bound or holds a NUL');
END;

CREATE TABLE stripe_unmatched (
    event_id         TEXT PRIMARY KEY,
    event_type       TEXT NOT NULL,
    account_ref      TEXT,
    amount_nano_usd  INTEGER NOT NULL,
    reason           TEXT NOT NULL,
    received_at      INTEGER NOT NULL
);
