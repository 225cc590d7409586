"""Who gets in: Twilio signatures on the webhook and stream, per-call stream tokens,
development mode, capacity, and secrets kept out of logs, responses and metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from starlette.datastructures import MultiDict
from twilio.request_validator import RequestValidator
from websockets.exceptions import InvalidStatus

from ivr_bridge.fallback import APOLOGY
from ivr_bridge.loadgen.webhook import CallDetails, StreamTarget, fetch_stream, stream_headers
from ivr_bridge.security import (
    TOKEN_PARAMETER,
    StreamTokens,
    signature_valid,
    signed_url,
    stream_token_secret,
)
from ivr_bridge.settings import Settings
from ivr_bridge.standins.nextevi import NextEviStandIn
from ivr_bridge.standins.twilio import TwilioCaller
from tests.support import eventually
from tests.test_end_to_end import API_KEY, nextevi_settings, tone_ulaw, voice_api

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent
FORM = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222", "AccountSid": "AC1"}
DEV_WARNING = "TWILIO_AUTH_TOKEN is not set"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- security.py, sans-I/O ------------------------------------------------------------------


def test_token_round_trip_and_single_use() -> None:
    clock = Clock()
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=clock)
    token = tokens.mint("CA1")
    assert AUTH_TOKEN not in token
    clock.now += 119
    assert tokens.check(token, "CA1") is None
    assert tokens.check(token, "CA1") == "stream token already used"


def test_token_expires() -> None:
    clock = Clock()
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=clock)
    token = tokens.mint("CA1")
    clock.now += 120.01
    assert tokens.check(token, "CA1") == "stream token expired"


def test_token_is_bound_to_the_call_and_the_key() -> None:
    clock = Clock()
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=clock)
    other_instance = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=clock)
    other_account = StreamTokens(stream_token_secret("another token"), ttl_s=120, clock=clock)
    assert tokens.check(tokens.mint("CA1"), "CA2") == "stream token not valid for this call"
    assert tokens.check(other_account.mint("CA1"), "CA1") == "stream token not valid for this call"
    # Same auth token => same key on every instance behind a load balancer.
    assert tokens.check(other_instance.mint("CA1"), "CA1") is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: str(int(t.split(".")[0]) + 60_000) + "." + t.split(".")[1],  # later expiry
        lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"),  # flipped MAC bits
        lambda t: t.split(".")[0] + "." + t.split(".")[1][:-4],  # truncated MAC
    ],
)
def test_tampered_token_is_refused(mutate) -> None:
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=Clock())
    assert tokens.check(mutate(tokens.mint("CA1")), "CA1") == "stream token not valid for this call"


@pytest.mark.parametrize("token", [None, "", "abc", "x.y", "123", "12.!!!", "-5.AAAA", "1." + "A" * 300])
def test_missing_or_malformed_token(token: str | None) -> None:
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=120, clock=Clock())
    reason = tokens.check(token, "CA1")
    assert reason is not None and reason != "stream token already used"


def test_replay_set_is_pruned_by_expiry_and_bounded() -> None:
    clock = Clock()
    tokens = StreamTokens(stream_token_secret(AUTH_TOKEN), ttl_s=10, clock=clock, max_used=3)
    for sid in ("CA1", "CA2"):
        assert tokens.check(tokens.mint(sid), sid) is None
    assert tokens.used_count == 2
    clock.now += 11
    assert tokens.check(tokens.mint("CA3"), "CA3") is None
    assert tokens.used_count == 1  # the expired two are gone
    for sid in ("CA4", "CA5", "CA6", "CA7"):
        assert tokens.check(tokens.mint(sid), sid) is None
    assert tokens.used_count <= 3


def test_secret_is_derived_not_the_auth_token() -> None:
    secret = stream_token_secret(AUTH_TOKEN)
    assert secret == stream_token_secret(AUTH_TOKEN) != stream_token_secret(AUTH_TOKEN + "x")
    assert AUTH_TOKEN.encode() not in secret and len(secret) == 32


def test_signed_url_uses_the_public_base() -> None:
    assert signed_url("https://ivr.example.com", "/twiml") == "https://ivr.example.com/twiml"
    assert (
        signed_url("https://ivr.example.com/", "/twiml", "a=1&b=%20")
        == "https://ivr.example.com/twiml?a=1&b=%20"
    )


def test_signature_valid_with_repeated_fields() -> None:
    url = "https://ivr.example.com/twiml"
    fields = [("A", "1"), ("A", "2"), ("B", "x")]
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, MultiDict(fields))
    assert signature_valid(AUTH_TOKEN, url, fields, signature)
    assert not signature_valid(AUTH_TOKEN, url, fields[:2], signature)
    assert not signature_valid(AUTH_TOKEN, url, fields, None)
    assert not signature_valid(AUTH_TOKEN, url, fields, "")


# -- the webhook ----------------------------------------------------------------------------


def sign(url: str, params: dict[str, str]) -> str:
    return RequestValidator(AUTH_TOKEN).compute_signature(url, params)


def stream_parameters(xml: str) -> dict[str, str]:
    stream = ET.fromstring(xml).find("./Connect/Stream")
    assert stream is not None, xml
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


async def post_twiml(base_url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
        return await client.post("/twiml", data=FORM, headers=headers or {})


async def test_signed_webhook_gets_the_stream_and_a_token(make_bridge) -> None:
    bridge = make_bridge(Settings(twilio_auth_token=AUTH_TOKEN))
    url = bridge.base_url + "/twiml"
    response = await post_twiml(bridge.base_url, {"X-Twilio-Signature": sign(url, FORM)})
    assert response.status_code == 200
    params = stream_parameters(response.text)
    assert params[TOKEN_PARAMETER] and params["CallSid"] == FORM["CallSid"]
    assert AUTH_TOKEN not in response.text


async def test_signed_get_with_query_string(make_bridge) -> None:
    bridge = make_bridge(Settings(twilio_auth_token=AUTH_TOKEN))
    query = "CallSid=CA9&From=%2B15550001111"
    signature = sign(f"{bridge.base_url}/twiml?{query}", {})
    async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
        ok = await client.get(f"/twiml?{query}", headers={"X-Twilio-Signature": signature})
        reordered = await client.get(
            "/twiml?From=%2B15550001111&CallSid=CA9", headers={"X-Twilio-Signature": signature}
        )
    assert ok.status_code == 200 and stream_parameters(ok.text)["CallSid"] == "CA9"
    assert reordered.status_code == 403  # the signature covers the query exactly as sent


@pytest.mark.parametrize("case", ["unsigned", "wrong", "other host", "other form"])
async def test_bad_webhook_signature_is_forbidden(make_bridge, caplog, case: str) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    bridge = make_bridge(Settings(twilio_auth_token=AUTH_TOKEN))
    headers = {
        "unsigned": {},
        "wrong": {"X-Twilio-Signature": sign(bridge.base_url + "/twiml", FORM | {"From": "+1999"})},
        # A bridge rebuilding the URL from the Host header would accept this one.
        "other host": {
            "Host": "attacker.example",
            "X-Twilio-Signature": sign("http://attacker.example/twiml", FORM),
        },
        "other form": {"X-Twilio-Signature": sign(bridge.base_url + "/twiml", {})},
    }[case]
    response = await post_twiml(bridge.base_url, headers)
    assert response.status_code == 403
    assert "<Response" not in response.text and AUTH_TOKEN not in response.text
    [line] = [r.getMessage() for r in caplog.records if "webhook refused" in r.getMessage()]
    assert ("missing" if case == "unsigned" else "invalid") in line
    for secret in (
        AUTH_TOKEN,
        headers.get("X-Twilio-Signature") or AUTH_TOKEN,
        sign(bridge.base_url + "/twiml", FORM),
    ):
        assert secret not in caplog.text


async def test_url_is_rebuilt_from_the_public_url_not_the_host_header(make_bridge) -> None:
    bridge = make_bridge(Settings(twilio_auth_token=AUTH_TOKEN))
    # Behind a proxy the Host the bridge sees differs from the public URL Twilio signed.
    headers = {"Host": "internal:8000", "X-Twilio-Signature": sign(bridge.base_url + "/twiml", FORM)}
    response = await post_twiml(bridge.base_url, headers)
    assert response.status_code == 200 and TOKEN_PARAMETER in stream_parameters(response.text)


# -- the stream -----------------------------------------------------------------------------


async def signed_target(bridge, call_sid: str) -> StreamTarget:
    """The stream and parameters the webhook gives a call, fetched as Twilio would."""
    return await fetch_stream(bridge.base_url + "/twiml", CallDetails(call_sid=call_sid), AUTH_TOKEN)


async def test_signed_stream_with_its_token_proceeds(make_bridge, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin, twilio_auth_token=AUTH_TOKEN))
        target = await signed_target(bridge, FORM["CallSid"])
        token = target.parameters[TOKEN_PARAMETER]
        async with TwilioCaller(
            target.url,
            call_sid=FORM["CallSid"],
            custom_parameters=target.parameters,
            headers=stream_headers(target, AUTH_TOKEN),
            continuous=True,
        ) as caller:
            await standin.wait_for_session()
            await caller.say(tone_ulaw(300))
            await caller.hang_up()
        [call] = await bridge.wait_for_calls(1)
        async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
            metrics = (await client.get("/metrics")).text
    assert call.outcome == "stream_stopped"
    assert TOKEN_PARAMETER not in call.custom_parameters  # spent, not kept in the call record
    assert len(standin.sessions) == 1
    signature = stream_headers(target, AUTH_TOKEN)["x-twilio-signature"]
    for secret in (AUTH_TOKEN, API_KEY, token, signature, stream_token_secret(AUTH_TOKEN).hex()):
        assert secret not in caplog.text
        assert secret not in metrics


@pytest.mark.parametrize("signature", [None, "bm90IGEgc2lnbmF0dXJl", "other url"])
async def test_unsigned_stream_is_rejected_at_the_handshake(
    make_bridge, caplog, signature: str | None
) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin, twilio_auth_token=AUTH_TOKEN))
        target = await signed_target(bridge, FORM["CallSid"])
        if signature == "other url":
            signature = sign(target.url + "?x=1", {})
        headers = {"x-twilio-signature": signature} if signature else {}
        caller = TwilioCaller(
            target.url, call_sid=FORM["CallSid"], custom_parameters=target.parameters, headers=headers
        )
        with pytest.raises(InvalidStatus) as raised:
            await caller.connect()
        assert raised.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
            health = (await client.get("/healthz")).json()
    assert health["active_calls"] == 0 and bridge.finished == []  # no Call was ever made
    assert standin.sessions == [] and standin.rejected == []
    assert "media stream refused" in caplog.text
    assert AUTH_TOKEN not in caplog.text and (signature is None or signature not in caplog.text)


async def refused_stream(bridge, standin: NextEviStandIn, call_sid: str, parameters: dict[str, str]) -> None:
    target = StreamTarget(bridge.stream_url, parameters)
    caller = TwilioCaller(
        target.url,
        call_sid=call_sid,
        custom_parameters=parameters,
        headers=stream_headers(target, AUTH_TOKEN),
    )
    async with caller:
        await asyncio.wait_for(caller.closed.wait(), 15)
    assert caller.close_code == 1008


@pytest.mark.parametrize("case", ["missing", "malformed", "expired", "other call"])
async def test_stream_without_a_good_token_is_refused_at_start(make_bridge, caplog, case: str) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge")
    sid = FORM["CallSid"]
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin, twilio_auth_token=AUTH_TOKEN))
        parameters = dict((await signed_target(bridge, sid)).parameters)
        if case == "missing":
            del parameters[TOKEN_PARAMETER]
        elif case == "malformed":
            parameters[TOKEN_PARAMETER] = "not-a-token"
        elif case == "expired":
            # A token with the bridge's own key, minted a TTL and more ago.
            past = StreamTokens(stream_token_secret(AUTH_TOKEN), 120, clock=lambda: time.time() - 121)
            parameters[TOKEN_PARAMETER] = past.mint(sid)
        elif case == "other call":
            parameters = dict((await signed_target(bridge, "CA" + "2" * 32)).parameters)
        await refused_stream(bridge, standin, sid, parameters)
        [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "refused"
    assert standin.sessions == []
    assert "stream refused" in caplog.text


async def test_reused_token_is_refused(make_bridge) -> None:
    sid = FORM["CallSid"]
    async with voice_api() as standin:
        bridge = make_bridge(nextevi_settings(standin, twilio_auth_token=AUTH_TOKEN))
        target = await signed_target(bridge, sid)
        headers = stream_headers(target, AUTH_TOKEN)
        async with TwilioCaller(
            target.url, call_sid=sid, custom_parameters=target.parameters, headers=headers
        ) as first:
            await standin.wait_for_session()
            await first.hang_up()
        await refused_stream(bridge, standin, sid, target.parameters)
        calls = await bridge.wait_for_calls(2)
    # The refusal can finish before the first call's teardown: compare without order.
    assert sorted(call.outcome for call in calls) == ["refused", "stream_stopped"]
    assert len(standin.sessions) == 1


# -- development mode and capacity ----------------------------------------------------------


async def test_development_mode_warns_once_and_lets_unsigned_requests_in(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ivr_bridge")
    bridge = make_bridge(Settings(provider="echo"))
    warnings = [r for r in caplog.records if DEV_WARNING in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    response = await post_twiml(bridge.base_url)
    assert response.status_code == 200
    assert TOKEN_PARAMETER not in stream_parameters(response.text)  # nothing to key it with
    async with TwilioCaller(bridge.stream_url, custom_parameters=stream_parameters(response.text)) as caller:
        await caller.hang_up()
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped"
    assert len([r for r in caplog.records if DEV_WARNING in r.getMessage()]) == 1


async def test_signed_mode_does_not_warn(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ivr_bridge")
    make_bridge(Settings(twilio_auth_token=AUTH_TOKEN))
    assert DEV_WARNING not in caplog.text


async def test_at_capacity_webhook_falls_back_and_streams_are_refused(make_bridge, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ivr_bridge")
    bridge = make_bridge(Settings(provider="echo", max_calls=1))

    async def active_calls() -> int:
        async with httpx.AsyncClient(base_url=bridge.base_url, timeout=15) as client:
            return (await client.get("/healthz")).json()["active_calls"]

    async def active_is(count: int) -> bool:
        return await active_calls() == count

    async with TwilioCaller(bridge.stream_url) as first:
        await eventually(lambda: active_is(1), 15, "one active call")
        response = await post_twiml(bridge.base_url)
        assert response.status_code == 200
        root = ET.fromstring(response.text)
        assert root.find("./Connect") is None and APOLOGY in response.text
        assert "at capacity" in caplog.text
        with pytest.raises(InvalidStatus):
            await TwilioCaller(bridge.stream_url).connect()
        await first.hang_up()
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped"
    await eventually(lambda: active_is(0), 15, "no active call")
    assert stream_parameters((await post_twiml(bridge.base_url)).text)["CallSid"] == FORM["CallSid"]


# -- the scripted caller, as a separate process ---------------------------------------------


async def test_scripted_caller_signs_and_completes(make_bridge) -> None:
    bridge = make_bridge(Settings(provider="echo", twilio_auth_token=AUTH_TOKEN))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ivr_bridge",
        "call",
        bridge.base_url + "/twiml",
        "--auth-token",
        AUTH_TOKEN,
        "--audio",
        str(ROOT / "examples" / "audio" / "hello.wav"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    report = json.loads(stdout)
    assert report["reason"] is None and report["bytes_received"] > 0
    [call] = await bridge.wait_for_calls(1)
    assert call.outcome == "stream_stopped"


async def test_stream_status_callbacks_are_signed_checked_and_logged(make_bridge, caplog) -> None:
    import logging
    import xml.etree.ElementTree as ET

    import httpx
    from twilio.request_validator import RequestValidator

    from ivr_bridge.settings import Settings

    caplog.set_level(logging.INFO)
    token = "status_callback_token"
    bridge = make_bridge(Settings(provider="echo", twilio_auth_token=token))
    url = f"{bridge.base_url}/stream-status"
    form = {"StreamEvent": "stream-error", "StreamError": "boom", "CallSid": "CA9", "StreamSid": "MZ9"}
    signed = RequestValidator(token).compute_signature(url, form)
    async with httpx.AsyncClient() as client:
        ok = await client.post(url, data=form, headers={"X-Twilio-Signature": signed})
        forged = await client.post(url, data=form, headers={"X-Twilio-Signature": "bm9wZQ=="})
        unsigned = await client.post(url, data=form)
        webhook_form = {"CallSid": "CA9"}
        twiml_url = f"{bridge.base_url}/twiml"
        twiml_signature = RequestValidator(token).compute_signature(twiml_url, webhook_form)
        twiml = await client.post(
            twiml_url, data=webhook_form, headers={"X-Twilio-Signature": twiml_signature}
        )
    assert (ok.status_code, forged.status_code, unsigned.status_code) == (204, 403, 403)
    assert "[CA9] Twilio stream error: boom" in caplog.text
    assert token not in caplog.text
    stream = ET.fromstring(twiml.text).find("./Connect/Stream")
    assert stream is not None and stream.get("statusCallback") == url
    assert stream.get("statusCallbackMethod") == "POST"
