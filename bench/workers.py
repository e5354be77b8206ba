"""``python -m bench load --workers 1,2``: the relay with 1, 2, ... worker processes.

One publisher (1 Mbit/s video, about 104 packets/s) to N subscribers in one room, on a fresh
relay per layout:

- ``W workers, spread`` (``[workers] count = W``, ``placement = "spread"``): the subscribers are
  spread over the workers; the publisher's worker pipes the track once to every other worker
  holding subscribers, which fans it out locally. With W = 1 this is today's single process.
- ``W workers, pack`` (W >= 2, ``placement = "pack"``): every participant on the worker that
  holds the room, so nothing is piped; the same processes run (front and W workers). The
  difference spread - pack at the same N is the pipe.

Each layout runs the fixed fan-outs (25, 50, 100 by default) on one connection set, adding
subscribers between windows; the spread layouts then keep adding subscribers (the ramp) until
loss passes 1 % or p99 latency 50 ms: the capacity of one publisher to N on this machine.

CPU is the whole process tree of the relay (the front and every worker, from
``/proc/<pid>/task/*/schedstat``), split per process; each worker's forwarded packets come from
its ``/metrics`` series (``worker="i"``), each subscriber's worker from its participant dict,
each worker's pid from ``GET /v1/workers``. Nothing is pinned: on a 2-core machine the relay's
processes and the load generator share both cores, scheduled by the kernel (the generator's own
CPU is reported in every window: it competes with the relay).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench import wakeup
from bench.common import all_cores, cpu_seconds, percentiles
from bench.load import MAX_BACKGROUND, Progress, Run, Scenario, _no_progress
from bench.loadgen import Conn, MediaSpec, window_stats
from bench.servers import RelayServer, workdir, workers_supported
from bench.systems import RelaySystem
from relay.client.peer import negotiate_subscriber

FANOUTS = (25, 50, 100)
RAMP_STEPS = (150, 200, 250, 300, 350, 400, 500, 600, 800)
#: Targets of the issue: the pipe's share of the CPU per forwarded packet, and p99 latency with
#: two workers over one worker's at a fan-out of 100.
PIPE_SHARE_MAX = 0.10
P99_RATIO_MAX = 0.6
P99_RATIO_FANOUT = 100
#: Limits of a ramp step (as the single-process ramp of ``bench load``).
MAX_LOSS = 0.01
MAX_P99_MS = 50.0
READY_TIMEOUT = 60.0
ROOM = "workers-0"
PUBLISHER = "pub"


def media() -> MediaSpec:
    """The publisher's stream: 1 Mbit/s of video in 1200 B packets (about 104 packets/s)."""
    return MediaSpec.video(bitrate=1e6, size=1200, fps=30)


@dataclass
class WorkersPlan:
    """What ``load --workers`` runs."""

    workers: tuple[int, ...] = (1, 2)
    fanouts: tuple[int, ...] = FANOUTS
    ramp_steps: tuple[int, ...] = RAMP_STEPS
    settle: float = 2.0
    duration: float = 10.0
    ramp_duration: float = 5.0
    pack: bool = True  # with W >= 2 also the pack layout (no pipe) at the fixed fan-outs
    rounds: int = 2  # every layout's fixed fan-outs this often (medians), alternating layouts
    generator_nice: int = 19  # the load generator's nice value while it measures (relay: 0)
    #: then the 1-worker and 2-worker spread fixed fan-outs again with the generator at this nice
    #: value (None: not), to show what the generator's competition does to latency
    contrast_nice: int | None = 0
    #: and again with the relay's ``[media] scheduler_slice_us`` at this value (None: not; 0 is
    #: the kernel's default slice), to show what the relay's short slice does to latency
    contrast_slice: int | None = 0
    budget_s: float = 900.0  # later rounds, ramp steps and re-measuring give way past it
    started: float = field(default_factory=time.monotonic)
    ramp: bool = True
    retries: int = 1
    #: datagrams of the platform's wake-up probe (bench/wakeup.py) before the layouts; 0: none
    wakeup_packets: int = 600
    max_loss: float = MAX_LOSS
    max_p99_ms: float = MAX_P99_MS
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, workers: tuple[int, ...]) -> WorkersPlan:
        return cls(
            workers=workers,
            fanouts=(4, 8),
            ramp_steps=(12,),
            settle=1.0,
            duration=2.0,
            ramp_duration=2.0,
            retries=0,
            rounds=1,
            contrast_nice=None,
            contrast_slice=None,
            wakeup_packets=150,
        )

    def spent(self) -> float:
        """Share of the time budget spent so far."""
        return (time.monotonic() - self.started) / self.budget_s

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out.pop("started")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()} | self.extra


def slice_label(slice_us: int | None) -> str:
    """A ``[media] scheduler_slice_us`` value in words."""
    if slice_us is None:
        return "the relay's default (100 µs)"
    return "the kernel's default" if slice_us == 0 else f"{slice_us} µs"


def sharing_note(plan: WorkersPlan) -> str:
    """How the relay and the load generator share the machine's cores, in words."""
    contrast = (
        f" The 1-worker and 2-worker spread fan-outs are measured once more with the generator "
        f"at nice {plan.contrast_nice} (equal priority) for contrast."
        if plan.contrast_nice is not None and plan.contrast_nice != plan.generator_nice
        else ""
    )
    if plan.contrast_slice is not None:
        contrast += (
            " And once more with the relay's processes on the kernel's default scheduler slice"
            if plan.contrast_slice == 0
            else f" And once more with the relay's processes asking for a {plan.contrast_slice} µs"
            " scheduler slice"
        ) + " (`[media] scheduler_slice_us`; the relay's default asks for 100 µs)."

    return (
        "Nothing pinned: the relay (front process and every worker, or the single process with "
        "1 worker) and the load generator (this bench process: signalling, sending, and "
        "receiving and decrypting every forwarded packet) all run on every core, scheduled by "
        f"the kernel; the relay's processes at nice 0, the generator at nice "
        f"{plan.generator_nice}{' (so that a relay process that has work takes a core first)' if plan.generator_nice > 0 else ''}"
        ". With 1 worker the relay and the generator keep about a core each; with 2 workers "
        "the two workers, the front and the generator share the 2 cores (the generator's CPU "
        "is in every row; it is taken from what the relay could use). Latency is unaffected by "
        "the generator's own delays: each frame's packets go out in one `sendmmsg` and are "
        "logged right before it (so a relay process that preempts the generator cannot pace "
        "the burst it receives), receive times are the kernel's. The single-process bench (`bench load`) instead pins the relay "
        "to core 0 and the generator to core 1." + contrast
    )


# ---------------------------------------------------------------------------------------------
# One layout on one relay


async def _workers(relay: RelaySystem) -> list[dict[str, Any]] | None:
    """``GET /v1/workers`` (None where the relay has no such route: one process)."""
    try:
        response = await relay.http.get("/v1/workers")
    except Exception:
        return None
    if response.status_code != 200:
        return None
    return list(response.json().get("workers", []))


async def wait_ready(relay: RelaySystem, count: int, timeout: float = READY_TIMEOUT) -> list[Any]:
    """Until ``GET /v1/workers`` lists ``count`` ready workers (at once with 1 worker)."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] | None = None
    while True:
        seen = await _workers(relay)
        if count <= 1 and seen is None:
            return []
        ready = [w for w in seen or [] if w.get("state") == "ready"]
        if seen is not None and len(ready) >= count:
            return seen
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} workers not ready within {timeout:g} s: {seen}")
        await asyncio.sleep(0.25)


async def _worker_of(relay: RelaySystem, who: str) -> int | None:
    with contextlib.suppress(Exception):
        response = await relay.http.get(f"/v1/rooms/{ROOM}/participants/{who}")
        if response.status_code == 200:
            value = response.json().get("worker")
            return int(value) if value is not None else None
    return None


class Layout:
    """One relay (W workers, a placement) and its connection set, grown step by step."""

    def __init__(
        self,
        server: RelayServer,
        run: Run,
        plan: WorkersPlan,
        progress: Progress,
        label: str,
    ) -> None:
        self.server = server
        self.run = run
        self.plan = plan
        self.progress = progress
        self.label = label
        self.scenario = Scenario(
            "workers", media=(media(),), settle=plan.settle, duration=plan.duration
        )
        self.subscribers: list[Conn] = []
        self.worker_of: dict[str, int | None] = {}
        self.renegotiated = 0

    @property
    def relay(self) -> RelaySystem:
        system = self.run.system
        assert isinstance(system, RelaySystem)
        return system

    async def start(self, capacity: int) -> dict[str, Any]:
        workers = await wait_ready(self.relay, self.server.workers or 1)
        await self.relay.create_room(ROOM, capacity + 2)
        await self.relay.join(ROOM, PUBLISHER, True, False)
        await self.run.add_publisher(self.scenario, ROOM, PUBLISHER)
        self.worker_of[PUBLISHER] = await self._worker(PUBLISHER)
        self.run.start_sending()
        return {"workers_at_start": workers, "publisher_worker": self.worker_of[PUBLISHER]}

    async def _worker(self, who: str) -> int | None:
        index = await _worker_of(self.relay, who)
        if index is None and (self.server.workers or 1) == 1:
            return 0  # one process: participant dicts carry no worker
        return index

    async def grow(self, target: int) -> dict[str, Any]:
        """Join and connect subscribers up to ``target``; the front's CPU per subscriber."""
        whos = [f"s{i}" for i in range(len(self.subscribers), target)]
        front = self.server.pid
        tree0, front0, t0 = self.server.cpu_seconds(), cpu_seconds(front), time.monotonic()
        for who in whos:
            await self.relay.join(ROOM, who, False, True)

        async def subscribe(who: str) -> None:
            conn = await self.run.add_subscriber(self.scenario, ROOM, who, [PUBLISHER])
            conn.who = who  # type: ignore[attr-defined]
            self.subscribers.append(conn)

        await asyncio.gather(*(subscribe(w) for w in whos))
        tree1, front1, t1 = self.server.cpu_seconds(), cpu_seconds(front), time.monotonic()
        for who in whos:
            self.worker_of[who] = await self._worker(who)
        n = max(1, len(whos))
        return {
            "joined": len(whos),
            "seconds": round(t1 - t0, 2),
            "front_cpu_per_subscriber_ms": (front1 - front0) / n * 1e3,
            "relay_cpu_per_subscriber_ms": (tree1 - tree0) / n * 1e3,
        }

    async def settle(self) -> None:
        """Let the new subscribers settle; renegotiate any that still receives nothing (a
        subscriber whose offer came before its worker imported the track)."""
        await asyncio.sleep(self.plan.settle)
        for attempt in range(2):
            silent = [c for c in self.subscribers if c.rec.packets == 0]
            if not silent:
                return
            for conn in silent:
                assert conn.peer is not None
                with contextlib.suppress(Exception):
                    await negotiate_subscriber(self.relay.http, ROOM, conn.who, conn.peer)  # type: ignore[attr-defined]
                    self.renegotiated += 1
            await asyncio.sleep(self.plan.settle * (attempt + 1))

    async def window(self, duration: float) -> dict[str, Any]:
        """One measurement window with its split per worker process."""
        workers = await _workers(self.relay) or []
        if self.plan.spent() > 0.6:  # late in the time budget: no waiting for a quiet machine
            result = await self.run.measure(duration)
            result["attempts"] = 1
            result["disturbed"] = result["background_cpu_fraction"] > MAX_BACKGROUND
        else:
            result = await self.run.measure_quietly(duration)
        result["subscribers"] = len(self.subscribers)
        result["silent_subscribers"] = sum(1 for c in self.subscribers if c.rec.packets == 0)
        result["renegotiated"] = self.renegotiated
        result["per_worker"] = self._split(result, workers)
        by_pid = result.get("server_cpu_by_pid", {})
        front = by_pid.get(str(self.server.pid))
        wall = result["window_s"]
        result["front_cpu_fraction"] = front / wall if front is not None and wall else None
        result["worker_list"] = workers
        return result

    def _split(self, result: dict[str, Any], workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wall = result["window_s"] or 1.0
        by_pid = result.get("server_cpu_by_pid", {})
        sleeps = result.get("server_sleeps_by_pid", {})
        packets = (result.get("relay_metrics") or {}).get("by_worker", {})
        marks = self.run.last_marks
        rows = []
        indexes = sorted(
            {int(w["index"]) for w in workers}
            | {i for i in self.worker_of.values() if i is not None}
        )
        for index in indexes:
            pid = next((w.get("pid") for w in workers if int(w["index"]) == index), None)
            subs = [c for c in self.subscribers if self.worker_of.get(c.who) == index]  # type: ignore[attr-defined]
            row: dict[str, Any] = {
                "index": index,
                "pid": pid,
                "subscribers": len(subs),
                "holds_publisher": self.worker_of.get(PUBLISHER) == index,
                "cpu_fraction": by_pid[str(pid)] / wall if str(pid) in by_pid else None,
            }
            if str(pid) in sleeps:
                row["wakeups_per_s"] = sleeps[str(pid)]["sleeps"] / wall
                row["kernel_cpu_fraction"] = sleeps[str(pid)]["kernel_s"] / wall
            counted = packets.get(str(index), {})
            if len(indexes) == 1 and not packets:  # one process: its totals are the worker's
                metrics = result.get("relay_metrics") or {}
                counted = {k: metrics.get(k, 0.0) for k in ("packets_in", "packets_out")}
                if row["cpu_fraction"] is None:
                    row["cpu_fraction"] = result["server_cpu_fraction"]
            if counted:
                row["packets_in_pps"] = counted.get("packets_in", 0.0) / wall
                row["packets_out_pps"] = counted.get("packets_out", 0.0) / wall
                out = counted.get("packets_out", 0.0)
                if row["cpu_fraction"] is not None and out:
                    row["cpu_per_packet_out_us"] = row["cpu_fraction"] * wall / out * 1e6
            if subs and marks is not None:
                stats = window_stats(self.run.streams, subs, marks)
                lat = stats.pop("latency_ns")
                row["received_pps"] = stats["received"] / wall
                row["latency_ms"] = percentiles(lat, 1e-6) if lat.size else {"n": 0}
            rows.append(row)
        return rows


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    result = dict(result)
    result.pop("latency_cdf_ms", None)
    return result


async def run_layout(
    server: RelayServer,
    plan: WorkersPlan,
    label: str,
    *,
    ramp: bool,
    progress: Progress = _no_progress,
) -> dict[str, Any]:
    """The fixed fan-outs (and, with ``ramp``, the ramp) on one relay."""
    steps = sorted(plan.fanouts)
    ramp_steps = [n for n in sorted(plan.ramp_steps) if n > steps[-1]] if ramp else []
    out: dict[str, Any] = {
        "label": label,
        "workers": server.workers or 1,
        "placement": server.placement or "single",
        "config_section": server.workers_section,
        "fanouts": [],
        "ramp": [],
        "setup": [],
    }
    async with Run(server, progress, retries=plan.retries) as run:
        layout = Layout(server, run, plan, progress, label)
        out.update(await layout.start(max([*steps, *ramp_steps])))

        async def step(n: int, duration: float, into: str) -> dict[str, Any]:
            """Grow to ``n`` subscribers (its setup kept), settle, measure one window."""
            setup = await layout.grow(n)
            setup["subscribers"] = n
            out["setup"].append(setup)
            await layout.settle()
            window = await layout.window(duration)
            out[into].append(_slim(window))
            progress(f"{label}: {n} subscribers: {_headline(window)}", None)
            return window

        for n in steps:
            progress(f"{label}: {n} subscribers", None)
            await step(n, plan.duration, "fanouts")
        passing = [w for w in out["fanouts"] if _within(w, plan)]
        stop = None if len(passing) == len(out["fanouts"]) else "a fixed fan-out broke the limits"
        for n in ramp_steps if stop is None else []:
            if plan.spent() > 0.8:
                stop = f"time budget ({plan.budget_s:g} s) nearly spent before {n} subscribers"
                break
            progress(f"{label}: ramp to {n} subscribers", None)
            try:
                window = await step(n, plan.ramp_duration, "ramp")
            except Exception as exc:  # a relay that cannot take more is a result
                stop = f"setting up {n} subscribers failed: {exc}"
                break
            if not _within(window, plan):
                p99 = window["latency_ms"].get("p99", math.inf)
                stop = (
                    f"{n} subscribers: loss {window['loss']:.2%}, p99 {p99:.1f} ms "
                    f"(limits {plan.max_loss:.0%}, {plan.max_p99_ms:g} ms)"
                )
                break
            passing.append(window)
            if window["generator_cpu_fraction"] > 0.95:
                stop = f"{n} subscribers: the load generator is saturated"
                break
        if ramp:
            out["stop_reason"] = stop or f"reached the last step ({(ramp_steps or steps)[-1]})"
            best = max(passing, key=lambda w: w["forwarded_pps"]) if passing else None
            out["capacity"] = (
                {
                    "subscribers": best["subscribers"],
                    "forwarded_pps": best["forwarded_pps"],
                    "server_cpu_fraction": best["server_cpu_fraction"],
                    "generator_cpu_fraction": best["generator_cpu_fraction"],
                    "cpu_per_packet_us": best["cpu_per_packet_us"],
                    "latency_p99_ms": best["latency_ms"].get("p99"),
                }
                if best
                else None
            )
        out["workers_at_end"] = await _workers(layout.relay)
        out["worker_restarts"] = sum(
            int(w.get("restarts") or 0) for w in out["workers_at_end"] or []
        )
        out["renegotiated"] = layout.renegotiated
    return out


def _within(window: dict[str, Any], plan: WorkersPlan) -> bool:
    p99 = window.get("latency_ms", {}).get("p99", math.inf)
    late = p99 > plan.max_p99_ms and not window.get("disturbed")
    return (window.get("loss") or 0.0) <= plan.max_loss and not late


def _headline(window: dict[str, Any]) -> str:
    lat = window.get("latency_ms", {})
    return (
        f"{window.get('forwarded_pps', 0):,.0f} pkt/s, "
        f"{window.get('cpu_per_packet_us') or 0:.1f} us CPU/pkt, "
        f"p50 {lat.get('p50', math.nan):.2f} / p99 {lat.get('p99', math.nan):.2f} ms, "
        f"loss {window.get('loss') or 0:.2%}"
    )


# ---------------------------------------------------------------------------------------------
# The whole command


#: one relay to measure: workers, placement, ramp, round (0: a contrast), the generator's nice
#: value, the relay's scheduler_slice_us (None: its default), what a contrast changes
#: ("nice", "slice"; None: not a contrast)
Planned = tuple[int, str | None, bool, int, int, int | None, str | None]


def run_workers(plan: WorkersPlan, stage: Any, log: Any = print) -> dict[str, Any]:
    """Every layout of ``plan`` on its own relay, then the derived figures and the model."""
    import uvloop

    out: dict[str, Any] = {
        "plan": plan.describe(),
        "media": {
            "kind": "video",
            "packets_per_second": round(media().packets_per_second, 2),
            "bitrate_bps": round(media().bitrate),
            "packet_bytes": media().size,
        },
        "sharing": {
            "relay_cores": sorted(all_cores()),
            "generator_cores": sorted(all_cores()),
            "generator_nice": plan.generator_nice,
            "note": sharing_note(plan),
        },
        "workers_supported": workers_supported(),
        "layouts": [],
        "skipped": {},
        "errors": {},
    }
    plan.started = time.monotonic()
    if plan.wakeup_packets and len(all_cores()) >= 2:
        update = stage("wake-up probe")
        try:
            out["platform_wakeup"] = wakeup.measure(packets=plan.wakeup_packets)
            update(f"done: floor {out['platform_wakeup']['floor_us']:.0f} µs per wake-up", 1.0)
        except Exception as exc:  # the probe is context: the layouts are measured without it
            out["errors"]["wake-up probe"] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
    layouts: list[Planned] = []
    nice = plan.generator_nice
    for r in range(1, plan.rounds + 1):  # the ramp (capacity) in the first round only
        for w in plan.workers:
            layouts.append(
                (w, "spread" if w > 1 else None, plan.ramp and r == 1, r, nice, None, None)
            )
            if w > 1 and plan.pack:
                layouts.append((w, "pack", False, r, nice, None, None))
    if plan.contrast_nice is not None and plan.contrast_nice != nice:
        for w in plan.workers:
            layouts.append(
                (w, "spread" if w > 1 else None, False, 0, plan.contrast_nice, None, "nice")
            )
    if plan.contrast_slice is not None:
        for w in plan.workers:
            layouts.append(
                (w, "spread" if w > 1 else None, False, 0, nice, plan.contrast_slice, "slice")
            )
    before = os.sched_getaffinity(0)
    nice_before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.sched_setaffinity(0, all_cores())
        for w, placement, ramp, r, nice, slice_us, contrast in layouts:
            label = f"{w} worker{'s' if w > 1 else ''}" + (f", {placement}" if placement else "")
            if contrast == "nice":
                label += f", generator nice {nice}"
            elif contrast == "slice":
                label += f", scheduler slice {slice_label(slice_us)}"
            elif plan.rounds > 1:
                label += f", round {r}"
            if r != 1 and plan.spent() > (0.75 if r == 0 else 0.7):
                out["skipped"][label] = (
                    f"time budget ({plan.budget_s:g} s): {plan.spent():.0%} spent"
                )
                continue
            update = stage(label)
            wd = workdir()
            top = max([*plan.fanouts, *(plan.ramp_steps if ramp else ())])
            server = RelayServer(
                wd,
                max_participants=max(1000, top + 2),
                workers=w,
                placement=placement,
                cores=all_cores(),
                scheduler_slice_us=slice_us,
            )
            try:
                server.start()
                # the relay's processes keep nice 0; the generator (this thread) plan's nice
                os.setpriority(os.PRIO_PROCESS, 0, nice)
                result = uvloop.run(run_layout(server, plan, label, ramp=ramp, progress=update))
                result["round"] = r
                result["generator_nice"] = nice
                result["contrast"] = contrast
                result["scheduler_slice_us"] = slice_us
                out["layouts"].append(result)
                last = (result["ramp"] or result["fanouts"] or [{}])[-1]
                update(f"done: {_headline(last)}", 1.0)
            except Exception as exc:  # one failed layout must not lose the others
                out["errors"][label] = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
                log(server.log_tail())
            finally:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, 0, nice_before)
                server.stop()
                shutil.rmtree(wd, ignore_errors=True)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)
    out.update(derive(out["layouts"], media().packets_per_second, out.get("platform_wakeup")))
    return out


# ---------------------------------------------------------------------------------------------
# Derived figures: the table, the pipe, the targets, the scaling model


def _median_window(windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One window standing for the same (layout, N) measured in several rounds: the first one
    with the medians of the figures the derived results use."""
    if len(windows) == 1:
        return windows[0]
    merged = dict(windows[0])

    def med(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    for key in ("cpu_per_packet_us", "server_cpu_fraction", "forwarded_pps", "front_cpu_fraction"):
        merged[key] = med([w.get(key) for w in windows])
    merged["latency_ms"] = dict(windows[0].get("latency_ms", {}))
    for key in ("p50", "p90", "p99"):
        merged["latency_ms"][key] = med([w.get("latency_ms", {}).get(key) for w in windows])
    per_worker = []
    for row in windows[0].get("per_worker") or []:
        same = [
            r
            for w in windows
            for r in w.get("per_worker") or []
            if r["index"] == row["index"] and r["subscribers"] == row["subscribers"]
        ]
        per_worker.append(
            dict(
                row,
                **{
                    key: med([r.get(key) for r in same])
                    for key in ("cpu_fraction", "wakeups_per_s", "kernel_cpu_fraction")
                },
            )
        )
    merged["per_worker"] = per_worker
    merged["rounds"] = len(windows)
    return merged


def _find(layouts: Sequence[dict[str, Any]], workers: int, placement: str) -> dict[str, Any] | None:
    """The layout (every round of it merged: medians per N; the ramp of the round that ran it)."""
    found = [x for x in layouts if x["workers"] == workers and x["placement"] == placement]
    if not found:
        return None
    merged = dict(next((x for x in found if "capacity" in x), found[0]))
    by_n: dict[int, list[dict[str, Any]]] = {}
    for x in found:
        for w in x["fanouts"]:
            by_n.setdefault(w["subscribers"], []).append(w)
    merged["fanouts"] = [_median_window(by_n[n]) for n in sorted(by_n)]
    merged["setup"] = [s for x in found for s in x["setup"]]
    return merged


def _at(layout: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
    if layout is None:
        return None
    return next((w for w in layout["fanouts"] + layout["ramp"] if w["subscribers"] == n), None)


def _cores(window: dict[str, Any]) -> float:
    return float(window["server_cpu_fraction"])


def _importers(window: dict[str, Any]) -> list[dict[str, Any]]:
    """The window's per-worker rows of the workers the track is piped to: subscribers and no
    publisher."""
    return [
        r
        for r in window.get("per_worker") or []
        if r["subscribers"] > 0 and not r["holds_publisher"]
    ]


def _piped_pps(window: dict[str, Any], rate: float) -> float:
    """Packets the publisher's worker pipes per second: one copy of the track to every other
    worker holding subscribers."""
    importers = _importers(window)
    sent = window.get("sent_packets") or 0
    wall = window.get("window_s") or 1.0
    return len(importers) * (sent / wall if sent else rate)


def row_of(layout: dict[str, Any], window: dict[str, Any], kind: str) -> dict[str, Any]:
    lat = window.get("latency_ms", {})
    return {
        "workers": layout["workers"],
        "placement": layout["placement"],
        "kind": kind,
        "round": layout.get("round", 1),
        "generator_nice": layout.get("generator_nice"),
        "contrast": layout.get("contrast") or None,
        "scheduler_slice_us": layout.get("scheduler_slice_us"),
        "subscribers": window["subscribers"],
        "forwarded_pps": window["forwarded_pps"],
        "loss": window.get("loss"),
        "cpu_per_packet_us": window.get("cpu_per_packet_us"),
        "relay_cpu_fraction": window.get("server_cpu_fraction"),
        "front_cpu_fraction": window.get("front_cpu_fraction") if layout["workers"] > 1 else None,
        "generator_cpu_fraction": window.get("generator_cpu_fraction"),
        "background_cpu_fraction": window.get("background_cpu_fraction"),
        "latency_p50_ms": lat.get("p50"),
        "latency_p99_ms": lat.get("p99"),
        "disturbed": window.get("disturbed"),
        "per_worker": [
            {
                "index": r["index"],
                "subscribers": r["subscribers"],
                "holds_publisher": r["holds_publisher"],
                "cpu_fraction": r.get("cpu_fraction"),
                "wakeups_per_s": r.get("wakeups_per_s"),
                "kernel_cpu_fraction": r.get("kernel_cpu_fraction"),
                "packets_out_pps": r.get("packets_out_pps"),
                "latency_p50_ms": (r.get("latency_ms") or {}).get("p50"),
                "latency_p99_ms": (r.get("latency_ms") or {}).get("p99"),
            }
            for r in window.get("per_worker") or []
        ],
    }


def derive(
    every: Sequence[dict[str, Any]], rate: float, wakeup_probe: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The table rows, the pipe's cost, the targets and the scaling model of the layouts
    measured; with the platform's wake-up probe (bench/wakeup.py), the share of the CPU per
    forwarded packet its floor alone would take at each N."""
    rows = []
    for layout in every:
        for w in layout["fanouts"]:
            rows.append(row_of(layout, w, "fan-out"))
        for w in layout["ramp"]:
            rows.append(row_of(layout, w, "ramp"))
    # the contrast layouts (the generator at another nice value, the relay on another
    # scheduler slice) only for their latency
    layouts = [x for x in every if not x.get("contrast")]
    contrast = [x for x in every if x.get("contrast") == "nice"]
    slices = [x for x in every if x.get("contrast") == "slice"]
    one = _find(layouts, 1, "single")
    spread = _find(layouts, 2, "spread")
    pack = _find(layouts, 2, "pack")
    fanouts = sorted({w["subscribers"] for x in layouts for w in x["fanouts"]})
    pipe: dict[str, Any] = {"by_fanout": {}}
    deltas, piped, receiving = [], [], []
    fit = _fit_one(one)
    c_us = fit[1] * 1e6 if fit else None
    for n in fanouts:
        s, p, o = _at(spread, n), _at(pack, n), _at(one, n)
        entry: dict[str, Any] = {}
        if s and p and s.get("cpu_per_packet_us") and p.get("cpu_per_packet_us"):
            d = _cores(s) - _cores(p)
            pp = _piped_pps(s, rate)
            entry["spread_minus_pack_cores"] = d
            entry["piped_pps"] = pp
            entry["pipe_us_per_piped_packet"] = d / pp * 1e6 if pp else None
            entry["pipe_share"] = (s["cpu_per_packet_us"] - p["cpu_per_packet_us"]) / s[
                "cpu_per_packet_us"
            ]
            deltas.append(d)
            piped.append(pp)
            entry.update(_wakeups(s, p, pp))
            recv = _receiving_end(s, p, pp, c_us)
            if recv is not None:
                entry["pipe_receiving_end_us_per_piped_packet"] = recv
                receiving.append(recv)
        if s and o and s.get("cpu_per_packet_us") and o.get("cpu_per_packet_us"):
            entry["two_vs_one_worker_share"] = (
                s["cpu_per_packet_us"] - o["cpu_per_packet_us"]
            ) / s["cpu_per_packet_us"]
            entry["two_minus_one_worker_cores"] = _cores(s) - _cores(o)
        paired = _paired_pipe_shares(layouts, n)
        if paired:
            entry["pipe_share_by_round"] = paired
            entry["pipe_share_paired_median"] = float(np.median(paired))
        if entry:
            pipe["by_fanout"][str(n)] = entry
    pooled = float(np.mean(deltas)) / float(np.mean(piped)) if deltas and np.mean(piped) else None
    pipe["pipe_us_per_piped_packet_pooled"] = pooled * 1e6 if pooled is not None else None
    pipe["pipe_receiving_end_us_median"] = float(np.median(receiving)) if receiving else None
    if pooled is not None:
        for n, entry in pipe["by_fanout"].items():
            s = _at(spread, int(n))
            if s and "piped_pps" in entry:
                entry["pipe_share_pooled"] = pooled * entry["piped_pps"] / _cores(s)
    if wakeup_probe and c_us:
        floor = wakeup_probe["floor_us"]
        pipe["platform_floor_us"] = floor
        pipe["platform_floor_share_by_fanout"] = {
            str(n): floor / (n * c_us + floor) for n in fanouts
        }
    targets = _targets(pipe, one, spread)
    if contrast:
        ratio = _p99_ratio(_find(contrast, 1, "single"), _find(contrast, 2, "spread"))
        ratio["generator_nice"] = contrast[0].get("generator_nice")
        ratio["note"] = "not the target's setting: the generator competing at equal priority"
        targets["p99_two_workers_over_one_at_100_generator_competing"] = ratio
    if slices:
        ratio = _p99_ratio(_find(slices, 1, "single"), _find(slices, 2, "spread"))
        ratio["scheduler_slice_us"] = slices[0].get("scheduler_slice_us")
        ratio["note"] = "not the relay's default: another scheduler slice"
        targets["p99_two_workers_over_one_at_100_other_slice"] = ratio
    model = scaling_model(layouts, pipe, rate)
    return {"table": rows, "pipe": pipe, "targets": targets, "model": model}


def _fit_one(one: dict[str, Any] | None) -> tuple[float, float] | None:
    """Relay CPU (cores) = k0 + c * forwarded packets/s over the 1-worker windows."""
    windows = (one or {}).get("fanouts", []) + (one or {}).get("ramp", [])
    return _fit([(w["forwarded_pps"], _cores(w)) for w in windows if _within_loose(w)])


def _wakeups(spread: dict[str, Any], pack: dict[str, Any], piped_pps: float) -> dict[str, Any]:
    """Where the pipe's CPU goes besides the copies: how often the importing worker wakes per
    piped packet, and the part of spread - pack that the workers spent in the kernel."""
    out: dict[str, Any] = {}
    rows_s, rows_p = spread.get("per_worker") or [], pack.get("per_worker") or []
    importers = _importers(spread)
    if piped_pps and importers and all(r.get("wakeups_per_s") is not None for r in importers):
        out["importer_wakeups_per_piped_packet"] = (
            sum(r["wakeups_per_s"] for r in importers) / piped_pps
        )
    rows = rows_s + rows_p
    if rows_s and rows_p and all(r.get("kernel_cpu_fraction") is not None for r in rows):
        out["spread_minus_pack_kernel_cores"] = sum(r["kernel_cpu_fraction"] for r in rows_s) - sum(
            r["kernel_cpu_fraction"] for r in rows_p
        )
    return out


def _receiving_end(
    spread: dict[str, Any], pack: dict[str, Any], piped_pps: float, c_us: float | None
) -> float | None:
    """µs per piped packet on the importing worker: its CPU in the spread window, less the same
    worker's CPU in the pack window (idle there), less its local fan-out at c µs per copy."""
    if not c_us or not piped_pps:
        return None
    importers = [r for r in _importers(spread) if r.get("cpu_fraction") is not None]
    if len(importers) != 1:
        return None
    imp = importers[0]
    idle = next(
        (
            r.get("cpu_fraction")
            for r in pack.get("per_worker") or []
            if r["index"] == imp["index"] and r["subscribers"] == 0
        ),
        None,
    )
    if idle is None:
        return None
    local = imp["subscribers"] * piped_pps * c_us * 1e-6
    return (imp["cpu_fraction"] - idle - local) / piped_pps * 1e6


def _paired_pipe_shares(layouts: Sequence[dict[str, Any]], n: int) -> list[float]:
    """The pipe share at ``n`` subscribers round by round: each round's spread window against
    the pack window measured right after it (what drifts between rounds cancels out)."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for x in layouts:
        if x["workers"] == 2 and x["placement"] in ("spread", "pack"):
            by_round.setdefault(x.get("round", 1), {})[x["placement"]] = x
    shares = []
    for r in sorted(by_round):
        s, p = _at(by_round[r].get("spread"), n), _at(by_round[r].get("pack"), n)
        if s and p and s.get("cpu_per_packet_us") and p.get("cpu_per_packet_us"):
            shares.append(
                (s["cpu_per_packet_us"] - p["cpu_per_packet_us"]) / s["cpu_per_packet_us"]
            )
    return shares


def _targets(
    pipe: dict[str, Any], one: dict[str, Any] | None, spread: dict[str, Any] | None
) -> dict[str, Any]:
    paired = all("pipe_share_paired_median" in e for e in pipe["by_fanout"].values())
    key = "pipe_share_paired_median" if paired and pipe["by_fanout"] else "pipe_share"
    shares = {n: e.get(key) for n, e in pipe["by_fanout"].items() if key in e}
    worst = max(shares.values()) if shares else None
    overhead = {
        n: e.get("two_vs_one_worker_share")
        for n, e in pipe["by_fanout"].items()
        if e.get("two_vs_one_worker_share") is not None
    }
    return {
        "pipe_share_of_cpu_per_forwarded_packet": {
            "by_fanout": shares,
            "worst": worst,
            "limit": PIPE_SHARE_MAX,
            "method": "(CPU/pkt 2 workers spread - 2 workers pack) / CPU/pkt spread, same N"
            + (", each round's pair, median over the rounds" if key != "pipe_share" else ""),
            "met": None if worst is None else worst <= PIPE_SHARE_MAX,
        },
        "two_workers_vs_one_cpu_share": {
            "by_fanout": overhead,
            "worst": max(overhead.values()) if overhead else None,
            "limit": PIPE_SHARE_MAX,
            "method": "(CPU/pkt 2 workers spread - 1 worker) / CPU/pkt 2 workers: the pipe, the "
            "front process and the second worker's own upkeep together",
            "met": None if not overhead else max(overhead.values()) <= PIPE_SHARE_MAX,
        },
        "p99_two_workers_over_one_at_100": _p99_ratio(one, spread),
    }


def _ratio_text(ratio: dict[str, Any]) -> str:
    """'p99 with 2 workers ms / p99 with 1 worker ms = ratio' of a :func:`_p99_ratio`."""
    return (
        f"{_f(ratio['p99_2_workers_ms'], 2)} ms / {_f(ratio['p99_1_worker_ms'], 2)} ms = "
        f"{_f(ratio['ratio'], 3)}"
    )


def _p99_ratio(one: dict[str, Any] | None, spread: dict[str, Any] | None) -> dict[str, Any]:
    s, o = _at(spread, P99_RATIO_FANOUT), _at(one, P99_RATIO_FANOUT)
    p99_2 = (s or {}).get("latency_ms", {}).get("p99")
    p99_1 = (o or {}).get("latency_ms", {}).get("p99")
    ratio = p99_2 / p99_1 if p99_2 and p99_1 else None
    return {
        "subscribers": P99_RATIO_FANOUT,
        "p99_1_worker_ms": p99_1,
        "p99_2_workers_ms": p99_2,
        "ratio": ratio,
        "limit": P99_RATIO_MAX,
        "met": None if ratio is None else ratio <= P99_RATIO_MAX,
    }


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares ``y = a + b x``: (a, b), or None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    xs = np.array([x for x, _ in points])
    ys = np.array([y for _, y in points])
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


def scaling_model(layouts: Sequence[dict[str, Any]], pipe: dict[str, Any], rate: float) -> dict:
    """The constants measured here and what they predict for bigger machines (one worker per
    core). Formulas are in ``model["formulas"]``; every constant is a measurement of this run."""
    one = _find(layouts, 1, "single")
    spread = [x for x in layouts if x["placement"] == "spread"]
    fit = _fit_one(one)
    c_us = fit[1] * 1e6 if fit else None  # CPU per forwarded copy (µs), one worker
    # cores of one worker at no fan-out (ingress, timers): the fit's intercept, not below 0
    k0 = max(0.0, fit[0]) if fit else None
    cap_1 = ((one or {}).get("capacity") or {}).get("forwarded_pps")
    # a ramp that ran out of steps measured a lower bound, not the capacity
    cap_1_limited = bool(one and not str(one.get("stop_reason", "")).startswith("reached"))
    cap_cpu_1 = ((one or {}).get("capacity") or {}).get("server_cpu_fraction")
    # forwarded packets/s one fully busy worker would carry: from the capacity step of 1 worker
    # (latency-limited) and from the fitted cost (CPU-limited)
    per_worker_cpu_bound = (1.0 - (k0 or 0.0)) / (c_us * 1e-6) if c_us else None
    p_us = pipe.get("pipe_us_per_piped_packet_pooled")
    # the front: its CPU while media flows (per worker it serves) and per subscriber set up
    front_steady, front_join = [], []
    for x in spread:
        if x["workers"] < 2:
            continue
        for w in x["fanouts"] + x["ramp"]:
            if w.get("front_cpu_fraction") is not None:
                front_steady.append(w["front_cpu_fraction"] / x["workers"])
        for s in x["setup"]:
            if s["joined"]:
                front_join.append(s["front_cpu_per_subscriber_ms"])
    l_front = float(np.median(front_steady)) if front_steady else None
    j_front_ms = float(np.median(front_join)) if front_join else None
    capacities = {
        str(x["workers"]): (x.get("capacity") or {}).get("forwarded_pps")
        for x in spread
        if "capacity" in x
    }
    constants = {
        "publisher_pps": rate,
        "cpu_per_forwarded_packet_us": c_us,
        "worker_base_cores": k0,
        "worker_base_cores_fit": fit[0] if fit else None,
        "pipe_us_per_piped_packet": p_us,
        "pipe_receiving_end_us": pipe.get("pipe_receiving_end_us_median"),
        "capacity_pps_1_worker_measured": cap_1,
        "capacity_1_worker_is_limit": cap_1_limited,
        "capacity_cpu_1_worker": cap_cpu_1,
        "forwarded_pps_per_worker_cpu_bound": per_worker_cpu_bound,
        "front_cores_per_worker_steady": l_front,
        "front_cpu_per_subscriber_setup_ms": j_front_ms,
        "capacity_pps_measured_by_workers": capacities,
    }
    formulas = {
        "F": "forwarded packets/s per worker: F = min(capacity of 1 worker measured (when the "
        "ramp hit a limit), (1 - k0) / c); the measured one is latency-bound (one room's fan-out "
        "bursts), the other CPU-bound (many rooms)",
        "aggregate": "many rooms, nothing piped: X(W) = W * F",
        "one_room": "one publisher (r packets/s) to N subscribers spread over W workers: relay CPU "
        "(cores) = W * k0 + N * r * c + (W - 1) * r * p",
        "pipe_share": "pipe share of the room's CPU per forwarded packet = (W - 1) * p / (N * c + "
        "(W - 1) * p + k0 / r) (k0 / r: ingress per published packet, once); under 10 % needs "
        "N >= 9 * (W - 1) * p / c (k0 aside)",
        "exporter": "the publisher's worker sends W - 1 pipe copies per packet, p_send = p / 2 "
        "each (assumed: the receiving-end estimate is within its noise): it saturates when "
        "r * (W - 1) * p / 2 + its own subscribers' r * N / W * c reaches one core",
        "front": "front CPU (cores) = W * l + J * j (J subscribers set up per second): it saturates "
        "at J_max = (1 - W * l) / j",
        "latency": "p99 grows with each worker's own fan-out N / W, plus one loopback hop for "
        "subscribers on an importing worker",
    }
    predictions = {}
    for cores in (2, 16, 64):
        predictions[str(cores)] = _predict(cores, constants)
    return {"constants": constants, "formulas": formulas, "predictions": predictions}


def _within_loose(window: dict[str, Any]) -> bool:
    return (window.get("loss") or 0.0) <= MAX_LOSS


def _predict(cores: int, k: dict[str, Any]) -> dict[str, Any]:
    """What the formulas give for a machine of ``cores`` cores, one worker per core (the load
    generator elsewhere)."""
    w = cores
    c = (k["cpu_per_forwarded_packet_us"] or 0.0) * 1e-6
    p = (k["pipe_us_per_piped_packet"] or 0.0) * 1e-6
    r = k["publisher_pps"]
    k0 = k["worker_base_cores"] or 0.0
    measured = k["capacity_pps_1_worker_measured"] if k["capacity_1_worker_is_limit"] else None
    cands = [x for x in (measured, k["forwarded_pps_per_worker_cpu_bound"]) if x]
    f = min(cands) if cands else None
    out: dict[str, Any] = {"workers": w, "forwarded_pps_per_worker": f}
    out["aggregate_forwarded_pps"] = w * f if f else None
    if c > 0 and f:
        # one room: N subscribers such that the relay's CPU is W cores at F per worker
        budget = w * f * c  # cores of forwarding the aggregate capacity is
        n_max = (budget - (w - 1) * r * p) / (r * c)
        out["one_room_max_subscribers"] = max(0.0, n_max)
        out["one_room_min_subscribers_for_pipe_10pct"] = 9 * (w - 1) * p / c if p else 0.0
        for n in (100, 1000):
            forwarding = n * r * c
            piping = (w - 1) * r * p
            out[f"pipe_share_at_{n}"] = piping / (forwarding + piping + k0) if p else 0.0
        # exporter: half of p (the receiving-end estimate subtracts a whole worker's fan-out
        # from its CPU and stays within that noise; in process, bench.pipe finds 56 % / 44 %)
        out["exporter_pipe_cores"] = r * (w - 1) * p / 2
    l_front = k["front_cores_per_worker_steady"]
    j = k["front_cpu_per_subscriber_setup_ms"]
    if l_front is not None:
        out["front_steady_cores"] = w * l_front
        out["front_saturates_at_workers"] = 1.0 / l_front if l_front > 0 else math.inf
    if l_front is not None and j:
        out["front_max_subscribers_set_up_per_s"] = max(0.0, 1.0 - w * l_front) / (j * 1e-3)
    return out


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _pct(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def _met(value: Any) -> str:
    return {True: "**met**", False: "**missed**", None: "not measured"}[value]


def report_lines(data: dict[str, Any]) -> list[str]:
    rate = data["media"]["packets_per_second"]
    rounds = int(data.get("plan", {}).get("rounds", 1))
    lines = [
        "## Workers: one publisher to N subscribers, by worker processes",
        "",
        f"One publisher, 1 Mbit/s video ({rate:g} packets/s of {data['media']['packet_bytes']} B) "
        "to N subscribers in one room; every connection a real ICE/DTLS/SRTP one. `spread`: "
        "subscribers on the least loaded worker (the publisher's worker pipes the track once to "
        "the other); `pack`: everyone on one worker (the same processes, nothing piped). Relay "
        "CPU: the front and every worker process (`/proc/<pid>/task/*/schedstat`), in cores; "
        "CPU µs/pkt: relay CPU over packets the subscribers received. Latency: the publisher's "
        "`sendmmsg` of the packet's frame to the subscriber socket's kernel receive timestamp.",
        "",
        f"Cores: {data['sharing']['note']}",
        "",
        "| workers, placement | N | forwarded pkt/s | loss | CPU µs/fwd pkt | relay CPU "
        "(front) | generator CPU | p50 / p99 ms | per worker: subscribers, CPU, p50 / p99 ms "
        "| busy |",
        "|---" * 9 + "|",
    ]
    for r in data.get("table", []):
        label = f"{r['workers']}, {r['placement']}" + (" (ramp)" if r["kind"] == "ramp" else "")
        if r.get("contrast") == "slice":
            label += f", scheduler slice {slice_label(r.get('scheduler_slice_us'))}"
        elif r.get("contrast"):
            label += f", generator nice {r['generator_nice']}"
        elif rounds > 1 and r["kind"] != "ramp":
            label += f", round {r['round']}"
        per = "; ".join(
            f"w{x['index']}{'*' if x['holds_publisher'] else ''}: {x['subscribers']}, "
            f"{_pct(x['cpu_fraction'], 0)}, {_f(x['latency_p50_ms'], 2)} / "
            f"{_f(x['latency_p99_ms'], 2)}"
            for x in r["per_worker"]
        )
        front = (
            f" ({_pct(r['front_cpu_fraction'], 1)})" if r["front_cpu_fraction"] is not None else ""
        )
        lines.append(
            f"| {label} | {r['subscribers']} | {_f(r['forwarded_pps'], 0)} | "
            f"{_pct(r['loss'], 2)} | {_f(r['cpu_per_packet_us'], 2)} | "
            f"{_pct(r['relay_cpu_fraction'], 0)}{front} | {_pct(r['generator_cpu_fraction'], 0)} "
            f"| {_f(r['latency_p50_ms'], 2)} / {_f(r['latency_p99_ms'], 2)} | {per or '–'} "
            f"| {'yes' if r['disturbed'] else 'no'} |"
        )
    lines += ["", "`w1*`: the worker holding the publisher (the exporter of the pipe).", ""]
    lines += ["### Capacity of one publisher to N on this machine", ""]
    for layout in data.get("layouts", []):
        if "capacity" not in layout:
            continue
        cap = layout.get("capacity")
        lines.append(
            f"- {layout['label']}: "
            + (
                f"**{cap['forwarded_pps']:,.0f} forwarded packets/s** at {cap['subscribers']} "
                f"subscribers (relay {_pct(cap['server_cpu_fraction'], 0)} of a core, generator "
                f"{_pct(cap['generator_cpu_fraction'], 0)}, {_f(cap['cpu_per_packet_us'], 2)} µs "
                f"CPU per packet, p99 {_f(cap['latency_p99_ms'], 2)} ms)"
                if cap
                else "no step within the limits"
            )
            + f"; stopped: {layout.get('stop_reason')}."
        )
    lines += [
        "",
        f"Limits of a step: loss <= {MAX_LOSS:.0%}, p99 <= {MAX_P99_MS:g} ms.",
        "",
        "### The pipe",
        "",
        "| N | spread − pack (cores) | piped pkt/s | µs per piped pkt | pipe share (spread vs pack) "
        "| pipe share by round (median) | pipe share (pooled µs/piped pkt) "
        "| 2 workers vs 1 (CPU/pkt) | importer wake-ups per piped pkt |",
        "|---" * 9 + "|",
    ]
    pipe = data.get("pipe", {})
    for n, e in pipe.get("by_fanout", {}).items():
        lines.append(
            f"| {n} | {_f(e.get('spread_minus_pack_cores'), 4)} | {_f(e.get('piped_pps'), 0)} | "
            f"{_f(e.get('pipe_us_per_piped_packet'), 1)} | {_pct(e.get('pipe_share'))} | "
            + (
                ", ".join(_pct(v) for v in e["pipe_share_by_round"])
                + f" ({_pct(e.get('pipe_share_paired_median'))})"
                if e.get("pipe_share_by_round")
                else "–"
            )
            + f" | {_pct(e.get('pipe_share_pooled'), 2)} | "
            f"{_pct(e.get('two_vs_one_worker_share'))} | "
            f"{_f(e.get('importer_wakeups_per_piped_packet'), 2)} |"
        )
    lines += [
        "",
        f"Pooled pipe cost: {_f(pipe.get('pipe_us_per_piped_packet_pooled'), 1)} µs of relay CPU "
        "per piped packet (both ends: the exporter's send, the importer's receive and history), "
        "the mean spread − pack CPU over the mean piped packet rate. The per-N shares are the "
        "difference of two windows on two relays and carry their noise (a few % of a core): "
        "'spread vs pack' compares the medians over the rounds, 'by round' each round's spread "
        "window with the pack window measured right after it, which cancels what drifts between "
        "rounds (the target takes the median of those). The last column: how often the "
        "importing worker slept and was woken per piped packet (its voluntary context "
        "switches, /proc/<pid>/task/*/status). Near 1, it wakes for almost every packet, and "
        "the cost of a wake-up (the kernel's switch to it, the event loop's turn) is paid per "
        "piped packet. Packets reach the publisher's worker one at a time (a browser paces "
        "them; here the generator sends a frame's packets in one sendmmsg, yet the publisher's "
        "worker also wakes about once per packet: it takes each as it arrives, before the next "
        "is there), and each goes down the pipe at once. The workers' system "
        "time is in the JSON (`kernel_cpu_fraction` per worker; clock ticks, coarse).",
        "",
    ]
    probe = data.get("platform_wakeup")
    if probe:
        floor_shares = pipe.get("platform_floor_share_by_fanout", {})
        lines += [
            f"The machine's floor (`python -m bench.wakeup`, run before the layouts: "
            f"{probe['packets']} datagrams at {probe['rate']:g}/s from one core to a uvloop "
            f"process on the other, which only counts them): a `sendto` that wakes the sleeping "
            f"process costs {_f(probe['wake_send_us'])} µs of CPU against "
            f"{_f(probe['warm_send_us'])} µs for one that wakes nobody, the first `sendto` after "
            f"sleeping {_f(probe['cold_send_us'])} µs, and the woken process "
            f"{_f(probe['receiver_us'])} µs per wake-up "
            f"({_f(probe['receiver_sleeps_per_packet'], 2)} sleeps per datagram). Waking the "
            f"importing worker for a piped packet thus costs **{_f(probe['floor_us'])} µs** "
            "before any work of the pipe, whatever the pipe does"
            + (
                "; that floor alone is "
                + ", ".join(f"{_pct(v)} at N = {n}" for n, v in floor_shares.items())
                + " of the CPU per forwarded packet (floor / (N · c + floor), c of this run)"
                if floor_shares
                else ""
            )
            + ".",
            "",
        ]
    lines += [
        "### Targets (measured, not asserted)",
        "",
    ]
    t = data.get("targets", {})
    share = t.get("pipe_share_of_cpu_per_forwarded_packet", {})
    if share:
        lines.append(
            f"- Pipe <= {PIPE_SHARE_MAX:.0%} of the CPU per forwarded packet: {_met(share['met'])}"
            f" (worst {_pct(share['worst'])}; by N: "
            + ", ".join(f"{n}: {_pct(v)}" for n, v in share["by_fanout"].items())
            + f"; {share['method']})"
            + (
                "; the machine's wake-up floor alone: "
                + ", ".join(f"{n}: {_pct(v)}" for n, v in floors.items())
                if (floors := pipe.get("platform_floor_share_by_fanout"))
                else ""
            )
            + "."
        )
    over = t.get("two_workers_vs_one_cpu_share", {})
    if over:
        lines.append(
            f"- The same bound on 2 workers against 1 worker (pipe, front process and the second "
            f"worker's upkeep): {_met(over['met'])} (worst {_pct(over['worst'])}; by N: "
            + ", ".join(f"{n}: {_pct(v)}" for n, v in over["by_fanout"].items())
            + ")."
        )
    p99 = t.get("p99_two_workers_over_one_at_100", {})
    if p99:
        lines.append(
            f"- p99 with 2 workers <= {P99_RATIO_MAX:g} x one worker's at N = "
            f"{p99['subscribers']}: {_met(p99['met'])} ({_ratio_text(p99)})."
        )
    competing = t.get("p99_two_workers_over_one_at_100_generator_competing", {})
    if competing:
        lines.append(
            f"- For contrast, the generator at nice {competing.get('generator_nice')} (competing "
            f"with the relay at equal priority): {_ratio_text(competing)} (not the target's "
            "setting: on a machine of its own the relay does not share its cores with its "
            "subscribers)."
        )
    other = t.get("p99_two_workers_over_one_at_100_other_slice", {})
    if other:
        lines.append(
            f"- For contrast, the relay's processes on {slice_label(other.get('scheduler_slice_us'))}"
            f" scheduler slice: {_ratio_text(other)}."
        )
    lines += [""] + model_lines(data.get("model", {}))
    for layout in data.get("layouts", []):
        if layout.get("worker_restarts"):
            lines.append(
                f"- {layout['label']}: {layout['worker_restarts']} worker restart(s) during the run"
            )
    for name, reason in data.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    for name, error in data.get("errors", {}).items():
        lines.append(f"- {name} failed: {error}")
    return lines


def model_lines(model: dict[str, Any]) -> list[str]:
    if not model:
        return []
    k = model["constants"]
    lines = [
        "### Scaling model (one worker per core; check it on a bigger machine)",
        "",
        "Constants measured in this run:",
        "",
        f"- r = {_f(k['publisher_pps'], 1)} packets/s (the publisher)",
        f"- c = {_f(k['cpu_per_forwarded_packet_us'], 2)} µs of CPU per forwarded packet, one "
        "worker (slope of relay CPU over forwarded packets/s across the 1-worker windows)",
        f"- k0 = {_f(k['worker_base_cores'], 3)} cores of a worker at no fan-out (intercept: "
        f"ingress of the publisher's packets, timers; the fit gives "
        f"{_f(k.get('worker_base_cores_fit'), 3)}, within its noise of 0)",
        f"- p = {_f(k['pipe_us_per_piped_packet'], 1)} µs of CPU per piped packet (both ends; "
        f"the receiving end alone, the importing worker's CPU less its idle CPU and its local "
        f"fan-out at c: {_f(k.get('pipe_receiving_end_us'), 1)} µs median, within the noise "
        "of that subtraction; the model takes p / 2 for the sending end)",
        f"- F = {_f(k['capacity_pps_1_worker_measured'], 0)} forwarded packets/s per worker "
        f"(1-worker capacity within the latency/loss limits, at "
        f"{_pct(k['capacity_cpu_1_worker'], 0)} of a core); CPU-bound: (1 − k0) / c = "
        f"{_f(k['forwarded_pps_per_worker_cpu_bound'], 0)}",
        f"- l = {_f(k['front_cores_per_worker_steady'], 4)} cores of the front process per worker "
        "while media flows (load reports, health)",
        f"- j = {_f(k['front_cpu_per_subscriber_setup_ms'], 2)} ms of front CPU per subscriber "
        "set up (join, offer, answer, events)",
        "- measured capacity by workers: "
        + ", ".join(
            f"{w}: {_f(v, 0)} pkt/s" for w, v in k["capacity_pps_measured_by_workers"].items()
        ),
        "",
        "Formulas:",
        "",
    ]
    lines += [f"- {v}" for v in model["formulas"].values()]
    lines += [
        "",
        "| cores = workers | F per worker | aggregate pkt/s | one room: max N | N for pipe <= 10 % "
        "| pipe share at N = 100 / 1000 | exporter's pipe CPU | front CPU (steady) "
        "| front saturates at W | max subscribers set up/s |",
        "|---" * 10 + "|",
    ]
    for cores, p in model["predictions"].items():
        lines.append(
            f"| {cores} | {_f(p.get('forwarded_pps_per_worker'), 0)} | "
            f"{_f(p.get('aggregate_forwarded_pps'), 0)} | {_f(p.get('one_room_max_subscribers'), 0)} "
            f"| {_f(p.get('one_room_min_subscribers_for_pipe_10pct'), 0)} | "
            f"{_pct(p.get('pipe_share_at_100'))} / {_pct(p.get('pipe_share_at_1000'))} | "
            f"{_pct(p.get('exporter_pipe_cores'), 1)} | {_pct(p.get('front_steady_cores'), 1)} | "
            f"{_f(p.get('front_saturates_at_workers'), 0)} | "
            f"{_f(p.get('front_max_subscribers_set_up_per_s'), 0)} |"
        )
    lines.append("")
    return lines


def plot(data: dict[str, Any], path: Any) -> bool:
    """CPU per forwarded packet and p99 latency against N, one line per layout (the median of
    the rounds, the ramp steps after the fixed fan-outs); False without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layouts = [x for x in data.get("layouts") or [] if not x.get("contrast")]
    keys = sorted({(x["workers"], x["placement"]) for x in layouts})
    if not keys:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for workers, placement in keys:
        merged = _find(layouts, workers, placement)
        if merged is None:
            continue
        windows = merged["fanouts"] + merged["ramp"]
        ns = [w["subscribers"] for w in windows]
        label = f"{workers} worker{'s' if workers > 1 else ''}, {placement}"
        left.plot(ns, [w.get("cpu_per_packet_us") for w in windows], marker="o", label=label)
        right.plot(
            ns, [w.get("latency_ms", {}).get("p99") for w in windows], marker="o", label=label
        )
    left.set_xlabel("subscribers of one 1 Mbit/s publisher")
    left.set_ylabel("relay CPU per forwarded packet (µs)")
    right.set_xlabel("subscribers of one 1 Mbit/s publisher")
    right.set_ylabel("latency p99 (ms)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Worker processes: one publisher to N subscribers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
