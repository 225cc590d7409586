"""The softphone and the dashboard in a real browser: Debian's Chromium driven by
Playwright, against the real app under uvicorn on loopback.

Chromium's fake microphone plays `tests/audio/softphone-caller.wav` in a loop: 1.2 s of
speech, 2.3 s of silence, 1.2 s of speech, 1.3 s of silence. The echo engine answers each
utterance 600 ms after it ends; the first answer plays out whole, the second is still
playing when the loop's next speech begins, so every loop has a reply heard to the end
and a barge-in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeout

from ivr_bridge.audio.g711 import ULAW_TO_PCM, ulaw_encode
from ivr_bridge.call import Outcome
from ivr_bridge.settings import Settings
from tests.conftest import RunningBridge
from tests.support import eventually
from tests.test_provider_contract import NETWORKED, upstream

CALLER_WAV = Path(__file__).parent / "audio" / "softphone-caller.wav"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_TOKEN = "dashboard-test-token"
WAIT_S = 30.0  # generous: a loaded 2-core machine runs Chromium, uvicorn and the tests
# As the machine's notes advise: no background connections (the network is closed),
# and a fake microphone and camera that need no permission prompt.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={CALLER_WAV}",
    "--autoplay-policy=no-user-gesture-required",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: scripts/test installs it (apt-get install chromium) as root")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


async def open_page(browser: Browser, url: str) -> Page:
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors  # type: ignore[attr-defined]
    await page.goto(url)
    return page


async def until(page: Page, script: str, what: str, timeout: float = WAIT_S) -> Any:
    """Wait for `script` (a JS expression over the page's state) to be truthy; its value."""
    try:
        handle = await page.wait_for_function(f"() => {script}", timeout=timeout * 1000)
    except PlaywrightTimeout:
        state = await page.evaluate("JSON.stringify(window.softphone ?? {}).slice(0, 2000)")
        raise AssertionError(f"not within {timeout:g} s: {what}; page state {state}") from None
    return await handle.json_value()


async def record(bridge: RunningBridge, call_sid: str) -> dict[str, Any]:
    """The call's stored record, once its call.ended is on it."""
    headers = {"authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(base_url=bridge.base_url, headers=headers) as client:
        body: dict[str, Any] = {}

        async def stored() -> bool:
            nonlocal body
            answer = await client.get(f"/calls/{call_sid}")
            body = answer.json()
            return answer.status_code == 200 and not body["active"] and body.get("outcome") != "in_progress"

        await eventually(stored, WAIT_S, f"{call_sid} on record")
        return body


def replies(marks: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The page's marks grouped by reply: marks that arrived together (within 100 ms)."""
    groups: list[list[dict[str, Any]]] = []
    for mark in sorted(marks, key=lambda m: m["receivedAt"]):
        if groups and mark["receivedAt"] - groups[-1][-1]["receivedAt"] < 100:
            groups[-1].append(mark)
        else:
            groups.append([mark])
    return groups


async def test_softphone_talks_to_the_echo_engine_with_marks_after_playback_and_barge_in(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    bridge = make_bridge(Settings(provider="echo", api_token=API_TOKEN))
    page = await open_page(browser, f"{bridge.base_url}/phone")
    await page.fill("#caller", "Alice")
    await page.click("#call")
    await until(page, "softphone.state === 'live'", "the call is up")
    # A reply heard to its end (every mark echoed as played), then a barge-in that
    # cleared audio still queued in the page.
    await until(
        page,
        "softphone.clears.some(c => c.droppedMs > 0)"
        " && softphone.marks.filter(m => !m.cleared && m.echoedAt).length >= 3",
        "a reply played out and a barge-in",
    )
    state = await page.evaluate("softphone")
    call_sid = state["callSid"]
    await page.click("#hangup")
    await until(page, "softphone.state === 'ended'", "the page hung up")

    # Marks were echoed as their audio played, not as they arrived: a reply's marks come
    # in together, and go back one 200 ms chunk apart.
    played = [group for group in replies(state["marks"]) if not any(m["cleared"] for m in group)]
    assert played, state["marks"]
    reply = played[0]
    assert len(reply) >= 3, reply
    arrived = reply[-1]["receivedAt"] - reply[0]["receivedAt"]
    echoed = reply[-1]["echoedAt"] - reply[0]["echoedAt"]
    assert echoed >= 0.75 * 200 * (len(reply) - 1), reply
    assert arrived < echoed / 2, reply
    for mark in reply:
        assert mark["echoedAt"] - mark["receivedAt"] >= 150, mark  # none before its chunk played

    # The clear flushed the page's buffer and returned its pending marks at once.
    clear = next(c for c in state["clears"] if c["droppedMs"] > 0)
    cleared = [m for m in state["marks"] if m["name"] in clear["marks"]]
    assert cleared, clear
    assert all(m["cleared"] and m["echoedAt"] - clear["at"] < 100 for m in cleared), (clear, cleared)

    # The bridge heard the caller, played replies and saw the barge-in.
    stored = await record(bridge, call_sid)
    assert stored["from_number"] == "Alice"
    assert stored["outcome"] == Outcome.STREAM_STOPPED  # the page hung up as Twilio does
    assert stored["barge_ins"] >= 1
    types = [e["type"] for e in stored["events"]]
    assert "barge_in" in types
    lines = [e["data"] for e in stored["events"] if e["type"] == "transcript"]
    assert any(line["role"] == "user" for line in lines)
    heard = [line for line in lines if line["role"] == "assistant" and not line["interrupted"]]
    assert heard and heard[0]["heard_ms"] >= 600, lines
    ended = next(e["data"] for e in stored["events"] if e["type"] == "call.ended")
    assert ended["frames_in"] >= 100 and ended["bad_frames"] == 0 and ended["sequence_gaps"] == 0
    # The page showed it: caller lines, bot lines and the cut-off one.
    assert await page.locator("#transcript li.user").count() >= 1
    assert await page.locator("#transcript li.assistant del").count() >= 1
    assert not page.errors, page.errors  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", NETWORKED)
async def test_the_softphone_works_with_every_voice_api(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser, name: str
) -> None:
    """Through each provider's stand-in: mu-law passed through (OpenAI, ElevenLabs) or
    converted (NextEVI, NavTalk), the page hears a whole reply and its marks go back."""
    async with upstream(name, reply_ms=800) as (settings, _):
        bridge = make_bridge(Settings(**{**settings.__dict__, "api_token": API_TOKEN}))
        page = await open_page(browser, f"{bridge.base_url}/phone")
        await page.click("#call")
        await until(
            page,
            "softphone.audioReceivedMs >= 780 && softphone.marks.some(m => m.echoedAt && !m.cleared)",
            "a reply heard",
        )
        call_sid = await page.evaluate("softphone.callSid")
        await page.click("#hangup")
        stored = await record(bridge, call_sid)
    assert stored["provider"] == name
    replies = [
        e["data"] for e in stored["events"] if e["type"] == "transcript" and e["data"]["role"] == "assistant"
    ]
    assert any(reply["heard_ms"] > 0 for reply in replies), replies
    assert not page.errors, page.errors  # type: ignore[attr-defined]


async def test_a_key_on_the_keypad_reaches_the_bridge_and_a_mapped_key_transfers(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    bridge = make_bridge(
        Settings(provider="echo", api_token=API_TOKEN, dtmf_map=(("5", "transfer:+15550100"),))
    )
    page = await open_page(browser, f"{bridge.base_url}/phone")
    await page.click("#call")
    await until(page, "softphone.state === 'live' && softphone.framesSent > 10", "the call is up")
    await page.click("#keypad button[data-digit='2']")  # not mapped: only heard
    await page.click("#keypad button[data-digit='5']")
    await until(page, "softphone.state === 'ended'", "the transfer ended the softphone's call")
    await until(page, "softphone.events.some(e => e.type === 'control')", "the control event")
    assert await page.evaluate("softphone.closeCode") == 1000
    await page.get_by_text("Transferred to +15550100").wait_for()

    call_sid = await page.evaluate("softphone.callSid")
    stored = await record(bridge, call_sid)
    assert stored["outcome"] == Outcome.TRANSFERRED
    assert stored["transfer_to"] == "+15550100"
    keys = [e["data"] for e in stored["events"] if e["type"] == "dtmf"]
    assert [(k["digit"], k["action"]) for k in keys] == [("2", ""), ("5", "transfer:+15550100")]
    control = next(e["data"] for e in stored["events"] if e["type"] == "control")
    assert (control["action"], control["source"], control["result"]) == ("transfer", "dtmf", "done")


async def sign_in(page: Page, token: str) -> None:
    await page.fill("#token-form input", token)
    await page.click("#token-form button")


async def test_dashboard_shows_a_live_call_its_transcript_hangs_it_up_and_finds_it_in_history(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    bridge = make_bridge(Settings(provider="echo", api_token=API_TOKEN))
    # The link `ivr-bridge serve` prints in development mode: the token in the fragment.
    dashboard = await open_page(browser, f"{bridge.base_url}/dashboard#token={API_TOKEN}")
    await dashboard.locator("#feed-state[data-state='on']").wait_for()
    assert dashboard.url == f"{bridge.base_url}/dashboard"  # out of the address bar (and history)

    phone = await open_page(browser, f"{bridge.base_url}/phone")
    await phone.fill("#caller", "+15557770123")
    await phone.click("#call")
    call_sid = await until(phone, "softphone.state === 'live' && softphone.callSid", "the call is up")

    row = dashboard.locator(f"#live-calls tr[data-sid='{call_sid}']")
    await row.wait_for()
    assert "+15557770123" in await row.inner_text()
    assert "softphone" in await row.inner_text()
    await row.click()
    await dashboard.locator("#detail-actions").wait_for()
    # The transcript grows as the call goes on, fed by the event stream.
    lines = dashboard.locator("#detail-transcript li")
    await lines.first.wait_for()
    first = await lines.count()
    await dashboard.wait_for_function(
        f"() => document.querySelectorAll('#detail-transcript li').length > {first}", timeout=WAIT_S * 1000
    )
    await dashboard.locator("#detail-transcript li.assistant").first.wait_for()
    assert int(await dashboard.inner_text("#active")) == 1

    await dashboard.click("#hangup")
    await dashboard.get_by_text("hangup: done").wait_for()
    await until(phone, "softphone.state === 'ended'", "the softphone's call ended")
    stored = await record(bridge, call_sid)
    assert stored["outcome"] == Outcome.HUNG_UP
    await row.locator(".state.ended").wait_for()

    await dashboard.fill("#search input[name=number]", "777012")
    await dashboard.click("#search button[type=submit]")
    found = dashboard.locator(f"#history tr[data-sid='{call_sid}']")
    await found.wait_for()
    assert "hung up" in await found.inner_text()
    await found.click()  # the full record, from the records
    await dashboard.locator("#detail-transcript li", has_text="Ended: hung up").wait_for()
    assert await dashboard.locator("#detail-transcript li.user").count() >= 1
    async with dashboard.expect_download() as download:
        await dashboard.click("#export")
    exported = Path(await (await download.value).path()).read_text().splitlines()
    assert [json.loads(line)["call_sid"] for line in exported] == [call_sid]
    await dashboard.select_option("#outcomes", "transferred")
    await dashboard.click("#search button[type=submit]")
    await dashboard.get_by_text("No calls match").wait_for()
    assert not dashboard.errors, dashboard.errors  # type: ignore[attr-defined]


async def test_the_dashboards_transfer_button_transfers_a_call(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    bridge = make_bridge(Settings(provider="echo", api_token=API_TOKEN))
    dashboard = await open_page(browser, f"{bridge.base_url}/dashboard#token={API_TOKEN}")
    phone = await open_page(browser, f"{bridge.base_url}/phone")
    await phone.click("#call")
    call_sid = await until(phone, "softphone.state === 'live' && softphone.callSid", "the call is up")
    await dashboard.locator(f"#live-calls tr[data-sid='{call_sid}']").click()
    await dashboard.fill("#transfer-to", "+15550199")
    await dashboard.click("#transfer")
    await dashboard.get_by_text("transfer: done").wait_for()
    await phone.get_by_text("Transferred to +15550199").wait_for()
    stored = await record(bridge, call_sid)
    assert (stored["outcome"], stored["transfer_to"]) == (Outcome.TRANSFERRED, "+15550199")


async def test_the_dashboard_shows_emotions_where_the_provider_gives_them(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    async with upstream("nextevi", reply_ms=800) as (settings, _):
        bridge = make_bridge(Settings(**{**settings.__dict__, "api_token": API_TOKEN}))
        dashboard = await open_page(browser, f"{bridge.base_url}/dashboard#token={API_TOKEN}")
        phone = await open_page(browser, f"{bridge.base_url}/phone")
        await phone.click("#call")
        call_sid = await until(phone, "softphone.state === 'live' && softphone.callSid", "the call is up")
        await dashboard.locator(f"#live-calls tr[data-sid='{call_sid}']").click()
        emotion = dashboard.locator("#detail-transcript li.emotion").first
        await emotion.wait_for(timeout=WAIT_S * 1000)
        assert "%" in await emotion.inner_text()  # names with their scores
        await phone.click("#hangup")
        await record(bridge, call_sid)


async def test_without_the_token_the_dashboard_and_the_protected_softphone_refuse(
    make_bridge: Callable[[Settings], RunningBridge], browser: Browser
) -> None:
    bridge = make_bridge(
        Settings(provider="echo", api_token=API_TOKEN, twilio_auth_token="twilio-auth-token-for-tests")
    )
    async with httpx.AsyncClient(base_url=bridge.base_url) as client:
        for method, path in [
            ("GET", "/dashboard/feed"),
            ("GET", "/records"),
            ("GET", "/records/export"),
            ("POST", "/phone/calls"),
            ("GET", "/phone/calls/CA0123/events"),
        ]:
            answer = await client.request(method, path)
            assert answer.status_code == 401, (path, answer.text)
            wrong = await client.request(method, path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        # A stream without the per-call token is refused before a call exists.
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(bridge.base_url.replace("http", "ws") + "/phone/stream?call=CA01")
        placed = await client.post("/phone/calls", headers={"authorization": f"Bearer {API_TOKEN}"}, json={})
        assert placed.status_code == 200
        # ... and with one minted for another call.
        other = placed.json()["stream_path"].replace(placed.json()["call_sid"], "CA" + "0" * 32)
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(bridge.base_url.replace("http", "ws") + other)
    assert not bridge.finished

    dashboard = await open_page(browser, f"{bridge.base_url}/dashboard")
    await dashboard.locator("#token-form").wait_for()
    assert await dashboard.locator("#board").is_hidden()
    await sign_in(dashboard, "not-the-token")
    await dashboard.locator("#token-form .message", has_text="Refused").wait_for()
    assert await dashboard.locator("#board").is_hidden()
    await sign_in(dashboard, API_TOKEN)
    await dashboard.locator("#board").wait_for()

    # The protected softphone asks for the token, then calls with the per-call stream token.
    phone = await open_page(browser, f"{bridge.base_url}/phone")
    await phone.click("#call")
    await phone.locator("#token-form").wait_for()
    assert await phone.evaluate("softphone.state") == "idle"
    await sign_in(phone, API_TOKEN)
    await until(phone, "softphone.state === 'live' && softphone.audioReceivedMs > 0", "a protected call")
    await phone.click("#hangup")
    await eventually(lambda: len(bridge.finished) == 1, WAIT_S, "the call ended")
    assert bridge.finished[0].outcome == Outcome.STREAM_STOPPED


async def test_the_pages_audio_code_filters_aliases_and_codes_mu_law_as_the_bridge_does(
    echo_bridge: RunningBridge, browser: Browser
) -> None:
    page = await open_page(browser, f"{echo_bridge.base_url}/phone")
    table = await page.evaluate("async () => Array.from((await import('/ui/g711.js')).MULAW_TO_PCM)")
    assert table == [int(v) for v in ULAW_TO_PCM]
    codes = await page.evaluate(
        """async () => {
          const { encodeSample } = await import('/ui/g711.js');
          return [-32768, -1000, -1, 0, 1, 1000, 32767].map(encodeSample);
        }"""
    )
    expected = ulaw_encode(np.array([-32768, -1000, -1, 0, 1, 1000, 32767], dtype=np.int16))
    assert bytes(codes) == bytes(expected)
    # Tones through the capture resampler (48 kHz to 8 kHz) and the playback one (back):
    # the telephone band passes, what would alias is gone.
    levels = await page.evaluate(
        """async () => {
          const { Resampler } = await import('/ui/resampler.js');
          const gain = (inRate, outRate, hz) => {
            const r = new Resampler(inRate, outRate);
            const out = [];
            for (let block = 0; block < inRate / 128; block++) {
              const x = new Float32Array(128);
              for (let i = 0; i < 128; i++) {
                x[i] = 0.5 * Math.sin(2 * Math.PI * hz * (block * 128 + i) / inRate);
              }
              out.push(...r.process(x));
            }
            const tail = out.slice(out.length / 4);
            const rms = Math.sqrt(tail.reduce((s, v) => s + v * v, 0) / tail.length);
            return 20 * Math.log10(rms / (0.5 / Math.SQRT2));
          };
          return {
            down: [300, 1000, 3000, 4500, 6000, 12000].map(hz => gain(48000, 8000, hz)),
            down441: [1000, 5000].map(hz => gain(44100, 8000, hz)),
            up: [300, 1000, 3000].map(hz => gain(8000, 48000, hz)),
          };
        }"""
    )
    for db in (*levels["down"][:3], levels["down441"][0], *levels["up"]):
        assert abs(db) < 0.5, levels
    for db in (*levels["down"][3:], levels["down441"][1]):
        assert db < -60, levels
