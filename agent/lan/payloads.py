"""Device payloads: UTF-8 JSON objects, size-capped, validated with pydantic; unknown fields ignored.

`decode` never raises anything but `PayloadError`, whose `reason` is a stable code for metrics and replies.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..domain.model import normalize_card_id
from ..errors import PayloadError

MAX_PAYLOAD = 4096
MAX_ID = 64


def _card(value: Any) -> Any:
    if isinstance(value, str):
        return normalize_card_id(value)
    return value


CardId = Annotated[str, BeforeValidator(_card)]
MsgId = Annotated[str | None, Field(default=None, min_length=1, max_length=MAX_ID)]


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True, frozen=True)


class Scan(_Payload):
    card_id: CardId
    msg_id: MsgId = Field(
        default=None, min_length=1, max_length=MAX_ID, validation_alias=AliasChoices("msg_id", "scan_id")
    )
    format: Literal["hex", "decimal", "hex_reversed"] = "hex"

    @model_validator(mode="before")
    @classmethod
    def _numbering(cls, data: Any) -> Any:
        """Readers that report decimal or byte-reversed UIDs are converted to the canonical hex."""
        if not isinstance(data, dict) or not isinstance(data.get("card_id"), str):
            return data
        fmt = data.get("format", "hex")
        raw = data["card_id"].strip()
        if fmt == "decimal":
            if not raw.isdigit() or len(raw) > 39:
                raise ValueError("card_id: expected decimal digits for format 'decimal'")
            number = int(raw)
            data = {**data, "card_id": format(number, "X").zfill(2 * max(1, (number.bit_length() + 7) // 8))}
        elif fmt == "hex_reversed":
            hexed = normalize_card_id(raw)
            data = {**data, "card_id": bytes.fromhex(hexed)[::-1].hex().upper()}
        return data


class ButtonPress(_Payload):
    button_id: str = Field(min_length=1, max_length=MAX_ID)
    msg_id: MsgId = Field(
        default=None, min_length=1, max_length=MAX_ID, validation_alias=AliasChoices("msg_id", "press_id")
    )
    kind: Literal["short", "long"] = "short"


class TabletCheckin(_Payload):
    tablet_id: str = Field(min_length=1, max_length=MAX_ID)
    msg_id: MsgId = None
    card_id: CardId | None = None
    member_code: str | None = Field(default=None, min_length=1, max_length=MAX_ID)

    @model_validator(mode="after")
    def _one_credential(self) -> TabletCheckin:
        if (self.card_id is None) == (self.member_code is None):
            raise ValueError("give exactly one of card_id or member_code")
        return self


class TabletCheckout(_Payload):
    tablet_id: str = Field(min_length=1, max_length=MAX_ID)
    msg_id: MsgId = None
    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    card_id: CardId | None = None

    @model_validator(mode="after")
    def _one_target(self) -> TabletCheckout:
        if (self.session_id is None) == (self.card_id is None):
            raise ValueError("give exactly one of session_id or card_id")
        return self


class ConsumptionItem(_Payload):
    item_id: str = Field(min_length=1, max_length=MAX_ID)
    name: str = Field(min_length=1, max_length=128, validation_alias=AliasChoices("name", "item_name"))
    quantity: int = Field(ge=1, le=99)
    unit_price: Decimal = Field(ge=0, le=10_000, max_digits=7, decimal_places=2)

    @property
    def unit_cents(self) -> int:
        return int(self.unit_price * 100)


class Consumption(_Payload):
    """`pos/{pos_id}/consumption`: a bar order for the player of a card or of a session."""

    request_id: str = Field(min_length=1, max_length=MAX_ID, validation_alias=AliasChoices("request_id", "msg_id"))
    card_id: CardId | None = None
    session_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID)
    items: list[ConsumptionItem] = Field(min_length=1, max_length=50)

    @model_validator(mode="after")
    def _one_target(self) -> Consumption:
        if (self.session_id is None) == (self.card_id is None):
            raise ValueError("give exactly one of session_id or card_id")
        return self


class DeviceStatus(_Payload):
    """`{kind}/{id}/status`: a heartbeat, a retained birth, or a will. `state` defaults to online."""

    state: Literal["online", "offline"] = "online"
    battery: int | None = Field(default=None, ge=0, le=100)
    app_version: str | None = Field(default=None, max_length=MAX_ID)
    charging: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _status_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "state" not in data and isinstance(data.get("status"), str):
            return {**data, "state": data["status"]}
        return data


def decode_status(raw: bytes, limit: int = MAX_PAYLOAD) -> DeviceStatus:
    """JSON, or the bare words `online` / `offline` that many firmwares put in their birth and will."""
    word = raw.strip().lower()
    if word in (b"online", b"offline"):
        return DeviceStatus(state=word.decode())
    return decode(DeviceStatus, raw, limit)


P = TypeVar("P", bound=_Payload)


def parse_json(raw: bytes, limit: int = MAX_PAYLOAD) -> dict[str, Any]:
    if len(raw) > limit:
        raise PayloadError("oversized", f"{len(raw)} bytes, limit {limit}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", f"byte {exc.start} is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise PayloadError("bad_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise PayloadError("bad_json", "nested too deeply") from exc
    if not isinstance(doc, dict):
        raise PayloadError("not_object", f"expected a JSON object, got {type(doc).__name__}")
    return doc


def decode(model: type[P], raw: bytes, limit: int = MAX_PAYLOAD) -> P:
    doc = parse_json(raw, limit)
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        raise PayloadError("invalid_field", f"{where}: {err['msg'].removeprefix('Value error, ')}") from exc


def msg_id_of(raw: bytes, limit: int = MAX_PAYLOAD) -> str | None:
    """Best effort: the message id of a payload that failed validation, so the reply can echo it."""
    try:
        doc = parse_json(raw, limit)
    except PayloadError:
        return None
    for key in ("msg_id", "scan_id", "press_id"):
        value = doc.get(key)
        if isinstance(value, str) and 0 < len(value) <= MAX_ID:
            return value
    return None
