"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from ivr_bridge.loadgen.webhook import StreamTarget, stream_headers
from ivr_bridge.standins.twilio import TwilioCaller


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until `predicate` holds, re-checking every 20 ms; for state with no event to await."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"not true within {timeout} s: {what or predicate}")
        await asyncio.sleep(0.02)


def stream_caller(
    target: StreamTarget, call_sid: str, auth_token: str | None, *, url: str = "", continuous: bool = True
) -> TwilioCaller:
    """A caller on the stream the TwiML named, opened as Twilio opens it: the webhook's
    parameters (the token among them), the upgrade signed over the TwiML's stream URL. `url`
    reaches one instance directly instead (the signature stays over the public URL)."""
    return TwilioCaller(
        url or target.url,
        call_sid=call_sid,
        custom_parameters=target.parameters,
        headers=stream_headers(StreamTarget(target.url, {}), auth_token),
        continuous=continuous,
    )
