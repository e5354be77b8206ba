"""One deadline queue for everything in the media plane that happens at a time, not on a packet.

DTLS retransmissions, transport-cc and REMB feedback, NACK retries, receiver reports, keyframe
request retries and the once-a-second housekeeping each own a :class:`Timer`. A timer is armed
only while its owner has something to do (a publisher that sends nothing costs no wake-up), and
the asyncio layer keeps exactly one ``loop.call_at`` armed for the earliest deadline of all
(:meth:`Timers.next_deadline`), so an idle relay sleeps.

Sans-I/O: time comes from the caller; :meth:`Timers.run` fires what is due.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timer:
    """A callback at one deadline at a time. Re-arming moves the deadline; the queue keeps the
    stale entry and skips it when it comes up (cheaper than removing it from the heap)."""

    __slots__ = ("callback", "when", "_queue", "_generation")

    def __init__(self, queue: Timers, callback: Callable[[float], None]) -> None:
        self.callback = callback
        #: the armed deadline, None when not armed
        self.when: float | None = None
        self._queue = queue
        self._generation = 0

    def arm(self, when: float) -> None:
        """Fire at ``when`` (replacing any earlier or later deadline)."""
        self._generation += 1
        self.when = when
        self._queue._push(self, when, self._generation)

    def arm_by(self, when: float) -> None:
        """Fire at ``when`` unless already armed for earlier."""
        if self.when is None or when < self.when:
            self.arm(when)

    def cancel(self) -> None:
        self._generation += 1
        self.when = None

    @property
    def armed(self) -> bool:
        return self.when is not None


class Timers:
    """The deadline queue. ``on_earlier(when)`` is called whenever the earliest deadline moves
    earlier than what was reported before (the asyncio layer re-arms its one ``call_at``)."""

    def __init__(self, on_earlier: Callable[[float], None] = lambda when: None) -> None:
        self._heap: list[tuple[float, int, int, Timer]] = []
        self._order = itertools.count()
        self._reported: float | None = None
        self.on_earlier = on_earlier
        #: callbacks that raised (the relay keeps running; the error is logged)
        self.errors = 0

    def timer(self, callback: Callable[[float], None]) -> Timer:
        """A new, unarmed timer calling ``callback(now)``."""
        return Timer(self, callback)

    def _push(self, timer: Timer, when: float, generation: int) -> None:
        heapq.heappush(self._heap, (when, next(self._order), generation, timer))
        if self._reported is None or when < self._reported:
            self._reported = when
            self.on_earlier(when)

    def next_deadline(self) -> float | None:
        """The earliest armed deadline (stale entries are discarded on the way)."""
        heap = self._heap
        while heap:
            when, _, generation, timer = heap[0]
            if generation == timer._generation and timer.when == when:
                return when
            heapq.heappop(heap)
        return None

    def run(self, now: float, slack: float = 0.0) -> float | None:
        """Fire every timer due at ``now``, and those armed before this call that are due
        within ``slack`` after it, each called with ``now``; the next deadline afterwards
        (None: nothing armed). A callback may re-arm its own timer or any other; a deadline
        it sets after ``now`` waits for the next call, even within the slack."""
        heap = self._heap
        self._reported = None
        due = now + slack
        armed_before = next(self._order)
        while heap:
            when, order, generation, timer = heap[0]
            if generation != timer._generation or timer.when != when:
                heapq.heappop(heap)
                continue
            if when > now and (when > due or order > armed_before):
                break
            heapq.heappop(heap)
            timer.when = None
            try:
                timer.callback(now)
            except Exception:  # one owner's bug must not stop every other timer
                self.errors += 1
                log.exception("timer callback failed")
        deadline = self.next_deadline()
        self._reported = deadline
        return deadline

    def __len__(self) -> int:
        """Heap entries, stale ones included (for tests and metrics)."""
        return len(self._heap)
