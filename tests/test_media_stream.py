"""Twilio Media Streams protocol core (sans-I/O)."""

import json
from base64 import b64decode, b64encode

import pytest

from ivr_bridge.media_stream import (
    Connected,
    DtmfReceived,
    MarkEchoed,
    MediaReceived,
    MediaStream,
    MediaStreamError,
    StreamStarted,
    StreamStopped,
)

SID = "MZ" + "1" * 32
CALL = "CA" + "2" * 32


def start_frame(seq: str = "1", **start_overrides: object) -> str:
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": SID,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"From": "+15550001111"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    start.update(start_overrides)
    return json.dumps({"event": "start", "sequenceNumber": seq, "streamSid": SID, "start": start})


def media_frame(seq: int, chunk: int, payload: bytes = b"\xff" * 160, sid: str = SID) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": sid,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(20 * (chunk - 1)),
                "payload": b64encode(payload).decode(),
            },
        }
    )


def started() -> MediaStream:
    stream = MediaStream()
    stream.receive(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    stream.receive(start_frame())
    return stream


def test_full_inbound_sequence() -> None:
    stream = MediaStream()
    assert stream.receive('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Connected(
        "Call", "1.0.0"
    )
    event = stream.receive(start_frame())
    assert isinstance(event, StreamStarted)
    assert (event.stream_sid, event.call_sid) == (SID, CALL)
    assert event.custom_parameters == {"From": "+15550001111"}
    media = stream.receive(media_frame(2, 1, b"\x01\x02\x03"))
    assert media == MediaReceived(b"\x01\x02\x03", 1, 0)
    mark = {"event": "mark", "sequenceNumber": "3", "streamSid": SID, "mark": {"name": "r1.1"}}
    assert stream.receive(json.dumps(mark)) == MarkEchoed("r1.1")
    dtmf = {
        "event": "dtmf",
        "sequenceNumber": "4",
        "streamSid": SID,
        "dtmf": {"track": "inbound_track", "digit": "7"},
    }
    assert stream.receive(json.dumps(dtmf)) == DtmfReceived("7")
    stop = {
        "event": "stop",
        "sequenceNumber": "5",
        "streamSid": SID,
        "stop": {"accountSid": "AC", "callSid": CALL},
    }
    assert stream.receive(json.dumps(stop)) == StreamStopped(CALL)
    assert stream.stopped and stream.sequence_gaps == 0 and stream.chunk_gaps == 0


def test_gaps_are_counted() -> None:
    stream = started()
    stream.receive(media_frame(2, 1))
    stream.receive(media_frame(3, 2))
    stream.receive(media_frame(7, 6))  # messages 4-6 and chunks 3-5 lost
    assert stream.sequence_gaps == 3
    assert stream.chunk_gaps == 3
    assert stream.media_in == 3


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x01", "binary"),
        ("{not json", "JSON"),
        ("[1,2]", "object"),
        ('{"event":"bogus","streamSid":"' + SID + '"}', "unknown event"),
        (media_frame(2, 1, sid="MZwrong"), "streamSid"),
        (json.dumps({"event": "media", "streamSid": SID, "media": {"payload": "!!!"}}), "base64"),
        (json.dumps({"event": "media", "streamSid": SID, "media": {}}), "payload"),
        (json.dumps({"event": "mark", "streamSid": SID, "mark": {}}), "mark.name"),
    ],
)
def test_bad_frames_raise_clear_errors(frame: str | bytes, reason: str) -> None:
    stream = started()
    with pytest.raises(MediaStreamError, match=reason):
        stream.receive(frame)
    # The stream is still usable afterwards.
    assert isinstance(stream.receive(media_frame(2, 1)), MediaReceived)


def test_media_before_start_and_second_start() -> None:
    stream = MediaStream()
    with pytest.raises(MediaStreamError, match="before start"):
        stream.receive(media_frame(1, 1))
    stream.receive(start_frame())
    with pytest.raises(MediaStreamError, match="second start"):
        stream.receive(start_frame())


def test_unsupported_media_format_is_rejected() -> None:
    stream = MediaStream()
    fmt = {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}
    with pytest.raises(MediaStreamError, match="mediaFormat"):
        stream.receive(start_frame(mediaFormat=fmt))


def test_outbound_frames_are_exact_json() -> None:
    stream = started()
    media = json.loads(stream.media(b"\x7f" * 320))
    assert media == {
        "event": "media",
        "streamSid": SID,
        "media": {"payload": b64encode(b"\x7f" * 320).decode()},
    }
    assert b64decode(media["media"]["payload"]) == b"\x7f" * 320
    assert json.loads(stream.mark('r1."2')) == {"event": "mark", "streamSid": SID, "mark": {"name": 'r1."2'}}
    assert json.loads(stream.clear()) == {"event": "clear", "streamSid": SID}


def test_outbound_media_must_be_whole_frames() -> None:
    stream = started()
    with pytest.raises(ValueError, match="160"):
        stream.media(b"\xff" * 100)


def test_no_outbound_before_start() -> None:
    with pytest.raises(RuntimeError):
        MediaStream().clear()


def test_receive_media_takes_media_as_receive_does_and_leaves_every_other_frame_untouched() -> None:
    """The call's read-callback path offers each frame to `receive_media` first and hands
    what it declines to `receive`: the stream must end exactly as if `receive` alone had
    read every frame, the flood guard included."""
    mark = json.dumps({"event": "mark", "sequenceNumber": "5", "streamSid": SID, "mark": {"name": "r1.1"}})
    dtmf = json.dumps({"event": "dtmf", "sequenceNumber": "6", "streamSid": SID, "dtmf": {"digit": "4"}})
    frames = [
        media_frame(2, 1),
        media_frame(4, 3, b"\x01" * 160),  # a message and a chunk lost before it
        mark,
        dtmf,
        json.dumps({"event": "media", "sequenceNumber": "7", "streamSid": SID, "media": {"payload": "!"}}),
        media_frame(8, 4, sid="MZwrong"),
        media_frame(9, 5).replace('"timestamp": "80"', '"timestamp": "eighty"'),
        "{not json",
        "[]",
        "",
        # JSON that json reads and orjson refuses, so `receive` gives the answer
        media_frame(10, 6).replace('"timestamp": "100"', '"timestamp": NaN'),
        media_frame(10, 6).replace('"chunk": "6"', '"chunk": 123456789012345678901234567890'),
        " " + media_frame(10, 6),  # whitespace around a frame: valid JSON
        media_frame(11, 7) + "\n",
        media_frame(12, 8) + "{}",  # trailing data: refused
        *(media_frame(13 + i, 9 + i) for i in range(200)),  # 4 s of audio at once: a flood
    ]

    def read(offer_first: bool) -> tuple[list[object], dict[str, object], int]:
        clock = [0.0]
        stream = MediaStream(clock=lambda: clock[0])
        stream.receive(start_frame())
        outcomes: list[object] = []
        taken = 0
        for frame in frames:
            clock[0] += 0.001
            if offer_first and (event := stream.receive_media(frame)) is not None:
                outcomes.append(event)
                taken += 1
                continue
            try:
                outcomes.append(stream.receive(frame))
            except MediaStreamError as exc:
                outcomes.append((exc.kind, exc.fatal))
        state = {name: value for name, value in vars(stream).items() if name != "_clock"}
        return outcomes, state, taken

    offered, state, taken = read(offer_first=True)
    assert (offered, state) == read(offer_first=False)[:2]
    assert ("flood", True) in offered and state["sequence_gaps"] == 5  # 3, 7-9 and 12 refused
    # Every media frame up to the flood went through `receive_media`, nothing else did.
    assert taken == offered.index(("flood", True)) - 11
