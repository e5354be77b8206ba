"""A latency hint to the kernel's scheduler: a short time slice for a media-plane process.

Linux's EEVDF scheduler (6.6 and later) gives each thread a virtual deadline of its eligible
time plus its slice (weighted by its nice value), and since 6.12 a thread may ask for its own
slice (``sched_setattr`` with ``sched_runtime`` under ``SCHED_OTHER``, clamped by the kernel to
0.1-100 ms; the default is 0.75 ms times 1 + log2 of the CPU count). A thread with a shorter
slice has an earlier deadline, so when it wakes it preempts a thread that runs out a longer
slice on its core instead of waiting for it to end. Its share of the CPU does not grow: that is
still its weight (nice value).

For a relay this is the wake-up when a frame arrives: the packets of one frame come together,
and their fan-out is the latency every subscriber sees. When another process holds the core
(another worker, a log shipper, a backup job), a frame waits out that process's slice before
its first copy is made; with a short slice it does not. The bench's workers section
(``python -m bench load --workers 1,2``) measures the p99 latency with and without it.

The slice is inherited by the threads and processes started afterwards. A process an operator
runs under another policy (``chrt --batch``, ``--idle``) is left alone, as is any kernel or
platform without the call: :func:`request_slice` then says why nothing changed.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import struct
import sys

log = logging.getLogger(__name__)

#: ``sched_setattr`` / ``sched_getattr`` system call numbers by machine (there is no libc
#: wrapper in glibc before 2.41)
_SYSCALLS = {
    "x86_64": (314, 315),
    "aarch64": (274, 275),
    "arm64": (274, 275),
}
#: struct sched_attr (SCHED_ATTR_SIZE_VER0, 48 bytes): size, policy, flags, nice, priority,
#: runtime, deadline, period
_SCHED_ATTR = struct.Struct("=IIqiIQQQ")
SCHED_OTHER = 0
MIN_SLICE_US = 100
MAX_SLICE_US = 100_000


def _syscalls() -> tuple[int, int] | None:
    if not sys.platform.startswith("linux"):
        return None
    return _SYSCALLS.get(platform.machine())


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library's symbols, as loaded in this process (for ``syscall``)."""
    return ctypes.CDLL(None, use_errno=True)


def current_slice_us(pid: int = 0) -> int | None:
    """The slice of thread ``pid`` (0: the calling thread; a process id: its main thread) as
    the kernel reports it, in µs; None where it cannot say."""
    numbers = _syscalls()
    if numbers is None:
        return None
    libc = _libc()
    buf = ctypes.create_string_buffer(_SCHED_ATTR.size)
    if libc.syscall(numbers[1], pid, buf, _SCHED_ATTR.size, 0) != 0:
        return None
    _size, _policy, _flags, _nice, _prio, runtime, _deadline, _period = _SCHED_ATTR.unpack(buf.raw)
    return int(runtime // 1000)


def per_thread_slices() -> bool:
    """Whether this kernel keeps a slice per thread (Linux 6.12 and later report one)."""
    return bool(current_slice_us())


def request_slice(microseconds: int) -> str:
    """Ask for a ``microseconds`` slice for the calling thread (and the threads it starts
    afterwards), keeping its nice value. Returns what happened, for the log: the slice the
    kernel now reports, or why it is unchanged."""
    numbers = _syscalls()
    if numbers is None:
        return f"not supported on {sys.platform}/{platform.machine()}"
    if os.sched_getscheduler(0) != SCHED_OTHER:
        return "left alone: the process runs under another scheduling policy"
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr = _SCHED_ATTR.pack(_SCHED_ATTR.size, SCHED_OTHER, 0, nice, 0, microseconds * 1000, 0, 0)
    libc = _libc()
    buf = ctypes.create_string_buffer(attr, _SCHED_ATTR.size)
    if libc.syscall(numbers[0], 0, buf, 0) != 0:
        errno = ctypes.get_errno()
        return f"refused by the kernel: {os.strerror(errno)}"
    now = current_slice_us()
    if now is None or now == 0:
        return "the kernel accepted it but keeps no per-thread slice (Linux before 6.12)"
    return f"{now} µs"


def apply(microseconds: int, process: str) -> None:
    """``[media] scheduler_slice_us`` for this media process (0: the kernel's default, no
    call), and one line in the log saying what the kernel made of it."""
    if microseconds == 0:
        return
    result = request_slice(microseconds)
    log.info("%s: scheduler slice %d µs requested: %s", process, microseconds, result)
