"""`club-agent demo`: the whole agent on loopback with seeded members and simulated devices, narrated live.

No hardware, no internet: a temporary data dir, the embedded broker on an ephemeral port, the sandbox cloud
(Ziggy and the club cloud) on loopback, three court readers, a bar reader, a highlight button and a court tablet
that publish real MQTT messages, a console line for every answer, and the tablet pages (court, bar, front desk)
served with their tokens printed, so a browser on this machine shows the club live. The outbox's progress to
the sandbox is narrated too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from . import sim
from .app import Agent, running
from .config import Config, parse_config
from .lan.auth import hash_password
from .sandbox.options import SandboxOptions
from .sandbox.server import SandboxServer
from .store.db import Database
from .store.members import MemberRecord, apply_members

FIRST_NAMES = (
    "Ana",
    "Bruno",
    "Carla",
    "Diego",
    "Eduarda",
    "Felipe",
    "Gabriela",
    "Henrique",
    "Isabela",
    "João",
    "Karina",
    "Lucas",
    "Mariana",
    "Nicolas",
    "Olívia",
    "Pedro",
    "Quésia",
    "Rafael",
    "Sofia",
    "Tiago",
    "Úrsula",
    "Vitor",
    "Wesley",
    "Yasmin",
    "Zeca",
    "Beatriz",
    "Caio",
    "Larissa",
    "Mateus",
    "Renata",
)
LAST_NAMES = ("Silva", "Souza", "Oliveira", "Santos", "Lima", "Pereira", "Costa", "Almeida", "Ribeiro", "Gomes")
COURTS: tuple[tuple[str, str, list[str]], ...] = (
    ("c1", "Quadra 1 (padel)", ["padel"]),
    ("c2", "Quadra 2 (padel)", ["padel"]),
    ("c3", "Quadra 3 (beach tennis)", []),
)


@dataclass
class DemoMember:
    record: MemberRecord
    kind: str  # regular | suspended | expired | no_credits | beach_only

    @property
    def card(self) -> str:
        return self.record.cards[0]


def demo_members(count: int = 60, seed: int = 7) -> list[DemoMember]:
    rng = random.Random(seed)
    today = date.today()
    out = []
    kinds = ["suspended"] * 3 + ["expired"] * 3 + ["no_credits"] * 3 + ["beach_only"] * 3
    kinds += ["regular"] * (count - len(kinds))
    for i, kind in enumerate(kinds):
        first = FIRST_NAMES[i % len(FIRST_NAMES)]
        requires_credit = kind != "regular" or i % 4 != 0
        out.append(
            DemoMember(
                MemberRecord(
                    member_id=f"m{i + 1:04d}",
                    first_name=first,
                    last_name=rng.choice(LAST_NAMES),
                    member_code=f"{1001 + i}",
                    status="suspended" if kind == "suspended" else "active",
                    cards=[f"04{rng.getrandbits(48):012X}"],
                    credits=0 if kind == "no_credits" else (rng.randint(3, 12) if requires_credit else None),
                    requires_credit=requires_credit,
                    valid_until=today - timedelta(days=3) if kind == "expired" else today + timedelta(days=180),
                    groups=["beach"] if kind == "beach_only" else ["padel", "beach"],
                ),
                kind,
            )
        )
    return out


DEMO_TOKENS = {name: secrets.token_urlsafe(18) for name in ("desk", "bar-1", "court-c1")}
BAR_ITEMS = [
    {"item_id": "agua-500", "name": "Água 500 ml", "unit_price": 4.5},
    {"item_id": "chopp", "name": "Chopp 300 ml", "unit_price": 12.9},
    {"item_id": "isotonico", "name": "Isotônico", "unit_price": 8.0},
    {"item_id": "bola", "name": "Tubo de bolas", "unit_price": 39.9},
]


def demo_config(
    data_dir: Path,
    passwords: dict[str, str],
    broker_port: int = 0,
    api_port: int = 0,
    sandbox: SandboxServer | None = None,
) -> Config:
    devices: list[dict[str, Any]] = [
        {"id": f"r{n}", "kind": "reader", "court": court_id, "name": f"Leitor {name}"}
        for n, (court_id, name, _) in enumerate(COURTS, start=1)
    ]
    devices += [
        {"id": "b1", "kind": "button", "court": "c1"},
        {"id": "t1", "kind": "tablet", "court": "c1"},
        {"id": "rb", "kind": "reader", "pos": "bar-1", "name": "Leitor do bar"},
    ]
    for device in devices:
        device["password_hash"] = hash_password(passwords[device["id"]])
    secrets_file = data_dir / "secrets.toml"
    lines = ["[api_tokens]", *(f'"{name}" = "{token}"' for name, token in DEMO_TOKENS.items())]
    sync: dict[str, Any] = {}
    if sandbox is not None:
        s = sandbox.settings
        lines = [
            f'ziggy_api_key = "{s.ziggy_api_key}"',
            f'cloud_client_secret = "{s.cloud_client_secret}"',
            f'cloud_signing_secret = "{s.signing_secret}"',
            *lines,
        ]
        sync = {
            "ziggy": {"base_url": s.ziggy_base_url, "client_id": s.ziggy_client_id},
            "cloud": {"base_url": s.cloud_base_url, "token_url": s.token_url, "client_id": s.cloud_client_id},
        }
    data_dir.mkdir(parents=True, exist_ok=True)
    secrets_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    secrets_file.chmod(0o600)
    clients = [
        {"name": "desk", "role": "desk"},
        {"name": "bar-1", "role": "bar"},
        {"name": "court-c1", "role": "court", "courts": ["c1"]},
    ]
    return parse_config(
        {
            "agent": {
                "club_id": "demo-club",
                "agent_id": "demo-edge",
                "name": "Clube Demo",
                "data_dir": str(data_dir),
                "trust_clock": True,
                "secrets_file": str(secrets_file),
            },
            "broker": {"host": "127.0.0.1", "port": broker_port},
            "api": {"host": "127.0.0.1", "port": api_port, "clients": clients},
            "bar": {"items": BAR_ITEMS},
            "media": {"ring_dir": str(data_dir / "ring")},
            **sync,
            "policy": {"second_tap_grace_s": 8, "debounce_s": 2},
            "courts": [{"id": c, "name": n, "access_groups": g} for c, n, g in COURTS],
            "devices": devices,
        },
        source="demo",
    )


@dataclass
class Tally:
    results: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> str:
        lat = sorted(self.latencies_ms)
        if not lat:
            return "no taps answered"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        parts = ", ".join(f"{k} {v}" for k, v in self.results.most_common())
        return f"{len(lat)} answers ({parts}); tap->response p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms"


class Narrator:
    def __init__(self, console: Console, members: dict[str, DemoMember]) -> None:
        self.console = console
        self.by_card = {m.card: m for m in members.values()}
        self.tally = Tally()

    def tap(self, reader_id: str, court: str, card: str, reply: sim.Reply) -> None:
        p = reply.payload
        ms = reply.latency_s * 1000
        self.tally.latencies_ms.append(ms)
        self.tally.results[f"{p['status']}:{p['reason']}"] += 1
        who = self.by_card.get(card)
        name = f"{who.record.first_name} {who.record.last_name}" if who else "(cartão desconhecido)"
        style = "green" if p["status"] == "granted" else "red"
        now = datetime.now().strftime("%H:%M:%S")
        self.console.print(
            f"{now}  [bold]{reader_id}[/] {court:<24} {card}  {name:<18} "
            f"[{style}]{p['status'].upper():<7} {p['action']:<8} {p['reason']:<18}[/] "
            f"«{p['message']}»  [dim]{ms:5.1f} ms[/]",
            soft_wrap=True,
        )

    def line(self, text: str) -> None:
        now = datetime.now().strftime("%H:%M:%S")
        self.console.print(f"{now}  {text}", soft_wrap=True)


async def _players(
    narrator: Narrator,
    agent: Agent,
    members: list[DemoMember],
    passwords: dict[str, str],
    rng: random.Random,
    pace: float,
) -> None:
    host, port = "127.0.0.1", agent.broker_port
    assert port is not None
    regular = [m for m in members if m.kind == "regular"]
    troubled = [m for m in members if m.kind != "regular"]
    on_court: dict[str, tuple[str, float]] = {}  # card -> (reader where it checked in, when)
    async with contextlib.AsyncExitStack() as stack:
        readers = {
            f"r{n}": await stack.enter_async_context(sim.reader(host, port, f"r{n}", passwords[f"r{n}"]))
            for n in (1, 2, 3)
        }
        btn = await stack.enter_async_context(sim.button(host, port, "b1", "c1", passwords["b1"]))
        tab = await stack.enter_async_context(sim.tablet(host, port, "t1", passwords["t1"]))
        bar = await stack.enter_async_context(sim.reader(host, port, "rb", passwords["rb"]))
        courts = {f"r{n}": name for n, (_, name, _) in enumerate(COURTS, start=1)}
        # The opening taps show each kind of answer once; the random club life follows.
        showcase = [
            (regular[0].card, "r1"),
            (f"DE{rng.getrandbits(32):08X}", "r2"),
            (next(m for m in troubled if m.kind == "suspended").card, "r3"),
            (next(m for m in troubled if m.kind == "beach_only").card, "r1"),
        ]
        for card, reader_id in showcase:
            reply = await readers[reader_id].tap(card)
            narrator.tap(reader_id, courts[reader_id], card, reply)
            if reply.payload["action"] == "checkin":
                on_court[card] = (reader_id, asyncio.get_running_loop().time())
            await asyncio.sleep(pace)
        step = 0
        while True:
            step += 1
            roll = rng.random()
            now = asyncio.get_running_loop().time()
            # Players leave after a while (a second tap on their court), some forget and tap elsewhere.
            leaving = [c for c, (_, at) in on_court.items() if now - at > 10 * pace]
            idle = [m for m in regular if m.card not in on_court]
            if leaving and roll < 0.25:
                card = rng.choice(leaving)
                reader_id = on_court[card][0] if rng.random() < 0.85 else rng.choice(list(readers))
            elif roll < 0.40:
                card, reader_id = rng.choice(troubled).card, rng.choice(list(readers))
            elif roll < 0.50 or not idle:
                card, reader_id = f"DE{rng.getrandbits(32):08X}", rng.choice(list(readers))
            else:
                card, reader_id = rng.choice(idle).card, rng.choice(list(readers))
            reply = await readers[reader_id].tap(card)
            narrator.tap(reader_id, courts[reader_id], card, reply)
            if reply.payload["action"] == "checkin":
                on_court[card] = (reader_id, now)
            elif reply.payload["action"] == "checkout":
                on_court.pop(card, None)
            if step % 7 == 0:
                ack = await btn.press()
                narrator.line(
                    f"[bold]b1[/] Quadra 1 (padel)  botão de destaque -> [cyan]{ack.payload['status']}[/] "
                    f"highlight {ack.payload['highlight_id'][:8]}… início {ack.payload['start_at']}"
                )
            if step % 11 == 0:
                member = rng.choice([m for m in regular if m.card not in on_court] or regular)
                got = await tab.checkin("c1", member_code=member.record.member_code)
                narrator.line(
                    f"[bold]t1[/] tablet Quadra 1: código {member.record.member_code} -> "
                    f"{got.payload['status']} {got.payload['reason']} «{got.payload['message']}»"
                )
                if got.payload["action"] == "checkin":
                    on_court[member.card] = ("r1", asyncio.get_running_loop().time())
            if step % 9 == 0 and on_court:
                # at the bar: the player taps their card on the bar's reader, the bar orders for them
                card = rng.choice(list(on_court))
                picked = await bar.tap(card)
                items = [{**item, "quantity": rng.randint(1, 3)} for item in rng.sample(BAR_ITEMS, rng.randint(1, 2))]
                order = await tab.order(items, card_id=card)
                narrator.line(
                    f"[bold]rb[/] bar: «{picked.payload['message']}» -> pedido "
                    + ", ".join(f"{i['quantity']}x {i['name']}" for i in items)
                    + f" -> [cyan]{order.payload['status']}[/] total R$ {order.payload.get('total', 0):.2f}"
                    f" (sessão R$ {order.payload.get('session_total', 0):.2f})"
                )
            if step % 5 == 0:
                await tab.heartbeat(battery=max(5, 90 - step // 5))
            await asyncio.sleep(pace * rng.uniform(0.5, 1.5))


async def run_demo(duration: float | None, pace: float, members_count: int, console: Console) -> Tally:
    members = demo_members(members_count)
    passwords = {d: secrets.token_urlsafe(12) for d in ("r1", "r2", "r3", "b1", "t1", "rb")}
    sandbox_options = SandboxOptions(members=0, courts={c: n for c, n, _ in COURTS})
    with tempfile.TemporaryDirectory(prefix="club-agent-demo-") as tmp:
        async with SandboxServer(sandbox_options, port=0) as cloud:
            config = demo_config(Path(tmp), passwords, sandbox=cloud)
            async with Database(config.db_path) as db:
                result = await apply_members(
                    db,
                    [m.record for m in members],
                    tz=config.domain_policy().timezone,
                    source="demo",
                    synced_at=datetime.now(UTC),
                )
            console.print(
                f"[bold]Club agent demo[/]: {result.members} members seeded (list v{result.version}), "
                f"3 courts, readers r1-r3, bar reader rb, button b1, tablet t1; sandbox cloud (Ziggy + club "
                f"cloud) on {cloud.url}. Data dir {tmp}",
                soft_wrap=True,
            )
            agent = Agent(config)
            narrator = Narrator(console, {m.record.member_id: m for m in members})
            async with running(agent):
                base = f"http://127.0.0.1:{agent.api_port}"
                console.print(
                    f"Broker on 127.0.0.1:{agent.broker_port}  (try: mosquitto_sub -p {agent.broker_port} "
                    f"-u t1 -P {passwords['t1']} -t 'court/c1/#' -v)\n"
                    f"Pages (open in a browser on this machine):\n"
                    f"  front desk  {base}/tablet/desk?token={DEMO_TOKENS['desk']}\n"
                    f"  court 1     {base}/tablet/court?court=c1&token={DEMO_TOKENS['court-c1']}\n"
                    f"  bar         {base}/tablet/bar?pos=bar-1&token={DEMO_TOKENS['bar-1']}\n"
                    f"Health {base}/health   metrics {base}/metrics   what the cloud received "
                    f"{cloud.url}/_sandbox/received",
                    soft_wrap=True,
                )
                console.print("Ctrl-C stops the demo.\n")
                players = _players(narrator, agent, members, passwords, random.Random(), pace)
                try:
                    if duration:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(players, duration)
                    else:
                        await players
                finally:
                    delivered = sum(1 for e in cloud.sandbox.log if e.get("kind") == "event")
                    ziggy = sum(1 for e in cloud.sandbox.log if e.get("kind") == "call" and e.get("acted"))
                    console.print(
                        f"\n[bold]Summary[/]: {narrator.tally.summary()}\n"
                        f"[bold]Synced[/]: {delivered} events accepted by the club cloud, {ziggy} Ziggy calls acted on",
                        soft_wrap=True,
                    )
    return narrator.tally
