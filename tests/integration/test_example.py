"""The README's aiortc example really holds a call through `relay serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aiortc_call.py"


def test_aiortc_example_call(relay) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--api", relay.api, "--key", relay.key, "--seconds", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("alice", "bob"):
        assert result["decoded_from_the_other"][name]["video"] > 20
        assert result["decoded_from_the_other"][name]["audio"] > 50
