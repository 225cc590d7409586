"""The bare relay, for `scripts/bench.py --peer`: the physical floor of the job. asyncio,
uvloop and websockets, nothing else between a Twilio stream and the voice API, and no
audio work worth the name. No marks, no records, no checks.

- `--provider nextevi`: G.711 by table lookup, 8 -> 24 kHz by repeating each sample three
  times, 24 -> 8 kHz by keeping every third (no filters: it aliases, and only a benchmark
  may do that);
- `--provider openai`: `audio/pcmu` both ways; the caller's base64 payload goes up as it
  came, the deltas come down cut into 160-byte frames.

    python relay.py --port 8090 --voice-url ws://127.0.0.1:9000/ws/voice \
        --api-key oak_bench_key --config-id cfg_bench

The webhook (`POST /twiml`) is served on `--port`, the Media Stream on `--port` + 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
import uuid
from urllib.parse import parse_qsl, urlencode

import numpy as np
import uvloop
import websockets
from websockets.asyncio.server import ServerConnection, serve

from ivr_bridge.audio.g711 import PCM_TO_ULAW, ULAW_TO_PCM

WAV_HEADER = 44
FRAME = 160
# Each mu-law code as three PCM16 samples at 24 kHz (6 bytes), in one lookup.
UP = np.repeat(ULAW_TO_PCM.astype("<i2"), 3).reshape(256, 3)


def session_settings() -> str:
    data = {"audio": {"sample_rate": 24000, "channels": 1, "encoding": "linear16"}}
    return json.dumps(
        {"type": "session_settings", "timestamp": time.time(), "message_id": str(uuid.uuid4()), "data": data}
    )


async def relay_realtime(ws: ServerConnection, start: dict, voice_url: str, api_key: str) -> None:
    stream_sid = start["streamSid"]
    pcmu = {"type": "audio/pcmu"}
    session = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": f"call sid: {start['callSid']}",  # how the bench pairs the session
        "audio": {
            "input": {"format": pcmu, "turn_detection": {"type": "server_vad"}},
            "output": {"format": pcmu},
        },
    }
    headers = {"Authorization": f"Bearer {api_key}"}
    url = f"{voice_url}?model=gpt-realtime"
    async with websockets.connect(url, additional_headers=headers, compression=None, max_size=2**22) as up:
        await up.send(json.dumps({"type": "session.update", "session": session}))

        async def downlink() -> None:
            head = f'{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"'
            clear = json.dumps({"event": "clear", "streamSid": stream_sid})
            async for raw in up:
                message = json.loads(raw)
                if message.get("type") == "response.output_audio.delta":
                    ulaw = base64.b64decode(message["delta"])
                    for i in range(0, len(ulaw) - len(ulaw) % FRAME, FRAME):
                        await ws.send(head + base64.b64encode(ulaw[i : i + FRAME]).decode() + '"}}')
                elif message.get("type") == "input_audio_buffer.speech_started":
                    await ws.send(clear)

        down = asyncio.create_task(downlink())
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("event") == "media":
                    await up.send(
                        f'{{"type":"input_audio_buffer.append","audio":"{message["media"]["payload"]}"}}'
                    )
                elif message.get("event") == "stop":
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            down.cancel()


async def relay(ws: ServerConnection, provider: str, voice_url: str, query: str, api_key: str) -> None:
    start: dict = {}
    async for raw in ws:  # `connected`, then `start`
        message = json.loads(raw)
        if message.get("event") == "start":
            start = message["start"]
            break
    if not start:
        return
    if provider == "openai":
        await relay_realtime(ws, start, voice_url, api_key)
        return
    stream_sid = start["streamSid"]
    url = f"{voice_url.rstrip('/')}/{start['callSid']}-{uuid.uuid4()}?{query}"
    async with websockets.connect(url, compression=None, max_size=2**22) as up:
        await up.send(session_settings())

        async def downlink() -> None:
            head = f'{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"'
            clear = json.dumps({"event": "clear", "streamSid": stream_sid})
            async for raw in up:
                message = json.loads(raw)
                data = message.get("data", message)
                if message.get("type") == "tts_chunk":
                    pcm = np.frombuffer(base64.b64decode(data["content"])[WAV_HEADER:], dtype="<i2")[::3]
                    ulaw = PCM_TO_ULAW[pcm.view(np.uint16)].tobytes()
                    for i in range(0, len(ulaw) - len(ulaw) % FRAME, FRAME):
                        await ws.send(head + base64.b64encode(ulaw[i : i + FRAME]).decode() + '"}}')
                elif message.get("type") == "tts_interruption":
                    await ws.send(clear)

        down = asyncio.create_task(downlink())
        try:
            async for raw in ws:
                message = json.loads(raw)
                event = message.get("event")
                if event == "media":
                    codes = np.frombuffer(base64.b64decode(message["media"]["payload"]), dtype=np.uint8)
                    await up.send(UP[codes].tobytes())
                elif event == "stop":
                    break
        except websockets.ConnectionClosed:
            pass
        finally:
            down.cancel()


async def webhook(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream_url: str) -> None:
    """Twilio's webhook, minimal HTTP/1.1: one POST, the TwiML, close."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        form = dict(parse_qsl((await reader.readexactly(length)).decode()))
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="{stream_url}">'
            f'<Parameter name="CallSid" value="{form.get("CallSid", "")}"/></Stream></Connect></Response>'
        ).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--provider", choices=["nextevi", "openai"], default="nextevi")
    parser.add_argument("--voice-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--config-id", required=True)
    args = parser.parse_args()
    query = urlencode({"api_key": args.api_key, "config_id": args.config_id})
    stream_url = f"ws://127.0.0.1:{args.port + 1}/media-stream"
    http = await asyncio.start_server(lambda r, w: webhook(r, w, stream_url), "127.0.0.1", args.port)
    streams = serve(
        lambda ws: relay(ws, args.provider, args.voice_url, query, args.api_key),
        "127.0.0.1",
        args.port + 1,
        compression=None,
    )
    async with http, streams:
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main())
