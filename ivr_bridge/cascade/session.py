"""The cascade as one voice session: caller audio -> speech-to-text -> end of turn -> a
dialogue step -> text-to-speech, sentence by sentence -> bot audio.

The bridge decides turn-taking and barge-in here (`cascade.turns`), since neither engine
reports them. A barge-in (confirmed caller speech while the bot is audible, or a key
pressed) cancels the dialogue step and the synthesis at once and emits `Interruption`;
the call clears Twilio and then reports, from the marks, how much of the reply the
caller heard (`reply_heard`), which cuts the bot's line in the dialogue's history.
Per turn it reports how long each stage took (`TurnTiming`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import numpy as np

from ivr_bridge.audio import AudioFormat, Encoding, Pcm
from ivr_bridge.cascade.engines import (
    Act,
    Dialogue,
    Heard,
    SpeechToText,
    Synthesis,
    TextToSpeech,
    Turn,
    TurnKind,
)
from ivr_bridge.cascade.sentences import Sentences
from ivr_bridge.cascade.settings import DialogueSettings
from ivr_bridge.cascade.turns import (
    SpeechBegan,
    SpeechConfirmed,
    SpeechDropped,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    Turns,
)
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    AgentAction,
    AssistantAudio,
    AssistantText,
    Closed,
    Interruption,
    ProviderError,
    Ready,
    TurnTiming,
    UserTranscript,
    VoiceEvent,
)
from ivr_bridge.transcript import MS_PER_CHAR

log = logging.getLogger(__name__)

FINAL_TIMEOUT_S = 5.0  # a recogniser that never finalises a turn: the turn is dropped


class CascadeSession:
    """`VoiceSession` of a speech-to-text engine, a dialogue step and a text-to-speech engine."""

    def __init__(
        self, name: str, stt: SpeechToText, tts: TextToSpeech, dialogue: Dialogue, tuning: DialogueSettings
    ) -> None:
        self.name = name
        self.stt, self.tts, self.dialogue = stt, tts, dialogue
        self.tuning = tuning
        self.turns: Turns | None = None
        self._events: asyncio.Queue[VoiceEvent] = asyncio.Queue()
        self._closed: Closed | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._finals: asyncio.Queue[Heard] = asyncio.Queue()
        self._discard_final = False  # the finals up to the next last one are a dropped burst's (a cough)
        self._keys = ""  # keys pressed that the dialogue has not taken yet
        self._drop_speech = False  # the speech turn under way was overtaken by a key
        self.response = 0
        self._said: dict[int, tuple[str, float]] = {}  # reply -> (its text, seconds of audio)
        self._listening_since = 0.0  # caller-audio time the bot last finished (no-input timer)
        self._waiting_for_input = False

    # -- VoiceSession ---------------------------------------------------------------------

    async def connect(self) -> AudioFormat:
        try:
            await self.stt.start()
            await self.tts.start()
            await self.dialogue.start()
        except ConnectionError:
            await self.close()
            raise
        self.turns = Turns(self.stt.rate, self.tuning.barge_in, self.tuning.end_silence)
        self._listener = asyncio.create_task(self._listen(), name="cascade-stt")
        self._events.put_nowait(Ready("ready"))  # the engines are up (preflight waits for this)
        return AudioFormat(Encoding.PCM16, self.stt.rate)

    async def send_audio(self, pcm: bytes) -> None:
        turns = self.turns
        if turns is None or self._closed is not None:
            return
        if self.response == 0 and not self._replying():
            # The greeting waits for the call's first audio, not for `connect`: a preflight
            # session never reaches a dialogue endpoint.
            self._start_reply(Turn(TurnKind.START), None)
        in_utterance = turns.in_speech
        may_end: bool | None = None
        for signal in turns.feed(pcm):
            if isinstance(signal, SpeechBegan):
                await self.stt.send(signal.audio)
            elif isinstance(signal, SpeechConfirmed):
                self._waiting_for_input = False
                if turns.bot_audible or self._replying():
                    self._interrupt("caller speech")
            elif isinstance(signal, SpeechEnded):
                await self.stt.send(pcm)
                self._end_turn(signal.at)
            elif isinstance(signal, SpeechDropped):
                await self.stt.flush()  # the recogniser starts afresh; its (empty) final is dropped
                self._discard_final = True
                self._drop_speech = False
            elif isinstance(signal, SpeechPaused | SpeechResumed):
                may_end = isinstance(signal, SpeechPaused)
        if in_utterance and turns.in_speech:
            await self.stt.send(pcm)
        if may_end is not None and (turn_may_end := getattr(self.stt, "turn_may_end", None)):
            # A local recogniser begins on the turn at the pause: its words are ready when the
            # turn ends, instead of a decode's time after it.
            turn_may_end(may_end)
        if self._waiting_for_input and self._silent_for(turns) >= self.tuning.no_input:
            self._waiting_for_input = False
            self._start_reply(Turn(TurnKind.NO_INPUT), None)

    async def send_dtmf(self, digit: str) -> None:
        """A key the caller pressed: it cuts the bot short, and is a turn of its own."""
        if self._closed is not None:
            return
        if self.turns is not None and (self.turns.bot_audible or self._replying()):
            self._interrupt("caller pressed a key")
        self._waiting_for_input = False
        # Keys win over speech, as in classic IVRs: words the caller was saying, or that
        # are still being recognised, are not answered after the key's reply has begun.
        finalising = self._turn_task is not None and not self._turn_task.done()
        self._drop_speech = finalising or (self.turns is not None and self.turns.in_speech)
        self._keys += digit
        self._start_reply(Turn(TurnKind.DIGITS), None)

    async def reply_heard(self, reply: int, heard_ms: int) -> None:
        """The caller cut reply `reply` after hearing `heard_ms` of it: the dialogue's history
        keeps only that much (by share of its words, the audio being spoken evenly). A reply
        still arriving is as long as its words at least (the transcript's own measure)."""
        said, seconds = self._said.get(reply, ("", 0.0))
        if not said:
            return
        seconds = max(seconds, len(said) * MS_PER_CHAR / 1000)
        share = min(1.0, heard_ms / 1000 / seconds)
        words = said.split()
        self.dialogue.heard(said, " ".join(words[: math.floor(len(words) * share)]))

    async def receive(self) -> VoiceEvent:
        if self._closed is not None and self._events.empty():
            return self._closed
        return await self._events.get()

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self._closed is not None:
            return
        self._closed = Closed(code)
        for task in (self._reply_task, self._turn_task, self._listener):
            if task is not None:
                task.cancel()
        for part in (self.stt, self.tts, self.dialogue):
            with contextlib.suppress(Exception):
                await part.close()
        self._events.put_nowait(self._closed)

    # -- turns ------------------------------------------------------------------------------

    def _silent_for(self, turns: Turns) -> float:
        """How long the line has been quiet (neither side talking, no reply on its way)."""
        if turns.in_speech or turns.bot_audible or self._replying():
            return 0.0
        return turns.clock - max(self._listening_since, turns.bot_until)

    def _replying(self) -> bool:
        return self._reply_task is not None and not self._reply_task.done()

    async def _listen(self) -> None:
        """Transcripts from the recogniser; finals are gathered until the turn ends."""
        while True:
            try:
                heard = await self.stt.receive()
            except ConnectionError as exc:
                self._fail("speech_to_text", str(exc))
                return
            if not heard.final:
                continue
            if self._discard_final:
                self._discard_final = not heard.last
                continue
            self._finals.put_nowait(heard)

    def _end_turn(self, stopped_at: float) -> None:
        loop = asyncio.get_running_loop()
        stopped = loop.time() - (self.turns.clock - stopped_at if self.turns else 0.0)
        if self._turn_task is not None and not self._turn_task.done():
            return  # still finalising the last turn: this speech joins it
        self._turn_task = asyncio.create_task(self._finish_turn(stopped), name="cascade-turn")

    async def _finish_turn(self, stopped: float) -> None:
        loop = asyncio.get_running_loop()
        await self.stt.flush()
        texts = []
        try:
            async with asyncio.timeout(FINAL_TIMEOUT_S):
                while not (heard := await self._finals.get()).last:
                    texts.append(heard.text)
                texts.append(heard.text)
        except TimeoutError:
            log.warning("%s: the recogniser gave no transcript within %g s", self.name, FINAL_TIMEOUT_S)
        text = " ".join(t.strip() for t in texts if t.strip())
        if self._drop_speech:
            self._drop_speech = False
            log.info("%s: a key overtook the caller's words %r: not answered", self.name, text[:80])
            return
        if not text:
            self._waiting_for_input = True  # noise, or nothing recognised: still the caller's turn
            return
        self._events.put_nowait(UserTranscript(text, True))
        self._start_reply(Turn(TurnKind.SPEECH, text), (stopped, loop.time()))

    # -- replies ----------------------------------------------------------------------------

    def _start_reply(self, turn: Turn, timing: tuple[float, float] | None) -> None:
        if self._replying():
            assert self._reply_task is not None
            self._reply_task.cancel()
        self._reply_task = asyncio.create_task(self._reply(turn, timing), name="cascade-reply")

    async def _reply(self, turn: Turn, timing: tuple[float, float] | None) -> None:
        """One reply: the dialogue's text, cut into sentences, spoken as it comes; then its
        `Act`, if any, once all of its audio has gone to the call."""
        loop = asyncio.get_running_loop()
        if turn.kind == TurnKind.DIGITS:
            # Every key not yet taken: one pressed before the last reply reached the
            # dialogue (it was cut short at once) joins this turn instead of being lost.
            turn, self._keys = Turn(TurnKind.DIGITS, self._keys), ""
        self.response += 1
        number = self.response
        try:
            synthesis = await self.tts.open()
        except asyncio.CancelledError:
            self._keys = (turn.text if turn.kind == TurnKind.DIGITS else "") + self._keys
            raise
        clock = _TurnClock(timing)
        pump = asyncio.create_task(self._pump(synthesis, number, clock), name="cascade-speech")
        sentences, said, act = Sentences(), list[str](), None
        replies = self.dialogue.respond(turn)
        try:
            async for piece in replies:
                if isinstance(piece, Act):
                    act = piece
                    continue
                if clock.first_text is None and piece.strip():
                    clock.first_text = loop.time()
                for sentence in sentences.feed(piece):
                    await self._speak(synthesis, number, said, sentence)
            # What the caller may answer is known now: before the prompt plays, so an answer
            # spoken over it is heard with the prompt's menu.
            self.stt.expect(self.dialogue.expected())
            for sentence in sentences.flush():
                await self._speak(synthesis, number, said, sentence)
            await synthesis.end()
            await pump
            if said:  # final once all of its audio is out: the call settles the line then
                self._events.put_nowait(AssistantText(" ".join(said), True, "", number))
            if act is not None:
                self._events.put_nowait(AgentAction(act.action))
            if self.turns is not None:
                self._listening_since = self.turns.clock
            self._waiting_for_input = act is None
        except ConnectionError as exc:
            self._fail("text_to_speech", str(exc))
        except asyncio.CancelledError:  # the caller talked over it, or the call is ending
            with contextlib.suppress(Exception):
                await synthesis.cancel()
            raise
        finally:
            pump.cancel()
            with contextlib.suppress(Exception):
                await replies.aclose()  # type: ignore[attr-defined]

    async def _speak(self, synthesis: Synthesis, number: int, said: list[str], sentence: str) -> None:
        """One sentence of reply `number` to the synthesiser; its words so far to the call
        (a reply cut mid-stream keeps the words that were said)."""
        said.append(sentence)
        text = " ".join(said)
        self._said[number] = (text, self._said.get(number, ("", 0.0))[1])
        self._events.put_nowait(AssistantText(text, False, "", number))
        await synthesis.add(sentence)

    async def _pump(self, synthesis: Synthesis, number: int, clock: _TurnClock) -> None:
        loop = asyncio.get_running_loop()
        seconds = 0.0
        while (pcm := await synthesis.audio()) is not None:
            if seconds == 0.0 and (timing := clock.timing(loop.time())) is not None:
                self._events.put_nowait(timing)
            duration = len(pcm.samples) / pcm.sample_rate
            seconds += duration
            self._said[number] = (self._said.get(number, ("", 0.0))[0], seconds)
            if self.turns is not None:
                self.turns.bot_speaks(duration, _level(pcm))
            self._events.put_nowait(AssistantAudio(pcm, number))

    def _interrupt(self, reason: str) -> None:
        """The bot stops: its reply is cancelled and the call clears what Twilio holds."""
        if self._replying():
            assert self._reply_task is not None
            self._reply_task.cancel()
        if self.turns is not None:
            self.turns.bot_stopped()
        self._events.put_nowait(Interruption(reason))

    def _fail(self, part: str, message: str) -> None:
        log.warning("%s: %s failed: %s", self.name, part, message)
        self._events.put_nowait(ProviderError(part, message[:200]))
        if self._closed is None:
            self._closed = Closed(1011, f"{part} failed", retry=True)
            self._events.put_nowait(self._closed)


class _TurnClock:
    """When a turn's stages happened (loop time): the caller stopped, the final transcript,
    the dialogue's first text; `timing` adds the first audio."""

    def __init__(self, timing: tuple[float, float] | None) -> None:
        self.stopped, self.final = timing if timing is not None else (None, None)
        self.first_text: float | None = None

    def timing(self, first_audio: float) -> TurnTiming | None:
        if self.stopped is None or self.final is None or self.first_text is None:
            return None  # a greeting or a key: no speech to time from
        return TurnTiming(
            recognised_ms=round((self.final - self.stopped) * 1000, 1),
            answered_ms=round((self.first_text - self.final) * 1000, 1),
            spoken_ms=round((first_audio - self.first_text) * 1000, 1),
            total_ms=round((first_audio - self.stopped) * 1000, 1),
        )


def _level(pcm: Pcm) -> float:
    samples = pcm.samples
    if not len(samples):
        return -99.0
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64))))
    return 20 * math.log10(max(rms, 1.0) / 32768)
