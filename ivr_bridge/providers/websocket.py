"""The session half shared by the realtime voice APIs (OpenAI, ElevenLabs, NavTalk).

A provider supplies a sans-I/O protocol object (messages in, events out, `outbox` of
messages to send in answer, `classify` of closes) and a small subclass saying where to
connect and when the session is ready (the formats it acknowledged). This class does the
rest the same way for all: connect (`upstream.py`: no compression, secret-free errors),
send the opening messages, hold the events that arrive before the session is ready,
answer from the outbox (pongs, tool results), and report one sticky `Closed`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from ivr_bridge.audio import AudioFormat
from ivr_bridge.providers.base import NORMAL_CLOSE, Closed, Ready, VoiceEvent
from ivr_bridge.providers.upstream import UpstreamClosed, UpstreamSocket

READY_TIMEOUT_S = 15.0


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
        self._ws: UpstreamSocket | None = None
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
        self._ws = await UpstreamSocket.connect(await self._url(), self._headers())
        try:
            for message in self._opening():
                await self._ws.send(message)
            async with asyncio.timeout(READY_TIMEOUT_S):
                while (ready := self._negotiated()) is None:
                    self._pending += await self._take(await self._ws.recv())
        except UpstreamClosed as exc:
            raise ConnectionError(
                f"voice API closed the session at its start: {exc.code} {exc.reason[:80]}".strip()
            ) from None
        except TimeoutError:
            raise ConnectionError(
                f"voice API did not accept the session within {READY_TIMEOUT_S:g} s"
            ) from None
        return ready

    async def send_audio(self, audio: bytes) -> None:
        await self._send(self.protocol.audio_message(audio))

    def audio_sender(self) -> Callable[[bytes], None] | None:
        ws = self._ws
        if ws is None or self._closed is not None or not ws.sends_now:
            return None
        return self._send_audio_now

    def _send_audio_now(self, audio: bytes) -> None:
        assert self._ws is not None
        self._ws.send_now(self.protocol.audio_message(audio))

    async def receive(self) -> VoiceEvent:
        while not self._pending and self._closed is None:
            assert self._ws is not None, "receive() before connect()"
            try:
                raw = await self._ws.recv()
            except UpstreamClosed as exc:
                self._closed = self.protocol.classify(exc.code, exc.reason)
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
        with contextlib.suppress(UpstreamClosed):  # receive() reports the close
            await self._ws.send(message)
