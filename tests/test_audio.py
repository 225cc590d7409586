"""Tests for ivr_bridge.audio: G.711, resampling quality/streaming, WAV parsing, framing."""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import sys
import warnings
import wave

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ivr_bridge.audio import (
    FRAME_BYTES,
    ULAW_SILENCE,
    BotAudio,
    CallerAudio,
    Pcm,
    Resampler,
    WavError,
    decode_tts_audio,
    resample,
    ulaw_decode,
    ulaw_encode,
)
from ivr_bridge.audio.g711 import PCM_TO_ULAW, ULAW_TO_PCM
from ivr_bridge.audio.measure import (
    chunked,
    filter_gain_db,
    g191_ulaw_decode,
    g191_ulaw_encode,
    g711_mismatches,
    impulse_delay_ms,
    passband_gain_db,
    passband_ripple_db,
    random_chunk_sizes,
    stream_error_lsb,
    tone,
    tone_amplitude,
    worst_alias_rejection,
    worst_image_rejection,
)
from ivr_bridge.audio.wav import is_wav, parse_wav

# --------------------------------------------------------------------------------------
# G.711 mu-law
# --------------------------------------------------------------------------------------


def test_g711_encoder_is_bit_exact_with_g191() -> None:
    assert g711_mismatches(g191_ulaw_encode) == 0


def test_g711_decoder_matches_g191_table() -> None:
    expected = np.array([g191_ulaw_decode(c) for c in range(256)], dtype=np.int16)
    np.testing.assert_array_equal(ulaw_decode(bytes(range(256))), expected)
    decoded = ulaw_decode(bytes([0xFF, 0x7F, 0x00, 0x80]))
    assert decoded.tolist() == [0, 0, -32124, 32124]
    assert decoded.dtype == np.int16


def test_g711_round_trip_is_stable_for_every_code() -> None:
    once = ulaw_decode(bytes(range(256)))
    np.testing.assert_array_equal(ulaw_decode(ulaw_encode(once)), once)


def test_g711_tables_shape_and_silence() -> None:
    assert ULAW_TO_PCM.shape == (256,) and ULAW_TO_PCM.dtype == np.int16
    assert PCM_TO_ULAW.shape == (65536,) and PCM_TO_ULAW.dtype == np.uint8
    assert ulaw_encode(np.zeros(3, dtype=np.int16)) == bytes([ULAW_SILENCE]) * 3
    assert ulaw_decode(b"").shape == (0,)
    assert ulaw_encode(np.zeros(0, dtype=np.int16)) == b""


def test_g711_encode_rejects_non_int16() -> None:
    with pytest.raises(TypeError):
        ulaw_encode(np.zeros(4, dtype=np.float64))


def test_audioop_differs_from_g191_at_508_inputs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    pcm = np.arange(-32768, 32768, dtype=np.int32).astype("<i2")
    theirs = np.frombuffer(audioop.lin2ulaw(pcm.tobytes(), 2), dtype=np.uint8)
    ours = np.frombuffer(ulaw_encode(pcm.astype(np.int16)), dtype=np.uint8)
    assert int(np.count_nonzero(theirs != ours)) == 508


# --------------------------------------------------------------------------------------
# Resampler: quality targets
# --------------------------------------------------------------------------------------

PASSBAND = np.arange(300, 3401, 50)
GENERAL_RATES = [16000, 22050, 32000, 44100, 48000]


def test_downsample_alias_rejection_at_least_70_db() -> None:
    worst, freq = worst_alias_rejection(24000, 8000, np.arange(4100, 12000, 50))
    assert worst >= 70.0, f"{worst:.1f} dB at {freq} Hz"


def test_upsample_image_rejection_at_least_80_db() -> None:
    worst, freq = worst_image_rejection(8000, 24000, PASSBAND, image_edge_hz=4600)
    assert worst >= 80.0, f"{worst:.1f} dB for a {freq} Hz tone"


@pytest.mark.parametrize(
    ("in_rate", "out_rate", "stop_from_hz", "rejection_db"),
    [(24000, 8000, 4100, 70.0), (8000, 24000, 4600, 80.0)],
)
def test_filter_response_between_scanned_tones(
    in_rate: int, out_rate: int, stop_from_hz: float, rejection_db: float
) -> None:
    # The tone scans step 50 Hz; the taps' own response checks the frequencies in between.
    rs = Resampler(in_rate, out_rate)
    stop = filter_gain_db(rs, np.arange(stop_from_hz, 12000.5, 1.0))
    assert -stop.max() >= rejection_db
    passband = filter_gain_db(rs, np.arange(300, 3400.5, 1.0))
    assert passband.max() - passband.min() <= 0.1


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 24000), (24000, 8000)])
def test_passband_flat_within_0_1_db(in_rate: int, out_rate: int) -> None:
    assert passband_ripple_db(in_rate, out_rate, PASSBAND) <= 0.1
    # ...and centred on unity gain, not merely flat.
    assert abs(passband_gain_db(in_rate, out_rate, 1000.0)) < 0.05


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 24000), (24000, 8000)])
def test_group_delay_at_most_4_ms(in_rate: int, out_rate: int) -> None:
    rs = Resampler(in_rate, out_rate)
    down = in_rate // math.gcd(in_rate, out_rate)
    taps = len(rs.filter_taps)
    assert rs.filter_rate == 24000  # the high rate L * in_rate for both 3:1 paths
    assert rs.delay_ms == pytest.approx(1000 * (taps - 1) / 2 / rs.filter_rate)
    assert rs.delay_ms <= 4.0
    # Output k is sampled at high-rate instant k*M + M - 1, so the output timeline runs
    # M - 1 high-rate samples ahead of the filter's group delay.
    measured = impulse_delay_ms(in_rate, out_rate)
    expected = rs.delay_ms - 1000 * (down - 1) / rs.filter_rate
    assert measured == pytest.approx(expected, abs=0.005)
    assert measured <= 4.0


@pytest.mark.parametrize("in_rate", GENERAL_RATES)
def test_general_path_quality(in_rate: int) -> None:
    worst, freq = worst_alias_rejection(in_rate, 8000, np.arange(4100, in_rate / 2, 150))
    assert worst >= 70.0, f"{worst:.1f} dB at {freq} Hz"
    assert passband_ripple_db(in_rate, 8000, np.arange(300, 3401, 155)) <= 0.1
    assert Resampler(in_rate, 8000).delay_ms <= 4.0


@pytest.mark.parametrize("out_rate", GENERAL_RATES)
def test_general_up_path_quality(out_rate: int) -> None:
    # The caller's audio going up to an API's rate: images of the 8 kHz spectrum rejected.
    tones = np.array([300.0, 1000.0, 2000.0, 3400.0])
    worst, freq = worst_image_rejection(8000, out_rate, tones, image_edge_hz=4600)
    assert worst >= 80.0, f"{worst:.1f} dB for a {freq} Hz tone"
    assert passband_ripple_db(8000, out_rate, np.arange(300, 3401, 155)) <= 0.1
    assert Resampler(8000, out_rate).delay_ms <= 4.0


def test_odd_rate_with_interpolated_phases_still_meets_targets() -> None:
    # 47999/8000 does not reduce (L = 8000), so the phase table is interpolated.
    worst, freq = worst_alias_rejection(47999, 8000, np.arange(4100, 24000, 1000))
    assert worst >= 70.0, f"{worst:.1f} dB at {freq} Hz"
    assert passband_ripple_db(47999, 8000, np.array([300.0, 1000.0, 2500.0, 3400.0])) <= 0.1
    assert stream_error_lsb(47999, 8000, seconds=0.2) <= 1


# --------------------------------------------------------------------------------------
# Resampler: streaming behaviour
# --------------------------------------------------------------------------------------

ALL_PATHS = [(8000, 24000), (24000, 8000), *((r, 8000) for r in GENERAL_RATES), (8000, 16000)]


@pytest.mark.parametrize(("in_rate", "out_rate"), ALL_PATHS)
def test_streamed_matches_one_shot_within_1_lsb(in_rate: int, out_rate: int) -> None:
    for seed in (1, 2):
        assert stream_error_lsb(in_rate, out_rate, seconds=0.3, seed=seed) <= 1


@pytest.mark.parametrize(("in_rate", "out_rate"), ALL_PATHS)
def test_output_count_is_exact_after_every_chunk(in_rate: int, out_rate: int) -> None:
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    rng = np.random.default_rng(7)
    rs = Resampler(in_rate, out_rate)
    fed = produced = 0
    for size in random_chunk_sizes(in_rate // 4, rng):
        out = rs.process(np.zeros(size, dtype=np.int16))
        assert out.dtype == np.int16
        fed += size
        produced += len(out)
        assert produced == fed * up // down


def _direct_reference(taps: np.ndarray, up: int, down: int, x: np.ndarray) -> np.ndarray:
    """Zero-stuff, filter (FFT convolution) and pick output k at instant k*M + M - 1."""
    stuffed = np.zeros(len(x) * up)
    stuffed[::up] = x
    n = len(stuffed) + len(taps) - 1
    nfft = 1 << (n - 1).bit_length()
    full = np.fft.irfft(np.fft.rfft(stuffed, nfft) * np.fft.rfft(taps, nfft), nfft)
    k = np.arange(len(x) * up // down)
    return full[k * down + down - 1]


@pytest.mark.parametrize(
    ("in_rate", "out_rate"),
    # Every block-kernel ratio: the API rates, both ways. (47999 Hz, whose phases are
    # interpolated, is held to the quality targets instead.)
    [(8000, r) for r in (16000, 22050, 24000, 32000, 44100, 48000)]
    + [(r, 8000) for r in (16000, 22050, 24000, 32000, 44100, 48000)],
)
def test_matches_direct_zero_stuff_filter_decimate(in_rate: int, out_rate: int) -> None:
    g = math.gcd(in_rate, out_rate)
    rs = Resampler(in_rate, out_rate)
    x = np.random.default_rng(3).uniform(-30000, 30000, 2000)
    expected = _direct_reference(rs.filter_taps, out_rate // g, in_rate // g, x)
    np.testing.assert_allclose(rs.process_float(x), expected, atol=1e-6)


BLOCK_PATHS = [(8000, r) for r in (16000, 22050, 24000, 32000, 44100, 48000)] + [
    (r, 8000) for r in (16000, 22050, 24000, 32000, 44100, 48000)
]
needs_c_kernel = pytest.mark.skipif(not resample.COMPILED, reason="the C kernel was not built")


def test_c_kernel_is_built_where_a_compiler_is() -> None:
    # setup.py builds it as optional: a broken build would pass unnoticed but for this.
    assert resample.COMPILED or not (shutil.which("cc") or shutil.which("gcc"))


def test_without_the_c_kernel_numpy_does_the_same_work() -> None:
    # Where no compiler was found at install: the module imports, says so, and converts.
    script = """
import sys
sys.modules["ivr_bridge.audio._fir"] = None  # as if it had never been built
import numpy as np
from ivr_bridge.audio import BotAudio, CallerAudio, Pcm, resample
assert not resample.COMPILED
up = CallerAudio().process(bytes(range(160)))
down = BotAudio().process(Pcm(np.arange(-2400, 2400, 2, dtype=np.int16), 24000))
print(up.hex(), len(down))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    up_hex, down_bytes = done.stdout.split()
    assert down_bytes == "800"  # 100 ms of reply: five whole frames
    # The same samples as this process's kernel (C where built) gives, within a rounding.
    here = np.frombuffer(CallerAudio().process(bytes(range(160))), "<i2").astype(np.int32)
    there = np.frombuffer(bytes.fromhex(up_hex), "<i2")
    assert len(there) == 480 and np.abs(there - here).max() <= 1


@needs_c_kernel
@pytest.mark.parametrize(("in_rate", "out_rate"), BLOCK_PATHS)
def test_c_kernel_gives_the_numpy_kernel_s_samples(in_rate: int, out_rate: int) -> None:
    # Full scale with overshoot (saturation both ways), in random chunk sizes. (The kernel
    # is shared by every resampler of the pair, so the two run one after the other.)
    rng = np.random.default_rng(11)
    x = np.clip(rng.normal(0, 20000, in_rate // 2), -32768, 32767).astype(np.int16)
    x[100:140] = 32767  # a square edge: the filter rings past full scale
    x[300:340] = -32768
    c, py = Resampler(in_rate, out_rate), Resampler(in_rate, out_rate)
    sizes = random_chunk_sizes(len(x), rng)
    body = chunked(c, x, sizes)
    assert len(body) == len(x) * out_rate // in_rate
    got = np.concatenate((body, c.flush()))
    try:
        py._kernel.compiled = False
        expected = np.concatenate((chunked(py, x, sizes), py.flush()))
    finally:
        py._kernel.compiled = True
    assert len(got) == len(expected)
    assert got.min() == -32768 and got.max() == 32767  # saturation was exercised
    # The two sum in different orders: at most the last bit of a rounding can differ.
    assert np.abs(got.astype(np.int32) - expected).max() <= 1


@needs_c_kernel
def test_caller_audio_bytes_are_the_same_from_either_kernel() -> None:
    frames = [bytes(np.random.default_rng(n).integers(0, 256, 160, np.uint8)) for n in range(20)]
    c, py = CallerAudio(), CallerAudio()
    got_all = [c.process(f) for f in frames]
    kernel = Resampler(8000, 24000)._kernel
    kernel.compiled = False  # (shared by every 8 -> 24 kHz resampler)
    try:
        py = CallerAudio()
        expected_all = [py.process(f) for f in frames]
    finally:
        kernel.compiled = True
    for got, expected in zip(got_all, expected_all, strict=True):
        diff = np.frombuffer(got, "<i2").astype(np.int32) - np.frombuffer(expected, "<i2")
        assert len(got) == 960 and np.abs(diff).max() <= 1


@needs_c_kernel
@pytest.mark.parametrize(("in_rate", "out_rate"), BLOCK_PATHS)
def test_a_compiled_stream_gives_the_resampler_s_samples(in_rate: int, out_rate: int) -> None:
    # One C object per call (history and counts in C, G.711 fused in) against a Resampler
    # on the same C kernel: identical, over random chunk sizes, a reset mid-way and the
    # flush, with mu-law on the 8 kHz side as a call has it.
    rng = np.random.default_rng(in_rate + out_rate)
    x = np.clip(rng.normal(0, 12000, in_rate // 2), -32768, 32767).astype(np.int16)
    sizes = random_chunk_sizes(len(x), rng)
    ref = Resampler(in_rate, out_rate)
    if in_rate == 8000:
        stream = resample.compiled_stream(8000, out_rate, decode=ULAW_TO_PCM.astype(np.float64))
        data, step = ulaw_encode(x), (lambda chunk: ref.process(ulaw_decode(chunk)).tobytes())
        tail = lambda: ref.flush().tobytes()  # noqa: E731
    else:
        stream = resample.compiled_stream(in_rate, 8000, encode=PCM_TO_ULAW)
        data, step = x.tobytes(), (lambda chunk: ulaw_encode(ref.process(np.frombuffer(chunk, np.int16))))
        tail = lambda: ulaw_encode(ref.flush())  # noqa: E731
    assert stream is not None
    width = 1 if in_rate == 8000 else 2
    got, expected, start = [], [], 0
    for n, size in enumerate(sizes):
        chunk = data[start * width : (start + size) * width]
        start += size
        got.append(stream.process(chunk))
        expected.append(step(chunk))
        if n == len(sizes) // 2:
            stream.reset()
            ref.reset()
    got.append(stream.flush())
    expected.append(tail())
    assert got == expected
    assert stream.flush() == b"" == tail()  # nothing since the last flush: nothing more


@needs_c_kernel
def test_a_compiled_stream_refuses_what_it_cannot_use() -> None:
    kernel = Resampler(8000, 24000)._kernel
    geometry = (kernel._phases, kernel._lo, kernel._taps, 3, 1, kernel._m_lo, kernel.history, 100)
    with pytest.raises(ValueError, match="decode must be 2048 bytes"):
        resample._fir.Stream(*geometry, decode=np.zeros(255))
    with pytest.raises(ValueError, match="encode must be 65536 bytes"):
        resample._fir.Stream(*geometry, encode=bytes(100))
    with pytest.raises(ValueError, match="negative"):
        resample._fir.Stream(kernel._phases, kernel._lo, kernel._taps, 3, 1, kernel._m_lo, kernel.history, -1)
    with pytest.raises(ValueError, match="lo must be"):
        resample._fir.Stream(kernel._phases, kernel._lo, kernel._taps, 2, 1, kernel._m_lo, kernel.history, 0)
    # Too little history for the filter: refused per chunk, never read out of bounds.
    short = resample._fir.Stream(kernel._phases, kernel._lo, kernel._taps, 3, 1, kernel._m_lo, 2, 0)
    with pytest.raises(ValueError, match="past the input"):
        short.process(bytes(320))
    with pytest.raises(ValueError, match="whole number"):
        resample._fir.Stream(*geometry).process(bytes(3))
    bare = resample._fir.Stream.__new__(resample._fir.Stream)
    with pytest.raises(ValueError, match="not initialised"):
        bare.process(bytes(160))
    table = bytearray(2048)
    held = resample._fir.Stream(*geometry, decode=table)
    with pytest.raises(BufferError):  # the stream holds its tables: they cannot move
        table.extend(b"x")
    assert len(held.process(bytes(160))) == 960


@needs_c_kernel
def test_c_kernel_refuses_to_read_past_its_input() -> None:
    kernel = Resampler(8000, 24000)._kernel
    src = np.zeros(40)
    with pytest.raises(ValueError, match="past the input"):
        kernel.run_int16(src, kernel._m_lo, 0, 480)  # 480 outputs need 160 inputs, not 40
    assert len(kernel.run_int16(src, kernel._m_lo, 0, 3)) == 6  # within it: fine
    with pytest.raises(ValueError, match="negative"):
        kernel.run_int16(src, 1000, 0, 3)


def test_every_call_s_resampler_shares_one_filter_design() -> None:
    # The block kernel's matrix is up to 1.5 MB (44.1 kHz): one per rate pair, not per call.
    a, b = Resampler(44100, 8000), Resampler(44100, 8000)
    assert a._kernel is b._kernel
    a.process(np.ones(4410, dtype=np.int16))
    assert b._n_in == 0 and not b._buf.any()  # the state stays each call's own


def test_every_inbound_frame_gives_480_and_outbound_chunk_800() -> None:
    up = Resampler(8000, 24000)
    down = Resampler(24000, 8000)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert len(up.process(rng.integers(-9000, 9000, 160).astype(np.int16))) == 480
        assert len(down.process(rng.integers(-9000, 9000, 2400).astype(np.int16))) == 800


def test_tiny_and_empty_chunks() -> None:
    rs = Resampler(24000, 8000)
    assert rs.process(np.zeros(0, dtype=np.int16)).shape == (0,)
    sizes = [len(rs.process(np.ones(1, dtype=np.int16))) for _ in range(6)]
    assert sizes == [0, 0, 1, 0, 0, 1]
    assert len(Resampler(8000, 24000).process(np.ones(1, dtype=np.int16))) == 3


def test_flush_emits_tail_then_resets() -> None:
    x = tone(1000, 24000, 2400)
    rs = Resampler(24000, 8000)
    body = rs.process(x)
    tail = rs.flush()
    # The tail covers the whole filter span, so it rings all the way down to silence.
    assert len(tail) >= 2 * rs.delay_ms * 8
    assert np.abs(tail[-3:]).max() <= 2
    assert np.abs(tail[:5]).max() > 10000
    # Flushing reset the state: the same input gives the same output again.
    np.testing.assert_array_equal(rs.process(x), body)
    assert Resampler(24000, 8000).flush().shape == (0,)


def test_flush_is_chunking_invariant() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(-20000, 20000, 5000).astype(np.int16)
    one = Resampler(24000, 8000)
    ref = np.concatenate((one.process(x), one.flush()))
    rs = Resampler(24000, 8000)
    got = np.concatenate((chunked(rs, x, random_chunk_sizes(len(x), rng)), rs.flush()))
    assert len(got) == len(ref)
    assert np.abs(got.astype(np.int32) - ref).max() <= 1


def test_reset_drops_history() -> None:
    rng = np.random.default_rng(6)
    x = rng.integers(-20000, 20000, 999).astype(np.int16)
    for in_rate, out_rate in [(8000, 24000), (24000, 8000), (44100, 8000)]:
        rs = Resampler(in_rate, out_rate)
        rs.process(rng.integers(-20000, 20000, 1001).astype(np.int16))
        rs.reset()
        np.testing.assert_array_equal(rs.process(x), Resampler(in_rate, out_rate).process(x))


def test_same_rate_is_a_passthrough_copy() -> None:
    rs = Resampler(8000, 8000)
    x = np.arange(-5, 5, dtype=np.int16)
    y = rs.process(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x and rs.delay_ms == 0.0
    assert rs.flush().shape == (0,)
    with pytest.raises(ValueError, match="1-D"):
        rs.process_float(np.zeros((2, 2)))


def test_invalid_rates_rejected() -> None:
    with pytest.raises(ValueError):
        Resampler(0, 8000)


# --------------------------------------------------------------------------------------
# WAV parsing
# --------------------------------------------------------------------------------------


def make_wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()


def fmt_chunk(
    channels: int = 1, rate: int = 24000, bits: int = 16, tag: int = 1, extra: bytes = b""
) -> bytes:
    block = channels * bits // 8
    body = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits) + extra
    return b"fmt " + struct.pack("<I", len(body)) + body


def chunk(chunk_id: bytes, body: bytes) -> bytes:
    # RIFF chunks are word aligned: odd bodies get a pad byte not counted in the size.
    return chunk_id + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")


def riff(*chunks: bytes) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
def test_parse_mono(rate: int) -> None:
    samples = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    pcm = parse_wav(make_wav(samples, rate))
    assert pcm.sample_rate == rate
    assert pcm.samples.dtype == np.int16
    np.testing.assert_array_equal(pcm.samples, samples)


def test_parse_stereo_averages_channels() -> None:
    frames = np.array([[100, 300], [-32768, -32768], [32767, 32767], [5, -6]], dtype=np.int16)
    pcm = parse_wav(make_wav(frames.reshape(-1), 16000, channels=2))
    assert pcm.sample_rate == 16000
    assert pcm.samples.tolist() == [200, -32768, 32767, -1]


def test_parse_skips_list_chunk_before_data() -> None:
    samples = np.arange(10, dtype=np.int16)
    info = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00test\x00")  # odd-length body
    data = riff(fmt_chunk(), info, chunk(b"data", samples.astype("<i2").tobytes()))
    np.testing.assert_array_equal(parse_wav(data).samples, samples)


def test_parse_honours_pad_byte_after_odd_chunk() -> None:
    odd = chunk(b"junk", b"abc")  # 3 bytes + 1 pad byte
    assert len(odd) == 12
    data = riff(odd, fmt_chunk(rate=22050), chunk(b"data", b"\x01\x00\x02\x00"))
    pcm = parse_wav(data)
    assert pcm.samples.tolist() == [1, 2] and pcm.sample_rate == 22050


@pytest.mark.parametrize("declared", [1_000_000, 0xFFFFFFFF, 0])
def test_data_size_past_end_is_clipped_to_whole_frames(declared: int) -> None:
    payload = struct.pack("<5h", 1, 2, 3, 4, 5) + b"\x07"  # 5 samples + a stray byte
    data = riff(fmt_chunk(), b"data" + struct.pack("<I", declared) + payload)
    assert parse_wav(data).samples.tolist() == [1, 2, 3, 4, 5]
    stereo = riff(fmt_chunk(channels=2), b"data" + struct.pack("<I", declared) + payload)
    assert parse_wav(stereo).samples.tolist() == [1, 3]  # two whole frames, averaged


def test_parse_extensible_pcm() -> None:
    pcm_guid = b"\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    ext = struct.pack("<HHI", 22, 16, 4) + pcm_guid
    data = riff(fmt_chunk(tag=0xFFFE, extra=ext), chunk(b"data", b"\x10\x00"))
    assert parse_wav(data).samples.tolist() == [16]
    float_guid = b"\x03" + pcm_guid[1:]
    bad = riff(
        fmt_chunk(tag=0xFFFE, extra=struct.pack("<HHI", 22, 16, 4) + float_guid),
        chunk(b"data", b"\x10\x00"),
    )
    with pytest.raises(WavError, match="subformat"):
        parse_wav(bad)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (riff(fmt_chunk(channels=0), chunk(b"data", b"\0\0")), "channel"),
        (riff(fmt_chunk(channels=3), chunk(b"data", b"\0" * 6)), "channel"),
        (riff(fmt_chunk(bits=8), chunk(b"data", b"\0\0")), "16"),
        (riff(fmt_chunk(rate=96000), chunk(b"data", b"\0\0")), "rate"),
        (riff(fmt_chunk(rate=4000), chunk(b"data", b"\0\0")), "rate"),
        (riff(fmt_chunk(tag=3), chunk(b"data", b"\0\0")), "format"),
        (riff(chunk(b"data", b"\0\0")), "fmt"),
        (riff(fmt_chunk()), "data"),
        (riff(), "fmt"),
        (b"garbage that is not a wav file", "RIFF"),
        (b"", "RIFF"),
        (make_wav(np.zeros(4, dtype=np.int16), 8000)[:20], "fmt"),
        (make_wav(np.zeros(4, dtype=np.int16), 8000)[:30], "fmt"),
        (riff(b"fmt " + struct.pack("<I", 8) + b"\1\0\1\0\0\0\0\0"), "short"),
    ],
)
def test_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(WavError, match=message):
        parse_wav(data)


def test_is_wav() -> None:
    assert is_wav(make_wav(np.zeros(2, dtype=np.int16), 8000))
    assert not is_wav(b"RIFF\0\0\0\0AVI ")
    assert not is_wav(b"")


def test_decode_tts_audio_raw_and_wav() -> None:
    raw = decode_tts_audio(struct.pack("<3h", 7, -8, 9) + b"\x01")
    assert raw.sample_rate == 24000 and raw.samples.tolist() == [7, -8, 9]
    assert decode_tts_audio(b"").samples.shape == (0,)
    wav = decode_tts_audio(make_wav(np.array([3, 4], dtype=np.int16), 44100))
    assert wav.sample_rate == 44100 and wav.samples.tolist() == [3, 4]


_HEADERS = st.sampled_from(
    [
        b"",
        b"RIFF\xff\xff\xff\xffWAVE",
        riff(fmt_chunk()),
        riff(fmt_chunk(channels=2, rate=48000)),
        riff(fmt_chunk()) + b"data",  # the tail supplies the size field and payload
    ]
)


@settings(max_examples=300, deadline=None)
@given(header=_HEADERS, tail=st.binary(max_size=200))
def test_parsers_raise_only_wav_error(header: bytes, tail: bytes) -> None:
    data = header + tail
    for parse in (parse_wav, decode_tts_audio):
        try:
            pcm = parse(data)
        except WavError:
            continue
        assert isinstance(pcm, Pcm)
        assert pcm.samples.dtype == np.int16 and pcm.samples.ndim == 1
        assert 8000 <= pcm.sample_rate <= 48000


# --------------------------------------------------------------------------------------
# Per-call conversion
# --------------------------------------------------------------------------------------


def test_caller_audio_frame_sizes() -> None:
    caller = CallerAudio()
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert len(caller.process(rng.integers(0, 256, 160, dtype=np.uint8).tobytes())) == 960
    for size in (0, 1, 7, 333):
        assert len(caller.process(b"\xff" * size)) == 6 * size


def test_caller_audio_preserves_a_tone() -> None:
    x = tone(1000, 8000, 1600, amplitude=10000)
    out = CallerAudio().process(ulaw_encode(x))
    y = np.frombuffer(out, dtype="<i2")
    level = tone_amplitude(y[200:], 1000, 24000) / tone_amplitude(ulaw_decode(ulaw_encode(x)), 1000, 8000)
    assert abs(20 * math.log10(level)) < 0.05


def test_caller_audio_reset() -> None:
    caller = CallerAudio()
    frame = ulaw_encode(tone(440, 8000, 160, amplitude=8000))
    caller.process(ulaw_encode(tone(3000, 8000, 160, amplitude=8000)))
    caller.reset()
    assert caller.process(frame) == CallerAudio().process(frame)


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8000, 8000, n).astype(np.int16)


def test_bot_audio_emits_whole_frames_only() -> None:
    bot = BotAudio()
    rng = np.random.default_rng(1)
    total_in = total_out = 0
    for size in random_chunk_sizes(24000, rng, max_size=3000):
        out = bot.process(Pcm(_noise(size, seed=size), 24000))
        assert len(out) % FRAME_BYTES == 0
        total_in += size
        total_out += len(out)
        assert total_out + bot.pending_bytes == total_in // 3
        assert bot.pending_bytes < FRAME_BYTES
    tail = bot.flush()
    assert len(tail) % FRAME_BYTES == 0 and len(tail) > 0
    assert bot.pending_bytes == 0


def test_bot_audio_flush_pads_with_silence() -> None:
    bot = BotAudio()
    assert bot.process(Pcm(_noise(300), 24000)) == b""  # 100 samples at 8 kHz
    assert bot.pending_bytes == 100
    out = bot.flush()
    assert len(out) == FRAME_BYTES
    ref = Resampler(24000, 8000)
    audio = len(ref.process(_noise(300))) + len(ref.flush())
    assert audio > 100  # the filter tail came out too
    assert out[audio:] == bytes([ULAW_SILENCE]) * (FRAME_BYTES - audio)
    assert bot.flush() == b""


def test_bot_audio_flush_without_audio_is_empty() -> None:
    assert BotAudio().flush() == b""


def test_bot_audio_reset_drops_pending() -> None:
    bot = BotAudio()
    bot.process(Pcm(_noise(1000), 24000))
    assert bot.pending_bytes > 0
    bot.reset()
    assert bot.pending_bytes == 0
    assert bot.flush() == b""
    # No stale filter history leaks into the next response.
    chunk_ = Pcm(_noise(4800, seed=9), 24000)
    assert bot.process(chunk_) == BotAudio().process(chunk_)


def test_bot_audio_rate_change_flushes_old_resampler_first() -> None:
    first = Pcm(tone(1000, 24000, 2400, amplitude=8000), 24000)
    second = Pcm(np.zeros(1600, dtype=np.int16), 16000)
    bot = BotAudio()
    out = bot.process(first) + bot.process(second) + bot.flush()
    # 800 samples, the 24k filter tail, 800 samples at 16k->8k, its tail, then padding.
    ref_a = Resampler(24000, 8000)
    body_a = len(ref_a.process(first.samples)) + len(ref_a.flush())
    ref_b = Resampler(16000, 8000)
    body_b = len(ref_b.process(second.samples)) + len(ref_b.flush())
    assert len(out) == math.ceil((body_a + body_b) / FRAME_BYTES) * FRAME_BYTES
    decoded = ulaw_decode(out)
    # The 24 kHz tail (ringing of the tone) sits right after the first 800 samples.
    assert np.abs(decoded[800 : body_a - 5]).max() > 100
    assert np.abs(decoded[body_a:]).max() == 0


def test_bot_audio_8k_passthrough() -> None:
    samples = tone(500, 8000, 320, amplitude=9000)
    out = BotAudio().process(Pcm(samples, 8000))
    assert out == ulaw_encode(samples)
