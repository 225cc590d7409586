"""Voice API providers: one module each, behind the `VoiceSession` interface."""

from __future__ import annotations

from ivr_bridge.providers.base import VoiceSession
from ivr_bridge.settings import Settings


def new_session(settings: Settings, call_sid: str = "") -> VoiceSession:
    """A fresh, unconnected session with the configured provider, for one call."""
    if settings.provider == "nextevi":
        from ivr_bridge.providers.nextevi import NextEviSession

        return NextEviSession(settings, call_sid=call_sid)
    if settings.provider == "elevenlabs":
        from ivr_bridge.providers.elevenlabs import ElevenLabsSession

        return ElevenLabsSession(settings, call_sid=call_sid)
    if settings.provider == "navtalk":
        from ivr_bridge.providers.navtalk import NavTalkSession

        return NavTalkSession(settings, call_sid=call_sid)
    if settings.provider == "openai":
        from ivr_bridge.providers.openai_realtime import OpenAiRealtimeSession

        return OpenAiRealtimeSession(settings, call_sid=call_sid)
    from ivr_bridge.providers.echo import EchoSession

    return EchoSession()
