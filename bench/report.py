"""Markdown tables and matplotlib plots from a bench result (the JSON written by the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.hotpath import STAGES

SYSTEM_LABELS = {
    "relay": "relay",
    "janus": "Janus videoroom",
    "ceiling": "bare uvloop UDP forwarder",
    "naive_aiortc": "naive aiortc relay",
}


def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _pct(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f}%"


def _lat(result: dict[str, Any], key: str) -> str:
    return _f(result.get("latency_ms", {}).get(key), 2)


def _mb(result: dict[str, Any]) -> str:
    rss = result.get("server_memory", {}).get("rss_bytes")
    return "–" if not rss else f"{rss / 2**20:.0f}"


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"# Bench: `{data['command']}`{' (quick)' if data.get('quick') else ''}",
        "",
        f"{data['created_at']}; {m['cpu_model']}, {m['cpus']} CPUs, Python {m['python']}, "
        f"kernel {m['kernel']}; {data['network']}; load average before "
        f"{data.get('load_average_before')} after {data.get('load_average_after')}.",
        f"Server under test on core {data['pinning']['server_core']}, load generator on core "
        f"{data['pinning']['generator_core']}."
        if data["pinning"].get("server_core") is not None
        else f"Pinning: {data['pinning'].get('note')}.",
        "",
    ]
    ratios = data.get("ratios", {})
    if any(v is not None for v in ratios.values()) or data.get("command") in ("compare", "all"):
        lines += [
            "## Ratios (CPU per forwarded packet, relay / other: lower is better for the relay)",
            "",
            "| ratio | value |",
            "|---|---|",
        ]
        for key, value in ratios.items():
            lines.append(f"| `{key}` | {_f(value, 3)} |")
        for name, reason in data.get("skipped", {}).items():
            lines.append(f"| {name} skipped | {reason} |")
        lines.append("")
    if "hotpath" in data:
        lines += _hotpath(data["hotpath"])
    if "load" in data:
        lines += _load(data["load"])
    if "compare" in data:
        lines += _compare(data["compare"])
    if "simulcast" in data:
        lines += _simulcast(data["simulcast"])
    if "soak" in data:
        lines += _soak(data["soak"])
    if "workers" in data:
        from bench.workers import report_lines

        lines += report_lines(data["workers"])
        return "\n".join(lines) + "\n"
    if "targets" in data and data.get("command") not in ("soak", "simulcast"):
        lines += [
            "## Targets (measured, not asserted)",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for name, t in data["targets"].items():
            shown = {k: v for k, v in t.items() if k != "met"}
            met = {True: "yes", False: "no", None: "not measured"}[t["met"]]
            lines.append(f"| {name} | {_compact(shown)} | {met} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _compact(values: dict[str, Any]) -> str:
    out = []
    for k, v in values.items():
        out.append(f"{k}={_f(v, 3) if isinstance(v, float) else v}")
    return ", ".join(out)


def _hotpath(h: dict[str, Any]) -> list[str]:
    lines = [
        "## Hot path: ns per input packet, p50 (p99)",
        "",
        f"{h['method']}; {h['samples_per_stage']} samples per stage.",
        "",
    ]
    for kind in ("audio", "video"):
        rows = [r for r in h["results"] if r["kind"] == kind]
        if not rows:
            continue
        size = rows[0]["packet_bytes"]
        header = "| stage | " + " | ".join(f"fan-out {r['fanout']}" for r in rows) + " |"
        lines += [f"### {kind} ({size} B SRTP)", "", header, "|---" * (len(rows) + 1) + "|"]
        for stage in STAGES:
            cells = []
            for r in rows:
                s = r["stages_ns"][stage]
                cells.append(f"{s['p50']:,.0f} ({s['p99']:,.0f})")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        cells = [f"{r['per_copy_ns']['forward']['p50']:,.0f}" for r in rows]
        lines.append("| forward per copy (p50) | " + " | ".join(cells) + " |")
        cells = [f"{r['forward_minus_stages_ns']:,.0f}" for r in rows]
        lines.append("| forward − sum of stages | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


LOAD_HEADER = (
    "| scenario | receivers | forwarded pkt/s | loss | reordered | latency p50 / p90 / p99 / p99.9 ms "
    "| CPU µs/pkt | pkt per CPU-s | server CPU | RSS MB | loop lag ms | other procs CPU |"
)


def _load_row(name: str, r: dict[str, Any]) -> str:
    lag = r.get("relay_metrics", {}).get("event_loop_lag_s")
    if r.get("disturbed"):
        name += " (busy machine)"
    return (
        f"| {name} | {r.get('receivers')} | {_f(r.get('forwarded_pps'), 0)} | {_pct(r.get('loss'))} "
        f"| {_f(r.get('reordered'))} | {_lat(r, 'p50')} / {_lat(r, 'p90')} / {_lat(r, 'p99')} / "
        f"{_lat(r, 'p99.9')} | {_f(r.get('cpu_per_packet_us'), 1)} "
        f"| {_f(r.get('packets_per_cpu_second'), 0)} | {_pct(r.get('server_cpu_fraction'), 0)} "
        f"| {_mb(r)} | {_f(None if lag is None else lag * 1e3, 1)} "
        f"| {_pct(r.get('background_cpu_fraction'), 0)} |"
    )


def _load(load: dict[str, Any]) -> list[str]:
    lines = [
        "## Load: the relay in its own process",
        "",
        "Latency: the publisher's `sendmmsg` of the packet's frame to the subscriber socket's "
        "kernel receive timestamp. "
        "'other procs CPU': what other processes on the machine used during the window (in "
        "cores); a window above 30 % is measured again, and marked '(busy machine)' if it "
        "stays so.",
        "",
        LOAD_HEADER,
        "|---" * 12 + "|",
    ]
    scenarios = load.get("scenarios", {})
    for name, r in scenarios.items():
        if name != "ramp":
            lines.append(_load_row(name, r))
    lines.append("")
    ramp = scenarios.get("ramp")
    if ramp:
        cap = ramp.get("capacity")
        lines += [
            "### Ramp: one publisher (1 Mbit/s video) and more subscribers per step",
            "",
            f"Stopped: {ramp['stop_reason']}. Capacity of one core: "
            + (
                f"**{cap['forwarded_pps']:,.0f} forwarded packets/s** "
                f"({cap['subscribers']} subscribers, {cap['cpu_per_packet_us']:.1f} µs CPU per packet)."
                if cap
                else "no step within the limits."
            ),
            "",
            LOAD_HEADER.replace("scenario", "subscribers"),
            "|---" * 12 + "|",
        ]
        for step in ramp["steps"]:
            lines.append(_load_row(str(step["subscribers"]), step))
        lines.append("")
    for name, error in load.get("errors", {}).items():
        lines.append(f"- {name}: {error}")
    return lines


def _soak(soak: dict[str, Any]) -> list[str]:
    plan, totals, rss = soak["plan"], soak["totals"], soak["rss"]
    basis = plan["basis"]
    if plan.get("capacity_pps"):
        basis += (
            f": {plan['fraction_of_capacity']:.0%} of {plan['capacity_pps']:,.0f} forwarded "
            "packets/s"
        )

    def mib(value: Any) -> str:
        return "–" if not value else f"{value / 2**20:.1f}"

    lines = [
        "## Soak: one publisher (1 Mbit/s video) held at a steady load",
        "",
        f"{plan['subscribers']} subscribers ({basis}; target "
        f"{plan['target_forwarded_pps']:,.0f} forwarded packets/s) for "
        f"{soak['duration_s']:g} s after {soak['warmup_s']:g} s of warm-up, in slices of "
        f"{soak['slice_s']:g} s. Loss {_pct(totals['loss'], 3)} "
        f"({totals['lost']} of {totals['expected']} packets; worst slice "
        f"{_pct(totals['worst_slice_loss'], 3)}); latency p99 median slice "
        f"{_f(totals['latency_p99_ms_median_slice'], 2)} ms, worst "
        f"{_f(totals['latency_p99_ms_worst_slice'], 2)} ms. Relay RSS "
        f"{mib(rss['start_bytes'])} MiB after warm-up, {mib(rss['end_bytes'])} MiB at the end "
        f"({_pct(rss['growth_fraction'], 1)}); {totals['busy_slices']} slice(s) disturbed by "
        "other processes (over 30 % of a core); participants in the relay "
        f"{_f(totals.get('participants_start'), 0)} at the first slice, "
        f"{_f(totals.get('participants_end'), 0)} at the last; load shed in "
        f"{totals.get('shedding_slices', 0)} slice(s).",
        "",
        "| t (s) | forwarded pkt/s | loss | latency p50 / p90 / p99 / p99.9 / max (ms) "
        "| relay CPU | RSS (MiB) | loop lag (ms) | other procs CPU |",
        "|---" * 8 + "|",
    ]
    for s in soak["slices"]:
        lat = s.get("latency_ms") or {}
        lag = (s.get("relay_metrics") or {}).get("event_loop_lag_s")
        lines.append(
            f"| {s['t_s']:g} | {_f(s['forwarded_pps'], 0)} | {_pct(s['loss'], 3)} | "
            + " / ".join(_f(lat.get(k), 2) for k in ("p50", "p90", "p99", "p99.9", "max"))
            + f" | {_pct(s['server_cpu_fraction'], 0)} | {mib(s['rss_bytes'])} "
            f"| {_f(None if lag is None else lag * 1e3, 1)} "
            f"| {_pct(s['background_cpu_fraction'], 0)} |"
        )
    lines.append("")
    return lines


def _compare(c: dict[str, Any]) -> list[str]:
    lines = [
        "## Compare: the same load on each system",
        "",
        "One publisher (opus-sized 120 B at 50 pkt/s + 1 Mbit/s video in 1200 B packets) to N "
        "subscribers.",
        "",
        LOAD_HEADER.replace("scenario", "system, N"),
        "|---" * 12 + "|",
    ]
    for system, results in c.get("fanout", {}).items():
        for r in results:
            lines.append(_load_row(f"{SYSTEM_LABELS.get(system, system)}, {r['subscribers']}", r))
    lines.append("")
    if c.get("codec"):
        lines += [
            "Real VP8 (320x240, 15 fps, about 0.4 Mbit/s) to a few subscribers, for the decoding "
            "baseline (latency and loss are not matched on re-encoded packets):",
            "",
            LOAD_HEADER.replace("scenario", "system"),
            "|---" * 12 + "|",
        ]
        for system, r in c["codec"].items():
            lines.append(_load_row(SYSTEM_LABELS.get(system, system), r))
        lines.append("")
    for name, reason in c.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    for name, error in c.get("errors", {}).items():
        lines.append(f"- {name} failed: {error}")
    return lines + [""]


def _us(value: Any) -> str:
    return _f(value, 1)


def _simulcast(sim: dict[str, Any]) -> list[str]:
    layers = ", ".join(
        f"{x['rid']} {x['width']}x{x['height']} {x['bitrate_bps'] / 1e3:.0f} kbit/s "
        f"({x['packets_per_second']:g} pkt/s of {x['packet_bytes']} B)"
        for x in sim.get("layers", [])
    )
    single = sim.get("single_layer", {})
    feedback = (
        "Subscribers send transport-cc feedback every 100 ms when the server's offer has the "
        "extension, and accept RTX: the relay estimates each subscriber's bandwidth (probing "
        "it) and chooses layers within that estimate and the size wishes."
        if sim.get("transport_cc_feedback")
        else "Subscribers send no transport-cc feedback: the relay has no bandwidth estimate "
        "and chooses layers by the size wishes alone."
    )
    lines = [
        "## Simulcast: estimation and switching per subscriber",
        "",
        f"One publisher, three RID simulcast VP8 layers ({layers}; a keyframe every "
        f"{sim.get('keyframe_interval_s', 0):g} s) to N subscribers, a third asking for each "
        "layer (relay: `max_height`; Janus: `substream`). `switching`: every subscriber asks for "
        f"a layer every {sim.get('switch_period_s', 1):g} s, on the `no feedback` connections "
        "(fresh ones whose answers drop transport-cc: no estimate, layers by size wishes alone, "
        "so every move is taken at the next keyframe): the next one for the subscribers in "
        "whole triples (q, h, f rotate: the mix of layers stays the same), the same one for "
        "the others. `requests`: the same requests, each for the layer the subscriber is on "
        "already (the signalling alone). µs CPU/switch: for `switching`, the CPU above the "
        "`requests` window per layer change the receivers saw (the switch beyond its request: "
        "keyframe request, switch, renumbering); for `requests`, the CPU above the `no "
        "feedback` window per request. "
        "`single layer`: one non-simulcast stream of the same total rate "
        f"({(single.get('bitrate_bps') or 0) / 1e6:.2f} Mbit/s) to every subscriber. "
        "CPU per received packet is all the server's CPU over the packets the publisher sent. "
        + feedback,
        "",
        "| system, N, window | fwd pkt/s | CPU | µs CPU/fwd pkt | µs CPU/recv pkt | loss "
        "| p50 ms | p99 ms | layers got (q/h/f) | requests/switches seen | µs CPU/switch "
        "| feedbacks | busy |",
        "|---" * 13 + "|",
    ]
    for system, results in sim.get("runs", {}).items():
        for r in results:
            n = r["subscribers"]
            for window in ("simulcast", "no_feedback", "switching", "requests", "single_layer"):
                w = r.get(window)
                if not w:
                    continue
                got = (w.get("layers") or {}).get("received_mostly")
                switches = (
                    f"{w.get('requests')}/{w.get('layer_switches_seen')}"
                    if window in ("switching", "requests")
                    else "–"
                )
                per = w.get("cpu_per_switch_us" if window == "switching" else "cpu_per_request_us")
                lines.append(
                    f"| {SYSTEM_LABELS.get(system, system)}, {n}, {window.replace('_', ' ')} "
                    f"| {_f(w.get('forwarded_pps'), 0)} | {_pct(w.get('server_cpu_fraction'), 1)} "
                    f"| {_us(w.get('cpu_per_packet_us'))} "
                    f"| {_us(w.get('cpu_per_received_packet_us'))} | {_pct(w.get('loss'))} "
                    f"| {_lat(w, 'p50')} | {_lat(w, 'p99')} "
                    f"| {'/'.join(str(v) for v in got.values()) if got else '–'} | {switches} "
                    f"| {_us(per)} | {w.get('feedback_packets', '–')} "
                    f"| {'yes' if w.get('disturbed') else 'no'} |"
                )
    lines.append("")
    ratios = sim.get("ratios", {})
    if ratios:
        keys = sorted({k for v in ratios.values() for k in v})
        lines += [
            "Ratios (lower is better for the relay; `simulcast_vs_single_layer`: the cost of "
            "simulcast per forwarded packet on the same server):",
            "",
            "| ratio | " + " | ".join(f"N = {n}" for n in ratios) + " |",
            "|---" * (len(ratios) + 1) + "|",
        ]
        for key in keys:
            lines.append(
                f"| `{key}` | " + " | ".join(_f(v.get(key), 3) for v in ratios.values()) + " |"
            )
        lines.append("")
    est = sim.get("estimation")
    if est:
        lines += [
            f"The relay's CPU per transport-cc feedback of {est['packets_per_feedback']} packets "
            f"(`bench.estimation`, in-process): p50 {est['p50_ns'] / 1000:.1f} µs, "
            f"p90 {est['p90_ns'] / 1000:.1f} µs.",
            "",
        ]
    for system, results in sim.get("runs", {}).items():
        for r in results:
            e = r.get("estimation") or {}
            if e.get("cpu_per_feedback_us") is not None:
                lines.append(
                    f"- {system}, N = {r['subscribers']}: {e['feedbacks_per_second']:.0f} "
                    f"transport-cc feedbacks/s; CPU per feedback in the server "
                    f"{e['cpu_per_feedback_us']:.1f} µs (the simulcast window's CPU less what "
                    "its forwarded packets cost in the window without feedback: stamping, "
                    "feedback, estimate, probes, allocation)"
                    + (" (disturbed)" if e.get("disturbed") else "")
                )
            sw = r.get("switching") or {}
            if sw.get("cpu_per_switch_with_request_us") is not None:
                lines.append(
                    f"- {system}, N = {r['subscribers']}: CPU per switch with its request "
                    f"{sw['cpu_per_switch_with_request_us']:.1f} µs (the `switching` window "
                    "above the `no feedback` one, per layer change seen)"
                )
            settled = r.get("settled") or {}
            if settled and settled.get("on_asked_layer") != settled.get("subscribers"):
                lines.append(
                    f"- {system}, N = {r['subscribers']}: {settled.get('on_asked_layer')} of "
                    f"{settled.get('subscribers')} subscribers on the layer they ask for after "
                    f"{settled.get('seconds')} s"
                )
            est_r = (r.get("simulcast") or {}).get("relay_estimates") or {}
            if est_r.get("estimated_bitrate_bps", {}).get("median") is not None:
                e = est_r["estimated_bitrate_bps"]
                lines.append(
                    f"- {system}, N = {r['subscribers']}: subscriber estimates "
                    f"{est_r.get('estimate_sources')}, min {e['min'] / 1e6:.2f} / median "
                    f"{e['median'] / 1e6:.2f} / max {e['max'] / 1e6:.2f} Mbit/s"
                )
    for name, reason in sim.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {reason}")
    for name, error in sim.get("errors", {}).items():
        lines.append(f"- {name} failed: {error}")
    return lines + [""]


# ---------------------------------------------------------------------------------------------


def plots(data: dict[str, Any], out: Path) -> list[str]:
    """Write the PNGs this result has data for; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    compare = data.get("compare") or {}
    fanout = compare.get("fanout", {})
    # latency CDF per system, at the largest fan-out every system ran
    common = None
    for results in fanout.values():
        ns = {r["subscribers"] for r in results if r.get("latency_cdf_ms")}
        common = ns if common is None else common & ns
    if common:
        n = max(common)
        from bench.load import CDF_QUANTILES

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for system, results in fanout.items():
            r = next(r for r in results if r["subscribers"] == n)
            ax.plot(r["latency_cdf_ms"], CDF_QUANTILES, label=SYSTEM_LABELS.get(system, system))
        ax.set_xscale("log")
        ax.set_xlabel("latency from the publisher's send to the subscriber socket (ms, log)")
        ax.set_ylabel("percentile")
        ax.set_title(f"Latency CDF, 1 publisher to {n} subscribers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "latency_cdf.png")
    # CPU vs subscribers
    ramp = (data.get("load") or {}).get("scenarios", {}).get("ramp")
    if fanout or ramp:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for system, results in fanout.items():
            if results:
                ax.plot(
                    [r["subscribers"] for r in results],
                    [r["server_cpu_fraction"] * 100 for r in results],
                    marker="o",
                    label=f"{SYSTEM_LABELS.get(system, system)} (audio+video)",
                )
        if ramp and ramp["steps"]:
            ax.plot(
                [s["subscribers"] for s in ramp["steps"]],
                [s["server_cpu_fraction"] * 100 for s in ramp["steps"]],
                marker="s",
                linestyle="--",
                label="relay, ramp (1 Mbit/s video)",
            )
        ax.set_xlabel("subscribers of one publisher")
        ax.set_ylabel("server CPU (% of one core)")
        ax.set_title("CPU vs subscribers")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "cpu_vs_subscribers.png")
    if ramp and ramp["steps"]:
        steps = ramp["steps"]
        subs = [s["subscribers"] for s in steps]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(subs, [s["forwarded_pps"] for s in steps], marker="o", color="C0")
        ax.set_xlabel("subscribers of one 1 Mbit/s publisher")
        ax.set_ylabel("forwarded packets/s", color="C0")
        ax2 = ax.twinx()
        ax2.plot(
            subs,
            [s["latency_ms"].get("p99", float("nan")) for s in steps],
            marker="^",
            color="C3",
            label="latency p99 (ms)",
        )
        ax2.plot(subs, [s["loss"] * 100 for s in steps], marker="x", color="C2", label="loss (%)")
        ax2.set_yscale("symlog", linthresh=1.0)
        ax2.set_ylabel("p99 ms / loss %")
        ax2.legend(loc="upper left")
        cap = ramp.get("capacity")
        title = "Capacity of one core"
        if cap:
            title += f": {cap['forwarded_pps']:,.0f} pkt/s at {cap['subscribers']} subscribers"
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        save(fig, "capacity.png")
    if data.get("workers"):
        from bench.workers import plot as workers_plot

        if workers_plot(data["workers"], out / "workers.png"):
            written.append("workers.png")
    hot = data.get("hotpath")
    if hot:
        rows = [r for r in hot["results"] if r["kind"] == "video"] or hot["results"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        bottom = [0.0] * len(rows)
        labels = [str(r["fanout"]) for r in rows]
        for stage in STAGES:
            if stage == "forward":
                continue
            values = [r["stages_ns"][stage]["p50"] / 1000 for r in rows]
            ax.bar(labels, values, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.plot(
            labels,
            [r["stages_ns"]["forward"]["p50"] / 1000 for r in rows],
            "k_",
            markersize=28,
            label="whole forward",
        )
        ax.set_xlabel("fan-out (subscribers)")
        ax.set_ylabel("µs per input packet (p50)")
        ax.set_title(f"Hot path stages, {rows[0]['kind']} packets")
        ax.legend(fontsize=8)
        save(fig, "hotpath.png")
    return written
