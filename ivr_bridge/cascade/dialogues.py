"""The dialogue step a cascade call uses (`IVR_DIALOGUE`), and the flow file checked once."""

from __future__ import annotations

from functools import cache

from ivr_bridge.cascade.engines import Dialogue
from ivr_bridge.cascade.flow import Flow, load_flow
from ivr_bridge.providers.base import CallInfo
from ivr_bridge.settings import Settings


@cache
def flow_of(path: str) -> Flow:
    """The flow at `path` ("" for the demo), read and checked once per process (FlowError)."""
    return load_flow(path or None)


def new_dialogue(settings: Settings, call: CallInfo) -> Dialogue:
    kind = settings.dialogue.dialogue
    if kind == "hook":
        from ivr_bridge.cascade.hook_dialogue import HookDialogue

        return HookDialogue(settings, call)
    if kind == "llm":
        from ivr_bridge.cascade.llm import LlmDialogue

        return LlmDialogue(settings, call)
    from ivr_bridge.cascade.flow import FlowDialogue

    return FlowDialogue(flow_of(settings.dialogue.flow), settings, call)
