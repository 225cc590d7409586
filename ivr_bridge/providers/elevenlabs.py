"""ElevenLabs agents (Conversational AI) over WebSocket: `ElevenLabsProtocol` (sans-I/O)
and `ElevenLabsSession` (the socket).

The facts it is built on are in `shared/reference/providers.md` §1:
- The audio formats are the agent's own (set in its configuration, not per call), known
  from `conversation_initiation_metadata`: until then no caller audio is sent. With
  `ulaw_8000` both ways the caller's audio goes up untouched and the agent's comes down
  untouched; `pcm_<rate>` is converted.
- Every `audio` carries the `event_id` of its turn (growing turn by turn): it is the reply
  number. On `interruption {event_id: N}` every later chunk with `event_id <= N` is
  dropped: chunks of the cut turn keep arriving after it.
- Each `ping` is answered at once by a `pong` with the same `event_id`.
- 1000 is the agent ending the call (or its maximum duration); 1008 a configuration or
  contract error (no retry); 1002 and 1011 operational failures (a new conversation is
  tried within the reconnect budget). An `error` event comes just before a close.
- A private agent (ELEVENLABS_API_KEY set) is reached through a signed URL fetched with
  the key, used exactly as returned.
"""

from __future__ import annotations

import binascii
import json
import logging
import re
from base64 import b64decode
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
import numpy as np

from ivr_bridge.audio import TWILIO_AUDIO, AudioFormat, Encoding, Pcm, Ulaw
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
    UserTranscript,
    VoiceEvent,
    setting,
)
from ivr_bridge.providers.websocket import WebSocketSession
from ivr_bridge.settings import Settings, is_phone_target

log = logging.getLogger(__name__)

RETRY_CODES = frozenset({1002, 1006, 1011})  # operational: a new conversation may work
NO_RETRY_CODES = frozenset({1008})  # contract or configuration: it would fail again
_FORMAT = re.compile(r"(pcm|ulaw)_(\d+)")
DEFAULT_INPUT = "pcm_16000"  # what the SDKs assume when the metadata leaves it out


def parse_format(text: object) -> AudioFormat | None:
    """`ulaw_8000` / `pcm_16000` -> AudioFormat (None for anything else)."""
    match = _FORMAT.fullmatch(str(text))
    if match is None:
        return None
    encoding = Encoding.MULAW if match[1] == "ulaw" else Encoding.PCM16
    return AudioFormat(encoding, int(match[2]))


class ElevenLabsProtocol:
    """One conversation's protocol state: messages in, events out, replies to send
    (`outbox`: the pongs)."""

    def __init__(self, dynamic_variables: dict[str, str] | None = None) -> None:
        self.dynamic_variables = dynamic_variables or {}
        self.send_format: AudioFormat | None = None
        self.receive_format: AudioFormat | None = None
        self.conversation_id = ""
        self.interrupted_through = 0  # audio of turns up to this event_id is stale
        self.stale_chunks = 0
        self.outbox: list[str] = []

    # -- to the API ---------------------------------------------------------------------------

    @staticmethod
    def url(base: str, agent_id: str) -> str:
        return f"{base}?{urlencode({'agent_id': agent_id})}"

    def initiation(self) -> str:
        message: dict[str, Any] = {"type": "conversation_initiation_client_data"}
        if self.dynamic_variables:
            message["dynamic_variables"] = self.dynamic_variables
        return json.dumps(message)

    @staticmethod
    def audio_message(audio: bytes) -> str:
        return f'{{"user_audio_chunk":"{binascii.b2a_base64(audio, newline=False).decode("ascii")}"}}'

    # -- from the API -------------------------------------------------------------------------

    def receive(self, raw: str | bytes) -> list[VoiceEvent]:
        if isinstance(raw, bytes):
            return [Skipped("binary frame", "binary")]
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return [Skipped("not JSON", "not_json")]
        if not isinstance(message, dict):
            return [Skipped("not a JSON object", "not_object")]
        kind = message.get("type")
        body = message.get(f"{kind}_event")
        body = body if isinstance(body, dict) else {}
        if kind == "audio":
            return self._audio(message, body)
        if kind == "ping":
            self.outbox.append(json.dumps({"type": "pong", "event_id": body.get("event_id")}))
            return []
        if kind == "conversation_initiation_metadata":
            self.conversation_id = str(body.get("conversation_id", ""))
            self.send_format = parse_format(body.get("user_input_audio_format", DEFAULT_INPUT))
            self.receive_format = parse_format(body.get("agent_output_audio_format"))
            return [Ready("ready")]
        if kind == "interruption":
            self.interrupted_through = max(self.interrupted_through, _int(body.get("event_id")))
            return [Interruption("caller speech (agent)")]
        if kind == "agent_response":
            text = str(body.get("agent_response", ""))
            return [AssistantText(text, True, response=_int(body.get("event_id")))]
        if kind == "user_transcript":
            return [
                UserTranscript(
                    str(message.get("user_transcription_event", {}).get("user_transcript", "")), True
                )
            ]
        if kind == "tentative_user_transcript":
            event = message.get("tentative_user_transcription_event", {})
            return [
                UserTranscript(
                    str(event.get("user_transcript", "")) if isinstance(event, dict) else "", False
                )
            ]
        if kind == "client_tool_call":
            return self._tool_call(message.get("client_tool_call"))
        if kind == "error":
            code = str(body.get("error_type") or body.get("code") or "error")[:60]
            return [ProviderError(code, str(body.get("message", ""))[:200])]
        return []  # vad scores, tool visibility, corrections (the marks say what was heard)...

    def _tool_call(self, call: object) -> list[VoiceEvent]:
        """A client tool the agent calls: end_call / transfer_call become an AgentAction;
        every call gets its `client_tool_result`."""
        call = call if isinstance(call, dict) else {}
        name, call_id = call.get("tool_name"), str(call.get("tool_call_id", ""))
        parameters = call.get("parameters") if isinstance(call.get("parameters"), dict) else {}
        to = str(parameters.get("to", ""))
        events: list[VoiceEvent] = []
        if name == END_CALL_TOOL:
            events, result, error = (
                [AgentAction("hangup")],
                "the call will end after your last sentence",
                False,
            )
        elif name == TRANSFER_CALL_TOOL and is_phone_target(to):
            events, result, error = [AgentAction(f"transfer:{to}")], f"transferring to {to}", False
        else:
            result, error = f"no such tool here, or no valid 'to': {str(name)[:40]}", True
        self.outbox.append(
            json.dumps(
                {"type": "client_tool_result", "tool_call_id": call_id, "result": result, "is_error": error}
            )
        )
        return events

    def _audio(self, message: dict, body: dict) -> list[VoiceEvent]:
        encoded = body.get("audio_base_64")
        if encoded is None and isinstance(message.get("audio"), dict):  # the legacy shape
            encoded = message["audio"].get("chunk")
        if not isinstance(encoded, str):
            return [Skipped("audio without audio_base_64", "missing_field")]
        turn = _int(body.get("event_id"))
        if turn and turn <= self.interrupted_through:
            self.stale_chunks += 1
            return []  # a chunk of the turn the caller cut off
        try:
            audio = b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return [Skipped("audio is not base64", "bad_base64")]
        out = self.receive_format
        if out == TWILIO_AUDIO:
            return [AssistantAudio(Ulaw(audio), turn)]
        rate = out.rate if out is not None else 16000
        samples = np.frombuffer(audio[: len(audio) // 2 * 2], dtype="<i2").astype(np.int16)
        return [AssistantAudio(Pcm(samples, rate), turn)]

    @staticmethod
    def classify(code: int, reason: str) -> Closed:
        # The agent's maximum duration is the end of the conversation, not a fault: 1000
        # (`max_duration_exceeded`) today, 1011 "Conversation has exceeded maximum duration"
        # in older sessions. Retrying would start a new conversation and greet the caller again.
        if "maximum duration" in reason or "max_duration" in reason:
            return Closed(code, reason[:120], ended=True)
        retry = True if code in RETRY_CODES else False if code in NO_RETRY_CODES else None
        return Closed(code, reason[:120], retry)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class ElevenLabsSession(WebSocketSession):
    """One call's conversation with an ElevenLabs agent (`VoiceSession`)."""

    name = "elevenlabs"
    protocol: ElevenLabsProtocol

    def __init__(self, settings: Settings, call: CallInfo | None = None) -> None:
        # The call's details as dynamic variables: the agent's prompt may use {{caller_number}}.
        super().__init__(ElevenLabsProtocol((call or CallInfo()).variables()))
        self._settings: ElevenLabsSettings = settings.voice

    async def _url(self) -> str:
        s = self._settings
        if not s.api_key:
            return ElevenLabsProtocol.url(s.url, s.agent_id)
        # A private agent: a signed URL, used exactly as returned.
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(
                    f"{s.api_url}/v1/convai/conversation/get-signed-url",
                    params={"agent_id": s.agent_id},
                    headers={"xi-api-key": s.api_key},
                ) as answer,
            ):
                if answer.status != 200:
                    raise ConnectionError(f"voice API refused a signed URL: HTTP {answer.status}")
                signed = (await answer.json(content_type=None)).get("signed_url")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ConnectionError(f"voice API unreachable for a signed URL: {type(exc).__name__}") from None
        if not isinstance(signed, str) or not signed.startswith(("ws://", "wss://")):
            raise ConnectionError("voice API answered no signed_url")
        return signed

    def _opening(self) -> list[str]:
        return [self.protocol.initiation()]

    def _negotiated(self) -> AudioFormat | None:
        if self.protocol.send_format is not None and self.protocol.receive_format is None:
            raise ConnectionError("voice API named no agent output audio format")
        return self.protocol.send_format  # from conversation_initiation_metadata


@dataclass(frozen=True)
class ElevenLabsSettings:
    agent_id: str = setting("ELEVENLABS_AGENT_ID", required=True)
    api_key: str = setting("ELEVENLABS_API_KEY", secret=True)  # set => a private agent (signed URL)
    url: str = setting("ELEVENLABS_URL", "wss://api.elevenlabs.io/v1/convai/conversation", kind="ws_url")
    api_url: str = setting("ELEVENLABS_API_URL", "https://api.elevenlabs.io", kind="http_url")


PROVIDER = Provider(
    "elevenlabs",
    ElevenLabsSession,
    ElevenLabsSettings,
    credential="ELEVENLABS_AGENT_ID",
    prefix="ELEVENLABS_",
    standin="ivr_bridge.standins.elevenlabs",
    describe=lambda s: f"agent {s.agent_id} ({'private' if s.api_key else 'public'}) at {s.url}",
    upstream_chunk_ms=20,  # as ElevenLabs' own Twilio example forwards them
)
