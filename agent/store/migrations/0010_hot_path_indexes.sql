-- The outbox picks due deliveries in seq order (oldest first, and newest first for fresh taps). Walking the
-- primary key (destination, seq) for that visits every delivered row still kept, so each pick cost 1-3 ms at
-- 20,000 delivered rows (the soak's first ten minutes) and grew with them until retention: most of the agent's
-- CPU under steady load. This index holds only the pending rows, in seq order, with their due time: a pick is a
-- few microseconds whatever the history. The outbox names it (INDEXED BY): without statistics SQLite's planner
-- prefers the primary key.
CREATE INDEX deliveries_pending_seq ON deliveries (destination, seq, next_attempt_at) WHERE state = 'pending';
-- The same for what health, the front desk and the metrics count on every poll: pending rows (counted and their
-- oldest found through the index above) and dead letters (rare: this one is nearly empty).
CREATE INDEX deliveries_dead ON deliveries (destination, seq) WHERE state = 'dead';
-- Court screens count each court's highlights since its session began, on every refresh.
CREATE INDEX highlights_by_court ON highlights (court_id, pressed_at);
