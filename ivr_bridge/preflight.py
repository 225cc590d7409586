"""Preflight: does the configured voice API take a session with these credentials?

A wrong API key or configuration id would otherwise be found by the first caller. This
opens one session the way a call does and waits for the API to say it is ready (or to
refuse): `ivr-bridge check` runs it once, `IVR_PREFLIGHT=1` runs it at start-up and keeps
`/readyz` at 503 with the reason until it passes.
"""

from __future__ import annotations

import asyncio
import time

from ivr_bridge.providers import new_session
from ivr_bridge.providers.base import CallInfo, Closed, ProviderError, Ready
from ivr_bridge.settings import Settings

TIMEOUT_S = 10.0
READY = frozenset({"ready", "echo"})  # NextEVI's status after its session settings; the echo engine


async def preflight(settings: Settings, timeout: float = TIMEOUT_S) -> str | None:
    """None if a session was opened and declared ready within `timeout`, else why not, in
    one line without secrets (the session's own errors never carry the key)."""
    session = new_session(settings, CallInfo(call_sid="preflight"))
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            try:
                await session.connect()
            except ConnectionError as exc:
                return str(exc)
            while True:
                event = await session.receive()
                if isinstance(event, Ready) and event.detail in READY:
                    return None
                if isinstance(event, Closed):
                    reason = f" {event.reason}" if event.reason else ""
                    return f"the voice API closed the session: {event.code}{reason}"
                if isinstance(event, ProviderError):
                    return f"the voice API answered an error: {event.code} {event.message}".strip()
    except TimeoutError:
        return f"the voice API did not declare the session ready within {time.monotonic() - started:.0f} s"
    finally:
        await session.close()
