"""A stand-in for an ElevenLabs agent's conversation socket, faithful to what
`shared/reference/providers.md` §1.8 lists, the awkward parts included:

- `/v1/convai/conversation?agent_id=…`; a private agent needs the `token` of a signed URL
  from `GET /v1/convai/conversation/get-signed-url` (checked `xi-api-key`), used once;
- `conversation_initiation_metadata` with the formats of the agent's configuration
  (`ulaw_8000` both ways, or PCM), then a greeting at once: `agent_response` and audio
  chunks of odd sizes, faster than real time;
- caller audio decoded in the declared input format; energy VAD; `user_transcript`, then the
  next turn with a larger `event_id`;
- speech over the agent, until its turn has played out at the caller (not just until
  the last chunk went): `interruption {event_id}`, then more chunks of the cut turn, if any
  were still to go (stale audio the bridge must drop);
- `ping {event_id}` on a timer, each `pong` checked against it;
- an `error` event before a close.

With a timeline path, each session's timings are appended there when it ends, in the
NextEVI stand-in's format (read by scripts/bench.py, `--provider elevenlabs`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import secrets
import time
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ivr_bridge.audio import ulaw_encode
from ivr_bridge.standins.socket_server import StandInServer, serve_until_signalled
from ivr_bridge.standins.speech import is_speech_pcm16, is_speech_ulaw

PATH = "/v1/convai/conversation"
AGENT_FORMATS = ("ulaw_8000", "pcm_8000", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100", "pcm_48000")
SILENCE_TO_END_MS = 500


@dataclass
class AgentBehaviour:
    agent_id: str = "agent_test"
    api_key: str = ""  # set => a private agent: only signed URLs get in
    input_format: str = "ulaw_8000"
    output_format: str = "ulaw_8000"
    greeting_ms: int = 600
    reply_ms: int = 1500
    # Odd sizes, in turn, as mu-law bytes (8 kHz samples); PCM at another rate in chunks of
    # the same durations.
    chunk_sizes: tuple[int, ...] = (733, 1601, 977)
    stale_chunks: int = 3  # chunks of a cut turn still sent after the interruption
    ping_every_s: float = 0.5
    tool_after_reply: tuple[str, dict[str, Any]] | None = None  # a client tool called after each reply


@dataclass
class _Peer:
    ws: ServerConnection
    turn: int = 0
    speaking: bool = False
    silence_ms: float = 0.0
    agent: asyncio.Task[None] | None = None
    interrupted: bool = False
    # When the caller will have heard the agent's turn (loop clock): its chunks go faster
    # than real time, but the agent is speaking, and interruptible, until then.
    speaking_until: float = 0.0
    appended: bytearray = field(default_factory=bytearray)
    chunks: list[bytes] = field(default_factory=list)  # decoded audio sent, in order
    pings: dict[int, bool] = field(default_factory=dict)  # ping event_id -> pong received
    timeline: dict[str, Any] | None = None  # send/receive times, when the stand-in records them


class ElevenLabsStandIn(StandInServer):
    path = PATH

    def __init__(self, behaviour: AgentBehaviour | None = None, timeline_path: str | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or AgentBehaviour()
        self.timeline_path = timeline_path
        self.peers: list[_Peer] = []
        self.initiations: list[dict[str, Any]] = []
        self._tokens: set[str] = set()
        self.tool_results: list[dict[str, Any]] = []

    @property
    def api_url(self) -> str:
        return f"http://{self.base}"

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == PATH + "/get-signed-url":  # the REST route, on the same port
            if not self.behaviour.api_key or request.headers.get("xi-api-key") != self.behaviour.api_key:
                return _json(401, {"detail": {"status": "invalid_api_key"}})
            token = secrets.token_urlsafe(16)
            self._tokens.add(token)
            return _json(
                200, {"signed_url": f"ws://{self.base}{PATH}?agent_id={query.get('agent_id')}&token={token}"}
            )
        if parts.path != PATH or query.get("agent_id") != self.behaviour.agent_id:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "unknown agent\n")
        if self.behaviour.api_key:
            token = query.get("token", "")
            if token not in self._tokens:
                return connection.respond(http.HTTPStatus.FORBIDDEN, "signature invalid or used\n")
            self._tokens.discard(token)  # used once
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        peer = _Peer(ws)
        if self.timeline_path:
            heard = self.behaviour.input_format
            frame_bytes = _rate(heard) // 50 * (2 if self._pcm(heard) else 1)  # 20 ms of the caller
            peer.timeline = {
                "event": "session", "connection_id": "", "opened_at": time.monotonic(), "audio_at": [],
                "audio_bytes": [], "frame_bytes": frame_bytes, "tts_at": [], "tts_ms": [],
                "interruptions_at": [],
            }  # fmt: skip
        self.peers.append(peer)
        pinger = asyncio.create_task(self._ping(peer))
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "conversation_initiation_client_data":
                    self.initiations.append(message)
                    if peer.timeline is not None:  # the bridge's dynamic variables name the call
                        sid = (message.get("dynamic_variables") or {}).get("call_sid", "unknown")
                        peer.timeline["connection_id"] = f"{sid}-{secrets.token_hex(4)}"
                    await self._send(
                        peer,
                        "conversation_initiation_metadata",
                        conversation_id=secrets.token_hex(8),
                        user_input_audio_format=self.behaviour.input_format,
                        agent_output_audio_format=self.behaviour.output_format,
                    )
                    peer.agent = asyncio.create_task(self._speak(peer, self.behaviour.greeting_ms, "Hello!"))
                elif "user_audio_chunk" in message:
                    await self._hear(peer, b64decode(message["user_audio_chunk"]))
                elif message.get("type") == "client_tool_result":
                    self.tool_results.append(message)
                elif message.get("type") == "pong":
                    peer.pings[int(message.get("event_id", -1))] = True
        except ConnectionClosed:
            pass
        finally:
            pinger.cancel()
            if peer.agent is not None:
                peer.agent.cancel()
            if peer.timeline is not None and self.timeline_path:
                with open(self.timeline_path, "a", encoding="utf-8") as out:
                    out.write(json.dumps(peer.timeline) + "\n")

    async def _ping(self, peer: _Peer) -> None:
        n = 0
        while True:
            await asyncio.sleep(self.behaviour.ping_every_s)
            n += 1
            peer.pings[n] = False
            await self._send(peer, "ping", event_id=n, ping_ms=None if n == 1 else 20)

    def _pcm(self, fmt: str) -> bool:
        return fmt.startswith("pcm_")

    async def _hear(self, peer: _Peer, audio: bytes) -> None:
        peer.appended += audio
        if peer.timeline is not None:
            peer.timeline["audio_at"].append(time.monotonic())
            peer.timeline["audio_bytes"].append(len(peer.appended))
        if self._pcm(self.behaviour.input_format):
            rate = _rate(self.behaviour.input_format)
            loud, ms = is_speech_pcm16(audio), len(audio) / 2 / rate * 1000
        else:
            loud, ms = is_speech_ulaw(audio), len(audio) / 8
        busy = asyncio.get_running_loop().time() < peer.speaking_until
        if loud and not peer.speaking:
            peer.speaking, peer.silence_ms = True, 0.0
            if busy and not peer.interrupted:
                peer.interrupted = True
                if peer.timeline is not None:
                    peer.timeline["interruptions_at"].append(time.monotonic())
                await self._send(peer, "interruption", event_id=peer.turn)
        elif peer.speaking and not loud:
            peer.silence_ms += ms
            if peer.silence_ms >= SILENCE_TO_END_MS:
                peer.speaking = False
                await self._send(
                    peer, "user_transcript", key="user_transcription_event", user_transcript="hello"
                )
                if peer.agent is not None:
                    peer.agent.cancel()
                peer.agent = asyncio.create_task(
                    self._speak(peer, self.behaviour.reply_ms, "How can I help?")
                )
        elif loud:
            peer.silence_ms = 0.0

    async def _speak(self, peer: _Peer, ms: int, text: str) -> None:
        b = self.behaviour
        peer.turn += 1
        peer.interrupted = False
        peer.speaking_until = asyncio.get_running_loop().time() + ms / 1000
        turn = peer.turn
        await self._send(peer, "agent_response", agent_response=text, event_id=turn)
        rate = _rate(b.output_format)
        t = np.arange(rate * ms // 1000) / rate
        tone = (6000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        audio = tone.astype("<i2").tobytes() if self._pcm(b.output_format) else ulaw_encode(tone)
        width = 2 if self._pcm(b.output_format) else 1
        at, n, stale = 0, 0, b.stale_chunks
        while at < len(audio):
            if peer.interrupted:
                if stale <= 0:
                    return
                stale -= 1  # already in flight when the caller spoke
            size = b.chunk_sizes[n % len(b.chunk_sizes)] * rate // 8000 * width
            chunk = audio[at : at + size]
            at, n = at + size, n + 1
            peer.chunks.append(chunk)
            if peer.timeline is not None and not peer.interrupted:  # stale chunks: the bridge drops them
                peer.timeline["tts_at"].append(time.monotonic())  # before the send, as the relay may beat it
                peer.timeline["tts_ms"].append(len(chunk) / width / rate * 1000)
            await self._send(peer, "audio", audio_base_64=b64encode(chunk).decode(), event_id=turn)
            await asyncio.sleep(len(chunk) / width / rate / 5)  # faster than real time
        if b.tool_after_reply is not None and turn > 1:  # not on the greeting
            name, parameters = b.tool_after_reply
            call = {"tool_name": name, "tool_call_id": _tool_id(), "parameters": parameters, "event_id": turn}
            await self._send(peer, "client_tool_call", key="client_tool_call", **call)

    async def _send(self, peer: _Peer, kind: str, key: str = "", **body: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            await peer.ws.send(json.dumps({"type": kind, (key or f"{kind}_event"): body}))


def _rate(audio_format: str) -> int:
    return int(audio_format.split("_")[1])


def _tool_id() -> str:
    return f"toolu_{secrets.token_hex(8)}"


def _json(status: int, body: dict[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return Response(status, http.HTTPStatus(status).phrase, headers, data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stand-in's own options; `run` also takes those `ivr-bridge stub-voice-api` defines
    (NextEVI's), using what applies."""
    parser.add_argument(
        "--agent-format",
        choices=AGENT_FORMATS,
        default="ulaw_8000",
        help="elevenlabs: the agent's audio format, both ways (ulaw_8000 passes through)",
    )


def run(args: argparse.Namespace) -> int:
    """`ivr-bridge stub-voice-api --provider elevenlabs` (private with --api-key)."""
    audio = getattr(args, "agent_format", "ulaw_8000")
    behaviour = AgentBehaviour(
        api_key=args.api_key or "", reply_ms=args.reply_ms, input_format=audio, output_format=audio
    )
    banner = f"ElevenLabs agent stand-in at ws://{args.host}:{args.port}{PATH}?agent_id={behaviour.agent_id}"
    standin = ElevenLabsStandIn(behaviour, timeline_path=args.timeline)
    return serve_until_signalled(standin, args.host, args.port, banner)
