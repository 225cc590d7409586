"""A caller's frames taken in the socket's read callback (`Call._take_now`), in memory: a
fake Twilio socket that offers each frame to the call's sink as `ws_protocol.py` does (only
with none queued), and a voice session that can send at once unless flow control holds it.
The rule under test: a frame is sent on from the callback only when that cannot reorder the
caller's audio or skip anything the reader would have done."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ivr_bridge.audio import TWILIO_AUDIO
from ivr_bridge.call import Outcome
from ivr_bridge.settings import Settings
from tests.call_harness import FakeTwilio, Harness, ScriptedSession, caller_audio, until


class OfferingTwilio(FakeTwilio):
    """Offers each frame to the sink first, as ws_protocol.py does: only when none waits."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: Callable[[str], bool] | None = None
        self.taken = 0

    def set_sink(self, sink: Callable[[str], bool] | None) -> None:
        self.sink = sink

    def _deliver(self, text: str) -> None:
        if self.sink is not None and self._inbound.empty() and self.sink(text):
            self.taken += 1
        else:
            super()._deliver(text)


@dataclass
class SendingSession(ScriptedSession):
    """Sends at once (`audio_sender`) unless `held`; `send_audio` waits for `gate`."""

    held: bool = False
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    sent_at_once: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate.set()

    def audio_sender(self) -> Callable[[bytes], None] | None:
        return None if self.held else self._send_now

    def _send_now(self, audio: bytes) -> None:
        self.audio_in += audio
        self.messages_in += 1
        self.sent_at_once += 1

    async def send_audio(self, pcm: bytes) -> None:
        await self.gate.wait()
        await super().send_audio(pcm)


async def started() -> tuple[Harness, OfferingTwilio, SendingSession]:
    """A call passing mu-law through in 20 ms messages, its session up, its reader waiting."""
    twilio = OfferingTwilio()
    h = Harness(Settings(provider="echo", upstream_chunk_ms=20, idle_timeout_s=60), twilio=twilio)
    session = SendingSession(send_format=TWILIO_AUDIO)
    h.prepared.append(session)
    h.run()
    twilio.start()
    await h.session()
    twilio.media(caller_audio(20))
    await until(lambda: h.call.stats.frames_in == 1)
    return h, twilio, session


async def test_caller_audio_goes_on_from_the_read_callback_byte_for_byte() -> None:
    h, twilio, session = await started()
    audio = caller_audio(200)
    taken, sent_at_once = twilio.taken, session.sent_at_once
    twilio.media(audio)  # no await: sent before this task yields, no task switch per frame
    assert twilio.taken - taken == 10 and session.sent_at_once - sent_at_once == 10
    assert bytes(session.audio_in[-len(audio) :]) == audio
    assert h.call.stats.frames_in == 11 and h.call.stream.media_in == 11
    twilio.stop()
    call = await h.ended()
    assert call.outcome == Outcome.STREAM_STOPPED and twilio.sink is None  # unset at the end


async def test_a_frame_waits_for_the_reader_while_it_sends_one_before_it() -> None:
    """The reader holds an earlier frame, waiting on flow control: a later frame taken at
    once would reach the voice API first."""
    h, twilio, session = await started()
    first, second = caller_audio(40)[:160], caller_audio(40)[160:]
    session.held, session.gate = True, asyncio.Event()  # flow control holds the socket
    twilio.media(first)  # declined: the reader takes it and waits to send it
    await until(lambda: twilio._inbound.empty())
    session.held = False  # the socket takes writes again; the reader's send has yet to resume
    taken = twilio.taken
    twilio.media(second)
    assert twilio.taken == taken  # declined
    session.gate.set()
    await until(lambda: h.call.stats.frames_in == 3)
    assert bytes(session.audio_in[-320:]) == first + second
    twilio.stop()
    await h.ended()


async def test_frames_other_than_media_are_left_to_the_reader() -> None:
    h, twilio, _ = await started()
    taken = twilio.taken
    twilio.dtmf("5")
    twilio._deliver('{"event": "media", "streamSid": "MZ", "media": {"payload": "!"}}')
    twilio.media(caller_audio(20))
    await until(lambda: "dtmf" in h.kinds() and h.call.stats.frames_in == 2)
    assert twilio.taken == taken  # none: the last one came behind queued frames
    assert h.call.stats.bad_frames == 1  # the bad media frame, once
    twilio.media(caller_audio(20))
    assert twilio.taken == taken + 1  # the queue drained: taken again
    twilio.stop()
    await h.ended()
