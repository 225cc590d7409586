"""Twilio Media Streams protocol, sans I/O.

`MediaStream.receive()` turns one inbound text frame into one event; the `media()`,
`mark()` and `clear()` methods build the outbound text frames. No sockets, no asyncio:
the per-call orchestrator moves the frames. Message shapes: `shared/reference/protocols.md` §1.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode, b64encode
from dataclasses import dataclass, field

FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
EXPECTED_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}


class MediaStreamError(ValueError):
    """An inbound frame that breaks the protocol; the message says how (no payload data).

    `fatal` marks a `start` the stream cannot go on from (no sids, audio it cannot carry);
    any other bad frame can be skipped.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
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


@dataclass(frozen=True, slots=True)
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


def _int(value: object, what: str) -> int:
    # Twilio sends these counters as strings; accept numbers too rather than dropping audio.
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise MediaStreamError(f"{what} is not an integer") from None


class MediaStream:
    """State of one bidirectional Media Stream, as seen from the bridge."""

    def __init__(self) -> None:
        self.stream_sid: str | None = None
        self.call_sid: str | None = None
        self.stopped = False
        self.media_in = 0
        self.sequence_gaps = 0  # messages missing according to sequenceNumber
        self.chunk_gaps = 0  # media messages missing according to media.chunk
        self._last_sequence = 0
        self._last_chunk = 0
        self._sid_json = ""  # the streamSid already JSON-encoded, reused for every outbound frame

    # -- inbound -------------------------------------------------------------------------

    def receive(self, text: str | bytes) -> StreamEvent:
        """Parse one inbound frame. Raises MediaStreamError for anything Twilio would not send."""
        if isinstance(text, bytes):
            raise MediaStreamError("binary frame (Media Streams frames are JSON text)")
        try:
            message = json.loads(text)
        except ValueError:
            raise MediaStreamError("frame is not valid JSON") from None
        if not isinstance(message, dict):
            raise MediaStreamError("frame is not a JSON object")
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
                raise MediaStreamError("mark without mark.name")
            return MarkEchoed(mark["name"])
        if event == "dtmf":
            dtmf = message.get("dtmf")
            if not isinstance(dtmf, dict) or not isinstance(dtmf.get("digit"), str):
                raise MediaStreamError("dtmf without dtmf.digit")
            return DtmfReceived(dtmf["digit"])
        if event == "stop":
            self.stopped = True
            stop = message.get("stop")
            call_sid = stop.get("callSid", "") if isinstance(stop, dict) else ""
            return StreamStopped(str(call_sid or self.call_sid or ""))
        raise MediaStreamError(f"unknown event {str(event)[:40]!r}")

    def _start(self, message: dict) -> StreamStarted:
        if self.stream_sid is not None:
            raise MediaStreamError("second start on one stream")
        start = message.get("start")
        if not isinstance(start, dict):
            raise MediaStreamError("start without start object", fatal=True)
        stream_sid = start.get("streamSid") or message.get("streamSid")
        call_sid = start.get("callSid")
        if not isinstance(stream_sid, str) or not stream_sid:
            raise MediaStreamError("start without streamSid", fatal=True)
        if not isinstance(call_sid, str) or not call_sid:
            raise MediaStreamError("start without callSid", fatal=True)
        media_format = start.get("mediaFormat") or {}
        if not isinstance(media_format, dict) or any(
            media_format.get(k) != v for k, v in EXPECTED_FORMAT.items()
        ):
            raise MediaStreamError(f"unsupported mediaFormat {media_format!r}"[:120], fatal=True)
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise MediaStreamError("customParameters is not an object", fatal=True)
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
            raise MediaStreamError("media without media.payload")
        try:
            payload = b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            raise MediaStreamError("media payload is not valid base64") from None
        chunk = _int(media.get("chunk", self._last_chunk + 1), "media.chunk")
        if chunk > self._last_chunk + 1 and self._last_chunk:
            self.chunk_gaps += chunk - self._last_chunk - 1
        self._last_chunk = max(chunk, self._last_chunk)
        self._track_sequence(message)
        self.media_in += 1
        return MediaReceived(payload, chunk, _int(media.get("timestamp", 0), "media.timestamp"))

    def _check_stream(self, message: dict) -> None:
        if self.stream_sid is None:
            raise MediaStreamError(f"{str(message.get('event'))[:20]} before start")
        if message.get("streamSid") != self.stream_sid:
            raise MediaStreamError("streamSid does not match this stream")
        self._track_sequence(message)

    def _track_sequence(self, message: dict) -> None:
        raw = message.get("sequenceNumber")
        if raw is None:
            return
        sequence = _int(raw, "sequenceNumber")
        if sequence > self._last_sequence + 1 and self._last_sequence:
            self.sequence_gaps += sequence - self._last_sequence - 1
        self._last_sequence = max(sequence, self._last_sequence)

    # -- outbound ------------------------------------------------------------------------

    def media(self, ulaw: bytes) -> str:
        """A `media` frame; callers send whole 20 ms frames so playback has no jitter."""
        if len(ulaw) % FRAME_BYTES:
            raise ValueError(f"outbound audio must be whole {FRAME_BYTES}-byte frames")
        # Formatted by hand: this runs for every outbound chunk and json.dumps costs more.
        payload = b64encode(ulaw).decode("ascii")
        return f'{{"event":"media","streamSid":{self._require_sid()},"media":{{"payload":"{payload}"}}}}'

    def mark(self, name: str) -> str:
        sid = self._require_sid()
        return f'{{"event":"mark","streamSid":{sid},"mark":{{"name":{json.dumps(name)}}}}}'

    def clear(self) -> str:
        return f'{{"event":"clear","streamSid":{self._require_sid()}}}'

    def _require_sid(self) -> str:
        if not self._sid_json:
            raise RuntimeError("no outbound frames before the stream has started")
        return self._sid_json
