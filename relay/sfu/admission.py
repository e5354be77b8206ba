"""Overload detection and admission of new sessions, sans-I/O.

The asyncio layer samples the event loop's scheduling lag (how late a timer fired) and the
counter of forwarded RTP packets a few times a second and hands both to
:meth:`OverloadDetector.sample` with the time. The detector smooths them (an exponentially
weighted moving average with a time constant, so irregular sampling is weighted correctly)
and decides, with hysteresis, whether the relay sheds load: while it does, new sessions (new
participants, first offers of new connections) are refused with
:class:`relay.sfu.errors.Overloaded` and the relay reports itself not ready, so that the calls
already in progress keep their share of the CPU. Shedding ends by itself once both signals
have stayed under their lower thresholds for ``recover_after`` seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from relay.config import OverloadSettings
from relay.sfu.errors import Overloaded

__all__ = ["LOOP_LAG", "PACKET_RATE", "OverloadDetector", "Transition"]

#: Reasons for shedding, as shown in errors, logs and metrics.
LOOP_LAG = "loop_lag"
PACKET_RATE = "packet_rate"


@dataclass(frozen=True)
class Transition:
    """Shedding started (``shedding`` True, with its reason) or ended."""

    shedding: bool
    reason: str
    loop_lag: float
    packet_rate: float


class OverloadDetector:
    """Smoothed loop lag and forwarded packet rate in; shed or admit out."""

    def __init__(self, settings: OverloadSettings) -> None:
        self.settings = settings
        #: Smoothed event-loop lag, seconds.
        self.loop_lag = 0.0
        #: Smoothed forwarded packet rate, packets per second.
        self.packet_rate = 0.0
        self.shedding = False
        #: Why the relay sheds (``LOOP_LAG`` or ``PACKET_RATE``), "" while it admits.
        self.reason = ""
        #: Sessions refused since start.
        self.refused = 0
        #: Times shedding started since start.
        self.episodes = 0
        self._last_time: float | None = None
        self._last_packets = 0
        self._calm_since: float | None = None

    @property
    def retry_after(self) -> int:
        """Seconds a refused caller is asked to wait before trying again."""
        return self.settings.retry_after

    def sample(self, now: float, loop_lag: float, packets_out: int) -> Transition | None:
        """Take one sample: ``loop_lag`` measured just now (seconds) and the running total of
        forwarded packets. Returns the transition when shedding starts or ends."""
        settings = self.settings
        last = self._last_time
        self._last_time = now
        packets, self._last_packets = self._last_packets, packets_out
        if last is None:
            # the first sample only sets the baseline of the packet counter
            self.loop_lag = max(0.0, loop_lag)
            return None
        dt = now - last
        if dt <= 0:
            return None
        weight = 1.0 - math.exp(-dt / settings.smoothing)
        self.loop_lag += weight * (max(0.0, loop_lag) - self.loop_lag)
        rate = max(0, packets_out - packets) / dt
        self.packet_rate += weight * (rate - self.packet_rate)
        if not settings.enabled:
            return self._stop() if self.shedding else None
        if not self.shedding:
            reason = self._over()
            if reason:
                self.shedding = True
                self.reason = reason
                self.episodes += 1
                self._calm_since = None
                return Transition(True, reason, self.loop_lag, self.packet_rate)
            return None
        if self._calm():
            if self._calm_since is None:
                self._calm_since = now
            if now - self._calm_since >= settings.recover_after:
                return self._stop()
        else:
            self._calm_since = None
            reason = self._over()
            if reason:
                self.reason = reason
        return None

    def _over(self) -> str:
        """The reason to start shedding, or ""."""
        settings = self.settings
        if self.loop_lag > settings.loop_lag_high:
            return LOOP_LAG
        if settings.packet_rate_high and self.packet_rate > settings.packet_rate_high:
            return PACKET_RATE
        return ""

    def _calm(self) -> bool:
        """Both signals under their lower thresholds."""
        settings = self.settings
        if self.loop_lag >= settings.loop_lag_low:
            return False
        return not settings.packet_rate_high or self.packet_rate < settings.packet_rate_low

    def _stop(self) -> Transition:
        reason = self.reason
        self.shedding = False
        self.reason = ""
        self._calm_since = None
        return Transition(False, reason, self.loop_lag, self.packet_rate)

    def check(self) -> None:
        """Admit a new session, or raise :class:`Overloaded` (counted) while shedding."""
        if not self.shedding:
            return
        self.refused += 1
        what = (
            f"event-loop lag {self.loop_lag * 1000:.0f} ms"
            if self.reason == LOOP_LAG
            else f"forwarding {self.packet_rate:.0f} packets/s"
        )
        raise Overloaded(
            f"the relay is overloaded ({what}) and accepts no new sessions; "
            f"retry in {self.retry_after} s",
            retry_after=self.retry_after,
        )
