"""A stand-in for NavTalk's realtime socket (v2), built to the seed document and
`shared/reference/providers.md` §3.9, the awkward parts included:

- `/wss/v2/realtime-chat?license=…&name=…|avatarId=…`; an unknown license gets
  `conversation.connected.fail` then a close; `insufficient_balance`, `gpu_full` and the
  like can be made to end a session (`ending`);
- `conversation.connected.success`, a WebRTC offer the bridge must ignore, a binary
  frame, `realtime.session.created`, then `realtime.session.updated`;
- PCM16 24 kHz audio in, energy VAD, `speech_started`/`speech_stopped`, a transcript, then
  a reply: transcript and audio deltas of PCM16 24 kHz with their fields placed in `data`
  or at the top level, under alternating names;
- speech over a reply stops it, but a few deltas of it still arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ivr_bridge.standins.socket_server import StandInServer, serve_until_signalled
from ivr_bridge.standins.speech import is_speech_pcm16

PATH = "/wss/v2/realtime-chat"
SILENCE_TO_END_MS = 500


@dataclass
class NavTalkBehaviour:
    license: str = "nt-test-license"
    reply_ms: int = 1000
    delta_ms: int = 100
    stale_deltas: int = 2
    ending: str = ""  # e.g. "insufficient_balance": sent, then the socket closes, after the first reply


@dataclass
class _Peer:
    ws: ServerConnection
    appended: bytearray = field(default_factory=bytearray)
    speaking: bool = False
    silence_ms: float = 0.0
    reply: asyncio.Task[None] | None = None
    cut: bool = False
    deltas: list[bytes] = field(default_factory=list)
    turns: int = 0


class NavTalkStandIn(StandInServer):
    path = PATH

    def __init__(self, behaviour: NavTalkBehaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or NavTalkBehaviour()
        self.peers: list[_Peer] = []
        self.configs: list[dict[str, Any]] = []

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = {k: v[0] for k, v in parse_qs(urlsplit(ws.request.path).query).items()}
        if query.get("license") != self.behaviour.license:
            await self._send(ws, "conversation.connected.fail", top={"message": "License invalid"})
            await ws.close(1000, "license invalid")
            return
        if not (query.get("name") or query.get("avatarId")):
            await self._send(ws, "conversation.connected.fail", top={"message": "name or avatarId required"})
            await ws.close(1000)
            return
        peer = _Peer(ws)
        self.peers.append(peer)
        await self._send(
            ws, "conversation.connected.success", data={"sessionId": secrets.token_hex(8), "iceServers": []}
        )
        await self._send(ws, "webrtc.signaling.offer", data={"sdp": "v=0 (for the avatar video)"})
        await ws.send(b"\x00\x01binary avatar frame")
        await self._send(ws, "realtime.session.created", data={})
        await self._send(ws, "realtime.session.updated", data={})
        try:
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "realtime.input_config":
                    self.configs.append(message)
                elif kind == "realtime.input_audio_buffer.append":
                    await self._hear(peer, b64decode(message["data"]["audio"]))
        except ConnectionClosed:
            pass
        finally:
            if peer.reply is not None:
                peer.reply.cancel()

    async def _hear(self, peer: _Peer, pcm: bytes) -> None:
        peer.appended += pcm
        loud = is_speech_pcm16(pcm)
        if loud and not peer.speaking:
            peer.speaking, peer.silence_ms = True, 0.0
            await self._send(peer.ws, "realtime.input_audio_buffer.speech_started", data={})
            if peer.reply is not None and not peer.reply.done():
                peer.cut = True
        elif peer.speaking and not loud:
            peer.silence_ms += len(pcm) / 48
            if peer.silence_ms >= SILENCE_TO_END_MS:
                peer.speaking = False
                await self._send(peer.ws, "realtime.input_audio_buffer.speech_stopped", data={})
                await self._send(
                    peer.ws,
                    "realtime.conversation.item.input_audio_transcription.completed",
                    data={"content": "hello"},
                )
                peer.cut = False
                peer.reply = asyncio.create_task(self._reply(peer))
        elif loud:
            peer.silence_ms = 0.0

    async def _reply(self, peer: _Peer) -> None:
        b = self.behaviour
        peer.turns += 1
        response = f"resp_{secrets.token_hex(4)}"
        alternate = peer.turns % 2 == 0  # fields in `data` one turn, at the top level the next
        await self._send(
            peer.ws,
            "realtime.response.audio_transcript.delta",
            **_placed(alternate, content="Hi", id=response),
        )
        stale = b.stale_deltas
        for start in range(0, b.reply_ms, b.delta_ms):
            if peer.cut:
                if stale <= 0:
                    break
                stale -= 1
            ms = min(b.delta_ms, b.reply_ms - start)
            t = np.arange(ms * 24) / 24000
            audio = (6000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
            peer.deltas.append(audio)
            await self._send(
                peer.ws,
                "realtime.response.audio.delta",
                **_placed(alternate, delta=b64encode(audio).decode()),
            )
            await asyncio.sleep(b.delta_ms / 1000 / 5)
        if not peer.cut:
            await self._send(
                peer.ws,
                "realtime.response.audio_transcript.done",
                **_placed(not alternate, transcript="Hi there.", response_id=response),
            )
            await self._send(peer.ws, "realtime.response.audio.done", data={})
        if b.ending:
            await self._end(peer.ws, b.ending)

    async def end_sessions(self, ending: str) -> None:
        """End every open session as NavTalk does: its event (e.g. `insufficient_balance`),
        then a normal close."""
        assert self._server is not None, "stand-in not started"
        for ws in list(self._server.connections):
            await self._end(ws, ending)

    async def _end(self, ws: ServerConnection, ending: str) -> None:
        await self._send(ws, f"conversation.connected.{ending}", top={"message": f"{ending} (stand-in)"})
        await ws.close(1000, ending)

    async def _send(
        self, ws: ServerConnection, kind: str, data: dict | None = None, top: dict | None = None
    ) -> None:
        message: dict[str, Any] = {"type": kind, **(top or {})}
        if data is not None:
            message["data"] = data
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(message))


def _placed(in_data: bool, **fields: Any) -> dict[str, Any]:
    """The same fields, in `data` or at the top level: NavTalk's own messages do both."""
    return {"data": fields} if in_data else {"top": fields}


def run(args: argparse.Namespace) -> int:
    """`ivr-bridge stub-voice-api --provider navtalk` (--api-key is the license)."""
    behaviour = NavTalkBehaviour(license=args.api_key or NavTalkBehaviour().license, reply_ms=args.reply_ms)
    banner = f"NavTalk stand-in at ws://{args.host}:{args.port}{PATH} (license {behaviour.license})"
    return serve_until_signalled(NavTalkStandIn(behaviour), args.host, args.port, banner)
