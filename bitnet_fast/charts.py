"""SVG charts as strings, for reports that must open anywhere: no JavaScript, no plotting library, text that diffs.

`line_chart` and `bar_chart` return one `<svg>` element each; the page styles them through the CSS classes
t (title), yl/xl (axis labels), al (axis titles), lg (legend), v (values) and g (grid lines), see report.CSS.
"""

from __future__ import annotations

import html
import math

from .plumbing import fmt


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if hi <= lo:
        pad = 1.0 if integer else 0.5 + abs(lo) * 0.05
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    step = max(1, round(step)) if integer else step
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(math.ceil((hi - start) / step - 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 3, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return inside if len(inside) >= 2 else sorted({lo, *inside, hi})


def _empty(title: str, width: int = 560) -> str:
    """A chart-sized placeholder so the grid keeps its shape when a run has no data for a chart."""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" class="chart" role="img">'
            f'<text x="{width / 2}" y="24" class="t">{html.escape(title)}</text>'
            f'<text x="{width / 2}" y="44" class="al">no data</text></svg>')


def line_chart(title: str, series: list[dict], xlabel: str, ylabel: str, logy: bool = False, zero: bool = False,
               width: int = 560, height: int = 320) -> str:
    """SVG line chart; series = [{label, color, points: [(x, y)]}]. logy: log10 y axis; zero: y axis from 0.
    Integer x values (epochs, steps) get integer ticks."""
    pts = [(x, y) for s in series for x, y in s["points"] if not logy or y > 0]
    if not pts:
        return _empty(title, width)
    left, right, top, bottom = 64, 16, 50, 46
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = _ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    yt = _log_ticks(min(ys), max(ys)) if logy else _ticks(min(min(ys), 0.0) if zero else min(ys), max(ys))
    f = math.log10 if logy else (lambda v: v)
    x0, x1, y0, y1 = xt[0], xt[-1], f(min(yt[0], min(ys))), f(max(yt[-1], max(ys)))
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (f(y) - y0) / ((y1 - y0) or 1) * (height - top - bottom)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" role="img">',
           f'<title>{html.escape(title)}</title>',
           f'<text x="{width / 2}" y="18" class="t">{html.escape(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="g"/>'
                   f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" class="yl">{fmt(t)}</text>')
    for t in xt:
        out.append(f'<text x="{sx(t):.1f}" y="{height - bottom + 16}" class="xl">{fmt(t)}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 8}" class="al">{html.escape(xlabel)}</text>'
               f'<text x="14" y="{height / 2}" class="al" transform="rotate(-90 14 {height / 2})">'
               f'{html.escape(ylabel)}{" (log)" if logy else ""}</text>')
    for i, s in enumerate(series):
        p = [(x, y) for x, y in s["points"] if not logy or y > 0]
        if not p:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p)
        out.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="2"/>')
        if len(p) <= 40:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s["color"]}"/>' for x, y in p)
        lx = left + i * (width - left - right) / len(series)  # legend row between the title and the plot
        out.append(f'<rect x="{lx:.1f}" y="30" width="12" height="3" fill="{s["color"]}"/>'
                   f'<text x="{lx + 16:.1f}" y="35" class="lg">{html.escape(s["label"])}</text>')
    return "\n".join([*out, "</svg>"])


def bar_chart(title: str, rows: list[tuple[str, float | None, str]], unit: str = "", width: int = 560) -> str:
    """Horizontal SVG bar chart; rows = [(label, value, color)], values printed at the bar ends."""
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return _empty(title, width)
    left, right, bar, gap, top = 170, 90, 20, 8, 30
    height = top + len(rows) * (bar + gap) + 8
    vmax = max(v for _, v, _ in rows) or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="chart" role="img">',
           f'<title>{html.escape(title)}</title>',
           f'<text x="{width / 2}" y="18" class="t">{html.escape(title)}</text>']
    for i, (label, v, color) in enumerate(rows):
        y = top + i * (bar + gap)
        w = max(1.0, v / vmax * (width - left - right))
        out.append(f'<text x="{left - 6}" y="{y + 14}" class="yl">{html.escape(label)}</text>'
                   f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}"/>'
                   f'<text x="{left + w + 5:.1f}" y="{y + 14}" class="v">{fmt(v, unit)}</text>')
    return "\n".join([*out, "</svg>"])
