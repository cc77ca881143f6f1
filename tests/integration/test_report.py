"""``rayalign report`` (the CLI) of a real 2-epoch run on the session's cluster, opened in headless Chromium."""

import shutil

import numpy as np
import pytest
from PIL import Image

from actors.diffusion.images import read_grid_labels
from actors.toy import world as toy_world
from orchestrator.metrics import read_metrics
from orchestrator.run import train
from tests.helpers.cli import rayalign
from tests.helpers.runs import tiny_config
from tests.integration.test_serve import CHROMIUM_FLAGS

SECTIONS = ("reward", "gold", "eval", "policy", "async", "time", "lr", "images", "other", "config")


def test_report_of_a_real_run_opens_in_chromium(ray_cluster, tiny_pipeline_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    prompts = tmp_path / "heldout.txt"
    prompts.write_text("\n".join(toy_world.held_out_prompts()[:3]) + "\n")
    # The tiny pipeline, scored by the toy reward (its per-attribute accuracies are plotted), evaluated every epoch.
    config = tiny_config(tiny_pipeline_dir, reward="toy_fidelity", **{"train.eval_every": 1, "train.eval_prompts": prompts})
    run = tmp_path / "run"
    train(config, run, progress=False)

    # Every grid the run wrote is labelled: the prompt of each row, the reward of each image.
    captions, scores = read_grid_labels((run / "images" / "epoch_0002.png").read_bytes())
    assert captions == toy_world.held_out_prompts()[:3] and len(scores) == 6
    assert np.mean(scores) == pytest.approx(read_metrics(run)[-1]["eval/reward_mean"])

    made = rayalign("report", run)
    assert made.returncode == 0, made.stderr
    page_file = run / "report.html"
    assert f"wrote {page_file}" in made.stdout

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed: run `bash scripts/install-test-tools.sh` (Debian's chromium package)"
    problems, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"uncaught exception: {error}"))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_file.as_uri(), wait_until="load")
            # Per section: its images, and how many of them the browser decoded (an empty or broken one has width 0).
            counts = page.evaluate(
                """ids => Object.fromEntries(ids.map(id => {
                    const images = [...document.querySelectorAll(`section#${id} img`)];
                    return [id, [images.length, images.filter(i => i.complete && i.naturalWidth > 0).length]];
                }))""",
                list(SECTIONS),
            )
            keys = page.evaluate("[...document.querySelectorAll('img[data-keys]')].map(i => i.dataset.keys).join(' ').split(' ')")
            page.screenshot(path=tmp_path / "report.png")  # the test's artifact: the top of the report
            page.screenshot(path=tmp_path / "report-full.png", full_page=True)
        finally:
            browser.close()
    assert problems == [], problems
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []  # nothing fetched over the network
    assert all(loaded == shown for shown, loaded in counts.values()), counts
    # reward/mean and toy_fidelity's score, colour, shape and position accuracy
    assert counts["reward"][0] == 5 and {"reward/mean", "reward/toy_fidelity/color_acc", "reward/toy_fidelity/position_acc"} <= set(keys)
    assert counts["eval"][0] == 1 and "eval/reward_mean" in keys
    assert counts["images"][0] == 3  # epochs 0, 1 and 2
    assert counts["time"][0] == 2 and {"time/rollout_s", "time/learn_s", "throughput/samples_per_s"} <= set(keys)
    assert counts["lr"][0] == 1 and counts["other"][0] == 1
    assert counts["policy"][0] >= 3 and {"policy/clipfrac", "policy/approx_kl"} <= set(keys)
    assert counts["gold"][0] == 0 and counts["config"][0] == 0  # no gold reward in this run; the config is text
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert shot.shape == (1000, 1400) and shot.std() > 10  # the page drew something
