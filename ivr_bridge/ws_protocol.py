"""uvicorn's WebSocket protocol, with reading paused only when frames pile up.

uvicorn's sans-I/O WebSocket protocol pauses the socket after every message it queues for
the app and resumes it once the app has taken it. For a Media Stream that is two changes
to the event loop's interest in the socket for every 20 ms frame, with nothing gained: a
call takes each frame as it comes. Here reading pauses only when `HIGH_WATER` messages wait
unread (an app that fell behind, or a peer far faster than real time) and resumes, as in
uvicorn, once the app has taken them all. The flood guard (`media_stream.py`) still
bounds what a peer may send; this only bounds what waits in memory before it is read.

uvicorn has no setting for this; its protocol class is a documented one (`Config(ws=...)`).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

HIGH_WATER = 16  # messages; as websockets' own server queues (its max_queue default)


class StreamWebSocketProtocol(WebSocketsSansIOProtocol):
    def send_receive_event_to_app(self) -> None:
        paused = self.read_paused
        self.read_paused = True  # uvicorn pauses after each message unless already paused
        super().send_receive_event_to_app()
        self.read_paused = paused
        if not paused and self.queue.qsize() >= HIGH_WATER:
            self.read_paused = True
            self.transport.pause_reading()
