"""``python -m bench {hotpath,load,compare,simulcast,all,soak}``: see ``--help`` and bench/README.md."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import netns
from bench.common import (
    GENERATOR_CORE,
    SERVER_CORE,
    machine,
    now_iso,
    versions,
    wait_for_quiet,
    write_json,
)
from bench.suite import (
    SYSTEM_ORDER,
    Config,
    Reporter,
    elapsed,
    evaluate_targets,
    load_average,
    run_compare,
    run_hotpath,
    run_load,
    run_simulcast,
    run_soak_command,
)

SCHEMA = "relay-bench/1"
COMMANDS = ("hotpath", "load", "compare", "simulcast", "all", "soak")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Bench suite of the relay: hot-path stages, load, and side-by-side baselines.",
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--quick", action="store_true", help="small sizes, under two minutes")
    parser.add_argument("--json", metavar="PATH", help="JSON results (default: OUT/COMMAND.json)")
    parser.add_argument(
        "--out", metavar="DIR", default="bench/out", help="markdown and PNG plots (bench/out)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--no-netns",
        action="store_true",
        help="do not make a network namespace (Janus is then skipped)",
    )
    parser.add_argument(
        "--systems", type=_names, help=f"compare, simulcast: subset of {','.join(SYSTEM_ORDER)}"
    )
    parser.add_argument("--scenarios", type=_names, help="load: subset of the scenarios")
    parser.add_argument(
        "--fanouts", type=_ints, help="hotpath, compare and simulcast: fan-outs to run"
    )
    parser.add_argument(
        "--duration",
        type=float,
        help="seconds of each measurement window (soak: of the whole soak, default 600)",
    )
    parser.add_argument("--samples", type=int, help="hotpath: samples per stage")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="load/compare/simulcast: py-spy profile of the relay in every window (OUT/profiles)",
    )
    parser.add_argument(
        "--no-feedback",
        action="store_true",
        help="simulcast: subscribers send no transport-cc feedback (layers by size wishes alone)",
    )
    soak = parser.add_argument_group("soak")
    soak.add_argument(
        "--subscribers", type=int, help="soak: subscribers of the one publisher (1 Mbit/s video)"
    )
    soak.add_argument(
        "--rate", type=float, metavar="PPS", help="soak: forwarded packets per second to hold"
    )
    soak.add_argument(
        "--capacity",
        type=float,
        metavar="PPS",
        help="soak: capacity in forwarded packets/s (default: measured by a short ramp)",
    )
    soak.add_argument(
        "--fraction", type=float, default=0.7, help="soak: share of the capacity held (0.7)"
    )
    soak.add_argument(
        "--slice", type=float, default=10.0, help="soak: seconds of each reported slice (10)"
    )
    soak.add_argument(
        "--warmup",
        type=float,
        default=12.0,
        help="soak: seconds of load before the first slice, to fill packet histories (12)",
    )
    parser.add_argument(
        "--workers",
        type=_ints,
        metavar="W,W",
        help="load: the relay with these worker counts ([workers] count) instead of the "
        "scenarios: one publisher to N subscribers (N from --fanouts, default 25,50,100), "
        "capacity, CPU per packet with the pipe, latency (results: OUT/workers.md)",
    )
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="load --workers: skip the pack layout (everyone on one worker: no pipe)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="load --workers: every layout's fixed fan-outs this many times (2; --quick 1)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="load --workers: past 60/70/80 %% of this (900 s) windows are not measured again, "
        "later rounds and further ramp steps are skipped",
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        metavar="N",
        help="load --workers: nice value of the load generator while it measures (19; the "
        "relay stays at 0): N > 0 lets the relay's processes take a core first",
    )
    parser.add_argument(
        "--contrast-nice",
        type=int,
        metavar="N",
        help="load --workers: then 1 and 2 workers (spread) again with the generator at this "
        "nice value (0; -1: not)",
    )
    parser.add_argument(
        "--contrast-slice",
        type=int,
        metavar="US",
        help="load --workers: then 1 and 2 workers (spread) again with the relay's [media] "
        "scheduler_slice_us at this value (0, the kernel's default; -1: not)",
    )
    parser.add_argument(
        "--no-ramp",
        action="store_true",
        help="load --workers: fixed fan-outs only, no capacity ramp",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait (at most this long) until other processes leave the machine idle",
    )
    return parser


def make_config(args: argparse.Namespace) -> Config:
    cfg = Config.quick_config() if args.quick else Config()
    if args.systems:
        unknown = set(args.systems) - set(SYSTEM_ORDER)
        if unknown:
            raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
        cfg.systems = tuple(args.systems)
    if args.scenarios:
        cfg.scenarios = tuple(args.scenarios)
    if args.fanouts:
        cfg.hotpath_fanouts = cfg.compare_fanouts = cfg.simulcast_fanouts = args.fanouts
    if args.duration:
        cfg.duration = cfg.ramp_duration = cfg.codec_seconds = args.duration
    if args.no_feedback:
        cfg.simulcast_feedback = False
    if args.samples:
        cfg.hotpath_samples = args.samples
    if args.profile:
        cfg.profile_dir = Path(args.out) / "profiles"
        cfg.profile_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def workers_plan(args: argparse.Namespace) -> Any:
    from bench.workers import WorkersPlan

    plan = WorkersPlan.quick(args.workers) if args.quick else WorkersPlan(workers=args.workers)
    if args.fanouts:
        plan.fanouts = args.fanouts
    if args.duration:
        plan.duration = plan.ramp_duration = args.duration
    if args.rounds:
        plan.rounds = args.rounds
    if args.budget:
        plan.budget_s = args.budget
    if args.generator_nice is not None:
        plan.generator_nice = args.generator_nice
    if args.contrast_nice is not None:
        plan.contrast_nice = None if args.contrast_nice < 0 else args.contrast_nice
    if args.contrast_slice is not None:
        plan.contrast_slice = None if args.contrast_slice < 0 else args.contrast_slice
    plan.pack = not args.no_pack
    plan.ramp = not args.no_ramp
    return plan


def stem(args: argparse.Namespace) -> str:
    """Name of the result files: the command, or ``workers`` for ``load --workers``."""
    return "workers" if args.command == "load" and args.workers else args.command


def needs_namespace(args: argparse.Namespace, cfg: Config) -> bool:
    return (
        args.command in ("compare", "simulcast", "all")
        and "janus" in cfg.systems
        and not args.no_netns
        and not netns.inside()
        and netns.unavailable() is None
        and _janus_installed()
    )


def _janus_installed() -> bool:
    from bench.servers import janus_available

    reason = janus_available()
    return reason is None or "namespace" in reason or "root" in reason


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = make_config(args)
    tty = sys.stderr.isatty()
    reporter = Reporter(not args.no_progress and tty, plain=not args.no_progress and not tty)
    busy = wait_for_quiet(args.wait_idle) if args.wait_idle > 0 else None
    started = time.monotonic()
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "command": args.command,
        "created_at": now_iso(),
        "quick": cfg.quick,
        "machine": machine(),
        "versions": versions(),
        "config": cfg.describe(),
        "pinning": {
            "server_core": SERVER_CORE,
            "generator_core": GENERATOR_CORE,
            "applied": len(os.sched_getaffinity(0)) > 1,
            "note": "server under test pinned to one core, load generator to the other",
        }
        if stem(args) != "workers"
        else {
            "server_core": None,
            "generator_core": None,
            "applied": False,
            "note": "nothing pinned: the relay's processes and the load generator share every core, "
            "the generator niced (see the workers section)",
        },
        "network": (
            f"network namespace {netns.inside()} (lo for the relay and the baselines, "
            f"{netns.SERVER_IF}/{netns.CLIENT_IF} for Janus)"
            if netns.inside()
            else "loopback (127.0.0.1)"
        ),
        "load_average_before": load_average(),
        "machine_busy_before_cores": busy,
        "ratios": {
            "relay_vs_janus_cpu_per_packet": None,
            "relay_vs_ceiling": None,
            "relay_vs_naive_aiortc": None,
        },
        "skipped": {},
    }
    with reporter.running():
        if args.command in ("hotpath", "all"):
            data["hotpath"] = run_hotpath(cfg, reporter)
        if stem(args) == "workers":
            from bench.workers import run_workers

            plan = workers_plan(args)
            data["config"] = plan.describe()
            data["workers"] = run_workers(plan, reporter.stage, reporter.log)
        elif args.command in ("load", "all"):
            data["load"] = run_load(cfg, reporter)
        if args.command in ("compare", "all"):
            compare = run_compare(cfg, reporter)
            data["compare"] = compare
            data["ratios"].update(compare["ratios"])
            data["skipped"].update(compare["skipped"])
        if args.command in ("simulcast", "all"):
            sim = run_simulcast(cfg, reporter)
            data["simulcast"] = sim
            data["skipped"].update({f"simulcast/{k}": v for k, v in sim["skipped"].items()})
        if args.command == "soak":
            data["soak"] = run_soak_command(
                reporter,
                subscribers=args.subscribers,
                rate=args.rate,
                capacity=args.capacity,
                fraction=args.fraction,
                duration=args.duration or 600.0,
                slice_seconds=args.slice,
                warmup=args.warmup,
            )
    data["targets"] = data["workers"]["targets"] if "workers" in data else evaluate_targets(data)
    data["load_average_after"] = load_average()
    data["seconds"] = elapsed(started)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = make_config(args)
    if needs_namespace(args, cfg):
        inner = list(sys.argv[1:] if argv is None else argv)
        return netns.run_inside(f"relaybench{os.getpid()}", ["-m", "bench", *inner])
    out_dir = Path(args.out)
    name = stem(args)
    json_path = Path(args.json) if args.json else out_dir / f"{name}.json"
    data = run(args)
    write_json(json_path, data)
    from bench import report

    markdown = report.markdown(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    if not args.no_plots:
        data["plots"] = report.plots(data, out_dir)
        write_json(json_path, data)
    print(markdown)
    print(f"results: {json_path}  table: {out_dir / (name + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
