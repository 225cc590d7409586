"""One phone call: joins the Twilio stream, the audio converters and a voice session.

Three tasks per call. `_from_twilio` parses caller frames, converts mu-law 8 kHz to the
format the voice session negotiated at `connect()` (mu-law 8 kHz goes up byte for byte;
PCM16 at the API's rate) and forwards it upstream in `IVR_UPSTREAM_CHUNK_MS` chunks. `_from_voice_api`
turns voice events into Twilio frames (speech into whole 20 ms mu-law frames, each chunk
followed by a mark; an interruption into `clear` at once) and reconnects a dropped voice
session. `_watchdog` ends an idle stream and renews the session before its cap. When any
of them ends, the others are cancelled and awaited.

What happens on the call (it started, words said and heard, keys, barge-ins, its end) goes
out as `CallEvent`s through `on_event`, which only queues them: hooks and the call record
are written off the audio path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ivr_bridge.audio import PCM16_24K, BotAudio, CallerAudio, carried
from ivr_bridge.events import CallEvent, EventType
from ivr_bridge.fallback import fallback_twiml
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
from ivr_bridge.metrics import BAD_INPUT_LOG_LIMIT, BridgeMetrics
from ivr_bridge.playback import Playback, Response
from ivr_bridge.providers import new_session
from ivr_bridge.providers.base import (
    NORMAL_CLOSE,
    RETRYABLE_CLOSE_CODES,
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
    UserTranscript,
    VoiceEvent,
    VoiceSession,
)
from ivr_bridge.settings import Settings
from ivr_bridge.transcript import Transcript, TranscriptLine
from ivr_bridge.twilio_rest import TwilioRest

log = logging.getLogger("ivr_bridge.call")

ULAW_BYTES_PER_MS = 8  # Twilio's 8 kHz mu-law
POLICY_VIOLATION = 1008  # WebSocket close code for a refused stream
CONNECT_FAILED = -1  # pseudo close code: the session never opened (retried, like a drop)
RECONNECT_BASE_S = 0.25
RENEWING = -2  # pseudo close code: closed by us to renew the session
RENEW_MARGIN_S = 60.0  # renew this long before the session cap, at a quiet moment
MAX_EARLY_AUDIO_MS = 5000  # caller audio kept while the voice API connects
# The last few ms of a reply wait in the resampler and frame buffer for more audio. They
# are flushed shortly before Twilio would run out of audio, or after a pause in the reply.
TAIL_MARGIN_S = 0.06
TAIL_IDLE_S = 0.25


class Outcome(StrEnum):
    """How a call ended: a fixed set, so it can label metrics and call records."""

    IN_PROGRESS = "in_progress"
    STREAM_STOPPED = "stream_stopped"  # Twilio sent `stop`: hang-up or redirect
    CALLER_HUNG_UP = "caller_hung_up"  # the Twilio socket closed without `stop`
    VOICE_API_ENDED = "voice_api_ended"  # the voice API closed the session normally
    VOICE_API_FAILED = "voice_api_failed"  # ... with an error close code
    VOICE_API_UNREACHABLE = "voice_api_unreachable"
    CLOSED_BEFORE_START = "closed_before_start"
    UNUSABLE_START = "unusable_start"
    REFUSED = "refused"  # the start failed the admission check (per-call token)
    IDLE = "idle"  # no media from Twilio for IVR_IDLE_TIMEOUT_S
    NO_START = "no_start"  # no valid `start` in IVR_START_TIMEOUT_S (or closed to make room)
    FLOODED = "flooded"  # Twilio-side input far faster than real time: no phone line
    SHUTDOWN = "shutdown"  # still active when the instance's drain timeout ran out
    TWILIO_STALLED = "twilio_stalled"  # the Twilio socket stopped accepting frames
    TRANSFERRED = "transferred"  # handed to another number (control API, hook or key)
    HUNG_UP = "hung_up"  # ended by the control API, a hook or a key
    ERROR = "error"  # a bug: logged with its traceback


class TwilioSocket(Protocol):
    """The Twilio side of a call's WebSocket, as the orchestrator needs it."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the socket has closed."""

    async def send(self, text: str) -> None:
        """Send a text frame; raises ConnectionError if the socket has gone."""

    async def close(self, code: int = NORMAL_CLOSE) -> None: ...


class CallLog(logging.LoggerAdapter):
    """Prefixes the call sid to a line, and carries it as `call_sid` (JSON logs)."""

    def process(self, msg: object, kwargs: Any) -> tuple[str, Any]:  # type: ignore[override]
        call = self.extra["call"]  # type: ignore[index]
        kwargs["extra"] = {"call_sid": call if call != "-" else ""}
        return f"[{call}] {msg}", kwargs


@dataclass(frozen=True, slots=True)
class Handoff:
    """A transfer or hang-up requested for this call: its stream's `stop` is expected."""

    action: str  # "transfer" | "hangup"
    to: str = ""
    source: str = "api"  # "api" | "hook" | "dtmf"


@dataclass(slots=True)
class CallStats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    barge_ins: int = 0
    bad_frames: int = 0
    skipped_upstream: int = 0
    provider_errors: int = 0
    early_audio_dropped_ms: int = 0
    gap_audio_dropped_ms: int = 0  # caller audio dropped while the voice API reconnected
    reconnects: int = 0
    renewals: int = 0
    turns: int = 0  # final user utterances
    emotions: list[tuple[float, list[tuple[str, float]]]] = field(default_factory=list)
    reply_ms: list[float] = field(default_factory=list)  # end of the caller's turn -> bot speech
    clear_ms: list[float] = field(default_factory=list)  # interruption reached us -> `clear` sent


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
    ) -> None:
        """`admit` checks a stream's `start` (e.g. its per-call token) and returns why it
        is refused, or None to let it in. `on_event` gets the call's events; it must only
        queue them (it runs on the audio path). `on_over` is told, once, as soon as the
        conversation is over: before the sockets are closed and the records written, so
        the call's capacity slot is free for the next caller at once."""
        self.settings = settings
        self.twilio = twilio
        self.stream = MediaStream()
        self.playback = Playback()
        self.stats = CallStats()
        self.words = Transcript(self._elapsed)
        self.outcome = Outcome.IN_PROGRESS
        self.upstream_close_code: int | None = None
        self.call_sid = ""
        self.stream_sid = ""
        self.account_sid = ""
        self.caller = ""  # the caller's number (Twilio's From)
        self.called = ""  # the number called (To)
        self.custom_parameters: dict[str, str] = {}
        self.handoff: Handoff | None = None
        self.started_at = time.time()
        self._on_event = on_event
        self._on_over = on_over
        self._event_seq = 0
        # Set while nothing the bot said is still playing: a transfer or hang-up waits for it.
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.log: logging.LoggerAdapter = CallLog(log, {"call": "-"})
        self._session_factory = session_factory
        self.metrics = metrics
        self._admit = admit
        self._session: VoiceSession | None = None
        self._caller_audio = CallerAudio()
        self._bot_audio = BotAudio()
        # Caller audio is kept as mu-law and converted once per upstream chunk: it leaves
        # no sooner either way, and one conversion of 5 frames costs far less than five.
        self._caller_ulaw = bytearray()
        self._chunk_bytes = settings.upstream_chunk_ms * ULAW_BYTES_PER_MS
        self._connected = asyncio.Event()
        self._reconnecting = False  # the voice session dropped and a new one is on its way
        self._renewing = False  # the session is being replaced before the provider's cap
        self._gap = ""  # why the session is being replaced: "drop" or "renewal"
        self._session_started_at = 0.0
        self._last_frame_at = 0.0
        self.fallback = ""  # what was done when the voice API could not serve the call
        self._twilio_gone = False
        self._started_at = time.monotonic()
        # Reply state on the outbound side.
        self._response: Response | None = None
        self._tail_pending = False  # the converter holds the end of the reply: flush it in time
        self._response_number = 0  # the voice session's number for the reply now playing
        self._dropped_through = 0  # replies up to this number were interrupted: drop their audio
        self._playout_end = 0.0  # loop time at which Twilio will have played all we sent
        self._last_audio_at = 0.0
        self._turn_ended_at: float | None = None  # for the reply latency of the next response

    @property
    def transcript(self) -> list[TranscriptLine]:
        return self.words.lines

    def _call_info(self) -> CallInfo:
        return CallInfo(self.call_sid, self.caller, self.called, dict(self.custom_parameters))

    @property
    def provider(self) -> str:
        return self._session.name if self._session is not None else ""

    # -- lifecycle -----------------------------------------------------------------------

    def over(self) -> None:
        """The conversation is over (or never began): tell `on_over`, once."""
        on_over, self._on_over = self._on_over, None
        if on_over is not None:
            on_over(self)

    async def end(self, outcome: Outcome, code: int) -> None:
        """End the call from outside (e.g. a shutdown): close the Twilio socket; the call's
        own tasks then wind down and close the voice session."""
        self.outcome = outcome
        await self.twilio.close(code)

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                started = await self._wait_for_start()
        except TimeoutError:
            self.outcome = Outcome.NO_START
            self.log.debug("no start within %g s; ending the stream", self.settings.start_timeout_s)
            started = False
        if not started:
            if self.outcome == Outcome.IN_PROGRESS:
                self.outcome = Outcome.CLOSED_BEFORE_START
            await self.twilio.close(POLICY_VIOLATION if self.outcome == Outcome.NO_START else NORMAL_CLOSE)
            return
        self._session = self._session_factory(self.settings, self._call_info())
        self.log.info(
            "call started, provider %s, parameters %s", self._session.name, sorted(self.custom_parameters)
        )
        self._emit(
            "call.started",
            {
                "stream_sid": self.stream_sid,
                "account_sid": self.account_sid,
                "from": self.caller,
                "to": self.called,
                "custom_parameters": self.custom_parameters,
                "provider": self._session.name,
                "instance": self.settings.instance_id,
            },
        )
        from_twilio = asyncio.create_task(self._from_twilio(), name="from-twilio")
        tasks = {
            from_twilio,
            asyncio.create_task(self._from_voice_api(), name="from-voice-api"),
            asyncio.create_task(self._watchdog(), name="call-watchdog"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if self._twilio_gone and from_twilio not in done:
                # A send found the socket closed; the reader still holds the frames that say
                # how the call ended (a `stop`, or none), and it ends at once on its own.
                done |= (await asyncio.wait({from_twilio}, timeout=2))[0]
                if from_twilio not in done:
                    self.outcome = Outcome.CALLER_HUNG_UP
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.outcome = Outcome.ERROR
                    self.log.error("call failed", exc_info=task.exception())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.over()  # every counter is final: nothing below moves one
            await self._session.close(NORMAL_CLOSE)
            await self.twilio.close(NORMAL_CLOSE)
            self._quiet.set()  # nothing more will play: a waiting transfer goes ahead
            for line in self.words.finish():
                self._emit_line(line)
            self._log_summary()
            self._emit("call.ended", self._ending())

    async def _wait_for_start(self) -> bool:
        while True:
            frame = await self.twilio.receive()
            if frame is None:
                return False
            try:
                event = self.stream.receive(frame)
            except MediaStreamError as exc:
                if exc.kind == "flood":
                    self._bad_frame(exc)
                    self.outcome = Outcome.FLOODED
                    await self.twilio.close(POLICY_VIOLATION)
                    return False
                if exc.fatal:
                    self.outcome = Outcome.UNUSABLE_START
                    self.log.error("cannot carry this stream: %s; ending it", exc)
                    return False
                self._bad_frame(exc)
                continue
            if isinstance(event, StreamStarted):
                self.call_sid = event.call_sid
                self.log = CallLog(log, {"call": event.call_sid})
                refusal = self._admit(event) if self._admit else None
                if inspect.isawaitable(refusal):  # e.g. checked across instances (fabric.py)
                    refusal = await refusal
                if refusal is not None:
                    self.outcome = Outcome.REFUSED
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
        loop = asyncio.get_running_loop()
        while True:
            frame = await self.twilio.receive()
            self._last_frame_at = loop.time()
            if frame is None:
                self.outcome = self._handoff_outcome() or Outcome.CALLER_HUNG_UP
                if getattr(self.twilio, "close_code", None) == MESSAGE_TOO_BIG:
                    self._bad_frame(
                        MediaStreamError("frame over the size limit", kind="too_large", fatal=True)
                    )
                return
            try:
                event = self.stream.receive(frame)
            except MediaStreamError as exc:
                self._bad_frame(exc)
                # Flood guard (MediaStream.receive): input far faster than real time is no
                # phone line; refuse the rest of the stream before it starves other calls.
                if exc.fatal:
                    self.outcome = Outcome.FLOODED
                    await self.twilio.close(POLICY_VIOLATION)
                    return
                continue
            if isinstance(event, MediaReceived):
                self.stats.frames_in += 1
                self._caller_ulaw += event.payload
                if len(self._caller_ulaw) >= self._chunk_bytes:
                    if self._connected.is_set():
                        pcm = self._caller_audio.process(bytes(self._caller_ulaw))
                        self._caller_ulaw.clear()
                        # Usually one chunk; after a connect or a large frame, several, each
                        # within the voice API's message size limit.
                        # A mu-law byte becomes 1 byte (passed through) to 12 (PCM16 48 kHz).
                        step = int(self._chunk_bytes * self._caller_audio.bytes_per_ulaw_byte)
                        for start in range(0, len(pcm), step):
                            await self._session.send_audio(pcm[start : start + step])  # type: ignore[union-attr]
                    elif self._reconnecting:
                        # Speech from the gap would reach the new session late and out of
                        # context: drop it rather than forward it stale.
                        self.stats.gap_audio_dropped_ms += len(self._caller_ulaw) // ULAW_BYTES_PER_MS
                        self._caller_ulaw.clear()
                    elif len(self._caller_ulaw) > MAX_EARLY_AUDIO_MS * ULAW_BYTES_PER_MS:
                        excess = len(self._caller_ulaw) - MAX_EARLY_AUDIO_MS * ULAW_BYTES_PER_MS
                        del self._caller_ulaw[:excess]
                        self.stats.early_audio_dropped_ms += excess // ULAW_BYTES_PER_MS
            elif isinstance(event, MarkEchoed):
                mark = self.playback.echoed(event.name)
                if mark.response is None:
                    self.log.debug("echo of a mark this call never sent: %.40r", event.name)
                elif mark.response.marks_pending == 0:
                    self._settle(mark.response)
                self._update_quiet()
            elif isinstance(event, DtmfReceived):
                self._dtmf(event.digit)
            elif isinstance(event, StreamStopped):
                # A `stop` after a transfer ends only the stream: the call goes on elsewhere.
                self.outcome = self._handoff_outcome() or Outcome.STREAM_STOPPED
                return

    # -- voice API -> caller -------------------------------------------------------------

    async def _from_voice_api(self) -> None:
        """Keep a voice session up for the whole call, reconnecting within the budget."""
        retry_until: float | None = None
        attempt = 0
        while True:
            session = self._session
            assert session is not None
            ended = await self._serve_session(session)
            if ended is None:  # the call ended (Twilio side) or the voice API ended it normally
                return
            # The provider classifies its own closes (Closed.retryable).
            code = ended.code if isinstance(ended, Closed) else ended
            retryable = ended.retryable if isinstance(ended, Closed) else code in RETRYABLE_CLOSE_CODES
            await session.close(NORMAL_CLOSE)
            now = time.monotonic()
            if code == RENEWING:
                self._renewing = False
                self._connected.clear()
                self._reconnecting, self._gap = True, "renewal"
                self.stats.renewals += 1
                self._session = self._session_factory(self.settings, self._call_info())
                continue
            if not retryable and code != CONNECT_FAILED:
                self.outcome = Outcome.VOICE_API_FAILED
                await self._fall_back()
                return
            if code != CONNECT_FAILED:  # that session was up: a fresh budget for this drop
                retry_until, attempt = None, 0
            retry_until = retry_until or now + self.settings.reconnect_budget_s
            if now >= retry_until:
                self.log.error("voice API not back within %.0f s", self.settings.reconnect_budget_s)
                if self.outcome == Outcome.IN_PROGRESS:
                    self.outcome = (
                        Outcome.VOICE_API_UNREACHABLE if code == CONNECT_FAILED else Outcome.VOICE_API_FAILED
                    )
                await self._fall_back()
                return
            # Exponential backoff with full jitter, never past the budget.
            delay = min(retry_until - now, random.uniform(0, RECONNECT_BASE_S * 2**attempt))
            attempt += 1
            self._connected.clear()
            self._reconnecting, self._gap = True, "drop"
            await asyncio.sleep(delay)
            self._session = self._session_factory(self.settings, self._call_info())

    async def _serve_session(self, session: VoiceSession) -> Closed | int | None:
        """Connect and relay one voice session. Returns how it failed (its `Closed`, or
        CONNECT_FAILED / RENEWING), None when the call is over."""
        connect_started = time.monotonic()
        try:
            send = await session.connect() or PCM16_24K
        except ConnectionError as exc:
            self.log.error("%s", exc)
            if self.metrics:
                self.metrics.upstream_failed(None)
            self._emit("upstream.error", {"code": "connect_failed", "message": str(exc), "retrying": True})
            return CONNECT_FAILED
        if self.metrics:
            self.metrics.upstream_connected(time.monotonic() - connect_started)
        if not carried(send):
            self.outcome = Outcome.VOICE_API_FAILED
            self.log.error(
                "voice API %s takes caller audio as %s, which the bridge cannot convert; ending the call",
                session.name,
                send,
            )
            await self._fall_back()
            return None
        if send != self._caller_audio.format:  # mu-law passes through; PCM16 at its own rate
            self._caller_audio = CallerAudio(send)
        self._session_started_at = asyncio.get_running_loop().time()
        if self._reconnecting:
            if self._gap == "drop":
                self.stats.reconnects += 1
                self.log.info("voice API session restored (reconnect %d)", self.stats.reconnects)
            else:
                self.log.info("voice API session renewed")
            self._caller_ulaw.clear()
            self._caller_audio.reset()
            # A new session numbers its replies from 1 again.
            await self._finish_response()
            self.words.new_session()
            self._response_number = self._dropped_through = 0
            self._response = None
            self._reconnecting = False
        self._connected.set()
        try:
            closed = await self._relay_voice_events(session)
        except ConnectionError:
            if self.outcome != Outcome.TWILIO_STALLED:
                self._twilio_gone = True  # the Twilio reader records how the call ended
            return None
        if closed.normal and self._renewing:
            return RENEWING
        if closed.normal:
            self.outcome = Outcome.VOICE_API_ENDED
            self.log.info("voice API closed the session normally")
            return None
        self.upstream_close_code = closed.code
        if self.metrics:
            self.metrics.upstream_failed(closed.code)
        retry = "; reconnecting" if closed.retryable else ""
        self.log.error("voice API closed the session with code %d %s%s", closed.code, closed.reason, retry)
        self._emit(
            "upstream.error",
            {"code": str(closed.code), "message": closed.reason[:200], "retrying": closed.retryable},
        )
        return closed

    async def _fall_back(self) -> None:
        """The voice API cannot serve this call: hand it to the fallback through Twilio's
        REST API (the stream then stops), so the caller is never left in dead air."""
        rest = TwilioRest(self.settings)
        if not rest.available:
            self.log.error("no TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN for a fallback: ending the call")
            return
        try:
            found = await rest.redirect(self.call_sid, fallback_twiml(self.settings))
        except ConnectionError as exc:
            self.log.error("fallback redirect failed: %s; ending the call", exc)
            return
        self.fallback = "redirected" if found else "call already gone"
        self.log.info("call handed to the fallback (%s)", self.fallback)

    async def _relay_voice_events(self, session: VoiceSession) -> Closed:
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._tail_deadline()
            try:
                async with asyncio.timeout_at(deadline):
                    event = await session.receive()
            except TimeoutError:
                await self._finish_response()
                continue
            if isinstance(event, Closed):
                await self._finish_response()
                return event
            await self._handle(event, loop.time())

    async def _handle(self, event: VoiceEvent, now: float) -> None:
        if isinstance(event, AssistantAudio):
            await self._speak(event, now)
        elif isinstance(event, Interruption):
            if self.playback.speaking or self._tail_pending:
                await self._barge_in(event.reason, now)
            else:
                # Speech while the bot is silent is a turn, not a barge-in (OpenAI reports
                # every speech start): nothing to clear, but the reply in hand is over.
                self._dropped_through = self._response_number
        elif isinstance(event, UserTranscript):
            if event.final:
                await self._finish_response()
                self._turn_ended_at = now
                self.stats.turns += 1
                self._emit_line(self.words.user(event.text))
        elif isinstance(event, AssistantText):
            for line in self.words.reply_text(event.response, event.text, event.final):
                self._emit_line(line)
        elif isinstance(event, TurnEvent):
            await self._finish_response()
            if event.kind == "end":
                self._turn_ended_at = now
        elif isinstance(event, Emotions):
            top = event.top[:3]
            self.stats.emotions.append((self._elapsed(), top))
            self._emit("emotion", {"top": [{"name": name, "score": score} for name, score in top]})
        elif isinstance(event, ProviderError):
            self.stats.provider_errors += 1
            self.log.warning("voice API error %s: %s", event.code, event.message)
            self._emit("upstream.error", {"code": event.code, "message": event.message, "retrying": False})
        elif isinstance(event, Skipped):
            self.stats.skipped_upstream += 1
            self._bad_input(
                "voice_api",
                event.kind,
                self.stats.skipped_upstream,
                "skipped a voice API message",
                event.reason,
            )
        elif isinstance(event, Ready):
            self.log.debug("voice API %s", event.detail)
        elif isinstance(event, AgentAction):
            # Carried out by whoever handles the event (the app's call control), after the
            # bot's sentence has played, like a mapped key.
            self.log.info("the agent asked: %s", event.action)
            self._emit("agent.action", {"action": event.action})

    async def _speak(self, event: AssistantAudio, now: float) -> None:
        if event.response <= self._dropped_through:
            return  # the rest of a reply the caller talked over
        if event.response != self._response_number or self._response is None:
            await self._finish_response()
            self._response_number = event.response
            self._response = self.playback.start_response()
            self.words.reply_speech(event.response, self._response)
        await self._send_audio(self._bot_audio.process(event.pcm), now)
        self._tail_pending = True
        self._quiet.clear()
        if self._turn_ended_at is not None and self._response.sent_bytes:
            latency = now - self._turn_ended_at
            self.stats.reply_ms.append(round(latency * 1000, 1))
            if self.metrics:
                self.metrics.reply_started(latency)
            self._turn_ended_at = None
        self._last_audio_at = now

    async def _finish_response(self) -> None:
        """Flush the audio still in the converter so the reply's last words play.

        The reply stays current: if more of it arrives after all (a late chunk), it goes on
        as the same reply, its filter restarting from silence.
        """
        if self._tail_pending:
            self._tail_pending = False
            await self._send_audio(self._bot_audio.flush(), asyncio.get_running_loop().time())
            if self._response is not None and self._response.marks_pending == 0:
                self._settle(self._response)  # its last mark came back before the tail went
            self._update_quiet()

    async def _send_audio(self, ulaw: bytes, now: float) -> None:
        if not ulaw or self._response is None:
            return
        self._playout_end = max(self._playout_end, now) + len(ulaw) / 8000
        mark = self.playback.sent(self._response, len(ulaw), due=self._playout_end)
        await self._send(self.stream.media(ulaw))
        await self._send(self.stream.mark(mark))
        self.stats.frames_out += len(ulaw) // 160
        self.stats.bytes_out += len(ulaw)

    async def _send(self, text: str) -> None:
        # A Twilio socket that stops reading would hold the bot's audio here without end
        # (and upstream frames behind it): bound the wait and end the call instead.
        try:
            async with asyncio.timeout(self.settings.twilio_send_timeout_s):
                await self.twilio.send(text)
        except TimeoutError:
            self.outcome = Outcome.TWILIO_STALLED
            self.log.error(
                "Twilio took over %.1f s to accept a frame; ending the call",
                self.settings.twilio_send_timeout_s,
            )
            raise ConnectionError("Twilio socket stalled") from None

    async def _watchdog(self) -> None:
        """Ends an idle call, and renews the voice session before its provider's cap."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        renew_margin = min(RENEW_MARGIN_S, settings.max_session_s / 4)
        self._last_frame_at = loop.time()
        while True:
            await asyncio.sleep(min(1.0, settings.idle_timeout_s / 4, renew_margin / 4))
            now = loop.time()
            if now - self._last_frame_at > settings.idle_timeout_s:
                self.outcome = Outcome.IDLE
                self.log.warning("no media from Twilio for %.0f s; ending the call", settings.idle_timeout_s)
                return
            mark_due = self.playback.oldest_due
            if mark_due is not None and now > mark_due + settings.twilio_send_timeout_s:
                # Sends still "succeed" while kernel buffers absorb megabytes; the marks
                # are the proof of playback, and the oldest is this late.
                self.outcome = Outcome.TWILIO_STALLED
                self.log.error(
                    "Twilio has not played the bot's audio %.1f s after it was due; ending the call",
                    now - mark_due,
                )
                return
            age = now - self._session_started_at
            quiet = not self.playback.speaking and not self._tail_pending
            due = age > settings.max_session_s - renew_margin
            if (
                self._connected.is_set()
                and not self._renewing
                and due
                and (quiet or age > settings.max_session_s - 5)
            ):
                # Renew between sentences, not mid-reply; forced just before the cap.
                self._renewing = True
                self.log.info("voice session %.0f s old: renewing it before the provider's cap", age)
                assert self._session is not None
                await self._session.close(NORMAL_CLOSE)

    def _tail_deadline(self) -> float | None:
        if not self._tail_pending:
            return None
        return max(self._playout_end - TAIL_MARGIN_S, self._last_audio_at + TAIL_IDLE_S)

    async def _barge_in(self, reason: str, now: float) -> None:
        # Clear first: every ms spent before it is stale speech in the caller's ear.
        await self._send(self.stream.clear())
        clear_s = asyncio.get_running_loop().time() - now
        self._bot_audio.reset()
        dropped_ms = self.playback.cleared()
        response = self._response
        self._dropped_through = self._response_number
        self._response = None
        self._tail_pending = False
        self._playout_end = 0.0
        self.stats.barge_ins += 1
        self.stats.clear_ms.append(round(clear_s * 1000, 2))
        if self.metrics:
            self.metrics.barged_in(clear_s)
        self.log.info("barge-in (%s): cleared %d ms of unplayed speech", reason, dropped_ms)
        self._emit(
            "barge_in",
            {
                "reply": response.number if response else None,
                "heard_ms": response.heard_ms if response else 0,
                "dropped_ms": dropped_ms,
                "reason": reason,
            },
        )
        self._settle(None)
        self._update_quiet()
        # Tell the API how much of the cut reply the caller heard (OpenAI truncates its
        # context there); APIs with nothing to do with it have no `reply_heard`.
        reply_heard = getattr(self._session, "reply_heard", None)
        if reply_heard is not None and response is not None:
            try:
                await reply_heard(self._dropped_through, response.heard_ms)
            except Exception as exc:  # never fatal: the caller has been cleared already
                self.log.warning("could not report what the caller heard: %s", type(exc).__name__)

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

    def snapshot(self, *, full: bool = True) -> dict[str, Any]:
        """The call's live state, for the control API; `full` adds its transcript, emotions
        and keys."""
        state = {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "from": self.caller,
            "to": self.called,
            "state": self._state(),
            "outcome": str(self.outcome),
            "provider": self.provider,
            "instance": self.settings.instance_id,
            "started_at": self.started_at,
            "duration_s": self._elapsed(),
            "bot_speaking": not self._quiet.is_set(),
            "turns": self.stats.turns,
            "barge_ins": self.stats.barge_ins,
            "latency": self._latency(),
            "handoff": asdict(self.handoff) if self.handoff else None,
            "custom_parameters": self.custom_parameters,
        }
        if full:
            lines = self.transcript
            state["transcript"] = [{"at": ln.at, **ln.as_dict()} for ln in lines if ln.role != "dtmf"]
            state["emotions"] = [{"at": at, "top": dict(top)} for at, top in self.stats.emotions]
            state["dtmf"] = [{"at": ln.at, "digit": ln.text} for ln in lines if ln.role == "dtmf"]
        return state

    def controlled(self, result: dict[str, Any]) -> None:
        """A transfer or hang-up of this call was carried out (ivr_bridge.control)."""
        self._emit("control", result)

    def _state(self) -> str:
        if self.outcome != Outcome.IN_PROGRESS:
            return "ending"
        if self.handoff is not None:
            return "transferring" if self.handoff.action == "transfer" else "hanging_up"
        if not self._connected.is_set():
            return "reconnecting" if self._reconnecting else "connecting"
        return "active"

    def _handoff_outcome(self) -> Outcome | None:
        if self.handoff is None:
            return None
        return Outcome.TRANSFERRED if self.handoff.action == "transfer" else Outcome.HUNG_UP

    def _update_quiet(self) -> None:
        if self._tail_pending or self.playback.speaking:
            self._quiet.clear()
        else:
            self._quiet.set()

    def _dtmf(self, digit: str) -> None:
        self.log.info("caller pressed %s", digit)
        self.words.dtmf(digit)
        # A mapped key's action is applied by whoever handles the event (the app's control).
        self._emit("dtmf", {"digit": digit, "action": self.settings.dtmf_actions.get(digit, "")})

    # -- bookkeeping ---------------------------------------------------------------------

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._started_at, 2)

    def _settle(self, response: Response | None) -> None:
        for line in self.words.settle(response, tail_pending=self._tail_pending):
            self._emit_line(line)

    def _emit_line(self, line: TranscriptLine) -> None:
        if line.role == "assistant" and line.interrupted:
            self.log.info("assistant (cut after %d ms): %s", line.heard_ms, line.heard_text)
        else:
            self.log.info("%s: %s", line.role, line.text)
        self._emit("transcript", {"at": line.at, **line.as_dict()})

    def _emit(self, kind: EventType, data: dict[str, Any]) -> None:
        if self._on_event is None or not self.call_sid:
            return
        self._event_seq += 1
        event = CallEvent(kind, self.call_sid, self._event_seq, time.time(), self._elapsed(), data)
        try:
            self._on_event(event)
        except Exception:  # a subscriber's bug must not end the call
            self.log.exception("call event %s not delivered", kind)

    def _latency(self) -> dict[str, dict[str, float | int]]:
        return {"reply_ms": _summary(self.stats.reply_ms), "clear_ms": _summary(self.stats.clear_ms)}

    def _ending(self) -> dict[str, Any]:
        s = self.stats
        return {
            "outcome": str(self.outcome),
            "duration_s": self._elapsed(),
            "turns": s.turns,
            "replies": len(self.playback.responses),
            "barge_ins": s.barge_ins,
            "emotions": dict(Counter(top[0][0] for _, top in s.emotions if top).most_common()),
            "latency": self._latency(),
            "transfer_to": self.handoff.to if self.handoff else "",
            "ended_by": self.handoff.source if self.handoff else "",
            "fallback": self.fallback,
            "upstream_close_code": self.upstream_close_code,
            "reconnects": s.reconnects,
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "bad_frames": s.bad_frames,
            "sequence_gaps": self.stream.sequence_gaps,
        }

    def _bad_frame(self, exc: MediaStreamError) -> None:
        self.stats.bad_frames += 1
        action = "ending the call on a Twilio frame" if exc.fatal else "skipped a Twilio frame"
        self._bad_input("twilio", exc.kind, self.stats.bad_frames, action, str(exc), always=exc.fatal)

    def _bad_input(
        self, source: str, kind: str, count: int, action: str, detail: str, *, always: bool = False
    ) -> None:
        """Count bad input; log it once each up to a cap (then only count: garbage must not
        flood the log). What ends the call is always logged."""
        if self.metrics:
            self.metrics.bad_input(source, kind)
        if always or count <= BAD_INPUT_LOG_LIMIT:
            more = "; more are only counted" if count == BAD_INPUT_LOG_LIMIT else ""
            self.log.warning("%s (%s): %s%s", action, kind, detail, more)

    def _log_summary(self) -> None:
        s = self.stats
        replies = ", ".join(
            f"#{r.number} heard {r.heard_ms}/{r.sent_ms} ms{' (interrupted)' if r.interrupted else ''}"
            for r in self.playback.responses
        )
        self.log.info(
            "call ended: %s after %.1f s; frames in %d out %d, sequence gaps %d, chunk gaps %d, "
            "barge-ins %d, bad frames %d; replies: %s",
            f"{self.outcome} ({self.upstream_close_code})"
            if self.outcome == Outcome.VOICE_API_FAILED
            else self.outcome,
            time.monotonic() - self._started_at,
            s.frames_in,
            s.frames_out,
            self.stream.sequence_gaps,
            self.stream.chunk_gaps,
            s.barge_ins,
            s.bad_frames,
            replies or "none",
        )
        for line in self.transcript:
            text = f"{line.heard_text} [cut]" if line.interrupted else line.text
            self.log.info("transcript %6.2fs %s: %s", line.at, line.role, text)
        if s.emotions:
            # The strongest emotion of each update, counted over the call.
            counts = Counter(top[0][0] for _, top in s.emotions if top)
            self.log.info("emotions: %s", ", ".join(f"{name} x{n}" for name, n in counts.most_common()))


def _summary(values: list[float]) -> dict[str, float | int]:
    """Count, median, p95 and maximum of a call's latency samples (ms)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "count": n,
        "p50": ordered[n // 2],
        "p95": ordered[min(n - 1, round(0.95 * (n - 1)))],
        "max": ordered[-1],
    }
