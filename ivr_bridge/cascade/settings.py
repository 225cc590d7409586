"""Settings of the cascade's dialogue step and turn-taking, shared by every cascade engine
(`local`, `voxnexus`): read with the other settings, checked when a cascade is in use."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ivr_bridge.providers.base import setting

DIALOGUES = ("flow", "hook", "llm")


def _number(env: str, raw: str, low: float, high: float) -> str | None:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    return None if low <= value <= high else f"{env} must be a number from {low:g} to {high:g}, got {raw!r}"


@dataclass(frozen=True)
class DialogueSettings:
    dialogue: str = setting("IVR_DIALOGUE", "flow")
    flow: str = setting("IVR_FLOW")  # "": the demo flow shipped with the package
    dialogue_url: str = setting("IVR_DIALOGUE_URL")
    llm_url: str = setting("IVR_LLM_URL")
    llm_model: str = setting("IVR_LLM_MODEL")
    llm_api_key: str = setting("IVR_LLM_API_KEY", secret=True)
    llm_instructions: str = setting("IVR_LLM_INSTRUCTIONS", kind="text_or_file")
    end_silence_ms: str = setting("IVR_END_SILENCE_MS", "600")
    barge_in_ms: str = setting("IVR_BARGE_IN_MS", "200")
    no_input_s: str = setting("IVR_NO_INPUT_S", "6")

    @property
    def end_silence(self) -> float:
        """Silence after the caller's speech that ends their turn, in seconds."""
        return float(self.end_silence_ms) / 1000

    @property
    def barge_in(self) -> float:
        """Speech over the bot this long (seconds) is a barge-in; shorter is a cough."""
        return float(self.barge_in_ms) / 1000

    @property
    def no_input(self) -> float:
        return float(self.no_input_s)

    def check(self) -> str | None:
        """Why these settings cannot work (for a cascade engine), or None."""
        if self.dialogue not in DIALOGUES:
            return f"IVR_DIALOGUE must be one of {', '.join(DIALOGUES)}, got {self.dialogue!r}"
        for env, url in (("IVR_DIALOGUE_URL", self.dialogue_url), ("IVR_LLM_URL", self.llm_url)):
            if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
                return f"{env} must be an http(s) URL"
        if self.dialogue == "hook" and not self.dialogue_url:
            return "IVR_DIALOGUE_URL is required when IVR_DIALOGUE=hook"
        if self.dialogue == "llm" and not (self.llm_url and self.llm_model):
            return "IVR_LLM_URL and IVR_LLM_MODEL are required when IVR_DIALOGUE=llm"
        problem = (
            _number("IVR_END_SILENCE_MS", self.end_silence_ms, 100, 5000)
            or _number("IVR_BARGE_IN_MS", self.barge_in_ms, 40, 2000)
            or _number("IVR_NO_INPUT_S", self.no_input_s, 1, 120)
        )
        if problem is None and self.dialogue == "flow":
            from ivr_bridge.cascade.dialogues import flow_of
            from ivr_bridge.cascade.flow import FlowError

            try:
                flow_of(self.flow)
            except FlowError as exc:
                return f"IVR_FLOW: {exc}"
        return problem
