-- Times are integer milliseconds since the Unix epoch, UTC. Ordering is by seq, never by wall time.

CREATE TABLE members (
    member_id       TEXT PRIMARY KEY,
    first_name      TEXT NOT NULL,
    last_name       TEXT NOT NULL DEFAULT '',
    member_code     TEXT UNIQUE,              -- typed on a tablet by players without a card
    status          TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'expired', 'cancelled')),
    credits         INTEGER,                  -- balance last synced from the cloud; NULL: plan without credits
    requires_credit INTEGER NOT NULL DEFAULT 0,
    valid_from      INTEGER,
    valid_until     INTEGER,
    groups_json     TEXT NOT NULL DEFAULT '[]',
    hours_json      TEXT NOT NULL DEFAULT '[]',
    updated_at      INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE cards (
    card_id   TEXT PRIMARY KEY,               -- normalised upper-case hex
    member_id TEXT NOT NULL REFERENCES members (member_id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX cards_by_member ON cards (member_id);

-- One row: which member list decisions are made from.
CREATE TABLE member_list (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    version   INTEGER NOT NULL,
    synced_at INTEGER,                        -- NULL until a cloud sync; imports do not count as syncs
    source    TEXT NOT NULL,
    members   INTEGER NOT NULL
);
INSERT INTO member_list (id, version, synced_at, source, members) VALUES (1, 0, NULL, 'empty', 0);

CREATE TABLE sessions (
    session_id       TEXT PRIMARY KEY,
    member_id        TEXT NOT NULL,
    court_id         TEXT NOT NULL,
    card_id          TEXT,
    opened_by        TEXT NOT NULL,           -- device id
    started_at       INTEGER NOT NULL,
    ended_at         INTEGER,
    end_reason       TEXT,                    -- tap | tablet | auto_timeout | ...
    list_version     INTEGER NOT NULL,
    ziggy_session_id TEXT
) WITHOUT ROWID;
-- A member has at most one open session: the database enforces it, not only the code.
CREATE UNIQUE INDEX sessions_open_by_member ON sessions (member_id) WHERE ended_at IS NULL;
CREATE INDEX sessions_open_by_court ON sessions (court_id) WHERE ended_at IS NULL;
CREATE INDEX sessions_by_member_start ON sessions (member_id, started_at);

-- Offline credit spending, applied on top of the synced balance until the cloud confirms it.
CREATE TABLE credit_ledger (
    entry_id   INTEGER PRIMARY KEY,
    member_id  TEXT NOT NULL,
    delta      INTEGER NOT NULL,
    session_id TEXT,
    event_id   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    confirmed  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX ledger_pending ON credit_ledger (member_id) WHERE confirmed = 0;

-- The append-only event log. seq is the commit order; event_id (UUIDv7) is the permanent identity.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    occurred_at  INTEGER NOT NULL,            -- wall time when stamped
    mono_ns      INTEGER NOT NULL,            -- monotonic time of this boot
    boot_id      TEXT NOT NULL,
    clock_synced INTEGER NOT NULL,
    session_id   TEXT,
    device_id    TEXT,
    data         TEXT NOT NULL                -- JSON
);
CREATE INDEX events_by_session ON events (session_id) WHERE session_id IS NOT NULL;

-- One delivery row per event and destination; delivery state is separate per destination.
CREATE TABLE deliveries (
    destination     TEXT NOT NULL,
    seq             INTEGER NOT NULL REFERENCES events (seq),
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    delivered_at    INTEGER,
    PRIMARY KEY (destination, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_pending ON deliveries (destination, next_attempt_at) WHERE state = 'pending';

-- Answers already given, so a device that repeats a message id is answered again, not decided twice.
CREATE TABLE device_requests (
    device_id  TEXT NOT NULL,
    msg_id     TEXT NOT NULL,
    response   TEXT NOT NULL,                 -- JSON published to the device
    created_at INTEGER NOT NULL,
    PRIMARY KEY (device_id, msg_id)
) WITHOUT ROWID;
CREATE INDEX device_requests_age ON device_requests (created_at);

CREATE TABLE highlights (
    highlight_id TEXT PRIMARY KEY,
    court_id     TEXT NOT NULL,
    session_id   TEXT,
    button_id    TEXT NOT NULL,
    pressed_at   INTEGER NOT NULL,
    start_at     INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    kind         TEXT NOT NULL DEFAULT 'short',
    clip_state   TEXT NOT NULL DEFAULT 'none'
) WITHOUT ROWID;
CREATE INDEX highlights_by_session ON highlights (session_id);

-- Small durable facts: the latest trusted wall time, ...
CREATE TABLE kv (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
