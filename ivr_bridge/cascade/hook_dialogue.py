"""The `hook` dialogue step: each caller turn POSTed, signed, to IVR_DIALOGUE_URL; its answer
is what the bot says and does.

The request, one per turn (the START turn too, so the greeting comes from the endpoint):

    POST IVR_DIALOGUE_URL
    X-IVR-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(IVR_HOOK_SECRET, b"<t>." + body)>

    {"call_sid": "CA...", "caller": "+15550123", "called": "+15550100",
     "parameters": {...the stream's <Parameter>s...},
     "turn": {"kind": "start" | "speech" | "digits" | "no_input", "text": "..."},
     "history": [{"role": "caller", "kind": "speech", "text": "opening hours"},
                 {"role": "bot", "text": "We open at nine", "cut": true}, ...]}

The signature is the call events' (`ivr_bridge.hooks.sign`; check it with `hooks.verify`),
sent when IVR_HOOK_SECRET is set. `history` holds the call's earlier turns (not the START
turn) and the bot's replies as the caller HEARD them: a reply the caller talked over has
`"cut": true` and only the words that reached them. At most `MAX_HISTORY` entries, the
latest.

The answer, JSON:

    {"say": "Transferring you now.", "action": "transfer", "to": "+15550100"}

`say` (optional) is spoken; `action` (optional) is "transfer" (with `to`: an E.164 number
or sip: URI), "hangup" or "none", carried out after `say` has played. `{}` says nothing.

One attempt per turn, no retry (the caller is waiting), within IVR_HOOK_TIMEOUT_S. A failure
(refused, timed out, non-2xx, an answer that is not such an object, an unusable action, more
than `hooks.MAX_ANSWER_BYTES`) is logged in one line, without the URL's query or
credentials, and the caller hears a short apology; `respond` never raises.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from ivr_bridge.cascade.engines import Act, Turn, TurnKind
from ivr_bridge.hooks import (
    MAX_ANSWER_BYTES,
    Target,
    parse_action,
    post_signed,
    safe_url,
    scrub,
    ssl_context,
    target_of,
)
from ivr_bridge.providers.base import CallInfo
from ivr_bridge.settings import Settings

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong."
MAX_HISTORY = 50  # entries sent with a turn: the latest
# Below the 5 s most servers (uvicorn, Node) keep an idle connection: a POST is not retried
# on a connection the server closed, so none is reused once it may have.
KEEPALIVE_S = 4.0


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl_context()  # certifi's CAs, as the hooks use: built once, off the event loop


class AnswerError(ValueError):
    """The endpoint's answer cannot be used; the message says why, briefly."""


def parse_answer(body: bytes | None) -> tuple[str, Act | None]:
    """(what to say, what to do) of an answer. Raises AnswerError."""
    if body is None:
        raise AnswerError(f"an answer larger than {MAX_ANSWER_BYTES} bytes")
    if not body.strip():
        raise AnswerError("an empty answer")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise AnswerError("an answer that is not JSON") from exc
    if not isinstance(data, dict):
        raise AnswerError("an answer that is not a JSON object")
    say = data.get("say")
    if say is None:
        say = ""
    if not isinstance(say, str):
        raise AnswerError("an answer whose 'say' is not a string")
    try:
        action = parse_action(body)
    except ValueError as exc:
        raise AnswerError(f"an unusable action: {exc}") from exc
    if action is None or action.action == "none":
        return say, None
    return say, Act("hangup" if action.action == "hangup" else f"transfer:{action.to}")


class HookDialogue:
    """`Dialogue` answered by the call centre's own endpoint, one signed POST per turn."""

    def __init__(self, settings: Settings, call: CallInfo) -> None:
        self._call = call
        self._call_sid = call.call_sid or "-"
        self._url: str = settings.dialogue.dialogue_url
        self._shown_url = safe_url(self._url) if self._url else "(no IVR_DIALOGUE_URL)"
        self._secret = settings.hook_secret
        self._timeout_s = settings.hook_timeout_s
        self.history: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None  # the last reply's history entry
        self._session: aiohttp.ClientSession | None = None
        self._target: Target | None = None

    def __repr__(self) -> str:
        return f"HookDialogue(url={self._shown_url!r}, call={self._call_sid!r})"

    async def start(self) -> None:
        if not self._url:
            raise ConnectionError("IVR_DIALOGUE_URL is required for the hook dialogue")
        try:
            self._target = target_of(self._url)
        except (ValueError, TypeError) as exc:
            raise ConnectionError(f"IVR_DIALOGUE_URL is not usable: {self._shown_url}") from exc
        if self._target.url.scheme == "https":
            await asyncio.to_thread(_tls)

    def expected(self) -> list[str]:
        return []

    def heard(self, said: str, heard: str) -> None:
        if self._last is not None:
            self._last["text"] = heard
            self._last["cut"] = True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def request(self, turn: Turn) -> dict[str, Any]:
        """The JSON body of `turn`'s POST."""
        return {
            "call_sid": self._call.call_sid,
            "caller": self._call.caller,
            "called": self._call.called,
            "parameters": dict(self._call.parameters),
            "turn": {"kind": str(turn.kind), "text": turn.text},
            "history": self.history[-MAX_HISTORY:],
        }

    async def respond(self, turn: Turn) -> AsyncIterator[str | Act]:
        self._last = None
        body = json.dumps(self.request(turn), ensure_ascii=False).encode()
        if turn.kind is not TurnKind.START:
            # Whatever comes of the POST, the caller did take this turn.
            self.history.append({"role": "caller", "kind": str(turn.kind), "text": turn.text})
            del self.history[:-MAX_HISTORY]
        started = time.monotonic()
        reason = ""
        say: str = ""
        act: Act | None = None
        try:
            say, act = parse_answer(await self._post(body))
        except AnswerError as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"no answer within {self._timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            reason = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self._url)
            reason += f" after {time.monotonic() - started:.1f} s"
        except Exception as exc:  # a bug must not end the call: the caller hears an apology
            log.exception("[%s] dialogue hook: the turn failed", self._call_sid)
            reason = type(exc).__name__
        if reason:
            say, act = APOLOGY, None
            log.warning("[%s] dialogue hook %s: %s; apologising", self._call_sid, self._shown_url, reason)
        if say:
            self._last = {"role": "bot", "text": say, "cut": False}
            self.history.append(self._last)
            yield say
        if act is not None:
            yield act

    # -- HTTP ------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            assert self._target is not None
            https = self._target.url.scheme == "https"
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S, ssl=_tls() if https else True),
                # The whole turn, answer included; exact (aiohttp rounds 5 s and more up).
                timeout=aiohttp.ClientTimeout(total=self._timeout_s, ceil_threshold=math.inf),
            )
        return self._session

    async def _post(self, body: bytes) -> bytes | None:
        """The 2xx answer (None past MAX_ANSWER_BYTES). Raises AnswerError for another
        status, TimeoutError, aiohttp.ClientError or OSError."""
        if self._target is None:
            await self.start()
        assert self._target is not None
        status, answer = await post_signed(self._http(), self._target, body, self._secret)
        if not 200 <= status < 300:
            raise AnswerError(f"HTTP {status}")
        return answer
