"""Sans-I/O SDP: parse offers and answers, build the relay's answers and offers.

The relay is ICE-lite, requires BUNDLE and rtcp-mux, and speaks DTLS-SRTP. Two flows:

- publisher connection: the client offers what it sends, :func:`build_answer` answers it;
- subscriber connection: :func:`build_offer` makes an offer with one ``sendonly`` m-line per
  forwarded track, the client answers, :func:`check_answer` validates that answer.

Everything here is pure: strings in, dataclasses and strings out. :func:`parse_sdp` raises only
:class:`SdpError` whatever string it is given. m-line numbers in error messages are 0-based (the
JSEP ``sdpMLineIndex``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from relay.rtc import extensions as ext

__all__ = [
    "DEFAULT_VIDEO_PREFERENCE",
    "H264_PROFILES",
    "MAX_RIDS",
    "MAX_RID_ATTRIBUTE_LENGTH",
    "MAX_RID_LENGTH",
    "MAX_SDP_LENGTH",
    "MAX_SIM_SSRCS",
    "SUPPORTED_AUDIO",
    "SUPPORTED_EXTENSIONS",
    "SUPPORTED_RTCP_FB",
    "SUPPORTED_VIDEO",
    "AnsweredMedia",
    "Codec",
    "Extmap",
    "LocalTransport",
    "MediaDescription",
    "OfferedMedia",
    "RemoteTransport",
    "RidDescription",
    "RidRestrictions",
    "SdpError",
    "SessionDescription",
    "SimulcastLayer",
    "build_answer",
    "build_offer",
    "check_answer",
    "parse_profile_level_id",
    "parse_sdp",
    "remote_transport",
]

#: Longest SDP text :func:`parse_sdp` accepts (bounded input).
MAX_SDP_LENGTH = 1 << 20

#: Most ``a=rid`` lines (either direction) an m-line may have; browsers send 3 or 4 layers.
MAX_RIDS = 8
#: Longest rid-id: what libwebrtc accepts, and what one one-byte header extension element
#: (RFC 8285 §4.2) carries as the rtp-stream-id the relay routes by.
MAX_RID_LENGTH = 16
#: Longest value of one ``a=rid`` or ``a=simulcast`` attribute (after the colon).
MAX_RID_ATTRIBUTE_LENGTH = 512
#: Most SSRCs an ``a=ssrc-group:SIM`` may list.
MAX_SIM_SSRCS = 8

SUPPORTED_AUDIO = ["opus"]
SUPPORTED_VIDEO = ["VP8", "H264", "VP9", "AV1"]
#: Video codecs a publisher is answered with, most preferred first, unless the room says
#: otherwise: what every WebRTC client decodes comes first (see :func:`_choose_codec`).
DEFAULT_VIDEO_PREFERENCE: tuple[str, ...] = ("VP8", "H264", "VP9", "AV1")
SUPPORTED_EXTENSIONS: list[str] = [
    ext.MID_URI,
    ext.AUDIO_LEVEL_URI,
    ext.ABS_SEND_TIME_URI,  # with REMB only
    ext.TOFFSET_URI,
    ext.VIDEO_ORIENTATION_URI,
    ext.PLAYOUT_DELAY_URI,
    ext.RTP_STREAM_ID_URI,
    ext.REPAIRED_RTP_STREAM_ID_URI,
    ext.TRANSPORT_CC_URI,  # with twcc only
]
#: Codecs whose layers within one RTP stream only the dependency descriptor tells (AV1's
#: payload has no descriptor the relay reads): their m-lines also take that extension.
LAYERS_BY_DEPENDENCY_DESCRIPTOR = frozenset({"av1"})
#: Feedback accepted on every codec; congestion-control feedback is chosen per offer (below).
SUPPORTED_RTCP_FB = {"nack", "nack pli", "ccm fir"}

TWCC_URI = ext.TRANSPORT_CC_URI
ABS_SEND_TIME_URI = ext.ABS_SEND_TIME_URI


def congestion_feedback(offer: SessionDescription, mode: str) -> tuple[set[str], set[str]]:
    """(rtcp-fb values, extension URIs) of the congestion-control feedback to accept.

    "auto": transport-wide-cc when the client offers it (the client then estimates its own
    bandwidth from per-packet feedback), else REMB (the relay estimates and tells it);
    "remb": REMB only; "none": neither, the client's loss-based estimate alone.
    """
    offers_twcc = any(
        e.uri == TWCC_URI and _extmap_id_usable(e.id, _allows_mixed(offer, m))
        for m in offer.media
        for e in m.extmaps
    )
    if mode == "auto" and offers_twcc:
        return {"transport-cc"}, {TWCC_URI}
    if mode in ("auto", "remb"):
        return {"goog-remb"}, {ABS_SEND_TIME_URI}
    return set(), set()


def _allows_mixed(session: SessionDescription, m: MediaDescription) -> bool:
    """Whether ``a=extmap-allow-mixed`` applies to an m-line (session or media level)."""
    return session.extmap_allow_mixed or m.extmap_allow_mixed


def _extmap_id_usable(ext_id: int, allow_mixed: bool) -> bool:
    """Ids 1-14 fit the one-byte header form. Ids 15-255 need the two-byte form (RFC 8285
    §4.3; 15 is reserved in the one-byte form), which a peer may use only with
    ``a=extmap-allow-mixed``."""
    return 1 <= ext_id <= (255 if allow_mixed else 14)


#: Why an offered data channel (``m=application`` over SCTP) is rejected.
DATA_CHANNELS_UNSUPPORTED = (
    "data channels are turned off on this relay ([datachannels] enabled = false: it carries "
    "audio and video only)"
)

#: Data channel profiles answered (RFC 8841); the answer echoes the offered one.
SCTP_PROTOCOLS = {"UDP/DTLS/SCTP", "TCP/DTLS/SCTP"}
#: the SCTP port of the relay's data channels (RFC 8841 §5: 5000 by default)
SCTP_PORT = 5000

#: RTP profiles answered (DTLS-SRTP with feedback); the answer echoes the offered one.
RTP_PROTOCOLS = {"UDP/TLS/RTP/SAVPF", "TCP/DTLS/RTP/SAVPF", "TCP/TLS/RTP/SAVPF", "RTP/SAVPF"}

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
SETUP_ROLES = ("actpass", "active", "passive")

# RFC 3551 static payload types that may appear without an a=rtpmap line.
_STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int]] = {
    0: ("PCMU", 8000),
    3: ("GSM", 8000),
    4: ("G723", 8000),
    8: ("PCMA", 8000),
    9: ("G722", 8000),
    13: ("CN", 8000),
    18: ("G729", 8000),
    26: ("JPEG", 90000),
    31: ("H261", 90000),
    34: ("H263", 90000),
}

_LINE_RE = re.compile(r"([a-z])=(.*)")
# RFC 8851 §10: rid-id = 1*(alpha-numeric / "-" / "_"); a restriction name is
# 1*(alpha-numeric / "-"); param-val is printable ASCII (";" separates restrictions).
_RID_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_RID_PARAM_NAME_RE = re.compile(r"[A-Za-z0-9-]+")
_RID_PARAM_VALUE_RE = re.compile(r"[\x20-\x3a\x3c-\x7e]*")
# max-bpp: RFC 8851 §5 allows 0.0001 to 48.0; these digits round-trip through a float
_FLOAT_RE = re.compile(r"[0-9]{1,4}\.[0-9]{1,6}")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")
_LONG_DIGITS_RE = re.compile(r"[0-9]{1,40}")


class SdpError(ValueError):
    """An SDP that cannot be parsed or that the relay cannot accept; says what is wrong."""


# ---------------------------------------------------------------------------------------------
# Data model


@dataclass
class Codec:
    """One RTP payload format of an m-line."""

    payload_type: int
    name: str
    clock_rate: int
    channels: int | None = None
    fmtp: dict[str, str] = field(default_factory=dict)
    rtcp_fb: list[str] = field(default_factory=list)
    rtx_payload_type: int | None = None
    kind: str = ""

    @property
    def mime_type(self) -> str:
        """``"audio/opus"``, ``"video/VP8"``: the m-line kind and the name as written."""
        return f"{self.kind}/{self.name}"

    def param(self, key: str, default: str | None = None) -> str | None:
        """The fmtp parameter ``key``, compared case-insensitively."""
        wanted = key.lower()
        for k, v in self.fmtp.items():
            if k.lower() == wanted:
                return v
        return default

    def has_feedback(self, fb: str) -> bool:
        """Whether ``a=rtcp-fb`` lists ``fb`` (case-insensitive, e.g. ``"nack pli"``)."""
        wanted = fb.lower()
        return any(f.lower() == wanted for f in self.rtcp_fb)


@dataclass
class Extmap:
    """An ``a=extmap`` RTP header extension."""

    id: int
    uri: str
    direction: str | None = None


#: RFC 8851 §5 integer restrictions, as (a=rid name, :class:`RidRestrictions` field).
_RID_INT_RESTRICTIONS = (
    ("max-width", "max_width"),
    ("max-height", "max_height"),
    ("max-fps", "max_fps"),
    ("max-fs", "max_fs"),
    ("max-br", "max_br"),
    ("max-pps", "max_pps"),
)


@dataclass(frozen=True)
class RidRestrictions:
    """The restrictions of one ``a=rid`` line (RFC 8851 §5), None where not given.

    ``payload_types`` is the ``pt=`` list (empty: any format of the m-line). ``max_br`` is in
    bits per second, ``max_fs`` in pixels per frame, ``max_pps`` in pixels per second.
    ``depend`` lists the rid-ids this stream depends on (layered coding). ``other`` keeps, as
    (name, value or None), the restrictions the relay does not interpret and the known ones
    offered without a value (RFC 8851 §6.1: the offerer lets the answerer pick one).
    """

    payload_types: tuple[int, ...] = ()
    max_width: int | None = None
    max_height: int | None = None
    max_fps: int | None = None
    max_fs: int | None = None
    max_br: int | None = None
    max_pps: int | None = None
    max_bpp: float | None = None
    depend: tuple[str, ...] = ()
    other: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class RidDescription:
    """One ``a=rid:<rid-id> <send|recv> [restrictions]`` line (RFC 8851 §4)."""

    rid: str
    direction: str
    restrictions: RidRestrictions = field(default_factory=RidRestrictions)


@dataclass(frozen=True)
class SimulcastLayer:
    """One simulcast layer of an m-line: an RTP stream the m-line's sender may send.

    RID simulcast (RFC 8853 ``a=simulcast`` with RFC 8851 ``a=rid``): ``rid`` is set, the
    stream's packets carry it in the rtp-stream-id header extension (RFC 8852), their RTX
    packets in repaired-rtp-stream-id; ``ssrc`` is None: the SDP does not tie SSRCs to rids
    (Chromium signals no SSRC, Firefox signals its SSRCs without saying which rid is which).
    ``stream`` is the index of the simulcast stream (``;``-separated) in the ``a=simulcast``
    list and ``alternative`` the index of this rid among that stream's ``,``-separated
    alternatives, 0 being the preferred one (RFC 8853 §5.1). ``paused`` is the ``~`` mark.

    SSRC simulcast (libwebrtc's legacy ``a=ssrc-group:SIM``): ``rid`` is None, ``ssrc`` is the
    layer's SSRC and ``rtx_ssrc`` its retransmission SSRC from ``a=ssrc-group:FID``.

    Layers are in the order the SDP lists them, which says nothing about resolution: Chromium
    lists ``sendEncodings`` in the application's order (commonly low to high, ``q;h;f``), the
    SIM group is lowest layer first in libwebrtc, other clients may list high to low. The SFU
    must tell layers apart from their restrictions or from the media, not from the position.
    """

    rid: str | None
    direction: str
    stream: int
    alternative: int = 0
    paused: bool = False
    restrictions: RidRestrictions = field(default_factory=RidRestrictions)
    ssrc: int | None = None
    rtx_ssrc: int | None = None


@dataclass
class MediaDescription:
    """One m= section of a session description."""

    kind: str
    port: int
    protocol: str
    formats: list[str]
    mid: str | None = None
    direction: str = "sendrecv"
    codecs: list[Codec] = field(default_factory=list)
    extmaps: list[Extmap] = field(default_factory=list)
    ssrcs: list[int] = field(default_factory=list)
    ssrc_cnames: dict[int, str] = field(default_factory=dict)
    ssrc_groups: list[tuple[str, list[int]]] = field(default_factory=list)
    msid: tuple[str, str] | None = None
    rids: list[tuple[str, str]] = field(default_factory=list)
    simulcast: str | None = None
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str | None = None
    rtcp_mux: bool = False
    rtcp_rsize: bool = False
    candidates: list[str] = field(default_factory=list)
    bundle_only: bool = False
    # Extras.
    index: int = 0
    connection_address: str | None = None
    ssrc_msids: dict[int, tuple[str, str]] = field(default_factory=dict)
    end_of_candidates: bool = False
    ice_options: list[str] = field(default_factory=list)
    sctp_port: int | None = None
    max_message_size: int | None = None
    #: ``a=extmap-allow-mixed`` at media level (RFC 8285 §6); see also the session's flag.
    extmap_allow_mixed: bool = False
    #: The ``a=rid`` lines, parsed (``rids`` above keeps (rid-id, direction) of each).
    rid_descriptions: list[RidDescription] = field(default_factory=list)
    #: RID layers of ``a=simulcast`` (send ones, then recv ones, as written), or, without it,
    #: the SSRC layers of ``a=ssrc-group:SIM``; see :class:`SimulcastLayer`.
    simulcast_layers: list[SimulcastLayer] = field(default_factory=list)
    #: ``a=simulcast`` was written in the draft-ietf-mmusic-sdp-simulcast-03 form
    #: (``a=simulcast: send rid=h;m;l paused=m``) that older Firefox versions write.
    simulcast_draft: bool = False

    @property
    def is_rtp(self) -> bool:
        """Whether the protocol is an RTP profile (formats are payload types)."""
        return "RTP/" in self.protocol.upper()

    @property
    def disabled(self) -> bool:
        """Port 0 without ``a=bundle-only``: the sender rejected or stopped this m-line."""
        return self.port == 0 and not self.bundle_only

    def codec(self, payload_type: int) -> Codec | None:
        """The media codec with this payload type (rtx payload types are not codecs)."""
        for c in self.codecs:
            if c.payload_type == payload_type:
                return c
        return None

    def rtx_ssrc(self, media_ssrc: int) -> int | None:
        """The retransmission SSRC paired with ``media_ssrc`` by ``a=ssrc-group:FID``."""
        for semantics, ssrcs in self.ssrc_groups:
            if semantics.upper() == "FID" and len(ssrcs) >= 2 and ssrcs[0] == media_ssrc:
                return ssrcs[1]
        return None


@dataclass
class SessionDescription:
    """A parsed SDP."""

    media: list[MediaDescription]
    bundle_mids: list[str] = field(default_factory=list)
    ice_lite: bool = False
    origin: str = ""
    session_id: int | None = None
    session_version: int | None = None
    session_name: str = ""
    groups: list[tuple[str, list[str]]] = field(default_factory=list)
    msid_semantic: str | None = None
    extmap_allow_mixed: bool = False
    ice_ufrag: str | None = None
    ice_pwd: str | None = None
    fingerprints: list[tuple[str, str]] = field(default_factory=list)
    setup: str | None = None
    ice_options: list[str] = field(default_factory=list)

    def media_by_mid(self, mid: str) -> MediaDescription | None:
        """The m-line with this mid, or None."""
        for m in self.media:
            if m.mid == mid:
                return m
        return None


# ---------------------------------------------------------------------------------------------
# Parsing


def _int(text: str, what: str, *, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    """A plain ASCII decimal integer within [lo, hi], or SdpError naming ``what``."""
    if not _DIGITS_RE.fullmatch(text):
        raise SdpError(f"{what}: not a number: {text[:40]!r}")
    value = int(text)
    if not lo <= value <= hi:
        raise SdpError(f"{what}: {value} out of range {lo}..{hi}")
    return value


def _split_attr(value: str) -> tuple[str, str | None]:
    """``"rtpmap:96 VP8/90000"`` -> ``("rtpmap", "96 VP8/90000")``; flags give None."""
    name, sep, rest = value.partition(":")
    return name.strip().lower(), (rest.strip() if sep else None)


def _parse_fmtp_params(text: str) -> dict[str, str]:
    """``"a=1;b=2"`` -> ``{"a": "1", "b": "2"}``; a bare item (``"0-15"``) maps to ``""``."""
    params: dict[str, str] = {}
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        params[key.strip()] = value.strip() if sep else ""
    return params


def _format_fmtp_params(params: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" if v != "" else k for k, v in params.items())


@dataclass
class _MediaBuilder:
    """Per-m-line state while parsing."""

    desc: MediaDescription
    rtpmap: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)
    fmtp: dict[int, dict[str, str]] = field(default_factory=dict)
    rtcp_fb: dict[int, list[str]] = field(default_factory=dict)
    rtcp_fb_all: list[str] = field(default_factory=list)
    direction: str | None = None
    msid_attr: tuple[str, str] | None = None
    simulcast: _Simulcast | None = None


def parse_sdp(text: str) -> SessionDescription:
    """Parse an SDP offer or answer.

    Accepts ``\\r\\n`` or ``\\n`` line ends and ignores unknown attributes. Media-level ICE
    credentials, fingerprints, setup and direction fall back to the session level. Raises
    :class:`SdpError` (and nothing else) for anything structurally wrong.
    """
    try:
        return _parse(text)
    except SdpError:
        raise
    except Exception as exc:  # the contract is "only SdpError": a safety net
        raise SdpError(f"malformed SDP ({type(exc).__name__}: {exc})") from exc


def _parse(text: str) -> SessionDescription:
    if not isinstance(text, str):
        raise SdpError(f"SDP must be a string, not {type(text).__name__}")
    if len(text) > MAX_SDP_LENGTH:
        raise SdpError(f"SDP too large ({len(text)} characters, limit {MAX_SDP_LENGTH})")

    session = SessionDescription(media=[])
    session_direction: str | None = None
    session_extmaps: list[Extmap] = []
    builders: list[_MediaBuilder] = []
    current: _MediaBuilder | None = None
    seen_version = False

    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        if "\r" in line or "\x00" in line:
            # RFC 8866 §9 byte-string: a value echoed into an answer or another participant's
            # offer would otherwise carry a line break into it
            raise SdpError(f"line {lineno}: CR or NUL inside a line")
        m = _LINE_RE.fullmatch(line)
        if m is None:
            raise SdpError(f"line {lineno}: not of the form <type>=<value>: {line[:60]!r}")
        kind, value = m.group(1), m.group(2)

        if not seen_version:
            if kind != "v":
                raise SdpError("SDP must start with a v= line")
            if value.strip() != "0":
                raise SdpError(f"unsupported SDP version v={value[:20]}")
            seen_version = True
            continue

        if kind == "m":
            current = _MediaBuilder(desc=_parse_m_line(value, len(builders)))
            builders.append(current)
            continue

        if current is None:
            # Session level.
            if kind == "o":
                session.origin = value
                parts = value.split()
                if len(parts) >= 3:
                    if _LONG_DIGITS_RE.fullmatch(parts[1]):
                        session.session_id = int(parts[1])
                    if _LONG_DIGITS_RE.fullmatch(parts[2]):
                        session.session_version = int(parts[2])
            elif kind == "s":
                session.session_name = value
            elif kind == "a":
                session_direction = _session_attr(
                    session, value, session_direction, session_extmaps
                )
            continue

        desc = current.desc
        where = f"m-line {desc.index}"
        if kind == "c":
            parts = value.split()
            if len(parts) >= 3:
                desc.connection_address = parts[2].split("/")[0]
        elif kind == "a":
            _media_attr(current, value, where)

    if not seen_version:
        raise SdpError("SDP must start with a v= line")

    mids: set[str] = set()
    for b in builders:
        desc = b.desc
        _finish_media(b)
        desc.direction = b.direction or session_direction or "sendrecv"
        if not desc.extmaps and session_extmaps:
            desc.extmaps = [Extmap(e.id, e.uri, e.direction) for e in session_extmaps]
        if desc.ice_ufrag is None:
            desc.ice_ufrag = session.ice_ufrag
        if desc.ice_pwd is None:
            desc.ice_pwd = session.ice_pwd
        if not desc.fingerprints:
            desc.fingerprints = list(session.fingerprints)
        if desc.setup is None:
            desc.setup = session.setup
        if not desc.ice_options:
            desc.ice_options = list(session.ice_options)
        if desc.mid is not None:
            if desc.mid in mids:
                raise SdpError(f"m-line {desc.index}: duplicate mid {desc.mid!r}")
            mids.add(desc.mid)
        session.media.append(desc)
    return session


def _parse_m_line(value: str, index: int) -> MediaDescription:
    parts = value.split()
    if len(parts) < 4:
        raise SdpError(f"m-line {index}: malformed m= line {value[:60]!r}")
    kind, port_text, protocol, formats = parts[0], parts[1], parts[2], parts[3:]
    port = _int(port_text.split("/")[0], f"m-line {index}: port", hi=65535)
    desc = MediaDescription(
        kind=kind.lower(), port=port, protocol=protocol, formats=formats, mid=None, index=index
    )
    if desc.is_rtp:
        for f in formats:
            _int(f, f"m-line {index}: payload type", hi=127)
    return desc


def _parse_fingerprint(rest: str | None, where: str) -> tuple[str, str]:
    parts = (rest or "").split()
    if len(parts) != 2:
        raise SdpError(f"{where}: malformed a=fingerprint")
    return parts[0].lower(), parts[1]


def _parse_extmap(rest: str | None, where: str) -> Extmap:
    parts = (rest or "").split()
    if len(parts) < 2:
        raise SdpError(f"{where}: malformed a=extmap")
    id_text, _, direction = parts[0].partition("/")
    ext_id = _int(id_text, f"{where}: extmap id", hi=65535)
    return Extmap(id=ext_id, uri=parts[1], direction=direction.lower() or None)


def _session_attr(
    session: SessionDescription,
    value: str,
    direction: str | None,
    extmaps: list[Extmap],
) -> str | None:
    name, rest = _split_attr(value)
    where = "session"
    if name == "group":
        parts = (rest or "").split()
        if parts:
            session.groups.append((parts[0], parts[1:]))
            if parts[0].upper() == "BUNDLE" and not session.bundle_mids:
                session.bundle_mids = parts[1:]
    elif name == "ice-lite":
        session.ice_lite = True
    elif name == "ice-ufrag":
        session.ice_ufrag = rest
    elif name == "ice-pwd":
        session.ice_pwd = rest
    elif name == "ice-options":
        session.ice_options = (rest or "").split()
    elif name == "fingerprint":
        session.fingerprints.append(_parse_fingerprint(rest, where))
    elif name == "setup":
        session.setup = (rest or "").lower() or None
    elif name == "msid-semantic":
        session.msid_semantic = rest
    elif name == "extmap-allow-mixed":
        session.extmap_allow_mixed = True
    elif name == "extmap":
        extmaps.append(_parse_extmap(rest, where))
    elif name in DIRECTIONS and rest is None:
        return name
    return direction


def _media_attr(b: _MediaBuilder, value: str, where: str) -> None:
    desc = b.desc
    name, rest = _split_attr(value)
    if name == "mid":
        desc.mid = rest
    elif name in DIRECTIONS and rest is None:
        b.direction = name
    elif name == "rtpmap":
        pt_text, _, encoding = (rest or "").partition(" ")
        pt = _int(pt_text, f"{where}: rtpmap payload type", hi=127)
        enc = encoding.strip().split("/")
        if len(enc) < 2 or not enc[0]:
            raise SdpError(f"{where}: malformed a=rtpmap for payload type {pt}")
        clock = _int(enc[1], f"{where}: rtpmap clock rate for payload type {pt}")
        channels = _int(enc[2], f"{where}: rtpmap channels", hi=255) if len(enc) > 2 else None
        if pt in b.rtpmap:
            raise SdpError(f"{where}: duplicate a=rtpmap for payload type {pt}")
        b.rtpmap[pt] = (enc[0], clock, channels)
    elif name == "fmtp":
        pt_text, _, params = (rest or "").partition(" ")
        pt = _int(pt_text, f"{where}: fmtp payload type", hi=127)
        b.fmtp.setdefault(pt, {}).update(_parse_fmtp_params(params))
    elif name == "rtcp-fb":
        pt_text, _, fb = (rest or "").partition(" ")
        fb = " ".join(fb.split())
        if not fb:
            return
        if pt_text == "*":
            b.rtcp_fb_all.append(fb)
        else:
            pt = _int(pt_text, f"{where}: rtcp-fb payload type", hi=127)
            b.rtcp_fb.setdefault(pt, []).append(fb)
    elif name == "extmap":
        desc.extmaps.append(_parse_extmap(rest, where))
    elif name == "ssrc":
        ssrc_text, _, attr = (rest or "").partition(" ")
        ssrc = _int(ssrc_text, f"{where}: ssrc")
        if ssrc not in desc.ssrcs:
            desc.ssrcs.append(ssrc)
        attr_name, sep, attr_value = attr.strip().partition(":")
        if sep and attr_name == "cname":
            desc.ssrc_cnames.setdefault(ssrc, attr_value)
        elif sep and attr_name == "msid":
            ids = attr_value.split()
            if ids:
                desc.ssrc_msids.setdefault(ssrc, (ids[0], ids[1] if len(ids) > 1 else ""))
    elif name == "ssrc-group":
        parts = (rest or "").split()
        if not parts:
            raise SdpError(f"{where}: malformed a=ssrc-group")
        ssrcs = [_int(s, f"{where}: ssrc-group ssrc") for s in parts[1:]]
        desc.ssrc_groups.append((parts[0], ssrcs))
        for s in ssrcs:
            if s not in desc.ssrcs:
                desc.ssrcs.append(s)
    elif name == "msid":
        ids = (rest or "").split()
        if ids and b.msid_attr is None:
            b.msid_attr = (ids[0], ids[1] if len(ids) > 1 else "")
    elif name == "rid":
        rid = _parse_rid(rest, where)
        if any(r.rid == rid.rid for r in desc.rid_descriptions):
            # RFC 8851: a rid-id is unique within its media section (an answerer may also drop
            # every line of a duplicated id, §6.2.2; the offer is refused here instead)
            raise SdpError(f"{where}: duplicate a=rid:{rid.rid}")
        if len(desc.rid_descriptions) >= MAX_RIDS:
            raise SdpError(f"{where}: more than {MAX_RIDS} a=rid lines")
        desc.rid_descriptions.append(rid)
        desc.rids.append((rid.rid, rid.direction))
    elif name == "simulcast":
        if b.simulcast is not None:
            raise SdpError(f"{where}: more than one a=simulcast")
        b.simulcast = _parse_simulcast(rest, where)
        desc.simulcast = rest
        desc.simulcast_draft = b.simulcast.draft
    elif name == "ice-ufrag":
        desc.ice_ufrag = rest
    elif name == "ice-pwd":
        desc.ice_pwd = rest
    elif name == "ice-options":
        desc.ice_options = (rest or "").split()
    elif name == "fingerprint":
        desc.fingerprints.append(_parse_fingerprint(rest, where))
    elif name == "setup":
        desc.setup = (rest or "").lower() or None
    elif name == "rtcp-mux":
        desc.rtcp_mux = True
    elif name == "rtcp-rsize":
        desc.rtcp_rsize = True
    elif name == "candidate":
        if rest:
            desc.candidates.append(rest)
    elif name == "end-of-candidates":
        desc.end_of_candidates = True
    elif name == "bundle-only":
        desc.bundle_only = True
    elif name == "extmap-allow-mixed":
        desc.extmap_allow_mixed = True
    elif name == "sctp-port" and rest and _DIGITS_RE.fullmatch(rest):
        desc.sctp_port = int(rest)
    elif name == "max-message-size" and rest and _DIGITS_RE.fullmatch(rest):
        desc.max_message_size = int(rest)


def _finish_media(b: _MediaBuilder) -> None:
    """Build the codec list (m-line order, rtx attached to its apt codec), the msid and the
    simulcast layers."""
    desc = b.desc
    _finish_simulcast(b)
    if b.msid_attr is not None:
        desc.msid = b.msid_attr
    else:
        for ssrc in desc.ssrcs:
            if ssrc in desc.ssrc_msids:
                desc.msid = desc.ssrc_msids[ssrc]
                break
    if not desc.is_rtp:
        return

    codecs: list[Codec] = []
    rtx: list[tuple[int, str | None]] = []
    seen: set[int] = set()
    for f in desc.formats:
        pt = int(f)
        if pt in seen:
            continue
        seen.add(pt)
        if pt in b.rtpmap:
            name, clock, channels = b.rtpmap[pt]
        elif pt in _STATIC_PAYLOAD_TYPES:
            name, clock = _STATIC_PAYLOAD_TYPES[pt]
            channels = None
        else:
            continue
        params = dict(b.fmtp.get(pt, {}))
        if name.lower() == "rtx":
            apt = next((v for k, v in params.items() if k.lower() == "apt"), None)
            rtx.append((pt, apt))
            continue
        fb = list(b.rtcp_fb_all)
        for item in b.rtcp_fb.get(pt, []):
            if item not in fb:
                fb.append(item)
        codecs.append(
            Codec(
                payload_type=pt,
                name=name,
                clock_rate=clock,
                channels=channels,
                fmtp=params,
                rtcp_fb=fb,
                kind=desc.kind,
            )
        )
    by_pt = {c.payload_type: c for c in codecs}
    for pt, apt in rtx:
        if apt is not None and _DIGITS_RE.fullmatch(apt):
            target = by_pt.get(int(apt))
            if target is not None and target.rtx_payload_type is None:
                target.rtx_payload_type = pt
    desc.codecs = codecs


# ---------------------------------------------------------------------------------------------
# Simulcast: RFC 8851 a=rid, RFC 8853 a=simulcast, libwebrtc's a=ssrc-group:SIM


@dataclass
class _Simulcast:
    """A parsed ``a=simulcast``: per direction (as written), its streams, each a list of
    alternatives (rid-id, paused)."""

    streams: dict[str, list[list[tuple[str, bool]]]]
    draft: bool = False
    #: the draft form's ``pt=`` lists (simulcast by payload type): parsed, never answered
    by_payload_type: bool = False


def _check_rid_id(rid: str, what: str) -> str:
    """A rid-id (RFC 8851 §10) of at most :data:`MAX_RID_LENGTH` characters."""
    if not rid:
        raise SdpError(f"{what}: empty rid-id")
    if not _RID_ID_RE.fullmatch(rid):
        raise SdpError(
            f"{what}: rid-id {rid[:20]!r} has characters other than letters, digits, - and _"
        )
    if len(rid) > MAX_RID_LENGTH:
        raise SdpError(f"{what}: rid-id {rid[:20]!r}... longer than {MAX_RID_LENGTH} characters")
    return rid


def _check_attribute_length(rest: str, name: str, where: str) -> None:
    if len(rest) > MAX_RID_ATTRIBUTE_LENGTH:
        raise SdpError(f"{where}: a={name} value longer than {MAX_RID_ATTRIBUTE_LENGTH} characters")


def _parse_rid(rest: str | None, where: str) -> RidDescription:
    """``a=rid:<rid-id> <send|recv> [pt=<fmt>,...;]<restriction>[=<value>];...`` (RFC 8851
    §10). Raises SdpError naming what is malformed."""
    text = rest or ""
    _check_attribute_length(text, "rid", where)
    parts = text.split(None, 2)
    if len(parts) < 2:
        raise SdpError(f"{where}: malformed a=rid {text[:40]!r} (expected <rid-id> send|recv)")
    rid = _check_rid_id(parts[0], f"{where}: a=rid")
    what = f"{where}: a=rid:{rid}"
    direction = parts[1]
    if direction not in ("send", "recv"):
        raise SdpError(f"{what}: direction {direction[:20]!r} is neither send nor recv")
    restrictions = _parse_rid_restrictions(parts[2], what) if len(parts) > 2 else None
    return RidDescription(rid, direction, restrictions or RidRestrictions())


def _parse_rid_restrictions(text: str, what: str) -> RidRestrictions:
    pts: tuple[int, ...] = ()
    ints: dict[str, int] = {}
    bpp: float | None = None
    depend: tuple[str, ...] = ()
    other: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for i, raw in enumerate(text.split(";")):
        item = raw.strip()
        if not item:
            raise SdpError(f"{what}: empty restriction (stray ';')")
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not _RID_PARAM_NAME_RE.fullmatch(name):
            raise SdpError(f"{what}: malformed restriction {item[:30]!r}")
        if name in seen:
            raise SdpError(f"{what}: restriction {name!r} given twice")
        seen.add(name)
        if name == "pt":
            if i != 0:
                raise SdpError(f"{what}: pt= must be the first restriction")
            if not value:
                raise SdpError(f"{what}: empty pt= list")
            listed = [_int(v.strip(), f"{what}: pt", hi=127) for v in value.split(",")]
            pts = tuple(dict.fromkeys(listed))
            continue
        if not sep:
            other.append((name, None))  # a known or unknown restriction without a value
            continue
        field_name = dict(_RID_INT_RESTRICTIONS).get(name)
        if field_name is not None:
            ints[field_name] = _int(value, f"{what}: {name}")
        elif name == "max-bpp":
            if not _FLOAT_RE.fullmatch(value):
                raise SdpError(f"{what}: max-bpp {value[:20]!r} is not of the form 1.5")
            bpp = float(value)
        elif name == "depend":
            depend = tuple(_check_rid_id(v.strip(), f"{what}: depend") for v in value.split(","))
        else:
            if not _RID_PARAM_VALUE_RE.fullmatch(value):
                raise SdpError(f"{what}: restriction {name!r} has a non-printable value")
            other.append((name, value))
    return RidRestrictions(
        payload_types=pts,
        max_width=ints.get("max_width"),
        max_height=ints.get("max_height"),
        max_fps=ints.get("max_fps"),
        max_fs=ints.get("max_fs"),
        max_br=ints.get("max_br"),
        max_pps=ints.get("max_pps"),
        max_bpp=bpp,
        depend=depend,
        other=tuple(other),
    )


def _parse_simulcast(rest: str | None, where: str) -> _Simulcast:
    """``a=simulcast``: RFC 8853 §5.1 (``send q;h;f recv x``, ``;`` between streams, ``,``
    between a stream's alternatives, ``~`` for paused), or the draft-03 form of older Firefox
    versions (``send rid=q;h;f paused=h``; ``pt=`` lists are parsed, not used)."""
    text = (rest or "").strip()
    _check_attribute_length(text, "simulcast", where)
    tokens = text.split()
    what = f"{where}: a=simulcast"
    if any(t.startswith(("rid=", "pt=", "paused=")) for t in tokens):
        return _parse_simulcast_draft(tokens, what)
    if len(tokens) not in (2, 4):
        raise SdpError(f"{what}: expected send|recv <streams> [send|recv <streams>]")
    result = _Simulcast(streams={})
    for direction, listed in zip(tokens[0::2], tokens[1::2], strict=True):
        _simulcast_direction(result, direction, what)
        result.streams[direction] = _parse_simulcast_streams(listed, f"{what} {direction}")
    return result


def _simulcast_direction(result: _Simulcast, direction: str, what: str) -> None:
    if direction not in ("send", "recv"):
        raise SdpError(f"{what}: direction {direction[:20]!r} is neither send nor recv")
    if direction in result.streams:
        raise SdpError(f"{what}: {direction} given twice")


def _parse_simulcast_draft(tokens: list[str], what: str) -> _Simulcast:
    result = _Simulcast(streams={}, draft=True)
    paused: set[str] = set()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("paused="):
            for rid in token[len("paused=") :].split(","):
                paused.add(_check_rid_id(rid, f"{what} paused="))
            i += 1
            continue
        _simulcast_direction(result, token, what)
        if i + 1 >= len(tokens):
            raise SdpError(f"{what}: no stream list after {token}")
        listed = tokens[i + 1]
        if listed.startswith("rid="):
            result.streams[token] = _parse_simulcast_streams(listed[4:], f"{what} {token}")
        elif listed.startswith("pt="):
            for pt_list in listed[3:].split(";"):
                for pt in pt_list.split(","):
                    _int(pt, f"{what} {token} pt", hi=127)
            result.streams[token] = []
            result.by_payload_type = True
        else:
            raise SdpError(f"{what}: expected rid= or pt= after {token}, got {listed[:20]!r}")
        i += 2
    if not result.streams:
        raise SdpError(f"{what}: no send or recv stream list")
    for streams in result.streams.values():
        for alternatives in streams:
            alternatives[:] = [(rid, p or rid in paused) for rid, p in alternatives]
    return result


def _parse_simulcast_streams(text: str, what: str) -> list[list[tuple[str, bool]]]:
    """``q;~h;f1,f2`` -> ``[[("q", False)], [("h", True)], [("f1", False), ("f2", False)]]``."""
    streams: list[list[tuple[str, bool]]] = []
    count = 0
    for listed in text.split(";"):
        if not listed:
            raise SdpError(f"{what}: empty stream in {text[:40]!r}")
        alternatives: list[tuple[str, bool]] = []
        for sc_id in listed.split(","):
            paused = sc_id.startswith("~")
            alternatives.append((_check_rid_id(sc_id[1:] if paused else sc_id, what), paused))
            count += 1
        streams.append(alternatives)
    if count > MAX_RIDS:
        raise SdpError(f"{what}: more than {MAX_RIDS} rids")
    return streams


def _finish_simulcast(b: _MediaBuilder) -> None:
    """Check ``a=simulcast`` against the ``a=rid`` lines and set ``simulcast_layers``."""
    desc = b.desc
    where = f"m-line {desc.index}"
    sims = [ssrcs for semantics, ssrcs in desc.ssrc_groups if semantics.upper() == "SIM"]
    if len(sims) > 1:
        raise SdpError(f"{where}: more than one a=ssrc-group:SIM")
    for ssrcs in sims:
        if not ssrcs:
            raise SdpError(f"{where}: a=ssrc-group:SIM lists no SSRC")
        if len(ssrcs) > MAX_SIM_SSRCS:
            raise SdpError(f"{where}: a=ssrc-group:SIM lists more than {MAX_SIM_SSRCS} SSRCs")
        if len(set(ssrcs)) != len(ssrcs):
            raise SdpError(f"{where}: a=ssrc-group:SIM lists an SSRC twice")

    spec = b.simulcast
    if spec is not None:
        declared = {r.rid: r for r in desc.rid_descriptions}
        layers: list[SimulcastLayer] = []
        for direction, streams in spec.streams.items():
            for s_index, alternatives in enumerate(streams):
                for a_index, (rid, paused) in enumerate(alternatives):
                    if any(layer.rid == rid for layer in layers):
                        raise SdpError(f"{where}: a=simulcast lists rid {rid!r} twice")
                    r = declared.get(rid)
                    if r is None or r.direction != direction:
                        # RFC 8853 §5.2: a rid-id's direction in a=simulcast is that of its a=rid
                        raise SdpError(
                            f"{where}: a=simulcast {direction} lists rid {rid!r} "
                            f"that no a=rid:{rid} {direction} line declares"
                        )
                    layers.append(
                        SimulcastLayer(rid, direction, s_index, a_index, paused, r.restrictions)
                    )
        if layers:
            desc.simulcast_layers = layers
            return
    if sims:
        desc.simulcast_layers = [
            SimulcastLayer(None, "send", i, ssrc=ssrc, rtx_ssrc=desc.rtx_ssrc(ssrc))
            for i, ssrc in enumerate(sims[0])
        ]


# ---------------------------------------------------------------------------------------------
# Remote transport


@dataclass
class RemoteTransport:
    """The peer's ICE and DTLS parameters for the bundled transport."""

    ice_ufrag: str
    ice_pwd: str
    fingerprints: list[tuple[str, str]]
    setup: str | None
    candidates: list[str]


def _bundle_media(desc: SessionDescription) -> list[MediaDescription]:
    """The enabled m-lines in the BUNDLE group, tagged one (first listed) first."""
    order = {mid: i for i, mid in enumerate(desc.bundle_mids)}
    media = [m for m in desc.media if m.mid in order and not m.disabled]
    return sorted(media, key=lambda m: order[m.mid or ""])


def remote_transport(desc: SessionDescription) -> RemoteTransport:
    """ICE credentials, fingerprints, setup and candidates of the BUNDLE transport.

    Taken from the first enabled m-line of the BUNDLE group (or the first enabled m-line when
    there is no group). Raises SdpError when credentials or a fingerprint are missing.
    """
    media = _bundle_media(desc) or [m for m in desc.media if not m.disabled]
    if not media:
        raise SdpError("no enabled m-line to take the transport from")
    first = media[0]
    where = f"m-line {first.index}"
    if not first.ice_ufrag or not first.ice_pwd:
        raise SdpError(f"{where}: missing a=ice-ufrag or a=ice-pwd")
    if not first.fingerprints:
        raise SdpError(f"{where}: missing a=fingerprint")
    candidates: list[str] = []
    for m in media:
        for c in m.candidates:
            if c not in candidates:
                candidates.append(c)
    return RemoteTransport(
        ice_ufrag=first.ice_ufrag,
        ice_pwd=first.ice_pwd,
        fingerprints=list(first.fingerprints),
        setup=first.setup,
        candidates=candidates,
    )


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class LocalTransport:
    """The relay's side of the transport, written into every answer and offer."""

    ice_ufrag: str
    ice_pwd: str
    fingerprint: tuple[str, str]
    candidates: list[tuple[str, int]]
    setup: str
    session_id: int
    session_version: int
    #: ICE-TCP (RFC 6544): addresses of passive TCP host candidates, announced after the UDP ones
    tcp_candidates: list[tuple[str, int]] = field(default_factory=list)


def _addr_type(ip: str) -> str:
    return "IP6" if ":" in ip else "IP4"


def _candidate_lines(local: LocalTransport) -> list[str]:
    """Host candidates with distinct priorities (RFC 8445 5.1.2.1), then end-of-candidates."""
    lines = []
    for i, (ip, port) in enumerate(local.candidates):
        priority = (126 << 24) | ((65535 - i) << 8) | (256 - 1)
        lines.append(f"a=candidate:{i + 1} 1 udp {priority} {ip} {port} typ host")
    lines += tcp_candidate_lines(local.tcp_candidates, first=len(local.candidates) + 1)
    lines.append("a=end-of-candidates")
    return lines


#: ICE-TCP host candidates (RFC 6544 section 4.2): a type preference below UDP's host 126, so
#: that a client that can use UDP does; the local preference is 2^13 * direction-pref +
#: other-pref, with direction-pref 4 for a passive host candidate.
TCP_HOST_TYPE_PREFERENCE = 90
TCP_PASSIVE_DIRECTION_PREFERENCE = 4


def tcp_candidate_lines(candidates: Sequence[tuple[str, int]], first: int = 1) -> list[str]:
    """``a=candidate`` lines of passive TCP host candidates (foundations from ``first``), each
    priority below every UDP host candidate's and distinct from the others'."""
    lines = []
    for i, (ip, port) in enumerate(candidates):
        local_preference = (TCP_PASSIVE_DIRECTION_PREFERENCE << 13) | (8191 - i)
        priority = (TCP_HOST_TYPE_PREFERENCE << 24) | (local_preference << 8) | (256 - 1)
        lines.append(
            f"a=candidate:{first + i} 1 tcp {priority} {ip} {port} typ host tcptype passive"
        )
    return lines


def _session_lines(
    local: LocalTransport, bundle: list[str], extmap_allow_mixed: bool = False
) -> list[str]:
    lines = [
        "v=0",
        f"o=- {local.session_id} {local.session_version} IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
    ]
    if bundle:
        lines.append("a=group:BUNDLE " + " ".join(bundle))
    if extmap_allow_mixed:
        lines.append("a=extmap-allow-mixed")
    lines += ["a=ice-lite", "a=msid-semantic:WMS *"]
    return lines


def _transport_lines(local: LocalTransport, setup: str) -> list[str]:
    ip = local.candidates[0][0] if local.candidates else "0.0.0.0"
    return [
        f"c=IN {_addr_type(ip)} {ip}",
        "a=rtcp:9 IN IP4 0.0.0.0",
        f"a=ice-ufrag:{local.ice_ufrag}",
        f"a=ice-pwd:{local.ice_pwd}",
        f"a=fingerprint:{local.fingerprint[0]} {local.fingerprint[1]}",
        f"a=setup:{setup}",
    ]


def _media_port(local: LocalTransport) -> int:
    return local.candidates[0][1] if local.candidates else 9


def _codec_pts(codecs: list[Codec]) -> list[int]:
    pts: list[int] = []
    for c in codecs:
        pts.append(c.payload_type)
        if c.rtx_payload_type is not None:
            pts.append(c.rtx_payload_type)
    return pts


def _codec_lines(codecs: list[Codec]) -> list[str]:
    lines: list[str] = []
    for c in codecs:
        encoding = f"{c.name}/{c.clock_rate}"
        if c.channels is not None:
            encoding += f"/{c.channels}"
        lines.append(f"a=rtpmap:{c.payload_type} {encoding}")
        if c.fmtp:
            lines.append(f"a=fmtp:{c.payload_type} {_format_fmtp_params(c.fmtp)}")
        lines.extend(f"a=rtcp-fb:{c.payload_type} {fb}" for fb in c.rtcp_fb)
        if c.rtx_payload_type is not None:
            lines.append(f"a=rtpmap:{c.rtx_payload_type} rtx/{c.clock_rate}")
            lines.append(f"a=fmtp:{c.rtx_payload_type} apt={c.payload_type}")
    return lines


def _extmap_lines(extmaps: list[Extmap]) -> list[str]:
    return [f"a=extmap:{e.id}{'/' + e.direction if e.direction else ''} {e.uri}" for e in extmaps]


def _join(lines: list[str]) -> str:
    return "\r\n".join(lines) + "\r\n"


# ---------------------------------------------------------------------------------------------
# Answering a publisher offer


@dataclass
class AnsweredMedia:
    """What the relay answered for one offered m-line (same order as the offer)."""

    mid: str | None
    kind: str
    rejected: bool
    reason: str | None
    direction: str
    codecs: list[Codec]
    extmaps: list[Extmap]
    offer: MediaDescription
    #: The publisher's simulcast layers the relay receives on this m-line, in the offer's
    #: order (see :class:`SimulcastLayer`): the RID layers the answer accepts with
    #: ``a=rid:<id> recv``, their restrictions as answered (see :func:`_answer_rid`), or the
    #: SSRC layers of the offer's ``a=ssrc-group:SIM``. Empty without simulcast.
    layers: list[SimulcastLayer] = field(default_factory=list)


def _copy_codec(c: Codec, *, keep_rtx: bool, extra_fb: AbstractSet[str] = frozenset()) -> Codec:
    return Codec(
        payload_type=c.payload_type,
        name=c.name,
        clock_rate=c.clock_rate,
        channels=c.channels,
        fmtp=dict(c.fmtp),
        rtcp_fb=[
            fb for fb in c.rtcp_fb if fb.lower() in SUPPORTED_RTCP_FB or fb.lower() in extra_fb
        ],
        rtx_payload_type=c.rtx_payload_type if keep_rtx else None,
        kind=c.kind,
    )


def _codec_supported(c: Codec) -> bool:
    name = c.name.lower()
    if c.kind == "audio":
        return (
            name in {n.lower() for n in SUPPORTED_AUDIO}
            and c.clock_rate == 48000
            and c.channels in (None, 2)
        )
    if c.kind == "video":
        if name not in {n.lower() for n in SUPPORTED_VIDEO} or c.clock_rate != 90000:
            return False
        if name == "h264":
            return (c.param("packetization-mode") or "0").strip() == "1"
        return True
    return False


def parse_profile_level_id(value: str | None) -> tuple[str, int] | None:
    """(profile, level_idc) of an H.264 ``profile-level-id`` (RFC 6184 section 8.1).

    The profile is one of the names of :data:`H264_PROFILES`, classified from profile_idc and
    the constraint flags of profile-iop as libwebrtc does, so that for example ``42e01f`` and
    ``4de01f`` are both Constrained Baseline. Level 1b is level_idc 0. Absent (None), the value
    is taken as Constrained Baseline level 3.1, as libwebrtc does for compatibility. Returns
    None for a malformed value or a profile or level outside those lists.
    """
    if value is None:
        return "constrained-baseline", 31
    text = value.strip()
    if len(text) != 6 or not all(ch in "0123456789abcdefABCDEF" for ch in text):
        return None
    number = int(text, 16)
    profile_idc, profile_iop, level_idc = number >> 16, (number >> 8) & 0xFF, number & 0xFF
    if level_idc not in _H264_LEVELS:
        return None
    if level_idc == 11 and profile_iop & 0x10:
        level_idc = 0  # constraint_set3 turns level 1.1 into level 1b
    for idc, mask, bits, profile in _H264_PROFILE_PATTERNS:
        if idc == profile_idc and profile_iop & mask == bits:
            return profile, level_idc
    return None


def _pattern(text: str) -> tuple[int, int]:
    """``"x1xx0000"`` -> (mask of the fixed bits, their values); ``x`` is either bit."""
    mask = int("".join("0" if ch == "x" else "1" for ch in text), 2)
    return mask, int(text.replace("x", "0"), 2)


#: level_idc values of H.264 levels 1 to 5.2 (level 1b is signalled as 1.1 plus a flag).
_H264_LEVELS = frozenset({10, 11, 12, 13, 20, 21, 22, 30, 31, 32, 40, 41, 42, 50, 51, 52})
#: (profile_idc, profile-iop pattern, profile), as in libwebrtc's h264_profile_level_id.
_H264_PROFILE_PATTERNS = [
    (idc, *_pattern(bits), profile)
    for idc, bits, profile in [
        (0x42, "x1xx0000", "constrained-baseline"),
        (0x4D, "1xxx0000", "constrained-baseline"),
        (0x58, "11xx0000", "constrained-baseline"),
        (0x42, "x0xx0000", "baseline"),
        (0x58, "10xx0000", "baseline"),
        (0x4D, "0x0x0000", "main"),
        (0x64, "00000000", "high"),
        (0x64, "00001100", "constrained-high"),
        (0xF4, "00000000", "predictive-high-444"),
    ]
]
#: H.264 profiles :func:`parse_profile_level_id` tells apart.
H264_PROFILES = tuple(dict.fromkeys(p for _, _, _, p in _H264_PROFILE_PATTERNS))


def _decodable_everywhere(c: Codec) -> bool:
    """Whether every WebRTC client can decode this format of its codec.

    H.264 only in Constrained Baseline, VP9 and AV1 only in profile 0 (8-bit 4:2:0): other
    profiles (H.264 High, VP9 profile 2, ...) are missing from some decoders.
    """
    name = c.name.lower()
    if name == "h264":
        parsed = parse_profile_level_id(c.param("profile-level-id"))
        return parsed is not None and parsed[0] == "constrained-baseline"
    if name == "vp9":
        return (c.param("profile-id") or "0").strip() == "0"
    if name == "av1":
        return (c.param("profile") or "0").strip() == "0"
    return True


def _choose_codec(offered: MediaDescription, preference: Sequence[str]) -> Codec | None:
    """The offered codec the relay takes for an m-line, or None.

    Audio: the client's first supported codec (opus). Video: the first codec of
    ``preference`` that the client offers in a format every client decodes (see
    :func:`_decodable_everywhere`: VP8, H.264 Constrained Baseline with packetization-mode 1,
    VP9 and AV1 profile 0), whatever the client's own order; only when it offers none of
    those, its first offered format of a codec in ``preference`` (H.264 High, say) as a last
    resort. Codecs missing from ``preference`` are never taken.
    """
    supported = [c for c in offered.codecs if _codec_supported(c)]
    if offered.kind != "video":
        return supported[0] if supported else None
    wanted = [name.lower() for name in preference]
    for name in wanted:
        for c in supported:
            if c.name.lower() == name and _decodable_everywhere(c):
                return c
    return next((c for c in supported if c.name.lower() in wanted), None)


def _accept_codecs(
    offered: MediaDescription,
    extra_fb: AbstractSet[str] = frozenset(),
    preference: Sequence[str] = DEFAULT_VIDEO_PREFERENCE,
) -> list[Codec]:
    """The codec chosen by :func:`_choose_codec` (with its RTX), and only that one.

    One codec per published m-line means the client cannot switch payload formats mid-stream,
    so every subscriber of the track is offered exactly the format that will arrive.
    """
    c = _choose_codec(offered, preference)
    if c is None:
        return []
    keep_rtx = c.rtx_payload_type is not None and c.has_feedback("nack")
    return [_copy_codec(c, keep_rtx=keep_rtx, extra_fb=extra_fb)]


def _accept_extmaps(
    offered: MediaDescription, extra: AbstractSet[str] = frozenset(), allow_mixed: bool = False
) -> list[Extmap]:
    """Supported extensions with the offer's ids, that the client can send to us; ids above 14
    only when ``a=extmap-allow-mixed`` applies (``allow_mixed``, see :func:`_extmap_id_usable`).
    """
    accepted: list[Extmap] = []
    used: set[int] = set()
    for e in offered.extmaps:
        supported = e.uri in extra or (
            e.uri in SUPPORTED_EXTENSIONS and e.uri not in (TWCC_URI, ABS_SEND_TIME_URI)
        )
        if not supported or not _extmap_id_usable(e.id, allow_mixed):
            continue
        if e.id in used:
            continue
        if e.direction in ("recvonly", "inactive"):
            continue  # the client would only receive it; nothing for the relay to read
        used.add(e.id)
        accepted.append(Extmap(e.id, e.uri, "recvonly" if e.direction == "sendonly" else None))
    return accepted


def _answer_setup(offered: str | None) -> str:
    if offered in (None, "actpass", "active"):
        return "passive"
    if offered == "passive":
        return "active"
    raise SdpError(f"unsupported a=setup:{offered}")


def build_answer(
    offer: SessionDescription,
    local: LocalTransport,
    congestion_control: str = "auto",
    *,
    codec_preference: Sequence[str] = DEFAULT_VIDEO_PREFERENCE,
    simulcast: bool = True,
    data_channels: int = 0,
) -> tuple[str, list[AnsweredMedia]]:
    """Answer a publisher offer: receive what the client sends, over one bundled transport.

    Returns the answer SDP and one :class:`AnsweredMedia` per offered m-line. Raises SdpError
    when the offer has no BUNDLE group, an audio/video m-line lacks ``a=rtcp-mux`` or an m-line
    lacks ``a=mid``, or ICE credentials or a fingerprint are missing.

    The answer's ``a=setup`` follows the offer (``actpass``/``active`` -> ``passive``, so the
    relay is the DTLS server; ``passive`` -> ``active``); ``local.setup`` is not used here.
    ``congestion_control`` picks the feedback accepted (see :func:`congestion_feedback`).
    ``codec_preference`` lists the video codecs taken, most preferred first (see
    :func:`_choose_codec`).

    ``a=extmap-allow-mixed`` is answered where it was offered (session or media level), and
    only then are extension ids above 14 taken (RFC 8285). A data channel (``m=application``)
    is rejected with port 0 and left out of the answer's BUNDLE group, unless
    ``data_channels`` is set (the ``a=max-message-size`` the relay takes): then an
    ``UDP/DTLS/SCTP webrtc-datachannel`` m-line in the BUNDLE group is accepted (RFC 8841) and
    answered with ``a=sctp-port:5000`` (see :func:`application_lines`).

    RID simulcast (``a=simulcast:send`` with ``a=rid`` lines) offered on a video m-line the
    relay receives is answered with ``a=rid:<id> recv`` and ``a=simulcast:recv`` (see
    :func:`_answer_simulcast`) when the offer's rtp-stream-id extension is accepted, unless
    ``simulcast`` is False: then the client sends one stream. SSRC simulcast
    (``a=ssrc-group:SIM``) needs nothing in the answer. Either way the layers received are in
    :attr:`AnsweredMedia.layers`.
    """
    if not offer.bundle_mids:
        raise SdpError("offer has no a=group:BUNDLE (BUNDLE is required)")
    for m in offer.media:
        if m.mid is None:
            raise SdpError(f"m-line {m.index}: missing a=mid")
    bundle = set(offer.bundle_mids)

    enabled = [m for m in offer.media if not m.disabled]
    for m in enabled:
        where = f"m-line {m.index}"
        if m.kind in ("audio", "video") and not m.rtcp_mux:
            raise SdpError(f"{where}: missing a=rtcp-mux (rtcp-mux is required)")
        if not m.ice_ufrag or not m.ice_pwd:
            raise SdpError(f"{where}: missing a=ice-ufrag or a=ice-pwd")
        if not m.fingerprints:
            raise SdpError(f"{where}: missing a=fingerprint")
    tagged = _bundle_media(offer)
    setup = _answer_setup(tagged[0].setup if tagged else (enabled[0].setup if enabled else None))

    fb, extensions = congestion_feedback(offer, congestion_control)
    answered: list[AnsweredMedia] = []
    for m in offer.media:
        answered.append(
            _answer_media(
                m,
                bundle,
                fb,
                extensions,
                _allows_mixed(offer, m),
                codec_preference,
                simulcast,
                data_channels,
            )
        )

    accepted_mids = {a.mid for a in answered if not a.rejected}
    answer_bundle = [mid for mid in offer.bundle_mids if mid in accepted_mids]
    # a=extmap-allow-mixed is echoed where it was offered: without it in the answer, libwebrtc
    # sends no header extension whose id needs the two-byte form.
    lines = _session_lines(local, answer_bundle, offer.extmap_allow_mixed)
    for a in answered:
        m = a.offer
        if a.rejected:
            lines += _rejected_lines(m, local, setup)
            continue
        if a.kind == "application":
            lines += application_lines(local, setup, str(m.mid), data_channels, m.protocol)
            continue
        lines += _accepted_mline_lines(
            m, local, setup, offer.extmap_allow_mixed, a.codecs, a.extmaps, a.direction
        )
        lines.append("a=rtcp-mux")
        if m.rtcp_rsize:
            lines.append("a=rtcp-rsize")
        lines += _codec_lines(a.codecs)
        lines += _simulcast_lines(a)
        lines += _candidate_lines(local)
    return _join(lines), answered


def _answer_media(
    m: MediaDescription,
    bundle: set[str],
    fb: set[str],
    extensions: set[str],
    allow_mixed: bool = False,
    codec_preference: Sequence[str] = DEFAULT_VIDEO_PREFERENCE,
    simulcast: bool = True,
    data_channels: int = 0,
) -> AnsweredMedia:
    def reject(reason: str) -> AnsweredMedia:
        return AnsweredMedia(m.mid, m.kind, True, reason, "inactive", [], [], m)

    if m.disabled:
        return reject("m-line disabled in the offer (port 0)")
    if m.kind not in ("audio", "video"):
        if "SCTP" in m.protocol.upper():
            if not data_channels:
                return reject(DATA_CHANNELS_UNSUPPORTED)
            if m.kind != "application" or m.protocol.upper() not in SCTP_PROTOCOLS:
                return reject(f"unsupported data channel protocol {m.protocol!r}")
            if "webrtc-datachannel" not in m.formats:
                return reject("data channel m-line without webrtc-datachannel")
            if m.mid not in bundle:
                return reject("not in the BUNDLE group")
            return AnsweredMedia(m.mid, m.kind, False, None, "sendrecv", [], [], m)
        return reject(f"unsupported media kind {m.kind!r}")
    if m.protocol.upper() not in RTP_PROTOCOLS:
        return reject(f"unsupported protocol {m.protocol!r}")
    if m.mid not in bundle:
        return reject("not in the BUNDLE group")
    codecs = _accept_codecs(m, fb, codec_preference)
    if not codecs:
        return reject("no supported codec")
    direction = "recvonly" if m.direction in ("sendonly", "sendrecv") else "inactive"
    if codecs[0].name.lower() in LAYERS_BY_DEPENDENCY_DESCRIPTOR:
        extensions = extensions | {ext.DEPENDENCY_DESCRIPTOR_URI}
    extmaps = _accept_extmaps(m, extensions, allow_mixed)
    answered = AnsweredMedia(m.mid, m.kind, False, None, direction, codecs, extmaps, m)
    if direction == "recvonly" and m.kind == "video":
        answered.layers = _answer_simulcast(answered, simulcast)
    return answered


def _answer_simulcast(a: AnsweredMedia, rid_simulcast: bool) -> list[SimulcastLayer]:
    """The publisher's layers the relay receives on an accepted video m-line.

    SSRC layers (``a=ssrc-group:SIM``) as offered: the client sends them whatever the answer.
    RID layers, answered as RFC 8851 §6.2.2/§6.3 and RFC 8853 §5.3.2 say, only when
    ``rid_simulcast`` is set and the answer accepts the rtp-stream-id extension (without it
    the relay could not tell the layers apart): each offered ``send`` layer whose ``a=rid``
    :func:`_answer_rid` keeps, in the offer's order, the rid-ids unchanged (RFC 8851 §6.3).
    The ``~`` paused marks are answered as offered: libwebrtc offers an inactive encoding as
    paused and applies the answer's marks to its encodings, so dropping one would turn on a
    layer the application turned off. The offer's ``recv`` layers are not answered: the relay
    sends nothing on a publisher's m-line, and each subscriber gets one stream.
    """
    offered = a.offer.simulcast_layers
    if offered and offered[0].rid is None:
        return list(offered)
    if not rid_simulcast or not any(e.uri == ext.RTP_STREAM_ID_URI for e in a.extmaps):
        return []
    layers: list[SimulcastLayer] = []
    for layer in offered:
        if layer.direction != "send":
            continue
        restrictions = _answer_rid(layer.restrictions, a.codecs)
        if restrictions is not None:
            layers.append(dataclasses.replace(layer, restrictions=restrictions))
    return layers


def _answer_rid(offered: RidRestrictions, codecs: list[Codec]) -> RidRestrictions | None:
    """The restrictions of the answer's ``a=rid:<id> recv`` for an offered ``send`` rid, or
    None to leave the rid (and its simulcast layer) out of the answer.

    - ``pt=``: only the payload types the answer's m-line keeps (RFC 8851 §6.2.2 step 3 and
      §6.3 step 4); without the answered codec's (an RTX one alone is not enough) the relay
      cannot receive the stream: the rid is removed. No ``pt=`` offered, none answered (§6.3
      step 4).
    - ``depend=``: the rid is removed (§6.3 step 5, a payload configuration the relay cannot
      support): the relay forwards each layer alone, and a layer that depends on another does
      not decode alone.
    - max-width, max-height, max-fps, max-fs, max-br, max-pps, max-bpp: echoed unchanged.
      The relay takes whatever the client sends within them; §6.3 step 2 lets an answer keep
      an offered value or make it stricter, never add a restriction.
    - any other restriction, and a known one offered without a value: dropped (§6.3 step 2
      allows leaving out; the relay does not add a restriction it does not interpret).
    """
    if offered.depend:
        return None
    pts: tuple[int, ...] = ()
    if offered.payload_types:
        answer_pts = set(_codec_pts(codecs))
        pts = tuple(pt for pt in offered.payload_types if pt in answer_pts)
        if not any(c.payload_type in pts for c in codecs):
            return None
    return RidRestrictions(
        payload_types=pts,
        max_width=offered.max_width,
        max_height=offered.max_height,
        max_fps=offered.max_fps,
        max_fs=offered.max_fs,
        max_br=offered.max_br,
        max_pps=offered.max_pps,
        max_bpp=offered.max_bpp,
    )


def _format_rid_restrictions(r: RidRestrictions) -> str:
    """`` pt=96;max-width=1280;max-height=720`` (with its leading space), or ``""``."""
    items = ["pt=" + ",".join(str(pt) for pt in r.payload_types)] if r.payload_types else []
    for name, attr in _RID_INT_RESTRICTIONS:
        value = getattr(r, attr)
        if value is not None:
            items.append(f"{name}={value}")
    if r.max_bpp is not None:
        text = f"{r.max_bpp:.10f}".rstrip("0")
        items.append(f"max-bpp={text}0" if text.endswith(".") else f"max-bpp={text}")
    return " " + ";".join(items) if items else ""


def _simulcast_lines(a: AnsweredMedia) -> list[str]:
    """``a=rid:<id> recv ...`` per answered RID layer and ``a=simulcast:recv <streams>``,
    streams and alternatives in the offer's order (RFC 8853 §5.3.2: the answer may remove
    streams or alternatives, not add any), in the offer's form (RFC 8853 or the
    draft-03 form old Firefox writes). Nothing for SSRC simulcast or without simulcast."""
    layers = [layer for layer in a.layers if layer.rid is not None]
    if not layers:
        return []
    lines = [
        f"a=rid:{layer.rid} recv{_format_rid_restrictions(layer.restrictions)}" for layer in layers
    ]
    streams: dict[int, list[SimulcastLayer]] = {}
    for layer in layers:
        streams.setdefault(layer.stream, []).append(layer)
    if a.offer.simulcast_draft:
        listed = ";".join(",".join(str(x.rid) for x in alts) for alts in streams.values())
        paused = ",".join(str(x.rid) for x in layers if x.paused)
        lines.append(f"a=simulcast: recv rid={listed}" + (f" paused={paused}" if paused else ""))
    else:
        listed = ";".join(
            ",".join(("~" if x.paused else "") + str(x.rid) for x in alts)
            for alts in streams.values()
        )
        lines.append(f"a=simulcast:recv {listed}")
    return lines


# ---------------------------------------------------------------------------------------------
# Offering to a subscriber


@dataclass
class OfferedMedia:
    """One m-line of a relay-made (subscriber) offer."""

    mid: str
    kind: str
    direction: str
    codecs: list[Codec]
    extmaps: list[Extmap]
    ssrc: int | None
    rtx_ssrc: int | None = None
    cname: str = ""
    msid: tuple[str, str] | None = None
    #: an ``m=application`` (data channels, no codecs): the ``a=max-message-size`` offered
    max_message_size: int = 0


def application_lines(
    local: LocalTransport,
    setup: str,
    mid: str,
    max_message_size: int,
    protocol: str = "UDP/DTLS/SCTP",
) -> list[str]:
    """The lines of a data channel m-line (RFC 8841): ``m=application ... webrtc-datachannel``,
    the bundle transport's attributes, ``a=sctp-port`` and ``a=max-message-size``."""
    lines = [f"m=application {_media_port(local)} {protocol} webrtc-datachannel"]
    lines += _transport_lines(local, setup)
    lines.append(f"a=mid:{mid}")
    lines.append(f"a=sctp-port:{SCTP_PORT}")
    lines.append(f"a=max-message-size:{max_message_size}")
    lines += _candidate_lines(local)
    return lines


def build_offer(
    local: LocalTransport, media: list[OfferedMedia], extmap_allow_mixed: bool = True
) -> str:
    """Make a subscriber offer: BUNDLE of all mids, ICE-lite, rtcp-mux, ``a=setup`` from local,
    and ``a=extmap-allow-mixed`` (the relay may forward header extensions in the two-byte form,
    RFC 8285) unless ``extmap_allow_mixed`` is False.

    An m-line with ``ssrc=None`` (e.g. an inactive placeholder) keeps its codecs and mid and has
    no ssrc lines. The SSRC's cname is ``cname``, or the msid stream id, or ``"relay"``.
    Raises ValueError (SdpError) for inconsistent input: duplicate mids, no codecs, bad
    direction, ``rtx_ssrc`` without ``ssrc`` or without an rtx payload type.
    """
    mids: set[str] = set()
    for m in media:
        if not m.mid or any(ch.isspace() for ch in m.mid) or m.mid in mids:
            raise SdpError(f"offered media: empty, blank-containing or duplicate mid {m.mid!r}")
        mids.add(m.mid)
        if m.kind == "application":
            continue
        if m.direction not in DIRECTIONS:
            raise SdpError(f"mid {m.mid}: bad direction {m.direction!r}")
        if not m.codecs:
            raise SdpError(f"mid {m.mid}: no codecs")
        if m.rtx_ssrc is not None and m.ssrc is None:
            raise SdpError(f"mid {m.mid}: rtx_ssrc without ssrc")
        if m.rtx_ssrc is not None and not any(c.rtx_payload_type is not None for c in m.codecs):
            raise SdpError(f"mid {m.mid}: rtx_ssrc but no codec has an rtx payload type")

    lines = _session_lines(local, [m.mid for m in media], extmap_allow_mixed)
    for m in media:
        if m.kind == "application":
            lines += application_lines(local, local.setup, m.mid, m.max_message_size)
            continue
        pts = " ".join(str(pt) for pt in _codec_pts(m.codecs))
        lines.append(f"m={m.kind} {_media_port(local)} UDP/TLS/RTP/SAVPF {pts}")
        lines += _transport_lines(local, local.setup)
        lines.append(f"a=mid:{m.mid}")
        lines += _extmap_lines(m.extmaps)
        lines.append(f"a={m.direction}")
        msid = f"{m.msid[0]} {m.msid[1]}".rstrip() if m.msid else None
        if msid:
            lines.append(f"a=msid:{msid}")
        lines += ["a=rtcp-mux", "a=rtcp-rsize"]
        lines += _codec_lines(m.codecs)
        if m.ssrc is not None:
            cname = m.cname or (m.msid[0] if m.msid and m.msid[0] != "-" else "") or "relay"
            lines += _ssrc_lines(m.ssrc, m.rtx_ssrc, cname, msid)
        lines += _candidate_lines(local)
    return _join(lines)


def _ssrc_lines(ssrc: int, rtx_ssrc: int | None, cname: str, msid: str | None) -> list[str]:
    """The ``a=ssrc`` lines of a stream the relay sends (and of its RTX stream, grouped)."""
    lines = [f"a=ssrc-group:FID {ssrc} {rtx_ssrc}"] if rtx_ssrc is not None else []
    for s in [ssrc] if rtx_ssrc is None else [ssrc, rtx_ssrc]:
        lines.append(f"a=ssrc:{s} cname:{cname}")
        if msid:
            lines.append(f"a=ssrc:{s} msid:{msid}")
    return lines


def check_answer(offered: list[OfferedMedia], answer: SessionDescription) -> RemoteTransport | None:
    """Validate a subscriber's answer to :func:`build_offer` and return its transport.

    The answer must have the same m-lines (mid and kind) in the same order, ``a=rtcp-mux`` on
    every accepted m-line, a BUNDLE group when anything is accepted, and ``a=setup`` of
    ``active`` or ``passive``. Returns None when the answer rejects every m-line (nothing to
    connect). Raises SdpError otherwise.
    """
    if len(answer.media) != len(offered):
        raise SdpError(f"answer has {len(answer.media)} m-lines, the offer had {len(offered)}")
    for o, a in zip(offered, answer.media, strict=True):
        where = f"m-line {a.index}"
        if a.kind != o.kind:
            raise SdpError(f"{where}: kind {a.kind!r} answers an offered {o.kind!r}")
        if a.mid is not None and a.mid != o.mid:
            raise SdpError(f"{where}: mid {a.mid!r} answers an offered {o.mid!r}")
        if not a.disabled and not a.rtcp_mux and a.kind != "application":
            raise SdpError(f"{where}: missing a=rtcp-mux (rtcp-mux is required)")
    if all(a.disabled for a in answer.media):
        return None
    if not answer.bundle_mids:
        raise SdpError("answer has no a=group:BUNDLE (BUNDLE is required)")
    transport = remote_transport(answer)
    if transport.setup not in ("active", "passive"):
        raise SdpError(f"answer has a=setup:{transport.setup} (expected active or passive)")
    return transport


# ---------------------------------------------------------------------------------------------
# Answering a viewer's offer (WHEP)


def viewer_mlines(offer: SessionDescription) -> list[MediaDescription]:
    """The m-lines of a viewer's offer (WHEP) the relay can send a track on: audio or video,
    RTP, enabled, in the BUNDLE group, and ``recvonly`` or ``sendrecv`` (what the viewer
    would send on a ``sendrecv`` one is not received)."""
    bundle = set(offer.bundle_mids)
    return [
        m
        for m in offer.media
        if m.kind in ("audio", "video")
        and not m.disabled
        and m.protocol.upper() in RTP_PROTOCOLS
        and m.mid in bundle
        and m.direction in ("recvonly", "sendrecv")
    ]


def check_viewer_offer(offer: SessionDescription) -> RemoteTransport:
    """Validate a viewer's offer and return its transport: BUNDLE, a mid on every m-line,
    ``a=rtcp-mux`` on every enabled audio/video m-line, ICE credentials and a fingerprint.
    Raises SdpError."""
    if not offer.bundle_mids:
        raise SdpError("offer has no a=group:BUNDLE (BUNDLE is required)")
    for m in offer.media:
        if m.mid is None:
            raise SdpError(f"m-line {m.index}: missing a=mid")
        if m.kind in ("audio", "video") and not m.disabled and not m.rtcp_mux:
            raise SdpError(f"m-line {m.index}: missing a=rtcp-mux (rtcp-mux is required)")
    transport = remote_transport(offer)
    _answer_setup(transport.setup)  # an a=setup the relay can answer
    return transport


def viewer_codec(
    offered: MediaDescription, codec: Codec, feedback: AbstractSet[str] = frozenset()
) -> Codec | None:
    """The viewer's own format (its payload type, and its RTX payload type) for a track sent
    in ``codec``, with the viewer's ``rtcp-fb`` values kept where they are in ``feedback``;
    None when the viewer did not offer that format.

    The same codec name, clock rate and channels; for H.264 the same packetization-mode and
    profile (any level: the relay forwards what the publisher sends), for VP9 and AV1 the
    same profile. Among several matches, one with the same ``fmtp`` wins.
    """
    name = codec.name.lower()

    def same_format(c: Codec) -> bool:
        if c.name.lower() != name or c.clock_rate != codec.clock_rate:
            return False
        if c.kind == "audio" and (c.channels or 1) != (codec.channels or 1):
            return False
        if name == "h264":
            mode = (c.param("packetization-mode") or "0").strip()
            if mode != (codec.param("packetization-mode") or "0").strip():
                return False
            mine = parse_profile_level_id(c.param("profile-level-id"))
            theirs = parse_profile_level_id(codec.param("profile-level-id"))
            return mine is not None and theirs is not None and mine[0] == theirs[0]
        if name == "vp9":
            return (c.param("profile-id") or "0").strip() == (
                codec.param("profile-id") or "0"
            ).strip()
        if name == "av1":
            return (c.param("profile") or "0").strip() == (codec.param("profile") or "0").strip()
        return True

    matches = [c for c in offered.codecs if same_format(c)]
    if not matches:
        return None
    chosen = next((c for c in matches if c.fmtp == codec.fmtp), matches[0])
    answered = _copy_codec(chosen, keep_rtx=True)
    answered.rtcp_fb = [fb for fb in chosen.rtcp_fb if fb.lower() in feedback]
    return answered


def build_viewer_answer(
    offer: SessionDescription, local: LocalTransport, media: list[OfferedMedia | None]
) -> str:
    """Answer a viewer's offer (WHEP): one entry of ``media`` per offered m-line, in the
    offer's order, written as :func:`build_offer` writes a subscriber m-line (``sendonly``
    with the track's SSRC and msid, or ``inactive``) but with the offer's mids, payload types
    and extension ids, which the caller took from the offer (see :func:`viewer_codec`);
    ``None`` rejects the m-line (port 0). ``a=setup`` answers the offer's (``passive`` to
    ``actpass``); ``a=extmap-allow-mixed`` and ``a=rtcp-rsize`` only where offered.
    """
    if len(media) != len(offer.media):
        raise SdpError(f"{len(media)} answered m-lines for {len(offer.media)} offered")
    tagged = _bundle_media(offer)
    setup = _answer_setup(tagged[0].setup if tagged else None)
    answered_mids = {a.mid for a in media if a is not None}
    answer_bundle = [mid for mid in offer.bundle_mids if mid in answered_mids]
    lines = _session_lines(local, answer_bundle, offer.extmap_allow_mixed)
    for m, a in zip(offer.media, media, strict=True):
        if a is None:
            lines += _rejected_lines(m, local, setup)
            continue
        if not a.codecs or a.mid != m.mid or a.direction not in DIRECTIONS:
            raise SdpError(f"m-line {m.index}: bad answered media for mid {m.mid}")
        lines += _accepted_mline_lines(
            m, local, setup, offer.extmap_allow_mixed, a.codecs, a.extmaps, a.direction
        )
        msid = f"{a.msid[0]} {a.msid[1]}".rstrip() if a.msid else None
        if msid and a.direction != "inactive":
            lines.append(f"a=msid:{msid}")
        lines.append("a=rtcp-mux")
        if m.rtcp_rsize:
            lines.append("a=rtcp-rsize")
        lines += _codec_lines(a.codecs)
        if a.ssrc is not None and a.direction != "inactive":
            lines += _ssrc_lines(a.ssrc, a.rtx_ssrc, a.cname or "relay", msid)
        lines += _candidate_lines(local)
    return _join(lines)


def _accepted_mline_lines(
    m: MediaDescription,
    local: LocalTransport,
    setup: str,
    session_allow_mixed: bool,
    codecs: list[Codec],
    extmaps: list[Extmap],
    direction: str,
) -> list[str]:
    """The start of an answered m-line the relay accepts, up to its direction: the m= line
    with the answered payload types, the bundle transport, the mid, a=extmap-allow-mixed
    where the offer put it on this m-line rather than the session, the extensions."""
    pts = " ".join(str(pt) for pt in _codec_pts(codecs))
    lines = [f"m={m.kind} {_media_port(local)} {m.protocol} {pts}"]
    lines += _transport_lines(local, setup)
    lines.append(f"a=mid:{m.mid}")
    if m.extmap_allow_mixed and not session_allow_mixed:
        lines.append("a=extmap-allow-mixed")
    lines += _extmap_lines(extmaps)
    lines.append(f"a={direction}")
    return lines


def _rejected_lines(m: MediaDescription, local: LocalTransport, setup: str) -> list[str]:
    """An answered m-line refused with port 0. It still carries the bundle transport's
    attributes and candidates, ignored by a client that honours the port 0: aiortc refuses an
    answer without them and, with max-bundle, takes the remote candidates of its shared
    transport from its last m-line, which is where it puts a data channel."""
    lines = [
        f"m={m.kind} 0 {m.protocol} {' '.join(m.formats)}",
        "c=IN IP4 0.0.0.0",
        f"a=mid:{m.mid}",
        *_transport_lines(local, setup)[2:],
    ]
    if m.rtcp_mux:
        lines.append("a=rtcp-mux")
    return lines + _candidate_lines(local)


def answer_setup(offered: str | None) -> str:
    """The ``a=setup`` that answers an offered one (``passive`` to ``actpass``/``active``);
    raises SdpError for a value the relay cannot answer."""
    return _answer_setup(offered)


def viewer_extmaps(
    offer: SessionDescription, m: MediaDescription, uris: AbstractSet[str]
) -> list[Extmap]:
    """The viewer's offered header extensions of ``m`` whose URI is in ``uris``, with the
    viewer's ids: those it may receive (not ``sendonly``/``inactive``), ids above 14 only
    under ``a=extmap-allow-mixed``, each id and URI once."""
    allow_mixed = _allows_mixed(offer, m)
    taken: list[Extmap] = []
    for e in m.extmaps:
        if e.uri not in uris or e.direction in ("sendonly", "inactive"):
            continue
        if not _extmap_id_usable(e.id, allow_mixed):
            continue
        if any(t.id == e.id or t.uri == e.uri for t in taken):
            continue
        taken.append(Extmap(e.id, e.uri, None))
    return taken


def ice_candidate_lines(
    candidates: list[tuple[str, int]], tcp_candidates: Sequence[tuple[str, int]] = ()
) -> list[str]:
    """The relay's host candidates (UDP, then passive TCP) as written in its answers and
    offers, then ``a=end-of-candidates`` (for an ICE restart's ``trickle-ice-sdpfrag``)."""
    local = LocalTransport("", "", ("", ""), list(candidates), "passive", 0, 0)
    local.tcp_candidates = list(tcp_candidates)
    return _candidate_lines(local)
