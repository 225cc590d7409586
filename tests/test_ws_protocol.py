"""The Media Stream's WebSocket protocol (ivr_bridge/ws_protocol.py): its own frame path reads
and writes what websockets' parser and serializer would, on random streams cut at random,
and reading pauses only when frames pile up. Every real-socket test runs through it as
well; these check what a socket cannot show."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from ivr_bridge.ws_protocol import FRAME_SINK, HIGH_WATER, StreamWebSocketProtocol

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


MAX_SIZE = 70_000  # past 65535: a frame's 64-bit length is read too


class WebsocketsReads(StreamWebSocketProtocol):
    """The same protocol with every frame left to websockets (the reference)."""

    def data_received(self, data: bytes) -> None:
        self._frames_ours = False
        super().data_received(data)

    async def send(self, message: Any) -> None:
        await super(StreamWebSocketProtocol, self).send(message)


async def opened(
    app: Any, protocol_class: type[StreamWebSocketProtocol]
) -> tuple[StreamWebSocketProtocol, Transport]:
    """A protocol on a fake transport, its handshake read and answered by `app`."""
    config = uvicorn.Config(app, ws=protocol_class, ws_max_size=MAX_SIZE, log_level="critical")
    config.load()
    protocol = protocol_class(config, ServerState(), {})
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(HANDSHAKE)
    await wait_for(lambda: transport.written.startswith(b"HTTP/1.1 101"))
    return protocol, transport


@pytest.mark.parametrize("protocol_class", [StreamWebSocketProtocol, WebsocketsReads])
async def test_reading_pauses_only_when_frames_pile_up_and_resumes_once_taken(
    protocol_class: type[StreamWebSocketProtocol],
) -> None:
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

    protocol, transport = await opened(app, protocol_class)

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


FAULTS = ("bad utf-8", "too large", "unmasked", "rsv")


def random_stream(rng: random.Random) -> bytes:
    """Frames as a client could send them, at most one of them wrong: the first ends the
    connection either way (with two in one read, which is reported may differ). Text that is
    not UTF-8 ends the stream: websockets' parser reads on past it to the end of its read
    (answering pings the connection will never see answered), the fast path stops there."""
    kinds = ["text", "binary", "ping", "pong", "fragments", "close", "long", *FAULTS]
    weights = [40, 10, 5, 3, 3, 1, 3, 1, 1, 1, 1]
    frames = []
    for _ in range(rng.randrange(1, 25)):
        kind = rng.choices(kinds, weights)[0]
        if kind in FAULTS:
            weights = weights[: -len(FAULTS)] + [0] * len(FAULTS)
        frames += random_frame(rng, kind)
        if kind == "bad utf-8":
            break
    return b"".join(frames)


def random_frame(rng: random.Random, kind: str) -> list[bytes]:
    text = "".join(rng.choice('aé€😀{}:,"0') for _ in range(rng.choice([0, 1, 60, 125, 126, 400])))
    masked = {"mask": True, "extensions": []}
    if kind == "text":
        return [Frame(Opcode.TEXT, text.encode()).serialize(**masked)]
    if kind == "long":  # the longest 16-bit length, the shortest 64-bit one, the limit
        return [Frame(Opcode.BINARY, rng.randbytes(rng.choice([65535, 65536, MAX_SIZE]))).serialize(**masked)]
    if kind == "binary":
        return [Frame(Opcode.BINARY, rng.randbytes(rng.randrange(0, 300))).serialize(**masked)]
    if kind == "ping":
        return [Frame(Opcode.PING, rng.randbytes(rng.randrange(0, 126))).serialize(**masked)]
    if kind == "pong":
        return [Frame(Opcode.PONG, rng.randbytes(4)).serialize(**masked)]
    if kind == "fragments":
        data = text.encode()
        return [
            Frame(Opcode.TEXT, data[:3], fin=False).serialize(**masked),
            Frame(Opcode.PING, b"between").serialize(**masked),
            Frame(Opcode.CONT, data[3:]).serialize(**masked),
        ]
    if kind == "bad utf-8":
        return [Frame(Opcode.TEXT, b"ok \xff\xfe").serialize(**masked)]
    if kind == "too large":
        return [Frame(Opcode.BINARY, bytes(MAX_SIZE + 1)).serialize(**masked)]
    if kind == "unmasked":
        return [Frame(Opcode.TEXT, b"{}").serialize(mask=False, extensions=[])]
    if kind == "rsv":
        valid = Frame(Opcode.TEXT, b"{}").serialize(**masked)
        return [bytes([valid[0] | 0x40]) + valid[1:]]  # RSV1, no extension negotiated
    return [Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(**masked)]


async def accepted(
    protocol_class: type[StreamWebSocketProtocol],
) -> tuple[list[Any], StreamWebSocketProtocol, Transport]:
    """A protocol whose app has accepted the stream and records what it receives."""
    received: list[Any] = []

    async def recording_app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            received.append(message)
            if message["type"] == "websocket.disconnect":
                return

    protocol, transport = await opened(recording_app, protocol_class)
    return received, protocol, transport


async def read_through(
    protocol_class: type[StreamWebSocketProtocol], stream: bytes, cuts: list[int]
) -> tuple[list[Any], bytes]:
    """What the app receives, and what the server writes after its handshake response."""
    received, protocol, transport = await accepted(protocol_class)
    handshake = len(transport.written)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        protocol.data_received(stream[start:end])
    protocol.connection_lost(None)
    await wait_for(lambda: received and received[-1]["type"] == "websocket.disconnect")
    return received, bytes(transport.written[handshake:])


async def test_the_fast_path_reads_every_stream_as_websockets_does() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        stream = random_stream(rng)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 12))))
        ours = await read_through(StreamWebSocketProtocol, stream, cuts)
        reference = await read_through(WebsocketsReads, stream, cuts)
        assert ours == reference, f"seed {seed}"


async def test_the_fast_path_writes_the_frames_websockets_writes() -> None:
    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        frames = []
        for protocol_class in (StreamWebSocketProtocol, WebsocketsReads):
            _, protocol, transport = await accepted(protocol_class)
            start = len(transport.written)
            await protocol.send({"type": "websocket.send", "text": "é" * (size // 2) + "a" * (size % 2)})
            await protocol.send(
                {"type": "websocket.send", "bytes": bytes(range(256)) * (size // 256) + bytes(size % 256)}
            )
            frames.append(bytes(transport.written[start:]))
            protocol.connection_lost(None)
        assert frames[0] == frames[1], size


async def test_data_frames_after_the_accept_never_reach_websockets_parser() -> None:
    """The point of the fast path: websockets parses the control frames alone (both paths
    give the same result, so only this shows which one read them)."""
    received, protocol, transport = await accepted(StreamWebSocketProtocol)
    parsed: list[bytes] = []
    receive_data = protocol.conn.receive_data
    protocol.conn.receive_data = lambda data: parsed.append(bytes(data)) or receive_data(data)  # type: ignore[method-assign]
    ping = Frame(Opcode.PING, b"still there?").serialize(mask=True, extensions=[])
    handshake = len(transport.written)
    protocol.data_received(frame("one") + frame("two") + ping + frame("three"))
    protocol.data_received(frame("four"))
    await wait_for(lambda: len(received) == 4)
    assert [message["text"] for message in received] == ["one", "two", "three", "four"]
    assert parsed == [ping]
    assert transport.written[handshake:] == Frame(Opcode.PONG, b"still there?").serialize(
        mask=False, extensions=[]
    )
    protocol.connection_lost(None)


@pytest.mark.parametrize("protocol_class", [StreamWebSocketProtocol, WebsocketsReads])
async def test_a_sink_is_offered_text_only_with_nothing_queued_and_may_decline(
    protocol_class: type[StreamWebSocketProtocol], caplog: pytest.LogCaptureFixture
) -> None:
    """The call's read-callback path (FRAME_SINK): a message overtakes none queued before
    it, and what the sink declines, or cannot take, reaches `receive()` in order."""
    offered: list[str] = []
    reading = asyncio.Event()
    received: list[Any] = []

    def sink(text: str) -> bool:
        offered.append(text)
        if text == "boom":
            raise RuntimeError("a bug in the sink")
        return not text.startswith("no")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        scope["extensions"][FRAME_SINK](sink)
        while True:
            await reading.wait()
            message = await receive()
            received.append(message.get("text", message.get("bytes")))
            if message["type"] == "websocket.disconnect":
                return

    protocol, _ = await opened(app, protocol_class)
    await wait_for(lambda: protocol._sink is not None)
    protocol.data_received(frame("a"))  # taken at once, from the read callback
    assert offered == ["a"] and protocol.queue.qsize() == 0
    protocol.data_received(frame("no: queued") + frame("b") + binary_frame(b"\x01"))
    assert offered == ["a", "no: queued"]  # "b" waits behind it; binary is never offered
    reading.set()
    await wait_for(lambda: len(received) == 3)
    protocol.data_received(frame("c"))
    assert offered[-1] == "c" and received == ["no: queued", "b", b"\x01"]

    protocol.data_received(frame("boom") + frame("d"))  # the failing sink is dropped, logged
    await wait_for(lambda: len(received) == 5)
    assert received[3:] == ["boom", "d"] and offered[-1] == "boom"
    assert "a frame sink failed" in caplog.text
    protocol.connection_lost(None)


def binary_frame(data: bytes) -> bytes:
    return Frame(Opcode.BINARY, data).serialize(mask=True, extensions=[])
