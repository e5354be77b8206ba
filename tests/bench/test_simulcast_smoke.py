"""Smoke test of ``python -m bench simulcast``: a tiny ``--quick`` run whose output has every
measured field, and proof that each layer's packets went through. Never a speed threshold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_smoke import ROOT, _janus_runnable

WINDOWS = ("simulcast", "no_feedback", "switching", "requests", "single_layer")


def _check_system(runs: list[dict], subscribers: int) -> None:
    assert [r["subscribers"] for r in runs] == [subscribers]
    run = runs[0]
    for window in WINDOWS:
        w = run[window]
        assert w["forwarded_packets"] > 0, window
        assert w["sent_packets"] > 0, window
        for key in ("cpu_per_packet_us", "cpu_per_received_packet_us", "forwarded_pps"):
            assert w[key] is not None and w[key] > 0, (window, key)
        assert "server_cpu_s" in w and "background_cpu_fraction" in w
    steady = run["simulcast"]
    layers = steady["layers"]
    assert set(layers["asked"]) == {"q", "h", "f"}
    assert sum(layers["asked"].values()) == subscribers
    assert layers["subscribers_without_packets"] == 0
    assert "packets_of_another_layer" in layers
    # the subscribers send transport-cc feedback; the no-feedback window's do not
    assert steady["transport_cc_feedback"] is True
    assert steady["feedback_packets"] > 0
    assert run["no_feedback"]["feedback_packets"] == 0
    assert {"cpu_per_feedback_us", "feedback_packets"} <= set(run["estimation"])
    for window in ("switching", "requests"):
        assert run[window]["requests"] > 0
        assert not run[window]["request_errors"]
        assert {"cpu_per_request_us", "layer_switches_seen"} <= set(run[window])
    assert "cpu_per_switch_us" in run["switching"]
    assert run["requests"]["layer_switches_seen"] == 0  # asking for the same layer again


@pytest.mark.timeout(420)
def test_simulcast_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "simulcast", "--quick", "--systems", "relay,janus"]
        + ["--fanouts", "3", "--duration", "1.5", "--no-plots", "--no-progress"]
        + ["--json", str(result), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["command"] == "simulcast" and data["quick"] is True
    sim = data["simulcast"]
    assert not sim["errors"], sim["errors"]
    assert [x["rid"] for x in sim["layers"]] == ["q", "h", "f"]
    assert sim["estimation"]["p50_ns"] > 0
    _check_system(sim["runs"]["relay"], 3)
    relay = sim["runs"]["relay"][0]["simulcast"]
    assert relay["relay_estimates"]["estimate_sources"] == {"transport-cc": 3}
    ratios = sim["ratios"]["3"]
    assert "relay_vs_janus_cpu_per_forwarded_packet" in ratios
    assert "relay_simulcast_vs_single_layer_cpu_per_forwarded_packet" in ratios
    if _janus_runnable():
        _check_system(sim["runs"]["janus"], 3)
        assert ratios["relay_vs_janus_cpu_per_forwarded_packet"] > 0
    else:
        assert sim["skipped"]["janus"]
    assert (out / "simulcast.md").read_text().startswith("# Bench")
