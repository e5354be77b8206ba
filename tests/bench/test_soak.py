"""The soak bench for one minute: steady load on a real relay, no unexplained loss, and a
resident set that stays flat once the warm-up has filled the packet histories."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import soak_media, subscribers_for_rate

ROOT = Path(__file__).resolve().parents[2]
SUBSCRIBERS = 20  # about 2,100 forwarded packets/s: a fraction of one core, kind to a shared CI
MAX_LOSS = 0.001
MAX_RSS_GROWTH = 0.10


def test_rate_to_subscribers() -> None:
    pps = soak_media().packets_per_second
    assert 100 < pps < 110
    assert subscribers_for_rate(10 * pps) == 10
    assert subscribers_for_rate(1.0) == 1


@pytest.mark.timeout(240)
def test_soak_one_minute(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "soak"]
        + ["--subscribers", str(SUBSCRIBERS), "--duration", "60", "--slice", "10"]
        + ["--json", str(result), "--out", str(out), "--no-progress", "--no-plots"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["schema"] == "relay-bench/1" and data["command"] == "soak"
    markdown = (out / "soak.md").read_text()
    assert markdown.startswith("# Bench") and "## Soak" in markdown
    soak = data["soak"]
    assert soak["plan"]["subscribers"] == SUBSCRIBERS
    assert soak["duration_s"] >= 55
    slices = soak["slices"]
    assert len(slices) >= 5
    target = soak["plan"]["target_forwarded_pps"]
    for s in slices:
        assert s["latency_ms"]["n"] > 0
        assert s["forwarded_pps"] > 0.9 * target, s
        assert s["rss_bytes"] > 0
        assert s["relay_metrics"]["send_errors"] == 0
    totals = soak["totals"]
    summary = (
        f"loss {totals['loss']:.4%} ({totals['lost']}/{totals['expected']}), "
        f"RSS {soak['rss']}, load average {data['load_average_before']}"
    )
    print(summary)
    assert totals["expected"] > 0.9 * target * 50
    assert totals["loss"] < MAX_LOSS, summary
    assert soak["rss"]["growth_fraction"] < MAX_RSS_GROWTH, summary
