"""Twilio's voice webhook, as Twilio calls it: POST the call's details, read the TwiML.

The form fields are those Twilio posts for an inbound call. With an auth token the
request carries ``X-Twilio-Signature``, and :func:`stream_headers` signs the WebSocket
upgrade the way Twilio does (over the stream URL with no parameters).
"""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

from twilio.request_validator import RequestValidator

FETCH_TIMEOUT = 15.0
USER_AGENT = "TwilioProxy/1.1"  # what Twilio's webhook requests announce


class WebhookError(Exception):
    """The webhook did not answer with a usable ``<Connect><Stream>``; one printable line."""


class RefusedError(WebhookError):
    """The webhook answered, but with other TwiML than a stream: the bridge's fallback for a
    call it does not take (at capacity, or draining for a shutdown)."""


@dataclass(frozen=True, slots=True)
class CallDetails:
    """The caller's side of one call, as posted to the webhook."""

    from_number: str = "+15550100001"
    to_number: str = "+15550100002"
    call_sid: str = field(default_factory=lambda: "CA" + secrets.token_hex(16))
    account_sid: str = "AC" + "0" * 32

    def form(self) -> dict[str, str]:
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": "ringing",
            "Called": self.to_number,
            "Caller": self.from_number,
            "Direction": "inbound",
            "From": self.from_number,
            "To": self.to_number,
        }


@dataclass(frozen=True, slots=True)
class StreamTarget:
    """Where the TwiML says to stream the call, with its ``<Parameter>``s."""

    url: str
    parameters: dict[str, str]


def sign(auth_token: str, url: str, params: dict[str, str]) -> str:
    return RequestValidator(auth_token).compute_signature(url, params)


def stream_headers(target: StreamTarget, auth_token: str | None) -> dict[str, str]:
    """Headers of the WebSocket upgrade: Twilio signs the stream URL with empty params."""
    return {"x-twilio-signature": sign(auth_token, target.url, {})} if auth_token else {}


def parse_twiml(xml: str, webhook_url: str) -> StreamTarget:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise WebhookError(f"the webhook's answer is not XML ({exc})") from None
    stream = root.find("./Connect/Stream") if root.tag == "Response" else None
    if stream is None and root.tag == "Response" and len(root):
        # The bridge's fallback (an apology, a <Dial>, a <Redirect>): it took no more calls.
        verbs = "".join(f"<{verb.tag}>" for verb in root)
        raise RefusedError(
            f"refused: the webhook answered its fallback TwiML {verbs} (at capacity or draining)"
        )
    if stream is None:
        raise WebhookError("the webhook's TwiML has no <Response><Connect><Stream>")
    url = stream.get("url")
    if not url:
        raise WebhookError("the webhook's <Stream> has no url")
    # A relative stream URL resolves against the webhook URL, with a WebSocket scheme.
    url = urljoin(webhook_url, url)
    scheme = urlsplit(url).scheme
    url = {"http": "ws", "https": "wss"}.get(scheme, scheme) + url[len(scheme) :]
    parameters = {
        p.get("name", ""): p.get("value", "") for p in stream.findall("./Parameter") if p.get("name")
    }
    return StreamTarget(url, parameters)


def _post(url: str, form: dict[str, str], headers: dict[str, str]) -> str:
    body = urlencode(form).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:
            if response.status != 200:
                raise WebhookError(f"the webhook {url} answered HTTP {response.status}, not 200")
            return response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"the webhook {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WebhookError(f"cannot reach the webhook {url}: {reason}") from None


async def fetch_stream(webhook_url: str, call: CallDetails, auth_token: str | None = None) -> StreamTarget:
    """POST the call to the webhook and return the stream it connects to."""
    if urlsplit(webhook_url).scheme not in ("http", "https"):
        raise WebhookError(f"the webhook URL must be http:// or https://, got {webhook_url!r}")
    form = call.form()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": USER_AGENT}
    if auth_token:
        headers["X-Twilio-Signature"] = sign(auth_token, webhook_url, form)
    # urllib is blocking; a thread keeps it off the event loop without a new dependency.
    xml = await asyncio.to_thread(_post, webhook_url, form, headers)
    return parse_twiml(xml, webhook_url)
