"""The bar tablet page in Debian's Chromium: an order for a player on court appears on the court page and
reaches the (sandbox) cloud and Ziggy through the outbox."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.conftest import ANA, BRUNO, EVA, Premises, PremisesFactory
from tests.sandboxes import delivered, sandbox_overrides

Shot = Callable[[Any, str], Awaitable[None]]
TOKENS = {"court-c1": "tok-court-c1-0123456789", "bar-1": "tok-bar-1-0123456789ab"}
ITEMS = [
    {"item_id": "agua-500", "name": "Água 500 ml", "unit_price": 4.5},
    {"item_id": "chopp", "name": "Chopp", "unit_price": 12.9},
]


async def test_an_order_at_the_bar_shows_on_the_court_page_and_reaches_the_cloud(
    premises_factory: PremisesFactory,
    sandbox_factory: Callable[..., Any],
    tmp_path: Path,
    page: Any,
    screenshot: Shot,
) -> None:
    from playwright.async_api import expect

    server = await sandbox_factory()
    overrides = sandbox_overrides(server, tmp_path / "secrets")
    secrets = Path(overrides["agent"]["secrets_file"])
    tokens = ", ".join(f'{name} = "{token}"' for name, token in TOKENS.items())
    secrets.write_text(secrets.read_text() + f"api_tokens = {{ {tokens} }}\n")
    clients = [{"name": "court-c1", "role": "court", "courts": ["c1"]}, {"name": "bar-1", "role": "bar"}]
    premises: Premises = await premises_factory(**overrides, api={"clients": clients}, bar={"items": ITEMS})
    base = f"http://127.0.0.1:{premises.agent.api_port}"
    async with premises.reader("r1") as reader:
        assert (await reader.tap(BRUNO)).payload["action"] == "checkin"

    court = await page.context.new_page()
    await court.goto(f"{base}/tablet/court?court=c1&token={TOKENS['court-c1']}")
    await expect(court.locator("#players li .name")).to_have_text(["Bruno"], timeout=10_000)

    await page.goto(f"{base}/tablet/bar?token={TOKENS['bar-1']}")
    await expect(page.locator("#link")).to_have_text("Conectado", timeout=10_000)
    await page.locator("#sessions li", has_text="Bruno").click()
    await page.locator(".item[data-item='agua-500']").click()
    await page.locator(".item[data-item='agua-500']").click()
    await page.locator(".item[data-item='chopp']").click()
    await expect(page.locator("#total")).to_contain_text("21,90")
    await page.locator("#confirm").click()
    await expect(page.locator("#banner")).to_contain_text("Registrado", timeout=5_000)
    await screenshot(page, "bar-order")

    await expect(court.locator("#players li .spent")).to_contain_text(["21,90"], timeout=5_000)
    await screenshot(court, "court-after-bar-order")
    await delivered(premises, within=30)
    cloud = [e for e in server.sandbox.log if e["kind"] == "event" and e["type"] == "consumption.recorded"]
    assert sorted((e["data"]["item_id"], e["data"]["quantity"]) for e in cloud) == [("agua-500", 2), ("chopp", 1)]
    ziggy = [c for c in server.sandbox.log if c["kind"] == "call" and c["route"] == "ziggy.consumption.record"]
    assert len(ziggy) == 2


async def test_a_card_on_the_bars_reader_picks_the_player_on_the_bar_page(
    premises_factory: PremisesFactory, tmp_path: Path, page: Any, screenshot: Shot
) -> None:
    from playwright.async_api import expect

    secrets = tmp_path / "api-secrets.toml"
    secrets.write_text(f'api_tokens = {{ bar-1 = "{TOKENS["bar-1"]}" }}\n')
    secrets.chmod(0o600)
    premises: Premises = await premises_factory(
        api={"clients": [{"name": "bar-1", "role": "bar"}]}, agent={"secrets_file": str(secrets)}, bar={"items": ITEMS}
    )
    async with premises.reader("r1") as court_reader:
        await court_reader.tap(BRUNO)
        await court_reader.tap(ANA)
    await page.goto(f"http://127.0.0.1:{premises.agent.api_port}/tablet/bar?pos=bar-1&token={TOKENS['bar-1']}")
    await expect(page.locator("#sessions li .name")).to_have_text(["Bruno", "Ana"], timeout=10_000)
    await expect(page.locator("#link")).to_have_text("Conectado", timeout=10_000)
    async with premises.reader("rb") as bar_reader:
        assert (await bar_reader.tap(ANA)).payload["first_name"] == "Ana"
        await expect(page.locator("#sessions li.picked .name")).to_have_text("Ana", timeout=5_000)
        await expect(page.locator("#banner")).to_have_text("Ana: pedido no bar")
        await screenshot(page, "bar-card-tap")
        await bar_reader.tap(EVA)  # no session: said on the page, the pick stays
        await expect(page.locator("#banner")).to_have_text("Nenhuma sessão aberta para este cartão")
    await expect(page.locator("#sessions li.picked .name")).to_have_text("Ana")
    await page.locator(".item[data-item='chopp']").click()
    await page.locator("#confirm").click()
    await expect(page.locator("#banner")).to_contain_text("Registrado", timeout=5_000)
    assert await premises.rows(
        "SELECT m.first_name FROM consumption c JOIN sessions s USING (session_id)"
        " JOIN members m ON m.member_id = s.member_id"
    ) == [("Ana",)]
