"""Hostile networks, what is kept: control claimed once across instances, records that
survive their file going away, logs that cannot be forged and keep secrets at any level,
the CLI's hostile input, and a shutdown no hook receiver can hold up."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import websockets

from ivr_bridge import records_cli
from ivr_bridge.connections import check_descriptor_limit, descriptors_needed
from ivr_bridge.events import CallEvent
from ivr_bridge.logs import Redactor, SafeFormatter, escape
from ivr_bridge.records import CallStore
from ivr_bridge.settings import Settings, SettingsError, is_phone_target
from ivr_bridge.twilio_rest import TwilioRest
from tests.test_resilience import with_rest
from tests.test_routing import API_TOKEN, api, routed

REPO = Path(__file__).resolve().parent.parent


# -- call control: one action per call, on any instance ----------------------------------------


@pytest.mark.parametrize("same_target", [True, False])
async def test_control_through_other_instances_is_carried_out_once(
    make_bridge, twilio_rest, tmp_path: Path, same_target: bool
) -> None:
    """The call is on no instance asked (as if on a third): ten requests in parallel through
    two instances sharing the records make one REST request."""
    rest, rest_url = twilio_rest
    sid = "CA" + "5" * 32
    rest.live_calls.add(sid)
    shared = str(tmp_path / "shared.db")
    bridges = [
        make_bridge(
            routed(
                with_rest(Settings(provider="echo"), rest, rest_url),
                database_path=shared,
                instance_id=f"i{n}",
            )
        )
        for n in range(2)
    ]
    clients = [api(b) for b in bridges]
    try:
        targets = ["+15550100" if same_target else f"+155501{n:02d}" for n in range(10)]
        answers = await asyncio.gather(
            *(clients[n % 2].post(f"/calls/{sid}/transfer", json={"to": to}) for n, to in enumerate(targets))
        )
    finally:
        for client in clients:
            await client.aclose()
    statuses = sorted(a.status_code for a in answers)
    if same_target:
        assert statuses == [200] * 10
        assert len({a.text for a in answers}) == 1  # the one answer, repeated
    else:
        assert statuses == [200] + [409] * 9
    assert len(rest.updates) == 1


async def test_a_call_sid_cannot_steer_the_rest_url(make_bridge, twilio_rest) -> None:
    rest, rest_url = twilio_rest
    bridge = make_bridge(routed(with_rest(Settings(provider="echo"), rest, rest_url)))
    async with api(bridge) as client:
        for sid in ("CA1%3FStatus%3Dcompleted", "CA1%26x%3D1", "CA%0A1"):
            assert (await client.post(f"/calls/{sid}/hangup")).status_code == 404
            assert (await client.get(f"/calls/{sid}")).status_code == 404
    assert rest.updates == []


def test_rest_quotes_the_call_sid() -> None:
    rest = TwilioRest(Settings(twilio_account_sid="AC1", twilio_auth_token="t" * 32))
    assert rest._client is not None
    assert rest._client.calls("CA1?x")._uri.endswith("/Calls/CA1?x.json")  # what the library would do
    # ... which is why _update quotes it first.
    from urllib.parse import quote

    assert rest._client.calls(quote("CA1?x", safe=""))._uri.endswith("/Calls/CA1%3Fx.json")


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("+15550100", True),
        ("sip:alice@example.com;transport=tls", True),
        ("sips:agent-7@pbx.example.com:5061", True),
        (
            "+\u0661\u0665\u0665\u0665\u0660\u0661\u0660\u0660",
            False,
        ),  # Arabic-Indic digits are isdigit() but no phone number
        ("+15550100\n", False),
        ("+1555\x1b[31m0100", False),
        ("sip:alice@example.com\r\nX: y", False),
        ("sip:a b@example.com", False),
        ('sip:a"><Hangup/>@x', False),
        ("sip:", False),
        ("+12", False),
    ],
)
def test_transfer_targets_are_checked_strictly(target: str, ok: bool) -> None:
    assert is_phone_target(target) is ok


# -- records that survive their file going away ------------------------------------------------


def event(sid: str, seq: int = 1, kind: str = "call.started") -> CallEvent:
    return CallEvent(kind, sid, seq, time.time(), 0.0, {"from": "+1555"})  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["deleted", "emptied", "overwritten"])
async def test_a_records_file_lost_under_the_bridge_is_started_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    caplog.set_level(logging.WARNING, logger="ivr_bridge.records")
    path = tmp_path / "calls.db"
    store = CallStore(f"sqlite+aiosqlite:///{path}", "host-a")
    await store.open()
    try:
        store.record(event("CA1"))
        assert await store.flush(10)
        import sqlite3

        with sqlite3.connect(path) as checkpoint:  # as if a while had passed: all in the main file
            checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if damage == "deleted":
            path.unlink()
        elif damage == "emptied":
            path.write_bytes(b"")
        else:
            with path.open("r+b") as f:
                f.write(b"\x00" * 100)  # the header gone: not a database
        for n in range(2, 5):
            store.record(event(f"CA{n}"))
        assert await store.flush(10)
        assert {row["call_sid"] for row in await store.list_calls()} == {"CA2", "CA3", "CA4"}
        assert store.file_recoveries == 1 and store.dropped == 0
    finally:
        await store.close()
    [line] = [r.getMessage() for r in caplog.records if "under the running bridge" in r.getMessage()]
    assert str(path) in line
    assert list(tmp_path.glob("calls.db.damaged-*")) or damage == "deleted"


def serve_env(tmp_path: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVR_", "NEXTEVI_", "TWILIO_"))}
    return env | {"IVR_DATABASE_PATH": str(tmp_path / "calls.db"), "IVR_INSTANCE_ID": "t"} | more


def test_a_damaged_records_file_stops_start_up_with_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "calls.db").write_bytes(b"this is not a database" * 500)
    done = subprocess.run(
        [sys.executable, "-m", "ivr_bridge.cli", "serve", "--port", "0"],
        env=serve_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    # One line says what is wrong and how out (after the settings line the log starts with).
    [line] = [line for line in done.stderr.splitlines() if line.startswith("ivr-bridge:")]
    assert line.startswith("ivr-bridge: IVR_DATABASE_PATH: the records file") and "mv " in line
    assert "Traceback" not in done.stderr


# -- the CLI's hostile input --------------------------------------------------------------------


def test_cli_prints_stored_text_escaped() -> None:
    hostile = "+1555\x1b[2J\x1b]0;pwned\x07\nFORGED line\u202e\x9b"
    row = {
        "call_sid": "CA1",
        "started_at": datetime(2026, 11, 20, tzinfo=UTC),
        "from_number": hostile,
        "to_number": "+1",
        "duration_s": 1.0,
        "outcome": "stream_stopped",
        "turns": 1,
    }
    events = [{"type": "transcript", "elapsed": 1.0, "data": {"role": "user", "text": hostile}}]
    for text in (records_cli.calls_table([row]), records_cli.call_text({**row, "events": events})):
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]", text)
        assert not any(line.startswith("FORGED") for line in text.splitlines())
    from ivr_bridge.records import record_json

    assert not re.search("[\x00-\x1f\x7f-\x9f\u202e]", record_json(row))


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--limit", "99999999999999999999"],
        ["list", "--limit", "0"],
        ["list", "--limit", "\uff11\uff10"],  # fullwidth "10"
        ["list", "--since", "99999999999d"],
        ["list", "--since", "0001-01-01T00:00+05:00"],
        ["export", "--since", "9" * 400 + "s"],
    ],
)
def test_cli_odd_arguments_are_one_line_not_a_traceback(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as usage:
        records_cli.main(["calls", *argv])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


# -- logs ----------------------------------------------------------------------------------------


def test_the_formatter_escapes_controls_and_masks_secrets() -> None:
    formatter = SafeFormatter("%(message)s", Redactor(["sk-live-abcdef123456"]))
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "[%s] key %s\n%s",
        ("CA1\nFORGED\x1b[31m", "sk-live-abcdef123456", "next"),
        None,
    )
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line and "sk-live" not in line
    assert line == "[CA1\\nFORGED\\x1b[31m] key ***\\nnext"
    for text, secret in [
        ("> GET /ws/voice/c1?api_key=oak_abc&config_id=c HTTP/1.1", "oak_abc"),
        ("< x-twilio-signature: AbC+/def=", "AbC+/def="),
        ("> Authorization: Bearer eyJhbGciOi.x.y", "eyJhbGciOi"),
        ("postgresql://ivr:pa55w0rd@db/x", "pa55w0rd"),
        ("https://user:hookpass@hooks.example/in", "hookpass"),
    ]:
        assert secret not in Redactor()(text), text
    assert escape("a\u202eb\x85c") == "a\\u202eb\\x85c"


def test_a_hook_url_password_stays_out_of_a_settings_error() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"IVR_HOOK_URL": "ftp://calls:hunter2secret@hooks.example/in"})
    assert "hunter2secret" not in str(raised.value) and "IVR_HOOK_URL" in str(raised.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serving(port: int) -> str:
    """The base URL of an `ivr-bridge serve` on `port`, once it answers /healthz."""
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for _ in range(300):  # polled: a process starting gives no other signal
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return base
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise TimeoutError(f"no bridge on port {port}")


async def test_debug_logs_keep_every_secret_and_cannot_be_forged(tmp_path: Path) -> None:
    """`ivr-bridge serve --log-level DEBUG` with the NextEVI stand-in: a signed call whose
    details carry newlines and terminal escapes, a control request, a bad webhook."""
    from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream, sign, stream_headers
    from ivr_bridge.standins.twilio import TwilioCaller
    from tests.test_end_to_end import API_KEY, CONFIG_ID, tone_ulaw, voice_api

    auth_token, hook_password = "f" * 32, "hookpass-s3cret"
    port = free_port()
    async with voice_api() as standin:
        env = serve_env(
            tmp_path,
            NEXTEVI_API_KEY=API_KEY,
            NEXTEVI_CONFIG_ID=CONFIG_ID,
            NEXTEVI_URL=standin.url,
            TWILIO_AUTH_TOKEN=auth_token,
            IVR_API_TOKEN=API_TOKEN,
            IVR_HOOK_URL=f"http://hooks:{hook_password}@127.0.0.1:{free_port()}/in",
            IVR_HOOK_SECRET="hook-signing-secret",
            IVR_PUBLIC_URL=f"http://127.0.0.1:{port}",
        )
        log_file = (tmp_path / "serve.log").open("wb")  # a file: DEBUG would fill a pipe and block
        server = subprocess.Popen(
            [sys.executable, "-m", "ivr_bridge.cli", "serve", "--port", str(port), "--log-level", "DEBUG"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            base = await serving(port)
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                call = CallDetails(from_number="+1555\nFORGED INFO ivr_bridge fake\x1b[2J")
                target = await fetch_stream(base + "/twiml", call, auth_token)
                hostile = dict(target.parameters) | {"Lang\n\x1b[31mFORGED": "x"}
                async with TwilioCaller(
                    target.url,
                    call_sid=call.call_sid,
                    custom_parameters=hostile,
                    headers=stream_headers(target, auth_token),
                ) as caller:
                    await standin.wait_for_session()
                    await caller.say(tone_ulaw(300))
                    await caller.hang_up()
                await client.post(
                    "/calls/CA1/transfer",
                    json={"to": "+1555\n\x1b[31mFORGED"},
                    headers={"Authorization": f"Bearer {API_TOKEN}"},
                )
                await client.post(
                    "/twiml", data={"CallSid": "CA2"}, headers={"X-Twilio-Signature": "forged=="}
                )
                signature = stream_headers(target, auth_token)["x-twilio-signature"]
                webhook_signature = sign(auth_token, base + "/twiml", call.form())
                # The softphone's stream token travels in its URL, which uvicorn logs.
                placed = await client.post(
                    "/phone/calls", json={}, headers={"Authorization": f"Bearer {API_TOKEN}"}
                )
                stream_token = placed.json()["stream_path"].split("token=")[1]
                async with websockets.connect(base.replace("http", "ws", 1) + placed.json()["stream_path"]):
                    pass
        finally:
            server.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait, 60)
            log_file.close()
    text = (tmp_path / "serve.log").read_text("utf-8", "replace")
    assert "webhook refused" in text and "call started" in text, text[-3000:]
    assert " DEBUG " in text  # DEBUG really was on
    for secret in (
        API_KEY,
        auth_token,
        API_TOKEN,
        hook_password,
        "hook-signing-secret",
        signature,
        webhook_signature,
        stream_token,
    ):
        assert secret not in text, secret
    assert "/phone/stream?call=" in text  # the upgrade was logged, its token masked
    assert "\x1b" not in text
    assert not [line for line in text.splitlines() if line.startswith("FORGED")]


# -- shutdown and start-up -------------------------------------------------------------------------


async def test_a_hanging_hook_receiver_cannot_hold_the_exit_past_the_drain(tmp_path: Path) -> None:
    from ivr_bridge.loadgen.webhook import CallDetails, fetch_stream
    from ivr_bridge.standins.twilio import TwilioCaller
    from tests.test_end_to_end import tone_ulaw

    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(50)  # accepts connections, never answers
    port = free_port()
    env = serve_env(
        tmp_path,
        IVR_HOOK_URL=f"http://127.0.0.1:{hanging.getsockname()[1]}/in",
        IVR_HOOK_SECRET="s" * 16,
        IVR_HOOK_TIMEOUT_S="60",
        IVR_DRAIN_TIMEOUT_S="1",
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "ivr_bridge.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        base = await serving(port)
        target = await fetch_stream(base + "/twiml", CallDetails())
        async with TwilioCaller(target.url, custom_parameters=target.parameters) as caller:
            await caller.say(tone_ulaw(200))
            await caller.hang_up()
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.wait, 60)
        took = time.monotonic() - signalled
    finally:
        server.kill()
        hanging.close()
    assert server.returncode == 0
    # The drain (1 s) and at most a second for the hooks: the old fixed 10 s is gone.
    assert took < 6, took


def test_a_low_descriptor_limit_is_raised_or_reported() -> None:
    code = (
        "import resource; from ivr_bridge.connections import check_descriptor_limit as c;"
        "print(c(1000, 256)); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    low = subprocess.run(
        ["bash", "-c", f"ulimit -Sn 256 && ulimit -Hn 512 && {sys.executable} -c '{code}'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    warning, soft = low.stdout.splitlines()
    assert "IVR_MAX_CALLS=1000" in warning and f"ulimit -n {descriptors_needed(1000, 256)}" in warning
    assert soft == "512"  # raised as far as the hard limit allows
    raised = subprocess.run(
        ["bash", "-c", f"ulimit -Sn 256 && ulimit -Hn 4096 && {sys.executable} -c '{code}'"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert raised.stdout.splitlines() == ["None", str(descriptors_needed(1000, 256))]
    assert check_descriptor_limit(1, 8) is None  # this machine's own limit suffices
