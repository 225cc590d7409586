"""NavTalk realtime (v2) over WebSocket: `NavTalkProtocol` (sans-I/O) and `NavTalkSession`.

Built to `shared/reference/providers.md` §3 and NavTalk's seed document. What is known and
what is not:
- Audio is PCM16 24 kHz both ways (no mu-law): converted with the FIR path. That reply
  audio arrives on the socket as `realtime.response.audio.delta` is documented only by the
  event's name (NavTalk's own samples take it from WebRTC); the stand-in and this module
  are built to the seed document, not yet checked against a live account.
- Events are `realtime.`-prefixed, with fields in `data` or at the top level and under
  alternative names (`delta`/`content`/`transcript`, `id`/`response_id`): every read
  tries them all.
- Barge-in is `realtime.input_audio_buffer.speech_started`. No cancel or truncate exists;
  audio deltas that follow it belong to the cut reply and are dropped until the caller's
  turn ends (`speech_stopped`) or a transcript of a new response begins; the next audio is
  a new reply.
- In-band events name why a connection ends: no balance, the license refused, too many
  connections (not retried); no GPU free, a backend error (retried).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
from base64 import b64decode, b64encode
from typing import Any
from urllib.parse import urlencode

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from ivr_bridge.audio import PCM16_24K, AudioFormat, Pcm
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    AssistantAudio,
    AssistantText,
    CallInfo,
    Closed,
    Interruption,
    ProviderError,
    Ready,
    Skipped,
    TurnEvent,
    UserTranscript,
    VoiceEvent,
)
from ivr_bridge.settings import Settings

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 15.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
NOT_RETRIED = frozenset({"fail", "insufficient_balance", "connection_limit_exceeded"})
RETRIED = frozenset({"gpu_full", "backend_error"})


def _field(message: dict, *names: str) -> Any:
    """The first of `names` found in `data` or at the top level (fields move between them)."""
    data = message.get("data") if isinstance(message.get("data"), dict) else {}
    for name in names:
        for where in (data, message):
            if where.get(name) not in (None, ""):
                return where[name]
    return None


class NavTalkProtocol:
    def __init__(self, voice: str = "", prompt: str = "") -> None:
        self.voice = voice
        self.prompt = prompt
        self.ready = False
        self.reply = 0  # the reply number of the audio now arriving
        self.muted = False  # after a barge-in: deltas are the cut reply's
        self.stale_deltas = 0
        self.ending = ""  # why the service said it is closing (connection event kind)
        self._cut_id = ""  # the response the caller talked over, when it had an id
        self._response_id = ""
        self._new_reply = True  # the next audio starts a reply

    @staticmethod
    def url(base: str, license_key: str, character: str, avatar_id: str) -> str:
        query = {"license": license_key}
        if avatar_id:
            query["avatarId"] = avatar_id
        elif character:
            query["name"] = character
        return f"{base}?{urlencode(query)}"

    def input_config(self) -> str:
        data = {k: v for k, v in (("voice", self.voice), ("prompt", self.prompt)) if v}
        return json.dumps({"type": "realtime.input_config", "data": data})

    @staticmethod
    def audio_message(pcm: bytes) -> str:
        return json.dumps(
            {"type": "realtime.input_audio_buffer.append", "data": {"audio": b64encode(pcm).decode()}}
        )

    def receive(self, raw: str | bytes) -> list[VoiceEvent]:
        if isinstance(raw, bytes):
            return []  # the samples expect binary frames (avatar media): ignored
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return [Skipped("not JSON", "not_json")]
        if not isinstance(message, dict):
            return [Skipped("not a JSON object", "not_object")]
        kind = str(message.get("type", ""))
        if kind == "realtime.response.audio.delta":
            return self._audio(message)
        if kind == "realtime.input_audio_buffer.speech_started":
            self.muted, self._cut_id = True, self._response_id
            return [Interruption("caller speech (NavTalk)")]
        if kind == "realtime.input_audio_buffer.speech_stopped":
            self.muted, self._new_reply = False, True
            return [TurnEvent("end")]
        if kind in ("realtime.response.audio_transcript.delta", "realtime.response.audio_transcript.done"):
            response = str(_field(message, "response_id", "id") or "")
            if response and response != self._cut_id:
                self.muted = False
            if response and response != self._response_id:
                self._new_reply, self._response_id = True, response
            if kind.endswith(".done"):
                text = str(_field(message, "transcript", "content", "delta") or "")
                return [AssistantText(text, True, response, self.reply)]
            return []
        if kind == "realtime.conversation.item.input_audio_transcription.completed":
            return [UserTranscript(str(_field(message, "content", "transcript") or ""), True)]
        if kind == "realtime.session.updated":
            self.ready = True
            return [Ready("ready")]
        if kind.startswith("conversation.connected."):
            what = kind.removeprefix("conversation.connected.")
            if what in ("success", "warning"):
                return []
            self.ending = what
            return [ProviderError(what, str(_field(message, "message") or "")[:200])]
        if kind.endswith(".error"):
            return [ProviderError(kind[:60], str(_field(message, "message") or "")[:200])]
        return []  # webrtc signalling, session.created, the rest of the ladder

    def _audio(self, message: dict) -> list[VoiceEvent]:
        encoded = _field(message, "delta", "audio")
        if not isinstance(encoded, str):
            return [Skipped("audio.delta without delta", "missing_field")]
        response = str(_field(message, "response_id", "id") or "")
        if self.muted or (response and response == self._cut_id):
            self.stale_deltas += 1
            return []
        try:
            audio = b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return [Skipped("audio.delta is not base64", "bad_base64")]
        if self._new_reply or (response and response != self._response_id):
            self.reply += 1  # a new reply begins
            self._new_reply = False
            self._response_id = response or self._response_id
        samples = np.frombuffer(audio[: len(audio) // 2 * 2], dtype="<i2").astype(np.int16)
        return [AssistantAudio(Pcm(samples, PCM16_24K.rate), self.reply)]

    def classify(self, code: int, reason: str) -> Closed:
        retry = False if self.ending in NOT_RETRIED else True if self.ending in RETRIED else None
        return Closed(code, (reason or self.ending)[:120], retry)


class NavTalkSession:
    """One call's NavTalk session (`VoiceSession`)."""

    name = "navtalk"

    def __init__(self, settings: Settings, call: CallInfo | None = None) -> None:
        self._settings = settings
        details = (call or CallInfo()).sentence()  # into the prompt: the API has no variables
        prompt = "\n\n".join(part for part in (settings.navtalk_prompt, details) if part)
        self.protocol = NavTalkProtocol(settings.navtalk_voice, prompt)
        self._ws: ClientConnection | None = None
        self._pending: list[VoiceEvent] = []
        self._closed: Closed | None = None

    async def connect(self) -> AudioFormat:
        s = self._settings
        url = NavTalkProtocol.url(s.navtalk_url, s.navtalk_license, s.navtalk_character, s.navtalk_avatar_id)
        try:
            self._ws = await websockets.connect(
                url, compression=None, max_size=MAX_MESSAGE_BYTES, open_timeout=10, ping_interval=20
            )
        except InvalidStatus as exc:
            raise ConnectionError(
                f"voice API refused the connection: HTTP {exc.response.status_code}"
            ) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectionError(f"voice API unreachable: {type(exc).__name__}") from None
        try:
            await self._ws.send(self.protocol.input_config())
            async with asyncio.timeout(READY_TIMEOUT_S):
                while not self.protocol.ready:
                    events = self.protocol.receive(await self._ws.recv())
                    if any(isinstance(e, ProviderError) for e in events) and self.protocol.ending:
                        raise ConnectionError(f"voice API refused the session: {self.protocol.ending}")
                    self._pending += [e for e in events if not isinstance(e, Ready)]
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            raise ConnectionError(f"voice API closed the session at its start: {code}") from None
        except TimeoutError:
            raise ConnectionError("voice API sent no realtime.session.updated") from None
        return PCM16_24K  # the only format NavTalk documents, both ways

    async def send_audio(self, pcm: bytes) -> None:
        if self._ws is None or self._closed:
            return
        with contextlib.suppress(ConnectionClosed):
            await self._ws.send(NavTalkProtocol.audio_message(pcm))

    async def receive(self) -> VoiceEvent:
        while not self._pending and self._closed is None:
            assert self._ws is not None, "receive() before connect()"
            try:
                raw = await self._ws.recv()
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
                self._closed = self.protocol.classify(code, reason)
                break
            self._pending += self.protocol.receive(raw)
        if self._pending:
            return self._pending.pop(0)
        assert self._closed is not None
        return self._closed

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(code)
        if self._closed is None:
            self._closed = Closed(code)
