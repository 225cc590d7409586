"""`local`: the embedded default. The bridge's own cascade on this machine, offline:
Whisper tiny.en and PocketSphinx hear, a dialogue step (by default the demo IVR flow) answers, eSpeak NG
speaks (`ivr_bridge.cascade`). No key, no network."""

from __future__ import annotations

from ivr_bridge.cascade.dialogues import new_dialogue
from ivr_bridge.cascade.local import LocalSettings, LocalSpeechToText, LocalTextToSpeech
from ivr_bridge.cascade.session import CascadeSession
from ivr_bridge.providers.base import CallInfo, Provider
from ivr_bridge.settings import Settings


def local_session(settings: Settings, call: CallInfo | None = None) -> CascadeSession:
    s: LocalSettings = settings.voice
    return CascadeSession(
        "local",
        LocalSpeechToText(int(s.workers), s.recogniser),
        LocalTextToSpeech(s.voice, int(s.speed)),
        new_dialogue(settings, call or CallInfo()),
        settings.dialogue,
    )


PROVIDER = Provider(
    "local",
    local_session,
    LocalSettings,
    prefix="IVR_LOCAL_",
    cascade=True,
    upstream_chunk_ms=20,  # in-process: the turn detector sees each frame as it comes
    describe=lambda s: f"embedded: {s.recogniser} recogniser, eSpeak NG voice {s.voice}",
)
