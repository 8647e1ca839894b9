"""The sandbox cloud: Ziggy, Keycloak's token endpoint and the club cloud on loopback, with faults and an oracle.

It is the fake that ships beside the real adapters (STYLE 4): the demo, the tests and installers' dry runs talk
to it over real HTTP. It answers as the contracts in `agent/contracts/` say, strictly (every input validated,
errors as `{"error": code, "detail": text}`), and it can be told to fail as networks and vendors do.

    clock.py        sandbox time (wall + an offset that tests advance)
    wire.py         strict JSON in, JSON out, size caps, exact money
    errors.py       ApiError, the one error shape
    ziggy.py        Ziggy: check-in/out, sessions, consumption (own session ids)
    idempotency.py  Idempotency-Key replay, forgotten after a day of sandbox time
    tokens.py       Keycloak client-credentials tokens and the bearer check
    signing.py      X-Timestamp / X-Signature (HMAC-SHA256) on signed bodies
    members.py      the member delta feed: seeded members, cursors, tombstones
    events.py       the event inbox: per-event verdicts, permanent de-duplication
    tus.py          clip uploads: tus 1.0.0 (creation, checksum, termination), hash-checked on completion
    faults.py       the fault plan and its injection (status, timeout, reset, slow, garbage, cut)
    received.py     the oracle log of everything accepted or faulted
    admin.py        /_sandbox/: received, faults, clock, members, clips, reset, health
    state.py        all of the above in one resettable object
    app.py          make_app(): routes and middlewares
    server.py       SandboxServer: the app on a TCP port, as an async context manager
"""

from __future__ import annotations

from .app import SANDBOX, make_app
from .clock import SandboxClock
from .faults import FaultRule, load_plan_file, parse_plan
from .options import ZIGGY_PREFIX, AgentSettings, SandboxOptions
from .server import SandboxServer
from .signing import sign
from .state import Sandbox

__all__ = [
    "SANDBOX",
    "ZIGGY_PREFIX",
    "AgentSettings",
    "FaultRule",
    "Sandbox",
    "SandboxClock",
    "SandboxOptions",
    "SandboxServer",
    "load_plan_file",
    "make_app",
    "parse_plan",
    "sign",
]
