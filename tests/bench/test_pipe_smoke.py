"""Smoke run of ``python -m bench.pipe``: the pipe between two in-process workers carries
every packet to the subscriber on the far side, and the figures come out (never a speed
asserted)."""

from __future__ import annotations

from bench.pipe import measure, share


def test_pipe_bench_measures_export_import_and_a_copy() -> None:
    result = measure(packets=200, rounds=2)  # raises if a packet went missing on the way
    assert set(result) == {"export_ns", "import_ns", "copy_ns"}
    assert all(value > 0 for value in result.values()), result
    # the share falls as the fan-out grows and rises with the workers a room spans
    assert share(result, 2, 100) < share(result, 2, 25)
    assert share(result, 64, 1000) > share(result, 2, 1000)
