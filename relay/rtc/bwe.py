"""Receive-side bandwidth estimation for a publisher, reported with REMB
(draft-alvestrand-rmcat-remb-03) when transport-cc is not negotiated but goog-remb is.

The estimate is an AIMD controller in the spirit of GCC's rate controller
(draft-ietf-rmcat-gcc-02 §5.5): it grows multiplicatively (``increase_factor`` per second, at
least ``min_increase`` bits/s per second) while there is neither loss nor a growing queue, and
drops to ``decrease_factor`` x the measured incoming rate on loss above ``high_loss`` or on
delay overuse. Growth is allowed to run ahead of the measured rate, up to ``headroom`` x
measured + ``probe_margin``: a REMB that only echoed the incoming rate would pin the sender
where it is, since a libwebrtc sender never sends above the REMB. And the first estimate is
``start_bitrate`` (or ``headroom`` x measured if higher): libwebrtc takes a REMB above its own
estimate as is during its first 2 s (its "start phase"), after which it only climbs ~8 %/s
by itself — a publisher starting at 300 kbit/s reaches 1.2 Mbit/s in 15 s only with a high
enough early REMB.

Delay overuse needs send times: give the abs-send-time header extension value
(http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time, 24-bit 6.18 fixed point seconds)
to :meth:`RembEstimator.on_packet`; without it only loss (:meth:`RembEstimator.on_loss`) makes
the estimate decrease. Delay samples: per 20 ms of send time, the minimum one-way delay
(arrival minus send time, the unknown clock offset included) of the packets sent in it; the
queuing delay is the latest sample above the minimum of the last ``baseline_window`` seconds,
its growth the least-squares slope over the last second. Overuse: a queue above
``queue_threshold`` (20 ms) growing faster than ``slope_threshold`` (20 ms/s), or a queue
above ``severe_queue`` (200 ms) that is not draining. Per packet this is two list appends; the
samples are computed with numpy when the estimate is updated.

Sans-I/O: sizes and times in (seconds, any monotonic clock), an integer bitrate out.
"""

from __future__ import annotations

import numpy as np

from relay.rtc.extensions import ABS_SEND_TIME_URI

__all__ = ["RembEstimator", "ABS_SEND_TIME_URI", "abs_send_time"]


_BUCKET = 0.05  # seconds per incoming-rate bucket
_BUCKETS_PER_SECOND = 20
_AST_UNITS = 262144.0  # abs-send-time units per second (6.18 fixed point)
_BIN_UNITS = 5243  # delay samples: one per 20 ms of send time (~a video frame), in ast units
_SAMPLES = 128  # delay samples kept (2.5 s of continuous sending)
_MAX_PENDING = 2048  # abs-send-time arrivals buffered before they are processed


def abs_send_time(value: bytes) -> int:
    """The 24-bit value of an abs-send-time header extension element."""
    if len(value) < 3:
        raise ValueError("abs-send-time element shorter than 3 bytes")
    return (value[0] << 16) | (value[1] << 8) | value[2]


class RembEstimator:
    """Bandwidth estimate for ONE publisher transport from what arrives on it.

    :meth:`on_packet` for every RTP packet of the transport (media, RTX, padding: probes
    count); :meth:`on_loss` with the fraction lost of each receiver-report interval;
    :meth:`should_send` on a timer (every 100-200 ms), and when True send a REMB with
    :meth:`estimate` for the publisher's SSRCs.
    """

    __slots__ = (
        "min_bitrate",
        "max_bitrate",
        "start_bitrate",
        "window",
        "warmup",
        "increase_factor",
        "min_increase",
        "headroom",
        "probe_margin",
        "decrease_factor",
        "decrease_interval",
        "hold_after_decrease",
        "high_loss",
        "low_loss",
        "send_interval",
        "drop_threshold",
        "queue_threshold",
        "slope_threshold",
        "severe_queue",
        "baseline_window",
        "bitrate",
        "state",
        "decreases",
        "_nbuckets",
        "_bucket_mask",
        "_bucket_id",
        "_bucket_bytes",
        "_first_arrival",
        "_last_update",
        "_last_decrease",
        "_loss",
        "_loss_fresh",
        "_last_sent",
        "_last_sent_time",
        "_p_ast",
        "_p_arrival",
        "_ast_raw",
        "_send_ext",
        "_bin",
        "_bin_arrival",
        "_bin_owd",
        "_s_arrival",
        "_s_owd",
        "_s_count",
        "_baseline",
    )

    def __init__(
        self,
        min_bitrate: int = 50_000,
        max_bitrate: int = 10_000_000,
        start_bitrate: int = 1_000_000,
        *,
        window: float = 1.0,
        warmup: float = 0.3,
        increase_factor: float = 1.08,
        min_increase: float = 30_000.0,
        headroom: float = 1.5,
        probe_margin: float = 150_000.0,
        decrease_factor: float = 0.85,
        decrease_interval: float = 0.5,
        hold_after_decrease: float = 0.5,
        high_loss: float = 0.10,
        low_loss: float = 0.02,
        send_interval: float = 1.0,
        drop_threshold: float = 0.03,
        queue_threshold: float = 0.02,
        slope_threshold: float = 0.02,
        severe_queue: float = 0.2,
        baseline_window: float = 10.0,
    ) -> None:
        if not 0 < min_bitrate <= max_bitrate:
            raise ValueError("need 0 < min_bitrate <= max_bitrate")
        self.min_bitrate = min_bitrate
        self.max_bitrate = max_bitrate
        self.start_bitrate = min(max(start_bitrate, min_bitrate), max_bitrate)
        self.window = window  # seconds of incoming rate measurement
        self.warmup = warmup  # seconds of arrivals before the first estimate
        self.increase_factor = increase_factor  # per second
        self.min_increase = min_increase  # bits/s per second
        self.headroom = headroom
        self.probe_margin = probe_margin
        self.decrease_factor = decrease_factor
        self.decrease_interval = decrease_interval  # between two delay-triggered decreases
        self.hold_after_decrease = hold_after_decrease
        self.high_loss = high_loss
        self.low_loss = low_loss
        self.send_interval = send_interval
        self.drop_threshold = drop_threshold
        self.queue_threshold = queue_threshold  # seconds of queuing before overuse counts
        self.slope_threshold = slope_threshold  # queue growth, seconds per second
        self.severe_queue = severe_queue  # seconds: overuse whatever the slope
        self.baseline_window = baseline_window
        #: the current estimate in bits/s (None before warm-up)
        self.bitrate: float | None = None
        #: "increase", "hold" or "decrease": what the last update did
        self.state = "hold"
        self.decreases = 0
        nbuckets = max(2, round(window * _BUCKETS_PER_SECOND))
        ring = 4
        while ring < nbuckets + 2:
            ring <<= 1
        self._nbuckets = nbuckets
        self._bucket_mask = ring - 1
        self._bucket_id = [-1] * ring
        self._bucket_bytes = [0] * ring
        self._first_arrival: float | None = None
        self._last_update = 0.0
        self._last_decrease = float("-inf")
        self._loss = 0.0
        self._loss_fresh = False
        self._last_sent: int | None = None
        self._last_sent_time = float("-inf")
        # delay tracking (abs-send-time): arrivals buffered per packet, processed in batches
        self._p_ast: list[int] = []
        self._p_arrival: list[float] = []
        self._ast_raw = -1  # last raw abs-send-time processed
        self._send_ext = 0  # ... unwrapped, in abs-send-time units
        self._bin = -1  # the 20 ms send-time bin being filled
        self._bin_arrival = 0.0  # its latest arrival
        self._bin_owd = 0.0  # its minimum one-way delay (arrival - send, clock offset included)
        self._s_arrival = [0.0] * _SAMPLES  # closed bins: latest arrival, minimum owd
        self._s_owd = [0.0] * _SAMPLES
        self._s_count = 0
        self._baseline: list[tuple[float, float]] = []  # (second, min owd) per second

    # -- input -----------------------------------------------------------------------------
    def on_packet(self, size: int, arrival: float, abs_send_time: int | None = None) -> None:
        """A packet of ``size`` bytes arrived at ``arrival`` (seconds); ``abs_send_time`` is the
        raw 24-bit abs-send-time extension value when the packet carries one."""
        b = int(arrival * _BUCKETS_PER_SECOND)
        i = b & self._bucket_mask
        if self._bucket_id[i] != b:
            self._bucket_id[i] = b
            self._bucket_bytes[i] = size
        else:
            self._bucket_bytes[i] += size
        if self._first_arrival is None:
            self._first_arrival = arrival
        if abs_send_time is not None:
            pending = self._p_ast
            pending.append(abs_send_time)
            self._p_arrival.append(arrival)
            if len(pending) >= _MAX_PENDING:
                self._process_delay()

    def _process_delay(self) -> None:
        """Turn the buffered (abs-send-time, arrival) pairs into delay samples: unwrap the
        24-bit send times (64 s wrap), bin them by 20 ms of send time, keep the minimum
        one-way delay and the latest arrival of each bin (a bin closes when a later one
        starts)."""
        if not self._p_ast:
            return
        ast = np.array(self._p_ast, dtype=np.int64)
        arrival = np.array(self._p_arrival, dtype=np.float64)
        self._p_ast.clear()
        self._p_arrival.clear()
        previous = self._ast_raw
        if previous < 0:
            previous = int(ast[0])
            self._send_ext = previous
        steps = np.diff(ast, prepend=previous)
        steps = ((steps + 0x800000) & 0xFFFFFF) - 0x800000
        send = self._send_ext + np.cumsum(steps)
        self._ast_raw = int(ast[-1])
        self._send_ext = int(send[-1])
        owd = arrival - send / _AST_UNITS
        bins = send // _BIN_UNITS
        starts = np.flatnonzero(np.diff(bins, prepend=bins[0] - 1))
        lows = np.minimum.reduceat(owd, starts).tolist()
        lasts = np.maximum.reduceat(arrival, starts).tolist()
        current = self._bin
        for b, low, last in zip(bins[starts].tolist(), lows, lasts, strict=True):
            if b <= current:  # the open bin (or a reordered packet of an earlier one)
                if low < self._bin_owd:
                    self._bin_owd = low
                if last > self._bin_arrival:
                    self._bin_arrival = last
                continue
            if current >= 0:
                self._add_sample(self._bin_arrival, self._bin_owd)
            current = self._bin = b
            self._bin_owd = low
            self._bin_arrival = last

    def _add_sample(self, arrival: float, owd: float) -> None:
        k = self._s_count % _SAMPLES
        self._s_arrival[k] = arrival
        self._s_owd[k] = owd
        self._s_count += 1
        second = float(int(arrival))
        baseline = self._baseline
        if baseline and baseline[-1][0] == second:
            if owd < baseline[-1][1]:
                baseline[-1] = (second, owd)
        else:
            baseline.append((second, owd))
            while baseline[0][0] < second - self.baseline_window:
                del baseline[0]

    def on_loss(self, fraction: float) -> None:
        """The fraction (0..1) of the publisher's packets lost over the last report interval
        (e.g. ``ReceiveStatistics.fraction_lost / 256`` after each receiver report)."""
        self._loss = min(max(fraction, 0.0), 1.0)
        self._loss_fresh = True

    # -- measurements ----------------------------------------------------------------------
    def incoming_rate(self, now: float) -> float | None:
        """Bits/s received over the last ``window`` seconds (None before any packet)."""
        first = self._first_arrival
        if first is None:
            return None
        top = int(now * _BUCKETS_PER_SECOND)
        low = top - self._nbuckets + 1
        total = 0
        ids = self._bucket_id
        sizes = self._bucket_bytes
        for i in range(len(ids)):
            if low <= ids[i] <= top:
                total += sizes[i]
        start = low * _BUCKET
        if start < first:
            start = first
        span = now - start
        if span <= 0:
            return None
        return total * 8.0 / span

    def delay_signal(self, now: float) -> tuple[float, float] | None:
        """``(queue growth in s/s, queuing delay in s)`` over the last second of delay samples
        (least-squares slope of the one-way delay, and the latest delay above its minimum
        over ``baseline_window``), or None without abs-send-time data (or too little)."""
        self._process_delay()
        count = min(self._s_count, _SAMPLES)
        if count < 6:
            return None
        arrival = np.array(self._s_arrival[:count])
        owd = np.array(self._s_owd[:count])
        recent = arrival >= now - 1.0
        if int(recent.sum()) < 6:
            return None
        t = arrival[recent]
        d = owd[recent]
        order = np.argsort(t)
        t = t[order]
        d = d[order]
        tc = t - t.mean()
        denom = float((tc * tc).sum())
        slope = float((tc * (d - d.mean())).sum()) / denom if denom > 0 else 0.0
        baseline = min(v for _, v in self._baseline) if self._baseline else float(d.min())
        queue = float(d[-3:].mean()) - baseline
        return slope, queue

    # -- output ----------------------------------------------------------------------------
    def estimate(self, now: float) -> int | None:
        """The estimate in bits/s at ``now`` (updating the controller), or None before
        ``warmup`` seconds of arrivals. Calling it twice at the same ``now`` changes nothing."""
        first = self._first_arrival
        if first is None or now - first < self.warmup:
            return None
        measured = self.incoming_rate(now) or 0.0
        bitrate = self.bitrate
        if bitrate is None:
            bitrate = max(float(self.start_bitrate), self.headroom * measured)
            self._last_update = now
            return self._set(bitrate)
        dt = now - self._last_update
        if dt <= 0:
            return int(bitrate)
        self._last_update = now
        dt = min(dt, 1.0)
        signal = self.delay_signal(now)
        overuse = draining = False
        if signal is not None:
            slope, queue = signal
            overuse = (queue > self.queue_threshold and slope > self.slope_threshold) or (
                queue > self.severe_queue and slope > -self.slope_threshold
            )
            draining = queue > self.queue_threshold and slope < -self.slope_threshold
        loss_decrease = self._loss_fresh and self._loss > self.high_loss
        if loss_decrease or (overuse and now - self._last_decrease >= self.decrease_interval):
            self._loss_fresh = False
            self._last_decrease = now
            target = max(self.decrease_factor * measured, float(self.min_bitrate))
            if target < bitrate:
                bitrate = target
                self.decreases += 1
            self.state = "decrease"
        elif (
            overuse
            or draining
            or self._loss > self.low_loss
            or now - self._last_decrease < self.hold_after_decrease
        ):
            self.state = "hold"
        else:
            grown = max(bitrate * self.increase_factor**dt, bitrate + self.min_increase * dt)
            cap = self.headroom * measured + self.probe_margin
            if grown > cap:
                grown = max(bitrate, cap)
            bitrate = grown
            self.state = "increase"
        return self._set(bitrate)

    def _set(self, bitrate: float) -> int:
        if bitrate < self.min_bitrate:
            bitrate = float(self.min_bitrate)
        elif bitrate > self.max_bitrate:
            bitrate = float(self.max_bitrate)
        self.bitrate = bitrate
        return int(bitrate)

    def should_send(self, now: float) -> bool:
        """True when a REMB is due: the first estimate, ``send_interval`` after the last one,
        or at once when the estimate fell more than ``drop_threshold`` below the last one
        sent. A True answer records :meth:`estimate` as sent: send it now."""
        value = self.estimate(now)
        if value is None:
            return False
        last = self._last_sent
        if (
            last is None
            or now - self._last_sent_time >= self.send_interval
            or value < last * (1.0 - self.drop_threshold)
        ):
            self._last_sent = value
            self._last_sent_time = now
            return True
        return False
