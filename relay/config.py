"""Typed settings: embedded defaults < TOML file < ``RELAY_<SECTION>__<KEY>`` environment.

Every setting is a field of a frozen dataclass below; the dataclass defaults are the embedded
defaults (documented in ``configs/default.toml``). :func:`load_settings` layers a TOML file and
the environment on top and checks every value against the single table :data:`CHECKS`, which
holds one validator per field. Constructing the dataclasses directly does not validate, so
tests may build settings freely (for example ``ApiSettings(port=0)`` for an ephemeral port).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from relay.rtc.sdp import DEFAULT_VIDEO_PREFERENCE, SUPPORTED_VIDEO

__all__ = [
    "CHECKS",
    "DEV_API_KEY",
    "ENV_PREFIX",
    "MIN_TOKEN_SECRET_LENGTH",
    "ApiSettings",
    "AuthSettings",
    "ComplianceSettings",
    "DataChannelSettings",
    "ConfigError",
    "DemoSettings",
    "EventSettings",
    "LimitSettings",
    "LogSettings",
    "MediaSettings",
    "OverloadSettings",
    "RecordingSettings",
    "RoomSettings",
    "SessionSettings",
    "Settings",
    "WhipSettings",
    "env_var_name",
    "is_loopback_host",
    "load_settings",
    "settings_as_dict",
]

ENV_PREFIX = "RELAY_"
DEV_API_KEY = "devkey"
#: Shortest accepted ``auth.token_secret``: an HS256 key of fewer than 256 bits can be guessed
#: offline from any token it signed (RFC 7518, section 3.2).
MIN_TOKEN_SECRET_LENGTH = 32

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
CLIENT_ADDRESSES = ("none", "hashed", "full")
#: Regions whose law requires a notice-and-action channel for illegal content (the EU's
#: Digital Services Act, Article 16; the EEA applies it): the EU and EEA and their members.
REPORTING_REGIONS = frozenset(
    "EU EEA AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE "
    "IS LI NO".split()
)
CERTIFICATE_TYPES = ("ecdsa", "rsa")
SRTP_PROFILES = ("AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80")


#: The most worker processes one relay runs.
MAX_WORKERS = 256


class ConfigError(Exception):
    """Invalid configuration. ``str(e)`` names the offending key or file, one problem a line."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


# --------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP control API."""

    host: str = "127.0.0.1"
    port: int = 8080
    keys: tuple[str, ...] = (DEV_API_KEY,)
    max_body_bytes: int = 262144
    public_url: str = ""
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0


@dataclass(frozen=True)
class AuthSettings:
    """Participant tokens (HS256 JWT) that clients may use instead of an API key."""

    token_secret: str = ""


@dataclass(frozen=True)
class MediaSettings:
    """The single UDP media port shared by all participants.

    Bound to every interface by default and announced with this machine's interface addresses
    (:mod:`relay.addresses`), since browsers such as Firefox skip loopback candidates."""

    host: str = "0.0.0.0"
    port: int = 40000
    announced_addresses: tuple[str, ...] = ()
    certificate: str = "ecdsa"
    srtp_profiles: tuple[str, ...] = ("AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80")
    receive_buffer_bytes: int = 4194304
    send_buffer_bytes: int = 4194304
    codec_preference: tuple[str, ...] = DEFAULT_VIDEO_PREFERENCE
    #: ICE-TCP (RFC 6544): which transports the relay announces candidates for
    transports: str = "udp+tcp"
    tcp_max_connections: int = 1000
    #: connections from one address (IPv6: one /64) still without an authenticated STUN check
    tcp_max_pending_per_address: int = 16
    tcp_write_buffer_bytes: int = 262144
    tcp_handshake_timeout: float = 5.0
    #: time slice (µs) each media process asks the kernel's scheduler for (relay/scheduling.py)
    scheduler_slice_us: int = 100


@dataclass(frozen=True)
class SessionSettings:
    """Timers of one participant's peer connections (seconds)."""

    consent_timeout: float = 30.0
    connect_timeout: float = 30.0
    keyframe_request_interval: float = 0.5
    sender_report_interval: float = 1.0


@dataclass(frozen=True)
class RtpSettings:
    """Loss repair and congestion-control feedback."""

    nack: bool = True
    history_size: int = 1024
    retransmission_budget: float = 0.5
    congestion_control: str = "auto"
    feedback_interval: float = 0.05


@dataclass(frozen=True)
class LimitSettings:
    """Upper bounds on everything a caller can create or send."""

    max_rooms: int = 1000
    max_participants_per_room: int = 50
    max_tracks_per_participant: int = 8
    max_metadata_bytes: int = 4096
    max_sdp_bytes: int = 65536
    event_queue_size: int = 1000
    event_streams_per_key: int = 100
    event_streams_per_token: int = 4


@dataclass(frozen=True)
class OverloadSettings:
    """Load shedding: when new sessions are refused (503 with ``Retry-After``)."""

    enabled: bool = True
    loop_lag_high: float = 0.2
    loop_lag_low: float = 0.05
    packet_rate_high: int = 0
    packet_rate_low: int = 0
    smoothing: float = 2.0
    recover_after: float = 2.0
    retry_after: int = 5


@dataclass(frozen=True)
class RoomSettings:
    """Defaults for rooms created without explicit values."""

    empty_timeout: float = 300.0
    default_max_participants: int = 16


@dataclass(frozen=True)
class EventSettings:
    """Event delivery to a webhook."""

    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout: float = 5.0


@dataclass(frozen=True)
class LogSettings:
    """Process logging."""

    level: str = "info"
    format: str = "text"
    #: how a client's IP address appears in log lines: not at all ("none"), as a keyed hash
    #: under a random per-process salt ("hashed": the same address gives the same tag within
    #: one process run, and nothing outside it), or as it is ("full")
    client_addresses: str = "hashed"


@dataclass(frozen=True)
class DemoSettings:
    """The browser demo page at ``/demo``."""

    enabled: bool = True


@dataclass(frozen=True)
class WorkerSettings:
    """Worker processes: how many, and where new participants go."""

    count: int | str = "auto"
    placement: str = "spread"
    call_timeout: float = 2.0


@dataclass(frozen=True)
class RecordingSettings:
    """Consent-gated recording: where files go, how long they are kept, how the writer is
    bounded. Recording is off while ``directory`` is ""."""

    directory: str = ""
    #: days a finished recording's files are kept (0: until deleted through the API)
    retention_days: int = 7
    #: packets waiting for the writer thread; one more is dropped and counted
    queue_packets: int = 4096
    #: a recording stops (event ``recording.stopped``, reason ``disk_full``) when the free
    #: space of its file system falls below this
    min_free_bytes: int = 268435456


@dataclass(frozen=True)
class ComplianceSettings:
    """Where the relay runs, in law: ``region`` "EU" (or "EEA", or an EU/EEA member's ISO code)
    switches on abuse reports (``POST /v1/rooms/{room}/reports``), kept in ``reports_file``."""

    region: str = ""
    reports_file: str = ""
    #: reports one reporter may make per hour; one more is 429
    reports_per_hour: int = 10


@dataclass(frozen=True)
class WhipSettings:
    """WHIP and WHEP (``/whip/{room}``, ``/whep/{room}``): the origin allowed to call them from
    a browser page, and the ICE servers announced to their clients in ``Link`` headers."""

    allow_origin: str = "*"
    ice_servers: tuple[str, ...] = ()
    #: long-term TURN credentials, sent with the ``turn:``/``turns:`` servers only
    ice_username: str = ""
    ice_credential: str = ""


@dataclass(frozen=True)
class DataChannelSettings:
    """Data channels (``m=application``, SCTP over DTLS) relayed between the participants of a
    room, with per-participant limits; a message over a limit is dropped and counted."""

    enabled: bool = True
    #: the largest message relayed (also announced as ``a=max-message-size``)
    max_message_bytes: int = 65536
    #: messages and bytes one participant may send per second, on all its channels
    messages_per_second: int = 20
    bytes_per_second: int = 262144
    #: how long a participant may send above those rates (the token buckets' depth)
    burst_seconds: float = 2.0
    #: channels one participant may open
    max_channels_per_participant: int = 16


@dataclass(frozen=True)
class Settings:
    """All settings, one attribute per TOML section."""

    api: ApiSettings = field(default_factory=ApiSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    rtp: RtpSettings = field(default_factory=RtpSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    overload: OverloadSettings = field(default_factory=OverloadSettings)
    rooms: RoomSettings = field(default_factory=RoomSettings)
    events: EventSettings = field(default_factory=EventSettings)
    log: LogSettings = field(default_factory=LogSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)
    workers: WorkerSettings = field(default_factory=WorkerSettings)
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    compliance: ComplianceSettings = field(default_factory=ComplianceSettings)
    whip: WhipSettings = field(default_factory=WhipSettings)
    datachannels: DataChannelSettings = field(default_factory=DataChannelSettings)


def _sections() -> dict[str, type]:
    defaults = Settings()
    return {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}


#: The settings class of every section, by section name, in declaration order.
SECTIONS: dict[str, type] = _sections()


# --------------------------------------------------------------------------------------------
# Validators: each turns a TOML value or an environment string into the typed, checked value.


class _Invalid(ValueError):
    """A value failed its check; the message is completed with the key by the caller."""


class Check:
    """Base validator. ``expected`` describes valid values for error messages."""

    expected = "a valid value"

    def from_toml(self, value: object) -> Any:
        """Check a value read from TOML and return it in its canonical form."""
        return self.validate(value)

    def from_env(self, text: str) -> Any:
        """Parse an environment string, check it and return it in its canonical form."""
        return self.validate(self.parse(text))

    def parse(self, text: str) -> object:
        """Turn an environment string into the Python type ``validate`` expects."""
        return text

    def validate(self, value: object) -> Any:
        """Return the canonical value or raise :class:`_Invalid`."""
        raise NotImplementedError

    def fail(self, value: object) -> _Invalid:
        """An error saying what was expected and what was found."""
        return _Invalid(f"expected {self.expected}, got {value!r}")


class Integer(Check):
    """An integer within ``[low, high]`` (``high`` None: unbounded)."""

    def __init__(self, low: int, high: int | None = None) -> None:
        self.low, self.high = low, high
        if high is not None:
            self.expected = f"an integer {low}-{high}"
        elif low == 1:
            self.expected = "a positive integer"
        else:
            self.expected = f"an integer >= {low}"

    def parse(self, text: str) -> object:
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise self.fail(text) from None

    def validate(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(value)
        if value < self.low or (self.high is not None and value > self.high):
            raise self.fail(value)
        return value


class SliceMicroseconds(Integer):
    """0 (the kernel's default slice) or a slice the kernel accepts, in microseconds."""

    def __init__(self) -> None:
        super().__init__(0, 100_000)
        self.expected = "0 or an integer 100-100000 (microseconds)"

    def validate(self, value: object) -> int:
        checked = super().validate(value)
        if 0 < checked < 100:
            raise self.fail(value)
        return checked


class Seconds(Check):
    """A positive, finite number of seconds (TOML integers are accepted)."""

    expected = "a positive number of seconds"

    def parse(self, text: str) -> object:
        try:
            return float(text.strip())
        except ValueError:
            raise self.fail(text) from None

    def validate(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(value)
        if not math.isfinite(value) or value <= 0:
            raise self.fail(value)
        return float(value)


class Share(Seconds):
    """A number above 0 and at most ``high``: a share of something (TOML integers accepted)."""

    def __init__(self, high: float) -> None:
        self.high = high
        self.expected = f"a number above 0 and at most {high:g}"

    def validate(self, value: object) -> float:
        value = super().validate(value)
        if value > self.high:
            raise self.fail(value)
        return value


class Boolean(Check):
    """true/false in TOML; true/false/1/0/yes/no/on/off in the environment."""

    expected = "a boolean (true or false)"
    WORDS = {"true": True, "1": True, "yes": True, "on": True}
    WORDS.update({"false": False, "0": False, "no": False, "off": False})

    def parse(self, text: str) -> object:
        try:
            return self.WORDS[text.strip().lower()]
        except KeyError:
            raise _Invalid(f"expected true/false/1/0/yes/no, got {text!r}") from None

    def validate(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.fail(value)
        return value


class Text(Check):
    """Any string."""

    expected = "a string"

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(value)
        return value


class Choice(Check):
    """One string out of a fixed set, matched case-insensitively, stored in its listed spelling."""

    def __init__(self, options: Iterable[str]) -> None:
        self.options = tuple(options)
        self.expected = "one of " + ", ".join(repr(o) for o in self.options)

    def validate(self, value: object) -> str:
        if isinstance(value, str):
            for option in self.options:
                if value.strip().lower() == option.lower():
                    return option
        raise self.fail(value)


class WorkerCount(Integer):
    """``"auto"`` (one worker per usable core) or a number of worker processes."""

    def __init__(self) -> None:
        super().__init__(1, MAX_WORKERS)
        self.expected = f'"auto" or an integer 1-{MAX_WORKERS}'

    def parse(self, text: str) -> object:
        if text.strip().lower() == "auto":
            return "auto"
        return super().parse(text)

    def validate(self, value: object) -> int | str:  # type: ignore[override]
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return super().validate(value)


class Region(Check):
    """The empty string (none) or a region code: an ISO 3166-1 alpha-2 country code, "EU" or "EEA",
    stored upper-case."""

    expected = '"" or a region code such as "EU", "EEA" or an ISO country code ("DE")'

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(value)
        code = value.strip().upper()
        if code and not re.fullmatch(r"[A-Z]{2}|EEA", code):
            raise self.fail(value)
        return code


class IPAddress(Check):
    """An IPv4 or IPv6 address, stored in its compressed form."""

    expected = "an IP address"

    def __init__(self, *, reachable: bool = False) -> None:
        self.reachable = reachable
        if reachable:
            self.expected = "an IP address clients can reach (not unspecified or multicast)"

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(value)
        try:
            address = ipaddress.ip_address(value.strip())
        except ValueError:
            raise self.fail(value) from None
        if self.reachable and (address.is_unspecified or address.is_multicast):
            raise self.fail(value)
        return str(address)


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class Host(Check):
    """An IP address or a DNS host name to bind to."""

    expected = "an IP address or host name"

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(value)
        host = value.strip()
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if 0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
            return host
        raise self.fail(value)


class HttpUrl(Check):
    """An http:// or https:// URL with a host, or the empty string (unset)."""

    expected = "an http:// or https:// URL or an empty string"

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise self.fail(value)
        url = value.strip()
        if not url:
            return ""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise self.fail(value) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.fail(value)
        return url


class ApiKey(Check):
    """A bearer token: visible ASCII without commas (commas separate keys in the environment)."""

    expected = "a key of visible ASCII characters without spaces or commas"

    def validate(self, value: object) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[!-+\--~]+", value):
            raise _Invalid(f"expected {self.expected}, got {_redact(value)}")
        return value


class List(Check):
    """A list of items (TOML array, or comma-separated in the environment) -> tuple."""

    def __init__(self, item: Check, expected: str, *, non_empty: str = "") -> None:
        self.item, self.expected, self.non_empty = item, expected, non_empty

    def parse(self, text: str) -> object:
        return [part.strip() for part in text.split(",") if part.strip()]

    def validate(self, value: object) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise self.fail(value)
        items: list[Any] = []
        for entry in value:
            checked = self.item.validate(entry)
            if checked in items:
                raise _Invalid(f"duplicate entry {_show(self.item, checked)}")
            items.append(checked)
        if self.non_empty and not items:
            raise _Invalid(f"must not be empty; {self.non_empty}")
        return tuple(items)


class IceServerUrl(Check):
    """A STUN or TURN server URI (RFC 7064, RFC 7065) that fits a ``Link`` header."""

    expected = "a stun:, stuns:, turn: or turns: URI"

    def validate(self, value: object) -> str:
        if not isinstance(value, str) or not re.fullmatch(
            r"(stuns?|turns?):[A-Za-z0-9.:\[\]_~%!$&'()*+,;=?/@-]+", value
        ):
            raise self.fail(value)
        return value


class QuotedText(Check):
    """A string that goes into an HTTP quoted-string: printable ASCII without ``"`` or ``\\``."""

    expected = 'printable ASCII without " or \\'

    def validate(self, value: object) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[ !#-\[\]-~]*", value):
            raise _Invalid(f"expected {self.expected}")
        return value


class TokenSecret(Check):
    """An HMAC key of at least :data:`MIN_TOKEN_SECRET_LENGTH` characters, or "" (disabled)."""

    expected = (
        f'"" (participant tokens disabled) or a secret of at least {MIN_TOKEN_SECRET_LENGTH} '
        "characters"
    )

    def validate(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected {self.expected}, got {_redact(value)}")
        if value and len(value.encode("utf-8")) < MIN_TOKEN_SECRET_LENGTH:
            raise _Invalid(f"expected {self.expected}, got {_redact(value)}")
        return value


def _show(item: Check, value: object) -> str:
    return _redact(value) if isinstance(item, ApiKey) else repr(value)


def _redact(value: object) -> str:
    if isinstance(value, str):
        return f"<redacted {len(value)} char{'' if len(value) == 1 else 's'}>"
    return repr(value)


#: One validator per settings field: ``CHECKS[section][key]``.
#: Where new participants go with several workers: the least loaded worker ("spread"), or the
#: worker that already holds the room ("pack").
PLACEMENTS = ("spread", "pack")
#: How publishers get congestion-control feedback: transport-cc when they offer it, else REMB
#: ("auto"); REMB only ("remb"); none ("none", the client's loss-based estimate alone).
CONGESTION_CONTROL = ("auto", "remb", "none")
#: The transports of the relay's ICE candidates: UDP and TCP (RFC 6544, UDP preferred), UDP
#: only, or TCP only (for tests and for networks that block UDP).
MEDIA_TRANSPORTS = ("udp+tcp", "udp", "tcp")

CHECKS: dict[str, dict[str, Check]] = {
    "api": {
        "host": Host(),
        "port": Integer(1, 65535),
        "keys": List(ApiKey(), "a list of API keys", non_empty="set api.keys or RELAY_API__KEYS"),
        "max_body_bytes": Integer(1),
        "public_url": HttpUrl(),
        "max_connections": Integer(1),
        "header_timeout": Seconds(),
        "body_timeout": Seconds(),
        "keep_alive_timeout": Seconds(),
    },
    "auth": {
        "token_secret": TokenSecret(),
    },
    "media": {
        "host": IPAddress(),
        "port": Integer(1, 65535),
        "announced_addresses": List(IPAddress(reachable=True), "a list of IP addresses"),
        "certificate": Choice(CERTIFICATE_TYPES),
        "srtp_profiles": List(
            Choice(SRTP_PROFILES), "a list of SRTP profile names", non_empty="name at least one"
        ),
        "receive_buffer_bytes": Integer(1),
        "send_buffer_bytes": Integer(1),
        "codec_preference": List(
            Choice(SUPPORTED_VIDEO),
            "a list of video codec names",
            non_empty="name at least one video codec",
        ),
        "transports": Choice(MEDIA_TRANSPORTS),
        "tcp_max_connections": Integer(1),
        "tcp_max_pending_per_address": Integer(1),
        "tcp_write_buffer_bytes": Integer(4096, 16777216),
        "tcp_handshake_timeout": Seconds(),
        "scheduler_slice_us": SliceMicroseconds(),
    },
    "session": {
        "consent_timeout": Seconds(),
        "connect_timeout": Seconds(),
        "keyframe_request_interval": Seconds(),
        "sender_report_interval": Seconds(),
    },
    "rtp": {
        "nack": Boolean(),
        "history_size": Integer(16, 32768),
        "retransmission_budget": Share(2.0),
        "congestion_control": Choice(CONGESTION_CONTROL),
        "feedback_interval": Seconds(),
    },
    "limits": {
        "max_rooms": Integer(1),
        "max_participants_per_room": Integer(1),
        "max_tracks_per_participant": Integer(1),
        "max_metadata_bytes": Integer(1),
        "max_sdp_bytes": Integer(1),
        "event_queue_size": Integer(1),
        "event_streams_per_key": Integer(1),
        "event_streams_per_token": Integer(1),
    },
    "overload": {
        "enabled": Boolean(),
        "loop_lag_high": Seconds(),
        "loop_lag_low": Seconds(),
        "packet_rate_high": Integer(0),
        "packet_rate_low": Integer(0),
        "smoothing": Seconds(),
        "recover_after": Seconds(),
        "retry_after": Integer(1, 3600),
    },
    "rooms": {
        "empty_timeout": Seconds(),
        "default_max_participants": Integer(1),
    },
    "events": {
        "webhook_url": HttpUrl(),
        "webhook_secret": Text(),
        "webhook_timeout": Seconds(),
    },
    "log": {
        "level": Choice(LOG_LEVELS),
        "format": Choice(LOG_FORMATS),
        "client_addresses": Choice(CLIENT_ADDRESSES),
    },
    "demo": {
        "enabled": Boolean(),
    },
    "workers": {
        "count": WorkerCount(),
        "placement": Choice(PLACEMENTS),
        "call_timeout": Seconds(),
    },
    "recording": {
        "directory": Text(),
        "retention_days": Integer(0, 36500),
        "queue_packets": Integer(16, 1048576),
        "min_free_bytes": Integer(0),
    },
    "compliance": {
        "region": Region(),
        "reports_file": Text(),
        "reports_per_hour": Integer(1, 3600),
    },
    "whip": {
        "allow_origin": QuotedText(),
        "ice_servers": List(IceServerUrl(), "a list of stun:/turn: URIs"),
        "ice_username": QuotedText(),
        "ice_credential": QuotedText(),
    },
    "datachannels": {
        "enabled": Boolean(),
        "max_message_bytes": Integer(1024, 1048576),
        "messages_per_second": Integer(1, 100000),
        "bytes_per_second": Integer(1024, 1073741824),
        "burst_seconds": Seconds(),
        "max_channels_per_participant": Integer(1, 1024),
    },
}

#: Keys whose values are secrets and never shown.
SECRET_KEYS = frozenset(
    {
        ("api", "keys"),
        ("auth", "token_secret"),
        ("events", "webhook_secret"),
        ("whip", "ice_credential"),
    }
)


def env_var_name(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``, e.g. ``RELAY_API__PORT``."""
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def is_loopback_host(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


# --------------------------------------------------------------------------------------------
# Loading


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Embedded defaults, overridden by the TOML file at ``path``, overridden by ``RELAY_*``.

    ``environ`` defaults to ``os.environ``. Every problem found is reported in one
    :class:`ConfigError`; no other exception escapes.
    """
    environ = os.environ if environ is None else environ
    return _settings(_read_toml(path) if path is not None else None, environ)


def settings_from_toml(text: str, name: str = "settings") -> Settings:
    """Embedded defaults overridden by a TOML document (no environment): how a worker process
    takes the settings its front process hands it."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: invalid TOML: {error}") from None
    return _settings(document, {})


def _settings(document: dict[str, Any] | None, environ: Mapping[str, str]) -> Settings:
    problems: list[str] = []
    # (section, key) -> (raw value, environment variable name or None for the file)
    raw: dict[tuple[str, str], tuple[object, str | None]] = {}

    if document is not None:
        for section, key, value in _walk_document(document, problems):
            raw[(section, key)] = (value, None)

    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        target = _env_target(name, problems)
        if target is not None:
            raw[target] = (environ[name], name)

    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for (section, key), (value, variable) in raw.items():
        check = CHECKS[section][key]
        try:
            if variable is None:
                values[section][key] = check.from_toml(value)
            else:
                values[section][key] = check.from_env(str(value))
        except _Invalid as error:
            where = f"{section}.{key}" + (f" ({variable})" if variable else "")
            problems.append(f"{where}: {error}")
    if problems:
        raise ConfigError(*problems)

    settings = Settings(**{name: cls(**values[name]) for name, cls in SECTIONS.items()})
    problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError(*problems)
    return settings


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(f"{name}: cannot read config file: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{name}: config file is not UTF-8 text: {error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{name}: invalid TOML: {error}") from None


def _walk_document(
    document: Mapping[str, Any], problems: list[str]
) -> Iterable[tuple[str, str, object]]:
    """Yield (section, key, value) for every known key; record unknown ones in ``problems``."""
    for section, table in document.items():
        if section not in SECTIONS:
            if isinstance(table, dict):
                problems.append(
                    f"[{section}]: unknown section{_suggest(section, SECTIONS, '[{}]')}"
                )
            else:
                owners = [f"{s}.{section}" for s in CHECKS if section in CHECKS[s]]
                hint = f"; did you mean {owners[0]}?" if owners else "; settings live in sections"
                if not owners:
                    hint += " " + ", ".join(f"[{s}]" for s in SECTIONS)
                problems.append(f"{section}: unknown top-level key{hint}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{section}: expected a table [{section}], got {table!r}")
            continue
        for key, value in table.items():
            if key in CHECKS[section]:
                yield section, key, value
            else:
                problems.append(f"{section}.{key}: unknown key{_suggest_key(section, key)}")


def _env_target(name: str, problems: list[str]) -> tuple[str, str] | None:
    """Map ``RELAY_API__PORT`` to ("api", "port"); record unknown names in ``problems``."""
    section, sep, key = name[len(ENV_PREFIX) :].lower().partition("__")
    if sep and section in CHECKS and key in CHECKS[section]:
        return section, key
    known = [env_var_name(s, k)[len(ENV_PREFIX) :] for s in CHECKS for k in CHECKS[s]]
    match = difflib.get_close_matches(name[len(ENV_PREFIX) :].upper(), known, n=1, cutoff=0.6)
    hint = (
        f"; did you mean {ENV_PREFIX}{match[0]}?"
        if match
        else f"; use {ENV_PREFIX}<SECTION>__<KEY>, e.g. {env_var_name('api', 'port')}"
    )
    problems.append(f"{name}: unknown environment variable (names no setting){hint}")
    return None


def _suggest(word: str, options: Iterable[str], form: str = "{}") -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {form.format(match[0])}?" if match else ""


def _suggest_key(section: str, key: str) -> str:
    """Closest key in the same section, else the same key in another section, else the list."""
    hint = _suggest(key, CHECKS[section], f"{section}.{{}}")
    if hint:
        return hint
    elsewhere = [f"{s}.{key}" for s in CHECKS if key in CHECKS[s]]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return f"; valid keys in [{section}]: " + ", ".join(CHECKS[section])


def _cross_checks(settings: Settings) -> list[str]:
    """Rules that involve more than one value."""
    problems = []
    api = settings.api
    if DEV_API_KEY in api.keys and not is_loopback_host(api.host):
        problems.append(
            f"api.keys: the development key '{DEV_API_KEY}' must not be exposed on "
            f"non-loopback address {api.host}; set api.keys"
        )
    rooms, limits = settings.rooms, settings.limits
    if rooms.default_max_participants > limits.max_participants_per_room:
        problems.append(
            f"rooms.default_max_participants: {rooms.default_max_participants} is more than "
            f"limits.max_participants_per_room ({limits.max_participants_per_room})"
        )
    problems.extend(_overload_checks(settings.overload))
    compliance = settings.compliance
    if compliance.region in REPORTING_REGIONS and not compliance.reports_file.strip():
        problems.append(
            f"compliance.reports_file: required when compliance.region is "
            f"{compliance.region!r} (abuse reports are kept in that file, one JSON object a line)"
        )
    workers = worker_count(settings.workers)
    if settings.media.port + workers - 1 > 65535:
        problems.append(
            f"workers.count: {workers} workers need media ports {settings.media.port}-"
            f"{settings.media.port + workers - 1}, beyond 65535; lower media.port"
        )
    return problems


def worker_count(workers: WorkerSettings) -> int:
    """The number of worker processes: ``auto`` is the number of cores this process may use."""
    if workers.count == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    return int(workers.count)


def _overload_checks(overload: OverloadSettings) -> list[str]:
    """Each lower (resume) threshold under its upper (shed) one."""
    problems = []
    if overload.loop_lag_low >= overload.loop_lag_high:
        problems.append(
            f"overload.loop_lag_low: {overload.loop_lag_low:g} must be less than "
            f"overload.loop_lag_high ({overload.loop_lag_high:g})"
        )
    if overload.packet_rate_high:
        if not 0 < overload.packet_rate_low < overload.packet_rate_high:
            problems.append(
                f"overload.packet_rate_low: {overload.packet_rate_low} must be more than 0 and "
                f"less than overload.packet_rate_high ({overload.packet_rate_high})"
            )
    elif overload.packet_rate_low:
        problems.append(
            "overload.packet_rate_low: set only with overload.packet_rate_high "
            "(0: no packet-rate ceiling)"
        )
    return problems


# --------------------------------------------------------------------------------------------
# Display


def settings_as_dict(settings: Settings, *, redact: bool = True) -> dict[str, dict[str, Any]]:
    """Effective values nested by section; lists as lists; secrets redacted unless asked."""
    result: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(getattr(settings, section)):
            value = getattr(getattr(settings, section), f.name)
            if redact and (section, f.name) in SECRET_KEYS:
                if isinstance(value, tuple):
                    value = [_redact(item) for item in value]
                elif value:
                    value = _redact(value)
            values[f.name] = list(value) if isinstance(value, tuple) else value
        result[section] = values
    return result
