"""Sampling profiles of the relay under load with py-spy (``--profile``).

py-spy attaches to the running ``relay serve`` for one measurement window (``--nonblocking``:
the relay is never paused; with ``BENCH_PROFILE_NATIVE=1``, ``--native`` instead, which pauses
it at each sample but also shows C frames such as ``sendmmsg`` and libsrtp) and writes
collapsed stacks; this module turns them into the
functions that take the relay's time, self and inclusive, as fractions of the samples of its
main thread that were not idle.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>[^(]+) \((?P<file>[^:)]+)(?::(?P<line>\d+))?\)$")


def executable() -> str | None:
    """py-spy on PATH or next to this Python (a virtualenv that is not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def available() -> str | None:
    """None when py-spy can be used, else why not."""
    if executable() is None:
        return "py-spy is not installed (pip install py-spy)"
    return None


def start(pid: int, seconds: float, output: Path, rate: int = 250) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            executable() or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            # native frames (sendmmsg, libsrtp) need the process paused while sampled
            *(["--native"] if os.environ.get("BENCH_PROFILE_NATIVE") else ["--nonblocking"]),
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    short = "/".join(path.split("/")[-2:])
    return f"{m.group('func')} ({short})"


def summarize(raw: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            frames = frames[1:]
        if not frames:
            continue
        total += n
        self_counts[frames[-1]] += n
        for name in set(frames):
            incl_counts[name] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "self": [
            {"function": f, "share": round(c / total, 4)} for f, c in self_counts.most_common(top)
        ],
        "inclusive": [
            {"function": f, "share": round(c / total, 4)} for f, c in incl_counts.most_common(top)
        ],
    }
