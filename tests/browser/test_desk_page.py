"""The front-desk page in Debian's Chromium: every court, a tablet's battery and version from its heartbeat and
the tablet going offline, refused taps with their reasons, what waits to be synced; and a page that finds the
agent again by itself after the agent restarts."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import ANA, BRUNO, CARLA, Premises, PremisesFactory

Shot = Callable[[Any, str], Awaitable[None]]
TOKENS = {"desk-1": "tok-desk-1-0123456789ab", "court-c1": "tok-court-c1-0123456789"}
CLIENTS = [{"name": "desk-1", "role": "desk"}, {"name": "court-c1", "role": "court", "courts": ["c1"]}]


def api_secrets(tmp_path: Path) -> str:
    secrets = tmp_path / "api-secrets.toml"
    tokens = ", ".join(f'{name} = "{token}"' for name, token in TOKENS.items())
    secrets.write_text(f"api_tokens = {{ {tokens} }}\n")
    secrets.chmod(0o600)
    return str(secrets)


async def test_the_desk_sees_courts_devices_refused_taps_and_the_outbox(
    premises_factory: PremisesFactory, tmp_path: Path, page: Any, screenshot: Shot
) -> None:
    from playwright.async_api import expect

    desk: Premises = await premises_factory(api={"clients": CLIENTS}, agent={"secrets_file": api_secrets(tmp_path)})
    await page.goto(f"http://127.0.0.1:{desk.agent.api_port}/tablet/desk?token={TOKENS['desk-1']}")
    await expect(page.locator("#link")).to_have_text("Conectado", timeout=10_000)
    await expect(page.locator(".court-card h3")).to_have_text(["Quadra 1", "Quadra 2"])
    await expect(page.locator("#denied li")).to_have_text(["Nenhum acesso negado"])

    tablet_row = page.locator("#devices tr[data-device='t1']")
    await expect(tablet_row.locator(".badge")).to_have_text("offline")
    async with desk.tablet("t1") as tablet:
        await tablet.heartbeat(battery=37, app_version="2.4.1")
        await expect(tablet_row.locator(".badge")).to_have_text("online", timeout=5_000)
        await expect(tablet_row.locator(".battery")).to_have_text("37%", timeout=5_000)
        await expect(tablet_row.locator(".version")).to_have_text("2.4.1")
        async with desk.reader("r1") as reader:
            assert (await reader.tap(BRUNO)).payload["status"] == "granted"
            assert (await reader.tap(CARLA)).payload["reason"] == "suspended"
            assert (await reader.tap("DEADBEEF7A1C")).payload["reason"] == "unknown_card"
        await expect(page.locator(".court-card[data-court='c1'] li .name")).to_have_text(["Bruno"], timeout=5_000)
        refused = page.locator("#denied li")
        await expect(refused.locator(".who")).to_have_text(["…7A1C", "Carla"], timeout=5_000)
        await expect(refused.locator(".reason")).to_have_text(
            ["Acesso negado: cartão desconhecido", "Acesso negado: cadastro suspenso"]
        )
        # Ziggy and the cloud are unreachable in this test: the check-in waits for both
        await expect(page.locator("#sync tr[data-destination='cloud'] .pending")).not_to_have_text(
            "0 pendentes", timeout=10_000
        )
        await expect(page.locator("#storage")).to_contain_text("Armazenamento: ", timeout=10_000)
        await screenshot(page, "desk-tablet-online")
    # the tablet leaves (its app closed, its Wi-Fi lost): the desk shows it at once
    await expect(tablet_row.locator(".badge")).to_have_text("offline", timeout=5_000)
    await expect(tablet_row.locator(".battery")).to_have_text("37%")  # the last known battery stays
    await screenshot(page, "desk-tablet-offline")


async def test_pages_find_the_agent_again_after_it_restarts(
    premises_factory: PremisesFactory, tmp_path: Path, page: Any, screenshot: Shot
) -> None:
    from playwright.async_api import expect

    with socket.socket() as probe:  # the restarted agent must come back on the address the tablets know
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides: dict[str, Any] = {
        "api": {"clients": CLIENTS, "port": port},
        "agent": {"secrets_file": api_secrets(tmp_path)},
    }
    first: Premises = await premises_factory(**overrides)
    await page.goto(f"http://127.0.0.1:{port}/tablet/court?court=c1&token={TOKENS['court-c1']}")
    desk = await page.context.new_page()
    await desk.goto(f"http://127.0.0.1:{port}/tablet/desk?token={TOKENS['desk-1']}")
    for tab in (page, desk):
        await expect(tab.locator("#link")).to_have_text("Conectado", timeout=10_000)

    again: Premises = await premises_factory(restart=first)
    assert again.agent.api_port == port
    async with again.reader("r1") as reader:
        assert (await reader.tap(ANA)).payload["status"] == "granted"
    # the pages reconnected by themselves and read the state again: the check-in made after the restart shows
    await expect(page.locator("#players li .name")).to_have_text(["Ana"], timeout=10_000)
    await expect(page.locator("#link")).to_have_text("Conectado")
    await expect(desk.locator(".court-card[data-court='c1'] li .name")).to_have_text(["Ana"], timeout=10_000)
    await screenshot(page, "court-after-agent-restart")
