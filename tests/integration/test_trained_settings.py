"""A trained run is evaluated and served with the sampler settings it was trained with.

One short real run with settings that are not the defaults (3 DDIM steps, eta 0.6,
guidance 2); then ``rayalign eval --lora RUN`` and a Serve deployment of the run, each
with and without settings of the user's own.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import ServeConfig, ServeLimitsConfig, ServeScalingConfig
from orchestrator.run import train
from orchestrator.rundir import SAMPLING_FILE
from tests.helpers.cli import rayalign
from tests.helpers.runs import tiny_config

TRAINED = {"num_steps": 3, "eta": 0.6, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def run(ray_cluster, tiny_pipeline_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained-settings") / "run"
    cfg = tiny_config(
        tiny_pipeline_dir, **{"train.epochs": 1, "pools.reference.num_actors": 0, **{f"sampling.{k}": v for k, v in TRAINED.items()}}
    )
    train(cfg, run, progress=False)
    return run


def test_the_adapter_records_its_sampler_settings_and_model(run, tiny_pipeline_dir):
    from orchestrator.rundir import resolve_lora_dir

    record = json.loads((resolve_lora_dir(run) / SAMPLING_FILE).read_text())
    assert record == {**TRAINED, "sde_window": None, "model": str(tiny_pipeline_dir)}  # a DDIM model: no window


def eval_run(pipeline, lora, out, *flags):
    result = rayalign(
        "eval",
        "--model",
        pipeline,
        "--lora",
        lora,
        "--prompts",
        "toy-heldout",
        "--reward",
        "toy_fidelity",
        "--num-per-prompt",
        1,
        "--seed",
        4,
        "--output",
        out,
        *flags,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), np.asarray(Image.open(out.with_suffix(".png"))), result


def test_eval_of_a_run_samples_as_trained_unless_told_otherwise(run, tiny_pipeline_dir, tmp_path):
    report, images, result = eval_run(tiny_pipeline_dir, run, tmp_path / "default.json")
    sampling = report["sampling"]
    assert {k: sampling[k] for k in TRAINED} == TRAINED and set(sampling["sources"].values()) == {"trained"}
    assert sampling["trained_from"].endswith(f"lora/{SAMPLING_FILE}")
    assert "sampled with 3 steps, eta 0.6, guidance 2 (as trained:" in result.stdout and "warning:" not in result.stderr
    # The same images as asking for those settings by hand.
    _, explicit, result = eval_run(tiny_pipeline_dir, run, tmp_path / "explicit.json", "--steps", 3, "--eta", 0.6, "--guidance-scale", 2)
    np.testing.assert_array_equal(images, explicit)
    assert "warning:" not in result.stderr  # equal to training: nothing to warn about

    # A flag still wins, with one warning that names both values; the others stay as trained.
    report, changed, result = eval_run(tiny_pipeline_dir, run, tmp_path / "flag.json", "--guidance-scale", 4.5)
    assert (report["sampling"]["num_steps"], report["sampling"]["eta"], report["sampling"]["guidance_scale"]) == (3, 0.6, 4.5)
    assert report["sampling"]["sources"] == {"num_steps": "trained", "eta": "trained", "guidance_scale": "given"}
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--guidance-scale 4.5 differs from the 2 the adapter was trained with" in warnings[0]
    assert not np.array_equal(changed, images)


def test_an_adapter_copied_out_of_its_run_keeps_its_settings(run, tiny_pipeline_dir, tmp_path):
    from orchestrator.rundir import resolve_lora_dir

    copy = shutil.copytree(resolve_lora_dir(run), tmp_path / "elsewhere" / "my-adapter")
    report, _, _ = eval_run(tiny_pipeline_dir, copy, tmp_path / "copy.json")
    assert {k: report["sampling"][k] for k in TRAINED} == TRAINED and report["sampling"]["trained_from"] == str(copy / SAMPLING_FILE)


def test_a_served_run_answers_with_its_training_settings(run, tiny_pipeline_dir):
    from ray import serve

    from jobs.serve.app import deploy
    from tests.integration.test_serve import Server, free_port

    port = free_port()
    server = Server(f"http://127.0.0.1:{port}", None)
    base = dict(model=str(tiny_pipeline_dir), device="cpu", scaling=ServeScalingConfig(num_cpus_per_replica=1.0, max_ongoing_requests=16))
    try:
        deploy(ServeConfig(**base), host="127.0.0.1", port=port, lora=str(run))
        health = server.health()
        assert health["sampling"]["sources"] == {"num_inference_steps": "trained", "guidance_scale": "trained", "eta": "trained"}
        assert (health["sampling"]["num_inference_steps"], health["sampling"]["guidance_scale"], health["sampling"]["eta"]) == (3, 2.0, 0.6)
        models = server.json("GET", "/v1/models", headers=None)[1]["data"]
        assert all(m["sampling"]["num_inference_steps"] == 3 for m in models)
        plain = server.json("POST", "/v1/images/generations", {"prompt": "a red circle on the left", "seed": 3}, headers=None)[1]
        assert plain["sampling"] == {"num_inference_steps": 3, "guidance_scale": 2.0, "eta": 0.6}
        explicit = server.json(
            "POST",
            "/v1/images/generations",
            {"prompt": "a red circle on the left", "seed": 3, "num_inference_steps": 3, "guidance_scale": 2.0},
            headers=None,
        )[1]
        assert explicit["data"][0]["b64_json"] == plain["data"][0]["b64_json"]
        # A request's own fields still win.
        asked = server.json(
            "POST", "/v1/images/generations", {"prompt": "a red circle on the left", "seed": 3, "num_inference_steps": 1}, headers=None
        )[1]
        assert asked["sampling"] == {"num_inference_steps": 1, "guidance_scale": 2.0, "eta": 0.6}

        # The server config's own defaults win over training.
        deploy(ServeConfig(**base, eta=1.0, limits=ServeLimitsConfig(default_steps=2)), host="127.0.0.1", port=port, lora=str(run))
        health = server.health()
        assert (health["sampling"]["num_inference_steps"], health["sampling"]["guidance_scale"], health["sampling"]["eta"]) == (2, 2.0, 1.0)
        assert health["sampling"]["sources"] == {"num_inference_steps": "given", "guidance_scale": "trained", "eta": "given"}
        plain = server.json("POST", "/v1/images/generations", {"prompt": "a red circle on the left", "seed": 3}, headers=None)[1]
        assert plain["sampling"] == {"num_inference_steps": 2, "guidance_scale": 2.0, "eta": 1.0}
    finally:
        serve.shutdown()
