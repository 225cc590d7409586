"""The `llm` and `hook` dialogue steps over real loopback HTTP, against their stand-ins
(`ivr_bridge.standins.llm`, `ivr_bridge.standins.dialogue_hook`) on the test's event loop.

Nothing here waits a fixed time: the stand-ins hold a reply at a gate and report what they
saw (`wait_for`), and timeouts are only there to fail a test that would hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from ivr_bridge.cascade.engines import Act, Turn, TurnKind
from ivr_bridge.cascade.hook_dialogue import APOLOGY as HOOK_APOLOGY
from ivr_bridge.cascade.hook_dialogue import HookDialogue
from ivr_bridge.cascade.llm import (
    APOLOGY,
    DEFAULT_INSTRUCTIONS,
    GREETING_NOTE,
    NO_INPUT_NOTE,
    ChatStream,
    LlmDialogue,
    chat_url,
)
from ivr_bridge.cascade.settings import DialogueSettings
from ivr_bridge.hooks import MAX_ANSWER_BYTES, SIGNATURE_HEADER, verify
from ivr_bridge.providers.base import CallInfo
from ivr_bridge.settings import Settings
from ivr_bridge.standins.dialogue_hook import DialogueHookStandIn, HookAnswer
from ivr_bridge.standins.llm import DEFAULT_KEY, LlmStandIn, Reply, ToolCall

CALL = CallInfo("CA" + "7" * 32, "+15550123", "+15550199", {"account": "42"})
SECRET = "hook-secret-for-tests"
LIMIT_S = 10.0  # a test that would hang fails after this instead


async def collect(items: AsyncIterator[str | Act]) -> list[str | Act]:
    async with asyncio.timeout(LIMIT_S):
        return [item async for item in items]


def text_of(items: list[str | Act]) -> str:
    return "".join(item for item in items if isinstance(item, str))


def acts(items: list[str | Act]) -> list[Act]:
    return [item for item in items if isinstance(item, Act)]


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- llm ---------------------------------------------------------------------------------------


@pytest.fixture
async def llm() -> AsyncIterator[LlmStandIn]:
    async with LlmStandIn(chunk_chars=3) as standin:
        yield standin


MakeLlm = Callable[..., Awaitable[LlmDialogue]]


@pytest.fixture
async def make_llm(llm: LlmStandIn) -> AsyncIterator[MakeLlm]:
    made: list[LlmDialogue] = []

    async def make(
        key: str = DEFAULT_KEY, url: str = "", instructions: str = "", **options: Any
    ) -> LlmDialogue:
        dialogue_settings = DialogueSettings(
            dialogue="llm",
            llm_url=url or f"{llm.url}/v1",
            llm_model="test-model",
            llm_api_key=key,
            llm_instructions=instructions,
        )
        dialogue = LlmDialogue(Settings(dialogue=dialogue_settings), CALL, **options)
        await dialogue.start()
        made.append(dialogue)
        return dialogue

    yield make
    for dialogue in made:
        await dialogue.close()


def test_chat_url_takes_a_base_url_or_the_full_endpoint() -> None:
    assert chat_url("https://api.openai.com/v1") == "https://api.openai.com/v1/chat/completions"
    assert chat_url("http://localhost:11434/v1/") == "http://localhost:11434/v1/chat/completions"
    full = "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_url(full) == full
    assert chat_url(full + "/") == full
    assert (
        chat_url("https://x.example/openai/deployments/d?api-version=2024-06-01")
        == "https://x.example/openai/deployments/d/chat/completions?api-version=2024-06-01"
    )


async def test_llm_yields_the_first_piece_while_the_stand_in_holds_the_rest(
    llm: LlmStandIn, make_llm: MakeLlm
) -> None:
    dialogue = await make_llm(instructions="You answer for Acme Plumbing.")
    text = "Hello there, how can I help you today?"
    llm.script(Reply(text, hold_after=1))
    reply = dialogue.respond(Turn(TurnKind.SPEECH, "hi"))
    async with asyncio.timeout(LIMIT_S):
        first = await anext(reply)
    assert first == text[:3]
    request = llm.requests[-1]
    assert request.holding and not request.completed  # the rest has not been sent
    llm.release()
    rest = await collect(reply)
    assert first + text_of(rest) == text
    assert acts(rest) == []
    await llm.wait_for(lambda: request.completed)

    body = request.body
    assert request.authorized
    assert body["model"] == "test-model" and body["stream"] is True
    assert [tool["function"]["name"] for tool in body["tools"]] == ["end_call", "transfer_call"]
    system, user = body["messages"]
    assert system["role"] == "system"
    assert system["content"].startswith("You answer for Acme Plumbing.")
    assert CALL.sentence() in system["content"] and "+15550123" in system["content"]
    assert user == {"role": "user", "content": "hi"}


async def test_llm_default_instructions_and_the_notes_of_each_turn_kind(
    llm: LlmStandIn, make_llm: MakeLlm
) -> None:
    dialogue = await make_llm()
    for turn in (
        Turn(TurnKind.START),
        Turn(TurnKind.DIGITS, "12#"),
        Turn(TurnKind.NO_INPUT),
        Turn(TurnKind.SPEECH, "what now"),
    ):
        assert text_of(await collect(dialogue.respond(turn)))
    messages = llm.requests[-1].messages
    assert messages[0]["content"].startswith(DEFAULT_INSTRUCTIONS)
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == [GREETING_NOTE, "(the caller pressed 1 2 #)", NO_INPUT_NOTE, "what now"]
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    assert assistants[0] == "Hello! How can I help you today?"
    assert len(assistants) == 3  # the last turn's reply is not sent back with it


async def test_llm_fixed_greeting_asks_nothing(llm: LlmStandIn, make_llm: MakeLlm) -> None:
    dialogue = await make_llm(greeting="Acme Plumbing, how can I help?")
    assert await collect(dialogue.respond(Turn(TurnKind.START))) == ["Acme Plumbing, how can I help?"]
    assert llm.requests == []
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "a leak")))
    assert llm.requests[0].messages[1:] == [
        {"role": "assistant", "content": "Acme Plumbing, how can I help?"},
        {"role": "user", "content": "a leak"},
    ]


@pytest.mark.parametrize(
    ("said", "act"),
    [("transfer me to an agent please", Act("transfer:+15550100")), ("ok bye", Act("hangup"))],
)
async def test_llm_tool_call_split_across_chunks_is_the_last_act(
    llm: LlmStandIn, make_llm: MakeLlm, said: str, act: Act
) -> None:
    dialogue = await make_llm()
    items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, said)))
    assert items[-1] == act
    assert acts(items) == [act]
    assert text_of(items) in ("Transferring you now.", "Goodbye!")
    if act.action.startswith("transfer"):  # '{"to": "+15550100"}', a few characters a chunk
        assert llm.requests[-1].argument_chunks == 7


async def test_llm_invalid_transfer_target_is_ignored(
    llm: LlmStandIn, make_llm: MakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_llm()
    llm.script(
        Reply("One moment.", ToolCall("transfer_call", json.dumps({"to": "555-0100"}))),
        Reply("Let me see.", ToolCall("open_the_door", "{}")),
    )
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.llm"):
        first = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "send me on")))
        second = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "open up")))
    assert first == ["One", " mo", "men", "t."]
    assert text_of(second) == "Let me see." and acts(second) == []
    assert "'555-0100'" in caplog.text and "not an E.164 number" in caplog.text
    assert "unknown tool 'open_the_door'" in caplog.text


async def test_llm_history_carries_a_cut_reply_as_heard(llm: LlmStandIn, make_llm: MakeLlm) -> None:
    dialogue = await make_llm()
    said = "We open at nine and close at five, Monday to Friday."
    llm.script(Reply(said), Reply("Sure."), Reply("Fine."))
    assert text_of(await collect(dialogue.respond(Turn(TurnKind.SPEECH, "opening hours?")))) == said
    dialogue.heard(said, "We open at nine")
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "and saturday?")))
    assert llm.requests[-1].messages[1:] == [
        {"role": "user", "content": "opening hours?"},
        {"role": "assistant", "content": "We open at nine"},
        {"role": "user", "content": "and saturday?"},
    ]
    # Cut before a word reached the caller: as if it had not been said.
    dialogue.heard("Sure.", "")
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello?")))
    assert [m["content"] for m in llm.requests[-1].messages[1:]] == [
        "opening hours?",
        "We open at nine",
        "and saturday?",
        "hello?",
    ]


async def test_llm_cancelled_mid_stream_releases_the_connection(llm: LlmStandIn, make_llm: MakeLlm) -> None:
    dialogue = await make_llm()
    llm.script(Reply("I can help with that, but first tell me your account number.", hold_after=2))
    reply = dialogue.respond(Turn(TurnKind.SPEECH, "billing"))
    pieces: list[str | Act] = []
    got_two = asyncio.Event()

    async def consume() -> None:
        async for piece in reply:
            pieces.append(piece)
            if len(pieces) == 2:
                got_two.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(LIMIT_S):
        await got_two.wait()
    request = llm.requests[-1]
    await llm.wait_for(lambda: request.holding)
    task.cancel()  # the consumer is waiting for the next piece: the task running the reply
    with pytest.raises(asyncio.CancelledError):
        await task
    # The stand-in is still holding the rest, so only the client can have ended it.
    await llm.wait_for(lambda: request.disconnected)
    assert not request.completed and request.holding

    said = text_of(pieces)
    assert said == "I can help"[:6]
    dialogue.heard(said, "I can")
    llm.release()
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "what?")))
    assert llm.requests[-1].messages[2] == {"role": "assistant", "content": "I can"}


async def test_llm_closing_the_iterator_at_a_piece_closes_the_stream(
    llm: LlmStandIn, make_llm: MakeLlm
) -> None:
    dialogue = await make_llm()
    llm.script(Reply("A long answer the caller will not wait for.", hold_after=1))
    reply = dialogue.respond(Turn(TurnKind.SPEECH, "tell me everything"))
    async with asyncio.timeout(LIMIT_S):
        assert await anext(reply) == "A l"
    await reply.aclose()  # as the cascade does on a barge-in
    request = llm.requests[-1]
    await llm.wait_for(lambda: request.disconnected)
    assert dialogue.history[-1] == {"role": "assistant", "content": "A l"}


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_llm_refused_answers_an_apology_and_logs_without_the_key(
    llm: LlmStandIn, make_llm: MakeLlm, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    key = "sk-wrong-key-0123456789abcdef"
    if status == 401:
        dialogue = await make_llm(key=key)  # the stand-in quotes it in its error message
    else:
        dialogue = await make_llm()
        llm.fail(status)
    with caplog.at_level(logging.DEBUG):
        items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))
    assert items == [APOLOGY]
    lines = [r for r in caplog.records if r.name == "ivr_bridge.cascade.llm"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert f"HTTP {status}" in lines[0].getMessage()
    assert key not in caplog.text and DEFAULT_KEY not in caplog.text
    assert key not in repr(dialogue) and DEFAULT_KEY not in repr(dialogue)
    if status == 401:
        assert "invalid_api_key" in lines[0].getMessage()
        assert llm.rejected == 1
    # The caller heard the apology: the model is told so.
    assert dialogue.history[-1] == {"role": "assistant", "content": APOLOGY}
    # And the next turn works.
    if status != 401:
        assert text_of(await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))) == "You said: hello"


async def test_llm_stalled_stream_times_out_with_an_apology(
    llm: LlmStandIn, make_llm: MakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_llm(read_timeout_s=0.3)
    llm.script(Reply("Never sent.", hold_after=0))
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.llm"):
        items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))
    assert items == [APOLOGY]
    assert "nothing received for 0.3 s" in caplog.text
    request = llm.requests[-1]
    await llm.wait_for(lambda: request.disconnected)


async def test_llm_unreachable_endpoint_answers_an_apology(
    make_llm: MakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_llm(url=f"http://127.0.0.1:{free_port()}/v1?token=hunter2secret")
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.llm"):
        items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))
    assert items == [APOLOGY]
    assert "ClientConnectorError" in caplog.text
    assert "hunter2secret" not in caplog.text and DEFAULT_KEY not in caplog.text


async def test_llm_retries_once_when_the_server_drops_the_connection(
    make_llm: MakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    # What a kept-alive connection the server closed meanwhile looks like: asked again once.
    attempts = 0

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        dialogue = await make_llm(url=f"http://127.0.0.1:{port}/v1")
        with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.llm"):
            items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))
    finally:
        server.close()
        await server.wait_closed()
    assert items == [APOLOGY]
    assert attempts == 2
    assert "ServerDisconnectedError" in caplog.text or "ClientOSError" in caplog.text


async def test_llm_stops_at_done_and_skips_malformed_lines(
    llm: LlmStandIn, make_llm: MakeLlm, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_llm()
    # Malformed lines among the chunks, and a response kept open after [DONE]: the reply
    # must end at [DONE], not when the server closes.
    llm.script(Reply("Fine, thanks for asking.", garbage=True, linger=True))
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.llm"):
        items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "how are you")))
    assert items and text_of(items) == "Fine, thanks for asking." and acts(items) == []
    assert "skipped 2 malformed line(s)" in caplog.text
    request = llm.requests[-1]
    assert request.holding and not request.completed


async def test_llm_understands_a_server_that_does_not_stream(llm: LlmStandIn, make_llm: MakeLlm) -> None:
    dialogue = await make_llm()
    llm.script(Reply("All at once.", ToolCall("end_call"), whole=True))
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "bye"))) == ["All at once.", Act("hangup")]


def test_chat_stream_parsing() -> None:
    stream = ChatStream()
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    assert stream.feed(b"data: " + json.dumps(chunk).encode() + b"\r\n") == []  # not ended yet
    assert stream.feed(b"\r\n") == ["Hi"]
    assert stream.feed(b": comment\n") == [] and stream.malformed == 0
    assert stream.feed(b"data: [1, 2]\n") == [] and stream.feed(b"\n") == []
    assert stream.malformed == 1
    tool = {"index": 0, "id": "c1", "function": {"name": "transfer_call", "arguments": '{"to": '}}
    more = {"index": 0, "function": {"arguments": '"sip:desk@example.com"}'}}
    for piece in (tool, more):
        stream.feed(b"data: " + json.dumps({"choices": [{"delta": {"tool_calls": [piece]}}]}).encode())
        stream.feed(b"")
    assert stream.act() == (Act("transfer:sip:desk@example.com"), [])
    assert stream.feed(b'data: {"error": {"message": "sk-secret", "code": "overloaded"}}\n') == []
    stream.end()
    assert stream.error == "overloaded" and stream.done


async def test_llm_start_needs_url_and_model() -> None:
    dialogue = LlmDialogue(
        Settings(dialogue=DialogueSettings(dialogue="llm", llm_api_key="sk-x-123456")), CALL
    )
    with pytest.raises(ConnectionError) as raised:
        await dialogue.start()
    assert "sk-x-123456" not in str(raised.value) + repr(dialogue)


# -- hook --------------------------------------------------------------------------------------


@pytest.fixture
async def hook() -> AsyncIterator[DialogueHookStandIn]:
    async with DialogueHookStandIn(SECRET) as standin:
        yield standin


MakeHook = Callable[..., Awaitable[HookDialogue]]


@pytest.fixture
async def make_hook(hook: DialogueHookStandIn) -> AsyncIterator[MakeHook]:
    made: list[HookDialogue] = []

    async def make(secret: str = SECRET, timeout_s: float = 5.0, url: str = "") -> HookDialogue:
        dialogue_settings = DialogueSettings(dialogue="hook", dialogue_url=url or f"{hook.url}/turns")
        settings = Settings(hook_secret=secret, hook_timeout_s=timeout_s, dialogue=dialogue_settings)
        dialogue = HookDialogue(settings, CALL)
        await dialogue.start()
        made.append(dialogue)
        return dialogue

    yield make
    for dialogue in made:
        await dialogue.close()


async def test_hook_turn_is_signed_and_its_answer_becomes_text_and_act(
    hook: DialogueHookStandIn, make_hook: MakeHook
) -> None:
    dialogue = await make_hook()
    hook.script(
        HookAnswer({"say": "Hello from the hook."}),
        HookAnswer({"say": "Putting you through.", "action": "transfer", "to": "+15550111"}),
        HookAnswer({"say": "Bye now.", "action": "hangup"}),
        HookAnswer({"say": "Nothing to do.", "action": "none"}),
        HookAnswer({}),
    )
    assert await collect(dialogue.respond(Turn(TurnKind.START))) == ["Hello from the hook."]
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "an agent"))) == [
        "Putting you through.",
        Act("transfer:+15550111"),
    ]
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "bye"))) == ["Bye now.", Act("hangup")]
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hm"))) == ["Nothing to do."]
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hm"))) == []
    assert hook.rejected == 0 and len(hook.turns) == 5

    first = hook.turns[0]
    assert first.headers[SIGNATURE_HEADER.lower()].startswith("t=")
    assert first.body == {
        "call_sid": CALL.call_sid,
        "caller": "+15550123",
        "called": "+15550199",
        "parameters": {"account": "42"},
        "turn": {"kind": "start", "text": ""},
        "history": [],
    }
    assert hook.turns[1].history == [{"role": "bot", "text": "Hello from the hook.", "cut": False}]


async def test_hook_signature_verifies_with_the_secret(
    hook: DialogueHookStandIn, make_hook: MakeHook
) -> None:
    dialogue = await make_hook()
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "check me")))
    turn = hook.turns[0]
    header = turn.headers[SIGNATURE_HEADER.lower()]
    assert verify(SECRET, turn.raw, header, time.time())
    assert not verify("another-secret", turn.raw, header, time.time())
    assert not verify(SECRET, turn.raw.replace(b"check me", b"check it"), header, time.time())


async def test_hook_posts_digits_and_no_input_with_their_kinds(
    hook: DialogueHookStandIn, make_hook: MakeHook
) -> None:
    dialogue = await make_hook()
    turns = [
        Turn(TurnKind.START),
        Turn(TurnKind.DIGITS, "42#"),
        Turn(TurnKind.NO_INPUT),
        Turn(TurnKind.SPEECH, "hello there"),
    ]
    replies = [text_of(await collect(dialogue.respond(turn))) for turn in turns]
    assert replies[1:] == ["You pressed 4 2 #.", "Are you still there?", "You said: hello there"]
    assert [(t.kind, t.text) for t in hook.turns] == [
        ("start", ""),
        ("digits", "42#"),
        ("no_input", ""),
        ("speech", "hello there"),
    ]
    assert hook.turns[-1].history == [
        {"role": "bot", "text": replies[0], "cut": False},
        {"role": "caller", "kind": "digits", "text": "42#"},
        {"role": "bot", "text": "You pressed 4 2 #.", "cut": False},
        {"role": "caller", "kind": "no_input", "text": ""},
        {"role": "bot", "text": "Are you still there?", "cut": False},
    ]


async def test_hook_history_carries_a_cut_reply_as_heard(
    hook: DialogueHookStandIn, make_hook: MakeHook
) -> None:
    dialogue = await make_hook()
    hook.script(HookAnswer({"say": "Your balance is forty two dollars and ten cents."}))
    said = text_of(await collect(dialogue.respond(Turn(TurnKind.SPEECH, "balance"))))
    dialogue.heard(said, "Your balance is")
    await collect(dialogue.respond(Turn(TurnKind.SPEECH, "sorry?")))
    assert hook.turns[-1].history == [
        {"role": "caller", "kind": "speech", "text": "balance"},
        {"role": "bot", "text": "Your balance is", "cut": True},
    ]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (HookAnswer(status=500), "HTTP 500"),
        (HookAnswer(raw=b"<html>oops</html>"), "not JSON"),
        (HookAnswer(raw=b""), "an empty answer"),
        (HookAnswer(["say", "hi"]), "not a JSON object"),
        (HookAnswer({"say": 42}), "whose 'say' is not a string"),
        (HookAnswer({"say": "Transferring.", "action": "transfer", "to": "nowhere"}), "transfer needs 'to'"),
        (HookAnswer({"say": "Hi", "action": "dance"}), "unknown action 'dance'"),
        (HookAnswer(raw=b'{"say": "' + b"a" * MAX_ANSWER_BYTES + b'"}'), f"larger than {MAX_ANSWER_BYTES}"),
        (HookAnswer(hold=True), "no answer within 0.3 s"),
    ],
)
async def test_hook_bad_answers_and_failures_answer_an_apology(
    hook: DialogueHookStandIn,
    make_hook: MakeHook,
    caplog: pytest.LogCaptureFixture,
    answer: HookAnswer,
    reason: str,
) -> None:
    dialogue = await make_hook(timeout_s=0.3, url=f"{hook.url}/turns?token=hunter2secret")
    hook.script(answer)
    with caplog.at_level(logging.DEBUG, "ivr_bridge.cascade.hook_dialogue"):
        items = await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hello")))
    assert items == [HOOK_APOLOGY]
    lines = [r for r in caplog.records if r.name == "ivr_bridge.cascade.hook_dialogue"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert reason in lines[0].getMessage()
    assert "hunter2secret" not in caplog.text and SECRET not in caplog.text
    if answer.hold:
        turn = hook.turns[-1]
        await hook.wait_for(lambda: turn.disconnected)
    # The endpoint hears what the caller was told.
    hook.script(HookAnswer({"say": "Back."}))
    assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "again"))) == ["Back."]
    assert hook.turns[-1].history[-1] == {"role": "bot", "text": HOOK_APOLOGY, "cut": False}


async def test_hook_wrong_secret_is_refused_with_an_apology(
    hook: DialogueHookStandIn, make_hook: MakeHook, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_hook(secret="not-the-endpoint-secret")
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.hook_dialogue"):
        assert await collect(dialogue.respond(Turn(TurnKind.SPEECH, "hi"))) == [HOOK_APOLOGY]
    assert hook.rejected == 1 and hook.turns == []
    assert "HTTP 401" in caplog.text and "not-the-endpoint-secret" not in caplog.text


async def test_hook_unreachable_endpoint_answers_an_apology(
    make_hook: MakeHook, caplog: pytest.LogCaptureFixture
) -> None:
    dialogue = await make_hook(url=f"http://user:pa55word@127.0.0.1:{free_port()}/turns?token=hunter2secret")
    with caplog.at_level(logging.WARNING, "ivr_bridge.cascade.hook_dialogue"):
        assert await collect(dialogue.respond(Turn(TurnKind.DIGITS, "1"))) == [HOOK_APOLOGY]
    assert "ClientConnectorError" in caplog.text
    for secret in ("hunter2secret", "pa55word"):
        assert secret not in caplog.text and secret not in repr(dialogue)


async def test_hook_start_needs_a_url() -> None:
    dialogue = HookDialogue(Settings(dialogue=DialogueSettings(dialogue="hook")), CALL)
    with pytest.raises(ConnectionError, match="IVR_DIALOGUE_URL"):
        await dialogue.start()
    assert dialogue.expected() == []
