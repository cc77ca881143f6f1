"""The ``rayalign`` command as a user runs it: a real subprocess, real files."""

import json

import numpy as np
import pytest
from PIL import Image

from actors.diffusion.images import read_grid_labels
from actors.toy import world as toy_world
from tests.helpers.cli import rayalign


def test_eval_writes_scores_and_grid(tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two toy prompts\na red circle on the left\n\nan orange square at the top\n")
    out = tmp_path / "eval" / "scores.json"
    result = rayalign(
        "eval",
        "--model",
        tiny_pipeline_dir,
        "--prompts",
        prompts,
        "--reward",
        "toy_fidelity",
        "--num-per-prompt",
        3,
        "--seed",
        5,
        "--steps",
        3,
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["per_prompt"]) == {"a red circle on the left", "an orange square at the top"}
    assert report["mean"] == pytest.approx(np.mean(list(report["per_prompt"].values())))
    assert all(0.0 <= v <= 1.0 for v in report["per_prompt"].values())
    assert f"mean {report['mean']:.4f}" in result.stdout
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0]  # 2 rows x 3 columns
    # Labelled: one row per prompt, the images' rewards under them (stored in the PNG too).
    captions, scores = read_grid_labels(out.with_suffix(".png").read_bytes())
    assert captions == ["a red circle on the left", "an orange square at the top"] and len(scores) == 6
    assert np.mean(scores[:3]) == pytest.approx(report["per_prompt"][captions[0]])

    again = tmp_path / "again.json"
    assert (
        rayalign(
            "eval",
            "--model",
            tiny_pipeline_dir,
            "--prompts",
            prompts,
            "--reward",
            "toy_fidelity",
            "--num-per-prompt",
            3,
            "--seed",
            5,
            "--steps",
            3,
            "--output",
            again,
        ).returncode
        == 0
    )
    assert json.loads(again.read_text())["per_prompt"] == report["per_prompt"]  # same seed, same scores
    np.testing.assert_array_equal(np.asarray(Image.open(again.with_suffix(".png"))), grid)


def test_eval_writes_its_report_and_grid_to_object_storage(s3, tiny_pipeline_dir, tmp_path):
    from jobs.bench.s3 import BUCKET

    common = ("--model", tiny_pipeline_dir, "--prompts", "toy-heldout", "--reward", "toy_fidelity", "--num-per-prompt", 1, "--steps", 2)
    result = rayalign("eval", *common, "--output", f"s3://{BUCKET}/evals/base.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert s3.keys("evals/") == ["evals/base.json", "evals/base.png"]
    report = json.loads(s3.client().get_object(Bucket=BUCKET, Key="evals/base.json")["Body"].read())
    assert len(report["per_prompt"]) == len(toy_world.held_out_prompts())
    assert not list(tmp_path.iterdir())  # nothing written locally (no directory named "s3:")


def test_eval_with_an_adapter_samples_what_the_unmerged_adapter_samples(tiny_pipeline_dir, tmp_path):
    # eval folds the adapter into the weights for speed; its images must be the adapter's own.
    from actors.diffusion.images import make_labelled_grid
    from actors.diffusion.policy import DiffusionPolicy
    from actors.evaluate import evaluate
    from actors.rewards.registry import build_reward
    from tests.helpers.adapters import make_adapter

    adapter = make_adapter(tiny_pipeline_dir, tmp_path / "adapter", seed=3, target_modules=("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"))
    prompts = ["a red circle on the left", "an orange square at the top"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    common = (
        "--model",
        tiny_pipeline_dir,
        "--prompts",
        tmp_path / "prompts.txt",
        "--reward",
        "toy_fidelity",
        "--num-per-prompt",
        2,
        "--seed",
        5,
        "--steps",
        3,
        "--eta",
        1,
        "--guidance-scale",
        3,
    )
    assert (result := rayalign("eval", *common, "--output", tmp_path / "base.json")).returncode == 0, result.stderr
    assert (result := rayalign("eval", *common, "--lora", adapter, "--output", tmp_path / "adapted.json")).returncode == 0, result.stderr
    assert json.loads((tmp_path / "adapted.json").read_text())["lora"] == str(adapter)
    base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.int16)
    adapted = np.asarray(Image.open(tmp_path / "adapted.png"), dtype=np.int16)
    assert np.abs(adapted - base).mean() > 1.0, "the adapter did not change the images"

    unmerged = DiffusionPolicy.from_pretrained(tiny_pipeline_dir, finetune="lora", lora_path=adapter, device="cpu")
    assert not unmerged.lora_merged
    expected = evaluate(
        unmerged,
        prompts,
        build_reward("toy_fidelity"),
        num_per_prompt=2,
        seed=5,
        num_steps=3,
        eta=1.0,
        guidance_scale=3.0,
        batch_size=4,
        progress=False,
    )
    grid = np.asarray(make_labelled_grid(expected.images, captions=prompts, scores=expected.scores, columns=2), dtype=np.int16)
    assert np.abs(adapted - grid).max() <= 1  # float rounding may move a pixel by one level


def test_eval_combined_reward_and_builtin_prompts(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "combo.json"
    result = rayalign(
        "eval",
        "--model",
        tiny_pipeline_dir,
        "--prompts",
        "toy-heldout",
        "--reward",
        "toy_fidelity=0.5",
        "--reward",
        "jpeg_compressibility=0.1",
        "--num-per-prompt",
        1,
        "--steps",
        2,
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["per_prompt"]) == toy_world.held_out_prompts()
    assert report["reward"] == "0.5*toy_fidelity + 0.1*jpeg_compressibility"
    assert "jpeg_compressibility/jpeg_kb" in report["info"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward", "aesthetics"], "unknown reward 'aesthetics'"),
        (["--reward", "toy_fidelity", "--prompts", "missing.txt"], "prompt file 'missing.txt' does not exist"),
        (["--reward", "toy_fidelity", "--steps", "0"], "num_steps must be >= 1"),
        (["--reward", "toy_fidelity", "--model", "no/such/dir"], "is not a directory"),
        (["--reward", "toy_fidelity=heavy"], "is not a number"),
    ],
)
def test_eval_user_errors_are_one_clear_line(tiny_pipeline_dir, tmp_path, extra, message):
    args = ["eval", "--model", tiny_pipeline_dir, "--prompts", "toy-heldout", "--output", tmp_path / "x.json", *extra]
    # later flags win in argparse, so --prompts/--model given in `extra` replace the defaults above
    result = rayalign(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_unknown_reward_lists_the_valid_names(tiny_pipeline_dir, tmp_path):
    result = rayalign("eval", "--model", tiny_pipeline_dir, "--prompts", "toy-heldout", "--reward", "nope", "--output", tmp_path / "x.json")
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "toy_fidelity"):
        assert name in result.stderr


def test_make_toy_model_writes_a_loadable_sd_pipeline(tmp_path):
    out = tmp_path / "toy"
    result = rayalign(
        "make-toy-model", "--output", out, "--vae-steps", 3, "--unet-steps", 3, "--unet-lr-horizon", 10, "--images-per-prompt", 1
    )
    assert result.returncode == 0, result.stderr
    assert "wrote toy pipeline" in result.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["unet_steps"] == 3 and report["unet_lr_horizon"] == 10 and report["time/total_s"] > 0

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.scaling_factor == pytest.approx(report["vae/scaling_factor"])
    # Refuses to overwrite what is already there.
    again = rayalign("make-toy-model", "--output", out, "--vae-steps", 1, "--unet-steps", 1)
    assert again.returncode == 2 and "is not empty" in again.stderr
    negative = rayalign("make-toy-model", "--output", tmp_path / "other", "--unet-lr-horizon", -5)
    assert negative.returncode == 2 and "--unet-lr-horizon must be >= 0" in negative.stderr


def test_make_toy_model_family_sd3_writes_a_flow_pipeline_the_flow_policy_loads(tmp_path):
    out = tmp_path / "toy-sd3"
    result = rayalign("make-toy-model", "--family", "sd3", "--output", out, "--steps", 2, "--lr-horizon", 10, "--images-per-prompt", 1)
    assert result.returncode == 0, result.stderr
    assert "wrote toy flow pipeline" in result.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["family"] == "sd3" and report["steps"] == 2 and report["lr_horizon"] == 10

    from actors.diffusion.flow_policy import FlowPolicy

    policy = FlowPolicy.from_pretrained(out, finetune="full", device="cpu")
    assert policy.max_sequence_length == 16  # the toy T5 tokenizer's length, not the pipeline's 256
    assert policy.vae.config.latent_channels == 4 and policy.vae.config.shift_factor == 0.0
    _, images = policy.sample(["a red circle on the left"], seeds=[0], num_steps=2)
    assert images.shape == (1, 32, 32, 3)
    # The other family's flags are refused by name.
    wrong = rayalign("make-toy-model", "--family", "sd3", "--output", tmp_path / "other", "--unet-steps", 5)
    assert wrong.returncode == 2 and "--unet-steps is for --family sd; --family sd3 takes" in wrong.stderr


def test_make_toy_model_help_quotes_the_real_defaults():
    # The CLI does not import the pretraining modules to build its parser; its help text
    # states the defaults, which must be PretrainArgs' and FlowPretrainArgs' own.
    from actors.toy.flow_pretrain import FlowPretrainArgs
    from actors.toy.pretrain import PretrainArgs
    from jobs.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {a.dest: a.help for a in subparsers.choices["make-toy-model"]._actions}
    defaults = PretrainArgs(output="x")
    for name in ("seed", "vae_steps", "unet_steps", "unet_lr_horizon", "images_per_prompt"):
        assert f"(default {getattr(defaults, name)})" in helps[name], name
    flow_defaults = FlowPretrainArgs(output="x")
    for name in ("seed", "steps", "lr_horizon", "images_per_prompt"):
        assert f"(default {getattr(flow_defaults, name)})" in helps[name], name


def test_convert_reward_then_eval_with_a_model_reward(tiny_pipeline_dir, tiny_reward_models, tmp_path):
    head = tmp_path / "aesthetic-head"
    result = rayalign("convert-reward", "aesthetic", "--input", tiny_reward_models.aesthetic_pth, "--output", head)
    assert result.returncode == 0, result.stderr
    assert (head / "model.safetensors").is_file() and "weights` option of the aesthetic reward" in result.stdout

    out = tmp_path / "aesthetic.json"
    result = rayalign(
        "eval",
        "--model",
        tiny_pipeline_dir,
        "--prompts",
        "toy-heldout",
        "--reward",
        "aesthetic=2",
        "--reward",
        "toy_fidelity",
        "--reward-option",
        f"aesthetic.weights={head}",
        "--reward-option",
        f"aesthetic.clip={tiny_reward_models.clip}",
        "--reward-option",
        "aesthetic.batch_size=4",
        "--num-per-prompt",
        1,
        "--steps",
        2,
        "--output",
        out,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["reward"] == "2*aesthetic + 1*toy_fidelity"
    assert report["info"]["aesthetic/score"] != 0.0
    assert report["mean"] == pytest.approx(2 * report["info"]["aesthetic/score"] + report["info"]["toy_fidelity/score"], rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reward", "aesthetic"], "options.weights is required"),
        (["--reward", "toy_fidelity", "--reward-option", "aesthetic.weights=/x"], "not among the --reward names"),
        (
            ["--reward", "aesthetic", "--reward-option", "aesthetic.weights=/no/such/head"],
            "does not exist; expected the aesthetic MLP head",
        ),
    ],
)
def test_model_reward_errors_are_one_clear_line(tiny_pipeline_dir, tmp_path, extra, message):
    result = rayalign("eval", "--model", tiny_pipeline_dir, "--prompts", "toy-heldout", *extra, "--output", tmp_path / "x.json")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_set_takes_several_overrides_per_flag_and_repeats():
    from jobs.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--preset", "toy-ddpo", "--output-dir", "out", "--set", "train.epochs=2", "learner.learning_rate=1e-3", "--set", "seed=3"]
    )
    assert args.overrides == ["train.epochs=2", "learner.learning_rate=1e-3", "seed=3"]


def test_train_suggests_an_eval_command_for_the_held_out_prompts(tmp_path):
    from jobs.train import eval_command
    from orchestrator.config import dump_yaml, load_preset

    cfg = load_preset("toy-ddpo", ["model.path=/models/toy", "reward={toy_fidelity: 1.0, jpeg_compressibility: 0.5}"])
    dump_yaml(cfg, tmp_path / "config.yaml")
    line = eval_command(tmp_path)
    assert line.startswith(f"rayalign eval --model /models/toy --lora {tmp_path} --prompts toy-heldout ")
    assert "--reward toy_fidelity --reward jpeg_compressibility=0.5" in line
    # eval samples as the run was trained by itself; the line needs no sampling flags.
    assert "--steps" not in line and "--guidance-scale" not in line and line.endswith(f"--output {tmp_path}/eval_heldout.json")
