"""A local stand-in for the NextEVI voice WebSocket API.

It speaks the protocol as ``nextevi-websocket-reference.txt`` documents it, including the
awkward parts a real client has to cope with:

* the envelope is either ``{type, timestamp, message_id, data: {...}}`` (the docs) or the
  same fields flat (the SDKs), chosen by :attr:`VoiceApiBehaviour.envelope`;
* ``tts_chunk`` and ``tts_interruption`` carry ``content`` at the top level in both shapes;
* ``tts_chunk`` audio is a whole WAV file per chunk or raw PCM16, by behaviour;
* auth and config failures accept the socket, then close it with 4001 / 4002.

Deliberate simplifications (the real service is a black box):

* turn detection is an energy VAD over 20 ms blocks; the transcript is a description of
  how much speech arrived ("caller said 600 ms of speech");
* ``session_settings.turn_detection`` is recorded but the behaviour's ``end_of_turn_ms``
  decides turn ends; ``emotion_detection.enabled: false`` suppresses ``emotion_update``;
* ``keep_alive`` is recorded and not answered;
* audio received before ``session_settings`` is recorded and counted but not analysed;
* a malformed or unknown client message gets an ``error`` message and is recorded in
  :attr:`Session.errors`; the socket stays open;
* ``authorization=Bearer <api_key>`` (query or header) is accepted in place of ``api_key``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ivr_bridge import event_loop
from ivr_bridge.audio import wav_bytes
from ivr_bridge.standins.socket_server import close_sessions
from ivr_bridge.standins.speech import speech_blocks_pcm16

logger = logging.getLogger(__name__)

PATH_PREFIX = "/ws/voice/"
INPUT_RATE = 24000
BLOCK_SAMPLES = 480  # 20 ms at 24 kHz
BLOCK_BYTES = BLOCK_SAMPLES * 2
BLOCK_MS = 20
PARTIAL_EVERY_MS = 200
REPLY_AMPLITUDE = 8000
PROJECT_ID = "project-standin"

CLOSE_UNAUTHORIZED = 4001
CLOSE_INVALID_CONFIG = 4002

EMOTIONS: dict[str, float] = {
    "Calmness": 0.62,
    "Joy": 0.41,
    "Surprise": 0.12,
    "Sadness": 0.08,
    "Anger": 0.03,
    "Fear": 0.04,
    "Disgust": 0.02,
    "Contempt": 0.01,
    "Excitement": 0.21,
}


@dataclass
class VoiceApiBehaviour:
    """How the stand-in behaves; defaults mimic the documented service."""

    api_key: str = "oak_test_key"
    config_id: str = "cfg_test"
    envelope: Literal["data", "flat"] = "data"
    wav_header: bool = True
    tts_sample_rate: int = 24000
    reply_ms: int = 1000
    tts_chunk_ms: int = 200
    think_ms: int = 0
    pace: bool = True
    speech_rms: float = 500.0
    end_of_turn_ms: int = 400
    reply_tone_hz: float = 440.0
    interrupt_on_speech: bool = True
    permessage_deflate: bool = False  # off: the service's stance is unknown and it costs CPU
    record_audio: bool = True  # False keeps Session.audio empty so long load tests stay small


@dataclass(eq=False)  # identity hashing: sessions key the stand-in's per-connection state
class Session:
    """One accepted connection and everything the client sent on it."""

    connection_id: str
    query: dict[str, str]
    settings: dict[str, Any] | None = None
    audio: bytearray = field(default_factory=bytearray)
    audio_frames: list[int] = field(default_factory=list)
    text_messages: list[dict[str, Any]] = field(default_factory=list)
    replies_started: int = 0
    replies_interrupted: int = 0
    close_code: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    audio_before_settings: int = 0  # audio messages (binary or audio_input) before settings
    turns: int = 0  # completed caller turns
    errors: list[str] = field(default_factory=list)  # complaints sent back as `error`
    timeline: Timeline | None = None  # send/receive times, when the stand-in records them


@dataclass
class Timeline:
    """When things crossed this session's socket, on `time.monotonic()` (one clock for all
    processes on Linux), so a benchmark can join them with the caller's own record."""

    opened_at: float
    audio_at: list[float] = field(default_factory=list)  # each audio message's arrival
    audio_bytes: list[int] = field(default_factory=list)  # PCM bytes received up to and incl. it
    tts_at: list[float] = field(default_factory=list)  # each tts_chunk, just before sending
    tts_reply: list[int] = field(default_factory=list)  # its reply number (from 1)
    tts_ms: list[float] = field(default_factory=list)  # its audio duration
    interruptions_at: list[float] = field(default_factory=list)  # each tts_interruption sent


@dataclass(eq=False)
class _Peer:
    """Runtime state of one session: socket, VAD and reply tasks."""

    ws: ServerConnection
    session: Session
    pending: bytearray = field(default_factory=bytearray)  # audio not yet a whole block
    turn_id: str | None = None
    turn_first_block: int = 0
    turn_last_speech_block: int = 0
    speech_ms: int = 0
    silence_ms: int = 0
    blocks: int = 0  # audio clock, in 20 ms blocks since settings
    reply_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sending_reply: bool = False
    talking_until: float = 0.0  # loop time until which the bot is still audibly speaking
    generations: int = 0


def _reply_chunks(behaviour: VoiceApiBehaviour) -> list[str]:
    """Base64 tts_chunk contents of one reply; identical for every reply, so built once."""
    rate = behaviour.tts_sample_rate
    total = behaviour.reply_ms * rate // 1000
    step = max(1, behaviour.tts_chunk_ms * rate // 1000)
    t = np.arange(total, dtype=np.float64) / rate
    tone = np.round(REPLY_AMPLITUDE * np.sin(2 * math.pi * behaviour.reply_tone_hz * t))
    pcm = tone.astype("<i2").tobytes()
    chunks: list[str] = []
    for start in range(0, total, step):
        piece = pcm[start * 2 : (start + step) * 2]
        if behaviour.wav_header:
            piece = wav_bytes(np.frombuffer(piece, dtype="<i2"), rate)
        chunks.append(base64.b64encode(piece).decode("ascii"))
    return chunks


def _payload(message: dict[str, Any]) -> dict[str, Any]:
    data = message.get("data")
    return data if isinstance(data, dict) and data else message


class NextEviStandIn:
    """A NextEVI-protocol server on a loopback port; records what each client sent."""

    def __init__(self, behaviour: VoiceApiBehaviour | None = None, timeline_path: str | None = None) -> None:
        """`timeline_path`: append events there as JSON lines, each written when it happens
        (so a stand-in killed mid-run has written everything up to then): `listening`, a
        session's `first_audio`, and `session` (its whole `Timeline`) when it ends."""
        self.timeline_path = timeline_path
        self.behaviour = behaviour or VoiceApiBehaviour()
        self.sessions: list[Session] = []
        self.rejected: list[Session] = []  # connections closed with 4001/4002
        self._peers: dict[Session, _Peer] = {}
        self._server: Server | None = None
        self._host = "127.0.0.1"
        self._sessions_changed = asyncio.Condition()
        self._chunks = _reply_chunks(self.behaviour)
        step_ms = self.behaviour.tts_chunk_ms
        self._chunk_ms = [
            min(step_ms, self.behaviour.reply_ms - i * step_ms) for i in range(len(self._chunks))
        ]

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._check_path,
            compression="deflate" if self.behaviour.permessage_deflate else None,
            max_size=2**20,  # the documented 1 MB chunk limit; larger closes with 1009
        )
        self._timeline_event("listening", at=time.monotonic())

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close(close_connections=True, code=1001, reason="server stopping")
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def opened(self) -> int:
        """Sessions accepted so far."""
        return len(self.sessions)

    async def close_sessions(self, code: int, reason: str = "") -> None:
        assert self._server is not None, "stand-in not started"
        await close_sessions(self._server, code, reason)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("stand-in not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        return f"ws://{host}:{self.port}{PATH_PREFIX.rstrip('/')}"

    # -- test controls ------------------------------------------------------------------

    async def wait_for_session(self, index: int = 0, timeout: float = 10.0) -> Session:
        async with self._sessions_changed:
            try:
                await asyncio.wait_for(
                    self._sessions_changed.wait_for(lambda: len(self.sessions) > index),
                    timeout,
                )
            except TimeoutError:
                raise TimeoutError(
                    f"no session #{index} within {timeout}s "
                    f"({len(self.sessions)} accepted, {len(self.rejected)} rejected)"
                ) from None
        return self.sessions[index]

    async def interrupt(self, session: Session) -> None:
        """Send tts_interruption now and drop the rest of any reply in progress."""
        peer = self._peers[session]
        talking = self._bot_talking(peer)
        await self._cancel_replies(peer)
        if talking:
            session.replies_interrupted += 1
        peer.talking_until = 0.0
        await self._send_content(peer, "tts_interruption", "")

    async def close_session(self, session: Session, code: int = 1000, reason: str = "") -> None:
        peer = self._peers[session]
        await peer.ws.close(code, reason)
        await session.closed.wait()

    async def send_raw(self, session: Session, message: str | bytes) -> None:
        await self._peers[session].ws.send(message)

    # -- connection handling ------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        connection_id = path.removeprefix(PATH_PREFIX)
        if not path.startswith(PATH_PREFIX) or not connection_id or "/" in connection_id:
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found - Invalid endpoint\n")
        return None

    def _authorised(self, query: dict[str, str], request: Request) -> bool:
        expected = self.behaviour.api_key
        if "api_key" in query:
            return query["api_key"] == expected
        bearer = query.get("authorization") or request.headers.get("Authorization", "")
        return bearer == f"Bearer {expected}"

    async def _handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None  # handlers only run after the opening handshake
        parts = urlsplit(request.path)
        session = Session(
            connection_id=parts.path.removeprefix(PATH_PREFIX),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            timeline=Timeline(time.monotonic()) if self.timeline_path else None,
        )
        if not self._authorised(session.query, request):
            await self._reject(ws, session, CLOSE_UNAUTHORIZED, "Unauthorized")
            return
        if session.query.get("config_id") != self.behaviour.config_id:
            await self._reject(ws, session, CLOSE_INVALID_CONFIG, "Invalid Config")
            return

        peer = _Peer(ws=ws, session=session)
        self._peers[session] = peer
        async with self._sessions_changed:
            self.sessions.append(session)
            self._sessions_changed.notify_all()
        try:
            await self._send(
                peer,
                "connection_metadata",
                {
                    "connection_id": session.connection_id,
                    "status": "connected",
                    "config": {
                        "audio_format": "pcm_24khz_16bit_mono",
                        "encoding": "linear16",
                        "sample_rate": INPUT_RATE,
                        "channels": 1,
                    },
                    "project_id": session.query.get("project_id", PROJECT_ID),
                    "config_id": self.behaviour.config_id,
                },
            )
            async for message in ws:
                if isinstance(message, bytes):
                    await self._on_audio(peer, message, binary=True)
                else:
                    await self._on_text(peer, message)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("stand-in session %s failed", session.connection_id)
            await ws.close(1011, "internal error")
        finally:
            await self._cancel_replies(peer)
            session.close_code = ws.close_code
            self._write_timeline(session)
            session.closed.set()

    def _write_timeline(self, session: Session) -> None:
        if session.timeline is not None:
            self._timeline_event(
                "session", connection_id=session.connection_id, close_code=session.close_code,
                **vars(session.timeline),
            )  # fmt: skip

    def _timeline_event(self, event: str, **fields: Any) -> None:
        if self.timeline_path is None:
            return
        # A short append a few times per session; the stand-in is a test tool, not a hot path.
        with open(self.timeline_path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")

    async def _reject(self, ws: ServerConnection, session: Session, code: int, why: str) -> None:
        self.rejected.append(session)
        await ws.close(code, why)
        session.close_code = ws.close_code
        session.closed.set()

    # -- client messages ----------------------------------------------------------------

    async def _on_text(self, peer: _Peer, text: str) -> None:
        session = peer.session
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            await self._complain(peer, "INVALID_MESSAGE", "message is not valid JSON", {})
            return
        if not isinstance(message, dict):
            await self._complain(peer, "INVALID_MESSAGE", "message is not a JSON object", {})
            return
        session.text_messages.append(message)
        kind = message.get("type")
        payload = _payload(message)
        if kind == "session_settings":
            await self._on_settings(peer, message, payload)
        elif kind == "keep_alive":
            pass  # recorded above; the docs define no reply
        elif kind == "audio_input":
            encoded = payload.get("audio")
            try:
                audio = base64.b64decode(encoded or "", validate=True) if encoded else b""
            except (binascii.Error, TypeError, ValueError):
                audio = b""
            if not audio:
                await self._complain(
                    peer,
                    "AUDIO_PROCESSING_FAILED",
                    "Failed to process audio chunk",
                    {"chunk_id": payload.get("chunk_id")},
                )
                return
            await self._on_audio(peer, audio, binary=False)
        else:
            await self._complain(
                peer, "UNKNOWN_MESSAGE_TYPE", f"unknown message type {kind!r}", {"type": kind}
            )

    async def _on_settings(self, peer: _Peer, message: dict[str, Any], payload: dict[str, Any]) -> None:
        peer.session.settings = message
        audio = payload.get("audio")
        source = audio if isinstance(audio, dict) else payload
        echoed = {
            "sample_rate": source.get("sample_rate", INPUT_RATE),
            "channels": source.get("channels", 1),
            "encoding": source.get("encoding", "linear16"),
        }
        await self._send(peer, "status", {"status": "ready", "details": {"session_settings": echoed}})

    async def _on_audio(self, peer: _Peer, audio: bytes, *, binary: bool) -> None:
        session = peer.session
        if session.timeline is not None:
            now = time.monotonic()
            session.timeline.audio_at.append(now)
            total = session.timeline.audio_bytes[-1] if session.timeline.audio_bytes else 0
            session.timeline.audio_bytes.append(total + len(audio))
            if not total:
                self._timeline_event(
                    "first_audio", connection_id=session.connection_id,
                    opened_at=session.timeline.opened_at, at=now,
                )  # fmt: skip
        if self.behaviour.record_audio:
            session.audio += audio
        if binary:
            session.audio_frames.append(len(audio))
        if session.settings is None:
            session.audio_before_settings += 1
            return
        peer.pending += audio
        whole = len(peer.pending) // BLOCK_BYTES
        if whole == 0:
            return
        cut = whole * BLOCK_BYTES
        blocks = speech_blocks_pcm16(peer.pending[:cut], BLOCK_SAMPLES, self.behaviour.speech_rms)
        del peer.pending[:cut]
        for is_speech in blocks:
            await self._on_block(peer, is_speech)

    async def _on_block(self, peer: _Peer, is_speech: bool) -> None:
        block = peer.blocks
        peer.blocks += 1
        if is_speech:
            if peer.turn_id is None:
                await self._start_turn(peer, block)
            peer.speech_ms += BLOCK_MS
            peer.silence_ms = 0
            peer.turn_last_speech_block = block + 1
            if peer.speech_ms % PARTIAL_EVERY_MS == 0:
                await self._send_transcription(peer, final=False)
        elif peer.turn_id is not None:
            peer.silence_ms += BLOCK_MS
            if peer.silence_ms >= self.behaviour.end_of_turn_ms:
                await self._end_turn(peer)

    async def _start_turn(self, peer: _Peer, block: int) -> None:
        if self.behaviour.interrupt_on_speech:
            talking = self._bot_talking(peer)
            await self._cancel_replies(peer)  # a reply still thinking is dropped silently
            if talking:
                peer.session.replies_interrupted += 1
                peer.talking_until = 0.0
                await self._send_content(peer, "tts_interruption", "")
        peer.turn_id = f"turn-{uuid.uuid4().hex[:12]}"
        peer.turn_first_block = block
        peer.speech_ms = 0
        peer.silence_ms = 0
        await self._send(peer, "turn_start", {"turn_id": peer.turn_id})

    def _transcript(self, peer: _Peer) -> str:
        return f"caller said {peer.speech_ms} ms of speech"

    async def _send_transcription(self, peer: _Peer, *, final: bool) -> None:
        text = self._transcript(peer)
        await self._send(
            peer,
            "transcription",
            {
                "transcript": text,
                "confidence": 0.95 if final else 0.6,
                "is_final": final,
                "is_speech_final": final,
                "session_id": peer.session.connection_id,
                "words": [],
                "accumulated_transcript": text,
                "is_turn_incomplete": not final,
                "original_fragment": text,
            },
        )

    async def _end_turn(self, peer: _Peer) -> None:
        session = peer.session
        duration = (peer.turn_last_speech_block - peer.turn_first_block) * BLOCK_MS / 1000
        await self._send_transcription(peer, final=True)
        await self._send(
            peer,
            "turn_end",
            {"turn_id": peer.turn_id, "duration": round(duration, 3), "is_complete": True},
        )
        if self._emotions_enabled(session):
            top = sorted(EMOTIONS.items(), key=lambda item: item[1], reverse=True)[:3]
            await self._send(
                peer,
                "emotion_update",
                {
                    "top_emotions": [{"name": name, "score": score} for name, score in top],
                    "all_emotions": dict(EMOTIONS),
                    "processing_time": 0.004,
                    "utterance_duration": round(duration, 3),
                    "connection_id": session.connection_id,
                    "session_id": session.connection_id,
                },
            )
        session.turns += 1
        peer.turn_id = None
        peer.speech_ms = 0
        peer.silence_ms = 0
        peer.generations += 1
        previous = set(peer.reply_tasks)
        task = asyncio.create_task(self._reply(peer, peer.generations, previous))
        peer.reply_tasks.add(task)
        task.add_done_callback(peer.reply_tasks.discard)

    @staticmethod
    def _emotions_enabled(session: Session) -> bool:
        settings = _payload(session.settings or {})
        emotion = settings.get("emotion_detection")
        return not (isinstance(emotion, dict) and emotion.get("enabled") is False)

    # -- replies ------------------------------------------------------------------------

    def _bot_talking(self, peer: _Peer) -> bool:
        return peer.sending_reply or asyncio.get_running_loop().time() < peer.talking_until

    async def _cancel_replies(self, peer: _Peer) -> None:
        tasks = list(peer.reply_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _reply(self, peer: _Peer, generation: int, previous: set[asyncio.Task[None]]) -> None:
        behaviour = self.behaviour
        loop = asyncio.get_running_loop()
        if previous:  # only when replies overlap (interrupt_on_speech=False): keep them in order
            await asyncio.wait(previous)
        if behaviour.think_ms > 0:
            await asyncio.sleep(behaviour.think_ms / 1000)
        generation_id = f"gen-{generation}"
        text = f"This is reply {generation} from the NextEVI stand-in."
        # Streamed word by word, then a final chunk repeating the whole text (what SDKs show).
        words = text.split(" ")
        pieces = [word + " " for word in words[:-1]] + [words[-1], text]
        peer.sending_reply = True
        peer.session.replies_started += 1
        try:
            for index, piece in enumerate(pieces):
                await self._send(
                    peer,
                    "llm_response_chunk",
                    {
                        "content": piece,
                        "is_final": index == len(pieces) - 1,
                        "generation_id": generation_id,
                        "chunk_index": index,
                    },
                )
            started = loop.time()
            peer.talking_until = started + behaviour.reply_ms / 1000
            for index, content in enumerate(self._chunks):
                if behaviour.pace:
                    delay = started + index * behaviour.tts_chunk_ms / 1000 - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if peer.session.timeline is not None:
                    peer.session.timeline.tts_at.append(time.monotonic())
                    peer.session.timeline.tts_reply.append(peer.session.replies_started)
                    peer.session.timeline.tts_ms.append(self._chunk_ms[index])
                await self._send_content(peer, "tts_chunk", content)
        except ConnectionClosed:
            pass
        finally:
            peer.sending_reply = False

    # -- server messages ----------------------------------------------------------------

    async def _complain(self, peer: _Peer, code: str, text: str, details: dict[str, Any]) -> None:
        peer.session.errors.append(f"{code}: {text}")
        await self._send(peer, "error", {"error_code": code, "error_message": text, "details": details})

    @staticmethod
    def _header(kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "timestamp": round(time.time(), 3),
            "message_id": str(uuid.uuid4()),
        }

    async def _send(self, peer: _Peer, kind: str, data: dict[str, Any]) -> None:
        message = self._header(kind)
        if self.behaviour.envelope == "data":
            message["data"] = data
        else:
            message.update(data)
        await peer.ws.send(json.dumps(message))

    async def _send_content(self, peer: _Peer, kind: str, content: str) -> None:
        # The documented oddity: these two carry `content` at the top level in every shape.
        message = self._header(kind)
        message["content"] = content
        if kind == "tts_interruption" and peer.session.timeline is not None:
            peer.session.timeline.interruptions_at.append(time.monotonic())
        await peer.ws.send(json.dumps(message))


# -- command line -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stand-in's options, shared by `ivr-bridge stub-voice-api` and `python -m`."""
    defaults = VoiceApiBehaviour()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--api-key", help=f"the key to accept (default {defaults.api_key}; openai: sk-test-realtime)"
    )
    parser.add_argument("--config-id", default=defaults.config_id)
    parser.add_argument("--envelope", choices=["data", "flat"], default=defaults.envelope)
    parser.add_argument("--raw-pcm", action="store_true", help="tts_chunk without WAV header")
    parser.add_argument("--tts-sample-rate", type=int, default=defaults.tts_sample_rate)
    parser.add_argument("--reply-ms", type=int, default=defaults.reply_ms)
    parser.add_argument("--tts-chunk-ms", type=int, default=defaults.tts_chunk_ms)
    parser.add_argument("--think-ms", type=int, default=defaults.think_ms, help="delay before each reply")
    parser.add_argument("--no-pace", action="store_true", help="send each reply at once")
    parser.add_argument("--speech-rms", type=float, default=defaults.speech_rms)
    parser.add_argument("--end-of-turn-ms", type=int, default=defaults.end_of_turn_ms)
    parser.add_argument("--reply-tone-hz", type=float, default=defaults.reply_tone_hz)
    parser.add_argument("--no-interrupt", action="store_true", help="ignore barge-in")
    parser.add_argument("--permessage-deflate", action="store_true")
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        help="append timing events (listening, first audio, whole sessions) as JSON lines",
    )


async def _run(host: str, port: int, behaviour: VoiceApiBehaviour, timeline: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    standin = NextEviStandIn(behaviour, timeline_path=timeline)
    await standin.start(host, port)
    logger.info("NextEVI stand-in listening on %s/{connection_id}", standin.url)
    try:
        await stop.wait()
    finally:
        await standin.stop()


def run(args: argparse.Namespace) -> int:
    """`ivr-bridge stub-voice-api` (--provider nextevi)."""
    behaviour = VoiceApiBehaviour(
        api_key=args.api_key or VoiceApiBehaviour().api_key,
        config_id=args.config_id,
        envelope=args.envelope,
        wav_header=not args.raw_pcm,
        tts_sample_rate=args.tts_sample_rate,
        reply_ms=args.reply_ms,
        tts_chunk_ms=args.tts_chunk_ms,
        think_ms=args.think_ms,
        pace=not args.no_pace,
        speech_rms=args.speech_rms,
        end_of_turn_ms=args.end_of_turn_ms,
        reply_tone_hz=args.reply_tone_hz,
        interrupt_on_speech=not args.no_interrupt,
        permessage_deflate=args.permessage_deflate,
        record_audio=False,  # nobody can read it from a separate process
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # keep startup to one line
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(_run(args.host, args.port, behaviour, args.timeline))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivr_bridge.standins.nextevi", description="Run a NextEVI voice API stand-in."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
