"""The socket to a voice API: a WebSocket client on picows, as whole messages in and out.

Every caller frame of every call is written here, so this is the hot path's one write.
picows frames and masks in C and writes each message straight to the transport; with
websockets' client, which this replaced, each message went through Python framing and
masking, and each received one through a queue: with picows the bridge took 0.89-0.95x the
CPU on both audio paths (BENCHMARKS.md, issue 14, sixth round). It negotiates no
compression, which audio would not repay.

picows hands over frames through callbacks. `UpstreamSocket` makes of them what a voice
session needs: `recv()` of whole messages (fragments joined, size bounded), `send()` that
waits only while flow control holds the socket, the close code and reason the API sent
(or the one this side sent, or 1006 for a connection that just died), and errors that
never carry the URL (it may hold a key or a license).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import picows
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from websockets.exceptions import InvalidURI
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

OPEN_TIMEOUT_S = 10.0  # TCP, TLS and the upgrade
CLOSE_TIMEOUT_S = 5.0  # for the API to answer this side's close before the socket is cut
PING_IDLE_S = 20.0  # a ping when nothing has arrived for this long; no pong as long again ends it
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # generous for audio in base64 JSON; larger closes with 1009
ABNORMAL_CLOSURE = 1006  # no close frame either way: the connection just died
NO_STATUS = 1005  # a close frame without a code

# picows logs every connection and disconnection at INFO (two lines a call), each pause of
# flow control at WARNING and what a peer got wrong at ERROR, none naming the call. Each
# ends in a close that the session reports with the call's name (1006, 1009, 1011...).
logging.getLogger("picows").setLevel(logging.CRITICAL)


class UpstreamClosed(Exception):
    """The socket is closed: `code` and `reason` as the API sent them, else as this side did."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class UpstreamSocket:
    """One voice session's WebSocket. Make it with `await UpstreamSocket.connect(url)`."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._max_message_bytes = max_message_bytes
        self._transport: WSTransport | None = None
        self._inbox: deque[str | bytes] = deque()
        self._arrival: asyncio.Future[None] | None = None  # what recv() waits on
        self._writable: asyncio.Future[None] | None = None  # set while flow control holds writes
        self._fragments: list[bytes] = []
        self._fragments_text = False
        self._fragments_size = 0
        self.closed: UpstreamClosed | None = None

    @classmethod
    async def connect(
        cls, url: str, headers: dict[str, str] | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES
    ) -> UpstreamSocket:
        """Raises ConnectionError with a message fit for a log line (no URL, no headers)."""
        socket = cls(max_message_bytes)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await picows.ws_connect(
                    lambda: _Listener(socket),
                    url,
                    extra_headers=headers,
                    websocket_handshake_timeout=OPEN_TIMEOUT_S,
                    # One over: a frame of exactly the limit, whole, is a message within it;
                    # the listener closes with 1009 for more (and so does picows, far more).
                    max_frame_size=max_message_bytes + 1,
                    enable_auto_ping=True,
                    auto_ping_idle_timeout=PING_IDLE_S,
                    auto_ping_reply_timeout=PING_IDLE_S,
                    # A voice API does not redirect its socket; following one would take the
                    # credentials in the headers to another host.
                    max_redirects=0,
                    # The proxy the environment names (HTTPS_PROXY, NO_PROXY...), chosen as
                    # websockets' client, which this replaced, chose it.
                    proxy=get_proxy(parse_uri(url)),
                    # The event loop's own transports (uvloop's, its TLS included) rather than
                    # aiofastnet's, which picows would take if installed: measured the same
                    # (1.01x, 0.96x, 1.02x the CPU at 50 calls), and the loop's are long proven.
                    use_aiofastnet=False,
                )
        except picows.WSInvalidStatusError as exc:
            status = exc.response.status if exc.response is not None else "?"
            raise ConnectionError(f"voice API refused the connection: HTTP {int(status)}") from None
        # InvalidURI: no ws:// or wss:// URL; ValueError: a proxy URL picows cannot use.
        except (OSError, TimeoutError, ValueError, InvalidURI, picows.WSError) as exc:
            raise ConnectionError(f"voice API unreachable: {type(exc).__name__}") from None
        return socket

    async def send(self, message: str | bytes) -> None:
        """Write one message, at once unless flow control holds the socket. Raises
        UpstreamClosed once the socket is closed."""
        while self._writable is not None:
            await asyncio.shield(self._writable)
        if self.closed is not None:
            raise self._closed_error()
        self.send_now(message)  # picows encodes text (a str) as UTF-8 itself

    @property
    def sends_now(self) -> bool:
        """True when `send_now` may be used: open, and not held by flow control."""
        return self._writable is None and self.closed is None and self._transport is not None

    def send_now(self, message: str | bytes) -> None:
        """Write one message at once; only while `sends_now`."""
        assert self._transport is not None
        self._transport.send(WSMsgType.TEXT if isinstance(message, str) else WSMsgType.BINARY, message)

    async def recv(self) -> str | bytes:
        """The next whole message; UpstreamClosed once every message before the close is taken.
        One reader at a time (a session's receive loop), as with websockets."""
        while not self._inbox:
            if self.closed is not None:
                raise self._closed_error()
            self._arrival = asyncio.get_running_loop().create_future()
            try:
                await self._arrival
            finally:
                self._arrival = None
        return self._inbox.popleft()

    async def close(self, code: int = 1000) -> None:
        """Send a close and wait, for a while, for the API to answer it."""
        transport = self._transport
        if transport is None or self.closed is not None:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(code))
        with contextlib.suppress(Exception):  # a timeout, or what ended the connection
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await transport.wait_disconnected()
        transport.disconnect()

    def _closed_error(self) -> UpstreamClosed:
        # A new one each time: an exception object raised again grows its traceback.
        assert self.closed is not None
        return UpstreamClosed(self.closed.code, self.closed.reason)

    # -- from the listener ------------------------------------------------------------------

    def _arrived(self, message: str | bytes) -> None:
        self._inbox.append(message)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def _fragment(self, transport: WSTransport, frame: WSFrame, first: bool) -> None:
        if first:
            self._fragments_text = frame.msg_type is WSMsgType.TEXT
            self._fragments, self._fragments_size = [], 0
        self._fragments_size += frame.payload_size
        if self._fragments_size > self._max_message_bytes:
            self._fragments = []
            self._close_now(transport, 1009)
            return
        self._fragments.append(frame.get_payload_as_bytes())
        if frame.fin:
            data = b"".join(self._fragments)
            self._fragments = []
            if not self._fragments_text:
                self._arrived(data)
                return
            try:
                self._arrived(data.decode())
            except UnicodeDecodeError:
                self._close_now(transport, 1007)

    def _close_now(self, transport: WSTransport, code: int) -> None:
        """Close with `code` (unless a close went already) and let the connection go: the API
        sent what no message may be, or its own close, which this answers."""
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode(code))
        transport.disconnect()

    def _disconnected(self, transport: WSTransport) -> None:
        handshake = transport.close_handshake
        info = None if handshake is None else handshake.recv or handshake.sent
        if info is None:
            self.closed = UpstreamClosed(ABNORMAL_CLOSURE)
        else:
            self.closed = UpstreamClosed(int(info.code) or NO_STATUS, info.reason or "")
        for waiter in (self._arrival, self._writable):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._writable = None


class _Listener(WSListener):
    """picows's callbacks, handed to the socket."""

    def __init__(self, socket: UpstreamSocket) -> None:
        self._socket = socket

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._socket._transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        socket = self._socket
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.payload_size > socket._max_message_bytes:
                socket._close_now(transport, 1009)
            elif not frame.fin:
                socket._fragment(transport, frame, first=True)
            elif kind is WSMsgType.BINARY:
                socket._arrived(frame.get_payload_as_bytes())
            else:
                try:
                    socket._arrived(frame.get_payload_as_utf8_text())
                except UnicodeDecodeError:
                    socket._close_now(transport, 1007)
        elif kind is WSMsgType.CONTINUATION:
            socket._fragment(transport, frame, first=False)
        elif kind is WSMsgType.CLOSE:
            # picows recorded its code and reason (transport.close_handshake) for `closed`.
            socket._close_now(transport, frame.get_close_code() or 1000)
        # PING is answered by picows (enable_auto_pong); PONG is its keepalive's.

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._socket._disconnected(transport)
        # picows keeps what made it disconnect (a peer's protocol error) for
        # wait_disconnected(); taken here so asyncio does not log it as never retrieved.
        waiting = asyncio.ensure_future(transport.wait_disconnected())
        waiting.add_done_callback(_retrieve)

    def pause_writing(self) -> None:
        if self._socket._writable is None and self._socket.closed is None:
            self._socket._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        writable, self._socket._writable = self._socket._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
