"""Service settings, read once from the environment (and an optional `.env` file)."""

from __future__ import annotations

import difflib
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PUBLIC_URL = "http://127.0.0.1:8080"
DEFAULT_TWILIO_API_URL = "https://api.twilio.com"
DEFAULT_DATABASE_PATH = "ivr-bridge.db"
DTMF_KEYS = "0123456789*#"
LOG_FORMATS = ("text", "json")
# Variables under this prefix, or a provider's (`Provider.prefix`), are the bridge's: one it
# does not know is a typo, warned about at start-up. (TWILIO_ is Twilio's own namespace,
# shared with its other tools.)
OWN_PREFIX = "IVR_"
# What <Dial> may be given: E.164 in ASCII digits (str.isdigit() would take "٣"), or a SIP
# URI of RFC 3261's characters (unreserved, escaped, and the reserved ones a URI uses);
# no spaces, quotes, angle brackets or controls, so the TwiML around it stays what it says.
_E164 = re.compile(r"\+[0-9]{6,15}")
_SIP_URI = re.compile(r"sips?:[A-Za-z0-9\-_.!~*'()%;/?:@&=+$,\[\]]{1,250}")


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the variable and is safe to print."""


@dataclass(frozen=True)
class Settings:
    public_url: str = DEFAULT_PUBLIC_URL
    provider: str = "echo"  # Settings() is the echo engine (tests, library use); from_env defaults to local
    # The provider's own settings: the dataclass its module declares (None for echo).
    voice: Any = None
    # The dialogue step and turn-taking of a cascade engine (cascade.settings.DialogueSettings).
    dialogue: Any = None
    upstream_chunk_ms: int = 0  # caller audio per upstream message; 0: the provider's
    # Who gets in (security).
    twilio_auth_token: str = ""  # set => every webhook and stream must be signed by Twilio
    twilio_account_sid: str = ""  # for the REST API (fallback redirects)
    stream_token_ttl_s: float = 120.0  # lifetime of the per-call token from /twiml to `start`
    # Surviving faults (resilience).
    twilio_api_url: str = DEFAULT_TWILIO_API_URL  # Twilio REST base; tests point it at a stand-in
    fallback_number: str = ""  # redirect here (<Dial>) when the voice API cannot serve a call
    fallback_twiml_url: str = ""  # ... or to this TwiML
    reconnect_budget_s: float = 10.0  # time allowed to get a dropped voice API session back
    max_calls: int = 10  # concurrent calls (NextEVI: 10 sessions per API key)
    max_session_s: float = 0.0  # a voice session's cap; 0: the provider's (providers.session_cap)
    idle_timeout_s: float = 10.0  # no media from Twilio this long ends the call
    drain_timeout_s: float = 30.0  # on SIGTERM, how long active calls may finish
    twilio_send_timeout_s: float = 5.0  # a Twilio socket that takes longer to accept a frame ends the call
    # Call-centre routing: events out, call control in, every call on record.
    hook_urls: tuple[str, ...] = ()  # each receives every call event as a signed JSON POST
    hook_secret: str = ""  # HMAC-SHA256 key of the hook signatures
    hook_timeout_s: float = 5.0  # per delivery attempt
    hook_retries: int = 3  # further attempts after a failed delivery, with backoff
    dtmf_map: tuple[tuple[str, str], ...] = ()  # (key, "transfer:+1555..." | "hangup")
    api_token: str = ""  # bearer token of the call-control API; unset => the API is off
    playout_wait_s: float = 10.0  # transfer/hang-up wait this long for the bot's sentence to play
    database_path: str = DEFAULT_DATABASE_PATH  # SQLite file of the call records
    database_url: str = ""  # set => records go to this database instead (PostgreSQL)
    instance_id: str = ""  # names this instance's calls in a shared database (default: host name)
    # Hostile networks: what an unauthenticated peer may hold, and for how long.
    request_timeout_s: float = 10.0  # an HTTP request's headers and body must arrive within this
    start_timeout_s: float = 5.0  # a Media Stream must send a valid `start` within this
    max_pending_connections: int = 256  # connections not yet proven to come from Twilio
    log_format: str = "text"  # "json": one JSON object per line
    preflight: bool = False  # open one voice API session at start-up; /readyz 503 until it works
    redis_url: str = ""  # set => the instances sharing it act as one service (fabric.py)
    heartbeat_s: float = 10.0  # instances beat in the records; silent for 6 beats => dead
    phone: bool = True  # the browser softphone (/phone); its calls are refused when off

    @property
    def database(self) -> str:
        """The SQLAlchemy async URL of the call records."""
        return self.database_url or f"sqlite+aiosqlite:///{self.database_path}"

    @property
    def dtmf_actions(self) -> dict[str, str]:
        return dict(self.dtmf_map)

    @property
    def development_mode(self) -> bool:
        """No auth token: requests are not proven to come from Twilio."""
        return not self.twilio_auth_token

    @property
    def stream_url(self) -> str:
        """The `wss://` (or `ws://`) Media Stream URL Twilio connects to."""
        scheme, rest = self.public_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/media-stream"

    def secret_values(self) -> tuple[str, ...]:
        """Every configured secret, for the log redactor (ivr_bridge.logs)."""
        passwords = [
            urlsplit(url).password or "" for url in (*self.hook_urls, self.database_url, self.redis_url)
        ]
        return tuple(
            s
            for s in (
                *_secrets(self.voice).values(),
                *_secrets(self.dialogue).values(),
                self.twilio_auth_token,
                self.hook_secret,
                self.api_token,
                *passwords,
            )
            if s
        )

    def __repr__(self) -> str:
        # Keeps the API key out of any log line or traceback that prints the settings.
        # (The provider's settings hide their secrets from repr themselves: `setting()`.)
        token = "***" if self.twilio_auth_token else "''"
        return (
            f"Settings(public_url={self.public_url!r}, provider={self.provider!r}, voice={self.voice!r}, "
            f"upstream_chunk_ms={self.upstream_chunk_ms}, "
            f"twilio_auth_token={token}, max_calls={self.max_calls}, hooks={len(self.hook_urls)}, "
            f"database={redact_url(self.database)!r})"
        )

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        dotenv: bool = True,
        default_public_url: str = DEFAULT_PUBLIC_URL,
        unknown: list[str] | None = None,
        read_into: set[str] | None = None,
    ) -> Settings:
        """Read and validate settings; raises SettingsError naming the first bad variable.
        `unknown`, if given, receives a warning for each variable under the bridge's own
        prefixes that no setting reads (a misspelling), with the closest known name."""
        if env is None:
            env = dict(os.environ)
            if dotenv and Path(".env").is_file():
                from dotenv import dotenv_values

                # Real environment variables win over the file.
                env = {k: v for k, v in dotenv_values(".env").items() if v is not None} | env

        read: set[str] = set() if read_into is None else read_into  # every name read: all, always

        def get(name: str, default: str = "") -> str:
            read.add(name)
            return env.get(name, default).strip()

        public_url = get("IVR_PUBLIC_URL", default_public_url).rstrip("/")
        parts = urlsplit(public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"IVR_PUBLIC_URL must be an http:// or https:// base URL, got {public_url!r}")
        if parts.query or parts.fragment:
            raise SettingsError("IVR_PUBLIC_URL must not carry a query string or fragment")

        from ivr_bridge.providers import registry  # its modules import this one

        providers = registry()
        # Every provider's variables are read (and their URLs checked) whichever is in use:
        # a typo shows now, not when someone switches provider.
        voices = {
            name: _read_provider(p.settings, get) for name, p in providers.items() if p.settings is not None
        }
        credentials = {  # a provider is configured when its credential is set
            name: p.credential
            for name, p in providers.items()
            if p.credential and _value_of(voices[name], p.credential)
        }
        provider = get("IVR_PROVIDER").lower()
        if not provider and len(credentials) > 1:
            both = " and ".join(credentials.values())
            raise SettingsError(f"IVR_PROVIDER must say which voice API to use: {both} are all set")
        provider = provider or next(iter(credentials), "local")
        if provider not in providers:
            raise SettingsError(f"IVR_PROVIDER must be one of {', '.join(providers)}, got {provider!r}")
        voice = voices.get(provider)
        if voice is not None:
            _check_provider(provider, voice)
        from ivr_bridge.cascade.settings import DialogueSettings

        dialogue = _read_provider(DialogueSettings, get)
        if providers[provider].cascade and (problem := dialogue.check()):
            raise SettingsError(problem)

        raw_chunk = get("IVR_UPSTREAM_CHUNK_MS", "0")
        try:
            chunk_ms = int(raw_chunk or "0")
        except ValueError:
            chunk_ms = -1
        # 20 ms is one Twilio frame; above 1000 ms replies lag; the API allows 100 msg/s.
        if chunk_ms and (not 20 <= chunk_ms <= 1000 or chunk_ms % 20):
            raise SettingsError(
                "IVR_UPSTREAM_CHUNK_MS must be 0 (the provider's) or a multiple of 20 between 20 and "
                f"1000, got {raw_chunk!r}"
            )

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = get(name, str(default))
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not low <= value <= high:  # NaN fails too
                raise SettingsError(f"{name} must be a number from {low:g} to {high:g}, got {raw!r}")
            return value

        session_cap_s = number("IVR_MAX_SESSION_S", 0, 0, 86400)
        if 0 < session_cap_s < 60:
            raise SettingsError(
                f"IVR_MAX_SESSION_S must be 0 (the provider's cap) or 60 to 86400, got {session_cap_s:g}"
            )
        twilio_api_url = get("IVR_TWILIO_API_URL", DEFAULT_TWILIO_API_URL).rstrip("/")
        if urlsplit(twilio_api_url).scheme not in ("http", "https"):
            raise SettingsError(f"IVR_TWILIO_API_URL must be an http(s) URL, got {twilio_api_url!r}")
        fallback_twiml_url = get("IVR_FALLBACK_TWIML_URL")
        if fallback_twiml_url and urlsplit(fallback_twiml_url).scheme not in ("http", "https"):
            raise SettingsError(f"IVR_FALLBACK_TWIML_URL must be an http(s) URL, got {fallback_twiml_url!r}")
        fallback_number = get("IVR_FALLBACK_NUMBER")
        if fallback_number and not is_phone_target(fallback_number):
            raise SettingsError("IVR_FALLBACK_NUMBER must be an E.164 number like +15550100 or a sip: URI")

        hook_urls = tuple(url.strip() for url in get("IVR_HOOK_URL").split(",") if url.strip())
        for url in hook_urls:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
                raise SettingsError(
                    f"IVR_HOOK_URL must be http(s) URLs separated by commas, got {redact_url(url)!r}"
                )
        hook_secret = get("IVR_HOOK_SECRET")
        if hook_urls and not hook_secret:
            raise SettingsError("IVR_HOOK_SECRET is required when IVR_HOOK_URL is set (hooks are signed)")

        log_format = get("IVR_LOG_FORMAT", "text").lower()
        if log_format not in LOG_FORMATS:
            raise SettingsError(f"IVR_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")

        def flag(name: str, default: str) -> bool:
            raw = get(name, default).lower()
            if raw not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
                raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")
            return raw in ("1", "true", "yes", "on")

        redis_url = get("IVR_REDIS_URL")
        if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(
                f"IVR_REDIS_URL must be a redis://, rediss:// or unix:// URL, got {redact_url(redis_url)!r}"
            )

        settings = cls(
            redis_url=redis_url,
            heartbeat_s=number("IVR_HEARTBEAT_S", 10, 0.5, 300),
            log_format=log_format,
            preflight=flag("IVR_PREFLIGHT", "0"),
            phone=flag("IVR_PHONE", "1"),
            hook_urls=hook_urls,
            hook_secret=hook_secret,
            hook_timeout_s=number("IVR_HOOK_TIMEOUT_S", 5, 0.1, 120),
            hook_retries=int(number("IVR_HOOK_RETRIES", 3, 0, 20)),
            dtmf_map=parse_dtmf_map(get("IVR_DTMF_MAP")),
            api_token=get("IVR_API_TOKEN"),
            playout_wait_s=number("IVR_PLAYOUT_WAIT_S", 10, 0, 120),
            database_path=get("IVR_DATABASE_PATH", DEFAULT_DATABASE_PATH),
            database_url=parse_database_url(get("IVR_DATABASE_URL")),
            # Unique per process: a restart is a new instance, and can never mark another's calls.
            instance_id=get("IVR_INSTANCE_ID") or f"{socket.gethostname()}-{secrets.token_hex(3)}",
            twilio_auth_token=get("TWILIO_AUTH_TOKEN"),
            twilio_account_sid=get("TWILIO_ACCOUNT_SID"),
            stream_token_ttl_s=number("IVR_STREAM_TOKEN_TTL_S", 120, 5, 3600),
            twilio_api_url=twilio_api_url,
            fallback_number=fallback_number,
            fallback_twiml_url=fallback_twiml_url,
            reconnect_budget_s=number("IVR_RECONNECT_BUDGET_S", 10, 0, 300),
            max_calls=int(number("IVR_MAX_CALLS", 10, 1, 100000)),
            max_session_s=session_cap_s,
            idle_timeout_s=number("IVR_IDLE_TIMEOUT_S", 10, 1, 3600),
            drain_timeout_s=number("IVR_DRAIN_TIMEOUT_S", 30, 0, 3600),
            twilio_send_timeout_s=number("IVR_TWILIO_SEND_TIMEOUT_S", 5, 0.5, 120),
            request_timeout_s=number("IVR_REQUEST_TIMEOUT_S", 10, 1, 300),
            start_timeout_s=number("IVR_START_TIMEOUT_S", 5, 1, 120),
            max_pending_connections=int(number("IVR_MAX_PENDING_CONNECTIONS", 256, 8, 100000)),
            public_url=public_url,
            provider=provider,
            voice=voice,
            dialogue=dialogue,
            upstream_chunk_ms=chunk_ms,
        )
        if unknown is not None:
            own = (OWN_PREFIX, *(p.prefix for p in providers.values() if p.prefix))
            for name in sorted(env):
                if name.startswith(own) and name not in read:
                    close = difflib.get_close_matches(name, read, n=1)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    unknown.append(f"{name} is not a setting of ivr-bridge and is ignored{hint}")
        return settings

    @classmethod
    def variable_names(cls) -> set[str]:
        """Every environment variable a setting reads (the README's table, .env.example)."""
        names: set[str] = set()
        cls.from_env({}, dotenv=False, read_into=names)
        return names

    def summary(self) -> str:
        """The settings in effect, on one line, secrets shown only as set or not."""

        from ivr_bridge.providers import registry

        def secret(value: str) -> str:
            return "set" if value else "unset"

        fields = {
            "provider": self.provider,
            "public_url": self.public_url,
            "auth": "twilio-signatures" if self.twilio_auth_token else "DEVELOPMENT (none)",
            "max_calls": self.max_calls,
            "upstream_chunk_ms": self.upstream_chunk_ms or "the provider's",
            "records": redact_url(self.database),
            "fabric": redact_url(self.redis_url) if self.redis_url else "off (one instance)",
            "instance": self.instance_id,
            "hooks": len(self.hook_urls),
            "control_api": "on" if self.api_token else "off",
            "dtmf_map": ",".join(f"{k}={v}" for k, v in self.dtmf_map) or "-",
            "fallback": self.fallback_number or self.fallback_twiml_url or "apology",
            "twilio_rest": "on" if self.twilio_account_sid and self.twilio_auth_token else "off",
            "timeouts_s": f"idle {self.idle_timeout_s:g}, start {self.start_timeout_s:g}, "
            f"request {self.request_timeout_s:g}, send {self.twilio_send_timeout_s:g}, "
            f"drain {self.drain_timeout_s:g}",
            "max_pending_connections": self.max_pending_connections,
            "voice_api": registry()[self.provider].describe(self.voice),
            **{name.lower(): secret(value) for name, value in _secrets(self.voice).items()},
            "log_format": self.log_format,
            "preflight": "on" if self.preflight else "off",
            "phone": "on" if self.phone else "off",
        }
        return "settings: " + "; ".join(f"{k}={v}" for k, v in fields.items())


def is_phone_target(target: str) -> bool:
    """An E.164 number (+15550100) or a SIP URI: what `<Dial>` can reach."""
    return bool(_E164.fullmatch(target) or _SIP_URI.fullmatch(target))


def parse_dtmf_map(raw: str) -> tuple[tuple[str, str], ...]:
    """`0=transfer:+15550100,9=hangup` -> (("0", "transfer:+15550100"), ("9", "hangup"))."""
    entries: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, _, action = (x.strip() for x in item.partition("="))
        if len(key) != 1 or key not in DTMF_KEYS:
            raise SettingsError(f"IVR_DTMF_MAP: {key!r} is not a phone key (0-9, * or #)")
        kind, _, target = action.partition(":")
        if not (action == "hangup" or (kind == "transfer" and is_phone_target(target))):
            raise SettingsError(
                f"IVR_DTMF_MAP: key {key} needs 'hangup' or 'transfer:+E164NUMBER', got {action!r}"
            )
        if key in entries:
            raise SettingsError(f"IVR_DTMF_MAP: key {key} is mapped twice")
        entries[key] = action
    return tuple(entries.items())


def parse_database_url(raw: str) -> str:
    """A PostgreSQL or SQLite URL, given the async driver SQLAlchemy needs for it."""
    if not raw:
        return ""
    scheme, sep, rest = raw.partition("://")
    drivers = {
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
    }
    if not sep or scheme not in drivers:
        raise SettingsError("IVR_DATABASE_URL must be a postgresql:// (or sqlite://) URL")
    return f"{drivers[scheme]}://{rest}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# -- a provider's own settings (declared in its module: providers.base.setting) -----------


def _variables(cls: type) -> list[tuple[str, Any]]:
    """(field name, its `providers.base.Variable`) of a provider's settings dataclass."""
    return [(f.name, f.metadata["variable"]) for f in fields(cls)]


def _read_provider(cls: type, get: Callable[[str, str], str]) -> Any:
    values: dict[str, str] = {}
    for f in fields(cls):
        var = f.metadata["variable"]
        raw = get(var.env, f.default)
        if var.kind == "ws_url":
            raw = raw.rstrip("/")
            if urlsplit(raw).scheme not in ("ws", "wss"):
                raise SettingsError(f"{var.env} must be a ws:// or wss:// URL, got {raw!r}")
        elif var.kind == "http_url":
            raw = raw.rstrip("/")
            if urlsplit(raw).scheme not in ("http", "https"):
                raise SettingsError(f"{var.env} must be an http(s) URL, got {raw!r}")
        elif var.kind == "text_or_file" and raw.startswith("@"):
            try:
                raw = Path(raw[1:]).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"{var.env}: cannot read {raw[1:]!r}: {exc.strerror}") from None
        values[f.name] = raw
    return cls(**values)


def _check_provider(provider: str, voice: Any) -> None:
    """What the provider in use needs: its required variables, and its own rules."""
    for name, var in _variables(type(voice)):
        if var.required and not getattr(voice, name):
            raise SettingsError(f"{var.env} is required when IVR_PROVIDER={provider}")
    check = getattr(voice, "check", None)
    problem = check() if check is not None else None
    if problem:
        raise SettingsError(problem)


def _value_of(voice: Any, env: str) -> str:
    return next((getattr(voice, name) for name, var in _variables(type(voice)) if var.env == env), "")


def _secrets(voice: Any) -> dict[str, str]:
    """The provider's secret settings by variable name."""
    if voice is None:
        return {}
    return {var.env: getattr(voice, name) for name, var in _variables(type(voice)) if var.secret}
