"""The `flow` dialogue step: loading and checking flow files, the flow's state machine
(sans-I/O), and `FlowDialogue` with its http action against a real loopback server."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from ivr_bridge.cascade.engines import Act, Turn, TurnKind
from ivr_bridge.cascade.flow import (
    DIGIT_WORDS,
    Flow,
    FlowDialogue,
    FlowError,
    FlowMachine,
    HttpRequest,
    load_flow,
    match_choice,
    parse_flow,
    render,
    spoken_digits,
)
from ivr_bridge.hooks import MAX_ANSWER_BYTES, SIGNATURE_HEADER, verify
from ivr_bridge.providers.base import CallInfo
from ivr_bridge.settings import Settings

TIMEOUT = 10.0
SECRET = "s3cret"
CALL = CallInfo("CA123", "+15551230000", "+15559870000", {"customer": "Ada", "caller": "+19999999999"})

START = Turn(TurnKind.START)
SILENCE = Turn(TurnKind.NO_INPUT)


def said(text: str) -> Turn:
    return Turn(TurnKind.SPEECH, text)


def keys(text: str) -> Turn:
    return Turn(TurnKind.DIGITS, text)


def flow_of(text: str, file: str = "t.yaml") -> Flow:
    return parse_flow(textwrap.dedent(text), file)


def machine(text: str, call: CallInfo = CALL) -> FlowMachine:
    return FlowMachine(flow_of(text), call)


MENU = """
    start: menu
    variables: {company: Example Company}
    nodes:
      menu:
        say: "Welcome to {company}. Say sales or support, or press 0."
        choices:
          - match: [sales, buy, "talk to a person"]
            keys: "1"
            next: sales
          - match: [support, help, "customer service", "that's all"]
            keys: ["2", "*"]
            next: support
          - keys: 0
            next: agent
        no_match: "Sorry. Say sales or support."
        no_input: "Are you still there?"
        retries: 2
        fallback: agent
      sales: {say: "Connecting you to sales.", transfer: "+15550101"}
      support: {say: "Support here.", next: menu}
      agent: {say: "Hold for an agent.", transfer: "sip:agent@example.com"}
"""


# -- The demo flow ---------------------------------------------------------------------------


def test_demo_flow_loads() -> None:
    flow = load_flow(None)
    assert flow == load_flow("")
    assert flow.start == "menu"
    assert flow.file.endswith("demo_flow.yaml")
    assert {"menu", "sales", "support", "account", "agent", "bye"} <= set(flow.nodes)


async def test_demo_flow_paths() -> None:
    flow = load_flow(None)
    dialogue = FlowDialogue(flow, Settings(), CALL)
    greeting = await reply(dialogue, START)
    assert greeting == ["Welcome to Example Company. Say sales, support, or press 0 for an agent."]
    assert {"sales", "support", "agent"} <= set(dialogue.expected())

    sales = await reply(dialogue, said("Sales, please."))
    assert sales == ["Connecting you to sales.", Act("transfer:+15550101")]
    assert dialogue.over

    await reply(dialogue, START)
    support = await reply(dialogue, said("I need support"))
    assert support == ["Please say or key in your account number, then press pound."]
    assert "oh" in dialogue.expected()
    assert await reply(dialogue, keys("4217#")) == [
        "Your account number is 4 2 1 7. Say agent to talk to someone, or goodbye."
    ]
    assert await reply(dialogue, said("goodbye")) == [
        "Thank you for calling Example Company. Goodbye.",
        Act("hangup"),
    ]

    await reply(dialogue, START)
    agent = await reply(dialogue, keys("0"))
    assert agent == ["Please hold while I connect you to an agent.", Act("transfer:+15550100")]
    await dialogue.close()


def test_demo_flow_falls_back_to_an_agent() -> None:
    flow = FlowMachine(load_flow(None), CALL)
    flow.start()
    assert flow.handle(SILENCE) == ["Are you still there? Say sales, support, or press 0 for an agent."]
    assert flow.handle(said("pizza"))[0].startswith("Sorry, I did not catch that.")
    assert flow.handle(SILENCE)[-1] == Act("transfer:+15550100")


def test_demo_flow_takes_a_spoken_account_number() -> None:
    flow = FlowMachine(load_flow(None), CALL)
    flow.start()
    flow.handle(keys("2"))
    assert flow.handle(said("It's four two one oh five.")) == [
        "Your account number is 4 2 1 0 5. Say agent to talk to someone, or goodbye."
    ]
    assert flow.variables["account"] == "42105"


# -- Loading ---------------------------------------------------------------------------------


def test_load_flow_from_yaml_and_json_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "ivr.yaml"
    yaml_file.write_text(textwrap.dedent(MENU))
    flow = load_flow(str(yaml_file))
    assert flow.file == str(yaml_file)
    as_json = {
        "start": "menu",
        "nodes": {
            "menu": {"say": "Press 1.", "choices": [{"keys": "1", "next": "bye"}]},
            "bye": {"say": "Goodbye.", "hangup": True},
        },
    }
    json_file = tmp_path / "ivr.json"
    json_file.write_text(json.dumps(as_json, indent=2))
    loaded = load_flow(str(json_file))
    assert loaded.nodes["menu"].choices[0].keys == ("1",)
    assert loaded.nodes["bye"].hangup


def test_yaml_words_stay_words() -> None:
    # YAML 1.1 reads `no` as false and +15550100 as a number; a menu needs them as written.
    flow = flow_of(
        """
        start: ask
        nodes:
          ask:
            say: "Yes or no?"
            choices:
              - {match: [yes, on], keys: 1, next: go}
              - {match: [no, off], next: go}
          go: {say: "Bye.", transfer: +15550100}
        """
    )
    assert flow.nodes["ask"].choices[0].phrases == ("yes", "on")
    assert flow.nodes["ask"].choices[1].phrases == ("no", "off")
    assert flow.nodes["ask"].choices[0].keys == ("1",)
    assert flow.nodes["go"].transfer == "+15550100"


BAD_FLOWS = [
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
           next: a
        """,
        5,
        "expected <block end>",
        id="yaml-indentation",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: "hi
            next: a
        """,
        4,
        "end of stream",
        id="yaml-unclosed-quote",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a: {say: hi, next: b}
        """,
        3,
        "unknown node 'b'",
        id="unknown-next",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices:
              - keys: "1"
                next: slaes
          sales: {say: x, hangup: true}
        """,
        7,
        "unknown node 'slaes' (did you mean 'sales'?)",
        id="unknown-choice-next",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices: [{keys: "1", next: a}]
            fallback: nowhere
        """,
        6,
        "`fallback` names unknown node 'nowhere'",
        id="unknown-fallback",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            http: {url: "http://127.0.0.1:9/"}
            next: a
            on_error: oops
        """,
        6,
        "`on_error` names unknown node 'oops'",
        id="unknown-on-error",
    ),
    pytest.param(
        """\
        nodes:
          a: {say: hi, hangup: true}
        """,
        1,
        "no `start`",
        id="no-start",
    ),
    pytest.param(
        """\
        # the flow
        start: menu
        nodes:
          a: {say: hi, hangup: true}
        """,
        2,
        "`start` names unknown node 'menu'",
        id="start-not-a-node",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            chioces: [{keys: "1", next: a}]
        """,
        5,
        "unknown field 'chioces' (did you mean `choices`?)",
        id="unknown-node-field",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices:
              - keys: "1"
                match: [one]
        """,
        6,
        "choice 1 has no `next`",
        id="choice-without-next",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices:
              - keys: "1"
                next: a
                macth: [x]
        """,
        8,
        "unknown field 'macth' (did you mean `match`?)",
        id="unknown-choice-field",
    ),
    pytest.param(
        """\
        start: a
        strat: a
        nodes:
          a: {say: hi, hangup: true}
        """,
        2,
        "the flow: unknown field 'strat'",
        id="unknown-top-field",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            transfer: "555-0100"
        """,
        5,
        "transfer target '555-0100' is not an E.164 number",
        id="bad-transfer-target",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            transfer: 15550100
        """,
        5,
        "quote it",
        id="unquoted-transfer-number",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices:
              - keys: "1"
                next: a
              - match: [help]
                keys: ["2", "1"]
                next: a
        """,
        9,
        "key '1' is already choice 1's",
        id="duplicate-keys",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices:
              - match: [Sales]
                next: a
              - match: ["sales!"]
                next: a
        """,
        8,
        "'sales!' is already matched by choice 1",
        id="duplicate-phrases",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a: {say: hi, hangup: true}
          b: {say: x, next: a}
          a: {say: bye, hangup: true}
        """,
        5,
        "'a' is given twice",
        id="duplicate-node",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a: {say: hi, next: b}
          b:
            no_match: "what?"
        """,
        5,
        "`no_match` is for nodes that wait for the caller",
        id="waiting-field-on-a-node-that-does-not-wait",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a: {say: hi, next: b}
          b: {}
        """,
        4,
        "node 'b' has neither `say` nor an action",
        id="neither-say-nor-action",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
        """,
        3,
        "leads nowhere",
        id="say-and-nothing-after",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            hangup: true
            transfer: "+15550100"
        """,
        6,
        "has both `hangup` and `transfer`",
        id="two-actions",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            transfer: "+15550100"
            next: a
        """,
        6,
        "`next` does nothing here",
        id="next-after-transfer",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: Number?
            collect: {digits: 4}
            next: a
        """,
        5,
        "needs `variable`",
        id="collect-without-variable",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: Number?
            collect: {variable: n}
        """,
        3,
        "`collect` needs `next`",
        id="collect-without-next",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            http:
              url: "ftp://example.com/"
            next: a
        """,
        5,
        "needs `url`: an http(s) URL",
        id="http-bad-url",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: "Your number is {n:money}."
            hangup: true
        """,
        4,
        "unknown format 'money'",
        id="unknown-format",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a: {say: one, next: b}
          b: {say: two, next: a}
        """,
        3,
        "nodes a -> b -> a go round in a loop",
        id="loop",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices: [{keys: "12", next: a}]
        """,
        5,
        "key '12' is not one phone key",
        id="two-keys-in-one",
    ),
    pytest.param(
        """\
        start: a
        nodes:
          a:
            say: hi
            choices: [{keys: "1", next: a}]
            retries: many
        """,
        6,
        "`retries` must be a whole number",
        id="bad-retries",
    ),
]


@pytest.mark.parametrize(("text", "line", "reason"), BAD_FLOWS)
def test_bad_flow_files_name_file_line_and_reason(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(FlowError) as caught:
        load_flow(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}, line {line}: "), message
    assert reason in message
    assert (caught.value.file, caught.value.line) == (str(path), line)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(FlowError, match=r"empty\.yaml: the flow is empty"):
        load_flow(str(empty))
    with pytest.raises(FlowError, match=r"missing\.yaml: cannot be read"):
        load_flow(str(tmp_path / "missing.yaml"))
    with pytest.raises(FlowError, match=r"list\.yaml, line 1: a flow is a mapping"):
        parse_flow("- a\n- b\n", "list.yaml")


# -- Matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transcript", "node"),
    [
        ("sales", "sales"),
        ("SALES!", "sales"),
        ("I'd like to buy, please.", "sales"),
        ("I want to talk to a person.", "sales"),  # a phrase, as a word sequence
        ("Customer-service?", "support"),  # punctuation between words
        ("That\u2019s all", "support"),  # a typographic apostrophe
        ("Support, not sales.", "support"),  # the one heard first
        ("salesman", None),  # whole words only
        ("person to talk to a", None),  # a phrase's words in order
        ("buying", None),
        ("one", "sales"),  # a key said aloud
        ("press two please", "support"),
        ("zero", "agent"),
        ("oh", None),  # "Oh..." is not the key 0
        ("one two", None),
        ("", None),
    ],
)
def test_match_choice(transcript: str, node: str | None) -> None:
    choices = flow_of(MENU).nodes["menu"].choices
    picked = match_choice(choices, transcript)
    assert (picked.next if picked else None) == node


def test_speech_picks_a_choice_and_says_every_prompt_on_the_way() -> None:
    flow = machine(MENU)
    assert flow.handle(START) == ["Welcome to Example Company. Say sales or support, or press 0."]
    # support says its prompt and goes back to the menu, which says its own.
    assert flow.handle(said("Help!")) == [
        "Support here.",
        "Welcome to Example Company. Say sales or support, or press 0.",
    ]
    assert flow.node is not None and flow.node.name == "menu"
    assert flow.handle(said("sales")) == ["Connecting you to sales.", Act("transfer:+15550101")]
    assert flow.over


def test_dtmf_choices() -> None:
    flow = machine(MENU)
    flow.start()
    assert flow.handle(keys("*")) == [
        "Support here.",
        "Welcome to Example Company. Say sales or support, or press 0.",
    ]
    assert flow.handle(keys("9")) == ["Sorry. Say sales or support."]
    assert flow.handle(keys("0")) == ["Hold for an agent.", Act("transfer:sip:agent@example.com")]


def test_keys_typed_ahead_go_to_the_next_node() -> None:
    flow = machine(MENU)
    flow.start()
    # 2 -> support -> menu, then 1 -> sales: one turn, both choices.
    assert flow.handle(keys("21"))[-1] == Act("transfer:+15550101")
    flow.start()
    # A wrong key re-prompts and drops the keys after it.
    assert flow.handle(keys("91")) == ["Sorry. Say sales or support."]
    assert not flow.over


def test_expected_phrases() -> None:
    flow = machine(MENU)
    assert flow.expected() == []  # before the start
    flow.start()
    assert flow.expected() == [
        "sales",
        "buy",
        "talk to a person",
        "support",
        "help",
        "customer service",
        "that's all",
        "one",
        "two",
        "zero",
    ]
    flow.handle(keys("1"))
    assert flow.expected() == []  # over


# -- Retries ---------------------------------------------------------------------------------


def test_no_match_and_no_input_count_retries_then_fall_back() -> None:
    flow = machine(MENU)
    flow.start()
    assert flow.handle(said("pizza")) == ["Sorry. Say sales or support."]
    assert flow.handle(SILENCE) == ["Are you still there?"]
    assert flow.retries == 2
    assert flow.handle(said("pizza")) == ["Hold for an agent.", Act("transfer:sip:agent@example.com")]


def test_a_choice_resets_the_retries() -> None:
    flow = machine(MENU)
    flow.start()
    flow.handle(SILENCE)
    flow.handle(SILENCE)
    flow.handle(keys("2"))  # support, back to the menu: a fresh count
    assert flow.retries == 0
    assert flow.handle(SILENCE) == ["Are you still there?"]


RETRIES = """
    start: ask
    {top}
    nodes:
      ask:
        say: "Press 1."
        choices: [{{keys: "1", next: done}}]
        retries: {retries}
      done: {{say: "Done.", hangup: true}}
      help: {{say: "Let me help.", transfer: "+15550100"}}
"""


def test_without_a_fallback_the_flow_says_goodbye_and_hangs_up() -> None:
    flow = machine(RETRIES.format(top="goodbye: 'Bye {caller}.'", retries=1))
    flow.start()
    assert flow.handle(SILENCE) == ["Press 1."]  # no no_input text: the prompt again
    assert flow.handle(said("what")) == ["Bye +15551230000.", Act("hangup")]


def test_the_flow_fallback_serves_nodes_without_their_own() -> None:
    flow = machine(RETRIES.format(top="fallback: help", retries=0))
    flow.start()
    assert flow.handle(SILENCE) == ["Let me help.", Act("transfer:+15550100")]


def test_a_turn_after_the_end_repeats_the_act() -> None:
    # The caller cut the last prompt before its Act was reached: the Act comes again.
    flow = machine(MENU)
    flow.start()
    flow.handle(keys("1"))
    assert flow.handle(said("hello?")) == [Act("transfer:+15550101")]
    assert flow.handle(START)[0].startswith("Welcome")  # START begins again


# -- Collect ---------------------------------------------------------------------------------


COLLECT = """
    start: account
    nodes:
      account:
        say: "Key in your account number, then press pound."
        collect: {variable: account, min_digits: 4, max_digits: 6, terminator: "#"}
        no_match: "That is not an account number."
        no_input: "Please key it in."
        next: check
      check:
        say: "Account {account:digits}. Press 1 to confirm."
        choices: [{keys: "1", next: bye}]
      bye: {say: "Goodbye.", hangup: true}
"""


def test_collect_keys_until_the_terminator() -> None:
    flow = machine(COLLECT)
    flow.start()
    assert flow.handle(keys("12")) == []  # still collecting
    assert flow.handle(keys("3")) == []
    assert flow.handle(keys("4#")) == ["Account 1 2 3 4. Press 1 to confirm."]
    assert flow.variables["account"] == "1234"
    assert flow.input == "1234"


def test_collect_ends_at_max_digits_and_ignores_a_late_terminator() -> None:
    flow = machine(COLLECT)
    flow.start()
    assert flow.handle(keys("123456")) == ["Account 1 2 3 4 5 6. Press 1 to confirm."]
    assert flow.handle(keys("#")) == []  # the caller ended an entry that was already full
    assert flow.retries == 0
    assert flow.handle(keys("1")) == ["Goodbye.", Act("hangup")]


def test_collect_keys_and_the_next_choice_in_one_turn() -> None:
    flow = machine(COLLECT)
    flow.start()
    assert flow.handle(keys("98765#1")) == [
        "Account 9 8 7 6 5. Press 1 to confirm.",
        "Goodbye.",
        Act("hangup"),
    ]


def test_collect_too_few_digits_retries() -> None:
    flow = machine(COLLECT)
    flow.start()
    assert flow.handle(keys("12#")) == ["That is not an account number."]
    assert flow.digits == ""
    assert flow.handle(keys("*5555#")) == ["Account 5 5 5 5. Press 1 to confirm."]


def test_collect_on_silence() -> None:
    flow = machine(COLLECT)
    flow.start()
    assert flow.handle(SILENCE) == ["Please key it in."]
    flow.handle(keys("12"))
    assert flow.handle(SILENCE) == ["Please key it in."]  # too few: start over
    flow.handle(keys("1234"))
    # Silence after enough keys ends the entry, as <Gather>'s timeout does.
    assert flow.handle(SILENCE) == ["Account 1 2 3 4. Press 1 to confirm."]


@pytest.mark.parametrize(
    ("transcript", "account"),
    [
        ("one two three four", "1234"),
        ("It is 12 34 56.", "123456"),
        ("four oh oh seven", "4007"),
        ("double five triple nine", "55999"),
        ("Five, six, seven, eight!", "5678"),
        ("one two", None),  # too few
        ("one two three four five six seven", None),  # too many
        ("I don't know", None),
    ],
)
def test_collect_a_spoken_number(transcript: str, account: str | None) -> None:
    flow = machine(COLLECT)
    flow.start()
    out = flow.handle(said(transcript))
    if account is None:
        assert out == ["That is not an account number."]
        assert "account" not in flow.variables
    else:
        assert flow.variables["account"] == account
        assert out == [f"Account {' '.join(account)}. Press 1 to confirm."]


def test_collect_exact_digits_without_terminator() -> None:
    flow = machine(
        """
        start: pin
        nodes:
          pin:
            say: "Your PIN?"
            collect: {variable: pin, digits: 4, terminator: ""}
            next: ok
          ok: {say: "PIN {pin}.", hangup: true}
        """
    )
    flow.start()
    assert flow.expected() == [*DIGIT_WORDS, "oh"]
    assert flow.handle(keys("#12")) == []  # '#' means nothing here
    assert flow.handle(keys("345")) == ["PIN 1234.", Act("hangup")]


def test_spoken_digits() -> None:
    assert spoken_digits("my number is one two three, oh 4 5") == "123045"
    assert spoken_digits("double 7 and triple zero") == "77000"
    assert spoken_digits("nothing here") == ""


# -- Interpolation ---------------------------------------------------------------------------


def test_render() -> None:
    values = {"name": "Ada", "n": "1234"}
    assert render("Hi {name}, {unknown}bye.", values) == "Hi Ada, bye."
    assert render("{n:digits} / {n}", values) == "1 2 3 4 / 1234"
    assert render("{not a name} {}", values) == "{not a name} {}"


def test_call_variables_in_texts() -> None:
    flow = machine(
        """
        start: hi
        variables: {company: ACME, customer: nobody}
        nodes:
          hi:
            say: "{company} for {customer}: {caller} called {called} ({call_sid}). {missing}"
            hangup: true
        """
    )
    # The call's parameters override the flow's defaults; the caller's number is the call's.
    assert flow.start() == [
        "ACME for Ada: +15551230000 called +15559870000 (CA123).",
        Act("hangup"),
    ]


# -- FlowDialogue ----------------------------------------------------------------------------


async def reply(dialogue: FlowDialogue, turn: Turn) -> list[str | Act]:
    return [piece async for piece in dialogue.respond(turn)]


async def test_dialogue_streams_the_prompts_as_one_reply() -> None:
    dialogue = FlowDialogue(flow_of(MENU), Settings(), CALL)
    await dialogue.start()
    pieces = await reply(dialogue, START)
    assert pieces == ["Welcome to Example Company. Say sales or support, or press 0."]
    pieces = await reply(dialogue, said("customer service"))
    # Pieces are concatenated by the cascade: the second prompt keeps its space.
    assert "".join(p for p in pieces if isinstance(p, str)) == (
        "Support here. Welcome to Example Company. Say sales or support, or press 0."
    )
    assert dialogue.node == "menu"
    dialogue.heard("Support here. Welcome", "Support here.")
    assert dialogue.cut == ("Support here. Welcome", "Support here.")
    pieces = await reply(dialogue, keys("1"))
    assert pieces[-1] == Act("transfer:+15550101")
    assert all(isinstance(p, str) for p in pieces[:-1])
    assert dialogue.over
    await dialogue.close()


# -- The http action -------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def endpoint(handler: Handler) -> AsyncIterator[str]:
    """A real HTTP server on a free loopback port, in this event loop: its URL."""
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/ivr"
    finally:
        await runner.cleanup()


def http_flow(url: str, on_error: bool = True) -> Flow:
    return flow_of(
        f"""
        start: ask
        nodes:
          ask:
            say: "Your account number?"
            collect: {{variable: account, digits: 4}}
            next: lookup
          lookup:
            say: "One moment."
            http: {{url: "{url}"}}
            next: found
            {"on_error: broken" if on_error else ""}
          found:
            say: "Hello {{name}}, your balance is {{balance}}."
            hangup: true
          vip: {{say: "Welcome back, {{name}}.", transfer: "+15550199"}}
          broken: {{say: "Our system is down.", transfer: "+15550100"}}
        """
    )


async def test_http_posts_signed_variables_and_follows_the_answer() -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def handler(request: web.Request) -> web.Response:
        received.append((await request.read(), dict(request.headers)))
        return web.json_response({"variables": {"name": "Ada", "balance": 12.5}, "say": "Found you."})

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(hook_secret=SECRET, hook_timeout_s=5.0), CALL)
        await reply(dialogue, START)
        pieces = await reply(dialogue, keys("4217"))
        await dialogue.close()
    assert pieces == [
        "One moment.",
        " Found you.",
        " Hello Ada, your balance is 12.5.",
        Act("hangup"),
    ]
    [(body, headers)] = received
    assert verify(SECRET, body, headers[SIGNATURE_HEADER], time.time())
    assert headers["Content-Type"] == "application/json"
    sent = json.loads(body)
    assert sent["node"] == "lookup"
    assert sent["input"] == "4217"
    assert sent["variables"]["account"] == "4217"
    assert sent["variables"]["caller"] == "+15551230000"
    assert sent["call"] == {
        "call_sid": "CA123",
        "caller": "+15551230000",
        "called": "+15559870000",
        "parameters": {"customer": "Ada", "caller": "+19999999999"},
    }


async def test_http_answer_picks_the_next_node() -> None:
    async def handler(request: web.Request) -> web.Response:
        assert SIGNATURE_HEADER not in request.headers  # no secret, no signature
        return web.json_response({"next": "vip", "variables": {"name": "Grace"}})

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(), CALL)
        await reply(dialogue, START)
        pieces = await reply(dialogue, keys("1234"))
        await dialogue.close()
    assert pieces == ["One moment.", " Welcome back, Grace.", Act("transfer:+15550199")]


async def test_http_empty_answer_goes_to_next() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(), CALL)
        await reply(dialogue, START)
        pieces = await reply(dialogue, keys("1234"))
        await dialogue.close()
    assert pieces == ["One moment.", " Hello , your balance is .", Act("hangup")]


BAD_ANSWERS = [
    pytest.param(web.Response(status=500, text="boom"), id="http-500"),
    pytest.param(web.Response(status=302, headers={"Location": "/elsewhere"}), id="redirect"),
    pytest.param(web.Response(text="<html>not json</html>"), id="not-json"),
    pytest.param(web.json_response(["a", "list"]), id="not-an-object"),
    pytest.param(web.json_response({"next": "nowhere"}), id="unknown-next"),
    pytest.param(web.json_response({"variables": {"a": {"nested": 1}}}), id="bad-variables"),
    pytest.param(web.json_response({"say": 42}), id="bad-say"),
    pytest.param(web.Response(body=b" " * (MAX_ANSWER_BYTES + 1)), id="too-big"),
]


@pytest.mark.parametrize("answer", BAD_ANSWERS)
async def test_http_failure_goes_to_on_error(answer: web.Response) -> None:
    async def handler(request: web.Request) -> web.Response:
        return answer

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(), CALL)
        await reply(dialogue, START)
        pieces = await reply(dialogue, keys("1234"))
        await dialogue.close()
    assert pieces == ["One moment.", " Our system is down.", Act("transfer:+15550100")]
    assert dialogue.machine.pending is None


async def test_http_timeout_goes_to_on_error() -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()  # never answers in time
        return web.json_response({})

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(hook_timeout_s=0.2), CALL)
        await reply(dialogue, START)
        pieces = await asyncio.wait_for(reply(dialogue, keys("1234")), TIMEOUT)
        assert arrived.is_set()
        release.set()
        await dialogue.close()
    assert pieces[-1] == Act("transfer:+15550100")


async def test_http_refused_without_on_error_apologises_and_falls_back() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    async with endpoint(handler) as url:
        pass  # the server is gone: its port now refuses connections
    text = textwrap.dedent(
        f"""
        start: lookup
        fallback: agent
        apology: "Sorry, that did not work."
        nodes:
          lookup:
            http: {{url: "{url}"}}
            next: agent
          agent: {{say: "An agent will help.", transfer: "+15550100"}}
        """
    )
    dialogue = FlowDialogue(parse_flow(text), Settings(), CALL)
    pieces = await reply(dialogue, START)
    await dialogue.close()
    assert pieces == ["Sorry, that did not work.", " An agent will help.", Act("transfer:+15550100")]


async def test_http_request_cut_short_is_made_again_on_the_next_turn() -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            arrived.set()
            await release.wait()
        return web.json_response({"variables": {"name": "Ada", "balance": "3"}})

    async with endpoint(handler) as url:
        dialogue = FlowDialogue(http_flow(url), Settings(), CALL)
        await reply(dialogue, START)
        stream = dialogue.respond(keys("1234"))
        assert await anext(stream) == "One moment."
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(arrived.wait(), TIMEOUT)
        waiting.cancel()  # the caller talked over "One moment."
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        assert dialogue.machine.pending is not None
        assert dialogue.expected() == []
        pieces = await reply(dialogue, said("hello?"))
        release.set()
        await dialogue.close()
    assert pieces == ["Hello Ada, your balance is 3.", Act("hangup")]
    assert calls == 2


def test_the_machine_asks_for_http_without_doing_it() -> None:
    flow = FlowMachine(http_flow("http://127.0.0.1:9/x"), CALL)
    flow.start()
    out = flow.handle(keys("1234"))
    assert out[0] == "One moment."
    request = out[-1]
    assert isinstance(request, HttpRequest)
    assert (request.node, request.url) == ("lookup", "http://127.0.0.1:9/x")
    assert json.loads(request.body)["variables"]["account"] == "1234"
    assert flow.answered({"next": "vip", "variables": {"name": "Lin"}}) == [
        "Welcome back, Lin.",
        Act("transfer:+15550199"),
    ]


def test_http_answers_going_round_in_circles_end_the_call() -> None:
    flow = FlowMachine(
        flow_of(
            """
            start: poll
            nodes:
              poll:
                http: {url: "http://127.0.0.1:9/poll"}
                next: poll
            """
        ),
        CALL,
    )
    out = flow.start()
    answers = 0
    while isinstance(out[-1], HttpRequest):
        answers += 1
        out = flow.answered({})
    assert out == ["Sorry, something went wrong.", Act("hangup")]
    assert answers < 200
