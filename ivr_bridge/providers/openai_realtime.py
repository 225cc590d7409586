"""OpenAI Realtime (the GA interface) over WebSocket: `OpenAiRealtimeProtocol` (sans-I/O)
and `OpenAiRealtimeSession` (the socket).

The facts it is built on are in `shared/reference/providers.md` §2:
- The session asks for `audio/pcmu` both ways, so the caller's mu-law goes up untouched and
  the model's deltas come down untouched (re-framed only). The formats in force are the
  ones `session.updated` confirms, not the ones asked for: until then no caller audio is
  sent (the call buffers it), and a PCM answer is converted, never played as mu-law.
- `input_audio_buffer.speech_started` is the barge-in (server VAD cancels the response
  itself). Deltas of the cancelled response still arriving carry its reply number, which
  the call drops. What the caller heard of the cut reply goes back as
  `conversation.item.truncate`, clamped to the audio received for that item and skipped
  when none of it played; an error there is logged, never fatal. A reply may speak
  several items (a preamble, then the answer): the one being heard is truncated at the
  caller's place in it, and the later ones, unheard, are deleted.
- The caller's transcript is made apart from the reply and may arrive during it: the
  turn ends at `speech_stopped`.
- The beta names and values (`response.audio.delta`, `g711_ulaw`) are refused by the
  service and not used.
"""

from __future__ import annotations

import binascii
import json
import logging
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np

from ivr_bridge.audio import PCM16_24K, TWILIO_AUDIO, AudioFormat, Encoding, Pcm, Ulaw
from ivr_bridge.providers.base import (
    END_CALL_TOOL,
    TRANSFER_CALL_TOOL,
    AgentAction,
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
from ivr_bridge.settings import Settings, is_phone_target

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-realtime"
TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
# Errors that are part of normal barge-in handling, not faults.
BENIGN_ERRORS = frozenset({"response_cancel_not_active", "conversation_already_has_active_response"})
# The agent's ways to end a call, offered with every session (call control carries them out).
TOOLS = [
    {
        "type": "function",
        "name": END_CALL_TOOL,
        "description": "End the phone call, after your last sentence has been heard.",
        "parameters": {"type": "object", "properties": {}},
    },
    {
        "type": "function",
        "name": TRANSFER_CALL_TOOL,
        "description": "Hand the caller to another number or SIP address, after your last sentence.",
        "parameters": {
            "type": "object",
            "properties": {"to": {"type": "string", "description": "E.164 number (+15550100) or sip: URI"}},
            "required": ["to"],
        },
    },
]


def _format(spec: object) -> AudioFormat | None:
    """A GA format object (`{"type": "audio/pcmu"}`, `{"type": "audio/pcm", "rate": 24000}`)."""
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "audio/pcmu":
        return TWILIO_AUDIO
    if kind == "audio/pcm":
        rate = spec.get("rate", 24000)
        return AudioFormat(Encoding.PCM16, rate) if isinstance(rate, int) else None
    return None


@dataclass(slots=True)
class _Reply:
    number: int
    # Audio received per item, in the output format and in order: a response may speak
    # several items (a preamble, then the answer), each truncated on its own clock.
    items: dict[str, int] = field(default_factory=dict)
    words: str = ""  # its transcript so far: a cut reply may never get its `.done`


class OpenAiRealtimeProtocol:
    """One Realtime session's protocol state: messages in, events out; messages to send."""

    def __init__(self, voice: str = "", instructions: str = "") -> None:
        self.voice = voice
        self.instructions = instructions
        self.send_format: AudioFormat | None = None  # confirmed by session.updated
        self.receive_format: AudioFormat | None = None
        self.skipped = 0
        self.outbox: list[str] = []  # messages to send in answer (tool outputs)
        self._replies: dict[str, _Reply] = {}  # response_id -> its reply
        self._numbers: dict[int, _Reply] = {}
        self._count = 0

    # -- to the API ---------------------------------------------------------------------------

    @staticmethod
    def url(base: str, model: str) -> str:
        return f"{base}?{urlencode({'model': model or DEFAULT_MODEL})}"

    def session_update(self) -> str:
        session: dict[str, Any] = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "turn_detection": {
                        "type": "server_vad",
                        "create_response": True,
                        "interrupt_response": True,
                    },
                    "transcription": {"model": TRANSCRIPTION_MODEL},
                },
                "output": {"format": {"type": "audio/pcmu"}},
            },
        }
        session["tools"] = TOOLS
        session["tool_choice"] = "auto"
        if self.voice:
            session["audio"]["output"]["voice"] = self.voice
        if self.instructions:
            session["instructions"] = self.instructions
        return json.dumps({"type": "session.update", "session": session})

    @staticmethod
    def audio_message(audio: bytes) -> str:
        encoded = binascii.b2a_base64(audio, newline=False).decode("ascii")
        return f'{{"type":"input_audio_buffer.append","audio":"{encoded}"}}'

    def heard(self, reply: int, heard_ms: int) -> list[str]:
        """What the caller heard of `reply`, for the model's context: a
        `conversation.item.truncate` of the item they were hearing, at their place in that
        item (clamped to the audio received), and a `conversation.item.delete` of each later
        item of the reply, none of which they heard. Nothing when nothing of the reply played
        (the API refuses a truncate at 0) or it is unknown."""
        cut = self._numbers.get(reply)
        if cut is None or not cut.items or heard_ms <= 0 or self.receive_format is None:
            return []
        items = list(cut.items.items())
        start_ms = 0  # where each item begins in the reply
        for index, (item, received) in enumerate(items):
            item_ms = _duration_ms(received, self.receive_format)
            if heard_ms <= start_ms + item_ms or index == len(items) - 1:  # the one they were hearing
                end_ms = min(heard_ms - start_ms, item_ms)
                if end_ms <= 0:
                    return []
                truncate = {
                    "type": "conversation.item.truncate",
                    "item_id": item,
                    "content_index": 0,
                    "audio_end_ms": end_ms,
                }
                unheard = [
                    {"type": "conversation.item.delete", "item_id": later} for later, _ in items[index + 1 :]
                ]
                return [json.dumps(message) for message in [truncate, *unheard]]
            start_ms += item_ms
        return []

    # -- from the API -------------------------------------------------------------------------

    def receive(self, raw: str | bytes) -> list[VoiceEvent]:
        if isinstance(raw, bytes):
            return [self._skip("binary frame", "binary")]
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return [self._skip("not JSON", "not_json")]
        if not isinstance(message, dict):
            return [self._skip("not a JSON object", "not_object")]
        kind = message.get("type")
        if kind == "session.updated":
            return self._session_updated(message.get("session"))
        if kind == "response.output_audio.delta":
            return self._audio(message)
        if kind == "input_audio_buffer.speech_started":
            return [Interruption("caller speech (server VAD)")]
        if kind == "response.output_audio_transcript.delta":
            response = str(message.get("response_id", ""))
            reply = self._reply(response)
            reply.words += str(message.get("delta", ""))
            return [AssistantText(reply.words, False, response, reply.number)]
        if kind == "response.output_audio_transcript.done":
            response = str(message.get("response_id", ""))
            reply = self._reply(response)
            return [AssistantText(str(message.get("transcript", "")), True, response, reply.number)]
        if kind == "conversation.item.input_audio_transcription.completed":
            # Transcribed apart from the response, "before or after the Response events":
            # the turn ended at speech_stopped.
            return [UserTranscript(str(message.get("transcript", "")), final=True, ends_turn=False)]
        if kind == "input_audio_buffer.speech_stopped":
            return [TurnEvent("end", str(message.get("item_id", "")))]
        if kind == "error":
            error = message.get("error") if isinstance(message.get("error"), dict) else {}
            code = str(error.get("code") or error.get("type") or "error")[:60]
            if code in BENIGN_ERRORS:
                return []
            return [ProviderError(code, str(error.get("message", ""))[:200])]
        if kind == "session.created":
            return [Ready("created")]
        if kind == "response.function_call_arguments.done":
            return self._tool_call(message)
        return []  # the rest of the ladder carries nothing a phone call needs

    def _session_updated(self, session: object) -> list[VoiceEvent]:
        audio = session.get("audio") if isinstance(session, dict) else None
        inp = audio.get("input") if isinstance(audio, dict) else None
        out = audio.get("output") if isinstance(audio, dict) else None
        self.send_format = _format(inp.get("format")) if isinstance(inp, dict) else None
        self.receive_format = _format(out.get("format")) if isinstance(out, dict) else None
        return [Ready("ready")]

    def _audio(self, message: dict) -> list[VoiceEvent]:
        delta = message.get("delta")
        if not isinstance(delta, str):
            return [self._skip("output_audio.delta without delta", "missing_field")]
        try:
            audio = b64decode(delta, validate=True)
        except (binascii.Error, ValueError):
            return [self._skip("output_audio.delta is not base64", "bad_base64")]
        reply = self._reply(str(message.get("response_id", "")))
        item = str(message.get("item_id", ""))
        reply.items[item] = reply.items.get(item, 0) + len(audio)
        if self.receive_format == TWILIO_AUDIO:
            return [AssistantAudio(Ulaw(audio), reply.number)]
        rate = self.receive_format.rate if self.receive_format else PCM16_24K.rate
        samples = np.frombuffer(audio[: len(audio) // 2 * 2], dtype="<i2").astype(np.int16)
        return [AssistantAudio(Pcm(samples, rate), reply.number)]

    def _tool_call(self, message: dict) -> list[VoiceEvent]:
        """The agent's end_call / transfer_call: an AgentAction, and its output to send."""
        name, call_id = message.get("name"), str(message.get("call_id", ""))
        try:
            arguments = json.loads(message.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        to = str(arguments.get("to", "")) if isinstance(arguments, dict) else ""
        events: list[VoiceEvent] = []
        if name == END_CALL_TOOL:
            events, output = [AgentAction("hangup")], "the call will end after your last sentence"
        elif name == TRANSFER_CALL_TOOL and is_phone_target(to):
            events, output = [AgentAction(f"transfer:{to}")], f"transferring to {to} after your last sentence"
        else:
            output = f"error: no such tool or no valid 'to' ({str(name)[:40]})"
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        self.outbox.append(json.dumps({"type": "conversation.item.create", "item": item}))
        return events

    def _reply(self, response_id: str) -> _Reply:
        reply = self._replies.get(response_id)
        if reply is None:
            self._count += 1
            reply = self._replies[response_id] = self._numbers[self._count] = _Reply(self._count)
        return reply

    def _skip(self, reason: str, kind: str) -> Skipped:
        self.skipped += 1
        return Skipped(reason, kind)

    @staticmethod
    def classify(code: int, reason: str) -> Closed:
        """The 60-minute cap (1001 "Your session hit the maximum duration of 60 minutes.")
        is a renewal; drops (1006, 1011) are retried with a new session; the beta shape
        (4000) and other 4xxx are not (base.RETRYABLE_CLOSE_CODES)."""
        return Closed(code, reason[:120], renew=code == 1001 and "maximum duration" in reason)


def _duration_ms(nbytes: int, audio: AudioFormat) -> int:
    per_ms = audio.rate // 1000 * (1 if audio.encoding == Encoding.MULAW else 2)
    return nbytes // max(1, per_ms)


class OpenAiRealtimeSession(WebSocketSession):
    """One call's Realtime session (`VoiceSession`)."""

    name = "openai"
    protocol: OpenAiRealtimeProtocol

    def __init__(self, settings: Settings, call: CallInfo | None = None) -> None:
        # The call's details go into the instructions: the API has no variables.
        details = (call or CallInfo()).sentence()
        s: OpenAiSettings = settings.voice
        instructions = "\n\n".join(part for part in (s.instructions, details) if part)
        super().__init__(OpenAiRealtimeProtocol(s.voice, instructions))
        self._settings = s

    async def _url(self) -> str:
        return OpenAiRealtimeProtocol.url(self._settings.url, self._settings.model)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._settings.api_key}"}

    def _opening(self) -> list[str]:
        return [self.protocol.session_update()]

    def _negotiated(self) -> AudioFormat | None:
        if self.protocol.send_format is not None and self.protocol.receive_format is None:
            raise ConnectionError("voice API confirmed no output audio format")
        return self.protocol.send_format  # as session.updated confirmed it

    async def reply_heard(self, reply: int, heard_ms: int) -> None:
        """The caller talked over `reply` after hearing `heard_ms` of it: the model's context
        keeps only that."""
        for message in self.protocol.heard(reply, heard_ms):
            await self._send(message)


@dataclass(frozen=True)
class OpenAiSettings:
    api_key: str = setting("OPENAI_API_KEY", required=True, secret=True)
    model: str = setting("OPENAI_REALTIME_MODEL", DEFAULT_MODEL)
    voice: str = setting("OPENAI_REALTIME_VOICE")
    instructions: str = setting("OPENAI_REALTIME_INSTRUCTIONS", kind="text_or_file")
    url: str = setting("OPENAI_REALTIME_URL", "wss://api.openai.com/v1/realtime", kind="ws_url")


PROVIDER = Provider(
    "openai",
    OpenAiRealtimeSession,
    OpenAiSettings,
    credential="OPENAI_API_KEY",
    prefix="OPENAI_REALTIME_",  # (OPENAI_ is shared with OpenAI's own tools)
    standin="ivr_bridge.standins.openai_realtime",
    describe=lambda s: f"{s.model} at {s.url}",
    session_cap_s=3600.0,  # the service closes a session at 60 minutes
    upstream_chunk_ms=20,  # Twilio's frames as they come: its VAD hears the caller soonest
)
