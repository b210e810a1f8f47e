"""Charts as inline SVG strings, computed in Python (no JavaScript, no network to view them).

``latency_violins``: one violin (Gaussian KDE) per engine and run on a shared latency axis,
with the interquartile box, the median and its confidence interval, and the p99 tick; the axis
turns logarithmic when engines differ by an order of magnitude. ``op_bars``: the slowest
kernels as horizontal bars labelled with their share of the run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np

COLORS = {"edgekit": "#2563eb", "ort": "#ea580c", "torch": "#16a34a"}
_OTHER = ("#7c3aed", "#db2777", "#0891b2")
WIDTH, LEFT, RIGHT, ROW, TOP, BOTTOM = 760, 190, 24, 58, 16, 46
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'


def color(engine: str) -> str:
    return COLORS.get(engine, _OTHER[sum(map(ord, engine)) % len(_OTHER)])


def _kde(t: np.ndarray, grid: np.ndarray) -> np.ndarray:
    if t.size > 4000:  # enough for the shape; keeps long runs fast
        t = np.sort(t)[np.linspace(0, t.size - 1, 4000).astype(int)]
    std = t.std()
    iqr = np.subtract(*np.percentile(t, [75, 25]))
    spread = min(std, iqr / 1.34) if iqr > 0 else std
    bw = 0.9 * (spread or abs(t.mean()) * 1e-3 or 1e-6) * t.size ** -0.2
    z = (grid[:, None] - t[None, :]) / bw
    dens = np.exp(-0.5 * z * z).sum(axis=1)
    return dens / dens.max() if dens.max() > 0 else dens


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        out = []
        for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
            out += [m * 10.0 ** k for m in (1, 2, 5) if lo <= m * 10.0 ** k <= hi]
        return out
    step = 10 ** math.floor(math.log10((hi - lo) / 5 or 1))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 7:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def latency_violins(rows: Sequence[tuple[str, str, Sequence[float], Sequence[float]]],
                    chart_id: str = "latency-chart",
                    title: str = "Latency distribution per engine") -> str:
    """``rows``: (label, engine, per-call times in ms, [CI low, CI high] of the median)."""
    arrays = [np.asarray(t, dtype=np.float64) for _, _, t, _ in rows]
    lo = min(float(np.percentile(a, 0.5)) for a in arrays)
    hi = max(float(np.percentile(a, 99.5)) for a in arrays)
    log = lo > 0 and hi / lo > 8
    if log:
        lo, hi = lo / 1.15, hi * 1.15
    else:
        pad = (hi - lo) * 0.06 or hi * 0.05 or 1e-3
        lo, hi = max(0.0, lo - pad), hi + pad
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    span = f(hi) - f(lo)

    def x(v: float) -> float:
        v = min(max(v, lo), hi)
        return LEFT + (f(v) - f(lo)) / span * (WIDTH - LEFT - RIGHT)

    height = TOP + ROW * len(rows) + BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{chart_id}" class="chart" '
             f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
             f'{_FONT}><title>{escape(title)}</title>'
             f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>']
    bottom = TOP + ROW * len(rows)
    for tv in _ticks(lo, hi, log):
        tx = x(tv)
        parts.append(f'<line x1="{tx:.1f}" y1="{TOP}" x2="{tx:.1f}" y2="{bottom}" '
                     f'stroke="#e5e7eb"/><text x="{tx:.1f}" y="{bottom + 16}" '
                     f'text-anchor="middle" fill="#374151">{tv:g}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.0f}" y="{bottom + 36}" '
                 f'text-anchor="middle" fill="#111827">latency per call (ms'
                 f'{", log scale" if log else ""})</text>')
    for i, ((label, engine, _, ci), t) in enumerate(zip(rows, arrays, strict=True)):
        mid, half, c = TOP + ROW * i + ROW / 2, ROW * 0.42, color(engine)
        t_lo, t_hi = float(np.percentile(t, 0.5)), float(np.percentile(t, 99.5))
        grid = np.geomspace(max(t_lo, 1e-9), max(t_hi, t_lo * 1.0001, 1e-9), 90) if log \
            else np.linspace(t_lo, max(t_hi, t_lo + 1e-9), 90)
        dens = _kde(np.log(t), np.log(grid)) if log else _kde(t, grid)  # KDE on the axis' scale
        top = " ".join(f"{x(g):.1f},{mid - d * half:.1f}" for g, d in zip(grid, dens,
                                                                         strict=True))
        bot = " ".join(f"{x(g):.1f},{mid + d * half:.1f}" for g, d in zip(grid[::-1],
                                                                         dens[::-1],
                                                                         strict=True))
        q1, med, q3, p99 = (float(v) for v in np.percentile(t, [25, 50, 75, 99]))
        tip = (f"{label}: n={t.size}, median {med:.4g} ms (95% CI {ci[0]:.4g}-{ci[1]:.4g}), "
               f"p99 {p99:.4g} ms, min {t.min():.4g}, max {t.max():.4g}")
        parts.append(
            f'<g class="violin" data-engine="{escape(engine)}"><title>{escape(tip)}</title>'
            f'<text x="{LEFT - 10}" y="{mid + 4:.1f}" text-anchor="end" fill="#111827">'
            f'{escape(label)}</text>'
            f'<polygon points="{top} {bot}" fill="{c}" fill-opacity="0.35" stroke="{c}"/>'
            f'<rect x="{x(q1):.1f}" y="{mid - 5:.1f}" width="{max(x(q3) - x(q1), 1):.1f}" '
            f'height="10" fill="{c}" fill-opacity="0.8"/>'
            f'<rect x="{x(ci[0]):.1f}" y="{mid - 11:.1f}" '
            f'width="{max(x(ci[1]) - x(ci[0]), 1.5):.1f}" height="22" fill="#111827" '
            f'fill-opacity="0.25"/>'
            f'<line x1="{x(med):.1f}" y1="{mid - 11:.1f}" x2="{x(med):.1f}" y2="{mid + 11:.1f}" '
            f'stroke="#111827" stroke-width="2"/>'
            f'<line x1="{x(p99):.1f}" y1="{mid - 6:.1f}" x2="{x(p99):.1f}" y2="{mid + 6:.1f}" '
            f'stroke="{c}" stroke-width="2"/>'
            f'<text x="{x(med):.1f}" y="{mid - half + 2:.1f}" text-anchor="middle" '
            f'font-size="11" fill="#111827">{med:.3g} ms</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def op_bars(per_op: Sequence[dict[str, Any]], top: int = 15, chart_id: str = "per-op-chart",
            title: str = "Slowest kernels (total time per run)") -> str:
    """Horizontal bars of the ``top`` kernels by total time."""
    rows = sorted(per_op, key=lambda r: -float(r["total_ms"]))[:top]
    height = TOP + 26 * len(rows) + 24
    biggest = max((float(r["total_ms"]) for r in rows), default=0.0) or 1.0
    left, width = 300, WIDTH - 300 - 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{chart_id}" class="chart" '
             f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img" '
             f'{_FONT}><title>{escape(title)}</title>'
             f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>']
    for i, r in enumerate(rows):
        y = TOP + 26 * i
        w = max(float(r["total_ms"]) / biggest * width, 1)
        nodes = ", ".join(r.get("onnx_nodes") or []) or "no ONNX node recorded"
        name = str(r["kernel"])
        short = name if len(name) <= 44 else name[:41] + "..."
        share = r.get("share")
        tip = (f"{name}: {r['total_ms']:.4g} ms in {r['calls']} calls"
               f"{'' if share is None else f' ({share:.1%})'}; ONNX: {nodes}")
        parts.append(
            f'<g class="bar"><title>{escape(tip)}</title>'
            f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" fill="#111827">'
            f'{escape(short)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="18" fill="#2563eb" '
            f'fill-opacity="0.75"/>'
            f'<text x="{left + w + 6:.1f}" y="{y + 15}" fill="#374151">'
            f'{r["total_ms"]:.3g} ms{"" if share is None else f" · {share:.0%}"}</text></g>')
    parts.append("</svg>")
    return "".join(parts)
