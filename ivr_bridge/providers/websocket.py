"""The socket half shared by the realtime voice APIs (OpenAI, ElevenLabs, NavTalk).

A provider supplies a sans-I/O protocol object (messages in, events out, `outbox` of
messages to send in answer, `classify` of closes) and a small subclass saying where to
connect and when the session is ready (the formats it acknowledged). This class does the
rest the same way for all: connect without compression and with secret-free errors, send
the opening messages, hold the events that arrive before the session is ready, answer
from the outbox (pongs, tool results), and report one sticky `Closed`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from ivr_bridge.audio import AudioFormat
from ivr_bridge.providers.base import NORMAL_CLOSE, Closed, Ready, VoiceEvent

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # generous for audio in base64 JSON; larger closes with 1009
READY_TIMEOUT_S = 15.0


def write_now(ws: ClientConnection, message: str | bytes) -> bool:
    """Write `message` at once if nothing could make `ws.send()` wait; False if not written.

    `send()` runs an async context manager and a drain for every message: at one message
    per 20 ms per call that overhead is paid 50 times a second (BENCHMARKS.md, issue 14).
    When the connection is open and its transport is not paused by flow control, the frame
    goes straight through the connection's sans-I/O protocol to the transport, as `send()`
    itself would put it. Nobody here sends fragmented messages, so none can be in progress."""
    if ws.protocol.state is not State.OPEN or ws.paused or ws.transport.is_closing():
        return False
    if isinstance(message, str):
        ws.protocol.send_text(message.encode())
    else:
        ws.protocol.send_binary(message)
    ws.send_data()
    return True


async def send_message(ws: ClientConnection, message: str | bytes) -> None:
    """`ws.send(message)`, written at once when nothing could make it wait (`write_now`);
    otherwise `send()` does everything (waits, raises ConnectionClosed)."""
    if not write_now(ws, message):
        await ws.send(message)


class RealtimeProtocol(Protocol):
    outbox: list[str]

    def receive(self, raw: str | bytes) -> list[VoiceEvent]: ...

    def classify(self, code: int, reason: str) -> Closed: ...

    @staticmethod
    def audio_message(audio: bytes) -> str: ...


class WebSocketSession:
    """One call's session over a WebSocket (`VoiceSession`); subclasses name the endpoint."""

    name = "websocket"

    def __init__(self, protocol: RealtimeProtocol) -> None:
        self.protocol = protocol
        self._ws: ClientConnection | None = None
        self._pending: list[VoiceEvent] = []  # events not yet handed to the call
        self._closed: Closed | None = None

    # -- what a provider says ---------------------------------------------------------------

    async def _url(self) -> str:
        raise NotImplementedError

    def _headers(self) -> dict[str, str] | None:
        return None

    def _opening(self) -> list[str]:
        """Messages sent as soon as the socket is open."""
        return []

    def _negotiated(self) -> AudioFormat | None:
        """The format caller audio goes in, once the API has acknowledged it (None: not yet).
        Raises ConnectionError if the session cannot be used."""
        raise NotImplementedError

    # -- VoiceSession -----------------------------------------------------------------------

    async def connect(self) -> AudioFormat:
        try:
            self._ws = await websockets.connect(
                await self._url(),
                additional_headers=self._headers(),
                compression=None,  # audio does not compress, and deflate costs CPU per frame
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=10,
                ping_interval=20,
            )
        except InvalidStatus as exc:
            raise ConnectionError(
                f"voice API refused the connection: HTTP {exc.response.status_code}"
            ) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            # The message never carries the URL: it may carry a key or a license.
            raise ConnectionError(f"voice API unreachable: {type(exc).__name__}") from None
        try:
            for message in self._opening():
                await self._ws.send(message)
            async with asyncio.timeout(READY_TIMEOUT_S):
                while (ready := self._negotiated()) is None:
                    self._pending += await self._take(await self._ws.recv())
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
            raise ConnectionError(
                f"voice API closed the session at its start: {code} {reason[:80]}".strip()
            ) from None
        except TimeoutError:
            raise ConnectionError(
                f"voice API did not accept the session within {READY_TIMEOUT_S:g} s"
            ) from None
        return ready

    async def send_audio(self, audio: bytes) -> None:
        await self._send(self.protocol.audio_message(audio))

    async def receive(self) -> VoiceEvent:
        while not self._pending and self._closed is None:
            assert self._ws is not None, "receive() before connect()"
            try:
                raw = await self._ws.recv()
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
                self._closed = self.protocol.classify(code, reason)
                break
            self._pending += await self._take(raw)
        if self._pending:
            return self._pending.pop(0)
        assert self._closed is not None
        return self._closed  # sticky: every later call returns it too

    async def close(self, code: int = NORMAL_CLOSE) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close(code)
        if self._closed is None:
            self._closed = Closed(code)

    # -- shared -------------------------------------------------------------------------------

    async def _take(self, raw: str | bytes) -> list[VoiceEvent]:
        events = [e for e in self.protocol.receive(raw) if not isinstance(e, Ready)]
        while self.protocol.outbox:  # pongs, tool results: answered at once
            await self._send(self.protocol.outbox.pop(0))
        return events

    async def _send(self, message: str) -> None:
        if self._ws is None or self._closed is not None:
            return
        with contextlib.suppress(ConnectionClosed):  # receive() reports the close
            await send_message(self._ws, message)
