"""Generate the committed speech corpus for the `local` engine's recognition benchmark.

Usage:  .venv/bin/python scripts/make_speech_corpus.py [--out tests/audio/ivr]

Writes `tests/audio/ivr/*.wav` and `tests/audio/ivr/manifest.json`; the benchmark that
reads them is `scripts/bench_recognition.py`. The issue's target is ">= 95 % of menu
choices recognised on 8 kHz mu-law phone audio, over several voices and speeds plus
speech with line noise at 15 dB SNR, no false choice on silence or noise, and the
free-form word error rate reported": this corpus is what that is measured on.

What is in it (`manifest.json` lists every clip with its text, voice, speed, SNR, level
and the choice of the demo menu it must pick; `kind` is one of):
- `menu`: answers to the demo flow's greeting "Say sales, support, or press 0 for an
  agent" (ivr_bridge/cascade/demo_flow.yaml, node `menu`), single words and short phrases
  built only on the words of that node's `match` lists; balanced over the three choices
  (sales, support, agent), each phrase said by three different voice/speed combinations,
  one of the three with line noise at 15 dB SNR. Every phrase is checked against the
  flow's own `match_choice` when the corpus is made, so the expected choice is the
  flow's, not a guess.
- `free`: sentences a caller might say, for the free-form (language model) word error rate.
- `noise`: line noise alone, 2 s at -45..-30 dBFS: must pick no choice.
- `silence`: digital silence and a near-silent idle line: must pick no choice.

Voices. Synthetic: eSpeak NG through the bridge's own `Espeak` (the engine `local` speaks
with), five voices at 130, 160 and 190 words a minute. "Recorded": no recordings of people
can be downloaded here, so the human side is Debian's `flite` (installed with apt-get when
missing and running as root): its `slt`, `rms` and `awb` voices are CLUSTERGEN statistical
voices trained on the CMU ARCTIC recordings of three human speakers, and `kal16` is a
diphone voice that concatenates recorded human diphones. Their timing is varied with
flite's `duration_stretch` (0.85, 1.0, 1.2).

The phone line, as a caller's audio reaches the bridge: speech resampled to 8 kHz with the
bridge's own resampler, band-limited to 300-3400 Hz (a telephone channel), set to an
active level between -26 and -18 dBFS, with 300 ms of line before and 400 ms after it
(silent, or noisy on noisy clips). Line noise is white noise band-limited to 300-3400 Hz
plus a little mains hum (60 Hz and its third harmonic, a tenth of the noise power); at
15 dB SNR its power is the speech's (measured over the speech part) / 10^1.5. Everything is
then mu-law encoded as the line does.

File format: 8 kHz mono 16-bit PCM WAV holding exactly the mu-law decoded samples (so the
mu-law encoding the bridge and a scripted call apply is lossless). PCM and not WAVE_FORMAT_MULAW
because the project's WAV reader (ivr_bridge/audio/wav.py, used by loadgen/clips.py for
`ivr-bridge call --scenario`) reads 16-bit PCM only; the same clips serve scripted calls.
(`loadgen.clips` trims a clip's silent end and refuses an all-silent clip, so the
`silence` clips are for the benchmark only.)

`--held-out --out DIR` makes a second corpus that no setting was tuned on: other phrasings
of the three choices, other speeds and seeds (BENCHMARKS.md reports both).

Deterministic: fixed seeds, and both synthesisers are deterministic; running it again
writes the same bytes (given the same eSpeak NG and flite versions).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ivr_bridge.audio import ulaw_decode, ulaw_encode, wav_bytes
from ivr_bridge.cascade.flow import FlowMachine, load_flow, match_choice
from ivr_bridge.cascade.local import Espeak
from ivr_bridge.loadgen.clips import to_line_rate

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "audio" / "ivr"
SEED = 1207
RATE = 8000
BEFORE_S = 0.3  # line before the speech
AFTER_S = 0.4  # line after it
MENU_SNR_DB = 15.0
BAND_HZ = (300.0, 3400.0)  # the telephone channel
HUM_SHARE = 0.1  # of the line noise's power
SPEECH_LEVELS_DBFS = (-26.0, -18.0)  # active speech level, drawn per clip
PEAK_LIMIT = 0.9 * 32767  # a louder clip is turned down rather than clipped

# Answers to "Say sales, support, or press 0 for an agent", built on the words of the demo
# menu's `match` lists only (sales/buy/pricing, support/help/problem,
# agent/operator/person/representative). Each is checked with the flow's match_choice.
MENU_PHRASES: dict[str, tuple[str, ...]] = {
    "sales": (
        "sales",
        "sales please",
        "sales department",
        "I want to buy something",
        "pricing",
        "I need pricing",
        "I'd like to talk to sales",
        "buy",
        "sales, thank you",
    ),
    "support": (
        "support",
        "support please",
        "I need support",
        "technical support",
        "help",
        "I need help",
        "I have a problem",
        "help please",
        "customer support",
    ),
    "agent": (
        "agent",
        "an agent",
        "agent please",
        "operator",
        "the operator",
        "a person",
        "representative",
        "a representative please",
        "talk to a person",
    ),
}

FREE_SENTENCES = (
    "I would like to check my account balance",
    "my card was declined at the store yesterday",
    "can you tell me when my order will arrive",
    "I want to change the address on my account",
    "please cancel my subscription",
    "I forgot my password and cannot log in",
    "what time does your office open tomorrow",
    "I was charged twice for the same bill",
    "I need to report a lost credit card",
    "how much does the premium plan cost",
    "my internet has been down since this morning",
    "can I pay my bill over the phone",
    "the package I received was damaged",
    "I am calling about the letter I got in the mail",
)

# A second corpus, never tuned on: other phrasings of the same three choices, other speeds,
# other seeds. `--held-out` makes it (not committed: 3 MB more, and flite makes it again).
HELD_OUT = {
    "SEED": 4413,
    "ESPEAK_SPEEDS": (145, 175, 205),
    "FLITE_STRETCHES": (0.9, 1.1, 1.3),
    "MENU_PHRASES": {
        "sales": (
            "pricing please",
            "I want to buy",
            "sales team",
            "I'd like to buy a phone",
            "connect me to sales",
            "what is your pricing",
            "sales, please",
            "I'm calling to buy",
            "buy please",
        ),
        "support": (
            "support team",
            "I need some help",
            "there is a problem",
            "help me please",
            "tech support",
            "I have a problem with my bill",
            "support, please",
            "can you help",
            "I'd like support",
        ),
        "agent": (
            "operator please",
            "a real person",
            "let me talk to an agent",
            "agent, please",
            "can I speak to a representative",
            "person please",
            "I want an operator",
            "get me an agent",
            "speak to a person",
        ),
    },
}

NOISE_LEVELS_DBFS = (-45.0, -42.0, -39.0, -36.0, -33.0, -30.0)
NOISE_S = 2.0


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak" | "flite"
    name: str
    speed: int | None = None  # eSpeak NG: words a minute
    stretch: float | None = None  # flite: duration_stretch (> 1 is slower)

    @property
    def label(self) -> str:
        pace = f"{self.speed}" if self.speed is not None else f"x{self.stretch:g}"
        return f"{self.engine}-{self.name.replace('+', '-')}-{pace}"


# "en" is eSpeak NG's British English (it has no voice named en-gb); +f3, +m3, +f4 are variants.
ESPEAK_VOICES = ("en-us", "en", "en-us+f3", "en+m3", "en+f4")
ESPEAK_SPEEDS = (130, 160, 190)
FLITE_VOICES = ("slt", "rms", "awb", "kal16")
FLITE_STRETCHES = (0.85, 1.0, 1.2)


def all_voices() -> list[Voice]:
    espeak = [Voice("espeak", name, speed=speed) for name in ESPEAK_VOICES for speed in ESPEAK_SPEEDS]
    flite = [Voice("flite", name, stretch=stretch) for name in FLITE_VOICES for stretch in FLITE_STRETCHES]
    return espeak + flite


# -- synthesis ---------------------------------------------------------------------------------


def ensure_flite() -> None:
    """flite on the PATH: installed from Debian when missing and running as root."""
    if shutil.which("flite"):
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "flite"], check=True, env=env)
    if not shutil.which("flite"):
        sys.exit("flite is missing: install it (apt-get install flite) and run again")


def _espeak_seeded(espeak: Espeak, text: str, voice: str, speed: int) -> np.ndarray:
    """`Espeak.speak` with eSpeak NG's random generator reset first: its female variants
    (+f3) add random breath noise, which would make every run differ."""
    import espeakng_loader

    ctypes.CDLL(espeakng_loader.get_library_path()).espeak_ng_SetRandSeed(SEED)
    ctypes.CDLL(None).srand(SEED)  # older code paths call libc's rand()
    return espeak.speak(text, voice, speed, threading.Event())


def synthesise(voice: Voice, text: str, workdir: Path) -> tuple[np.ndarray, int]:
    """`text` spoken by `voice`: int16 samples and their rate."""
    if voice.engine == "espeak":
        espeak = Espeak.get()
        assert voice.speed is not None
        samples = espeak.executor.submit(_espeak_seeded, espeak, text, voice.name, voice.speed).result()
        return np.asarray(samples, np.int16), espeak.rate
    path = workdir / "flite.wav"
    command = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={voice.stretch}", "-t", text]
    subprocess.run([*command, "-o", str(path)], check=True, capture_output=True)
    with wave.open(str(path), "rb") as reader:
        if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise RuntimeError(f"flite wrote an unexpected WAV: {reader.getparams()}")
        rate = reader.getframerate()
        samples = np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.int16)
    return samples, rate


# -- the phone line ----------------------------------------------------------------------------


def band_limit(x: np.ndarray, low: float = BAND_HZ[0], high: float = BAND_HZ[1]) -> np.ndarray:
    """`x` (float, at RATE) through a 300-3400 Hz band-pass with 100 Hz raised-cosine skirts
    (zero phase: a whole-clip FFT mask; this is offline)."""
    size = len(x)
    if size == 0:
        return x
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(size, 1 / RATE)
    skirt = 100.0
    mask = np.ones_like(freqs)
    mask[freqs <= low - skirt] = 0.0
    rising = (freqs > low - skirt) & (freqs < low)
    mask[rising] = 0.5 - 0.5 * np.cos(np.pi * (freqs[rising] - (low - skirt)) / skirt)
    mask[freqs >= high + skirt] = 0.0
    falling = (freqs > high) & (freqs < high + skirt)
    mask[falling] = 0.5 + 0.5 * np.cos(np.pi * (freqs[falling] - high) / skirt)
    return np.fft.irfft(spectrum * mask, size)


def trim(x: np.ndarray, floor_db: float = -40.0) -> np.ndarray:
    """`x` without its leading and trailing quiet (10 ms windows `floor_db` below the loudest)."""
    window = RATE // 100
    count = len(x) // window
    if count == 0:
        return x
    power = np.mean(np.square(x[: count * window].reshape(count, window)), axis=1)
    loud = np.flatnonzero(power > power.max() * 10 ** (floor_db / 10))
    return x[loud[0] * window : (loud[-1] + 1) * window]


def power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x))) if len(x) else 0.0


def dbfs(p: float) -> float:
    return 10 * math.log10(max(p, 1e-12) / 32768.0**2)


def line_noise(size: int, rng: np.random.Generator, hum_share: float = HUM_SHARE) -> np.ndarray:
    """Unit-power line noise: band-limited white noise plus mains hum (`hum_share` of the power)."""
    hiss = band_limit(rng.standard_normal(size + 2 * RATE))[RATE : RATE + size]  # no edge effects
    hiss /= math.sqrt(power(hiss))
    t = np.arange(size) / RATE
    phase = rng.uniform(0, 2 * np.pi, 2)
    hum = np.sin(2 * np.pi * 60 * t + phase[0]) + 0.3 * np.sin(2 * np.pi * 180 * t + phase[1])
    hum /= math.sqrt(power(hum))
    return math.sqrt(1 - hum_share) * hiss + math.sqrt(hum_share) * hum


def to_line(x: np.ndarray) -> np.ndarray:
    """Float samples as the line carries them: mu-law encoded (and decoded back, to store)."""
    clipped = np.clip(np.round(x), -32768, 32767).astype(np.int16)
    return ulaw_decode(ulaw_encode(clipped))


def speech_clip(
    samples: np.ndarray, rate: int, level_dbfs: float, snr_db: float | None, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """A spoken clip on the line; the samples and the speech's actual level (dBFS)."""
    speech = trim(band_limit(to_line_rate(samples, rate).astype(np.float64)))
    gain = math.sqrt(32768.0**2 * 10 ** (level_dbfs / 10) / power(speech))
    gain = min(gain, PEAK_LIMIT / float(np.max(np.abs(speech))))
    speech *= gain
    before, after = round(BEFORE_S * RATE), round(AFTER_S * RATE)
    signal = np.concatenate((np.zeros(before), speech, np.zeros(after)))
    if snr_db is not None:
        noise_power = power(speech) / 10 ** (snr_db / 10)
        signal += line_noise(len(signal), rng) * math.sqrt(noise_power)
    return to_line(signal), dbfs(power(speech))


# -- the corpus --------------------------------------------------------------------------------


def check_phrases() -> dict[str, Any]:
    """The demo menu's choices, and every menu phrase checked to pick its choice there."""
    flow = load_flow(None)
    machine = FlowMachine(flow)
    machine.start()
    node = machine.node
    assert node is not None and node.choices, "the demo flow's start node has no choices"
    for expected, phrases in MENU_PHRASES.items():
        for phrase in phrases:
            picked = match_choice(node.choices, phrase)
            if picked is None or picked.next != expected:
                sys.exit(f"menu phrase {phrase!r} picks {picked and picked.next!r}, not {expected!r}")
    for sentence in FREE_SENTENCES:
        if match_choice(node.choices, sentence) is not None:
            sys.exit(f"free sentence {sentence!r} would pick a menu choice")
    return {
        "flow": "ivr_bridge/cascade/demo_flow.yaml",
        "node": node.name,
        "prompt": node.say,
        "expected": machine.expected(),
        "choices": {choice.next: list(choice.phrases) for choice in node.choices},
    }


def entry(
    file: str, kind: str, text: str, voice: Voice | None, snr_db: float | None, expected: str | None
) -> dict[str, Any]:
    return {
        "file": file,
        "kind": kind,
        "text": text,
        "engine": voice.engine if voice else None,
        "voice": voice.name if voice else None,
        "speed": voice.speed if voice else None,
        "stretch": voice.stretch if voice else None,
        "snr_db": snr_db,
        "expected": expected,
    }


def build(out: Path) -> dict[str, Any]:
    menu = check_phrases()
    ensure_flite()
    voices = all_voices()
    rng = np.random.default_rng(SEED)
    files: dict[str, np.ndarray] = {}
    clips: list[dict[str, Any]] = []

    def add(record: dict[str, Any], samples: np.ndarray, level: float | None) -> None:
        files[record["file"]] = samples
        record["level_dbfs"] = None if level is None else round(level, 1)
        record["seconds"] = round(len(samples) / RATE, 2)
        clips.append(record)

    # Menu: every phrase said three times by different voices and speeds, the third noisy.
    # The voices are dealt out from a shuffled deck, so each is used about equally and
    # noise falls on both engines.
    items = [(choice, phrase) for choice, phrases in MENU_PHRASES.items() for phrase in phrases]
    deck: list[Voice] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        number = 0
        for rendition in range(3):
            for choice, phrase in items:
                if not deck:
                    deck = [voices[i] for i in rng.permutation(len(voices))]
                voice = deck.pop()
                number += 1
                snr = MENU_SNR_DB if rendition == 2 else None
                level = float(rng.uniform(*SPEECH_LEVELS_DBFS))
                clip_rng = np.random.default_rng([SEED, number])
                samples, actual = speech_clip(*synthesise(voice, phrase, workdir), level, snr, clip_rng)
                noise = "snr15" if snr is not None else "clean"
                name = f"menu-{number:03d}-{choice}-{voice.label}-{noise}.wav"
                add(entry(name, "menu", phrase, voice, snr, choice), samples, actual)

        # Free-form sentences, for the word error rate: a different voice each, a third noisy.
        free_voices = [voices[i] for i in np.random.default_rng([SEED, 1]).permutation(len(voices))]
        for index, sentence in enumerate(FREE_SENTENCES, 1):
            voice = free_voices[(index - 1) % len(free_voices)]
            snr = MENU_SNR_DB if index % 3 == 0 else None
            level = float(rng.uniform(*SPEECH_LEVELS_DBFS))
            clip_rng = np.random.default_rng([SEED, 1000 + index])
            samples, actual = speech_clip(*synthesise(voice, sentence, workdir), level, snr, clip_rng)
            noise = "snr15" if snr is not None else "clean"
            name = f"free-{index:02d}-{voice.label}-{noise}.wav"
            add(entry(name, "free", sentence, voice, snr, None), samples, actual)

    # Line noise alone, at levels a line really has; the hum share varies too.
    for index, level in enumerate(NOISE_LEVELS_DBFS, 1):
        clip_rng = np.random.default_rng([SEED, 2000 + index])
        hum = (0.05, 0.1, 0.3)[index % 3]
        noise = line_noise(round(NOISE_S * RATE), clip_rng, hum) * 32768 * 10 ** (level / 20)
        name = f"noise-{index:02d}-{-level:.0f}dbfs.wav"
        add(entry(name, "noise", "", None, None, None), to_line(noise), level)

    # Silence: digital silence (mu-law 0xFF), and an idle line's faint noise.
    size = round(NOISE_S * RATE)
    silences = (("digital", None), ("digital-short", None), ("idle-70dbfs", -70.0), ("idle-60dbfs", -60.0))
    for index, (what, level) in enumerate(silences, 1):
        length = size // 2 if what == "digital-short" else size
        if level is None:
            samples = np.zeros(length, np.int16)
        else:
            clip_rng = np.random.default_rng([SEED, 3000 + index])
            samples = to_line(clip_rng.standard_normal(length) * 32768 * 10 ** (level / 20))
        add(entry(f"silence-{index:02d}-{what}.wav", "silence", "", None, None, None), samples, level)

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.wav"):
        if stale.name not in files:
            stale.unlink()
    for name, samples in files.items():
        (out / name).write_bytes(wav_bytes(samples, RATE))
    manifest = {
        "about": (
            "Caller audio for scripts/bench_recognition.py, made by scripts/make_speech_corpus.py "
            "(see its docstring). 8 kHz mono 16-bit PCM WAV of mu-law decoded samples. expected: the "
            "demo menu's choice (its `next`) a clip must pick, null: none. speed: eSpeak NG words a "
            "minute; stretch: flite duration_stretch. snr_db: line noise relative to the speech, "
            "null: clean. level_dbfs: the speech's level (noise and silence: the line's)."
        ),
        "rate": RATE,
        "menu": menu,
        "clips": clips,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def summary(manifest: dict[str, Any], out: Path) -> str:
    clips = manifest["clips"]
    lines = [f"{len(clips)} clips in {out}"]
    for kind in ("menu", "free", "noise", "silence"):
        of_kind = [clip for clip in clips if clip["kind"] == kind]
        parts = [f"{kind}: {len(of_kind)}"]
        for key in ("engine", "expected"):
            counts: dict[str, int] = {}
            for clip in of_kind:
                if clip[key] is not None:
                    counts[clip[key]] = counts.get(clip[key], 0) + 1
            parts += [f"{name} {count}" for name, count in sorted(counts.items())]
        noisy = sum(clip["snr_db"] is not None for clip in of_kind)
        if kind in ("menu", "free"):
            parts.append(f"noisy {noisy}, clean {len(of_kind) - noisy}")
        lines.append("  " + ", ".join(parts))
    size = sum(path.stat().st_size for path in out.iterdir())
    seconds = sum(clip["seconds"] for clip in clips)
    lines.append(f"  {size / 1e6:.2f} MB, {seconds:.0f} s of audio")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where to write (default: tests/audio/ivr)")
    parser.add_argument(
        "--held-out", action="store_true", help="make the held-out corpus (give --out a directory of its own)"
    )
    args = parser.parse_args()
    if args.held_out:
        if args.out == OUT:
            sys.exit("--held-out needs --out DIR: tests/audio/ivr is the committed corpus")
        globals().update(HELD_OUT)  # the same build, with the held-out phrases, speeds and seeds
    manifest = build(args.out)
    print(summary(manifest, args.out))


if __name__ == "__main__":
    main()
