"""The media plane's timers on an event loop whose timers fire early, as uvloop's do (whole
milliseconds of a loop time cached at the start of each turn): a deadline costs one turn of
the loop, not a spin of turns until it passes."""

from __future__ import annotations

from typing import Any

from relay.server import TIMER_SLACK, TimerDriver
from relay.sfu.timers import Timers
from tests.unit.test_datachannels import Clock


class Handle:
    def __init__(self, when: float, callback: Any) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EarlyLoop:
    """``call_at`` handles that fire ``early`` seconds before their time; each turn of the
    loop takes ``turn`` seconds."""

    def __init__(self, clock: Clock, early: float, turn: float = 20e-6) -> None:
        self.clock = clock
        self.early = early
        self.turn = turn
        self.handles: list[Handle] = []
        self.turns = 0

    def time(self) -> float:
        return self.clock.now

    def call_at(self, when: float, callback: Any) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    def run_until(self, end: float) -> None:
        while True:
            live = [h for h in self.handles if not h.cancelled]
            if not live:
                return
            handle = min(live, key=lambda h: h.when)
            fires_at = max(self.clock.now, handle.when - self.early) + self.turn
            if fires_at > end:
                return
            self.handles.remove(handle)
            self.clock.now = fires_at
            self.turns += 1
            handle.callback()


def test_a_loop_that_fires_early_takes_one_turn_per_deadline() -> None:
    clock = Clock()
    loop = EarlyLoop(clock, early=0.0008)
    driver = TimerDriver(loop, clock)  # type: ignore[arg-type]
    fired: list[float] = []

    def every_50ms(now: float) -> None:
        fired.append(now)
        timer.arm(now + 0.05)

    timer = driver.timers.timer(every_50ms)
    timer.arm(clock.now + 0.05)
    loop.run_until(clock.now + 1.0)
    assert len(fired) == 20
    assert loop.turns == 20  # before: about 40 turns per deadline, spinning until it passed
    # each call is told the time it runs at, at most the slack before its deadline
    assert all(b - a > 0.05 - TIMER_SLACK for a, b in zip(fired, fired[1:], strict=False))


def test_slack_fires_a_deadline_that_close_with_the_time_it_runs_at() -> None:
    timers = Timers()
    calls: list[tuple[str, float]] = []
    timers.timer(lambda now: calls.append(("soon", now))).arm(5.0005)
    timers.timer(lambda now: calls.append(("later", now))).arm(5.002)
    assert timers.run(5.0, slack=0.001) == 5.002
    assert calls == [("soon", 5.0)]
    assert timers.run(5.0) == 5.002  # without slack nothing more is due


def test_a_deadline_armed_within_the_slack_waits_for_the_next_run() -> None:
    timers = Timers()
    runs: list[float] = []

    def again(now: float) -> None:
        runs.append(now)
        timer.arm(now + 0.0002)  # a probe's spacing at a high rate

    timer = timers.timer(again)
    timer.arm(1.0)
    assert timers.run(1.0, slack=0.001) == 1.0002
    assert runs == [1.0]
    timers.run(1.0001, slack=0.001)
    assert runs == [1.0, 1.0001]
