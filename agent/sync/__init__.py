"""Getting the event log to Ziggy and the club cloud: the outbox, its destinations, member sync."""
