"""The report's plots: matplotlib figures rendered as SVG text.

Figures are made with :class:`matplotlib.figure.Figure` directly, never through pyplot, so no
GUI backend is chosen and nothing global changes; the SVG keeps its text as text (smaller,
searchable) and carries no date, so the same metrics give the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""One colour per run (matplotlib's tab10), the same in every plot of a report."""

MARKERS_BELOW = 40
"""Series with fewer points than this are drawn with a marker on each point (one epoch shows as a dot)."""

SVG_STYLE = {"svg.fonttype": "none", "svg.hashsalt": "rayalign", "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8}

SIZE = (5.2, 3.1)
"""One plot's size in inches."""


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of a plot."""

    label: str
    epochs: np.ndarray
    values: np.ndarray
    color: str
    band: np.ndarray | None = None
    """Half-width of a shaded band around the line (a standard deviation), or None."""


def run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def to_svg(figure: Figure) -> str:
    """The figure as a standalone SVG document."""
    buffer = io.StringIO()
    with matplotlib.rc_context(SVG_STYLE):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _new_figure(size: tuple[float, float] = SIZE) -> Figure:
    with matplotlib.rc_context(SVG_STYLE):
        return Figure(figsize=size, layout="constrained")


def _draw_lines(axes, series: Sequence[Series]) -> None:
    marker = "o" if max((len(s.epochs) for s in series), default=0) < MARKERS_BELOW else None
    for s in series:
        axes.plot(s.epochs, s.values, color=s.color, label=s.label, marker=marker, markersize=3, linewidth=1.4)
        if s.band is not None:
            axes.fill_between(s.epochs, s.values - s.band, s.values + s.band, color=s.color, alpha=0.18, linewidth=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    if len(series) > 1:
        axes.legend(loc="best", frameon=False)


def line_plot(title: str, series: Sequence[Series], *, ylabel: str = "") -> str:
    """Lines against the epoch, as SVG."""
    figure = _new_figure()
    with matplotlib.rc_context(SVG_STYLE):
        axes = figure.add_subplot()
        _draw_lines(axes, series)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
    return to_svg(figure)


def small_multiples(title: str, panels: Sequence[tuple[str, Sequence[Series]]], *, columns: int = 4) -> str:
    """Many small plots in one figure (one per metric), as SVG."""
    rows = -(-len(panels) // columns)
    figure = _new_figure((3.0 * columns, 2.2 * rows + 0.4))
    with matplotlib.rc_context(SVG_STYLE):
        figure.suptitle(title)
        for index, (name, series) in enumerate(panels):
            axes = figure.add_subplot(rows, columns, index + 1)
            _draw_lines(axes, series)
            axes.set_title(name, fontsize=8)
            axes.tick_params(labelsize=7)
            if axes.get_legend() is not None:
                axes.get_legend().remove()  # the runs' colours are in the summary table
    return to_svg(figure)


def stacked_time(title: str, epochs: np.ndarray, parts: dict[str, np.ndarray], colors: Sequence[str]) -> str:
    """Seconds per epoch, stacked by where they went: bars, or areas once there are many epochs; as SVG."""
    figure = _new_figure()
    with matplotlib.rc_context(SVG_STYLE):
        axes = figure.add_subplot()
        values = [np.nan_to_num(v) for v in parts.values()]
        if len(epochs) <= 60:
            bottom = np.zeros(len(epochs))
            for (name, part), color in zip(zip(parts, values), colors):
                axes.bar(epochs, part, bottom=bottom, width=0.8, color=color, label=name)
                bottom += part
        else:
            axes.stackplot(epochs, values, colors=colors, labels=list(parts), linewidth=0)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, axis="y", color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel("seconds")
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return to_svg(figure)


def stacked_time_by_run(title: str, labels: Sequence[str], parts: dict[str, Sequence[float]], colors: Sequence[str]) -> str:
    """Mean seconds per epoch of each run (one horizontal bar per run), stacked by where they went; as SVG."""
    figure = _new_figure((SIZE[0], max(1.6, 0.9 + 0.35 * len(labels))))
    with matplotlib.rc_context(SVG_STYLE):
        axes = figure.add_subplot()
        positions = np.arange(len(labels))
        left = np.zeros(len(labels))
        for (name, seconds), color in zip(parts.items(), colors):
            seconds = np.nan_to_num(np.asarray(seconds, dtype=np.float64))
            axes.barh(positions, seconds, left=left, height=0.6, color=color, label=name)
            left += seconds
        axes.set_yticks(positions, labels=list(labels))
        axes.invert_yaxis()  # the first run on top, as in the summary table
        axes.grid(True, axis="x", color="#dddddd", linewidth=0.6)
        axes.set_axisbelow(True)
        axes.set_title(title)
        axes.set_xlabel("mean seconds per epoch")
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return to_svg(figure)
