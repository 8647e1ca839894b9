"""One place that turns a reader description into its adapter: the agent's `[[readers]]` entries and the
standalone `python -m firmware_bridges` both come through here, so both support the same kinds alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .device import Adapter
from .feedback import encode_line
from .serial_port import Rdm6300Decoder, SerialAdapter

KINDS = ("rdm6300", "lines", "buttonbox", "nfc", "osdp")


@dataclass(frozen=True, slots=True)
class ReaderSpec:
    name: str  # the device id
    kind: str
    port: str | None = None  # serial device or pyserial URL
    path: str | None = None  # nfcpy path
    baud: int = 9600
    format: str = "hex"  # lines: firmware_bridges.lines.parse_format
    address: int = 0  # osdp
    key: str | None = None  # osdp: the secure channel key, hex (from the secrets file)
    feedback: Literal["line", "none"] = "none"


def build(spec: ReaderSpec) -> Adapter:
    """The adapter for `spec`; ValueError for a kind or setting this build cannot serve."""
    encoder = encode_line if spec.feedback == "line" else None
    if spec.kind == "rdm6300":
        return SerialAdapter(spec.name, _port(spec), Rdm6300Decoder(), baud=spec.baud, encoder=encoder)
    raise ValueError(f"reader kind {spec.kind!r} is not supported (supported: {', '.join(KINDS)})")


def _port(spec: ReaderSpec) -> str:
    if not spec.port:
        raise ValueError(f"a {spec.kind} reader needs a serial port")
    return spec.port
