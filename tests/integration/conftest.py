"""A real `relay serve` in a subprocess, on free ports, for each test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningRelay:
    api: str
    media_port: int
    key: str
    process: subprocess.Popen
    log_path: Path

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.api}/metrics").text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_relay(tmp: Path, extra: str = "") -> RunningRelay:
    api_port = free_port(socket.SOCK_STREAM)
    media_port = free_port(socket.SOCK_DGRAM)
    config = tmp / "relay.toml"
    config.write_text(
        f'[api]\nport = {api_port}\nkeys = ["testkey"]\n[media]\nport = {media_port}\n{extra}\n'
    )
    log_path = tmp / "relay.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log_file.close()
    api = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"relay exited: {log_path.read_text()}")
        try:
            if httpx.get(f"{api}/healthz", timeout=1).status_code == 200:
                return RunningRelay(api, media_port, "testkey", process, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"relay did not start: {log_path.read_text()}")


def stop_relay(relay: RunningRelay) -> int:
    if relay.process.poll() is None:
        relay.process.send_signal(signal.SIGTERM)
        try:
            return relay.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            relay.process.kill()
            relay.process.wait()
            return -9
    return relay.process.returncode


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRelay]:
    running = start_relay(tmp_path_factory.mktemp("relay"), extra="")
    yield running
    stop_relay(running)
