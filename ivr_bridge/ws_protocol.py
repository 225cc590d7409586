"""uvicorn's WebSocket protocol, with a Media Stream's frames read and written cheaply.

A call's stream carries 50 small text frames a second each way. uvicorn's sans-I/O protocol
runs each through websockets' generator-based parser (four nested generators, a `Frame`
dataclass and an events list per frame) and each send through websockets' serializer, and
pauses and resumes the socket for every message. Here, once the handshake is done:

- a whole, unfragmented, masked text or binary frame within the size limit is unmasked
  (websockets' own C `apply_mask`) and queued for the app straight from the bytes;
- every other frame goes to websockets' parser unchanged: control frames one whole frame at
  a time (pings answered, uvicorn's keepalive pongs, the closing handshake), and anything
  else (a fragment, reserved bits, no mask, too large) together with all that follows, so
  websockets refuses it with the close code it always did;
- a text or binary message from the app is written as one unmasked frame;
- an app may take text messages in the read callback itself, through the ASGI extension
  `FRAME_SINK`: the call sends a caller's audio on without a queue or a task switch per
  frame. It is offered a message only when none waits in the queue, so none overtakes another,
  and it may decline one (it is then queued as usual);
- reading pauses only when `HIGH_WATER` messages wait unread (an app that fell behind, or a
  peer far faster than real time) and resumes, as in uvicorn, once the app has taken them
  all. The flood guard (`media_stream.py`) still bounds what a peer may send.

websockets' parser stays exact because it only ever sees whole frames at frame boundaries:
uvicorn hands over the request head alone as the first data (`handle_websocket_upgrade`),
and a frame that arrives before the app accepts leaves the whole stream to websockets.

uvicorn has no setting for any of this; its protocol class is a documented one
(`Config(ws=...)`). `tests/test_ws_protocol.py` checks the two parsers agree.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

try:  # as websockets itself imports it: the C version, else the pure-Python one
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

# The ASGI extension (in `scope["extensions"]`) that sets, or with None unsets, the function
# a text message is first offered to: `sink(text) -> bool`, True if it took the message.
FRAME_SINK = "ivr.frame_sink"
HIGH_WATER = 16  # messages; as websockets' own server queues (its max_queue default)

TEXT, BINARY = 0x1, 0x2
FIN = 0x80
MASKED = 0x80
_LENGTH16 = struct.Struct("!H")
_LENGTH64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_MAX_CONTROL = 125  # RFC 6455 5.5: a control frame's payload

logger = logging.getLogger(__name__)


def frame_bytes(first: int, payload: bytes) -> bytes:
    """An unmasked frame (a server's), `first` being its FIN bit and opcode."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return _HEAD16.pack(first, 126, size) + payload
    return _HEAD64.pack(first, 127, size) + payload


class StreamWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames_ours: bool | None = None  # None until the request head has been read
        self._unread = b""  # the start of a frame not yet whole
        self._max_size = self.config.ws_max_size
        self._sink: Callable[[str], bool] | None = None

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # an upgrade the app will see (not a refusal)
            self.scope["extensions"][FRAME_SINK] = self._set_sink

    def _set_sink(self, sink: Callable[[str], bool] | None) -> None:
        self._sink = sink

    # Receiving

    def data_received(self, data: bytes) -> None:
        if self._frames_ours and self.handshake_complete:
            self._receive_frames(self._unread + data if self._unread else data)
            return
        if self._frames_ours is None:  # the request head: websockets reads it
            self._websockets_reads(data)
            self._frames_ours = self.handshake_initiated and data.find(b"\r\n\r\n") == len(data) - 4
            return
        self._frames_ours = False  # frames before the accept: websockets reads the stream
        self._websockets_reads(data)

    def _websockets_reads(self, data: bytes) -> None:
        """uvicorn's `data_received`, except that the messages read before a protocol error
        reach the app (uvicorn drops whatever arrived in the same read as the error)."""
        self.conn.receive_data(data)
        self.handle_events()
        if self.conn.parser_exc is not None:
            self.handle_parser_exception()

    def _receive_frames(self, data: bytes) -> None:
        size = len(data)
        start = 0
        while size - start >= 2:
            first = data[start]
            second = data[start + 1]
            length = second & 0x7F
            head = start + 2
            if length == 126:
                if size - start < 4:
                    break
                length = _LENGTH16.unpack_from(data, head)[0]
                head += 2
            elif length == 127:
                if size - start < 10:
                    break
                length = _LENGTH64.unpack_from(data, head)[0]
                head += 8
            opcode = first & 0x0F
            end = head + 4 + length
            data_frame = (first & 0xF0) == FIN and opcode in (TEXT, BINARY) and second & MASKED
            if data_frame and length <= self._max_size:
                if end > size:
                    break
                payload = apply_mask(data[head + 4 : end], data[head : head + 4])
                start = end
                if not self._deliver(opcode, payload):
                    return
            elif opcode >= 0x8 and first & FIN and length <= _MAX_CONTROL:
                if end > size:
                    break
                frame, start = data[start:end], end
                self._websockets_reads(frame)  # a ping's pong, uvicorn's keepalive, a close
                if self.conn.state is not State.OPEN:  # closing: websockets reads what is left
                    self._pass_on(data[start:])
                    return
            else:
                self._pass_on(data[start:])
                return
        self._unread = data[start:] if start < size else b""

    def _pass_on(self, data: bytes) -> None:
        """Leave this frame and all that follows to websockets (it refuses what is wrong)."""
        self._frames_ours = False
        self._unread = b""
        if data:
            self._websockets_reads(data)

    def _deliver(self, opcode: int, payload: bytes) -> bool:
        """Hand one message to the sink or queue it for the app; False once the connection
        is being refused."""
        if self.close_sent:  # as uvicorn: past `websocket.close`, messages are discarded
            return True
        if opcode == TEXT:
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                self._frames_ours = False
                if self.conn.state is State.OPEN:  # else a later frame's refusal is under way
                    self.conn.send_close(1007)
                    self.handle_parser_exception()
                return False
            if self._sink is not None and not self.queue.qsize():
                try:
                    if self._sink(text):
                        return True
                except Exception:  # a bug in the sink: logged, and the app reads the rest itself
                    logger.exception("a frame sink failed; its messages are queued from now on")
                    self._sink = None
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": payload})
        if not self.read_paused and self.queue.qsize() >= HIGH_WATER:
            self.read_paused = True
            self.transport.pause_reading()
        return True

    def send_receive_event_to_app(self) -> None:
        """A message websockets read, queued by the same rules (uvicorn pauses after each)."""
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        self._deliver(TEXT if self.curr_msg_data_type == "text" else BINARY, data)

    # Sending

    async def send(self, message: Any) -> None:
        if (
            message["type"] == "websocket.send"
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.conn.state is State.OPEN
            and self.writable.is_set()
            and self.initial_response is None
        ):
            text = message.get("text")
            if text is not None:
                self.transport.write(frame_bytes(FIN | TEXT, text.encode()))
                return
            data = message.get("bytes")
            if data is not None:
                self.transport.write(frame_bytes(FIN | BINARY, data))
                return
        await super().send(message)
