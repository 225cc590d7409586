"""The voice webhook as Twilio calls it: form fields, signatures, TwiML parsing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qsl

import pytest
from twilio.request_validator import RequestValidator

from ivr_bridge.loadgen.webhook import (
    CallDetails,
    StreamTarget,
    WebhookError,
    fetch_stream,
    parse_twiml,
    stream_headers,
)

TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="/media-stream">'
    '<Parameter name="CallSid" value="CA1"/><Parameter name="tenant" value="acme"/>'
    "</Stream></Connect></Response>"
)


class Recorder(BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, dict[str, str], dict[str, str]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.requests.append((self.path, dict(self.headers), dict(parse_qsl(body))))
        answer = TWIML.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Recorder.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/twiml?tenant=acme"
    finally:
        server.shutdown()
        server.server_close()


async def test_posts_twilio_fields_signed(webhook: str) -> None:
    details = CallDetails(from_number="+15551230000", to_number="+15559870000")
    target = await fetch_stream(webhook, details, auth_token="secret-token")
    [(path, headers, form)] = Recorder.requests
    assert path == "/twiml?tenant=acme"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form["CallSid"] == details.call_sid and len(details.call_sid) == 34
    assert details.call_sid.startswith("CA") and int(details.call_sid[2:], 16) >= 0
    assert form["AccountSid"].startswith("AC") and form["ApiVersion"] == "2010-04-01"
    assert (form["From"], form["To"]) == ("+15551230000", "+15559870000")
    assert (form["CallStatus"], form["Direction"]) == ("ringing", "inbound")
    validator = RequestValidator("secret-token")
    assert validator.validate(webhook, form, headers["X-Twilio-Signature"])
    assert not RequestValidator("other").validate(webhook, form, headers["X-Twilio-Signature"])

    # The relative stream URL resolves against the webhook, as a WebSocket URL.
    assert target == StreamTarget(
        webhook.split("/twiml")[0].replace("http", "ws") + "/media-stream",
        {
            "CallSid": "CA1",
            "tenant": "acme",
        },
    )
    [(name, signature)] = stream_headers(target, "secret-token").items()
    assert name == "x-twilio-signature" and validator.validate(target.url, {}, signature)
    assert stream_headers(target, None) == {}


async def test_unsigned_without_a_token(webhook: str) -> None:
    await fetch_stream(webhook, CallDetails())
    [(_, headers, _)] = Recorder.requests
    assert "X-Twilio-Signature" not in headers


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        # Other TwiML than a stream is the bridge's fallback: a refusal, named as such.
        ("<Response><Say>hi</Say></Response>", "refused: the webhook answered its fallback TwiML <Say>"),
        ("<Response/>", "no <Response><Connect><Stream>"),
        ("<Dial>+1555</Dial>", "no <Response><Connect><Stream>"),
        ("<Response><Connect><Stream/></Connect></Response>", "<Stream> has no url"),
        ("not xml", "not XML"),
    ],
)
def test_unusable_twiml(xml: str, message: str) -> None:
    with pytest.raises(WebhookError, match=message):
        parse_twiml(xml, "https://example.com/twiml")


def test_absolute_stream_url_is_kept() -> None:
    xml = '<Response><Connect><Stream url="wss://other.example/s"/></Connect></Response>'
    assert parse_twiml(xml, "https://example.com/twiml") == StreamTarget("wss://other.example/s", {})
    https = parse_twiml('<Response><Connect><Stream url="/s"/></Connect></Response>', "https://a.example/t")
    assert https.url == "wss://a.example/s"


async def test_bad_webhook_url() -> None:
    with pytest.raises(WebhookError, match="must be http"):
        await fetch_stream("ftp://example.com/twiml", CallDetails())
