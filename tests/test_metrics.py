"""GET /metrics on the real bridge: live values during a call, totals after, bounded labels."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ivr_bridge.standins.nextevi import VoiceApiBehaviour
from ivr_bridge.standins.twilio import TwilioCaller
from tests.test_end_to_end import API_KEY, nextevi_settings, tone_ulaw, voice_api


async def scrape(base_url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return response.text, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_calls(make_bridge) -> None:
    behaviour = VoiceApiBehaviour(reply_ms=3000, tts_chunk_ms=200, pace=False)
    async with voice_api(behaviour) as standin:
        bridge = make_bridge(nextevi_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.say(tone_ulaw(500))
            await caller.wait_for(lambda: len(caller.received) >= 1600, 15)
            _, live = await scrape(bridge.base_url)
            assert value(live, "ivr_active_calls") == 1
            assert value(live, "ivr_frames_in_total") > 0
            # 3 s of reply went to Twilio at once: most of it is still queued there.
            assert value(live, "ivr_outbound_audio_queued_seconds") > 1.0
            await caller.say(tone_ulaw(400))  # talk over the reply
            await caller.wait_for(lambda: caller.clears == 1, 10)
            await caller.hang_up()
        await bridge.wait_for_calls(1)

        # A second call whose voice API session fails with 4003 (access denied: no retry).
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            session = await standin.wait_for_session(1)
            await standin.close_session(session, code=4003)
            await caller.wait_closed(10)
        await bridge.wait_for_calls(2)

    text, after = await scrape(bridge.base_url)
    assert value(after, "ivr_active_calls") == 0
    assert value(after, "ivr_calls_total", outcome="stream_stopped") == 1
    assert value(after, "ivr_calls_total", outcome="voice_api_failed") == 1
    assert value(after, "ivr_upstream_errors_total", code="4003") == 1
    assert value(after, "ivr_barge_ins_total") == 1
    assert value(after, "ivr_barge_in_stop_seconds_count") == 1
    assert value(after, "ivr_reply_latency_seconds_count") >= 1
    assert value(after, "ivr_upstream_connect_seconds_count") == 2
    frames_out = value(after, "ivr_frames_out_total")
    assert frames_out >= 1600 / 160 and frames_out == sum(c.stats.frames_out for c in bridge.finished)
    assert value(after, "ivr_frames_in_total") == sum(c.stats.frames_in for c in bridge.finished)
    assert value(after, "ivr_outbound_audio_queued_seconds") == 0
    # No secrets, no per-call labels.
    assert API_KEY not in text
    assert not any(call.call_sid in text for call in bridge.finished)
