"""What the agent-side fuzz targets share (the decoders' targets share `_harness`):

- `Draw`: choices read off the input's bytes, so the fuzzer that mutates the bytes mutates the choices, and a
  target can build structured input (a JSON document from the contract's field names, a config with one key
  changed) as well as feed the raw bytes to the parser;
- `json_value` and `toml_text`: such documents;
- `run`: one event loop kept across inputs, for the targets that drive async code (a loop per input would cost
  more than the input), closed by the suite or at exit;
- `Known`: a bug a target found that is reported and not fixed yet.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

INT64 = (-(2**63), 2**63 - 1)  # what SQLite stores as an INTEGER


class Draw:
    """Reads choices off `data`, front to back; past its end every choice is the first one (0)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def left(self) -> int:
        return len(self._data) - self._pos

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        self._pos += 1
        return self._data[self._pos - 1]

    def below(self, n: int) -> int:
        """0 .. n-1."""
        if n <= 1:
            return 0
        value = self.byte() if n <= 256 else self.byte() << 8 | self.byte()
        return value % n

    def chance(self, one_in: int) -> bool:
        return self.below(one_in) == 0

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def blob(self, max_size: int = 64) -> bytes:
        size = min(self.below(max_size + 1), self.left)
        self._pos += size
        return self._data[self._pos - size : self._pos]

    def text(self, max_size: int = 64) -> str:
        return self.blob(max_size).decode("utf-8", "replace")

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out


# Values at the edges of what validators and storage accept.
NUMBERS: tuple[int | float, ...] = (
    0,
    1,
    -1,
    2,
    7,
    99,
    100,
    101,
    255,
    4096,
    10_000,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    10**30,
    0.5,
    4.5,
    0.001,
    -0.0,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
)
TEXTS = ("", " ", "x", "0", "1", "true", "null", "é", "\x00", " padded ", "a" * 65, "a" * 129, "a" * 513)


def json_value(draw: Draw, keys: Sequence[str], strings: Sequence[str], depth: int = 0) -> Any:
    """A JSON value made of the contract's field names (`keys`) and telling strings (`strings`), now and then
    anything else: what a peer, buggy or hostile, would send."""
    kind = draw.below(10 if depth < 3 else 7)
    if kind <= 2:
        return draw.pick(strings) if draw.below(4) else draw.pick(TEXTS) if draw.chance(2) else draw.text(40)
    if kind == 3:
        return draw.pick(NUMBERS) if draw.chance(2) else draw.below(65536) - 100
    if kind == 4:
        return bool(draw.below(2))
    if kind == 5:
        return None
    if kind == 6:
        return draw.pick(strings) + draw.text(8)
    if kind == 7:
        return [json_value(draw, keys, strings, depth + 1) for _ in range(draw.below(4))]
    return json_object(draw, keys, strings, depth + 1)


def json_object(draw: Draw, keys: Sequence[str], strings: Sequence[str], depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(draw.below(8)):
        key = draw.pick(keys) if draw.below(8) else draw.text(12)
        out[key] = json_value(draw, keys, strings, depth)
    return out


def toml_text(doc: dict[str, Any]) -> str:
    """`doc` as TOML: every table inline, every key quoted, so any key and any nesting can be written."""
    return "".join(f"{_toml_key(k)} = {_toml(v)}\n" for k, v in doc.items() if v is not None)


_TOML_ESCAPE = re.compile(r'[\x00-\x1f\x7f"\\]')
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _toml_key(key: str) -> str:
    return _toml(key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # lone surrogates cannot be written in TOML (nor in UTF-8); the rest is escaped as TOML requires
        escaped = _TOML_ESCAPE.sub(lambda m: f"\\u{ord(m[0]):04X}", _SURROGATE.sub("", value))
        return f'"{escaped}"'
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items() if v is not None) + "}"
    if value is None:  # TOML has no null: where a document has one, the key is left out above
        return '""'
    raise TypeError(f"no TOML for {type(value).__name__}")


def scratch_dir(prefix: str) -> str:
    """A directory for a target's files, in RAM where there is /dev/shm (a file written on disk costs a third of a
    millisecond, more than most runs). Removed at exit; libFuzzer ends a process without Python's exit handlers,
    so the directories of processes that are gone are removed here too."""
    import shutil

    shm = "/dev/shm"  # noqa: S108 - mkdtemp makes a private directory in it
    parent = Path(shm if os.path.isdir(shm) else tempfile.gettempdir())
    for old in parent.glob(f"{_SCRATCH}*"):
        pid = old.name.removeprefix(_SCRATCH).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{_SCRATCH}{os.getpid()}-{prefix}", dir=parent)
    atexit.register(shutil.rmtree, path, True)
    return path


_SCRATCH = "club-agent-fuzz-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- one event loop -----------------------------------------------------------------------------------------------

_runner: asyncio.Runner | None = None
_cleanups: list[Callable[[], Coroutine[Any, Any, None]]] = []


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the loop the agent runs on (uvloop), the same loop for every input."""
    global _runner
    if _runner is None:
        import uvloop

        _runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        atexit.register(close)
    return _runner.run(coro)


def on_close(cleanup: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """`cleanup` runs on the loop before it closes (servers, databases a target opened on it)."""
    _cleanups.append(cleanup)


def close() -> None:
    global _runner
    if _runner is None:
        return
    try:
        while _cleanups:
            _runner.run(_cleanups.pop()())
    finally:
        _runner.close()
        _runner = None


def quiet_logs() -> None:
    """No log lines under atheris: a million runs would print a million refusals, and printing costs more than
    the run."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    logging.disable(logging.CRITICAL)


# -- bugs found, not fixed yet ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Known:
    """A bug a target found, reported and not fixed yet.

    The target lets it pass (so a campaign goes on looking for others) only when it is `raises` from within the
    function `where`. `check(data)` is the plain call that shows it; test_fuzz_agent.py runs it as a strict
    xfail, so the day the fix lands that test fails until this entry goes and `data` joins the target's
    REGRESSIONS.
    """

    name: str
    raises: type[BaseException]
    where: str
    data: bytes
    check: Callable[[bytes], object]

    def covers(self, exc: BaseException) -> bool:
        return isinstance(exc, self.raises) and any(
            frame.name == self.where for frame in traceback.extract_tb(exc.__traceback__)
        )


def tolerated(exc: BaseException, known: Sequence[Known]) -> bool:
    return any(bug.covers(exc) for bug in known)


def storable(value: object) -> bool:
    """Whether SQLite can take `value` as a column (an int beyond 64 bits it cannot)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float | bytes):
        return True
    return isinstance(value, int) and INT64[0] <= value <= INT64[1]
