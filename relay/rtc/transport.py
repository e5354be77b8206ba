"""One WebRTC transport (a peer connection's single BUNDLE'd 5-tuple), sans-I/O.

It holds the ICE-lite state (our credentials, the client's, the latched address), the DTLS
endpoint and, once the handshake is done, the SRTP session. It never touches a socket: the
media plane hands it datagrams and sends what it returns.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

from relay.rtc.dtls import Certificate, DtlsEndpoint, DtlsState
from relay.rtc.ice import BindingRequest, IceCredentials, binding_error, binding_success
from relay.rtc.srtp import SrtpSession

Address = tuple[str, int]

#: transaction ids of authenticated checks remembered per transport, to tell a fresh check
#: from a replayed one (a client sends a few checks per second at most)
RECENT_CHECKS = 64


class TransportState(enum.Enum):
    NEW = "new"  # created, waiting for the first valid STUN check
    CONNECTING = "connecting"  # address latched, DTLS handshake in progress
    CONNECTED = "connected"  # SRTP keys available
    FAILED = "failed"
    CLOSED = "closed"


class WebRtcTransport:
    """ICE-lite + DTLS + SRTP for one peer connection of one participant."""

    def __init__(
        self,
        certificate: Certificate,
        srtp_profiles: list[str],
        role: str = "publisher",
    ) -> None:
        self.local = IceCredentials.generate()
        self.certificate = certificate
        self.srtp_profiles = list(srtp_profiles)
        self.role = role  # "publisher" | "subscriber"
        self.remote_ufrag: str | None = None
        self.remote_pwd: str | None = None
        self.remote_fingerprints: list[tuple[str, str]] = []
        self.dtls_server: bool | None = None
        self.dtls: DtlsEndpoint | None = None
        self.srtp: SrtpSession | None = None
        self.addr: Address | None = None
        self.nominated = False
        self.nominated_priority = 0
        #: the address a new latch replaced, for the media port to keep as an alternate
        self.displaced: Address | None = None
        #: other addresses that passed a check (bounded by the media port)
        self.alternates: list[Address] = []
        #: transaction ids of recent authenticated checks, oldest first (bounded)
        self.recent_checks: OrderedDict[bytes, None] = OrderedDict()
        #: the last authenticated check repeated a recent transaction id: a retransmission or
        #: a replay, answered but moving nothing (no latch, no alternate, no consent)
        self.check_replayed = False
        self.state = TransportState.NEW
        self.failure_reason: str | None = None
        #: set on every authenticated datagram; the consent check clears it
        self.rx_seen = False
        self.last_activity = 0.0
        self.created_at = 0.0
        self.connected_at: float | None = None
        #: data channels negotiated: DTLS application data (SCTP) is kept for the leg
        self.data_channels = False

    # -- negotiation ------------------------------------------------------------------
    def set_remote(
        self, ufrag: str, pwd: str, fingerprints: list[tuple[str, str]], dtls_server: bool
    ) -> None:
        """Credentials and DTLS role from the SDP exchange. Same values again are a no-op."""
        self.remote_ufrag = ufrag
        self.remote_pwd = pwd
        if self.dtls is None:
            self.remote_fingerprints = list(fingerprints)
            self.dtls_server = dtls_server

    @property
    def ready(self) -> bool:
        return self.state is TransportState.CONNECTED

    # -- ICE ----------------------------------------------------------------------------
    def handle_binding(
        self, request: BindingRequest, addr: Address, now: float
    ) -> tuple[bytes, bool, bool, list[bytes]]:
        """Answer a Binding request already routed to us by our ufrag.

        Returns (response, authenticated, address_changed, dtls_datagrams_to_send).
        Unauthenticated requests get a 401 and change nothing; an authenticated request whose
        transaction id was seen recently gets its success response and changes nothing either
        (:attr:`check_replayed` says so).
        """
        if not request.authenticate(self.local.pwd) or (
            self.remote_ufrag is not None and request.remote_ufrag != self.remote_ufrag
        ):
            return binding_error(request, 401, "Unauthorized"), False, False, []
        response = binding_success(request, addr, self.local.pwd)
        transaction_id = request.message.transaction_id
        recent = self.recent_checks
        self.check_replayed = transaction_id in recent
        if self.check_replayed:
            # RFC 8489 §6.3.4: a retransmission gets the same answer. Whoever copied a check
            # can resend it from anywhere, so it authenticates neither an address nor consent.
            return response, True, False, []
        recent[transaction_id] = None
        if len(recent) > RECENT_CHECKS:
            recent.popitem(last=False)
        changed = False
        priority = request.priority or 0
        if self.addr is None:
            changed = True
        elif request.use_candidate and addr != self.addr:
            # A client may nominate several pairs in a burst (Firefox does): keep the one it
            # ranks highest. The same or a higher priority from a new address is the same
            # candidate behind a rebinding NAT. Media from a displaced address moves the latch
            # back (the media port keeps it as an alternate).
            changed = not self.nominated or priority >= self.nominated_priority
        if changed:
            self.displaced = self.addr
            self.addr = addr
        if request.use_candidate and addr == self.addr:
            self.nominated = True
            self.nominated_priority = priority
        if addr == self.addr:
            # consent freshness (RFC 7675) is per address: a check from an address media is
            # not sent to says nothing about the one it is sent to
            self.rx_seen = True
            self.last_activity = now
        out: list[bytes] = []
        if self.state is TransportState.NEW and self.dtls_server is not None:
            out = self._start_dtls(now)
        return response, True, changed, out

    # -- DTLS ---------------------------------------------------------------------------
    def _start_dtls(self, now: float) -> list[bytes]:
        assert self.dtls_server is not None
        self.dtls = DtlsEndpoint(
            self.certificate,
            is_server=self.dtls_server,
            remote_fingerprints=self.remote_fingerprints,
            srtp_profiles=self.srtp_profiles,
        )
        self.dtls.accept_application_data = self.data_channels
        self.state = TransportState.CONNECTING
        return self.dtls.start(now)

    def maybe_start(self, now: float) -> list[bytes]:
        """Start DTLS when the role became known after the address was latched."""
        if (
            self.state is TransportState.NEW
            and self.addr is not None
            and self.dtls_server is not None
        ):
            return self._start_dtls(now)
        return []

    def handle_dtls(self, data: bytes, now: float) -> tuple[list[bytes], bool]:
        """Feed a DTLS datagram. Returns (datagrams to send, just_connected)."""
        dtls = self.dtls
        if dtls is None:
            # A client hello that overtook our knowledge of the role cannot happen: we learn the
            # role from SDP before any check. Without DTLS state the record is dropped.
            return [], False
        out = dtls.receive(data, now)
        return out, self._after_dtls()

    def handle_timeout(self, now: float) -> tuple[list[bytes], bool]:
        dtls = self.dtls
        if dtls is None or self.state is not TransportState.CONNECTING:
            return [], False
        deadline = dtls.next_timeout()
        if deadline is None or now < deadline:
            return [], False
        out = dtls.handle_timeout(now)
        return out, self._after_dtls()

    def _after_dtls(self) -> bool:
        dtls = self.dtls
        assert dtls is not None
        if dtls.state is DtlsState.CONNECTED and self.state is TransportState.CONNECTING:
            assert dtls.srtp_keys is not None
            self.srtp = SrtpSession(dtls.srtp_keys)
            self.state = TransportState.CONNECTED
            return True
        if dtls.state is DtlsState.FAILED and self.state is not TransportState.FAILED:
            self.state = TransportState.FAILED
            self.failure_reason = dtls.failure_reason or "DTLS handshake failed"
        elif dtls.state is DtlsState.CLOSED and self.state is not TransportState.CLOSED:
            self.state = TransportState.CLOSED
            self.failure_reason = "peer closed DTLS"
        return False

    def close(self) -> list[bytes]:
        """close_notify for the peer (when DTLS ran); the transport is unusable afterwards."""
        out: list[bytes] = []
        if self.dtls is not None and self.dtls.state is DtlsState.CONNECTED:
            out = self.dtls.close()
        self.state = TransportState.CLOSED
        self.srtp = None
        return out
