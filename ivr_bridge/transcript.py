"""The call's words: what the caller said and what of each bot reply they really heard.

A bot reply's text usually arrives before its speech, and the caller may talk over it.
So a reply's line is written once it is settled: its speech has all played (every mark
echoed, the converter's tail sent) with its text complete, or it was cut by a barge-in.
How much was heard comes from the playback clock (`playback.py`); the words heard of a cut
reply are estimated from that share of its speech, cut back to whole words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ivr_bridge.playback import Response

# Speech of a cut reply that never arrived is estimated from its text at a typical speaking
# rate (about 14 characters a second), so the share heard is not overstated.
MS_PER_CHAR = 70


@dataclass(slots=True)
class TranscriptLine:
    at: float  # seconds since the call started
    role: str  # "user" | "assistant" | "dtmf"
    text: str
    # Bot replies only: how much of the reply's speech was sent and heard.
    heard_text: str | None = None
    heard_ms: int = 0
    sent_ms: int = 0
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        line: dict[str, Any] = {"role": self.role, "text": self.text}
        if self.role == "assistant":
            line |= {
                "heard_text": self.heard_text,
                "heard_ms": self.heard_ms,
                "sent_ms": self.sent_ms,
                "interrupted": self.interrupted,
            }
        return line


@dataclass(slots=True)
class _Reply:
    at: float
    text: str = ""
    final: bool = False
    response: Response | None = None  # its speech, once some was sent
    written: bool = False

    @property
    def played_out(self) -> bool:
        r = self.response
        return r is not None and r.marks_pending == 0 and r.heard_bytes >= r.sent_bytes


def heard_part(text: str, heard_ms: int, total_ms: int) -> str:
    """The words of `text` spoken in its first `heard_ms` of `total_ms`, whole words only."""
    if heard_ms <= 0 or total_ms <= 0:
        return ""
    if heard_ms >= total_ms:
        return text
    cut = len(text) * heard_ms // total_ms
    if cut < len(text) and not text[cut].isspace():
        cut = text.rfind(" ", 0, cut) + 1  # back to the end of the last whole word
    return text[:cut].rstrip()


class Transcript:
    """Collects a call's lines. Methods return the lines they settle, for the call's events."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.lines: list[TranscriptLine] = []
        self._clock = clock  # seconds since the call started
        self._numbered: dict[int, _Reply] = {}  # this voice session's replies, by number
        self._unwritten: list[_Reply] = []  # of all sessions, in order

    def user(self, text: str) -> TranscriptLine:
        return self._add(TranscriptLine(self._clock(), "user", text))

    def dtmf(self, digit: str) -> TranscriptLine:
        return self._add(TranscriptLine(self._clock(), "dtmf", digit))

    def reply_text(self, number: int, text: str, final: bool) -> list[TranscriptLine]:
        """A piece of reply `number`'s text; a final piece may repeat all of it."""
        reply = self._reply(number)
        if reply is None:
            return []
        reply.text = text if reply.text and text.startswith(reply.text) else reply.text + text
        reply.final = reply.final or final
        return self.settle(reply.response) if final and reply.response is not None else []

    def reply_speech(self, number: int, response: Response) -> None:
        """Reply `number`'s speech plays as `response`."""
        reply = self._reply(number)
        if reply is not None:
            reply.response = response

    def settle(self, response: Response | None, *, tail_pending: bool = False) -> list[TranscriptLine]:
        """Write the lines of replies now settled: `response` played out or any cut reply.
        `tail_pending`: the converter still holds the end of the current reply's speech."""
        done = [
            r
            for r in self._unwritten
            if r.response is not None
            and (
                (r.response.interrupted and r.response.marks_pending == 0)
                or (r.final and r.played_out and not (tail_pending and r.response is response))
            )
        ]
        return [self._write(r) for r in done]

    def new_session(self) -> None:
        """A new voice session numbers its replies from 1 again."""
        self._numbered = {}

    def finish(self) -> list[TranscriptLine]:
        """The call is over: write every reply that has text, heard or not."""
        return [self._write(r) for r in list(self._unwritten) if r.text]

    def _reply(self, number: int) -> _Reply | None:
        if number <= 0:
            return None
        reply = self._numbered.get(number)
        if reply is None:
            reply = self._numbered[number] = _Reply(self._clock())
            self._unwritten.append(reply)
        return None if reply.written else reply  # later pieces of a written reply are ignored

    def _write(self, reply: _Reply) -> TranscriptLine:
        response = reply.response
        sent = response.sent_ms if response else 0
        heard = response.heard_ms if response else 0
        cut = bool(response and response.interrupted)
        # A cut reply's speech stopped arriving at the barge-in: estimate its full length.
        total = max(sent, len(reply.text) * MS_PER_CHAR) if cut else sent
        line = TranscriptLine(
            reply.at,
            "assistant",
            reply.text,
            heard_text=heard_part(reply.text, heard, total),
            heard_ms=heard,
            sent_ms=sent,
            interrupted=cut,
        )
        reply.written = True
        self._unwritten.remove(reply)
        return self._add(line)

    def _add(self, line: TranscriptLine) -> TranscriptLine:
        self.lines.append(line)
        return line
