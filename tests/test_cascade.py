"""The cascade: turn-taking and sentences (sans-I/O), the session with scripted engines
(in memory), and the offline `local` engine answering real calls with the demo IVR."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from ivr_bridge.audio import Pcm, Resampler, ulaw_encode
from ivr_bridge.cascade.engines import Act, Heard, Turn, TurnKind
from ivr_bridge.cascade.sentences import Sentences
from ivr_bridge.cascade.session import CascadeSession
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
    AgentAction,
    AssistantAudio,
    AssistantText,
    Interruption,
    TurnTiming,
    UserTranscript,
)
from ivr_bridge.settings import Settings

RATE = 16000
FRAME = RATE // 50
TIMEOUT = 20.0


def voiced(ms: int, level: float = 0.2, rate: int = RATE) -> np.ndarray:
    """Speech-like sound: a 140 Hz pulse train with harmonics, amplitude modulated (the VAD
    takes it for voice; a pure tone it does not)."""
    t = np.arange(rate * ms // 1000) / rate
    wave = sum(np.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 12))
    wave *= 0.6 + 0.4 * np.sin(2 * math.pi * 4 * t)
    return (wave / np.max(np.abs(wave)) * level * 32767).astype(np.int16)


def quiet(ms: int, rate: int = RATE) -> np.ndarray:
    return np.zeros(rate * ms // 1000, dtype=np.int16)


def feed(turns: Turns, samples: np.ndarray) -> list[object]:
    out: list[object] = []
    for start in range(0, len(samples), FRAME):
        out += turns.feed(samples[start : start + FRAME].tobytes())
    return out


# -- turn-taking (sans-I/O) ------------------------------------------------------------------


def test_speech_begins_is_confirmed_and_ends_after_the_silence() -> None:
    turns = Turns(RATE, confirm_s=0.2, end_silence_s=0.6)
    signals = feed(turns, np.concatenate([quiet(400), voiced(800), quiet(1000)]))
    kinds = [type(s) for s in signals]
    assert kinds == [SpeechBegan, SpeechConfirmed, SpeechPaused, SpeechEnded]
    began, ended = signals[0], signals[3]
    assert isinstance(began, SpeechBegan) and len(began.audio) >= 0.3 * RATE * 2  # the pre-roll
    assert isinstance(ended, SpeechEnded) and 1.1 <= ended.at <= 1.3  # when speech stopped


def test_a_cough_is_dropped_not_a_turn() -> None:
    turns = Turns(RATE, confirm_s=0.2, end_silence_s=0.6)
    kinds = [type(s) for s in feed(turns, np.concatenate([quiet(200), voiced(100), quiet(1000)]))]
    assert kinds == [SpeechBegan, SpeechDropped]


def test_a_loud_steady_line_noise_is_not_an_endless_turn() -> None:
    turns = Turns(RATE, confirm_s=0.2, end_silence_s=0.6)
    rng = np.random.default_rng(3)
    hiss = (rng.normal(0, 1, RATE * 4) * 0.03 * 32767).astype(np.int16)  # about -30 dBFS
    signals = feed(turns, hiss)
    # At most a burst while the floor is learnt, never a turn.
    assert not any(isinstance(s, SpeechConfirmed | SpeechEnded) for s in signals)
    speech = voiced(600) + hiss[: RATE * 6 // 10]
    signals = feed(turns, np.concatenate([speech, hiss[:RATE]]))
    # The caller still gets through.
    assert [type(s) for s in signals] == [SpeechBegan, SpeechConfirmed, SpeechPaused, SpeechEnded]


def test_a_pause_then_more_speech_is_one_turn_the_pause_told() -> None:
    turns = Turns(RATE, confirm_s=0.2, end_silence_s=0.6)
    signals = feed(turns, np.concatenate([quiet(400), voiced(600), quiet(400), voiced(400), quiet(800)]))
    kinds = [type(s) for s in signals]
    assert kinds == [SpeechBegan, SpeechConfirmed, SpeechPaused, SpeechResumed, SpeechPaused, SpeechEnded]
    # A burst never confirmed has no pause: nothing to begin decoding.
    kinds = [type(s) for s in feed(turns, np.concatenate([voiced(100), quiet(1000)]))]
    assert kinds == [SpeechBegan, SpeechDropped]


def test_echo_of_the_bot_20_db_down_is_not_the_caller_but_speech_over_it_is() -> None:
    turns = Turns(RATE, confirm_s=0.2, end_silence_s=0.6)
    feed(turns, quiet(200))
    turns.bot_speaks(3.0, level_dbfs=-17.0)  # the bot's reply, playing for 3 s
    echo = voiced(1000, level=0.2 * 10 ** (-20 / 20))  # its own voice back, 20 dB down
    assert feed(turns, echo) == []
    signals = feed(turns, voiced(400))
    assert [type(s) for s in signals] == [SpeechBegan, SpeechConfirmed]
    assert turns.bot_audible


def test_sentences_are_cut_as_the_text_streams() -> None:
    sentences = Sentences()
    out = []
    for piece in ["Thanks for calling. Dr. Smith is", " in at 3.5 p", "m today! Ok. Is that fine? Ye", "s"]:
        out += sentences.feed(piece)
    assert out == ["Thanks for calling.", "Dr. Smith is in at 3.5 pm today!", "Ok. Is that fine?"]
    assert sentences.flush() == ["Yes"]
    assert sentences.flush() == []


# -- the session, with scripted engines (in memory) --------------------------------------------


class ScriptedStt:
    rate = RATE

    def __init__(self, transcripts: list[str | list[str]]) -> None:
        self.transcripts = transcripts  # a list: finals of one turn, arriving one by one
        self.audio = bytearray()
        self.flushed: list[int] = []  # bytes of audio each flush finalised
        self.expected: list[list[str]] = []
        self._results: asyncio.Queue[Heard] = asyncio.Queue()

    async def start(self) -> None: ...

    async def send(self, pcm: bytes) -> None:
        self.audio += pcm

    async def flush(self) -> None:
        self.flushed.append(len(self.audio))
        self.audio.clear()
        said = self.transcripts.pop(0) if self.transcripts else ""
        if isinstance(said, str):
            self._results.put_nowait(Heard(said, True))
            return
        # As VoxNexus does: a final per piece, the later ones after the session has taken
        # the first, then flush_done's empty last final.
        asyncio.get_running_loop().create_task(self._deliver([*said, ""]))

    async def _deliver(self, finals: list[str]) -> None:
        for number, text in enumerate(finals, 1):
            self._results.put_nowait(Heard(text, True, last=number == len(finals)))
            for _ in range(50):
                await asyncio.sleep(0)

    async def receive(self) -> Heard:
        return await self._results.get()

    def expect(self, phrases: list[str]) -> None:
        self.expected.append(phrases)

    async def close(self) -> None: ...


class ScriptedSynthesis:
    def __init__(self, tts: ScriptedTts) -> None:
        self.tts = tts
        self.texts: list[str] = []
        self.cancelled = False
        self._audio: asyncio.Queue[Pcm | None] = asyncio.Queue()

    async def add(self, text: str) -> None:
        self.texts.append(text)
        samples = voiced(60 * len(text), rate=8000)  # 60 ms a character
        for start in range(0, len(samples), 1600):
            self._audio.put_nowait(Pcm(samples[start : start + 1600], 8000))

    async def end(self) -> None:
        self._audio.put_nowait(None)

    async def audio(self) -> Pcm | None:
        return None if self.cancelled else await self._audio.get()

    async def cancel(self) -> None:
        self.cancelled = True
        self._audio.put_nowait(None)


class ScriptedTts:
    def __init__(self) -> None:
        self.syntheses: list[ScriptedSynthesis] = []

    async def start(self) -> None: ...

    async def open(self) -> ScriptedSynthesis:
        self.syntheses.append(ScriptedSynthesis(self))
        return self.syntheses[-1]

    async def close(self) -> None: ...


class ScriptedDialogue:
    """Answers every turn with a line naming it; 'hold' streams slowly so it can be cut."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.cut: list[tuple[str, str]] = []
        self.closed_mid_reply = asyncio.Event()

    async def start(self) -> None: ...

    async def respond(self, turn: Turn) -> AsyncIterator[str | Act]:
        self.turns.append(turn)
        if turn.kind == TurnKind.START:
            yield "Welcome to the test line. Say something."
            return
        if turn.kind == TurnKind.DIGITS:
            yield f"You pressed {turn.text}."
            return
        if turn.text == "bye":
            yield "Goodbye now, thanks for calling."
            yield Act("hangup")
            return
        try:
            yield f"You said {turn.text or turn.kind}. "
            yield "That is a long answer with many words in it. "
            await asyncio.Event().wait()  # the rest never comes: only a barge-in ends it
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_mid_reply.set()
            raise

    def heard(self, said: str, heard: str) -> None:
        self.cut.append((said, heard))

    def expected(self) -> list[str]:
        return ["yes", "no"]

    async def close(self) -> None: ...


def tuning(**changes: str) -> DialogueSettings:
    values = {"end_silence_ms": "400", "barge_in_ms": "200", "no_input_s": "2", **changes}
    return DialogueSettings(**values)  # type: ignore[arg-type]


class Harness:
    """Feeds a session 20 ms frames in real time order (no sleeping: the caller's audio is
    the session's clock) and collects its events."""

    def __init__(self, transcripts: list[str], **changes: str) -> None:
        self.stt, self.tts, self.dialogue = ScriptedStt(transcripts), ScriptedTts(), ScriptedDialogue()
        self.session = CascadeSession("scripted", self.stt, self.tts, self.dialogue, tuning(**changes))
        self.events: list[object] = []

    async def take(self) -> None:
        """Take every event ready now (letting the session's tasks run first)."""
        for _ in range(20):
            await asyncio.sleep(0)
        while not self.session._events.empty():
            self.events.append(self.session._events.get_nowait())

    async def until(self, kind: type, count: int = 1) -> list[object]:
        async with asyncio.timeout(TIMEOUT):
            while len(found := [e for e in self.events if isinstance(e, kind)]) < count:
                self.events.append(await self.session.receive())
        return found

    async def say(self, samples: np.ndarray) -> None:
        for start in range(0, len(samples), FRAME):
            await self.session.send_audio(samples[start : start + FRAME].tobytes())
            await self.take()


async def test_greeting_then_a_turn_then_the_reply_with_its_timing() -> None:
    h = Harness(["hello there"])
    await h.session.connect()
    await h.say(quiet(20))  # the greeting starts with the call's first audio
    greeting = (await h.until(AssistantText))[0]  # its words as they go to the synthesiser
    assert isinstance(greeting, AssistantText) and not greeting.final and "Welcome" in greeting.text
    await h.say(quiet(3000))  # the greeting plays (3 s of audio at 60 ms a character)
    finals = [e for e in h.events if isinstance(e, AssistantText) and e.final]
    assert [e.text for e in finals] == ["Welcome to the test line. Say something."]  # once, whole
    await h.say(np.concatenate([voiced(600), quiet(600)]))
    [said] = await h.until(UserTranscript)
    assert said == UserTranscript("hello there", True)
    [timing] = await h.until(TurnTiming)
    assert isinstance(timing, TurnTiming)
    assert 380 <= timing.recognised_ms <= 5000 and timing.total_ms >= timing.recognised_ms
    assert h.dialogue.turns[-1] == Turn(TurnKind.SPEECH, "hello there")
    # The recogniser had the speech with its pre-roll, then the menu's phrases.
    assert h.stt.flushed[0] >= (0.3 + 0.6) * RATE * 2
    assert h.stt.expected[-1] == ["yes", "no"]
    audio = [e for e in h.events if isinstance(e, AssistantAudio)]
    assert {e.response for e in audio} == {1, 2}
    await h.session.close()


async def test_a_turn_finalised_in_pieces_is_one_turn_and_the_next_is_its_own() -> None:
    h = Harness([["I need", "some", "support"], "bye"])
    await h.session.connect()
    await h.say(quiet(20))
    await h.say(quiet(3000))  # the greeting plays
    await h.say(np.concatenate([voiced(600), quiet(600)]))
    [said] = await h.until(UserTranscript)
    assert said == UserTranscript("I need some support", True)
    await h.say(quiet(500))
    await h.say(np.concatenate([voiced(400), quiet(600)]))
    second = (await h.until(UserTranscript, 2))[1]
    assert second == UserTranscript("bye", True)
    assert [t.text for t in h.dialogue.turns if t.kind == TurnKind.SPEECH] == ["I need some support", "bye"]
    await h.session.close()


async def test_caller_speech_over_the_bot_cancels_the_reply_and_cuts_its_history() -> None:
    h = Harness(["tell me more"])
    await h.session.connect()
    await h.say(quiet(20))  # the greeting starts with the call's first audio
    await h.say(quiet(3000))
    await h.say(np.concatenate([voiced(600), quiet(500)]))
    await h.until(UserTranscript)
    await h.say(quiet(500))  # the reply is playing now
    synthesis = h.tts.syntheses[-1]
    await h.say(voiced(100))  # a cough: nothing happens
    assert not [e for e in h.events if isinstance(e, Interruption)] and not synthesis.cancelled
    await h.say(voiced(300))  # the caller talks over the bot
    await h.until(Interruption)
    assert synthesis.cancelled
    await asyncio.wait_for(h.dialogue.closed_mid_reply.wait(), TIMEOUT)  # the dialogue step cancelled
    await h.session.reply_heard(2, 1000)  # the call reports what the caller heard
    [(said, heard)] = h.dialogue.cut
    assert said.startswith("You said tell me more.") and heard and said.startswith(heard)
    assert len(heard.split()) < len(said.split())
    await h.session.close()


async def test_a_key_cuts_the_bot_and_is_a_turn_then_silence_is_no_input() -> None:
    h = Harness([])
    await h.session.connect()
    await h.say(quiet(20))  # the greeting starts with the call's first audio
    await h.until(AssistantText)
    await h.say(quiet(200))
    await h.session.send_dtmf("5")
    await h.until(Interruption)
    await h.take()
    assert h.dialogue.turns[-1] == Turn(TurnKind.DIGITS, "5")
    await h.say(quiet(900))  # "You pressed 5." plays (840 ms)...
    assert [t.kind for t in h.dialogue.turns] == [TurnKind.START, TurnKind.DIGITS]
    await h.say(quiet(2100))  # ... then 2 s of silence
    assert [t.kind for t in h.dialogue.turns] == [TurnKind.START, TurnKind.DIGITS, TurnKind.NO_INPUT]
    await h.session.close()


async def test_a_key_pressed_while_the_caller_talks_wins_over_the_words() -> None:
    h = Harness(["agent", "bye"])
    await h.session.connect()
    await h.say(quiet(20))
    await h.say(quiet(3000))  # the greeting plays out
    await h.say(voiced(300))  # the caller starts talking...
    await h.session.send_dtmf("1")  # ... and presses a key meanwhile: its reply begins
    await h.take()
    key_reply = h.tts.syntheses[-1]
    await h.say(np.concatenate([voiced(300), quiet(600)]))  # ... and the words end
    await h.say(quiet(400))
    # The words are not answered: the key's reply plays on, never cut or queued behind.
    assert [t.kind for t in h.dialogue.turns] == [TurnKind.START, TurnKind.DIGITS]
    assert not [e for e in h.events if isinstance(e, Interruption)] and not key_reply.cancelled
    assert not [e for e in h.events if isinstance(e, UserTranscript)]
    # The next words are a turn as ever.
    await h.say(quiet(1000))
    await h.say(np.concatenate([voiced(400), quiet(600)]))
    [said] = await h.until(UserTranscript)
    assert said == UserTranscript("bye", True)
    await h.session.close()


async def test_keys_pressed_in_a_burst_all_reach_the_dialogue_in_order() -> None:
    h = Harness([])
    await h.session.connect()
    await h.say(quiet(20))
    for digit in "1234#":  # faster than any reply can start
        await h.session.send_dtmf(digit)
    await h.take()
    keys = "".join(t.text for t in h.dialogue.turns if t.kind == TurnKind.DIGITS)
    assert keys == "1234#"
    await h.session.close()


async def test_the_dialogue_s_act_comes_after_its_words() -> None:
    h = Harness(["bye"])
    await h.session.connect()
    await h.say(quiet(20))  # the greeting starts with the call's first audio
    await h.say(quiet(3000))
    await h.say(np.concatenate([voiced(500), quiet(500)]))
    [action] = await h.until(AgentAction)
    texts = [e for e in h.events if isinstance(e, AssistantText)]
    assert action == AgentAction("hangup") and "Goodbye" in texts[-1].text  # type: ignore[attr-defined]
    assert h.events.index(action) > h.events.index(texts[-1])
    await h.session.close()


# -- the offline `local` engine on real calls --------------------------------------------------


def spoken(text: str) -> bytes:
    """`text` as a caller would send it: eSpeak NG, 8 kHz mu-law, with a moment of silence
    before and after (as a line carries)."""
    from ivr_bridge.cascade.local import Espeak

    espeak = Espeak.get()
    samples = espeak.executor.submit(espeak.speak, text, "en-us", 150, threading.Event()).result()
    resampler = Resampler(espeak.rate, 8000)
    pcm = np.concatenate([resampler.process(samples), resampler.flush()])
    return ulaw_encode(np.concatenate([quiet(300, 8000), pcm, quiet(200, 8000)]))


def local_settings(**more: object) -> Settings:
    env = {"IVR_PROVIDER": "local", "IVR_NO_INPUT_S": "30"}
    base = Settings.from_env(env, dotenv=False)
    return Settings(**{**base.__dict__, **more})


@pytest.mark.timeout(120)
async def test_the_demo_ivr_hears_support_and_takes_the_support_branch(make_bridge) -> None:
    from ivr_bridge.standins.twilio import TwilioCaller

    bridge = make_bridge(local_settings())
    async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
        await caller.wait_for(lambda: caller.marks_played and caller.idle, TIMEOUT)  # the greeting
        await caller.say(spoken("support"))
        await caller.wait_for(lambda: len(caller.marks_played) > 0 and caller.playing, TIMEOUT)
        await caller.wait_for(lambda: caller.idle, TIMEOUT)
        await caller.hang_up()
    [call] = await bridge.wait_for_calls(1)
    lines = [(line.role, line.text) for line in call.transcript]
    assert ("user", "support") in lines
    assert any(role == "assistant" and "account number" in text for role, text in lines)
    assert call.stats.turn_ms["total_ms"][0] < 5000
    assert call.provider == "local"


@pytest.mark.timeout(120)
async def test_a_key_in_the_demo_ivr_transfers_to_sales_after_the_prompt(make_bridge, twilio_rest) -> None:
    from tests.test_resilience import signed_caller, with_rest

    rest, rest_url = twilio_rest
    bridge = make_bridge(with_rest(local_settings(), rest, rest_url))
    caller = await signed_caller(bridge, rest.auth_token)
    rest.live_calls.add(caller.call_sid)
    async with caller:
        await caller.wait_for(lambda: bool(caller.marks_received), TIMEOUT)
        await caller.dtmf("1")  # cuts the greeting: sales
        [update] = await asyncio.to_thread(rest.wait_for_updates, 1, TIMEOUT)
        await caller.hang_up()
    [call] = await bridge.wait_for_calls(1)
    assert "<Dial>+15550101</Dial>" in update.params["Twiml"]
    assert update.at >= caller.marks_played_at[-1]  # "Connecting you to sales" played first
    assert caller.clears >= 1  # the key cut the greeting
    assert call.outcome == "transferred"


async def test_preflight_opens_the_engines_without_reaching_the_dialogue() -> None:
    from ivr_bridge.preflight import preflight
    from ivr_bridge.standins.dialogue_hook import DialogueHookStandIn

    async with DialogueHookStandIn("hook-secret") as hook:
        env = {
            "IVR_PROVIDER": "local",
            "IVR_DIALOGUE": "hook",
            "IVR_DIALOGUE_URL": hook.url,
            "IVR_HOOK_SECRET": "hook-secret",
        }
        assert await preflight(Settings.from_env(env, dotenv=False), timeout=TIMEOUT) is None
        assert hook.turns == []  # no greeting was asked for: no caller is there


# -- scripted calls (`ivr-bridge call --scenario`) through the demo IVR --------------------------

IVR_CLIPS = Path(__file__).parent / "audio" / "ivr"  # made by scripts/make_speech_corpus.py


async def scripted_ivr_call(bridge, rest, steps: list[dict]):  # type: ignore[no-untyped-def]
    """A scripted call on the demo IVR. As Twilio does, an update of the call through the
    REST API (a transfer) ends its media stream: `stop`, then close."""
    from ivr_bridge.loadgen.scenario import parse_scenario
    from ivr_bridge.loadgen.scripted_call import ScriptedCall
    from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream

    scenario = parse_scenario({"name": "ivr", "steps": steps}, IVR_CLIPS, "test")
    details = CallDetails()
    rest.live_calls.add(details.call_sid)
    target = await fetch_stream(f"{bridge.base_url}/twiml", details, rest.auth_token)
    call = ScriptedCall(target, scenario, details, rest.auth_token)
    loop = asyncio.get_running_loop()

    def end_stream(update) -> None:  # type: ignore[no-untyped-def]
        if update.call_sid == details.call_sid:
            asyncio.run_coroutine_threadsafe(call.caller.hang_up(), loop)

    rest.on_update = end_stream
    try:
        return await call.run(), call.caller
    finally:
        rest.on_update = None


GREETING = [{"wait_for": "bot_audio", "timeout": TIMEOUT}, {"wait_for": "bot_done", "timeout": TIMEOUT}]
PROMPT_THEN_HANG_UP = [
    {"wait_for": "bot_audio", "timeout": TIMEOUT},
    {"wait_for": "bot_done", "timeout": TIMEOUT},
    {"wait": TIMEOUT},  # ends as soon as the transfer ends the stream (scripted_ivr_call)
    {"hang_up": True},
]


@pytest.mark.timeout(120)
async def test_a_scripted_call_says_sales_and_is_transferred_after_the_prompt(
    make_bridge, twilio_rest
) -> None:
    from tests.test_resilience import with_rest

    rest, rest_url = twilio_rest
    bridge = make_bridge(with_rest(local_settings(), rest, rest_url))
    steps = [*GREETING, {"say": "menu-028-sales-flite-kal16-x1-clean.wav"}, *PROMPT_THEN_HANG_UP]
    report, caller = await scripted_ivr_call(bridge, rest, steps)
    assert report.ok, report.reason
    [update] = await asyncio.to_thread(rest.wait_for_updates, 1, TIMEOUT)
    assert "<Dial>+15550101</Dial>" in update.params["Twiml"]
    assert caller is not None and update.at >= caller.marks_played_at[-1]  # "Connecting you to sales" played
    [call] = await bridge.wait_for_calls(1)
    heard = [line.text for line in call.transcript if line.role == "user"]
    assert len(heard) == 1 and "sales" in heard[0].split(), heard
    assert call.outcome == "transferred"


@pytest.mark.timeout(120)
async def test_a_scripted_call_keys_in_its_account_number(make_bridge, twilio_rest) -> None:
    from tests.test_resilience import with_rest

    rest, rest_url = twilio_rest
    bridge = make_bridge(with_rest(local_settings(), rest, rest_url))
    keys = [{"dtmf": digit} for digit in "1234#"]
    steps = [*GREETING, {"dtmf": "2"}, *GREETING, *keys, *GREETING, {"hang_up": True}]
    report, _ = await scripted_ivr_call(bridge, rest, steps)
    assert report.ok, report.reason
    [call] = await bridge.wait_for_calls(1)
    said = [line.text for line in call.transcript if line.role == "assistant"]
    assert any("account number" in text for text in said)
    assert any("Your account number is 1 2 3 4." in text for text in said)


@pytest.mark.timeout(120)
async def test_a_scripted_call_barges_in_on_the_greeting_with_its_choice(make_bridge, twilio_rest) -> None:
    from tests.test_resilience import with_rest

    rest, rest_url = twilio_rest
    bridge = make_bridge(with_rest(local_settings(), rest, rest_url))
    steps = [
        {"wait_for": "bot_audio", "timeout": TIMEOUT},
        {"wait": 1.0},  # a second into the greeting
        {"barge_in": "menu-022-agent-flite-slt-x1-clean.wav", "timeout": TIMEOUT},  # "operator"
        *PROMPT_THEN_HANG_UP,
    ]
    report, _ = await scripted_ivr_call(bridge, rest, steps)
    assert report.ok, report.reason
    [barge_in] = report.barge_ins
    assert barge_in.stop_ms is not None and barge_in.stop_ms < 2000
    [update] = await asyncio.to_thread(rest.wait_for_updates, 1, TIMEOUT)
    assert "<Dial>+15550100</Dial>" in update.params["Twiml"]
    [call] = await bridge.wait_for_calls(1)
    greeting = next(line for line in call.transcript if line.role == "assistant")
    assert greeting.interrupted and 0 < greeting.heard_ms < 4000


def test_a_collect_node_hears_a_spoken_number_not_one_digit() -> None:
    from ivr_bridge.audio import AudioFormat, CallerAudio, Encoding
    from ivr_bridge.cascade.flow import DIGIT_WORDS
    from ivr_bridge.cascade.local import recognise

    to_16k = CallerAudio(AudioFormat(Encoding.PCM16, 16000))
    pcm = to_16k.process(spoken("one two three four five") + b"\xff" * 4000)
    text, _ = recognise(pcm, (*DIGIT_WORDS, "oh"))
    # A number, not a single digit (what a plain word list gave); the words themselves are
    # the recogniser's accuracy, which scripts/bench_recognition.py measures.
    words = text.split()
    assert len(words) >= 3 and set(words) <= {*DIGIT_WORDS, "oh"}, text
