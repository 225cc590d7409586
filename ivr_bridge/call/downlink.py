"""Voice API -> caller: the bot's replies as whole 20 ms mu-law frames, each chunk followed
by a mark (Twilio's playback clock), and barge-in.

Sans-I/O: each method returns the Twilio messages to send, in order; the transcript lines
it settles (what the caller heard of a reply) wait in `lines` for the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass

from ivr_bridge.audio import BotAudio, Pcm, Ulaw
from ivr_bridge.media_stream import MediaStream
from ivr_bridge.playback import MarkResult, Playback, Response
from ivr_bridge.transcript import Transcript, TranscriptLine

from .report import CallStats

ULAW_RATE = 8000
# The last few ms of a reply wait in the resampler and frame buffer for more audio. They
# are flushed shortly before Twilio would run out of audio, or after a pause in the reply.
TAIL_MARGIN_S = 0.06
TAIL_IDLE_S = 0.25


@dataclass(frozen=True, slots=True)
class Cut:
    """What a barge-in cut: the reply that was playing, and the unplayed audio dropped."""

    reply: Response | None
    reply_number: int  # the voice session's number for it
    dropped_ms: int


class Downlink:
    def __init__(self, stream: MediaStream, words: Transcript, stats: CallStats) -> None:
        self.playback = Playback()
        self.lines: list[TranscriptLine] = []
        self._stream = stream
        self._words = words
        self._stats = stats
        self._audio = BotAudio()
        self.reply: Response | None = None  # the reply now playing
        self.tail_pending = False  # the converter holds the end of the reply: flush it in time
        self._reply_number = 0  # the voice session's number for the reply now playing
        self._dropped_through = 0  # replies up to this number were interrupted: drop their audio
        self._playout_end = 0.0  # when Twilio will have played all we sent (loop clock)
        self._last_audio_at = 0.0

    @property
    def audible(self) -> bool:
        """Something the bot said may still be playing, or is about to."""
        return self.tail_pending or self.playback.speaking

    def in_reply(self, now: float) -> bool:
        """The caller may be hearing a reply: audible, or between two chunks of one still
        arriving (paced in real time, the queue can run dry for a moment mid-reply)."""
        return self.audible or (self.reply is not None and now - self._last_audio_at < TAIL_IDLE_S)

    @property
    def tail_deadline(self) -> float | None:
        """When the held end of the reply must go (`finish`), or None."""
        if not self.tail_pending:
            return None
        return max(self._playout_end - TAIL_MARGIN_S, self._last_audio_at + TAIL_IDLE_S)

    def dropped(self, reply: int) -> bool:
        """Audio of this reply is dropped: the caller talked over it."""
        return reply <= self._dropped_through

    def speak(self, reply: int, audio: Pcm | Ulaw, now: float) -> list[str]:
        if self.dropped(reply):
            return []
        out: list[str] = []
        if reply != self._reply_number or self.reply is None:
            out += self.finish(now)
            self._reply_number = reply
            self.reply = self.playback.start_response()
            self._words.reply_speech(reply, self.reply)
        out += self._frames(self._audio.process(audio), now)
        self.tail_pending = True
        self._last_audio_at = now
        return out

    def finish(self, now: float) -> list[str]:
        """Flush the audio still in the converter so the reply's last words play.

        The reply stays current: if more of it arrives after all (a late chunk), it goes on
        as the same reply, its filter restarting from silence.
        """
        if not self.tail_pending:
            return []
        self.tail_pending = False
        out = self._frames(self._audio.flush(), now)
        if self.reply is not None and self.reply.marks_pending == 0:
            self._settle(self.reply)  # its last mark came back before the tail went
        return out

    def mark_echoed(self, name: str) -> MarkResult:
        mark = self.playback.echoed(name)
        if mark.response is not None and mark.response.marks_pending == 0:
            self._settle(mark.response)
        return mark

    def cut(self) -> Cut:
        """Barge-in, once Twilio has been told to `clear`: forget the unplayed audio and
        drop whatever still arrives of the cut reply."""
        self._audio.reset()
        if self.reply is not None:
            # Cut even when nothing was queued at the handset (a gap between chunks of a
            # reply still arriving): what had not been sent will never be heard.
            self.reply.interrupted = True
        cut = Cut(self.reply, self._reply_number, self.playback.cleared())
        self._dropped_through = self._reply_number
        self.reply = None
        self.tail_pending = False
        self._playout_end = 0.0
        self._settle(None)
        return cut

    def caller_took_turn(self) -> None:
        """The caller spoke while the bot was silent: a turn, not a barge-in (nothing to
        clear), but the reply in hand is over."""
        self._dropped_through = self._reply_number

    def new_session(self, now: float) -> list[str]:
        """A new voice session numbers its replies from 1 again."""
        out = self.finish(now)
        self._words.new_session()
        self._reply_number = self._dropped_through = 0
        self.reply = None
        return out

    def take_lines(self) -> list[TranscriptLine]:
        lines, self.lines = self.lines, []
        return lines

    def _frames(self, ulaw: bytes, now: float) -> list[str]:
        if not ulaw or self.reply is None:
            return []
        self._playout_end = max(self._playout_end, now) + len(ulaw) / ULAW_RATE
        mark = self.playback.sent(self.reply, len(ulaw), due=self._playout_end)
        self._stats.frames_out += len(ulaw) // 160
        self._stats.bytes_out += len(ulaw)
        return [self._stream.media(ulaw), self._stream.mark(mark)]

    def _settle(self, reply: Response | None) -> None:
        self.lines += self._words.settle(reply, tail_pending=self.tail_pending)
