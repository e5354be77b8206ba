"""How client addresses appear in log lines, and a rate limit for lines clients can trigger.

``[log] client_addresses`` says how a client's transport address is written in the log:

- ``"none"``: never; the line says ``client`` instead.
- ``"hashed"`` (the default): ``client#3f9a1c2e``, a keyed BLAKE2b tag of the IP address under
  a random salt drawn when the process starts. The same IP address gives the same tag for the
  life of the process, so an operator can tell one client's lines from another's, but the tag
  cannot be turned back into the address without the salt, and the salt is kept only in the
  process's memory: it is never logged, stored or sent anywhere, and a restart draws a new one.
  The port is left out: together with times it would narrow a client down further.
- ``"full"``: the address as it is (``203.0.113.5:50000``, ``[2001:db8::1]:50000``).

Every process (the single-process relay, the front and each media worker) calls
:func:`configure` once at start-up; until then addresses are hashed. Code that logs a client's
address writes ``client_address(addr)`` into the line, never the address itself.

Lines that a participant (or anybody sending datagrams) can cause, such as a latch that moves
or a failed DTLS handshake, go through a :class:`LogLimit` so that a flood of them cannot fill
the log.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Hashable

__all__ = [
    "CLIENT_ADDRESS_MODES",
    "LogLimit",
    "client_address",
    "configure",
    "mode",
    "same_host",
]

#: the values of ``[log] client_addresses``
CLIENT_ADDRESS_MODES = ("none", "hashed", "full")
#: bytes of the keyed hash shown (8 hex digits)
TAG_BYTES = 4

Address = tuple[str, int]


class _Formatter:
    def __init__(self) -> None:
        self.mode = "hashed"
        self._salt = secrets.token_bytes(32)

    def configure(self, mode: str) -> None:
        if mode not in CLIENT_ADDRESS_MODES:
            raise ValueError(f"client_addresses: {mode!r} is not one of {CLIENT_ADDRESS_MODES}")
        self.mode = mode
        # a fresh salt at every configuration: tags never match across processes or restarts
        self._salt = secrets.token_bytes(32)

    def tag(self, ip: str) -> str:
        digest = hashlib.blake2b(
            ip.encode("utf-8", "replace"), key=self._salt, digest_size=TAG_BYTES
        )
        return digest.hexdigest()

    def format(self, addr: Address | None) -> str:
        if addr is None:
            return "client (no address)"
        mode = self.mode
        if mode == "none":
            return "client"
        ip, port = addr[0], addr[1]
        if mode == "full":
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return f"client#{self.tag(ip)}"


_formatter = _Formatter()


class _AccessLogFilter(logging.Filter):
    """uvicorn's access log (off in the relay; kept in line should it be switched on) has the
    peer's "ip:port" as its first argument: written as the setting says."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            ip, sep, port = args[0].rpartition(":")
            if sep and port.isdigit():
                shown = client_address((ip.strip("[]"), int(port)))
            else:
                shown = client_address(None) if _formatter.mode != "full" else args[0]
            record.args = (shown, *args[1:])
        return True


_access_filter = _AccessLogFilter()


def configure(client_addresses: str) -> None:
    """Set how this process writes client addresses (once, at start-up), with a new salt.

    The HTTP server's loggers follow too: its access log shows the formatted address, and its
    per-connection trace lines (which print the peer's address as it is) stay below the lowest
    level the relay logs at (debug)."""
    _formatter.configure(client_addresses)
    # the HTTP client of the webhook logs every request's URL (which may carry a credential)
    # at info and connection details at debug; the relay logs failed deliveries itself
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    if _access_filter not in access.filters:
        access.addFilter(_access_filter)


def mode() -> str:
    """The configured mode: "none", "hashed" or "full"."""
    return _formatter.mode


def client_address(addr: Address | None) -> str:
    """A client's transport address as the log may show it (see the module's description)."""
    return _formatter.format(addr)


def same_host(a: Address | None, b: Address | None) -> bool:
    """Both addresses have the same IP (a latch that moved only its port: a NAT rebinding);
    lets a line say so without showing either address."""
    return a is not None and b is not None and a[0] == b[0]


class LogLimit:
    """At most ``burst`` lines per key, refilled at ``rate`` lines a second (a token bucket),
    and at most ``overall_rate`` lines a second over all keys together. The keys are bounded
    too: beyond ``max_keys`` the least recently used one is forgotten.

    ``allow(key, now)`` returns None when the line must be left out, else the number of lines
    of that key left out since the last one written (to append as "(N similar suppressed)").
    """

    def __init__(
        self, rate: float, burst: int, max_keys: int = 1024, overall_rate: float = 20.0
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        #: every key together: a flood from many keys is bounded as well
        self._overall = [float(max(burst, overall_rate)), 0.0, 0.0]
        self.overall_rate = overall_rate
        self.suppressed = 0

    def _take(self, bucket: list[float], rate: float, cap: float, now: float) -> bool:
        tokens, last = bucket[0], bucket[1]
        tokens = min(cap, tokens + (now - last) * rate) if last else tokens
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def allow(self, key: Hashable, now: float) -> int | None:
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = [self.burst, 0.0, 0.0]
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        overall_cap = max(self.burst, self.overall_rate)
        if not self._take(bucket, self.rate, self.burst, now) or not self._take(
            self._overall, self.overall_rate, overall_cap, now
        ):
            bucket[2] += 1
            self.suppressed += 1
            return None
        skipped = int(bucket[2])
        bucket[2] = 0
        return skipped


def log_limited(
    logger: logging.Logger,
    limit: LogLimit,
    key: Hashable,
    now: float,
    level: int,
    message: str,
    *args: object,
) -> bool:
    """Log ``message % args`` unless ``limit`` says no for ``key``; True when written."""
    skipped = limit.allow(key, now)
    if skipped is None:
        return False
    if skipped:
        message += " (%d similar lines suppressed)"
        args = (*args, skipped)
    logger.log(level, message, *args)
    return True
