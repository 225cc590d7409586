"""One scripted phone call: the webhook, then a Twilio Media Stream driven by a scenario.

The caller keeps the line open with silence between utterances, as a real line does.
A step that cannot be done (a timeout, the bridge ending the stream early) fails the call
with a reason naming the step; the call is then hung up and still measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from ivr_bridge.audio import ulaw_decode, wav_bytes
from ivr_bridge.loadgen.call_report import CallReport, Utterance, measure
from ivr_bridge.loadgen.scenario import BargeIn, Dtmf, HangUp, Say, Scenario, Step, Wait, WaitFor, describe
from ivr_bridge.loadgen.webhook import (
    CallDetails,
    RefusedError,
    StreamTarget,
    WebhookError,
    fetch_stream,
    stream_headers,
)
from ivr_bridge.standins.twilio import TwilioCaller

# `bot_done` also needs this much quiet: a reply streamed at real time can run the
# handset's queue dry for a moment between chunks without having finished.
BOT_DONE_QUIET_S = 0.3

_MISSING = {
    "bot_audio": "no bot audio",
    "bot_done": "the bot's reply did not finish playing",
    "mark": "no mark",
    "clear": "no clear",
}


class ScriptedCall:
    """Runs `scenario` on one stream; :meth:`run` returns the report."""

    def __init__(
        self, target: StreamTarget, scenario: Scenario, details: CallDetails, auth_token: str | None
    ) -> None:
        self.scenario = scenario
        self.details = details
        self.caller = TwilioCaller(
            target.url,
            call_sid=details.call_sid,
            account_sid=details.account_sid,
            custom_parameters=target.parameters,
            headers=stream_headers(target, auth_token),
            continuous=True,
        )
        self.utterances: list[Utterance] = []
        self._media_at_utterance_end = 0  # bot media counted when the caller last stopped talking
        self._clears_at_utterance_start = 0

    async def run(self) -> CallReport:
        started = time.monotonic()
        errors: list[str] = []
        reason: str | None
        try:
            await self.caller.connect()
        except Exception as exc:  # refused, bad handshake, timeout...: the call never began
            reason = f"cannot connect to the stream {self.caller.url}: {_describe_exception(exc)}"
            connected = False
        else:
            connected = True
            try:
                reason = await self._run_steps()
            except Exception as exc:  # a failed call is reported, never raised into the load test
                reason = f"error: {_describe_exception(exc)}"
                errors.append(reason)
            finally:
                try:
                    await self.caller.hang_up()  # a no-op once hung up or closed
                except Exception as exc:
                    errors.append(f"hang-up failed: {_describe_exception(exc)}")
        return measure(
            self.caller if connected else None,
            call_sid=self.details.call_sid,
            scenario=self.scenario.name,
            reason=reason,
            started_at=started,
            ended_at=time.monotonic(),
            utterances=self.utterances,
            errors=errors,
        )

    async def _run_steps(self) -> str | None:
        for index, step in enumerate(self.scenario.steps, 1):
            problem = await self._step(index, step)
            ended_by_bridge = self.caller.closed.is_set() and not self.caller.hung_up
            if problem is None and ended_by_bridge and not isinstance(step, HangUp):
                problem = f"the bridge closed the stream (code {self.caller.close_code})"
            if problem is not None:
                return f"step {index} ({describe(step)}): {problem}"
        return None

    async def _step(self, index: int, step: Step) -> str | None:
        caller = self.caller
        match step:
            case Say(clip):
                await self._speak(index, "say", clip.path.name, clip.payloads)
            case Wait(seconds):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(caller.closed.wait(), seconds)
            case WaitFor(event, timeout):
                return await self._wait_for(event, timeout)
            case BargeIn(clip, timeout):
                if not caller.playing and not await caller.wait_until(lambda: caller.playing, timeout):
                    return None if caller.closed.is_set() else f"the bot was not talking within {timeout:g} s"
                await self._speak(index, "barge_in", clip.path.name, clip.payloads)
            case Dtmf(digit):
                await caller.dtmf(digit)
            case HangUp():
                await caller.hang_up()
        return None

    async def _speak(self, index: int, kind: str, name: str, payloads: tuple[str, ...]) -> None:
        self._clears_at_utterance_start = self.caller.clears
        chunks = await self.caller.say_frames(payloads)
        self._media_at_utterance_end = self.caller.media_messages
        self.utterances.append(Utterance(index, kind, name, chunks))

    async def _wait_for(self, event: str, timeout: float) -> str | None:
        caller = self.caller
        if event == "bot_done":
            done = await self._wait_bot_done(timeout)
        else:
            if event == "bot_audio":
                base = caller.media_messages
                done = await caller.wait_until(lambda: caller.media_messages > base, timeout)
            elif event == "mark":
                base = len(caller.marks_received)
                done = await caller.wait_until(lambda: len(caller.marks_received) > base, timeout)
            else:
                base = self._clears_at_utterance_start
                done = await caller.wait_until(lambda: caller.clears > base, timeout)
        if done or caller.closed.is_set():
            return None  # a close is reported by the caller of this
        return f"{_MISSING[event]} within {timeout:g} s"

    async def _wait_bot_done(self, timeout: float) -> bool:
        caller = self.caller
        timeline = caller.timeline
        base = self._media_at_utterance_end
        deadline = time.monotonic() + timeout

        def finished() -> bool:
            # Bot audio since the caller last spoke, all played, and the last mark after it.
            return (
                caller.media_messages > base
                and caller.idle
                and (not timeline.mark_at or timeline.mark_after_media[-1] == len(timeline.media_at))
            )

        def more_audio_than(heard: int) -> Callable[[], bool]:
            return lambda: caller.media_messages != heard

        while await caller.wait_until(finished, deadline - time.monotonic()):
            if not await caller.wait_until(more_audio_than(caller.media_messages), BOT_DONE_QUIET_S):
                return not caller.closed.is_set()
            if time.monotonic() >= deadline:
                break  # still talking when the time ran out
        return False


def heard_wav(caller: TwilioCaller) -> bytes:
    """The bot audio the caller heard, as an 8 kHz mono 16-bit WAV file."""
    return wav_bytes(ulaw_decode(bytes(caller.received)), 8000)


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def place_call(
    webhook_url: str,
    scenario: Scenario,
    details: CallDetails | None = None,
    auth_token: str | None = None,
    target: StreamTarget | None = None,
) -> tuple[CallReport, TwilioCaller | None]:
    """Fetch the TwiML (unless `target` is given) and run the scenario on its stream.

    A webhook failure becomes a failed report; the caller is None then.
    """
    details = details or CallDetails()
    started = time.monotonic()
    if target is None:
        try:
            target = await fetch_stream(webhook_url, details, auth_token)
        except WebhookError as exc:
            # A refusal is named as such: at capacity is not a broken webhook.
            reason = str(exc) if isinstance(exc, RefusedError) else f"webhook: {exc}"
            report = measure(
                None,
                call_sid=details.call_sid,
                scenario=scenario.name,
                reason=reason,
                started_at=started,
                ended_at=time.monotonic(),
                utterances=[],
                errors=[],
            )
            return report, None
    call = ScriptedCall(target, scenario, details, auth_token)
    return await call.run(), call.caller
