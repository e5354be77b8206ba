"""Shared helpers: percentiles, /proc readings, CPU pinning, machine and version facts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

#: Percentiles reported for every distribution.
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Core of the server under test and core of the load generator.
SERVER_CORE = 0
GENERATOR_CORE = 1


def percentiles(values: Sequence[float] | np.ndarray, scale: float = 1.0) -> dict[str, float]:
    """``{"p50": .., "p90": .., "p99": .., "p99.9": .., "mean": .., "max": .., "n": ..}``."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    qs = np.percentile(arr, PERCENTILES) * scale
    out: dict[str, float] = {f"p{p:g}": float(q) for p, q in zip(PERCENTILES, qs, strict=True)}
    out["mean"] = float(arr.mean() * scale)
    out["max"] = float(arr.max() * scale)
    out["n"] = int(arr.size)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of a whole process: the sum of its threads' run time from
    /proc/<pid>/task/*/schedstat (nanoseconds), or utime + stime from /proc/<pid>/stat
    (clock ticks) where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        total = 0
    if total:
        return total / 1e9
    return stat_cpu_seconds(pid)


def sleeps_and_kernel_seconds(pid: int) -> tuple[int, float]:
    """How often a whole process went to sleep (its threads' voluntary context switches, from
    /proc/<pid>/task/*/status: each is a wake-up later) and its CPU seconds in the kernel
    (stime, /proc/<pid>/stat, clock ticks)."""
    sleeps = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    sleeps += int(line.split()[1])
                    break
    return sleeps, int(stat_fields(pid)[12]) / CLOCK_TICKS


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses): index
    0 is the state, 1 the parent's pid, 11 utime and 12 stime (clock ticks, every thread of
    the process, live or exited)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode(errors="replace")
    return raw[raw.rindex(")") + 2 :].split()


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread, live or exited), /proc/<pid>/stat."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds spent busy by every core so far (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet(max_seconds: float, threshold: float = 0.25, window: float = 3.0) -> float:
    """Wait (at most ``max_seconds``) until the whole machine is busy less than ``threshold``
    of one core over ``window`` seconds; returns the last busy fraction seen."""
    deadline = time.monotonic() + max_seconds
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def memory(pid: int) -> dict[str, int]:
    """Resident set size now and its peak, in bytes, from /proc/<pid>/status."""
    out = {"rss_bytes": 0, "rss_peak_bytes": 0}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_bytes"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["rss_peak_bytes"] = int(line.split()[1]) * 1024
    return out


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def pin_to(core: int) -> list[int] | None:
    """Pin the calling process (and the threads it starts later) to one core, if it exists."""
    available = sorted(os.sched_getaffinity(0))
    if core not in available or len(available) < 2:
        return None
    os.sched_setaffinity(0, {core})
    return [core]


def pinning_preexec(cores: int | Collection[int]) -> Any:
    """A ``preexec_fn`` that pins a child before exec, so every thread (and process) it starts
    inherits it; ``cores`` is one core or a set of them (every core: undo the parent's pinning)."""
    if os.cpu_count() is None or (os.cpu_count() or 1) < 2:
        return None
    wanted = {cores} if isinstance(cores, int) else set(cores)

    def pin() -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, wanted)

    return pin


def all_cores() -> set[int]:
    """Every core of the machine (not only this process's affinity)."""
    return set(range(os.cpu_count() or 1))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, ()))
    return sorted(out)


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def janus_version() -> str | None:
    try:
        out = subprocess.run(
            ["janus", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("Janus version:"):
            return line.split("(")[-1].rstrip(")") if "(" in line else line.split(":")[1].strip()
    return None


def machine() -> dict[str, Any]:
    """Facts about the machine the figures come from."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    return {
        "hostname_hash": hex(hash(socket.gethostname()) & 0xFFFF),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def versions() -> dict[str, str | None]:
    names = ["relay", "numpy", "pylibsrtp", "pyOpenSSL", "uvloop", "aioice", "aiortc", "av"]
    out: dict[str, str | None] = {n: _version(n) for n in names}
    out["janus"] = janus_version()
    with contextlib.suppress(Exception):
        import pylibsrtp

        out["libsrtp"] = getattr(pylibsrtp, "libsrtp_version", lambda: None)() or None
    return out


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


@dataclass
class ProcSample:
    """CPU and wall time of one process at one instant."""

    cpu: float
    wall: float

    @classmethod
    def take(cls, pid: int) -> ProcSample:
        return cls(cpu_seconds(pid), time.monotonic())
