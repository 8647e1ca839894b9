"""One device flooding the agent's broker, as fast as the broker takes it: the chaos run's "broker flooded".

    .venv/bin/python benchmarks/chaos_flood.py --port P --device ID --password PW --mode scans|heartbeats
                                               [--seconds 15] [--max 300000] [--window 64]

A process of its own (started and stopped by benchmarks/chaos.py), so its CPU and its queues are not the driver's:
the players' latencies stay the agent's. `scans`: a reader stuck repeating an unknown card, every frame a new
msg_id (QoS 1) on rfid/{id}/scan; `heartbeats`: a tablet whose app loops on tablet/{id}/status (QoS 1). `--window`
publishes are in flight at once, each awaiting its PUBACK, so the flood is bounded by the broker's pace and never
by an unbounded queue here. Prints one JSON line of counts at the end; SIGTERM ends it early, counts still printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from typing import Any

import aiomqtt

UNKNOWN_CARD = "FF0000F1D0"  # 5 bytes, as an EM4100 reader sends; in no member list


async def flood(args: argparse.Namespace) -> dict[str, Any]:
    counts: dict[str, Any] = {"mode": args.mode, "sent": 0, "acked": 0, "answers": 0, "rate_limited": 0, "errors": 0}
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    topic = f"rfid/{args.device}/scan" if args.mode == "scans" else f"tablet/{args.device}/status"
    try:
        async with aiomqtt.Client(
            args.host, args.port, username=args.device, password=args.password, identifier=args.device, timeout=10
        ) as client:
            if args.mode == "scans":
                await client.subscribe(f"rfid/{args.device}/response", qos=0)

            async def listen() -> None:
                async for message in client.messages:
                    counts["answers"] += 1
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray) and b"rate_limited" in payload:
                        counts["rate_limited"] += 1

            async def publisher(k: int) -> None:
                n = k
                while not stop.is_set() and counts["sent"] < args.max:
                    counts["sent"] += 1
                    body: dict[str, Any]
                    if args.mode == "scans":
                        body = {"card_id": UNKNOWN_CARD, "msg_id": f"flood-{n}"}
                    else:
                        body = {"battery": 50, "app_version": "9.9.9", "n": n}
                    n += args.window
                    try:
                        await client.publish(topic, json.dumps(body), qos=1, timeout=5)
                        counts["acked"] += 1
                    except aiomqtt.MqttError:
                        counts["errors"] += 1
                        await asyncio.sleep(0.05)

            listener = asyncio.create_task(listen())
            try:
                async with asyncio.timeout(args.seconds):
                    await asyncio.gather(*(publisher(k) for k in range(args.window)))
            except TimeoutError:
                pass
            finally:
                stop.set()
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await listener
    except aiomqtt.MqttError as exc:
        counts["error"] = str(exc)
    counts["seconds"] = round(time.monotonic() - started, 2)
    counts["per_s"] = round(counts["acked"] / max(counts["seconds"], 1e-6))
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--mode", choices=("scans", "heartbeats"), required=True)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--max", type=int, default=300_000, help="messages at most")
    p.add_argument("--window", type=int, default=64, help="publishes in flight at once")
    args = p.parse_args(argv)
    if not (0 < args.seconds <= 600 and 0 < args.max <= 10_000_000 and 1 <= args.window <= 1000):
        p.error("--seconds 0..600, --max 1..10,000,000, --window 1..1000")
    print(json.dumps(asyncio.run(flood(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
