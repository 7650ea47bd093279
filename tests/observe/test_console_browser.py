"""The web console in a real browser: Debian's chromium, headless, driven by Playwright.

``taskstream console`` runs as its own process against RabbitMQ; the App consumes in this process. The test
loads the console, sees a queue's depth change after publishing, dead-letters an order through a handler
bug, fixes the handler, clicks Replay and sees the order handled and the dead-letter queue empty.
Screenshots go to the test's tmp dir; with ``TASKSTREAM_CONSOLE_SCREENSHOT=path`` the queues page is also
saved there (that is how ``docs/img/console.png`` is made).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskstream import App
from taskstream.brokers.base import broker_from_url
from tests.brokers.contract.backends.rabbitmq import URL
from tests.support.require import unavailable
from tests.support.waiting import wait_for
from tests.tasks.conftest import quick_settings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]


@dataclass
class Shop:
    """The App under the console: orders in, totals out (nobody reads totals, so its depth grows)."""

    app: App
    orders: str
    totals: str
    handled: list[int] = field(default_factory=list)
    fixed: bool = False


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    tag = uuid.uuid4().hex[:8]
    app = App(broker=URL, settings=quick_settings())
    state = Shop(app, f"console-orders-{tag}", f"console-totals-{tag}")

    @app.consumer(state.orders, publish_to=state.totals, max_attempts=2)
    async def total(order: dict[str, int]) -> dict[str, int]:
        if order["n"] == 13 and not state.fixed:
            raise KeyError(f"no price for order {order['n']}")
        state.handled.append(order["n"])
        return {"n": order["n"], "total": 10 * order["n"]}

    try:
        async with app:
            yield state
    finally:
        async with broker_from_url(URL) as broker:
            for name in (state.orders, f"{state.orders}.dlq", state.totals, f"{state.totals}.dlq"):
                with contextlib.suppress(Exception):
                    await broker.delete_queue(name)


@contextlib.asynccontextmanager
async def console(*args: str) -> AsyncIterator[str]:
    """``taskstream console ARGS --port 0`` as its own process; yields its URL, stops it with SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskstream.cli",
        "console",
        *args,
        "--port",
        "0",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()
        if not line.startswith("taskstream console on http://127.0.0.1:"):
            pytest.fail(f"the console did not start: {line!r} {(await process.stderr.read()).decode()}")
        yield line.split()[3]
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _out, err = await process.communicate()
        assert process.returncode == 0, err.decode()


def chromium_or_skip() -> str:
    if not Path(CHROMIUM).exists():
        unavailable(
            "Debian's chromium is not installed and could not be: bash scripts/services/chromium.sh installs it "
            "(apt-get install chromium chromium-driver, as root)"
        )
    return CHROMIUM


async def test_replay_a_dead_letter_from_the_console_after_the_fix(shop: Shop, tmp_path: Path) -> None:
    executable = chromium_or_skip()
    try:
        import playwright.async_api as playwright_api
    except ImportError:
        unavailable("playwright is not installed: pip install -e '.[dev]'")
    expect = playwright_api.expect
    shots = tmp_path / "screenshots"
    shots.mkdir()

    async with (
        console("--broker", URL, "--queue", shop.orders, "--queue", shop.totals, "--refresh", "0.5") as url,
        playwright_api.async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 560})
            await page.goto(url)
            orders_row = page.locator(f'tr[data-queue="{shop.orders}"]').first
            totals_row = page.locator(f'tr[data-queue="{shop.totals}"]').first
            await expect(orders_row.locator('[data-field="depth"]')).to_have_text("0", timeout=30_000)
            await page.screenshot(path=shots / "1-loaded.png", full_page=True)

            # a queue's depth changes after publishing: each handled order adds a total nobody reads
            for n in (1, 2):
                await shop.app.publish(shop.orders, {"n": n})
                await expect(totals_row.locator('[data-field="depth"]')).to_have_text(str(n), timeout=30_000)
            await page.screenshot(path=shots / "2-published.png", full_page=True)

            # the handler's bug dead-letters order 13 after two attempts
            await shop.app.publish(shop.orders, {"n": 13})
            dead = orders_row.locator('[data-field="dead_letter_depth"]')
            await expect(dead).to_have_text("1", timeout=60_000)
            await page.screenshot(path=shots / "3-dead-lettered.png", full_page=True)
            if target := os.environ.get("TASKSTREAM_CONSOLE_SCREENSHOT"):
                await page.screenshot(path=target, full_page=True)

            await dead.click()
            letter = page.locator("tr.letter")
            await expect(letter).to_have_count(1, timeout=30_000)
            await expect(letter.locator("td.reason")).to_contain_text("KeyError", timeout=30_000)
            await expect(letter.locator("td.reason")).to_contain_text("no price for order 13")
            await page.screenshot(path=shots / "4-dead-letters.png", full_page=True)

            # fix the handler, then Replay: the order is handled and the dead-letter queue is empty
            shop.fixed = True
            await letter.locator("button.replay").click()
            await expect(page.locator("#flash")).to_contain_text("Replayed 1 dead letter(s)", timeout=30_000)
            await wait_for(lambda: 13 in shop.handled, what="order 13 handled after the replay")
            await expect(page.locator("#dead-letter-depth")).to_have_text("0", timeout=30_000)
            await expect(page.locator("#dead-letters")).to_contain_text("No dead letters", timeout=30_000)
            await page.screenshot(path=shots / "5-replayed.png", full_page=True)

            await page.goto(url)
            await expect(orders_row.locator('[data-field="dead_letter_depth"]')).to_have_text("0", timeout=30_000)
            await expect(totals_row.locator('[data-field="depth"]')).to_have_text("3", timeout=30_000)
            await page.screenshot(path=shots / "6-after.png", full_page=True)
        finally:
            await browser.close()
    assert sorted(shop.handled) == [1, 2, 13]
    assert len(list(shots.glob("*.png"))) == 6
