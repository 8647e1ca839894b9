-- Retention prunes delivered events (agent/sync/retention.py). Deleting an event makes SQLite look for delivery
-- rows that still reference it (the foreign key); the primary key (destination, seq) cannot answer "by seq", so
-- without this index each deleted event scanned the whole deliveries table (500 events: about a second of the
-- write lock on 200,000 rows; with it, a few milliseconds).
CREATE INDEX deliveries_by_seq ON deliveries (seq);
