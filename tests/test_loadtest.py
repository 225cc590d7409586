"""`ivr-bridge loadtest` against the real bridge (echo engine) under uvicorn."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from ivr_bridge.cli import main
from ivr_bridge.loadgen.loadtest import violation_kind
from tests.loadgen_support import write_scenario, write_tone

TIMEOUT = 20  # generous: the CI box is a loaded 2-core machine


def test_small_load_against_the_bridge(
    echo_bridge, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_tone(tmp_path / "speech.wav", 1500, hz=600)
    write_tone(tmp_path / "stop.wav", 400, hz=900)
    scenario = write_scenario(
        tmp_path / "load.json",
        [
            {"say": "speech.wav"},
            {"wait_for": "bot_audio", "timeout": TIMEOUT},
            {"wait": 0.2},
            {"barge_in": "stop.wav", "timeout": TIMEOUT},
            {"wait_for": "clear", "timeout": TIMEOUT},
            {"wait_for": "bot_done", "timeout": TIMEOUT},
            {"hang_up": True},
        ],
        name="small load",
    )
    histogram, timeline = tmp_path / "latency.html", tmp_path / "timeline.jsonl"
    code = main(
        [
            "loadtest",
            f"{echo_bridge.base_url}/twiml",
            "--scenario",
            str(scenario),
            "--calls",
            "6",
            "--concurrency",
            "3",
            "--ramp",
            "0.5",
            "--json",
            "--histogram",
            str(histogram),
            "--timeline",
            str(timeline),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads(out)
    calls = asyncio.run(echo_bridge.wait_for_calls(6))

    assert summary["scenario"] == "small load"
    assert summary["settings"] == {"calls": 6, "concurrency": 3, "ramp_s": 0.5}
    assert summary["calls"] == {"total": 6, "ok": 6, "failed": 0, "without_bot_audio": 0}
    assert summary["failures"] == {} and summary["violations"] == {"total": 0, "kinds": {}}
    latency = summary["latency_ms"]
    assert latency["first_audio"]["count"] == 6
    assert latency["reply"]["count"] == 12  # the say and the barge-in of each call
    assert latency["barge_in_stop"]["count"] == 6
    assert latency["send_lateness"]["count"] == summary["frames"]["sent"] > 6 * 100
    for row in latency.values():
        assert set(row) == {"count", "p50", "p95", "p99", "max"}
        assert row["p50"] <= row["p95"] <= row["p99"] <= row["max"]
    assert summary["media"]["clears"] == 6 and summary["media"]["received"] > 0
    assert set(summary["generator"]) == {"wall_s", "cpu_s", "cpu_percent", "slow"}

    page = histogram.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 4
    # Self-contained: nothing loaded from elsewhere (the webhook's URL is only shown as text).
    assert "<script" not in page and not re.search(r"(src|href)=[\"']?https?://", page)
    assert "<h2>Run</h2>" in page and "--concurrency 3" in page and "6 completed, 0 failed" in page

    lines = [json.loads(line) for line in timeline.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6
    assert {line["call_sid"] for line in lines} == {call.call_sid for call in calls}
    for line in lines:
        frames = line["frames_sent"]
        assert len(frames["chunk"]) == len(frames["sent_at"]) == len(frames["scheduled_at"]) > 100
        assert frames["chunk"] == list(range(1, len(frames["chunk"]) + 1))
        assert line["started_at"] <= frames["sent_at"][0]
        assert line["media_received"] and line["marks"] and len(line["clears"]) == 1
        [barge_in] = line["barge_ins"]
        assert barge_in["kind"] == "barge_in" and barge_in["stop_ms"] > 0
        assert [u["kind"] for u in line["utterances"]] == ["say", "barge_in"]
        assert line["utterances"][0]["ended_at"] < line["media_received"][0][0]


def test_failed_calls_are_grouped_and_exit_1(echo_bridge, tmp_path: Path, capsys) -> None:
    scenario = write_scenario(tmp_path / "s.json", [{"wait_for": "clear", "timeout": 0.2}])
    code = main(["loadtest", f"{echo_bridge.base_url}/twiml", "--scenario", str(scenario), "--calls", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "2 x step 1 (wait_for clear): no clear within 0.2 s" in out
    assert "p50" in out and "generator send lateness" in out


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    scenario = write_scenario(tmp_path / "s.json", [{"wait": 0.1}])
    assert main(["loadtest", "http://127.0.0.1:9/twiml", "--scenario", str(scenario)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the webhook http://127.0.0.1:9/twiml" in err

    bad = write_scenario(tmp_path / "bad.json", [{"wait_for": "nothing"}])
    assert main(["loadtest", "http://127.0.0.1:9/twiml", "--scenario", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step 1 (wait_for): must be one of" in err


def test_violations_group_across_calls() -> None:
    first = "media: payload of 100 bytes is not whole 160-byte frames"
    second = "media: payload of 260 bytes is not whole 160-byte frames"
    assert violation_kind(first) == violation_kind(second)
