"""A private network namespace for Janus, which gathers no ICE candidate on loopback.

``ip netns`` makes a namespace with ``lo`` and one veth pair (``rb0`` 10.200.0.1, ``rb1``
10.200.0.2); both ends stay inside the namespace, so its traffic never reaches another host
(the kernel delivers it through the namespace's own loopback). The bench re-runs itself inside
it with ``ip netns exec`` and removes it afterwards. Inside, the environment variable
``BENCH_NETNS`` names it, servers bind 127.0.0.1 (relay, baselines) or ``rb0`` (Janus)
and the generator sends only to those addresses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

ENV = "BENCH_NETNS"
SERVER_ADDR = "10.200.0.1"
CLIENT_ADDR = "10.200.0.2"
SERVER_IF = "rb0"
CLIENT_IF = "rb1"


def inside() -> str | None:
    """The namespace this process runs in (set by :func:`run_inside`), or None."""
    return os.environ.get(ENV) or None


def namespace_addresses() -> set[str]:
    """Addresses of the bench's own namespace that may be sent to (empty outside it)."""
    return {SERVER_ADDR, CLIENT_ADDR} if inside() else set()


def unavailable() -> str | None:
    """None when a namespace can be made here, else why not."""
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    if shutil.which("ip") is None:
        return "iproute2 (the ip command) is not installed"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def create(name: str) -> None:
    delete(name)
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF)
        _ip("-n", name, "addr", "add", f"{SERVER_ADDR}/24", "dev", SERVER_IF)
        _ip("-n", name, "addr", "add", f"{CLIENT_ADDR}/24", "dev", CLIENT_IF)
        _ip("-n", name, "link", "set", SERVER_IF, "up")
        _ip("-n", name, "link", "set", CLIENT_IF, "up")
        # Janus sends out of rb0 itself (not through the local route), so both ends must
        # know each other without ARP (a reply to a local address never leaves lo) and accept
        # a packet whose source address is one of their own.
        macs = {dev: _mac(name, dev) for dev in (SERVER_IF, CLIENT_IF)}
        _ip(
            "-n", name, "neigh", "replace", CLIENT_ADDR, "lladdr", macs[CLIENT_IF], "dev", SERVER_IF
        )
        _ip(
            "-n", name, "neigh", "replace", SERVER_ADDR, "lladdr", macs[SERVER_IF], "dev", CLIENT_IF
        )
        settings = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv4.conf.all.rp_filter=0"]
        for dev in ("all", SERVER_IF, CLIENT_IF):
            settings += [f"net.ipv4.conf.{dev}.accept_local=1", f"net.ipv4.conf.{dev}.rp_filter=0"]
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", *settings],
            capture_output=True,
            check=False,
        )
    except subprocess.CalledProcessError as exc:
        delete(name)
        raise RuntimeError(f"cannot set up namespace {name}: {exc.stderr.strip()}") from None


def _mac(name: str, dev: str) -> str:
    out = _ip("-n", name, "-o", "link", "show", dev).stdout.split()
    return out[out.index("link/ether") + 1]


def delete(name: str) -> None:
    _ip("netns", "del", name, check=False)


def run_inside(name: str, argv: Sequence[str]) -> int:
    """Run ``python argv`` inside a fresh namespace ``name``; always remove it afterwards."""
    create(name)
    try:
        env = dict(os.environ, **{ENV: name})
        return subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, *argv], env=env, check=False
        ).returncode
    finally:
        delete(name)
