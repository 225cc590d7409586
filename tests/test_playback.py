"""The mark-based playback clock."""

from ivr_bridge.playback import Playback


def test_played_marks_advance_what_was_heard() -> None:
    playback = Playback()
    reply = playback.start_response()
    first = playback.sent(reply, 1600)
    second = playback.sent(reply, 800)
    assert playback.speaking
    assert playback.echoed(first).played
    assert (reply.heard_ms, reply.sent_ms) == (200, 300)
    assert playback.echoed(second).played
    assert reply.heard_ms == 300 and not playback.speaking and not reply.interrupted


def test_echoes_after_clear_mean_flushed_not_played() -> None:
    playback = Playback()
    reply = playback.start_response()
    first = playback.sent(reply, 1600)
    second = playback.sent(reply, 1600)
    third = playback.sent(reply, 1600)
    assert playback.echoed(first).played
    assert playback.cleared() == 400  # 400 ms sent but not yet heard
    for name in (second, third):
        result = playback.echoed(name)
        assert result.response is reply and not result.played
    assert reply.heard_ms == 200 and reply.sent_ms == 600 and reply.interrupted
    assert not playback.speaking


def test_unknown_mark_is_reported_as_such() -> None:
    playback = Playback()
    result = playback.echoed("somebody-elses-mark")
    assert result.response is None and not result.played


def test_marks_are_named_per_response() -> None:
    playback = Playback()
    one = playback.start_response()
    a = playback.sent(one, 160)
    two = playback.start_response()
    b = playback.sent(two, 160)
    assert a.startswith("r1.") and b.startswith("r2.") and a != b
    playback.echoed(b)
    assert (one.heard_ms, two.heard_ms) == (0, 20)
