"""The scheduler slice hint (relay/scheduling.py) and its setting ``[media] scheduler_slice_us``.

The calls that change scheduling run in a child process, so that the test runner keeps its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from relay import scheduling
from relay.config import ConfigError, Settings, settings_from_toml

needs_slices = pytest.mark.skipif(
    not scheduling.per_thread_slices(), reason="this kernel keeps no per-thread slice (< 6.12)"
)


def child(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its standard output."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@needs_slices
def test_a_requested_slice_is_what_the_kernel_then_reports_for_the_process_and_its_threads() -> (
    None
):
    out = child(
        """
        import os, threading
        from relay import scheduling
        before = scheduling.current_slice_us()
        said = scheduling.request_slice(250)
        seen = []
        t = threading.Thread(target=lambda: seen.append(scheduling.current_slice_us()))
        t.start(); t.join()
        print(before, scheduling.current_slice_us(), seen[0], os.getpriority(os.PRIO_PROCESS, 0))
        print(said)
        """
    )
    numbers, said = out.splitlines()
    before, after, thread, nice = map(int, numbers.split())
    assert before != 250
    assert (after, thread) == (250, 250), out
    assert nice == os.getpriority(os.PRIO_PROCESS, 0)  # the nice value is kept
    assert said == "250 µs"


@needs_slices
def test_a_nice_value_is_kept_and_another_process_slice_can_be_read() -> None:
    out = child(
        """
        import os, subprocess, sys
        from relay import scheduling
        os.setpriority(os.PRIO_PROCESS, 0, 5)
        scheduling.request_slice(100)
        print(os.getpriority(os.PRIO_PROCESS, 0), scheduling.current_slice_us(os.getpid()))
        """
    )
    assert out == "5 100"


@needs_slices
def test_a_process_under_another_policy_is_left_alone() -> None:
    out = child(
        """
        import os
        from relay import scheduling
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        before = scheduling.current_slice_us()
        print(scheduling.request_slice(100))
        print(os.sched_getscheduler(0) == os.SCHED_BATCH, scheduling.current_slice_us() == before)
        """
    )
    said, kept = out.splitlines()
    assert said == "left alone: the process runs under another scheduling policy"
    assert kept == "True True"


def test_zero_asks_for_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="relay.scheduling")
    before = scheduling.current_slice_us()
    scheduling.apply(0, "relay")
    assert scheduling.current_slice_us() == before
    assert not caplog.records


def test_the_setting_defaults_to_100_and_takes_0_or_100_to_100000() -> None:
    assert Settings().media.scheduler_slice_us == 100
    for good in (0, 100, 2000, 100000):
        toml = f"[media]\nscheduler_slice_us = {good}\n"
        assert settings_from_toml(toml, "t.toml").media.scheduler_slice_us == good
    for bad in ("50", "100001", "-1", "1.5", '"100"', "true"):
        with pytest.raises(ConfigError) as caught:
            settings_from_toml(f"[media]\nscheduler_slice_us = {bad}\n", "t.toml")
        message = str(caught.value)
        assert "media.scheduler_slice_us" in message, message
        assert "0 or an integer 100-100000" in message, message
