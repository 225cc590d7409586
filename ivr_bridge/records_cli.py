"""The `ivr-bridge calls` subcommand: read the call records.

    ivr-bridge calls list [--since WHEN] [--limit N] [--outcome O] [--json]
    ivr-bridge calls show CALL_SID [--json]
    ivr-bridge calls export [--since WHEN]        # JSON lines, one full record per line

WHEN is an ISO date or time (UTC unless it carries an offset: 2026-11-20, 2026-11-20T10:00)
or an age (30m, 2h, 7d). The database is the server's: IVR_DATABASE_URL or IVR_DATABASE_PATH.
Exit codes: 0 done, 1 no such call or the records cannot be read, 2 a bad setting or option.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ivr_bridge.logs import escape
from ivr_bridge.records import CallStore, RecordsError, record_json
from ivr_bridge.settings import Settings, SettingsError, redact_url

NOT_FOUND = 1
USAGE_ERROR = 2
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_LIMIT = 1_000_000  # SQL LIMIT is a 64-bit integer; nobody reads a million rows on a terminal


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `calls` (list, show, export) to the `ivr-bridge` subcommands."""
    calls = commands.add_parser(
        "calls",
        help="list, show and export the call records",
        description="Read the call records in the bridge's database (IVR_DATABASE_URL, or the "
        "SQLite file IVR_DATABASE_PATH). WHEN is an ISO date/time, UTC unless it has an offset "
        "(2026-11-20, 2026-11-20T10:00), or an age (30m, 2h, 7d).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    what = calls.add_subparsers(dest="calls_command", required=True, metavar="{list,show,export}")

    p = what.add_parser("list", parents=[common], help="the latest calls, newest first")
    p.add_argument("--since", type=_when_argument, metavar="WHEN", help="calls started since then")
    p.add_argument("--limit", type=_limit, default=50, help="at most this many calls (default 50)")
    p.add_argument("--outcome", help="only calls with this outcome (e.g. completed, interrupted)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=list_command)

    p = what.add_parser("show", parents=[common], help="one call: its details and timeline")
    p.add_argument("call_sid", metavar="CALL_SID")
    p.add_argument("--json", action="store_true", help="print the full record as JSON")
    p.set_defaults(func=show_command)

    p = what.add_parser("export", parents=[common], help="full records as JSON lines, oldest first")
    p.add_argument("--since", type=_when_argument, metavar="WHEN", help="calls started since then")
    p.set_defaults(func=export_command)


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """`2026-11-20`, `2026-11-20T10:00` (UTC unless an offset is given), or an age before
    `now` (`30m`, `2h`, `7d`, also `s` and `w`) -> an aware UTC datetime. Raises ValueError."""
    try:
        age = _AGE.match(text)
        if age:
            return (now or datetime.now(UTC)) - timedelta(**{_UNITS[age[2].lower()]: float(age[1])})
        when = datetime.fromisoformat(text.strip())
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: an age or offset beyond year 1..9999
        raise ValueError(
            f"expected an ISO date or time (2026-11-20, 2026-11-20T10:00) or an age (30m, 2h, 7d) "
            f"within years 1 to 9999, got {escape(text[:60])!r}"
        ) from None


def _when_argument(text: str) -> datetime:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> int:
    if not text.strip().isdecimal() or not text.strip().isascii() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_LIMIT}, got {escape(text[:30])!r}"
        )
    return int(text)


# -- the commands --------------------------------------------------------------------------


def list_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    async def run(store: CallStore) -> int:
        rows = await store.list_calls(since=args.since, limit=args.limit, outcome=args.outcome)
        print(record_json(rows, indent=2) if args.json else calls_table(rows), file=out or sys.stdout)
        return 0

    return _with_store(run)


def show_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    async def run(store: CallStore) -> int:
        record = await store.get(args.call_sid)
        if record is None:
            print(f"ivr-bridge: no call {escape(args.call_sid)!r} on record", file=sys.stderr)
            return NOT_FOUND
        print(record_json(record, indent=2) if args.json else call_text(record), file=out or sys.stdout)
        return 0

    return _with_store(run)


def export_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    async def run(store: CallStore) -> int:
        stream = out or sys.stdout
        async for record in store.export(since=args.since):
            stream.write(record_json(record) + "\n")
        stream.flush()
        return 0

    return _with_store(run)


def _with_store(work: Callable[[CallStore], Coroutine[Any, Any, int]]) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ivr-bridge: {exc}", file=sys.stderr)
        return USAGE_ERROR
    url = make_url(settings.database)
    sqlite_file = url.database if url.get_backend_name() == "sqlite" else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).is_file():
        # Reading must not leave an empty database behind (e.g. in the wrong folder).
        print(
            f"ivr-bridge: no call records at {sqlite_file} (set IVR_DATABASE_PATH or IVR_DATABASE_URL)",
            file=sys.stderr,
        )
        return NOT_FOUND

    async def run() -> int:
        store = CallStore(settings.database, settings.instance_id)
        try:
            await store.open(mark_interrupted=False)  # a reader must not end the server's calls
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except BrokenPipeError:  # e.g. `ivr-bridge calls export | head`
        sys.stdout = open("/dev/null", "w")  # noqa: SIM115 (no "Exception ignored" at exit)
        return 0
    except RecordsError as exc:
        print(f"ivr-bridge: {exc}", file=sys.stderr)
        return NOT_FOUND
    except (SQLAlchemyError, OSError) as exc:
        where = redact_url(settings.database)
        print(f"ivr-bridge: cannot read the call records at {where}: {type(exc).__name__}", file=sys.stderr)
        return NOT_FOUND


# -- the readable forms ----------------------------------------------------------------------


def calls_table(rows: list[Mapping[str, Any]]) -> str:
    """The compact aligned table of `calls list`."""
    if not rows:
        return "no calls"
    header = ("STARTED (UTC)", "CALL SID", "FROM", "TO", "DURATION", "OUTCOME", "TURNS")
    lines = [header] + [
        (
            _time(row["started_at"]),
            row["call_sid"],
            row["from_number"] or "-",
            row["to_number"] or "-",
            _clock(row["duration_s"]),
            row["outcome"],
            "-" if row["turns"] is None else str(row["turns"]),
        )
        for row in rows
    ]
    lines = [tuple(escape(cell) for cell in line) for line in lines]  # stored text came from callers
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {4, 6}  # numbers right-aligned

    def aligned(line: tuple[str, ...]) -> str:
        cells = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join(aligned(line) for line in lines)


def call_text(record: Mapping[str, Any]) -> str:
    """The header block and the timeline of `calls show`."""
    fields: list[tuple[str, str]] = [
        ("call", record["call_sid"]),
        ("stream", record.get("stream_sid") or "-"),
        ("from", record.get("from_number") or "-"),
        ("to", record.get("to_number") or "-"),
        ("instance", record.get("instance_id") or "-"),
        ("provider", record.get("provider") or "-"),
        ("started", _time(record.get("started_at"), decimals=3) + " UTC"),
        ("ended", (_time(record.get("ended_at"), decimals=3) + " UTC") if record.get("ended_at") else "-"),
        ("duration", _seconds(record.get("duration_s"))),
        ("outcome", record["outcome"]),
    ]
    if record.get("turns") is not None or record.get("barge_ins") is not None:
        fields.append(("turns", f"{record.get('turns') or 0}, barge-ins {record.get('barge_ins') or 0}"))
    if record.get("transfer_to"):
        fields.append(("transfer to", record["transfer_to"]))
    if record.get("fallback"):
        fields.append(("fallback", record["fallback"]))
    for name, stats in (record.get("latency") or {}).items():
        if isinstance(stats, dict) and stats.get("count"):
            figures = ", ".join(f"{k} {_ms(stats[k])}" for k in ("p50", "p95", "max") if k in stats)
            fields.append((f"{name.removesuffix('_ms')} latency", f"{figures} ({stats['count']})"))
    emotions = record.get("emotions") or {}
    if emotions:
        ranked = sorted(emotions.items(), key=lambda kv: (-_num(kv[1]), kv[0]))
        fields.append(("emotions", ", ".join(f"{name} {count}" for name, count in ranked)))
    params = record.get("custom_parameters") or {}
    if params:
        fields.append(("parameters", ", ".join(f"{k}={v}" for k, v in sorted(params.items()))))
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields]

    call_events = record.get("events") or []
    has_dtmf = any(e["type"] == "dtmf" for e in call_events)
    lines.append("")
    lines.append("timeline (seconds since the stream started)")
    for e in call_events:
        line = _event_line(e["type"], e.get("data") or {}, has_dtmf)
        if line is not None:
            lines.append(f"{_num(e['elapsed']):8.2f}  {line}")
    if not call_events:
        lines.append("  (no events)")
    return "\n".join(escape(line) for line in lines)  # stored text came from callers


def _event_line(kind: str, data: Mapping[str, Any], has_dtmf: bool) -> str | None:
    if kind == "transcript":
        role = data.get("role")
        if role == "user":
            return f"user: {data.get('text', '')}"
        if role == "assistant":
            if data.get("interrupted"):
                heard = data.get("heard_text") or ""
                return f"bot (cut at {_num(data.get('heard_ms')) / 1000:.1f} s): {heard}…"
            return f"bot: {data.get('text', '')}"
        if role == "dtmf" and has_dtmf:
            return None  # the dtmf event says it, with its action
        return f"{role}: {data.get('text', '')}"
    if kind == "emotion":
        top = data.get("top") or []
        return "emotion: " + ", ".join(
            f"{t.get('name')} {_num(t.get('score')):.2f}" for t in top if isinstance(t, dict)
        )
    if kind == "dtmf":
        action = data.get("action")
        return f"dtmf {data.get('digit', '?')}" + (f" -> {action}" if action else " (not mapped)")
    if kind == "barge_in":
        text = f"barge-in: caller spoke over the bot after {_num(data.get('heard_ms')) / 1000:.1f} s"
        if data.get("dropped_ms"):
            text += f", {_num(data.get('dropped_ms')) / 1000:.1f} s of reply dropped"
        return text + (f" ({data['reason']})" if data.get("reason") else "")
    if kind == "control":
        action = data.get("action", "?")
        text = f"control: {action}" + (f" to {data['to']}" if data.get("to") else "")
        text += f" (from {data['source']})" if data.get("source") else ""
        return text + (f": {data['result']}" if data.get("result") else "")
    if kind == "upstream.error":
        text = f"voice API error {data.get('code', '?')}: {data.get('message', '')}".rstrip(": ")
        return text + (" (retrying)" if data.get("retrying") else "")
    if kind == "call.started":
        return f"call started: {data.get('from') or '?'} -> {data.get('to') or '?'}"
    if kind == "call.ended":
        text = f"call ended: {data.get('outcome', '?')}"
        return text + (f", transferred to {data['transfer_to']}" if data.get("transfer_to") else "")
    return f"{kind}: {json.dumps(data, ensure_ascii=False, default=str)}"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _time(value: datetime | None, decimals: int = 0) -> str:
    """`2026-11-20 10:00:03` (UTC), with `decimals` digits of the second."""
    if value is None:
        return "-"
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%d %H:%M:%S")
    return text + f".{value.microsecond // 10 ** (6 - decimals):0{decimals}d}" if decimals else text


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s ({_clock(seconds)})"


def _ms(value: Any) -> str:
    return f"{_num(value):.0f} ms"


def main(argv: list[str] | None = None) -> int:
    """`python -m ivr_bridge.records_cli calls ...` (the same as `ivr-bridge calls ...`)."""
    parser = argparse.ArgumentParser(prog="ivr-bridge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
