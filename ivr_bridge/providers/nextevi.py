"""NextEVI speech-to-speech WebSocket API.

`NextEviProtocol` is the sans-I/O half: server messages in, `VoiceEvent`s out, client
messages built as text. `NextEviSession` runs it over an `UpstreamSocket` (picows).
Message shapes: `shared/reference/nextevi-websocket-reference.txt`.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import math
import time
import uuid
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from ivr_bridge.audio import PCM16_24K, AudioFormat, WavError, decode_tts_audio
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    AssistantAudio,
    AssistantText,
    CallInfo,
    Closed,
    Emotions,
    Interruption,
    Provider,
    ProviderError,
    Ready,
    Skipped,
    TurnEvent,
    UserTranscript,
    VoiceEvent,
    setting,
)
from ivr_bridge.providers.upstream import UpstreamClosed, UpstreamSocket
from ivr_bridge.settings import Settings

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
RATE_LIMITED = 4004  # NextEVI's close for too many requests: back off and retry
KEEP_ALIVE_AFTER_S = 10.0  # idle time before a keep_alive; the API drops long-idle sessions
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a 1 MB audio chunk (the API's limit) in base64 JSON, with room
# Types seen from NextEVI's SDKs that carry nothing a phone call needs.
QUIET_TYPES = frozenset({"turn_complete", "idle_warning", "system_message"})
# Unknown message types are reported once each, up to this many per session; the set of
# types seen is bounded so a peer inventing new ones cannot grow it without end.
MAX_UNKNOWN_TYPES = 32
# Why a message was skipped: a fixed set, so it can label a metric.


def _envelope(kind: str, data: dict | None = None) -> str:
    message: dict = {"type": kind, "timestamp": time.time(), "message_id": str(uuid.uuid4())}
    if data is not None:
        message["data"] = data
    return json.dumps(message, separators=(",", ":"))


class NextEviProtocol:
    """One NextEVI session's protocol state.

    NextEVI's `tts_chunk` carries no response id, so replies are numbered here: a chunk
    that follows a turn boundary (final transcript, turn start/end, a new LLM generation)
    opens a new response. After an interruption, chunks are dropped until the next turn
    boundary: they belong to the reply the caller just talked over.
    """

    def __init__(self) -> None:
        self.response = 0
        self.stale_chunks = 0  # tts_chunks dropped because their reply was interrupted
        self.skipped = 0
        self._open = False
        self._muted = False
        self._generation: str | None = None
        self._unknown: set[str] = set()

    @staticmethod
    def url(base: str, connection_id: str, api_key: str, config_id: str, project_id: str = "") -> str:
        query = {"api_key": api_key, "config_id": config_id}
        if project_id:
            query["project_id"] = project_id
        return f"{base.rstrip('/')}/{connection_id}?{urlencode(query)}"

    @staticmethod
    def session_settings() -> str:
        return _envelope(
            "session_settings",
            {
                "emotion_detection": {"enabled": True},
                "turn_detection": {"enabled": True},
                "audio": {"sample_rate": SAMPLE_RATE, "channels": 1, "encoding": "linear16"},
            },
        )

    @staticmethod
    def keep_alive() -> str:
        return _envelope("keep_alive")

    def receive(self, message: str | bytes) -> list[VoiceEvent]:
        """Events for one server message; never raises: a bad message becomes `Skipped`."""
        if isinstance(message, bytes):
            return self._skip("binary message from the voice API", "binary")
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return self._skip("message is not valid JSON", "not_json")
        if not isinstance(msg, dict):
            return self._skip("message is not a JSON object", "not_object")
        raw_kind = msg.get("type")
        # Only strings name a type; anything else (a list, a number) is an unknown type.
        kind = raw_kind if isinstance(raw_kind, str) else repr(raw_kind)[:40]
        # The documents wrap payloads in `data`; NextEVI's SDKs send the same fields flat.
        data = msg.get("data")
        payload: dict = data if isinstance(data, dict) else msg

        if kind == "tts_chunk":
            return self._tts_chunk(payload.get("content", msg.get("content")))
        if kind in ("tts_interruption", "user_interruption"):
            self._muted, self._open = True, False
            return [Interruption(kind)]
        if kind == "llm_response_chunk":
            generation = str(payload.get("generation_id", ""))
            if generation != self._generation:
                self._boundary()
                self._generation = generation
            # The text comes ahead of its speech: it belongs to the reply that opens next.
            number = self.response if self._open else self.response + 1
            content, final = str(payload.get("content", "")), bool(payload.get("is_final"))
            return [AssistantText(content, final, generation, number)]
        if kind == "transcription":
            final = bool(payload.get("is_final"))
            if final:
                self._boundary()
            return [UserTranscript(str(payload.get("transcript", "")), final)]
        if kind in ("turn_start", "turn_end"):
            self._boundary()
            return [TurnEvent(kind.removeprefix("turn_"), str(payload.get("turn_id", "")))]
        if kind == "emotion_update":
            top = payload.get("top_emotions")
            entries = top if isinstance(top, list) else []
            return [
                Emotions(
                    [(str(e.get("name")), _score(e.get("score"))) for e in entries if isinstance(e, dict)]
                )
            ]
        if kind == "status":
            status = str(payload.get("status", ""))
            if status == "error":
                return [ProviderError("status", str(payload.get("details", ""))[:200])]
            return [Ready(status)] if status == "ready" else []
        if kind == "connection_metadata":
            return [Ready("connected")]
        if kind == "error":
            return [
                ProviderError(
                    str(payload.get("error_code", "unknown"))[:40],
                    str(payload.get("error_message", ""))[:200],
                )
            ]
        if kind in QUIET_TYPES:
            return []
        if kind[:40] not in self._unknown and len(self._unknown) < MAX_UNKNOWN_TYPES:
            self._unknown.add(kind[:40])
            return self._skip(f"unknown message type {kind[:40]!r}", "unknown_type")
        self.skipped += 1
        return []

    def _tts_chunk(self, content: object) -> list[VoiceEvent]:
        if self._muted:
            self.stale_chunks += 1
            return []
        if not isinstance(content, str):
            return self._skip("tts_chunk without content", "missing_field")
        try:
            audio = b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            return self._skip("tts_chunk content is not base64", "bad_base64")
        try:
            pcm = decode_tts_audio(audio)
        except WavError as exc:
            return self._skip(f"tts_chunk WAV rejected: {exc}", "bad_wav")
        if not len(pcm.samples):
            return []
        if not self._open:
            self.response += 1
            self._open = True
        return [AssistantAudio(pcm, self.response)]

    def _boundary(self) -> None:
        self._open = False
        self._muted = False

    def _skip(self, reason: str, kind: str) -> list[VoiceEvent]:
        self.skipped += 1
        return [Skipped(reason, kind)]


def _score(value: object) -> float:
    # A score that is not a finite number counts as 0 rather than failing the message.
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return score if math.isfinite(score) else 0.0


class NextEviSession:
    """A NextEVI session over an `UpstreamSocket`; the thin I/O edge around NextEviProtocol."""

    name = "nextevi"

    def __init__(
        self, settings: Settings, call: CallInfo | None = None, keep_alive_after: float = KEEP_ALIVE_AFTER_S
    ) -> None:
        call_sid = call.call_sid if call is not None else ""
        self._settings = settings
        self._keep_alive_after = keep_alive_after
        # Fresh per session; led by the call sid so the provider's logs can be matched to
        # Twilio's (only its letters and digits: it goes into the URL path).
        prefix = "".join(c for c in call_sid if c.isascii() and c.isalnum())[:40] or "ivr"
        self.connection_id = f"{prefix}-{uuid.uuid4()}"
        self.protocol = NextEviProtocol()
        self._ws: UpstreamSocket | None = None
        self._events: list[VoiceEvent] = []
        self._closed: Closed | None = None
        self._last_send = time.monotonic()
        self._keep_alive: asyncio.Task[None] | None = None

    async def connect(self) -> AudioFormat:
        s: NextEviSettings = self._settings.voice
        url = NextEviProtocol.url(s.url, self.connection_id, s.api_key, s.config_id, s.project_id)
        # The error never includes the URL: it carries the API key.
        self._ws = await UpstreamSocket.connect(url, max_message_bytes=MAX_MESSAGE_BYTES)
        # A session refused after the handshake (e.g. 4001) fails this send; receive()
        # then reports the close code.
        with contextlib.suppress(UpstreamClosed):
            await self._ws.send(NextEviProtocol.session_settings())
        self._last_send = time.monotonic()
        self._keep_alive = asyncio.create_task(self._keep_alive_loop(), name="nextevi-keep-alive")
        return PCM16_24K  # what session_settings asks for (NextEviProtocol.session_settings)

    async def send_audio(self, pcm: bytes) -> None:
        if self._ws is None or self._closed:
            return
        try:
            await self._ws.send(pcm)
        except UpstreamClosed:
            return  # receive() reports the close
        self._last_send = time.monotonic()

    def audio_sender(self) -> Callable[[bytes], None] | None:
        ws = self._ws
        if ws is None or self._closed or not ws.sends_now:
            return None
        return self._send_audio_now

    def _send_audio_now(self, pcm: bytes) -> None:
        assert self._ws is not None
        self._ws.send_now(pcm)
        self._last_send = time.monotonic()

    async def receive(self) -> VoiceEvent:
        while not self._events:
            if self._closed is not None:
                return self._closed
            assert self._ws is not None, "receive() before connect()"
            try:
                message = await self._ws.recv()
            except UpstreamClosed as exc:
                # The API's close, else the bridge's own (1009: a message over
                # MAX_MESSAGE_BYTES), else 1006: a connection that just died.
                code, reason = exc.code, exc.reason
                # 4004 (rate limit) is worth a retry; 4001-4003 (credentials, config, access) not.
                retry = True if code == RATE_LIMITED else False if code in (4001, 4002, 4003) else None
                self._closed = Closed(code, reason[:120], retry)
                return self._closed
            self._events = self.protocol.receive(message)
            self._events.reverse()  # pop() from the end keeps arrival order
        return self._events.pop()

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self._keep_alive is not None:
            self._keep_alive.cancel()
            await asyncio.gather(self._keep_alive, return_exceptions=True)
            self._keep_alive = None
        if self._ws is not None:
            await self._ws.close(code)

    async def _keep_alive_loop(self) -> None:
        assert self._ws is not None
        while True:
            idle = time.monotonic() - self._last_send
            if idle < self._keep_alive_after:
                await asyncio.sleep(self._keep_alive_after - idle)
                continue
            try:
                await self._ws.send(NextEviProtocol.keep_alive())
            except UpstreamClosed:
                return
            self._last_send = time.monotonic()


@dataclass(frozen=True)
class NextEviSettings:
    api_key: str = setting("NEXTEVI_API_KEY", required=True, secret=True)
    config_id: str = setting("NEXTEVI_CONFIG_ID", required=True)
    project_id: str = setting("NEXTEVI_PROJECT_ID")
    url: str = setting("NEXTEVI_URL", "wss://api.nextevi.com/ws/voice", kind="ws_url")


PROVIDER = Provider(
    "nextevi",
    NextEviSession,
    NextEviSettings,
    credential="NEXTEVI_API_KEY",
    prefix="NEXTEVI_",
    standin="ivr_bridge.standins.nextevi",
    describe=lambda s: f"config {s.config_id} at {s.url}",
    session_cap_s=3600.0,  # 60 minutes a session
    upstream_chunk_ms=100,  # its documents advise 100-200 ms messages
)
