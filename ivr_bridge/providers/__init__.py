"""Voice API providers: one module each, behind the `VoiceSession` interface.

Each module declares its `PROVIDER` (`base.Provider`): name, session class, settings,
credential and stand-in. `MODULES` lists them; everything else (settings validation, the
README's settings table, `stub-voice-api`, the session factory) reads the registry. Adding
a provider is one module, its settings and its stand-in, and one line here.
"""

from __future__ import annotations

import importlib
from functools import cache

from ivr_bridge.providers.base import CallInfo, Provider, VoiceSession
from ivr_bridge.settings import Settings

MODULES = (
    "ivr_bridge.providers.nextevi",
    "ivr_bridge.providers.elevenlabs",
    "ivr_bridge.providers.openai_realtime",
    "ivr_bridge.providers.navtalk",
    "ivr_bridge.providers.voxnexus",
    "ivr_bridge.providers.local",
    "ivr_bridge.providers.echo",
)


@cache
def registry() -> dict[str, Provider]:
    """Every provider by name, in the order of `MODULES`."""
    providers = (importlib.import_module(module).PROVIDER for module in MODULES)
    return {provider.name: provider for provider in providers}


def session_cap(settings: Settings) -> float | None:
    """How long one voice session may last before the bridge renews it: IVR_MAX_SESSION_S,
    else the provider's own cap; None: never renewed."""
    return settings.max_session_s or registry()[settings.provider].session_cap_s


def upstream_chunk_ms(settings: Settings) -> int:
    """Caller audio per upstream message: IVR_UPSTREAM_CHUNK_MS, else the provider's."""
    return settings.upstream_chunk_ms or registry()[settings.provider].upstream_chunk_ms


def new_session(settings: Settings, call: CallInfo | None = None) -> VoiceSession:
    """A fresh, unconnected session with the configured provider, for one call."""
    return registry()[settings.provider].session(settings, call or CallInfo())
