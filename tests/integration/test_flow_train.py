"""Flow-GRPO on Stable Diffusion 3 and FLUX.1 end to end: tiny random pipelines trained through Ray, then used.

One short run per family, GRPO-style (advantages normalised within each prompt's group of
images), LoRA on the transformer's default layers, goes through every worker with the
flow-matching policy: rollout actors sample the SDE on a window of the steps (the ODE on the
last) and record the window's sigmas, the learner trains the transformer's adapter under
DeepSpeed with DPOK, whose reference means it computes itself with the adapter switched off
(no reference pool is started), and checkpoints are written. The adapter it leaves must then
load where users take it: diffusers' own pipeline (``StableDiffusion3Pipeline``,
``FluxPipeline``), ``rayalign eval --lora RUN`` and the serving generator.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.numpy import load_file

from actors.diffusion.files import LORA_WEIGHTS_NAME
from actors.diffusion.flow_policy import FlowPolicy
from actors.diffusion.flux_policy import FluxPolicy
from actors.diffusion.generator import ImageGenerator, ImageJob
from actors.diffusion.policy import pretrained_policy
from jobs import eval as eval_job
from jobs.cli import build_parser
from jobs.serve.app import request_defaults, request_window, serve_sampling
from orchestrator.config import ServeConfig
from orchestrator.metrics import REQUIRED_KEYS, read_metrics
from orchestrator.run import train
from orchestrator.rundir import resolve_lora_dir
from tests.helpers.flow import T5_TOKENS, transformer_inputs
from tests.helpers.runs import final_lora, tiny_config

FLOW_GRPO = {
    "model.lora.alpha": 4.0,  # rank 2: scale 2, so a reader that assumed alpha = rank would apply it at half strength
    "sampling.eta": 0.7,  # Flow-GRPO's SDE noise level
    "train.samples_per_prompt": 4,  # 8 samples an epoch: 2 prompts x 4 images
    "train.advantage": "group",
    "sampling.sde_window": "[0, 2]",  # Flow-GRPO-Fast: the SDE on steps 0 and 1, the ODE on step 2
    "train.algorithm": "dpok",
    "train.reference": "adapter_off",  # the learner's own transformer, adapter off: no reference pool
}
TRAINED_SAMPLING = {"num_steps": 3, "eta": 0.7, "guidance_scale": 2.0}
"""What tiny_config and FLOW_GRPO sample with; eval must pick it up from the run (FLUX: distilled guidance 2)."""
PROMPT = "a red circle on the left"
FAMILIES = {
    "sd3": ("sd3_dir", StableDiffusion3Pipeline, FlowPolicy),
    "flux": ("flux_dir", FluxPipeline, FluxPolicy),
}
"""Per family: the fixture of its tiny pipeline directory, diffusers' pipeline class, rayalign's policy class."""


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def pipeline_dir(family, request):
    return request.getfixturevalue(FAMILIES[family][0])


@pytest.fixture(scope="module")
def run(ray_cluster, family, pipeline_dir, tmp_path_factory):
    """Two epochs of DPOK with the reference computed in the learner, and a checkpoint after each."""
    run = tmp_path_factory.mktemp(f"flow-grpo-{family}") / "run"
    train(tiny_config(pipeline_dir, **FLOW_GRPO), run, progress=False)
    return run


def test_both_epochs_train_with_finite_metrics_and_exact_recomputation(run):
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in (*REQUIRED_KEYS, "loss/policy", "policy/onpolicy_gap", "optim/lr"):
            assert m[key] is not None and np.isfinite(m[key]), (m["epoch"], key, m[key])  # a NaN is written as null
        # the transformer-only learner re-scores the rollout's recorded SDE steps (the window's, float32 sigmas) exactly
        assert m["policy/onpolicy_gap"] < 1e-4
        assert 0 <= m["advantages/zero_spread_groups"] <= 2
        assert m["samples"] == 8 * m["epoch"]
        assert "busy/reference_s" not in m  # train.reference: adapter_off started no reference pool
    assert metrics[1]["kl/mean"] > 0  # DPOK's KL to the adapter-off transformer sees the policy move


def test_the_lora_checkpoint_moved_from_its_initial_value(run):
    first = load_file(str(run / "checkpoints" / "epoch_0001" / "lora" / LORA_WEIGHTS_NAME))
    last = final_lora(run)
    assert first.keys() == last.keys() and all(name.startswith("transformer.") for name in last)  # the SD3 / FLUX LoRA file layout
    # model.lora.target_modules is null: the family's defaults, the text stream's layers included
    assert any(".attn.add_q_proj.lora_A." in name for name in last) and any(".ff_context.net.2.lora_B." in name for name in last)
    ups = [name for name in last if ".lora_B." in name]
    # peft starts every lora_B at zero: non-zero ones were trained, and epoch 2 moved them on from epoch 1
    assert ups and max(float(np.abs(last[name]).max()) for name in ups) > 0
    assert any(not np.array_equal(first[name], last[name]) for name in ups)
    assert all(np.isfinite(array).all() for array in last.values())


def test_the_adapter_loads_into_the_diffusers_pipeline_as_rayalign_reads_it(family, run, pipeline_dir):
    _, pipeline_class, policy_class = FAMILIES[family]
    lora = resolve_lora_dir(run)
    policy = pretrained_policy(pipeline_dir, lora_path=lora, device="cpu", max_sequence_length=T5_TOKENS)
    assert isinstance(policy, policy_class) and policy.lora_config.lora_alpha == 4.0
    trajectories, _ = policy.sample([PROMPT], seeds=[0], num_steps=2, decode=False)
    inputs = transformer_inputs(family, trajectories, step=1, sigma=0.5)
    pipe = pipeline_class.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        plain = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(lora, weight_name=LORA_WEIGHTS_NAME)
        theirs, ours = pipe.transformer(**inputs)[0], policy.transformer(**inputs)[0]
    assert (ours - plain).abs().max() > 0  # the trained adapter acts
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)  # same layers, same scale
    generated = pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=T5_TOKENS,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert generated.images.shape == (1, 32, 32, 3) and np.isfinite(generated.images).all()


def test_eval_and_the_serving_generator_sample_with_the_run_s_adapter(family, run, pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na blue square at the top\n")
    output = tmp_path / "eval.json"
    # no --model: the base model is the one the run trained (recorded beside the adapter), not the toy UNet model
    flags = ["--lora", str(run), "--prompts", str(prompts), "--reward", "jpeg_incompressibility"]
    args = build_parser().parse_args(["eval", *flags, "--num-per-prompt", "2", "--output", str(output), "--device", "cpu"])
    assert eval_job.run(args) == 0
    report = json.loads(output.read_text())
    assert report["model"] == str(pipeline_dir)
    assert np.isfinite(report["mean"]) and len(report["per_prompt"]) == 2
    assert {name: report["sampling"][name] for name in TRAINED_SAMPLING} == TRAINED_SAMPLING  # sampled as trained
    assert report["sampling"]["sde_window"] == [0, 2]  # SDE on steps 0-1 and the ODE step after, as the rollout actors did
    assert output.with_suffix(".png").is_file()

    generator = ImageGenerator.from_pretrained(pipeline_dir, device="cpu", batch_size=2, pad_batches=False)
    assert isinstance(generator.policy, FAMILIES[family][2])
    adapter = generator.load_adapter(resolve_lora_dir(run))
    (result,) = generator.generate([ImageJob(prompt=PROMPT, seeds=(1, 2), **TRAINED_SAMPLING)])
    assert result.adapter_version == adapter.version and result.images.shape == (2, 32, 32, 3)
    # a job with the run's window samples as the policy's windowed sampler does, and differs from the SDE on every step
    (windowed,) = generator.generate([ImageJob(prompt=PROMPT, seeds=(1, 2), sde_window=(0, 2), **TRAINED_SAMPLING)])
    _, expected = generator.policy.sample([PROMPT] * 2, seeds=[1, 2], sde_window=(0, 2), **TRAINED_SAMPLING)
    np.testing.assert_array_equal(windowed.images, expected)
    assert not np.array_equal(windowed.images, result.images)
    # the server takes the window from the run, and gives it to requests at the trained number of steps only
    served = serve_sampling(ServeConfig(model=str(pipeline_dir)), resolve_lora_dir(run))
    assert served.settings.sde_window == (0, 2) and request_defaults(served)["sde_window"] == [0, 2]
    assert request_window(served.settings, 3) == (0, 2) and request_window(served.settings, 5) is None
