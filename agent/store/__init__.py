"""SQLite store: schema migrations, members cache, sessions, event log and delivery rows."""
