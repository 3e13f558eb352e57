"""Static inline SVG charts for ``report.html``.

Chart approach: the SVG is drawn here, in Python, rather than shipped as a Vega-Lite spec
with its JavaScript runtime or converted by Altair + vl-convert. The report must open with no
network and be byte-identical for identical inputs; hand-drawn SVG needs no script, no extra
dependency and no converter binary, and the two chart kinds the report needs (horizontal
stacked bars and multi-series lines) are short to draw. Hover tooltips come from SVG
``<title>`` elements, which browsers show natively.

Every coordinate is rounded to 0.1 px so output bytes do not depend on float noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

FONT_PX = 12
CHAR_PX = 7.0  # average glyph width of the 12 px sans-serif stack, for label layout only
GRID = "#e5e7eb"
AXIS = "#9ca3af"


def _c(x: float) -> str:
    """A coordinate with at most one decimal, no trailing '.0'."""
    s = f"{x:.1f}"
    return s[:-2] if s.endswith(".0") else s


def compact(v: float) -> str:
    """1234567 -> '1.23M': axis ticks and bar-end labels, where width is scarce."""
    if v == 0:
        return "0"
    a = abs(v)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.3g}"


def nice_ticks(vmax: float, target: int = 5) -> list[float]:
    """Ticks from 0 to a round number >= vmax, on a 1-2-2.5-5 step."""
    if not vmax > 0:
        return [0.0, 1.0]
    raw = vmax / target
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if step * target >= vmax:
            break
    if vmax >= 1 and step < 1:  # counters are integers: no 0.5 ticks on a count axis
        step = 1.0
    n = max(1, math.ceil(vmax / step - 1e-9))
    return [i * step for i in range(n + 1)]


def _text(x, y, s, anchor="start", cls="", extra="") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{_c(x)}" y="{_c(y)}" text-anchor="{anchor}"{c}{extra}>{escape(s)}</text>'


@dataclass(frozen=True)
class BarRow:
    label: str
    values: Sequence[float]  # one per series, same order as the series list
    note: str = ""  # shown after the bar (e.g. a total); computed by the caller


def stacked_bars(
    rows: Sequence[BarRow],
    series: Sequence[tuple[str, str]],
    *,
    normalize: bool = False,
    width: int = 1080,
    value_fmt: Callable[[float], str] = compact,
    aria: str = "",
) -> str:
    """Horizontal stacked bars, one per row; ``series`` is [(name, colour)].

    ``normalize`` scales each bar to 100 % (composition); otherwise bars share one linear
    axis so that their lengths compare.
    """
    bar_h, gap, top, axis_h = 22, 10, 6, 26
    label_w = min(300.0, max(90.0, CHAR_PX * max((len(r.label) for r in rows), default=4) + 14))
    right = 14 if normalize else 96
    plot_w = width - label_w - right
    height = top + len(rows) * (bar_h + gap) + axis_h
    totals = [sum(r.values) for r in rows]
    ticks = [0, 25, 50, 75, 100] if normalize else nice_ticks(max(totals, default=0))
    top_tick = ticks[-1]
    out = [
        (
            f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img"'
            f' aria-label="{escape(aria)}" font-size="{FONT_PX}">'
        )
    ]
    plot_bottom = top + len(rows) * (bar_h + gap)
    for t in ticks:
        x = label_w + plot_w * t / top_tick
        out.append(
            f'<line x1="{_c(x)}" y1="{top}" x2="{_c(x)}" y2="{_c(plot_bottom)}" stroke="{GRID}"/>'
        )
        out.append(
            _text(x, plot_bottom + 16, f"{t:g}%" if normalize else compact(t), "middle", "tick")
        )
    for i, (row, total) in enumerate(zip(rows, totals, strict=True)):
        y = top + i * (bar_h + gap) + gap / 2
        out.append(_text(label_w - 8, y + bar_h / 2 + 4, row.label, "end", "label"))
        x = label_w
        scale = (plot_w / total if total else 0) if normalize else plot_w / top_tick
        for (name, colour), v in zip(series, row.values, strict=True):
            if v <= 0:
                continue
            w = v * scale
            share = v / total * 100 if total else 0
            out.append(
                f'<rect x="{_c(x)}" y="{_c(y)}" width="{_c(max(w, 0.1))}" height="{bar_h}" '
                f'fill="{colour}"><title>{escape(row.label)} · {escape(name)}: '
                f"{value_fmt(v)} ({share:.1f}%)</title></rect>"
            )
            x += w
        if total == 0:
            out.append(_text(label_w + 6, y + bar_h / 2 + 4, "no cycles", "start", "muted"))
        elif not normalize:
            out.append(
                _text(x + 6, y + bar_h / 2 + 4, row.note or value_fmt(total), "start", "value")
            )
    out.append(
        f'<line x1="{_c(label_w)}" y1="{top}" x2="{_c(label_w)}" y2="{_c(plot_bottom)}" '
        f'stroke="{AXIS}"/>'
    )
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    xs: Sequence[float]
    ys: Sequence[float]
    dashed: bool = False


YAxis = Callable[[float], tuple[list[float], Callable[[float], str]]]


def count_axis(vmax: float) -> tuple[list[float], Callable[[float], str]]:
    """Ticks and labels for a count axis: 0, 250, 500, ... as '250', '1.5k'."""
    return nice_ticks(vmax, 4), compact


def size_axis(vmax: float) -> tuple[list[float], Callable[[float], str]]:
    """Ticks and labels for a byte axis, on round binary units: 0, 100 MiB, 200 MiB, ..."""
    unit, name = next(
        (u, n)
        for u, n in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))
        if vmax >= u or u == 1
    )
    ticks = [t * unit for t in nice_ticks(vmax / unit, 4)]

    def fmt(v: float) -> str:
        return "0" if v == 0 else f"{v / unit:g} {name}"

    return ticks, fmt


def line_chart(
    lines: Sequence[Line],
    *,
    x_label: str,
    width: int = 540,
    height: int = 230,
    aria: str = "",
    y_axis: YAxis = count_axis,
    x_from_zero: bool = False,
    min_left: int = 56,
) -> str:
    """Several series over a shared x axis (record index), y from 0.

    ``y_axis(vmax)`` gives the y ticks and their label format; ``x_from_zero`` starts the x
    axis at 0 even when the first point is later (values sampled at window ends). The plot
    starts ``min_left`` px in, further when the y labels need it: small multiples pass the
    same value so that their plots line up.
    """
    right, top, bottom = 14, 10, 40
    xs_all = [x for ln in lines for x in ln.xs]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0, 1)
    if x_from_zero:
        x0 = min(x0, 0)
    if x1 <= x0:
        x1 = x0 + 1
    y_ticks, y_fmt = y_axis(max((y for ln in lines for y in ln.ys), default=0))
    y_labels = [y_fmt(t) for t in y_ticks]
    left = max(min_left, round(CHAR_PX * max(len(s) for s in y_labels) + 14))
    plot_w, plot_h = width - left - right, height - top - bottom
    x_ticks = [t for t in nice_ticks(x1, 5) if x0 <= t <= x1]
    ymax = y_ticks[-1]

    def px(x):
        return left + plot_w * (x - x0) / (x1 - x0)

    def py(y):
        return top + plot_h - plot_h * y / ymax

    out = [
        (
            f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img"'
            f' aria-label="{escape(aria)}" font-size="{FONT_PX}">'
        )
    ]
    for t, label in zip(y_ticks, y_labels, strict=True):
        out.append(
            f'<line x1="{left}" y1="{_c(py(t))}" x2="{width - right}" y2="{_c(py(t))}" '
            f'stroke="{GRID}"/>'
        )
        out.append(_text(left - 6, py(t) + 4, label, "end", "tick"))
    for t in x_ticks:
        out.append(
            f'<line x1="{_c(px(t))}" y1="{top + plot_h}" x2="{_c(px(t))}" '
            f'y2="{top + plot_h + 4}" stroke="{AXIS}"/>'
        )
        out.append(_text(px(t), top + plot_h + 16, compact(t), "middle", "tick"))
    out.append(_text(left + plot_w / 2, height - 4, x_label, "middle", "muted"))
    out.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        f'stroke="{AXIS}"/>'
    )
    for ln in lines:
        if not ln.xs:
            continue
        pts = " ".join(f"{_c(px(x))},{_c(py(y))}" for x, y in zip(ln.xs, ln.ys, strict=True))
        dash = ' stroke-dasharray="5 3"' if ln.dashed else ""
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{ln.colour}" stroke-width="1.8" '
            f'stroke-linejoin="round"{dash}><title>{escape(ln.name)}</title></polyline>'
        )
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------- colour scale
# A sequential scale for "more costly is darker": cream, amber, orange, red, deep red. The
# stops are interpolated linearly in sRGB; the overview matrix colours its cells with it.
HEAT_STOPS = ("#fffbeb", "#fde68a", "#fb923c", "#dc2626", "#7f1d1d")
INK_DARK = "#111827"
INK_LIGHT = "#ffffff"


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of an sRGB colour."""

    def lin(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.04045 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(c) for c in _rgb(hex_colour))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two colours, 1 to 21."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def heat(t: float) -> tuple[str, str]:
    """(background, text colour) at position ``t`` in [0, 1] of the sequential scale.

    The text is the soft dark ink when it reads at WCAG AA (4.5:1) on the background, else
    white when that does, else pure black (one of black and white always reaches 4.58:1).
    """
    t = min(1.0, max(0.0, t))
    pos = t * (len(HEAT_STOPS) - 1)
    i = min(int(pos), len(HEAT_STOPS) - 2)
    f = pos - i
    lo, hi = _rgb(HEAT_STOPS[i]), _rgb(HEAT_STOPS[i + 1])
    bg = "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(lo, hi, strict=True))
    for ink in (INK_DARK, INK_LIGHT):
        if contrast(bg, ink) >= 4.5:
            return bg, ink
    return bg, "#000000"
