"""What the cascade (speech in -> text -> dialogue -> text -> speech out) needs of its parts.

Three small interfaces, so a speech engine or a dialogue step is one module:
- `SpeechToText`: caller audio in (PCM16 at its `rate`), `Heard` transcripts out. The
  bridge decides when a turn ends and then calls `flush`.
- `TextToSpeech`: opens one `Synthesis` per bot reply; text goes in sentence by sentence as
  the dialogue step produces it, audio comes out as soon as the first sentence is spoken.
  A cut reply's synthesis is cancelled (VoxNexus has no cancel: its socket is closed).
- `Dialogue`: a caller's turn in, the bot's reply out as a stream of text pieces and
  actions; cancellable (the caller talked over it), and told what of its last reply the
  caller actually heard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from ivr_bridge.audio import Pcm


@dataclass(frozen=True, slots=True)
class Heard:
    """A transcript of caller speech: partial (may still change) or final (one sentence or
    the whole utterance; a turn may have several finals)."""

    text: str
    final: bool
    confidence: float | None = None
    # A final that completes what was flushed: the turn's transcript is whole. An engine that
    # finalises on its own (VoxNexus) sends `last=False` finals, then a last one when the
    # flush is done, so that no part of a turn is taken for the next one.
    last: bool = True


class SpeechToText(Protocol):
    rate: int  # the PCM16 sample rate `send` takes, known once `start` has returned

    async def start(self) -> None:
        """Open the recogniser. Raises ConnectionError (no secrets in its message)."""

    async def send(self, pcm: bytes) -> None:
        """Caller audio, PCM16 little-endian at `rate`."""

    async def flush(self) -> None:
        """The caller's turn has ended: finalise what is pending (a final `Heard` follows,
        possibly with empty text); the next audio starts a new utterance."""

    async def receive(self) -> Heard:
        """The next transcript. Raises ConnectionError once the recogniser has failed."""

    def expect(self, phrases: list[str]) -> None:
        """Focus recognition on these phrases (the current menu's choices); [] for free
        speech. A hint: recognisers that cannot use it ignore it."""

    async def close(self) -> None: ...

    # Optional, for recognisers that decode a whole turn at its end (`local`):
    #   def turn_may_end(self, maybe: bool) -> None
    # True when the caller has paused: what was sent may be the whole turn, so decoding can
    # begin and `flush` answer with it (the rest of the turn is the silence that ended it).
    # False when speech resumes: it was not.


class Synthesis(Protocol):
    """One bot reply being spoken."""

    async def add(self, text: str) -> None:
        """More of the reply's text: whole sentences (the cascade splits the stream)."""

    async def end(self) -> None:
        """No more text for this reply."""

    async def audio(self) -> Pcm | None:
        """The next chunk of speech; None once the reply's audio is complete.
        Raises ConnectionError if the engine failed."""

    async def cancel(self) -> None:
        """The caller talked over the reply: stop, and never yield its audio again."""


class TextToSpeech(Protocol):
    async def start(self) -> None:
        """Check the engine can speak (voice, credentials). Raises ConnectionError."""

    async def open(self) -> Synthesis: ...

    async def close(self) -> None: ...


class TurnKind(StrEnum):
    START = "start"  # the call has just been answered: the greeting
    SPEECH = "speech"  # the caller said `text`
    DIGITS = "digits"  # the caller pressed keys: `text` holds them ("1", "42#")
    NO_INPUT = "no_input"  # the caller said nothing for the no-input timeout after a prompt


@dataclass(frozen=True, slots=True)
class Turn:
    kind: TurnKind
    text: str = ""


@dataclass(frozen=True, slots=True)
class Act:
    """The dialogue wants the call ended or transferred, after what it said has played:
    `action` is "hangup" or "transfer:<E.164 number or sip: URI>" (`AgentAction`'s)."""

    action: str


class Dialogue(Protocol):
    """The step between what the caller said and what the bot says."""

    async def start(self) -> None:
        """Check what the step needs (a reachable endpoint is not required). Raises
        ConnectionError."""

    def respond(self, turn: Turn) -> AsyncIterator[str | Act]:
        """The bot's reply to `turn`, streamed: text pieces (any size; the cascade finds
        the sentences) and at most one `Act`, last. Cancelled (the iterator closed) when
        the caller talks over it."""

    def heard(self, said: str, heard: str) -> None:
        """The caller cut the bot's last reply: of `said`, only `heard` reached them (for
        dialogue history)."""

    def expected(self) -> list[str]:
        """Phrases the dialogue expects next (menu choices), for `SpeechToText.expect`;
        [] when any speech is expected."""

    async def close(self) -> None: ...
