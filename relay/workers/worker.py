"""A media worker process: one media port, its SFU core, and the pipe to the other workers.

The front process starts ``python -m relay.workers.worker --index I --socket PATH`` and writes
its effective settings (TOML) to the worker's stdin. The worker binds media port
``media.port + I`` and a pipe socket on loopback, connects to the front's Unix socket, says
``hello``, and then answers the front's calls (the SFU core's operations, the pipe's exports
and imports, metrics, load) and sends it every event of its core. It ends when the connection to the front ends, when the front dies (``PR_SET_PDEATHSIG``
on Linux), or on SIGTERM; SIGINT is left to the front, which drains every worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from relay import scheduling
from relay.config import ConfigError, settings_from_toml
from relay.metrics import Metrics
from relay.server import MediaPlane
from relay.sfu.events import Event
from relay.sfu.sfu import Sfu
from relay.workers.channel import Channel
from relay.workers.pipe import PipeEndpoint, open_pipe

log = logging.getLogger(__name__)

#: The SFU core's operations the front may call, by name.
SFU_CALLS = frozenset(
    {
        "create_room",
        "delete_room",
        "list_rooms",
        "get_room",
        "add_participant",
        "get_participant",
        "remove_participant",
        "publisher_offer",
        "subscriber_offer",
        "subscriber_answer",
        "set_subscription_preferences",
        "participant_stats",
        "moderate_track",
        "record_track",
        "stop_track_recording",
        "viewer_offer",
        "ice_restart",
    }
)
#: The pipe's operations the front may call, by name.
PIPE_CALLS = frozenset(
    {"export_track", "unexport_track", "import_track", "remove_import", "drop_peer"}
)


def _json(value: Any) -> Any:
    """A result of the SFU core as JSON: objects by their ``to_dict``, tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_json(item) for item in value]
    return value


class Worker:
    """The worker's composition: media plane, pipe socket and the channel to the front."""

    def __init__(self, settings: Any, index: int, socket_path: str) -> None:
        self.settings = settings
        self.index = index
        self.socket_path = socket_path
        self.metrics = Metrics()
        self.channel: Channel | None = None
        self.media: MediaPlane | None = None
        self.sfu: Sfu | None = None
        self.pipe: PipeEndpoint | None = None
        self._cpu = (time.monotonic(), time.process_time())

    def _emit(self, event: Event) -> None:
        if self.channel is not None:
            self.channel.notify("event", {"event": event.to_dict()})

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        self.channel = channel = Channel(
            reader,
            writer,
            handler=self.handle,
            on_notification=self._notification,
            name=f"worker {self.index}",
        )
        self.media = MediaPlane(
            self.settings, self.metrics, self._emit, self.settings.media.port + self.index
        )
        self.sfu = sfu = await self.media.start()
        # data channels: what this worker's participants send reaches the room's participants
        # on the other workers through the front (relay/sfu/datachannels.py)
        sfu.datachannels.on_remote = lambda params: channel.notify("datachannel", params)

        # a recording file the writer gave up on: the front's recording service decides
        def recording_failed(info: dict[str, Any]) -> None:
            channel.notify("recording_failure", info)

        sfu.recording.on_failure = recording_failed
        pipe = await open_pipe(sfu)
        assert pipe.endpoint is not None
        self.pipe = pipe.endpoint
        pipe_port = pipe.port
        # the load reports measure the worker at work: its start (the media plane's certificate,
        # sockets) must not make a worker that has just come back look busy to placement
        self._cpu = (time.monotonic(), time.process_time())
        channel.notify(
            "hello",
            {
                "index": self.index,
                "pid": os.getpid(),
                "media_port": self.media.port,
                "pipe_port": pipe_port,
            },
        )
        reading = asyncio.create_task(channel.run(), name="channel")
        stopping = asyncio.create_task(stop.wait(), name="sigterm")
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        self.media.drain()
        await asyncio.sleep(0)  # the last events out
        channel.close()
        for task in (reading, stopping):
            task.cancel()
        pipe.close()
        self.media.close()
        return 0

    def _notification(self, method: str, params: dict[str, Any]) -> None:
        """A notification of the front: data channel traffic of another worker's participants."""
        if method == "datachannel" and self.sfu is not None:
            self.sfu.datachannels.remote(params, self.sfu.rooms)

    def load(self) -> dict[str, Any]:
        """CPU share of one core since the last call, forwarded packets/s, what it holds."""
        sfu = self.sfu
        assert sfu is not None
        now, cpu = time.monotonic(), time.process_time()
        then, cpu_then = self._cpu
        self._cpu = (now, cpu)
        share = (cpu - cpu_then) / (now - then) if now > then else 0.0
        return {
            "cpu": round(share, 3),
            "packet_rate": sfu.overload.packet_rate,
            "shedding": sfu.overload.shedding,
            "participants": sum(len(r.participants) for r in sfu.rooms.values()),
            "rooms": len(sfu.rooms),
        }

    async def handle(self, method: str, params: dict[str, Any]) -> Any:
        """One call of the front."""
        sfu, pipe = self.sfu, self.pipe
        assert sfu is not None and pipe is not None
        if method in SFU_CALLS:
            return _json(getattr(sfu, method)(**params))
        if method in PIPE_CALLS:
            if "peer" in params:
                params = {**params, "peer": tuple(params["peer"])}
            return _json(getattr(pipe, method)(**params))
        if method == "load":
            return self.load()
        if method == "metrics":
            return self.metrics.render()
        if method == "drain":
            sfu.drain()
            return None
        raise LookupError(f"unknown method {method!r}")


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the front process dies, whatever the cause."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _WorkerLogFilter(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.prefix = f"worker{index}."

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            record.name = self.prefix + record.name
        return True


def main(argv: Sequence[str] | None = None) -> int:
    from relay.cli import setup_logging

    parser = argparse.ArgumentParser(prog="relay-worker", description=__doc__)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # the front's effective settings, on stdin (no environment on top)
        settings = settings_from_toml(sys.stdin.buffer.read().decode("utf-8"), "front settings")
    except ConfigError as exc:
        print(f"relay worker {args.index}: {exc}", file=sys.stderr)
        return 2
    handler = setup_logging(settings.log)
    handler.addFilter(_WorkerLogFilter(args.index))
    scheduling.apply(settings.media.scheduler_slice_us, f"worker {args.index}")
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    worker = Worker(settings, args.index, args.socket)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(worker.run())
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(f"relay worker {args.index}: {exc.code}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
