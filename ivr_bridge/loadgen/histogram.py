"""A self-contained HTML page with one inline SVG histogram per latency series.

No scripts, no external files: the page can be attached to an issue or a CI artifact.
"""

from __future__ import annotations

from html import escape

import numpy as np

from ivr_bridge.loadgen.stats import summarize

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40
BINS = 40
_MARKERS = (("p50", "#2a7"), ("p95", "#e90"), ("p99", "#d33"))


def _svg(values: np.ndarray) -> str:
    stats = summarize(values)
    if stats.count == 0:
        return '<p class="empty">no samples</p>'
    low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=BINS, range=(low, high))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    tallest = max(int(counts.max()), 1)

    def x(value: float) -> float:
        return LEFT + (value - low) / (high - low) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img">',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#444"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#444"/>',
    ]
    for count, start, end in zip(counts.tolist(), edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if count:
            h = count / tallest * plot_h
            width = max(x(end) - x(start) - 1, 1)
            parts.append(
                f'<rect x="{x(start):.1f}" y="{TOP + plot_h - h:.1f}" width="{width:.1f}" '
                f'height="{h:.1f}" fill="#58a"><title>{start:.1f}-{end:.1f} ms: {count}</title></rect>'
            )
    for name, colour in _MARKERS:
        value = getattr(stats, name)
        parts.append(
            f'<line x1="{x(value):.1f}" y1="{TOP}" x2="{x(value):.1f}" y2="{TOP + plot_h}" '
            f'stroke="{colour}" stroke-dasharray="4 3"><title>{name} {value:.1f} ms</title></line>'
        )
    for value in np.linspace(low, high, 5).tolist():
        parts.append(
            f'<text x="{x(value):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{value:.1f}</text>'
        )
    parts += [
        f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">ms</text>',
        f'<text x="{LEFT - 8}" y="{TOP + 10}" text-anchor="end">{tallest}</text>',
        f'<text x="{LEFT - 8}" y="{TOP + plot_h}" text-anchor="end">0</text>',
        "</svg>",
    ]
    return "".join(parts)


def _table(rows: dict[str, object]) -> str:
    cells = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def histogram_page(
    title: str,
    series: dict[str, np.ndarray],
    *,
    run: dict[str, object] | None = None,
    failures: dict[str, int] | None = None,
) -> str:
    """HTML with the run's details (command, settings, machine, calls), its failures
    grouped by reason, and a histogram (with count, p50/p95/p99, max) per named series:
    latency figures are only worth reading beside what failed and where they came from."""
    sections = []
    if run:
        sections.append(f"<section><h2>Run</h2>{_table(run)}</section>")
    if failures is not None:
        listed = _table({reason: f"{count} calls" for reason, count in failures.items()}) if failures else ""
        sections.append(f"<section><h2>Failures</h2>{listed or '<p>none</p>'}</section>")
    for name, values in series.items():
        stats = summarize(values)
        figures = ", ".join(
            f"{key} {getattr(stats, key):.1f} ms" for key in ("p50", "p95", "p99", "max") if stats.count
        )
        sections.append(
            f"<section><h2>{escape(name)}</h2><p>{stats.count} samples{'; ' + figures if figures else ''}"
            f"</p>{_svg(np.asarray(values, dtype=np.float64))}</section>"
        )
    legend = " ".join(f'<span style="color:{colour}">- - {name}</span>' for name, colour in _MARKERS)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#222}"
        "svg text{font-size:11px;fill:#444}section{margin-bottom:2em}"
        "table{border-collapse:collapse}th,td{text-align:left;padding:2px 12px 2px 0;vertical-align:top}"
        f"</style></head><body><h1>{escape(title)}</h1><p>{legend}</p>{''.join(sections)}</body></html>\n"
    )
