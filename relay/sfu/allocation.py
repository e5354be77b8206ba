"""Layer allocation: which layer of each of its video tracks one subscriber gets, within what
its path carries.

Sans-I/O: bitrates and indices in, a choice per track out. The caller (the SFU, once a second
and whenever the estimate falls below what is being sent) describes each track the subscriber
receives as a :class:`Demand`: the bitrate of each layer it could get, lowest first, the
highest one its wishes allow (size limits) and the one it is on now. :func:`allocate` then
shares the budget (the subscriber's bandwidth estimate minus what its other streams, audio and
single-layer video, take):

1. every track gets its lowest layer (a subscriber on a path too thin even for that still
   gets it: the publisher's lowest layer is the floor; the estimate then stays low and no
   probe is sent);
2. the rest of the budget goes to the tracks in priority order (a higher ``priority`` first;
   the SFU ranks explicit subscription priorities, then the room's current speaker), one
   layer up at a time, round-robin within the same priority, while the step fits;
3. a step *above the layer a track is on now* must fit with :data:`UP_MARGIN` to spare, a
   step back to it or below it need only fit: that is the hysteresis that keeps a stream
   from flapping between two layers whose total sits at the estimate. Moving up is further
   gated by the caller: only on an estimate the path confirmed (the estimator never runs
   more than 1.5 x ahead of the acknowledged rate, and a probe lifts it only by what
   arrived), not while the delay detector sees overuse, and not while the track is held:
   a move up taken back within :data:`PROBATION` holds the next one for :data:`HOLD_BASE`
   seconds, doubling with every such failure in a row (:func:`hold_after`).

:func:`probe_target` says what rate a probe should look for: what the subscriber would get
with no bandwidth limit, with some headroom, when that is above the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: a step above the current layer needs the budget to exceed its cost by this factor: a move
#: up starts with the new layer's keyframe, a burst several frames long, and a path loaded
#: above two thirds with bursty video builds queues the delay detector reacts to (and that
#: a shallow bottleneck buffer turns into loss)
UP_MARGIN = 1.5
#: a move up taken back within this many seconds failed: the next one waits HOLD_BASE
#: seconds, doubling with each failure in a row up to HOLD_MAX
PROBATION = 10.0
HOLD_BASE = 8.0
HOLD_MAX = 64.0
#: probes look for this much more than the wishes would take (above UP_MARGIN: a probe
#: measures a little under what it sent, and the move up must still fit with its margin)
PROBE_HEADROOM = 2.0

#: Nominal bitrates (bits/s) of a layer whose rate is not measured (the publisher does not
#: send it now), by picture height: what browsers' encoders aim at for a camera at 30 fps.
_NOMINAL = ((180, 150_000), (270, 300_000), (360, 500_000), (540, 1_000_000), (720, 1_700_000))


def nominal_bitrate(height: int, index: int) -> float:
    """What a layer of this picture height (0: unknown, then by its ``index`` in the offer's
    order of three) is expected to take, bits/s."""
    if not height:
        return float((150_000, 500_000, 1_700_000)[min(index, 2)])
    for limit, rate in _NOMINAL:
        if height <= limit:
            return float(rate)
    return 2_500_000.0 * height / 1080


#: a layer of known picture size costs at least this share of its nominal rate
NOMINAL_FLOOR = 0.8


def layer_cost(measured: float, height: int, index: int) -> float:
    """What the allocation counts a layer as taking: its measured (peak) rate, but at least
    :data:`NOMINAL_FLOOR` of the nominal rate for its picture size when that is known (an
    encoder short of CPU, or still ramping up, sends a layer below its usual rate and raises
    it as soon as it can: a subscriber's path must not be filled on the low rate), and the
    nominal rate itself while nothing is measured."""
    if measured <= 0:
        return nominal_bitrate(height, index)
    if height:
        return max(measured, NOMINAL_FLOOR * nominal_bitrate(height, index))
    return measured


@dataclass(slots=True)
class Demand:
    """One track as one subscriber could receive it."""

    #: bits/s of each layer it could get, lowest first (at least one)
    rates: Sequence[float]
    #: index of the best layer the subscriber's wishes allow
    cap: int
    #: index of the layer it is on now (None: none yet)
    current: int | None = None
    #: higher first
    priority: int = 0


def allocate(budget: float | None, demands: Sequence[Demand]) -> list[int]:
    """The layer index for each demand within ``budget`` bits/s (None: no estimate, every
    demand gets its cap). See the module docstring for the rules."""
    if budget is None:
        return [d.cap for d in demands]
    choice = [0] * len(demands)
    remaining = budget - sum(d.rates[0] for d in demands)
    for group in _priority_groups(demands):
        moved = True
        while moved:
            moved = False
            for i in group:
                demand = demands[i]
                step = choice[i] + 1
                if step > demand.cap:
                    continue
                rates = demand.rates
                increment = rates[step] - rates[choice[i]]
                needed = increment
                if demand.current is not None and step > demand.current:
                    needed = rates[step] * UP_MARGIN - rates[choice[i]]
                if needed <= remaining:
                    remaining -= increment
                    choice[i] = step
                    moved = True
    return choice


def hold_after(failures: int) -> float:
    """Seconds a track may not move up after its ``failures``-th failed move up in a row."""
    return min(HOLD_BASE * 2.0 ** max(failures - 1, 0), HOLD_MAX)


def wanted_rate(demands: Sequence[Demand], other: float) -> float:
    """What the wishes take: every demand at its cap, plus ``other`` bits/s."""
    return other + sum(d.rates[d.cap] for d in demands)


def probe_target(demands: Sequence[Demand], other: float) -> float:
    """The rate worth probing for: :func:`wanted_rate` with :data:`PROBE_HEADROOM`."""
    return wanted_rate(demands, other) * PROBE_HEADROOM


def _priority_groups(demands: Sequence[Demand]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, demand in enumerate(demands):
        groups.setdefault(demand.priority, []).append(i)
    return [groups[p] for p in sorted(groups, reverse=True)]


__all__ = [
    "HOLD_BASE",
    "HOLD_MAX",
    "PROBATION",
    "PROBE_HEADROOM",
    "UP_MARGIN",
    "NOMINAL_FLOOR",
    "Demand",
    "allocate",
    "layer_cost",
    "hold_after",
    "nominal_bitrate",
    "probe_target",
    "wanted_rate",
]
