"""Histograms as inline SVG: pure functions, no plotting library, no external resource."""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np


def histogram(values: Sequence[float], *, bins: int, lo: float, hi: float) -> np.ndarray:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi] -> int64 [bins]. Values outside
    are clipped into the end bins; NaN is left out; the last bin includes ``hi``."""
    if bins < 1 or not hi > lo:
        raise ValueError(f"need bins >= 1 and hi > lo, got bins={bins}, lo={lo}, hi={hi}")
    v = np.asarray(values, np.float64).reshape(-1)
    v = np.clip(v[~np.isnan(v)], lo, hi)
    counts, _ = np.histogram(v, bins=bins, range=(lo, hi))
    return counts.astype(np.int64)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def histogram_svg(values: Sequence[float], *, title: str, xlabel: str, bins: int = 20, lo: float = 0.0, hi: float = 1.0,
                  width: int = 360, height: int = 200) -> str:
    """An SVG bar chart of ``histogram(values)``: one ``<rect class="bar">`` per bin (in bin
    order, carrying ``data-count``, ``data-lo``, ``data-hi`` and a ``<title>`` tooltip), axis ticks
    at lo, the middle and hi, the largest count on the y axis. Sizes in CSS pixels."""
    counts = histogram(values, bins=bins, lo=lo, hi=hi)
    ml, mr, mt, mb = 34, 10, 22, 34  # margins: left, right, top, bottom
    pw, ph = width - ml - mr, height - mt - mb
    top = max(int(counts.max()), 1)
    bw = pw / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{width / 2:.1f}" y="14" text-anchor="middle" class="t">{escape(title)}</text>']
    edges = np.linspace(lo, hi, bins + 1)
    for k, c in enumerate(counts):
        h = ph * int(c) / top
        x, y = ml + k * bw, mt + ph - h
        parts.append(f'<rect class="bar" x="{x + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}" '
                     f'data-count="{int(c)}" data-lo="{_fmt(edges[k])}" data-hi="{_fmt(edges[k + 1])}">'
                     f'<title>{_fmt(edges[k])} to {_fmt(edges[k + 1])}: {int(c)}</title></rect>')
    base = mt + ph
    parts.append(f'<line x1="{ml}" y1="{base}" x2="{ml + pw}" y2="{base}" class="axis"/>')
    parts.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{base}" class="axis"/>')
    for frac in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{ml + frac * pw:.1f}" y="{base + 13}" text-anchor="middle">{_fmt(lo + frac * (hi - lo))}</text>')
    parts.append(f'<text x="{ml - 4}" y="{mt + 4}" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{ml - 4}" y="{base}" text-anchor="end">0</text>')
    n = int(counts.sum())
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">{escape(xlabel)} (n = {n})</text>')
    parts.append("</svg>")
    return "".join(parts)
