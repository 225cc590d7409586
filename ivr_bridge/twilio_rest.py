"""Twilio's REST API, for what a stream cannot do: redirect a call to other TwiML, or end it."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from ivr_bridge.settings import Settings

CALL_NOT_FOUND = 20404  # Twilio's error code for a call that has already ended
REQUEST_TIMEOUT_S = 10.0


class TwilioRest:
    def __init__(self, settings: Settings) -> None:
        self.available = bool(settings.twilio_account_sid and settings.twilio_auth_token)
        self._client: Client | None = None
        if self.available:
            self._client = Client(
                settings.twilio_account_sid,
                settings.twilio_auth_token,
                http_client=TwilioHttpClient(timeout=REQUEST_TIMEOUT_S),
            )
            self._client.api.base_url = settings.twilio_api_url  # a local stand-in in tests

    async def redirect(self, call_sid: str, twiml: str) -> bool:
        """Replace the call's TwiML (Twilio then stops its stream). False if the call is
        already gone; raises ConnectionError (no secrets in it) on any other failure."""
        return await self._update(call_sid, twiml=twiml)

    async def hang_up(self, call_sid: str) -> bool:
        """End the call. False if it is already gone; raises ConnectionError otherwise."""
        return await self._update(call_sid, status="completed")

    async def _update(self, call_sid: str, **fields: str) -> bool:
        assert self._client is not None, "no REST credentials"
        # The sid becomes a URL path segment: never let one change the path or query.
        calls = self._client.calls(quote(call_sid, safe=""))
        try:
            # The twilio client is synchronous (requests): keep it off the event loop.
            await asyncio.to_thread(calls.update, **fields)
        except TwilioRestException as exc:
            if exc.code == CALL_NOT_FOUND:
                return False
            raise ConnectionError(f"Twilio REST error {exc.status}/{exc.code}") from None
        except Exception as exc:  # network errors from requests, timeouts
            raise ConnectionError(f"Twilio REST unreachable: {type(exc).__name__}") from None
        return True
