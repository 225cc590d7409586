"""One phone call: supervises its Twilio stream and its voice session.

Three tasks per call. `_from_twilio` reads caller frames: media goes through the `Uplink`
to the voice session, mark echoes to the `Downlink`'s playback clock, keys out as events.
`_from_voice_api` lets the `SessionKeeper` keep a session up, and relays its events: speech
through the `Downlink` to Twilio, an interruption into `clear` at once. `_watchdog` ends an
idle or stalled stream and renews the session before its cap. When any of them ends, the
others are cancelled and awaited.

What happens on the call goes out as `CallEvent`s through the `CallReport`, whose
subscriber only queues them: hooks and the call record are written off the audio path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ivr_bridge.events import CallEvent
from ivr_bridge.media_stream import (
    MESSAGE_TOO_BIG,
    DtmfReceived,
    MarkEchoed,
    MediaReceived,
    MediaStream,
    MediaStreamError,
    StreamStarted,
    StreamStopped,
)
from ivr_bridge.metrics import BridgeMetrics
from ivr_bridge.playback import Playback
from ivr_bridge.providers import new_session, upstream_chunk_ms
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    AgentAction,
    AssistantAudio,
    AssistantText,
    CallInfo,
    Closed,
    Emotions,
    Interruption,
    ProviderError,
    Ready,
    Skipped,
    TurnEvent,
    TurnTiming,
    UserTranscript,
    VoiceEvent,
    VoiceSession,
)
from ivr_bridge.settings import Settings
from ivr_bridge.transcript import Transcript, TranscriptLine

from .downlink import Downlink
from .keeper import SessionKeeper
from .report import CallReport, CallStats
from .state import CallState, Handoff, Lifecycle, Outcome
from .uplink import Uplink

POLICY_VIOLATION = 1008  # WebSocket close code for a refused stream


class TwilioSocket(Protocol):
    """The Twilio side of a call's WebSocket, as the orchestrator needs it."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the socket has closed."""

    async def send(self, text: str) -> None:
        """Send a text frame; raises ConnectionError if the socket has gone."""

    async def close(self, code: int = NORMAL_CLOSE) -> None: ...


class Call:
    def __init__(
        self,
        settings: Settings,
        twilio: TwilioSocket,
        session_factory: Callable[[Settings, CallInfo], VoiceSession] = new_session,
        metrics: BridgeMetrics | None = None,
        admit: Callable[[StreamStarted], str | Awaitable[str | None] | None] | None = None,
        on_event: Callable[[CallEvent], None] | None = None,
        on_over: Callable[[Call], None] | None = None,
        stream: MediaStream | None = None,
    ) -> None:
        """`admit` checks a stream's `start` (e.g. its per-call token) and returns why it
        is refused, or None to let it in. `on_event` gets the call's events; it must only
        queue them (it runs on the audio path). `on_over` is told, once, as soon as the
        conversation is over: before the sockets are closed and the records written, so
        the call's capacity slot is free for the next caller at once. `stream` is the
        Twilio protocol's state (a test may pass one without the flood guard)."""
        self.settings = settings
        self.twilio = twilio
        self.stream = stream or MediaStream()
        self.report = CallReport(metrics, on_event)
        self.lifecycle = Lifecycle(self.report.log)
        self.words = Transcript(self.report.elapsed)
        self.uplink = Uplink(upstream_chunk_ms(settings), self.report.stats)
        self.downlink = Downlink(self.stream, self.words, self.report.stats)
        self.keeper = SessionKeeper(settings, session_factory, self.lifecycle, self.report, self.uplink)
        self.stream_sid = ""
        self.account_sid = ""
        self.caller = ""  # the caller's number (Twilio's From)
        self.called = ""  # the number called (To)
        self.custom_parameters: dict[str, str] = {}
        # The call sid of a browser softphone's call (its stream is the whole call: control
        # acts on the stream, there is no phone call to redirect); "" for Twilio's.
        self.softphone = ""
        self._admit = admit
        self._on_over = on_over
        # Set while nothing the bot said is still playing: a transfer or hang-up waits for it.
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._twilio_gone = False  # a send found the Twilio socket closed
        self._dtmf_sends: set[asyncio.Future[None]] = set()
        self._last_frame_at = 0.0
        self._sending_since: float | None = None  # when a send to Twilio still waiting began
        self._reader_waiting = False  # `_read_twilio` waits for a frame, with none in hand
        self._loop_time: Callable[[], float] = time.monotonic  # the call's loop's, once it runs

    # -- what others read ----------------------------------------------------------------

    @property
    def call_sid(self) -> str:
        return self.report.call_sid

    @property
    def log(self) -> logging.LoggerAdapter:
        return self.report.log

    @property
    def stats(self) -> CallStats:
        return self.report.stats

    @property
    def playback(self) -> Playback:
        return self.downlink.playback

    @property
    def transcript(self) -> list[TranscriptLine]:
        return self.words.lines

    @property
    def started_at(self) -> float:
        return self.report.started_at

    @property
    def state(self) -> CallState:
        return self.lifecycle.state

    @property
    def outcome(self) -> Outcome:
        return self.lifecycle.outcome

    @outcome.setter
    def outcome(self, outcome: Outcome) -> None:
        self.lifecycle.end(outcome)

    @property
    def handoff(self) -> Handoff | None:
        return self.lifecycle.handoff

    @handoff.setter
    def handoff(self, handoff: Handoff | None) -> None:
        self.lifecycle.handoff = handoff

    @property
    def provider(self) -> str:
        return self.keeper.session.name if self.keeper.session is not None else ""

    @property
    def line(self) -> str:
        """Where the caller is: "phone" (through Twilio) or "softphone" (a browser)."""
        return "softphone" if self.softphone else "phone"

    def snapshot(self, *, full: bool = True) -> dict[str, Any]:
        """The call's live state, for the control API; `full` adds its transcript, emotions
        and keys."""
        return self.report.snapshot(self, full=full)

    # -- lifecycle -----------------------------------------------------------------------

    def over(self) -> None:
        """The conversation is over (or never began): tell `on_over`, once."""
        on_over, self._on_over = self._on_over, None
        if on_over is not None:
            on_over(self)

    async def end(self, outcome: Outcome, code: int) -> None:
        """End the call from outside (e.g. a shutdown): close the Twilio socket; the call's
        own tasks then wind down and close the voice session."""
        self.lifecycle.end(outcome)
        await self.twilio.close(code)

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                started = await self._wait_for_start()
        except TimeoutError:
            self.lifecycle.end(Outcome.NO_START)
            self.log.debug("no start within %g s; ending the stream", self.settings.start_timeout_s)
            started = False
        if not started:
            self.lifecycle.end_unless_ended(Outcome.CLOSED_BEFORE_START)
            self.lifecycle.move(CallState.ENDING)
            await self.twilio.close(POLICY_VIOLATION if self.outcome == Outcome.NO_START else NORMAL_CLOSE)
            return
        info = CallInfo(self.call_sid, self.caller, self.called, dict(self.custom_parameters))
        session = self.keeper.open(info)
        self.log.info(
            "call started, provider %s, parameters %s", session.name, sorted(self.custom_parameters)
        )
        self.report.emit(
            "call.started",
            {
                "stream_sid": self.stream_sid,
                "account_sid": self.account_sid,
                "from": self.caller,
                "to": self.called,
                "custom_parameters": self.custom_parameters,
                "provider": session.name,
                "instance": self.settings.instance_id,
                "line": self.line,
            },
        )
        from_twilio = asyncio.create_task(self._from_twilio(), name="from-twilio")
        tasks = {
            from_twilio,
            asyncio.create_task(self.keeper.keep(self._relay), name="from-voice-api"),
            asyncio.create_task(self._watchdog(), name="call-watchdog"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self._twilio_gone and from_twilio not in done:
                # A send found the socket closed; the reader still holds the frames that say
                # how the call ended (a `stop`, or none), and it ends at once on its own.
                done |= (await asyncio.wait({from_twilio}, timeout=2))[0]
                if from_twilio not in done:
                    self.lifecycle.end(Outcome.CALLER_HUNG_UP)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.lifecycle.end(Outcome.ERROR)
                    self.log.error("call failed", exc_info=task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.lifecycle.move(CallState.ENDING)
            self.over()  # every counter is final: nothing below moves one
            await self.keeper.close()
            await self.twilio.close(NORMAL_CLOSE)
            self._quiet.set()  # nothing more will play: a waiting transfer goes ahead
            for line in self.words.finish():
                self.report.line(line)
            self.report.log_summary(self)
            self.report.emit("call.ended", self.report.ending(self))

    async def _wait_for_start(self) -> bool:
        while True:
            frame = await self.twilio.receive()
            if frame is None:
                return False
            try:
                event = self.stream.receive(frame)
            except MediaStreamError as exc:
                if exc.kind == "flood":
                    self.report.bad_frame(exc)
                    self.lifecycle.end(Outcome.FLOODED)
                    await self.twilio.close(POLICY_VIOLATION)
                    return False
                if exc.fatal:
                    self.lifecycle.end(Outcome.UNUSABLE_START)
                    self.log.error("cannot carry this stream: %s; ending it", exc)
                    return False
                self.report.bad_frame(exc)
                continue
            if isinstance(event, StreamStarted):
                self.report.known_as(event.call_sid)
                refusal = self._admit(event) if self._admit else None
                if inspect.isawaitable(refusal):  # e.g. checked across instances (fabric.py)
                    refusal = await refusal
                if refusal is not None:
                    self.lifecycle.end(Outcome.REFUSED)
                    self.log.warning("stream refused: %s", refusal)
                    await self.twilio.close(POLICY_VIOLATION)
                    return False
                self.stream_sid = event.stream_sid
                self.account_sid = event.account_sid
                # The webhook's call details arrive as parameters (app.twiml_for_call).
                params = dict(event.custom_parameters)
                params.pop("CallSid", None)
                self.caller = params.pop("From", "")
                self.called = params.pop("To", "")
                self.custom_parameters = params
                return True
            # Anything else before `start` was raised as a MediaStreamError by the stream.

    # -- caller -> voice API -------------------------------------------------------------

    async def _from_twilio(self) -> None:
        self._loop_time = asyncio.get_running_loop().time  # the clock `_last_frame_at` is read on
        set_sink = getattr(self.twilio, "set_sink", None)
        if set_sink is not None:
            set_sink(self._take_now)
        try:
            await self._read_twilio()
        finally:
            self._reader_waiting = False
            if set_sink is not None:
                set_sink(None)

    def _take_now(self, frame: str) -> bool:
        """A caller frame straight from the socket's read callback: media goes on to the
        voice session at once, without a task switch; False leaves the frame to
        `_read_twilio`. Taken only while the reader waits with no frame in hand, so frames
        keep their order, and only if the session can send without waiting."""
        if not self._reader_waiting:
            return False
        session = self.keeper.session
        audio_sender = getattr(session, "audio_sender", None)
        send = audio_sender() if audio_sender is not None else None
        if send is None:
            return False
        event = self.stream.receive_media(frame)
        if event is None:
            return False
        self._last_frame_at = self._loop_time()
        self.report.stats.frames_in += 1
        for chunk in self.uplink.feed(event.payload):
            send(chunk)
        return True

    async def _read_twilio(self) -> None:
        loop = asyncio.get_running_loop()
        stats, feed = self.report.stats, self.uplink.feed  # every 20 ms: no lookups through the call
        while True:
            self._reader_waiting = True
            frame = await self.twilio.receive()
            self._reader_waiting = False
            self._last_frame_at = loop.time()
            if frame is None:
                self.lifecycle.stream_over(Outcome.CALLER_HUNG_UP)
                if getattr(self.twilio, "close_code", None) == MESSAGE_TOO_BIG:
                    self.report.bad_frame(
                        MediaStreamError("frame over the size limit", kind="too_large", fatal=True)
                    )
                return
            try:
                event = self.stream.receive(frame)
            except MediaStreamError as exc:
                self.report.bad_frame(exc)
                # Flood guard (MediaStream.receive): input far faster than real time is no
                # phone line; refuse the rest of the stream before it starves other calls.
                if exc.fatal:
                    self.lifecycle.end(Outcome.FLOODED)
                    await self.twilio.close(POLICY_VIOLATION)
                    return
                continue
            if isinstance(event, MediaReceived):
                stats.frames_in += 1
                for chunk in feed(event.payload):
                    await self.keeper.session.send_audio(chunk)  # type: ignore[union-attr]
            elif isinstance(event, MarkEchoed):
                mark = self.downlink.mark_echoed(event.name)
                if mark.response is None:
                    self.log.debug("echo of a mark this call never sent: %.40r", event.name)
                self._report_lines()
                self._update_quiet()
            elif isinstance(event, DtmfReceived):
                self._dtmf(event.digit)
            elif isinstance(event, StreamStopped):
                # A `stop` after a transfer ends only the stream: the call goes on elsewhere.
                self.lifecycle.stream_over(Outcome.STREAM_STOPPED)
                return

    def _dtmf(self, digit: str) -> None:
        self.log.info("caller pressed %s", digit)
        self.words.dtmf(digit)
        # A cascade's dialogue takes keys as input (a flow's menu); realtime APIs have no
        # `send_dtmf`.
        send_dtmf = getattr(self.keeper.session, "send_dtmf", None)
        if send_dtmf is not None:
            self._dtmf_sends.add(task := asyncio.ensure_future(send_dtmf(digit)))
            task.add_done_callback(self._dtmf_sends.discard)
        # A mapped key's action is applied by whoever handles the event (the app's control).
        self.report.emit("dtmf", {"digit": digit, "action": self.settings.dtmf_actions.get(digit, "")})

    # -- voice API -> caller -------------------------------------------------------------

    async def _relay(self, session: VoiceSession, replacing: bool) -> Closed | None:
        """Relay one connected session's events; how it closed, or None if the call is over."""
        loop = asyncio.get_running_loop()
        try:
            if replacing:
                await self._send_all(self.downlink.new_session(loop.time()))
            while True:
                try:
                    async with asyncio.timeout_at(self.downlink.tail_deadline):
                        event = await session.receive()
                except TimeoutError:
                    await self._finish_reply()
                    continue
                if isinstance(event, Closed):
                    await self._finish_reply()
                    return event
                await self._handle(event, loop.time())
        except ConnectionError:
            if self.outcome != Outcome.TWILIO_STALLED:
                self._twilio_gone = True  # the Twilio reader records how the call ended
            return None

    async def _handle(self, event: VoiceEvent, now: float) -> None:
        report = self.report
        if isinstance(event, AssistantAudio):
            if self.downlink.dropped(event.response):
                return  # the rest of a reply the caller talked over
            await self._send_all(self.downlink.speak(event.response, event.pcm, now))
            if self.downlink.reply is not None and self.downlink.reply.sent_bytes:
                report.reply_heard(now)
            self._update_quiet()
        elif isinstance(event, Interruption):
            if self.downlink.in_reply(now):
                await self._barge_in(event.reason, now)
            else:
                # Speech while the bot is silent is a turn, not a barge-in (OpenAI reports
                # every speech start): nothing to clear, but the reply in hand is over.
                self.downlink.caller_took_turn()
        elif isinstance(event, UserTranscript):
            if event.final:
                # Words said while the bot is heard, and not taken as a barge-in (a
                # backchannel), leave its reply playing: they end no turn.
                if event.ends_turn and not self.downlink.audible:
                    await self._finish_reply()
                    report.turn_ended(now)
                self.stats.turns += 1
                report.line(self.words.user(event.text))
        elif isinstance(event, AssistantText):
            for line in self.words.reply_text(event.response, event.text, event.final):
                report.line(line)
        elif isinstance(event, TurnEvent):
            await self._finish_reply()
            if event.kind == "end":
                report.turn_ended(now)
        elif isinstance(event, Emotions):
            top = event.top[:3]
            self.stats.emotions.append((report.elapsed(), top))
            report.emit("emotion", {"top": [{"name": name, "score": score} for name, score in top]})
        elif isinstance(event, ProviderError):
            self.stats.provider_errors += 1
            self.log.warning("voice API error %s: %s", event.code, event.message)
            report.emit("upstream.error", {"code": event.code, "message": event.message, "retrying": False})
        elif isinstance(event, Skipped):
            self.stats.skipped_upstream += 1
            report.bad_input(
                "voice_api",
                event.kind,
                self.stats.skipped_upstream,
                "skipped a voice API message",
                event.reason,
            )
        elif isinstance(event, Ready):
            self.log.debug("voice API %s", event.detail)
        elif isinstance(event, TurnTiming):
            report.turn_timed(
                {
                    "recognised_ms": event.recognised_ms,
                    "answered_ms": event.answered_ms,
                    "spoken_ms": event.spoken_ms,
                    "total_ms": event.total_ms,
                }
            )
        elif isinstance(event, AgentAction):
            # Carried out by whoever handles the event (the app's call control), after the
            # bot's sentence has played, like a mapped key.
            self.log.info("the agent asked: %s", event.action)
            report.emit("agent.action", {"action": event.action})

    async def _barge_in(self, reason: str, now: float) -> None:
        # Clear first: every ms spent before it is stale speech in the caller's ear.
        await self._send(self.stream.clear())
        self.report.cleared(asyncio.get_running_loop().time() - now)
        cut = self.downlink.cut()
        reply = cut.reply
        self.log.info("barge-in (%s): cleared %d ms of unplayed speech", reason, cut.dropped_ms)
        self.report.emit(
            "barge_in",
            {
                "reply": reply.number if reply else None,
                "heard_ms": reply.heard_ms if reply else 0,
                "dropped_ms": cut.dropped_ms,
                "reason": reason,
            },
        )
        self._report_lines()
        self._update_quiet()
        # Tell the API how much of the cut reply the caller heard (OpenAI truncates its
        # context there); APIs with nothing to do with it have no `reply_heard`.
        reply_heard = getattr(self.keeper.session, "reply_heard", None)
        if reply_heard is not None and reply is not None:
            try:
                await reply_heard(cut.reply_number, reply.heard_ms)
            except Exception as exc:  # never fatal: the caller has been cleared already
                self.log.warning("could not report what the caller heard: %s", type(exc).__name__)

    async def _finish_reply(self) -> None:
        await self._send_all(self.downlink.finish(asyncio.get_running_loop().time()))
        self._report_lines()
        self._update_quiet()

    async def _send_all(self, messages: list[str]) -> None:
        for text in messages:
            await self._send(text)

    async def _send(self, text: str) -> None:
        # A Twilio socket that stops reading could hold the bot's audio here without end
        # (and upstream frames behind it): the watchdog ends a call whose send has waited
        # too long. Stamped here rather than a timer armed and cancelled per frame.
        self._sending_since = asyncio.get_running_loop().time()
        try:
            await self.twilio.send(text)
        finally:
            self._sending_since = None  # a send that failed is not one still waiting

    def _report_lines(self) -> None:
        if self.downlink.lines:  # (most mark echoes settle nothing)
            for line in self.downlink.take_lines():
                self.report.line(line)

    def _update_quiet(self) -> None:
        if self.downlink.audible:
            self._quiet.clear()
        else:
            self._quiet.set()

    # -- watchdog ------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Ends an idle or stalled call, and renews the voice session before its cap."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        self._last_frame_at = loop.time()
        period = min(
            1.0,
            settings.idle_timeout_s / 4,
            settings.twilio_send_timeout_s / 2,
            (self.keeper.cap_s or 16.0) / 16,
        )
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if self._sending_since is not None and now - self._sending_since > settings.twilio_send_timeout_s:
                self.lifecycle.end(Outcome.TWILIO_STALLED)
                self.log.error(
                    "Twilio took over %.1f s to accept a frame; ending the call",
                    settings.twilio_send_timeout_s,
                )
                return
            if now - self._last_frame_at > settings.idle_timeout_s:
                self.lifecycle.end(Outcome.IDLE)
                self.log.warning("no media from Twilio for %.0f s; ending the call", settings.idle_timeout_s)
                return
            mark_due = self.playback.oldest_due
            if mark_due is not None and now > mark_due + settings.twilio_send_timeout_s:
                # Sends still "succeed" while kernel buffers absorb megabytes; the marks
                # are the proof of playback, and the oldest is this late.
                self.lifecycle.end(Outcome.TWILIO_STALLED)
                self.log.error(
                    "Twilio has not played the bot's audio %.1f s after it was due; ending the call",
                    now - mark_due,
                )
                return
            if self.keeper.renewal_due(now, quiet=not self.downlink.audible):
                await self.keeper.renew(now)

    # -- call control --------------------------------------------------------------------

    async def played_out(self, timeout: float) -> bool:
        """Wait until the bot's speech sent so far has played (its last mark echoed), so a
        transfer or hang-up does not cut off a goodbye. False if `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._quiet.wait()
        except TimeoutError:
            return False
        return True

    def controlled(self, result: dict[str, Any]) -> None:
        """A transfer or hang-up of this call was carried out (ivr_bridge.control)."""
        self.report.emit("control", result)
