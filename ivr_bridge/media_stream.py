"""Twilio Media Streams protocol, sans I/O.

`MediaStream.receive()` turns one inbound text frame into one event; the `media()`,
`mark()` and `clear()` methods build the outbound text frames. No sockets, no asyncio:
the per-call orchestrator moves the frames. Message shapes: `shared/reference/protocols.md` §1.
"""

from __future__ import annotations

import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
BYTES_PER_MS = 8
EXPECTED_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
DTMF_DIGITS = frozenset("0123456789*#ABCD")

# Flood guard. Caller audio is produced in real time, so a stream cannot deliver more audio
# than the time since its `start`, plus what network jitter bunches up. More than that is
# a broken or hostile peer whose frames would crowd out every other call on this loop.
# Measured in audio (not frames) because Twilio promises no frame size; the slack covers
# a drift between Twilio's 8 kHz clock and ours over an hour-long call.
MAX_AUDIO_LEAD_MS = 2000
AUDIO_CLOCK_SLACK = 1.02
# Frames other than media are bounded by count: Twilio sends ~50 a second in all, plus
# one echo of each mark this bridge sent (a `clear` returns every pending one at once).
MAX_FRAMES_PER_S = 100
MAX_FRAME_BURST = 200
# And every frame, of any type and before `start` too, by its size: Twilio's media frames
# come to ~17 KB/s. Without this, 64 KB mark echoes or pre-start frames cost a core per
# two sockets in JSON parsing alone.
MAX_BYTES_PER_S = 64 * 1024
MAX_BYTES_BURST = 512 * 1024
# Counters from the peer (sequenceNumber, chunk, timestamp) are integers in this range:
# an hour of 20 ms frames is 180,000; a float like 1e308 would overflow a metric.
MAX_COUNTER = 2**31 - 1
# A call sid as the bridge takes it from a peer: Twilio's are "CA" + 32 hex digits; tests
# and stand-ins use shorter ones. Nothing that could change a URL path, a log line or XML.
_CALL_SID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Why a frame was rejected: a fixed set, so it can label a metric.
BAD_FRAME_KINDS = (
    "binary",
    "not_json",
    "not_object",
    "unknown_event",
    "before_start",
    "second_start",
    "wrong_stream",
    "missing_field",
    "bad_field",
    "bad_base64",
    "bad_start",
    "flood",
    "too_large",  # over the server's frame size limit: the socket closes with 1009
)
MESSAGE_TOO_BIG = 1009


class MediaStreamError(ValueError):
    """An inbound frame that breaks the protocol; the message says how (no payload data).

    `kind` is one of `BAD_FRAME_KINDS`. `fatal` marks a stream that cannot go on: a
    `start` it cannot use (no sids, audio it cannot carry) or a flood; any other bad frame
    can be skipped.
    """

    def __init__(self, message: str, *, kind: str = "bad_field", fatal: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class StreamStarted:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    media_format: dict[str, object]
    tracks: list[str] = field(default_factory=list)


@dataclass(slots=True)  # not frozen: one is made every 20 ms, and a frozen __init__ costs 3x
class MediaReceived:
    payload: bytes  # raw mu-law, 8 kHz mono; any length
    chunk: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class MarkEchoed:
    name: str


@dataclass(frozen=True, slots=True)
class DtmfReceived:
    digit: str


@dataclass(frozen=True, slots=True)
class StreamStopped:
    call_sid: str


StreamEvent = Connected | StreamStarted | MediaReceived | MarkEchoed | DtmfReceived | StreamStopped


def is_call_sid(value: str) -> bool:
    return bool(_CALL_SID.fullmatch(value))


def _int(value: object, what: str) -> int:
    """A counter from the peer, as an integer from 0 to `MAX_COUNTER`. Twilio sends them as
    strings of digits; whole JSON numbers are taken too rather than dropping audio."""
    if value.__class__ is str and len(value) < 10 and value.isdigit() and value.isascii():
        return int(value)  # Twilio's, every frame: at most 9 digits is within range
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():  # 1e400 is inf: not integral
        number = int(value)
    else:
        raise MediaStreamError(f"{what} is not an integer")
    if not 0 <= number <= MAX_COUNTER:
        raise MediaStreamError(f"{what} is out of range")
    return number


class MediaStream:
    """State of one bidirectional Media Stream, as seen from the bridge.

    `clock` (seconds, monotonic) drives the flood guard from the `start` on; None turns
    the guard off (unit tests that replay recorded frames at full speed).
    """

    def __init__(self, clock: Callable[[], float] | None = time.monotonic) -> None:
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.stopped = False
        self.media_in = 0
        self.sequence_gaps = 0  # messages missing according to sequenceNumber
        self.chunk_gaps = 0  # media messages missing according to media.chunk
        self._last_sequence = 0
        self._last_chunk = 0
        self._sid_json = ""  # the streamSid already JSON-encoded, reused for every outbound frame
        # The flood guard's budget runs from the moment the stream opens, not its `start`:
        # frames sent before a `start` (or instead of one) cost the same to parse.
        self._clock = clock
        self._opened_at = clock() if clock is not None else 0.0
        self._audio_bytes = 0  # media payload received, for the flood guard
        self._bytes = 0  # every frame's size
        self._frames = 0  # frames other than media
        self._marks_sent = 0  # each allows one echo beyond the frame budget
        # The limits as of the last clock reading. They only grow (with time and marks sent),
        # so a frame within them needs no clock; one past them reads it (`_check_pace`).
        self._audio_limit = self._frame_limit = self._byte_limit = 0.0
        self._flooded = False

    # -- inbound -------------------------------------------------------------------------

    def receive(self, text: str | bytes) -> StreamEvent:
        """Parse one inbound frame. Raises MediaStreamError for anything Twilio would not send.

        Once input runs ahead of real time (see `MAX_AUDIO_LEAD_MS`) every call raises a
        fatal MediaStreamError of kind "flood".
        """
        if self._flooded:
            raise MediaStreamError("input far faster than real time", kind="flood", fatal=True)
        try:
            event = self._parse(text)
        except MediaStreamError:
            self._charge_frame(len(text))
            raise
        if isinstance(event, MediaReceived):
            self._charge_media(len(text), len(event.payload))
        else:
            self._charge_frame(len(text))
        return event

    def receive_media(self, text: str) -> MediaReceived | None:
        """`receive` for a well-formed media frame; None, with nothing counted, for any other
        frame (`receive` then parses it and raises or returns what it is).

        The call's fast path takes caller audio with this from the socket's read callback,
        where an error could not be handled."""
        if self._flooded:
            return None
        # orjson: 1.0 us a media frame against 2.2 for json's own C scanner. It refuses what
        # json takes and Twilio never sends (NaN, 1e400, escaped lone surrogates, nesting past
        # 1024); `receive` then gives json's answer, as for every frame declined here.
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if type(message) is not dict or message.get("event") != "media":
            return None
        try:
            event = self._media(message)
        except MediaStreamError:  # nothing counted yet: `_media` checks every field first
            return None
        try:
            self._charge_media(len(text), len(event.payload))
        except MediaStreamError:  # a flood: `receive` raises it, for this frame and every later one
            return None
        return event

    def _charge_media(self, size: int, audio_bytes: int) -> None:
        if self._clock is None:
            return
        self._bytes += size
        self._audio_bytes += audio_bytes
        if self._audio_bytes > self._audio_limit or self._bytes > self._byte_limit:
            self._check_pace()

    def _charge_frame(self, size: int) -> None:
        if self._clock is None:
            return
        self._bytes += size
        self._frames += 1
        if self._frames > self._frame_limit or self._bytes > self._byte_limit:
            self._check_pace()

    def _check_pace(self) -> None:
        assert self._clock is not None
        elapsed = self._clock() - self._opened_at
        self._audio_limit = (MAX_AUDIO_LEAD_MS + elapsed * 1000 * AUDIO_CLOCK_SLACK) * BYTES_PER_MS
        self._frame_limit = MAX_FRAME_BURST + elapsed * MAX_FRAMES_PER_S + self._marks_sent
        self._byte_limit = MAX_BYTES_BURST + elapsed * MAX_BYTES_PER_S
        if (
            self._audio_bytes > self._audio_limit
            or self._frames > self._frame_limit
            or self._bytes > self._byte_limit
        ):
            self._flooded = True
            raise MediaStreamError(
                f"input far faster than real time ({self._audio_bytes // BYTES_PER_MS} ms of audio, "
                f"{self._frames} other frames, {self._bytes // 1024} KB in all in {elapsed:.1f} s)",
                kind="flood",
                fatal=True,
            )

    def _parse(self, text: str | bytes) -> StreamEvent:
        if isinstance(text, bytes):
            raise MediaStreamError("binary frame (Media Streams frames are JSON text)", kind="binary")
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise MediaStreamError("frame is not valid JSON", kind="not_json") from None
        if not isinstance(message, dict):
            raise MediaStreamError("frame is not a JSON object", kind="not_object")
        event = message.get("event")
        if event == "media":
            return self._media(message)
        if event == "connected":
            return Connected(str(message.get("protocol", "")), str(message.get("version", "")))
        if event == "start":
            return self._start(message)
        self._check_stream(message)
        if event == "mark":
            mark = message.get("mark")
            if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
                raise MediaStreamError("mark without mark.name", kind="missing_field")
            self._track_sequence(message)
            return MarkEchoed(mark["name"])
        if event == "dtmf":
            dtmf = message.get("dtmf")
            if not isinstance(dtmf, dict) or not isinstance(dtmf.get("digit"), str):
                raise MediaStreamError("dtmf without dtmf.digit", kind="missing_field")
            # Only a keypad's digits: the digit reaches logs and the transcript.
            if dtmf["digit"] not in DTMF_DIGITS:
                raise MediaStreamError("dtmf.digit is not a keypad digit")
            self._track_sequence(message)
            return DtmfReceived(dtmf["digit"])
        if event == "stop":
            self._track_sequence(message)
            self.stopped = True
            stop = message.get("stop")
            call_sid = stop.get("callSid", "") if isinstance(stop, dict) else ""
            return StreamStopped(str(call_sid or self.call_sid or ""))
        raise MediaStreamError(f"unknown event {str(event)[:40]!r}", kind="unknown_event")

    def _start(self, message: dict) -> StreamStarted:
        if self.stream_sid is not None:
            raise MediaStreamError("second start on one stream", kind="second_start")
        start = message.get("start")
        if not isinstance(start, dict):
            raise MediaStreamError("start without start object", kind="bad_start", fatal=True)
        stream_sid = start.get("streamSid") or message.get("streamSid")
        call_sid = start.get("callSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            raise MediaStreamError("start without streamSid", kind="bad_start", fatal=True)
        if not isinstance(call_sid, str) or not call_sid:
            raise MediaStreamError("start without callSid", kind="bad_start", fatal=True)
        if not is_call_sid(call_sid):
            raise MediaStreamError("start with a malformed callSid", kind="bad_start", fatal=True)
        media_format = start.get("mediaFormat") or {}
        if not isinstance(media_format, dict) or any(
            media_format.get(k) != v for k, v in EXPECTED_FORMAT.items()
        ):
            raise MediaStreamError(
                f"unsupported mediaFormat {media_format!r}"[:120], kind="bad_start", fatal=True
            )
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise MediaStreamError("customParameters is not an object", kind="bad_start", fatal=True)
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self._sid_json = json.dumps(stream_sid)
        self._track_sequence(message)
        tracks = start.get("tracks")
        return StreamStarted(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=str(start.get("accountSid", "")),
            custom_parameters={str(k): str(v) for k, v in params.items()},
            media_format=media_format,
            tracks=[str(t) for t in tracks] if isinstance(tracks, list) else [],
        )

    def _media(self, message: dict) -> MediaReceived:
        self._check_stream(message)
        media = message.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise MediaStreamError("media without media.payload", kind="missing_field")
        try:
            # binascii's strict mode checks the alphabet and padding in C (b64decode's
            # `validate` runs a regular expression first).
            payload = binascii.a2b_base64(media["payload"], strict_mode=True)
        except (binascii.Error, ValueError):
            raise MediaStreamError("media payload is not valid base64", kind="bad_base64") from None
        # Every field is checked before any counter moves: a rejected frame leaves no trace.
        chunk = _int(media.get("chunk", self._last_chunk + 1), "media.chunk")
        timestamp = _int(media.get("timestamp", 0), "media.timestamp")
        self._track_sequence(message)
        if chunk > self._last_chunk:
            if self._last_chunk:
                self.chunk_gaps += chunk - self._last_chunk - 1
            self._last_chunk = chunk
        self.media_in += 1
        return MediaReceived(payload, chunk, timestamp)

    def _check_stream(self, message: dict) -> None:
        if self.stream_sid is None:
            raise MediaStreamError(f"{str(message.get('event'))[:20]} before start", kind="before_start")
        if message.get("streamSid") != self.stream_sid:
            raise MediaStreamError("streamSid does not match this stream", kind="wrong_stream")

    def _track_sequence(self, message: dict) -> None:
        raw = message.get("sequenceNumber")
        if raw is None:
            return
        sequence = _int(raw, "sequenceNumber")
        if sequence > self._last_sequence:
            if self._last_sequence:
                self.sequence_gaps += sequence - self._last_sequence - 1
            self._last_sequence = sequence

    # -- outbound ------------------------------------------------------------------------

    def media(self, ulaw: bytes) -> str:
        """A `media` frame; callers send whole 20 ms frames so playback has no jitter."""
        if len(ulaw) % FRAME_BYTES:
            raise ValueError(f"outbound audio must be whole {FRAME_BYTES}-byte frames")
        # Formatted by hand: this runs for every outbound chunk and json.dumps costs more.
        payload = binascii.b2a_base64(ulaw, newline=False).decode("ascii")
        return f'{{"event":"media","streamSid":{self._require_sid()},"media":{{"payload":"{payload}"}}}}'

    def mark(self, name: str) -> str:
        sid = self._require_sid()
        self._marks_sent += 1
        return f'{{"event":"mark","streamSid":{sid},"mark":{{"name":{json.dumps(name)}}}}}'

    def clear(self) -> str:
        return f'{{"event":"clear","streamSid":{self._require_sid()}}}'

    def _require_sid(self) -> str:
        if not self._sid_json:
            raise RuntimeError("no outbound frames before the stream has started")
        return self._sid_json
