"""A minimal client-side WebRTC endpoint built from the relay's own protocol cores.

It speaks exactly what a WebRTC client needs to talk to the relay (controlling ICE with
aggressive nomination, DTLS-SRTP in either role, BUNDLE + rtcp-mux on one 5-tuple) and nothing
else: no decoding, no jitter buffer, no congestion control. Tests and the bench load generator
use it to publish and receive pre-built RTP without aiortc.

Interface (kept small and stable)::

    TrackSpec(kind, ssrc, mid=None)            # a published stream: "audio" (opus, PT 111)
                                                # or "video" (VP8, PT 96)
    RemoteDescription.parse(sdp, revision=None) # the relay's answer or offer: .ice_ufrag,
                                                # .ice_pwd, .fingerprints, .setup,
                                                # .candidates, .address, .media[RemoteMedia]

    peer = ClientPeer(certificate=None, consent_interval=2.0, use_candidate=True)  # sans-I/O
                                                # (one Certificate may serve many peers)
    peer.create_offer(tracks, setup="actpass" | "active" | "passive") -> str
    peer.create_answer(remote_offer, setup="active" | "passive") -> str
    peer.set_remote_description(remote)
    peer.start(now) -> [datagram]              # first connectivity check
    peer.receive(datagram, now) -> [datagram]  # calls peer.on_rtp(plain, now) / on_rtcp(packets)
    peer.handle_timeout(now) -> [datagram]; peer.next_timeout() -> float | None
    peer.check(now, nominate=True) -> [datagram]   # one check right now
    peer.protect_rtp(ssrc, pt, seq, ts, payload, marker=False, extensions=None) -> bytes
    peer.protect_rtcp(compound) -> bytes; peer.close(notify=True) -> [datagram]
    peer.ice_connected / peer.connected (SRTP ready) / peer.failed / peer.closed
    peer.srtp (SrtpSession, to protect in bulk); peer.rtp_received[ssrc]; peer.stats()

    async with UdpClientPeer.connect(peer, remote.address) as udp:   # asyncio, one UDP socket
        await udp.connected(timeout=10.0)
        udp.send_rtp(ssrc, pt, seq, ts, payload, marker=False)
        udp.send_srtp(already_protected)       # fast path
        udp.send_rtcp(compound)                # e.g. relay.rtc.rtcp.pli(...)
        await udp.rebind(nominate=True)        # new local port (NAT rebinding)
        udp.abort()                            # go silent: no DTLS close_notify

    await negotiate_publisher(http, room_id, participant_id, peer, tracks, setup="actpass")
    await negotiate_subscriber(http, room_id, participant_id, peer, setup="active")

Checks carry USE-CANDIDATE unless ``use_candidate`` is False (then only ``check(now,
nominate=True)`` nominates). Packets protected ahead of time for ``send_srtp`` need distinct
sequence numbers per SSRC: the relay's SRTP replay window drops repeats.

All times are seconds on one monotonic clock (``loop.time()`` in the asyncio wrapper). Every
datagram returned by the sans-I/O methods goes to the relay's address. ``http`` is an
``httpx.AsyncClient`` with ``base_url`` set to the relay's API and the Authorization header.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aioice import stun

from relay.rtc import rtcp
from relay.rtc.dtls import DEFAULT_SRTP_PROFILES, Certificate, DtlsEndpoint, DtlsState
from relay.rtc.extensions import MID_URI
from relay.rtc.ice import IceCredentials
from relay.rtc.rtp import RTP_HEADER, build_extension_block, is_rtcp
from relay.rtc.sdp import Codec, parse_sdp, remote_transport
from relay.rtc.srtp import SrtpError, SrtpSession

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AUDIO_PT",
    "MID_EXT_ID",
    "MID_URI",
    "VIDEO_PT",
    "ClientPeer",
    "PeerError",
    "RemoteDescription",
    "RemoteMedia",
    "TrackSpec",
    "UdpClientPeer",
    "build_rtp",
    "negotiate_publisher",
    "negotiate_subscriber",
]

Address = tuple[str, int]

AUDIO_PT = 111  # opus/48000/2
VIDEO_PT = 96  # VP8/90000
MID_EXT_ID = 4

#: First retransmission interval of a connectivity check; doubled up to CHECK_INTERVAL_MAX.
CHECK_INTERVAL = 0.05
CHECK_INTERVAL_MAX = 0.5
#: Peer-reflexive host priority sent in PRIORITY (RFC 8445 §5.1.2, type preference 110).
CHECK_PRIORITY = (110 << 24) | (65535 << 8) | 255
#: Outstanding check transactions remembered (older responses are ignored).
MAX_PENDING = 32

_SSRC = struct.Struct("!I")


class PeerError(Exception):
    """Negotiation or connection of a client peer failed."""


@dataclass(frozen=True)
class TrackSpec:
    """One stream to publish: kind ``"audio"`` (opus, PT 111) or ``"video"`` (VP8, PT 96)."""

    kind: str
    ssrc: int
    mid: str | None = None

    @property
    def payload_type(self) -> int:
        return AUDIO_PT if self.kind == "audio" else VIDEO_PT


@dataclass
class RemoteMedia:
    """One m-line of the relay's SDP, as a client needs it."""

    mid: str
    kind: str
    direction: str
    payload_type: int | None
    codec: Codec | None
    ssrc: int | None
    msid: tuple[str, str] | None
    extmaps: dict[str, int] = field(default_factory=dict)


@dataclass
class RemoteDescription:
    """The relay's answer (publisher) or offer (subscriber), parsed."""

    sdp: str
    ice_ufrag: str
    ice_pwd: str
    fingerprints: list[tuple[str, str]]
    setup: str | None
    candidates: list[Address]
    media: list[RemoteMedia]
    ice_lite: bool
    revision: int | None = None

    @property
    def address(self) -> Address:
        """The relay's first (preferred) host candidate."""
        if not self.candidates:
            raise PeerError("the relay's SDP has no usable candidate")
        return self.candidates[0]

    def media_by_ssrc(self, ssrc: int) -> RemoteMedia | None:
        return next((m for m in self.media if m.ssrc == ssrc), None)

    @classmethod
    def parse(cls, sdp: str, revision: int | None = None) -> RemoteDescription:
        """Parse with :func:`relay.rtc.sdp.parse_sdp`; PeerError if unusable."""
        try:
            desc = parse_sdp(sdp)
            transport = remote_transport(desc)
        except ValueError as exc:
            raise PeerError(f"unusable remote SDP: {exc}") from None
        candidates: list[Address] = []
        for line in transport.candidates:
            parts = line.split()
            # foundation component transport priority address port "typ" type
            if len(parts) >= 8 and parts[2].lower() == "udp" and parts[1] == "1":
                try:
                    candidates.append((parts[4], int(parts[5])))
                except ValueError:
                    continue
        media = []
        for m in desc.media:
            codec = m.codecs[0] if m.codecs else None
            media.append(
                RemoteMedia(
                    mid=m.mid or "",
                    kind=m.kind,
                    direction=m.direction,
                    payload_type=codec.payload_type if codec else None,
                    codec=codec,
                    ssrc=m.ssrcs[0] if m.ssrcs else None,
                    msid=m.msid,
                    extmaps={e.uri: e.id for e in m.extmaps},
                )
            )
        return cls(
            sdp=sdp,
            ice_ufrag=transport.ice_ufrag,
            ice_pwd=transport.ice_pwd,
            fingerprints=transport.fingerprints,
            setup=transport.setup,
            candidates=candidates,
            media=media,
            ice_lite=desc.ice_lite,
            revision=revision,
        )


def build_rtp(
    ssrc: int,
    pt: int,
    seq: int,
    ts: int,
    payload: bytes,
    marker: bool = False,
    extension: bytes = b"",
) -> bytes:
    """A plain RTP packet: 12-byte header, optional full extension block, payload."""
    return (
        RTP_HEADER.pack(
            0x90 if extension else 0x80,
            (0x80 if marker else 0) | (pt & 0x7F),
            seq & 0xFFFF,
            ts & 0xFFFFFFFF,
            ssrc & 0xFFFFFFFF,
        )
        + extension
        + payload
    )


def _format_codec(codec: Codec) -> list[str]:
    encoding = f"{codec.name}/{codec.clock_rate}"
    if codec.channels is not None:
        encoding += f"/{codec.channels}"
    lines = [f"a=rtpmap:{codec.payload_type} {encoding}"]
    if codec.fmtp:
        params = ";".join(f"{k}={v}" if v != "" else k for k, v in codec.fmtp.items())
        lines.append(f"a=fmtp:{codec.payload_type} {params}")
    lines += [f"a=rtcp-fb:{codec.payload_type} {fb}" for fb in codec.rtcp_fb]
    return lines


_OPUS = Codec(
    AUDIO_PT, "opus", 48000, 2, {"minptime": "10", "useinbandfec": "1"}, [], None, "audio"
)
_VP8 = Codec(VIDEO_PT, "VP8", 90000, None, {}, ["nack", "nack pli", "ccm fir"], None, "video")


class ClientPeer:
    """A sans-I/O WebRTC client: datagrams and times in, datagrams to the relay out.

    ``on_rtp(plain_packet, now)`` and ``on_rtcp(packets)`` are called from :meth:`receive`
    for every authenticated SRTP/SRTCP packet.
    """

    def __init__(
        self,
        certificate: Certificate | None = None,
        *,
        consent_interval: float = 2.0,
        consent_timeout: float = 30.0,
        ice_timeout: float = 30.0,
        use_candidate: bool = True,
        srtp_profiles: Sequence[str] = DEFAULT_SRTP_PROFILES,
        dtls_timeout: float = 30.0,
        mtu: int = 1200,
    ) -> None:
        self.certificate = certificate or Certificate.generate()
        self.local = IceCredentials.generate()
        self.tie_breaker = secrets.randbits(64)
        self.cname = secrets.token_hex(8)
        self.consent_interval = consent_interval
        self.consent_timeout = consent_timeout
        self.ice_timeout = ice_timeout
        self.use_candidate = use_candidate
        self.srtp_profiles = list(srtp_profiles)
        self.dtls_timeout = dtls_timeout
        self.mtu = mtu

        self.on_rtp: Callable[[bytes, float], Any] | None = None
        self.on_rtcp: Callable[[list[Any]], Any] | None = None

        self.local_setup: str | None = None
        self.remote: RemoteDescription | None = None
        self.dtls: DtlsEndpoint | None = None
        self.srtp: SrtpSession | None = None
        self.dtls_client: bool | None = None
        self.tracks: list[TrackSpec] = []

        self.ice_connected = False
        self.failed = False
        self.closed = False
        self.failure_reason: str | None = None
        #: XOR-MAPPED-ADDRESS of the last successful check (our address as the relay sees it)
        self.mapped_address: Address | None = None

        self._started_at: float | None = None
        self._next_check: float | None = None
        self._interval = CHECK_INTERVAL
        self._last_success: float | None = None
        self._pending: OrderedDict[bytes, float] = OrderedDict()
        self._mid_blocks: dict[int, bytes] = {}

        # counters
        self.checks_sent = 0
        self.check_successes = 0
        self.check_errors: list[int] = []
        self.rtp_received: dict[int, int] = {}
        self.rtcp_received = 0
        self.rtp_sent = 0
        self.rtcp_sent = 0
        self.srtp_errors = 0
        self.ignored = 0

    # -- state --------------------------------------------------------------------------
    @property
    def fingerprints(self) -> list[tuple[str, str]]:
        return self.certificate.fingerprints()

    @property
    def connected(self) -> bool:
        """ICE done and SRTP keys available."""
        return self.srtp is not None and not self.failed and not self.closed

    @property
    def dtls_state(self) -> DtlsState:
        return DtlsState.NEW if self.dtls is None else self.dtls.state

    def stats(self) -> dict[str, Any]:
        return {
            "checks_sent": self.checks_sent,
            "check_successes": self.check_successes,
            "check_errors": list(self.check_errors),
            "rtp_received": sum(self.rtp_received.values()),
            "rtcp_received": self.rtcp_received,
            "rtp_sent": self.rtp_sent,
            "rtcp_sent": self.rtcp_sent,
            "srtp_errors": self.srtp_errors,
            "ignored": self.ignored,
            "dtls_state": self.dtls_state.value,
        }

    # -- SDP ----------------------------------------------------------------------------
    def _transport_lines(self, setup: str) -> list[str]:
        algorithm, value = self.fingerprints[0]
        return [
            "c=IN IP4 0.0.0.0",
            "a=rtcp:9 IN IP4 0.0.0.0",
            f"a=ice-ufrag:{self.local.ufrag}",
            f"a=ice-pwd:{self.local.pwd}",
            f"a=fingerprint:{algorithm} {value}",
            f"a=setup:{setup}",
        ]

    def _session_lines(self, mids: list[str]) -> list[str]:
        return [
            "v=0",
            f"o=- {secrets.randbits(62)} 1 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE " + " ".join(mids),
            "a=msid-semantic:WMS *",
        ]

    def create_offer(self, tracks: Sequence[TrackSpec], setup: str = "actpass") -> str:
        """A publisher offer: one sendonly m-line per track, SSRCs signalled, sdes:mid on.

        ``setup`` ``actpass``/``active`` makes us the DTLS client, ``passive`` the server.
        """
        if setup not in ("actpass", "active", "passive"):
            raise PeerError(f"bad setup {setup!r}")
        if not tracks:
            raise PeerError("nothing to publish")
        specs = []
        for i, t in enumerate(tracks):
            if t.kind not in ("audio", "video"):
                raise PeerError(f"bad track kind {t.kind!r}")
            specs.append(TrackSpec(t.kind, t.ssrc, t.mid if t.mid is not None else str(i)))
        mids = [t.mid or "" for t in specs]
        if len(set(mids)) != len(mids):
            raise PeerError("duplicate mid")
        lines = self._session_lines(mids)
        for t in specs:
            codec = _OPUS if t.kind == "audio" else _VP8
            track_id = f"{t.kind}-{t.ssrc}"
            lines.append(f"m={t.kind} 9 UDP/TLS/RTP/SAVPF {codec.payload_type}")
            lines += self._transport_lines(setup)
            lines += [
                f"a=mid:{t.mid}",
                f"a=extmap:{MID_EXT_ID} {MID_URI}",
                "a=sendonly",
                f"a=msid:{self.cname} {track_id}",
                "a=rtcp-mux",
                "a=rtcp-rsize",
            ]
            lines += _format_codec(codec)
            lines += [
                f"a=ssrc:{t.ssrc} cname:{self.cname}",
                f"a=ssrc:{t.ssrc} msid:{self.cname} {track_id}",
            ]
        self.local_setup = setup
        self.tracks = specs
        self._mid_blocks = {
            t.ssrc: build_extension_block([(MID_EXT_ID, (t.mid or "").encode())]) for t in specs
        }
        return "\r\n".join(lines) + "\r\n"

    def adopt_offer(self, template: str, drop: Sequence[str] = ()) -> str:
        """A publisher offer written from another client's SDP (a captured browser offer, say):
        its ICE credentials and fingerprint replaced by ours, its candidates and every line
        starting with one of ``drop`` removed. Its ``a=setup`` becomes our DTLS role; the RTP
        sent is up to the caller (:meth:`protect_rtp` with explicit ``extensions``)."""
        algorithm, value = self.fingerprints[0]
        setup = "actpass"
        lines = []
        for line in template.splitlines():
            if line.startswith(("a=candidate:", "a=end-of-candidates", *drop)):
                continue
            if line.startswith("a=ice-ufrag:"):
                line = f"a=ice-ufrag:{self.local.ufrag}"
            elif line.startswith("a=ice-pwd:"):
                line = f"a=ice-pwd:{self.local.pwd}"
            elif line.startswith("a=fingerprint:"):
                line = f"a=fingerprint:{algorithm} {value}"
            elif line.startswith("a=setup:"):
                setup = line.partition(":")[2].strip()
            lines.append(line)
        if setup not in ("actpass", "active", "passive"):
            raise PeerError(f"bad setup {setup!r} in the template offer")
        self.local_setup = setup
        return "\r\n".join(lines) + "\r\n"

    def create_answer(self, offer: RemoteDescription, setup: str = "active") -> str:
        """A subscriber answer: recvonly for every sendonly m-line, inactive otherwise.

        ``setup`` ``active`` makes us the DTLS client, ``passive`` the server. On a
        renegotiation the first answer's role is kept (DTLS runs once per connection).
        """
        if setup not in ("active", "passive"):
            raise PeerError(f"bad setup {setup!r} (an answer is active or passive)")
        if self.local_setup in ("active", "passive") and self.dtls is not None:
            setup = self.local_setup
        mids = [m.mid for m in offer.media]
        lines = self._session_lines(mids)
        for m in offer.media:
            pt = m.payload_type
            if m.codec is None or pt is None:
                lines += [f"m={m.kind} 0 UDP/TLS/RTP/SAVPF 0", "c=IN IP4 0.0.0.0", f"a=mid:{m.mid}"]
                continue
            direction = "recvonly" if m.direction in ("sendonly", "sendrecv") else "inactive"
            lines.append(f"m={m.kind} 9 UDP/TLS/RTP/SAVPF {pt}")
            lines += self._transport_lines(setup)
            lines.append(f"a=mid:{m.mid}")
            lines += [f"a=extmap:{i} {uri}" for uri, i in m.extmaps.items()]
            lines += [f"a={direction}", "a=rtcp-mux", "a=rtcp-rsize"]
            lines += _format_codec(m.codec)
        self.local_setup = setup
        return "\r\n".join(lines) + "\r\n"

    def set_remote_description(self, remote: RemoteDescription) -> None:
        """Take the relay's credentials and fingerprint; fix our DTLS role (once)."""
        if self.local_setup is None:
            raise PeerError("create an offer or an answer first")
        if self.remote is not None and (
            remote.ice_ufrag != self.remote.ice_ufrag or remote.ice_pwd != self.remote.ice_pwd
        ):
            raise PeerError("the relay changed its ICE credentials (ICE restart unsupported)")
        self.remote = remote
        if self.dtls is not None:
            return
        if remote.setup == "passive":
            client = True
        elif remote.setup == "active":
            client = False
        elif remote.setup == "actpass":
            client = self.local_setup == "active"
        else:
            raise PeerError(f"the relay's SDP has a=setup:{remote.setup}")
        self.dtls_client = client
        self.dtls = DtlsEndpoint(
            self.certificate,
            is_server=not client,
            remote_fingerprints=remote.fingerprints,
            srtp_profiles=self.srtp_profiles,
            mtu=self.mtu,
            handshake_timeout=self.dtls_timeout,
        )

    # -- ICE ----------------------------------------------------------------------------
    def start(self, now: float) -> list[bytes]:
        """Begin connectivity checks; returns the first one."""
        if self.remote is None:
            raise PeerError("set the remote description first")
        if self._started_at is not None:
            return []
        self._started_at = now
        return self.check(now)

    def check(self, now: float, nominate: bool | None = None) -> list[bytes]:
        """One Binding request now (USE-CANDIDATE unless ``nominate`` is False)."""
        remote = self.remote
        if remote is None or self.failed or self.closed:
            return []
        if self._started_at is None:
            self._started_at = now
        message = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
        message.attributes["USERNAME"] = f"{remote.ice_ufrag}:{self.local.ufrag}"
        message.attributes["PRIORITY"] = CHECK_PRIORITY
        message.attributes["ICE-CONTROLLING"] = self.tie_breaker
        if self.use_candidate if nominate is None else nominate:
            message.attributes["USE-CANDIDATE"] = None
        message.add_message_integrity(remote.ice_pwd.encode())  # adds FINGERPRINT too
        self._pending[message.transaction_id] = now
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        self.checks_sent += 1
        if self.ice_connected:
            self._next_check = now + self.consent_interval
        else:
            self._next_check = now + self._interval
            self._interval = min(self._interval * 2, CHECK_INTERVAL_MAX)
        return [bytes(message)]

    def _stun(self, data: bytes, now: float) -> list[bytes]:
        try:
            message = stun.parse_message(data)
        except Exception:  # the codec raises several types for malformed input
            self.ignored += 1
            return []
        if message.message_method != stun.Method.BINDING or self.remote is None:
            self.ignored += 1
            return []
        if message.message_class == stun.Class.REQUEST:
            self.ignored += 1  # an ICE-lite relay never checks; nothing to answer
            return []
        if self._pending.pop(message.transaction_id, None) is None:
            self.ignored += 1  # not ours, or a response to a forgotten retransmission
            return []
        if message.message_class == stun.Class.ERROR:
            self.check_errors.append(message.error_code or 0)
            del self.check_errors[:-16]
            return []
        if not message.check_message_integrity(self.remote.ice_pwd.encode()):
            self.ignored += 1
            return []
        self.check_successes += 1
        self._last_success = now
        mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
        if isinstance(mapped, tuple):
            self.mapped_address = (mapped[0], mapped[1])
        if self.ice_connected:
            return []
        self.ice_connected = True
        self._next_check = now + self.consent_interval
        dtls = self.dtls
        if dtls is not None and self.dtls_client and dtls.state is DtlsState.NEW:
            out = dtls.start(now)
            self._after_dtls()
            return out
        return []

    # -- datagrams ------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Handle one datagram from the relay; returns the datagrams to send back."""
        if not data or self.closed:
            return []
        first = data[0]
        if 127 < first < 192:
            self._media(data, now)
            return []
        if first < 4:
            return self._stun(data, now)
        if 19 < first < 64:
            dtls = self.dtls
            if dtls is None:
                self.ignored += 1
                return []
            out = dtls.receive(data, now)
            self._after_dtls()
            return out
        self.ignored += 1
        return []

    def _after_dtls(self) -> None:
        dtls = self.dtls
        assert dtls is not None
        state = dtls.state
        if state is DtlsState.CONNECTED and self.srtp is None:
            assert dtls.srtp_keys is not None
            self.srtp = SrtpSession(dtls.srtp_keys)
        elif state is DtlsState.FAILED:
            self._fail(dtls.failure_reason or "DTLS failed")
        elif state is DtlsState.CLOSED and not self.closed:
            self.closed = True  # the relay hung up (close_notify)
            self.srtp = None
            self._next_check = None

    def _media(self, data: bytes, now: float) -> None:
        srtp = self.srtp
        if srtp is None:
            self.ignored += 1
            return
        if is_rtcp(data):
            try:
                packets = rtcp.parse_rtcp(srtp.unprotect_rtcp(data))
            except (SrtpError, rtcp.RtcpError):
                self.srtp_errors += 1
                return
            self.rtcp_received += 1
            if self.on_rtcp is not None:
                self.on_rtcp(packets)
            return
        try:
            plain = srtp.unprotect(data)
        except SrtpError:
            self.srtp_errors += 1
            return
        if len(plain) >= 12:
            ssrc = _SSRC.unpack_from(plain, 8)[0]
            counts = self.rtp_received
            counts[ssrc] = counts.get(ssrc, 0) + 1
        if self.on_rtp is not None:
            self.on_rtp(plain, now)

    # -- timers -------------------------------------------------------------------------
    def next_timeout(self) -> float | None:
        """When :meth:`handle_timeout` is next due (same clock as ``now``), or None."""
        if self.failed or self.closed:
            return None
        times = [t for t in (self._next_check,) if t is not None]
        if self.dtls is not None:
            dtls_at = self.dtls.next_timeout()
            if dtls_at is not None:
                times.append(dtls_at)
        return min(times) if times else None

    def handle_timeout(self, now: float) -> list[bytes]:
        """Check retransmissions, consent freshness, DTLS retransmissions and deadlines."""
        if self.failed or self.closed or self._started_at is None:
            return []
        if not self.ice_connected:
            if now - self._started_at > self.ice_timeout:
                self._fail(f"no ICE check answered within {self.ice_timeout:g} s")
                return []
        elif self._last_success is not None and now - self._last_success > self.consent_timeout:
            self._fail(f"consent lost: no check answered for {self.consent_timeout:g} s")
            return []
        out: list[bytes] = []
        if self._next_check is not None and now >= self._next_check:
            out += self.check(now)
        dtls = self.dtls
        if dtls is not None and dtls.state is DtlsState.CONNECTING:
            due = dtls.next_timeout()
            if due is not None and now >= due:
                out += dtls.handle_timeout(now)
                self._after_dtls()
        return out

    def _fail(self, reason: str) -> None:
        if not self.failed:
            self.failed = True
            self.failure_reason = reason
            self._next_check = None

    # -- sending --------------------------------------------------------------------------
    def protect_rtp(
        self,
        ssrc: int,
        pt: int,
        seq: int,
        ts: int,
        payload: bytes,
        marker: bool = False,
        extensions: Sequence[tuple[int, bytes]] | None = None,
    ) -> bytes:
        """An SRTP packet; ``extensions=None`` adds the sdes:mid of a published SSRC."""
        srtp = self.srtp
        if srtp is None:
            raise PeerError("SRTP is not ready (not connected)")
        if extensions is None:
            block = self._mid_blocks.get(ssrc, b"")
        else:
            block = build_extension_block(list(extensions))
        self.rtp_sent += 1
        return srtp.protect(build_rtp(ssrc, pt, seq, ts, payload, marker, block))

    def protect_rtcp(self, compound: bytes) -> bytes:
        """An SRTCP packet from a plain (compound) RTCP packet."""
        srtp = self.srtp
        if srtp is None:
            raise PeerError("SRTP is not ready (not connected)")
        self.rtcp_sent += 1
        return srtp.protect_rtcp(compound)

    def close(self, notify: bool = True) -> list[bytes]:
        """Close; with ``notify`` returns DTLS close_notify (when connected) for the relay."""
        out: list[bytes] = []
        if notify and self.dtls is not None and not self.closed:
            out = self.dtls.close()
        self.closed = True
        self.srtp = None
        self._next_check = None
        return out


# ---------------------------------------------------------------------------------------------
# asyncio


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpClientPeer) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self.transport is self.owner._transport:
            self.owner._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.owner.send_errors += 1


class UdpClientPeer:
    """A :class:`ClientPeer` on one UDP socket with its timer, on the running event loop."""

    def __init__(
        self,
        peer: ClientPeer,
        remote_addr: Address,
        *,
        local_host: str = "127.0.0.1",
        receive_buffer: int = 1 << 20,
    ) -> None:
        self.peer = peer
        self.remote_addr = remote_addr
        self.local_host = local_host
        self.receive_buffer = receive_buffer
        self.send_errors = 0
        self.foreign_datagrams = 0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed = asyncio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, peer: ClientPeer, remote_addr: Address, **kwargs: Any
    ) -> AsyncIterator[UdpClientPeer]:
        """Open the socket and start checks; on exit close (with DTLS close_notify)."""
        udp = cls(peer, remote_addr, **kwargs)
        await udp.start()
        try:
            yield udp
        finally:
            udp.close()

    @property
    def local_address(self) -> Address:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")[:2]

    async def _open(self) -> asyncio.DatagramTransport:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.bind((self.local_host, 0))
            sock.setblocking(False)
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        return transport

    async def start(self) -> None:
        self._transport = await self._open()
        self._send_all(self.peer.start(self._loop.time()))

    async def connected(self, timeout: float = 10.0) -> None:
        """Wait until SRTP is ready; PeerError on failure or timeout."""
        deadline = self._loop.time() + timeout
        while not self.peer.connected:
            if self.peer.failed or self.peer.closed:
                raise PeerError(
                    f"connection failed: {self.peer.failure_reason or 'closed'} "
                    f"({self.peer.stats()})"
                )
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise PeerError(f"not connected within {timeout:g} s ({self.peer.stats()})")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    def _datagram(self, data: bytes, addr: Address) -> None:
        if addr[:2] != self.remote_addr:
            self.foreign_datagrams += 1
            return
        was = self.peer.connected
        self._send_all(self.peer.receive(data, self._loop.time()))
        if self.peer.connected != was or self.peer.failed or self.peer.closed:
            self._changed.set()

    def _send_all(self, datagrams: list[bytes]) -> None:
        transport = self._transport
        if transport is not None:
            for datagram in datagrams:
                transport.sendto(datagram, self.remote_addr)
        self._schedule()

    def _schedule(self) -> None:
        deadline = self.peer.next_timeout()
        if deadline is None or self._transport is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        deadline = max(deadline, self._loop.time() + 0.002)  # never spin
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        was = self.peer.connected
        self._send_all(self.peer.handle_timeout(self._loop.time()))
        if self.peer.connected != was or self.peer.failed:
            self._changed.set()

    def send_rtp(
        self,
        ssrc: int,
        pt: int,
        seq: int,
        ts: int,
        payload: bytes,
        marker: bool = False,
        extensions: Sequence[tuple[int, bytes]] | None = None,
    ) -> None:
        """Protect and send one RTP packet (see :meth:`ClientPeer.protect_rtp`)."""
        packet = self.peer.protect_rtp(ssrc, pt, seq, ts, payload, marker, extensions)
        if self._transport is not None:
            self._transport.sendto(packet, self.remote_addr)

    def send_srtp(self, packet: bytes) -> None:
        """Send an already protected packet (or any raw datagram) to the relay."""
        if self._transport is not None:
            self._transport.sendto(packet, self.remote_addr)

    def send_rtcp(self, compound: bytes) -> None:
        """Protect and send a plain RTCP (compound) packet."""
        packet = self.peer.protect_rtcp(compound)
        if self._transport is not None:
            self._transport.sendto(packet, self.remote_addr)

    async def rebind(self, nominate: bool = True) -> Address:
        """Move to a new local socket (new port) and send a check from it at once.

        ``nominate=False`` sends it without USE-CANDIDATE, as clients do on consent checks.
        """
        old = self._transport
        self._transport = await self._open()
        if old is not None:
            old.close()
        self._send_all(self.peer.check(self._loop.time(), nominate=nominate))
        return self.local_address

    def close(self, notify: bool = True) -> None:
        """Close the socket; ``notify`` first sends DTLS close_notify. Idempotent."""
        transport, self._transport = self._transport, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        if transport is None:
            return
        for datagram in self.peer.close(notify):
            transport.sendto(datagram, self.remote_addr)
        transport.close()
        self._changed.set()

    def abort(self) -> None:
        """Go silent without close_notify (as a client that lost its network)."""
        self.close(notify=False)


# ---------------------------------------------------------------------------------------------
# Signalling through the relay's HTTP API


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise PeerError(f"{what}: HTTP {response.status_code} {response.text[:300]}")


async def negotiate_publisher(
    http: httpx.AsyncClient,
    room_id: str,
    participant_id: str,
    peer: ClientPeer,
    tracks: Sequence[TrackSpec],
    *,
    setup: str = "actpass",
) -> RemoteDescription:
    """POST our offer to ``.../publisher``; the relay's answer is applied to ``peer``."""
    offer = peer.create_offer(tracks, setup=setup)
    response = await http.post(
        f"/v1/rooms/{room_id}/participants/{participant_id}/publisher",
        json={"type": "offer", "sdp": offer},
    )
    _check(response, "publisher offer")
    remote = RemoteDescription.parse(response.json()["sdp"])
    peer.set_remote_description(remote)
    return remote


async def negotiate_subscriber(
    http: httpx.AsyncClient,
    room_id: str,
    participant_id: str,
    peer: ClientPeer,
    *,
    setup: str = "active",
    attempts: int = 5,
) -> RemoteDescription:
    """POST ``.../subscriber`` for an offer, PUT our answer with its revision (again on 409)."""
    base = f"/v1/rooms/{room_id}/participants/{participant_id}/subscriber"
    for _ in range(attempts):
        response = await http.post(base)
        _check(response, "subscriber offer")
        body = response.json()
        remote = RemoteDescription.parse(body["sdp"], revision=body["revision"])
        answer = peer.create_answer(remote, setup=setup)
        response = await http.put(
            base, json={"type": "answer", "sdp": answer, "revision": remote.revision}
        )
        if response.status_code == 409:
            continue
        _check(response, "subscriber answer")
        peer.set_remote_description(remote)
        return remote
    raise PeerError(f"subscriber answer kept conflicting after {attempts} attempts")
