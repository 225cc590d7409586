"""Call slots, sans-I/O: taken by admitted calls, and held for a call between its webhook
and its stream's `start`.

Without the hold, two webhooks that arrive while one slot is free both get a stream, and
the second stream is refused at `start`: that caller hears silence instead of the
fallback. So the webhook reserves the slot for its call sid, for as long as Twilio may
take to open the stream (`HOLD_S`), and the `start` of that call takes the reservation.
"""

from __future__ import annotations

import time
from collections.abc import Callable

HOLD_S = 10.0  # Twilio opens the stream within a second or two of the webhook's answer


class Capacity:
    def __init__(
        self, limit: int, hold_s: float = HOLD_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self._hold_s = hold_s
        self._clock = clock
        self._held: dict[str, float] = {}  # call sid -> when its reservation lapses; oldest first

    def free(self, active: int) -> int:
        """Slots left with `active` calls admitted and the reservations still held."""
        now = self._clock()
        while self._held:
            sid, lapses = next(iter(self._held.items()))
            if lapses > now:
                break
            del self._held[sid]
        return self.limit - active - len(self._held)

    def reserve(self, call_sid: str, active: int) -> bool:
        """Hold a slot for `call_sid` until its stream starts; False if none is free. A call
        that already holds one keeps it (a webhook retried by Twilio)."""
        if call_sid in self._held:
            self._held[call_sid] = self._clock() + self._hold_s
            return True
        if self.free(active) <= 0:
            return False
        self._held[call_sid] = self._clock() + self._hold_s
        return True

    def take(self, call_sid: str, active: int) -> bool:
        """A stream of `call_sid` starts: its reservation, or a free slot; False if neither."""
        lapses = self._held.pop(call_sid, None)
        if lapses is not None and lapses > self._clock():
            return True
        return self.free(active) > 0

    @property
    def held(self) -> int:
        return len(self._held)
