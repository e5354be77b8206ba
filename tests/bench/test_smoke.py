"""Smoke test of the bench suite: a tiny ``--quick`` run, its output's schema, and proof that
packets really went through the relay. Never a speed threshold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _janus_runnable() -> bool:
    return (
        shutil.which("janus") is not None and os.geteuid() == 0 and shutil.which("ip") is not None
    )


def _bench(tmp_path: Path, *args: str, timeout: float = 150) -> dict:
    out = tmp_path / "out"
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *args,
            "--json",
            str(result),
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert (out / f"{args[0]}.md").read_text().startswith("# Bench")
    return data


def _check_common(data: dict, command: str) -> None:
    assert data["schema"] == "relay-bench/1"
    assert data["command"] == command
    assert data["quick"] is True
    for key in ("machine", "versions", "config", "pinning", "network", "targets", "skipped"):
        assert key in data
    assert set(data["ratios"]) == {
        "relay_vs_janus_cpu_per_packet",
        "relay_vs_ceiling",
        "relay_vs_naive_aiortc",
    }
    assert data["versions"]["relay"]


def test_hotpath_quick(tmp_path: Path) -> None:
    data = _bench(
        tmp_path, "hotpath", "--quick", "--fanouts", "1,2", "--samples", "20", "--no-plots"
    )
    _check_common(data, "hotpath")
    results = data["hotpath"]["results"]
    assert {(r["kind"], r["fanout"]) for r in results} == {
        (k, n) for k in ("audio", "video") for n in (1, 2)
    }
    for r in results:
        assert set(r["stages_ns"]) == {
            "demux",
            "unprotect",
            "route",
            "rewrite",
            "protect",
            "sendto",
            "forward",
        }
        for stage in r["stages_ns"].values():
            assert stage["samples"] == 20
            assert 0 < stage["p50"] <= stage["p99"]


@pytest.mark.timeout(240)
def test_compare_quick_forwards_packets(tmp_path: Path) -> None:
    data = _bench(
        tmp_path,
        "compare",
        "--quick",
        "--systems",
        "relay,ceiling,janus",
        "--fanouts",
        "2",
        "--duration",
        "1.5",
    )
    _check_common(data, "compare")
    compare = data["compare"]
    assert not compare["errors"], compare["errors"]
    relay = compare["fanout"]["relay"]
    assert len(relay) == 1
    r = relay[0]
    assert r["subscribers"] == 2
    assert r["forwarded_packets"] > 0
    assert r["received"] > 0 and r["expected"] > 0
    assert r["relay_metrics"]["packets_out"] > 0
    assert r["latency_ms"]["n"] == r["received"]
    for key in ("p50", "p90", "p99", "p99.9"):
        assert r["latency_ms"][key] > 0
    assert r["cpu_per_packet_us"] > 0 and r["packets_per_cpu_second"] > 0
    assert r["server_memory"]["rss_bytes"] > 0
    assert compare["fanout"]["ceiling"][0]["forwarded_packets"] > 0
    assert data["ratios"]["relay_vs_ceiling"] > 0
    if _janus_runnable():
        assert compare["fanout"]["janus"][0]["forwarded_packets"] > 0
        assert data["ratios"]["relay_vs_janus_cpu_per_packet"] > 0
    else:  # recorded as skipped, with the reason, instead of failing
        assert data["skipped"]["janus"]
        assert data["ratios"]["relay_vs_janus_cpu_per_packet"] is None
    assert data["ratios"]["relay_vs_naive_aiortc"] is None  # not requested
    plots = data.get("plots", [])
    assert "latency_cdf.png" in plots and "cpu_vs_subscribers.png" in plots
    for name in plots:
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_hotpath_quick_says_what_it_timed(tmp_path: Path) -> None:
    data = _bench(tmp_path, "hotpath", "--quick", "--fanouts", "2", "--samples", "8", "--no-plots")
    hotpath = data["hotpath"]
    assert hotpath["sender"] and hotpath["sender"] in hotpath["method"]
    assert set(hotpath["stage_definitions"]) == {
        "demux",
        "unprotect",
        "route",
        "rewrite",
        "protect",
        "sendto",
        "forward",
    }
    for r in hotpath["results"]:
        assert set(r["per_copy_ns"]) == {"rewrite", "protect", "sendto", "forward"}
        # every copy of the whole-forward stage reached its subscriber's sink socket
        assert r["copies_received"] + hotpath["sender_counters"].get("sent_fallback", 0) >= (
            r["batch"] * 8 * r["fanout"]
        )


def test_whatif_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.whatif", "--fanouts", "1,2", "--samples", "8"]
        + ["--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["fan-out"])
    assert header.split()[1:] == ["baseline", "uvloop_sendto", "socket_sendto", "no_history"]
    rows = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert row[2] == "1.00"  # baseline against itself
