"""Soak: the relay held at a steady load for a long time, measured slice by slice.

One publisher sends 1 Mbit/s video to N subscribers (the ramp's load) for ``duration``
seconds. N comes from ``--subscribers``, from ``--rate`` (forwarded packets per second), or
from a fraction (70 % by default) of the capacity given with ``--capacity`` or measured first
by a short ramp on a fresh relay. After a warm-up long enough to fill every subscription's
packet history, the run is cut into slices (10 s by default); each slice is one measurement
window of :class:`bench.load.Run` (loss, latency percentiles, CPU, drops, loop lag) with the
relay's RSS at its end. RSS growth is measured from the end of the warm-up to the end of the
run, so that buffers the load legitimately fills do not count as a leak.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.common import memory
from bench.load import Progress, Run, Scenario, _no_progress, run_ramp
from bench.loadgen import MediaSpec
from bench.servers import Server
from bench.systems import RelaySystem

#: Default share of the measured capacity a soak holds.
FRACTION = 0.7
#: Default seconds of a soak, of one slice, and of the warm-up before the first slice.
DURATION = 600.0
SLICE = 10.0
WARMUP = 12.0
#: Subscriber steps of the short ramp that measures capacity when none is given.
CAPACITY_STEPS = (25, 50, 100, 150, 200, 300, 400, 500, 600, 800)
CAPACITY_STEP_SECONDS = 3.0


def soak_media() -> MediaSpec:
    """The publisher's stream: 1 Mbit/s video in 1200-byte packets (about 104 packets/s)."""
    return MediaSpec.video(bitrate=1e6, size=1200, fps=30)


@dataclass
class SoakPlan:
    """How many subscribers a soak holds, and why."""

    subscribers: int
    basis: str  # "subscribers", "rate", "capacity (given)" or "capacity (measured)"
    fraction: float | None = None
    capacity_pps: float | None = None
    capacity_run: dict[str, Any] | None = None

    @property
    def target_pps(self) -> float:
        return self.subscribers * soak_media().packets_per_second

    def describe(self) -> dict[str, Any]:
        return {
            "subscribers": self.subscribers,
            "basis": self.basis,
            "fraction_of_capacity": self.fraction,
            "capacity_pps": self.capacity_pps,
            "target_forwarded_pps": round(self.target_pps, 1),
        }


def subscribers_for_rate(rate: float) -> int:
    """Subscribers of one soak publisher that make ``rate`` forwarded packets per second."""
    return max(1, round(rate / soak_media().packets_per_second))


async def measure_capacity(
    server: Server, progress: Progress = _no_progress, steps: tuple[int, ...] = CAPACITY_STEPS
) -> dict[str, Any]:
    """A short ramp (one window of CAPACITY_STEP_SECONDS per step, no retries)."""
    base = Scenario("capacity", media=(soak_media(),), settle=1.0, duration=CAPACITY_STEP_SECONDS)
    return await run_ramp(server, base, steps, progress=progress, retries=0)


def _slice_row(result: dict[str, Any], at: float) -> dict[str, Any]:
    """The figures of one slice kept in the soak's result."""
    keep = (
        "window_s",
        "expected",
        "received",
        "lost",
        "loss",
        "duplicates",
        "reordered",
        "forwarded_pps",
        "server_cpu_fraction",
        "background_cpu_fraction",
        "generator_cpu_fraction",
        "generator_late_frames",
        "latency_ms",
        "relay_metrics",
    )
    row = {key: result.get(key) for key in keep}
    row["t_s"] = round(at, 1)
    row["rss_bytes"] = result.get("server_memory", {}).get("rss_bytes")
    return row


async def run_soak(
    server: Server,
    subscribers: int,
    duration: float = DURATION,
    slice_seconds: float = SLICE,
    warmup: float = WARMUP,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """Hold one publisher to ``subscribers`` for ``duration`` seconds; one window per slice."""
    scenario = Scenario(
        "soak",
        subscribers=subscribers,
        media=(soak_media(),),
        settle=warmup,
        duration=slice_seconds,
    )
    slices: list[dict[str, Any]] = []
    async with Run(server, progress, retries=0) as run:
        await run.setup(scenario)
        run.start_sending()
        rss_setup = memory(server.pid)
        progress(f"soak: warming up {warmup:g} s", 0.0)
        await asyncio.sleep(warmup)
        rss_start = memory(server.pid)
        started = time.monotonic()
        while True:
            at = time.monotonic() - started
            left = duration - at
            if left < min(1.0, slice_seconds):
                break
            result = await run.measure(min(slice_seconds, left))
            row = _slice_row(result, at)
            # sessions still there, and whether the relay shed load (a sign of overload)
            gauges = await run.system.metrics() if isinstance(run.system, RelaySystem) else {}
            row["relay_participants"] = gauges.get("relay_participants")
            row["relay_shedding"] = gauges.get("relay_overload_shedding")
            slices.append(row)
            progress(
                f"soak: {at + result['window_s']:.0f}/{duration:g} s, loss {result['loss']:.3%}",
                min(1.0, (time.monotonic() - started) / duration),
            )
        soaked = time.monotonic() - started
        rss_end = memory(server.pid)
        setup_s = run.setup_seconds
    expected = sum(s["expected"] or 0 for s in slices)
    received = sum(s["received"] or 0 for s in slices)
    p99 = [s["latency_ms"].get("p99") for s in slices if s["latency_ms"].get("n")]
    start_rss, end_rss = rss_start["rss_bytes"], rss_end["rss_bytes"]
    return {
        "scenario": scenario.describe(),
        "duration_s": round(soaked, 1),
        "slice_s": slice_seconds,
        "warmup_s": warmup,
        "setup_s": round(setup_s, 2),
        "slices": slices,
        "totals": {
            "expected": expected,
            "received": received,
            "lost": max(0, expected - received),
            "loss": (expected - received) / expected if expected else None,
            "worst_slice_loss": max((s["loss"] or 0.0 for s in slices), default=None),
            "latency_p99_ms_median_slice": sorted(p99)[len(p99) // 2] if p99 else None,
            "latency_p99_ms_worst_slice": max(p99) if p99 else None,
            "forwarded_pps_mean": sum(s["forwarded_pps"] for s in slices) / len(slices)
            if slices
            else None,
            "busy_slices": sum(1 for s in slices if s["background_cpu_fraction"] > 0.3),
            "shedding_slices": sum(1 for s in slices if s["relay_shedding"]),
            "participants_start": slices[0]["relay_participants"] if slices else None,
            "participants_end": slices[-1]["relay_participants"] if slices else None,
        },
        "rss": {
            "after_setup_bytes": rss_setup["rss_bytes"],
            "start_bytes": start_rss,
            "end_bytes": end_rss,
            "peak_bytes": rss_end["rss_peak_bytes"],
            "growth_fraction": (end_rss - start_rss) / start_rss if start_rss else None,
        },
    }
