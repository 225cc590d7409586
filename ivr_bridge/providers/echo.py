"""The `echo` voice engine: plays each caller utterance back. No network, no key.

It is the embedded default, so a fresh install answers calls, and it exercises the
whole bridge (turns, replies, barge-in) without a provider account. Its clock is the
caller's audio itself (Twilio streams 20 ms frames in real time, silence included), so
its decisions are deterministic for a given input.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ivr_bridge.audio import PCM16_24K, AudioFormat, Pcm
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    AssistantAudio,
    AssistantText,
    Closed,
    Interruption,
    Provider,
    Ready,
    UserTranscript,
    VoiceEvent,
)

SAMPLE_RATE = 24000
BLOCK = SAMPLE_RATE // 50  # 20 ms analysis blocks
SPEECH_RMS = 300.0  # about -40 dBFS: above a phone line's noise floor, below quiet speech
END_SILENCE_BLOCKS = 30  # 600 ms of silence ends an utterance
MIN_SPEECH_BLOCKS = 10  # 200 ms: shorter blips (clicks, breaths) are not utterances
PREROLL_BLOCKS = 5  # keep 100 ms before the first loud block so word onsets survive
MAX_UTTERANCE_BLOCKS = 50 * 15  # bound memory: utterances are cut at 15 s
REPLY_CHUNK = SAMPLE_RATE // 5  # replies go out in 200 ms chunks, one mark each


class EchoEngine:
    """Energy-based turn detection and playback of the utterance, sans I/O."""

    def __init__(self) -> None:
        self.clock = 0  # samples of caller audio seen
        self.response = 0
        self._pending = np.empty(0, dtype=np.int16)
        self._blocks: list[np.ndarray] = []
        self._speech_blocks = 0
        self._silent_run = 0
        self._in_utterance = False
        self._reply_until = 0  # caller-clock sample at which the current reply has played out

    def feed(self, pcm: bytes) -> list[VoiceEvent]:
        samples = np.frombuffer(pcm, dtype="<i2")
        if len(self._pending):
            samples = np.concatenate((self._pending, samples))
        whole = len(samples) - len(samples) % BLOCK
        self._pending = samples[whole:].copy()
        events: list[VoiceEvent] = []
        for start in range(0, whole, BLOCK):
            events.extend(self._block(samples[start : start + BLOCK]))
        return events

    def _block(self, block: np.ndarray) -> list[VoiceEvent]:
        self.clock += BLOCK
        loud = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) > SPEECH_RMS
        if not self._in_utterance:
            self._blocks.append(block)
            del self._blocks[:-PREROLL_BLOCKS]
            if not loud:
                return []
            self._in_utterance = True
            self._speech_blocks = 1
            self._silent_run = 0
            if self.clock < self._reply_until:
                self._reply_until = self.clock
                return [Interruption("caller spoke over the echo")]
            return []
        self._blocks.append(block)
        if loud:
            self._speech_blocks += 1
            self._silent_run = 0
        else:
            self._silent_run += 1
        if self._silent_run >= END_SILENCE_BLOCKS or len(self._blocks) >= MAX_UTTERANCE_BLOCKS:
            return self._end_utterance()
        return []

    def _end_utterance(self) -> list[VoiceEvent]:
        blocks = self._blocks[: len(self._blocks) - self._silent_run + 2]  # keep a short tail
        speech_blocks = self._speech_blocks
        self._blocks, self._in_utterance, self._silent_run = [], False, 0
        if speech_blocks < MIN_SPEECH_BLOCKS:
            return []
        utterance = np.concatenate(blocks)
        self.response += 1
        self._reply_until = self.clock + len(utterance)
        seconds = len(utterance) / SAMPLE_RATE
        events: list[VoiceEvent] = [
            UserTranscript(f"({seconds:.1f} s of speech)", final=True),
            AssistantText(f"(your {seconds:.1f} s of speech, played back)", True, "", self.response),
        ]
        for start in range(0, len(utterance), REPLY_CHUNK):
            chunk = Pcm(utterance[start : start + REPLY_CHUNK], SAMPLE_RATE)
            events.append(AssistantAudio(chunk, self.response))
        return events


class EchoSession:
    name = "echo"

    def __init__(self, settings: object = None, call: object = None) -> None:  # needs neither
        self.engine = EchoEngine()
        self._events: asyncio.Queue[VoiceEvent] = asyncio.Queue()
        self._closed: Closed | None = None

    async def connect(self) -> AudioFormat:
        self._events.put_nowait(Ready("echo"))
        return PCM16_24K

    async def send_audio(self, pcm: bytes) -> None:
        if self._closed is None:
            for event in self.engine.feed(pcm):
                self._events.put_nowait(event)

    async def receive(self) -> VoiceEvent:
        if self._closed is not None and self._events.empty():
            return self._closed
        return await self._events.get()

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self._closed is None:
            self._closed = Closed(code)
            self._events.put_nowait(self._closed)


PROVIDER = Provider("echo", EchoSession, describe=lambda s: "embedded: plays each utterance back")
