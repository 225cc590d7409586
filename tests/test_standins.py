"""The stand-ins against their own protocols (not against the bridge)."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import math
import signal
import sys
import time
import uuid
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ivr_bridge.standins.nextevi import NextEviStandIn, Session, VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller

TIMEOUT = 10.0  # generous: the CI box is a loaded 2-core machine
FRAME_100MS = 4800  # bytes of 24 kHz PCM16

# -- NextEVI helpers -----------------------------------------------------------------------


def speech_turn(speech_ms: int = 600, silence_ms: int = 600) -> list[bytes]:
    """A 1 kHz sine at amplitude 6000, then zeros, as 100 ms binary frames."""
    t = np.arange(speech_ms * 24) / 24000
    tone = np.round(6000 * np.sin(2 * math.pi * 1000 * t)).astype("<i2").tobytes()
    pcm = tone + bytes(silence_ms * 48)
    return [pcm[i : i + FRAME_100MS] for i in range(0, len(pcm), FRAME_100MS)]


def settings_message(flat: bool = False) -> dict[str, Any]:
    header = {"type": "session_settings", "timestamp": 1700000000.0, "message_id": str(uuid.uuid4())}
    if flat:
        return {**header, "sample_rate": 24000, "channels": 1, "encoding": "linear16"}
    return {
        **header,
        "data": {
            "emotion_detection": {"enabled": True},
            "turn_detection": {"enabled": True, "silence_threshold": 0.5},
            "audio": {"sample_rate": 24000, "channels": 1, "encoding": "linear16"},
        },
    }


def client_url(standin: NextEviStandIn, api_key: str = "oak_test_key", config_id: str = "cfg_test") -> str:
    return f"{standin.url}/conn-{uuid.uuid4()}?api_key={api_key}&config_id={config_id}"


def open_client(url: str) -> connect:
    # No receive flow control: a test that stops reading must not stall its own close.
    return connect(url, max_queue=None)


async def next_message(ws: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(raw, str), "NextEVI sends JSON text frames only"
    message = json.loads(raw)
    assert isinstance(message, dict)
    return message


async def collect(
    ws: ClientConnection, until: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while not until(messages):
        messages.append(await next_message(ws))
    return messages


def payload(message: dict[str, Any]) -> dict[str, Any]:
    return message.get("data") or message


def tts_pcm(message: dict[str, Any], wav_header: bool, rate: int) -> bytes:
    content = base64.b64decode(message["content"])
    if not wav_header:
        assert not content.startswith(b"RIFF")
        return content
    with wave.open(io.BytesIO(content), "rb") as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (rate, 1, 2)
        return reader.readframes(reader.getnframes())


def check_header(message: dict[str, Any]) -> None:
    assert isinstance(message["timestamp"], float)
    uuid.UUID(message["message_id"])


@pytest.fixture
async def standin_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[NextEviStandIn] = []

    async def make(**behaviour: Any) -> NextEviStandIn:
        standin = NextEviStandIn(VoiceApiBehaviour(**behaviour))
        await standin.start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        await standin.stop()


# -- NextEVI tests -------------------------------------------------------------------------


async def test_nextevi_data_envelope_wav_turn(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory(reply_ms=500, tts_chunk_ms=200, pace=False)
    reply_bytes = 500 * 48
    async with open_client(client_url(standin)) as ws:
        meta = await next_message(ws)
        assert meta["type"] == "connection_metadata"
        assert set(meta) == {"type", "timestamp", "message_id", "data"}
        check_header(meta)
        session = await standin.wait_for_session()
        assert meta["data"]["connection_id"] == session.connection_id
        assert meta["data"]["status"] == "connected"
        assert meta["data"]["config"] == {
            "audio_format": "pcm_24khz_16bit_mono",
            "encoding": "linear16",
            "sample_rate": 24000,
            "channels": 1,
        }
        assert meta["data"]["config_id"] == "cfg_test"

        settings = settings_message()
        await ws.send(json.dumps(settings))
        status = await next_message(ws)
        assert status["type"] == "status"
        assert status["data"] == {
            "status": "ready",
            "details": {"session_settings": {"sample_rate": 24000, "channels": 1, "encoding": "linear16"}},
        }

        for frame in speech_turn():
            await ws.send(frame)

        def reply_done(messages: list[dict[str, Any]]) -> bool:
            got = sum(len(tts_pcm(m, True, 24000)) for m in messages if m["type"] == "tts_chunk")
            return got >= reply_bytes

        messages = await collect(ws, reply_done)

    types = [m["type"] for m in messages]
    for message in messages:
        check_header(message)
        if message["type"] == "tts_chunk":
            assert set(message) == {"type", "timestamp", "message_id", "content"}
        else:
            assert set(message) == {"type", "timestamp", "message_id", "data"}

    finals = [m for m in messages if m["type"] == "transcription" and m["data"]["is_final"]]
    partials = [m for m in messages if m["type"] == "transcription" and not m["data"]["is_final"]]
    assert len(finals) == 1 and partials
    final = finals[0]["data"]
    assert final["transcript"] == "caller said 600 ms of speech"
    assert final["is_speech_final"] is True and final["is_turn_incomplete"] is False
    assert final["accumulated_transcript"] == final["transcript"]
    assert final["words"] == [] and final["session_id"] == session.connection_id

    turn_start = messages[types.index("turn_start")]["data"]
    turn_end = messages[types.index("turn_end")]["data"]
    assert turn_start["turn_id"] == turn_end["turn_id"]
    assert turn_end["duration"] == pytest.approx(0.6)
    assert turn_end["is_complete"] is True
    emotion = messages[types.index("emotion_update")]["data"]
    assert emotion["top_emotions"][0]["name"] in emotion["all_emotions"]

    order = [
        types.index("turn_start"),
        types.index("transcription"),
        messages.index(finals[0]),
        types.index("turn_end"),
        types.index("emotion_update"),
        types.index("llm_response_chunk"),
        types.index("tts_chunk"),
    ]
    assert order == sorted(order)

    llm = [m["data"] for m in messages if m["type"] == "llm_response_chunk"]
    assert [c["chunk_index"] for c in llm] == list(range(len(llm)))
    assert {c["generation_id"] for c in llm} == {"gen-1"}
    assert [c["is_final"] for c in llm] == [False] * (len(llm) - 1) + [True]
    assert llm[-1]["content"] == "".join(c["content"] for c in llm[:-1])

    pieces = [tts_pcm(m, True, 24000) for m in messages if m["type"] == "tts_chunk"]
    assert [len(p) for p in pieces] == [9600, 9600, 4800]  # 200 + 200 + 100 ms
    samples = np.frombuffer(b"".join(pieces), dtype="<i2")
    assert 7900 <= int(np.max(np.abs(samples))) <= 8000

    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    assert session.close_code == 1000
    assert session.settings == settings
    assert len(session.audio) == 1200 * 48
    assert session.audio_frames == [FRAME_100MS] * 12
    assert session.audio_before_settings == 0
    assert (session.replies_started, session.replies_interrupted, session.turns) == (1, 0, 1)
    assert session.query["api_key"] == "oak_test_key"


async def test_nextevi_flat_envelope_raw_pcm(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory(
        envelope="flat", wav_header=False, tts_sample_rate=16000, reply_ms=250, tts_chunk_ms=100, pace=False
    )
    async with open_client(client_url(standin)) as ws:
        meta = await next_message(ws)
        assert "data" not in meta and meta["type"] == "connection_metadata"
        assert meta["status"] == "connected" and meta["config"]["sample_rate"] == 24000
        await ws.send(speech_turn()[0])  # before settings: recorded and counted
        keep_alive = {"type": "keep_alive", "timestamp": 1700000000.0, "message_id": "ping-1"}
        await ws.send(json.dumps(keep_alive))
        await ws.send(json.dumps(settings_message(flat=True)))
        status = await next_message(ws)
        assert status["type"] == "status" and status["status"] == "ready"
        assert status["details"]["session_settings"]["sample_rate"] == 24000
        for frame in speech_turn():
            await ws.send(frame)
        messages = await collect(ws, lambda ms: sum(m["type"] == "tts_chunk" for m in ms) == 3)
        session = await standin.wait_for_session()
        await ws.close()

    assert all("data" not in m for m in messages)
    final = next(m for m in messages if m["type"] == "transcription" and m["is_final"])
    assert final["transcript"] == "caller said 600 ms of speech"
    assert [len(tts_pcm(m, False, 16000)) for m in messages if m["type"] == "tts_chunk"] == [3200, 3200, 1600]
    await asyncio.wait_for(session.closed.wait(), TIMEOUT)
    assert session.audio_before_settings == 1
    assert len(session.audio) == 1300 * 48
    assert [m["type"] for m in session.text_messages] == ["keep_alive", "session_settings"]
    assert session.close_code == 1000


async def test_nextevi_rejects_bad_credentials_and_paths(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory()
    for url, code in (
        (client_url(standin, api_key="oak_wrong"), 4001),
        (client_url(standin, config_id="cfg_wrong"), 4002),
    ):
        async with open_client(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    with pytest.raises(InvalidStatus) as rejected:
        await connect(standin.url.replace("/ws/voice", "/ws/other/x"))
    assert rejected.value.response.status_code == 404
    assert standin.sessions == [] and len(standin.rejected) == 2


async def test_nextevi_barge_in_interrupts_paced_reply(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory(reply_ms=3000, tts_chunk_ms=100, pace=True)
    loop = asyncio.get_running_loop()
    async with open_client(client_url(standin)) as ws:
        await next_message(ws)
        await ws.send(json.dumps(settings_message()))
        await next_message(ws)
        for frame in speech_turn():
            await ws.send(frame)
        arrivals: list[float] = []
        first: list[dict[str, Any]] = []
        while len(arrivals) < 3:
            message = await next_message(ws)
            first.append(message)
            if message["type"] == "tts_chunk":
                arrivals.append(loop.time())
        assert arrivals[2] - arrivals[0] >= 0.15  # paced: 3 chunks of 100 ms span ~200 ms

        for frame in speech_turn():
            await ws.send(frame)

        def second_reply_started(messages: list[dict[str, Any]]) -> bool:
            return any(
                m["type"] == "llm_response_chunk" and m["data"]["generation_id"] == "gen-2" for m in messages
            )

        rest = await collect(ws, second_reply_started)
        session = await standin.wait_for_session()

    types = [m["type"] for m in rest]
    interruption = rest[types.index("tts_interruption")]
    assert set(interruption) == {"type", "timestamp", "message_id", "content"}
    assert interruption["content"] == ""
    after = types[types.index("tts_interruption") :]
    assert "tts_chunk" not in after, "the interrupted reply kept sending audio"
    assert after.index("turn_start") < after.index("turn_end") < after.index("llm_response_chunk")
    assert types.count("tts_chunk") + 3 < 30
    assert (session.replies_started, session.replies_interrupted, session.turns) == (2, 1, 2)


async def test_nextevi_without_barge_in_replies_queue_up(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory(
        reply_ms=400, tts_chunk_ms=100, think_ms=100, interrupt_on_speech=False
    )
    loop = asyncio.get_running_loop()
    arrivals: dict[str, float] = {}
    async with open_client(client_url(standin)) as ws:
        await next_message(ws)
        await ws.send(json.dumps(settings_message()))
        await next_message(ws)
        for frame in speech_turn():
            await ws.send(frame)
        messages: list[dict[str, Any]] = []
        while not any(m["type"] == "tts_chunk" for m in messages):
            messages.append(await next_message(ws))
            arrivals.setdefault(messages[-1]["type"], loop.time())
        for frame in speech_turn():
            await ws.send(frame)
        messages += await collect(ws, lambda ms: sum(m["type"] == "tts_chunk" for m in ms) == 7)
        session = await standin.wait_for_session()

    assert arrivals["llm_response_chunk"] - arrivals["turn_end"] >= 0.08  # think_ms
    types = [m["type"] for m in messages]
    assert "tts_interruption" not in types
    second_llm = next(
        i
        for i, m in enumerate(messages)
        if m["type"] == "llm_response_chunk" and m["data"]["generation_id"] == "gen-2"
    )
    assert types[:second_llm].count("tts_chunk") == 4, "the second reply overlapped the first"
    assert (session.replies_started, session.replies_interrupted) == (2, 0)


async def test_nextevi_controls_and_errors(standin_factory: Callable[..., Any]) -> None:
    standin: NextEviStandIn = await standin_factory()
    async with open_client(client_url(standin)) as ws:
        await next_message(ws)
        session: Session = await standin.wait_for_session()
        await ws.send("{not json")
        error = await next_message(ws)
        assert error["type"] == "error" and error["data"]["error_code"] == "INVALID_MESSAGE"
        await ws.send(json.dumps({"type": "bogus", "timestamp": 1.0, "message_id": "x"}))
        error = await next_message(ws)
        assert error["data"]["error_code"] == "UNKNOWN_MESSAGE_TYPE"
        assert len(session.errors) == 2

        await standin.interrupt(session)
        interruption = await next_message(ws)
        assert interruption["type"] == "tts_interruption" and interruption["content"] == ""
        assert session.replies_interrupted == 0  # nothing was playing

        await standin.send_raw(session, b"\x00\x01")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"\x00\x01"
        await standin.close_session(session, code=4004, reason="rate limited")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
        assert session.closed.is_set() and session.close_code == 4004

    async with open_client(client_url(standin)) as ws:
        await next_message(ws)
        second = await standin.wait_for_session(1)
        await standin.stop()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert second.close_code == 1001
    with pytest.raises(TimeoutError, match="no session #5"):
        await standin.wait_for_session(5, timeout=0.05)


async def test_nextevi_command_line() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ivr_bridge.standins.nextevi",
        "--port",
        "0",
        "--reply-ms",
        "300",
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
        assert "ws://127.0.0.1:" in line
        base = line.split("listening on ")[1].split("/{connection_id}")[0]
        async with open_client(f"{base}/c1?api_key=oak_test_key&config_id=cfg_test") as ws:
            assert (await next_message(ws))["type"] == "connection_metadata"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0


# -- Twilio helpers ------------------------------------------------------------------------


class FakeBridge:
    """A minimal server on the bridge's side of a Media Stream, recording the caller."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.headers: dict[str, str] = {}
        self.connection: ServerConnection | None = None
        self.close_code: int | None = None
        self._changed = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        self.connection = ws
        self.close_code = None
        assert ws.request is not None
        self.headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
        loop = asyncio.get_running_loop()
        try:
            async for raw in ws:
                self.messages.append(json.loads(raw))
                self.arrivals.append(loop.time())
                self._notify()
        except ConnectionClosed:
            pass
        self.close_code = ws.close_code
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not predicate():
                await self._changed.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("event") == name]

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        assert self.connection is not None
        await self.connection.send(json.dumps(message) if isinstance(message, dict) else message)


@pytest.fixture
async def bridge() -> AsyncIterator[tuple[FakeBridge, str]]:
    fake = FakeBridge()
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield fake, f"ws://127.0.0.1:{port}/media"


def media(sid: str, audio: bytes) -> dict[str, Any]:
    return {"event": "media", "streamSid": sid, "media": {"payload": base64.b64encode(audio).decode()}}


# -- Twilio tests --------------------------------------------------------------------------


async def test_twilio_caller_message_shapes_and_pacing(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    caller = TwilioCaller(url, custom_parameters={"tenant": "acme"}, headers={"X-Twilio-Signature": "sig"})
    assert caller.call_sid.startswith("CA") and len(caller.call_sid) == 34
    assert caller.stream_sid.startswith("MZ") and len(caller.stream_sid) == 34
    async with caller:
        await fake.wait_for(lambda: len(fake.messages) >= 2)
        assert fake.headers["x-twilio-signature"] == "sig"
        assert fake.messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        assert fake.messages[1] == {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": caller.stream_sid,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": caller.stream_sid,
                "callSid": caller.call_sid,
                "tracks": ["inbound"],
                "customParameters": {"tenant": "acme"},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
        spoken = bytes(range(250)) * 2  # 500 bytes: three whole frames and a partial one
        loop = asyncio.get_running_loop()
        began = loop.time()
        await caller.say(spoken)
        await caller.silence(400)
        elapsed = loop.time() - began
        await caller.dtmf("5")
        with pytest.raises(ValueError):
            await caller.dtmf("55")
        await caller.hang_up()
        await fake.wait_for(lambda: fake.close_code is not None)

    assert 0.44 <= elapsed < 5.0  # 24 frames: the last one is due 460 ms after the first
    media_messages = fake.events("media")
    assert len(media_messages) == 24
    for index, message in enumerate(media_messages, start=1):
        assert message == {
            "event": "media",
            "sequenceNumber": str(index + 1),
            "streamSid": caller.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(index),
                "timestamp": str(20 * (index - 1)),
                "payload": message["media"]["payload"],
            },
        }
    frames = [base64.b64decode(m["media"]["payload"]) for m in media_messages]
    assert all(len(frame) == 160 for frame in frames)
    assert b"".join(frames[:4]) == spoken + b"\xff" * 140
    assert set(b"".join(frames[4:])) == {0xFF}
    media_arrivals = [t for m, t in zip(fake.messages, fake.arrivals, strict=True) if m["event"] == "media"]
    assert media_arrivals[-1] - media_arrivals[0] >= 0.4

    assert fake.messages[-2] == {
        "event": "dtmf",
        "sequenceNumber": "26",
        "streamSid": caller.stream_sid,
        "dtmf": {"track": "inbound_track", "digit": "5"},
    }
    assert fake.messages[-1] == {
        "event": "stop",
        "sequenceNumber": "27",
        "streamSid": caller.stream_sid,
        "stop": {"accountSid": "AC" + "0" * 32, "callSid": caller.call_sid},
    }
    assert fake.close_code == 1000
    assert caller.closed.is_set() and caller.close_code == 1000
    assert caller.violations == []


async def test_twilio_caller_playout_marks_and_clear(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    loop = asyncio.get_running_loop()
    async with TwilioCaller(url) as caller:
        sid = caller.stream_sid
        await fake.wait_for(lambda: len(fake.messages) >= 2)
        began = loop.time()
        for _ in range(20):  # 400 ms of 0x10, then mark a, then 400 ms of 0x20, then mark b
            await fake.send(media(sid, b"\x10" * 160))
        await fake.send({"event": "mark", "streamSid": sid, "mark": {"name": "a"}})
        await fake.send(media(sid, b"\x20" * 3200))
        await fake.send({"event": "mark", "streamSid": sid, "mark": {"name": "b"}})

        await caller.wait_for(lambda: caller.marks_played == ["a"])
        assert loop.time() - began >= 0.35  # a's audio had to play out first
        assert 3200 <= len(caller.received) < 6400
        assert set(caller.received[:3200]) == {0x10}

        await fake.send({"event": "clear", "streamSid": sid})
        await caller.wait_for(lambda: caller.marks_flushed == ["b"])
        assert caller.clears == 1 and caller.marks_played == ["a"]
        assert caller.received_total == 6400 and caller.media_messages == 21
        heard = len(caller.received)
        assert 3200 <= heard < 6400
        assert set(caller.received[3200:]) <= {0x20}

        await fake.send({"event": "mark", "streamSid": sid, "mark": {"name": "c"}})
        await caller.wait_for(lambda: caller.marks_played == ["a", "c"])  # empty queue: at once
        await fake.send(media(sid, b"\x30" * 320))
        await caller.wait_for(lambda: len(caller.received) == heard + 320)
        assert caller.marks_received == ["a", "b", "c"]

        await fake.wait_for(lambda: len(fake.events("mark")) == 3)
        echoes = fake.events("mark")
        assert [m["mark"]["name"] for m in echoes] == ["a", "b", "c"]
        for echo in echoes:
            assert set(echo) == {"event", "sequenceNumber", "streamSid", "mark"}
            assert echo["streamSid"] == sid and isinstance(echo["sequenceNumber"], str)
        assert [int(m["sequenceNumber"]) for m in fake.messages[1:]] == list(range(1, len(fake.messages)))
    assert caller.violations == []


async def test_twilio_caller_records_violations(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    async with TwilioCaller(url) as caller:
        sid = caller.stream_sid
        await fake.wait_for(lambda: len(fake.messages) >= 2)
        bad: list[dict[str, Any] | str | bytes] = [
            b"\x00" * 160,
            "{nope",
            {"event": "play", "streamSid": sid},
            {"event": "clear", "streamSid": "MZwrong"},
            {"event": "clear"},
            {"event": "media", "streamSid": sid, "media": {"payload": "***"}},
            {"event": "media", "streamSid": sid, "sequenceNumber": "1", "media": {"payload": "AAAA"}},
            {"event": "mark", "streamSid": sid, "mark": {}},
            media(sid, b"\xff" * 100),  # flagged (not whole frames) but still played
        ]
        for message in bad:
            await fake.send(message)
        await fake.send({"event": "mark", "streamSid": sid, "mark": {"name": "done"}})
        await caller.wait_for(lambda: caller.marks_played == ["done"])
        expected = [
            "binary frame",
            "invalid JSON",
            "unknown event 'play'",
            "wrong streamSid",
            "missing streamSid",
            "not valid base64",
            "unexpected fields ['sequenceNumber']",
            "mark: body",
            "not whole 160-byte frames",
        ]
        assert len(caller.violations) == len(expected)
        for violation, fragment in zip(caller.violations, expected, strict=True):
            assert fragment in violation
        assert caller.received_total == 100 and len(caller.received) == 100
        assert caller.clears == 0


async def test_twilio_caller_waits_and_closes(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    caller = TwilioCaller(url)
    await caller.connect()
    await fake.wait_for(lambda: len(fake.messages) >= 2)
    with pytest.raises(TimeoutError, match=r"still false after 0.1s.*clears=0"):
        await caller.wait_for(lambda: caller.clears > 0, timeout=0.1)
    assert fake.connection is not None
    await fake.connection.close(1000)
    await caller.wait_closed()
    assert caller.close_code == 1000
    with pytest.raises(TimeoutError, match="closed first"):
        await caller.wait_for(lambda: caller.media_messages > 0)
    await caller.say(b"\x00" * 160)  # the call is over: a quiet no-op
    await caller.hang_up()
    assert len(fake.events("media")) == 0

    dropped = TwilioCaller(url)
    await dropped.connect()
    await fake.wait_for(lambda: fake.close_code is None and len(fake.messages) >= 4)
    await dropped.drop()
    await fake.wait_for(lambda: fake.close_code is not None)
    assert fake.close_code == 1006 and dropped.close_code == 1006
    assert fake.events("stop") == []


async def test_twilio_caller_continuous_line(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    async with TwilioCaller(url, continuous=True) as caller:
        # Silence flows with nobody speaking...
        await fake.wait_for(lambda: len(fake.events("media")) >= 5)
        # ...and speech slots into the same frame clock.
        await caller.say(b"\x00" * 320)
        await fake.wait_for(lambda: len(fake.events("media")) >= 10)
        await caller.hang_up()
    frames = fake.events("media")
    chunks = [int(m["media"]["chunk"]) for m in frames]
    assert chunks == list(range(1, len(frames) + 1))
    assert [int(m["media"]["timestamp"]) for m in frames] == [20 * (c - 1) for c in chunks]
    payloads = [base64.b64decode(m["media"]["payload"]) for m in frames]
    assert payloads.count(b"\x00" * 160) == 2 and payloads.count(b"\xff" * 160) == len(frames) - 2
    assert fake.messages[-1]["event"] == "stop"  # nothing follows stop
    sequence = [int(m["sequenceNumber"]) for m in fake.messages[1:]]
    assert sequence == list(range(1, len(sequence) + 1))


async def test_nextevi_timeline_records_socket_times(tmp_path: Any) -> None:
    path = tmp_path / "timeline.jsonl"
    behaviour = VoiceApiBehaviour(reply_ms=400, tts_chunk_ms=200, pace=False)
    async with NextEviStandIn(behaviour, timeline_path=str(path)) as standin:
        async with open_client(client_url(standin)) as ws:
            await ws.send(json.dumps(settings_message()))
            for frame in speech_turn():
                await ws.send(frame)
            await collect(ws, lambda got: sum(m["type"] == "tts_chunk" for m in got) == 2)
            await standin.interrupt(standin.sessions[0])
        await asyncio.wait_for(standin.sessions[0].closed.wait(), TIMEOUT)
    listening, first_audio, record = (json.loads(line) for line in path.read_text().splitlines())
    frames = speech_turn()
    # Written as they happened: a stand-in killed mid-session has already recorded these.
    assert listening["event"] == "listening" and listening["at"] <= record["opened_at"]
    assert first_audio["event"] == "first_audio"
    assert first_audio["connection_id"] == record["connection_id"]
    assert first_audio["at"] == record["audio_at"][0]
    assert record["event"] == "session"
    assert record["connection_id"] == standin.sessions[0].connection_id
    assert record["audio_bytes"] == list(itertools.accumulate(len(f) for f in frames))
    assert len(record["audio_at"]) == len(frames) and record["audio_at"] == sorted(record["audio_at"])
    assert len(record["tts_at"]) == 2 and record["tts_reply"] == [1, 1] and record["tts_ms"] == [200, 200]
    assert len(record["interruptions_at"]) == 1
    assert (
        record["opened_at"] <= record["audio_at"][0] <= record["tts_at"][0] <= record["interruptions_at"][0]
    )


async def test_twilio_callers_share_one_frame_clock(bridge: tuple[FakeBridge, str]) -> None:
    fake, url = bridge
    callers = [TwilioCaller(url) for _ in range(30)]
    for caller in callers:
        await caller.connect()
    await asyncio.gather(*(caller.say(b"\x00" * 800) for caller in callers))
    for caller in callers:
        await caller.hang_up()
    for caller in callers:
        frames = [m for m in fake.events("media") if m["streamSid"] == caller.stream_sid]
        assert [m["media"]["chunk"] for m in frames] == ["1", "2", "3", "4", "5"]
        # Due on whole milliseconds, exactly 20 ms apart: the clock's grid, not sleep drift.
        due = caller.timeline.scheduled_at
        assert all(round(t * 1000, 6) == round(t * 1000) for t in due)
        assert [round((b - a) * 1000, 6) for a, b in itertools.pairwise(due)] == [20.0] * 4
        assert all(s >= d - 0.002 for s, d in zip(caller.timeline.sent_at, due, strict=True))


async def test_twilio_caller_keeps_order_when_writes_must_wait(
    bridge: tuple[FakeBridge, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message that cannot be written at once (flow control) goes the async way, and every
    later one queues behind it: sequence numbers stay in wire order, no frame is lost."""
    import ivr_bridge.standins.twilio as twilio

    writes = itertools.count()
    refused: list[str] = []
    real_write_now = twilio.write_now

    def every_third_must_wait(ws: ClientConnection, text: str) -> bool:
        if next(writes) % 3 == 0:
            refused.append(json.loads(text)["event"])
            return False
        return real_write_now(ws, text)

    monkeypatch.setattr(twilio, "write_now", every_third_must_wait)
    fake, url = bridge
    async with TwilioCaller(url, continuous=True) as caller:
        sid = caller.stream_sid
        await fake.wait_for(lambda: len(fake.events("media")) >= 3)
        for name in ("a", "b", "c"):
            await fake.send(media(sid, b"\x10" * 160))
            await fake.send({"event": "mark", "streamSid": sid, "mark": {"name": name}})
        await caller.say(b"\x00" * 480)
        await caller.wait_for(lambda: caller.marks_played == ["a", "b", "c"])
        await caller.hang_up()
    assert len(refused) >= 3 and "media" in refused  # the async way was taken
    sequence = [int(m["sequenceNumber"]) for m in fake.messages[1:]]
    assert sequence == list(range(1, len(sequence) + 1))
    chunks = [int(m["media"]["chunk"]) for m in fake.events("media")]
    assert chunks == list(range(1, len(chunks) + 1))
    payloads = [base64.b64decode(m["media"]["payload"]) for m in fake.events("media")]
    assert payloads.count(b"\x00" * 160) == 3
    assert [m["mark"]["name"] for m in fake.events("mark")] == ["a", "b", "c"]
    assert fake.messages[-1]["event"] == "stop"


async def test_frame_clock_runs_a_millisecond_in_order_past_a_failing_callback() -> None:
    from ivr_bridge.standins.twilio import FrameClock

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    clock = FrameClock()
    ran: list[str] = []
    done = asyncio.Event()

    def fail() -> None:
        ran.append("fail")
        raise RuntimeError("boom")

    now = math.ceil(time.monotonic() * 1000) + 5  # the clock's ticks: milliseconds of monotonic time
    clock.at(now + 1, lambda: (ran.append("later"), done.set()))
    clock.at(now, lambda: ran.append("first"))
    clock.at(now, fail)
    clock.at(now, lambda: ran.append("third"))
    async with asyncio.timeout(TIMEOUT):
        await done.wait()
    loop.set_exception_handler(None)
    assert ran == ["first", "fail", "third", "later"]
    assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)


def test_stand_in_speech_tests_are_the_rms_threshold() -> None:
    from ivr_bridge.audio import ulaw_decode, ulaw_encode
    from ivr_bridge.standins.speech import (
        SPEECH_RMS,
        is_speech_pcm16,
        is_speech_ulaw,
        speech_blocks_pcm16,
    )

    def rms(samples: np.ndarray) -> float:
        return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))

    rng = np.random.default_rng(7)
    for amplitude in np.geomspace(50, 5000, 60):
        pcm = (rng.standard_normal(480) * amplitude).clip(-32768, 32767).astype("<i2")
        assert is_speech_pcm16(pcm.tobytes() + b"\x01") == (rms(pcm) > SPEECH_RMS)
        ulaw = ulaw_encode(pcm[::3].copy())
        assert is_speech_ulaw(ulaw) == (rms(ulaw_decode(ulaw)) > SPEECH_RMS)
        blocks = np.concatenate([pcm, pcm // 4, pcm * 0])
        expected = [rms(part) > 700.0 for part in blocks.reshape(3, 480)]
        assert speech_blocks_pcm16(blocks.tobytes() + b"\x00" * 100, 480, 700.0) == expected
    assert not is_speech_ulaw(b"") and not is_speech_pcm16(b"\x01")
