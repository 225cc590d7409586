"""A peer bridge built with Pipecat, for `scripts/bench.py --peer pipecat`: the same job as
ivr-bridge, written with Pipecat's public API only.

Twilio's webhook gets TwiML naming the stream; the stream runs a pipeline
`transport.input() -> relay -> transport.output()`: Pipecat's FastAPI WebSocket
transport with its `TwilioFrameSerializer` (mu-law 8 kHz <-> PCM16 at the pipeline's
rate, its own resampler), and a minimal processor for the voice API:

- `--provider nextevi`: `NextEviRelay` sends each caller frame as binary PCM16 24 kHz and
  plays the `tts_chunk` WAV audio, interrupting on `tts_interruption`;
- `--provider openai`: `RealtimeRelay` asks for `audio/pcmu` both ways (the pipeline runs
  at 8 kHz: Pipecat has no mu-law pass-through, so its serializer decodes each frame and
  the relay encodes it again with Pipecat's own G.711), and interrupts on
  `input_audio_buffer.speech_started`.

An interruption makes the serializer send `clear`.

It runs in a virtual environment of its own (`bench.py` makes it), so it imports nothing
from ivr_bridge:

    python pipecat_bridge.py --port 8090 --voice-url ws://127.0.0.1:9000/ws/voice \
        --api-key oak_bench_key --config-id cfg_bench
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
import uuid
from urllib.parse import parse_qsl, urlencode

import uvicorn
import websockets
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner

RATE = 24000
WAV_HEADER = 44


class RealtimeRelay(FrameProcessor):
    """Caller audio up to an OpenAI-Realtime-protocol voice API as mu-law; its deltas down."""

    def __init__(self, url: str, api_key: str, call_sid: str) -> None:
        super().__init__()
        self._url = url
        self._api_key = api_key
        self._call_sid = call_sid
        self._ws: websockets.ClientConnection | None = None
        self._receiver: asyncio.Task | None = None
        self._up = create_stream_resampler()
        self._down = create_stream_resampler()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            headers = {"Authorization": f"Bearer {self._api_key}"}
            self._ws = await websockets.connect(
                self._url, additional_headers=headers, compression=None, max_size=2**22
            )
            pcmu = {"type": "audio/pcmu"}
            session = {
                "type": "realtime",
                "output_modalities": ["audio"],
                # The bench pairs the caller and the session by the call sid in here.
                "instructions": f"call sid: {self._call_sid}",
                "audio": {
                    "input": {"format": pcmu, "turn_detection": {"type": "server_vad"}},
                    "output": {"format": pcmu},
                },
            }
            await self._ws.send(json.dumps({"type": "session.update", "session": session}))
            self._receiver = asyncio.create_task(self._receive())
        elif isinstance(frame, InputAudioRawFrame):
            if self._ws is not None:
                ulaw = await pcm_to_ulaw(frame.audio, frame.sample_rate, 8000, self._up)
                message = {"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw).decode()}
                with contextlib.suppress(websockets.ConnectionClosed):  # _receive sees the close
                    await self._ws.send(json.dumps(message))
        elif isinstance(frame, (EndFrame, CancelFrame)):
            if self._receiver is not None:
                self._receiver.cancel()
            if self._ws is not None:
                await self._ws.close()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _receive(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self._ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "response.output_audio.delta":
                    pcm = await ulaw_to_pcm(base64.b64decode(message["delta"]), 8000, 8000, self._down)
                    await self.push_frame(OutputAudioRawFrame(audio=pcm, sample_rate=8000, num_channels=1))
                elif kind == "input_audio_buffer.speech_started":
                    await self.broadcast_interruption()


class NextEviRelay(FrameProcessor):
    """Caller audio up to a NextEVI-protocol voice API; its speech down as output audio."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url
        self._ws: websockets.ClientConnection | None = None
        self._receiver: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._ws = await websockets.connect(self._url, compression=None, max_size=2**22)
            settings = {
                "type": "session_settings",
                "timestamp": time.time(),
                "message_id": str(uuid.uuid4()),
                "data": {"audio": {"sample_rate": RATE, "channels": 1, "encoding": "linear16"}},
            }
            await self._ws.send(json.dumps(settings))
            self._receiver = asyncio.create_task(self._receive())
        elif isinstance(frame, InputAudioRawFrame):
            if self._ws is not None:
                with contextlib.suppress(websockets.ConnectionClosed):  # _receive sees the close
                    await self._ws.send(frame.audio)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._close()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _receive(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                kind = message.get("type")
                data = message.get("data", message)
                if kind == "tts_chunk":
                    audio = base64.b64decode(data["content"])[WAV_HEADER:]
                    await self.push_frame(OutputAudioRawFrame(audio=audio, sample_rate=RATE, num_channels=1))
                elif kind == "tts_interruption":
                    await self.broadcast_interruption()
        except websockets.ConnectionClosed:
            pass

    async def _close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        if self._ws is not None:
            await self._ws.close()


def create_app(stream_url: str, provider: str, voice_url: str, api_key: str, config_id: str) -> FastAPI:
    app = FastAPI()

    @app.post("/twiml")
    async def twiml(request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        call_sid = form.get("CallSid", "")
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{stream_url}">'
            f'<Parameter name="CallSid" value="{call_sid}"/></Stream></Connect></Response>'
        )
        return Response(body, media_type="application/xml")

    @app.websocket("/media-stream")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        start: dict = {}
        while not start:  # Twilio sends `connected`, then `start`
            message = json.loads(await websocket.receive_text())
            if message.get("event") == "start":
                start = message["start"]
        call_sid = start["callSid"]
        serializer = TwilioFrameSerializer(
            start["streamSid"], call_sid, params=TwilioFrameSerializer.InputParams(auto_hang_up=False)
        )
        transport = FastAPIWebsocketTransport(
            websocket,
            FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
            ),
        )
        if provider == "openai":
            relay: FrameProcessor = RealtimeRelay(f"{voice_url}?model=gpt-realtime", api_key, call_sid)
            rate = 8000
        else:
            # The bench pairs the caller and the voice API session by this connection id.
            query = urlencode({"api_key": api_key, "config_id": config_id})
            relay = NextEviRelay(f"{voice_url.rstrip('/')}/{call_sid}-{uuid.uuid4()}?{query}")
            rate = RATE
        worker = PipelineWorker(
            Pipeline([transport.input(), relay, transport.output()]),
            params=PipelineParams(audio_in_sample_rate=rate, audio_out_sample_rate=rate),
            enable_rtvi=False,
        )

        @transport.event_handler("on_client_disconnected")
        async def on_client_disconnected(transport: object, client: object) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--provider", choices=["nextevi", "openai"], default="nextevi")
    parser.add_argument("--voice-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--config-id", required=True)
    args = parser.parse_args()
    logger.remove()  # Pipecat logs every pipeline's start and stop at INFO: not the job measured
    logger.add(sys.stderr, level="WARNING")
    stream_url = f"ws://127.0.0.1:{args.port}/media-stream"
    app = create_app(stream_url, args.provider, args.voice_url, args.api_key, args.config_id)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop")


if __name__ == "__main__":
    main()
