"""Log lines an operator can trust: no forged lines, no secrets, at any level.

Values from outside (call sids, numbers, transfer targets, header values) can carry
newlines and terminal escapes that would write fake log lines or rewrite the screen.
Rather than trusting every call site to escape its arguments, the one formatter every
handler uses escapes control characters in the finished message (`escape`), and masks
secrets in it (`Redactor`): the configured secret values, and by shape the header and
query values that carry credentials. Libraries log too (websockets prints request URLs
and headers at DEBUG, uvicorn prints request lines), so the formatter, not the call
site, is where this belongs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

MASK = "***"
MIN_SECRET_CHARS = 6  # shorter values would mask ordinary words
# C0 controls, DEL, C1 controls, and the Unicode bidi overrides that reorder a terminal line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEP_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Credentials by shape: header lines, query parameters and URL passwords.
_HEADER = re.compile(
    r"(?i)\b(x-twilio-signature|authorization|x-api-key|x-ivr-signature|cookie|set-cookie)"
    r"(\"?\s*[:=]\s*\"?)(?:bearer\s+|basic\s+)?[^\s\",;]+"
)
_QUERY = re.compile(
    r"(?i)([?&](?:api_key|apikey|key|token|access_token|signature|license|secret)=)[^&\s\"']+"
)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


def escape(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with control characters written as `\\xNN` / `\\uNNNN`: one line, no escapes."""
    pattern = _CONTROL_KEEP_NEWLINES if keep_newlines else _CONTROL
    return pattern.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return repr(char)[1:-1] if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class Redactor:
    """Masks secrets in text: known values, and credentials by their shape."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        new = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS} - set(self._secrets)
        # Longest first: a secret that contains another is masked whole.
        self._secrets = sorted({*self._secrets, *new}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        text = _HEADER.sub(rf"\1\2{MASK}", text)
        text = _QUERY.sub(rf"\1{MASK}", text)
        return _URL_PASSWORD.sub(rf"\1{MASK}@", text)


REDACT = Redactor()  # the process's: settings add their secret values at start-up


class SafeFormatter(logging.Formatter):
    """Formats a record, then escapes control characters in its message and masks secrets
    in the whole line (a traceback keeps its newlines)."""

    def __init__(self, fmt: str | None = None, redactor: Redactor = REDACT) -> None:
        super().__init__(fmt)
        self._redact = redactor

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return self._redact(escape(super().format(record), keep_newlines=True))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time` (ISO 8601 UTC), `level`, `logger`, `message`, and
    `call_sid` where the record is about a call, `exception` with a traceback. Secrets are
    masked in each value before encoding; ASCII-only output escapes every control
    character."""

    def __init__(self, redactor: Redactor = REDACT) -> None:
        super().__init__()
        self._redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._redact(record.getMessage()),
        }
        call_sid = getattr(record, "call_sid", None)
        if call_sid:
            entry["call_sid"] = str(call_sid)
        if record.exc_info:
            entry["exception"] = self._redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=True)


class RedactFilter(logging.Filter):
    """Masks secrets in a record before any handler sees it: for library loggers whose
    records may reach handlers this process did not configure (a library user's)."""

    def __init__(self, redactor: Redactor = REDACT) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = self._redact(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Libraries that narrate routine work at INFO: migrations on every start (alembic), every
# REST request's headers (the Twilio SDK). Heard from at WARNING, or at DEBUG.
CHATTY = ("alembic", "twilio", "aiosqlite", "asyncio", "websockets")


def configure(level: str | int = "INFO", secrets: Iterable[str] = (), log_format: str = "text") -> None:
    """One handler on the root logger, with the safe formatter (text or JSON lines); every
    library's records (uvicorn's included: serve runs it with `log_config=None`) go
    through it."""
    REDACT.add(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else SafeFormatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    debug = isinstance(numeric, int) and numeric <= logging.DEBUG
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if debug else logging.WARNING)


def guard_library_loggers() -> None:
    """The websockets client logs the request URL (with NextEVI's `api_key`) and headers at
    DEBUG: mask them at the source, whoever configured the handlers."""
    for name in ("websockets.client", "websockets.server", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactFilter) for f in logger.filters):
            logger.addFilter(RedactFilter())
