"""``rayalign eval``: score a model (and an adapter) on a prompt list, sampled as the adapter was trained."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Sequence

from actors.diffusion.images import encode_png, grid_labels, make_labelled_grid
from actors.diffusion.policy import pretrained_policy
from actors.evaluate import evaluate
from actors.prompts import read_prompts
from actors.rewards.registry import build_reward
from actors.storage import Location
from jobs.console import quiet_library_progress
from jobs.sampling import choose_sampling, default_sampler, parse_window
from orchestrator.config import SamplingConfig, apply_overrides
from orchestrator.rundir import lora_choice, resolve_lora_dir, resolve_model, trained_sampling

logger = logging.getLogger("rayalign")

SAMPLING_FLAGS = {"num_steps": "--steps", "eta": "--eta", "guidance_scale": "--guidance-scale", "sde_window": "--sde-window"}
"""The flag that sets each sampler setting."""


def parse_reward_args(values: Sequence[str]) -> list[tuple[str, float]]:
    """``--reward NAME`` / ``NAME=WEIGHT`` flags as (name, weight) pairs."""
    components = []
    for value in values:
        name, _, weight = value.partition("=")
        try:
            components.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"--reward {value!r}: weight {weight!r} is not a number; write NAME or NAME=WEIGHT") from None
    return components


def parse_reward_options(values: Sequence[str], names: Sequence[str]) -> dict[str, dict]:
    """``--reward-option NAME.KEY=VALUE`` flags as ``{name: {key: value}}`` (values read as YAML)."""
    for value in values:
        key, sep, _ = value.partition("=")
        name = key.partition(".")[0]
        if not sep or "." not in key:
            raise ValueError(f"--reward-option {value!r} must look like NAME.KEY=VALUE, e.g. aesthetic.weights=/models/aesthetic")
        if name not in names:
            raise ValueError(f"--reward-option {value!r} is for reward {name!r}, which is not among the --reward names {list(names)}")
    return apply_overrides({}, values)


def run(args: argparse.Namespace) -> int:
    # Cheap checks first, so a typo fails before any model is loaded.
    given = {"num_steps": args.steps, "eta": args.eta, "guidance_scale": args.guidance_scale}
    defaults = default_sampler()
    SamplingConfig(
        **{name: getattr(defaults, name) if value is None else value for name, value in given.items()}, batch_size=args.batch_size
    )
    if args.sde_window is not None:
        given["sde_window"] = parse_window(args.sde_window)  # checked against the steps once they are known
    components = parse_reward_args(args.reward)
    reward = build_reward(components, options=parse_reward_options(args.reward_option, [name for name, _ in components]))
    reward.check()
    prompts = read_prompts(args.prompts)
    output = Location(args.output)  # a local path or an object-store URI
    if not output.name.lower().endswith(".json"):
        raise ValueError(f"--output {args.output!r} must end in .json (the image grid is written next to it as .png)")
    if args.num_per_prompt < 1:
        raise ValueError(f"--num-per-prompt must be >= 1, got {args.num_per_prompt}")

    quiet_library_progress()
    adapter, chosen_adapter = lora_choice(args.lora) if args.lora else (None, None)
    lora = resolve_lora_dir(adapter.uri) if adapter is not None else None
    # a fully fine-tuned run: its base model and trained UNet; no --model: the adapter's base model
    model_path, unet = resolve_model(args.model, lora)
    unet_path = unet.uri if unet is not None else None
    chosen = choose_sampling(given, trained_sampling(lora) if lora else None, names=SAMPLING_FLAGS)
    for line in chosen.differences:
        print(f"warning: {line}", file=sys.stderr)
    window, steps = chosen.settings.sde_window, chosen.settings.num_steps
    if window is not None and not 0 <= window[0] < window[1] <= steps:
        raise ValueError(
            f"--sde-window {window[0]},{window[1]} is not within the {steps} steps: give 0 <= START < STOP <= {steps}, or none"
        )
    sampling = SamplingConfig(**dataclasses.asdict(chosen.settings), batch_size=args.batch_size)  # also checks the trained settings
    reward.load()  # a reward model that cannot load should fail before sampling starts
    logger.info("loading %s%s", model_path, f" + LoRA {lora}" if lora else "")
    # The model's family picks the policy class (SD3: the flow-matching policy, which reads SD3 adapters).
    if lora:
        policy = pretrained_policy(model_path, finetune="lora", lora_path=lora, dtype=args.dtype, device=args.device, unet_path=unet_path)
        policy.merge_lora()  # eval only samples: fold the adapter in (float32 only; same images to rounding)
    else:
        policy = pretrained_policy(model_path, finetune="full", dtype=args.dtype, device=args.device, unet_path=unet_path)
    logger.info(
        "%d prompts x %d images, reward %s; sampling with %s (%s)",
        len(prompts),
        args.num_per_prompt,
        reward.name,
        chosen.settings.describe(),
        chosen.origin(),
    )
    result = evaluate(
        policy,
        prompts,
        reward,
        num_per_prompt=args.num_per_prompt,
        seed=args.seed,
        num_steps=sampling.num_steps,
        eta=sampling.eta,
        guidance_scale=sampling.guidance_scale,
        batch_size=sampling.batch_size,
        sde_window=sampling.sde_window,
    )
    report = {
        "mean": result.mean,
        "std": result.std,
        "per_prompt": result.per_prompt,
        "reward": reward.name,
        "info": result.info,
        "model": str(args.model or model_path),
        "lora": str(lora) if lora else None,
        "num_per_prompt": args.num_per_prompt,
        "seed": args.seed,
        "sampling": chosen.record(),
        "images_per_second": result.images_per_second,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    grid = Location(output.uri[: -len(".json")] + ".png")
    # One prompt per row, captioned, each image's reward under it.
    image = make_labelled_grid(result.images, captions=prompts, scores=result.scores, columns=args.num_per_prompt)
    grid.write_bytes(encode_png(image, text=grid_labels(prompts, result.scores)))
    print(
        f"{reward.name}: mean {result.mean:.4f} (std {result.std:.4f}) over {len(prompts)} prompts x {args.num_per_prompt} images "
        f"[{result.images_per_second:.1f} images/s]"
    )
    if chosen_adapter:
        print(f"adapter: {chosen_adapter}")  # a run's best checkpoint, or its latest
    print(f"sampled with {chosen.settings.describe()} ({chosen.origin()})")
    print(f"wrote {output} and {grid}")
    return 0
