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
  latency measurements. The frame clock is ``time.monotonic()`` too, in whole milliseconds.
* Every caller in an event loop is paced by one :class:`FrameClock`: a caller's frame and
  its handset's playout are callbacks due at a millisecond, not tasks sleeping 20 ms each,
  so one load generator process carries hundreds of calls (BENCHMARKS.md, issue 14).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import json
import math
import secrets
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ivr_bridge.standins.timeline import CallerTimeline

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
FRAME_SECONDS = 0.02
BYTES_PER_SECOND = 8000
SILENCE = 0xFF  # mu-law zero
DTMF_DIGITS = frozenset("0123456789*#")
RESYNC_SECONDS = 0.1  # a say() starting later than this after the last frame restarts the clock
TICKS_PER_SECOND = 1000  # the frame clock counts whole milliseconds
FRAME_TICKS = 20

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


def write_now(ws: ClientConnection, message: str | bytes) -> bool:
    """Write `message` at once if nothing could make `ws.send()` wait; False if not written.

    `send()` runs an async context manager and a drain for every message: at one message
    per 20 ms per caller that overhead is paid 50 times a second (BENCHMARKS.md, issue 14).
    When the connection is open and its transport is not paused by flow control, the frame
    goes straight through the connection's sans-I/O protocol to the transport, as `send()`
    itself would put it. Nobody here sends fragmented messages, so none can be in progress."""
    if ws.protocol.state is not State.OPEN or ws.paused or ws.transport.is_closing():
        return False
    if isinstance(message, str):
        ws.protocol.send_text(message.encode())
    else:
        ws.protocol.send_binary(message)
    ws.send_data()
    return True


@dataclass(slots=True)
class _Audio:
    data: bytes
    pos: int = 0


@dataclass(slots=True)
class _Mark:
    name: str


@dataclass(slots=True)
class _Waiting:
    """A message that could not be written at once (flow control); later ones queue behind it."""

    event: str  # "media", or the name of a numbered event
    body: Any  # media: the base64 payload; otherwise the event's body
    scheduled_at: float = 0.0  # media: when it was due on the frame clock
    done: Callable[[bool], None] | None = None  # told whether it was sent


@dataclass(slots=True)
class _Speech:
    """Frames a say() is streaming; `done` is True when all were sent, False if the call ended."""

    payloads: Sequence[str]
    done: asyncio.Future[bool]
    index: int = 0


def _tick(when: float) -> int:
    """The first millisecond of the frame clock at or after `when` (time.monotonic())."""
    return math.ceil(when * TICKS_PER_SECOND)


class FrameClock:
    """One timer a millisecond for every caller in an event loop.

    Each simulated caller sends a frame and plays 20 ms of received audio 50 times a
    second. A task sleeping for each costs a timer, a future and a task step every time;
    here a caller registers a callback for the millisecond it is due and the clock runs all
    callbacks due in one millisecond from one timer, in the order they were registered."""

    def __init__(self) -> None:
        self._due: dict[int, list[Callable[[], None]]] = {}

    def at(self, tick: int, callback: Callable[[], None]) -> None:
        bucket = self._due.get(tick)
        if bucket is not None:
            bucket.append(callback)
            return
        self._due[tick] = [callback]
        delay = tick / TICKS_PER_SECOND - time.monotonic()
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._fire, tick)

    def _fire(self, tick: int) -> None:
        for callback in self._due.pop(tick):
            try:
                callback()
            except Exception as exc:  # one caller's fault must not stop the others' frames
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "frame clock callback failed", "exception": exc}
                )


_clocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FrameClock] = weakref.WeakKeyDictionary()


def frame_clock() -> FrameClock:
    """The running event loop's frame clock."""
    loop = asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = FrameClock()
    return clock


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
        self._sid_json = json.dumps(self.stream_sid)
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
        self._clock: FrameClock | None = None
        self._sequence = 0
        self._chunk = 0
        # Messages are written at once when they can be. One that must wait for flow control
        # goes to the outbox, and every later one behind it, so sequenceNumber order stays
        # wire order; one task drains the outbox.
        self._outbox: deque[_Waiting] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._media_lock = asyncio.Lock()  # say()/silence() calls take turns on one clock
        self._next_tick: int | None = None  # the frame clock's next frame, in ms
        self._frame_pending = False  # the next frame is scheduled on the clock, or being sent
        self._speech: _Speech | None = None
        self._line_on = False  # `continuous`: silence flows whenever no say() is streaming
        self._receiver: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

        # Playout queue: audio and marks in arrival order.
        self._queue: deque[_Audio | _Mark] = deque()
        self._queued_audio = 0
        self._playhead: float | None = None  # when the next queued byte starts playing
        self._piece_start: float | None = None  # start of the piece being played, if any
        self._piece_size = 0
        self._step_pending = False  # the playout's next step is on the clock
        self._generation = 0  # bumped by clear and close, so a pending step knows it is stale

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
        self._clock = frame_clock()
        self._receiver = asyncio.create_task(self._receive(self._ws))
        if self.continuous:
            self._line_on = True
            self._resync()
            self._schedule_frame()

    async def hang_up(self) -> None:
        """End the call as Twilio does: ``stop``, then a normal close."""
        if self._ws is None or self.closed.is_set():
            return
        self.hung_up = True
        self._line_on = False  # nothing follows `stop`
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
        self._line_on = False
        if self._receiver is not None:
            await asyncio.wait({self._receiver})

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
            self._resync()
            if not payloads:
                return True, range(first, first)
            if self._ws is None or self.closed.is_set():
                return False, range(first, first)
            speech = _Speech(payloads, asyncio.get_running_loop().create_future())
            self._speech = speech  # with the line open, its next frame is this speech's first
            self._schedule_frame()
            try:
                sent_all = await speech.done
            finally:
                if self._speech is speech:
                    self._speech = None
            return sent_all, range(first, self._chunk + 1)

    def _resync(self) -> None:
        """Restart the frame clock if it has fallen more than RESYNC_SECONDS behind."""
        now = time.monotonic()
        if self._next_tick is None or now > self._next_tick / TICKS_PER_SECOND + RESYNC_SECONDS:
            if self._next_tick is not None and self.continuous:
                # A real line never pauses: frames the clock skips were lost, not unsaid.
                skipped = now - self._next_tick / TICKS_PER_SECOND
                self.timeline.frames_skipped += int(skipped / FRAME_SECONDS)
            self._next_tick = _tick(now)

    def _schedule_frame(self) -> None:
        if not self._frame_pending and self._clock is not None and self._next_tick is not None:
            self._frame_pending = True
            self._clock.at(self._next_tick, self._frame_due)

    def _frame_due(self) -> None:
        """The clock's call for this caller's next frame: a say()'s, or the line's silence."""
        speech = self._speech
        if speech is not None:
            payload = speech.payloads[speech.index]
        elif self._line_on:
            self._resync()  # a lagging loop loses the line's frames, as a real line would
            payload = _SILENCE_PAYLOAD
        else:
            self._frame_pending = False
            return
        assert self._next_tick is not None
        scheduled_at = self._next_tick / TICKS_PER_SECOND
        sent = self._write_now("media", payload, scheduled_at)
        if sent is None:  # flow control: this frame waits, and the clock with it
            self._wait_to_send(_Waiting("media", payload, scheduled_at, partial(self._frame_sent, speech)))
        else:
            self._frame_sent(speech, sent)

    def _frame_sent(self, speech: _Speech | None, sent: bool) -> None:
        self._frame_pending = False
        if not sent:  # the call is over
            self._line_on = False
            if speech is not None and not speech.done.done():
                speech.done.set_result(False)
            return
        assert self._next_tick is not None
        self._next_tick += FRAME_TICKS  # absolute: late wake-ups do not add up
        if speech is not None and speech is self._speech:
            speech.index += 1
            if speech.index == len(speech.payloads):
                self._speech = None
                if not speech.done.done():  # not cancelled
                    speech.done.set_result(True)
        if self._speech is not None or self._line_on:
            self._schedule_frame()

    def _render(self, event: str, body: Any) -> str:
        """The message's text with the next numbers; `_written` takes them once it is sent,
        so numbers are wire order."""
        sequence = self._sequence + 1
        if event == "media":
            chunk = self._chunk + 1
            return _MEDIA_TEMPLATE % (sequence, self._sid_json, chunk, 20 * (chunk - 1), body)
        message = {"event": event, "sequenceNumber": str(sequence), "streamSid": self.stream_sid}
        message.update(body)
        return json.dumps(message)

    def _written(self, event: str, sent_at: float, scheduled_at: float) -> None:
        self._sequence += 1
        if event == "media":
            self._chunk += 1
            self.timeline.frame_sent(self._chunk, sent_at, scheduled_at)

    def _write_now(self, event: str, body: Any, scheduled_at: float = 0.0) -> bool | None:
        """Write a message at once: True; False if the call is over; None if it must wait."""
        if self._ws is None or self.closed.is_set():
            return False
        if self._outbox:
            return None
        sent_at = time.monotonic()
        if not write_now(self._ws, self._render(event, body)):
            return None
        self._written(event, sent_at, scheduled_at)
        return True

    def _wait_to_send(self, waiting: _Waiting) -> None:
        self._outbox.append(waiting)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        """Send the outbox in order, the async way; while it is not empty nothing is written at once."""
        try:
            while self._outbox:
                waiting = self._outbox[0]
                sent = False
                if self._ws is not None and not self.closed.is_set():
                    text = self._render(waiting.event, waiting.body)
                    sent_at = time.monotonic()
                    with contextlib.suppress(ConnectionClosed):
                        await self._ws.send(text)
                        sent = True
                    if sent:
                        self._written(waiting.event, sent_at, waiting.scheduled_at)
                self._outbox.popleft()
                if waiting.done is not None:
                    waiting.done(sent)
        finally:
            # Left early only by an unexpected error (which the task still raises): nothing
            # can follow it in order, and no say() may wait on the outbox for ever.
            while self._outbox:
                waiting = self._outbox.popleft()
                if waiting.done is not None:
                    waiting.done(False)

    async def _send_event(self, event: str, body: dict[str, Any]) -> bool:
        """Send a numbered message; False if the call is already over."""
        sent = self._write_now(event, body)
        if sent is not None:
            return sent
        result: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def done(sent: bool) -> None:
            if not result.done():  # not cancelled
                result.set_result(sent)

        self._wait_to_send(_Waiting(event, body, done=done))
        return await result

    # -- waiting ------------------------------------------------------------------------

    def _notify(self) -> None:
        """Something changed: wake the waiters whose condition now holds (and only those)."""
        for predicate, woken in self._waiters:
            if woken.done():
                continue
            try:
                if predicate():
                    woken.set_result(None)
            except Exception as exc:
                woken.set_exception(exc)

    def _wake_all(self) -> None:
        for _, woken in self._waiters:
            if not woken.done():
                woken.set_result(None)

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
            if self.closed.is_set() or deadline <= loop.time():
                return False
            # Checked by `_notify` at each change: the waiting task wakes once, not per frame.
            waiter = (predicate, loop.create_future())
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter[1]
            except TimeoutError:
                pass
            finally:
                self._waiters.remove(waiter)
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
                self._on_message(message)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.closed.set()
            self._line_on = False
            self._generation += 1  # a pending playout step is stale
            self._step_pending = False
            self._queue.clear()
            self._queued_audio = 0
            self._wake_all()

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    def _on_message(self, raw: str | bytes) -> None:
        if isinstance(raw, bytes):
            self._violation(f"binary frame of {len(raw)} bytes (31950)")
            return
        try:
            message = orjson.loads(raw)  # strict JSON, as Twilio reads it, and cheaper than json's
        except orjson.JSONDecodeError:
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
            self._on_clear()

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
        now = time.monotonic()
        self.timeline.media(now, len(audio))
        if self._queued_audio == 0 and (self._playhead is None or self._playhead < now):
            self._playhead = now  # queue had run dry: playback restarts on arrival
        self._queue.append(_Audio(audio))
        self._queued_audio += len(audio)
        self._play()

    def _on_mark(self, mark: Any) -> None:
        if not isinstance(mark, dict) or set(mark) != {"name"} or not isinstance(mark["name"], str):
            self._violation(f"mark: body must be exactly {{'name': str}}, got {mark!r:.80}")
            return
        self.marks_received.append(mark["name"])
        self.timeline.mark(time.monotonic(), mark["name"])
        self._queue.append(_Mark(mark["name"]))
        self._play()

    def _on_clear(self) -> None:
        self.clears += 1
        now = time.monotonic()
        self.timeline.clear(now)
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
        self._step_pending = False
        for name in flushed:
            self.marks_flushed.append(name)
            self._echo_mark(name)

    def _echo_mark(self, name: str) -> None:
        """Written at once, or queued behind what waits for flow control (order kept)."""
        body = {"mark": {"name": name}}
        if self._write_now("mark", body) is None:
            self._wait_to_send(_Waiting("mark", body))

    # -- playout ------------------------------------------------------------------------

    def _play(self) -> None:
        """Play the queue at real time, 20 ms a step: what is due now, then the clock calls back."""
        if self._step_pending:
            return
        now = time.monotonic()
        while self._queue:
            head = self._queue[0]
            if isinstance(head, _Mark):  # all audio before it has played
                self._queue.popleft()
                self.marks_played.append(head.name)
                self.marks_played_at.append(now)
                self._echo_mark(head.name)
                self._notify()
                continue
            if self._piece_start is None:  # the next piece starts playing
                assert self._playhead is not None
                self._piece_start = self._playhead
                self._piece_size = min(FRAME_BYTES, len(head.data) - head.pos)
            due = self._piece_start + self._piece_size / BYTES_PER_SECOND
            # Within a tick of its time is on time: uvloop's timers, on a clock read once
            # per loop turn, can fire a little early, and would otherwise be set again.
            if due - now > 1 / TICKS_PER_SECOND:
                assert self._clock is not None
                self._step_pending = True
                self._clock.at(_tick(due), partial(self._play_step, self._generation))
                return
            self._piece_start = None
            self.received += head.data[head.pos : head.pos + self._piece_size]
            head.pos += self._piece_size
            self._queued_audio -= self._piece_size
            self._playhead = due
            if head.pos >= len(head.data):
                self._queue.popleft()
            self._notify()

    def _play_step(self, generation: int) -> None:
        if generation == self._generation:  # else a clear or the close flushed what it was for
            self._step_pending = False
            self._play()
