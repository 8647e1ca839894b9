"""What the fuzz targets share: cutting input into the pieces a serial port (or an input device) hands over, since
decoders must give the same answer however their input is cut and the cuts are where framing bugs live; and
instrumenting the decoders when a target runs under atheris."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ATHERIS_RUNS = 2000  # per target in `make test`: a few hundred ms each

# atheris.FuzzedDataProvider, set by a target run under atheris: the fuzzer then learns the cuts as well as the
# bytes. Without it (hypothesis, plain imports), the cuts come from the input's first byte.
PROVIDER: Callable[[bytes], Any] | None = None


def chunks(data: bytes) -> Iterator[bytes]:
    if PROVIDER is not None:
        provider = PROVIDER(data)
        while provider.remaining_bytes():
            yield provider.ConsumeBytes(provider.ConsumeIntInRange(0, 64))
        return
    if not data:
        return
    size, pos, wire = data[0], 0, data[1:]
    while pos < len(wire):
        size = (size * 5 + 3) % 17  # sizes 0 (an empty read) to 16 in a scrambled cycle; 12 maps to itself
        yield wire[pos : pos + size]
        pos += size


def instrument(*modules: types.ModuleType) -> None:
    """Give atheris coverage of the functions and methods defined in `modules`, patched in place so every
    reference already taken sees it. `atheris.instrument_all()` would do the same for all 3000 functions loaded
    and take ten seconds doing it."""
    import atheris

    done: set[int] = set()
    for module in modules:
        for obj in vars(module).values():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            members = vars(obj).values() if isinstance(obj, type) else [obj]
            for member in members:
                if isinstance(member, property):
                    candidates = [member.fget, member.fset]
                elif isinstance(member, staticmethod | classmethod):
                    candidates = [member.__func__]
                else:
                    candidates = [member]
                for func in candidates:
                    if isinstance(func, types.FunctionType) and id(func) not in done:
                        done.add(id(func))
                        atheris.instrument_func(func)


def same(item: object) -> object:
    """What must not depend on how the input was chunked: the item, or an error's reason (not its bytes)."""
    reason = getattr(item, "reason", None)
    return reason if isinstance(reason, str) and isinstance(item, ValueError) else item


def fuzz(target: Callable[[bytes], None], *modules: types.ModuleType) -> None:
    """Run `target` under atheris with coverage of `modules` (the decoder and the target itself)."""
    import sys

    import atheris

    global PROVIDER
    PROVIDER = atheris.FuzzedDataProvider
    instrument(*modules)
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


def run_under_atheris(target: types.ModuleType, artifacts: Path) -> subprocess.CompletedProcess[str]:
    """A target's own atheris main for ATHERIS_RUNS runs, a crash or a hang written under `artifacts`."""
    # -len_control=0: inputs up to max_len at once; the default grows them too slowly for a short run
    flags = [f"-runs={ATHERIS_RUNS}", "-seed=1", "-max_len=512", "-len_control=0", f"-artifact_prefix={artifacts}/"]
    command = [sys.executable, "-m", target.__name__, *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
