"""An in-memory harness for `Call`: a fake Twilio socket and a scripted voice session.

Modelled on h11's paired connections: the test plays Twilio (frames in, what the bridge
sent out) and the voice API (events in, audio the bridge forwarded) with no socket and no
process, so a whole call runs in milliseconds. `FakeTwilio` keeps Twilio's playback rules
for marks: an echo once the audio before it has played (`play()`, or at once with
`instant_playback`), and every pending mark echoed at once on `clear`.
"""

from __future__ import annotations

import asyncio
import json
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ivr_bridge.audio import PCM16_24K, AudioFormat, Pcm
from ivr_bridge.call import Call
from ivr_bridge.events import CallEvent
from ivr_bridge.media_stream import MediaStream
from ivr_bridge.providers.base import NORMAL_CLOSE, CallInfo, Closed, VoiceEvent
from ivr_bridge.settings import Settings

STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "1" * 32
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


class FakeTwilio:
    """The Twilio side of one Media Stream, as `Call` sees it (`TwilioSocket`)."""

    def __init__(self, *, instant_playback: bool = True) -> None:
        self.instant_playback = instant_playback
        self.sent: list[dict[str, Any]] = []  # every frame the bridge sent, parsed
        self.closed_with: int | None = None
        self.close_code: int | None = None  # what the socket closed with (AsgiTwilioSocket's)
        self._inbound: asyncio.Queue[str | None] = asyncio.Queue()
        self._pending_marks: list[str] = []
        self._sequence = 0

    # -- TwilioSocket ------------------------------------------------------------------------

    async def receive(self) -> str | bytes | None:
        return await self._inbound.get()

    async def send(self, text: str) -> None:
        if self.closed_with is not None:
            raise ConnectionError("Twilio socket closed")
        message = json.loads(text)
        self.sent.append(message)
        if message["event"] == "mark":
            self._pending_marks.append(message["mark"]["name"])
            if self.instant_playback:
                self.play()
        elif message["event"] == "clear":
            self.play()  # Twilio echoes every pending mark at once (the bridge knows them flushed)

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self.closed_with is None:
            self.closed_with = code
            self._inbound.put_nowait(None)

    # -- playing Twilio ------------------------------------------------------------------------

    def _frame(self, event: str, **body: Any) -> None:
        self._sequence += 1
        self._deliver(
            json.dumps(
                {"event": event, "sequenceNumber": str(self._sequence), "streamSid": STREAM_SID, **body}
            )
        )

    def _deliver(self, text: str) -> None:
        self._inbound.put_nowait(text)

    def start(self, call_sid: str = CALL_SID, **parameters: str) -> None:
        self._frame(
            "start",
            start={
                "streamSid": STREAM_SID,
                "callSid": call_sid,
                "accountSid": "AC1",
                "tracks": ["inbound"],
                "customParameters": parameters,
                "mediaFormat": MEDIA_FORMAT,
            },
        )

    def media(self, ulaw: bytes) -> None:
        """Caller audio, in Twilio's 20 ms frames."""
        for i in range(0, len(ulaw), 160):
            self._frame("media", media={"payload": b64encode(ulaw[i : i + 160]).decode()})

    def dtmf(self, digit: str) -> None:
        self._frame("dtmf", dtmf={"digit": digit})

    def stop(self) -> None:
        self._frame("stop", stop={"callSid": CALL_SID})

    def hang_up(self) -> None:
        """The socket closes with no `stop`."""
        self._inbound.put_nowait(None)

    def play(self, count: int | None = None) -> None:
        """Echo the oldest `count` pending marks (all by default): their audio has played."""
        count = len(self._pending_marks) if count is None else count
        played, self._pending_marks = self._pending_marks[:count], self._pending_marks[count:]
        for name in played:
            self._frame("mark", mark={"name": name})

    # -- what the bridge sent ------------------------------------------------------------------

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["event"] == kind]

    def audio(self) -> bytes:
        return b"".join(b64decode(m["media"]["payload"]) for m in self.events("media"))


@dataclass
class ScriptedSession:
    """A voice session whose events the test sends (`emit`); records what it was sent."""

    name: str = "scripted"
    send_format: AudioFormat = PCM16_24K  # what connect() says the session takes
    connect_error: str = ""  # connect() raises ConnectionError with this message
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    may_connect: asyncio.Event = field(default_factory=asyncio.Event)
    audio_in: bytearray = field(default_factory=bytearray)  # PCM16 24 kHz the bridge sent
    messages_in: int = 0
    closed_with: int | None = None
    _events: asyncio.Queue[VoiceEvent] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.may_connect.set()

    async def connect(self) -> AudioFormat:
        await self.may_connect.wait()
        if self.connect_error:
            raise ConnectionError(self.connect_error)
        self.connected.set()
        return self.send_format

    async def send_audio(self, pcm: bytes) -> None:
        self.audio_in += pcm
        self.messages_in += 1

    async def receive(self) -> VoiceEvent:
        event = await self._events.get()
        if isinstance(event, Closed):
            self._events.put_nowait(event)  # Closed repeats once reached
        return event

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self.closed_with is None:
            self.closed_with = code
            self._events.put_nowait(Closed(code))

    def emit(self, *events: VoiceEvent) -> None:
        for event in events:
            self._events.put_nowait(event)


class Harness:
    """One `Call` over a `FakeTwilio`, its voice sessions scripted; events collected."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        instant_playback: bool = True,
        twilio: FakeTwilio | None = None,
        **call: Any,
    ) -> None:
        self.settings = settings or Settings(provider="echo", idle_timeout_s=60)
        self.twilio = twilio or FakeTwilio(instant_playback=instant_playback)
        self.sessions: list[ScriptedSession] = []
        self.prepared: list[ScriptedSession] = []  # handed out in order before fresh ones
        self.events: list[CallEvent] = []
        # The test sends seconds of audio at once: no flood guard (it has tests of its own).
        self.call = Call(
            self.settings,
            self.twilio,
            session_factory=self._session,
            on_event=self.events.append,
            stream=MediaStream(clock=None),
            **call,
        )
        self._task: asyncio.Task[None] | None = None

    def _session(self, settings: Settings, call: CallInfo) -> ScriptedSession:
        session = self.prepared.pop(0) if self.prepared else ScriptedSession()
        self.sessions.append(session)
        return session

    def run(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.call.run())
        return self._task

    async def session(self, n: int = 0, timeout: float = 5.0) -> ScriptedSession:
        """The `n`th voice session, once connected."""
        async with asyncio.timeout(timeout):
            while len(self.sessions) <= n:
                await asyncio.sleep(0)
            await self.sessions[n].connected.wait()
        return self.sessions[n]

    async def ended(self, timeout: float = 5.0) -> Call:
        assert self._task is not None
        await asyncio.wait_for(self._task, timeout)
        return self.call

    def kinds(self) -> list[str]:
        return [e.type for e in self.events]


def speech(ms: int, rate: int = 24000, hz: float = 440.0) -> Pcm:
    """A tone as the voice API sends speech: PCM16 at `rate`."""
    t = np.arange(rate * ms // 1000) / rate
    return Pcm((8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16), rate)


def caller_audio(ms: int) -> bytes:
    """Caller mu-law (a tone), `ms` long."""
    from ivr_bridge.audio import ulaw_encode

    t = np.arange(8 * ms) / 8000
    return ulaw_encode((6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until `predicate` holds, re-checking every 5 ms: the call's state has no event to
    await from outside. Raises TimeoutError after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
