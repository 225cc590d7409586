"""A stand-in for Twilio's side of a bidirectional Media Stream (``<Connect><Stream>``).

:class:`TwilioCaller` connects to the bridge the way Twilio does, sends ``connected``,
``start``, paced ``media``, ``dtmf``, ``mark`` echoes and ``stop`` with Twilio's exact shapes
(string ``sequenceNumber``/``chunk``/``timestamp``), and models the caller's handset:
received audio is queued and played at real time, marks are echoed when the audio queued
before them has played, and ``clear`` flushes the queue and echoes pending marks at once.

Choices worth knowing:

* ``media.timestamp`` is ``20 * (chunk - 1)``: audio only flows while a test calls
  :meth:`~TwilioCaller.say`/:meth:`~TwilioCaller.silence`, and a wall-clock timestamp would
  show gaps that real (continuously streaming) Twilio never has.
* Messages the real Twilio would reject (31950/31951) are recorded in ``violations`` and
  otherwise ignored; a media payload that is not whole 20 ms frames is recorded but played.
* When the socket closes, audio still queued is discarded (the caller left ``<Connect>``).
* Sending after the socket has closed is a quiet no-op, as the call is over.
* :attr:`~TwilioCaller.timeline` records, with ``time.monotonic()`` stamps, each frame
  sent (and when it was due), each media, mark and clear received: the raw material for
  latency measurements. The frame clock is ``time.monotonic()`` too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ivr_bridge.standins.timeline import CallerTimeline

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
FRAME_SECONDS = 0.02
BYTES_PER_SECOND = 8000
SILENCE = 0xFF  # mu-law zero
DTMF_DIGITS = frozenset("0123456789*#")
RESYNC_SECONDS = 0.1  # a say() starting later than this after the last frame restarts the clock

# A media message rendered directly: the same text json.dumps gives the equivalent dict,
# at a fraction of the cost (hundreds of callers send 50 of these a second each).
_MEDIA_TEMPLATE = (
    '{"event": "media", "sequenceNumber": "%d", "streamSid": %s, "media": '
    '{"track": "inbound", "chunk": "%d", "timestamp": "%d", "payload": "%s"}}'
)
_SILENCE_PAYLOAD = base64.b64encode(bytes([SILENCE]) * FRAME_BYTES).decode("ascii")

_EXPECTED_FIELDS: dict[str, frozenset[str]] = {
    "media": frozenset({"event", "streamSid", "media"}),
    "mark": frozenset({"event", "streamSid", "mark"}),
    "clear": frozenset({"event", "streamSid"}),
}


@dataclass(slots=True)
class _Audio:
    data: bytes
    pos: int = 0


@dataclass(slots=True)
class _Mark:
    name: str


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def encode_frames(ulaw: bytes) -> list[str]:
    """Mu-law audio as base64 20 ms frame payloads, the last padded with silence.

    Encode a clip once and :meth:`TwilioCaller.say_frames` it from many calls.
    """
    frames = [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]
    if frames and len(frames[-1]) < FRAME_BYTES:
        frames[-1] = frames[-1].ljust(FRAME_BYTES, bytes([SILENCE]))
    return [base64.b64encode(frame).decode("ascii") for frame in frames]


class TwilioCaller:
    """One simulated phone call, connected to a bridge's Media Streams endpoint."""

    def __init__(
        self,
        url: str,
        *,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str = "AC" + "0" * 32,
        custom_parameters: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        continuous: bool = False,
    ) -> None:
        """`continuous`: stream silence whenever not saying anything, as a real line does."""
        self.url = url
        self.continuous = continuous
        self.call_sid = call_sid or _sid("CA")
        self.stream_sid = stream_sid or _sid("MZ")
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters or {})
        self.headers = dict(headers or {})

        self.received = bytearray()
        self.received_total = 0
        self.media_messages = 0
        self.clears = 0
        self.marks_received: list[str] = []
        self.marks_played: list[str] = []
        self.marks_played_at: list[float] = []  # time.monotonic() of each played mark's echo
        self.marks_flushed: list[str] = []
        self.violations: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.hung_up = False  # this side ended the call (`stop`): not the bridge
        self.timeline = CallerTimeline()

        self._ws: ClientConnection | None = None
        self._sequence = 0
        self._chunk = 0
        self._send_lock = asyncio.Lock()  # keeps sequenceNumber order equal to wire order
        self._media_lock = asyncio.Lock()  # say()/silence() calls take turns on one clock
        self._next_frame_at: float | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._player: asyncio.Task[None] | None = None
        self._line: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

        # Playout queue: audio and marks in arrival order.
        self._queue: deque[_Audio | _Mark] = deque()
        self._queued_audio = 0
        self._playhead: float | None = None  # loop time the next queued byte starts playing
        self._piece_start: float | None = None  # start of the piece being played, if any
        self._piece_size = 0
        self._generation = 0  # bumped by clear so a sleeping playout step knows it is stale
        self._work = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------

    async def connect(self) -> None:
        # Twilio is not known to offer permessage-deflate; leave it off like Twilio.
        self._ws = await connect(self.url, additional_headers=self.headers or None, compression=None)
        with contextlib.suppress(ConnectionClosed):  # a bridge rejecting at once shows in close_code
            await self._ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        self.timeline.started_at = time.monotonic()
        await self._send_event(
            "start",
            {
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": dict(self.custom_parameters),
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                }
            },
        )
        self._player = asyncio.create_task(self._playout())
        self._receiver = asyncio.create_task(self._receive(self._ws))
        if self.continuous:
            self._line = asyncio.create_task(self._keep_line_open())

    async def hang_up(self) -> None:
        """End the call as Twilio does: ``stop``, then a normal close."""
        if self._ws is None or self.closed.is_set():
            return
        self.hung_up = True
        await self._stop_line()  # nothing follows `stop`
        await self._send_event("stop", {"stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        await self._close_socket()

    async def close(self) -> None:
        """Close the socket (1000) without ``stop``."""
        if self._ws is None or self.closed.is_set():
            return
        await self._close_socket()

    async def drop(self) -> None:
        """Simulate a network drop: the TCP connection vanishes with no close frame."""
        if self._ws is None or self.closed.is_set():
            return
        self._ws.transport.abort()
        await self._finish()

    async def _close_socket(self) -> None:
        assert self._ws is not None
        await self._ws.close(1000)
        await self._finish()

    async def _finish(self) -> None:
        await self._stop_line()
        if self._receiver is not None:
            await asyncio.wait({self._receiver})

    async def _keep_line_open(self) -> None:
        # One frame per turn of the media lock: a say() waiting for the lock gets it next
        # (asyncio locks are FIFO), and both share the frame clock, so there is no gap.
        frame = [_SILENCE_PAYLOAD]
        while (await self._stream(frame))[0]:
            pass

    async def _stop_line(self) -> None:
        if self._line is not None:
            self._line.cancel()
            await asyncio.gather(self._line, return_exceptions=True)
            self._line = None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- caller actions -----------------------------------------------------------------

    async def say(self, ulaw: bytes) -> range:
        """Stream mu-law audio in 20 ms frames at real time; pads the last frame with silence.

        Returns the chunk numbers of the frames sent (shorter if the call ended meanwhile).
        """
        return await self.say_frames(encode_frames(ulaw))

    async def say_frames(self, payloads: Sequence[str]) -> range:
        """Like :meth:`say` for audio already split and encoded by :func:`encode_frames`."""
        return (await self._stream(payloads))[1]

    async def silence(self, ms: int) -> None:
        count = -(-ms // 20) if ms > 0 else 0
        await self._stream([_SILENCE_PAYLOAD] * count)

    async def dtmf(self, digit: str) -> None:
        if digit not in DTMF_DIGITS or len(digit) != 1:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        if await self._send_event("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}}):
            self.timeline.dtmf.append((time.monotonic(), digit))

    async def _stream(self, payloads: Sequence[str]) -> tuple[bool, range]:
        """Send base64 frames on the 20 ms clock; (False once the call is over, chunks sent)."""
        async with self._media_lock:
            first = self._chunk + 1
            now = time.monotonic()
            if self._next_frame_at is None or now > self._next_frame_at + RESYNC_SECONDS:
                if self._next_frame_at is not None and self.continuous:
                    # A real line never pauses: frames the clock skips were lost, not unsaid.
                    self.timeline.frames_skipped += int((now - self._next_frame_at) / FRAME_SECONDS)
                self._next_frame_at = now
            for payload in payloads:
                # Scheduled against the absolute frame clock so late wake-ups do not add up.
                delay = self._next_frame_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not await self._send_media(payload, self._next_frame_at):
                    return False, range(first, self._chunk + 1)
                self._next_frame_at += FRAME_SECONDS
            return True, range(first, self._chunk + 1)

    async def _send_media(self, payload: str, scheduled_at: float) -> bool:
        async with self._send_lock:
            if self._ws is None or self.closed.is_set():
                return False
            self._sequence += 1
            chunk = self._chunk + 1
            sid = json.dumps(self.stream_sid)
            text = _MEDIA_TEMPLATE % (self._sequence, sid, chunk, 20 * (chunk - 1), payload)
            sent_at = time.monotonic()
            try:
                await self._ws.send(text)
            except ConnectionClosed:
                return False
            self._chunk = chunk
            self.timeline.frame_sent(chunk, sent_at, scheduled_at)
            return True

    async def _send_event(self, event: str, body: dict[str, Any]) -> bool:
        """Send a numbered message; False if the call is already over."""
        async with self._send_lock:
            if self._ws is None or self.closed.is_set():
                return False
            self._sequence += 1
            message = {"event": event, "sequenceNumber": str(self._sequence), "streamSid": self.stream_sid}
            message.update(body)
            try:
                await self._ws.send(json.dumps(message))
            except ConnectionClosed:
                return False
            return True

    # -- waiting ------------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate` holds; TimeoutError (saying why) on timeout or close."""
        if not await self.wait_until(predicate, timeout):
            why = "the connection closed first" if self.closed.is_set() else f"still false after {timeout}s"
            raise TimeoutError(self._describe(predicate, why))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate` holds; False on timeout or when the socket closes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if self.closed.is_set() or remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    @property
    def playing(self) -> bool:
        """True while received audio is queued or playing at the handset."""
        return self._queued_audio > 0

    @property
    def idle(self) -> bool:
        """Nothing queued: all audio received has played and every mark has been echoed."""
        return not self._queue

    async def wait_closed(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(self._describe(None, f"socket still open after {timeout}s")) from None

    def _describe(self, predicate: Callable[[], bool] | None, what: str) -> str:
        source = ""
        if predicate is not None:
            try:
                source = inspect.getsource(predicate).strip()
            except (OSError, TypeError):
                source = repr(predicate)
        return (
            f"{source + ': ' if source else ''}{what}; played={len(self.received)}B "
            f"received_total={self.received_total}B media_messages={self.media_messages} "
            f"clears={self.clears} marks_played={self.marks_played} "
            f"marks_flushed={self.marks_flushed} violations={self.violations} "
            f"closed={self.closed.is_set()} close_code={self.close_code}"
        )

    # -- receiving ----------------------------------------------------------------------

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                await self._on_message(message)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.closed.set()
            if self._player is not None:
                self._player.cancel()
                await asyncio.wait({self._player})
            self._queue.clear()
            self._queued_audio = 0
            self._notify()

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    async def _on_message(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            self._violation(f"binary frame of {len(raw)} bytes (31950)")
            return
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            self._violation(f"invalid JSON: {raw[:80]!r}")
            return
        if not isinstance(message, dict):
            self._violation(f"JSON is not an object: {raw[:80]!r}")
            return
        event = message.get("event")
        expected = _EXPECTED_FIELDS.get(event) if isinstance(event, str) else None
        if expected is None:
            self._violation(f"unknown event {event!r}")
            return
        if "streamSid" not in message:
            self._violation(f"{event}: missing streamSid")
            return
        if message["streamSid"] != self.stream_sid:
            self._violation(f"{event}: wrong streamSid {message['streamSid']!r}")
            return
        keys = set(message)
        if keys != expected:
            missing = sorted(expected - keys)
            extra = sorted(keys - expected)
            self._violation(f"{event}: missing fields {missing}, unexpected fields {extra}")
            return
        if event == "media":
            self._on_media(message["media"])
        elif event == "mark":
            self._on_mark(message["mark"])
        else:
            await self._on_clear()

    def _on_media(self, media: Any) -> None:
        if not isinstance(media, dict) or set(media) != {"payload"}:
            self._violation(f"media: body must be exactly {{'payload'}}, got {media!r:.80}")
            return
        payload = media["payload"]
        if not isinstance(payload, str):
            self._violation("media: payload is not a string")
            return
        try:
            audio = base64.b64decode(payload, validate=True)
        except binascii.Error:
            self._violation(f"media: payload is not valid base64: {payload[:40]!r}")
            return
        if not audio:
            self._violation("media: empty payload")
            return
        if len(audio) % FRAME_BYTES:
            self._violation(f"media: payload of {len(audio)} bytes is not whole 160-byte frames")
        self.media_messages += 1
        self.received_total += len(audio)
        self.timeline.media(time.monotonic(), len(audio))
        now = asyncio.get_running_loop().time()
        if self._queued_audio == 0 and (self._playhead is None or self._playhead < now):
            self._playhead = now  # queue had run dry: playback restarts on arrival
        self._queue.append(_Audio(audio))
        self._queued_audio += len(audio)
        self._work.set()

    def _on_mark(self, mark: Any) -> None:
        if not isinstance(mark, dict) or set(mark) != {"name"} or not isinstance(mark["name"], str):
            self._violation(f"mark: body must be exactly {{'name': str}}, got {mark!r:.80}")
            return
        self.marks_received.append(mark["name"])
        self.timeline.mark(time.monotonic(), mark["name"])
        self._queue.append(_Mark(mark["name"]))
        self._work.set()

    async def _on_clear(self) -> None:
        self.clears += 1
        self.timeline.clear(time.monotonic())
        now = asyncio.get_running_loop().time()
        head = self._queue[0] if self._queue else None
        if isinstance(head, _Audio) and self._piece_start is not None:
            # The frame being played when clear arrived was heard up to now.
            heard = int((now - self._piece_start) * BYTES_PER_SECOND)
            heard = max(0, min(heard, self._piece_size))
            self.received += head.data[head.pos : head.pos + heard]
        flushed = [item.name for item in self._queue if isinstance(item, _Mark)]
        self._queue.clear()
        self._queued_audio = 0
        self._playhead = None
        self._piece_start = None
        self._generation += 1
        for name in flushed:
            self.marks_flushed.append(name)
            await self._echo_mark(name)

    async def _echo_mark(self, name: str) -> None:
        await self._send_event("mark", {"mark": {"name": name}})

    # -- playout ------------------------------------------------------------------------

    async def _playout(self) -> None:
        """Drain the queue at real time, one 20 ms piece per step, sleeping until each is due."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._work.clear()
                await self._work.wait()
                continue
            head = self._queue[0]
            if isinstance(head, _Mark):
                self._queue.popleft()
                self.marks_played.append(head.name)
                self.marks_played_at.append(time.monotonic())
                await self._echo_mark(head.name)
                self._notify()
                continue
            assert self._playhead is not None
            size = min(FRAME_BYTES, len(head.data) - head.pos)
            start = self._playhead
            due = start + size / BYTES_PER_SECOND
            generation = self._generation
            self._piece_start = start
            self._piece_size = size
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if generation != self._generation:
                continue  # a clear flushed this piece while it played
            self._piece_start = None
            self.received += head.data[head.pos : head.pos + size]
            head.pos += size
            self._queued_audio -= size
            self._playhead = due
            if head.pos >= len(head.data):
                self._queue.popleft()
            self._notify()
