"""`voxnexus`: VoxNexus speech-to-text and text-to-speech sockets, with the bridge's own
turn-taking, barge-in and dialogue step between them (`ivr_bridge.cascade`)."""

from __future__ import annotations

from ivr_bridge.cascade.dialogues import new_dialogue
from ivr_bridge.cascade.session import CascadeSession
from ivr_bridge.cascade.voxnexus import VoxNexusSettings, VoxNexusSpeechToText, VoxNexusTextToSpeech
from ivr_bridge.providers.base import CallInfo, Provider
from ivr_bridge.settings import Settings


def voxnexus_session(settings: Settings, call: CallInfo | None = None) -> CascadeSession:
    s: VoxNexusSettings = settings.voice
    return CascadeSession(
        "voxnexus",
        VoxNexusSpeechToText(s),
        VoxNexusTextToSpeech(s),
        new_dialogue(settings, call or CallInfo()),
        settings.dialogue,
    )


PROVIDER = Provider(
    "voxnexus",
    voxnexus_session,
    VoxNexusSettings,
    credential="VOXNEXUS_API_KEY",
    prefix="VOXNEXUS_",
    standin="ivr_bridge.standins.voxnexus",
    cascade=True,
    upstream_chunk_ms=20,  # the turn detector runs here; the STT client batches its own messages
    describe=lambda s: f"STT {s.stt_url}, TTS {s.tts_url}",
)
