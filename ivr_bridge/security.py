"""Who gets in: Twilio request signatures and per-call stream tokens. Sans-I/O.

Twilio signs each webhook and the Media Stream upgrade with the account's auth token
(`X-Twilio-Signature`). As defence in depth, `/twiml` also hands the stream a short-lived
token bound to the call sid; the stream's `start` must bring it back, once, in time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable

from twilio.request_validator import RequestValidator

TOKEN_PARAMETER = "token"  # the <Parameter> name carrying the per-call token
MAX_TOKEN_CHARS = 200  # a real token is ~60 characters; anything far longer is junk
MAX_USED_TOKENS = 100_000  # replay set bound; far above max_calls x calls per TTL
_SECRET_LABEL = b"ivr-bridge stream token"
_MAC_BYTES = 32


def stream_token_secret(auth_token: str) -> bytes:
    """The token key, derived from the auth token so every instance agrees with no extra
    config, and the auth token itself is never the key of anything we hand out."""
    return hmac.new(auth_token.encode("utf-8"), _SECRET_LABEL, hashlib.sha256).digest()


def signed_url(public_url: str, path: str, query_string: str = "") -> str:
    """The URL Twilio signed: the configured public base, never the socket or Host header,
    which a proxy rewrites and a client controls."""
    url = public_url.rstrip("/") + path
    return f"{url}?{query_string}" if query_string else url


class _FormFields(dict[str, list[str]]):
    """Form fields with repeats kept; `getlist` is what RequestValidator looks for."""

    def getlist(self, name: str) -> list[str]:
        return self[name]


def signature_valid(
    auth_token: str, url: str, fields: Iterable[tuple[str, str]], signature: str | None
) -> bool:
    """Whether `signature` is Twilio's over `url` and the POST `fields` (none for a GET or
    the stream upgrade)."""
    if not signature:
        return False
    params = _FormFields()
    for name, value in fields:
        params.setdefault(name, []).append(value)
    # RequestValidator compares in constant time and tries the URL with and without a port.
    return bool(RequestValidator(auth_token).validate(url, params, signature))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class StreamTokens:
    """Mints and checks per-call stream tokens: `<expiry ms>.<HMAC-SHA256(call sid, expiry)>`.

    Checking a token spends it: a used token is kept until it expires (bounded; the oldest
    are forgotten first), so a replay on this instance is refused.
    """

    def __init__(
        self,
        secret: bytes,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        max_used: int = MAX_USED_TOKENS,
    ) -> None:
        # Wall clock, not monotonic: the token may be minted by another instance.
        self._secret = secret
        self._ttl_s = ttl_s
        self._clock = clock
        self._max_used = max_used
        self._used: dict[bytes, int] = {}  # MAC -> expiry ms; insertion order ~ expiry order

    def _mac(self, call_sid: str, expiry_ms: int) -> bytes:
        message = f"{call_sid}\x00{expiry_ms}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def mint(self, call_sid: str) -> str:
        expiry_ms = int((self._clock() + self._ttl_s) * 1000)
        return f"{expiry_ms}.{_b64(self._mac(call_sid, expiry_ms))}"

    def check(self, token: str | None, call_sid: str) -> str | None:
        """Why `token` does not admit `call_sid`'s stream, or None (and the token is spent).

        Reasons are short and never echo the token."""
        if not token:
            return "no stream token"
        expiry_text, dot, mac_text = token.partition(".")
        if len(token) > MAX_TOKEN_CHARS or not dot or not expiry_text.isdigit():
            return "malformed stream token"
        try:
            mac = base64.urlsafe_b64decode(mac_text + "=" * (-len(mac_text) % 4))
        except (binascii.Error, ValueError):
            return "malformed stream token"
        expiry_ms = int(expiry_text)
        if len(mac) != _MAC_BYTES or not hmac.compare_digest(mac, self._mac(call_sid, expiry_ms)):
            return "stream token not valid for this call"
        now_ms = int(self._clock() * 1000)
        if now_ms > expiry_ms:
            return "stream token expired"
        self._prune(now_ms)
        if mac in self._used:
            return "stream token already used"
        self._used[mac] = expiry_ms
        return None

    def spent_key(self, token: str) -> tuple[str, int]:
        """For a token `check` has just admitted: a key naming it (its MAC, no secret) and the
        ms it has left, to mark it spent across instances (fabric.py)."""
        expiry_text, _, mac_text = token.partition(".")
        return mac_text, int(expiry_text) - int(self._clock() * 1000)

    def _prune(self, now_ms: int) -> None:
        used = self._used
        while used:
            oldest, expiry_ms = next(iter(used.items()))
            if expiry_ms >= now_ms and len(used) < self._max_used:
                break
            del used[oldest]

    @property
    def used_count(self) -> int:
        return len(self._used)
