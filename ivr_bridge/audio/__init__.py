"""Sans-I/O audio path: G.711 mu-law, streaming resampling and TTS WAV parsing."""

from .convert import BotAudio, CallerAudio, Ulaw
from .format import PCM16_24K, TWILIO_AUDIO, AudioFormat, Encoding, carried
from .g711 import FRAME_BYTES, ULAW_SILENCE, ulaw_decode, ulaw_encode
from .resample import Resampler
from .wav import Pcm, WavError, decode_tts_audio, wav_bytes

__all__ = [
    "FRAME_BYTES",
    "PCM16_24K",
    "TWILIO_AUDIO",
    "ULAW_SILENCE",
    "AudioFormat",
    "BotAudio",
    "CallerAudio",
    "Encoding",
    "Pcm",
    "Resampler",
    "Ulaw",
    "WavError",
    "carried",
    "decode_tts_audio",
    "ulaw_decode",
    "ulaw_encode",
    "wav_bytes",
]
