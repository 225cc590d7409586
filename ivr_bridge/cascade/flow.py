"""The `flow` dialogue step: a declarative IVR flow, a graph of nodes in a YAML or JSON file.

IVR_FLOW names the file ("" = `demo_flow.yaml`, shipped in this package, which is also the
commented example of the format). JSON is accepted as it is: JSON is YAML.

    start: menu                   # the first node (required)
    variables: {company: ACME}    # defaults for {name} in texts (optional)
    fallback: agent               # where a node without its own fallback goes (optional)
    apology: "Sorry, something went wrong."       # said when an http step fails (optional)
    goodbye: "Thank you for calling. Goodbye."    # said before hanging up when there is no
                                                  # fallback to go to (optional)
    nodes:
      menu:
        say: "Say sales or support, or press 0."  # the prompt; {name} is a variable
        choices:                                  # wait for the caller and pick one
          - match: [sales, "buy something"]       # words or phrases heard in the speech
            keys: "1"                             # or keys pressed (a list for several)
            next: sales
        no_match: "Sorry, say sales or support."  # re-prompt on a wrong answer (default: say)
        no_input: "Are you still there?"          # re-prompt on silence (default: say)
        retries: 2                                # re-prompts before the fallback (default 2)
        fallback: agent                           # then go here (default: the flow's, or
                                                  # goodbye and hang up)
      account:
        say: "Please key in your account number, then press pound."
        collect: {variable: account, min_digits: 4, max_digits: 10, terminator: "#"}
        next: lookup                              # once collected (`digits: 6` = exactly 6)
      lookup:
        http: {url: "https://crm.example.com/ivr"}
        next: found                               # unless the answer names another node
        on_error: agent                           # when the request fails (default: apology,
                                                  # then the fallback)
      found: {say: "Your account is {account:digits}.", next: menu}   # say, then go on
      sales: {say: "Connecting you.", transfer: "+15550100"}          # or a sip: URI
      bye: {say: "Goodbye.", hangup: true}

Each node has an optional `say` and one action: `choices` or `collect` (wait for the
caller), `transfer` or `hangup` (end the flow once the prompt has played), `http` (then
`next`), or just `next`. Entering a node says its prompt and carries its action out, so a
reply may hold several nodes' prompts ("Thank you." then the menu).

Matching: a choice's phrases are found in the transcript as whole words, case and
punctuation ignored ("Support!" matches `support`, "supporting" does not; "talk to a
person" matches as that word sequence); the phrase heard earliest wins. A caller who says
a choice's key ("zero") picks it too. `collect` takes keys up to `max_digits` or the
terminator (silence once `min_digits` are in ends it too), or a spoken number: digits
in the transcript and the words zero to nine, "oh", "double", "triple".

Texts interpolate `{name}`: the flow's variables, then the call's custom parameters, then
`caller`, `called` and `call_sid`, and whatever `collect` and `http` set; an unknown name
is empty. `{name:digits}` spells a value out digit by digit ("1 2 3"), for reading back.

`http` POSTs JSON `{"call": {call_sid, caller, called, parameters}, "variables", "node",
"input"}` (input: the caller's last speech or keys), signed as hooks are
(`X-IVR-Signature`, with IVR_HOOK_SECRET when set), within IVR_HOOK_TIMEOUT_S. A 2xx JSON
answer may hold `variables` (merged), `say` (said as it is) and `next` (a node name).
Anything else (an error status, a redirect, a timeout, an answer over 64 KiB or malformed)
goes to `on_error`; without one the caller hears the apology, then the fallback, or the
goodbye and a hang-up. A failed request never raises out of the dialogue.

A file is checked whole when it is loaded: `FlowError` names the file, the line and the
reason (YAML syntax, unknown fields, unknown nodes, bad transfer targets, a key in two
choices...). YAML 1.1's surprises are off: `yes`, `no`, `on` and `off` stay words (menu
answers) and `+15550100` stays text.

Barge-in: a reply cut before its `Act` leaves the flow over, and the next turn answers
the `Act` alone; a reply cut during an http request makes the request again on the next
turn. A START turn always begins the flow afresh.

`FlowMachine` is the flow itself, sans-I/O (state: current node, retries, digits,
variables): turns in, text, `Act`s and `HttpRequest`s out. `FlowDialogue` is the
`Dialogue` of the cascade, running the machine and its HTTP requests.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

from ivr_bridge.cascade.engines import Act, Turn, TurnKind
from ivr_bridge.hooks import (
    MAX_ANSWER_BYTES,
    Target,
    post_signed,
    safe_url,
    scrub,
    ssl_context,
    target_of,
)
from ivr_bridge.providers.base import CallInfo
from ivr_bridge.settings import Settings, is_phone_target

log = logging.getLogger(__name__)

DEMO_FLOW = "demo_flow.yaml"
DEFAULT_RETRIES = 2
DEFAULT_MAX_DIGITS = 20
DEFAULT_APOLOGY = "Sorry, something went wrong."
DEFAULT_GOODBYE = "Thank you for calling. Goodbye."
MAX_HOPS = 100  # nodes entered in one turn: more is a loop through http answers
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_SPOKEN_DIGITS = {word: str(n) for n, word in enumerate(DIGIT_WORDS)} | {"oh": "0"}
_REPEATS = {"double": 2, "triple": 3}
# Words a caller may wrap a spoken key in: "press zero", "option two please".
_KEY_FILLER = frozenset({"press", "option", "number", "key", "the", "um", "uh", "please", "i", "want"})
KEYS = "0123456789*#"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*))?\}")
_FORMATS = ("digits",)

TOP_FIELDS = ("start", "nodes", "variables", "fallback", "apology", "goodbye")
NODE_FIELDS = (
    "say",
    "next",
    "choices",
    "collect",
    "transfer",
    "hangup",
    "http",
    "no_match",
    "no_input",
    "retries",
    "fallback",
    "on_error",
)
CHOICE_FIELDS = ("match", "keys", "next")
COLLECT_FIELDS = ("variable", "digits", "min_digits", "max_digits", "terminator")
HTTP_FIELDS = ("url",)
ACTIONS = ("choices", "collect", "transfer", "hangup", "http")
WAITING_FIELDS = ("no_match", "no_input", "retries", "fallback")


class FlowError(ValueError):
    """A flow file that cannot be used: `file, line N: reason` (line 0: the whole file)."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}, line {line}: {reason}" if line else f"{file}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


# -- The data model --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Choice:
    next: str
    phrases: tuple[str, ...] = ()  # as written, for `expected`
    keys: tuple[str, ...] = ()  # single DTMF keys
    words: tuple[tuple[str, ...], ...] = ()  # the phrases as word sequences, for matching


@dataclass(frozen=True, slots=True)
class Collect:
    variable: str
    min_digits: int = 1
    max_digits: int = DEFAULT_MAX_DIGITS
    terminator: str = "#"  # "" for none


@dataclass(frozen=True, slots=True)
class Http:
    url: str


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    line: int  # where the node is defined, for messages
    say: str = ""
    next: str = ""
    choices: tuple[Choice, ...] = ()
    collect: Collect | None = None
    transfer: str = ""
    hangup: bool = False
    http: Http | None = None
    no_match: str = ""
    no_input: str = ""
    retries: int = DEFAULT_RETRIES
    fallback: str = ""
    on_error: str = ""

    @property
    def waits(self) -> bool:
        """Whether the flow stops here for the caller's answer."""
        return bool(self.choices) or self.collect is not None


@dataclass(frozen=True, slots=True)
class Flow:
    start: str
    nodes: Mapping[str, Node]
    variables: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fallback: str = ""
    apology: str = DEFAULT_APOLOGY
    goodbye: str = DEFAULT_GOODBYE
    file: str = ""


# -- Loading ---------------------------------------------------------------------------------


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its line and each of its keys' lines (1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.lines.get(key, self.line)


class _Loader(yaml.SafeLoader):
    """Safe YAML with line numbers, YAML 1.2's plain scalars (YAML 1.1 reads `no` as false
    and `+15550100` as a number) and a repeated key refused (YAML keeps the last silently)."""


_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^-?[0-9]+$"), list("-0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^-?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"), list("-.0123456789")
)


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    return int(loader.construct_scalar(node))  # decimal only: "010" is ten, not octal eight


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    data = _Map(node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool | None):
            raise yaml.constructor.ConstructorError(None, None, "a key must be text", key_node.start_mark)
        if key in data:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key!r} is given twice in this mapping", key_node.start_mark
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.lines[key] = key_node.start_mark.line + 1
    return data


_Loader.add_constructor(_INT, _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)


def load_flow(path: str | None = None) -> Flow:
    """The flow in the file at `path` (YAML or JSON); None or "" for the demo flow. Raises
    FlowError naming the file, the line and what is wrong."""
    if not path:
        text = resources.files("ivr_bridge.cascade").joinpath(DEMO_FLOW).read_text(encoding="utf-8")
        return parse_flow(text, f"ivr_bridge/cascade/{DEMO_FLOW}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlowError(path, 0, "not UTF-8 text") from None
    except OSError as exc:
        raise FlowError(path, 0, f"cannot be read: {exc.strerror or exc}") from None
    return parse_flow(text, path)


def parse_flow(text: str, file: str = "<flow>") -> Flow:
    """The flow in `text`; `file` names it in FlowError messages."""
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader: no Python objects from the file
    except yaml.MarkedYAMLError as exc:
        mark, where = exc.problem_mark or exc.context_mark, exc.context_mark
        if mark and where and mark.index >= len(text.rstrip()):
            # Found at the end of the file (an unclosed quote or bracket): the culprit is
            # where the unfinished thing began.
            mark, where = where, None
        reason = exc.problem or exc.context or "not valid YAML"
        if exc.context and exc.problem:
            at = f" at line {where.line + 1}" if where and mark and where.line != mark.line else ""
            reason = f"{exc.problem} ({exc.context}{at})"
        raise FlowError(file, mark.line + 1 if mark else 0, reason) from None
    except yaml.YAMLError as exc:
        raise FlowError(file, 0, f"not valid YAML: {exc}") from None
    except RecursionError:
        raise FlowError(file, 0, "nested too deeply") from None
    return _Builder(file).flow(data)


class _Builder:
    """Checks the loaded YAML and builds the `Flow`; the first problem raises FlowError."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.names: set[str] = set()

    def fail(self, line: int, reason: str) -> FlowError:
        return FlowError(self.file, line, reason)

    def flow(self, data: object) -> Flow:
        if data is None:
            raise self.fail(0, "the flow is empty")
        if not isinstance(data, _Map):
            raise self.fail(1, "a flow is a mapping with `start` and `nodes`")
        self.fields(data, TOP_FIELDS, "the flow")
        nodes = data.get("nodes")
        if not isinstance(nodes, _Map) or not nodes:
            raise self.fail(data.line_of("nodes"), "`nodes` must be a mapping of node names to nodes")
        for name in nodes:
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise self.fail(
                    nodes.line_of(name), f"node name {name!r}: use letters, digits and _ (not first a digit)"
                )
        self.names = set(nodes)
        if "start" not in data:
            raise self.fail(data.line, "no `start`: name the first node")
        start = self.ref(data, "start", "the flow")
        variables = self.variables(data)
        fallback = self.ref(data, "fallback", "the flow") if "fallback" in data else ""
        apology = self.text(data, "apology", "the flow") if "apology" in data else DEFAULT_APOLOGY
        goodbye = self.text(data, "goodbye", "the flow") if "goodbye" in data else DEFAULT_GOODBYE
        built = {name: self.node(name, nodes[name], nodes.line_of(name)) for name in nodes}
        self.loops(built)
        # Read-only views: one Flow may serve many calls at once.
        return Flow(
            start, MappingProxyType(built), MappingProxyType(variables), fallback, apology, goodbye, self.file
        )

    def fields(self, data: _Map, allowed: tuple[str, ...], what: str) -> None:
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else f" (known: {', '.join(allowed)})"
                raise self.fail(data.line_of(key), f"{what}: unknown field {key!r}{hint}")

    def text(self, data: _Map, key: str, what: str) -> str:
        value = data[key]
        if not isinstance(value, str):
            raise self.fail(data.line_of(key), f"{what}: `{key}` must be text")
        for match in _PLACEHOLDER.finditer(value):
            if match[2] is not None and match[2] not in _FORMATS:
                raise self.fail(
                    data.line_of(key),
                    f"{what}: `{key}` has {match[0]}: unknown format {match[2]!r}"
                    f" (known: {', '.join(_FORMATS)})",
                )
        return value

    def ref(self, data: _Map, key: str, what: str) -> str:
        value = data[key]
        if not isinstance(value, str) or value not in self.names:
            close = difflib.get_close_matches(str(value), sorted(self.names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(data.line_of(key), f"{what}: `{key}` names unknown node {value!r}{hint}")
        return value

    def number(self, data: _Map, key: str, what: str, low: int, high: int) -> int:
        value = data[key]
        if type(value) is not int or not low <= value <= high:
            raise self.fail(data.line_of(key), f"{what}: `{key}` must be a whole number from {low} to {high}")
        return value

    def variables(self, data: _Map) -> dict[str, str]:
        if "variables" not in data or data["variables"] is None:
            return {}
        given = data["variables"]
        if not isinstance(given, _Map):
            raise self.fail(data.line_of("variables"), "`variables` must be a mapping of names to values")
        values: dict[str, str] = {}
        for name, value in given.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise self.fail(given.line_of(name), f"variable name {name!r}: use letters, digits and _")
            if isinstance(value, _Map | list):
                raise self.fail(given.line_of(name), f"variable {name!r} must be text or a number")
            values[name] = _text_of(value)
        return values

    def node(self, name: str, data: object, line: int) -> Node:
        what = f"node {name!r}"
        if not isinstance(data, _Map):
            raise self.fail(line, f"{what} must be a mapping of fields (say, next, choices...)")
        self.fields(data, NODE_FIELDS, what)
        actions = [key for key in data if key in ACTIONS and not (key == "hangup" and data[key] is False)]
        if len(actions) > 1:
            raise self.fail(
                data.line_of(actions[1]),
                f"{what} has both `{actions[0]}` and `{actions[1]}`: one action a node",
            )
        action = actions[0] if actions else ""
        if "next" in data and action in ("choices", "transfer", "hangup"):
            reason = "each choice has its own next" if action == "choices" else f"`{action}` ends the flow"
            raise self.fail(data.line_of("next"), f"{what}: `next` does nothing here: {reason}")
        for key in WAITING_FIELDS:
            if key in data and action not in ("choices", "collect"):
                raise self.fail(
                    data.line_of(key),
                    f"{what}: `{key}` is for nodes that wait for the caller (choices, collect)",
                )
        if "on_error" in data and action != "http":
            raise self.fail(data.line_of("on_error"), f"{what}: `on_error` is for `http` nodes")
        if action in ("collect", "http") and "next" not in data:
            raise self.fail(line, f"{what}: `{action}` needs `next`, the node after it")
        if not action and "next" not in data:
            if "say" not in data:
                raise self.fail(line, f"{what} has neither `say` nor an action (next, {', '.join(ACTIONS)})")
            raise self.fail(
                line, f"{what} says its prompt and leads nowhere: give it next, {', '.join(ACTIONS)}"
            )
        node: dict[str, Any] = {"name": name, "line": line}
        for key in ("say", "no_match", "no_input"):
            if key in data:
                node[key] = self.text(data, key, what)
        for key in ("next", "fallback", "on_error"):
            if key in data:
                node[key] = self.ref(data, key, what)
        if "retries" in data:
            node["retries"] = self.number(data, "retries", what, 0, 10)
        if action == "choices":
            node["choices"] = self.choices(data, what)
        elif action == "collect":
            node["collect"] = self.collect(data, what)
        elif action == "transfer":
            target = data["transfer"]
            if not isinstance(target, str) or not is_phone_target(target):
                hint = " (quote it: YAML reads a bare number as a number)" if isinstance(target, int) else ""
                raise self.fail(
                    data.line_of("transfer"),
                    f"{what}: transfer target {target!r} is not an E.164 number (+15550100)"
                    f" or a sip: URI{hint}",
                )
            node["transfer"] = target
        elif action == "hangup":
            if data["hangup"] is not True:
                raise self.fail(data.line_of("hangup"), f"{what}: `hangup` must be true")
            node["hangup"] = True
        elif action == "http":
            node["http"] = self.http(data, what)
        return Node(**node)

    def choices(self, data: _Map, what: str) -> tuple[Choice, ...]:
        given = data["choices"]
        if not isinstance(given, list) or not given:
            raise self.fail(data.line_of("choices"), f"{what}: `choices` must be a list of choices")
        keys_of: dict[str, int] = {}  # key -> the choice (1-based) that has it
        phrases_of: dict[tuple[str, ...], int] = {}
        choices = []
        for number, item in enumerate(given, 1):
            this = f"{what}, choice {number}"
            if not isinstance(item, _Map):
                raise self.fail(data.line_of("choices"), f"{this} must be a mapping (match, keys, next)")
            self.fields(item, CHOICE_FIELDS, this)
            if "next" not in item:
                raise self.fail(item.line, f"{this} has no `next`")
            if "match" not in item and "keys" not in item:
                raise self.fail(item.line, f"{this} needs `match` (words heard) or `keys` (keys pressed)")
            phrases: list[str] = []
            words: list[tuple[str, ...]] = []
            if "match" in item:
                listed = item["match"] if isinstance(item["match"], list) else [item["match"]]
                for phrase in listed:
                    phrase_words = tuple(_words(phrase)) if isinstance(phrase, str) else ()
                    if not phrase_words:
                        raise self.fail(item.line_of("match"), f"{this}: `match` {phrase!r} has no words")
                    if phrase_words in phrases_of:
                        raise self.fail(
                            item.line_of("match"),
                            f"{this}: {phrase!r} is already matched by choice {phrases_of[phrase_words]}",
                        )
                    phrases_of[phrase_words] = number
                    phrases.append(phrase)
                    words.append(phrase_words)
            keys: list[str] = []
            if "keys" in item:
                listed = item["keys"] if isinstance(item["keys"], list) else [item["keys"]]
                for key in listed:
                    key = str(key) if type(key) is int else key
                    if not isinstance(key, str) or len(key) != 1 or key not in KEYS:
                        raise self.fail(
                            item.line_of("keys"),
                            f"{this}: key {key!r} is not one phone key (0-9, * or #; a list for several)",
                        )
                    if key in keys_of:
                        raise self.fail(
                            item.line_of("keys"), f"{this}: key {key!r} is already choice {keys_of[key]}'s"
                        )
                    keys_of[key] = number
                    keys.append(key)
            choices.append(Choice(self.ref(item, "next", this), tuple(phrases), tuple(keys), tuple(words)))
        return tuple(choices)

    def collect(self, data: _Map, what: str) -> Collect:
        given = data["collect"]
        this = f"{what}, collect"
        if not isinstance(given, _Map):
            raise self.fail(data.line_of("collect"), f"{this} must be a mapping (variable, max_digits...)")
        self.fields(given, COLLECT_FIELDS, this)
        variable = given.get("variable")
        if not isinstance(variable, str) or not _NAME.fullmatch(variable):
            raise self.fail(given.line_of("variable"), f"{this} needs `variable`: where the digits go")
        if "digits" in given:
            if "min_digits" in given or "max_digits" in given:
                raise self.fail(given.line_of("digits"), f"{this}: `digits`, or min_digits and max_digits")
            low = high = self.number(given, "digits", this, 1, 64)
        else:
            low = self.number(given, "min_digits", this, 1, 64) if "min_digits" in given else 1
            high = DEFAULT_MAX_DIGITS
            if "max_digits" in given:
                high = self.number(given, "max_digits", this, 1, 64)
            if high < low:
                raise self.fail(given.line_of("max_digits"), f"{this}: max_digits is less than min_digits")
        terminator = given.get("terminator", "#")
        if terminator is None:
            terminator = ""
        if terminator not in ("#", "*", ""):
            raise self.fail(given.line_of("terminator"), f"{this}: `terminator` must be '#', '*' or ''")
        return Collect(variable, low, high, terminator)

    def http(self, data: _Map, what: str) -> Http:
        given = data["http"]
        this = f"{what}, http"
        if not isinstance(given, _Map):
            raise self.fail(data.line_of("http"), f"{this} must be a mapping with `url`")
        self.fields(given, HTTP_FIELDS, this)
        url = given.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise self.fail(given.line_of("url"), f"{this} needs `url`: an http(s) URL")
        return Http(url)

    def loops(self, nodes: Mapping[str, Node]) -> None:
        """Refuse nodes that only say and go on, round in a circle: the flow would never
        wait for the caller."""
        done: set[str] = set()
        for first in nodes:
            path: list[str] = []
            name = first
            while name not in done and not _ends_turn(nodes[name]):
                if name in path:
                    loop = [*path[path.index(name) :], name]
                    raise self.fail(
                        nodes[name].line,
                        f"nodes {' -> '.join(loop)} go round in a loop without waiting for the caller",
                    )
                path.append(name)
                name = nodes[name].next
            done.update(path)


def _ends_turn(node: Node) -> bool:
    # Only say-and-next nodes move on unconditionally (an http answer may pick another next).
    return node.waits or node.http is not None or bool(node.transfer) or node.hangup


def _text_of(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# -- Matching and texts (pure) ---------------------------------------------------------------


def _words(text: str) -> list[str]:
    """The words of `text`, lower-case, without punctuation ("Don't" stays one word)."""
    return re.findall(r"[^\W_]+(?:'[^\W_]+)*", text.casefold().replace("\u2019", "'"))


def _find(words: list[str], phrase: tuple[str, ...]) -> int:
    """Where `phrase` starts in `words` as whole words; -1 if it does not."""
    size = len(phrase)
    for start in range(len(words) - size + 1):
        if tuple(words[start : start + size]) == phrase:
            return start
    return -1


def match_choice(choices: tuple[Choice, ...], transcript: str) -> Choice | None:
    """The choice the caller picked by speech: the phrase heard first (the longer one when
    two start at the same word), or else a choice's key said on its own ("zero")."""
    words = _words(transcript)
    best: tuple[int, int, int] | None = None
    for number, choice in enumerate(choices):
        for phrase in choice.words:
            at = _find(words, phrase)
            if at >= 0 and (best is None or (at, -len(phrase), number) < best):
                best = (at, -len(phrase), number)
    if best is not None:
        return choices[best[2]]
    said = [word for word in words if word not in _KEY_FILLER]
    # "oh" is not a key here: "Oh, um..." is no answer.
    if len(said) == 1 and said[0] != "oh" and len(key := spoken_digits(said[0])) == 1:
        return next((choice for choice in choices if key in choice.keys), None)
    return None


def spoken_digits(transcript: str) -> str:
    """The digits said in `transcript`: "one two 3 oh double five" -> "123055"."""
    digits: list[str] = []
    repeat = 1
    for token in re.findall(r"[a-z]+|[0-9]+", transcript.casefold()):
        if token in _REPEATS:
            repeat = _REPEATS[token]
            continue
        value = token if token.isdigit() else _SPOKEN_DIGITS.get(token, "")
        if value:
            digits.append(value[0] * (repeat - 1) + value)
        repeat = 1
    return "".join(digits)


def render(text: str, variables: Mapping[str, str]) -> str:
    """`text` with `{name}` replaced by the variable (empty if unknown); `{name:digits}`
    spelt digit by digit."""

    def value(match: re.Match[str]) -> str:
        found = variables.get(match[1], "")
        if match[2] == "digits":
            return " ".join(char for char in found if not char.isspace())
        return found

    return _PLACEHOLDER.sub(value, text)


# -- The flow, sans-I/O ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The flow cannot go on before `body` is POSTed to `url`: give the machine the answer
    (`FlowMachine.answered`) or the failure (`FlowMachine.failed`)."""

    node: str
    url: str
    body: bytes


Piece = str | Act | HttpRequest


class FlowMachine:
    """A flow being run for one call: turns in, pieces out (prompts, then at most one `Act`
    or `HttpRequest`, last). No I/O and no asyncio: the `FlowDialogue` does the requests."""

    def __init__(self, flow: Flow, call: CallInfo | None = None) -> None:
        self.flow = flow
        self.call = call or CallInfo()
        self.variables: dict[str, str] = self._initial_variables()
        self.node: Node | None = None  # where the flow waits; None before the start
        self.retries = 0  # failed answers at this node
        self.digits = ""  # keys collected so far at a collect node
        self.pending: Node | None = None  # the http node whose answer the flow waits for
        self.ending: Act | None = None  # the flow is over: the call is transferred or hung up
        self.input = ""  # the caller's last speech or keys (an http body's `input`)
        # The terminator to ignore next: a caller may end an entry that was already full.
        self.swallow = ""
        self._hops = 0

    @property
    def over(self) -> bool:
        return self.ending is not None

    def start(self) -> list[Piece]:
        """(Re)start the flow at its start node: the greeting."""
        self.node = self.pending = self.ending = None
        self.variables = self._initial_variables()
        self.input = ""
        self.swallow = ""
        self._hops = 0
        return self._go(self.flow.start, [])

    def handle(self, turn: Turn) -> list[Piece]:
        """The reply to one turn of the caller."""
        started = self.node is not None or self.ending is not None or self.pending is not None
        if turn.kind == TurnKind.START or not started:
            return self.start()
        self._hops = 0
        if self.ending is not None:
            # The caller cut the last prompt before its Act was reached: act again.
            return [self.ending]
        if self.pending is not None:
            # Cut while the request was under way: make it again.
            return [self._request(self.pending)]
        if turn.kind != TurnKind.DIGITS:
            self.swallow = ""
        if turn.kind == TurnKind.SPEECH:
            return self._speech(turn.text.strip())
        if turn.kind == TurnKind.DIGITS:
            return self._keys("".join(key for key in turn.text if key in KEYS))
        if turn.kind == TurnKind.NO_INPUT:
            return self._silence()
        return []

    def answered(self, data: object, source: str = "the answer") -> list[Piece]:
        """The http node's answer: a JSON value (a mapping, or {} for an empty body).
        `source` names it in the log line of an answer that cannot be used."""
        node = self.pending
        if node is None:
            return []
        if not isinstance(data, dict):
            return self.failed(f"{source}: the answer is not a JSON object")
        variables = data.get("variables", {})
        say = data.get("say", "")
        target = data.get("next") or node.next
        if not isinstance(variables, dict) or not all(
            isinstance(value, str | int | float | bool | None) for value in variables.values()
        ):
            return self.failed(f"{source}: `variables` must map names to text or numbers")
        if not isinstance(say, str):
            return self.failed(f"{source}: `say` must be text")
        if not isinstance(target, str) or target not in self.flow.nodes:
            return self.failed(f"{source}: `next` {str(target)[:40]!r} is not a node of the flow")
        self.pending = None
        self.variables.update({str(name): _text_of(value) for name, value in variables.items()})
        out: list[Piece] = [say] if say.strip() else []
        return self._go(target, out)

    def failed(self, reason: str) -> list[Piece]:
        """The http node's request failed (`reason`, for the log): its on_error node, or an
        apology and the flow's fallback."""
        node = self.pending
        if node is None:
            return []
        log.warning("[%s] flow node %r: http failed: %s", self.call.call_sid, node.name, reason)
        self.pending = None
        if node.on_error:
            return self._go(node.on_error, [])
        out: list[Piece] = []
        self._say(self.flow.apology, out)
        return self._give_up(out)

    def expected(self) -> list[str]:
        """What the current node listens for: its choices' phrases and spoken keys, or the
        digit words of a collect node; [] otherwise."""
        node = self.node
        if node is None or self.pending is not None or self.ending is not None:
            return []
        if node.collect is not None:
            return [*DIGIT_WORDS, "oh"]
        phrases = [phrase for choice in node.choices for phrase in choice.phrases]
        keys = [DIGIT_WORDS[int(key)] for choice in node.choices for key in choice.keys if key.isdigit()]
        return list(dict.fromkeys(phrases + keys))

    # -- Inside ------------------------------------------------------------------------------

    def _initial_variables(self) -> dict[str, str]:
        # The call's own details last: a stream parameter cannot pass for the caller's number.
        details = {"caller": self.call.caller, "called": self.call.called, "call_sid": self.call.call_sid}
        return {**self.flow.variables, **self.call.parameters, **details}

    def _say(self, text: str, out: list[Piece]) -> None:
        spoken = render(text, self.variables).strip()
        if spoken:
            out.append(spoken)

    def _go(self, name: str, out: list[Piece]) -> list[Piece]:
        """Enter node `name` and the nodes it leads to, until one waits or ends the flow."""
        while True:
            self._hops += 1
            if self._hops > MAX_HOPS:
                log.error(
                    "flow %s: over %d nodes in one turn (at %r): a loop", self.flow.file, MAX_HOPS, name
                )
                self._say(self.flow.apology, out)
                return self._end(Act("hangup"), out)
            node = self.flow.nodes[name]
            self.node, self.retries, self.digits = node, 0, ""
            self._say(node.say, out)
            if node.transfer:
                return self._end(Act(f"transfer:{node.transfer}"), out)
            if node.hangup:
                return self._end(Act("hangup"), out)
            if node.http is not None:
                self.pending = node
                out.append(self._request(node))
                return out
            if node.waits:
                return out
            name = node.next

    def _end(self, act: Act, out: list[Piece]) -> list[Piece]:
        self.ending = act
        out.append(act)
        return out

    def _request(self, node: Node) -> HttpRequest:
        assert node.http is not None
        call = {
            "call_sid": self.call.call_sid,
            "caller": self.call.caller,
            "called": self.call.called,
            "parameters": dict(self.call.parameters),
        }
        body = {"call": call, "variables": self.variables, "node": node.name, "input": self.input}
        return HttpRequest(node.name, node.http.url, json.dumps(body, separators=(",", ":")).encode())

    def _give_up(self, out: list[Piece]) -> list[Piece]:
        if self.flow.fallback:
            return self._go(self.flow.fallback, out)
        self._say(self.flow.goodbye, out)
        return self._end(Act("hangup"), out)

    def _retry(self, text: str, out: list[Piece]) -> list[Piece]:
        """A wrong answer or none: re-prompt with `text`, or past the retries, fall back."""
        node = self.node
        assert node is not None
        self.retries += 1
        self.digits = ""
        if self.retries > node.retries:
            if node.fallback:
                return self._go(node.fallback, out)
            return self._give_up(out)
        self._say(text or node.say, out)
        return out

    def _speech(self, text: str) -> list[Piece]:
        self.input = text
        node = self.node
        assert node is not None
        if node.collect is not None:
            digits = spoken_digits(text)
            if node.collect.min_digits <= len(digits) <= node.collect.max_digits:
                return self._collected(digits, [])
            return self._retry(node.no_match, [])
        choice = match_choice(node.choices, text)
        if choice is None:
            return self._retry(node.no_match, [])
        return self._go(choice.next, [])

    def _keys(self, keys: str) -> list[Piece]:
        out: list[Piece] = []
        if keys:
            self.input = keys
        for key in keys:
            node = self.node
            if node is None or self.ending is not None or self.pending is not None:
                break  # the rest was typed ahead of a request or past the end
            if key == self.swallow:
                self.swallow = ""
                continue
            self.swallow = ""
            if node.collect is not None:
                collect = node.collect
                if key == collect.terminator:
                    if len(self.digits) >= collect.min_digits:
                        self._collected(self.digits, out)
                        continue
                    self._retry(node.no_match, out)
                    break
                if key.isdigit():
                    self.digits += key
                    if len(self.digits) >= collect.max_digits:
                        self._collected(self.digits, out)
                        self.swallow = collect.terminator
                continue  # another key (a '*' without meaning here) is ignored
            choice = next((choice for choice in node.choices if key in choice.keys), None)
            if choice is None:
                self._retry(node.no_match, out)
                break  # the keys typed ahead of a re-prompt are dropped
            self._go(choice.next, out)
        return out

    def _silence(self) -> list[Piece]:
        node = self.node
        assert node is not None
        # Silence after some keys ends the entry, as <Gather>'s timeout does.
        if node.collect is not None and self.digits and len(self.digits) >= node.collect.min_digits:
            return self._collected(self.digits, [])
        return self._retry(node.no_input, [])

    def _collected(self, digits: str, out: list[Piece]) -> list[Piece]:
        node = self.node
        assert node is not None and node.collect is not None
        self.variables[node.collect.variable] = digits
        self.input = digits
        return self._go(node.next, out)


# -- The dialogue step -----------------------------------------------------------------------


class _Failed(Exception):
    """An http node's request failed; the message is safe to log."""


class FlowDialogue:
    """The `Dialogue` of a flow: `FlowMachine` plus the HTTP of its `http` nodes."""

    def __init__(self, flow: Flow, settings: Settings, call: CallInfo) -> None:
        self.machine = FlowMachine(flow, call)
        self._settings = settings
        self._call = call
        self._session: aiohttp.ClientSession | None = None
        self._targets: dict[str, Target] = {}
        self.cut: tuple[str, str] | None = None  # (said, heard) of the last reply cut short

    @property
    def over(self) -> bool:
        """The flow has ended: its last reply carried a transfer or hang-up `Act`."""
        return self.machine.over

    @property
    def node(self) -> str:
        """The node the flow is at ("" before the start)."""
        return self.machine.node.name if self.machine.node else ""

    async def start(self) -> None:
        """Nothing to check: the flow was checked when it was loaded."""

    async def respond(self, turn: Turn) -> AsyncIterator[str | Act]:
        pieces = self.machine.handle(turn)
        spoke = False
        while True:
            request: HttpRequest | None = None
            for piece in pieces:
                if isinstance(piece, HttpRequest):
                    request = piece
                elif isinstance(piece, str):
                    # Prompts of several nodes are one reply: keep their sentences apart.
                    yield f" {piece}" if spoke else piece
                    spoke = True
                else:
                    yield piece
            if request is None:
                return
            pieces = await self._fetch(request)

    def heard(self, said: str, heard: str) -> None:
        """Recorded only: a flow keeps no history for the words to be corrected in, and a
        node's prompt is what it is whether heard or not."""
        self.cut = (said, heard)

    def expected(self) -> list[str]:
        return self.machine.expected()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self, request: HttpRequest) -> list[Piece]:
        """Make `request` and give its outcome to the machine; never raises (but cancels)."""
        shown = safe_url(request.url)
        try:
            answer = await self._post(request)
        except _Failed as exc:
            reason = str(exc)
        except TimeoutError:
            reason = f"no answer within {self._settings.hook_timeout_s:g} s"
        except Exception as exc:  # refused, reset, DNS, TLS, a bug: the call goes on regardless
            reason = scrub(f"{type(exc).__name__}: {exc}".rstrip(": "), request.url)
        else:
            try:
                data = json.loads(answer) if answer.strip() else {}
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; deep nesting
                reason = "the answer is not JSON"
            else:
                return self.machine.answered(data, shown)
        return self.machine.failed(f"{shown}: {reason}")

    async def _post(self, request: HttpRequest) -> bytes:
        target = self._targets.get(request.url)
        if target is None:
            target = self._targets[request.url] = target_of(request.url)
        status, answer = await post_signed(self._http(), target, request.body, self._settings.hook_secret)
        if not 200 <= status < 300:
            raise _Failed(f"HTTP {status}")
        if answer is None:
            raise _Failed(f"an answer over {MAX_ANSWER_BYTES} bytes")
        return answer

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            urls = [node.http.url for node in self.machine.flow.nodes.values() if node.http is not None]
            secure = any(url.lower().startswith("https:") for url in urls)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context() if secure else True),
                # The whole request, answer included: the caller is waiting in silence.
                timeout=aiohttp.ClientTimeout(total=self._settings.hook_timeout_s, ceil_threshold=math.inf),
            )
        return self._session
