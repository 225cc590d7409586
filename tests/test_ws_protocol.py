"""The Media Stream's WebSocket protocol pauses reading only when frames pile up
(ivr_bridge/ws_protocol.py). Every real-socket test runs through it as well; this one
counts the pauses, which a socket cannot show."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from ivr_bridge.ws_protocol import HIGH_WATER, StreamWebSocketProtocol

HANDSHAKE = (
    b"GET /media-stream HTTP/1.1\r\nHost: bridge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.pauses = self.resumes = 0

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def frame(text: str) -> bytes:
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True, extensions=[])


async def wait_for(predicate: Any) -> None:
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_reading_pauses_only_when_frames_pile_up_and_resumes_once_taken() -> None:
    reading = asyncio.Event()
    got: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            await reading.wait()
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            got.append(message["text"])

    config = uvicorn.Config(app, ws=StreamWebSocketProtocol, log_level="warning")
    config.load()
    protocol = StreamWebSocketProtocol(config, ServerState(), {})
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(HANDSHAKE)
    await wait_for(lambda: transport.written.startswith(b"HTTP/1.1 101"))

    # An app that keeps up: no pause at all (uvicorn alone pauses and resumes per frame).
    reading.set()
    for i in range(3 * HIGH_WATER):
        protocol.data_received(frame(f"kept up {i}"))
        await wait_for(lambda i=i: len(got) == i + 1)
    assert (transport.pauses, transport.resumes) == (0, 0)

    # An app that falls behind: paused once the high-water mark is reached, not before.
    reading.clear()
    for i in range(HIGH_WATER - 1):  # the app, already waiting in receive(), takes the first
        protocol.data_received(frame(f"behind {i}"))
    assert transport.pauses == 0
    while protocol.queue.qsize() < HIGH_WATER:
        protocol.data_received(frame("more"))
    assert transport.pauses == 1
    protocol.data_received(frame("while paused"))  # bytes already read still arrive
    assert transport.pauses == 1

    # Once the app has taken everything, reading resumes, once.
    waiting = protocol.queue.qsize()
    reading.set()
    await wait_for(lambda: protocol.queue.qsize() == 0 and transport.resumes > 0)
    assert transport.resumes == 1
    assert got[-1] == "while paused" and len(got) >= 3 * HIGH_WATER + waiting
    protocol.connection_lost(None)
