"""Sans-I/O audio path: G.711 mu-law, streaming resampling and TTS WAV parsing."""

from .convert import BotAudio, CallerAudio
from .g711 import FRAME_BYTES, ULAW_SILENCE, ulaw_decode, ulaw_encode
from .resample import Resampler
from .wav import Pcm, WavError, decode_tts_audio, wav_bytes

__all__ = [
    "FRAME_BYTES",
    "ULAW_SILENCE",
    "BotAudio",
    "CallerAudio",
    "Pcm",
    "Resampler",
    "WavError",
    "decode_tts_audio",
    "ulaw_decode",
    "ulaw_encode",
    "wav_bytes",
]
