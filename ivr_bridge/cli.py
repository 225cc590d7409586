"""The `ivr-bridge` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import logging
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

from ivr_bridge import logs
from ivr_bridge.settings import Settings, SettingsError

log = logging.getLogger("ivr_bridge")


def serve(args: argparse.Namespace) -> int:
    # Unset, the public URL is where this server listens: right for trying it locally.
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    unknown: list[str] = []
    try:
        settings = Settings.from_env(default_public_url=f"http://{host}:{args.port}", unknown=unknown)
    except SettingsError as exc:
        print(f"ivr-bridge: {logs.escape(str(exc))}", file=sys.stderr)
        return 2
    run_token = ""
    if settings.development_mode and not settings.api_token and settings.log_format == "text":
        # Trying it out on a console: the dashboard works at once, with a token for this
        # run only (printed below, never logged; the redactor knows it).
        run_token = secrets.token_urlsafe(18)
        settings = dataclasses.replace(settings, api_token=run_token)
    logs.configure(args.log_level, settings.secret_values(), settings.log_format)
    log.info("ivr-bridge %s; %s", version(), settings.summary())
    for warning in unknown:
        log.warning("%s", warning)

    from ivr_bridge.app import create_app
    from ivr_bridge.audio import resample
    from ivr_bridge.connections import check_descriptor_limit
    from ivr_bridge.records import CallStore, RecordsError
    from ivr_bridge.server import BridgeServer, server_config

    async def open_records() -> None:
        # Before serving: a database that cannot be reached is one clear line, not a traceback.
        async with CallStore(settings.database, settings.instance_id, heartbeat_s=settings.heartbeat_s):
            pass  # opened: migrated, and calls a crash of this instance cut marked interrupted

    try:
        asyncio.run(open_records())
    except RecordsError as exc:
        setting = "IVR_DATABASE_URL" if settings.database_url else "IVR_DATABASE_PATH"
        print(f"ivr-bridge: {setting}: {exc}", file=sys.stderr)
        return 2

    log.info(
        "voice provider: %s%s; Twilio webhook: %s/twiml; stream: %s",
        settings.provider,
        EMBEDDED.get(settings.provider, ""),
        settings.public_url,
        settings.stream_url,
    )
    shortfall = check_descriptor_limit(settings.max_calls, settings.max_pending_connections)
    if shortfall:
        log.warning("%s", shortfall)
    if not resample.COMPILED:
        log.warning(
            "the C resampling kernel was not built (no C compiler at install): audio conversion "
            "runs in numpy at about 3.5 times its CPU a caller frame; reinstall with a C compiler to build it"
        )
    if not settings.public_url.startswith("https://"):
        log.warning(
            "IVR_PUBLIC_URL is %s: Twilio needs a public https:// URL to reach the bridge",
            settings.public_url,
        )
    local = f"http://{host}:{args.port}"
    pages = [f"talk to it at {local}/phone"] if settings.phone else []
    if run_token:
        # In the URL's #fragment: the browser keeps it, it is never sent in a request.
        dashboard = f"{local}/dashboard#token={run_token}"
        pages.append(f"watch calls at {dashboard} (a token for this run; IVR_API_TOKEN sets one)")
    elif settings.api_token:
        pages.append(f"watch calls at {local}/dashboard (with IVR_API_TOKEN)")
    if pages and settings.log_format == "text":
        print(f"ivr-bridge: {'; '.join(pages)}", file=sys.stderr)
    elif pages:  # every line of a JSON log is an object
        log.info("%s", "; ".join(pages))
    app = create_app(settings)
    server = BridgeServer(server_config(app, host=args.host, port=args.port, log_level=args.log_level), app)
    # SIGTERM/SIGINT drain the calls (up to IVR_DRAIN_TIMEOUT_S) before the server exits.
    server.run()
    return 0


def check(args: argparse.Namespace) -> int:
    """Validate the settings, open the records, and open one voice API session."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"ivr-bridge: {logs.escape(str(exc))}", file=sys.stderr)
        return 2
    logs.REDACT.add(settings.secret_values())
    from ivr_bridge.preflight import preflight
    from ivr_bridge.records import CallStore, RecordsError

    async def run() -> str | None:
        store = CallStore(settings.database, settings.instance_id, heartbeat_s=settings.heartbeat_s)
        try:
            await store.open(mark_interrupted=False)  # a check must not end a running server's calls
        finally:
            await store.close()
        return await preflight(settings)

    started = time.monotonic()
    try:
        reason = asyncio.run(run())
    except RecordsError as exc:
        setting = "IVR_DATABASE_URL" if settings.database_url else "IVR_DATABASE_PATH"
        print(f"ivr-bridge: check failed: {setting}: {logs.escape(str(exc))}", file=sys.stderr)
        return 1
    if reason is not None:
        print(f"ivr-bridge: check failed: {settings.provider}: {logs.escape(reason)}", file=sys.stderr)
        return 1
    took = (time.monotonic() - started) * 1000
    print(f"ok: settings valid, records open, {settings.provider} took a session ({took:.0f} ms)")
    return 0


def version() -> str:
    try:
        return importlib.metadata.version("ivr-bridge")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


STUB_VOICE_API = "stub-voice-api"
DEFAULT_STANDIN = "ivr_bridge.standins.nextevi"  # its options are `stub-voice-api`'s own


EMBEDDED = {  # what the engines that need no account do, for the start-up line
    "local": " (the built-in IVR, offline: IVR_FLOW or the demo flow)",
    "echo": " (embedded stand-in: plays each utterance back)",
}


def run_standin(args: argparse.Namespace) -> int:
    """`stub-voice-api`: the stand-in module the provider's registry entry names."""
    from ivr_bridge.providers import registry

    name = registry()[args.provider].standin
    module = importlib.import_module(name)
    if name != DEFAULT_STANDIN and hasattr(module, "add_arguments"):
        args = _own_arguments(module.add_arguments, args)
    return module.run(args)  # type: ignore[no-any-return]


def _own_arguments(
    add_arguments: Callable[[argparse.ArgumentParser], None], args: argparse.Namespace
) -> argparse.Namespace:
    """`args` read again by a stand-in's own parser: an option it shares with NextEVI's (the
    parser's) takes its own default when not given. The options it lacks stay as they were."""
    argv: list[str] = getattr(args, "argv", [])
    if STUB_VOICE_API not in argv:
        return args  # not from the command line: nothing to read again
    own = argparse.ArgumentParser(add_help=False)
    add_arguments(own)
    parsed, _ = own.parse_known_args(argv[argv.index(STUB_VOICE_API) + 1 :])
    return argparse.Namespace(**(vars(args) | vars(parsed)))


class _MoreOptions(argparse.ArgumentParser):
    """Hands a stand-in's `add_arguments` a parser that adds, to a group of the real one,
    only the options the real one lacks (the others, NextEVI's, are shared)."""

    def __init__(self, group: argparse._ArgumentGroup) -> None:
        super().__init__(add_help=False)
        self.group = group

    def add_argument(self, *names: Any, **options: Any) -> argparse.Action:  # type: ignore[override]
        try:
            return self.group.add_argument(*names, **options)
        except argparse.ArgumentError:  # an option `stub-voice-api` already has
            return super().add_argument(*names, **options)  # kept aside, unused


def add_standin_options(parser: argparse.ArgumentParser) -> None:
    """`stub-voice-api`'s options: NextEVI's stand-in's, then each other stand-in's own
    (`--provider voxnexus --transcript ...`) in a group of its provider."""
    from ivr_bridge.providers import registry

    importlib.import_module(DEFAULT_STANDIN).add_arguments(parser)
    for provider in registry().values():
        if not provider.standin or provider.standin == DEFAULT_STANDIN:
            continue
        module = importlib.import_module(provider.standin)
        if hasattr(module, "add_arguments"):
            group = parser.add_argument_group(f"--provider {provider.name}")
            module.add_arguments(_MoreOptions(group))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ivr-bridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ivr-bridge {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "serve",
        help="run the bridge (Twilio webhook + media stream)",
        description="Serve Twilio's voice webhook (/twiml) and Media Streams (/media-stream), the "
        "control API, /healthz, /readyz and /metrics. Settings come from IVR_* environment "
        "variables and a .env file (see the README's settings table).",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe level logged (default INFO); secrets are masked at every level, "
        "IVR_LOG_FORMAT=json gives JSON lines",
    )
    p.set_defaults(func=serve)
    p = commands.add_parser(
        "check",
        help="check the settings, the records and the voice API credentials, then exit",
        description="Validates the settings, opens the call records and opens one session with "
        "the configured voice API, as a call would. Prints one line; exit 0 if all worked, 1 if "
        "the records or the voice API refused (the line says why), 2 for a bad setting. "
        "IVR_PREFLIGHT=1 runs the same voice API check when `serve` starts.",
    )
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=check)

    from ivr_bridge.providers import registry

    p = commands.add_parser(
        STUB_VOICE_API,
        help="run a protocol-faithful stand-in of a voice API (for trying and load-testing a bridge)",
        description="A voice API stand-in: energy turn detection, tone replies in real time, "
        "barge-in, and the awkward parts of each protocol. NextEVI by default: point the bridge at "
        "it with NEXTEVI_URL=ws://HOST:PORT/ws/voice and the same --api-key/--config-id; the "
        "README's 'Voice APIs' section gives the settings for each --provider.",
    )
    p.add_argument(
        "--provider",
        choices=[name for name, provider in registry().items() if provider.standin],
        default="nextevi",
        help="the protocol to speak (default nextevi; openai: Realtime GA at /v1/realtime; "
        "elevenlabs: an agent at /v1/convai/conversation, private with --api-key; "
        "navtalk: /wss/v2/realtime-chat, --api-key is the license; voxnexus: STT and TTS at "
        "/v1/stt/realtime and /v1/tts/realtime, key vn-test-key, --transcript scripts what the "
        "caller says)",
    )
    add_standin_options(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run_standin)

    from ivr_bridge.standins import llm as llm_standin

    p = commands.add_parser(
        "stub-llm",
        help="run a stand-in of an OpenAI-compatible chat-completions API (for IVR_DIALOGUE=llm)",
        description="Streams chat completions as OpenAI does (server-sent events, tool calls in "
        "pieces): 'agent' or 'transfer' in the caller's words calls transfer_call, 'bye' end_call, "
        "anything else is echoed; --reply scripts the next replies. Prints each request as a JSON "
        "line. Point the bridge at it with IVR_DIALOGUE=llm, IVR_LLM_URL=http://HOST:PORT/v1, "
        "IVR_LLM_MODEL (any name) and IVR_LLM_API_KEY set to the same --api-key.",
    )
    llm_standin.add_arguments(p)
    p.set_defaults(func=llm_standin.run)

    from ivr_bridge.standins import dialogue_hook as dialogue_hook_standin

    p = commands.add_parser(
        "stub-dialogue-hook",
        help="run a stand-in of the dialogue endpoint (for IVR_DIALOGUE=hook)",
        description="Checks each turn's X-IVR-Signature, prints it as a JSON line and answers what "
        "to say and do: a greeting, 'You said ...', 'agent' transfers (--transfer-to), 'bye' hangs "
        "up. Point the bridge at it with IVR_DIALOGUE=hook, IVR_DIALOGUE_URL=http://HOST:PORT/ and "
        "IVR_HOOK_SECRET set to the same --secret.",
    )
    dialogue_hook_standin.add_arguments(p)
    p.set_defaults(func=dialogue_hook_standin.run)

    from ivr_bridge.standins import twilio_rest as twilio_rest_standin

    p = commands.add_parser(
        "stub-twilio-api",
        help="run a stand-in of Twilio's call-update REST API (for trying transfers and hang-ups)",
        description="Prints each call update (transfer TwiML, hang-up) as a JSON line. Point the "
        "bridge at it with IVR_TWILIO_API_URL=http://HOST:PORT and the same account sid and token.",
    )
    twilio_rest_standin.add_arguments(p)
    p.set_defaults(func=twilio_rest_standin.run)

    from ivr_bridge.standins import hook_receiver

    p = commands.add_parser(
        "hook-receiver",
        help="run a hook receiver that checks signatures and prints each call event",
        description="Receives the bridge's hooks (IVR_HOOK_URL=http://HOST:PORT/), checks each "
        "signature and prints each event as a JSON line; --on TYPE=ACTION answers an action.",
    )
    hook_receiver.add_arguments(p)
    p.set_defaults(func=hook_receiver.run)

    from ivr_bridge import records_cli
    from ivr_bridge.loadgen import cli as loadgen_cli

    loadgen_cli.register(commands)
    records_cli.register(commands)

    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # as given, for reports
    logs.configure(getattr(args, "log_level", "INFO"))
    logs.guard_library_loggers()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
