"""Hooks: signing and action parsing as pure functions, then real deliveries over loopback
to the receiver stand-in (no mocked HTTP)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivr_bridge.events import CallEvent, EventType
from ivr_bridge.hooks import (
    SIGNATURE_HEADER,
    HookAction,
    HookDispatcher,
    backoff_delay,
    parse_action,
    safe_url,
    sign,
    verify,
)
from ivr_bridge.settings import Settings
from ivr_bridge.standins.hook_receiver import HookReceiver, HookResponse, parse_on

SECRET = "hk-secret-7d1e9b"  # distinctive, so the logs can be searched for it
TIMEOUT = 15.0  # generous: the CI box is a loaded 2-core machine
CALL_A = "CA" + "a" * 32
CALL_B = "CA" + "b" * 32
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05}  # quick retries
TRANSFER = {"action": "transfer", "to": "+15550100"}


StartReceiver = Callable[..., tuple[HookReceiver, str]]
MakeDispatcher = Callable[..., HookDispatcher]


def make_event(seq: int, type: EventType = "transcript", call_sid: str = CALL_A, **data: Any) -> CallEvent:
    return CallEvent(
        type, call_sid, seq, time.time(), seq / 10, data or {"role": "user", "text": f"line {seq}"}
    )


def hook_settings(*urls: str, retries: int = 3, timeout_s: float = 5.0, secret: str = SECRET) -> Settings:
    return Settings(hook_urls=urls, hook_secret=secret, hook_timeout_s=timeout_s, hook_retries=retries)


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [event["seq"] for event in events]


def hook_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ivr_bridge.hooks" and r.levelno == logging.WARNING
    ]


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll a condition of the dispatcher's own state (it offers no event for it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def receivers() -> Iterator[StartReceiver]:
    """Factory: `start(responses)` -> (a running receiver, its hook URL)."""
    started: list[HookReceiver] = []

    def start(responses: Any = (), secret: str = SECRET) -> tuple[HookReceiver, str]:
        receiver = HookReceiver(secret, responses)
        base = receiver.serve()
        started.append(receiver)
        return receiver, f"{base}/hooks"

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
async def dispatchers() -> AsyncIterator[MakeDispatcher]:
    """Factory of dispatchers, all closed (without waiting) after the test."""
    made: list[HookDispatcher] = []

    def make(settings: Settings, on_action: Any = None, **options: Any) -> HookDispatcher:
        dispatcher = HookDispatcher(settings, on_action, **{**FAST, **options})
        made.append(dispatcher)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.aclose(0)


# -- Signatures ------------------------------------------------------------------------------


def test_sign_matches_an_independent_hmac() -> None:
    body = b'{"type":"dtmf"}'
    digest = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body, 1700000000) == f"t=1700000000,v1={digest}"


def test_verify_round_trip_and_rejections() -> None:
    body = make_event(1).to_json()
    header = sign(SECRET, body, 1_700_000_000)
    assert verify(SECRET, body, header, now=1_700_000_000)
    assert verify(SECRET, body, header, now=1_700_000_299.0)  # within the tolerance
    assert not verify(SECRET, body + b" ", header, now=1_700_000_000)  # tampered body
    assert not verify(SECRET, body.replace(b"line 1", b"line 2"), header, now=1_700_000_000)
    assert not verify("another-secret", body, header, now=1_700_000_000)
    assert not verify("", body, header, now=1_700_000_000)
    # Stale (a replay) or from the future.
    assert not verify(SECRET, body, header, now=1_700_000_301.0)
    assert not verify(SECRET, body, header, now=1_699_999_699.0)
    assert verify(SECRET, body, header, now=1_700_000_900.0, tolerance_s=1000)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=1700000000",
        "v1=" + "0" * 64,
        "t=abc,v1=" + "0" * 64,
        "t=-1700000000,v1=" + "0" * 64,
        "t=\u0661\u0667" + "\u0660" * 8 + ",v1=" + "0" * 64,  # Arabic-Indic digits: int() takes them
        "t=" + "9" * 400 + ",v1=" + "0" * 64,
        "t=1700000000,v1=é" + "0" * 63,  # non-ASCII: compare_digest would raise on str
        "t=1700000000,v1=",
        "t=1700000000;v1=" + "0" * 64,
        "t=1700000000,v1=" + "0" * 5000,
        ",,,",
    ],
)
def test_verify_rejects_a_garbled_header(header: str | None) -> None:
    assert not verify(SECRET, b"{}", header, now=1_700_000_000)


def test_verify_accepts_the_right_signature_among_garbled_fields() -> None:
    body = b"{}"
    header = sign(SECRET, body, 1_700_000_000)
    assert verify(SECRET, body, f" {header.replace(',', ' , ')} ", now=1_700_000_000)
    assert verify(SECRET, body, header + ",v0=whatever", now=1_700_000_000)


# -- Actions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"action":"transfer","to":"+15550100"}', HookAction("transfer", "+15550100")),
        (
            b'{"action":"transfer","to":"sip:desk@pbx.example.com"}',
            HookAction("transfer", "sip:desk@pbx.example.com"),
        ),
        (b'{"action":"hangup"}', HookAction("hangup")),
        (b'{"action":"hangup","to":"+15550100","why":"spam"}', HookAction("hangup")),
        (b'{"action":"none"}', HookAction("none")),
        (b' {"action": "hangup"} \n', HookAction("hangup")),
    ],
)
def test_parse_action_valid(body: bytes, expected: HookAction) -> None:
    assert parse_action(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"  \r\n",
        b"OK",
        b"<html><body>Thanks</body></html>",
        b"[]",
        b'[{"action":"hangup"}]',
        b"42",
        b"1" * 10000,  # past Python's int digits limit: a ValueError inside json
        b'"hangup"',
        b"null",
        b"{}",
        b'{"status":"ok"}',
        b'{"Action":"hangup"}',
        b"\xff\xfe\x00garbage",
        b'{"action":"hangup"',  # truncated
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError inside json
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ],
)
def test_parse_action_no_action(body: bytes) -> None:
    assert parse_action(body) is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"action":"dance"}',
        b'{"action":"TRANSFER","to":"+15550100"}',
        b'{"action":null}',
        b'{"action":7}',
        b'{"action":["transfer"]}',
        b'{"action":{"x":1}}',
        b'{"action":' + b"[" * 800 + b"]" * 800 + b"}",
        b'{"action":"transfer"}',
        b'{"action":"transfer","to":""}',
        b'{"action":"transfer","to":"12345"}',
        b'{"action":"transfer","to":"+1"}',
        b'{"action":"transfer","to":"sip:"}',
        b'{"action":"transfer","to":15550100}',
        b'{"action":"transfer","to":["+15550100"]}',
    ],
)
def test_parse_action_invalid(body: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        parse_action(body)
    assert 0 < len(str(caught.value)) < 120  # short enough for one log line


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_parse_action_only_ever_raises_value_error(body: bytes) -> None:
    try:
        action = parse_action(body)
    except ValueError:
        return
    assert action is None or action.action in ("transfer", "hangup", "none")


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({"action": json_values, "to": json_values}))
def test_parse_action_with_odd_fields(data: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        parse_action(json.dumps(data).encode())


# -- Backoff and URLs ------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_the_cap() -> None:
    import random

    rng = random.Random(7)
    for attempt in range(12):
        delays = [backoff_delay(attempt, 0.5, 10.0, None, rng) for _ in range(50)]
        assert all(0 <= d <= min(10.0, 0.5 * 2**attempt) for d in delays)
        assert len(set(delays)) > 1
    assert backoff_delay(1000, 0.5, 10.0) <= 10.0


@pytest.mark.parametrize(
    ("retry_after", "expected"), [("2", 2.0), (" 1.5 ", 1.5), ("0", 0.0), ("120", 10.0), ("inf", 10.0)]
)
def test_backoff_honours_a_numeric_retry_after_up_to_the_cap(retry_after: str, expected: float) -> None:
    assert backoff_delay(0, 0.5, 10.0, retry_after) == expected


@pytest.mark.parametrize("retry_after", ["Wed, 21 Oct 2015 07:28:00 GMT", "-3", "nan", ""])
def test_backoff_ignores_other_retry_after_values(retry_after: str) -> None:
    assert 0 <= backoff_delay(2, 0.5, 10.0, retry_after) <= 2.0


def test_safe_url_hides_credentials_and_query() -> None:
    assert (
        safe_url("https://user:pw@hooks.example.com:8443/in?token=abc#x")
        == "https://hooks.example.com:8443/in"
    )
    assert safe_url("http://[::1]:9000/h") == "http://[::1]:9000/h"
    assert safe_url("http://example.com") == "http://example.com"


# -- The receiver stand-in -------------------------------------------------------------------


def test_receiver_refuses_bad_signatures(receivers: StartReceiver) -> None:
    receiver, url = receivers()
    body = make_event(1).to_json()
    now = int(time.time())
    with httpx.Client(timeout=TIMEOUT) as client:
        assert (
            client.post(url, content=body, headers={SIGNATURE_HEADER: sign(SECRET, body, now)}).status_code
            == 200
        )
        assert client.post(url, content=body).status_code == 401
        assert (
            client.post(url, content=body, headers={SIGNATURE_HEADER: sign("nope", body, now)}).status_code
            == 401
        )
        stale = sign(SECRET, body, now - 3600)  # a replay of an hour-old request
        assert client.post(url, content=body, headers={SIGNATURE_HEADER: stale}).status_code == 401
        tampered = body.replace(b"line 1", b"line 9")
        assert (
            client.post(
                url, content=tampered, headers={SIGNATURE_HEADER: sign(SECRET, body, now)}
            ).status_code
            == 401
        )
        not_json = b"hello"
        answer = client.post(url, content=not_json, headers={SIGNATURE_HEADER: sign(SECRET, not_json, now)})
        assert answer.status_code == 400
    assert receiver.rejected == 4
    assert seqs(receiver.delivered()) == [1]


def test_parse_on() -> None:
    assert parse_on("dtmf=transfer:+15550100") == ("dtmf", TRANSFER)
    assert parse_on("dtmf=transfer:sip:desk@pbx") == ("dtmf", {"action": "transfer", "to": "sip:desk@pbx"})
    assert parse_on("emotion=hangup") == ("emotion", {"action": "hangup"})
    for bad in ("dtmf", "dtmf=dance", "dtmf=transfer:555", "dtmf=transfer", "nope=hangup"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_on(bad)


# -- Delivery --------------------------------------------------------------------------------


async def test_delivery_is_signed_with_the_headers(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url))
    event = make_event(1, "call.started", stream_sid="MZ1", custom_parameters={"lang": "fr"})
    dispatcher.publish(event)
    await receiver.wait(lambda: receiver.delivered(), TIMEOUT)
    assert await dispatcher.flush(TIMEOUT)

    [request] = receiver.requests()
    assert request.event == event.as_dict()
    assert request.path == "/hooks"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-ivr-event"] == "call.started"
    assert request.headers["x-ivr-delivery"] == event.id
    assert request.headers["user-agent"] == "ivr-bridge"
    assert request.headers["accept-encoding"] == "identity"  # the answer is read with a size cap
    assert "authorization" not in request.headers and "cookie" not in request.headers
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", request.headers["x-ivr-signature"])
    assert abs(int(request.headers["x-ivr-signature"][2:12]) - time.time()) < 60
    assert receiver.rejected == 0
    assert dispatcher.stats.delivered == 1 and dispatcher.pending == 0


async def test_a_wrong_secret_is_refused_and_not_retried(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url, secret="not-the-receivers-secret"))
    dispatcher.publish(make_event(1))
    assert await dispatcher.flush(TIMEOUT)
    assert receiver.rejected == 1 and not receiver.requests()
    assert (dispatcher.stats.failed, dispatcher.stats.retried) == (1, 0)
    assert any("HTTP 401" in line for line in hook_warnings(caplog))


async def test_retries_until_delivered_with_the_same_delivery_id(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    receiver, url = receivers([HookResponse(500), HookResponse(500), HookResponse(200)])
    dispatcher = dispatchers(hook_settings(url, retries=3))
    event = make_event(1)
    dispatcher.publish(event)
    assert await dispatcher.flush(TIMEOUT)

    requests = receiver.requests()
    assert [r.status for r in requests] == [500, 500, 200]
    assert {r.delivery_id for r in requests} == {event.id}
    assert seqs(receiver.delivered()) == [1]
    stats = dispatcher.stats
    assert (stats.delivered, stats.retried, stats.failed, stats.dropped) == (1, 2, 0, 0)


@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_retryable_statuses(receivers: StartReceiver, dispatchers: MakeDispatcher, status: int) -> None:
    receiver, url = receivers([HookResponse(status, headers={"Retry-After": "0"}), HookResponse(200)])
    dispatcher = dispatchers(hook_settings(url, retries=1))
    dispatcher.publish(make_event(1))
    assert await dispatcher.flush(TIMEOUT)
    assert [r.status for r in receiver.requests()] == [status, 200]
    assert (dispatcher.stats.delivered, dispatcher.stats.retried) == (1, 1)


async def test_gives_up_after_the_retries_and_moves_on(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge.hooks")
    receiver, url = receivers(lambda event, attempt: HookResponse(500) if event["seq"] == 1 else None)
    # Credentials and a query in the URL: neither may reach a log line.
    url = url.replace("http://", "http://hookuser:hunter2pw@") + "?token=querysecret"
    dispatcher = dispatchers(hook_settings(url, retries=2))
    dispatcher.publish(make_event(1))
    dispatcher.publish(make_event(2))
    await receiver.wait(lambda: receiver.delivered(), TIMEOUT)
    assert await dispatcher.flush(TIMEOUT)

    assert [(r.seq, r.status) for r in receiver.requests()] == [(1, 500)] * 3 + [(2, 200)]
    stats = dispatcher.stats
    assert (stats.delivered, stats.retried, stats.failed) == (1, 2, 1)
    [warning] = hook_warnings(caplog)
    assert warning.startswith(f"[{CALL_A}] ")
    assert "transcript" in warning and "seq 1" in warning and "3 attempt" in warning and "HTTP 500" in warning
    assert f"{safe_url(url)}:" in warning and "/hooks" in warning
    for secret in ("hunter2pw", "querysecret", "hookuser", SECRET, "v1="):
        assert secret not in caplog.text


@pytest.mark.parametrize(
    ("userinfo", "credentials"),
    [
        ("hookuser:hunter2pw", "hookuser:hunter2pw"),
        ("hook%3Auser:p%40ss%20w%C3%B6rd", "hook:user:p@ss w\u00f6rd"),  # decoded, then UTF-8
        ("onlyuser", "onlyuser:"),
    ],
)
async def test_credentials_in_the_url_are_sent_as_basic_auth(
    receivers: StartReceiver,
    dispatchers: MakeDispatcher,
    caplog: pytest.LogCaptureFixture,
    userinfo: str,
    credentials: str,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge.hooks")
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url.replace("http://", f"http://{userinfo}@") + "?token=q1"))
    dispatcher.publish(make_event(1))
    assert await dispatcher.flush(TIMEOUT)
    [request] = receiver.requests()
    expected = base64.b64encode(credentials.encode()).decode()
    assert request.headers["authorization"] == f"Basic {expected}"
    assert request.headers["host"] == url.split("/")[2]  # no credentials in the Host header
    assert request.path == "/hooks" and dispatcher.stats.delivered == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_not_followed(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    redirect = HookResponse(status, headers={"Location": "/elsewhere"})
    receiver, url = receivers(lambda event, attempt: redirect if event["seq"] == 1 else None)
    dispatcher = dispatchers(hook_settings(url, retries=3))
    dispatcher.publish(make_event(1))
    dispatcher.publish(make_event(2))
    assert await dispatcher.flush(TIMEOUT)
    assert [(r.seq, r.status, r.path) for r in receiver.requests()] == [
        (1, status, "/hooks"),
        (2, 200, "/hooks"),
    ]
    assert (dispatcher.stats.delivered, dispatcher.stats.retried, dispatcher.stats.failed) == (1, 0, 1)
    [warning] = hook_warnings(caplog)
    assert f"HTTP {status}" in warning and "1 attempt" in warning


async def test_an_oversized_answer_is_no_action(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    big = {"action": "hangup", "padding": "x" * (64 * 1024)}  # valid, but past the 64 KiB cap
    receiver, url = receivers([HookResponse(body=big), HookResponse(body={"action": "hangup"})])
    seen: list[int] = []

    async def on_action(event: CallEvent, action: HookAction) -> None:
        seen.append(event.seq)

    dispatcher = dispatchers(hook_settings(url), on_action)
    dispatcher.publish(make_event(1))
    dispatcher.publish(make_event(2))
    assert await dispatcher.flush(TIMEOUT)
    await dispatcher.aclose(TIMEOUT)
    assert seqs(receiver.delivered()) == [1, 2]
    assert (dispatcher.stats.delivered, dispatcher.stats.retried) == (2, 0)  # delivered all the same
    assert seen == [2]


async def test_deliveries_reuse_their_connection(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url))
    for seq in range(1, 11):
        dispatcher.publish(make_event(seq))
    assert await dispatcher.flush(TIMEOUT)
    requests = receiver.requests()
    assert len(requests) == 10 and all(r.peer for r in requests)
    assert len({r.peer for r in requests}) == 1  # keep-alive: one connection for them all


async def test_a_proxy_from_the_environment_is_used(
    receivers: StartReceiver, dispatchers: MakeDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As with httpx: HTTP_PROXY / NO_PROXY apply. The receiver stands in for the proxy: a
    # host that does not resolve reaches it only through the proxy.
    receiver, url = receivers()
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", url.removesuffix("/hooks"))
    dispatcher = dispatchers(hook_settings("http://hooks.invalid/events"))
    dispatcher.publish(make_event(1))
    assert await dispatcher.flush(TIMEOUT)
    [request] = receiver.requests()
    assert request.headers["host"] == "hooks.invalid" and request.path == "/events"
    assert dispatcher.stats.delivered == 1

    monkeypatch.setenv("NO_PROXY", "hooks.invalid")
    direct = dispatchers(hook_settings("http://hooks.invalid/events", retries=0))
    direct.publish(make_event(2))
    assert await direct.flush(TIMEOUT)
    assert direct.stats.failed == 1 and len(receiver.requests()) == 1


async def test_an_unusable_url_is_not_retried_and_its_secrets_stay_out_of_the_logs(
    dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge.hooks")
    url = "http://hookuser:hunter2pw@127.0.0.1:99999/hooks?token=querysecret"  # no such port
    dispatcher = dispatchers(hook_settings(url, retries=3))
    dispatcher.publish(make_event(1))
    assert await dispatcher.flush(TIMEOUT)
    assert (dispatcher.stats.failed, dispatcher.stats.retried) == (1, 0)
    [warning] = hook_warnings(caplog)
    assert "1 attempt" in warning
    for secret in ("hunter2pw", "querysecret", "hookuser"):
        assert secret not in caplog.text


async def test_a_refusal_is_not_retried(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, url = receivers(lambda event, attempt: HookResponse(400) if event["seq"] == 1 else None)
    dispatcher = dispatchers(hook_settings(url, retries=3))
    for seq in (1, 2, 3):
        dispatcher.publish(make_event(seq))
    assert await dispatcher.flush(TIMEOUT)
    assert [(r.seq, r.status) for r in receiver.requests()] == [(1, 400), (2, 200), (3, 200)]
    assert (dispatcher.stats.delivered, dispatcher.stats.retried, dispatcher.stats.failed) == (2, 0, 1)
    [warning] = hook_warnings(caplog)
    assert "HTTP 400" in warning and "1 attempt" in warning


async def test_a_dead_receiver_is_retried_then_given_up(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/hooks"
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(dead, url, retries=2))
    dispatcher.publish(make_event(1))
    dispatcher.publish(make_event(2))
    await receiver.wait(lambda: len(receiver.delivered()) == 2, TIMEOUT)
    assert await dispatcher.flush(TIMEOUT)
    assert (dispatcher.stats.delivered, dispatcher.stats.failed, dispatcher.stats.retried) == (2, 2, 4)
    warnings = hook_warnings(caplog)
    assert len(warnings) == 2 and all("Connect" in w and "3 attempt" in w for w in warnings)


async def test_a_slow_answer_times_out_and_is_retried(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ivr_bridge.hooks")
    receiver, url = receivers(lambda event, attempt: HookResponse(delay_s=5) if attempt == 1 else None)
    dispatcher = dispatchers(hook_settings(url, retries=1, timeout_s=0.3))
    event = make_event(1)
    dispatcher.publish(event)
    assert await dispatcher.flush(TIMEOUT)
    assert [r.delivery_id for r in receiver.requests()] == [event.id, event.id]
    assert (dispatcher.stats.delivered, dispatcher.stats.retried, dispatcher.stats.failed) == (1, 1, 0)
    assert "no answer within 0.3 s" in caplog.text


async def test_each_call_arrives_in_order_despite_retries(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    def respond(event: dict[str, Any], attempt: int) -> HookResponse | None:
        if event["seq"] == 2 and attempt <= 2:
            return HookResponse(500)
        if event["seq"] == 5 and attempt == 1:
            return HookResponse(503, headers={"Retry-After": "0"})
        return None

    receiver, url = receivers(respond)
    dispatcher = dispatchers(hook_settings(url, retries=3))
    for seq in range(1, 21):
        dispatcher.publish(make_event(seq, call_sid=CALL_A))
        dispatcher.publish(make_event(seq, call_sid=CALL_B))
    dispatcher.publish(make_event(21, "call.ended", call_sid=CALL_A))
    assert await dispatcher.flush(TIMEOUT)

    assert seqs(receiver.delivered(CALL_A)) == list(range(1, 22))
    assert seqs(receiver.delivered(CALL_B)) == list(range(1, 21))
    attempts = [r.seq for r in receiver.requests(CALL_A)]
    assert attempts == sorted(attempts) and attempts.count(2) == 3 and attempts.count(5) == 2


async def test_a_slow_receiver_holds_up_neither_publish_nor_other_urls(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    slow, slow_url = receivers(lambda event, attempt: HookResponse(delay_s=2.0))
    fast, fast_url = receivers()
    dispatcher = dispatchers(hook_settings(slow_url, fast_url))
    events = [make_event(seq) for seq in range(1, 101)]
    started = time.perf_counter()
    for event in events:
        dispatcher.publish(event)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.05, f"publishing 100 events took {elapsed * 1000:.1f} ms"

    await fast.wait(lambda: len(fast.delivered()) == 100, TIMEOUT)
    assert seqs(fast.delivered()) == list(range(1, 101))
    assert len(slow.requests()) <= 5  # one every 2 s, in order


async def test_a_slow_call_holds_up_no_other_call(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    receiver, url = receivers(
        lambda event, attempt: HookResponse(delay_s=3.0) if event["call_sid"] == CALL_A else None
    )
    dispatcher = dispatchers(hook_settings(url))
    for seq in range(1, 6):
        dispatcher.publish(make_event(seq, call_sid=CALL_A))
        dispatcher.publish(make_event(seq, call_sid=CALL_B))
    await receiver.wait(lambda: len(receiver.delivered(CALL_B)) == 5, TIMEOUT)
    assert len(receiver.requests(CALL_A)) == 1  # still waiting on its first answer


async def test_an_answered_action_reaches_on_action(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    answers = {"dtmf": TRANSFER, "emotion": {"action": "dance"}, "call.ended": {"action": "none"}}
    receiver, url = receivers(
        lambda event, attempt: HookResponse(body=answers[event["type"]]) if event["type"] in answers else None
    )
    seen: list[tuple[CallEvent, HookAction]] = []
    acting = asyncio.Event()
    release = asyncio.Event()

    async def on_action(event: CallEvent, action: HookAction) -> None:
        seen.append((event, action))
        acting.set()
        await release.wait()  # a transfer takes a while: deliveries must not wait for it
        raise RuntimeError("transfer failed")  # and its failure is only logged

    dispatcher = dispatchers(hook_settings(url), on_action)
    events = [
        make_event(1, "call.started"),
        make_event(2, "emotion", top=[{"name": "Joy", "score": 0.4}]),
        make_event(3, "dtmf", digit="0", action=""),
        make_event(4, "call.ended", outcome="completed"),
    ]
    for event in events:
        dispatcher.publish(event)
    assert await dispatcher.flush(TIMEOUT)
    await asyncio.wait_for(acting.wait(), TIMEOUT)
    assert seqs(receiver.delivered()) == [1, 2, 3, 4]  # all delivered while the action is under way
    assert len(seen) == 1
    event, action = seen[0]
    assert event is events[2] and action == HookAction("transfer", "+15550100")

    release.set()
    await dispatcher.aclose(TIMEOUT)
    [invalid] = [line for line in hook_warnings(caplog) if "invalid action" in line]
    assert invalid.startswith(f"[{CALL_A}] ") and "emotion" in invalid and "'dance'" in invalid
    assert any("hook action transfer failed" in r.getMessage() for r in caplog.records)


async def test_a_full_queue_drops_and_counts(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url), queue_size=5)
    for seq in range(1, 21):  # synchronous: the worker cannot start before the loop runs
        dispatcher.publish(make_event(seq))
    assert dispatcher.stats.dropped == 15 and dispatcher.pending == 5
    [warning] = hook_warnings(caplog)
    assert warning.startswith(f"[{CALL_A}] ")

    assert await dispatcher.flush(TIMEOUT)
    assert seqs(receiver.delivered()) == [1, 2, 3, 4, 5]
    dispatcher.publish(make_event(21))  # room again
    assert await dispatcher.flush(TIMEOUT)
    assert seqs(receiver.delivered())[-1] == 21


async def test_aclose_drains_the_queues(receivers: StartReceiver) -> None:
    receiver, url = receivers(lambda event, attempt: HookResponse(delay_s=0.05))
    dispatcher = HookDispatcher(hook_settings(url), **FAST)
    for seq in range(1, 6):
        dispatcher.publish(make_event(seq))
    dispatcher.publish(make_event(6, "call.ended"))
    assert dispatcher.pending == 6
    await dispatcher.aclose(TIMEOUT)
    assert seqs(receiver.delivered()) == [1, 2, 3, 4, 5, 6]
    assert dispatcher.pending == 0 and dispatcher.stats.delivered == 6

    dispatcher.publish(make_event(7))  # after close: dropped, no error
    assert dispatcher.stats.dropped == 1 and dispatcher.pending == 0


async def test_aclose_gives_up_when_its_time_is_up(
    receivers: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver, url = receivers(lambda event, attempt: HookResponse(delay_s=60))
    dispatcher = HookDispatcher(hook_settings(url), **FAST)
    for seq in (1, 2, 3):
        dispatcher.publish(make_event(seq))
    await receiver.wait(lambda: receiver.requests(), TIMEOUT)
    started = time.monotonic()
    await dispatcher.aclose(0.3)
    assert time.monotonic() - started < 5
    assert dispatcher.pending == 0 and dispatcher.channels == 0
    assert (dispatcher.stats.delivered, dispatcher.stats.failed) == (0, 3)
    assert any("3 event deliveries not made" in line for line in hook_warnings(caplog))


async def test_workers_end_after_call_ended_or_when_idle(
    receivers: StartReceiver, dispatchers: MakeDispatcher
) -> None:
    receiver, url = receivers()
    dispatcher = dispatchers(hook_settings(url), idle_s=0.1)
    dispatcher.publish(make_event(1, call_sid=CALL_A))
    dispatcher.publish(make_event(2, "call.ended", call_sid=CALL_A))
    dispatcher.publish(make_event(1, call_sid=CALL_B))
    assert dispatcher.channels == 2
    assert await dispatcher.flush(TIMEOUT)
    assert dispatcher.channels == 1  # call A ended; call B's worker waits for more
    await eventually(lambda: dispatcher.channels == 0)  # ... until it has been idle a while
    dispatcher.publish(make_event(2, call_sid=CALL_B))  # a new worker takes over
    assert await dispatcher.flush(TIMEOUT)
    assert seqs(receiver.delivered(CALL_B)) == [1, 2]
    tasks = {task.get_name() for task in asyncio.all_tasks()}
    assert not any(name.startswith(f"hook {CALL_A}") for name in tasks)


def test_publish_outside_the_event_loop_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = HookDispatcher(hook_settings("http://127.0.0.1:9/hooks"))
    dispatcher.publish(make_event(1))
    dispatcher.publish(make_event(2))
    assert dispatcher.stats.dropped == 2 and dispatcher.pending == 0
    assert len(hook_warnings(caplog)) == 1
    HookDispatcher(Settings()).publish(make_event(1))  # no hooks: nothing to do


def test_hooks_need_a_secret() -> None:
    with pytest.raises(ValueError, match="hook_secret"):
        HookDispatcher(Settings(hook_urls=("http://127.0.0.1:9/hooks",)))


async def test_the_secret_never_reaches_the_logs(
    receivers: StartReceiver, dispatchers: MakeDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    responses = [
        HookResponse(500),
        HookResponse(400),
        HookResponse(body={"action": "dance"}),
        HookResponse(body=TRANSFER),
    ]
    _, url = receivers(responses)

    async def on_action(event: CallEvent, action: HookAction) -> None:
        raise RuntimeError("boom")

    dispatcher = dispatchers(hook_settings(url, retries=1), on_action, queue_size=3)
    for seq in range(1, 6):
        dispatcher.publish(make_event(seq))
    assert await dispatcher.flush(TIMEOUT)
    await dispatcher.aclose(TIMEOUT)
    assert caplog.records
    assert SECRET not in caplog.text and "v1=" not in caplog.text
