"""The transcript's bot lines: settled when heard or cut, with the words the caller heard."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ivr_bridge.playback import Playback
from ivr_bridge.transcript import MS_PER_CHAR, Transcript, heard_part

TEXT = "Your order ships tomorrow morning by courier."


def test_heard_part_cuts_back_to_whole_words() -> None:
    assert heard_part(TEXT, 1000, 1000) == TEXT
    assert heard_part(TEXT, 0, 1000) == ""
    assert heard_part(TEXT, 500, 1000) == "Your order ships"  # char 22 falls inside "tomorrow"
    assert heard_part("one two", 4, 7) == "one"  # the cut lands on the space
    assert heard_part(TEXT, 10, 0) == ""


@given(st.text(min_size=0, max_size=80), st.integers(0, 5000), st.integers(0, 5000))
def test_heard_part_is_a_prefix_of_whole_words(text: str, heard: int, total: int) -> None:
    part = heard_part(text, heard, total)
    assert text.startswith(part)
    if part and part != text:
        assert text[len(part)].isspace() or text[len(part) - 1].isspace() or part == text.rstrip()


def clocked() -> tuple[Transcript, Playback]:
    return Transcript(lambda: 1.0), Playback()


def test_a_reply_heard_in_full_is_written_when_its_last_mark_comes_back() -> None:
    words, playback = clocked()
    assert words.reply_text(1, "Hello ", False) == []
    assert words.reply_text(1, "Hello there.", True) == []  # text before its speech
    response = playback.start_response()
    words.reply_speech(1, response)
    first, second = playback.sent(response, 800), playback.sent(response, 800)
    playback.echoed(first)
    assert words.settle(response) == []  # a mark still out
    playback.echoed(second)
    assert words.settle(response, tail_pending=True) == []  # the converter holds its tail
    [line] = words.settle(response)
    assert (line.text, line.heard_text, line.heard_ms, line.sent_ms) == (
        "Hello there.",
        "Hello there.",
        200,
        200,
    )
    assert not line.interrupted
    assert words.settle(response) == []  # written once
    assert words.reply_text(1, " more", True) == []  # later pieces of a written reply


def test_a_cut_reply_says_what_was_heard() -> None:
    words, playback = clocked()
    words.reply_text(1, TEXT, True)
    response = playback.start_response()
    words.reply_speech(1, response)
    heard = playback.sent(response, 8 * 1000)
    playback.sent(response, 8 * 1000)
    playback.echoed(heard)
    playback.cleared()
    [line] = words.settle(None)
    assert line.interrupted and (line.heard_ms, line.sent_ms) == (1000, 2000)
    # The rest of its speech never arrived: its length is estimated from the text.
    total = max(2000, len(TEXT) * MS_PER_CHAR)
    assert line.heard_text == heard_part(TEXT, 1000, total)
    assert TEXT.startswith(line.heard_text) and line.heard_text != TEXT


def test_text_that_comes_after_the_speech_played_is_written_at_once() -> None:
    words, playback = clocked()
    response = playback.start_response()
    words.reply_speech(2, response)
    playback.echoed(playback.sent(response, 1600))
    assert words.settle(response) == []  # no final text yet
    [line] = words.reply_text(2, "Late words.", True)
    assert line.heard_text == "Late words."


def test_a_new_voice_session_numbers_replies_afresh_and_the_end_writes_the_rest() -> None:
    words, playback = clocked()
    words.reply_text(1, "From the old session.", True)
    old = playback.start_response()
    words.reply_speech(1, old)
    playback.sent(old, 800)  # still playing when the session is replaced
    words.new_session()
    words.reply_text(1, "From the new one.", False)
    assert words.lines == []
    finished = words.finish()
    assert [(line.text, line.heard_ms) for line in finished] == [
        ("From the old session.", 0),
        ("From the new one.", 0),
    ]
    assert all(line.heard_text == "" for line in finished)


def test_user_and_key_lines() -> None:
    words, _ = clocked()
    words.user("where is my order")
    words.dtmf("0")
    assert [(line.role, line.text) for line in words.lines] == [("user", "where is my order"), ("dtmf", "0")]
    assert words.lines[0].as_dict() == {"role": "user", "text": "where is my order"}
