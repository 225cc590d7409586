"""Recognition benchmark of the `local` engine on phone audio: menu choices, false choices
on noise and silence, free-form word error rate, decode time.

Usage:  .venv/bin/python scripts/bench_recognition.py [--recogniser whisper|pocketsphinx]
            [--clips PATTERN ...] [--json] [--corpus DIR]

The corpus is tests/audio/ivr (made by scripts/make_speech_corpus.py; its manifest.json
says what each clip is and which choice it must pick). The issue's target: >= 95 % of menu
choices recognised, and no false choice on noise or silence. Exits 1 when a target is
missed (over the clips run), so it can gate a change to the recogniser.

Every clip takes the bridge's real path, frame by frame as a call would:
- the clip's 8 kHz mu-law, 20 ms at a time, through `CallerAudio` to PCM16 16 kHz;
- `Turns(16000, confirm 0.2 s, end silence 0.6 s)` decides where the caller's turn is;
- the turn's audio is gathered exactly as `CascadeSession.send_audio` hands it to
  `LocalSpeechToText` (SpeechBegan's audio with its pre-roll, then every later chunk while
  in speech, the chunk where SpeechEnded fires included; a dropped burst is thrown away;
  at most `MAX_TURN_BYTES`);
- `recognise(audio, phrases, recogniser)` decodes it, in this process (it is a plain
  function; the bridge runs the same function in worker processes): with the demo menu's
  `expected()` phrases for menu, noise and silence clips (Whisper's prompt, and the JSGF
  grammar), with none for free-form sentences (Whisper alone, or PocketSphinx's language
  model);
- a menu turn's transcript goes to the flow's own `match_choice` with the menu's choices.

After a clip ends the line goes on as it was: its last 400 ms (silence, or line noise) is
repeated until the turn has ended (Turns needs 0.6 s of silence, a clip has 0.4 s).
As in the session, the first turn with words in it is the caller's answer (an empty
transcript leaves the menu waiting). Noise and silence: a false choice is a choice picked
by any turn; the best outcome is no speech detected at all.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ivr_bridge.audio import AudioFormat, CallerAudio, Encoding, ulaw_encode
from ivr_bridge.cascade.flow import Choice, FlowMachine, load_flow, match_choice
from ivr_bridge.cascade.local import MAX_TURN_BYTES, RECOGNISERS, STT_RATE, recognise, warm
from ivr_bridge.cascade.turns import SpeechBegan, SpeechDropped, SpeechEnded, Turns

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "audio" / "ivr"
LINE_RATE = 8000
FRAME = 160  # 20 ms of mu-law
CONFIRM_S = 0.2
END_SILENCE_S = 0.6
TAIL_S = 0.4  # the clip's end that is repeated as the line goes on
MAX_TAIL_S = 16.0  # Turns ends any utterance by 15 s
TARGET_ACCURACY = 95.0


@dataclass
class Result:
    file: str
    kind: str
    engine: str | None
    voice: str | None  # engine:voice
    noisy: bool
    text: str
    expected: str | None
    turns: int = 0  # turns ended (SpeechEnded) and decoded
    dropped: int = 0  # bursts too short to be a turn
    transcripts: list[str] = field(default_factory=list)
    heard: str = ""  # the caller's answer: the first non-empty transcript (free: all of them)
    picked: str | None = None  # the choice `heard` picks
    any_choice: str | None = None  # a choice any turn picks (noise and silence)
    decode_ms: list[float] = field(default_factory=list)
    turn_s: list[float] = field(default_factory=list)  # each decoded turn's audio, seconds
    errors: int = 0  # free-form: word edits
    words: int = 0  # free-form: reference words

    @property
    def correct(self) -> bool:
        if self.kind == "menu":
            return self.picked == self.expected
        if self.kind in ("noise", "silence"):
            return self.any_choice is None
        return self.errors == 0


def read_ulaw(path: Path) -> bytes:
    """A corpus clip (8 kHz mono 16-bit PCM WAV of mu-law values) as the mu-law the line carries."""
    with wave.open(str(path), "rb") as reader:
        if (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) != (LINE_RATE, 1, 2):
            raise SystemExit(f"{path}: not 8 kHz mono 16-bit PCM: {reader.getparams()}")
        samples = np.frombuffer(reader.readframes(reader.getnframes()), "<i2").astype(np.int16)
    return ulaw_encode(samples)


def turn_audio(ulaw: bytes) -> tuple[list[bytes], int]:
    """The turns' audio as the session sends it to the recogniser, and the dropped bursts."""
    caller = CallerAudio(to=AudioFormat(Encoding.PCM16, STT_RATE))
    turns = Turns(STT_RATE, CONFIRM_S, END_SILENCE_S)
    tail_bytes = round(TAIL_S * LINE_RATE) // FRAME * FRAME
    tail = ulaw[-tail_bytes:] if len(ulaw) >= tail_bytes else bytes([0xFF]) * tail_bytes
    whole = len(ulaw) - len(ulaw) % FRAME
    frames = [ulaw[i : i + FRAME] for i in range(0, whole, FRAME)]
    tail_frames = [tail[i : i + FRAME] for i in range(0, len(tail), FRAME)]
    max_tail = round(MAX_TAIL_S * LINE_RATE / FRAME)
    audio = bytearray()  # LocalSpeechToText's buffer
    ended: list[bytes] = []
    dropped = 0

    def send(pcm: bytes) -> None:
        if len(audio) + len(pcm) <= MAX_TURN_BYTES:
            audio.extend(pcm)

    index = 0
    while index < len(frames) or (turns.in_speech and index < len(frames) + max_tail):
        frame = (
            frames[index] if index < len(frames) else tail_frames[(index - len(frames)) % len(tail_frames)]
        )
        index += 1
        pcm = caller.process(frame)
        in_utterance = turns.in_speech
        for signal in turns.feed(pcm):  # as CascadeSession.send_audio
            if isinstance(signal, SpeechBegan):
                send(signal.audio)
            elif isinstance(signal, SpeechEnded):
                send(pcm)
                ended.append(bytes(audio))  # flush: decoded
                audio.clear()
            elif isinstance(signal, SpeechDropped):
                audio.clear()  # flush: its transcript is discarded
                dropped += 1
        if in_utterance and turns.in_speech:
            send(pcm)
    return ended, dropped


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref != hyp))
    return row[-1]


def run_clip(
    clip: dict[str, Any],
    corpus: Path,
    phrases: tuple[str, ...],
    choices: tuple[Choice, ...],
    recogniser: str,
) -> Result:
    result = Result(
        clip["file"],
        clip["kind"],
        clip["engine"],
        f"{clip['engine']}:{clip['voice']}" if clip["engine"] else None,
        clip["snr_db"] is not None,
        clip["text"],
        clip["expected"],
    )
    ended, result.dropped = turn_audio(read_ulaw(corpus / clip["file"]))
    grammar = () if clip["kind"] == "free" else phrases
    for audio in ended:
        start = time.perf_counter()
        text, _confidence = recognise(audio, grammar, recogniser)
        result.decode_ms.append((time.perf_counter() - start) * 1000)
        result.transcripts.append(text.strip())
        result.turn_s.append(len(audio) / 2 / STT_RATE)
        if result.any_choice is None and (choice := match_choice(choices, text)) is not None:
            result.any_choice = choice.next
    result.turns = len(ended)
    spoken = [text for text in result.transcripts if text]
    if result.kind == "free":
        result.heard = " ".join(spoken)
        reference = words(result.text)
        result.errors, result.words = edit_distance(reference, words(result.heard)), len(reference)
    elif spoken:
        result.heard = spoken[0]
        picked = match_choice(choices, result.heard)
        result.picked = picked.next if picked is not None else None
    return result


def percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def outcome(r: Result) -> str:
    """What a noise or silence clip came to, best first."""
    if r.any_choice is not None:
        return f"FALSE CHOICE {r.any_choice}"
    if r.turns == 0:
        return "dropped burst only" if r.dropped else "no speech"
    return "words but no choice" if any(r.transcripts) else "turn heard nothing"


def summarise(results: list[Result]) -> dict[str, Any]:
    """The figures, for the clips run (a kind none of them has is left out)."""
    menu = [r for r in results if r.kind == "menu"]
    quiet = [r for r in results if r.kind in ("noise", "silence")]
    free = [r for r in results if r.kind == "free"]

    def accuracy(group: list[Result]) -> dict[str, Any]:
        right = sum(r.correct for r in group)
        return {"correct": right, "clips": len(group), "percent": percent(right, len(group))}

    def wer(group: list[Result]) -> dict[str, Any]:
        errors, total = sum(r.errors for r in group), sum(r.words for r in group)
        return {"errors": errors, "words": total, "percent": percent(errors, total)}

    def timing(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"turns": 0, "mean_ms": None, "p95_ms": None}
        array = np.array(values)
        return {
            "turns": len(values),
            "mean_ms": round(float(array.mean()), 1),
            "p95_ms": round(float(np.percentile(array, 95)), 1),
        }

    summary: dict[str, Any] = {}
    targets: dict[str, bool] = {}
    if menu:
        engines = sorted({r.engine for r in menu if r.engine})
        choices = sorted({str(r.expected) for r in menu})
        summary["menu"] = {
            "all": accuracy(menu),
            "by_engine": {engine: accuracy([r for r in menu if r.engine == engine]) for engine in engines},
            "clean": accuracy([r for r in menu if not r.noisy]),
            "noisy": accuracy([r for r in menu if r.noisy]),
            "by_choice": {choice: accuracy([r for r in menu if r.expected == choice]) for choice in choices},
            "one_word": accuracy([r for r in menu if len(words(r.text)) == 1]),
            "several_words": accuracy([r for r in menu if len(words(r.text)) > 1]),
            "by_voice": {
                voice: accuracy([r for r in menu if r.voice == voice])
                for voice in sorted({str(r.voice) for r in menu})
            },
            "no_turn": sum(r.turns == 0 for r in menu),
        }
        targets["menu_accuracy_95"] = summary["menu"]["all"]["percent"] >= TARGET_ACCURACY
    if quiet:
        outcomes: dict[str, int] = {}
        for r in quiet:
            key = "false choice" if r.any_choice is not None else outcome(r)
            outcomes[key] = outcomes.get(key, 0) + 1
        false_choices = sum(r.any_choice is not None for r in quiet)
        summary["noise_silence"] = {"clips": len(quiet), "false_choices": false_choices, "outcomes": outcomes}
        targets["no_false_choice"] = false_choices == 0
    if free:
        summary["free"] = {
            "all": wer(free),
            "clean": wer([r for r in free if not r.noisy]),
            "noisy": wer([r for r in free if r.noisy]),
        }
    summary["decode"] = {
        "all": timing([ms for r in results for ms in r.decode_ms]),
        "grammar": timing([ms for r in results if r.kind != "free" for ms in r.decode_ms]),
        "free": timing([ms for r in free for ms in r.decode_ms]),
    }
    summary["targets"] = targets  # those the clips run can tell
    return summary


def fmt_accuracy(a: dict[str, Any]) -> str:
    share = "-" if a["percent"] is None else f"{a['percent']:5.1f} %"
    return f"{a['correct']:>3} / {a['clips']:<3} {share}"


def fmt_wer(w: dict[str, Any]) -> str:
    share = "    -  " if w["percent"] is None else f"{w['percent']:5.1f} %"
    return f"{share}  ({w['errors']} errors / {w['words']} words)"


def fmt_timing(t: dict[str, Any]) -> str:
    if not t["turns"]:
        return "-"
    return f"mean {t['mean_ms']:6.1f} ms, p95 {t['p95_ms']:6.1f} ms  ({t['turns']} turns)"


def fmt_turns(r: Result) -> str:
    seconds = ", ".join(f"{s:.2f} s" for s in r.turn_s)
    text = f"{r.turns} turn{'s' if r.turns != 1 else ''}" + (f" ({seconds})" if seconds else "")
    return text + (f", {r.dropped} dropped" if r.dropped else "")


def report(summary: dict[str, Any], results: list[Result]) -> str:
    lines: list[str] = []
    if menu := summary.get("menu"):
        lines.append("Menu choices (demo menu: sales / support / agent)")
        lines.append(f"  all               {fmt_accuracy(menu['all'])}   target >= {TARGET_ACCURACY:g} %")
        for engine, acc in menu["by_engine"].items():
            lines.append(f"  {engine:<17} {fmt_accuracy(acc)}")
        lines.append(f"  clean             {fmt_accuracy(menu['clean'])}")
        lines.append(f"  noisy (15 dB SNR) {fmt_accuracy(menu['noisy'])}")
        for choice, acc in menu["by_choice"].items():
            lines.append(f"  {'said ' + choice:<17} {fmt_accuracy(acc)}")
        lines.append(f"  one word          {fmt_accuracy(menu['one_word'])}")
        lines.append(f"  several words     {fmt_accuracy(menu['several_words'])}")
        lines.append(f"  no turn detected  {menu['no_turn']}")
        voices = [f"{v} {a['correct']}/{a['clips']}" for v, a in menu["by_voice"].items()]
        for start in range(0, len(voices), 5):
            lines.append(
                ("  by voice          " if start == 0 else " " * 20) + ", ".join(voices[start : start + 5])
            )
    if quiet := summary.get("noise_silence"):
        lines.append("Noise and silence (no choice may be picked; best: no speech detected)")
        lines.append(f"  false choices     {quiet['false_choices']} / {quiet['clips']}   target 0")
        for r in results:
            if r.kind in ("noise", "silence"):
                heard = " | ".join(repr(t) for t in r.transcripts)
                lines.append(
                    f"  {r.file:<32} {outcome(r)}; {fmt_turns(r)}" + (f"; heard {heard}" if heard else "")
                )
    if free := summary.get("free"):
        lines.append("Free-form word error rate (nothing expected; word edits / reference words)")
        lines.append(f"  all               {fmt_wer(free['all'])}")
        lines.append(f"  clean             {fmt_wer(free['clean'])}")
        lines.append(f"  noisy (15 dB SNR) {fmt_wer(free['noisy'])}")
    lines.append("Decode time per turn (in-process, after warm-up)")
    for name, label in (("all", "all"), ("grammar", "menu phrases"), ("free", "free speech")):
        lines.append(f"  {label:<17} {fmt_timing(summary['decode'][name])}")
    if summary.get("menu"):
        misses = [r for r in results if r.kind == "menu" and not r.correct]
        lines.append(f"Menu misses ({len(misses)})")
        for r in misses:
            heard = " | ".join(repr(t) for t in r.transcripts) or "-"
            lines.append(
                f"  {r.file}: expected {r.expected}, picked {r.picked}; said {r.text!r}, heard {heard}; "
                f"{fmt_turns(r)}"
            )
    if summary.get("free"):
        wrong = [r for r in results if r.kind == "free" and r.errors]
        lines.append(
            f"Free-form sentences with errors ({len(wrong)} of {sum(r.kind == 'free' for r in results)})"
        )
        for r in wrong:
            lines.append(f"  {r.file}: {r.errors}/{r.words}  said {r.text!r}  heard {r.heard!r}")
    targets = summary["targets"]
    verdict = "met" if all(targets.values()) else "MISSED"
    lines.append(
        f"Targets {verdict}: " + ", ".join(f"{k} {'ok' if v else 'missed'}" for k, v in targets.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clips",
        action="append",
        metavar="PATTERN",
        help="only clips whose file name matches (glob; repeatable)",
    )
    parser.add_argument(
        "--recogniser", choices=RECOGNISERS, default=RECOGNISERS[0], help="as IVR_LOCAL_RECOGNISER"
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (summary and every clip)"
    )
    parser.add_argument(
        "--corpus", type=Path, default=CORPUS, help="the corpus directory (default: tests/audio/ivr)"
    )
    args = parser.parse_args()

    manifest = json.loads((args.corpus / "manifest.json").read_text())
    clips = [
        clip
        for clip in manifest["clips"]
        if not args.clips or any(fnmatch.fnmatch(clip["file"], p) for p in args.clips)
    ]
    if not clips:
        sys.exit("no clip matches")
    machine = FlowMachine(load_flow(None))
    machine.start()
    assert machine.node is not None and machine.node.name == manifest["menu"]["node"]
    phrases, choices = tuple(machine.expected()), machine.node.choices
    # Warm-up, untimed: the model loads, and the menu's grammar is compiled once (a worker
    # keeps it compiled afterwards).
    warm(args.recogniser)
    recognise(b"\0\0" * (STT_RATE // 10), phrases, args.recogniser)

    results = [run_clip(clip, args.corpus, phrases, choices, args.recogniser) for clip in clips]
    summary = summarise(results)
    if args.json:
        print(json.dumps({"summary": summary, "clips": [asdict(r) for r in results]}, indent=1))
    else:
        print(f"{len(results)} clips from {args.corpus}, recogniser {args.recogniser}")
        print(report(summary, results))
    sys.exit(0 if all(summary["targets"].values()) else 1)


if __name__ == "__main__":
    main()
