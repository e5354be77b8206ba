"""What a track's layers within one RTP stream are worth: the spatial and temporal layers a VP8
(temporal layers), VP9 (SVC) or AV1 (dependency descriptor) stream carries, their picture sizes
where the stream says them, and their bit and frame rates measured from what was received.

:class:`LayerStats` is the track's (``Track.svc``): :meth:`LayerStats.count` runs in
``Track.receive`` for every packet while the track has active subscribers, reading only the
few descriptor bytes that name the packet's layer; :meth:`LayerStats.tick`, from ``Track.tick``
once a second, turns the counts into rates. A layer allocator reads the result:
:attr:`LayerStats.spatial_layers`, :attr:`LayerStats.temporal_layers`,
:attr:`LayerStats.resolutions`, :attr:`LayerStats.bitrates` and :attr:`LayerStats.frame_rates`
per ``(spatial, temporal)`` id, and :meth:`LayerStats.bitrate` / :meth:`LayerStats.frame_rate`
for what a subscriber limited to some layers gets.

Sans-I/O: bytes in, numbers out.
"""

from __future__ import annotations

from relay.rtc.dependency_descriptor import (
    DependencyDescriptorError,
    TemplateStructure,
)
from relay.rtc.dependency_descriptor import (
    parse as parse_dependency_descriptor,
)
from relay.rtc.vp9 import Vp9Error, parse_vp9

__all__ = ["LayerStats", "choose_layers", "layered_codec"]

#: the layers counted: ids 0..7 (VP9's 3-bit fields; VP8 has 2-bit TIDs, AV1 templates 0..7
#: in practice)
_IDS = 8


#: a temporal layer fits a frame-rate limit with this much to spare (measured rates wobble)
FPS_TOLERANCE = 1.1


def choose_layers(
    svc: LayerStats | None,
    max_width: int | None,
    max_height: int | None,
    max_fps: float | None,
) -> tuple[int | None, int | None]:
    """``(max_spatial, max_temporal)`` for a subscriber's wishes on a track whose stream has
    layers ``svc``: the highest spatial layer whose picture fits ``max_width`` and
    ``max_height`` (the lowest when none does), the highest temporal layer whose frame rate
    is at most ``max_fps``; None for "all" (no wish, the top layer fits, or what the layers
    are is not known yet)."""
    if svc is None:
        return None, None
    spatial: int | None = None
    resolutions = svc.resolutions
    if (max_width is not None or max_height is not None) and resolutions:
        best = 0
        for index, (width, height) in enumerate(resolutions):
            if (max_width is None or width <= max_width) and (
                max_height is None or height <= max_height
            ):
                best = index
        spatial = None if best == len(resolutions) - 1 else best
    temporal: int | None = None
    layers = svc.temporal_layers
    if max_fps is not None and layers > 1 and svc.frame_rates:
        best = 0
        for t in range(layers):
            if svc.frame_rate(t) <= max_fps * FPS_TOLERANCE:
                best = t
        temporal = None if best == layers - 1 else best
    return spatial, temporal


def layered_codec(codec_name: str) -> bool:
    """Whether a video codec can carry layers within one RTP stream that the relay can tell
    apart (VP8 temporal layers, VP9 SVC, AV1 with the dependency descriptor)."""
    return codec_name.lower() in ("vp8", "vp9", "av1")


class LayerStats:
    """The layers of one track's RTP stream, counted per ``(spatial, temporal)`` id.

    Per packet (:meth:`count`): the payload descriptor's layer ids (VP8: TID; VP9: SID and TID;
    AV1: the dependency descriptor's template, from the structure of the latest keyframe), its
    size added to that layer's byte count, and a frame counted where a layer frame starts. Once
    a second (:meth:`tick`): :attr:`bitrates` and :attr:`frame_rates` of the last interval.

    VP8 without temporal layers (no T bit in the first :data:`VP8_PROBE` packets) sets
    :attr:`temporal` to False; the track then stops counting.
    """

    __slots__ = (
        "codec",
        "dd_id",
        "structure",
        "temporal",
        "spatial_layers",
        "temporal_layers",
        "resolutions",
        "bitrates",
        "frame_rates",
        "_bytes",
        "_frames",
        "_probed",
        "_top_sid",
        "_top_tid",
    )

    #: VP8 packets looked at before deciding that a stream has no temporal layers
    VP8_PROBE = 256

    def __init__(self, codec_name: str, dd_id: int = 0) -> None:
        """``dd_id``: the publisher's extension id of the dependency descriptor (AV1; 0: none
        negotiated, nothing is counted)."""
        self.codec = codec_name.lower()
        self.dd_id = dd_id
        #: AV1: the template structure of the latest keyframe
        self.structure: TemplateStructure | None = None
        #: VP8: whether the stream has temporal layers (None: not known yet)
        self.temporal: bool | None = None if self.codec == "vp8" else True
        #: how many spatial and temporal layers the stream has shown (0: none seen yet): from
        #: the VP9 scalability structure or the AV1 template structure, else the highest ids
        #: seen in packets
        self.spatial_layers = 0
        self.temporal_layers = 0
        #: picture size of each spatial layer, lowest first, when the stream says them (VP9
        #: SS with Y; AV1 structure with render resolutions); empty when unknown
        self.resolutions: tuple[tuple[int, int], ...] = ()
        #: bits per second and frames per second of each (spatial, temporal) layer over the
        #: last interval (layers with nothing received are absent)
        self.bitrates: dict[tuple[int, int], float] = {}
        self.frame_rates: dict[tuple[int, int], float] = {}
        self._bytes = [0] * (_IDS * _IDS)
        self._frames = [0] * (_IDS * _IDS)
        self._probed = 0
        self._top_sid = -1
        self._top_tid = -1

    # -- the packet path --------------------------------------------------------------------
    def count(
        self, plain: bytes, offset: int, elements: list[tuple[int, bytes]], size: int
    ) -> None:
        """Account for one received packet (``size`` bytes) of the track."""
        codec = self.codec
        try:
            if codec == "vp9":
                first = plain[offset]
                i = offset + 1
                if first & 0x80:  # I: PictureID, 7 or 15 bits
                    i += 2 if plain[i] & 0x80 else 1
                if first & 0x20:  # L: TID U SID D
                    layer = plain[i]
                    sid = (layer >> 1) & 0x07
                    tid = layer >> 5
                else:
                    sid = tid = 0
                start = first & 0x08  # B
                if first & 0x02 and start:  # V: the scalability structure (keyframes)
                    self._scalability(plain, offset)
            elif codec == "vp8":
                sid = 0
                first = plain[offset]
                tid = 0
                if first & 0x80:  # X
                    ext = plain[offset + 1]
                    i = offset + 2
                    if ext & 0x80:  # I
                        i += 2 if plain[i] & 0x80 else 1
                    if ext & 0x40:  # L
                        i += 1
                    if ext & 0x20:  # T
                        tid = plain[i] >> 6
                        self.temporal = True
                if self.temporal is None:
                    self._probed += 1
                    if self._probed >= self.VP8_PROBE:
                        self.temporal = False
                start = first & 0x10 and not first & 0x07  # S, partition 0
            else:
                layers = self._av1_layers(elements)
                if layers is None:
                    return
                sid, tid, start = layers
        except IndexError:
            return  # a truncated descriptor: the forwarding path counts it
        if sid >= _IDS or tid >= _IDS:
            return
        index = sid * _IDS + tid
        self._bytes[index] += size
        if start:
            self._frames[index] += 1
        if sid > self._top_sid:
            self._top_sid = sid
        if tid > self._top_tid:
            self._top_tid = tid

    def _scalability(self, plain: bytes, offset: int) -> None:
        try:
            ss = parse_vp9(plain, offset).ss
        except Vp9Error:
            return
        if ss is None:
            return
        self.spatial_layers = ss.spatial_layers
        if ss.resolutions:
            self.resolutions = ss.resolutions
        if ss.group:
            self.temporal_layers = max(p.tid for p in ss.group) + 1

    def _av1_layers(self, elements: list[tuple[int, bytes]]) -> tuple[int, int, bool] | None:
        dd_id = self.dd_id
        if not dd_id:
            return None
        value = next((v for ext_id, v in elements if ext_id == dd_id), None)
        if value is None:
            return None
        structure = self.structure
        if len(value) == 3 and structure is not None:  # no extended fields: most packets
            templates = structure.templates
            index = ((value[0] & 0x3F) - structure.template_id_offset) % 64
            if index >= len(templates):
                return None
            template = templates[index]
            return template.spatial_id, template.temporal_id, value[0] >= 0x80
        try:
            frame = parse_dependency_descriptor(value, structure)
        except DependencyDescriptorError:
            return None
        if frame.new_structure:
            self._set_structure(frame.structure)
        return frame.spatial_id, frame.temporal_id, frame.start_of_frame

    def _set_structure(self, structure: TemplateStructure) -> None:
        self.structure = structure
        self.spatial_layers = structure.max_spatial_id + 1
        self.temporal_layers = structure.max_temporal_id + 1
        if structure.resolutions is not None:
            self.resolutions = tuple((r.width, r.height) for r in structure.resolutions)

    # -- once a second ----------------------------------------------------------------------
    def tick(self, interval: float) -> None:
        """The rates of the interval that ends now; the counts start again."""
        counts = self._bytes
        frames = self._frames
        bitrates: dict[tuple[int, int], float] = {}
        frame_rates: dict[tuple[int, int], float] = {}
        if interval > 0:
            for index, value in enumerate(counts):
                if value:
                    bitrates[divmod(index, _IDS)] = value * 8 / interval
            for index, value in enumerate(frames):
                if value:
                    frame_rates[divmod(index, _IDS)] = value / interval
        self.bitrates = bitrates
        self.frame_rates = frame_rates
        self._bytes = [0] * (_IDS * _IDS)
        self._frames = [0] * (_IDS * _IDS)
        if self._top_sid + 1 > self.spatial_layers:
            self.spatial_layers = self._top_sid + 1
        if self._top_tid + 1 > self.temporal_layers:
            self.temporal_layers = self._top_tid + 1

    # -- views ------------------------------------------------------------------------------
    def bitrate(self, spatial: int | None, temporal: int | None) -> float:
        """Bits per second a subscriber gets with spatial layers 0..``spatial`` and temporal
        layers 0..``temporal`` (None: all), over the last interval."""
        s_max = _IDS if spatial is None else spatial
        t_max = _IDS if temporal is None else temporal
        return sum(v for (s, t), v in self.bitrates.items() if s <= s_max and t <= t_max)

    def frame_rate(self, temporal: int | None) -> float:
        """Pictures per second with temporal layers 0..``temporal`` (None: all): the frames of
        the lowest spatial layer, over the last interval."""
        t_max = _IDS if temporal is None else temporal
        return sum(v for (s, t), v in self.frame_rates.items() if s == 0 and t <= t_max)

    def ladder(self) -> list[tuple[int, int, float]]:
        """``(spatial, temporal, bits per second)`` of every choice a subscriber of this
        stream has (max_spatial, max_temporal), lowest first (by spatial layer, then temporal
        layer), with what it would receive over the last interval: the options a layer
        allocation picks from."""
        return [
            (s, t, self.bitrate(s, t))
            for s in range(self.spatial_layers)
            for t in range(self.temporal_layers)
        ]

    def to_dict(self) -> dict[str, object]:
        """As the API shows it."""
        return {
            "spatial_layers": self.spatial_layers,
            "temporal_layers": self.temporal_layers,
            "resolutions": [list(r) for r in self.resolutions],
            "layers": [
                {
                    "spatial": s,
                    "temporal": t,
                    "bitrate": rate,
                    "frame_rate": self.frame_rates.get((s, t), 0.0),
                }
                for (s, t), rate in sorted(self.bitrates.items())
            ],
        }
