"""VP8 payload descriptor (RFC 7741 §4.2): parsing, and the per-subscriber rewriting that makes
switches between simulcast layers and dropped temporal layers invisible to the decoder.

The descriptor opens every VP8 RTP payload::

         0 1 2 3 4 5 6 7
        +-+-+-+-+-+-+-+-+
        |X|R|N|S|R| PID | (REQUIRED)
        +-+-+-+-+-+-+-+-+
   X:   |I|L|T|K| RSV   | (OPTIONAL)
        +-+-+-+-+-+-+-+-+
   I:   |M| PictureID   | (OPTIONAL)   M=1: a second octet follows, 15 bits in all
        +-+-+-+-+-+-+-+-+
   L:   |   TL0PICIDX   | (OPTIONAL)
        +-+-+-+-+-+-+-+-+
   T/K: |TID|Y| KEYIDX  | (OPTIONAL)   present when T or K is set
        +-+-+-+-+-+-+-+-+

followed, in the packet that starts partition 0 of a frame (S=1, PID=0), by the VP8 payload
header whose lowest bit P is 0 for a keyframe (§4.3).

Each simulcast layer is its own encoding with its own PictureID and TL0PICIDX sequences; a
subscriber sees one stream. :class:`Vp8Rewriter` (one per subscriber stream) renumbers both so
the subscriber's decoder sees each continue by one across a switch of layer, and drops the
temporal layers above a target. Sans-I/O: descriptors in, descriptor bytes out.

Decisions (the reasons are in the docstrings below):

* A layer switch happens only at the first packet of a keyframe of the new layer; until one
  arrives, the new layer's packets are dropped (RFC 7741 §4.2: a keyframe has TID 0 and resets
  every reference, so nothing before it is needed).
* Dropped temporal-layer pictures do not use up output PictureIDs: the output numbering has a
  gap only where the publisher's stream had one (a real loss). RFC 7741 §4.2 lets a receiver
  read a PictureID gap as a lost picture, and libwebrtc's VP8 frame-reference finder does:
  it holds back a non-sync frame of TID > 0 until every PictureID between it and the frame it
  references has been received, so gaps from dropping would stall the forwarded upper layers.
* TL0PICIDX needs no gap closing when temporal layers are dropped (TID 0 pictures are never
  dropped); across a layer switch the new layer's first keyframe gets the previous output
  TL0PICIDX + 1 (§4.2: "incremented ... for each base layer frame").
* The PictureID is written in 15 bits once any input packet carried 15 bits (or from the start
  with ``long_picture_id=True``), else in 7. A packet whose input has 7 bits then grows by one
  byte (M set, the second octet inserted): RFC 7741 §4.2 says the receiver MUST NOT assume the
  size of the PictureID stays the same during the session. The output keeps counting in 15 bits
  underneath, so the first 15-bit value continues the 7-bit ones in its low 7 bits.
"""

from __future__ import annotations

import random
from collections import deque
from typing import NamedTuple

__all__ = [
    "PictureIdMap",
    "Vp8Descriptor",
    "Vp8Error",
    "Vp8Rewriter",
    "pack_vp8",
    "parse_vp8",
]

#: pictures older than this many PictureIDs behind the newest of the current source are stale
PICTURE_WINDOW = 1024


class Vp8Error(ValueError):
    """A VP8 payload descriptor that is truncated or malformed."""


class Vp8Descriptor(NamedTuple):
    """One packet's VP8 payload descriptor (RFC 7741 §4.2). Absent optional fields are None."""

    #: descriptor length in bytes: the VP8 payload (header) starts at ``offset + size``
    size: int
    #: X: the extension octet (I, L, T, K) is present
    extended: bool
    #: N: the frame is not used as a reference by any other frame (may be discarded)
    non_reference: bool
    #: S: the packet starts a VP8 partition
    start: bool
    #: PID: the partition index (0-7)
    partition: int
    #: PictureID (7 or 15 bits), when I is set
    picture_id: int | None
    #: M: the PictureID is 15 bits long
    long_picture_id: bool
    #: TL0PICIDX (8 bits), when L is set
    tl0picidx: int | None
    #: TID, the temporal layer (0-3), when T is set
    tid: int | None
    #: Y: the frame depends only on the base-layer (TID 0) frame with the same TL0PICIDX, so
    #: layer ``tid`` can be switched up to here (False when T is clear)
    layer_sync: bool
    #: KEYIDX (5 bits), when K is set
    keyidx: int | None
    #: first packet of a keyframe: S=1, PID=0 and the payload header's P bit clear (§4.3)
    keyframe: bool

    @property
    def frame_start(self) -> bool:
        """The packet starts a frame (S=1 and partition index 0)."""
        return self.start and self.partition == 0


def _payload_end(packet: bytes) -> int:
    """End of the payload: the packet's length less its RTP padding (P bit)."""
    if packet and packet[0] & 0x20:
        padding = packet[-1]
        if padding == 0 or padding > len(packet):
            raise Vp8Error(f"invalid RTP padding length {padding}")
        return len(packet) - padding
    return len(packet)


def _truncated(what: str, end: int, offset: int) -> Vp8Error:
    return Vp8Error(f"VP8 payload descriptor truncated: {what} missing ({end - offset} bytes)")


def parse_vp8(packet: bytes, offset: int) -> Vp8Descriptor:
    """The VP8 payload descriptor of an RTP packet whose payload starts at ``offset``.

    RTP padding (P bit) is not payload. Raises :class:`Vp8Error` when the payload ends before
    the descriptor does, or before the payload header's first octet in a packet that starts a
    frame (S=1, PID=0: the P bit tells a keyframe). Reserved bits are ignored (§4.2: receivers
    MUST ignore them); an L bit without T is accepted (the TL0PICIDX is still read).
    """
    end = _payload_end(packet)
    if offset < 0 or offset >= end:
        raise _truncated("required octet", end, offset)
    first = packet[offset]
    i = offset + 1
    picture_id: int | None = None
    long_picture_id = False
    tl0picidx: int | None = None
    tid: int | None = None
    layer_sync = False
    keyidx: int | None = None
    if first & 0x80:  # X
        if i >= end:
            raise _truncated("extension octet (X)", end, offset)
        ext = packet[i]
        i += 1
        if ext & 0x80:  # I
            if i >= end:
                raise _truncated("PictureID (I)", end, offset)
            high = packet[i]
            if high & 0x80:  # M: 15 bits
                if i + 1 >= end:
                    raise _truncated("second PictureID octet (M)", end, offset)
                picture_id = ((high & 0x7F) << 8) | packet[i + 1]
                long_picture_id = True
                i += 2
            else:
                picture_id = high
                i += 1
        if ext & 0x40:  # L
            if i >= end:
                raise _truncated("TL0PICIDX (L)", end, offset)
            tl0picidx = packet[i]
            i += 1
        if ext & 0x30:  # T or K
            if i >= end:
                raise _truncated("TID/Y/KEYIDX octet (T/K)", end, offset)
            tk = packet[i]
            i += 1
            if ext & 0x20:  # T: TID and Y are meaningful
                tid = tk >> 6
                layer_sync = bool(tk & 0x20)
            if ext & 0x10:  # K: KEYIDX is meaningful
                keyidx = tk & 0x1F
    start = bool(first & 0x10)
    partition = first & 0x07
    keyframe = False
    if start and partition == 0:
        if i >= end:
            raise _truncated("payload header (S=1, PID=0)", end, offset)
        keyframe = not packet[i] & 0x01
    return Vp8Descriptor(
        i - offset,
        bool(first & 0x80),
        bool(first & 0x20),
        start,
        partition,
        picture_id,
        long_picture_id,
        tl0picidx,
        tid,
        layer_sync,
        keyidx,
        keyframe,
    )


def _pack(
    desc: Vp8Descriptor, picture_id: int | None, long_picture_id: bool, tl0picidx: int | None
) -> bytes:
    first = (desc.non_reference << 5) | (desc.start << 4) | desc.partition
    if not desc.extended:
        return bytes((first,))
    out = bytearray((first | 0x80, 0))
    ext = 0
    if picture_id is not None:
        ext |= 0x80
        if long_picture_id:
            out += bytes((0x80 | ((picture_id >> 8) & 0x7F), picture_id & 0xFF))
        else:
            out.append(picture_id & 0x7F)
    if tl0picidx is not None:
        ext |= 0x40
        out.append(tl0picidx & 0xFF)
    if desc.tid is not None or desc.keyidx is not None:
        tk = 0
        if desc.tid is not None:
            ext |= 0x20
            tk = (desc.tid << 6) | (desc.layer_sync << 5)
        if desc.keyidx is not None:
            ext |= 0x10
            tk |= desc.keyidx
        out.append(tk)
    out[1] = ext
    return bytes(out)


def pack_vp8(desc: Vp8Descriptor) -> bytes:
    """The descriptor's bytes (reserved bits zero; the TID/Y or KEYIDX part of the T/K octet
    zero when its flag is clear). Inverse of :func:`parse_vp8` for well-formed input."""
    return _pack(desc, desc.picture_id, desc.long_picture_id, desc.tl0picidx)


class Tl0PicIdxMap:
    """Input TL0PICIDX of successive sources -> one continuous 8-bit output numbering: the
    first value of a new source follows the newest output by one (RFC 7741 §4.2: incremented
    for each base-layer picture); within a source the output is the input plus an offset."""

    __slots__ = ("last", "_started", "_offset")

    def __init__(self, initial: int | None = None) -> None:
        """``initial``: the output value of the first picture (random when None)."""
        if initial is None:
            initial = random.getrandbits(8)
        #: output TL0PICIDX of the newest picture
        self.last = (initial - 1) & 0xFF
        self._started = False
        self._offset = 0

    def start(self, tl0picidx: int | None) -> None:
        """A new source begins at ``tl0picidx`` (None: at its first packet that has one)."""
        self._started = tl0picidx is not None
        if tl0picidx is not None:
            self._offset = (self.last + 1 - tl0picidx) & 0xFF

    def output(self, tl0picidx: int) -> int:
        """The output value of an input TL0PICIDX of the current source."""
        if not self._started:
            self.start(tl0picidx)
        out = (tl0picidx + self._offset) & 0xFF
        if 0 < ((out - self.last) & 0xFF) < 0x80:  # ahead of the newest
            self.last = out
        return out


class PictureIdMap:
    """Input PictureIDs of successive sources -> one continuous output numbering.

    Input values (7 or 15 bits, as the packet says) are unwrapped to integers against the
    newest of the current source; the output is the input plus an offset, less one for each
    picture recorded as dropped (:meth:`drop`) between it and the newest. Pictures are dropped
    in order (a drop is recorded only for the newest picture), so every packet of a forwarded
    picture gets the same output value however the packets of later pictures interleave.
    """

    __slots__ = ("long", "_started", "_in_start", "_in_max", "_offset", "_out_max", "_drops")

    def __init__(self, initial: int | None = None, long: bool = False) -> None:
        """``initial``: the output value of the first picture (random when None, as the
        PictureID "SHOULD start on a random number", RFC 7741 §4.2). ``long``: write 15 bits
        from the start."""
        if initial is None:
            initial = random.getrandbits(15)
        #: output values are 15 bits long (sticky: set by the first 15-bit input)
        self.long = long
        self._started = False
        self._in_start = 0  # unwrapped input id of the current source's first picture
        self._in_max = 0  # unwrapped input id of the current source's newest picture
        self._offset = 0  # output = input + offset + (drops newer than the input)
        self._out_max = initial - 1  # output (unbounded) of the newest forwarded picture
        self._drops: deque[int] = deque()  # unwrapped input ids of dropped pictures, ascending

    @property
    def last(self) -> int:
        """The output value (15 bits) of the newest forwarded picture."""
        return self._out_max & 0x7FFF

    def start(self, picture_id: int, long: bool) -> None:
        """A new source, whose picture ``picture_id`` takes the output value after the last."""
        self._started = True
        self.long |= long
        self._in_start = self._in_max = picture_id
        self._offset = self._out_max + 1 - picture_id
        self._drops.clear()

    def stop(self) -> None:
        """The current source has ended (the next one may carry no PictureID at first): the
        next :meth:`start` continues the output numbering."""
        self._started = False
        self._drops.clear()

    @property
    def started(self) -> bool:
        """A source is under way (:meth:`start` called since creation or :meth:`stop`)."""
        return self._started

    def unwrap(self, picture_id: int, long: bool) -> int | None:
        """The unwrapped input id of a picture of the current source (the newest so far when it
        is ahead of it); None when it is older than the source's first picture or than
        :data:`PICTURE_WINDOW` pictures."""
        self.long |= long
        modulus = 0x8000 if long else 0x80
        delta = (picture_id - self._in_max) % modulus
        if delta >= modulus >> 1:
            delta -= modulus
        ext = self._in_max + delta
        if delta > 0:
            self._in_max = ext
            drops = self._drops
            while drops and drops[0] < ext - PICTURE_WINDOW:
                drops.popleft()
            return ext
        if ext < self._in_start or ext < self._in_max - PICTURE_WINDOW:
            return None
        return ext

    def drop(self, ext: int) -> bool:
        """Record the picture ``ext`` as dropped, so the next forwarded picture takes its output
        value; only the newest picture can be (False and nothing recorded otherwise: its
        output value is left unused, a gap the receiver takes for a loss)."""
        if ext != self._in_max or (self._drops and self._drops[-1] == ext):
            return False
        self._drops.append(ext)
        self._offset -= 1
        return True

    def dropped(self, ext: int) -> bool:
        """Whether the picture ``ext`` was recorded as dropped."""
        drops = self._drops
        if drops and drops[-1] == ext:
            return True
        return ext in drops

    def output(self, ext: int) -> int:
        """The output value (15 bits; the caller writes 7 of them unless :attr:`long`) of a
        forwarded picture of the current source."""
        out = ext + self._offset
        for d in reversed(self._drops):
            if d <= ext:
                break
            out += 1
        if out > self._out_max:
            self._out_max = out
        return out & 0x7FFF


class Vp8Rewriter:
    """The VP8 descriptors of one subscriber stream: continuous PictureID and TL0PICIDX across
    simulcast layer switches, temporal layers above a target dropped.

    Per packet, :meth:`rewrite` returns the descriptor bytes to put in front of the rest of the
    payload (``packet[offset + desc.size:]``), or None for a packet not to forward. A packet
    without the I or L field keeps it absent; without T, every packet is of layer 0.
    """

    __slots__ = (
        "starting",
        "target_tid",
        "current_tid",
        "pictures",
        "tl0",
        "_newest",
        "_newest_dropped",
    )

    def __init__(
        self,
        *,
        picture_id: int | None = None,
        tl0picidx: int | None = None,
        long_picture_id: bool = False,
        tid: int = 3,
    ) -> None:
        """``picture_id``/``tl0picidx``: the output values of the very first picture (random
        when None). ``long_picture_id``: write 15-bit PictureIDs from the start. ``tid``: the
        highest temporal layer to forward (3: all)."""
        #: the next packet starts a new source (set at creation and by :meth:`switch_source`);
        #: only the first packet of a keyframe does
        self.starting = True
        #: the highest temporal layer the subscriber wants
        self.target_tid = tid
        #: the highest temporal layer forwarded now: below the target until a sync point
        self.current_tid = tid
        self.pictures = PictureIdMap(picture_id, long_picture_id)
        self.tl0 = Tl0PicIdxMap(tl0picidx)
        self._newest = -1  # unwrapped input id of the newest picture, and whether it is dropped
        self._newest_dropped = False

    def switch_source(self) -> None:
        """The next keyframe starts a new source (a simulcast layer switch, or a publisher
        restart); packets before it are dropped."""
        self.starting = True

    def continue_from(self, desc: Vp8Descriptor) -> None:
        """Take over, at the first packet of a picture (``desc``), a stream that was forwarded
        unchanged until now: its PictureID and TL0PICIDX go on as they were (output = input
        from here, until a picture is dropped), every temporal layer counts as forwarded so
        far, so going down to the target needs no keyframe. Then :meth:`rewrite` this packet
        and the next ones as usual."""
        self.starting = False
        self.current_tid = 3
        self.pictures = PictureIdMap(desc.picture_id, self.pictures.long or desc.long_picture_id)
        self.tl0 = Tl0PicIdxMap(desc.tl0picidx)
        self._newest = -1
        self._newest_dropped = False

    def forward(self, tid: int) -> None:
        """Forward temporal layers 0..``tid`` from now on. Going down takes effect at the next
        picture; going up one layer at a time, at a picture of the next layer with Y set
        (RFC 7741 §4.2: it depends only on the base layer), or at once at a keyframe."""
        self.target_tid = tid

    @property
    def picture_id(self) -> int:
        """The output PictureID of the newest forwarded picture (15 bits)."""
        return self.pictures.last

    @property
    def tl0picidx(self) -> int:
        """The output TL0PICIDX of the newest picture."""
        return self.tl0.last

    def _start(self, desc: Vp8Descriptor) -> None:
        self.starting = False
        self.current_tid = self.target_tid
        if desc.picture_id is not None:
            self.pictures.start(desc.picture_id, desc.long_picture_id)
            self._newest = desc.picture_id
            self._newest_dropped = False
        else:  # numbered from the first packet of the new source that has one
            self.pictures.stop()
        self.tl0.start(desc.tl0picidx)

    def _new_picture(self, desc: Vp8Descriptor) -> bool:
        """Apply a change of temporal target at the start of a picture; whether the picture is
        forwarded."""
        tid = desc.tid
        if tid is None:
            return True
        current = self.current_tid
        target = self.target_tid
        if target < current:
            self.current_tid = current = target
        elif target > current:
            if desc.keyframe:
                self.current_tid = current = target
            elif tid == current + 1 and desc.layer_sync:
                self.current_tid = current = tid
        return tid <= current

    def rewrite(self, desc: Vp8Descriptor, new_source: bool = False) -> bytes | None:
        """The descriptor bytes of this packet for the subscriber, or None to drop it.

        ``new_source``: the caller switches to the source of this packet here (as
        :meth:`switch_source`); the switch happens at this packet if it is the first of a
        keyframe, else at the next one that is (None until then). Also None: a packet from
        before the current source's first picture, or of a dropped temporal layer.
        """
        if new_source:
            self.starting = True
        if self.starting:
            if not desc.keyframe:
                return None
            self._start(desc)
        pictures = self.pictures
        out_id: int | None = None
        pid = desc.picture_id
        if pid is not None:
            if not pictures.started:
                pictures.start(pid, desc.long_picture_id)
                self._newest = pid
                self._newest_dropped = not self._new_picture(desc)
                if self._newest_dropped:
                    pictures.drop(pid)
                    return None
                ext = pid
            else:
                newest = self._newest
                unwrapped = pictures.unwrap(pid, desc.long_picture_id)
                if unwrapped is None:
                    return None
                ext = unwrapped
                if ext > newest:
                    self._newest = ext
                    forwarded = self._new_picture(desc)
                    self._newest_dropped = not forwarded
                    if not forwarded:
                        pictures.drop(ext)
                        return None
                elif ext == newest:
                    if self._newest_dropped:
                        return None
                elif pictures.dropped(ext) or (
                    desc.tid is not None and desc.tid > self.current_tid
                ):
                    return None
            out_id = pictures.output(ext)
        elif desc.frame_start:
            if not self._new_picture(desc):
                return None
        elif desc.tid is not None and desc.tid > self.current_tid:
            return None
        tl0 = desc.tl0picidx
        out_tl0 = None if tl0 is None else self.tl0.output(tl0)
        return _pack(desc, out_id, pictures.long, out_tl0)
