"""The playback clock: what the caller actually heard, from Twilio's mark echoes.

Twilio echoes a mark once the audio queued before it has played, and echoes every
pending mark at once when a `clear` flushes its buffer. So an echo proves playback
only if its mark was not pending at a clear. Each mark is named `r<response>.<seq>` and
remembers how much of its response had been sent when it was queued.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_PER_MS = 8  # 8 kHz mu-law


@dataclass(slots=True)
class Response:
    """One spoken reply of the bot, as sent to and heard by the caller."""

    number: int
    sent_bytes: int = 0
    heard_bytes: int = 0
    interrupted: bool = False
    marks_pending: int = 0

    @property
    def sent_ms(self) -> int:
        return self.sent_bytes // BYTES_PER_MS

    @property
    def heard_ms(self) -> int:
        return self.heard_bytes // BYTES_PER_MS


@dataclass(frozen=True, slots=True)
class MarkResult:
    response: Response | None  # None for a mark this call never sent
    played: bool  # False: flushed by a clear (or unknown), so nothing was heard


class Playback:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        # mark name -> (response, sent_bytes, when it is due to play); oldest first
        self._pending: dict[str, tuple[Response, int, float]] = {}
        self._flushed: set[str] = set()
        self._seq = 0

    @property
    def current(self) -> Response | None:
        return self.responses[-1] if self.responses else None

    @property
    def unplayed_ms(self) -> int:
        """Audio sent to Twilio whose marks have not come back yet."""
        return sum(r.sent_ms - r.heard_ms for r in self.responses[-2:] if r.marks_pending)

    @property
    def speaking(self) -> bool:
        """True while audio sent to Twilio may still be playing (marks not yet echoed)."""
        return bool(self._pending)

    def start_response(self) -> Response:
        response = Response(number=len(self.responses) + 1)
        self.responses.append(response)
        return response

    @property
    def oldest_due(self) -> float | None:
        """When the oldest mark still pending should have played (the `due` it was sent
        with), or None: Twilio is behind by the time past this."""
        for _, _, due in self._pending.values():
            return due
        return None

    def sent(self, response: Response, nbytes: int, due: float = 0.0) -> str:
        """Record audio sent for `response`, to have played by `due` (any clock); returns
        the name of the mark to send after it."""
        response.sent_bytes += nbytes
        self._seq += 1
        name = f"r{response.number}.{self._seq}"
        self._pending[name] = (response, response.sent_bytes, due)
        response.marks_pending += 1
        return name

    def cleared(self) -> int:
        """A `clear` was sent: every pending mark will come back flushed. Returns ms dropped."""
        dropped = 0
        for name, (response, _, _) in self._pending.items():
            self._flushed.add(name)
            response.interrupted = True
            response.marks_pending -= 1
            dropped = max(dropped, response.sent_bytes - response.heard_bytes)
        self._pending.clear()
        return dropped // BYTES_PER_MS

    def echoed(self, name: str) -> MarkResult:
        entry = self._pending.pop(name, None)
        if entry is None:
            if name in self._flushed:
                self._flushed.discard(name)
                return MarkResult(self._response_of(name), played=False)
            return MarkResult(None, played=False)
        response, sent_bytes, _ = entry
        response.marks_pending -= 1
        response.heard_bytes = max(response.heard_bytes, sent_bytes)
        return MarkResult(response, played=True)

    def _response_of(self, name: str) -> Response | None:
        try:
            number = int(name[1 : name.index(".")])
        except ValueError:
            return None
        return self.responses[number - 1] if 0 < number <= len(self.responses) else None
