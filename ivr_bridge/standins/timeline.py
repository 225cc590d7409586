"""A Twilio caller's timeline: every frame sent and message received, with timestamps.

All times are ``time.monotonic()`` seconds (on Linux the same clock in every process, so
a timeline can be joined with another process's stamps). Storage is ``array`` columns:
an append is one unboxed float, cheap enough for hundreds of callers in one process.

Marks and clears also store how many media (and marks) had arrived before them, which
orders them exactly against the media even when two stamps are equal.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right


class CallerTimeline:
    """What one caller sent and received, in order."""

    __slots__ = (
        "clear_after_marks",
        "clear_after_media",
        "clear_at",
        "dtmf",
        "frames_skipped",
        "mark_after_media",
        "mark_at",
        "mark_names",
        "media_at",
        "media_bytes",
        "scheduled_at",
        "sent_at",
        "sent_chunk",
        "started_at",
    )

    def __init__(self) -> None:
        self.started_at: float | None = None  # when `start` was sent
        # Media frames sent: chunk number, actual send time, time due on the 20 ms clock.
        self.sent_chunk = array("q")
        self.sent_at = array("d")
        self.scheduled_at = array("d")
        # Frames never sent: the frame clock fell more than RESYNC_SECONDS behind and restarted.
        self.frames_skipped = 0
        self.media_at = array("d")
        self.media_bytes = array("q")
        self.mark_at = array("d")
        self.mark_names: list[str] = []
        self.mark_after_media = array("q")
        self.clear_at = array("d")
        self.clear_after_media = array("q")
        self.clear_after_marks = array("q")
        self.dtmf: list[tuple[float, str]] = []

    def frame_sent(self, chunk: int, sent_at: float, scheduled_at: float) -> None:
        self.sent_chunk.append(chunk)
        self.sent_at.append(sent_at)
        self.scheduled_at.append(scheduled_at)

    def media(self, at: float, nbytes: int) -> None:
        self.media_at.append(at)
        self.media_bytes.append(nbytes)

    def mark(self, at: float, name: str) -> None:
        self.mark_at.append(at)
        self.mark_names.append(name)
        self.mark_after_media.append(len(self.media_at))

    def clear(self, at: float) -> None:
        self.clear_at.append(at)
        self.clear_after_media.append(len(self.media_at))
        self.clear_after_marks.append(len(self.mark_at))

    def sent_time(self, chunk: int) -> float | None:
        """When media chunk `chunk` was sent (chunks count from 1 with no gaps)."""
        index = chunk - 1
        if 0 <= index < len(self.sent_chunk) and self.sent_chunk[index] == chunk:
            return self.sent_at[index]
        return None

    def first_media_after(self, at: float) -> int | None:
        """Index of the first media received after `at`, or None."""
        index = bisect_right(self.media_at, at)
        return index if index < len(self.media_at) else None
