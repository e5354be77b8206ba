"""Sans-I/O DTLS 1.2 endpoint for DTLS-SRTP (RFC 5764, RFC 8842) on pyOpenSSL memory BIOs.

The endpoint takes received datagrams and the current time, and returns datagrams to send.
It never touches a socket, an event loop or the wall clock for its own decisions; see
``DtlsEndpoint.handle_timeout`` for the one place where OpenSSL's internal clock is involved.
"""

from __future__ import annotations

import datetime
import enum
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL.crypto import X509

__all__ = [
    "Certificate",
    "DtlsEndpoint",
    "DtlsError",
    "DtlsState",
    "SrtpKeys",
]


class DtlsError(Exception):
    """Invalid DTLS configuration (bad argument, OpenSSL refused the setup)."""


# SRTP protection profiles: our name -> (OpenSSL name, master key length, master salt length).
_SRTP_PROFILES: dict[str, tuple[bytes, int, int]] = {
    "AEAD_AES_128_GCM": (b"SRTP_AEAD_AES_128_GCM", 16, 12),
    "AES_CM_128_HMAC_SHA1_80": (b"SRTP_AES128_CM_SHA1_80", 16, 14),
}
_OPENSSL_PROFILE_NAMES = {v[0]: k for k, v in _SRTP_PROFILES.items()}

# Fingerprint hash functions (RFC 8122), strongest first.
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha-512": hashes.SHA512,
    "sha-384": hashes.SHA384,
    "sha-256": hashes.SHA256,
    "sha-224": hashes.SHA224,
    "sha-1": hashes.SHA1,
}

# Forward-secret AEAD suites first, for both ECDSA and RSA certificates: a server only picks a
# suite matching its own key type, so the list has to allow both for the peer's sake.
_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
        b"ECDHE-ECDSA-AES128-SHA",
        b"ECDHE-RSA-AES128-SHA",
        b"ECDHE-ECDSA-AES256-SHA",
        b"ECDHE-RSA-AES256-SHA",
    ]
)

_DTLS1_2_VERSION = 0xFEFD  # not exported by pyOpenSSL
_RECORD_HEADER_LEN = 13  # type(1) version(2) epoch(2) sequence_number(6) length(2)
_MIN_MTU = 256  # below this OpenSSL refuses the MTU (and no handshake would fit anyway)
_EXPORTER_LABEL = b"EXTRACTOR-dtls_srtp"

DEFAULT_SRTP_PROFILES = ["AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80"]
#: Total time allowed for a handshake, counted from ``start()`` (client) or from the first
#: received datagram (server). OpenSSL doubles its retransmission timer from 1 s, so 30 s
#: covers retransmissions at about 1, 3, 7, 15 and 31 s.
DEFAULT_HANDSHAKE_TIMEOUT = 30.0


def _fingerprint(cert: x509.Certificate, algorithm: str) -> str:
    return cert.fingerprint(_HASHES[algorithm]()).hex(":").upper()


def _normalize_fingerprint(value: str) -> str:
    return "".join(value.split()).replace(":", "").upper()


class Certificate:
    """A certificate and its private key for DTLS, with its SDP fingerprint (SHA-256)."""

    algorithm: str = "sha-256"

    def __init__(
        self,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    ) -> None:
        self.certificate = certificate
        self.private_key = private_key
        self.fingerprint: str = _fingerprint(certificate, self.algorithm)
        self._contexts: dict[tuple[str, ...], SSL.Context] = {}

    @classmethod
    def generate(cls, kind: str = "ecdsa") -> Certificate:
        """Generate a self-signed certificate: ``"ecdsa"`` (P-256) or ``"rsa"`` (RSA 2048)."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if kind == "ecdsa":
            key = ec.generate_private_key(ec.SECP256R1())
        elif kind == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise DtlsError(f"unknown certificate kind {kind!r} (expected 'ecdsa' or 'rsa')")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secrets.token_hex(8))])
        # Validity only; the peer checks the fingerprint, not the dates.
        today = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(today - datetime.timedelta(days=30))
            .not_valid_after(today + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def fingerprints(self) -> list[tuple[str, str]]:
        """``[(algorithm, fingerprint)]`` as advertised in SDP ``a=fingerprint``."""
        return [(self.algorithm, self.fingerprint)]

    def context(self, srtp_profiles: tuple[str, ...]) -> SSL.Context:
        """An OpenSSL DTLS context with this certificate, shared by endpoints using it."""
        ctx = self._contexts.get(srtp_profiles)
        if ctx is None:
            ctx = self._contexts[srtp_profiles] = self._make_context(srtp_profiles)
        return ctx

    def _make_context(self, srtp_profiles: tuple[str, ...]) -> SSL.Context:
        try:
            ctx = SSL.Context(SSL.DTLS_METHOD)
            # DTLS 1.2 only, as sent by browsers: the timer and close handling here assume
            # no post-handshake retransmission, which DTLS 1.3 would need.
            ctx.set_min_proto_version(_DTLS1_2_VERSION)
            ctx.set_max_proto_version(_DTLS1_2_VERSION)
            ctx.set_options(
                SSL.OP_NO_QUERY_MTU  # keep our MTU, a memory BIO cannot be asked for one
                | SSL.OP_NO_RENEGOTIATION
                | SSL.OP_NO_TICKET
                | SSL.OP_CIPHER_SERVER_PREFERENCE
            )
            # Self-signed certificates: the callback accepts any chain and checks the
            # fingerprint from SDP. A server must request the client's certificate.
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verify_callback)
            ctx.use_certificate(self.certificate)
            ctx.use_privatekey(self.private_key)
            ctx.check_privatekey()
            ctx.set_cipher_list(_CIPHERS)
            ctx.set_tlsext_use_srtp(b":".join(_SRTP_PROFILES[p][0] for p in srtp_profiles))
        except SSL.Error as exc:
            raise DtlsError(f"cannot set up DTLS context: {_describe(exc)}") from exc
        return ctx


def _verify_callback(conn: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
    ref = conn.get_app_data()
    endpoint = ref() if ref is not None else None
    if endpoint is None:
        return False
    try:
        return endpoint._verify_peer(cert, depth)
    except Exception as exc:  # never let an exception escape into OpenSSL
        endpoint._verify_error = f"peer certificate check failed: {exc!r}"
        return False


@dataclass(frozen=True)
class SrtpKeys:
    """SRTP master keys exported from a DTLS-SRTP handshake (master key + master salt each)."""

    profile: str
    local_key: bytes
    remote_key: bytes


class DtlsState(enum.Enum):
    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    FAILED = "failed"
    CLOSED = "closed"


def _describe(exc: Exception) -> str:
    """A readable one-line message from a pyOpenSSL error."""
    args = exc.args
    if args and isinstance(args[0], list) and args[0]:
        parts = []
        for item in args[0]:
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if args:
        return " ".join(str(a) for a in args)
    return type(exc).__name__


class DtlsEndpoint:
    """One side of a DTLS-SRTP association; bytes and times in, bytes out.

    Outgoing datagrams never split a DTLS record and never exceed ``mtu`` bytes (unless a
    single record does, which OpenSSL avoids by fragmenting handshake messages to the MTU).
    """

    def __init__(
        self,
        certificate: Certificate,
        is_server: bool,
        remote_fingerprints: list[tuple[str, str]],
        srtp_profiles: list[str] = DEFAULT_SRTP_PROFILES,
        mtu: int = 1200,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        profiles = tuple(srtp_profiles)
        if not profiles:
            raise DtlsError("no SRTP profile given")
        for p in profiles:
            if p not in _SRTP_PROFILES:
                raise DtlsError(f"unsupported SRTP profile {p!r}")
        if len(set(profiles)) != len(profiles):
            raise DtlsError("duplicate SRTP profile")
        if mtu < _MIN_MTU:
            raise DtlsError(f"mtu {mtu} is below {_MIN_MTU}")

        self.certificate = certificate
        self.is_server = is_server
        self.remote_fingerprints = list(remote_fingerprints)
        self.srtp_profiles = profiles
        self.mtu = mtu
        self.handshake_timeout = handshake_timeout

        self.state = DtlsState.NEW
        self.failure_reason: str | None = None
        self.srtp_keys: SrtpKeys | None = None

        #: SCTP over DTLS (RFC 8261): with this set, application data records received after
        #: the handshake are kept in ``application_data`` (else read and dropped)
        self.accept_application_data = False
        self.application_data: list[bytes] = []

        self._verify_error: str | None = None
        self._deadline: float | None = None  # handshake deadline, `now` clock
        self._retransmit_at: float | None = None  # OpenSSL timer translated to `now` clock

        conn = SSL.Connection(certificate.context(profiles), None)
        # A weak reference keeps the endpoint collectable without a reference cycle.
        conn.set_app_data(weakref.ref(self))
        conn.set_ciphertext_mtu(mtu)
        if is_server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
        self._conn = conn

    # ------------------------------------------------------------------ public API

    def start(self, now: float) -> list[bytes]:
        """Begin the handshake. A client returns its ClientHello, a server returns ``[]``."""
        if self.state is not DtlsState.NEW:
            return []
        self.state = DtlsState.CONNECTING
        if self.is_server:
            return []  # the server's deadline starts with the first ClientHello
        self._deadline = now + self.handshake_timeout
        self._guarded(self._advance_handshake)
        return self._flush(now)

    def receive(self, data: bytes, now: float) -> list[bytes]:
        """Feed one received DTLS datagram; return the datagrams to send. Never raises."""
        # RFC 7983: DTLS records start with 20..63; anything shorter than a header is noise.
        if len(data) < _RECORD_HEADER_LEN or not 20 <= data[0] <= 63:
            return []
        state = self.state
        if state is DtlsState.NEW:
            if not self.is_server:
                return []
            self.state = state = DtlsState.CONNECTING  # implicit start() for a server
        if state is not DtlsState.CONNECTING and state is not DtlsState.CONNECTED:
            return []
        if state is DtlsState.CONNECTING and self._deadline is None:
            self._deadline = now + self.handshake_timeout
        try:
            self._conn.bio_write(bytes(data))
        except Exception as exc:
            self._fail(f"cannot buffer datagram: {_describe(exc)}")
            return []
        if state is DtlsState.CONNECTING:
            self._guarded(self._advance_handshake)
        if self.state is DtlsState.CONNECTED:
            self._guarded(self._read_records)
        return self._flush(now)

    def next_timeout(self) -> float | None:
        """Absolute time (``now`` clock) at which ``handle_timeout`` is due, or None."""
        if self.state is not DtlsState.CONNECTING:
            return None
        retransmit, deadline = self._retransmit_at, self._deadline
        if retransmit is None:
            return deadline
        if deadline is None:
            return retransmit
        return min(retransmit, deadline)

    def handle_timeout(self, now: float) -> list[bytes]:
        """Retransmit the last flight if its timer expired; fail once the deadline passed.

        OpenSSL keeps its own retransmission timer (1 s, doubled on each expiry) on its
        internal real-time clock, which pyOpenSSL gives no way to replace, and retransmits
        only when *that* timer has expired (less than 15 ms left counts as expired).
        ``next_timeout`` is OpenSSL's remaining time added to the ``now`` of the last call,
        so with ``now`` from a monotonic clock (``loop.time()``) both agree. If OpenSSL's
        clock is behind ours, nothing is sent and the timer is re-armed for the time OpenSSL
        says is left, so a test with a fake ``now`` must also let ~1 s of real time pass to
        see a retransmission. OpenSSL also checks its timer whenever it reads, so a
        retransmission can come out of ``receive`` too. The handshake deadline depends on
        ``now`` only and is fully deterministic.
        """
        if self.state is not DtlsState.CONNECTING:
            return []
        if self._deadline is not None and now >= self._deadline:
            self._fail(f"DTLS handshake timed out after {self.handshake_timeout:g} s")
            return []
        if self._retransmit_at is None or now < self._retransmit_at:
            return []
        self._guarded(self._conn.DTLSv1_handle_timeout)
        return self._flush(now)

    def close(self) -> list[bytes]:
        """Send close_notify (if connected) and move to CLOSED. A FAILED endpoint stays FAILED."""
        state = self.state
        if state is DtlsState.FAILED or state is DtlsState.CLOSED:
            return []
        self.state = DtlsState.CLOSED
        self._retransmit_at = None
        if state is not DtlsState.CONNECTED:
            return []  # OpenSSL cannot send close_notify in the middle of a handshake
        self._shutdown()
        return self._drain()

    # ------------------------------------------------------------------ internals

    def _guarded(self, operation: Callable[[], object]) -> None:
        """Run one OpenSSL operation, turning every exception into a state change."""
        try:
            operation()
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._on_close_notify()
        except SSL.Error as exc:
            if self._verify_error is not None:
                self._fail(self._verify_error)
            else:
                description = _describe(exc)
                if "alert" in description:  # OpenSSL's wording for an alert we received
                    description += " (sent by the peer)"
                what = "handshake" if self.state is DtlsState.CONNECTING else "connection"
                self._fail(f"DTLS {what} failed: {description}")
        except Exception as exc:
            self._fail(f"DTLS internal error: {exc!r}")

    def _advance_handshake(self) -> None:
        self._conn.do_handshake()  # raises WantReadError until the handshake is done
        self._on_handshake_complete()

    def _on_handshake_complete(self) -> None:
        conn = self._conn
        # The verify callback already rejected a wrong certificate during the handshake;
        # check again here so that no path can yield keys for an unverified peer.
        cert = conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            self._fail("peer sent no certificate", notify=True)
            return
        error = self._check_fingerprint(cert)
        if error is not None:
            self._fail(error, notify=True)
            return
        selected = conn.get_selected_srtp_profile()
        profile = _OPENSSL_PROFILE_NAMES.get(selected)
        if profile is None:
            self._fail(
                "no common SRTP profile (offered "
                + ", ".join(self.srtp_profiles)
                + (f"; got {selected.decode(errors='replace')})" if selected else ")"),
                notify=True,
            )
            return
        _, key_len, salt_len = _SRTP_PROFILES[profile]
        material = conn.export_keying_material(_EXPORTER_LABEL, 2 * (key_len + salt_len))
        # RFC 5764 4.2: client_key | server_key | client_salt | server_salt
        client_key = material[:key_len]
        server_key = material[key_len : 2 * key_len]
        client_salt = material[2 * key_len : 2 * key_len + salt_len]
        server_salt = material[2 * key_len + salt_len :]
        client, server = client_key + client_salt, server_key + server_salt
        if self.is_server:
            self.srtp_keys = SrtpKeys(profile, local_key=server, remote_key=client)
        else:
            self.srtp_keys = SrtpKeys(profile, local_key=client, remote_key=server)
        self.state = DtlsState.CONNECTED
        self._retransmit_at = None

    def _read_records(self) -> None:
        """Process records after the handshake (close_notify, retransmitted Finished)."""
        recv = self._conn.recv
        for _ in range(64):  # application data is kept only for data channels
            record = recv(65536)
            if self.accept_application_data and len(self.application_data) < 64:
                self.application_data.append(record)

    def send_application_data(self, data: bytes) -> list[bytes]:
        """One application data record (an SCTP packet); the datagrams to send. Nothing
        before the handshake is done or after the connection ended."""
        if self.state is not DtlsState.CONNECTED:
            return []
        try:
            self._conn.send(data)
        except Exception:
            return []
        return self._drain()

    def _verify_peer(self, cert: X509, depth: int) -> bool:
        if depth != 0:
            return True  # only the leaf certificate is bound to the SDP fingerprint
        error = self._check_fingerprint(cert.to_cryptography())
        if error is not None:
            self._verify_error = error
            return False
        return True

    def _check_fingerprint(self, cert: x509.Certificate) -> str | None:
        """RFC 8122 §5: use the strongest offered hash; the certificate must match one."""
        offered: dict[str, list[str]] = {}
        for algorithm, value in self.remote_fingerprints:
            offered.setdefault(algorithm.strip().lower(), []).append(_normalize_fingerprint(value))
        for algorithm in _HASHES:
            if algorithm in offered:
                actual = _fingerprint(cert, algorithm)
                if _normalize_fingerprint(actual) in offered[algorithm]:
                    return None
                # the certificate's own fingerprint is not named: a client that keeps its
                # certificate would be recognisable by it in the logs
                return f"remote certificate fingerprint mismatch ({algorithm})"
        return "no supported remote fingerprint to verify the peer certificate against"

    def _on_close_notify(self) -> None:
        self.state = DtlsState.CLOSED
        self._retransmit_at = None
        self._shutdown()  # answer with our own close_notify (RFC 5246 7.2.1)

    def _shutdown(self) -> None:
        try:
            self._conn.shutdown()
        except Exception:
            pass

    def _fail(self, reason: str, notify: bool = False) -> None:
        """Move to FAILED; ``notify`` (handshake completed) also sends close_notify."""
        if self.state is DtlsState.FAILED:
            return
        self.state = DtlsState.FAILED
        self.failure_reason = reason
        self.srtp_keys = None
        self._retransmit_at = None
        if notify:
            self._shutdown()  # so that the peer does not wait for a dead association

    def _flush(self, now: float) -> list[bytes]:
        """Collect output and re-arm the retransmission timer from OpenSSL's."""
        out = self._drain()
        if self.state is DtlsState.CONNECTING:
            try:
                remaining = self._conn.DTLSv1_get_timeout()
            except Exception:
                remaining = None
            self._retransmit_at = None if remaining is None else now + remaining
        else:
            self._retransmit_at = None
        return out

    def _drain(self) -> list[bytes]:
        """Read everything OpenSSL wrote and pack whole records into datagrams <= MTU."""
        chunks = []
        read = self._conn.bio_read
        while True:
            try:
                chunks.append(read(65536))
            except SSL.WantReadError:
                break
            except Exception:
                break
        if not chunks:
            return []
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) <= self.mtu:
            return [data]
        datagrams: list[bytes] = []
        mtu = self.mtu
        size = len(data)
        start = pos = 0
        while pos < size:
            end = pos + _RECORD_HEADER_LEN
            if end <= size:
                end += int.from_bytes(data[end - 2 : end], "big")
            end = min(end, size)
            if end - start > mtu and pos > start:
                datagrams.append(data[start:pos])
                start = pos
            pos = end
        datagrams.append(data[start:])
        return datagrams
