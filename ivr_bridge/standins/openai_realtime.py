"""A stand-in for OpenAI Realtime (GA), faithful to what `shared/reference/providers.md` §2.8
lists, the awkward parts included:

- `/v1/realtime?model=…` with `Authorization: Bearer <key>` (else HTTP 401); the beta
  header is closed with 4000 `beta_api_shape_disabled`;
- `session.created` (PCM 24 kHz defaults) first; `session.update` applied partially and
  checked (`type` required, token strings and `audio/pcm` without `rate` refused with an
  `error`, the session staying open), answered by `session.updated`; `lie_about_format`
  keeps PCM output whatever was asked, to prove the bridge checks `session.updated`;
- appended audio read in the format in force at the time of the append;
- server VAD by energy: `speech_started`, `speech_stopped` after 500 ms of silence, then a
  response: the whole event ladder, output deltas of a tone (100 ms each) faster than real
  time. The caller's transcript comes after the response's first delta: transcription runs
  apart from the response, and its result "may come before or after the Response events";
  `transcript_first` sends it before the response instead. With `preamble_ms`, a response
  speaks two audio items (a spoken preamble, then the answer), as gpt-realtime may;
- speech during a response cancels it (`interrupt_response`), yet a few deltas already
  queued still arrive after `speech_started`, then `response.done` `cancelled`;
- `conversation.item.truncate` checked against the item's audio (the "already shorter"
  and "only model output audio" errors), answered `conversation.item.truncated`;
- `response.cancel` with nothing active: `error` `response_cancel_not_active`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http
import itertools
import json
import re
import secrets
import time
from base64 import b64decode, b64encode
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ivr_bridge.audio import ulaw_encode
from ivr_bridge.standins.socket_server import StandInServer, serve_until_signalled
from ivr_bridge.standins.speech import is_speech_pcm16, is_speech_ulaw

PATH = "/v1/realtime"
SILENCE_TO_END_MS = 500
REPLY_WORDS = "Hello from the stand-in."
_CALL_SID = re.compile(r"call sid: (CA[0-9A-Za-z]+)")


@dataclass
class RealtimeBehaviour:
    api_key: str = "sk-test-realtime"
    reply_ms: int = 1000
    delta_ms: int = 100
    late_deltas: int = 2  # deltas of a cancelled response still sent after speech_started
    lie_about_format: bool = False
    tool_after_reply: tuple[str, dict[str, Any]] | None = None  # (name, arguments) called after the reply
    think_ms: int = 0  # between the caller's turn ending and the response
    pace: bool = False  # deltas in real time (as the service streams them), not faster
    transcript_first: bool = False  # the caller's transcript before the response, not during it
    preamble_ms: int = 0  # > 0: each response speaks a preamble item of this length, then the reply's


@dataclass
class _Peer:
    ws: ServerConnection
    session: dict[str, Any]
    appended: bytearray = field(default_factory=bytearray)  # raw bytes, as appended
    speaking: bool = False
    silence_ms: float = 0.0
    response: asyncio.Task[None] | None = None
    cancelled: bool = False
    items: dict[str, int] = field(default_factory=dict)  # assistant item id -> audio ms sent
    deltas: list[bytes] = field(default_factory=list)  # every output audio delta sent, decoded
    timeline: dict[str, Any] | None = None  # send/receive times, when the stand-in records them


class OpenAiRealtimeStandIn(StandInServer):
    path = PATH

    def __init__(self, behaviour: RealtimeBehaviour | None = None, timeline_path: str | None = None) -> None:
        """`timeline_path`: append each session's timings there as a JSON line when it ends
        (the format of the NextEVI stand-in's, read by scripts/bench.py)."""
        super().__init__()
        self.behaviour = behaviour or RealtimeBehaviour()
        self.timeline_path = timeline_path
        self.peers: list[_Peer] = []
        self.errors_sent: list[str] = []
        self.truncations: list[dict[str, Any]] = []
        self.session_updates: list[dict[str, Any]] = []
        self.items_created: list[dict[str, Any]] = []  # e.g. function_call_output
        self.deleted: list[str] = []  # items deleted by the bridge

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        if not request.path.startswith(PATH + "?model="):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "no such path\n")
        if request.headers.get("Authorization") != f"Bearer {self.behaviour.api_key}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "Incorrect API key provided\n")
        return None

    # -- a session -----------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.headers.get("OpenAI-Beta"):
            await ws.close(4000, "beta_api_shape_disabled")
            return
        pcm24 = {"type": "audio/pcm", "rate": 24000}
        session = {
            "type": "realtime",
            "audio": {"input": {"format": dict(pcm24)}, "output": {"format": dict(pcm24), "voice": "alloy"}},
        }
        peer = _Peer(ws, session)
        if self.timeline_path:
            peer.timeline = {
                "event": "session", "connection_id": "", "opened_at": time.monotonic(), "audio_at": [],
                "audio_bytes": [], "frame_bytes": 960, "tts_at": [], "tts_ms": [], "interruptions_at": [],
            }  # fmt: skip
        self.peers.append(peer)
        await self._send(peer, "session.created", session=session)
        try:
            async for raw in ws:
                await self._on_message(peer, orjson.loads(raw))
        except ConnectionClosed:
            pass
        finally:
            if peer.response is not None:
                peer.response.cancel()
            if peer.timeline is not None and self.timeline_path:
                with open(self.timeline_path, "a", encoding="utf-8") as out:
                    out.write(json.dumps(peer.timeline) + "\n")

    async def _on_message(self, peer: _Peer, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "session.update":
            await self._update(peer, message.get("session") or {})
        elif kind == "input_audio_buffer.append":
            await self._append(peer, b64decode(message["audio"]))
        elif kind == "conversation.item.truncate":
            await self._truncate(peer, message)
        elif kind == "conversation.item.delete":
            item = str(message.get("item_id"))
            if item not in peer.items or item in self.deleted:
                await self._error(peer, "item_not_found", f"Item with item_id not found: {item}")
            else:
                self.deleted.append(item)
                await self._send(peer, "conversation.item.deleted", item_id=item)
        elif kind == "conversation.item.create":
            self.items_created.append(message.get("item") or {})
        elif kind == "response.cancel":
            if peer.response is None or peer.response.done():
                await self._error(
                    peer, "response_cancel_not_active", "Cancellation failed: no active response found"
                )
            else:
                peer.cancelled = True

    async def _update(self, peer: _Peer, update: dict[str, Any]) -> None:
        self.session_updates.append(update)
        if peer.timeline is not None:
            # The bridge puts the call's details in the instructions: its sid names the session.
            found = _CALL_SID.search(str(update.get("instructions", "")))
            peer.timeline["connection_id"] = f"{found.group(1) if found else 'unknown'}-{_id('sess')}"
        if update.get("type") != "realtime":
            await self._error(
                peer, "missing_required_parameter", "Missing required parameter: 'session.type'."
            )
            return
        audio = update.get("audio") or {}
        for direction in ("input", "output"):
            spec = (audio.get(direction) or {}).get("format")
            if spec is None:
                continue
            if not isinstance(spec, dict) or spec.get("type") not in (
                "audio/pcmu",
                "audio/pcma",
                "audio/pcm",
            ):
                await self._error(
                    peer, "invalid_value", f"Invalid value for 'session.audio.{direction}.format'."
                )
                return
            if spec["type"] == "audio/pcm" and "rate" not in spec:
                await self._error(peer, "missing_required_parameter", "Missing required parameter: 'rate'.")
                return
            if direction == "output" and self.behaviour.lie_about_format:
                continue  # the reported trap: PCM comes back although G.711 was asked for
            peer.session["audio"][direction]["format"] = spec
        await self._send(peer, "session.updated", session=peer.session)

    def _format(self, peer: _Peer, direction: str) -> str:
        return str(peer.session["audio"][direction]["format"]["type"])

    async def _append(self, peer: _Peer, audio: bytes) -> None:
        peer.appended += audio
        # Read in the format in force now: early mu-law under the PCM default is misread.
        ulaw = self._format(peer, "input") == "audio/pcmu"
        if peer.timeline is not None:
            peer.timeline["audio_at"].append(time.monotonic())
            peer.timeline["audio_bytes"].append(len(peer.appended))
            peer.timeline["frame_bytes"] = 160 if ulaw else 960
        if ulaw:
            loud, ms = is_speech_ulaw(audio), len(audio) / 8
        else:
            loud, ms = is_speech_pcm16(audio), len(audio) / 48
        if loud and not peer.speaking:
            peer.speaking, peer.silence_ms = True, 0.0
            await self._send(peer, "input_audio_buffer.speech_started", audio_start_ms=0, item_id=_id("item"))
            if peer.response is not None and not peer.response.done():
                peer.cancelled = True  # interrupt_response: the server cancels it itself
                if peer.timeline is not None:
                    peer.timeline["interruptions_at"].append(time.monotonic())
        elif peer.speaking and not loud:
            peer.silence_ms += ms
            if peer.silence_ms >= SILENCE_TO_END_MS:
                peer.speaking = False
                item = _id("item")
                await self._send(peer, "input_audio_buffer.speech_stopped", audio_end_ms=0, item_id=item)
                await self._send(peer, "input_audio_buffer.committed", item_id=item)
                if self.behaviour.transcript_first:
                    await self._transcript(peer, item)
                peer.cancelled = False
                peer.response = asyncio.create_task(self._respond(peer, heard=item))
        elif loud:
            peer.silence_ms = 0.0

    async def _transcript(self, peer: _Peer, item: str) -> None:
        await self._send(
            peer, "conversation.item.input_audio_transcription.completed", item_id=item, transcript="hello"
        )

    async def _respond(self, peer: _Peer, heard: str) -> None:
        """A response to the caller's item `heard`, whose transcript comes after its first
        delta (unless `transcript_first`)."""
        b = self.behaviour
        transcript_due = not b.transcript_first
        if b.think_ms:
            await asyncio.sleep(b.think_ms / 1000)
        response = _id("resp")
        await self._send(peer, "response.created", response={"id": response, "status": "in_progress"})
        pcmu = self._format(peer, "output") == "audio/pcmu"
        late = b.late_deltas
        item, output_index = "", -1
        words = iter(re.findall(r" ?\S+", REPLY_WORDS))  # with the first deltas, as the model's come
        for opens_item, ms in self._deltas():
            if peer.cancelled:
                if late <= 0:
                    break
                late -= 1  # already on the wire when the caller spoke
            if opens_item:
                item, output_index = _id("item"), output_index + 1
                peer.items[item] = 0
                await self._send(
                    peer, "response.output_item.added", response_id=response, output_index=output_index,
                    item={"id": item, "type": "message"},
                )  # fmt: skip
            word = None if peer.cancelled else next(words, None)
            if word is not None:
                await self._send(
                    peer, "response.output_audio_transcript.delta", response_id=response, item_id=item,
                    output_index=output_index, content_index=0, delta=word,
                )  # fmt: skip
            audio, encoded = _tone(ms, pcmu)
            peer.items[item] += ms
            peer.deltas.append(audio)
            if peer.timeline is not None and not peer.cancelled:  # stale deltas: the bridge drops them
                # Stamped before the send: the bridge may have relayed it before the send returns.
                peer.timeline["tts_at"].append(time.monotonic())
                peer.timeline["tts_ms"].append(ms)
            await self._send(
                peer, "response.output_audio.delta", response_id=response, item_id=item,
                output_index=output_index, content_index=0, delta=encoded,
            )  # fmt: skip
            if transcript_due:
                transcript_due = False
                await self._transcript(peer, heard)
            await asyncio.sleep(b.delta_ms / 1000 / (1 if b.pace else 5))  # (faster than real time)
        if transcript_due:
            await self._transcript(peer, heard)
        status = "cancelled" if peer.cancelled else "completed"
        if status == "completed":
            await self._send(
                peer,
                "response.output_audio_transcript.done",
                response_id=response,
                item_id=item,
                transcript=REPLY_WORDS,
            )
            await self._send(peer, "response.output_audio.done", response_id=response, item_id=item)
        if status == "completed" and b.tool_after_reply is not None:
            name, arguments = b.tool_after_reply
            await self._send(
                peer, "response.function_call_arguments.done", response_id=response, call_id=_id("call"),
                name=name, arguments=json.dumps(arguments),
            )  # fmt: skip
        details = {"reason": "turn_detected"} if peer.cancelled else None
        await self._send(
            peer, "response.done", response={"id": response, "status": status, "status_details": details}
        )

    def _deltas(self) -> Iterator[tuple[bool, int]]:
        """(opens an item, ms) for each delta of a response: the preamble's item first."""
        b = self.behaviour
        for length in [b.preamble_ms, b.reply_ms] if b.preamble_ms else [b.reply_ms]:
            for start in range(0, length, b.delta_ms):
                yield start == 0, min(b.delta_ms, length - start)

    async def _truncate(self, peer: _Peer, message: dict[str, Any]) -> None:
        item, end_ms = str(message.get("item_id")), message.get("audio_end_ms")
        if item not in peer.items or item in self.deleted or not peer.items[item]:
            await self._error(peer, "invalid_value", "Only model output audio messages can be truncated")
            return
        if not isinstance(end_ms, int) or end_ms > peer.items[item]:
            await self._error(
                peer,
                "invalid_value",
                f"Audio content of {peer.items[item]}ms is already shorter than {end_ms}ms",
            )
            return
        self.truncations.append({"item_id": item, "audio_end_ms": end_ms, "item_ms": peer.items[item]})
        await self._send(
            peer, "conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=end_ms
        )

    async def _error(self, peer: _Peer, code: str, text: str) -> None:
        self.errors_sent.append(code)
        await self._send(
            peer, "error", error={"type": "invalid_request_error", "code": code, "message": text}
        )

    async def _send(self, peer: _Peer, kind: str, **body: Any) -> None:
        message = orjson.dumps({"type": kind, "event_id": _id("event"), **body})
        with contextlib.suppress(ConnectionClosed):
            await peer.ws.send(message, text=True)


# Ids unique in this process, as the service's are; a counter, not os.urandom per event
# (a stand-in under load sends a dozen events a second per call).
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_{_ID_PREFIX}{next(_ID_COUNTER):08x}"


@functools.cache
def _tone(ms: int, pcmu: bool) -> tuple[bytes, str]:
    """`ms` of the reply's 440 Hz tone, and its base64: the same for every delta, made once."""
    t = np.arange(ms * 24) / 24000
    tone = (6000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    audio = ulaw_encode(tone[::3]) if pcmu else tone.astype("<i2").tobytes()
    return audio, b64encode(audio).decode()


def run(args: argparse.Namespace) -> int:
    """`ivr-bridge stub-voice-api --provider openai`."""
    behaviour = RealtimeBehaviour(
        api_key=args.api_key or RealtimeBehaviour().api_key,
        reply_ms=args.reply_ms,
        delta_ms=args.tts_chunk_ms,
        think_ms=args.think_ms,
        pace=not args.no_pace,
    )
    banner = f"OpenAI Realtime stand-in at ws://{args.host}:{args.port}{PATH} (key {behaviour.api_key})"
    standin = OpenAiRealtimeStandIn(behaviour, timeline_path=args.timeline)
    return serve_until_signalled(standin, args.host, args.port, banner)
