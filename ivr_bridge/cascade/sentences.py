"""Streamed text cut into sentences, so speech can start on the first one (sans-I/O)."""

from __future__ import annotations

import re

# A sentence ends at . ! ? (or their CJK forms) followed by space, unless the word before
# is a common abbreviation or a single letter (initials), or the dot sits in a number.
_END = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])[\"')\]]*\s+")
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "no", "vs", "etc", "e.g", "i.e", "approx", "inc", "ltd"}
)
MIN_CHARS = 12  # shorter pieces ("Yes.") are joined to the next: fewer synthesis calls, natural prosody
MAX_CHARS = 300  # a run-on sentence is cut at a comma or space rather than held back


class Sentences:
    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        """More text; the sentences now complete."""
        self._buffer += text
        out: list[str] = []
        start = 0
        for match in _END.finditer(self._buffer):
            candidate = self._buffer[start : match.start()].strip()
            last_word = candidate.rsplit(None, 1)[-1].rstrip(".!?").lower() if candidate else ""
            if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
                continue
            if len(candidate) < MIN_CHARS:
                continue
            out.append(candidate)
            start = match.end()
        self._buffer = self._buffer[start:]
        while len(self._buffer) > MAX_CHARS:
            cut = self._buffer.rfind(", ", 0, MAX_CHARS) + 1 or self._buffer.rfind(" ", 0, MAX_CHARS)
            cut = cut if cut > 0 else MAX_CHARS
            out.append(self._buffer[:cut].strip())
            self._buffer = self._buffer[cut:].lstrip()
        return out

    def flush(self) -> list[str]:
        """The end of the text: what is left, if anything."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []
