"""The Dependency Descriptor RTP header extension (AV1 RTP specification, Appendix A): parse it,
write it back with another set of active decode targets, and choose what a subscriber needs.

Chromium sends this extension with AV1 (and with VP9/H.264 when scalability is in use) so that a
forwarder can tell, without reading the payload (which end-to-end encryption may hide), which
frames belong to which *decode target*: a subset of the stream decodable at some spatial and
temporal fidelity (e.g. "VGA at 15 fps"). Every packet says:

- ``start_of_frame`` / ``end_of_frame`` and a 16-bit ``frame_number``;
- the frame's template (``frame_dependency_template_id``), which gives its spatial and temporal
  ids, its *decode target indication* (DTI) for each decode target (not present, discardable,
  switch, required), the frames it refers to (``fdiffs``: frame number differences) and, for each
  *chain*, the difference to the previous frame of that chain;
- optionally, frame-level overrides of the DTIs, fdiffs and chain fdiffs;
- optionally, the ``active_decode_targets_bitmask`` (bit i: decode target i is decodable);
- in the first packet of a coded video sequence (a keyframe), the *template dependency
  structure*: the templates themselves, the number of decode targets, which chain protects each
  decode target, and optionally the maximum render resolution of each spatial layer.

A packet without a structure can only be read with the structure of the last keyframe, which
the caller keeps per track: ``parse(data, structure)`` returns a :class:`FrameDescriptor` whose
``structure`` is the one in effect (``new_structure`` tells that this packet carried it).

Sans-I/O: bytes in, dataclasses out (the structures frozen, shared by every frame that uses
them); :func:`write` and :func:`write_with_bitmask` give bytes back. Every error is a
:class:`DependencyDescriptorError` (a ``ValueError``); :class:`StructureUnknownError`, its
subclass, means "this packet needs a structure the caller does not have". Section numbers below
(§A.x) are those of the AV1 RTP specification, https://aomediacodec.github.io/av1-rtp-spec/ .
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import NoReturn

from relay.rtc.extensions import DEPENDENCY_DESCRIPTOR_URI as _DD_URI

__all__ = [
    "DEPENDENCY_DESCRIPTOR_URI",
    "BitReader",
    "BitWriter",
    "DecodeTargetIndication",
    "DecodeTargetSelector",
    "DependencyDescriptorError",
    "FrameDescriptor",
    "FrameTemplate",
    "RenderResolution",
    "StructureUnknownError",
    "TemplateStructure",
    "decode_target_mask",
    "frame_needed",
    "parse",
    "select_decode_target",
    "write",
    "write_with_bitmask",
]

#: §A.9: the extmap URI of the extension (a=extmap:<id> <URI>), spelled out in extensions.py
DEPENDENCY_DESCRIPTOR_URI = _DD_URI

#: frame_dependency_template_id has 6 bits: no more templates can be told apart
MAX_TEMPLATES = 64
#: dt_cnt_minus_one has 5 bits
MAX_DECODE_TARGETS = 32
#: a custom fdiff_minus_one has at most 3 x 4 bits (next_fdiff_size 1..3)
MAX_CUSTOM_FDIFF = 1 << 12
#: the modulus of frame_number
FRAME_NUMBER_MODULUS = 1 << 16


class DependencyDescriptorError(ValueError):
    """A malformed or truncated dependency descriptor, or values that cannot be written."""


class StructureUnknownError(DependencyDescriptorError):
    """The descriptor needs a template dependency structure the caller does not have: none was
    given, or the frame's template id is outside the given structure's range (§A.8.3 notes that
    this happens when the packet with a newer structure was lost or is late). The frame cannot
    be classified until a keyframe brings the structure."""


class DecodeTargetIndication(IntEnum):
    """The relation of a frame to a decode target (§A.8.3, Table A.1), as coded in 2 bits."""

    #: '-': the frame is not part of the decode target
    NOT_PRESENT = 0
    #: 'D': part of it, and no later frame of the decode target refers to it
    DISCARDABLE = 1
    #: 'S': part of it, and if this frame is decodable so is every later frame of the target
    SWITCH = 2
    #: 'R': part of it, neither discardable nor a switch point
    REQUIRED = 3


_DTIS = tuple(DecodeTargetIndication)  # by coded value


# --- bits ---------------------------------------------------------------------------------------


class BitReader:
    """Reads a byte string as bits, most significant bit first: the spec's ``f(n)`` and
    ``ns(n)`` (§A.8.2). Reading past the end raises :class:`DependencyDescriptorError`."""

    __slots__ = ("_value", "_size", "_position")

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._size = len(data) << 3
        self._position = 0

    @property
    def position(self) -> int:
        """Bits read so far (the spec's TotalConsumedBits)."""
        return self._position

    @property
    def remaining(self) -> int:
        """Bits left."""
        return self._size - self._position

    def f(self, n: int) -> int:
        """The next ``n`` bits as an unsigned integer, high bit first (``f(0)`` is 0)."""
        end = self._advance(n)
        return (self._value >> (self._size - end)) & ((1 << n) - 1)

    def skip(self, n: int) -> None:
        """Move past ``n`` bits; raises like :meth:`f` past the end."""
        self._advance(n)

    def _advance(self, n: int) -> int:
        """Move ``n`` bits on; the new position. Raises at the end of the data."""
        end = self._position + n
        if end > self._size:
            raise DependencyDescriptorError(
                f"dependency descriptor truncated: {n} bits needed at bit {self._position}, "
                f"{self._size - self._position} left"
            )
        self._position = end
        return end

    def ns(self, n: int) -> int:
        """A non-symmetric unsigned value in ``0..n-1`` (§A.8.2): with ``w`` the bit length of
        ``n`` and ``m = 2**w - n``, values below ``m`` take ``w - 1`` bits, the others ``w``.
        ``ns(1)`` reads nothing and is 0."""
        if n < 1:
            raise DependencyDescriptorError(f"ns({n}): the range must hold at least one value")
        w = n.bit_length()
        m = (1 << w) - n
        v = self.f(w - 1)
        if v < m:
            return v
        return (v << 1) - m + self.f(1)


class BitWriter:
    """Writes bits most significant first: the inverse of :class:`BitReader`. Values that do not
    fit raise :class:`DependencyDescriptorError`."""

    __slots__ = ("_value", "_size")

    def __init__(self) -> None:
        self._value = 0
        self._size = 0

    @property
    def position(self) -> int:
        """Bits written so far."""
        return self._size

    def f(self, n: int, value: int) -> None:
        """``value`` in ``n`` bits (``0 <= value < 2**n``)."""
        if not 0 <= value < (1 << n):
            raise DependencyDescriptorError(f"{value} does not fit in {n} bits")
        self._value = (self._value << n) | value
        self._size += n

    def ns(self, n: int, value: int) -> None:
        """``value`` (``0 <= value < n``) as a non-symmetric unsigned integer (the spec's
        ``write_ns``): nothing for ``n == 1``."""
        if not 0 <= value < n:
            raise DependencyDescriptorError(f"{value} is not in the range 0..{n - 1} of ns({n})")
        w = n.bit_length()
        m = (1 << w) - n
        if value < m:
            self.f(w - 1, value)
        else:
            self.f(w, value + m)

    def to_bytes(self) -> bytes:
        """The bits written, zero-padded to whole bytes (the spec's ``zero_padding``)."""
        pad = -self._size & 7
        return (self._value << pad).to_bytes((self._size + pad) >> 3, "big")


# --- structure ----------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise DependencyDescriptorError(message)


@dataclass(frozen=True, slots=True)
class RenderResolution:
    """The maximum render size of one spatial layer (``max_render_width_minus_1 + 1`` by
    ``max_render_height_minus_1 + 1``)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        if not (0 < self.width <= 0x10000 and 0 < self.height <= 0x10000):
            _fail(f"render resolution {self.width}x{self.height} is not in 1..65536")


@dataclass(frozen=True, slots=True)
class FrameTemplate:
    """One frame dependency template (§A.8.1): what the frames referring to it have in common.

    ``dtis``: one indication per decode target (plain ints 0..3 are turned into
    :class:`DecodeTargetIndication`). ``fdiffs``: frame number differences to the frames this
    one refers to, each 1..16. ``chain_fdiffs``: one per chain, the difference to the previous
    frame of that chain, each 0..15 (0: no previous frame is needed).
    """

    spatial_id: int
    temporal_id: int
    dtis: tuple[DecodeTargetIndication, ...]
    fdiffs: tuple[int, ...] = ()
    chain_fdiffs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.spatial_id < 0 or self.temporal_id < 0:
            _fail("negative spatial or temporal id")
        try:
            dtis = tuple(DecodeTargetIndication(d) for d in self.dtis)
        except ValueError:
            raise DependencyDescriptorError(
                f"bad decode target indication in {self.dtis}"
            ) from None
        object.__setattr__(self, "dtis", dtis)
        object.__setattr__(self, "fdiffs", tuple(self.fdiffs))
        object.__setattr__(self, "chain_fdiffs", tuple(self.chain_fdiffs))
        for fdiff in self.fdiffs:
            if not 1 <= fdiff <= 16:
                _fail(f"template fdiff {fdiff} is not in 1..16")
        for fdiff in self.chain_fdiffs:
            if not 0 <= fdiff <= 15:
                _fail(f"template chain fdiff {fdiff} is not in 0..15")


@dataclass(frozen=True, slots=True)
class TemplateStructure:
    """The template dependency structure (§A.8.2 ``template_dependency_structure()``).

    ``template_id_offset`` is the ``frame_dependency_template_id`` of ``templates[0]`` (ids
    wrap modulo 64). ``templates`` are in coded order: the first has spatial and temporal id 0,
    and each next one has the same ids, the next temporal id, or the next spatial id with
    temporal id 0 (``next_layer_idc``). ``chain_count`` chains (0: none);
    ``decode_target_protected_by[i]`` is the chain protecting decode target ``i`` (empty when
    there are no chains). ``resolutions``: one per spatial id 0..max, or None when not sent.

    ``decode_target_layers[i]`` is derived (the spec's ``decode_target_layers()``): the highest
    spatial and the highest temporal id among the templates whose DTI for decode target ``i`` is
    not "not present", as ``(spatial_id, temporal_id)``.

    Construction checks every constraint the bits impose; it raises
    :class:`DependencyDescriptorError`.
    """

    template_id_offset: int
    decode_target_count: int
    templates: tuple[FrameTemplate, ...]
    chain_count: int = 0
    decode_target_protected_by: tuple[int, ...] = ()
    resolutions: tuple[RenderResolution, ...] | None = None
    decode_target_layers: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        templates = tuple(self.templates)
        protected_by = tuple(self.decode_target_protected_by)
        object.__setattr__(self, "templates", templates)
        object.__setattr__(self, "decode_target_protected_by", protected_by)
        if self.resolutions is not None:
            object.__setattr__(self, "resolutions", tuple(self.resolutions))
        dt_count = self.decode_target_count
        if not 0 <= self.template_id_offset < 64:
            _fail(f"template_id_offset {self.template_id_offset} is not in 0..63")
        if not 1 <= dt_count <= MAX_DECODE_TARGETS:
            _fail(f"{dt_count} decode targets: 1..{MAX_DECODE_TARGETS} allowed")
        if not 1 <= len(templates) <= MAX_TEMPLATES:
            _fail(f"{len(templates)} templates: 1..{MAX_TEMPLATES} allowed")
        if not 0 <= self.chain_count <= dt_count:
            _fail(f"{self.chain_count} chains for {dt_count} decode targets")
        spatial = temporal = 0
        for index, template in enumerate(templates):
            layer = (template.spatial_id, template.temporal_id)
            if index == 0:
                if layer != (0, 0):
                    _fail("the first template is not of spatial and temporal id 0")
            elif layer not in ((spatial, temporal), (spatial, temporal + 1), (spatial + 1, 0)):
                _fail(
                    f"template {index} (S{layer[0]}T{layer[1]}) cannot follow "
                    f"S{spatial}T{temporal}: templates go in layer order"
                )
            spatial, temporal = layer
            if len(template.dtis) != dt_count:
                _fail(f"template {index} has {len(template.dtis)} DTIs for {dt_count} targets")
            if len(template.chain_fdiffs) != self.chain_count:
                _fail(
                    f"template {index} has {len(template.chain_fdiffs)} chain fdiffs for "
                    f"{self.chain_count} chains"
                )
        if self.chain_count:
            if len(protected_by) != dt_count:
                _fail(f"{len(protected_by)} protecting chains for {dt_count} decode targets")
            for chain in protected_by:
                if not 0 <= chain < self.chain_count:
                    _fail(f"decode target protected by chain {chain} of {self.chain_count}")
        elif protected_by:
            _fail("decode_target_protected_by without chains")
        if self.resolutions is not None and len(self.resolutions) != spatial + 1:
            _fail(f"{len(self.resolutions)} render resolutions for {spatial + 1} spatial layers")
        layers = []
        for dt in range(dt_count):
            top_spatial = top_temporal = 0
            for template in templates:
                if template.dtis[dt]:
                    top_spatial = max(top_spatial, template.spatial_id)
                    top_temporal = max(top_temporal, template.temporal_id)
            layers.append((top_spatial, top_temporal))
        object.__setattr__(self, "decode_target_layers", tuple(layers))

    @property
    def max_spatial_id(self) -> int:
        """The spatial id of the last template (the spec's MaxSpatialId)."""
        return self.templates[-1].spatial_id

    @property
    def max_temporal_id(self) -> int:
        """The highest temporal id of any template (the spec's MaxTemporalId)."""
        return max(template.temporal_id for template in self.templates)

    def template_index(self, template_id: int) -> int:
        """The index in ``templates`` of ``frame_dependency_template_id`` ``template_id``;
        raises :class:`StructureUnknownError` when it is outside this structure's range."""
        index = (template_id - self.template_id_offset) % 64
        if index >= len(self.templates):
            raise StructureUnknownError(
                f"template id {template_id} is not in this structure (ids "
                f"{self.template_id_offset}..+{len(self.templates) - 1} modulo 64)"
            )
        return index


# --- frame --------------------------------------------------------------------------------------


@dataclass(slots=True)
class FrameDescriptor:
    """One packet's dependency descriptor, resolved against the structure in effect.

    Coded fields: ``start_of_frame``, ``end_of_frame``, ``template_id``
    (``frame_dependency_template_id``) and ``frame_number``; ``new_structure``
    (``template_dependency_structure_present_flag``: this packet carries ``structure``);
    ``active_decode_targets_bitmask`` (None when this packet does not carry one; bit i is decode
    target i); ``custom_dtis`` / ``custom_fdiffs`` / ``custom_chains`` (the frame overrides its
    template's values).

    Resolved fields, from the template unless overridden: ``spatial_id``, ``temporal_id``,
    ``dtis`` (one :class:`DecodeTargetIndication` per decode target), ``fdiffs`` (frame number
    differences to the referred frames, 1..4096 when custom) and ``chain_fdiffs`` (one per
    chain, 0..255 when custom; 0: the chain needs no earlier frame).

    :func:`write` encodes ``structure`` when ``new_structure`` is set, and the resolved
    ``dtis`` / ``fdiffs`` / ``chain_fdiffs`` only where the matching ``custom_*`` flag is set
    (otherwise the template's apply and the field is not written). Not frozen, to be cheap to
    make per packet: change a copy (:func:`dataclasses.replace`), or write another bitmask with
    :func:`write_with_bitmask`.
    """

    start_of_frame: bool
    end_of_frame: bool
    template_id: int
    frame_number: int
    structure: TemplateStructure
    new_structure: bool
    active_decode_targets_bitmask: int | None
    custom_dtis: bool
    custom_fdiffs: bool
    custom_chains: bool
    spatial_id: int
    temporal_id: int
    dtis: tuple[DecodeTargetIndication, ...]
    fdiffs: tuple[int, ...]
    chain_fdiffs: tuple[int, ...]

    @property
    def active_decode_targets(self) -> int | None:
        """The active decode targets this packet signals (§A.4): its bitmask when present, all
        decode targets when it carries a structure without one, else None (no change: the last
        signalled set stays valid)."""
        if self.active_decode_targets_bitmask is not None:
            return self.active_decode_targets_bitmask
        if self.new_structure:
            return (1 << self.structure.decode_target_count) - 1
        return None

    @property
    def referred_frame_numbers(self) -> tuple[int, ...]:
        """The frame numbers of the frames this one refers to (``frame_number - fdiff``, modulo
        2**16)."""
        return tuple((self.frame_number - fdiff) % FRAME_NUMBER_MODULUS for fdiff in self.fdiffs)

    @property
    def resolution(self) -> RenderResolution | None:
        """The maximum render resolution of the frame's spatial layer, when the structure has
        them."""
        resolutions = self.structure.resolutions
        return None if resolutions is None else resolutions[self.spatial_id]


#: parsed structures by the descriptor bytes from the extended flags on, and the bit position
#: after the structure (bounded: emptied when full)
_STRUCTURES: dict[bytes, tuple[TemplateStructure, int]] = {}
_MAX_STRUCTURES = 32


# --- parse --------------------------------------------------------------------------------------


def parse(data: bytes, structure: TemplateStructure | None = None) -> FrameDescriptor:
    """Parse one dependency descriptor (the extension element's value, ``sz = len(data)``).

    ``structure`` is the one in effect: the ``structure`` of the last descriptor that carried
    one (``new_structure``), usually the first packet of the last keyframe. It is not needed
    (and is ignored) when ``data`` carries its own.

    Raises :class:`DependencyDescriptorError` for fewer than 3 bytes, truncated fields or a
    structure that breaks a constraint, and its subclass :class:`StructureUnknownError` when
    the frame needs a structure that is not given, or its template id is not in it. Trailing
    bits (``zero_padding``) are ignored, as §A.8.3 asks, whatever their value.
    """
    if len(data) < 3:
        raise DependencyDescriptorError(f"dependency descriptor of {len(data)} bytes: at least 3")
    # mandatory_descriptor_fields(): start_of_frame, end_of_frame, frame_dependency_template_id
    # (6 bits) and frame_number (16 bits) fill the first 3 bytes: read them directly
    first = data[0]
    start_of_frame = first >= 0x80
    end_of_frame = bool(first & 0x40)
    template_id = first & 0x3F
    frame_number = (data[1] << 8) | data[2]
    if len(data) == 3:  # no_extended_descriptor_fields(): most packets
        if structure is None:
            raise StructureUnknownError("dependency descriptor without a structure, none given")
        template = structure.templates[structure.template_index(template_id)]
        return FrameDescriptor(
            start_of_frame,
            end_of_frame,
            template_id,
            frame_number,
            structure,
            False,
            None,
            False,
            False,
            False,
            template.spatial_id,
            template.temporal_id,
            template.dtis,
            template.fdiffs,
            template.chain_fdiffs,
        )
    # extended_descriptor_fields()
    reader = BitReader(data)
    f = reader.f
    reader.skip(24)  # the mandatory fields
    new_structure = bool(f(1))  # template_dependency_structure_present_flag
    bitmask_present = f(1)
    custom_dtis = bool(f(1))
    custom_fdiffs = bool(f(1))
    custom_chains = bool(f(1))
    bitmask: int | None = None
    if new_structure:
        # A sender repeats the same structure on every keyframe: equal bytes from the flags on
        # are the same structure, so keep the parsed ones (this also gives them one identity).
        key = bytes(data[3:])
        cached = _STRUCTURES.get(key)
        if cached is None:
            structure = _read_structure(reader)
            if len(_STRUCTURES) >= _MAX_STRUCTURES:
                _STRUCTURES.clear()
            _STRUCTURES[key] = structure, reader.position
        else:
            structure, end = cached
            reader.skip(end - reader.position)
    if bitmask_present:
        if structure is None:
            raise StructureUnknownError(
                "active_decode_targets_bitmask needs the decode target count of a structure"
            )
        bitmask = f(structure.decode_target_count)
    if structure is None:
        raise StructureUnknownError("dependency descriptor without a structure, none given")
    # frame_dependency_definition()
    template = structure.templates[structure.template_index(template_id)]
    if custom_dtis:  # frame_dtis()
        dtis = tuple(_DTIS[f(2)] for _ in range(structure.decode_target_count))
    else:
        dtis = template.dtis
    if custom_fdiffs:  # frame_fdiffs()
        diffs = []
        size = f(2)  # next_fdiff_size: fdiff_minus_one in 4-bit units, 0 ends the list
        while size:
            diffs.append(f(4 * size) + 1)
            size = f(2)
        fdiffs = tuple(diffs)
    else:
        fdiffs = template.fdiffs
    if custom_chains:  # frame_chains()
        chain_fdiffs = tuple(f(8) for _ in range(structure.chain_count))
    else:
        chain_fdiffs = template.chain_fdiffs
    return FrameDescriptor(
        start_of_frame,
        end_of_frame,
        template_id,
        frame_number,
        structure,
        new_structure,
        bitmask,
        custom_dtis,
        custom_fdiffs,
        custom_chains,
        template.spatial_id,
        template.temporal_id,
        dtis,
        fdiffs,
        chain_fdiffs,
    )


def _read_structure(reader: BitReader) -> TemplateStructure:
    """``template_dependency_structure()`` (§A.8.2)."""
    f = reader.f
    template_id_offset = f(6)
    dt_count = f(5) + 1  # dt_cnt_minus_one
    # template_layers(): next_layer_idc 0 same layer, 1 next temporal id, 2 next spatial id
    # with temporal id 0, 3 no more templates
    layers: list[tuple[int, int]] = []
    spatial = temporal = 0
    while True:
        if len(layers) == MAX_TEMPLATES:
            raise DependencyDescriptorError(f"more than {MAX_TEMPLATES} templates")
        layers.append((spatial, temporal))
        next_layer_idc = f(2)
        if next_layer_idc == 3:
            break
        if next_layer_idc == 1:
            temporal += 1
        elif next_layer_idc == 2:
            spatial += 1
            temporal = 0
    count = len(layers)
    # template_dtis()
    dtis = [tuple(_DTIS[f(2)] for _ in range(dt_count)) for _ in range(count)]
    # template_fdiffs(): fdiff_follows_flag, then fdiff_minus_one in 4 bits, until a 0 flag
    fdiffs: list[tuple[int, ...]] = []
    for _ in range(count):
        diffs = []
        while f(1):
            diffs.append(f(4) + 1)
        fdiffs.append(tuple(diffs))
    # template_chains()
    chain_count = reader.ns(dt_count + 1)
    protected_by: tuple[int, ...] = ()
    chain_fdiffs: list[tuple[int, ...]] = [()] * count
    if chain_count:
        protected_by = tuple(reader.ns(chain_count) for _ in range(dt_count))
        chain_fdiffs = [tuple(f(4) for _ in range(chain_count)) for _ in range(count)]
    # decode_target_layers() reads nothing: TemplateStructure derives it
    resolutions = None
    if f(1):  # resolutions_present_flag, then render_resolutions()
        resolutions = tuple(
            RenderResolution(f(16) + 1, f(16) + 1) for _ in range(layers[-1][0] + 1)
        )
    return TemplateStructure(
        template_id_offset,
        dt_count,
        tuple(
            FrameTemplate(s, t, dtis[i], fdiffs[i], chain_fdiffs[i])
            for i, (s, t) in enumerate(layers)
        ),
        chain_count,
        protected_by,
        resolutions,
    )


# --- write --------------------------------------------------------------------------------------


def write(descriptor: FrameDescriptor) -> bytes:
    """Encode ``descriptor`` (the inverse of :func:`parse`).

    The extended fields are written only when needed (a structure, a bitmask or a custom
    override), custom fdiffs in the fewest 4-bit units, and the bits zero-padded to the next
    byte. Every descriptor a conforming sender encodes that way (libwebrtc does) comes back
    byte for byte: ``write(parse(x, s)) == x``. Other encodings of the same values (an extended
    flags byte with all flags 0, a wider ``next_fdiff_size`` than needed, extra zero bytes)
    come back in this canonical form.

    Raises :class:`DependencyDescriptorError` when a value does not fit its field: the template
    id must be in ``structure``; a bitmask below ``2**decode_target_count``; custom DTIs one per
    decode target, custom fdiffs 1..4096, custom chain fdiffs 0..255 and one per chain.
    """
    return _write(descriptor, descriptor.active_decode_targets_bitmask)


def write_with_bitmask(descriptor: FrameDescriptor, bitmask: int | None) -> bytes:
    """:func:`write` with ``active_decode_targets_bitmask`` replaced by ``bitmask`` (None: not
    sent), ``descriptor`` left as it is: what the relay forwards to a subscriber whose set of
    decodable targets differs from the sender's (see :func:`decode_target_mask`). Per packet and
    per distinct bitmask, so the common case (no structure, no custom values) is a short path."""
    return _write(descriptor, bitmask)


def _write(d: FrameDescriptor, bitmask: int | None) -> bytes:
    structure = d.structure
    if not 0 <= d.frame_number < FRAME_NUMBER_MODULUS:
        _fail(f"frame_number {d.frame_number} is not in 0..65535")
    if not 0 <= d.template_id < 64:
        _fail(f"frame_dependency_template_id {d.template_id} is not in 0..63")
    structure.template_index(d.template_id)
    dt_count = structure.decode_target_count
    if bitmask is not None and not 0 <= bitmask < (1 << dt_count):
        _fail(f"active_decode_targets_bitmask {bitmask:#x} for {dt_count} decode targets")
    mandatory = (
        (d.start_of_frame << 23) | (d.end_of_frame << 22) | (d.template_id << 16) | d.frame_number
    )
    if not (d.new_structure or d.custom_dtis or d.custom_fdiffs or d.custom_chains):
        if bitmask is None:
            return mandatory.to_bytes(3, "big")
        # the 24 mandatory bits, flags 01000 (bitmask present only), the bitmask, zero padding
        size = 29 + dt_count
        pad = -size & 7
        value = (((mandatory << 5) | 0b01000) << dt_count | bitmask) << pad
        return value.to_bytes((size + pad) >> 3, "big")
    writer = BitWriter()
    w = writer.f
    w(24, mandatory)
    # extended_descriptor_fields(): needed from here on
    w(1, d.new_structure)
    w(1, bitmask is not None)
    w(1, d.custom_dtis)
    w(1, d.custom_fdiffs)
    w(1, d.custom_chains)
    if d.new_structure:
        _write_structure(writer, structure)
    if bitmask is not None:
        w(dt_count, bitmask)
    if d.custom_dtis:
        if len(d.dtis) != dt_count:
            _fail(f"{len(d.dtis)} custom DTIs for {dt_count} decode targets")
        for dti in d.dtis:
            w(2, dti)
    if d.custom_fdiffs:
        for fdiff in d.fdiffs:
            if not 1 <= fdiff <= MAX_CUSTOM_FDIFF:
                _fail(f"custom fdiff {fdiff} is not in 1..{MAX_CUSTOM_FDIFF}")
            size = max(1, ((fdiff - 1).bit_length() + 3) >> 2)
            w(2, size)
            w(4 * size, fdiff - 1)
        w(2, 0)
    if d.custom_chains:
        if len(d.chain_fdiffs) != structure.chain_count:
            _fail(f"{len(d.chain_fdiffs)} custom chain fdiffs for {structure.chain_count} chains")
        for fdiff in d.chain_fdiffs:
            if not 0 <= fdiff <= 255:
                _fail(f"custom chain fdiff {fdiff} is not in 0..255")
            w(8, fdiff)
    return writer.to_bytes()


def _write_structure(writer: BitWriter, structure: TemplateStructure) -> None:
    """``template_dependency_structure()``; ``structure`` was checked when it was built."""
    w = writer.f
    templates = structure.templates
    w(6, structure.template_id_offset)
    w(5, structure.decode_target_count - 1)
    for previous, template in zip(templates, templates[1:], strict=False):
        if template.spatial_id != previous.spatial_id:
            w(2, 2)
        elif template.temporal_id != previous.temporal_id:
            w(2, 1)
        else:
            w(2, 0)
    w(2, 3)
    for template in templates:
        for dti in template.dtis:
            w(2, dti)
    for template in templates:
        for fdiff in template.fdiffs:
            w(1, 1)
            w(4, fdiff - 1)
        w(1, 0)
    writer.ns(structure.decode_target_count + 1, structure.chain_count)
    if structure.chain_count:
        for chain in structure.decode_target_protected_by:
            writer.ns(structure.chain_count, chain)
        for template in templates:
            for fdiff in template.chain_fdiffs:
                w(4, fdiff)
    if structure.resolutions is None:
        w(1, 0)
    else:
        w(1, 1)
        for resolution in structure.resolutions:
            w(16, resolution.width - 1)
            w(16, resolution.height - 1)


# --- selection ----------------------------------------------------------------------------------


def frame_needed(frame: FrameDescriptor, decode_target: int) -> bool:
    """Whether a subscriber decoding ``decode_target`` needs ``frame``: its DTI for that target
    is not "not present". Discardable frames count as needed (forward them unless short of
    bandwidth: no frame of the target refers to them)."""
    if not 0 <= decode_target < len(frame.dtis):
        _fail(f"decode target {decode_target} of {len(frame.dtis)}")
    return frame.dtis[decode_target] != DecodeTargetIndication.NOT_PRESENT


def select_decode_target(
    structure: TemplateStructure,
    max_spatial_id: int,
    max_temporal_id: int,
    active_decode_targets: int | None = None,
) -> int | None:
    """The decode target for a subscriber that can take layers up to ``max_spatial_id`` and
    ``max_temporal_id``: among the decode targets whose layers
    (``structure.decode_target_layers``) fit both limits, and are active in
    ``active_decode_targets`` when given (the sender's last signalled bitmask), the one with the
    highest spatial id, then the highest temporal id, then the lowest index. None when no
    decode target fits."""
    best: int | None = None
    best_layer = (-1, -1)
    for dt, layer in enumerate(structure.decode_target_layers):
        if active_decode_targets is not None and not (active_decode_targets >> dt) & 1:
            continue
        if layer[0] <= max_spatial_id and layer[1] <= max_temporal_id and layer > best_layer:
            best, best_layer = dt, layer
    return best


def decode_target_mask(structure: TemplateStructure, decode_target: int) -> int:
    """The decode targets a subscriber can decode when it gets exactly the frames of
    ``decode_target``: the bitmask of every target ``j`` such that each template present in
    ``j`` is present in ``decode_target`` (so ``decode_target``'s own bit is set). This is the
    ``active_decode_targets_bitmask`` to forward to that subscriber (after a bitwise and with
    the sender's own active set): a target left active whose frames are not forwarded would look
    like a broken chain to the subscriber's receiver. Based on the templates; frames with custom DTIs are
    assumed to follow the same layering."""
    count = structure.decode_target_count
    if not 0 <= decode_target < count:
        _fail(f"decode target {decode_target} of {count}")
    mask = 0
    for dt in range(count):
        if all(t.dtis[decode_target] or not t.dtis[dt] for t in structure.templates):
            mask |= 1 << dt
    return mask


class DecodeTargetSelector:
    """The frames of one subscriber's stream: those of one decode target, the best whose layers
    fit the subscriber's spatial and temporal limits, and the active-decode-targets bitmask it
    must be sent (the targets it can decode with what it gets).

    Per packet, :meth:`forward` says whether it goes to the subscriber; :meth:`bitmask` is the
    bitmask to write into the descriptors it gets (:func:`write_with_bitmask`), and
    :meth:`picture_end` whether a packet ends what the subscriber gets of its temporal unit (the
    RTP marker). The decode target in use changes only at the first frame of a temporal unit
    (so that the marker of every unit is on the end of the highest layer forwarded, and no
    unit is cut after its end was marked): down (to a target whose frames are all in the
    current one's) at the next unit; up at a unit whose first frame has the DTI "switch" for
    the new target, or a keyframe (a new structure). :attr:`waiting` tells that going up waits
    for such a frame (the caller may ask for a keyframe).

    ``continuing``: the subscriber got every frame so far (the stream was forwarded unfiltered),
    so it starts on the target that has everything and can go down at once; otherwise it
    starts at the next keyframe.
    """

    __slots__ = (
        "max_spatial",
        "max_temporal",
        "structure",
        "active",
        "current",
        "target",
        "_continuing",
        "_mask",
    )

    def __init__(
        self, max_spatial: int = 7, max_temporal: int = 7, *, continuing: bool = False
    ) -> None:
        self.max_spatial = max_spatial
        self.max_temporal = max_temporal
        #: the structure the frames are read with, and the sender's active decode targets
        self.structure: TemplateStructure | None = None
        self.active: int | None = None
        #: the decode target whose frames are forwarded (None: none yet, nothing forwarded),
        #: and the one wanted
        self.current: int | None = None
        self.target: int | None = None
        self._continuing = continuing
        self._mask = 0

    def set_layers(self, max_spatial: int, max_temporal: int) -> None:
        """The subscriber's limits from now on."""
        self.max_spatial = max_spatial
        self.max_temporal = max_temporal
        self._retarget()

    @property
    def waiting(self) -> bool:
        """Going up to the wanted decode target (or starting) waits for a switch point."""
        target, current = self.target, self.current
        if target is None or target == current:
            return False
        return current is None or not self._contains(current, target)

    def _retarget(self) -> None:
        structure = self.structure
        if structure is None:
            self.target = None
            return
        dt = select_decode_target(structure, self.max_spatial, self.max_temporal, self.active)
        if dt is None:  # none fits (or none is active): the lowest that is
            dt = select_decode_target(structure, 0, 0, self.active)
        self.target = 0 if dt is None else dt
        self._update_mask()  # the sender's active set may have changed

    def _contains(self, outer: int, inner: int) -> bool:
        """Every frame of decode target ``inner`` is one of ``outer``'s."""
        assert self.structure is not None
        return bool(decode_target_mask(self.structure, outer) >> inner & 1)

    def _update_mask(self) -> None:
        structure = self.structure
        if structure is None or self.current is None:
            self._mask = 0
            return
        full = (1 << structure.decode_target_count) - 1
        active = full if self.active is None else self.active
        self._mask = decode_target_mask(structure, self.current) & active

    def bitmask(self) -> int:
        """The active decode targets the subscriber must be told of."""
        return self._mask

    def filtering(self) -> bool:
        """Whether the subscriber gets less than the sender's active decode targets."""
        structure = self.structure
        if structure is None:
            return False
        full = (1 << structure.decode_target_count) - 1
        return self._mask != (full if self.active is None else self.active)

    def forward(self, frame: FrameDescriptor, unit_start: bool = True) -> bool:
        """Whether the subscriber gets this packet of ``frame``; ``unit_start``: the packet
        is the first of a temporal unit (the caller tells by its RTP timestamp), where the
        decode target may change."""
        structure = frame.structure
        changed = structure is not self.structure
        if changed:
            self.structure = structure
            self.active = None
        active = frame.active_decode_targets
        if active is not None and active != self.active:
            self.active = active
            changed = True
        if changed:
            if frame.new_structure:
                self.current = None  # the keyframe below starts the new structure
            elif self.current is not None and self.current >= structure.decode_target_count:
                self.current = None
            self._retarget()
        target = self.target
        if target is None:
            return False
        if self.current is None and self._continuing and not frame.new_structure:
            # the subscriber got every frame so far: it is on the top target (and gets the
            # rest of the frames under way), going down at the next temporal unit
            top = select_decode_target(structure, 7, 7, self.active)
            self.current = target if top is None else top
            self._continuing = False
            self._update_mask()
        if frame.start_of_frame and unit_start and target != self.current:
            current = self.current
            if current is not None and self._contains(current, target):
                current = target  # going down needs nothing
            elif frame.new_structure or frame.dtis[target] == DecodeTargetIndication.SWITCH:
                current = target
                self._continuing = False
            if current != self.current:
                self.current = current
                self._update_mask()
        current = self.current
        if current is None:
            return False
        return frame.dtis[current] != DecodeTargetIndication.NOT_PRESENT

    def picture_end(self, frame: FrameDescriptor, marker: bool) -> bool:
        """The RTP marker a forwarded packet must carry: the publisher's, or the end of a frame
        of the highest spatial layer of the decode target in use."""
        if marker or not frame.end_of_frame or self.current is None or self.structure is None:
            return marker
        return frame.spatial_id == self.structure.decode_target_layers[self.current][0]
