"""`SandboxServer`: the sandbox on a real TCP socket, as an async context manager.

Tests, the demo and `club-agent sandbox` all use this, so the agent always talks to the sandbox over the same
loopback HTTP it uses in production; port 0 picks a free port, read back from `url`.
"""

from __future__ import annotations

import enum
from types import TracebackType

from aiohttp import web

from .app import SANDBOX, make_app
from .clock import SandboxClock
from .options import DEFAULT_PORT, AgentSettings, SandboxOptions
from .state import Sandbox

# Held requests (timeout faults) are cut short at shutdown rather than waited for.
SHUTDOWN_TIMEOUT_S = 1.0


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class SandboxServer:
    def __init__(
        self,
        options: SandboxOptions | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        clock: SandboxClock | None = None,
        access_log: bool = False,
    ) -> None:
        self.options = options or SandboxOptions()
        self.app = make_app(self.options, clock=clock)
        self._host = host
        self._port = port
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self.state = State.NEW

    @property
    def sandbox(self) -> Sandbox:
        return self.app[SANDBOX]

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the sandbox server is not running")
        port: int = self._runner.addresses[0][1]
        return port

    @property
    def url(self) -> str:
        host = self._host
        if host in ("", "0.0.0.0", "::"):  # noqa: S104 - a wildcard bind is reached from this machine by loopback
            host = "127.0.0.1"
        elif ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def settings(self) -> AgentSettings:
        """Config and secrets for an agent on this machine to use this sandbox."""
        return AgentSettings.of(self.options, self.url)

    async def __aenter__(self) -> SandboxServer:
        if self.state is not State.NEW:
            raise RuntimeError(f"a SandboxServer starts once (this one is {self.state.value})")
        self.state = State.RUNNING
        runner = (
            web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
            if self._access_log
            else web.AppRunner(self.app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None)
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            self.state = State.CLOSED
            raise
        self._runner = runner
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        runner, self._runner = self._runner, None
        self.state = State.CLOSED
        if runner is not None:
            await runner.cleanup()
