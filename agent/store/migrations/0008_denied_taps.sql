-- The front desk lists the latest refused taps with their reasons: a partial index holds only those events, so
-- the list is read newest-first without walking the whole log, and granted taps cost nothing more to write.
CREATE INDEX events_denied ON events (seq)
    WHERE type = 'access.decided' AND json_extract(data, '$.result') = 'denied';
