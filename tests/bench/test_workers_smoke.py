"""``python -m bench load --workers``: a tiny run's schema and proof that packets went through
every worker (never a speed threshold), and the derived figures on made-up windows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.workers import derive, report_lines

ROOT = Path(__file__).resolve().parents[2]


def _has_workers() -> bool:
    return importlib.util.find_spec("relay.workers") is not None


@pytest.mark.timeout(300)
def test_load_workers_quick(tmp_path: Path) -> None:
    workers = "1,2" if _has_workers() else "1"
    out = tmp_path / "out"
    result = tmp_path / "workers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "load", "--quick", "--workers", workers]
        + ["--fanouts", "3", "--duration", "1.5", "--no-ramp", "--no-plots"]
        + ["--json", str(result), "--out", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["schema"] == "relay-bench/1" and data["command"] == "load"
    assert data["pinning"]["server_core"] is None
    markdown = (out / "workers.md").read_text()
    assert markdown.startswith("# Bench") and "## Workers" in markdown
    assert "Scaling model" in markdown
    w = data["workers"]
    assert not w["errors"], w["errors"]
    layouts = {(x["workers"], x["placement"]) for x in w["layouts"]}
    expected = {(1, "single")} | ({(2, "spread"), (2, "pack")} if workers == "1,2" else set())
    assert layouts == expected
    for row in w["table"]:
        assert row["subscribers"] == 3
        assert row["forwarded_pps"] > 0
        assert row["cpu_per_packet_us"] > 0
        assert row["latency_p50_ms"] > 0 and row["latency_p99_ms"] >= row["latency_p50_ms"]
        assert sum(x["subscribers"] for x in row["per_worker"]) == 3
    for layout in w["layouts"]:
        window = layout["fanouts"][0]
        assert window["silent_subscribers"] == 0
        assert window["server_processes"] == (1 if layout["workers"] == 1 else 3)
        if layout["placement"] == "spread":
            # the track went through the pipe: subscribers on a worker without the publisher
            # received it
            piped = [
                r for r in window["per_worker"] if not r["holds_publisher"] and r["subscribers"] > 0
            ]
            assert piped and all(r["received_pps"] > 0 for r in piped)
            # and woke the importing worker (its sleeps counted from /proc)
            assert all(r["wakeups_per_s"] > 0 for r in piped)
    # the machine's wake-up probe ran first: its receiver slept between datagrams
    probe = w["platform_wakeup"]
    assert probe["receiver_sleeps_per_packet"] > 0.5
    assert probe["wake_send_us"] > 0 and probe["receiver_us"] > 0
    assert "The machine's floor" in markdown
    assert set(data["targets"]) == {
        "pipe_share_of_cpu_per_forwarded_packet",
        "two_workers_vs_one_cpu_share",
        "p99_two_workers_over_one_at_100",
    }


def _window(n: int, cores: float, p99: float, per_worker: list[dict]) -> dict:
    fwd = n * 100.0
    return {
        "subscribers": n,
        "forwarded_pps": fwd,
        "loss": 0.0,
        "cpu_per_packet_us": cores / fwd * 1e6,
        "server_cpu_fraction": cores,
        "front_cpu_fraction": 0.002,
        "generator_cpu_fraction": 0.3,
        "background_cpu_fraction": 0.0,
        "latency_ms": {"p50": p99 / 3, "p99": p99},
        "disturbed": False,
        "sent_packets": 1000,
        "window_s": 10.0,
        "per_worker": per_worker,
    }


def _layout(workers: int, placement: str, windows: list[dict], **extra: object) -> dict:
    return {
        "label": f"{workers} workers, {placement}",
        "workers": workers,
        "placement": placement,
        "fanouts": windows,
        "ramp": [],
        "setup": [{"joined": 10, "front_cpu_per_subscriber_ms": 5.0}],
        **extra,
    }


def test_derive_pipe_share_targets_and_model() -> None:
    def split(n: int, spread: bool) -> list[dict]:
        # the importing worker: 0.005 cores idle, 20 µs per copy, 60 µs per piped packet;
        # it wakes 95 times a second for the 100 piped packets, and its kernel time with the
        # exporter's grows by 0.004 cores
        if not spread:
            return [
                {"index": 0, "subscribers": n, "holds_publisher": True, "cpu_fraction": 0.5}
                | {"wakeups_per_s": 150.0, "kernel_cpu_fraction": 0.1},
                {"index": 1, "subscribers": 0, "holds_publisher": False, "cpu_fraction": 0.005}
                | {"wakeups_per_s": 5.0, "kernel_cpu_fraction": 0.001},
            ]
        half = n - n // 2
        return [
            {"index": 0, "subscribers": n // 2, "holds_publisher": True, "cpu_fraction": 0.3}
            | {"wakeups_per_s": 150.0, "kernel_cpu_fraction": 0.055},
            {
                "index": 1,
                "subscribers": half,
                "holds_publisher": False,
                "cpu_fraction": 0.005 + half * 100 * 20e-6 + 100 * 60e-6,
                "wakeups_per_s": 95.0,
                "kernel_cpu_fraction": 0.05,
            },
        ]

    # c = 20 µs per forwarded packet, k0 = 0.02 cores, the pipe 100 µs per piped packet
    def cores(n: int, piped: bool) -> float:
        return 0.02 + n * 100 * 20e-6 + (100 * 100e-6 if piped else 0.0)

    one = _layout(
        1,
        "single",
        [_window(n, cores(n, False), 10.0 * n / 100, split(n, False)) for n in (50, 100)],
        capacity={
            "subscribers": 200,
            "forwarded_pps": 20000.0,
            "server_cpu_fraction": 0.6,
            "generator_cpu_fraction": 0.5,
            "cpu_per_packet_us": 30.0,
            "latency_p99_ms": 40.0,
        },
        stop_reason="250 subscribers: p99 60 ms",
    )
    spread = _layout(
        2, "spread", [_window(n, cores(n, True), 5.0 * n / 100, split(n, True)) for n in (50, 100)]
    )
    pack = _layout(
        2, "pack", [_window(n, cores(n, False), 10.0 * n / 100, split(n, False)) for n in (50, 100)]
    )
    probe = {"floor_us": 80.0, "packets": 600, "rate": 100.0, "warm_send_us": 5.0}
    probe |= {"cold_send_us": 50.0, "wake_send_us": 30.0, "receiver_us": 55.0}
    probe["receiver_sleeps_per_packet"] = 1.0
    derived = derive([one, spread, pack], 100.0, probe)
    pipe = derived["pipe"]
    assert pipe["pipe_us_per_piped_packet_pooled"] == pytest.approx(100.0)
    assert pipe["pipe_receiving_end_us_median"] == pytest.approx(60.0)
    assert pipe["by_fanout"]["100"]["importer_wakeups_per_piped_packet"] == pytest.approx(0.95)
    assert pipe["by_fanout"]["100"]["spread_minus_pack_kernel_cores"] == pytest.approx(0.004)
    share_100 = pipe["by_fanout"]["100"]["pipe_share"]
    assert share_100 == pytest.approx(0.01 / cores(100, True))
    targets = derived["targets"]
    assert targets["pipe_share_of_cpu_per_forwarded_packet"]["met"] is True
    # the probe's floor against N copies at c = 20 µs
    floors = pipe["platform_floor_share_by_fanout"]
    assert floors["50"] == pytest.approx(80 / (50 * 20 + 80))
    assert floors["100"] == pytest.approx(80 / (100 * 20 + 80))
    assert targets["p99_two_workers_over_one_at_100"]["ratio"] == pytest.approx(0.5)
    assert targets["p99_two_workers_over_one_at_100"]["met"] is True
    k = derived["model"]["constants"]
    assert k["cpu_per_forwarded_packet_us"] == pytest.approx(20.0)
    assert k["worker_base_cores"] == pytest.approx(0.02)
    p64 = derived["model"]["predictions"]["64"]
    assert p64["forwarded_pps_per_worker"] == pytest.approx(20000.0)
    assert p64["aggregate_forwarded_pps"] == pytest.approx(64 * 20000.0)
    # 63 pipe copies of 100 µs against 100 subscribers at 20 µs: the pipe dominates
    assert p64["pipe_share_at_100"] > 0.5
    assert p64["one_room_min_subscribers_for_pipe_10pct"] == pytest.approx(9 * 63 * 100 / 20)
    assert p64["exporter_pipe_cores"] == pytest.approx(100 * 63 * 50e-6)
    lines = "\n".join(
        report_lines(
            {
                "media": {"packets_per_second": 100.0, "packet_bytes": 1200},
                "sharing": {"note": "x"},
                "plan": {"rounds": 1},
                "layouts": [one, spread, pack],
                "platform_wakeup": probe,
                **derived,
            }
        )
    )
    assert "**met**" in lines and "Scaling model" in lines
    assert "| 0.95 |" in lines  # the importer's wake-ups per piped packet, N = 100
    assert "**80.0 µs**" in lines and "7.4 % at N = 50" in lines  # the machine's floor
