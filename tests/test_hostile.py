"""Hostile networks: unauthenticated requests cost nothing and hurt no call.

Over real sockets against the real app under the production uvicorn configuration:
oversized and over-long webhooks, silent and trickling connections, floods of unproven
connections and idle Media Streams, replayed webhooks and streams, floods of every frame
type, a caller that stops reading, and counters that would overflow a metric.
"""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from base64 import b64encode

import httpx
import pytest
from websockets.asyncio.client import connect

from ivr_bridge.connections import Unproven
from ivr_bridge.loadgen.webhook import CallDetails, StreamTarget, fetch_stream, sign, stream_headers
from ivr_bridge.media_stream import MAX_COUNTER, MediaStream, MediaStreamError
from ivr_bridge.security import TOKEN_PARAMETER
from ivr_bridge.settings import Settings
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually, stream_caller
from tests.test_end_to_end import tone_ulaw

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
SID = "CA" + "7" * 32
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


def production(**overrides: object) -> Settings:
    return Settings(provider="echo", twilio_auth_token=AUTH_TOKEN, **overrides)  # type: ignore[arg-type]


async def raw_request(port: int, head: bytes, body: bytes = b"", read_timeout: float = 15.0) -> bytes:
    """Send `head` (and `body`) on a fresh connection; the whole answer until the server closes
    or `read_timeout` passes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    answer = b""
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"connection: close" in answer.lower():
                    break
    finally:
        writer.close()
    return answer


def port_of(bridge) -> int:
    return int(bridge.base_url.rsplit(":", 1)[1])


async def healthz_ms(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        started = time.perf_counter()
        assert (await client.get("/healthz")).status_code == 200
        return (time.perf_counter() - started) * 1000


# -- admission before cost: the webhook -----------------------------------------------------


async def test_a_huge_declared_body_is_refused_before_it_is_sent(make_bridge) -> None:
    bridge = make_bridge(production())
    head = (
        b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"X-Twilio-Signature: bogus\r\nContent-Length: 268435456\r\n\r\n"
    )
    # 256 MB announced, 1 KB sent: the answer comes without the rest ever being read.
    answer = await raw_request(port_of(bridge), head, b"a=1&" * 256)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert bridge.server is not None
    assert bridge.server.app.state.unproven.closed["too_large"] == 1


async def test_a_chunked_body_is_cut_off_at_the_limit(make_bridge) -> None:
    bridge = make_bridge(production())
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(bridge))
    writer.write(b"POST /twiml HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"a=" + b"1" * 8190
    answer = b""
    for _ in range(64):  # up to 512 KB, but the answer comes after the first 32 KB
        try:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            async with asyncio.timeout(0.05):
                answer += await reader.read(1024)
        except TimeoutError:
            continue
        except ConnectionError:
            answer += await reader.read(1024)
        if answer:
            break
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]


async def test_too_many_fields_or_too_long_a_query_are_refused(make_bridge) -> None:
    bridge = make_bridge(production())
    async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
        fields = await client.post(
            "/twiml", content="&".join(["a=1"] * 300), headers={"X-Twilio-Signature": "x"}
        )
        query = await client.get("/twiml?" + "a" * 40_000, headers={"X-Twilio-Signature": "x"})
        ok = await client.get("/healthz")
    assert fields.status_code == 413 and query.status_code == 414 and ok.status_code == 200


async def test_a_large_form_does_not_stall_a_live_call(make_bridge) -> None:
    """The attack that froze every call for 7-8 s: a 9 MB form of a million fields. It is
    refused on its Content-Length; a live call's audio keeps flowing meanwhile."""
    bridge = make_bridge(Settings(provider="echo"))
    body = b"&".join(b"f%d=1" % i for i in range(1_000_000))
    assert len(body) > 8_000_000
    head = b"POST /twiml HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: x\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
        answers = await asyncio.gather(*(raw_request(port_of(bridge), head, body[:65536]) for _ in range(3)))
        await caller.say(tone_ulaw(400))
        await caller.wait_for(lambda: caller.received_total >= 8 * 300, timeout=15)
        await caller.hang_up()
    assert all(a.startswith(b"HTTP/1.1 413") for a in answers), answers
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped" and call.stream.sequence_gaps == 0


# -- connection hygiene ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["silent", "trickling headers", "trickling body"])
async def test_incomplete_requests_are_closed_after_the_request_timeout(make_bridge, case: str) -> None:
    bridge = make_bridge(production(request_timeout_s=1.0))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(bridge))
    started = time.monotonic()
    if case == "trickling body":
        writer.write(b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    trickle = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 if case != "silent" else b""
    answer = b""

    async def trickle_on() -> None:
        for byte in trickle or b"":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(trickle_on())
    try:
        async with asyncio.timeout(20):
            while chunk := await reader.read(1024):
                answer += chunk
    finally:
        sender.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    # Closed by the server, well before a trickler of 100 bytes at 10/s would have finished.
    assert elapsed < 8, elapsed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert bridge.server is not None
    await eventually(lambda: bridge.server.app.state.unproven.closed["request_timeout"] == 1, 5)


async def test_a_flood_of_idle_connections_cannot_keep_twilio_out(make_bridge) -> None:
    bridge = make_bridge(production(max_pending_connections=8, request_timeout_s=60))
    idle = [await asyncio.open_connection("127.0.0.1", port_of(bridge)) for _ in range(40)]
    try:
        # Twilio's webhook still gets through: room is made by closing the oldest idle ones.
        target = await fetch_stream(bridge.base_url + "/twiml", CallDetails(call_sid=SID), AUTH_TOKEN)
        assert TOKEN_PARAMETER in target.parameters
        closed = 0
        for reader, _ in idle:
            try:
                async with asyncio.timeout(0.5):
                    closed += await reader.read(1) == b""
            except TimeoutError:
                pass
        assert closed >= 40 - 8
        async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
            metrics = (await client.get("/metrics")).text
        assert 'ivr_connections_closed_total{reason="evicted"}' in metrics
    finally:
        for _, writer in idle:
            writer.close()


# -- admission before cost: the stream -------------------------------------------------------


async def open_idle_stream(bridge, headers: dict[str, str]):
    """A Media Stream with a valid upgrade signature that never sends `start`."""
    return await connect(bridge.stream_url, additional_headers=headers, compression=None)


async def test_idle_upgrades_hold_no_capacity_and_are_closed(make_bridge) -> None:
    bridge = make_bridge(production(max_calls=2, start_timeout_s=2.0))
    upgrade = stream_headers(StreamTarget(bridge.stream_url, {}), AUTH_TOKEN)
    # One captured upgrade header opens any number of sockets: none of them is a call.
    idle = [await open_idle_stream(bridge, upgrade) for _ in range(10)]
    try:
        for n in range(2):  # every real caller is admitted meanwhile
            sid = f"CA{n:032d}"
            target = await fetch_stream(bridge.base_url + "/twiml", CallDetails(call_sid=sid), AUTH_TOKEN)
            async with stream_caller(target, sid, AUTH_TOKEN) as caller:
                await caller.say(tone_ulaw(300))
                await caller.wait_for(lambda c=caller: c.received_total > 0, timeout=15)
                await caller.hang_up()
        for ws in idle:  # and the idle sockets are closed after IVR_START_TIMEOUT_S
            await asyncio.wait_for(ws.wait_closed(), 15)
            assert ws.close_code == 1008
    finally:
        for ws in idle:
            await ws.close()
    outcomes = sorted(str(c.outcome) for c in await bridge.wait_for_calls(12))
    assert outcomes == ["no_start"] * 10 + ["stream_stopped"] * 2


async def test_a_replayed_webhook_gets_no_second_stream(make_bridge) -> None:
    bridge = make_bridge(production())
    webhook = bridge.base_url + "/twiml"
    first = await fetch_stream(webhook, CallDetails(call_sid=SID), AUTH_TOKEN)
    early_replay = await fetch_stream(webhook, CallDetails(call_sid=SID), AUTH_TOKEN)
    async with stream_caller(first, SID, AUTH_TOKEN) as caller:
        await eventually(lambda: SID in bridge.server.app.state.calls_by_sid, 10)
        # Replayed while the call streams: the fallback, not a token.
        form = CallDetails(call_sid=SID).form()
        async with httpx.AsyncClient(timeout=15) as client:
            replay = await client.post(
                webhook, data=form, headers={"X-Twilio-Signature": sign(AUTH_TOKEN, webhook, form)}
            )
        assert (
            replay.status_code == 200 and "<Stream" not in replay.text and TOKEN_PARAMETER not in replay.text
        )
        # A token minted by a replay before the stream began opens no second stream.
        async with stream_caller(early_replay, SID, AUTH_TOKEN, continuous=False) as second:
            await second.wait_closed(15)
            assert second.close_code == 1008
        await caller.say(tone_ulaw(300))
        await caller.wait_for(lambda: caller.received_total > 0, timeout=15)
        await caller.hang_up()
    outcomes = sorted(str(c.outcome) for c in await bridge.wait_for_calls(2))
    assert outcomes == ["refused", "stream_stopped"]


# -- floods of any frame type -----------------------------------------------------------------


def start_frame(sid: str = SID, **start: object) -> str:
    body = {"streamSid": "MZ1", "callSid": sid, "accountSid": "AC1", "mediaFormat": MEDIA_FORMAT} | start
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": body})


@pytest.mark.parametrize("kind", ["before start", "mark echoes"])
async def test_floods_of_large_frames_end_the_stream(make_bridge, kind: str) -> None:
    bridge = make_bridge(Settings(provider="echo"))
    big = "x" * 60_000
    async with connect(bridge.stream_url, compression=None, max_size=None) as ws:
        if kind == "mark echoes":
            await ws.send(start_frame())
            frame = json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": big}})
        else:
            frame = json.dumps({"event": "connected", "protocol": big})
        for _ in range(200):  # 12 MB at full speed
            try:
                await ws.send(frame)
            except Exception:
                break
        await asyncio.wait_for(ws.wait_closed(), 15)
    assert ws.close_code == 1008
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "flooded"


def test_every_frame_type_counts_against_the_byte_budget() -> None:
    now = [0.0]
    stream = MediaStream(clock=lambda: now[0])
    junk = json.dumps({"event": "connected", "protocol": "x" * 60_000})
    with pytest.raises(MediaStreamError) as raised:
        for _ in range(20):
            stream.receive(junk)
    assert raised.value.kind == "flood" and raised.value.fatal
    # Real Twilio traffic (a media frame every 20 ms, an echo for each mark sent) never trips it.
    stream = MediaStream(clock=lambda: now[0])
    stream.receive(start_frame())
    payload = b64encode(b"\xff" * 160).decode()
    for n in range(3000):  # a minute
        now[0] = n * 0.02
        stream.receive(json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": payload}}))
        if n % 10 == 0:
            stream.mark(f"m{n}")
            stream.receive(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": f"m{n}"}}))


@pytest.mark.parametrize("value", [1e308, "1e308", -1, 2**31, "99999999999", 1.5, True, "١٢"])
def test_peer_counters_are_bounded_integers(value: object) -> None:
    stream = MediaStream(clock=None)
    stream.receive(start_frame())
    payload = b64encode(b"\xff" * 160).decode()
    frame = {"event": "media", "sequenceNumber": value, "streamSid": "MZ1", "media": {"payload": payload}}
    with pytest.raises(MediaStreamError):
        stream.receive(json.dumps(frame))
    assert stream.sequence_gaps == 0
    frame["sequenceNumber"] = str(MAX_COUNTER)
    stream.receive(json.dumps(frame))


async def test_metrics_survive_a_huge_sequence_number(make_bridge) -> None:
    bridge = make_bridge(Settings(provider="echo"))
    payload = b64encode(b"\xff" * 160).decode()
    async with connect(bridge.stream_url, compression=None) as ws:
        await ws.send(start_frame())
        for seq in (1e308, 2, 3):
            await ws.send(
                json.dumps(
                    {
                        "event": "media",
                        "sequenceNumber": seq,
                        "streamSid": "MZ1",
                        "media": {"payload": payload},
                    }
                )
            )
        await ws.send(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": SID}}))
        await asyncio.wait_for(ws.wait_closed(), 15)
    [call] = await bridge.wait_for_calls(1)
    async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
        scrapes = [await client.get("/metrics") for _ in range(2)]
    assert [s.status_code for s in scrapes] == [200, 200]
    assert call.stats.bad_frames == 1 and call.stream.sequence_gaps == 0


@pytest.mark.parametrize("sid", ["CA1?x=1", "CA1&Status=completed", "CA1/../../Accounts", "CA\n1", "C" * 65])
def test_a_malformed_call_sid_cannot_start_a_stream(sid: str) -> None:
    stream = MediaStream(clock=None)
    with pytest.raises(MediaStreamError) as raised:
        stream.receive(start_frame(sid))
    assert raised.value.kind == "bad_start" and raised.value.fatal


# -- a caller that stops reading ---------------------------------------------------------------


async def test_a_caller_that_stops_reading_ends_as_stalled(make_bridge) -> None:
    """Kernel buffers absorb megabytes, so every send succeeds: the late marks show it."""
    bridge = make_bridge(Settings(provider="echo", twilio_send_timeout_s=1.0, idle_timeout_s=120))
    payload_frames = [
        json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": b64encode(chunk).decode()}})
        for chunk in (
            (tone_ulaw(800, hz=500) + b"\xff" * 8 * 1000)[i : i + 160] for i in range(0, 8 * 1800, 160)
        )
    ]
    async with connect(bridge.stream_url, compression=None) as ws:
        await ws.send(start_frame())
        ws.transport.pause_reading()  # this caller reads nothing more, and echoes no marks
        next_at = time.monotonic()
        for frame in payload_frames:  # the caller talks in real time: the echo replies
            await ws.send(frame)
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        silence = payload_frames[-1]
        [call] = [None]

        async def keep_talking() -> None:
            nonlocal next_at
            while True:
                await ws.send(silence)
                next_at += 0.02
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

        talker = asyncio.create_task(keep_talking())
        try:
            [call] = await bridge.wait_for_calls(1, timeout=30)
        finally:
            talker.cancel()
    assert call.outcome == "twilio_stalled"
    assert call.stats.frames_out > 0


# -- the bookkeeping ---------------------------------------------------------------------------


def test_unproven_evicts_the_oldest_and_counts() -> None:
    closed: list[int] = []
    unproven = Unproven(3)
    for n in range(5):
        unproven.add(n, lambda n=n: closed.append(n))
    assert closed == [0, 1] and len(unproven) == 3 and unproven.closed["evicted"] == 2
    unproven.discard(2)
    unproven.add(5, lambda: closed.append(5))
    assert closed == [0, 1] and 2 not in unproven


def test_twiml_carries_no_control_characters() -> None:
    from ivr_bridge.app import twiml_for_call

    xml = twiml_for_call(
        Settings(), {"CallSid": SID, "From": "+1555\x01\x1b[31m\x00", "To": "+1\u0085555\x7f"}, "tok"
    )
    stream = ET.fromstring(xml).find("./Connect/Stream")
    assert stream is not None
    values = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert values["From"] == "+1555[31m" and values["To"] == "+1555"


# -- capacity: the slot of an ended call is free at once, and a webhook holds one ------------


def test_a_webhook_holds_a_slot_until_its_stream_starts() -> None:
    from ivr_bridge.capacity import Capacity

    now = [0.0]
    capacity = Capacity(2, hold_s=10, clock=lambda: now[0])
    assert capacity.reserve("CA1", active=0) and capacity.reserve("CA2", active=0)
    assert not capacity.reserve("CA3", active=0)  # both slots held for their streams
    assert capacity.reserve("CA1", active=0)  # a retried webhook keeps its hold
    assert capacity.take("CA1", active=0)  # CA1's stream starts on its reservation
    assert not capacity.take("CA9", active=1)  # a stream no webhook announced: no free slot
    now[0] = 10.5  # CA2's stream never came: its hold lapses
    assert capacity.free(active=1) == 1 and capacity.take("CA9", active=1)


async def test_a_caller_ringing_as_another_hangs_up_gets_the_slot(make_bridge) -> None:
    bridge = make_bridge(Settings(provider="echo", max_calls=1))
    webhook = bridge.base_url + "/twiml"
    async with TwilioCaller(bridge.stream_url, continuous=True) as first:
        await eventually(lambda: len(bridge.server.app.state.active_calls) == 1, 15)
        async with httpx.AsyncClient(timeout=15) as client:
            ringing = asyncio.create_task(client.post(webhook, data={"CallSid": "CA2"}))
            # The webhook is being handled (at capacity: waiting) when the first caller hangs
            # up: the server runs a task for it beside the call's own.
            await eventually(lambda: len(bridge.server.server_state.tasks) >= 2, 15)
            assert not ringing.done()
            await first.hang_up()
            answer = await ringing
    assert "<Stream" in answer.text  # it waited for the slot (IVR_MAX_CALLS=1), no apology
    async with httpx.AsyncClient(timeout=15) as client:
        # The slot is held for CA2's stream: a third caller gets the fallback.
        third = await client.post(webhook, data={"CallSid": "CA3"})
    assert "<Stream" not in third.text
    async with TwilioCaller(bridge.stream_url, call_sid="CA2", continuous=True) as second:
        await second.say(tone_ulaw(300))
        await second.wait_for(lambda: second.received_total > 0, timeout=15)
        await second.hang_up()
    outcomes = [str(c.outcome) for c in await bridge.wait_for_calls(2)]
    assert outcomes == ["stream_stopped", "stream_stopped"]


def test_the_load_tester_names_a_refusal_at_capacity() -> None:
    from ivr_bridge.fallback import fallback_twiml
    from ivr_bridge.loadgen.histogram import histogram_page
    from ivr_bridge.loadgen.webhook import RefusedError, parse_twiml

    with pytest.raises(RefusedError, match=r"refused: .*fallback TwiML <Say><Hangup>"):
        parse_twiml(fallback_twiml(Settings()), "http://x/twiml")
    page = histogram_page(
        "t", {"reply": [1.0, 2.0]}, run={"command": "ivr-bridge loadtest <x>"}, failures={"refused: x": 3}
    )
    assert "<h2>Run</h2>" in page and "ivr-bridge loadtest &lt;x&gt;" in page
    assert "<h2>Failures</h2>" in page and "refused: x" in page and "3 calls" in page
