"""Voice API providers: one module each, behind the `VoiceSession` interface.

`SESSIONS` is the registry: a provider's name and where its session class lives (imported
only when that provider is used). Adding a provider is one module, its settings and its
stand-in, and one line here.
"""

from __future__ import annotations

import importlib

from ivr_bridge.providers.base import CallInfo, VoiceSession
from ivr_bridge.settings import Settings

SESSIONS = {
    "echo": "ivr_bridge.providers.echo:EchoSession",
    "nextevi": "ivr_bridge.providers.nextevi:NextEviSession",
    "elevenlabs": "ivr_bridge.providers.elevenlabs:ElevenLabsSession",
    "openai": "ivr_bridge.providers.openai_realtime:OpenAiRealtimeSession",
    "navtalk": "ivr_bridge.providers.navtalk:NavTalkSession",
}


def new_session(settings: Settings, call: CallInfo | None = None) -> VoiceSession:
    """A fresh, unconnected session with the configured provider, for one call."""
    module, _, name = SESSIONS[settings.provider].partition(":")
    return getattr(importlib.import_module(module), name)(settings, call or CallInfo())  # type: ignore[no-any-return]
