"""The `llm` dialogue step: any OpenAI-compatible chat-completions endpoint, streamed.

IVR_LLM_URL is the API's base URL, as most OpenAI-compatible tools take it
(`https://api.openai.com/v1`, `http://localhost:11434/v1` for Ollama, `http://host:8000/v1`
for vLLM); `/chat/completions` is appended. A URL that already ends in `/chat/completions`
is used as it is, and a query (`?api-version=...`) is kept. IVR_LLM_API_KEY, when set, goes
in `Authorization: Bearer`; IVR_LLM_MODEL names the model.

Each turn POSTs `{"model", "messages", "stream": true, "tools": [end_call, transfer_call]}`
and reads the server-sent events as they arrive: content deltas are yielded at once (the
cascade speaks the first sentence while the model writes the rest); tool calls are gathered
from their pieces and become the reply's `Act`, last. A server that ignores `stream` and
answers one JSON completion is understood too.

The conversation: a system message (IVR_LLM_INSTRUCTIONS, or `DEFAULT_INSTRUCTIONS`, then
the call's details), then the caller's turns as user messages (keys pressed and silence as
notes in parentheses) and the bot's replies as assistant messages, each as the caller
HEARD it: when the caller cuts a reply, `heard` replaces it with the words that reached
them (as Vocode does), so the model does not believe it said what was never heard.

The greeting (the START turn) is the model's: it is asked with a note, "(the call has just
been answered: greet the caller)", so IVR_LLM_INSTRUCTIONS can say how to greet. A fixed
`greeting` given to the constructor is said instead, without a request.

Failures (refused key, rate limit, 5xx, timeouts, a broken stream) never raise out of
`respond`: one log line, without the key, and an apology the caller hears. The key never
appears in a log line, an error or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ivr_bridge.cascade.engines import Act, Turn, TurnKind
from ivr_bridge.hooks import USER_AGENT, Target, read_capped, safe_url, scrub, ssl_context, target_of
from ivr_bridge.providers.base import END_CALL_TOOL, TRANSFER_CALL_TOOL, CallInfo
from ivr_bridge.settings import Settings, is_phone_target

log = logging.getLogger(__name__)

CHAT_PATH = "/chat/completions"
DEFAULT_INSTRUCTIONS = (
    "You are a friendly voice assistant answering a phone call. The caller hears your replies "
    "as speech: answer in one to three short spoken sentences of plain words, with no markdown, "
    "lists, emoji, links or special characters. Notes in parentheses are not the caller's words "
    "but what happened on the call. When the caller is done, say goodbye and call end_call."
)
GREETING_NOTE = "(the call has just been answered: greet the caller)"
NO_INPUT_NOTE = "(the caller said nothing)"
UNHEARD_NOTE = "(the caller said something that could not be made out)"
APOLOGY = "Sorry, something went wrong."
CONNECT_TIMEOUT_S = 5.0
# Between two reads of the stream (the first token included): a model that stalls this
# long has failed, and the caller is waiting in silence.
READ_TIMEOUT_S = 15.0
KEEPALIVE_S = 30.0  # between turns; a stale connection is retried once (`_send`)
MAX_REPLY_CHARS = 4000  # minutes of speech: a runaway model is cut here
MAX_TOOL_CHARS = 2000  # a tool call's name and arguments are a few dozen characters
MAX_ERROR_BYTES = 16 * 1024  # of an error answer's body, read for its code
MAX_JSON_BYTES = 256 * 1024  # a whole (non-streamed) completion
MAX_HISTORY = 60  # messages after the system message; older ones are dropped

# Chat-completions form of the tools the bridge offers every agent (openai_realtime.TOOLS).
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": END_CALL_TOOL,
            "description": "End the phone call, after your last sentence has been heard.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": TRANSFER_CALL_TOOL,
            "description": "Hand the caller to another number or SIP address, after your last sentence.",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string", "description": "E.164 number (+15550100) or sip: URI"}
                },
                "required": ["to"],
            },
        },
    },
]


def chat_url(llm_url: str) -> str:
    """The chat-completions endpoint of IVR_LLM_URL: a base URL gets `/chat/completions`;
    a URL already ending in it is kept. The query, if any, stays."""
    parts = urlsplit(llm_url.strip())
    path = parts.path.rstrip("/")
    if not path.endswith(CHAT_PATH):
        path += CHAT_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def prompt(turn: Turn) -> str:
    """The user message of a caller's turn."""
    if turn.kind is TurnKind.START:
        return GREETING_NOTE
    if turn.kind is TurnKind.DIGITS:
        return f"(the caller pressed {' '.join(turn.text)})"
    if turn.kind is TurnKind.NO_INPUT:
        return NO_INPUT_NOTE
    return turn.text.strip() or UNHEARD_NOTE


# -- Sans-I/O: a streamed completion ---------------------------------------------------------


@dataclass(slots=True)
class _ToolCall:
    name: str = ""
    arguments: str = ""


@dataclass
class ChatStream:
    """The lines of a streamed chat completion in (server-sent events), text pieces out; the
    tool calls gathered from their pieces for `act` at the end."""

    done: bool = False  # `data: [DONE]` seen: read no further
    chunks: int = 0  # usable completion chunks
    malformed: int = 0  # lines or events skipped
    error: str = ""  # an error the server reported in the stream
    text_chars: int = 0
    finish_reason: str = ""
    _data: list[str] = field(default_factory=list)  # the event being read
    _tools: dict[int, _ToolCall] = field(default_factory=dict)

    def feed(self, raw: bytes) -> list[str]:
        """One line of the stream (its end of line included or not): content pieces."""
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            return self._dispatch()  # a blank line ends an event
        if line.startswith(":"):
            return []  # a comment: a keep-alive
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        elif name not in ("event", "id", "retry"):
            self.malformed += 1
        return []

    def end(self) -> list[str]:
        """The stream ended: an event not yet ended by a blank line still counts."""
        return self._dispatch()

    def _dispatch(self) -> list[str]:
        if not self._data:
            return []
        data, self._data = "\n".join(self._data), []
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            self.malformed += 1
            return []
        if not isinstance(chunk, dict):
            self.malformed += 1
            return []
        return self.completion(chunk, "delta")

    def completion(self, chunk: dict[str, Any], key: str) -> list[str]:
        """A completion chunk (`key` "delta") or a whole completion ("message")."""
        if "error" in chunk:
            self.error = _error_text(chunk.get("error"))
            self.done = True
            return []
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            self.malformed += 1
            return []
        self.chunks += 1
        pieces: list[str] = []
        for choice in choices:  # usually one; a usage chunk has none
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get(key)
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if isinstance(content, str) and content and self.text_chars < MAX_REPLY_CHARS:
                content = content[: MAX_REPLY_CHARS - self.text_chars]
                self.text_chars += len(content)
                pieces.append(content)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        self._tool_piece(call)
        return pieces

    def _tool_piece(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        if not isinstance(index, int):
            # Servers that leave `index` out send each call whole: a new id is a new call.
            index = len(self._tools) if call.get("id") or not self._tools else max(self._tools)
        tool = self._tools.setdefault(index, _ToolCall())
        function = call.get("function")
        if not isinstance(function, dict):
            return
        for name in ("name", "arguments"):
            piece = function.get(name)
            if isinstance(piece, str) and len(tool.name) + len(tool.arguments) + len(piece) <= MAX_TOOL_CHARS:
                setattr(tool, name, getattr(tool, name) + piece)

    def act(self) -> tuple[Act | None, list[str]]:
        """The first usable end_call / transfer_call, and why the others were ignored."""
        ignored: list[str] = []
        for _, tool in sorted(self._tools.items()):
            if tool.name == END_CALL_TOOL:
                return Act("hangup"), ignored
            if tool.name == TRANSFER_CALL_TOOL:
                try:
                    arguments = json.loads(tool.arguments or "{}")
                except (ValueError, RecursionError):
                    arguments = None
                to = arguments.get("to") if isinstance(arguments, dict) else None
                if isinstance(to, str) and is_phone_target(to):
                    return Act(f"transfer:{to}"), ignored
                ignored.append(f"{TRANSFER_CALL_TOOL} to {_short(to)}: not an E.164 number or sip: URI")
            else:
                ignored.append(f"unknown tool {_short(tool.name)}")
        return None, ignored


def _short(value: object) -> str:
    return repr(value[:40]) if isinstance(value, str) else f"a JSON {type(value).__name__}"


def _error_text(error: object) -> str:
    """An OpenAI-style error's code or type: never its message (a refused key is quoted
    there, masked or not, by some servers)."""
    if isinstance(error, dict):
        for key in ("code", "type"):
            if isinstance(error.get(key), str | int) and str(error[key]):
                return str(error[key])[:60]
    return "an error"


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl_context()  # certifi's CAs, as the hooks use: built once, off the event loop


# -- The dialogue step -------------------------------------------------------------------------


class LlmDialogue:
    """`Dialogue` over a streamed OpenAI-compatible chat-completions endpoint, for one call."""

    def __init__(
        self,
        settings: Settings,
        call: CallInfo,
        *,
        greeting: str = "",
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        dialogue = settings.dialogue
        self._call_sid = call.call_sid or "-"
        self._url = chat_url(dialogue.llm_url) if dialogue.llm_url else ""
        self._shown_url = safe_url(self._url) if self._url else "(no IVR_LLM_URL)"
        self._model: str = dialogue.llm_model
        self._key: str = dialogue.llm_api_key  # only ever in the Authorization header
        self._greeting = greeting
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._read_timeout_s = read_timeout_s
        system = (dialogue.llm_instructions or "").strip() or DEFAULT_INSTRUCTIONS
        if details := call.sentence():
            system = f"{system}\n\n{details}"
        self._system = {"role": "system", "content": system}
        self.history: list[dict[str, Any]] = []  # after the system message
        self._last: dict[str, Any] | None = None  # the last reply's assistant message
        self._session: aiohttp.ClientSession | None = None
        self._target: Target | None = None

    def __repr__(self) -> str:
        return f"LlmDialogue(url={self._shown_url!r}, model={self._model!r}, call={self._call_sid!r})"

    @property
    def messages(self) -> list[dict[str, Any]]:
        """What the next request sends before the caller's new turn."""
        return [self._system, *self.history]

    async def start(self) -> None:
        if not (self._url and self._model):
            raise ConnectionError("IVR_LLM_URL and IVR_LLM_MODEL are required for the llm dialogue")
        try:
            self._target = target_of(self._url)
        except (ValueError, TypeError) as exc:
            raise ConnectionError(f"IVR_LLM_URL is not usable: {self._shown_url}") from exc
        if self._target.url.scheme == "https":
            await asyncio.to_thread(_tls)

    def expected(self) -> list[str]:
        return []

    def heard(self, said: str, heard: str) -> None:
        # The cut reply is the last one only if nothing was said since: `_last` is cleared
        # when a new turn starts and set when its reply is recorded.
        if self._last is None:
            return
        if heard.strip():
            self._last["content"] = heard
        else:  # nothing reached the caller: as if it had not been said
            with contextlib.suppress(ValueError):
                self.history.remove(self._last)
            self._last = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def respond(self, turn: Turn) -> AsyncIterator[str | Act]:
        self._last = None
        if turn.kind is TurnKind.START and self._greeting:
            self._record(self._greeting)
            yield self._greeting
            return
        self.history.append({"role": "user", "content": prompt(turn)})
        del self.history[:-MAX_HISTORY]
        body = json.dumps(
            {"model": self._model, "messages": self.messages, "stream": True, "tools": TOOLS}
        ).encode()
        spoken: list[str] = []
        stream = ChatStream()
        response: aiohttp.ClientResponse | None = None
        failure = ""
        started = time.monotonic()
        clean = False  # the response was read to its end: its connection may be reused
        try:
            try:
                response = await self._send(body)
                if response.status != 200:
                    failure = await self._refused(response)
                elif response.headers.get("Content-Type", "").startswith("application/json"):
                    # A server that ignores `stream`: one whole completion.
                    answer = await read_capped(response, MAX_JSON_BYTES)
                    whole = _json_object(answer)
                    if whole is None:
                        failure = "an answer that is not a chat completion"
                    else:
                        for piece in stream.completion(whole, "message"):
                            spoken.append(piece)
                            yield piece
                        clean = True
                else:
                    while not stream.done:
                        line = await response.content.readline()
                        pieces = stream.feed(line) if line else stream.end()
                        for piece in pieces:
                            spoken.append(piece)
                            yield piece
                        if not line:
                            clean = True
                            break
                        if stream.text_chars >= MAX_REPLY_CHARS:
                            log.warning(
                                "[%s] llm: reply cut at %d characters", self._call_sid, MAX_REPLY_CHARS
                            )
                            break
            except TimeoutError:
                failure = f"nothing received for {self._read_timeout_s:g} s"
            except ValueError:  # aiohttp: a line longer than its buffer
                failure = "a line of the stream too long"
            except (aiohttp.ClientError, OSError) as exc:
                failure = f"{self._reason(exc)} after {time.monotonic() - started:.1f} s"
            except Exception as exc:  # a bug must not end the call: the caller hears an apology
                log.exception("[%s] llm: the reply failed", self._call_sid)
                failure = type(exc).__name__
        finally:
            # Cancelled (the caller talked over the bot) or done: a stream not read to its
            # end is closed at once, never drained; a finished one goes back to the pool.
            if response is not None:
                if clean or stream.done:
                    response.release()
                else:
                    response.close()
            self._record("".join(spoken))  # what was yielded: `heard` trims it if cut
        if not failure:
            if stream.error:
                failure = f"the server reported {stream.error!r} in the stream"
            elif not stream.chunks and stream.malformed:
                failure = f"no usable chunk in the stream ({stream.malformed} malformed)"
            elif not (stream.done or stream.finish_reason or stream.text_chars >= MAX_REPLY_CHARS):
                failure = "the stream ended before the reply did"
            elif stream.malformed:
                log.warning(
                    "[%s] llm %s: skipped %d malformed line(s) of the stream",
                    self._call_sid,
                    self._shown_url,
                    stream.malformed,
                )
        if failure:
            log.warning(
                "[%s] llm %s (%s): %s; apologising", self._call_sid, self._shown_url, self._model, failure
            )
            apology = f" {APOLOGY}" if spoken else APOLOGY
            spoken.append(apology)
            self._record("".join(spoken))
            yield apology
            return
        act, ignored = stream.act()
        for reason in ignored:
            log.warning("[%s] llm: ignored the model's %s", self._call_sid, reason)
        if act is None and not spoken:
            log.warning("[%s] llm %s: an empty reply; apologising", self._call_sid, self._shown_url)
            self._record(APOLOGY)
            yield APOLOGY
            return
        if act is not None:
            yield act

    def _record(self, text: str) -> None:
        """The reply's assistant message, made or updated; none for an empty reply."""
        if self._last is not None:
            if text:
                self._last["content"] = text
            else:
                self.history.remove(self._last)
                self._last = None
        elif text:
            self._last = {"role": "assistant", "content": text}
            self.history.append(self._last)

    # -- HTTP ------------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            assert self._target is not None
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    keepalive_timeout=KEEPALIVE_S,
                    ssl=_tls() if self._target.url.scheme == "https" else True,
                ),
                timeout=self._timeout,
            )
        return self._session

    async def _send(self, body: bytes) -> aiohttp.ClientResponse:
        """POST the request; the response, its body not yet read."""
        if self._target is None:
            await self.start()  # raises ConnectionError: logged as a failure by the caller
        assert self._target is not None
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": USER_AGENT,
            "Accept-Encoding": "identity",  # lines are read as they come
        }
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        elif self._target.authorization:
            headers["Authorization"] = self._target.authorization
        for attempt in (1, 2):
            try:
                return await self._http().post(
                    self._target.url,
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    proxy=self._target.proxy,
                    proxy_auth=self._target.proxy_auth,
                )
            except aiohttp.ClientConnectorError:
                raise  # refused, DNS, TLS: a second try now would fail alike
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A kept-alive connection the server had closed since the last turn. aiohttp
                # retries only idempotent requests; a completion is safe to ask twice.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _refused(self, response: aiohttp.ClientResponse) -> str:
        """Why a non-200 answer failed: its status and the error's code, never its message."""
        reason = f"HTTP {response.status}"
        if response.status in (401, 403):
            reason += " (the API key was refused)"
        elif response.status == 429:
            reason += " (rate limited)"
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            error = _json_object(await read_capped(response, MAX_ERROR_BYTES))
            if error is not None and "error" in error:
                reason += f": {_error_text(error['error'])}"
        return reason

    def _reason(self, exc: BaseException) -> str:
        text = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), self._url)
        return text.replace(self._key, "***") if self._key else text


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
