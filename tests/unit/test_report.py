"""``rayalign report`` on run directories written the way a run writes them, and the labelled image grids.

The runs here are made without Ray: each epoch's row is what :func:`orchestrator.epoch.epoch_metrics`
makes of a batch scored by the real ``toy_fidelity`` reward on toy-world renders, written by the
real :class:`~orchestrator.metrics.MetricsWriter`; the grids are the controller's labelled grids.
"""

from __future__ import annotations

import base64
import html.parser
import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import ImageFont

from actors.diffusion.images import (
    encode_png,
    grid_labels,
    make_grid,
    make_labelled_grid,
    read_grid_labels,
    save_png,
    wrap_text,
)
from actors.rewards.registry import score_batch
from actors.storage import Location
from actors.toy import world as toy_world
from jobs.cli import main
from jobs.report.runs import unique_labels
from orchestrator.config import dump_yaml, load_preset
from orchestrator.epoch import EpochBatch, epoch_metrics
from orchestrator.metrics import MetricsWriter
from orchestrator.rundir import RunDir

EVAL_PROMPTS = toy_world.held_out_prompts()[:3]


def toy_images(prompts: list[str], *, seed: int, noise: float) -> np.ndarray:
    """Toy renders of ``prompts``, a ``noise`` fraction of them replaced by noise (which the toy reward scores low)."""
    rng = np.random.default_rng(seed)
    images = toy_world.render_batch(prompts, range(seed, seed + len(prompts)))
    spoiled = rng.random(len(prompts)) < noise
    images[spoiled] = rng.integers(0, 256, size=images[spoiled].shape, dtype=np.uint8)
    return images


def write_run(root, *, epochs: int = 4, mode: str = "sync", learning_rate: float = 1e-3, gold: bool = True) -> RunDir:
    """A run directory as ``rayalign train`` leaves it, evaluated every 2 epochs (epoch 0 too)."""
    cfg = load_preset(
        "toy-ddpo", [f"train.epochs={epochs}", "train.eval_every=2", f"train.mode={mode}", f"learner.learning_rate={learning_rate}"]
    )
    run = RunDir(root)
    dump_yaml(cfg, run.workdir / "config.yaml")
    writer = MetricsWriter(run)
    samples = 0
    for epoch in range(0, epochs + 1):
        if epoch % 2 == 0:  # the controller's eval grid: one held-out prompt per row, 2 images each
            prompts = [p for p in EVAL_PROMPTS for _ in range(2)]
            images = toy_images(prompts, seed=100 + epoch, noise=0.5 - 0.1 * epoch)
            scores, _ = score_batch("toy_fidelity", images, prompts)
            grid = make_labelled_grid(images, captions=EVAL_PROMPTS, scores=scores, columns=2)
            save_png(grid, run.workdir / run.image_grid(epoch), text=grid_labels(EVAL_PROMPTS, scores))
            eval_metrics = {"eval/reward_mean": float(scores.mean())}
        if epoch == 0:
            continue
        prompts = toy_world.train_prompts()[epoch : epoch + 8]
        images = toy_images(prompts, seed=epoch, noise=0.6 - 0.1 * epoch)
        rewards, info = score_batch("toy_fidelity", images, prompts)
        batch = EpochBatch(
            epoch=epoch,
            version=epoch - 1 - (mode == "async" and epoch > 1),
            trajectory_refs=[None, None],
            reference_refs=None,
            chunk_sizes=[4, 4],
            prompts=prompts,
            rewards=rewards,
            advantages=rewards - rewards.mean(),
            reward_info={f"toy_fidelity/{key}": value for key, value in info.items()},
            advantage_info={},
            timings={"time/rollout_s": 2.0 + 0.1 * epoch, "time/reward_s": 0.2, "time/reference_s": 0.3},
            busy={"rollout/0": 2.0, "rollout": 2.0, "reward": 0.2, "reference": 0.3, "load": 0.0, "critical": 2.5},
            rollout_calls=[2],
        )
        stale = 1.0 if mode == "async" and epoch > 1 else 0.0
        learn_stats = {
            "kl/mean": 0.001 * epoch,
            "kl/beta": 0.01 / epoch,
            "policy/clipfrac": 0.1 / epoch,
            "policy/approx_kl": 1e-4 * epoch,
            "is/ratio_mean": 1.0 - 0.01 * stale * epoch,
            "is/ratio_max": 1.0 + 0.05 * stale * epoch,
            "is/ess_frac": 1.0 - 0.02 * stale * epoch,
            "optim/lr": learning_rate * (1 - epoch / (2 * epochs)),
        }
        samples += len(prompts)
        row = epoch_metrics(
            batch,
            learn_stats,
            policy_version=epoch,
            samples_seen=samples,
            pool_sizes={"rollout": 1, "reward": 1, "reference": 1},
            replay_stats={"replay/size": 8.0 * stale, "replay/staleness_mean": stale, "replay/staleness_max": stale},
            learn_s=1.5,
            sync_s=0.05,
            sync_bytes=1024,
            epoch_s=5.0 + 0.1 * epoch,
            eval_metrics=eval_metrics if epoch % 2 == 0 else {},
        )
        if gold:  # what train.gold_reward adds: a second, held-back reward of the same samples
            row.update({"gold/mean": 0.4 + 0.05 * epoch, "gold/std": 0.1, "gold/toy_fidelity/score": 0.4 + 0.05 * epoch})
        writer.write(row)
    writer.close()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs to compare (sync, and async with another learning rate), each in a directory named run."""
    root = tmp_path_factory.mktemp("runs")
    return write_run(root / "a" / "run"), write_run(root / "b" / "run", mode="async", learning_rate=3e-3, gold=False)


class Page(html.parser.HTMLParser):
    """The report's sections: per section id, its plots' data-keys, its grid images' epochs and its text."""

    def __init__(self, text: str):
        super().__init__()
        self.section: str | None = None
        self.plots: dict[str, list[dict[str, str]]] = {}
        self.grids: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.sources: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs["id"]
            self.plots[self.section], self.grids[self.section], self.text[self.section] = [], [], ""
        for name in ("src", "href"):
            if name in attrs:
                self.sources.append(attrs[name])
        if tag == "img" and "data-keys" in attrs:
            self.plots[self.section].append(attrs)
        elif tag == "img" and "data-epoch" in attrs:
            self.grids[self.section].append(int(attrs["data-epoch"]))

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.section:
            self.text[self.section] += data

    def keys(self, section: str) -> list[str]:
        return [key for plot in self.plots[section] for key in plot["data-keys"].split()]

    def svg(self, section: str, key: str) -> str:
        plot = next(p for p in self.plots[section] if key in p["data-keys"].split())
        return base64.b64decode(plot["src"].removeprefix("data:image/svg+xml;base64,")).decode()


def report(*args, capsys) -> tuple[int, str, str]:
    code = main(["report", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_report_of_a_run_has_every_section(runs, tmp_path, capsys, caplog):
    # A run still training: the writer is halfway through epoch 5's row, which is left out.
    run = RunDir(shutil.copytree(runs[0].root.local, tmp_path / "live"))
    with open(run.metrics.local, "a") as handle:
        handle.write('{"epoch": 5, "reward/me')
    code, out, err = report(run.root.uri, capsys=capsys)
    assert code == 0, err
    assert "left out line 5, which is still being written" in caplog.text
    written = run.root.local / "report.html"  # the default: beside the run's metrics
    assert f"wrote {written}" in out
    page = Page(written.read_text())
    # Self-contained: every image is inline, the only links are to the page's own sections.
    assert all(s.startswith(("data:image/svg+xml;base64,", "data:image/png;base64,", "#")) for s in page.sources), page.sources
    assert {"reward/mean", "reward/toy_fidelity/color_acc", "reward/toy_fidelity/shape_acc", "reward/toy_fidelity/position_acc"} <= set(
        page.keys("reward")
    )
    assert {"gold/mean", "gold/toy_fidelity/score"} <= set(page.keys("gold"))
    assert page.keys("eval") == ["eval/reward_mean"]
    assert {"kl/mean", "kl/beta", "policy/clipfrac", "policy/approx_kl"} <= set(page.keys("policy"))
    assert {"time/rollout_s", "time/learn_s", "time/sync_s", "throughput/samples_per_s"} <= set(page.keys("time"))
    assert page.keys("lr") == ["optim/lr"]
    # Sync mode: the IS ratio, ESS and staleness never move, so they are named, not plotted.
    assert page.plots["async"] == [] and "is/ess_frac = 1" in page.text["async"] and "replay/staleness_mean = 0" in page.text["async"]
    assert "faults/actor_restarts" in page.text["other"] and "faults/actor_restarts" not in page.keys("other")  # 0 every epoch
    assert "idle/learner_frac" in page.keys("other")  # changes with the epoch's time
    # The grids of epochs 0, 2, 4, each prompt of a row listed, and the config as the run wrote it.
    assert page.grids["images"] == [0, 2, 4]
    assert all(prompt in page.text["images"] for prompt in EVAL_PROMPTS)
    assert run.config.read_text() in page.text["config"]
    assert "reward (mean ± std over the epoch's samples)" in page.svg("reward", "reward/mean")
    # The runs table: the reward of epoch 1 and the mean of the last 3, from the metrics' whole lines.
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()[:-1]]
    summary = Page(written.read_text().split("<nav>")[0].replace("<table", "<section id='summary'><table"))
    last3 = np.mean([row["reward/mean"] for row in rows[-3:]])
    assert f"{rows[0]['reward/mean']:.4f} → {last3:.4f}" in summary.text["summary"]


def test_compare_draws_the_runs_on_the_same_axes_named_in_the_legend(runs, tmp_path, capsys):
    first, second = runs
    out = tmp_path / "compare.html"
    code, _, _ = report(first.root.uri, "--compare", second.root.uri, "--output", out, capsys=capsys)
    assert code == 0
    page = Page(out.read_text())
    assert unique_labels([first.root, second.root]) == ["a/run", "b/run"]  # both directories are called "run"
    for section, key in (("reward", "reward/mean"), ("policy", "policy/clipfrac"), ("lr", "optim/lr")):
        svg = page.svg(section, key)
        assert ">a/run<" in svg and ">b/run<" in svg, key  # the legend's entries
    time_svg = page.svg("time", "time/rollout_s")
    assert ">a/run<" in time_svg and ">b/run<" in time_svg  # one stacked bar per run
    # Async: the second run's IS ratio and staleness move, so they are plotted, for both runs.
    assert {"is/ratio_mean", "is/ess_frac", "replay/staleness_mean"} <= set(page.keys("async"))
    assert ">b/run<" in page.svg("async", "is/ess_frac")
    assert page.keys("gold") == ["gold/mean", "gold/toy_fidelity/score"]  # the first run's only
    assert "learner.learning_rate" in page.text["config"] and "train.mode" in page.text["config"]  # what differs
    assert page.grids["images"] == [0, 2, 4, 0, 2, 4]


def test_a_sweep_reports_its_trials(runs, tmp_path, capsys, caplog):
    sweep = tmp_path / "sweep"
    for name, run in zip(("t0", "t1"), runs):
        shutil.copytree(run.root.local, sweep / "trials" / name, ignore=shutil.ignore_patterns("report.html"))
    (sweep / "trials" / "t2").mkdir()  # a trial that has not started: left out, with a warning
    code, out, err = report(sweep, capsys=capsys)
    assert code == 0, err
    assert "left out trial t2" in caplog.text
    page = Page((sweep / "report.html").read_text())
    assert ">t0<" in page.svg("reward", "reward/mean") and ">t1<" in page.svg("reward", "reward/mean")


def test_a_run_in_object_storage(runs, s3, tmp_path, capsys):
    from jobs.bench.s3 import BUCKET

    remote = Location(f"s3://{BUCKET}/report/run")
    remote.upload(runs[0].root.local)
    code, _, err = report(remote.uri, capsys=capsys)
    assert code == 2 and "say where the report goes with --output" in err
    code, _, err = report(remote.uri, "--output", tmp_path / "remote.html", capsys=capsys)
    assert code == 0, err
    page = Page((tmp_path / "remote.html").read_text())
    assert page.grids["images"] == [0, 2, 4] and "reward/mean" in page.keys("reward")


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path.parent


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: d, "is not a run directory (no metrics.jsonl or config.yaml in it) nor a sweep directory"),
        (lambda d: write(d / "run" / "config.yaml", "seed: 0\n"), "has no metrics yet"),
        (lambda d: write(d / "run" / "metrics.jsonl", '{"epoch": 1}\nnot json\n{"epoch": 2}\n'), "metrics.jsonl line 2 is not JSON"),
        (lambda d: write(d / "run" / "metrics.jsonl", '{"epoch": 1, "samples": 8}\n'), "lack keys every run writes"),
        (lambda d: write(d / "sweep" / "trials" / "t0" / "config.yaml", "seed: 0\n").parent.parent, "a sweep whose trials have no metrics"),
    ],
)
def test_what_is_not_a_run_is_one_clear_error(tmp_path, capsys, make, message):
    path = make(tmp_path)
    code, _, err = report(path, "--output", tmp_path / "r.html", capsys=capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_options_are_checked(runs, tmp_path, capsys):
    code, _, err = report(runs[0].root.uri, "--output", tmp_path / "r.pdf", capsys=capsys)
    assert code == 2 and "must end in .html" in err
    code, _, err = report(runs[0].root.uri, "--compare", runs[0].root.uri, "--output", tmp_path / "r.html", capsys=capsys)
    assert code == 2 and "is given twice" in err


# --------------------------------------------------------------------------- labelled grids

BLUE, ORANGE = (0, 0, 255), (255, 128, 0)


def solid(colors, size=32) -> np.ndarray:
    return np.array([np.full((size, size, 3), c, dtype=np.uint8) for c in colors])


def boxes(grid: np.ndarray, color) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each tile of ``color``, row by row."""

    def runs(flags: np.ndarray) -> list[tuple[int, int]]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
        return list(zip(edges[::2], edges[1::2]))

    mask = np.all(grid == color, axis=-1)
    return [(t, left, b - t, r - left) for t, b in runs(mask.any(axis=1)) for left, r in runs(mask[t:b].any(axis=0))]


def dark(region: np.ndarray) -> int:
    """Pixels of text: grey (the channels equal within a few levels) and darker than the white around it."""
    region = region.astype(int)
    return int(((region.max(axis=-1) < 180) & (np.ptp(region, axis=-1) < 16)).sum())


def test_a_labelled_grid_adds_a_caption_strip_per_row_and_a_score_under_each_image():
    images = solid([BLUE, BLUE, BLUE, BLUE])
    captions = ["a red circle on the left", "a blue square at the top"]
    grid = make_labelled_grid(images, captions=captions, scores=[0.25, 0.75, math.nan, 1.0], columns=2)
    plain = make_grid(images, columns=2)
    assert grid.shape[0] > plain.shape[0] and grid.shape[1] > plain.shape[1]
    tiles = boxes(grid, BLUE)
    assert [(h, w) for _, _, h, w in tiles] == [(128, 128)] * 4  # the images themselves, enlarged as make_grid does
    first_left = tiles[0][1]
    for top, left, height, width in tiles:
        assert dark(grid[top : top + height, left : left + width]) == 0  # no text over an image
        below = grid[top + height : top + height + 16, left : left + width]
        assert dark(below) > 10  # its score
        strip = grid[top : top + height, :first_left]
        assert dark(strip) > 50  # the row's caption, left of its first image
    # Each row's caption and each image's score is its own text; equal text, equal pixels.
    (t0, l0, h, w), (_, l1, _, _), (t1, _, _, _), (_, l3, _, _) = tiles
    assert not np.array_equal(grid[t0 : t0 + h, :first_left], grid[t1 : t1 + h, :first_left])
    assert not np.array_equal(grid[t0 + h : t0 + h + 16, l0 : l0 + w], grid[t0 + h : t0 + h + 16, l1 : l1 + w])
    again = make_labelled_grid(images, captions=[captions[0], captions[0]], scores=[0.25, 0.25, 0.25, 0.25], columns=2)
    assert np.array_equal(again[t0 : t0 + h, :first_left], again[t1 : t1 + h, :first_left])
    assert np.array_equal(again[t0 + h : t0 + h + 16, l0 : l0 + w], again[t1 + h : t1 + h + 16, l3 : l3 + w])


def test_a_labelled_grid_keeps_the_images_and_their_order():
    images = solid([BLUE, ORANGE, ORANGE, BLUE, BLUE])
    grid = make_labelled_grid(images, captions=["one", "two", "three"], scores=[1, 2, 3, 4, 5], columns=2)
    blue, orange = boxes(grid, BLUE), boxes(grid, ORANGE)
    assert len(blue) == 3 and len(orange) == 2
    assert blue[0][0] == orange[0][0] and blue[0][1] < orange[0][1]  # row 1: blue, orange
    assert orange[1][0] == blue[1][0] and orange[1][1] < blue[1][1]  # row 2: orange, blue
    assert blue[2][0] > blue[1][0] and blue[2][1] == blue[0][1]  # row 3: one image, in the first column


def test_long_captions_are_wrapped_and_cut_to_the_strip():
    font = ImageFont.load_default(size=12)
    lines = wrap_text("a green triangle " * 20, font, 150, max_lines=4)
    assert len(lines) == 4 and lines[-1].endswith("...") and all(font.getlength(line) <= 150 for line in lines)
    assert wrap_text("a red circle", font, 150, max_lines=4) == ["a red circle"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(captions=["a"], scores=[1, 2, 3, 4], columns=2), "make 2 rows, but got 1 captions"),
        (dict(captions=["a", "b"], scores=[1, 2], columns=2), "got 2 scores for 4 images"),
        (dict(captions=["a", "b"], scores=[1, 2, 3, 4], columns=0), "columns must be >= 1"),
    ],
)
def test_labelled_grid_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_labelled_grid(solid([BLUE] * 4), **kwargs)


def test_a_grid_png_carries_its_captions_and_scores():
    captions, scores = ["a red circle on the left", "ünïcode ok"], [0.5, math.nan]
    grid = make_labelled_grid(solid([BLUE, BLUE]), captions=captions, scores=scores, columns=1)
    png = encode_png(grid, text=grid_labels(captions, scores))
    assert png == encode_png(grid, text=grid_labels(captions, scores))  # same pixels and labels, same bytes
    read_captions, read_scores = read_grid_labels(png)
    assert read_captions == captions and read_scores[0] == 0.5 and math.isnan(read_scores[1])
    assert read_grid_labels(encode_png(grid)) is None
