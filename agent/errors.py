"""The agent's error tree. Adapters translate foreign errors into these, in one place.

AgentError
├── ConfigError          a config or secrets file is missing, unreadable or invalid (exit code 2)
├── StoreError           SQLite failed underneath us
│   ├── StoreCorrupt     PRAGMA quick_check failed at start; see `club-agent store recover`
│   └── MigrationError   the schema on disk is newer than this build, or a migration failed
├── PayloadError         a device message could not be decoded (carries a stable `reason`)
├── ImportFileError      a member import file is malformed (carries line and field)
├── BrokerStartError     the embedded broker could not bind or start
├── RecorderError        a camera's ring recorder was misused, or its segments could not be pinned (media/)
├── ClipError            a clip could not be cut: the step that failed and ffmpeg's last words (media/)
├── ClaimRefused         the cloud refused a claim token (used, expired, unknown): nothing changed (provision)
└── ClaimFailed          the cloud could not be asked, or answered no claim: nothing changed (provision)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration problem, phrased for the installer: which key, which value, what is expected."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreError(AgentError):
    """The SQLite store failed."""


class StoreCorrupt(StoreError):
    """The database failed its integrity check."""


class MigrationError(StoreError):
    """The schema could not be brought to this build's version."""


class PayloadError(AgentError):
    """A device message was rejected. `reason` is a stable code used in metrics and replies."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ImportFileError(AgentError):
    """A member import file has a bad record."""

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        where = f"line {line}" if line is not None else "file"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.line = line
        self.field = field


class BrokerStartError(AgentError):
    """The embedded broker failed to start (port in use, bad TLS files, ...)."""
