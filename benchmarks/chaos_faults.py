"""The faults of a chaos run: a seeded, shuffled deck holding every kind, dealt one at a time, each held for a
bounded time and then healed; a new deck once one is used up.

- kill: SIGKILL the agent (a third of the time once more, 0.1-1 s into its restart); restarted 0-1.5 s later.
- cloud:<kind>: a sandbox fault plan, every route (Ziggy, token, events, clips) failing that way at a seeded
  rate 0.3-0.7, for 8-14 s: 500 503 429 401 timeout reset slow garbage cut. Healed by an empty plan.
- outage: every route of the cloud and Ziggy resets its connections (rate 1) for about `--outage-s`.
- disk_full: the data disk filled to the last byte while the players keep tapping; healed by deleting the filler.
- read_only: an ext4 error on the data disk (errors=remount-ro), every write failing; healed as a box is, by a
  reboot: stop the agent, e2fsck, mount, start (chaos_disk.py says why not `mount -o remount,ro`).
- clock: the agent's wall clock stepped forwards or backwards by 10 min-2.5 h (log-uniform), monotonic time
  untouched (chaos_clock.py); healed by the step back.
- unplug: the serial reader's pty closed and its device name gone; healed by a new pty behind the same name.
- flood: one device publishing as fast as the broker takes it, a reader's scans or a tablet's heartbeats, from a
  process of its own (chaos_flood.py), for 10-15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from chaos_clock import WallClock
from chaos_devices import MqttLink, SerialLine
from chaos_disk import DataDisk
from chaos_rig import FLOOD_READER, FLOOD_TABLET, HOST, Agent, Device, Layout
from chaos_timeline import Timeline, Window
from chaos_traffic import Traffic

CLOUD_KINDS = ("500", "503", "429", "401", "timeout", "reset", "slow", "garbage", "cut")
HTTP_TIMEOUT = httpx.Timeout(10.0)
LINKS_BACK_S = 30.0  # devices reconnect after a restart within this
REOPEN_S = 15.0  # the agent finds a replugged reader within this (its backoff tops out at 5 s)
FLOOD_SCRIPT = Path(__file__).with_name("chaos_flood.py")


def deck() -> list[str]:
    """One of each fault, kills three times, two of the clock, the reader and the flood (one each way)."""
    return [
        "kill",
        "kill",
        "kill",
        *(f"cloud:{k}" for k in CLOUD_KINDS),
        "outage",
        "disk_full",
        "read_only",
        "clock:+",
        "clock:-",
        "unplug",
        "unplug",
        "flood:scans",
        "flood:heartbeats",
    ]


@dataclass(frozen=True, slots=True)
class Holds:
    """How long each fault is held (seconds, drawn uniformly)."""

    cloud: tuple[float, float] = (8.0, 14.0)
    outage: tuple[float, float] = (40.0, 55.0)
    disk: tuple[float, float] = (10.0, 16.0)
    clock: tuple[float, float] = (15.0, 25.0)
    clock_step_s: tuple[float, float] = (600.0, 9000.0)  # 10 min .. 2.5 h, log-uniform
    unplug: tuple[float, float] = (6.0, 12.0)
    flood: tuple[float, float] = (10.0, 15.0)
    gap: tuple[float, float] = (2.0, 5.0)


class Chaos:
    def __init__(
        self,
        *,
        agent: Agent,
        layout: Layout,
        disk: DataDisk,
        clock: WallClock,
        serial: SerialLine,
        links: dict[str, MqttLink],
        traffic: Traffic,
        timeline: Timeline,
        rng: random.Random,
        holds: Holds,
        say: Callable[[str], None],
        flood_devices: dict[str, Device],
        only: list[str] | None = None,
    ) -> None:
        self.agent, self.layout, self.disk, self.clock = agent, layout, disk, clock
        self.serial, self.links, self.traffic, self.timeline = serial, links, traffic, timeline
        self.rng, self.holds, self.say = rng, holds, say
        self.flood_devices = flood_devices
        self.only = only  # a deck of just these faults (to reproduce one), instead of every kind
        self.applied: list[str] = []
        self.skipped: list[str] = []
        self.excluded: set[str] = set()  # fault families this host cannot apply (see skip)
        self.fault_seed = rng.randrange(1 << 30)
        self._flood: asyncio.subprocess.Process | None = None
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT)

    async def aclose(self) -> None:
        await self._http.aclose()

    def skip(self, family: str) -> None:
        """Leave a fault family out of the deck (said in the report): the clock without a C compiler."""
        self.excluded.add(family)

    # -- the deal ------------------------------------------------------------------------------------------------

    async def run(self, duration_s: float, hard_until: float) -> None:
        """Deal faults until `duration_s` has passed and at least one whole deck was dealt (never past
        `hard_until`, monotonic)."""
        started = time.monotonic()
        cards: list[str] = []
        decks = 0
        while True:
            now = time.monotonic()
            if not cards:
                if decks and now - started >= duration_s:
                    return
                cards = list(self.only) if self.only else deck()
                self.rng.shuffle(cards)
                decks += 1
            if now - started >= duration_s and decks > 1:
                return
            if now > hard_until:
                self.skipped += cards
                return
            kind = cards.pop()
            if kind.partition(":")[0] in self.excluded:
                self.skipped.append(kind)
                continue
            began = time.monotonic()
            await self.apply(kind)
            self.applied.append(kind)
            self.say(f"  {time.monotonic() - started:6.1f} s  {kind:<18} {time.monotonic() - began:5.1f} s"
                     f"  {self._last_detail()}")  # fmt: skip
            await asyncio.sleep(self.rng.uniform(*self.holds.gap))

    def _last_detail(self) -> str:
        own = [w for w in self.timeline.windows if w.kind != "crash"]  # the supervisor's windows interleave
        if not own:
            return ""
        w = own[-1]
        notes = ", ".join(f"{k} {v}" for k, v in w.notes.items())
        return f"{w.detail}{'; ' if w.detail and notes else ''}{notes}"

    async def apply(self, kind: str) -> None:
        family, _, arg = kind.partition(":")
        handlers: dict[str, Callable[[str], Awaitable[None]]] = {
            "kill": self.kill,
            "cloud": self.cloud,
            "outage": self.outage,
            "disk_full": self.disk_full,
            "read_only": self.read_only,
            "clock": self.clock_step,
            "unplug": self.unplug,
            "flood": self.flood,
        }
        await handlers[family](arg)

    # -- helpers --------------------------------------------------------------------------------------------------

    async def _hold(self, bounds: tuple[float, float]) -> None:
        await asyncio.sleep(self.rng.uniform(*bounds))

    async def _devices_back(self) -> None:
        """Every player device connected again (after a restart), within LINKS_BACK_S."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINKS_BACK_S):
                await asyncio.gather(*(link.up.wait() for link in self.links.values()))

    async def _restart(self, window: Window) -> None:
        try:
            ready = await self.agent.start()
        except (RuntimeError, TimeoutError) as exc:  # a crash at start: recorded; the supervisor goes on trying
            window.notes["start_failed"] = str(exc).splitlines()[0][:120]
            return
        window.notes["ready_s"] = round(ready, 2)
        await self._devices_back()

    async def plan(self, rules: list[dict[str, Any]]) -> dict[str, Any]:
        answer = await self._http.put(
            f"{self.layout.sandbox_url}/_sandbox/faults", json={"rules": rules, "seed": self.fault_seed}
        )
        answer.raise_for_status()
        self.fault_seed += 1
        described: dict[str, Any] = answer.json()
        return described

    async def fired(self) -> int:
        answer = await self._http.get(f"{self.layout.sandbox_url}/_sandbox/faults")
        answer.raise_for_status()
        return sum(int(r.get("fired", 0)) for r in answer.json().get("rules", []))

    # -- the faults ----------------------------------------------------------------------------------------------

    async def kill(self, arg: str) -> None:
        window = self.timeline.open("kill", f"pid {self.agent.child.pid}")
        await self.agent.kill()
        await asyncio.sleep(self.rng.uniform(0.0, 1.5))  # the box reboots
        if self.rng.random() < 1 / 3:  # and is killed again while starting: migrations, quick_check, first rounds
            self.agent.child.start()
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            window.notes["killed_in_startup"] = True
            await self.agent.kill()
        self.timeline.healed(window)
        await self._restart(window)
        self.timeline.settled(window)
        await self.traffic.reask(2)

    async def cloud(self, kind: str) -> None:
        rule: dict[str, Any] = {"endpoint": "*", "kind": kind, "rate": round(self.rng.uniform(0.3, 0.7), 2)}
        if kind in ("503", "429"):
            rule["retry_after_s"] = self.rng.choice([1, 2])
        elif kind == "timeout":
            rule["delay_s"] = round(self.rng.uniform(6.0, 12.0), 1)  # past the agent's 5 s (Ziggy) and 10 s timeouts
        elif kind == "slow":
            rule["delay_s"] = round(self.rng.uniform(1.0, 4.0), 1)
        elif kind == "cut":
            rule["after_bytes"] = self.rng.randrange(0, 1200)  # small bodies act (their answer is lost), big are cut
        window = self.timeline.open(f"cloud:{kind}", json.dumps(rule))
        try:
            await self.plan([rule])
            await self._hold(self.holds.cloud)
            window.notes["fired"] = await self.fired()
        finally:
            await self.plan([])
            self.timeline.healed(window)
            self.timeline.settled(window)

    async def outage(self, arg: str) -> None:
        window = self.timeline.open("outage", "Ziggy and the cloud reset every connection")
        try:
            await self.plan([{"endpoint": "*", "kind": "reset", "rate": 1.0}])
            await self._hold(self.holds.outage)
            window.notes["fired"] = await self.fired()
        finally:
            await self.plan([])
            self.timeline.healed(window)
            self.timeline.settled(window)

    async def disk_full(self, arg: str) -> None:
        window = self.timeline.open("disk_full", f"{self.disk.size_mb} MB ext4")
        try:
            filled = await asyncio.to_thread(self.disk.fill)
            window.notes["filler_mb"] = round(filled / 1e6, 1)
            window.notes["free_b"] = await asyncio.to_thread(self.disk.free_bytes)
            await self._hold(self.holds.disk)
        finally:
            await asyncio.to_thread(self.disk.unfill)
            self.timeline.healed(window, settle_s=1.0)

    async def read_only(self, arg: str) -> None:
        window = self.timeline.open("read_only", "ext4 error, errors=remount-ro")
        try:
            await asyncio.to_thread(self.disk.fail)
            window.notes["ro"] = await asyncio.to_thread(self.disk.read_only)
            await self._hold(self.holds.disk)
        finally:
            await self.reboot(window)

    async def reboot(self, window: Window) -> None:
        """The way back from a read-only data disk: stop the agent, repair, mount, start."""
        window.notes["agent_exit"] = await self.agent.stop()
        window.notes["fsck"] = await asyncio.to_thread(self.disk.repair)
        self.timeline.healed(window)
        await self._restart(window)
        self.timeline.settled(window)

    async def clock_step(self, sign: str) -> None:
        lo, hi = self.holds.clock_step_s
        step = math.exp(self.rng.uniform(math.log(lo), math.log(hi))) * (-1 if sign == "-" else 1)
        window = self.timeline.open("clock", f"{'+' if step > 0 else '-'}{abs(step) / 60:.0f} min, then back")
        try:
            self.clock.step(step)
            await self._hold(self.holds.clock)
        finally:
            self.clock.step(0.0)
            self.timeline.healed(window, settle_s=1.0)

    async def unplug(self, arg: str) -> None:
        window = self.timeline.open("unplug", f"{self.layout.serial_link.name}")
        self.serial.unplug()
        try:
            await self._hold(self.holds.unplug)
        finally:
            name = self.serial.plug()
            self.timeline.healed(window)
            for _ in range(int(REOPEN_S / 0.1)):  # the agent's reopen backoff: nothing to be woken by
                if self.agent.holds(name):
                    break
                await asyncio.sleep(0.1)
            window.notes["reopened_s"] = round(time.monotonic() - (window.healed or 0.0), 2)
            self.timeline.settled(window)

    async def flood(self, mode: str) -> None:
        device = self.flood_devices[FLOOD_READER if mode == "scans" else FLOOD_TABLET]
        seconds = round(self.rng.uniform(*self.holds.flood), 1)
        window = self.timeline.open(f"flood:{mode}", f"{device.id}")
        argv = [
            sys.executable, str(FLOOD_SCRIPT), "--host", HOST, "--port", str(self.layout.broker_port),
            "--device", device.id, "--password", device.password, "--mode", mode, "--seconds", str(seconds),
        ]  # fmt: skip
        cpu = self.agent.cpu_seconds()
        began = time.monotonic()
        try:
            self._flood = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            async with asyncio.timeout(seconds + 20):
                out, err = await self._flood.communicate()
            try:
                counts = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                counts = {"error": err.decode(errors="replace")[-300:]}
            window.notes.update({k: counts[k] for k in ("acked", "per_s", "rate_limited", "error") if k in counts})
            if cpu is not None and (after := self.agent.cpu_seconds()) is not None:
                window.notes["agent_cpu_pct"] = round(100 * (after - cpu) / (time.monotonic() - began))
        finally:
            await self.stop_flood()
            self.timeline.healed(window, settle_s=1.0)

    async def stop_flood(self) -> None:
        proc, self._flood = self._flood, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await proc.wait()

    # -- the end -------------------------------------------------------------------------------------------------

    async def heal_all(self) -> list[str]:
        """Whatever a fault interrupted (Ctrl-C, a driver error) is put back; returns what had to be. The agent
        is not started again here: the caller knows whether it wants it running."""
        done: list[str] = []
        await self.stop_flood()
        if self.clock.available and self.clock.offset_s:
            self.clock.step(0.0)
            done.append("clock stepped back")
        with contextlib.suppress(httpx.HTTPError):
            await self.plan([])
        if self.disk.mounted and self.disk.filler.exists():
            await asyncio.to_thread(self.disk.unfill)
            done.append("filler removed")
        if self.disk.mounted and await asyncio.to_thread(self.disk.read_only):
            await self.agent.stop()
            await asyncio.to_thread(self.disk.repair)
            done.append("disk repaired")
        if not self.serial.plugged.is_set():
            self.serial.plug()
            done.append("reader plugged")
        return done
