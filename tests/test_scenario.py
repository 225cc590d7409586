"""Scenario files and caller clips: parsing, validation errors, WAV loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ivr_bridge.audio import ulaw_decode
from ivr_bridge.loadgen.clips import ClipError, load_clip
from ivr_bridge.loadgen.scenario import (
    BargeIn,
    Dtmf,
    HangUp,
    Say,
    ScenarioError,
    Wait,
    WaitFor,
    load_scenario,
    one_turn,
    parse_scenario,
)
from tests.loadgen_support import tone, write_scenario, write_tone, write_wav

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def dominant_hz(ulaw: bytes) -> float:
    samples = ulaw_decode(ulaw).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * 8000 / len(samples))


def parse(tmp_path: Path, steps: Any, **top: Any) -> Any:
    return parse_scenario({"steps": steps, **top}, tmp_path, "s.json")


def test_every_step_kind_parses(tmp_path: Path) -> None:
    write_tone(tmp_path / "a.wav", 400)
    scenario = parse(
        tmp_path,
        [
            {"say": "a.wav"},
            {"wait": 0.5},
            {"wait_for": "bot_audio"},
            {"wait_for": "clear", "timeout": 2.5},
            {"barge_in": "a.wav", "timeout": 3},
            {"dtmf": "#"},
            {"hang_up": True},
        ],
        name="all",
    )
    assert scenario.name == "all"
    say, wait, wait_audio, wait_clear, barge, dtmf, hang_up = scenario.steps
    assert isinstance(say, Say) and say.clip.path == (tmp_path / "a.wav").resolve()
    assert wait == Wait(0.5)
    assert wait_audio == WaitFor("bot_audio", 15.0)
    assert wait_clear == WaitFor("clear", 2.5)
    assert isinstance(barge, BargeIn) and barge.timeout == 3.0 and barge.clip is say.clip
    assert dtmf == Dtmf("#") and hang_up == HangUp()


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"jump": 1}], r"step 1: needs exactly one action .* found none"),
        ([{"say": "a.wav", "wait": 1}], r"step 1: needs exactly one action .* found 2 \(say, wait\)"),
        ([{"wait": 1}, {"say": "a.wav", "volume": 2}], r"step 2 \(say\): unknown key\(s\) \['volume'\]"),
        ([{"wait": 1, "timeout": 2}], r"step 1 \(wait\): unknown key\(s\) \['timeout'\]"),
        ([{"wait_for": "bot_audio", "timeout": -1}], r"step 1 \(wait_for\): timeout must be more than 0"),
        ([{"wait_for": "bot_audio", "timeout": "5"}], r"step 1 \(wait_for\): timeout must be a number"),
        ([{"wait_for": "bot_audio", "timeout": True}], r"timeout must be a number"),
        ([{"barge_in": "a.wav", "timeout": 0}], r"step 1 \(barge_in\): timeout must be more than 0"),
        ([{"wait": 0}], r"step 1 \(wait\): wait must be more than 0"),
        ([{"wait_for": "silence"}], r"step 1 \(wait_for\): must be one of bot_audio, bot_done, mark, clear"),
        ([{"dtmf": "12"}], r"step 1 \(dtmf\): must be one key"),
        ([{"dtmf": "A"}], r"step 1 \(dtmf\): must be one key"),
        ([{"hang_up": False}], r"step 1 \(hang_up\): must be true"),
        ([{"hang_up": True}, {"wait": 1}], r"step 1 \(hang_up\): must be the last step"),
        ([{"say": "missing.wav"}], r"step 1 \(say\): .*missing.wav: cannot read"),
        ([{"say": ""}], r"step 1 \(say\): must be a WAV file path"),
        (["say hello"], r"step 1: must be an object"),
        ([], r"'steps' must be a non-empty list"),
    ],
)
def test_invalid_steps_are_named(tmp_path: Path, steps: list[Any], message: str) -> None:
    write_tone(tmp_path / "a.wav", 200)
    with pytest.raises(ScenarioError, match=message) as caught:
        parse(tmp_path, steps)
    assert str(caught.value).startswith("s.json: ")


def test_top_level_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"unknown key\(s\) \['stepz'\]"):
        parse_scenario({"stepz": []}, tmp_path, "s.json")
    with pytest.raises(ScenarioError, match="must be a JSON object"):
        parse_scenario([{"wait": 1}], tmp_path, "s.json")
    with pytest.raises(ScenarioError, match="'name' must be a non-empty string"):
        parse(tmp_path, [{"wait": 1}], name=3)


def test_files_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    (tmp_path / "scenarios").mkdir()
    write_tone(tmp_path / "audio" / "hi.wav", 300)
    path = write_scenario(tmp_path / "scenarios" / "hi.json", [{"say": "../audio/hi.wav"}], name="hi")
    scenario = load_scenario(path)
    assert scenario.name == "hi"
    [say] = scenario.steps
    assert isinstance(say, Say) and say.clip.path == (tmp_path / "audio" / "hi.wav").resolve()

    broken = tmp_path / "broken.json"
    broken.write_text('{"steps": [', encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"broken.json: not valid JSON: .* line 1"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "absent.json")


def test_shipped_examples_are_valid() -> None:
    names = sorted(p.name for p in (EXAMPLES / "scenarios").glob("*.json"))
    assert {"one_turn.json", "barge_in.json", "load.json"} <= set(names)
    for name in names:
        assert load_scenario(EXAMPLES / "scenarios" / name).steps


def test_one_turn_scenario() -> None:
    scenario = one_turn(EXAMPLES / "audio" / "hello.wav")
    kinds = [type(step) for step in scenario.steps]
    assert kinds == [Say, WaitFor, WaitFor, HangUp]
    assert [s.event for s in scenario.steps if isinstance(s, WaitFor)] == ["bot_audio", "bot_done"]
    with pytest.raises(ScenarioError, match="cannot read"):
        one_turn(Path("/nonexistent.wav"))


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (44100, 1), (24000, 2), (48000, 2)])
def test_clips_at_any_rate_become_8k_frames(tmp_path: Path, rate: int, channels: int) -> None:
    samples = tone(500, 700, rate)
    if channels == 2:
        samples = np.column_stack((samples, samples)).reshape(-1)  # the same tone on both sides
    clip = load_clip(write_wav(tmp_path / f"t{rate}.wav", samples, rate, channels).resolve())
    assert abs(len(clip.ulaw) - 4000) <= 8  # 500 ms at 8 kHz
    assert abs(dominant_hz(clip.ulaw) - 700) < 10
    level = np.abs(ulaw_decode(clip.ulaw)[400:-400].astype(np.int32)).max()
    assert 7000 < level < 8600  # no gain change from resampling or the stereo downmix
    assert len(clip.payloads) == -(-len(clip.ulaw) // 160)
    assert clip.seconds == pytest.approx(len(clip.payloads) * 0.02)


def test_clips_are_cached_and_trimmed(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "padded.wav", np.concatenate((tone(400, 500), np.zeros(8000, np.int16))))
    clip = load_clip(path.resolve())
    assert load_clip(path.resolve()) is clip  # loaded once per process
    assert len(clip.ulaw) == 3200  # the second of trailing silence is gone: speech ends the clip
    with pytest.raises(ClipError, match="silent"):
        load_clip(write_wav(tmp_path / "quiet.wav", np.zeros(800, np.int16)).resolve())
    (tmp_path / "text.wav").write_text("not a wav")
    with pytest.raises(ClipError, match="not a RIFF/WAVE"):
        load_clip((tmp_path / "text.wav").resolve())
