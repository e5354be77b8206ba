"""Command line: ``relay serve``, ``relay check-config``, ``relay --version``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from relay import __version__, privacy
from relay.addresses import media_candidate_addresses
from relay.config import (
    ConfigError,
    LogSettings,
    Settings,
    env_var_name,
    load_settings,
    settings_as_dict,
    worker_count,
)

__all__ = ["JsonFormatter", "build_parser", "format_toml", "main", "setup_logging"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z"
        entry: dict[str, Any] = {
            "time": stamp,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(log: LogSettings, stream: TextIO | None = None) -> logging.Handler:
    """Send all logging to ``stream`` (stderr) in the configured format and level.

    Calling it again replaces the handler installed by the previous call.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    handler.set_name("relay")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "relay":
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(log.level.upper())
    logging.captureWarnings(True)
    # how client addresses appear in this process's log lines (a new salt for "hashed")
    privacy.configure(log.client_addresses)
    return handler


def format_toml(values: dict[str, dict[str, Any]]) -> str:
    """Render ``settings_as_dict`` output as TOML text (one table per section)."""
    lines: list[str] = []
    for section, table in values.items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relay`` command."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A real-time media relay (SFU) for WebRTC voice and video calls.",
        epilog="Settings: embedded defaults < TOML file < RELAY_<SECTION>__<KEY> environment.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (default: none)")
    serve.add_argument(
        "--workers",
        metavar="N",
        help='media worker processes: a number, or "auto" for one per core '
        "(overrides workers.count; 1 runs everything in one process)",
    )
    serve.set_defaults(handler=_serve)

    check = commands.add_parser(
        "check-config", help="validate a config file and print the effective settings"
    )
    check.add_argument("file", metavar="FILE", help="TOML config file")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    check.set_defaults(handler=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


def _load(path: str | None, workers: str | None = None) -> Settings | None:
    """Load settings (``--workers`` over everything else), or print every problem and return
    None."""
    environ: dict[str, str] | None = None
    if workers is not None:
        environ = {**os.environ, env_var_name("workers", "count"): workers}
    try:
        return load_settings(path, environ)
    except ConfigError as error:
        for problem in error.problems or (str(error),):
            print(f"relay: config error: {problem}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    settings = _load(args.config, args.workers)
    if settings is None:
        return 2
    setup_logging(settings.log)
    logger = logging.getLogger("relay.cli")
    logger.info("relay %s starting (config: %s)", __version__, args.config or "embedded defaults")
    if settings.api.public_url:
        logger.info("public URL: %s", settings.api.public_url)
    try:
        from relay.server import run
    except ModuleNotFoundError as error:
        if error.name != "relay.server":
            raise
        print("relay: the server module is not available in this installation", file=sys.stderr)
        return 1
    try:
        return run(settings)
    except KeyboardInterrupt:
        return 130


def _check_config(args: argparse.Namespace) -> int:
    settings = _load(args.file)
    if settings is None:
        return 2
    values = settings_as_dict(settings)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        print(f"# {args.file}: valid; effective settings (with RELAY_* environment applied)")
        port = settings.media.port
        candidates = [
            f"[{a}]:{port}" if ":" in a else f"{a}:{port}"
            for a in media_candidate_addresses(settings.media)
        ]
        print(f"# ICE host candidates on this machine: {', '.join(candidates)}")
        workers = worker_count(settings.workers)
        if workers > 1:
            print(f"# media workers: {workers}, on UDP ports {port}-{port + workers - 1}")
        else:
            print("# media workers: 1 (everything in one process)")
        print(format_toml(values), end="")
    return 0
