"""The `ivr-bridge call` and `ivr-bridge loadtest` subcommands.

Exit codes: 0 every call completed, 1 a call failed, 2 a usage error (bad scenario or
option, or the webhook failing before any call began).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ivr_bridge.event_loop import run
from ivr_bridge.loadgen.scenario import Scenario, ScenarioError, load_scenario, one_turn
from ivr_bridge.loadgen.webhook import CallDetails, WebhookError

USAGE_ERROR = 2


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `call` and `loadtest` to the `ivr-bridge` subcommands."""
    p = commands.add_parser(
        "call",
        help="place one scripted call through a bridge, as Twilio would, and report its timings",
        description="POST Twilio's voice webhook, stream the call the TwiML connects to, run a "
        "scenario (or say one WAV and wait for the reply), and report latencies.",
    )
    _common_arguments(p)
    p.add_argument("--out", type=Path, metavar="FILE.wav", help="write the bot audio the caller heard")
    p.set_defaults(func=_call)

    p = commands.add_parser(
        "loadtest",
        help="run many scripted calls at once and report latency percentiles",
        description="Run N scripted calls, at most C at once, the first C started evenly over "
        "--ramp seconds; report p50/p95/p99/max latencies, failures and protocol violations.",
    )
    _common_arguments(p)
    p.add_argument("--calls", type=_positive_int, default=10, help="calls in total (default 10)")
    p.add_argument("--concurrency", type=_positive_int, default=10, help="calls at once (default 10)")
    p.add_argument("--ramp", type=_seconds, default=0.0, metavar="SECONDS", help="start spread (default 0)")
    p.add_argument("--histogram", type=Path, metavar="FILE.html", help="write latency histograms")
    p.add_argument("--timeline", type=Path, metavar="FILE", help="write each call's timeline as JSON lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_loadtest)


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "webhook_url", metavar="WEBHOOK_URL", help="the bridge's voice webhook, e.g. http://host/twiml"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--scenario", type=Path, metavar="FILE.json", help="scenario to run")
    what.add_argument("--audio", type=Path, metavar="FILE.wav", help="say this, wait for the reply, hang up")
    p.add_argument("--from", dest="from_number", default="+15550100001", help="caller's number")
    p.add_argument("--to", dest="to_number", default="+15550100002", help="number called")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN") or None,
        help="sign requests as Twilio does (default: $TWILIO_AUTH_TOKEN)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _run_details(plan: Any, summary: dict[str, Any], argv: list[str]) -> dict[str, object]:
    """What a load test's figures came from: the command, its settings and the machine."""
    import platform
    import shlex

    calls = summary["calls"]
    generator = summary["generator"]
    return {
        "command": shlex.join(["ivr-bridge", *argv]),
        "webhook": plan.webhook_url,
        "scenario": plan.scenario.name,
        "calls": f"{calls['total']} in all, {plan.concurrency} at once, ramp {plan.ramp_s:g} s",
        "outcome": f"{calls['ok']} completed, {calls['failed']} failed",
        "generator": f"{generator['wall_s']:.1f} s wall, {generator['cpu_percent']:.0f} % CPU"
        + (" (slow: its own send lateness is in the figures)" if generator["slow"] else ""),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _fail(message: str) -> int:
    print(f"ivr-bridge: {message}", file=sys.stderr)
    return USAGE_ERROR


def _scenario(args: argparse.Namespace) -> Scenario:
    return load_scenario(args.scenario) if args.scenario is not None else one_turn(args.audio)


def _call(args: argparse.Namespace) -> int:
    from ivr_bridge.loadgen.report import call_json, call_text
    from ivr_bridge.loadgen.scripted_call import heard_wav, place_call
    from ivr_bridge.loadgen.webhook import fetch_stream

    try:
        scenario = _scenario(args)
    except ScenarioError as exc:
        return _fail(str(exc))
    details = CallDetails(from_number=args.from_number, to_number=args.to_number)

    async def call() -> Any:
        target = await fetch_stream(args.webhook_url, details, args.auth_token)
        return await place_call(args.webhook_url, scenario, details, args.auth_token, target=target)

    try:
        report, caller = run(call())
    except WebhookError as exc:
        return _fail(str(exc))
    print(json.dumps(call_json(report)) if args.json else call_text(report))
    if args.out is not None and caller is not None:
        try:
            args.out.write_bytes(heard_wav(caller))
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
    return 0 if report.ok else 1


def _loadtest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ivr_bridge.loadgen.histogram import histogram_page
    from ivr_bridge.loadgen.loadtest import LoadPlan, Progress, latency_samples, run_load, summarize_load
    from ivr_bridge.loadgen.report import load_text
    from ivr_bridge.loadgen.timeline_file import timeline_record

    try:
        scenario = _scenario(args)
    except ScenarioError as exc:
        return _fail(str(exc))
    plan = LoadPlan(
        args.webhook_url,
        scenario,
        calls=args.calls,
        concurrency=args.concurrency,
        ramp_s=args.ramp,
        from_number=args.from_number,
        to_number=args.to_number,
        auth_token=args.auth_token,
    )
    bar = tqdm(
        total=plan.calls,
        unit="call",
        file=sys.stderr,
        disable=args.no_progress or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )

    def progress(p: Progress) -> None:
        bar.set_postfix({"ok": p.ok, "failed": p.failed, "active": p.active}, refresh=False)
        bar.update(p.done - bar.n)

    try:
        result = run(run_load(plan, on_progress=progress, keep_timelines=args.timeline is not None))
    except WebhookError as exc:
        return _fail(str(exc))
    finally:
        bar.close()
    summary = summarize_load(result)
    print(json.dumps(summary) if args.json else load_text(summary))
    try:
        if args.histogram is not None:
            title = (
                f"ivr-bridge loadtest: {scenario.name}, {plan.calls} calls, concurrency {plan.concurrency}"
            )
            page = histogram_page(
                title,
                latency_samples(result),
                run=_run_details(plan, summary, getattr(args, "argv", sys.argv[1:])),
                failures=summary["failures"],
            )
            args.histogram.write_text(page, encoding="utf-8")
        if args.timeline is not None:
            with args.timeline.open("w", encoding="utf-8") as out:
                for report, timeline in zip(result.reports, result.timelines, strict=True):
                    out.write(json.dumps(timeline_record(report, timeline)) + "\n")
    except OSError as exc:
        return _fail(f"cannot write {exc.filename}: {exc.strerror or exc}")
    return 0 if summary["calls"]["failed"] == 0 else 1
