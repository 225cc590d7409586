"""Every call on record: the calls and their events in SQLite or PostgreSQL.

`CallStore.record(event)` is called from a call's audio path: it only queues the event and
never blocks or raises. One writer task writes whatever has queued up, one transaction per
batch, idempotently on (call_sid, seq), so the call row and its events so far are on disk
within moments of happening. If the database is down, the writer logs one line, keeps the
events queued (bounded) and retries with backoff; the calls never notice.

`open()` migrates the schema to head (alembic, under an advisory lock on PostgreSQL) and
marks this instance's calls still `in_progress` as `interrupted`: an instance that starts
has no live calls, so they were cut by its crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Select,
    String,
    Table,
    Text,
    event,
    exc,
    func,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator

from ivr_bridge.events import CallEvent
from ivr_bridge.settings import redact_url

log = logging.getLogger("ivr_bridge.records")

IN_PROGRESS = "in_progress"
INTERRUPTED = "interrupted"
MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "ivr_alembic_version"
SCHEMA_REVISION = "0003"  # the migration the tables below match: the head of migrations/versions
MIGRATION_LOCK_KEY = 0x1B71D6E3C0A5  # pg_advisory_xact_lock key of the schema migration
MAX_QUEUE = 100_000  # events waiting for the database; beyond this new events are dropped
BATCH_MAX = 500  # events per transaction
# A transaction costs about 1.5 ms of CPU whatever it holds (SQLite and PostgreSQL alike,
# measured here), on the loop that also carries the calls' audio: the writer gathers what
# arrives within this window into one. A crash loses at most this much of the record.
GATHER_S = 0.25
REJECTED_LOG_LIMIT = 20  # events the database rejects are logged up to this many, then counted
# Each serving instance beats every `heartbeat_s` (IVR_HEARTBEAT_S); one silent for
# STALE_BEATS of them is dead, and the first survivor to notice marks its calls
# `interrupted` (once: after that none is left in progress). An instance id is unique per
# process, so a restart is a new instance.
HEARTBEAT_S = 10.0
STALE_BEATS = 6
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0


async def _workers_stopped(threads_before: set[threading.Thread], timeout: float = 2.0) -> None:
    """Wait (bounded) for the aiosqlite worker threads started since `threads_before` to end.

    A connection that failed to open leaves its thread to finish a stop request whose
    result it posts to this event loop: if the loop has closed by then (a start-up that
    gives up), the thread prints a traceback, where start-up promises one line."""
    workers = [
        t for t in threading.enumerate() if t not in threads_before and "_connection_worker_thread" in t.name
    ]
    deadline = asyncio.get_running_loop().time() + timeout
    while any(t.is_alive() for t in workers) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)


class RecordsError(RuntimeError):
    """The call records cannot be opened; the message is safe to print (no password)."""


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # e.g. max() of the column on SQLite
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONData = JSON().with_variant(postgresql.JSONB(), "postgresql")

metadata = MetaData()

calls = Table(
    "ivr_calls",
    metadata,
    Column("call_sid", String(64), primary_key=True),
    Column("stream_sid", Text),
    Column("account_sid", Text),
    Column("from_number", Text),
    Column("to_number", Text),
    Column("custom_parameters", JSONData),
    Column("provider", Text),
    Column("instance_id", Text, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime),
    Column("outcome", String(32), nullable=False),
    Column("duration_s", Float),
    Column("turns", Integer),
    Column("barge_ins", Integer),
    Column("emotions", JSONData),  # {name: count}
    Column("latency", JSONData),  # {reply_ms: {count, p50, p95, max}, clear_ms: {...}}
    Column("transfer_to", Text),
    Column("fallback", Text),
    Column("end_data", JSONData),  # the call.ended event's whole data
    Index("ix_ivr_calls_started_at", "started_at"),
    Index("ix_ivr_calls_instance_outcome", "instance_id", "outcome"),
)

events = Table(
    "ivr_call_events",
    metadata,
    Column("call_sid", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", String(32), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("elapsed", Float, nullable=False),
    Column("data", JSONData, nullable=False),
    Column("event_id", String(64)),
    PrimaryKeyConstraint("call_sid", "seq", name="pk_ivr_call_events"),
)

# One transfer or hang-up per call, whichever instance is asked: the first to insert the
# row carries it out; `result` is its answer once done (a ControlResult's fields).
controls = Table(
    "ivr_call_controls",
    metadata,
    Column("call_sid", String(64), primary_key=True),
    Column("action", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("source", String(16), nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("claimed_at", UTCDateTime, nullable=False),
    Column("result", JSONData),
)

instances = Table(
    "ivr_instances",
    metadata,
    Column("instance_id", Text, primary_key=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

# What call.ended sets on the call row (an upsert: a call whose call.started was lost still gets a row).
_END_COLUMNS = (
    "outcome",
    "ended_at",
    "duration_s",
    "turns",
    "barge_ins",
    "emotions",
    "latency",
    "transfer_to",
    "fallback",
    "end_data",
)


class CallStore:
    """The call records of one bridge instance, in the database at `url` (SQLAlchemy async URL)."""

    def __init__(
        self,
        url: str,
        instance_id: str,
        *,
        max_queue: int = MAX_QUEUE,
        connect_args: Mapping[str, Any] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.url = url
        self.instance_id = instance_id
        self.max_queue = max_queue
        self.heartbeat_s = heartbeat_s
        self.dropped = 0  # events not recorded: queue full, or rejected by the database
        self.write_failures = 0  # failed write attempts (the database down), retried
        self._rejected = 0
        self._connect_args = dict(connect_args or {})
        self._engine: AsyncEngine | None = None
        self._write_engine: AsyncEngine | None = None
        self._queue: deque[CallEvent] = deque()
        self._enqueued = 0  # events ever accepted into the queue
        self._settled = 0  # ... and taken out of it (written, or rejected as bad data)
        self._wake = asyncio.Event()  # something was queued
        self._poke = asyncio.Event()  # retry now (a flush is waiting)
        self._progress = asyncio.Event()  # a batch was settled
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down = False  # the last write failed (logged once until it works again)
        self._full = False  # the queue overflowed (logged once until it drains)
        self._record_failed = False
        self.file_recoveries = 0  # SQLite files found deleted or damaged, and started anew
        self._beat: asyncio.Task[None] | None = None
        self._sqlite_file: Path | None = None  # the SQLite file, when the records are one
        self._file_id: tuple[int, int] | None = None  # its (device, inode) once migrated

    # -- opening and closing --------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events queued, not yet written."""
        return len(self._queue)

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)

    async def open(self, *, mark_interrupted: bool = True) -> int:
        """Connect, migrate to head and (unless `mark_interrupted=False`, e.g. for reading)
        mark this instance's calls left `in_progress` as `interrupted`, and those of
        instances whose heartbeat has stopped; returns how many. A serving store then
        beats for this instance and sweeps for dead ones every HEARTBEAT_S.

        Raises RecordsError when the database cannot be reached or migrated."""
        threads_before = set(threading.enumerate())
        try:
            if self._engine is None:
                self._engine = self._create_engine()
                self._write_engine = self._engine.execution_options(ivr_write=True)
                await self._check_integrity()
            await self._migrate()
            count = 0
            if mark_interrupted:
                count = await self._mark_interrupted() + await self.sweep()
                await self.heartbeat()
        except Exception as e:  # unreachable, refused, damaged, an unknown schema revision, a bad URL...
            # Nothing is left running (an aiosqlite thread would print a traceback at exit).
            if self._engine is not None:
                with contextlib.suppress(Exception):
                    await self._engine.dispose()
                self._engine = self._write_engine = None
            await _workers_stopped(threads_before)
            if isinstance(e, RecordsError):
                raise
            raise RecordsError(f"cannot open the call records at {self.redacted_url}: {_reason(e)}") from e
        if self._writer is None:
            self._loop = asyncio.get_running_loop()
            self._writer = self._loop.create_task(self._run_writer(), name="call-records-writer")
            self._writer.add_done_callback(_writer_stopped)
            if self._queue:
                self._wake.set()
        if mark_interrupted and self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(
                self._keep_beating(), name="records-heartbeat"
            )
        return count

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far is written; False if `timeout` ran out first."""
        target = self._enqueued
        if self._settled >= target:
            return True
        if self._writer is None or self._writer.done():
            return False
        self._poke.set()  # cut a retry backoff short
        try:
            async with asyncio.timeout(timeout):
                while self._settled < target:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout`), stop the writer and close the connections."""
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
            self._beat = None
            with contextlib.suppress(Exception):  # gone for good: no need to wait to be declared dead
                await self._leave()
        if self._writer is not None:
            if not await self.flush(timeout):
                log.warning(
                    "call records: %d events not written to %s before shutdown",
                    len(self._queue),
                    self.redacted_url,
                )
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        elif self._queue:
            log.warning("call records: %d events not written (the store was never opened)", len(self._queue))
        if self.dropped:
            log.warning("call records: %d events were not recorded (queue full or bad data)", self.dropped)
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = self._write_engine = None

    async def __aenter__(self) -> CallStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _create_engine(self) -> AsyncEngine:
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite":
            database = url.database or ""
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                self._sqlite_file = Path(database)
            engine = create_async_engine(url, json_serializer=_json_dumps, connect_args=self._connect_args)
            _sqlite_setup(engine)
            return engine
        connect_args = {"timeout": 10, "command_timeout": 30} | self._connect_args
        return create_async_engine(
            url, json_serializer=_json_dumps, pool_pre_ping=True, connect_args=connect_args
        )

    # -- a SQLite file that goes away under a running bridge -------------------------------

    def _file_damage(self) -> str | None:
        """How the SQLite file was lost since it was opened (deleted, replaced, emptied), or
        None. SQLite would go on writing into a deleted file's inode, or fail on an emptied
        one, and every later call would be lost with nothing said. One stat per batch."""
        if self._sqlite_file is None or self._file_id is None:
            return None
        try:
            st = os.stat(self._sqlite_file)
        except FileNotFoundError:
            return "deleted"
        except OSError as e:
            return f"unreadable ({type(e).__name__})"
        if (st.st_dev, st.st_ino) != self._file_id:
            return "replaced"
        if st.st_size == 0:  # a migrated file in WAL mode is never empty
            return "emptied"
        return None

    async def _start_new_file(self, damage: str) -> None:
        """Move what is left of the records file aside, start a new one and write on: the
        queued events go there. Logged, and counted (`file_recoveries`)."""
        assert self._sqlite_file is not None and self._engine is not None
        path = self._sqlite_file
        await self._engine.dispose()
        aside = path.with_name(f"{path.name}.damaged-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if damage != "replaced" and part.exists():
                part.rename(f"{aside}{suffix}")
                moved.append(part.name)
        self.file_recoveries += 1
        log.error(
            "call records: %s was %s under the running bridge; %sstarting a new file there "
            "(calls recorded before this are in the old one)",
            path,
            damage,
            f"moved {', '.join(moved)} to {aside.name}; " if moved else "",
        )
        self._file_id = None
        self._engine = self._create_engine()
        self._write_engine = self._engine.execution_options(ivr_write=True)
        await self._migrate()

    async def _check_integrity(self) -> None:
        """Refuse a damaged SQLite file at start-up with the way out, rather than failing on
        every write later."""
        if (
            self._sqlite_file is None
            or not self._sqlite_file.exists()
            or not self._sqlite_file.stat().st_size
        ):
            return
        assert self._engine is not None
        try:
            async with self._engine.connect() as conn:
                verdict = (await conn.exec_driver_sql("PRAGMA quick_check")).scalar()
        except Exception as e:
            if not _is_damaged_file(e):
                raise
            verdict = _reason(e)
        if verdict != "ok":
            path = self._sqlite_file
            raise RecordsError(
                f"the records file {path} is damaged ({str(verdict)[:120]}). Move it aside and start "
                f"with a new one: mv {path} {path}.damaged (and {path}-wal, {path}-shm if present); "
                f"sqlite3's .recover can read what is left"
            )

    async def _migrate(self) -> None:
        await self._migrate_to_head()
        if self._sqlite_file is not None:
            st = os.stat(self._sqlite_file)
            self._file_id = (st.st_dev, st.st_ino)

    async def _migrate_to_head(self) -> None:
        assert self._engine is not None and self._write_engine is not None
        if self._engine.dialect.name == "sqlite":
            await _sqlite_wal(self._engine)
        async with self._engine.connect() as conn:  # the usual case, without a lock or alembic
            if await conn.run_sync(_schema_revision) == SCHEMA_REVISION:
                return  # (importing alembic logs lines at INFO)

        def upgrade(connection: Connection) -> None:
            if connection.dialect.name == "postgresql":
                # Two instances starting at once: the second waits, then finds the schema at head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            current = _schema_revision(connection)
            if current == SCHEMA_REVISION:
                return  # another instance migrated it while we waited
            from alembic import command
            from alembic.config import Config

            log.info(
                "call records: migrating %s from %s to %s",
                self.redacted_url,
                current or "an empty database",
                SCHEMA_REVISION,
            )
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
            config.attributes["connection"] = connection
            command.upgrade(config, SCHEMA_REVISION)

        async with self._write_engine.begin() as conn:
            await conn.run_sync(upgrade)

    async def _mark_interrupted(self) -> int:
        """This instance has just started: none of its calls is live, so any still
        `in_progress` was cut by a crash (or kill) of this instance."""
        assert self._write_engine is not None
        last_at = select(func.max(events.c.at)).where(events.c.call_sid == calls.c.call_sid)
        last_elapsed = select(func.max(events.c.elapsed)).where(events.c.call_sid == calls.c.call_sid)
        stmt = (
            update(calls)
            .where(calls.c.instance_id == self.instance_id, calls.c.outcome == IN_PROGRESS)
            .values(
                outcome=INTERRUPTED,
                ended_at=func.coalesce(last_at.scalar_subquery(), literal(datetime.now(UTC), UTCDateTime())),
                duration_s=last_elapsed.scalar_subquery(),
            )
        )
        async with self._write_engine.begin() as conn:
            count = (await conn.execute(stmt)).rowcount
        if count:
            log.warning(
                "call records: %d call(s) of instance %s were in progress when it last stopped; "
                "marked interrupted",
                count,
                self.instance_id,
            )
        return count

    # -- writing ------------------------------------------------------------------------

    def record(self, event: CallEvent) -> None:
        """Queue a call event for the database. Never blocks, never raises; may be called
        before `open()` (the writer starts there) and from another thread."""
        try:
            if not isinstance(event, CallEvent):
                raise TypeError(f"not a CallEvent: {type(event).__name__}")
            if len(self._queue) >= self.max_queue:
                self.dropped += 1
                if not self._full:
                    self._full = True
                    log.error(
                        "call records: %d events waiting for %s; dropping new events until it catches up",
                        len(self._queue),
                        self.redacted_url,
                    )
                return
            self._queue.append(event)
            self._enqueued += 1
        except Exception:
            self.dropped += 1
            if not self._record_failed:
                self._record_failed = True
                log.exception("call records: could not queue an event")
            return
        with contextlib.suppress(Exception):  # e.g. the loop is closed: close() says what is left
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if self._loop is None or running is self._loop:
                self._wake.set()
            else:  # called from another thread
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _run_writer(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < BATCH_MAX and not self._poke.is_set():  # a flush does not wait
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(GATHER_S):
                        await self._poke.wait()
            batch = list(islice(self._queue, BATCH_MAX))
            self._poke.clear()  # a flush from now on asks for another attempt
            try:
                damage = self._file_damage()
                if damage is not None:
                    await self._start_new_file(damage)
                await self._write_batch(batch)
            except Exception as e:
                if _is_damaged_file(e) and self._sqlite_file is not None:
                    with contextlib.suppress(Exception):  # if not, the retries go on
                        await self._start_new_file(f"damaged ({_reason(e)})")
                        continue
                self.write_failures += 1
                if not self._down:
                    self._down = True
                    log.warning(
                        "call records: cannot write to %s (%s); keeping events queued (%d) and retrying",
                        self.redacted_url,
                        _reason(e),
                        len(self._queue),
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._poke.wait()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            for _ in batch:
                self._queue.popleft()
            self._settled += len(batch)
            self._progress.set()
            delay = RETRY_FIRST_S
            if self._down:
                self._down = False
                log.warning("call records: writing to %s again", self.redacted_url)
            if self._full and len(self._queue) < self.max_queue // 2:
                self._full = False

    async def _write_batch(self, batch: list[CallEvent]) -> None:
        try:
            await self._write(batch)
        except Exception as e:
            if not _is_bad_data(e):
                raise
            # One event the database will never take must not hold up the others.
            for one in batch:
                try:
                    await self._write([one])
                except Exception as e1:
                    if not _is_bad_data(e1):
                        raise
                    self.dropped += 1
                    self._rejected += 1
                    if self._rejected <= REJECTED_LOG_LIMIT:
                        log.error(
                            "call records: event %s #%s of call %s rejected: %s%s",
                            getattr(one, "type", "?"),
                            getattr(one, "seq", "?"),
                            getattr(one, "call_sid", "?"),
                            _reason(e1),
                            "; more are only counted" if self._rejected == REJECTED_LOG_LIMIT else "",
                        )

    async def _write(self, batch: Iterable[CallEvent]) -> None:
        assert self._write_engine is not None
        # Keyed, so that an event queued twice (a retry) is one row: PostgreSQL refuses to
        # upsert a row twice in one statement.
        started: dict[str, dict[str, Any]] = {}
        ended: dict[str, dict[str, Any]] = {}
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        for ev in batch:
            if (ev.call_sid, ev.seq) in rows:
                continue
            at = datetime.fromtimestamp(ev.at, UTC)
            data = ev.data if isinstance(ev.data, dict) else {"value": ev.data}
            rows[ev.call_sid, ev.seq] = {
                "call_sid": ev.call_sid,
                "seq": ev.seq,
                "type": ev.type,
                "at": at,
                "elapsed": float(ev.elapsed),
                "data": data,
                "event_id": ev.id,
            }
            if ev.type == "call.started":
                started.setdefault(ev.call_sid, self._started_row(ev.call_sid, at, data))
            elif ev.type == "call.ended":
                ended[ev.call_sid] = self._ended_row(ev.call_sid, at, float(ev.elapsed), data)
        insert = postgresql.insert if self._write_engine.dialect.name == "postgresql" else sqlite.insert
        async with self._write_engine.begin() as conn:
            if started:
                await conn.execute(
                    insert(calls).on_conflict_do_nothing(index_elements=["call_sid"]), list(started.values())
                )
            if rows:
                await conn.execute(
                    insert(events).on_conflict_do_nothing(index_elements=["call_sid", "seq"]),
                    list(rows.values()),
                )
            if ended:
                stmt = insert(calls)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["call_sid"], set_={c: stmt.excluded[c] for c in _END_COLUMNS}
                )
                await conn.execute(stmt, list(ended.values()))

    def _started_row(self, call_sid: str, at: datetime, data: dict[str, Any]) -> dict[str, Any]:
        params = data.get("custom_parameters")
        return {
            "call_sid": call_sid,
            "stream_sid": _text(data.get("stream_sid")),
            "account_sid": _text(data.get("account_sid")),
            "from_number": _text(data.get("from")),
            "to_number": _text(data.get("to")),
            "custom_parameters": params if isinstance(params, dict) else {},
            "provider": _text(data.get("provider")),
            "instance_id": self.instance_id,
            "started_at": at,
            "outcome": IN_PROGRESS,
        }

    def _ended_row(self, call_sid: str, at: datetime, elapsed: float, data: dict[str, Any]) -> dict[str, Any]:
        duration = _number(data.get("duration_s"))
        started_at = datetime.fromtimestamp(at.timestamp() - (duration or elapsed), UTC)
        return {
            "call_sid": call_sid,
            "stream_sid": None,
            "account_sid": None,
            "from_number": None,
            "to_number": None,
            "custom_parameters": {},
            "provider": None,
            "instance_id": self.instance_id,
            "started_at": started_at,  # used only when the call.started row is missing
            "outcome": _text(data.get("outcome")) or "ended",
            "ended_at": at,
            "duration_s": duration if duration is not None else elapsed,
            "turns": _integer(data.get("turns")),
            "barge_ins": _integer(data.get("barge_ins")),
            "emotions": data.get("emotions") if isinstance(data.get("emotions"), dict) else {},
            "latency": data.get("latency") if isinstance(data.get("latency"), dict) else {},
            "transfer_to": _text(data.get("transfer_to")) or None,
            "fallback": _text(data.get("fallback")) or None,
            "end_data": data,
        }

    # -- instances: heartbeats, and the calls of the dead --------------------------------

    async def heartbeat(self) -> None:
        """This instance is alive (an upsert of its row)."""
        engine = self._writer_engine()
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        now = datetime.now(UTC)
        stmt = insert(instances).values(instance_id=self.instance_id, started_at=now, heartbeat_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=["instance_id"], set_={"heartbeat_at": now})
        async with engine.begin() as conn:
            await conn.execute(stmt)

    async def sweep(self, stale_s: float | None = None) -> int:
        """Mark the calls of instances silent for `stale_s` (default: STALE_BEATS heartbeats)
        as `interrupted`, and forget those instances; returns how many calls. Several
        survivors may sweep at once: each call is updated by the first only."""
        stale_s = self.heartbeat_s * STALE_BEATS if stale_s is None else stale_s
        engine = self._writer_engine()
        cutoff = datetime.now(UTC) - timedelta(seconds=stale_s)
        dead = select(instances.c.instance_id).where(
            instances.c.heartbeat_at < cutoff, instances.c.instance_id != self.instance_id
        )
        last_at = select(func.max(events.c.at)).where(events.c.call_sid == calls.c.call_sid)
        last_elapsed = select(func.max(events.c.elapsed)).where(events.c.call_sid == calls.c.call_sid)
        async with engine.begin() as conn:
            names = list((await conn.execute(dead)).scalars())
            if not names:
                return 0
            count = (
                await conn.execute(
                    update(calls)
                    .where(calls.c.instance_id.in_(names), calls.c.outcome == IN_PROGRESS)
                    .values(
                        outcome=INTERRUPTED,
                        ended_at=func.coalesce(last_at.scalar_subquery(), literal(cutoff, UTCDateTime())),
                        duration_s=last_elapsed.scalar_subquery(),
                    )
                )
            ).rowcount
            await conn.execute(instances.delete().where(instances.c.instance_id.in_(names)))
        if count:
            log.warning(
                "call records: instance(s) %s stopped beating %.0f s ago or more; marked their %d call(s) "
                "in progress as interrupted",
                ", ".join(names),
                stale_s,
                count,
            )
        return count

    async def _leave(self) -> None:
        engine = self._writer_engine()
        async with engine.begin() as conn:
            await conn.execute(instances.delete().where(instances.c.instance_id == self.instance_id))

    async def _keep_beating(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
                await self.sweep()
            except Exception as e:  # the database away: the writer reports it; beat again later
                log.debug("call records: heartbeat failed: %s", _reason(e))

    # -- call control claims ------------------------------------------------------------

    async def claim_control(
        self, call_sid: str, action: str, target: str, source: str
    ) -> dict[str, Any] | None:
        """Claim the one transfer or hang-up of a call for this instance, atomically across
        every instance sharing the database: None if claimed now, else the claim already
        made (`action`, `target`, `instance_id`, `result` when done). Raises on a database
        error."""
        engine = self._writer_engine()
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        row = {
            "call_sid": call_sid,
            "action": action,
            "target": target,
            "source": source,
            "instance_id": self.instance_id,
            "claimed_at": datetime.now(UTC),
        }
        async with engine.begin() as conn:
            inserted = await conn.execute(
                insert(controls).on_conflict_do_nothing(index_elements=["call_sid"]), row
            )
            if inserted.rowcount == 1:
                return None
            found = (
                (await conn.execute(select(controls).where(controls.c.call_sid == call_sid)))
                .mappings()
                .first()
            )
        return dict(found) if found is not None else None

    async def control_claim(self, call_sid: str) -> dict[str, Any] | None:
        async with self._reader().connect() as conn:
            found = (
                (await conn.execute(select(controls).where(controls.c.call_sid == call_sid)))
                .mappings()
                .first()
            )
        return dict(found) if found is not None else None

    async def settle_control(self, call_sid: str, result: dict[str, Any] | None) -> None:
        """Record the claimed action's answer; None gives the claim up (it failed: a later
        request may try again)."""
        engine = self._writer_engine()
        async with engine.begin() as conn:
            if result is None:
                await conn.execute(
                    controls.delete().where(controls.c.call_sid == call_sid, controls.c.result.is_(None))
                )
            else:
                await conn.execute(
                    update(controls).where(controls.c.call_sid == call_sid).values(result=result)
                )

    def _writer_engine(self) -> AsyncEngine:
        if self._write_engine is None:
            raise RecordsError("the call store is not open")
        return self._write_engine

    # -- reading ------------------------------------------------------------------------

    def _reader(self) -> AsyncEngine:
        if self._engine is None:
            raise RecordsError("the call store is not open")
        return self._engine

    async def get(self, call_sid: str) -> dict[str, Any] | None:
        """The call's row with its `events` (in order) and `transcript`; None if unknown."""
        async with self._reader().connect() as conn:
            row = (await conn.execute(select(calls).where(calls.c.call_sid == call_sid))).mappings().first()
            if row is None:
                return None
            rows = (
                await conn.execute(select(events).where(events.c.call_sid == call_sid).order_by(events.c.seq))
            ).mappings()
            return _full_record(row, [_event_dict(r) for r in rows])

    async def list_calls(
        self,
        since: datetime | None = None,
        limit: int | None = 50,
        outcome: str | None = None,
        *,
        until: datetime | None = None,
        number: str | None = None,
    ) -> list[dict[str, Any]]:
        """Calls started in [`since`, `until`), newest first, without their events;
        `number` finds calls from or to a number containing it."""
        stmt = _where(
            select(calls).order_by(calls.c.started_at.desc(), calls.c.call_sid.desc()),
            since=since,
            until=until,
            outcome=outcome,
            number=number,
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        async with self._reader().connect() as conn:
            return [dict(row) for row in (await conn.execute(stmt)).mappings()]

    async def export(
        self,
        since: datetime | None = None,
        *,
        until: datetime | None = None,
        outcome: str | None = None,
        number: str | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Full records (as `get` returns them), oldest first, streamed from the database;
        filtered as `list_calls` is."""
        ev = [c.label(f"ev_{c.name}") for c in events.c if c.name != "call_sid"]
        stmt = (
            select(calls, *ev)
            .select_from(calls.outerjoin(events, events.c.call_sid == calls.c.call_sid))
            .order_by(calls.c.started_at, calls.c.call_sid, events.c.seq)
            .execution_options(yield_per=500)
        )
        stmt = _where(stmt, since=since, until=until, outcome=outcome, number=number)
        call_columns = [c.name for c in calls.c]
        async with self._reader().connect() as conn:
            result = await conn.stream(stmt)
            current: dict[str, Any] | None = None
            call_events: list[dict[str, Any]] = []
            async for row in result.mappings():
                if current is None or row["call_sid"] != current["call_sid"]:
                    if current is not None:
                        yield _full_record(current, call_events)
                    current = {name: row[name] for name in call_columns}
                    call_events = []
                if row["ev_seq"] is not None:
                    call_events.append(
                        _event_dict({c.name: row[f"ev_{c.name}"] for c in events.c if c.name != "call_sid"})
                    )
            if current is not None:
                yield _full_record(current, call_events)


# -- helpers ------------------------------------------------------------------------------


def _where(
    stmt: Select[Any],
    *,
    since: datetime | None,
    until: datetime | None,
    outcome: str | None,
    number: str | None,
) -> Select[Any]:
    if since is not None:
        stmt = stmt.where(calls.c.started_at >= since)
    if until is not None:
        stmt = stmt.where(calls.c.started_at < until)
    if outcome:
        stmt = stmt.where(calls.c.outcome == outcome)
    if number:
        # A plain substring: the pattern characters a caller might type are taken literally.
        pattern = "%" + number.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        stmt = stmt.where(
            or_(calls.c.from_number.like(pattern, escape="\\"), calls.c.to_number.like(pattern, escape="\\"))
        )
    return stmt


def _writer_stopped(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("call records: the writer stopped; no more events are written", exc_info=task.exception())


def _sqlite_setup(engine: AsyncEngine) -> None:
    """Real transactions: pysqlite's own handling runs DDL outside any transaction, so a
    migration would not be atomic. Writes take the write lock at BEGIN (IMMEDIATE), so two
    writers queue on the busy timeout instead of failing on a lock upgrade. (WAL, a mode of
    the file, is set once by `_sqlite_wal`.)"""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we say BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # in WAL: durable across a crash of the process
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ivr_write") else "BEGIN")


async def _sqlite_wal(engine: AsyncEngine) -> None:
    """Put the file in WAL mode (readers never block the writer). Switching takes a lock the
    busy timeout does not wait for, so a store starting beside another retries."""

    def wal(connection: Connection) -> str:
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("PRAGMA journal_mode")
            if cursor.fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
                return str(cursor.fetchone()[0])
            return "wal"
        finally:
            cursor.close()

    for attempt in range(100):
        try:
            async with engine.connect() as conn:
                await conn.run_sync(wal)
            return
        except (exc.OperationalError, sqlite3.OperationalError) as e:  # the raw cursor's is not wrapped
            if "locked" not in str(e) or attempt == 99:
                raise
            await asyncio.sleep(0.05)


def _schema_revision(connection: Connection) -> str | None:
    """The alembic revision the database is at (None: not migrated yet)."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    versions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    return versions[0] if len(versions) == 1 else ",".join(sorted(versions)) or None


_TERMINAL_CONTROL = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _json_dumps(value: Any) -> str:
    """JSON the database takes: anything unknown as its str(), no NaN or infinity (JSONB
    rejects them), no NUL characters (PostgreSQL rejects them)."""
    try:
        out = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:  # NaN/infinity, or a reference cycle
        out = json.dumps(_clean(value), ensure_ascii=False, allow_nan=False, default=str)
    return _NUL_ESCAPE.sub(r"\1", out) if "\\u0000" in out else out


def _clean(value: Any, depth: int = 0) -> Any:
    if depth > 50:
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, depth + 1) for v in value]
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).replace("\x00", "")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _is_bad_data(e: BaseException) -> bool:
    """The trouble is with this data (as opposed to: the database is unreachable or down)."""
    if isinstance(e, exc.DataError | exc.IntegrityError):
        return True  # the database rejects a value
    sqlstate = str(getattr(getattr(e, "orig", None), "sqlstate", None) or "")
    if sqlstate[:2] in ("22", "23"):  # PostgreSQL's data exception, integrity constraint violation
        return True
    if isinstance(e, exc.DBAPIError | OSError | TimeoutError):
        return False  # connection lost or refused, server errors, timeouts
    if isinstance(e, exc.SQLAlchemyError):
        return isinstance(e, exc.StatementError)  # e.g. a value the driver cannot bind
    return True  # Python could not turn the event into rows


def _is_damaged_file(e: BaseException) -> bool:
    """A SQLite error that says the file itself is no longer a sound database."""
    text = str(getattr(e, "orig", None) or e)
    return isinstance(getattr(e, "orig", e), sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "disk I/O error" in text
    )


def _reason(e: BaseException) -> str:
    """One short line about an error, without the SQL or its parameters."""
    orig = getattr(e, "orig", None) or e
    message = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    if len(message) > 200:
        message = message[:200] + "..."
    return f"{type(orig).__name__}: {message}" if message else type(orig).__name__


def _event_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "seq": row["seq"],
        "type": row["type"],
        "at": row["at"],
        "elapsed": row["elapsed"],
        "data": row["data"],
        "id": row["event_id"],
    }


def _full_record(row: Mapping[str, Any], call_events: list[dict[str, Any]]) -> dict[str, Any]:
    record = dict(row)
    record["events"] = call_events
    record["transcript"] = [
        {**e["data"], "elapsed": e["elapsed"]} for e in call_events if e["type"] == "transcript"
    ]
    return record


def record_json(value: Any, indent: int | None = None) -> str:
    """A record (from get/export), or a list of them, as JSON with times in ISO 8601 UTC;
    one line unless `indent` is given."""
    separators = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(value, ensure_ascii=False, default=_json_default, indent=indent, separators=separators)
    # JSON escapes C0 controls itself; DEL, C1 and bidi controls from callers' data would
    # still reach a terminal raw. They occur only inside strings, where \uXXXX is the same.
    return _TERMINAL_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)
