-- Bar consumption lines, and the clock correction of unsynced stamps.

-- Consumption at the bar: one row per line of a bar order, recorded against the player's open session.
-- Money is integer cents; the wire carries decimal amounts. (pos_id, request_id) keeps an order from being
-- recorded twice; device_requests also answers the repeat with the first answer.
CREATE TABLE consumption (
    line_id     TEXT PRIMARY KEY,              -- UUIDv7, also the consumption.recorded event's line id
    request_id  TEXT NOT NULL,
    pos_id      TEXT NOT NULL,
    line_no     INTEGER NOT NULL,
    session_id  TEXT NOT NULL REFERENCES sessions (session_id),
    member_id   TEXT NOT NULL,
    court_id    TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    item_name   TEXT NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    unit_cents  INTEGER NOT NULL CHECK (unit_cents >= 0),
    total_cents INTEGER NOT NULL CHECK (total_cents >= 0),
    recorded_at INTEGER NOT NULL,
    UNIQUE (pos_id, request_id, line_no)
) WITHOUT ROWID;
CREATE INDEX consumption_by_session ON consumption (session_id);

-- Clock correction (DESIGN 3): the wall time an event was first stamped with, kept when a boot's unsynced
-- stamps are corrected from monotonic time once NTP syncs. NULL: never corrected.
ALTER TABLE events ADD COLUMN occurred_at_unsynced INTEGER;
CREATE INDEX events_unsynced ON events (boot_id) WHERE clock_synced = 0;
