"""The three bench commands and their configurations (full and ``--quick``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import hotpath, netns
from bench.common import GENERATOR_CORE, SERVER_CORE, pin_to
from bench.load import Progress, Scenario, run_ramp, run_scenario
from bench.loadgen import MediaSpec
from bench.servers import ServerError, janus_available, make_server, workdir

SYSTEM_ORDER = ("relay", "janus", "ceiling", "naive_aiortc")
TARGETS = {
    "relay_cpu_per_packet_vs_janus_max": 1.0,
    "half_capacity_latency_p50_ms_max": 0.5,
    "half_capacity_latency_p99_ms_max": 2.0,
    "one_to_50_loss_max": 0.001,
}


@dataclass
class Config:
    """Sizes of every run; ``quick()`` is the under-two-minutes variant."""

    quick: bool = False
    hotpath_fanouts: tuple[int, ...] = hotpath.FANOUTS
    hotpath_samples: int = 2000
    settle: float = 2.0
    duration: float = 8.0
    one_to_many: int = 50
    group_size: int = 6
    audio_rooms: int = 10
    audio_room_size: int = 5
    ramp_steps: tuple[int, ...] = (25, 50, 100, 150, 200, 250, 300, 400, 500, 600, 800)
    ramp_duration: float = 5.0
    compare_fanouts: tuple[int, ...] = (5, 10, 20, 40)
    codec_subscribers: int = 2
    codec_seconds: float = 8.0
    simulcast_fanouts: tuple[int, ...] = (10, 40)
    simulcast_settle: float = 3.0  # then on until every subscriber is on its layer, at most:
    simulcast_max_settle: float = 20.0
    simulcast_feedback: bool = True  # subscribers send transport-cc feedback
    switch_period: float = 1.0
    keyframe_every: int = 15  # frames (0.5 s): how soon a switch finds a keyframe
    scenarios: tuple[str, ...] = (
        "one_to_one",
        "group",
        "one_to_many",
        "audio_rooms",
        "ramp",
        "half_capacity",
    )
    systems: tuple[str, ...] = SYSTEM_ORDER
    profile_dir: Path | None = None  # py-spy profiles of the relay's windows (``--profile``)
    retries: int = 2  # windows disturbed by other processes are measured again this often
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_config(cls) -> Config:
        return cls(
            quick=True,
            hotpath_fanouts=(1, 5, 20),
            hotpath_samples=150,
            settle=1.0,
            duration=2.0,
            one_to_many=10,
            group_size=3,
            audio_rooms=2,
            audio_room_size=3,
            ramp_steps=(5, 10, 20),
            ramp_duration=2.0,
            compare_fanouts=(3,),
            codec_subscribers=1,
            codec_seconds=2.0,
            simulcast_fanouts=(6,),
            simulcast_settle=1.0,
            simulcast_max_settle=8.0,
            retries=0,
        )

    def describe(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in self.__dict__.items()
            if k != "extra"
        } | self.extra


def video_1mbps() -> MediaSpec:
    return MediaSpec.video(bitrate=1e6, size=1200, fps=30)


def load_scenarios(cfg: Config) -> dict[str, Scenario]:
    av = (MediaSpec.audio(), video_1mbps())
    common = {"settle": cfg.settle, "duration": cfg.duration}
    return {
        "one_to_one": Scenario("one_to_one", publishers=2, group=True, media=av, **common),
        "group": Scenario("group", publishers=cfg.group_size, group=True, media=av, **common),
        "one_to_many": Scenario(
            "one_to_many", subscribers=cfg.one_to_many, media=(video_1mbps(),), **common
        ),
        "audio_rooms": Scenario(
            "audio_rooms",
            rooms=cfg.audio_rooms,
            publishers=cfg.audio_room_size,
            group=True,
            media=(MediaSpec.audio(),),
            **common,
        ),
    }


class Reporter:
    """Progress for the terminal (rich when available and wanted), silent otherwise."""

    def __init__(self, enabled: bool, plain: bool = False) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._plain = plain  # no terminal: one line per finished stage on stderr
        if enabled:
            with contextlib.suppress(ImportError):
                from rich.progress import (
                    BarColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._progress = Progress(
                    TextColumn("[bold]{task.fields[stage]:<14}"),
                    BarColumn(),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    refresh_per_second=4,
                )

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        with self._progress:
            yield

    def stage(self, name: str, total: float = 1.0) -> Progress:
        """A new bar; returns the callback that advances it."""
        if self._progress is None:
            if not self._plain:
                return lambda message, fraction=None: None

            def line(message: str, fraction: float | None = None) -> None:
                if message.startswith("done") or "again" in message:
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", file=sys.stderr)

            return line
        task = self._progress.add_task(name, total=total, stage=name)

        def update(message: str, fraction: float | None = None) -> None:
            kwargs: dict[str, Any] = {"description": message}
            if fraction is not None:
                kwargs["completed"] = max(0.0, min(1.0, fraction)) * total
            self._progress.update(task, **kwargs)

        return update

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.log(message)
        elif self._plain:
            print(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------


def run_hotpath(cfg: Config, reporter: Reporter) -> dict[str, Any]:
    update = reporter.stage("hotpath")
    with pinned(SERVER_CORE):
        return hotpath.run(cfg.hotpath_fanouts, cfg.hotpath_samples, update)


@contextlib.contextmanager
def pinned(core: int) -> Iterator[list[int] | None]:
    before = os.sched_getaffinity(0)
    try:
        yield pin_to(core)
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def _with_server(name: str, body: Callable[[Any], Any], **kwargs: Any) -> Any:
    wd = workdir()
    server = make_server(name, wd, **kwargs)
    try:
        server.start()
        return body(server)
    finally:
        server.stop()
        shutil.rmtree(wd, ignore_errors=True)


def _loop_run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


def run_load(cfg: Config, reporter: Reporter) -> dict[str, Any]:
    """The real relay under each scenario, one relay process per scenario."""
    scenarios = load_scenarios(cfg)
    out: dict[str, Any] = {"scenarios": {}, "errors": {}}
    with pinned(GENERATOR_CORE):
        for name in cfg.scenarios:
            update = reporter.stage(name)
            try:
                if name in scenarios:
                    result = _with_server(
                        "relay",
                        lambda s, sc=scenarios[name], u=update: _loop_run(
                            run_scenario(s, sc, u, cfg.profile_dir, cfg.retries)
                        ),
                    )
                elif name == "ramp":
                    base = Scenario(
                        "ramp",
                        media=(video_1mbps(),),
                        settle=cfg.settle,
                        duration=cfg.ramp_duration,
                    )
                    result = _with_server(
                        "relay",
                        lambda s, u=update, b=base: _loop_run(
                            run_ramp(s, b, cfg.ramp_steps, progress=u, retries=cfg.retries)
                        ),
                    )
                elif name == "half_capacity":
                    capacity = (out["scenarios"].get("ramp") or {}).get("capacity")
                    if not capacity:
                        out["errors"][name] = "no capacity measured (run the ramp first)"
                        continue
                    n = max(1, int(capacity["subscribers"]) // 2)
                    sc = Scenario(
                        "half_capacity",
                        subscribers=n,
                        media=(video_1mbps(),),
                        settle=cfg.settle,
                        duration=cfg.duration,
                    )
                    result = _with_server(
                        "relay",
                        lambda s, sc=sc, u=update: _loop_run(
                            run_scenario(s, sc, u, cfg.profile_dir, cfg.retries)
                        ),
                    )
                else:
                    out["errors"][name] = "unknown scenario"
                    continue
                out["scenarios"][name] = result
                update(f"done: {_headline(result)}", 1.0)
            except Exception as exc:  # one failed scenario must not lose the others
                out["errors"][name] = f"{type(exc).__name__}: {exc}"
                reporter.log(traceback.format_exc())
    return out


def _headline(result: dict[str, Any]) -> str:
    if "capacity" in result:
        cap = result["capacity"]
        return f"capacity {cap['forwarded_pps']:.0f} pkt/s" if cap else "no passing step"
    cpp = result.get("cpu_per_packet_us")
    return f"{result.get('forwarded_pps', 0):.0f} pkt/s, {cpp:.1f} us CPU/pkt" if cpp else "done"


def run_compare(cfg: Config, reporter: Reporter) -> dict[str, Any]:
    """The same loads against every system, one after the other, in this run."""
    av = (MediaSpec.audio(), video_1mbps())
    out: dict[str, Any] = {"fanout": {}, "codec": {}, "skipped": {}, "errors": {}}
    systems = [s for s in SYSTEM_ORDER if s in cfg.systems]
    if "janus" in systems:
        reason = janus_available()
        if reason is None and not netns.inside():
            reason = "Janus needs the bench network namespace (run without --no-netns, as root)"
        if reason is not None:
            out["skipped"]["janus"] = reason
            systems.remove("janus")
    frames = None
    with pinned(GENERATOR_CORE):
        for system in systems:
            if system == "naive_aiortc":
                continue
            update = reporter.stage(system)
            results = []
            try:

                def sweep(
                    server: Any, update: Progress = update, found: list[dict[str, Any]] = results
                ) -> list[dict[str, Any]]:
                    for n in cfg.compare_fanouts:
                        sc = Scenario(
                            f"fanout{n}",
                            subscribers=n,
                            media=av,
                            settle=cfg.settle,
                            duration=cfg.duration,
                        )
                        result = _loop_run(
                            run_scenario(server, sc, update, cfg.profile_dir, cfg.retries)
                        )
                        result["subscribers"] = n
                        found.append(result)
                    return found

                _with_server(system, sweep)
                update(f"done: {_headline(results[-1])}", 1.0)
            except (ServerError, Exception) as exc:
                out["errors"][system] = f"{type(exc).__name__}: {exc}"
                reporter.log(traceback.format_exc())
            out["fanout"][system] = results
        if "naive_aiortc" in cfg.systems:
            from bench.codec import vp8_frames

            frames = vp8_frames()
            codec = Scenario(
                "codec",
                subscribers=cfg.codec_subscribers,
                media=(MediaSpec.video(bitrate=4e5, fps=15),),
                settle=max(cfg.settle, 3.0),
                duration=cfg.codec_seconds,
                codec_frames=frames,
            )
            for system in ("relay", "naive_aiortc"):
                update = reporter.stage(f"codec/{system}")
                try:
                    result = _with_server(
                        system,
                        lambda s, u=update: _loop_run(
                            run_scenario(s, codec, u, retries=cfg.retries)
                        ),
                    )
                    out["codec"][system] = result
                    update(f"done: {_headline(result)}", 1.0)
                except Exception as exc:
                    out["errors"][f"codec/{system}"] = f"{type(exc).__name__}: {exc}"
                    reporter.log(traceback.format_exc())
    out["ratios"], out["ratios_by_fanout"] = compare_ratios(out)
    return out


def run_simulcast(cfg: Config, reporter: Reporter) -> dict[str, Any]:
    """One simulcast publisher to N subscribers split across its layers, on the relay and on
    Janus in this run: CPU per forwarded and received packet, per layer switch, and the relay
    without simulcast (bench/simulcast.py)."""
    from bench import simulcast

    out: dict[str, Any] = {
        "layers": [layer.describe() for layer in simulcast.LAYERS],
        "single_layer": simulcast.single_layer().describe(),
        "keyframe_interval_s": cfg.keyframe_every / 30.0,
        "switch_period_s": cfg.switch_period,
        "transport_cc_feedback": cfg.simulcast_feedback,
        "runs": {},
        "skipped": {},
        "errors": {},
    }
    systems = [s for s in ("relay", "janus") if s in cfg.systems]
    if "janus" in systems:
        reason = janus_available()
        if reason is None and not netns.inside():
            reason = "Janus needs the bench network namespace (run without --no-netns, as root)"
        if reason is not None:
            out["skipped"]["janus"] = reason
            systems.remove("janus")
    with pinned(SERVER_CORE):
        # 1 Mbit/s of video in 1200 B packets is about 10 packets per 100 ms feedback
        out["estimation"] = simulcast.estimation_cost(10, 300 if cfg.quick else 2000)
    plan = simulcast.Plan(
        settle=cfg.simulcast_settle,
        max_settle=cfg.simulcast_max_settle,
        duration=cfg.duration,
        switch_period=cfg.switch_period,
        keyframe_every=cfg.keyframe_every,
        feedback=cfg.simulcast_feedback,
        retries=cfg.retries,
        profile_dir=cfg.profile_dir,
    )
    with pinned(GENERATOR_CORE):
        for system in systems:
            update = reporter.stage(f"simulcast/{system}")
            results: list[dict[str, Any]] = []
            out["runs"][system] = results
            try:

                def sweep(
                    server: Any, update: Progress = update, found: list[dict[str, Any]] = results
                ) -> None:
                    for n in cfg.simulcast_fanouts:
                        found.append(_loop_run(simulcast.run_fanout(server, n, plan, update)))

                _with_server(system, sweep)
                last = results[-1]["simulcast"] if results else {}
                update(f"done: {_headline(last)}", 1.0)
            except Exception as exc:
                out["errors"][system] = f"{type(exc).__name__}: {exc}"
                reporter.log(traceback.format_exc())
    out["ratios"] = simulcast.ratios(out["runs"])
    return out


def _cpp(result: dict[str, Any] | None) -> float | None:
    if not result:
        return None
    value = result.get("cpu_per_packet_us")
    return float(value) if value else None


def compare_ratios(out: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, Any]]:
    """CPU per forwarded packet of the relay divided by the other system's (lower is better),
    at the largest fan-out both systems completed."""
    relay = {r["subscribers"]: r for r in out["fanout"].get("relay", [])}
    by_fanout: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    for other, key in (("janus", "relay_vs_janus_cpu_per_packet"), ("ceiling", "relay_vs_ceiling")):
        theirs = {r["subscribers"]: r for r in out["fanout"].get(other, [])}
        per = {}
        for n in sorted(set(relay) & set(theirs)):
            a, b = _cpp(relay[n]), _cpp(theirs[n])
            if a and b:
                per[str(n)] = a / b
        by_fanout[key] = per
        ratios[key] = per[max(per, key=int)] if per else None
    a, b = _cpp(out["codec"].get("relay")), _cpp(out["codec"].get("naive_aiortc"))
    ratios["relay_vs_naive_aiortc"] = a / b if a and b else None
    return ratios, by_fanout


def evaluate_targets(data: dict[str, Any]) -> dict[str, Any]:
    """Each target of the bench: measured value, limit, met or not (None: not measured)."""
    out: dict[str, Any] = {}
    ratio = data.get("ratios", {}).get("relay_vs_janus_cpu_per_packet")
    out["relay_cpu_per_packet_no_higher_than_janus"] = {
        "value": ratio,
        "limit": TARGETS["relay_cpu_per_packet_vs_janus_max"],
        "met": None if ratio is None else ratio <= TARGETS["relay_cpu_per_packet_vs_janus_max"],
    }
    scenarios = (data.get("load") or {}).get("scenarios", {})
    half = scenarios.get("half_capacity")
    lat = (half or {}).get("latency_ms", {})
    p50, p99 = lat.get("p50"), lat.get("p99")
    out["latency_at_half_capacity"] = {
        "subscribers": (half or {}).get("scenario", {}).get("subscribers"),
        "p50_ms": p50,
        "p99_ms": p99,
        "limit_p50_ms": TARGETS["half_capacity_latency_p50_ms_max"],
        "limit_p99_ms": TARGETS["half_capacity_latency_p99_ms_max"],
        "met": None
        if p50 is None or p99 is None
        else p50 <= TARGETS["half_capacity_latency_p50_ms_max"]
        and p99 <= TARGETS["half_capacity_latency_p99_ms_max"],
    }
    fan = scenarios.get("one_to_many")
    subs = (fan or {}).get("scenario", {}).get("subscribers")
    loss = (fan or {}).get("loss")
    cpu = (fan or {}).get("server_cpu_fraction")
    out["one_publisher_1mbps_to_50_on_one_core"] = {
        "subscribers": subs,
        "loss": loss,
        "server_cpu_fraction": cpu,
        "limit_loss": TARGETS["one_to_50_loss_max"],
        "met": None
        if loss is None or subs != 50
        else loss < TARGETS["one_to_50_loss_max"] and (cpu or 0) < 1.0,
    }
    return out


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 1)


def run_soak_command(
    reporter: Reporter,
    *,
    subscribers: int | None = None,
    rate: float | None = None,
    capacity: float | None = None,
    fraction: float = 0.7,
    duration: float = 600.0,
    slice_seconds: float = 10.0,
    warmup: float = 12.0,
) -> dict[str, Any]:
    """``soak``: the load from ``subscribers``, ``rate`` or a fraction of the capacity (given,
    or measured by a short ramp on its own relay), held on a fresh relay for ``duration``."""
    from bench import soak

    with pinned(GENERATOR_CORE):
        if subscribers:
            plan = soak.SoakPlan(subscribers, "subscribers")
        elif rate:
            plan = soak.SoakPlan(soak.subscribers_for_rate(rate), "rate")
        else:
            basis = "capacity (given)"
            ramp = None
            if not capacity:
                basis = "capacity (measured)"
                update = reporter.stage("capacity")
                ramp = _with_server(
                    "relay", lambda s, u=update: _loop_run(soak.measure_capacity(s, u))
                )
                found = ramp.get("capacity")
                if not found:
                    raise RuntimeError(f"no capacity measured: {ramp['stop_reason']}")
                capacity = float(found["forwarded_pps"])
                update(f"done: {capacity:,.0f} pkt/s", 1.0)
            plan = soak.SoakPlan(
                soak.subscribers_for_rate(fraction * capacity),
                basis,
                fraction=fraction,
                capacity_pps=capacity,
                capacity_run=ramp,
            )
        update = reporter.stage("soak")
        result = _with_server(
            "relay",
            lambda s, u=update: _loop_run(
                soak.run_soak(s, plan.subscribers, duration, slice_seconds, warmup, u)
            ),
            max_participants=max(1000, plan.subscribers + 2),
        )
        loss = result["totals"]["loss"]
        update(f"done: loss {loss:.3%}" if loss is not None else "done", 1.0)
    result["plan"] = plan.describe()
    if plan.capacity_run is not None:
        result["capacity_run"] = plan.capacity_run
    return result
