"""A stand-in for VoxNexus' realtime speech-to-text and text-to-speech sockets, both on one
port, built to VoxNexus' WebSocket API page and `shared/reference/providers.md` §4.7:

- `/v1/stt/realtime` and `/v1/tts/realtime`; the key as `?token=`, `X-Api-Key` or (an older
  page of the docs) `Authorization: Bearer`; a bad key gets HTTP 401 at the handshake, or
  (`auth_failure="error"`) an `error` then a close;
- `init` first (anything else before it gets an `error`, then a close or not: a switch);
  `ready {request_id, format, sample_rate, ...}` echoes what was accepted; a format or rate
  it does not take gets `error UNSUPPORTED_FORMAT` (a voice it does not know,
  `VOICE_NOT_FOUND`) and the socket waits for another `init`; `ping` is accepted and
  ignored;
- STT: PCM16 at the init's rate, energy VAD, partials every ~300 ms of speech (growing
  text, no words), then one final per sentence when the speech stops, with confidence,
  offset, duration and words; `flush` finalises pending speech and answers `flush_done`;
  audio after it is a new session (offsets from 0). It cannot recognise speech: what the
  caller "said" is scripted (`transcripts`, one per utterance, in order, the last repeated);
- TTS: text is buffered and spoken from the first sentence boundary (or `is_final`), as a
  tone 60 ms per character, streamed faster than real time; the last chunk carries
  `is_final: true` (with no audio when the closing text came after the rest was spoken);
  WAV chunks each with its own RIFF header, only the first with one (a streamed WAV), or
  none; there is no cancel: closing the socket is the only way to stop it.

Everything the tests check is recorded per socket (`stt_sockets`, `tts_sockets`), and
`wait_for` waits on any change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import struct
from base64 import b64decode, b64encode
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ivr_bridge.audio import wav_bytes
from ivr_bridge.standins.socket_server import StandInServer, serve_until_signalled

STT_PATH = "/v1/stt/realtime"
TTS_PATH = "/v1/tts/realtime"
FRAME_MS = 20  # the VAD's frame
# The end of a sentence: its mark, closing quotes or brackets, then a space or the end.
SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]]*(?=\s|$)")


@dataclass
class VoxNexusBehaviour:
    """How the stand-in behaves; the defaults are the documented service as far as known."""

    api_key: str = "vn-test-key"
    bearer: bool = True  # `Authorization: Bearer <key>` accepted as well
    auth_failure: str = "http"  # "http": 401 at the handshake; "error": `error` then close
    before_init: str = "close"  # a message before `init`: `error`, then "close" or "keep"
    # Speech-to-text
    stt_rates: tuple[int, ...] = (8000, 16000, 22050, 44100, 48000)  # REST STT's list
    stt_ready_rate: int = 0  # 0: `ready` echoes the rate asked; else it says this one
    transcripts: list[str] = field(default_factory=lambda: ["I would like support."])
    speech_rms: float = 500.0
    end_of_speech_ms: int = 500  # silence ending an utterance (its finals)
    partial_ms: int = 300
    # Text-to-speech
    tts_formats: tuple[str, ...] = ("wav",)  # mp3 is documented, but not made here
    tts_rates: tuple[int, ...] = (8000, 16000, 22050, 24000, 44100, 48000)
    tts_ready_rate: int = 0  # 0: the rate asked
    voices: tuple[str, ...] = ()  # (): any voice_id; else others get VOICE_NOT_FOUND
    wav_header: str = "every"  # "every" chunk, the "first" chunk only, or "none" (raw PCM)
    ms_per_char: int = 60
    max_segment_ms: int = 6000  # a sentence's audio at most
    chunk_ms: int = 100
    speedup: float = 4.0  # audio streamed this many times faster than real time; 0: at once
    tone_hz: float = 440.0
    close_after_final: bool = False  # close the TTS socket after its final audio


@dataclass(eq=False)
class SttSocket:
    """One STT connection as the stand-in saw it."""

    request_id: str
    inits: list[dict[str, Any]] = field(default_factory=list)  # every init, refused ones too
    rate: int = 0  # accepted (0: not initialised)
    audio_bytes: int = 0
    audio_messages: int = 0
    pings: int = 0
    flushes: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)  # everything sent, `ready` on
    closed: bool = False

    def transcripts(self, final: bool | None = None) -> list[dict[str, Any]]:
        return [
            m for m in self.sent if m["type"] == "transcript" and (final is None or m["is_final"] is final)
        ]


@dataclass(eq=False)
class TtsSocket:
    """One TTS connection as the stand-in saw it."""

    request_id: str
    inits: list[dict[str, Any]] = field(default_factory=list)
    rate: int = 0
    texts: list[str] = field(default_factory=list)  # the text of every `text` message
    finals: int = 0  # `text` messages with is_final
    pings: int = 0
    unknown: list[str] = field(default_factory=list)  # types it does not know (a `cancel`?)
    spoken: list[str] = field(default_factory=list)  # segments turned into audio
    chunks: int = 0  # audio messages sent
    audio: bytearray = field(default_factory=bytearray)  # the PCM16 sent, headers stripped
    final_sent: bool = False
    closed: bool = False


@dataclass
class _Utterance:
    """The STT socket's recognition state: one session between flushes."""

    offset_ms: int = 0  # audio time since the session began
    speaking: bool = False
    start_ms: int = 0
    speech_ms: int = 0
    silence_ms: int = 0
    since_partial_ms: int = 0
    partials: int = 0


@dataclass
class _Said:
    """The TTS socket's text: sentences waiting to be spoken, and whether input is closed."""

    pending: deque[str] = field(default_factory=deque)
    more: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


class VoxNexusStandIn(StandInServer):
    path = STT_PATH

    def __init__(self, behaviour: VoxNexusBehaviour | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour or VoxNexusBehaviour()
        self.stt_sockets: list[SttSocket] = []
        self.tts_sockets: list[TtsSocket] = []
        self.refused = 0  # connections refused for their key
        self.utterances = 0  # transcripts consumed (across sockets: the caller's script)
        self._changed: asyncio.Condition | None = None

    @property
    def stt_url(self) -> str:
        return f"ws://{self.base}{STT_PATH}"

    @property
    def tts_url(self) -> str:
        return f"ws://{self.base}{TTS_PATH}"

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Until `predicate()` holds, re-checked on every change the stand-in records."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    # -- handshake -------------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        key = self.behaviour.api_key
        query = {k: v[0] for k, v in parse_qs(urlsplit(request.path).query).items()}
        if "token" in query:
            return query["token"] == key
        if "X-Api-Key" in request.headers:
            return request.headers["X-Api-Key"] == key
        return self.behaviour.bearer and request.headers.get("Authorization") == f"Bearer {key}"

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path not in (STT_PATH, TTS_PATH):
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.behaviour.auth_failure == "http" and not self._authorised(request):
            self.refused += 1
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Invalid API key\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if not self._authorised(ws.request):
            self.refused += 1
            await _send(ws, {"type": "error", "error": "Invalid API key", "code": "UNAUTHORIZED"})
            await ws.close(1008, "unauthorized")
            await self._notify()
            return
        if urlsplit(ws.request.path).path == STT_PATH:
            await self._stt(ws)
        else:
            await self._tts(ws)

    async def _before_init(self, ws: ServerConnection, message: dict[str, Any]) -> bool:
        """A message other than `init` came first: complain; False if the socket is closed."""
        if message.get("type") == "ping":
            return True
        await _send(ws, _error("Send init first", "NOT_INITIALIZED"))
        if self.behaviour.before_init == "close":
            await ws.close(1008, "init required")
            return False
        return True

    # -- speech-to-text --------------------------------------------------------------------

    async def _stt(self, ws: ServerConnection) -> None:
        record = SttSocket(f"req_{secrets.token_hex(6)}")
        self.stt_sockets.append(record)
        await self._notify()
        language = "en-US"
        state = _Utterance()
        try:
            async for raw in ws:
                message = _json(raw)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "ping":
                    record.pings += 1
                elif not record.rate:
                    if kind != "init":
                        if not await self._before_init(ws, message):
                            break
                        continue
                    record.inits.append(message)
                    language = str(message.get("language") or language)
                    await self._stt_init(ws, record, message)
                elif kind == "audio":
                    pcm = b64decode(str(message.get("data") or ""))
                    record.audio_bytes += len(pcm)
                    record.audio_messages += 1
                    await self._hear(ws, record, state, pcm, language)
                elif kind == "command" and message.get("command") == "flush":
                    record.flushes += 1
                    if state.speaking:
                        await self._finals(ws, record, state, language)
                    state = _Utterance()  # audio after a flush: a new session
                    await self._stt_send(ws, record, {"type": "flush_done", "request_id": record.request_id})
                await self._notify()
        except ConnectionClosed:
            pass
        finally:
            record.closed = True
            await self._notify()

    async def _stt_init(self, ws: ServerConnection, record: SttSocket, init: dict[str, Any]) -> None:
        b = self.behaviour
        rate = init.get("sample_rate", 16000)
        if init.get("format", "pcm") != "pcm" or rate not in b.stt_rates:
            await self._stt_send(ws, record, _error("Invalid audio format", "UNSUPPORTED_FORMAT", record))
            return
        record.rate = b.stt_ready_rate or int(rate)
        ready = {
            "type": "ready",
            "request_id": record.request_id,
            "language": init.get("language", "en-US"),
            "format": "pcm",
            "sample_rate": record.rate,
        }
        await self._stt_send(ws, record, ready)

    async def _hear(
        self, ws: ServerConnection, record: SttSocket, state: _Utterance, pcm: bytes, language: str
    ) -> None:
        b = self.behaviour
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.float64)
        frame = record.rate * FRAME_MS // 1000
        for start in range(0, samples.size, frame):
            part = samples[start : start + frame]
            ms = round(part.size * 1000 / record.rate)
            loud = float(np.sqrt(np.mean(part**2))) > b.speech_rms
            if loud:
                if not state.speaking:
                    state.speaking, state.start_ms, state.speech_ms = True, state.offset_ms, 0
                    state.since_partial_ms = state.partials = 0
                state.speech_ms = state.offset_ms + ms - state.start_ms
                state.silence_ms = 0
                state.since_partial_ms += ms
                if state.since_partial_ms >= b.partial_ms:
                    state.since_partial_ms = 0
                    state.partials += 1
                    words = self._script().split()
                    partial = {
                        "type": "transcript",
                        "request_id": record.request_id,
                        "text": " ".join(words[: state.partials]),
                        "is_final": False,
                        "language": language,
                    }
                    await self._stt_send(ws, record, partial)
            elif state.speaking:
                state.silence_ms += ms
                if state.silence_ms >= b.end_of_speech_ms:
                    await self._finals(ws, record, state, language)
            state.offset_ms += ms

    def _script(self) -> str:
        """What the caller is saying now: the next of the scripted transcripts."""
        script = self.behaviour.transcripts or [""]
        return script[min(self.utterances, len(script) - 1)]

    async def _finals(
        self, ws: ServerConnection, record: SttSocket, state: _Utterance, language: str
    ) -> None:
        """The utterance is over: a final per sentence, its time shared out by length."""
        text = self._script()
        self.utterances += 1
        sentences = _sentences(text) or [""]
        total = max(1, sum(len(s) for s in sentences))
        offset = state.start_ms
        for sentence in sentences:
            duration = round(state.speech_ms * max(1, len(sentence)) / total)
            await self._stt_send(ws, record, _final(record.request_id, sentence, language, offset, duration))
            offset += duration
        state.speaking = False
        state.silence_ms = 0

    async def _stt_send(self, ws: ServerConnection, record: SttSocket, message: dict[str, Any]) -> None:
        record.sent.append(message)
        await _send(ws, message)

    # -- text-to-speech --------------------------------------------------------------------

    async def _tts(self, ws: ServerConnection) -> None:
        record = TtsSocket(f"req_{secrets.token_hex(6)}")
        self.tts_sockets.append(record)
        await self._notify()
        buffer = ""
        said = _Said()
        speaker: asyncio.Task[None] | None = None
        try:
            async for raw in ws:
                message = _json(raw)
                if message is None:
                    continue
                kind = message.get("type")
                if kind == "ping":
                    record.pings += 1
                elif not record.rate:
                    if kind != "init":
                        if not await self._before_init(ws, message):
                            break
                        continue
                    record.inits.append(message)
                    await self._tts_init(ws, record, message)
                elif kind == "text" and not said.closed:
                    text = str(message.get("text") or "")
                    record.texts.append(text)
                    buffer += text
                    if message.get("is_final") is True:
                        record.finals += 1
                        said.closed = True
                        complete, buffer = buffer, ""
                    else:
                        complete, buffer = _complete_sentences(buffer)
                    said.pending.extend(_sentences(complete))
                    said.more.set()
                    if speaker is None:
                        speaker = asyncio.create_task(self._speak(ws, record, said))
                elif kind != "text":
                    record.unknown.append(str(kind))
                await self._notify()
        except ConnectionClosed:
            pass
        finally:
            if speaker is not None:
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await speaker
            record.closed = True
            await self._notify()

    async def _tts_init(self, ws: ServerConnection, record: TtsSocket, init: dict[str, Any]) -> None:
        b = self.behaviour
        voice = str(init.get("voice_id") or "")
        if b.voices and voice and voice not in b.voices:
            await _send(ws, _error("Invalid voice_id", "VOICE_NOT_FOUND", record))
            return
        audio_format = init.get("format", "wav")
        rate = init.get("sample_rate", 16000)
        if audio_format not in b.tts_formats or rate not in b.tts_rates:
            await _send(ws, _error("Invalid audio format", "UNSUPPORTED_FORMAT", record))
            return
        record.rate = b.tts_ready_rate or int(rate)
        ready = {
            "type": "ready",
            "request_id": record.request_id,
            "voice_id": voice or (b.voices[0] if b.voices else "vl-default"),
            "language": init.get("language", "en-US"),
            "format": audio_format,
            "sample_rate": record.rate,
        }
        await _send(ws, ready)

    async def _speak(
        self,
        ws: ServerConnection,
        record: TtsSocket,
        said: _Said,
    ) -> None:
        """Speak each complete sentence as it comes; the last chunk of all is marked final.
        Only closing the socket stops it (no cancel exists)."""
        b = self.behaviour
        chunk = max(1, record.rate * b.chunk_ms // 1000)
        sample = 0  # the tone's phase runs on across the sentences
        with contextlib.suppress(ConnectionClosed):
            while True:
                while not said.pending and not said.closed:
                    said.more.clear()
                    await said.more.wait()
                if not said.pending:  # closed after everything was spoken: an empty final
                    await self._audio(ws, record, b"", True)
                    break
                sentence = said.pending.popleft()
                record.spoken.append(sentence)
                length = record.rate * min(len(sentence) * b.ms_per_char, b.max_segment_ms) // 1000
                t = (sample + np.arange(length)) / record.rate
                tone = (6000 * np.sin(2 * np.pi * b.tone_hz * t)).astype("<i2")
                sample += length
                for start in range(0, length, chunk):
                    last = start + chunk >= length and said.closed and not said.pending
                    await self._audio(ws, record, tone[start : start + chunk].tobytes(), last)
                    if last:
                        break
                    if b.speedup > 0:
                        await asyncio.sleep(b.chunk_ms / 1000 / b.speedup)
                if record.final_sent:
                    break
            if b.close_after_final:
                await ws.close(1000)

    async def _audio(self, ws: ServerConnection, record: TtsSocket, pcm: bytes, final: bool) -> None:
        mode = self.behaviour.wav_header
        data = pcm
        if pcm and (mode == "every" or (mode == "first" and not record.audio)):
            samples = np.frombuffer(pcm, "<i2")
            data = (
                wav_bytes(samples, record.rate) if mode == "every" else _streaming_header(record.rate) + pcm
            )
        record.audio += pcm
        record.chunks += 1
        record.final_sent = final
        await ws.send(json.dumps({"type": "audio", "data": b64encode(data).decode(), "is_final": final}))
        await self._notify()


def _sentences(text: str) -> list[str]:
    """`text` cut after each sentence end (whatever follows the last is one more)."""
    out, start = [], 0
    for match in SENTENCE_END.finditer(text):
        out.append(text[start : match.end()].strip())
        start = match.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


def _complete_sentences(buffer: str) -> tuple[str, str]:
    """(the complete sentences of `buffer`, the rest still being written)."""
    ends = [m.end() for m in SENTENCE_END.finditer(buffer)]
    return (buffer[: ends[-1]], buffer[ends[-1] :]) if ends else ("", buffer)


def _final(request_id: str, text: str, language: str, offset: int, duration: int) -> dict[str, Any]:
    words = text.split()
    each = duration // max(1, len(words))
    return {
        "type": "transcript",
        "request_id": request_id,
        "text": text,
        "is_final": True,
        "language": language.split("-")[0],
        "confidence": 0.93,
        "offset": offset,
        "duration": duration,
        "words": [
            {
                "word": w.strip(".,!?").lower(),
                "offset": offset + i * each,
                "duration": each,
                "confidence": 0.95,
            }
            for i, w in enumerate(words)
        ],
    }


def _streaming_header(rate: int) -> bytes:
    """A WAV header as a streaming writer sends it: sizes unknown (0xFFFFFFFF)."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )


def _error(text: str, code: str, record: SttSocket | TtsSocket | None = None) -> dict[str, Any]:
    message = {"type": "error", "error": text, "code": code}
    if record is not None:
        message["request_id"] = record.request_id
    return message


def _json(raw: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


async def _send(ws: ServerConnection, message: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(message))


# -- command line -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stand-in's options for `python -m ivr_bridge.standins.voxnexus`; `run` also takes
    the options `ivr-bridge stub-voice-api` defines (NextEVI's), using what applies."""
    defaults = VoxNexusBehaviour()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--api-key", help=f"the key to accept (default {defaults.api_key})")
    parser.add_argument(
        "--wav-header",
        choices=["every", "first", "none"],
        default=defaults.wav_header,
        help="RIFF header on every TTS chunk, the first only, or none",
    )
    parser.add_argument("--raw-pcm", action="store_true", help="TTS chunks without WAV header")
    parser.add_argument("--tts-chunk-ms", type=int, default=defaults.chunk_ms)
    parser.add_argument("--no-pace", action="store_true", help="send each sentence's audio at once")
    parser.add_argument("--speech-rms", type=float, default=defaults.speech_rms)
    parser.add_argument("--end-of-turn-ms", type=int, default=defaults.end_of_speech_ms)
    parser.add_argument("--reply-tone-hz", type=float, default=defaults.tone_hz)
    parser.add_argument(
        "--transcript",
        action="append",
        help="what the caller says, one per utterance in order (repeatable; the last repeats)",
    )
    parser.add_argument("--auth-failure", choices=["http", "error"], default=defaults.auth_failure)


def behaviour_from(args: argparse.Namespace) -> VoxNexusBehaviour:
    defaults = VoxNexusBehaviour()
    wav_header = getattr(args, "wav_header", None) or defaults.wav_header
    if getattr(args, "raw_pcm", False):
        wav_header = "none"
    return VoxNexusBehaviour(
        api_key=getattr(args, "api_key", None) or defaults.api_key,
        auth_failure=getattr(args, "auth_failure", None) or defaults.auth_failure,
        transcripts=getattr(args, "transcript", None) or defaults.transcripts,
        speech_rms=getattr(args, "speech_rms", defaults.speech_rms),
        end_of_speech_ms=getattr(args, "end_of_turn_ms", defaults.end_of_speech_ms),
        wav_header=wav_header,
        chunk_ms=getattr(args, "tts_chunk_ms", defaults.chunk_ms),
        speedup=0.0 if getattr(args, "no_pace", False) else defaults.speedup,
        tone_hz=getattr(args, "reply_tone_hz", defaults.tone_hz),
    )


def run(args: argparse.Namespace) -> int:
    """`ivr-bridge stub-voice-api --provider voxnexus`."""
    behaviour = behaviour_from(args)
    base = f"ws://{args.host}:{args.port}"
    banner = (
        f"VoxNexus stand-in: VOXNEXUS_STT_URL={base}{STT_PATH} VOXNEXUS_TTS_URL={base}{TTS_PATH} "
        f"VOXNEXUS_API_KEY={behaviour.api_key}"
    )
    return serve_until_signalled(VoxNexusStandIn(behaviour), args.host, args.port, banner)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ivr_bridge.standins.voxnexus", description="Run a VoxNexus STT/TTS stand-in."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
