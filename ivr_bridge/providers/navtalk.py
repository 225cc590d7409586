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

import binascii
import json
import logging
from base64 import b64decode, b64encode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import numpy as np

from ivr_bridge.audio import PCM16_24K, AudioFormat, Pcm
from ivr_bridge.providers.base import (
    AssistantAudio,
    AssistantText,
    CallInfo,
    Closed,
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
from ivr_bridge.providers.websocket import WebSocketSession
from ivr_bridge.settings import Settings

log = logging.getLogger(__name__)

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
        self._words, self._words_reply = "", 0  # the transcript so far, and its reply's number
        self.outbox: list[str] = []  # nothing is answered on this socket (the interface has it)

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
            # The words come ahead of their speech: they belong to the reply that opens next.
            number = self.reply + 1 if self._new_reply else self.reply
            if number != self._words_reply:
                self._words, self._words_reply = "", number
            if kind.endswith(".done"):
                text = str(_field(message, "transcript", "content", "delta") or "")
                return [AssistantText(text, True, response, number)]
            # Kept as they come: a cut reply gets no `.done`, and its words are on record.
            self._words += str(_field(message, "delta", "content", "transcript") or "")
            return [AssistantText(self._words, False, response, number)]
        if kind == "realtime.conversation.item.input_audio_transcription.completed":
            # Realtime's transcription, apart from the reply: the turn ended at speech_stopped.
            text = str(_field(message, "content", "transcript") or "")
            return [UserTranscript(text, True, ends_turn=False)]
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


class NavTalkSession(WebSocketSession):
    """One call's NavTalk session (`VoiceSession`)."""

    name = "navtalk"
    protocol: NavTalkProtocol

    def __init__(self, settings: Settings, call: CallInfo | None = None) -> None:
        details = (call or CallInfo()).sentence()  # into the prompt: the API has no variables
        s: NavTalkSettings = settings.voice
        prompt = "\n\n".join(part for part in (s.prompt, details) if part)
        super().__init__(NavTalkProtocol(s.voice, prompt))
        self._settings = s

    async def _url(self) -> str:
        s = self._settings
        return NavTalkProtocol.url(s.url, s.license, s.character, s.avatar_id)

    def _opening(self) -> list[str]:
        return [self.protocol.input_config()]

    def _negotiated(self) -> AudioFormat | None:
        if self.protocol.ending:
            raise ConnectionError(f"voice API refused the session: {self.protocol.ending}")
        return PCM16_24K if self.protocol.ready else None  # the only format NavTalk documents


@dataclass(frozen=True)
class NavTalkSettings:
    license: str = setting("NAVTALK_LICENSE", required=True, secret=True)
    character: str = setting("NAVTALK_CHARACTER")
    avatar_id: str = setting("NAVTALK_AVATAR_ID")
    voice: str = setting("NAVTALK_VOICE")
    prompt: str = setting("NAVTALK_PROMPT")
    url: str = setting("NAVTALK_URL", "wss://transfer.navtalk.ai/wss/v2/realtime-chat", kind="ws_url")

    def check(self) -> str | None:
        """Why these settings cannot work, or None."""
        if not (self.character or self.avatar_id):
            return "NAVTALK_CHARACTER or NAVTALK_AVATAR_ID is required when IVR_PROVIDER=navtalk"
        return None


PROVIDER = Provider(
    "navtalk",
    NavTalkSession,
    NavTalkSettings,
    credential="NAVTALK_LICENSE",
    prefix="NAVTALK_",
    standin="ivr_bridge.standins.navtalk",
    describe=lambda s: f"{s.avatar_id or s.character} at {s.url}",
)
