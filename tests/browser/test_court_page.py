"""The court tablet page in Debian's Chromium (headless, driven by Playwright), against a real agent on loopback:
a check-in by member code, and a tap on a reader appearing on the page. Screenshots go to `.artifacts/`."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ANA, Premises, PremisesFactory

Shot = Callable[[Any, str], Awaitable[None]]
TOKEN = "tok-court-c1-0123456789"


@pytest.fixture
async def court(premises_factory: PremisesFactory, tmp_path: Path) -> Premises:
    secrets = tmp_path / "api-secrets.toml"
    secrets.write_text(f'api_tokens = {{ court-c1 = "{TOKEN}" }}\n')
    secrets.chmod(0o600)
    clients = [{"name": "court-c1", "role": "court", "courts": ["c1"]}]
    premises: Premises = await premises_factory(api={"clients": clients}, agent={"secrets_file": str(secrets)})
    return premises


async def test_check_in_by_member_code_and_a_reader_tap_show_on_the_court_page(
    court: Premises, page: Any, screenshot: Shot
) -> None:
    from playwright.async_api import expect

    await page.goto(f"http://127.0.0.1:{court.agent.api_port}/tablet/court?court=c1&token={TOKEN}")
    await expect(page.locator("#link")).to_have_text("Conectado", timeout=10_000)
    await expect(page.locator("#court-name")).to_have_text("Quadra 1")
    assert "token" not in page.url  # the token went to the tablet's storage, out of the address bar

    for digit in "1002":  # Bruno has no card with him: member code on the keypad
        await page.locator(".key", has_text=digit).click()
    await page.locator("#checkin").click()
    await expect(page.locator("#banner")).to_contain_text("Bem-vindo, Bruno", timeout=5_000)
    await expect(page.locator("#players li .name")).to_have_text(["Bruno"], timeout=5_000)
    await screenshot(page, "court-checkin-by-code")
    assert await court.rows("SELECT member_id FROM sessions WHERE ended_at IS NULL") == [("m-bruno",)]

    async with court.reader("r1") as reader:
        reply = await reader.tap(ANA)
        answered = time.perf_counter()
    assert reply.payload["status"] == "granted"
    await expect(page.locator("#banner")).to_contain_text("Bem-vindo, Ana!", timeout=5_000)
    shown_ms = (time.perf_counter() - answered) * 1000
    await expect(page.locator("#players li .name")).to_have_text(["Bruno", "Ana"], timeout=5_000)
    await expect(page.locator("#players li .credits")).to_have_text(["", "1 crédito"])
    # timers run on the agent's clock (here the test's, months away from the browser's): minutes, not months
    timer = await page.locator("#players li .timer").first.text_content()
    assert timer is not None
    assert len(timer) == 5, timer
    await screenshot(page, "court-reader-tap")
    print(f"reader answered -> banner on the page: {shown_ms:.0f} ms")
    assert shown_ms < 500  # the issue asks for 100 ms; measured ~10 ms, with room for a loaded CI machine


async def test_the_page_speaks_english_when_asked(court: Premises, page: Any) -> None:
    from playwright.async_api import expect

    await page.goto(f"http://127.0.0.1:{court.agent.api_port}/tablet/court?court=c1&lang=en&token={TOKEN}")
    await expect(page.locator("#link")).to_have_text("Connected", timeout=10_000)
    await expect(page.locator("#checkin")).to_have_text("Check in")
    await expect(page.locator("#players li")).to_have_text(["Court free"])
