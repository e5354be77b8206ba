"""Settings: defaults, TOML file, environment overrides, validation and the shipped configs."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from relay.config import (
    CHECKS,
    SECTIONS,
    ApiSettings,
    Boolean,
    ConfigError,
    Settings,
    env_var_name,
    is_loopback_host,
    load_settings,
    settings_as_dict,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def write(tmp_path: Path):
    """Write TOML text to a file and return its path."""

    def _write(text: str, name: str = "relay.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return _write


def error_of(path: Path | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ or {})
    return str(info.value)


# -- defaults and layering ---------------------------------------------------------------------


def test_no_file_no_environment_gives_embedded_defaults() -> None:
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.api.host == "127.0.0.1"
    assert settings.api.port == 8080
    assert settings.api.keys == ("devkey",)
    assert settings.media.host == "0.0.0.0"  # every interface; the API stays on loopback
    assert settings.media.port == 40000
    assert settings.media.announced_addresses == ()
    assert settings.log.level == "info"


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api.port = 1  # type: ignore[misc]


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RELAY_API__PORT", "8181")
    assert load_settings().api.port == 8181


def test_file_overrides_defaults(write) -> None:
    path = write(
        """
        [api]
        port = 9000
        keys = ["k1", "k2"]

        [media]
        announced_addresses = ["203.0.113.10", "2001:db8::0:1"]
        srtp_profiles = ["aes_cm_128_hmac_sha1_80"]

        [session]
        consent_timeout = 10      # an integer is fine for seconds

        [log]
        level = "DEBUG"
        format = "json"
        """
    )
    settings = load_settings(path, {})
    assert settings.api.port == 9000
    assert settings.api.keys == ("k1", "k2")
    assert settings.api.host == "127.0.0.1"  # untouched keys keep their defaults
    assert settings.media.announced_addresses == ("203.0.113.10", "2001:db8::1")
    assert settings.media.srtp_profiles == ("AES_CM_128_HMAC_SHA1_80",)
    assert settings.session.consent_timeout == 10.0
    assert isinstance(settings.session.consent_timeout, float)
    assert settings.log == dataclasses.replace(settings.log, level="debug", format="json")


def test_environment_beats_file(write) -> None:
    path = write('[api]\nport = 9000\nkeys = ["filekey"]\n[log]\nlevel = "error"\n')
    environ = {
        "RELAY_API__PORT": "8081",
        "RELAY_API__KEYS": "k1, k2,",
        "RELAY_SESSION__CONNECT_TIMEOUT": "2.5",
        "RELAY_MEDIA__ANNOUNCED_ADDRESSES": "198.51.100.1,198.51.100.2",
        "OTHER_VARIABLE": "ignored",
    }
    settings = load_settings(path, environ)
    assert settings.api.port == 8081
    assert settings.api.keys == ("k1", "k2")
    assert settings.session.connect_timeout == 2.5
    assert settings.media.announced_addresses == ("198.51.100.1", "198.51.100.2")
    assert settings.log.level == "error"  # from the file


def test_environment_fixes_an_invalid_file_value(write) -> None:
    path = write("[api]\nkeys = []\n")
    assert "api.keys" in error_of(path)
    assert load_settings(path, {"RELAY_API__KEYS": "k"}).api.keys == ("k",)


def test_empty_list_from_environment(write) -> None:
    path = write('[media]\nannounced_addresses = ["203.0.113.10"]\n')
    settings = load_settings(path, {"RELAY_MEDIA__ANNOUNCED_ADDRESSES": ""})
    assert settings.media.announced_addresses == ()


def test_env_var_name() -> None:
    assert env_var_name("api", "port") == "RELAY_API__PORT"
    assert env_var_name("media", "announced_addresses") == "RELAY_MEDIA__ANNOUNCED_ADDRESSES"


# -- unknown names -----------------------------------------------------------------------------


def test_unknown_key_is_named_with_a_suggestion(write) -> None:
    message = error_of(write("[api]\nprot = 8080\n"))
    assert "api.prot" in message
    assert "did you mean api.port?" in message


def test_key_in_the_wrong_section_points_to_the_right_one(write) -> None:
    message = error_of(write('[api]\nannounced_addresses = ["203.0.113.10"]\n'))
    assert "api.announced_addresses" in message
    assert "media.announced_addresses" in message


def test_unknown_key_without_a_close_match_lists_valid_keys(write) -> None:
    message = error_of(write("[log]\nzzz = 1\n"))
    assert "log.zzz" in message
    assert "level" in message and "format" in message


def test_unknown_section_is_named_with_a_suggestion(write) -> None:
    message = error_of(write("[sesion]\nconsent_timeout = 5\n"))
    assert "[sesion]" in message
    assert "did you mean [session]?" in message


def test_top_level_key_outside_a_section(write) -> None:
    message = error_of(write("port = 8080\n"))
    assert "port: unknown top-level key" in message
    assert "api.port" in message


def test_section_that_is_not_a_table(write) -> None:
    assert "api: expected a table" in error_of(write("api = 3\n"))


def test_unknown_relay_environment_variable() -> None:
    message = error_of(environ={"RELAY_API_PORT": "8081"})
    assert "RELAY_API_PORT" in message
    assert "did you mean RELAY_API__PORT?" in message
    message = error_of(environ={"RELAY_NOTHING": "x"})
    assert "RELAY_NOTHING" in message and "unknown environment variable" in message


def test_all_problems_are_reported_together(write) -> None:
    path = write('[api]\nport = "x"\nprot = 1\n[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, {"RELAY_MEDIA__PORT": "0"})
    problems = info.value.problems
    assert len(problems) == 4
    assert any(p.startswith("api.port:") for p in problems)
    assert any(p.startswith("api.prot:") for p in problems)
    assert any(p.startswith("log.level:") for p in problems)
    assert any(p.startswith("media.port (RELAY_MEDIA__PORT):") for p in problems)


# -- files -------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "missing.toml")
    assert "missing.toml" in message and "cannot read" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert "cannot read" in error_of(tmp_path)


def test_toml_syntax_error_names_the_line(write) -> None:
    message = error_of(write('[api]\nport = 8080\nhost = "127.0.0.1\n'))
    assert "invalid TOML" in message
    assert "line 3" in message


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[api]\npublic_url = "http://\xe9"\n')
    assert "UTF-8" in error_of(path)


# -- types and ranges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ('[api]\nport = "abc"', "api.port", "expected an integer 1-65535, got 'abc'"),
        ("[api]\nport = 0", "api.port", "1-65535"),
        ("[api]\nport = 65536", "api.port", "1-65535"),
        ("[api]\nport = 80.5", "api.port", "integer"),
        ("[api]\nport = true", "api.port", "integer"),
        ('[api]\nkeys = "devkey"', "api.keys", "list"),
        ("[api]\nkeys = []", "api.keys", "must not be empty"),
        ('[api]\nkeys = ["has space"]', "api.keys", "without spaces"),
        ('[api]\nkeys = ["a,b"]', "api.keys", "commas"),
        ('[api]\nkeys = ["k", "k"]', "api.keys", "duplicate"),
        ("[api]\nkeys = [1]", "api.keys", "expected"),
        ("[api]\nmax_body_bytes = 0", "api.max_body_bytes", "positive integer"),
        ('[api]\nhost = "not a host"', "api.host", "IP address or host name"),
        ('[api]\nhost = ""', "api.host", "IP address or host name"),
        ('[api]\npublic_url = "relay.example.com"', "api.public_url", "http"),
        ('[media]\nhost = "example.com"', "media.host", "IP address"),
        ('[media]\nannounced_addresses = ["relay.example.com"]', "media.announced_addresses", "IP"),
        ('[media]\nannounced_addresses = ["0.0.0.0"]', "media.announced_addresses", "IP"),
        ('[media]\nannounced_addresses = "203.0.113.10"', "media.announced_addresses", "list"),
        ('[media]\ncertificate = "dsa"', "media.certificate", "'ecdsa', 'rsa'"),
        ('[media]\nsrtp_profiles = ["NULL"]', "media.srtp_profiles", "AEAD_AES_128_GCM"),
        ('[media]\nsrtp_profiles = ["AEAD_AES_256_GCM"]', "media.srtp_profiles", "expected"),
        ("[media]\nsrtp_profiles = []", "media.srtp_profiles", "must not be empty"),
        ('[media]\ncodec_preference = ["H265"]', "media.codec_preference", "'VP8', 'H264'"),
        ("[media]\ncodec_preference = []", "media.codec_preference", "must not be empty"),
        ('[media]\ncodec_preference = ["VP8", "vp8"]', "media.codec_preference", "duplicate"),
        ('[media]\ncodec_preference = "VP8"', "media.codec_preference", "list"),
        ("[media]\nreceive_buffer_bytes = -1", "media.receive_buffer_bytes", "positive"),
        ("[session]\nconsent_timeout = 0", "session.consent_timeout", "positive number"),
        ("[session]\nconnect_timeout = -1.5", "session.connect_timeout", "positive number"),
        ("[session]\nkeyframe_request_interval = inf", "session.keyframe_request_interval", ""),
        ("[session]\nsender_report_interval = nan", "session.sender_report_interval", ""),
        ('[session]\nconsent_timeout = "30"', "session.consent_timeout", "seconds"),
        ("[limits]\nmax_rooms = 0", "limits.max_rooms", "positive integer"),
        ("[limits]\nevent_queue_size = 0", "limits.event_queue_size", "positive integer"),
        ("[rooms]\nempty_timeout = 0", "rooms.empty_timeout", "positive"),
        ('[events]\nwebhook_url = "ftp://example.com/x"', "events.webhook_url", "http"),
        ('[events]\nwebhook_url = "https://"', "events.webhook_url", "http"),
        ("[events]\nwebhook_secret = 5", "events.webhook_secret", "string"),
        ('[log]\nlevel = "verbose"', "log.level", "'debug', 'info', 'warning', 'error'"),
        ('[log]\nformat = "xml"', "log.format", "'text', 'json'"),
    ],
)
def test_bad_file_values_name_the_key(write, toml: str, key: str, fragment: str) -> None:
    message = error_of(write(toml + "\n"))
    assert message.startswith(f"{key}: ")
    assert fragment in message


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("RELAY_API__PORT", "abc", "api.port (RELAY_API__PORT): expected an integer 1-65535"),
        ("RELAY_API__PORT", "", "api.port (RELAY_API__PORT)"),
        ("RELAY_API__KEYS", "", "api.keys (RELAY_API__KEYS): must not be empty"),
        ("RELAY_SESSION__CONSENT_TIMEOUT", "soon", "session.consent_timeout"),
        ("RELAY_SESSION__CONSENT_TIMEOUT", "-1", "positive"),
        ("RELAY_MEDIA__ANNOUNCED_ADDRESSES", "203.0.113.10,bad", "'bad'"),
        ("RELAY_LOG__FORMAT", "xml", "log.format (RELAY_LOG__FORMAT)"),
    ],
)
def test_bad_environment_values_name_variable_and_key(
    variable: str, value: str, fragment: str
) -> None:
    message = error_of(environ={variable: value})
    assert variable in message
    assert fragment in message


def test_secret_values_are_not_echoed_in_errors() -> None:
    message = error_of(environ={"RELAY_API__KEYS": "good,sec ret"})
    assert "sec ret" not in message
    assert "redacted" in message


def test_value_parsing_from_environment() -> None:
    settings = load_settings(
        None,
        {
            "RELAY_API__MAX_BODY_BYTES": " 1024 ",
            "RELAY_ROOMS__EMPTY_TIMEOUT": "60",
            "RELAY_LOG__LEVEL": "Warning",
            "RELAY_MEDIA__SRTP_PROFILES": "aes_cm_128_hmac_sha1_80, aead_aes_128_gcm",
            "RELAY_EVENTS__WEBHOOK_URL": "https://hooks.example.com/relay",
        },
    )
    assert settings.api.max_body_bytes == 1024
    assert settings.rooms.empty_timeout == 60.0
    assert settings.log.level == "warning"
    assert settings.media.srtp_profiles == ("AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM")
    assert settings.events.webhook_url == "https://hooks.example.com/relay"


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_boolean_environment_words(text: str, value: bool) -> None:
    assert Boolean().from_env(text) is value


def test_boolean_rejects_other_words() -> None:
    with pytest.raises(ValueError, match="true/false"):
        Boolean().from_env("maybe")
    with pytest.raises(ValueError):
        Boolean().from_toml("true")


def test_default_room_size_must_fit_the_limit() -> None:
    message = error_of(environ={"RELAY_ROOMS__DEFAULT_MAX_PARTICIPANTS": "60"})
    assert "rooms.default_max_participants" in message
    assert "limits.max_participants_per_room" in message


# -- the development key -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.5", "relay.example.com"])
def test_devkey_refused_on_non_loopback_address(host: str) -> None:
    message = error_of(environ={"RELAY_API__HOST": host})
    assert message == (
        f"api.keys: the development key 'devkey' must not be exposed on non-loopback "
        f"address {host}; set api.keys"
    )


def test_devkey_refused_among_other_keys(write) -> None:
    path = write('[api]\nhost = "0.0.0.0"\nkeys = ["prod", "devkey"]\n')
    assert "devkey" in error_of(path)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "localhost"])
def test_devkey_allowed_on_loopback(host: str) -> None:
    assert load_settings(None, {"RELAY_API__HOST": host}).api.keys == ("devkey",)


def test_real_keys_allowed_on_any_address() -> None:
    settings = load_settings(None, {"RELAY_API__HOST": "0.0.0.0", "RELAY_API__KEYS": "s3cret"})
    assert settings.api.host == "0.0.0.0"


def test_is_loopback_host() -> None:
    assert is_loopback_host("::ffff:127.0.0.1")
    assert not is_loopback_host("0.0.0.0")
    assert not is_loopback_host("10.0.0.1")


# -- display -----------------------------------------------------------------------------------


def test_settings_as_dict_nests_by_section_and_redacts_secrets() -> None:
    settings = Settings(
        api=ApiSettings(keys=("abcdef", "x")),
        events=dataclasses.replace(Settings().events, webhook_secret="hush"),
    )
    values = settings_as_dict(settings)
    assert list(values) == list(SECTIONS)
    assert values["api"]["port"] == 8080
    assert values["api"]["keys"] == ["<redacted 6 chars>", "<redacted 1 char>"]
    assert values["events"]["webhook_secret"] == "<redacted 4 chars>"
    assert values["media"]["srtp_profiles"] == ["AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80"]
    assert "abcdef" not in repr(values) and "hush" not in repr(values)
    assert settings_as_dict(settings, redact=False)["api"]["keys"] == ["abcdef", "x"]


def test_empty_secret_shown_as_unset() -> None:
    assert settings_as_dict(Settings())["events"]["webhook_secret"] == ""


# -- one validator per field -------------------------------------------------------------------


def test_every_field_has_exactly_one_validator() -> None:
    assert list(CHECKS) == list(SECTIONS)
    for section, cls in SECTIONS.items():
        assert list(CHECKS[section]) == [f.name for f in dataclasses.fields(cls)], section


def test_every_default_passes_its_validator() -> None:
    defaults = Settings()
    for section, checks in CHECKS.items():
        for key, check in checks.items():
            value = getattr(getattr(defaults, section), key)
            raw = list(value) if isinstance(value, tuple) else value
            assert check.from_toml(raw) == value, f"{section}.{key}"


# -- shipped configs ---------------------------------------------------------------------------


def test_default_toml_equals_embedded_defaults() -> None:
    assert load_settings(CONFIGS / "default.toml", {}) == Settings()


def test_default_toml_documents_every_field() -> None:
    with open(CONFIGS / "default.toml", "rb") as file:
        document = tomllib.load(file)
    assert list(document) == list(SECTIONS)
    for section, cls in SECTIONS.items():
        assert sorted(document[section]) == sorted(f.name for f in dataclasses.fields(cls))


def test_default_toml_comments_every_key() -> None:
    lines = (CONFIGS / "default.toml").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), f"no comment above: {line}"


def test_production_toml_with_keys_from_environment() -> None:
    settings = load_settings(CONFIGS / "production.toml", {"RELAY_API__KEYS": "secret1"})
    assert settings.api.host == "0.0.0.0"
    assert settings.api.port == 8080
    assert settings.api.keys == ("secret1",)
    assert settings.media.host == "0.0.0.0"
    assert settings.media.port == 40000
    assert settings.media.announced_addresses == ("203.0.113.10",)
    assert settings.log.format == "json"
    assert settings.events.webhook_url == ""


def test_production_toml_without_keys_is_refused() -> None:
    message = error_of(CONFIGS / "production.toml")
    assert message.startswith("api.keys")
    assert "RELAY_API__KEYS" in message


# -- participant tokens and the demo -----------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "fragment"),
    [
        ('[auth]\ntoken_secret = "too-short"', "auth.token_secret", "at least 32 characters"),
        ("[auth]\ntoken_secret = 32", "auth.token_secret", "at least 32 characters"),
        ('[demo]\nenabled = "yes"', "demo.enabled", "boolean"),
    ],
)
def test_bad_auth_and_demo_values_name_the_key(write, toml: str, key: str, fragment: str) -> None:
    message = error_of(write(toml + "\n"))
    assert message.startswith(f"{key}: ")
    assert fragment in message


def test_short_token_secret_is_not_echoed() -> None:
    message = error_of(environ={"RELAY_AUTH__TOKEN_SECRET": "hunter2"})
    assert "hunter2" not in message and "redacted 7 chars" in message


def test_token_secret_and_demo_switch(write) -> None:
    secret = "s" * 32
    settings = load_settings(write(f'[auth]\ntoken_secret = "{secret}"\n[demo]\nenabled = false\n'))
    assert settings.auth.token_secret == secret
    assert settings.demo.enabled is False
    assert load_settings(None, {}).auth.token_secret == ""  # tokens off by default
    assert load_settings(None, {}).demo.enabled is True
    assert settings_as_dict(settings)["auth"]["token_secret"] == "<redacted 32 chars>"


# -- video codec preference --------------------------------------------------------------------


def test_codec_preference_from_file_and_environment(write) -> None:
    assert load_settings(None, {}).media.codec_preference == ("VP8", "H264", "VP9", "AV1")
    path = write('[media]\ncodec_preference = ["h264", "VP8"]\n')
    assert load_settings(path, {}).media.codec_preference == ("H264", "VP8")
    environ = {"RELAY_MEDIA__CODEC_PREFERENCE": "vp9, av1"}
    assert load_settings(path, environ).media.codec_preference == ("VP9", "AV1")


def test_unknown_codec_in_the_environment_stops_start_up() -> None:
    message = error_of(environ={"RELAY_MEDIA__CODEC_PREFERENCE": "VP8,H265"})
    assert message.startswith("media.codec_preference (RELAY_MEDIA__CODEC_PREFERENCE): ")
    assert "'H265'" in message


def test_workers_count_is_auto_or_a_number(write, monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.config import worker_count

    assert load_settings(write('[workers]\ncount = "AUTO"\n'), {}).workers.count == "auto"
    assert load_settings(write("[workers]\ncount = 4\n"), {}).workers.count == 4
    assert load_settings(None, {"RELAY_WORKERS__COUNT": "2"}).workers.count == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert worker_count(load_settings(None, {}).workers) == 3
    for bad in ("0", '"many"', "1.5", "true"):
        assert "workers.count: expected" in error_of(write(f"[workers]\ncount = {bad}\n"))
    assert "workers.placement: expected one of 'spread', 'pack'" in error_of(
        write('[workers]\nplacement = "random"\n')
    )
    # every worker needs its own media port
    problem = error_of(write("[media]\nport = 65535\n[workers]\ncount = 2\n"))
    assert "workers.count: 2 workers need media ports 65535-65536" in problem


def test_settings_travel_to_the_workers_unchanged(write) -> None:
    """The front hands its effective settings to its workers as TOML: every value, secrets
    included, comes out equal, and the workers' environment plays no part."""
    from relay.cli import format_toml
    from relay.config import settings_as_dict, settings_from_toml

    settings = load_settings(
        write(
            '[api]\nkeys = ["k1", "k2"]\n[auth]\ntoken_secret = "' + "s" * 40 + '"\n'
            '[media]\nannounced_addresses = ["203.0.113.7"]\ncodec_preference = ["VP9", "VP8"]\n'
            '[workers]\ncount = 3\nplacement = "pack"\ncall_timeout = 1.5\n'
        ),
        {"RELAY_RTP__NACK": "false"},
    )
    text = format_toml(settings_as_dict(settings, redact=False))
    assert settings_from_toml(text) == settings
    with pytest.raises(ConfigError) as info:
        settings_from_toml("[api\n", "front settings")
    assert str(info.value).startswith("front settings: invalid TOML")
