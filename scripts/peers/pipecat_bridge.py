"""A peer bridge built with Pipecat, for `scripts/bench.py --peer pipecat`: the same job as
ivr-bridge with the NextEVI provider, written with Pipecat's public API only.

Twilio's webhook gets TwiML naming the stream; the stream runs a pipeline
`transport.input() -> NextEviRelay -> transport.output()`: Pipecat's FastAPI WebSocket
transport with its `TwilioFrameSerializer` (mu-law 8 kHz <-> PCM16 at 24 kHz, its own
resampler), and a minimal processor that sends each caller frame to the voice API as
binary PCM16 24 kHz and plays its `tts_chunk` WAV audio, interrupting on
`tts_interruption` (the serializer then sends `clear`).

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


def create_app(stream_url: str, voice_url: str, api_key: str, config_id: str) -> FastAPI:
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
        # The bench pairs the caller and the voice API session by this connection id.
        query = urlencode({"api_key": api_key, "config_id": config_id})
        relay = NextEviRelay(f"{voice_url.rstrip('/')}/{call_sid}-{uuid.uuid4()}?{query}")
        worker = PipelineWorker(
            Pipeline([transport.input(), relay, transport.output()]),
            params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE),
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
    parser.add_argument("--voice-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--config-id", required=True)
    args = parser.parse_args()
    logger.remove()  # Pipecat logs every pipeline's start and stop at INFO: not the job measured
    logger.add(sys.stderr, level="WARNING")
    app = create_app(f"ws://127.0.0.1:{args.port}/media-stream", args.voice_url, args.api_key, args.config_id)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop")


if __name__ == "__main__":
    main()
