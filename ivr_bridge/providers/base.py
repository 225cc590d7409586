"""What every voice API looks like to a call: one small interface and its events.

A provider module holds a sans-I/O protocol class (messages in, events out) and a
`VoiceSession` that runs it over the network. The call never sees provider messages,
only these events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ivr_bridge.audio import AudioFormat, Pcm, Ulaw

# Close codes of the upstream socket (RFC 6455 and NextEVI's 4xxx), for log lines.
NORMAL_CLOSE = 1000
# Closes worth a retry by RFC 6455's meaning: going away, abnormal closure, server error.
# A provider adds its own (Closed.retry: NextEVI's 4004 rate limit) or refuses them.
RETRYABLE_CLOSE_CODES = frozenset({1001, 1006, 1011})


@dataclass(frozen=True, slots=True)
class Ready:
    """The voice API accepted the session and its settings."""

    detail: str = ""


@dataclass(frozen=True, slots=True)
class AssistantAudio:
    """Speech for the caller. `response` numbers the reply it belongs to (from 1). `pcm` is
    PCM16 at its own rate, or `Ulaw` already in the phone's format (re-framed only)."""

    pcm: Pcm | Ulaw
    response: int


@dataclass(frozen=True, slots=True)
class Interruption:
    """The caller talked over the bot: stop its speech now (barge-in)."""

    reason: str


@dataclass(frozen=True, slots=True)
class UserTranscript:
    """The caller's words. A final one ends the caller's turn, unless the API marks the
    turn's end itself (`TurnEvent("end")`) and transcribes apart from its reply, so that the
    words may arrive while the reply plays (OpenAI Realtime, NavTalk): `ends_turn=False`."""

    text: str
    final: bool
    ends_turn: bool = True


@dataclass(frozen=True, slots=True)
class AssistantText:
    """Words of a bot reply. `response` numbers the reply as `AssistantAudio` does (0:
    unknown); a final piece may repeat the whole text or carry only its last words."""

    text: str
    final: bool
    response_id: str = ""
    response: int = 0


@dataclass(frozen=True, slots=True)
class Emotions:
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TurnEvent:
    kind: str  # "start" | "end"
    turn_id: str = ""


@dataclass(frozen=True, slots=True)
class TurnTiming:
    """How long a turn took, stage by stage (a cascade's own turns): the caller stopped
    speaking -> final transcript (`recognised_ms`) -> first text of the dialogue step
    (`answered_ms`) -> first bot audio (`spoken_ms`); `total_ms` is the whole."""

    recognised_ms: float
    answered_ms: float
    spoken_ms: float
    total_ms: float


@dataclass(frozen=True, slots=True)
class AgentAction:
    """The agent asked to end the call or hand it to a number (its `end_call` or
    `transfer_call` tool): carried out through call control, after its sentence has played."""

    action: str  # "hangup" | "transfer:<E.164 or sip: URI>"


# The tools every agent is offered (OpenAI) or may define (ElevenLabs client tools).
END_CALL_TOOL = "end_call"
TRANSFER_CALL_TOOL = "transfer_call"


@dataclass(frozen=True, slots=True)
class ProviderError:
    code: str
    message: str


# Why a voice API message was skipped: one fixed set for every provider, so it can label
# a metric (`ivr_bad_input_total{source="voice_api",kind}`).
SKIP_KINDS = ("binary", "not_json", "not_object", "unknown_type", "missing_field", "bad_base64", "bad_wav")


@dataclass(frozen=True, slots=True)
class Skipped:
    """A message that was malformed or could not be decoded; logged and counted, call goes on.

    `kind` names the fault from a small fixed set (a metric label); `reason` says more.
    """

    reason: str
    kind: str = "malformed"


@dataclass(frozen=True, slots=True)
class Closed:
    """The voice API ended the session; `code` is the WebSocket close code."""

    code: int
    reason: str = ""
    retry: bool | None = None  # the provider's own verdict; None: RETRYABLE_CLOSE_CODES decide
    renew: bool = False  # the provider's session cap was reached: a new session, not a failure
    ended: bool = False  # the API ended the conversation on purpose, whatever the code says

    @property
    def normal(self) -> bool:
        """A normal end of the session: 1000, unless the provider knows it ended in failure
        (e.g. NavTalk's balance running out before a 1000), or any close the provider knows
        for a deliberate end (`ended`)."""
        return self.ended or (self.code == NORMAL_CLOSE and self.retry is None)

    @property
    def retryable(self) -> bool:
        return self.retry if self.retry is not None else self.code in RETRYABLE_CLOSE_CODES


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the agent may know of the call it answers (Twilio's start and the webhook's
    parameters): for its dynamic variables or instructions, where the API allows."""

    call_sid: str = ""
    caller: str = ""  # the caller's number (From)
    called: str = ""  # the number called (To)
    parameters: dict[str, str] = field(default_factory=dict)  # the <Parameter>s of the stream

    def variables(self) -> dict[str, str]:
        """The details as flat string variables (ElevenLabs' dynamic_variables)."""
        given = {"call_sid": self.call_sid, "caller_number": self.caller, "called_number": self.called}
        return {k: v for k, v in ({**given, **self.parameters}).items() if v}

    def sentence(self) -> str:
        """The details as a line for an agent's instructions."""
        parts = [f"{name.replace('_', ' ')}: {value}" for name, value in self.variables().items()]
        return "The call: " + "; ".join(parts) + "." if parts else ""


VoiceEvent = (
    Ready
    | AssistantAudio
    | Interruption
    | UserTranscript
    | AssistantText
    | Emotions
    | TurnEvent
    | ProviderError
    | AgentAction
    | TurnTiming
    | Skipped
    | Closed
)


class VoiceSession(Protocol):
    """One call's session with a voice API: caller audio in the format it negotiated, events out."""

    name: str

    async def connect(self) -> AudioFormat | None:
        """Open the session and return the format `send_audio` takes, as the API acknowledged
        it (mu-law 8 kHz passes the caller's audio through untouched; None: PCM16 24 kHz).
        Raises ConnectionError (message without secrets) on failure."""

    async def send_audio(self, pcm: bytes) -> None:
        """Caller speech, in the negotiated format."""

    # Optional, found with getattr: `audio_sender() -> Callable[[bytes], None] | None`, a
    # function that sends caller speech as `send_audio` does but at once, returned only
    # while the session can send without waiting (connected, not held by flow control).
    # It lets the call send a caller's frame from the socket's read callback.

    async def receive(self) -> VoiceEvent:
        """The next event. Safe to cancel. Returns Closed once, then keeps returning it."""

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        """Close the session (idempotent)."""


# -- the registry's view of a provider ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable of a provider's settings (see `setting`)."""

    env: str
    required: bool = False  # when this provider is the one in use
    secret: bool = False  # never shown: not in repr, logs or the settings summary
    kind: str = "text"  # "text", "ws_url", "http_url", or "text_or_file" (`@path` reads a file)


def setting(
    env: str, default: str = "", *, required: bool = False, secret: bool = False, kind: str = "text"
) -> Any:
    """A field of a provider's settings dataclass, read from the variable `env`."""
    return field(
        default=default, repr=not secret, metadata={"variable": Variable(env, required, secret, kind)}
    )


@dataclass(frozen=True, slots=True)
class Provider:
    """A voice API as the bridge knows it: its name (`IVR_PROVIDER`), its session class, its
    settings (a frozen dataclass of `setting` fields, or None), the variable whose being set
    makes it the provider in use when `IVR_PROVIDER` is unset, and its stand-in's module
    (with `run(args)`, for `ivr-bridge stub-voice-api --provider NAME`), and the API's
    limit on one session's length."""

    name: str
    session: Callable[..., VoiceSession]
    settings: type | None = None
    credential: str = ""
    standin: str = ""
    describe: Callable[[Any], str] = lambda settings: "-"  # for the settings summary line
    # The API's own limit on one session, renewed before it is reached; None: none known
    # (the API ends a conversation itself, and a new session would start a new one).
    session_cap_s: float | None = None
    # Its variables' own prefix: a misspelt one under it is warned about at start-up.
    prefix: str = ""
    # How much caller audio goes in one upstream message: small is sooner at the API, large
    # is fewer messages (less CPU). IVR_UPSTREAM_CHUNK_MS overrides.
    upstream_chunk_ms: int = 100
    # A cascade of the bridge's own (speech-to-text, dialogue step, text-to-speech): the
    # dialogue settings apply (cascade.settings).
    cascade: bool = False
