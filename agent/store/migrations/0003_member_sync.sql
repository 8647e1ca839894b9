-- Member sync from the club cloud (agent/sync/members.py): the feed's cursor, the run in progress and its
-- staged pages. Decisions never read the staging tables; a run's pages reach `members` in one transaction.

-- Where the next delta starts. cursor_version is the list version the cursor describes: when anything else
-- (an import) has changed the list since, the cursor no longer matches it and the next sync starts over.
ALTER TABLE member_list ADD COLUMN cursor TEXT;
ALTER TABLE member_list ADD COLUMN cursor_version INTEGER;
ALTER TABLE member_list ADD COLUMN cursor_at INTEGER;

-- The one sync run allowed to stage. A run that starts deletes any other run (and its staged rows); each
-- staging and the final apply check, in their own transaction, that their run is still this one.
CREATE TABLE member_sync_runs (
    run_id       TEXT PRIMARY KEY,
    started_at   INTEGER NOT NULL,
    base_version INTEGER NOT NULL,            -- member_list.version when the run started
    full         INTEGER NOT NULL
) WITHOUT ROWID;

-- Pages of the run in progress: the newest form of each member (ord: arrival order, the newest claim to a
-- member code or a card wins), tombstones with deleted = 1, cards as a JSON list of normalised ids.
CREATE TABLE member_sync_staging (
    member_id       TEXT PRIMARY KEY,
    ord             INTEGER NOT NULL,
    deleted         INTEGER NOT NULL,
    first_name      TEXT,
    last_name       TEXT,
    member_code     TEXT,
    status          TEXT,
    credits         INTEGER,
    requires_credit INTEGER,
    valid_from      INTEGER,
    valid_until     INTEGER,
    groups_json     TEXT,
    hours_json      TEXT,
    cards_json      TEXT
) WITHOUT ROWID;

-- Built once every page is in, before the apply: each member code's and each card's newest holder in the run.
CREATE TABLE member_sync_staging_codes (
    member_code TEXT PRIMARY KEY,
    member_id   TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE member_sync_staging_cards (
    card_id   TEXT PRIMARY KEY,
    member_id TEXT NOT NULL
) WITHOUT ROWID;

-- The last attempt, for `club-agent members status`: a failed sync keeps the list, but says why here.
CREATE TABLE member_sync_state (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    last_attempt_at INTEGER,
    last_success_at INTEGER,
    last_error      TEXT,
    last_error_at   INTEGER,
    full            INTEGER,
    upserts         INTEGER,
    tombstones      INTEGER,
    skipped         INTEGER,
    seconds         REAL
);
INSERT INTO member_sync_state (id) VALUES (1);
