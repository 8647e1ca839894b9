"""Fuzz target: the MQTT device payloads (agent/lan/payloads.py), every model through `decode` (the status one
through `decode_status`) under a size cap. The input's first byte picks the model and the cap; then it is the
payload itself, or the choices of a JSON object made of the contract's field names.

Rules: only PayloadError escapes, with a known reason, `oversized` exactly when the payload is over the cap; a
decoded payload is canonical (card ids upper-case hex, bar prices in whole cents) and decodes again, re-encoded,
to itself. `python -m tests.fuzz.fuzz_payloads [libFuzzer flags]` fuzzes it under atheris."""

from __future__ import annotations

import json
import sys

from agent.domain import model as domain_model
from agent.errors import PayloadError
from agent.lan import payloads
from agent.lan.payloads import (
    MAX_ID,
    MAX_PAYLOAD,
    ButtonPress,
    Consumption,
    DeviceStatus,
    Scan,
    TabletCheckin,
    TabletCheckout,
)

from . import _harness
from ._support import Draw, Known, json_object

MODELS: list[type[payloads._Payload]] = [Scan, ButtonPress, TabletCheckin, TabletCheckout, Consumption, DeviceStatus]
LIMITS = (MAX_PAYLOAD, MAX_PAYLOAD, MAX_PAYLOAD, 64, 0)
REASONS = frozenset({"oversized", "not_utf8", "bad_json", "not_object", "invalid_field"})
KEYS = (
    *("card_id", "msg_id", "scan_id", "format", "button_id", "press_id", "kind", "tablet_id", "member_code"),
    *("session_id", "request_id", "items", "item_id", "name", "item_name", "quantity", "unit_price"),
    *("state", "status", "battery", "app_version", "charging"),
)
STRINGS = (
    *("04A1B2C3D4", "04:a1:b2:c3", " 04 A1 ", "0x12", "ffff", "ABC", "\ufb00", "\uff21\uff22"),
    *("hex", "decimal", "hex_reversed", "1234567890", "0", "9" * 39, "9" * 40, "\u00b2", "\u0663\u0663"),
    *("short", "long", "online", "offline", "t1", "c1", "m-1", "1001", "4.50", "0.001", "1e2", "NaN"),
)

# Inputs worth keeping (the first byte picks the model, the second the cap, the third raw bytes or a document):
# run by test_fuzz_agent.py.
REGRESSIONS: list[bytes] = [
    b"\x00\x00\x01" + b"[" * 4000,  # deeper than the json module recurses: bad_json, not a RecursionError
    b"\x00\x00\x01" + b'{"card_id": "' + b"[" * 3000 + b'"}',  # brackets in a string are text
    b"\x05\x04\x01 ONLINE\r\n",  # a bare birth word is a status whatever the cap
    b"\x00\x00\x01" + b'{"card_id": "1' + b"0" * 38 + b'", "format": "decimal"}',  # 39 digits: the largest id
]
KNOWN: list[Known] = []


def TestOneInput(data: bytes) -> None:
    draw = Draw(data)
    model = draw.pick(MODELS)
    limit = draw.pick(LIMITS)
    if draw.below(2):
        raw = draw.rest()
    else:
        doc = json_object(draw, KEYS, STRINGS)
        raw = json.dumps(doc, ensure_ascii=draw.chance(2)).encode()
    check(model, raw, limit)


def check(model: type[payloads._Payload], raw: bytes, limit: int) -> None:
    try:
        decoded = payloads.decode_status(raw, limit) if model is DeviceStatus else payloads.decode(model, raw, limit)
    except PayloadError as exc:
        refused(exc, raw, limit)
        return
    bare_word = model is DeviceStatus and raw.strip().lower() in (b"online", b"offline")
    assert len(raw) <= limit or bare_word
    canonical(decoded)
    # its canonical form decodes to itself (a decimal or reversed card id is stored as plain hex)
    again = decoded.model_copy(update={"format": "hex"}) if isinstance(decoded, Scan) else decoded
    wire = again.model_dump_json().encode()
    assert payloads.decode(model, wire, limit=1 << 20) == again, wire


def refused(exc: PayloadError, raw: bytes, limit: int) -> None:
    assert exc.reason in REASONS, exc.reason
    assert (exc.reason == "oversized") == (len(raw) > limit), (exc.reason, len(raw), limit)
    msg_id = payloads.msg_id_of(raw, limit)
    assert msg_id is None or 0 < len(msg_id) <= MAX_ID


def canonical(decoded: payloads._Payload) -> None:
    cards = [getattr(decoded, "card_id", None)]
    for card in cards:
        if card is not None:
            assert card == domain_model.normalize_card_id(card)
            assert len(card) % 2 == 0
            assert card == card.upper()
    if isinstance(decoded, TabletCheckin):
        assert (decoded.card_id is None) != (decoded.member_code is None)
    if isinstance(decoded, TabletCheckout | Consumption):
        assert (decoded.card_id is None) != (decoded.session_id is None)
    if isinstance(decoded, Consumption):
        for item in decoded.items:
            assert item.unit_cents == item.unit_price * 100, item.unit_price  # money is whole cents
            assert 0 <= item.unit_cents <= 1_000_000
            assert 1 <= item.quantity <= 99


if __name__ == "__main__":
    _harness.fuzz(TestOneInput, payloads, domain_model, sys.modules[__name__])
