"""ElevenLabs agents: the protocol class in memory, and whole calls over loopback against
the stand-in: mu-law through untouched both ways, the greeting before the caller speaks,
barge-in with the stale chunks of the cut turn dropped, pings answered, PCM formats
converted, a private agent reached through a signed URL."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from base64 import b64encode
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from ivr_bridge.audio import TWILIO_AUDIO, AudioFormat, Encoding, Ulaw
from ivr_bridge.providers.base import AssistantAudio, Interruption
from ivr_bridge.providers.elevenlabs import ElevenLabsProtocol, ElevenLabsSettings, parse_format
from ivr_bridge.settings import Settings
from ivr_bridge.standins.elevenlabs import AgentBehaviour, ElevenLabsStandIn
from ivr_bridge.standins.twilio import TwilioCaller
from tests.call_harness import until
from tests.test_end_to_end import tone_ulaw
from tests.test_hostile_state import free_port
from tests.test_try_each_provider import listening


def event(kind: str, **body: object) -> str:
    return json.dumps({"type": kind, f"{kind}_event": body})


def test_formats_pings_and_stale_turns_in_memory() -> None:
    assert parse_format("ulaw_8000") == TWILIO_AUDIO
    assert parse_format("pcm_22050") == AudioFormat(Encoding.PCM16, 22050)
    assert parse_format("mp3_44100") is None
    protocol = ElevenLabsProtocol()
    protocol.receive(
        event(
            "conversation_initiation_metadata",
            user_input_audio_format="ulaw_8000",
            agent_output_audio_format="ulaw_8000",
        )
    )
    assert protocol.send_format == protocol.receive_format == TWILIO_AUDIO
    [audio] = protocol.receive(event("audio", audio_base_64="AAEC", event_id=3))
    assert isinstance(audio, AssistantAudio) and isinstance(audio.pcm, Ulaw) and audio.response == 3
    assert protocol.receive(event("interruption", event_id=3)) == [Interruption("caller speech (agent)")]
    assert protocol.receive(event("audio", audio_base_64="AAEC", event_id=3)) == []  # stale: dropped
    assert protocol.stale_chunks == 1
    assert protocol.receive(event("audio", audio_base_64="AAEC", event_id=4))[0].response == 4
    legacy = json.dumps({"type": "audio", "audio": {"chunk": "AAEC"}})
    assert isinstance(protocol.receive(legacy)[0], AssistantAudio)  # the older shape is accepted
    assert protocol.receive(event("ping", event_id=7, ping_ms=None)) == []
    assert json.loads(protocol.outbox.pop()) == {"type": "pong", "event_id": 7}
    assert ElevenLabsProtocol.classify(1008, "override_error").retryable is False
    assert ElevenLabsProtocol.classify(1002, "transport_receive_timeout").retryable is True
    # The agent's maximum duration ends the conversation, in either era's close: no retry
    # (a new conversation would greet the caller again).
    assert ElevenLabsProtocol.classify(1011, "Conversation has exceeded maximum duration").normal
    assert ElevenLabsProtocol.classify(1000, "max_duration_exceeded").normal
    assert not ElevenLabsProtocol.classify(1011, "internal error").normal


def agent_settings(standin: ElevenLabsStandIn, api_key: str = "") -> Settings:
    agent = ElevenLabsSettings(standin.behaviour.agent_id, api_key, standin.url, standin.api_url)
    return Settings(provider="elevenlabs", voice=agent, upstream_chunk_ms=20)


async def test_greeting_and_a_turn_pass_mulaw_through_untouched(make_bridge) -> None:
    async with ElevenLabsStandIn() as standin:
        bridge = make_bridge(agent_settings(standin))
        said = tone_ulaw(600, hz=500)
        details = {"From": "+15550001111", "Language": "fr"}
        async with TwilioCaller(bridge.stream_url, continuous=True, custom_parameters=details) as caller:
            # The greeting, unasked, played out (speech during it would be a barge-in).
            await caller.wait_for(lambda: len(caller.received) >= 8 * 500 and not caller.playing, 20)
            await caller.say(said)
            await caller.wait_for(lambda: len(caller.received) >= 8 * 1800, 20)  # and the reply
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    assert said in bytes(peer.appended)  # up byte for byte
    sent, heard = b"".join(peer.chunks), bytes(caller.received)
    # Down byte for byte, only re-framed: the greeting's last frame is padded with silence.
    greeting = b"".join(peer.chunks[: _greeting_chunks(peer)])
    assert heard[: len(greeting)] == greeting and len(sent) >= len(greeting)
    assert all(peer.pings.values()) and peer.pings  # every ping got its pong
    assert call.outcome == "stream_stopped" and call.provider == "elevenlabs"
    [initiation] = standin.initiations
    variables = initiation["dynamic_variables"]  # the call's details reach the agent
    assert variables["caller_number"] == "+15550001111" and variables["Language"] == "fr"
    assert variables["call_sid"] == call.call_sid


def _greeting_chunks(peer) -> int:  # type: ignore[no-untyped-def]
    total, n = 0, 0
    while n < len(peer.chunks) and total < 8 * 600:
        total += len(peer.chunks[n])
        n += 1
    return n


async def test_barge_in_drops_the_stale_chunks_of_the_cut_turn(make_bridge) -> None:
    async with ElevenLabsStandIn(AgentBehaviour(greeting_ms=4000, stale_chunks=3)) as standin:
        bridge = make_bridge(agent_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.wait_for(lambda: len(caller.marks_played) >= 2, 20)
            await caller.say(tone_ulaw(400, hz=700))  # over the greeting
            await caller.wait_for(lambda: caller.clears >= 1, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [greeting] = call.playback.responses[:1]
    assert greeting.interrupted and call.stats.barge_ins == 1
    # The stale chunks sent after the interruption never reached the caller.
    assert caller.received_total < sum(len(c) for c in standin.peers[0].chunks)


async def test_speech_late_in_a_turn_the_agent_has_finished_sending_is_still_a_barge_in(make_bridge) -> None:
    # The agent sends its turn faster than real time; it is speaking until the caller has
    # heard it all, and interrupts on speech until then.
    async with ElevenLabsStandIn(AgentBehaviour(greeting_ms=3000)) as standin:
        bridge = make_bridge(agent_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await until(lambda: bool(standin.peers) and standin.peers[0].agent is not None, 20)
            [peer] = standin.peers
            await until(lambda: peer.agent is not None and peer.agent.done(), 20)  # all of it sent
            sent = sum(len(c) for c in peer.chunks)
            await caller.wait_for(lambda: caller.received_total >= sent and len(caller.marks_played) >= 6, 20)
            await caller.say(tone_ulaw(400, hz=700))
            await caller.wait_for(lambda: caller.clears >= 1, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [greeting] = call.playback.responses[:1]
    assert greeting.interrupted and 0 < greeting.heard_ms < 3000


@pytest.mark.parametrize("formats", [("pcm_16000", "pcm_16000"), ("ulaw_8000", "pcm_24000")])
async def test_pcm_formats_are_converted(make_bridge, formats: tuple[str, str]) -> None:
    behaviour = AgentBehaviour(input_format=formats[0], output_format=formats[1], greeting_ms=800)
    async with ElevenLabsStandIn(behaviour) as standin:
        bridge = make_bridge(agent_settings(standin))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.wait_for(lambda: len(caller.received) >= 8 * 700, 20)
            await caller.say(tone_ulaw(300))
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    [peer] = standin.peers
    if formats[0] == "pcm_16000":
        assert len(peer.appended) % 2 == 0 and len(peer.appended) >= 300 * 32  # 16 kHz PCM16 went up
    assert call.outcome == "stream_stopped" and call.stats.frames_out >= 35


async def test_a_private_agent_is_reached_through_a_signed_url(make_bridge) -> None:
    async with ElevenLabsStandIn(AgentBehaviour(api_key="xi-secret-key")) as standin:
        bridge = make_bridge(agent_settings(standin, api_key="xi-secret-key"))
        async with TwilioCaller(bridge.stream_url, continuous=True) as caller:
            await caller.wait_for(lambda: len(caller.received) >= 8 * 400, 20)
            await caller.hang_up()
        wrong = make_bridge(agent_settings(standin, api_key="xi-wrong"))
        async with TwilioCaller(wrong.stream_url, continuous=True) as refused:
            await refused.wait_closed(30)
        [call] = await bridge.wait_for_calls(1)
        [failed] = await wrong.wait_for_calls(1)
    assert call.outcome == "stream_stopped"
    assert failed.outcome == "voice_api_unreachable"  # refused a signed URL: no session


async def test_the_agent_ends_the_call_after_its_sentence(make_bridge, twilio_rest) -> None:
    import asyncio

    from tests.test_resilience import signed_caller, with_rest

    rest, rest_url = twilio_rest
    behaviour = AgentBehaviour(greeting_ms=300, reply_ms=900, tool_after_reply=("end_call", {}))
    async with ElevenLabsStandIn(behaviour) as standin:
        bridge = make_bridge(with_rest(agent_settings(standin), rest, rest_url))
        caller = await signed_caller(bridge, rest.auth_token)
        rest.live_calls.add(caller.call_sid)
        async with caller:
            await caller.wait_for(lambda: len(caller.marks_played) >= 1, 20)  # the greeting
            await caller.say(tone_ulaw(600, hz=500))
            [update] = await asyncio.to_thread(rest.wait_for_updates, 1, 20)
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
    assert update.params.get("Status") == "completed"  # hung up through Twilio's REST API
    assert update.at >= caller.marks_played_at[-1]
    assert call.outcome == "hung_up"
    [result] = standin.tool_results
    assert result["is_error"] is False and result["tool_call_id"].startswith("toolu_")


async def test_the_stand_in_from_the_command_line_speaks_the_agent_format_and_records_a_timeline(
    tmp_path: Path,
) -> None:
    timeline, port = tmp_path / "timeline.jsonl", free_port()
    standin = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ivr_bridge", "stub-voice-api", "--provider", "elevenlabs", "--port", str(port),
        "--agent-format", "pcm_24000", "--timeline", str(timeline), stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await listening(port)
        async with connect(f"ws://127.0.0.1:{port}/v1/convai/conversation?agent_id=agent_test") as ws:
            initiation = {
                "type": "conversation_initiation_client_data",
                "dynamic_variables": {"call_sid": "CA1"},
            }
            await ws.send(json.dumps(initiation))
            metadata = json.loads(await ws.recv())["conversation_initiation_metadata_event"]
            assert metadata["user_input_audio_format"] == metadata["agent_output_audio_format"] == "pcm_24000"
            greeting: list[dict] = []  # its text, then audio (pings may come between)
            while sum(m["type"] == "audio" for m in greeting) < 2:
                if (message := json.loads(await ws.recv()))["type"] != "ping":
                    greeting.append(message)
            await ws.send(json.dumps({"user_audio_chunk": b64encode(b"\0\0" * 480).decode()}))  # 20 ms
        await until(
            lambda: timeline.exists() and timeline.read_text().endswith("\n"), 20
        )  # at the session's end
    finally:
        standin.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(standin.wait(), 20) == 0
    assert [m["type"] for m in greeting] == ["agent_response", "audio", "audio"]
    [session] = [json.loads(line) for line in timeline.read_text().splitlines()]
    assert session["connection_id"].startswith("CA1-") and session["frame_bytes"] == 960  # 20 ms at 24 kHz
    assert session["audio_bytes"] == [960] and len(session["tts_at"]) == len(session["tts_ms"]) >= 2
