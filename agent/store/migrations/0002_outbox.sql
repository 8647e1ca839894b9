-- Outbox delivery, beyond the event log and delivery rows of 0001.

-- Ziggy names its own sessions: its id for each of ours, learnt from the check-in's answer, so that the
-- checkout and consumption lines of that session are sent with it.
CREATE TABLE ziggy_sessions (
    session_id       TEXT PRIMARY KEY,
    ziggy_session_id TEXT NOT NULL UNIQUE,
    checked_in_at    TEXT
) WITHOUT ROWID;

-- When a delivery was first tried: a Ziggy retry older than a day first asks Ziggy what it already has.
ALTER TABLE deliveries ADD COLUMN first_attempt_at INTEGER;

-- Per destination: what the operator's `outbox status` shows.
CREATE TABLE destination_state (
    destination     TEXT PRIMARY KEY,
    last_success_at INTEGER,
    last_error      TEXT,
    last_error_at   INTEGER,
    breaker         TEXT NOT NULL DEFAULT 'closed'
) WITHOUT ROWID;

-- Every operator action on the outbox (requeue, purge), kept.
CREATE TABLE outbox_audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    destination TEXT,
    detail      TEXT NOT NULL
);
