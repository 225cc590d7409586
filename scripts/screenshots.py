"""Take the README's screenshots of the softphone and the dashboard, from a real call:

    .venv/bin/python scripts/screenshots.py [--out docs]

It serves the bridge (echo engine) on a free port, places a call from the softphone in
headless Chromium (its fake microphone plays tests/audio/softphone-caller.wav), lets it
run through a reply and a barge-in, and photographs both pages mid-call."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.async_api import async_playwright
from processes import ROOT, free_port, spawn, stop

sys.path.insert(0, str(ROOT))  # the browser tests hold the one set of Chromium launch options
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

TOKEN = "screenshot-token"


async def shoot(base: str, out: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        viewport = {"width": 1280, "height": 800}
        dashboard = await browser.new_page(viewport=viewport)
        await dashboard.goto(f"{base}/dashboard")
        await dashboard.fill("#token-form input", TOKEN)
        await dashboard.click("#token-form button")
        await dashboard.locator("#feed-state[data-state='on']").wait_for()

        phone = await browser.new_page(viewport=viewport)
        await phone.goto(f"{base}/phone")
        await phone.fill("#caller", "+15557770123")
        await phone.click("#call")
        live = await phone.wait_for_function("() => softphone.state === 'live' && softphone.callSid")
        sid = await live.json_value()
        # Through two barge-ins: replies heard and cut off are both on the page.
        await phone.wait_for_function("() => softphone.clears.length >= 2", timeout=60_000)
        await phone.click("#keypad button[data-digit='1']")
        await phone.wait_for_function("() => softphone.clears.length >= 3", timeout=60_000)
        await phone.screenshot(path=out / "softphone.png")

        await dashboard.locator(f"#live-calls tr[data-sid='{sid}']").click()
        await dashboard.locator("#detail-transcript li.assistant").first.wait_for()
        await dashboard.wait_for_timeout(2500)  # a few chart points
        await dashboard.screenshot(path=out / "dashboard.png")
        await phone.click("#hangup")
        await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    records = Path(tempfile.mkdtemp(prefix="ivr-shots-")) / "calls.db"
    env = {"IVR_API_TOKEN": TOKEN, "IVR_DATABASE_PATH": str(records)}
    bridge = spawn(["serve", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        asyncio.run(shoot(base, args.out))
    finally:
        stop(bridge)
    print(f"wrote {args.out / 'softphone.png'} and {args.out / 'dashboard.png'}")


if __name__ == "__main__":
    main()
