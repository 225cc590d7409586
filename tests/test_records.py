"""Every call on record: the store on SQLite and on a real PostgreSQL, crash marking with a
real crash, the writer through a database outage, and the `ivr-bridge calls` command.

PostgreSQL: postgresql+asyncpg://127.0.0.1:5432/test (each test in a schema of its own,
dropped after). Unreachable, its tests fail, unless IVR_TEST_POSTGRES=0 (then they skip).
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ivr_bridge import records_cli
from ivr_bridge.events import CallEvent
from ivr_bridge.records import SCHEMA_REVISION, VERSION_TABLE, CallStore, RecordsError

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
PG_URL = f"postgresql+asyncpg://{PG_HOST}:{PG_PORT}/{PG_DATABASE}"
REPO = Path(__file__).resolve().parent.parent
T0 = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC: the first call's start
TRANSFER = "+15550100"


# -- backends ------------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    connect_args: dict[str, Any] = field(default_factory=dict)
    stores: list[CallStore] = field(default_factory=list)

    def store(self, instance: str = "host-a", url: str | None = None, **kwargs: Any) -> CallStore:
        store = CallStore(url or self.url, instance, connect_args=self.connect_args, **kwargs)
        self.stores.append(store)
        return store

    async def scalars(self, sql: str) -> list[Any]:
        store = self.store()
        await store.open(mark_interrupted=False)
        async with store._reader().connect() as conn:
            return list((await conn.execute(text(sql))).scalars())


async def _pg_admin() -> Any:
    import asyncpg

    if os.environ.get("IVR_TEST_POSTGRES") == "0":
        pytest.skip("PostgreSQL tests off (IVR_TEST_POSTGRES=0)")
    try:
        return await asyncpg.connect(host=PG_HOST, port=PG_PORT, database=PG_DATABASE, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(
            f"PostgreSQL at {PG_URL} is not reachable ({type(exc).__name__}: {exc}); start it, "
            "or set IVR_TEST_POSTGRES=0 to skip the PostgreSQL tests",
            pytrace=False,
        )


async def _pg_backend() -> AsyncIterator[Backend]:
    admin = await _pg_admin()
    schema = f"ivr_test_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    backend = Backend("postgresql", PG_URL, {"server_settings": {"search_path": schema}})
    try:
        yield backend
    finally:
        for store in backend.stores:
            await store.close(timeout=1)
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "postgresql":
        async for pg in _pg_backend():
            yield pg
        return
    # A folder that does not exist yet: open() makes it.
    backend = Backend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'records' / 'calls.db'}")
    yield backend
    for store in backend.stores:
        await store.close(timeout=1)


@pytest.fixture
async def pg_backend() -> AsyncIterator[Backend]:
    async for pg in _pg_backend():
        yield pg


# -- calls ---------------------------------------------------------------------------------


def full_call(call_sid: str = "CA0001", t0: float = T0, instance: str = "host-a") -> list[CallEvent]:
    """A call with every kind of event, in the order a call emits them."""
    steps: list[tuple[str, float, dict[str, Any]]] = [
        (
            "call.started",
            0.0,
            {
                "stream_sid": "MZ0001",
                "account_sid": "AC0001",
                "from": "+15551230001",
                "to": "+15559870002",
                "custom_parameters": {"campaign": "spring"},
                "provider": "echo",
                "instance": instance,
            },
        ),
        ("transcript", 1.5, {"at": 1.5, "role": "user", "text": "Where is my order?"}),
        ("emotion", 1.6, {"top": [{"name": "calm", "score": 0.71}, {"name": "interest", "score": 0.4}]}),
        (
            "transcript",
            3.0,
            {
                "at": 2.1,
                "role": "assistant",
                "text": "Sure, your order shipped yesterday and arrives on Friday.",
                "heard_text": "Sure, your order",
                "heard_ms": 1200,
                "sent_ms": 2000,
                "interrupted": True,
            },
        ),
        ("barge_in", 3.0, {"reply": 1, "heard_ms": 1200, "dropped_ms": 800, "reason": "speech"}),
        ("transcript", 3.9, {"at": 3.9, "role": "user", "text": "An agent please."}),
        ("dtmf", 4.2, {"digit": "0", "action": f"transfer:{TRANSFER}"}),
        ("control", 4.3, {"action": "transfer", "to": TRANSFER, "source": "dtmf", "result": "ok"}),
        ("upstream.error", 4.5, {"code": "1011", "message": "internal error", "retrying": True}),
        (
            "call.ended",
            6.25,
            {
                "outcome": "transferred",
                "duration_s": 6.25,
                "turns": 2,
                "replies": 1,
                "barge_ins": 1,
                "emotions": {"calm": 1},
                "latency": {
                    "reply_ms": {"count": 1, "p50": 820.0, "p95": 820.0, "max": 820.0},
                    "clear_ms": {"count": 1, "p50": 35.0, "p95": 35.0, "max": 35.0},
                },
                "transfer_to": TRANSFER,
                "ended_by": "dtmf",
                "fallback": "",
            },
        ),
    ]
    return [
        CallEvent(kind, call_sid, seq, t0 + elapsed, elapsed, data)  # type: ignore[arg-type]
        for seq, (kind, elapsed, data) in enumerate(steps, 1)
    ]


def short_call(call_sid: str, t0: float, outcome: str = "completed") -> list[CallEvent]:
    started = {
        "stream_sid": "MZ" + call_sid,
        "from": "+15551230009",
        "to": "+15559870002",
        "provider": "echo",
    }
    return [
        CallEvent("call.started", call_sid, 1, t0, 0.0, started),
        CallEvent("transcript", call_sid, 2, t0 + 1, 1.0, {"role": "user", "text": "hello"}),
        CallEvent(
            "call.ended", call_sid, 3, t0 + 2, 2.0, {"outcome": outcome, "duration_s": 2.0, "turns": 1}
        ),
    ]


def record_all(store: CallStore, call_events: list[CallEvent]) -> None:
    for ev in call_events:
        store.record(ev)


def close_to(when: datetime, unix: float) -> bool:
    return when.tzinfo is not None and abs(when.timestamp() - unix) < 1e-3


# -- the store -----------------------------------------------------------------------------


async def test_a_call_is_written_and_read_back_in_order(backend: Backend) -> None:
    store = backend.store()
    assert await store.open() == 0
    call = full_call()
    record_all(store, call)
    assert await store.flush(10)

    record = await store.get("CA0001")
    assert record is not None
    assert [e["seq"] for e in record["events"]] == list(range(1, len(call) + 1))
    assert [e["type"] for e in record["events"]] == [e.type for e in call]
    for stored, sent in zip(record["events"], call, strict=True):
        assert stored["data"] == sent.data
        assert stored["elapsed"] == sent.elapsed
        assert stored["id"] == sent.id
        assert close_to(stored["at"], sent.at)

    assert (record["stream_sid"], record["account_sid"]) == ("MZ0001", "AC0001")
    assert (record["from_number"], record["to_number"]) == ("+15551230001", "+15559870002")
    assert record["custom_parameters"] == {"campaign": "spring"}
    assert (record["provider"], record["instance_id"]) == ("echo", "host-a")
    assert close_to(record["started_at"], T0)
    assert close_to(record["ended_at"], T0 + 6.25)
    assert record["outcome"] == "transferred"
    assert (record["duration_s"], record["turns"], record["barge_ins"]) == (6.25, 2, 1)
    assert record["emotions"] == {"calm": 1}
    assert record["latency"]["reply_ms"]["p95"] == 820.0
    assert record["transfer_to"] == TRANSFER
    assert record["fallback"] is None
    assert record["end_data"] == call[-1].data

    assert [(line["role"], line["elapsed"]) for line in record["transcript"]] == [
        ("user", 1.5),
        ("assistant", 3.0),
        ("user", 3.9),
    ]
    assert record["transcript"][1]["heard_text"] == "Sure, your order"
    assert record["transcript"][1]["interrupted"] is True

    assert await store.get("CA-unknown") is None
    listed = await store.list_calls()
    assert [c["call_sid"] for c in listed] == ["CA0001"]
    assert "events" not in listed[0]


async def test_rerecording_the_same_events_changes_nothing(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    call = full_call()
    record_all(store, call)
    assert await store.flush(10)
    before = await store.get("CA0001")

    record_all(store, call)  # a retried delivery: same seq (and ids)
    record_all(store, [CallEvent(e.type, e.call_sid, e.seq, e.at, e.elapsed, e.data) for e in call[:3]])
    assert await store.flush(10)
    assert await store.get("CA0001") == before

    record_all(store, call + call)  # twice in one batch
    assert await store.flush(10)
    assert store.dropped == 0
    assert await store.get("CA0001") == before
    assert await backend.scalars("SELECT count(*) FROM ivr_call_events") == [len(call)]
    assert await backend.scalars("SELECT count(*) FROM ivr_calls") == [1]


async def test_records_survive_a_restart_and_reopening_does_not_migrate_again(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ivr_bridge.records")
    first = backend.store()
    await first.open()
    assert "migrating" in caplog.text
    record_all(first, full_call())
    record_all(first, short_call("CA0002", T0 + 60))
    assert await first.flush(10)
    before = [await first.get("CA0001"), await first.get("CA0002")]
    await first.close()

    caplog.clear()
    second = backend.store()
    assert await second.open() == 0  # both calls ended: nothing to mark
    assert "migrating" not in caplog.text
    assert [await second.get("CA0001"), await second.get("CA0002")] == before
    assert await backend.scalars(f"SELECT version_num FROM {VERSION_TABLE}") == [SCHEMA_REVISION]
    await second.close()
    third = backend.store(instance="host-b")  # opening once more, as another instance
    assert await third.open() == 0
    assert await backend.scalars(f"SELECT version_num FROM {VERSION_TABLE}") == [SCHEMA_REVISION]


async def test_instances_starting_at_once_migrate_once(backend: Backend) -> None:
    stores = [backend.store(instance=f"host-{n}") for n in range(4)]
    assert await asyncio.gather(*(store.open() for store in stores)) == [0, 0, 0, 0]
    assert await backend.scalars(f"SELECT version_num FROM {VERSION_TABLE}") == [SCHEMA_REVISION]


CRASHING_INSTANCE = """
import asyncio, json, os, sys
from ivr_bridge.events import CallEvent
from ivr_bridge.records import CallStore

url, instance, connect_args, t0 = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])

async def main():
    store = CallStore(url, instance, connect_args=connect_args)
    await store.open()
    # An earlier call that ended, then the call the crash cuts.
    store.record(CallEvent("call.started", "CA-done", 1, t0, 0.0, {"from": "+1555001"}))
    ended = {"outcome": "completed", "duration_s": 3.0}
    store.record(CallEvent("call.ended", "CA-done", 2, t0 + 3, 3.0, ended))
    store.record(CallEvent("call.started", "CA-cut", 1, t0 + 10, 0.0, {"from": "+1555002", "to": "+1555003"}))
    line = {"role": "user", "text": "my card was charged twice"}
    store.record(CallEvent("transcript", "CA-cut", 2, t0 + 12.5, 2.5, line))
    assert await store.flush(10)
    os._exit(9)  # no close, no call.ended: a crash

asyncio.run(main())
"""


async def test_calls_cut_by_a_crash_are_marked_interrupted_on_the_next_start(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    # A call live on another instance sharing the database.
    other = backend.store(instance="host-b")
    await other.open()
    other.record(CallEvent("call.started", "CA-live", 1, T0 + 5, 0.0, {"from": "+1555004"}))
    assert await other.flush(10)

    crash = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_INSTANCE,
        backend.url,
        "host-a",
        json.dumps(backend.connect_args),
        str(T0),
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(crash.communicate(), 60)
    assert crash.returncode == 9, stderr.decode()

    restarted = backend.store(instance="host-a")
    assert await restarted.open() == 1
    assert "1 call(s) of instance host-a were in progress" in caplog.text
    cut = await restarted.get("CA-cut")
    assert cut is not None
    assert cut["outcome"] == "interrupted"
    assert close_to(cut["ended_at"], T0 + 12.5)  # the last thing heard of it
    assert cut["duration_s"] == 2.5
    assert [line["text"] for line in cut["transcript"]] == ["my card was charged twice"]
    assert (await restarted.get("CA-done") or {})["outcome"] == "completed"
    live = await restarted.get("CA-live")
    assert live is not None and live["outcome"] == "in_progress" and live["ended_at"] is None

    assert await restarted.open() == 0  # already marked
    reader = backend.store(instance="host-b")
    await reader.open(mark_interrupted=False)  # a reader never marks anything
    assert (await reader.get("CA-live") or {})["outcome"] == "in_progress"
    assert [c["call_sid"] for c in await reader.list_calls(outcome="interrupted")] == ["CA-cut"]


async def test_listing_and_export_filter_and_order(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    for n in range(5):
        record_all(store, short_call(f"CA{n}", T0 + 3600 * n, outcome="failed" if n == 3 else "completed"))
    assert await store.flush(10)

    listed = await store.list_calls()
    assert [c["call_sid"] for c in listed] == ["CA4", "CA3", "CA2", "CA1", "CA0"]
    assert all(c["started_at"].tzinfo is not None for c in listed)
    since = datetime.fromtimestamp(T0 + 3600 * 2, UTC)
    assert [c["call_sid"] for c in await store.list_calls(since=since)] == ["CA4", "CA3", "CA2"]
    assert [c["call_sid"] for c in await store.list_calls(limit=2)] == ["CA4", "CA3"]
    assert [c["call_sid"] for c in await store.list_calls(outcome="failed")] == ["CA3"]
    assert [c["call_sid"] for c in await store.list_calls(since=since, outcome="completed", limit=1)] == [
        "CA4"
    ]

    exported = [r async for r in store.export()]
    assert [r["call_sid"] for r in exported] == ["CA0", "CA1", "CA2", "CA3", "CA4"]
    assert all([e["seq"] for e in r["events"]] == [1, 2, 3] for r in exported)
    assert exported[2] == await store.get("CA2")
    assert [r["call_sid"] async for r in store.export(since=since)] == ["CA2", "CA3", "CA4"]


async def test_search_by_number_and_time_window(backend: Backend) -> None:
    """What the dashboard's history asks: part of a number (from or to, taken literally:
    `%` and `_` are not patterns), a time window, an outcome; export filters alike."""
    store = backend.store()
    await store.open()
    numbers = ["+15557770123", "+44207946000", "Alice_%", "+15557770999"]
    for n, number in enumerate(numbers):
        events = short_call(f"CA{n}", T0 + 3600 * n)
        started = {"from": number, "to": "+15550001"}
        events[0] = CallEvent("call.started", f"CA{n}", 1, T0 + 3600 * n, 0.0, started)
        record_all(store, events)
    assert await store.flush(10)

    async def sids(**query: Any) -> list[str]:
        return [c["call_sid"] for c in await store.list_calls(**query)]

    assert await sids(number="777") == ["CA3", "CA0"]
    assert await sids(number="_%") == ["CA2"]  # literally, not "any character"
    assert await sids(number="%") == ["CA2"]
    assert await sids(number="0001") == ["CA3", "CA2", "CA1", "CA0"]  # the number called
    assert await sids(number="999999") == []
    window = {
        "since": datetime.fromtimestamp(T0 + 3600, UTC),
        "until": datetime.fromtimestamp(T0 + 3 * 3600, UTC),
    }
    assert await sids(**window) == ["CA2", "CA1"]
    assert await sids(number="777", **window) == []
    assert await sids(number="777", outcome="completed") == ["CA3", "CA0"]
    assert [r["call_sid"] async for r in store.export(number="777")] == ["CA0", "CA3"]
    assert [r["call_sid"] async for r in store.export(**window)] == ["CA1", "CA2"]


async def test_odd_event_data_is_stored_not_choked_on(backend: Backend) -> None:
    store = backend.store()
    await store.open()
    store.record(
        CallEvent("call.started", "CA-odd", 1, T0, 0.0, {"from": "+1\x00555", "when": datetime(2026, 1, 1)})
    )
    store.record(
        CallEvent("emotion", "CA-odd", 2, T0 + 1, 1.0, {"top": [{"name": "joy", "score": float("nan")}]})
    )
    store.record(
        CallEvent("transcript", "CA-odd", 3, T0 + 2, 2.0, {"role": "user", "text": "a\x00b \\u0000 c"})
    )
    assert await store.flush(10)
    record = await store.get("CA-odd")
    assert record is not None
    assert record["from_number"] == "+1555"
    assert record["events"][0]["data"]["when"] == "2026-01-01 00:00:00"
    assert record["events"][1]["data"]["top"] == [{"name": "joy", "score": None}]
    assert record["transcript"][0]["text"] == "ab \\u0000 c"  # a typed backslash-u stays
    assert store.dropped == 0


async def test_an_event_the_database_rejects_does_not_hold_up_the_others(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = pg_backend.store()
    await store.open()
    store.record(CallEvent("transcript", "CA" + "x" * 100, 1, T0, 0.0, {"role": "user", "text": "?"}))
    record_all(store, short_call("CA-ok", T0))  # queued with it: one batch
    assert await store.flush(10)
    assert store.dropped == 1
    assert "rejected" in caplog.text
    assert (await store.get("CA-ok") or {})["outcome"] == "completed"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_record_never_blocks_or_raises_without_a_database(caplog: pytest.LogCaptureFixture) -> None:
    store = CallStore(
        f"postgresql+asyncpg://ivr:s3cret@127.0.0.1:{_closed_port()}/x", "host-a", max_queue=1000
    )
    started = time.perf_counter()
    for n in range(5000):
        store.record(CallEvent("transcript", "CA1", n + 1, T0 + n, float(n), {"role": "user", "text": "hi"}))
    assert time.perf_counter() - started < 0.5
    assert store.dropped == 4000  # beyond the bound: dropped and counted, logged once
    assert len([r for r in caplog.records if "dropping new events" in r.getMessage()]) == 1
    store.record(None)  # type: ignore[arg-type]  # even nonsense does not raise
    assert store.dropped == 4001

    with pytest.raises(RecordsError) as failure:
        await asyncio.wait_for(store.open(), 15)
    assert "s3cret" not in str(failure.value) and "ivr:***@" in str(failure.value)
    assert not await store.flush(0.01)
    await store.close(timeout=0.01)
    assert "s3cret" not in caplog.text


class Proxy:
    """A TCP relay to PostgreSQL that can be cut (connections reset, port closed) and restored."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for transport in self._transports:
            transport.abort()  # type: ignore[attr-defined]
        self._transports.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(PG_HOST, PG_PORT)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_the_writer_rides_out_a_database_outage(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy()
    await proxy.start()
    url = f"postgresql+asyncpg://{getpass.getuser()}:s3cret@127.0.0.1:{proxy.port}/{PG_DATABASE}"
    store = pg_backend.store(url=url)  # trust auth: the password is never checked
    await store.open()
    call = full_call()
    store.record(call[0])
    assert await store.flush(10)

    await proxy.cut()
    started = time.perf_counter()
    record_all(store, call[1:])
    assert time.perf_counter() - started < 0.05
    assert store.pending >= len(call) - 1
    deadline = time.monotonic() + 20
    while store.write_failures < 3:  # each flush makes the writer retry at once
        assert time.monotonic() < deadline, "the writer did not retry"
        assert not await store.flush(0.2)
    outage_lines = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(outage_lines) == 1, caplog.text
    assert f"127.0.0.1:{proxy.port}" in outage_lines[0].getMessage()

    await proxy.start()  # the database is back, on the same port
    assert await store.flush(15)
    assert store.pending == 0
    assert "writing to" in caplog.text
    record = await store.get("CA0001")
    assert record is not None
    assert [e["seq"] for e in record["events"]] == list(range(1, len(call) + 1))
    assert record["outcome"] == "transferred"
    assert "s3cret" not in caplog.text
    await store.close()
    await proxy.cut()


def test_the_migrations_ship_in_the_package() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from setuptools import find_packages

    from ivr_bridge.records import MIGRATIONS

    packages = find_packages(str(REPO), include=["ivr_bridge*"])
    assert {"ivr_bridge.migrations", "ivr_bridge.migrations.versions"} <= set(packages)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_REVISION


# -- the `calls` command -------------------------------------------------------------------


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("IVR_", "NEXTEVI_", "TWILIO_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env file
    monkeypatch.setenv("IVR_INSTANCE_ID", "cli")
    return monkeypatch


async def calls(*argv: str) -> int:
    return await asyncio.to_thread(records_cli.main, ["calls", *argv])


async def _seed_for_cli(backend: Backend, cli_env: pytest.MonkeyPatch) -> None:
    store = backend.store()
    await store.open()
    record_all(store, full_call("CA0001", T0))
    record_all(store, short_call("CA0002", T0 + 86400))
    store.record(CallEvent("call.started", "CA0003", 1, T0 + 2 * 86400, 0.0, {"from": "+1555"}))
    assert await store.flush(10)
    cli_env.setenv("IVR_DATABASE_URL", backend.url)
    if backend.connect_args:
        cli_env.setattr(
            records_cli, "CallStore", functools.partial(CallStore, connect_args=backend.connect_args)
        )


async def test_cli_list(
    backend: Backend, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await _seed_for_cli(backend, cli_env)
    assert await calls("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "STARTED",
        "(UTC)",
        "CALL",
        "SID",
        "FROM",
        "TO",
        "DURATION",
        "OUTCOME",
        "TURNS",
    ]
    assert [line.split()[2] for line in lines[1:]] == ["CA0003", "CA0002", "CA0001"]
    assert lines[3].split() == [
        "2026-11-18",
        datetime.fromtimestamp(T0, UTC).strftime("%H:%M:%S"),
        "CA0001",
        "+15551230001",
        "+15559870002",
        "0:06",
        "transferred",
        "2",
    ]
    assert lines[1].split()[-3:] == ["-", "in_progress", "-"]
    assert len({line.index("CA0") for line in lines[1:]}) == 1  # aligned

    assert await calls("list", "--outcome", "completed", "--limit", "5") == 0
    assert [line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]] == ["CA0002"]
    assert await calls("list", "--since", "2026-11-19T00:00", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["call_sid"] for c in listed] == ["CA0003", "CA0002"]
    assert listed[1]["started_at"].endswith("Z")
    assert await calls("list", "--since", "30m") == 0
    assert capsys.readouterr().out.strip() == "no calls"


async def test_cli_show(
    backend: Backend, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await _seed_for_cli(backend, cli_env)
    assert await calls("show", "CA0001") == 0
    out = capsys.readouterr().out
    header, timeline = out.split("\n\n", 1)
    assert header.splitlines()[0].split() == ["call", "CA0001"]
    for expected in (
        "stream       MZ0001",
        "from         +15551230001",
        "instance     host-a",
        "duration     6.2 s (0:06)",
        "outcome      transferred",
        "turns        2, barge-ins 1",
        f"transfer to  {TRANSFER}",
        "reply latency  p50 820 ms, p95 820 ms, max 820 ms (1)",
        "emotions     calm 1",
    ):
        assert " ".join(expected.split()) in {" ".join(line.split()) for line in header.splitlines()}, (
            expected
        )
    events = timeline.splitlines()[1:]
    assert [float(line.split()[0]) for line in events] == sorted(float(line.split()[0]) for line in events)
    text_of = [line.split(None, 1)[1] for line in events]
    assert text_of == [
        "call started: +15551230001 -> +15559870002",
        "user: Where is my order?",
        "emotion: calm 0.71, interest 0.40",
        "bot (cut at 1.2 s): Sure, your order…",
        "barge-in: caller spoke over the bot after 1.2 s, 0.8 s of reply dropped (speech)",
        "user: An agent please.",
        f"dtmf 0 -> transfer:{TRANSFER}",
        f"control: transfer to {TRANSFER} (from dtmf): ok",
        "voice API error 1011: internal error (retrying)",
        f"call ended: transferred, transferred to {TRANSFER}",
    ]
    assert events[3].split()[0] == "3.00"

    assert await calls("show", "CA0001", "--json") == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["events"]) == 10 and record["transcript"][0]["text"] == "Where is my order?"

    assert await calls("show", "CA-nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["ivr-bridge: no call 'CA-nope' on record"]


async def test_cli_export(
    backend: Backend, cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await _seed_for_cli(backend, cli_env)
    assert await calls("export") == 0
    lines = capsys.readouterr().out.splitlines()
    exported = [json.loads(line) for line in lines]
    assert [r["call_sid"] for r in exported] == ["CA0001", "CA0002", "CA0003"]
    assert [len(r["events"]) for r in exported] == [10, 3, 1]
    assert exported[0]["events"][3]["data"]["heard_text"] == "Sure, your order"
    assert exported[0]["events"][0]["at"].endswith("Z")
    assert await calls("export", "--since", "2026-11-20") == 0
    assert [json.loads(line)["call_sid"] for line in capsys.readouterr().out.splitlines()] == ["CA0003"]


async def test_cli_errors(
    cli_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cli_env.setenv("IVR_DATABASE_URL", "mysql://db/calls")
    assert await calls("list") == 2
    assert capsys.readouterr().err.splitlines() == [
        "ivr-bridge: IVR_DATABASE_URL must be a postgresql:// (or sqlite://) URL"
    ]

    cli_env.delenv("IVR_DATABASE_URL")
    cli_env.setenv("IVR_DATABASE_PATH", str(tmp_path / "none.db"))
    assert await calls("show", "CA1") == 1
    assert "no call records at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()  # reading made no database

    cli_env.setenv("IVR_DATABASE_URL", f"postgresql://ivr:s3cret@127.0.0.1:{_closed_port()}/x")
    assert await calls("list") == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot open the call records" in err and "s3cret" not in err

    with pytest.raises(SystemExit) as usage:
        records_cli.main(["calls", "list", "--since", "yesterday"])
    assert usage.value.code == 2
    assert "an age (30m, 2h, 7d)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20T10:00", datetime(2026, 11, 20, 10, tzinfo=UTC)),
        ("2026-11-20T10:00:30+02:00", datetime(2026, 11, 20, 8, 0, 30, tzinfo=UTC)),
        ("2026-11-20T10:00Z", datetime(2026, 11, 20, 10, tzinfo=UTC)),
        ("30m", datetime(2026, 11, 21, 11, 30, tzinfo=UTC)),
        ("2h", datetime(2026, 11, 21, 10, tzinfo=UTC)),
        ("7d", datetime(2026, 11, 14, 12, tzinfo=UTC)),
        ("90s", datetime(2026, 11, 21, 11, 58, 30, tzinfo=UTC)),
        ("1.5H", datetime(2026, 11, 21, 10, 30, tzinfo=UTC)),
    ],
)
def test_since_accepts_dates_and_ages(text: str, expected: datetime) -> None:
    now = datetime(2026, 11, 21, 12, tzinfo=UTC)
    assert records_cli.parse_when(text, now=now) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "7", "-2h", "2026-13-01", "2 days"])
def test_since_rejects_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="an age"):
        records_cli.parse_when(text)


def test_show_readable_form_without_events() -> None:
    record = {
        "call_sid": "CA9",
        "outcome": "interrupted",
        "started_at": datetime(2026, 11, 20, 10, tzinfo=UTC),
        "ended_at": None,
        "duration_s": None,
        "events": [],
    }
    text_form = records_cli.call_text(record)
    assert "started   2026-11-20 10:00:00.000 UTC" in text_form
    assert "(no events)" in text_form
    assert records_cli.calls_table([]) == "no calls"


# -- call control claims --------------------------------------------------------------------


async def test_a_control_claim_is_won_once_among_many_instances(backend: Backend) -> None:
    stores = [backend.store(f"host-{n}") for n in range(10)]
    for store in stores:
        await store.open()
    answers = await asyncio.gather(
        *(store.claim_control("CA1", "transfer", f"+1555010{n}", "api") for n, store in enumerate(stores))
    )
    winners = [n for n, answer in enumerate(answers) if answer is None]
    assert len(winners) == 1
    assert {a["target"] for a in answers if a is not None} == {f"+1555010{winners[0]}"}
    await stores[0].settle_control("CA1", {"result": "done"})
    claim = await stores[5].control_claim("CA1")
    assert claim is not None and claim["result"] == {"result": "done"}
    # A failed attempt gives its claim up; a settled one stays.
    assert await stores[1].claim_control("CA2", "hangup", "", "api") is None
    await stores[1].settle_control("CA2", None)
    assert await stores[2].claim_control("CA2", "hangup", "", "hook") is None


# -- instances that die: their calls marked interrupted once, by one survivor ---------------


async def test_a_dead_instances_calls_are_marked_once_by_a_survivor(backend: Backend) -> None:
    from sqlalchemy import update as sql_update

    from ivr_bridge.records import instances

    dead = backend.store("host-dead")
    await dead.open()
    for n in range(3):
        dead.record(CallEvent("call.started", f"CA-dead-{n}", 1, T0, 0.0, {"from": "+1555"}))
    assert await dead.flush(10)
    # It dies: no clean close, and its heartbeat goes stale.
    dead._beat.cancel()
    async with dead._writer_engine().begin() as conn:
        await conn.execute(sql_update(instances).values(heartbeat_at=datetime(2026, 1, 1, tzinfo=UTC)))
    survivors = [backend.store(f"host-{n}") for n in range(3)]
    marked = await asyncio.gather(*(s.open() for s in survivors))  # three survivors start at once
    assert sum(marked) == 3
    assert await survivors[0].sweep() == 0  # nothing left to mark: each call was marked once
    rows = await survivors[1].list_calls(limit=None)
    assert {r["call_sid"]: r["outcome"] for r in rows} == {f"CA-dead-{n}": "interrupted" for n in range(3)}
    alive = {r for r in await backend.scalars("SELECT instance_id FROM ivr_instances")}
    assert alive == {"host-0", "host-1", "host-2"}  # the dead one forgotten, the living beating


async def test_a_store_that_cannot_open_leaves_no_worker_thread_behind(tmp_path: Path) -> None:
    # A directory is no database: the connection fails inside aiosqlite's worker thread.
    # That thread must be gone when open() raises: a start-up that gives up closes its loop
    # next, and a thread still posting to it would print a traceback (tests/test_deploy.py).
    import threading

    before = set(threading.enumerate())
    for _ in range(5):
        store = CallStore(f"sqlite+aiosqlite:///{tmp_path}", "test")
        with pytest.raises(RecordsError, match="unable to open database file"):
            await store.open()
        left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
        assert left == []
