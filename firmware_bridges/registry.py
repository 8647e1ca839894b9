"""One place that turns a reader description into its adapter: the agent's `[[readers]]` entries and the
standalone `python -m firmware_bridges` both come through here, so both support the same kinds alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from . import buttonbox, keywedge, lines
from .device import Adapter
from .feedback import encode_line
from .serial_port import ButtonBoxDecoder, SerialAdapter, lines_decoder, rdm6300_decoder, wiegand_decoder

if TYPE_CHECKING:
    from .osdp import OsdpBus

KINDS = ("rdm6300", "wiegand", "lines", "buttonbox", "nfc", "osdp", "keywedge")


@dataclass(frozen=True, slots=True)
class ReaderSpec:
    name: str  # the device id
    kind: str
    port: str | None = None  # serial device or pyserial URL
    path: str | None = None  # nfcpy path, or the input device of a keyboard reader
    baud: int = 9600
    format: str = "hex"  # lines: firmware_bridges.lines.parse_format
    address: int = 0  # osdp
    key: str | None = field(default=None, repr=False)  # osdp: the secure channel key, hex (from the secrets file)
    install_mode: bool = False  # osdp: accept the factory key once to install `key` (commissioning only)
    feedback: Literal["line", "none"] = "none"


def build_all(specs: Sequence[ReaderSpec]) -> dict[str, Adapter | ValueError]:
    """Adapters by reader name, or why one cannot be built (the others are built all the same). OSDP readers on
    one port share one bus: one Control Panel polls them all, each reader is its own adapter on it."""
    out: dict[str, Adapter | ValueError] = {}
    buses: dict[str, list[ReaderSpec]] = {}
    for spec in specs:
        if spec.kind == "osdp":
            buses.setdefault(_port(spec), []).append(spec)
            continue
        try:
            out[spec.name] = build(spec)
        except ValueError as exc:
            out[spec.name] = exc
    for port, members in buses.items():
        try:
            bus = _osdp_bus(port, members)
        except ValueError as exc:
            out.update({m.name: exc for m in members})
            continue
        out.update({m.name: bus.reader(m.name) for m in members})
    return out


def _osdp_bus(port: str, specs: Sequence[ReaderSpec]) -> OsdpBus:
    from . import osdp  # libosdp is loaded only where an OSDP reader is configured

    readers = []
    for spec in specs:
        if not spec.key:
            raise ValueError(f"OSDP reader {spec.name} has no secure channel key (osdp_keys.{spec.name} in secrets)")
        readers.append(osdp.OsdpReaderSpec(spec.name, spec.address, spec.key, spec.install_mode))
    bauds = {spec.baud for spec in specs}
    if len(bauds) > 1:
        raise ValueError(f"OSDP readers on {port} disagree on the baud rate ({sorted(bauds)}): one bus, one rate")
    return osdp.OsdpBus(port, readers, baud=bauds.pop())


def build(spec: ReaderSpec) -> Adapter:
    """The adapter for `spec`; ValueError for a kind or setting this build cannot serve."""
    encoder = encode_line if spec.feedback == "line" else None
    if spec.kind == "rdm6300":
        return SerialAdapter(spec.name, _port(spec), rdm6300_decoder(), baud=spec.baud, encoder=encoder)
    if spec.kind == "wiegand":
        return SerialAdapter(spec.name, _port(spec), wiegand_decoder(), baud=spec.baud, encoder=encoder)
    if spec.kind == "lines":
        decoder = lines_decoder(lines.parse_format(spec.format))  # ValueError names a bad format
        return SerialAdapter(spec.name, _port(spec), decoder, baud=spec.baud, encoder=encoder)
    if spec.kind == "buttonbox":  # the box has its LED and beeper: it always gets its own commands
        return SerialAdapter(
            spec.name, _port(spec), ButtonBoxDecoder(), baud=spec.baud, encoder=buttonbox.encode_feedback
        )
    if spec.kind == "nfc":
        from .nfc import NfcReader  # nfcpy is imported only where an NFC reader is configured

        if not spec.path:
            raise ValueError("an nfc reader needs its nfcpy path (usb, usb:054c:06c3, tty:AMA0:pn532...)")
        return NfcReader(spec.name, spec.path)
    if spec.kind == "keywedge":
        if not spec.path:
            raise ValueError("a keyboard reader needs its input device (/dev/input/by-id/...-event-kbd)")
        return keywedge.KeyWedgeReader(spec.name, spec.path, lines.parse_format(spec.format))
    if spec.kind == "osdp":
        return _osdp_bus(_port(spec), [spec]).reader(spec.name)
    raise ValueError(f"reader kind {spec.kind!r} is not supported (supported: {', '.join(KINDS)})")


def _port(spec: ReaderSpec) -> str:
    if not spec.port:
        raise ValueError(f"a {spec.kind} reader needs a serial port")
    return spec.port
