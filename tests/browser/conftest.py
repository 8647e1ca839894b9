"""Browser tests: Debian's Chromium, headless, driven by Playwright (its own browser downloads are not used);
screenshots go to `.artifacts/` (or $CLUB_AGENT_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.sandboxes import sandbox_factory

__all__ = ["page", "sandbox_factory", "screenshot"]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CLUB_AGENT_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if CHROMIUM is None:
        skip = pytest.mark.skip(reason="Debian's chromium is not installed (make test-deps installs it)")
        for item in items:
            if "tests/browser/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1024, "height": 700}, locale="pt-BR")
            yield await context.new_page()
        finally:
            await browser.close()


@pytest.fixture
def screenshot() -> Callable[[Any, str], Awaitable[None]]:
    """`await screenshot(page, name)`: a PNG of the page in the artefacts directory."""

    async def take(page: Any, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    return take
