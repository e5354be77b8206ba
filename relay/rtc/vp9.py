"""VP9 payload descriptor (RFC 9628 §4.2): parsing, the tests an SVC layer selector makes, and
the per-subscriber rewriting that forwards spatial layers 0..S and temporal layers 0..T.

The descriptor opens every VP9 RTP payload::

        0 1 2 3 4 5 6 7
       +-+-+-+-+-+-+-+-+
       |I|P|L|F|B|E|V|Z| (REQUIRED)
       +-+-+-+-+-+-+-+-+
  I:   |M| PICTURE ID  | (RECOMMENDED)  M=1: a second octet follows, 15 bits in all
       +-+-+-+-+-+-+-+-+
  M:   | EXTENDED PID  | (RECOMMENDED)
       +-+-+-+-+-+-+-+-+
  L:   | TID |U| SID |D| (CONDITIONALLY RECOMMENDED)
       +-+-+-+-+-+-+-+-+
       |   TL0PICIDX   | (CONDITIONALLY REQUIRED: L=1 in non-flexible mode, F=0)
       +-+-+-+-+-+-+-+-+
  P,F: | P_DIFF      |N| (CONDITIONALLY REQUIRED: F=1 and P=1; up to 3, N: another follows)
       +-+-+-+-+-+-+-+-+
  V:   | SS            | (scalability structure, below)
       | ..            |
       +-+-+-+-+-+-+-+-+

I: PictureID present; P: inter-picture predicted; L: layer indices present; F: flexible mode;
B: start of a layer frame; E: end of a layer frame; V: SS present; Z: not used for inter-layer
prediction (the next spatial layer of the picture does not depend on this frame). TID: temporal
layer; U: switching up point; SID: spatial layer; D: inter-layer dependency (the frame depends
on the frame of spatial layer SID-1 of the same picture).

The scalability structure (§4.2.1)::

       +-+-+-+-+-+-+-+-+
  V:   | N_S |Y|G|-|-|-|                 N_S + 1 spatial layers
       +-+-+-+-+-+-+-+-+              -\
  Y:   |     WIDTH     | (16 bits)      . N_S + 1 times
       |     HEIGHT    | (16 bits)      .
       +-+-+-+-+-+-+-+-+              -/
  G:   |      N_G      |                 pictures in the picture group
       +-+-+-+-+-+-+-+-+              -\
  N_G: |  TID  |U| R |-|-|             . N_G times, R P_DIFFs each
       |    P_DIFF     | (8 bits)     -/
       +-+-+-+-+-+-+-+-+

Decisions:

* PictureID: continuous across a change of source (the publisher restarting its stream), by an
  offset set at the new source's first keyframe; the 7/15-bit rule of :mod:`relay.rtc.vp8`.
  Pictures dropped for their temporal layer are NOT closed up: in flexible mode the P_DIFFs of
  later pictures are PictureID differences (§4.2), and in non-flexible mode a receiver places
  a picture in the picture group described by the SS from its PictureID, so renumbering would
  break both. A receiver sees the gaps as pictures of upper temporal layers it does not need.
* TL0PICIDX (non-flexible mode): continuous across a change of source, like the PictureID;
  never dropped (TID 0 pictures are always forwarded).
* Spatial layers: going down takes effect at the next picture; going up only at a keyframe
  picture, whose upper layer frames are checked as they start: a frame with P=1, or with D=1
  whose lower layer frame was not forwarded, cannot be decoded and caps the picture (and the
  stream) below it. An upper-layer frame with P=0 outside a keyframe is not used to switch up:
  the end of the picture has already been marked at the lower layer by then.
* Temporal layers: going down takes effect at the next picture; going up at a keyframe, at a
  picture of layer current+1 with U=1 (how libwebrtc marks frames that reference only lower
  layers), or after a picture of a forwarded layer with U=1 (RFC 9628 §4.2: later pictures of
  higher layers do not reference pictures before it of a layer higher than its TID).
* Marker bit: the last packet of the highest forwarded spatial layer frame of a picture
  (E=1 and SID = the current spatial layer) gets the RTP marker bit (RFC 9628 §4.1: the marker
  is set on the last packet of a picture); :meth:`Vp9Rewriter.rewrite` returns it with the
  descriptor. The SS is forwarded unchanged (it still lists every spatial layer).
"""

from __future__ import annotations

from typing import NamedTuple

from relay.rtc.vp8 import PictureIdMap, Tl0PicIdxMap

__all__ = [
    "Vp9Descriptor",
    "Vp9Error",
    "Vp9GroupPicture",
    "Vp9Rewriter",
    "Vp9Scalability",
    "parse_vp9",
    "vp9_frame_start",
    "vp9_picture_end",
    "vp9_usable",
]

#: at most this many P_DIFFs per layer frame in flexible mode (RFC 9628 §4.2)
MAX_P_DIFFS = 3


class Vp9Error(ValueError):
    """A VP9 payload descriptor that is truncated or malformed."""


class Vp9GroupPicture(NamedTuple):
    """One picture of the SS picture group (RFC 9628 §4.2.1)."""

    #: TID of the picture
    tid: int
    #: U: switching up point
    switching_up: bool
    #: its references, as differences of PictureID (R of them, 0-3)
    p_diffs: tuple[int, ...]


class Vp9Scalability(NamedTuple):
    """The scalability structure, SS (RFC 9628 §4.2.1)."""

    #: N_S + 1: the number of spatial layers in the stream
    spatial_layers: int
    #: (width, height) of each spatial layer, lowest first; empty when Y is clear
    resolutions: tuple[tuple[int, int], ...]
    #: the picture group; None when G is clear (N_G = 0 gives an empty tuple)
    group: tuple[Vp9GroupPicture, ...] | None


class Vp9Descriptor(NamedTuple):
    """One packet's VP9 payload descriptor (RFC 9628 §4.2). Without layer indices (L clear)
    TID and SID read 0, U and D False."""

    #: descriptor length in bytes: the VP9 payload starts at ``offset + size``
    size: int
    #: PictureID (7 or 15 bits), when I is set
    picture_id: int | None
    #: M: the PictureID is 15 bits long
    long_picture_id: bool
    #: P: inter-picture predicted (the layer frame references an earlier picture)
    inter_predicted: bool
    #: L: layer indices present
    layer_indices: bool
    #: F: flexible mode (P_DIFFs instead of TL0PICIDX)
    flexible: bool
    #: B: the packet starts a layer frame
    begin: bool
    #: E: the packet ends a layer frame
    end: bool
    #: Z: not used for inter-layer prediction by the next spatial layer of the picture
    not_reference_upper: bool
    #: TID: temporal layer (0-7)
    tid: int
    #: U: switching up point
    switching_up: bool
    #: SID: spatial layer (0-7)
    sid: int
    #: D: depends on the frame of spatial layer SID-1 of the same picture
    inter_layer: bool
    #: TL0PICIDX, in non-flexible mode with layer indices
    tl0picidx: int | None
    #: flexible mode, P=1: the references, as differences of PictureID (1-3 of them)
    p_diffs: tuple[int, ...]
    #: the scalability structure, when V is set
    ss: Vp9Scalability | None
    #: the descriptor's octets after the layer indices (P_DIFFs, SS) as received
    rest: bytes

    @property
    def keyframe(self) -> bool:
        """First packet of a keyframe: B=1, P=0 and SID 0 (codecs.vp9_keyframe_start)."""
        return self.begin and not self.inter_predicted and self.sid == 0


def _payload_end(packet: bytes) -> int:
    """End of the payload: the packet's length less its RTP padding (P bit)."""
    if packet and packet[0] & 0x20:
        padding = packet[-1]
        if padding == 0 or padding > len(packet):
            raise Vp9Error(f"invalid RTP padding length {padding}")
        return len(packet) - padding
    return len(packet)


def _truncated(what: str, end: int, offset: int) -> Vp9Error:
    return Vp9Error(f"VP9 payload descriptor truncated: {what} missing ({end - offset} bytes)")


def _parse_ss(packet: bytes, i: int, end: int, offset: int) -> tuple[Vp9Scalability, int]:
    """The SS starting at ``packet[i]``, and the index after it."""
    if i >= end:
        raise _truncated("SS (V)", end, offset)
    head = packet[i]
    i += 1
    layers = (head >> 5) + 1
    resolutions: tuple[tuple[int, int], ...] = ()
    if head & 0x10:  # Y
        if i + 4 * layers > end:
            raise _truncated("SS resolutions (Y)", end, offset)
        resolutions = tuple(
            (
                (packet[j] << 8) | packet[j + 1],
                (packet[j + 2] << 8) | packet[j + 3],
            )
            for j in range(i, i + 4 * layers, 4)
        )
        i += 4 * layers
    group: tuple[Vp9GroupPicture, ...] | None = None
    if head & 0x08:  # G
        if i >= end:
            raise _truncated("SS N_G (G)", end, offset)
        count = packet[i]
        i += 1
        pictures = []
        for _ in range(count):
            if i >= end:
                raise _truncated("SS picture group entry", end, offset)
            entry = packet[i]
            refs = (entry >> 2) & 0x03  # R
            i += 1
            if i + refs > end:
                raise _truncated("SS picture group P_DIFF", end, offset)
            pictures.append(
                Vp9GroupPicture(entry >> 5, bool(entry & 0x10), tuple(packet[i : i + refs]))
            )
            i += refs
        group = tuple(pictures)
    return Vp9Scalability(layers, resolutions, group), i


def parse_vp9(packet: bytes, offset: int) -> Vp9Descriptor:
    """The VP9 payload descriptor of an RTP packet whose payload starts at ``offset``.

    RTP padding (P bit) is not payload. Raises :class:`Vp9Error` when the payload ends before
    the descriptor does, or when a layer frame lists more than :data:`MAX_P_DIFFS` P_DIFFs (N
    set on the third). The payload after the descriptor may be empty.
    """
    end = _payload_end(packet)
    if offset < 0 or offset >= end:
        raise _truncated("required octet", end, offset)
    first = packet[offset]
    i = offset + 1
    picture_id: int | None = None
    long_picture_id = False
    if first & 0x80:  # I
        if i >= end:
            raise _truncated("PictureID (I)", end, offset)
        high = packet[i]
        if high & 0x80:  # M
            if i + 1 >= end:
                raise _truncated("extended PictureID (M)", end, offset)
            picture_id = ((high & 0x7F) << 8) | packet[i + 1]
            long_picture_id = True
            i += 2
        else:
            picture_id = high
            i += 1
    flexible = bool(first & 0x10)
    tid = sid = 0
    switching_up = inter_layer = False
    tl0picidx: int | None = None
    if first & 0x20:  # L
        if i >= end:
            raise _truncated("layer indices (L)", end, offset)
        layer = packet[i]
        i += 1
        tid = layer >> 5
        switching_up = bool(layer & 0x10)
        sid = (layer >> 1) & 0x07
        inter_layer = bool(layer & 0x01)
        if not flexible:
            if i >= end:
                raise _truncated("TL0PICIDX (L, F=0)", end, offset)
            tl0picidx = packet[i]
            i += 1
    rest_start = i
    p_diffs: tuple[int, ...] = ()
    if flexible and first & 0x40:  # F and P
        diffs = []
        while True:
            if i >= end:
                raise _truncated("P_DIFF (F, P)", end, offset)
            octet = packet[i]
            i += 1
            diffs.append(octet >> 1)
            if not octet & 0x01:  # N
                break
            if len(diffs) == MAX_P_DIFFS:
                raise Vp9Error(f"VP9 payload descriptor: more than {MAX_P_DIFFS} P_DIFFs")
        p_diffs = tuple(diffs)
    ss: Vp9Scalability | None = None
    if first & 0x02:  # V
        ss, i = _parse_ss(packet, i, end, offset)
    return Vp9Descriptor(
        i - offset,
        picture_id,
        long_picture_id,
        bool(first & 0x40),
        bool(first & 0x20),
        flexible,
        bool(first & 0x08),
        bool(first & 0x04),
        bool(first & 0x01),
        tid,
        switching_up,
        sid,
        inter_layer,
        tl0picidx,
        p_diffs,
        ss,
        packet[rest_start:i],
    )


# -- what an SVC layer selector asks ------------------------------------------------------


def vp9_frame_start(desc: Vp9Descriptor, spatial: int) -> bool:
    """The packet starts a frame of spatial layer ``spatial`` (B=1 and SID = ``spatial``)."""
    return desc.begin and desc.sid == spatial


def vp9_picture_end(desc: Vp9Descriptor, marker: bool, spatial: int) -> bool:
    """The packet ends the picture (superframe) for a subscriber of spatial layers
    0..``spatial``: the end (E=1) of its layer ``spatial`` frame, or of a lower one that the
    publisher marked as the last of the picture (RTP marker: the picture has no higher layer)."""
    return desc.sid <= spatial and (marker or (desc.end and desc.sid == spatial))


def vp9_usable(desc: Vp9Descriptor, spatial: int, temporal: int) -> bool:
    """Whether a subscriber of spatial layers 0..``spatial`` and temporal layers 0..``temporal``
    can use the packet: SID <= ``spatial`` and TID <= ``temporal``.

    Nothing more is needed once the subscriber is on those layers: a D=1 frame depends on the
    lower spatial layer of its picture, which is forwarded too, and a frame references only
    pictures of its own or lower temporal layers. The U bit and P/D of upper layers matter
    only to switch up, which :class:`Vp9Rewriter` does."""
    return desc.sid <= spatial and desc.tid <= temporal


class Vp9Rewriter:
    """The VP9 descriptors of one subscriber stream: spatial layers 0..S and temporal layers
    0..T of an SVC stream, continuous PictureID and TL0PICIDX across source changes, and the
    RTP marker bit on the last forwarded layer of each picture.

    Per packet, :meth:`rewrite` returns the descriptor bytes to put in front of the rest of the
    payload (``packet[offset + desc.size:]``) and the marker bit the packet must carry, or None
    for a packet not to forward.
    """

    __slots__ = (
        "starting",
        "target_sid",
        "target_tid",
        "current_sid",
        "current_tid",
        "pictures",
        "tl0",
        "_newest",
        "_layers",
        "_checked_above",
        "_up_next",
    )

    def __init__(
        self,
        *,
        spatial: int = 7,
        temporal: int = 7,
        picture_id: int | None = None,
        tl0picidx: int | None = None,
        long_picture_id: bool = False,
    ) -> None:
        """``spatial``/``temporal``: the highest layers to forward (7: all).
        ``picture_id``/``tl0picidx``: the output values of the very first picture (random
        when None). ``long_picture_id``: write 15-bit PictureIDs from the start."""
        #: the next packet starts a new source (set at creation and by :meth:`switch_source`);
        #: only the first packet of a keyframe does
        self.starting = True
        #: the layers the subscriber wants
        self.target_sid = spatial
        self.target_tid = temporal
        #: the layers forwarded now: below the targets until a switching point
        self.current_sid = spatial
        self.current_tid = temporal
        self.pictures = PictureIdMap(picture_id, long_picture_id)
        self.tl0 = Tl0PicIdxMap(tl0picidx)
        self._newest = 0  # unwrapped input id of the newest picture
        self._layers = 0  # bit s: the newest picture's spatial layer s frame was forwarded
        self._checked_above = 7  # newest picture: frames above this layer must be switchable
        self._up_next = False  # raise the temporal layer to the target at the next picture

    def switch_source(self) -> None:
        """The next keyframe starts a new source (the publisher restarted its stream);
        packets before it are dropped."""
        self.starting = True

    def continue_from(self, desc: Vp9Descriptor) -> None:
        """Take over, at the first packet of a picture (``desc``: B=1, SID 0), a stream that
        was forwarded unchanged until now: its PictureID and TL0PICIDX go on as they were
        (output = input), and every layer counts as forwarded so far, so going down to the
        targets happens at this picture without a keyframe. Then :meth:`rewrite` this packet
        and the next ones as usual."""
        self.starting = False
        self.current_sid = self.current_tid = 7
        self.pictures = PictureIdMap(desc.picture_id, self.pictures.long or desc.long_picture_id)
        self.tl0 = Tl0PicIdxMap(desc.tl0picidx)
        self._newest = 0
        self._layers = 0
        self._checked_above = 7
        self._up_next = False

    def forward(self, spatial: int, temporal: int) -> None:
        """Forward spatial layers 0..``spatial`` and temporal layers 0..``temporal`` from now
        on (going down at the next picture, going up at the next switching point)."""
        self.target_sid = spatial
        self.target_tid = temporal

    @property
    def picture_id(self) -> int:
        """The output PictureID of the newest forwarded picture (15 bits)."""
        return self.pictures.last

    @property
    def tl0picidx(self) -> int:
        """The output TL0PICIDX of the newest forwarded picture."""
        return self.tl0.last

    def _new_picture(self, desc: Vp9Descriptor) -> None:
        """Apply a change of target at the start of a picture (its first packet seen)."""
        self._layers = 0
        self._checked_above = 7
        target_sid, target_tid = self.target_sid, self.target_tid
        if target_sid < self.current_sid:
            self.current_sid = target_sid
        if target_tid < self.current_tid:
            self.current_tid = target_tid
        if desc.keyframe:
            if target_sid > self.current_sid:
                self._checked_above = self.current_sid
                self.current_sid = target_sid
            self.current_tid = target_tid
            self._up_next = False
        elif target_tid > self.current_tid:
            if self._up_next:
                self.current_tid = target_tid
            elif desc.switching_up and desc.tid == self.current_tid + 1:
                self.current_tid = desc.tid
        self._up_next = (
            desc.switching_up and desc.tid <= self.current_tid < target_tid and not desc.keyframe
        )

    def _start(self, desc: Vp9Descriptor) -> None:
        self.starting = False
        self.current_sid = 0  # upper layers of the keyframe picture get checked
        self.current_tid = self.target_tid
        if desc.picture_id is not None:
            self.pictures.start(desc.picture_id, desc.long_picture_id)
            self._newest = desc.picture_id
        else:  # numbered from the first packet of the new source that has one
            self.pictures.stop()
        self.tl0.start(desc.tl0picidx)
        self._new_picture(desc)

    def rewrite(
        self, desc: Vp9Descriptor, marker: bool, new_source: bool = False
    ) -> tuple[bytes, bool] | None:
        """``(descriptor bytes, RTP marker bit)`` of this packet for the subscriber, or None to
        drop it.

        ``marker``: the packet's own marker bit. ``new_source``: the caller switches to the
        source of this packet here (as :meth:`switch_source`); the switch happens at this
        packet if it is the first of a keyframe, else at the next one that is (None until
        then). Also None: a packet from before the current source's first picture, or of a
        layer not forwarded.
        """
        if new_source:
            self.starting = True
        started_now = False
        if self.starting:
            if not desc.keyframe:
                return None
            self._start(desc)
            started_now = True
        pictures = self.pictures
        ext: int | None = None
        pid = desc.picture_id
        if pid is not None:
            if not pictures.started:
                pictures.start(pid, desc.long_picture_id)
                self._newest = pid
                self._new_picture(desc)
                ext = pid
            else:
                unwrapped = pictures.unwrap(pid, desc.long_picture_id)
                if unwrapped is None:
                    return None
                ext = unwrapped
                if ext > self._newest:
                    self._newest = ext
                    self._new_picture(desc)
                elif ext < self._newest:
                    # a late packet of an earlier picture: the layers as they are now
                    if desc.sid > self.current_sid or desc.tid > self.current_tid:
                        return None
                    return self._pack(desc, pictures.output(ext), marker)
        elif desc.begin and desc.sid == 0 and not started_now:
            self._new_picture(desc)
        sid = desc.sid
        if desc.tid > self.current_tid or sid > self.current_sid:
            return None
        if sid > self._checked_above and desc.begin:
            # switching up at this picture: the frame must not need what was not forwarded
            if desc.inter_predicted or (desc.inter_layer and not self._layers >> (sid - 1) & 1):
                self.current_sid = sid - 1
                return None
        if desc.begin:
            self._layers |= 1 << sid
        elif sid > 0 and not self._layers >> sid & 1 and sid > self._checked_above:
            return None  # the rest of an upper frame whose start was not forwarded
        # the output PictureID only for a forwarded picture: the next source continues from it
        return self._pack(desc, None if ext is None else pictures.output(ext), marker)

    def _pack(self, desc: Vp9Descriptor, out_id: int | None, marker: bool) -> tuple[bytes, bool]:
        first = (
            (0x40 if desc.inter_predicted else 0)
            | (0x20 if desc.layer_indices else 0)
            | (0x10 if desc.flexible else 0)
            | (0x08 if desc.begin else 0)
            | (0x04 if desc.end else 0)
            | (0x02 if desc.ss is not None else 0)
            | (0x01 if desc.not_reference_upper else 0)
        )
        out = bytearray()
        if out_id is not None:
            if self.pictures.long:
                out += bytes((first | 0x80, 0x80 | (out_id >> 8), out_id & 0xFF))
            else:
                out += bytes((first | 0x80, out_id & 0x7F))
        else:
            out.append(first)
        if desc.layer_indices:
            out.append(
                (desc.tid << 5) | (desc.switching_up << 4) | (desc.sid << 1) | desc.inter_layer
            )
            tl0 = desc.tl0picidx
            if tl0 is not None:
                out.append(self.tl0.output(tl0))
        out += desc.rest
        end_marker = marker or (desc.end and desc.sid == self.current_sid)
        return bytes(out), end_marker
