"""Scenario files: what a scripted caller says and waits for, as JSON.

```json
{"name": "one turn",
 "steps": [{"say": "../audio/hello.wav"},
           {"wait_for": "bot_audio", "timeout": 15},
           {"wait_for": "bot_done", "timeout": 30},
           {"hang_up": true}]}
```

Top-level keys: ``steps`` (required), ``name`` (default: the file name), ``description``.
Steps (each an object with exactly one action key; steps are numbered from 1 in errors):

* ``say``: a 16-bit PCM WAV (8-48 kHz, mono or stereo), relative to the scenario file;
  streamed at real time as 8 kHz mu-law, trailing silence trimmed (see ``clips``).
* ``wait``: seconds of (streamed) silence.
* ``wait_for``: ``bot_audio`` (bot media arrives after the step starts), ``bot_done`` (bot
  audio arrived after the caller's last utterance ended, has all played with every mark
  echoed, and no more came for 0.3 s), ``mark`` (a mark arrives after the step starts) or
  ``clear`` (a clear arrives after the caller's last utterance started); ``timeout``
  seconds, default 15. A timeout fails the call.
* ``barge_in``: a WAV said over the bot; if the bot is not playing audio, first waits up to
  ``timeout`` (default 15) seconds for some.
* ``dtmf``: one key, ``0``-``9``, ``*`` or ``#``.
* ``hang_up``: ``true``; only as the last step. A scenario without it hangs up at its end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivr_bridge.loadgen.clips import Clip, ClipError, load_clip
from ivr_bridge.standins.twilio import DTMF_DIGITS

DEFAULT_TIMEOUT = 15.0
MAX_SECONDS = 3600.0
WAIT_EVENTS = ("bot_audio", "bot_done", "mark", "clear")
_OPTIONS = {"wait_for": {"timeout"}, "barge_in": {"timeout"}}
_ACTIONS = ("say", "wait", "wait_for", "barge_in", "dtmf", "hang_up")
_TOP_LEVEL = {"name", "description", "steps"}


class ScenarioError(ValueError):
    """The scenario is unusable; the message names the file and the step."""


@dataclass(frozen=True, slots=True)
class Say:
    clip: Clip


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float


@dataclass(frozen=True, slots=True)
class WaitFor:
    event: str
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class BargeIn:
    clip: Clip
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str


@dataclass(frozen=True, slots=True)
class HangUp:
    pass


Step = Say | Wait | WaitFor | BargeIn | Dtmf | HangUp


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]


def describe(step: Step) -> str:
    """A step as it reads in the file, for reports: ``wait_for bot_done``."""
    match step:
        case Say(clip) | BargeIn(clip):
            return f"{'say' if isinstance(step, Say) else 'barge_in'} {clip.path.name}"
        case Wait(seconds):
            return f"wait {seconds:g}"
        case WaitFor(event):
            return f"wait_for {event}"
        case Dtmf(digit):
            return f"dtmf {digit}"
    return "hang_up"


def one_turn(wav: Path) -> Scenario:
    """Say one file, wait for the whole reply, hang up (``ivr-bridge call --audio``)."""
    try:
        clip = load_clip(wav.resolve())
    except ClipError as exc:
        raise ScenarioError(str(exc)) from None
    steps = (Say(clip), WaitFor("bot_audio", DEFAULT_TIMEOUT), WaitFor("bot_done", 30.0), HangUp())
    return Scenario(wav.name, steps)


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ScenarioError(f"{path}: not valid JSON: {exc.msg} at {where}") from None
    return parse_scenario(data, path.resolve().parent, str(path), default_name=path.stem)


def parse_scenario(data: Any, base: Path, source: str, default_name: str = "scenario") -> Scenario:
    """Validate a decoded scenario; WAV paths resolve against `base`."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: the scenario must be a JSON object with a 'steps' list")
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ScenarioError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL)}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{source}: 'name' must be a non-empty string")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ScenarioError(f"{source}: 'steps' must be a non-empty list")
    parsed = tuple(_parse_step(raw, index, len(steps), base, source) for index, raw in enumerate(steps, 1))
    return Scenario(name, parsed)


def _parse_step(raw: Any, index: int, count: int, base: Path, source: str) -> Step:
    where = f"{source}: step {index}"
    if not isinstance(raw, dict):
        raise ScenarioError(f'{where}: must be an object such as {{"say": "hello.wav"}}, got {raw!r:.60}')
    actions = [key for key in raw if key in _ACTIONS]
    if len(actions) != 1:
        found = f"{len(actions)} ({', '.join(actions)})" if actions else "none"
        raise ScenarioError(f"{where}: needs exactly one action of {', '.join(_ACTIONS)}; found {found}")
    action = actions[0]
    where = f"{where} ({action})"
    unknown = sorted(set(raw) - {action} - _OPTIONS.get(action, set()))
    if unknown:
        allowed = sorted(_OPTIONS.get(action, set())) or "none"
        raise ScenarioError(f"{where}: unknown key(s) {unknown}; allowed besides {action!r}: {allowed}")
    value = raw[action]
    match action:
        case "say":
            return Say(_clip(value, base, where))
        case "wait":
            return Wait(_seconds(value, where, "wait"))
        case "wait_for":
            if value not in WAIT_EVENTS:
                raise ScenarioError(f"{where}: must be one of {', '.join(WAIT_EVENTS)}, got {value!r}")
            return WaitFor(value, _timeout(raw, where))
        case "barge_in":
            return BargeIn(_clip(value, base, where), _timeout(raw, where))
        case "dtmf":
            if not isinstance(value, str) or len(value) != 1 or value not in DTMF_DIGITS:
                raise ScenarioError(f"{where}: must be one key of 0-9, * or #, got {value!r}")
            return Dtmf(value)
    if value is not True:
        raise ScenarioError(f"{where}: must be true, got {value!r}")
    if index != count:
        raise ScenarioError(f"{where}: must be the last step ({count - index} step(s) follow it)")
    return HangUp()


def _clip(value: Any, base: Path, where: str) -> Clip:
    if not isinstance(value, str) or not value:
        raise ScenarioError(f"{where}: must be a WAV file path, got {value!r}")
    try:
        return load_clip((base / value).resolve())
    except ClipError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _seconds(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{where}: {what} must be a number of seconds, got {value!r}")
    if not 0 < value <= MAX_SECONDS:
        limit = f"more than 0 and at most {MAX_SECONDS:g} s"
        raise ScenarioError(f"{where}: {what} must be {limit}, got {value!r}")
    return float(value)


def _timeout(raw: dict[str, Any], where: str) -> float:
    return _seconds(raw.get("timeout", DEFAULT_TIMEOUT), where, "timeout")
