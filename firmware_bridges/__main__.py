"""`python -m firmware_bridges`: a reader or button box on another host, or a wiring check for installers.

    python -m firmware_bridges watch --kind rdm6300 --port /dev/ttyUSB0
        prints what the device sends (card reads, presses, faults), with no agent: is it wired right?
    python -m firmware_bridges run --kind rdm6300 --port /dev/ttyUSB0 --id door-1 --court c1 \\
            --broker 192.168.1.10:1883 --username door-1 --password-file /etc/club-bridge/door-1.password
        speaks the MQTT contract to the agent's broker; the device must be in the agent's [[devices]] with that
        password (`club-agent devices hash-password`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from .bridge import Bridge, Role
from .device import DeviceEvent
from .mqtt_link import MqttLink
from .registry import KINDS, ReaderSpec, build

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n\n")[0] if __doc__ else None)

Kind = Annotated[str, typer.Option(help=f"wire protocol: {', '.join(KINDS)}")]
Port = Annotated[str | None, typer.Option(help="serial device or pyserial URL (serial kinds)")]
NfcPath = Annotated[str | None, typer.Option("--path", help="nfcpy path (nfc): usb, tty:AMA0:pn532, ...")]
Baud = Annotated[int, typer.Option(help="serial speed")]
Format = Annotated[str, typer.Option(help="lines: how the reader writes ids (hex, decimal:4, ...)")]
Feedback = Annotated[str, typer.Option(help="serial kinds: 'line' to send the feedback line back, or 'none'")]


def _spec(name: str, kind: str, port: str | None, path: str | None, baud: int, fmt: str, feedback: str) -> ReaderSpec:
    if kind not in KINDS:
        raise typer.BadParameter(f"unknown kind {kind!r}; one of {', '.join(KINDS)}", param_hint="--kind")
    if feedback not in ("line", "none"):
        raise typer.BadParameter("'line' or 'none'", param_hint="--feedback")
    mode: Literal["line", "none"] = "line" if feedback == "line" else "none"
    key = os.environ.get("CLUB_BRIDGE_OSDP_KEY")  # never on the command line: it would show in `ps`
    return ReaderSpec(name, kind, port=port, path=path, baud=baud, format=fmt, key=key, feedback=mode)


def _print(event: DeviceEvent) -> None:
    typer.echo(f"{type(event).__name__}: {event}")


@app.command()
def watch(
    kind: Kind,
    port: Port = None,
    path: NfcPath = None,
    baud: Baud = 9600,
    format: Format = "hex",
    seconds: Annotated[float, typer.Option(help="stop after this long (0: until Ctrl-C)")] = 0.0,
) -> None:
    """Print what the device sends, without an agent."""
    try:
        adapter = build(_spec("watch", kind, port, path, baud, format, "none"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc

    async def main() -> None:
        task = asyncio.ensure_future(adapter.run(_print))
        try:
            await asyncio.wait_for(asyncio.shield(task), seconds or None)
        except TimeoutError:
            task.cancel()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@app.command()
def run(
    kind: Kind,
    device_id: Annotated[str, typer.Option("--id", help="the device id in the agent's config")],
    court: Annotated[str, typer.Option(help="the court it serves")],
    broker: Annotated[str, typer.Option(help="the agent's broker, host:port")],
    username: Annotated[str | None, typer.Option(help="MQTT user (default: the device id)")] = None,
    password_file: Annotated[Path | None, typer.Option(help="file holding the MQTT password")] = None,
    tls: Annotated[bool, typer.Option(help="TLS to the broker (its CA from --ca-file or the system's)")] = False,
    ca_file: Annotated[Path | None, typer.Option(help="CA bundle for --tls")] = None,
    port: Port = None,
    path: NfcPath = None,
    baud: Baud = 9600,
    format: Format = "hex",
    feedback: Feedback = "line",
    button_box: Annotated[bool, typer.Option(help="the device is a court's button box, not a reader")] = False,
) -> None:
    """Bridge the device to the agent's broker with the MQTT contract."""
    host, _, port_text = broker.rpartition(":")
    if not host or not port_text.isdigit():
        raise typer.BadParameter("host:port, for example 192.168.1.10:1883", param_hint="--broker")
    password = os.environ.get("CLUB_BRIDGE_PASSWORD", "")
    if password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read it: {exc}", param_hint="--password-file") from exc
    if not password:
        raise typer.BadParameter("give --password-file or set CLUB_BRIDGE_PASSWORD", param_hint="--password-file")
    try:
        adapter = build(_spec(device_id, kind, port, path, baud, format, feedback))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if tls else None
    link = MqttLink(
        host,
        int(port_text),
        username or device_id,
        password,
        client_id=f"{username or device_id}-bridge",  # the broker ties a client id to its user
        tls=context,
        on_state=lambda state: typer.echo(f"broker: {state}", err=True),
    )
    bridge = Bridge(adapter, Role("button" if button_box else "reader", device_id, court), link, on_event=_print)

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(link.run())
            tg.create_task(bridge.run())

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    app()
