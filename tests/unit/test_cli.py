"""Command line: check-config, serve, --version, logging setup."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import relay
from relay.cli import main, setup_logging
from relay.config import LogSettings, Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELAY_* variable from the outer environment leaks into a test."""
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo setup_logging after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text('[api]\nport = 9000\nkeys = ["topsecret"]\n[log]\nlevel = "debug"\n')
    return path


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text('[api]\nport = "abc"\n')
    return path


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Replace relay.server with a stub whose run() records its settings and returns 0."""
    calls: list[Settings] = []

    def run(settings: Settings) -> int:
        calls.append(settings)
        return 0

    module = types.ModuleType("relay.server")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relay.server", module)
    return calls


# -- check-config ------------------------------------------------------------------------------


def test_check_config_good_file(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(good_file)]) == 0
    out = capsys.readouterr().out
    values = tomllib.loads(out)  # the printed text is TOML
    assert values["api"]["port"] == 9000
    assert values["api"]["keys"] == ["<redacted 9 chars>"]
    assert values["log"]["level"] == "debug"
    assert values["media"]["port"] == 40000  # defaults are shown too
    assert "topsecret" not in out


def test_check_config_shows_the_ice_host_candidates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "media.toml"
    path.write_text('[media]\nhost = "127.0.0.1"\nport = 40100\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# ICE host candidates on this machine: 127.0.0.1:40100\n" in out
    path.write_text('[media]\nannounced_addresses = ["203.0.113.10", "2001:db8::10"]\n')
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "candidates on this machine: 203.0.113.10:40000, [2001:db8::10]:40000\n" in out
    path.write_text("")  # the embedded default: every interface, loopback last
    assert main(["check-config", str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "ICE host candidates" in x)
    assert line.endswith(" 127.0.0.1:40000"), line


def test_check_config_json(good_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--json", str(good_file)]) == 0
    values = json.loads(capsys.readouterr().out)
    assert values["api"]["port"] == 9000
    assert values["session"]["consent_timeout"] == 30.0


def test_check_config_applies_environment(
    good_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_API__PORT", "9100")
    assert main(["check-config", "--json", str(good_file)]) == 0
    assert json.loads(capsys.readouterr().out)["api"]["port"] == 9100


def test_check_config_bad_file(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(bad_file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == (
        "relay: config error: api.port: expected an integer 1-65535, got 'abc'"
    )


def test_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "two.toml"
    path.write_text('[api]\nprot = 1\n[log]\nformat = "xml"\n')
    assert main(["check-config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("relay: config error: ") for line in lines)
    assert "api.prot" in lines[0] and "did you mean api.port?" in lines[0]
    assert "log.format" in lines[1]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def test_check_config_requires_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "FILE" in capsys.readouterr().err


def test_check_config_shipped_configs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check-config", str(ROOT / "configs" / "default.toml")]) == 0
    assert main(["check-config", str(ROOT / "configs" / "production.toml")]) == 2
    assert "api.keys" in capsys.readouterr().err
    monkeypatch.setenv("RELAY_API__KEYS", "secret1")
    assert main(["check-config", str(ROOT / "configs" / "production.toml")]) == 0


# -- serve -------------------------------------------------------------------------------------


def test_serve_bad_config_exits_2_without_starting(
    bad_file: Path, fake_server: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(bad_file)]) == 2
    assert fake_server == []
    assert "relay: config error: api.port" in capsys.readouterr().err


def test_serve_devkey_on_public_address_exits_2(
    fake_server: list[Settings],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_API__HOST", "0.0.0.0")
    assert main(["serve"]) == 2
    assert fake_server == []
    assert "devkey" in capsys.readouterr().err


def test_serve_runs_the_server_with_loaded_settings(
    good_file: Path, fake_server: list[Settings]
) -> None:
    assert main(["serve", "--config", str(good_file)]) == 0
    assert len(fake_server) == 1
    assert fake_server[0].api.port == 9000
    assert logging.getLogger().level == logging.DEBUG


def test_serve_returns_the_server_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("relay.server")
    module.run = lambda settings: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "relay.server", module)
    assert main(["serve"]) == 3


def test_serve_bad_config_in_a_subprocess(bad_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(bad_file)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "relay: config error: api.port" in result.stderr
    assert result.stdout == ""


# -- version and usage -------------------------------------------------------------------------


def test_version_via_python_m_relay() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"relay {relay.__version__}"


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"relay {relay.__version__}"


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: relay" in capsys.readouterr().err


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch"]) == 2
    assert "invalid choice" in capsys.readouterr().err


# -- logging -----------------------------------------------------------------------------------


def test_text_logging_format() -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="info", format="text"), stream)
    logging.getLogger("relay.server").info("listening on %s", "127.0.0.1:8080")
    logging.getLogger("relay.server").debug("hidden")
    line = stream.getvalue().strip()
    assert "\n" not in line
    date, clock, rest = line.split(" ", 2)
    assert len(date) == 10 and date[4] == "-" and date[7] == "-"
    assert len(clock) == 8 and clock[2] == ":" and clock[5] == ":"
    assert rest == "INFO relay.server: listening on 127.0.0.1:8080"


def test_json_logging_format() -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(level="debug", format="json"), stream)
    log = logging.getLogger("relay.sfu")
    log.debug("room %s created", "r1", extra={"room_id": "r1"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "DEBUG"
    assert first["logger"] == "relay.sfu"
    assert first["message"] == "room r1 created"
    assert first["room_id"] == "r1"
    assert first["time"].endswith("Z")
    assert second["level"] == "ERROR"
    assert "RuntimeError: boom" in second["exception"]


def test_setup_logging_replaces_its_previous_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(LogSettings(), first)
    setup_logging(LogSettings(level="warning"), second)
    logging.getLogger("relay.x").warning("once")
    logging.getLogger("relay.x").info("filtered")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert "filtered" not in second.getvalue()


def test_serve_workers_flag_overrides_the_config(
    good_file: Path, fake_server: list[Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(good_file), "--workers", "3"]) == 0
    assert fake_server[-1].workers.count == 3
    assert main(["serve", "--workers", "auto"]) == 0
    assert fake_server[-1].workers.count == "auto"
    assert main(["serve", "--workers", "none"]) == 2
    assert len(fake_server) == 2
    assert "workers.count" in capsys.readouterr().err
