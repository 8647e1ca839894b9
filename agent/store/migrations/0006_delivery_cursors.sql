-- Delivery rows are no longer written by the decision that writes the event: each destination's outbox worker
-- adds them in bulk for the events past its cursor (store.repo.queue_deliveries), so a decision's transaction
-- writes the event alone. Every event with seq <= upto has had its row for this destination, if routed there.
-- A destination missing here is not enabled (store.repo.enable_destinations runs at every start).
CREATE TABLE delivery_cursors (
    destination TEXT PRIMARY KEY,
    upto        INTEGER NOT NULL
) WITHOUT ROWID;
-- Until now every enabled destination had its rows written with each event: all are queued up to the newest.
INSERT INTO delivery_cursors (destination, upto)
    SELECT destination, (SELECT COALESCE(MAX(seq), 0) FROM events)
    FROM (SELECT destination FROM deliveries GROUP BY destination UNION SELECT destination FROM destination_state);
