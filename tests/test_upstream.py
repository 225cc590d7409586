"""The voice API's socket (`providers/upstream.py`) against a real WebSocket server (websockets)
on loopback: whole messages, closes and their codes, refusals without secrets, flow control."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from ivr_bridge.providers.upstream import UpstreamClosed, UpstreamSocket, _Listener

from .support import eventually

TIMEOUT = 10.0
SECRET = "sk_live_do_not_log_me"

Handler = Callable[[ServerConnection], Awaitable[None]]


class Server:
    """A websockets server running `handler` for each connection; `done` once one has ended."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.connections: list[ServerConnection] = []
        self.done = asyncio.Event()
        self.url = ""

    async def _serve(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        try:
            assert self.handler is not None
            await self.handler(ws)
        finally:
            self.done.set()


async def close_after(upstream: UpstreamSocket) -> UpstreamClosed:
    """How the socket closed, read as a session does: recv() until it raises."""
    with pytest.raises(UpstreamClosed) as closed:
        await asyncio.wait_for(upstream.recv(), TIMEOUT)
    return closed.value


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    fake = Server()
    async with serve(fake._serve, "127.0.0.1", 0, compression=None, max_size=None) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}/v1?key={SECRET}"
        yield fake


async def test_messages_arrive_whole_and_in_order(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("one")
        await ws.send(b"\x00\x01two")
        await ws.send(["fr", "agm", "ented ✓"])  # one text message in three frames
        await ws.send([b"\xff", b"\xfe"])
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    received = [await asyncio.wait_for(upstream.recv(), TIMEOUT) for _ in range(4)]
    assert received == ["one", b"\x00\x01two", "fragmented ✓", b"\xff\xfe"]
    await upstream.close()


async def test_sends_text_and_binary_and_closes_with_its_code(server: Server) -> None:
    got: list[str | bytes] = []

    async def handler(ws: ServerConnection) -> None:
        got.extend([await ws.recv(), await ws.recv()])
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url, {"Authorization": f"Bearer {SECRET}"})
    await upstream.send('{"type":"hello","text":"déjà ✓"}')
    await upstream.send(b"\x01\x02\x03")
    await upstream.close(4000)
    await asyncio.wait_for(server.done.wait(), TIMEOUT)
    assert got == ['{"type":"hello","text":"déjà ✓"}', b"\x01\x02\x03"]
    assert server.connections[0].request.headers["Authorization"] == f"Bearer {SECRET}"
    assert server.connections[0].close_code == 4000
    with pytest.raises(UpstreamClosed):
        await upstream.send("after the close")


async def test_an_error_before_the_close_is_read_then_the_close_code(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send('{"type":"error","message":"invalid key"}')
        await ws.close(4001, "unauthorized")

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    assert await asyncio.wait_for(upstream.recv(), TIMEOUT) == '{"type":"error","message":"invalid key"}'
    closed = await close_after(upstream)
    assert (closed.code, closed.reason) == (4001, "unauthorized")
    with pytest.raises(UpstreamClosed):  # sticky
        await upstream.recv()


async def test_a_close_without_a_code_is_1005(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        ws.protocol.send_close()  # no status code at all
        ws.send_data()
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    assert (await close_after(upstream)).code == 1005


async def test_a_connection_that_dies_is_1006(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("last words")
        ws.transport.abort()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    assert await asyncio.wait_for(upstream.recv(), TIMEOUT) == "last words"
    assert (await close_after(upstream)).code == 1006


async def test_a_message_over_the_limit_closes_with_1009(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send([b"x" * 600, b"x" * 600])  # 1200 bytes in two frames, each within
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url, max_message_bytes=1000)
    assert (await close_after(upstream)).code == 1009
    await asyncio.wait_for(server.done.wait(), TIMEOUT)
    assert server.connections[0].close_code == 1009


async def test_one_frame_over_the_limit_closes_with_1009(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"x" * 1200)
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url, max_message_bytes=1000)
    assert (await close_after(upstream)).code == 1009


async def test_text_that_is_not_utf8_closes_with_1007(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        ws.protocol.send_text(b"\xff\xfe not text")  # sent as is: websockets does not check
        ws.send_data()
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    assert (await close_after(upstream)).code == 1007


async def test_pings_are_answered(server: Server) -> None:
    async def handler(ws: ServerConnection) -> None:
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, TIMEOUT)  # raises if no pong came back
        await ws.send("pong seen")
        await ws.wait_closed()

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    assert await asyncio.wait_for(upstream.recv(), TIMEOUT) == "pong seen"
    await upstream.close()


async def test_a_refused_handshake_names_the_status_not_the_url() -> None:
    def refuse(connection: ServerConnection, request) -> Response:
        return Response(403, "Forbidden", Headers(), b"no")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=refuse) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionError) as refused:
            await UpstreamSocket.connect(f"ws://127.0.0.1:{port}/v1?key={SECRET}")
    assert str(refused.value) == "voice API refused the connection: HTTP 403"


async def test_a_redirect_is_not_followed() -> None:
    def redirect(connection: ServerConnection, request) -> Response:
        return Response(302, "Found", Headers({"Location": "ws://127.0.0.1:9/elsewhere"}), b"")

    async with serve(lambda ws: ws.wait_closed(), "127.0.0.1", 0, process_request=redirect) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionError) as refused:
            await UpstreamSocket.connect(f"ws://127.0.0.1:{port}/v1", {"Authorization": SECRET})
    assert "HTTP 302" in str(refused.value)


async def test_an_unreachable_api_is_one_line_without_the_url() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionError) as unreachable:
        await UpstreamSocket.connect(f"ws://127.0.0.1:{port}/v1?key={SECRET}")
    message = str(unreachable.value)
    assert message.startswith("voice API unreachable: ") and SECRET not in message and "\n" not in message


async def test_send_waits_while_the_api_does_not_read_and_goes_on_when_it_does(server: Server) -> None:
    reading = asyncio.Event()
    got = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal got
        ws.transport.pause_reading()  # the API stops reading: the kernel's buffers fill, then ours
        await reading.wait()
        ws.transport.resume_reading()
        async for message in ws:
            got += len(message)

    server.handler = handler
    upstream = await UpstreamSocket.connect(server.url)
    chunk, chunks = b"\x00" * 65536, 1024  # 64 MB: more than loopback's buffers hold
    held = False

    async def send_all() -> None:
        nonlocal held
        for _ in range(chunks):
            held = held or upstream._writable is not None
            await upstream.send(chunk)

    sending = asyncio.create_task(send_all())
    try:
        await eventually(lambda: upstream._writable is not None or sending.done(), TIMEOUT, "a held send")
        assert not sending.done()  # it waits for the API instead of buffering without bound
    finally:
        reading.set()
    await asyncio.wait_for(sending, TIMEOUT * 3)
    assert held
    await upstream.close()
    await asyncio.wait_for(server.done.wait(), TIMEOUT)
    assert got == chunks * len(chunk)


async def test_a_held_send_ends_when_the_connection_does() -> None:
    upstream = UpstreamSocket()
    listener = _Listener(upstream)
    listener.pause_writing()  # as the transport calls it past its high-water mark
    held = asyncio.create_task(upstream.send("frame"))
    await asyncio.sleep(0)
    assert not held.done()

    class Gone:  # a transport that closed without a close frame either way
        close_handshake = None

    upstream._disconnected(Gone())  # type: ignore[arg-type]
    with pytest.raises(UpstreamClosed) as closed:
        await asyncio.wait_for(held, TIMEOUT)
    assert closed.value.code == 1006


async def test_the_proxy_the_environment_names_is_used(server: Server, monkeypatch) -> None:
    """An HTTP CONNECT proxy named by HTTPS_PROXY carries the connection, as it did under
    websockets' client (a deployment behind a corporate proxy keeps working)."""
    tunnels: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(head.split(b"\r\n", 1)[0])
        host, port = head.split()[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def handler(ws: ServerConnection) -> None:
        await ws.send(await ws.recv())
        await ws.wait_closed()

    server.handler = handler
    proxy_server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    async with proxy_server:
        proxy_port = proxy_server.sockets[0].getsockname()[1]
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        upstream = await UpstreamSocket.connect(server.url)
        await upstream.send("through the proxy")
        assert await asyncio.wait_for(upstream.recv(), TIMEOUT) == "through the proxy"
        await upstream.close()
    port = server.url.split(":")[2].split("/")[0]
    assert tunnels == [f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode()]


async def test_wss_checks_the_api_certificate(tmp_path, monkeypatch) -> None:
    """Every real voice API is wss://: the socket verifies the API's certificate against the
    system's trust store (here one that trusts a certificate made for the test)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def echo(ws: ServerConnection) -> None:
        await ws.send(await ws.recv())
        await ws.wait_closed()

    async with serve(echo, "127.0.0.1", 0, ssl=tls) as ws_server:
        url = f"wss://127.0.0.1:{ws_server.sockets[0].getsockname()[1]}/v1?key={SECRET}"
        with pytest.raises(ConnectionError) as untrusted:
            await UpstreamSocket.connect(url)
        assert str(untrusted.value) == "voice API unreachable: SSLCertVerificationError"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        upstream = await UpstreamSocket.connect(url)
        await upstream.send("over TLS")
        assert await asyncio.wait_for(upstream.recv(), TIMEOUT) == "over TLS"
        await upstream.close()


@pytest.mark.parametrize("url", [f"http://127.0.0.1:9/v1?key={SECRET}", f"wss://[::1/v1?key={SECRET}"])
async def test_a_url_that_is_no_websocket_url_is_one_line_without_the_url(url: str) -> None:
    with pytest.raises(ConnectionError) as refused:
        await UpstreamSocket.connect(url)
    assert str(refused.value).startswith("voice API unreachable: ") and SECRET not in str(refused.value)
