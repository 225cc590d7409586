"""VoxNexus realtime speech-to-text and text-to-speech over WebSockets, for the cascade.

Built to VoxNexus' WebSocket API page (`shared/reference/voxnexus-websocket-api.txt`) and
`shared/reference/providers.md` §4-5; not yet checked against a live account.

Known (documented):
- two sockets, `/v1/stt/realtime` and `/v1/tts/realtime`; the key as `?token=` (both
  documented ways are used here: the query and an `X-Api-Key` header);
- connect, client `init`, server `ready` (echoing the accepted format and rate: the
  format-negotiation ack), then the exchange;
- STT: `audio {data: base64 PCM16}` (100-200 ms pieces recommended), `command flush`,
  `transcript {text, is_final, confidence, offset, duration, words}`, `flush_done`,
  `error {error, code}` (e.g. `UNSUPPORTED_FORMAT`);
- TTS: `text {text, is_final}`, `audio {data, is_final}`, `error` (e.g. `VOICE_NOT_FOUND`);
  no cancel and no utterance ids, so each reply gets a socket of its own and a cut reply's
  socket is closed;
- `{"type": "ping"}` every 30 s as keep-alive (no pong documented).

Unverified, and how this module copes:
- whether 8 kHz is accepted on either socket (the phone's rate: G.711 decode/encode only):
  asked first, `ready`'s rate is used whatever it is, and 16 kHz is asked once on
  `UNSUPPORTED_FORMAT`;
- whether each TTS `audio` chunk is a whole WAV file: a RIFF/WAVE header is looked for in
  every chunk, anything else is raw PCM16 at `ready`'s rate (an odd byte carried over);
- how TTS input is closed when no text is left: `text {"text": "", "is_final": true}` (the
  doc only shows `is_final` on a message carrying words); an `error` after it ends the reply
  (logged) rather than failing it;
- whether the STT socket answers a flush with a final when nothing was pending, and whether
  the service finalises on its own mid-turn: the cascade takes a turn's transcript as whole
  at `flush_done` (an empty last final), gathering every final before it;
- what an `error` on a live STT socket means: taken as fatal (the cascade reconnects);
- the documented voice, `vl-xiaoxiao`, is a zh-CN voice: `VOXNEXUS_VOICE_ID` defaults to
  "" (not sent: the service's default voice) and should name a voice of the account.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import time
from base64 import b64decode, b64encode
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

from ivr_bridge.audio import Pcm, WavError
from ivr_bridge.audio.wav import MAX_RATE, MIN_RATE, is_wav, parse_wav
from ivr_bridge.cascade.engines import Heard
from ivr_bridge.providers.base import setting
from ivr_bridge.providers.upstream import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

STT_URL = "wss://api.voxnexus.ai/v1/stt/realtime"
TTS_URL = "wss://api.voxnexus.ai/v1/tts/realtime"
PHONE_RATE = 8000  # asked first: no resampling on the phone's side
FALLBACK_RATE = 16000  # asked once when the phone's rate is refused
UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
READY_TIMEOUT_S = 10.0
PING_INTERVAL_S = 30.0  # the doc's keep-alive
BATCH_MS = 100  # caller audio per `audio` message (the doc: 100-200 ms)
SPARE_MAX_AGE_S = 20.0  # an idle TTS socket older than this is not trusted for a reply
CLOSING = "voxnexus-tts-close"
AUDIO_IDLE_S = 15.0  # once a reply's text is all given, this long without audio is a failure


@dataclass(frozen=True)
class VoxNexusSettings:
    api_key: str = setting("VOXNEXUS_API_KEY", required=True, secret=True)
    stt_url: str = setting("VOXNEXUS_STT_URL", STT_URL, kind="ws_url")
    tts_url: str = setting("VOXNEXUS_TTS_URL", TTS_URL, kind="ws_url")
    voice_id: str = setting("VOXNEXUS_VOICE_ID")  # "": not sent (see the module's docstring)
    language: str = setting("VOXNEXUS_LANGUAGE", "en-US")


# -- events of the protocol classes ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """`ready`: the session's format and rate as the service accepted them."""

    format: str
    sample_rate: int
    request_id: str = ""
    language: str = ""
    voice_id: str = ""


@dataclass(frozen=True, slots=True)
class FlushDone:
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class ServerError:
    """`error {error, code, request_id}`."""

    code: str
    message: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class SpeechChunk:
    """TTS `audio`: PCM16 (None when the message carried no usable audio), and whether it
    is the reply's last."""

    pcm: Pcm | None
    final: bool


SttEvent = Accepted | Heard | FlushDone | ServerError
TtsEvent = Accepted | SpeechChunk | ServerError


class _Protocol:
    """What both sockets share: JSON parsing that never raises, `ready` and `error`."""

    format = ""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate  # asked in the last `init`
        self.accepted: Accepted | None = None
        # Messages skipped, by the fixed kinds of providers.base.SKIP_KINDS.
        self.skipped: Counter[str] = Counter()

    @property
    def rate(self) -> int:
        """The rate audio travels at: `ready`'s, else the one asked."""
        return self.accepted.sample_rate if self.accepted else self.sample_rate

    @staticmethod
    def ping_message() -> str:
        return json.dumps({"type": "ping"})

    def _parse(self, raw: str | bytes) -> dict[str, Any] | None:
        if isinstance(raw, bytes):
            self.skipped["binary"] += 1  # none documented
            return None
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            self.skipped["not_json"] += 1
            return None
        if not isinstance(message, dict):
            self.skipped["not_object"] += 1
            return None
        return message

    def _ready(self, message: dict[str, Any]) -> Accepted:
        rate = message.get("sample_rate")
        try:
            rate = int(rate) if rate not in (None, "") else self.sample_rate
        except (TypeError, ValueError):
            rate = self.sample_rate
        self.accepted = Accepted(
            str(message.get("format") or self.format),
            rate,
            str(message.get("request_id") or ""),
            str(message.get("language") or ""),
            str(message.get("voice_id") or ""),
        )
        return self.accepted

    @staticmethod
    def _error(message: dict[str, Any]) -> ServerError:
        return ServerError(
            str(message.get("code") or "error"),
            str(message.get("error") or message.get("message") or "")[:200],
            str(message.get("request_id") or ""),
        )


class SttProtocol(_Protocol):
    """The STT socket, sans I/O: messages to send, server messages to events."""

    format = "pcm"

    def __init__(self, language: str = "en-US", sample_rate: int = PHONE_RATE) -> None:
        super().__init__(sample_rate)
        self.language = language
        self.flushing = 0  # flushes sent and not yet answered by `flush_done`

    def init_message(self, sample_rate: int | None = None) -> str:
        if sample_rate is not None:
            self.sample_rate = sample_rate
        self.accepted = None
        return json.dumps(
            {
                "type": "init",
                "language": self.language,
                "format": self.format,
                "sample_rate": self.sample_rate,
                "enable_timestamps": False,  # not used: confidence is enough
                "enable_language_detection": False,
            }
        )

    @staticmethod
    def audio_message(pcm: bytes) -> str:
        return json.dumps({"type": "audio", "data": b64encode(pcm).decode()})

    def flush_message(self) -> str:
        self.flushing += 1
        return json.dumps({"type": "command", "command": "flush"})

    def receive(self, raw: str | bytes) -> list[SttEvent]:
        message = self._parse(raw)
        if message is None:
            return []
        kind = message.get("type")
        if kind == "transcript":
            return self._transcript(message)
        if kind == "flush_done":
            self.flushing = max(0, self.flushing - 1)
            # The finals of the flushed audio came before it: the turn's transcript is whole.
            return [Heard("", final=True, last=True), FlushDone(str(message.get("request_id") or ""))]
        if kind == "ready":
            return [self._ready(message)]
        if kind == "error":
            return [self._error(message)]
        self.skipped["unknown_type"] += 1  # e.g. `llm` (post-processed text), pongs
        return []

    def _transcript(self, message: dict[str, Any]) -> list[SttEvent]:
        text = message.get("text")
        if not isinstance(text, str):
            self.skipped["missing_field"] += 1
            return []
        final = message.get("is_final") is True
        if not final:
            return [Heard(text.strip(), False)] if text.strip() else []
        confidence = message.get("confidence")
        valid = isinstance(confidence, int | float) and not isinstance(confidence, bool)
        return [Heard(text.strip(), True, float(confidence) if valid else None, last=False)]


class TtsProtocol(_Protocol):
    """The TTS socket, sans I/O: messages to send, server messages to events."""

    format = "wav"

    def __init__(self, voice_id: str = "", language: str = "en-US", sample_rate: int = PHONE_RATE) -> None:
        super().__init__(sample_rate)
        self.voice_id = voice_id
        self.language = language
        self._carry = b""  # an odd byte of raw PCM, completed by the next chunk

    def init_message(self, sample_rate: int | None = None) -> str:
        if sample_rate is not None:
            self.sample_rate = sample_rate
        self.accepted = None
        message: dict[str, Any] = {"type": "init"}
        if self.voice_id:
            message["voice_id"] = self.voice_id
        message |= {"language": self.language, "format": self.format, "sample_rate": self.sample_rate}
        return json.dumps(message)

    @staticmethod
    def text_message(text: str, final: bool = False) -> str:
        return json.dumps({"type": "text", "text": text, "is_final": final})

    def receive(self, raw: str | bytes) -> list[TtsEvent]:
        message = self._parse(raw)
        if message is None:
            return []
        kind = message.get("type")
        if kind == "audio":
            return self._audio(message)
        if kind == "ready":
            return [self._ready(message)]
        if kind == "error":
            return [self._error(message)]
        self.skipped["unknown_type"] += 1
        return []

    def _audio(self, message: dict[str, Any]) -> list[TtsEvent]:
        final = message.get("is_final") is True
        pcm = self._decode(message.get("data"))
        if pcm is None and not final:
            return []
        return [SpeechChunk(pcm, final)]  # a final without audio still ends the reply

    def _decode(self, data: Any) -> Pcm | None:
        if data in (None, ""):
            return None
        if not isinstance(data, str):
            self.skipped["missing_field"] += 1
            return None
        try:
            audio = b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self.skipped["bad_base64"] += 1
            return None
        if is_wav(audio):  # per chunk: whether every chunk has its own header is undocumented
            self._carry = b""
            try:
                pcm = parse_wav(audio)
            except WavError:
                self.skipped["bad_wav"] += 1
                return None
        else:
            audio = self._carry + audio
            usable = len(audio) - len(audio) % 2
            self._carry = audio[usable:]
            pcm = Pcm(np.frombuffer(audio, dtype="<i2", count=usable // 2).astype(np.int16), self.rate)
        return pcm if pcm.samples.size else None


# -- the network half ------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, error: ServerError) -> None:
        super().__init__(error.code)
        self.error = error


def _with_token(url: str, key: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"] + [("token", key)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _scrub(text: str, key: str) -> str:
    """A server's words, fit for an error message: never the key, never long."""
    return (text.replace(key, "***") if key else text)[:120]


async def _connect(url: str, key: str, what: str) -> ClientConnection:
    try:
        return await websockets.connect(
            _with_token(url, key),
            additional_headers={"X-Api-Key": key},
            compression=None,  # audio does not compress, and deflate costs CPU per frame
            max_size=MAX_MESSAGE_BYTES,
            open_timeout=10,
            ping_interval=20,
            close_timeout=2,  # a cut reply's socket is closed on the hot path
        )
    except InvalidStatus as exc:
        raise ConnectionError(
            f"VoxNexus {what} refused the connection: HTTP {exc.response.status_code}"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        # Never the URL in the message: it carries the key.
        raise ConnectionError(f"VoxNexus {what} unreachable: {type(exc).__name__}") from None


async def _close(ws: ClientConnection) -> None:
    with contextlib.suppress(Exception):
        await ws.close()


async def _await_ready(ws: ClientConnection, protocol: SttProtocol | TtsProtocol) -> Accepted:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            for event in protocol.receive(await ws.recv()):
                if isinstance(event, Accepted):
                    return event
                if isinstance(event, ServerError):
                    raise _Refused(event)


async def _negotiate(
    url: str,
    key: str,
    what: str,
    protocol: SttProtocol | TtsProtocol,
    rates: list[int],
    formats: tuple[str, ...],
) -> tuple[ClientConnection, Accepted, int]:
    """Connect, `init` at the first of `rates`, and wait for `ready`; the next rate is tried
    on a fresh socket only when the format is refused. Returns the socket, what `ready`
    said, and the rate asked."""
    for attempt, rate in enumerate(rates):
        ws = await _connect(url, key, what)
        try:
            with contextlib.suppress(ConnectionClosed):  # why it closed may be waiting to be read
                await ws.send(protocol.init_message(rate))
            accepted = await _await_ready(ws, protocol)
        except _Refused as exc:
            await _close(ws)
            code, message = exc.error.code, _scrub(exc.error.message, key)
            if code == UNSUPPORTED_FORMAT and attempt + 1 < len(rates):
                log.info(
                    "VoxNexus %s refused %d Hz (%s); asking %d Hz", what, rate, message, rates[attempt + 1]
                )
                continue
            raise ConnectionError(f"VoxNexus {what} refused the session: {code} {message}".strip()) from None
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
            raise ConnectionError(
                f"VoxNexus {what} closed the session at its start: {code} {_scrub(reason, key)}".strip()
            ) from None
        except TimeoutError:
            await _close(ws)
            raise ConnectionError(
                f"VoxNexus {what} did not answer init within {READY_TIMEOUT_S:g} s"
            ) from None
        except BaseException:
            await _close(ws)
            raise
        if accepted.format not in formats or not MIN_RATE <= accepted.sample_rate <= MAX_RATE:
            await _close(ws)
            answered = f"{accepted.format!r} at {accepted.sample_rate} Hz"
            raise ConnectionError(f"VoxNexus {what} answered {answered}, which is not usable")
        return ws, accepted, rate
    raise AssertionError("no rate to ask")  # unreachable: rates is never empty


def _rates(preferred: int) -> list[int]:
    return [preferred] if preferred == FALLBACK_RATE else [preferred, FALLBACK_RATE]


class VoxNexusSpeechToText:
    """Caller audio in, transcripts out (`SpeechToText`), over one STT socket per call.

    `start()` again reconnects (after `receive` raised ConnectionError)."""

    def __init__(
        self,
        settings: VoxNexusSettings,
        *,
        sample_rate: int = PHONE_RATE,
        batch_ms: int = BATCH_MS,
        ping_interval: float = PING_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.rate = sample_rate  # the acknowledged rate once `start` has returned
        self.batch_ms = batch_ms
        self.ping_interval = ping_interval
        self.protocol = SttProtocol(settings.language, sample_rate)
        self.phrases: list[str] = []  # no documented hint field: kept, not sent
        self._ask = sample_rate  # the rate to ask on (re)connect; the fallback once refused
        self._ws: ClientConnection | None = None
        self._batch = bytearray()
        self._heard: deque[Heard] = deque()
        self._failure = "VoxNexus speech-to-text is not started"
        self._pinger: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._shutdown()
        self.protocol = SttProtocol(self.settings.language, self._ask)
        self._batch.clear()
        self._heard.clear()
        s = self.settings
        ws, accepted, asked = await _negotiate(
            s.stt_url, s.api_key, "speech-to-text", self.protocol, _rates(self._ask), ("pcm",)
        )
        self._ws, self._ask, self.rate, self._failure = ws, asked, accepted.sample_rate, ""
        self._pinger = asyncio.create_task(self._ping(ws), name="voxnexus-stt-ping")

    async def send(self, pcm: bytes) -> None:
        self._batch += pcm
        if len(self._batch) >= self.rate * 2 * self.batch_ms // 1000:
            await self._send_batch()

    async def flush(self) -> None:
        await self._send_batch()  # what is batched belongs to the utterance being finalised
        await self._send(self.protocol.flush_message())

    async def receive(self) -> Heard:
        while not self._heard:
            if self._failure or self._ws is None:
                raise ConnectionError(self._failure or "VoxNexus speech-to-text is not started")
            try:
                raw = await self._ws.recv()
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
                self._failure = (
                    f"VoxNexus speech-to-text closed: {code} {_scrub(reason, self.settings.api_key)}"
                )
                continue
            for event in self.protocol.receive(raw):
                if isinstance(event, Heard):
                    self._heard.append(event)
                elif isinstance(event, ServerError):
                    said = _scrub(event.message, self.settings.api_key)
                    self._failure = f"VoxNexus speech-to-text error: {event.code} {said}"
                    await _close(self._ws)
        return self._heard.popleft()  # what arrived before a failure is still delivered

    def expect(self, phrases: list[str]) -> None:
        self.phrases = list(phrases)

    async def close(self) -> None:
        await self._shutdown()
        self._failure = "VoxNexus speech-to-text is closed"

    async def _shutdown(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._ws is not None:
            await _close(self._ws)
            self._ws = None

    async def _send_batch(self) -> None:
        if self._batch:
            message = self.protocol.audio_message(bytes(self._batch))
            self._batch.clear()
            await self._send(message)

    async def _send(self, message: str) -> None:
        if self._ws is None or self._failure:
            return
        with contextlib.suppress(ConnectionClosed):  # receive() reports the close
            await self._ws.send(message)

    async def _ping(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_interval)
                await ws.send(self.protocol.ping_message())


@dataclass
class _Link:
    """One initialised TTS socket."""

    ws: ClientConnection
    protocol: TtsProtocol
    opened_at: float

    @property
    def usable(self) -> bool:
        return self.ws.state is State.OPEN and time.monotonic() - self.opened_at < SPARE_MAX_AGE_S


class VoxNexusTextToSpeech:
    """Bot replies spoken (`TextToSpeech`): one TTS socket per reply, opened by `open()`.

    `start()` checks the key and the voice with one handshake and keeps that socket for the
    first reply (the greeting), so the check costs no extra connection."""

    def __init__(self, settings: VoxNexusSettings, *, sample_rate: int = PHONE_RATE) -> None:
        self.settings = settings
        self.rate: int | None = None  # the last rate a socket acknowledged
        self._ask = sample_rate
        self._spare: _Link | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the replies' sockets, for close()

    async def start(self) -> None:
        if self._spare is None or not self._spare.usable:
            await self._discard_spare()
            self._spare = await self._connect()

    async def open(self) -> VoxNexusSynthesis:
        spare, self._spare = self._spare, None
        if spare is not None and not spare.usable:
            self._later(_close(spare.ws))
            spare = None

        async def link() -> _Link:
            return spare if spare is not None else await self._connect()

        synthesis = VoxNexusSynthesis(link, self.settings.api_key)
        self._tasks.add(synthesis.task)
        synthesis.task.add_done_callback(self._tasks.discard)
        return synthesis

    async def close(self) -> None:
        await self._discard_spare()
        tasks = list(self._tasks)
        for task in tasks:
            if task.get_name() != CLOSING:  # a socket being closed is left to finish that
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> _Link:
        s = self.settings
        protocol = TtsProtocol(s.voice_id, s.language, self._ask)
        ws, accepted, asked = await _negotiate(
            s.tts_url, s.api_key, "text-to-speech", protocol, _rates(self._ask), ("wav", "pcm")
        )
        self._ask, self.rate = asked, accepted.sample_rate
        return _Link(ws, protocol, time.monotonic())

    async def _discard_spare(self) -> None:
        if self._spare is not None:
            await _close(self._spare.ws)
            self._spare = None

    def _later(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run(), name=CLOSING)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class VoxNexusSynthesis:
    """One reply on its own TTS socket (`Synthesis`). A task connects and then reads the
    socket into a queue; `cancel()` stops that task, which closes the socket: whatever the
    service still sends is never read."""

    def __init__(self, link: Callable[[], Awaitable[_Link]], key: str = "") -> None:
        self._key = key  # only to keep it out of error messages
        self._link: _Link | None = None
        self._linked = asyncio.Event()  # set once connected, or once connecting has failed
        self._chunks: asyncio.Queue[Pcm | ConnectionError | None] = asyncio.Queue()
        self._given = 0  # pieces of text given to add()
        self._ended = False
        self._cancelled = False
        self._finished = False  # audio() has returned None: it keeps doing so
        self._stirred = time.monotonic()  # end(), or the last audio from the service
        self._failure: ConnectionError | None = None
        self.task = asyncio.create_task(self._run(link), name="voxnexus-tts")

    async def add(self, text: str) -> None:
        if self._cancelled or self._ended or not text.strip():
            return
        self._given += 1
        await self._linked.wait()
        if self._link is not None and not self._cancelled:
            await self._send(TtsProtocol.text_message(text, False))

    async def end(self) -> None:
        if self._cancelled or self._ended:
            return
        self._ended, self._stirred = True, time.monotonic()
        if not self._given:  # nothing to say: no audio will come
            self._chunks.put_nowait(None)
            self.task.cancel()
            return
        await self._linked.wait()
        if self._link is not None and not self._cancelled:
            await self._send(TtsProtocol.text_message("", True))

    async def audio(self) -> Pcm | None:
        if self._cancelled or self._finished:
            return None
        if self._failure is not None:
            raise self._failure
        item = await self._next()
        if self._cancelled or item is None:
            self._finished = True
            return None
        if isinstance(item, ConnectionError):
            self._failure = item
            raise item
        return item

    async def _next(self) -> Pcm | ConnectionError | None:
        """The next queued item. Before end() a pause is the dialogue's; after it, a service
        that sends nothing for AUDIO_IDLE_S has stalled (checked each second, so a wait that
        began before end() is bounded too)."""
        while True:
            try:
                return await asyncio.wait_for(self._chunks.get(), 1.0)
            except TimeoutError:
                if self._ended and time.monotonic() - self._stirred > AUDIO_IDLE_S:
                    self.task.cancel()
                    return ConnectionError(f"VoxNexus text-to-speech sent no audio for {AUDIO_IDLE_S:g} s")

    async def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._chunks.put_nowait(None)  # wakes an audio() waiting
        self.task.cancel()  # its `finally` closes the socket

    @property
    def request_id(self) -> str:
        """The service's id of this reply's socket ("" before `ready`)."""
        accepted = self._link.protocol.accepted if self._link else None
        return accepted.request_id if accepted else ""

    async def _send(self, message: str) -> None:
        assert self._link is not None
        with contextlib.suppress(ConnectionClosed):  # the reading task reports the close
            await self._link.ws.send(message)

    async def _run(self, link: Callable[[], Awaitable[_Link]]) -> None:
        try:
            self._link = await link()
        except ConnectionError as exc:
            self._chunks.put_nowait(exc)
            return
        except Exception as exc:  # a bug must not leave audio() waiting forever
            log.exception("VoxNexus text-to-speech failed to connect")
            self._chunks.put_nowait(ConnectionError(f"VoxNexus text-to-speech failed: {type(exc).__name__}"))
            return
        finally:
            self._linked.set()
        try:
            await self._read(self._link)
        except Exception as exc:
            log.exception("VoxNexus text-to-speech failed")
            self._chunks.put_nowait(ConnectionError(f"VoxNexus text-to-speech failed: {type(exc).__name__}"))
        finally:
            await _close(self._link.ws)

    async def _read(self, link: _Link) -> None:
        spoke = False
        try:
            async for raw in link.ws:
                for event in link.protocol.receive(raw):
                    if isinstance(event, SpeechChunk):
                        self._stirred = time.monotonic()
                        if event.pcm is not None:
                            spoke = True
                            self._chunks.put_nowait(event.pcm)
                        if event.final:
                            self._chunks.put_nowait(None)
                            return
                    elif isinstance(event, ServerError):
                        if self._ended:  # e.g. the empty closing text refused: the reply is over
                            log.warning("VoxNexus text-to-speech error after the reply's end: %s", event.code)
                            self._chunks.put_nowait(None)
                            return
                        said = _scrub(event.message, self._key)
                        failure = ConnectionError(f"VoxNexus text-to-speech error: {event.code} {said}")
                        self._chunks.put_nowait(failure)
                        return
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            self._chunks.put_nowait(ConnectionError(f"VoxNexus text-to-speech closed: {code}"))
            return
        # A normal close: the reply is complete if it had begun and its text was all given.
        if self._ended and spoke:
            self._chunks.put_nowait(None)
        else:
            self._chunks.put_nowait(ConnectionError("VoxNexus text-to-speech closed before the reply's end"))
