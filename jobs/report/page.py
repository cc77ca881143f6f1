"""The report page: which metrics go in which section, and the one self-contained HTML file.

Every plot is an ``<img>`` whose ``src`` is the SVG itself (a ``data:`` URI) and every image
grid a base64 PNG, so the file opens anywhere, offline, and fetches nothing. Each plot's
``data-keys`` names the metrics it draws (what the tests look for).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from actors.diffusion.images import read_grid_labels
from jobs.report import plots
from jobs.report.runs import Grid, ReportRun, config_differences
from orchestrator.config import flatten_config

TIME_PARTS = {
    "rollout": "time/rollout_s",
    "reward": "time/reward_s",
    "reference": "time/reference_s",
    "learn": "time/learn_s",
    "sync": "time/sync_s",
}
"""The pools' seconds of an epoch, stacked in the time plot; what is left of ``time/epoch_s`` is "other"."""
TIME_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#bbbbbb")

POLICY_KEYS = (
    ("kl/mean", "KL to the reference (mean)"),
    ("kl/beta", "KL coefficient beta"),
    ("kl/max", "KL to the reference (max)"),
    ("policy/clipfrac", "clipped fraction"),
    ("policy/approx_kl", "approximate KL of the update"),
    ("policy/ratio_mean", "policy ratio (mean)"),
    ("policy/ratio_max", "policy ratio (max)"),
    ("policy/onpolicy_gap", "on-policy log-prob gap"),
    ("loss/policy", "policy loss"),
    ("loss/kl", "KL loss"),
    ("loss/final", "loss"),
    ("advantages/zero_spread_frac", "groups with equal rewards (fraction)"),
)
ASYNC_KEYS = (
    ("is/ratio_mean", "IS ratio (mean)"),
    ("is/ratio_max", "IS ratio (max)"),
    ("is/ess_frac", "effective sample size (fraction)"),
    ("is/truncated_frac", "truncated IS weights (fraction)"),
    ("replay/staleness_mean", "staleness in versions (mean)"),
    ("replay/staleness_max", "staleness in versions (max)"),
    ("replay/size", "replay buffer size"),
)
THROUGHPUT_KEY = "throughput/samples_per_s"
LR_KEY = "optim/lr"
NOT_PLOTTED = {"epoch", "prompts/digest"}
"""Numbers that are not measurements: the x axis, and a digest of the epoch's prompts."""

MAX_GRID_WIDTH = 1600
"""Wider grids (large images, many columns) are shrunk to this many pixels in the report."""


@dataclasses.dataclass
class Plot:
    title: str
    keys: tuple[str, ...]
    svg: str


@dataclasses.dataclass
class Section:
    id: str
    title: str
    notes: list[str] = dataclasses.field(default_factory=list)
    plots: list[Plot] = dataclasses.field(default_factory=list)
    body: str = ""
    """HTML after the plots (tables, grids, config)."""


class Builder:
    """Builds the report's sections for ``runs``, one plot at a time (``step`` is called after each)."""

    def __init__(self, runs: Sequence[ReportRun], *, step: Callable[[], None] = lambda: None):
        self.runs = list(runs)
        self.step = step
        self.used: set[str] = set()
        """Keys already plotted: the "other metrics" section has the rest."""

    # ------------------------------------------------------------------ helpers
    def has(self, key: str) -> bool:
        """Whether some run has a finite value for ``key``."""
        return any(np.isfinite(run.series(key)[1]).any() for run in self.runs)

    def present(self, key: str) -> bool:
        """Whether some run logged ``key`` at all (perhaps null every epoch)."""
        return any(key in row for run in self.runs for row in run.rows)

    def series(self, key: str, *, band: str | None = None) -> list[plots.Series]:
        """One line per run that measured ``key``, in the run's colour, named by the run (when there are several)."""
        out = []
        for r, run in enumerate(self.runs):
            epochs, values = run.series(key)
            if not np.isfinite(values).any():
                continue
            spread = None
            if band is not None:
                band_epochs, band_values = run.series(band)
                spread = band_values if np.array_equal(band_epochs, epochs) else None
            out.append(plots.Series(label=run.label, epochs=epochs, values=values, color=plots.run_color(r), band=spread))
        return out

    def line(self, section: Section, title: str, key: str, *, band: str | None = None, ylabel: str = "") -> None:
        """A plot of ``key`` (± ``band``) in ``section``, if some run measured it."""
        self.used.update([key] if band is None else [key, band])
        if not self.has(key):
            return
        section.plots.append(Plot(title=title, keys=(key,), svg=plots.line_plot(title, self.series(key, band=band), ylabel=ylabel)))
        self.step()

    def keys_under(self, prefix: str) -> list[str]:
        found = dict.fromkeys(key for run in self.runs for key in run.keys() if key.startswith(prefix))
        return list(found)

    def constant(self, key: str) -> float | None:
        """The one value ``key`` has in every epoch of every run, or None if it changes."""
        values = np.concatenate([run.series(key)[1] for run in self.runs])
        values = values[np.isfinite(values)]
        return float(values[0]) if len(values) and np.all(values == values[0]) else None

    def unmeasured(self, keys: Sequence[str]) -> list[str]:
        """Keys some run logged, but as null in every row."""
        return [key for key in keys if self.present(key) and not self.has(key)]

    # ------------------------------------------------------------------ sections
    def reward(self) -> Section:
        section = Section("reward", "Reward")
        self.line(section, "reward (mean ± std over the epoch's samples)", "reward/mean", band="reward/std", ylabel="reward")
        components = [key for key in self.keys_under("reward/") if key not in ("reward/mean", "reward/std")]
        for key in components:  # reward/<component>/<what>, e.g. reward/toy_fidelity/color_acc
            self.line(section, key.removeprefix("reward/"), key)
        if components:
            section.notes.append("Below the mean: each reward component's score and diagnostics, averaged over the epoch's samples.")
        return section

    def gold(self) -> Section:
        section = Section("gold", "Gold reward")
        keys = self.keys_under("gold/")
        if not keys:
            section.notes.append("No gold/* metrics: the run scored no gold reward (train.gold_reward).")
            return section
        if "gold/mean" in keys:
            band = "gold/std" if "gold/std" in keys else None
            self.line(section, "gold reward (mean ± std)" if band else "gold reward (mean)", "gold/mean", band=band, ylabel="gold reward")
        for key in keys:
            if key not in self.used:
                self.line(section, key, key)
        return section

    def held_out(self) -> Section:
        section = Section("eval", "Held-out evaluation")
        keys = self.keys_under("eval/")
        if not keys:
            section.notes.append("No eval/* metrics: the run evaluated no held-out prompts (train.eval_every is 0).")
        for key in keys:
            self.line(section, f"{key} (held-out prompts, fixed seeds)", key)
        return section

    def policy(self) -> Section:
        section = Section("policy", "KL and policy update")
        for key, title in POLICY_KEYS:
            self.line(section, f"{title}: {key}", key)
        missing = self.unmeasured([key for key, _ in POLICY_KEYS])
        if missing:
            section.notes.append(
                f"Not measured (null in every epoch): {', '.join(missing)}. The KL to the reference needs its means: a "
                "reference pool (train.reference: pool), or a KL term in the loss (train.algorithm: dpok)."
            )
        return section

    def asynchronous(self) -> Section:
        section = Section("async", "Importance sampling and staleness")
        modes = sorted({str(run.config.get("train", {}).get("mode", "?")) for run in self.runs})
        if modes == ["sync"]:
            section.notes.append(
                "Sync mode: every sample is drawn by the weights it trains, so the IS ratio and ESS stay 1 and staleness 0 "
                "(async mode, train.mode: async, is where they show the lag and its correction)."
            )
        flat = {}
        for key, title in ASYNC_KEYS:
            value = self.constant(key)
            if value is None:
                self.line(section, f"{title}: {key}", key)
            else:
                flat[key] = value
                self.used.add(key)
        if flat:
            section.notes.append(
                "The same in every epoch (not plotted): " + ", ".join(f"{key} = {value:g}" for key, value in flat.items()) + "."
            )
        return section

    def time(self) -> Section:
        section = Section("time", "Time and throughput")
        keys = list(TIME_PARTS.values())
        self.used.update([*keys, "time/epoch_s"])
        parts_of = []
        for run in self.runs:
            epochs, total = run.series("time/epoch_s")
            parts = {name: self._aligned(run, key, epochs) for name, key in TIME_PARTS.items()}
            # Async mode overlaps sampling with learning, so the parts may add up to more than the epoch.
            parts["other"] = np.maximum(0.0, np.nan_to_num(total) - sum(np.nan_to_num(p) for p in parts.values()))
            parts_of.append((epochs, parts))
        if len(self.runs) == 1:
            epochs, parts = parts_of[0]
            svg = plots.stacked_time("seconds per epoch, by pool", epochs, parts, time_colors(len(parts)))
        else:
            means = {
                name: [float(np.nanmean(parts[name])) if len(parts[name]) else 0.0 for _, parts in parts_of] for name in parts_of[0][1]
            }
            svg = plots.stacked_time_by_run("seconds per epoch, by pool", [run.label for run in self.runs], means, time_colors(len(means)))
        section.plots.append(Plot(title="seconds per epoch, by pool", keys=(*keys, "time/epoch_s"), svg=svg))
        self.step()
        section.notes.append(
            "rollout: until the epoch's samples were drawn; reward and reference: the further wait for their rewards and "
            "reference means (they run while sampling goes on); learn: the learners' update; sync: shipping the new weights; "
            "other: the rest of the epoch (evaluation, checkpoints, metrics)."
        )
        self.line(section, f"throughput: {THROUGHPUT_KEY}", THROUGHPUT_KEY, ylabel="samples / s")
        return section

    @staticmethod
    def _aligned(run: ReportRun, key: str, epochs: np.ndarray) -> np.ndarray:
        """``key``'s values at ``epochs`` (0 where the run has none, e.g. no reference pool)."""
        have = dict(zip(*run.series(key)))
        return np.array([have.get(int(e), 0.0) for e in epochs], dtype=np.float64)

    def learning_rate(self) -> Section:
        section = Section("lr", "Learning rate")
        self.line(section, f"learning rate: {LR_KEY}", LR_KEY, ylabel="learning rate")
        if not section.plots:
            section.notes.append(f"No {LR_KEY} in the metrics.")
        return section

    def others(self) -> Section:
        section = Section("other", "Other metrics")
        keys = [
            key
            for run in self.runs
            for key in run.keys()
            if key not in self.used and key not in NOT_PLOTTED and not key.startswith("time/startup")
        ]
        keys = [key for key in dict.fromkeys(keys) if self.has(key)]
        constants = {key: value for key in keys if (value := self.constant(key)) is not None}
        varying = [key for key in keys if key not in constants]
        section.notes.append(
            "Every other number in metrics.jsonl: memory, idle fractions, per-actor load, faults, ... "
            "(time/startup/*, the start-up before the first epoch, is left out)."
        )
        if varying:
            panels = [(key, self.series(key)) for key in varying]
            svg = plots.small_multiples("metrics that change", panels)
            section.plots.append(Plot(title="other metrics", keys=tuple(varying), svg=svg))
            self.step()
        if constants:
            cells = "".join(f"<tr><td><code>{html.escape(key)}</code></td><td>{value:g}</td></tr>" for key, value in constants.items())
            section.body = f"<h3>The same in every epoch</h3><table class='constants'>{cells}</table>"
        return section

    def images(self, max_grids: int) -> Section:
        section = Section("images", "Image grids")
        parts = []
        for run in self.runs:
            grids = pick_grids(run.grids, max_grids)
            if not grids:
                parts.append(f"<p class='note'>{html.escape(run.label)}: no image grids (train.eval_every is 0).</p>")
                continue
            evals = dict(zip(*[a.tolist() for a in run.series("eval/reward_mean")]))
            figures, captions = [], None
            for grid in grids:
                png = grid.location.read_bytes()
                labels = read_grid_labels(png)
                captions = labels[0] if labels is not None else captions
                reward = evals.get(grid.epoch)
                extra = f" · eval reward {reward:.3f}" if reward is not None and math.isfinite(reward) else ""
                figures.append(
                    f"<figure class='grid'><figcaption>epoch {grid.epoch}{extra}</figcaption>"
                    f"<img alt='{html.escape(run.label)}: images after epoch {grid.epoch}' data-epoch='{grid.epoch}' "
                    f"src='data:image/png;base64,{base64.b64encode(shrink_png(png)).decode()}'></figure>"
                )
                self.step()
            left = len(run.grids) - len(grids)
            heading = f"<h3>{html.escape(run.label)}</h3>" if len(self.runs) > 1 else ""
            more = f" ({left} more in {html.escape(str(run.location))}/images)" if left else ""
            rows = ""
            if captions:
                items = "".join(f"<li>{html.escape(c)}</li>" for c in captions)
                rows = f"<details><summary>rows, top to bottom ({len(captions)} prompts)</summary><ol>{items}</ol></details>"
            shown = f"<p class='note'>{len(grids)} of {len(run.grids)} grids{more}.</p>"
            parts.append(f"{heading}{shown}<div class='grids'>{''.join(figures)}</div>{rows}")
        section.notes.append(
            "The held-out prompts with fixed seeds after each evaluated epoch (epoch 0: before training): one prompt per row, "
            "each image's reward under it."
        )
        section.body = "".join(parts)
        return section

    def config(self) -> Section:
        section = Section("config", "Config")
        differing = config_differences(self.runs)
        body = []
        if differing:
            flat = [flatten_config(run.config) for run in self.runs]
            head = "".join(f"<th>{html.escape(run.label)}</th>" for run in self.runs)
            rows = "".join(
                f"<tr><td><code>{html.escape(key)}</code></td>"
                + "".join(f"<td>{html.escape(str(config.get(key, '—')))}</td>" for config in flat)
                + "</tr>"
                for key in differing
            )
            body.append(f"<h3>What differs</h3><table><tr><th>field</th>{head}</tr>{rows}</table>")
        for run in self.runs:
            text = html.escape(run.config_text) if run.config_text else "(no config.yaml)"
            block = f"<pre class='config'>{text}</pre>"
            body.append(
                f"<details><summary>{html.escape(run.label)}: config.yaml</summary>{block}</details>" if len(self.runs) > 1 else block
            )
        section.notes.append("The effective config each run was trained with (its config.yaml).")
        section.body = "".join(body)
        return section

    def summary(self) -> str:
        """The table of runs at the top: colour, where, epochs, reward first and last, time."""
        differing = config_differences(self.runs)
        rows = []
        for r, run in enumerate(self.runs):
            first, last = run.rows[0], run.rows[-1]
            rewards = [row["reward/mean"] for row in run.rows[-3:] if isinstance(row.get("reward/mean"), (int, float))]
            train = run.config.get("train", {})
            _, evals = run.series("eval/reward_mean")
            seconds = sum(row.get("time/epoch_s") or 0.0 for row in run.rows)
            settings = ", ".join(f"{key}={flatten_config(run.config).get(key)}" for key in differing[:6])
            differs = f"<td>{html.escape(settings)}</td>" if differing else ""
            rows.append(
                "<tr>"
                f"<td><span class='swatch' style='background:{plots.run_color(r)}'></span>{html.escape(run.label)}</td>"
                f"<td><code>{html.escape(str(run.location))}</code></td>"
                f"<td>{html.escape(str(train.get('algorithm', '?')))}, {html.escape(str(train.get('mode', '?')))}</td>"
                f"<td>{last['epoch']} / {html.escape(str(train.get('epochs', '?')))}</td>"
                f"<td>{number(first.get('reward/mean'))} → {number(np.mean(rewards) if rewards else None)}</td>"
                f"<td>{number(evals[np.isfinite(evals)][-1] if np.isfinite(evals).any() else None)}</td>"
                f"<td>{duration(seconds)}</td>{differs}</tr>"
            )
        head = (
            "<tr><th>run</th><th>where</th><th>algorithm, mode</th><th>epoch</th><th>reward: epoch 1 → last 3</th>"
            f"<th>held-out (last)</th><th>time</th>{'<th>differs</th>' if differing else ''}</tr>"
        )
        return f"<table class='runs'>{head}{''.join(rows)}</table>"


def time_colors(count: int) -> list[str]:
    return list(TIME_COLORS[:count])


def duration(seconds: float) -> str:
    """The epochs' time, start-up left out: ``42 s``, ``8.9 min``, ``3.2 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def number(value: float | None) -> str:
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"


def pick_grids(grids: Sequence[Grid], most: int) -> list[Grid]:
    """At most ``most`` grids, evenly spread, always the first and the last."""
    if len(grids) <= most:
        return list(grids)
    if most <= 1:
        return list(grids[-1:])
    picks = sorted({round(i * (len(grids) - 1) / (most - 1)) for i in range(most)})
    return [grids[i] for i in picks]


def shrink_png(png: bytes) -> bytes:
    """The grid as it is, or shrunk to :data:`MAX_GRID_WIDTH` pixels wide (large images keep the report small)."""
    image = Image.open(io.BytesIO(png))
    if image.width <= MAX_GRID_WIDTH:
        return png
    height = round(image.height * MAX_GRID_WIDTH / image.width)
    buffer = io.BytesIO()
    image.convert("RGB").resize((MAX_GRID_WIDTH, height), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def plot_count(runs: Sequence[ReportRun], max_grids: int) -> int:
    """About how many steps :func:`build_report` takes (for its progress bar)."""
    keys = {key for run in runs for key in run.keys()}
    components = len([k for k in keys if k.startswith(("reward/", "gold/", "eval/"))])
    return components + len(POLICY_KEYS) + len(ASYNC_KEYS) + 5 + sum(len(pick_grids(run.grids, max_grids)) for run in runs)


def build_report(runs: Sequence[ReportRun], *, max_grids: int = 6, progress: bool = False) -> str:
    """The whole report of ``runs`` (one, a sweep's trials, or runs to compare) as one HTML document."""
    if not runs:
        raise ValueError("a report needs at least one run")
    missing = [f"{run.label}: {key}" for run in runs for key in ("reward/mean", "epoch") if key not in run.rows[0]]
    if missing:
        raise ValueError(f"these runs' metrics lack keys every run writes ({', '.join(missing)}): is this a rayalign run?")
    with tqdm(total=plot_count(runs, max_grids), desc="report", unit="plot", disable=not progress, leave=False) as bar:
        builder = Builder(runs, step=lambda: bar.update(1))
        sections = [
            builder.reward(),
            builder.gold(),
            builder.held_out(),
            builder.policy(),
            builder.asynchronous(),
            builder.time(),
            builder.learning_rate(),
            builder.images(max_grids),
            builder.others(),
            builder.config(),
        ]
        summary = builder.summary()
    return render_page(runs, summary, sections)


def _img(plot: Plot) -> str:
    source = base64.b64encode(plot.svg.encode("utf-8")).decode()
    return (
        f"<figure class='plot'><img alt='{html.escape(plot.title)}' data-keys='{html.escape(' '.join(plot.keys))}' "
        f"src='data:image/svg+xml;base64,{source}'></figure>"
    )


def render_page(runs: Sequence[ReportRun], summary: str, sections: Sequence[Section]) -> str:
    title = f"rayalign report: {runs[0].label}" if len(runs) == 1 else f"rayalign report: {len(runs)} runs"
    nav = " · ".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
    body = []
    for s in sections:
        notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in s.notes)
        figures = f"<div class='plots'>{''.join(_img(p) for p in s.plots)}</div>" if s.plots else ""
        body.append(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>{notes}{figures}{s.body}</section>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1500px; padding: 0 20px 40px; color: #222; }}
h1 {{ font-size: 22px; margin: 18px 0 4px; }}
h2 {{ font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 28px; }}
h3 {{ font-size: 15px; margin: 14px 0 4px; }}
nav {{ margin: 6px 0 14px; }}
table {{ border-collapse: collapse; margin: 6px 0; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f5f5f5; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }}
.note {{ color: #555; margin: 4px 0; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 8px; }}
#other .plots {{ grid-template-columns: 1fr; }}
figure {{ margin: 0; }}
figure.plot img {{ width: 100%; height: auto; }}
figure.grid {{ flex: none; }}
.grids {{ display: flex; gap: 12px; overflow: auto; max-height: 85vh; align-items: flex-start; padding-bottom: 6px; }}
figure.grid img {{ border: 1px solid #ddd; display: block; }}
figcaption {{ font-weight: 600; margin-bottom: 2px; position: sticky; top: 0; background: #fff; }}
pre {{ background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 12px; }}
pre.config {{ columns: 3 300px; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Made by <code>rayalign report</code> from each run's metrics.jsonl, config.yaml and images/.</p>
{summary}
<nav>{nav}</nav>
{"".join(body)}
</body>
</html>
"""
