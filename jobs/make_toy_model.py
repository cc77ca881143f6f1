"""``rayalign make-toy-model``: pretrain an embedded toy text-to-image model from scratch."""

from __future__ import annotations

import argparse

from actors.toy.flow_pretrain import FlowPretrainArgs, pretrain_flow
from actors.toy.pretrain import PretrainArgs, pretrain

FLAGS = {
    "sd": ("seed", "images_per_prompt", "vae_steps", "unet_steps", "unet_lr_horizon"),
    "sd3": ("seed", "images_per_prompt", "steps", "lr_horizon"),
}
"""Per family, the flags that map onto its arguments' fields (unset ones keep the dataclass defaults)."""

HORIZONS = ("unet_lr_horizon", "lr_horizon")
"""Flags where 0 is allowed (it means: as long as the training steps)."""


def _given(args: argparse.Namespace) -> dict:
    other = "sd3" if args.family == "sd" else "sd"
    wrong = [name for name in FLAGS[other] if name not in FLAGS[args.family] and getattr(args, name) is not None]
    if wrong:
        flags = ", ".join("--" + name.replace("_", "-") for name in wrong)
        usable = ", ".join("--" + name.replace("_", "-") for name in FLAGS[args.family])
        raise ValueError(f"{flags} {'is' if len(wrong) == 1 else 'are'} for --family {other}; --family {args.family} takes {usable}")
    given = {name: getattr(args, name) for name in FLAGS[args.family] if getattr(args, name) is not None}
    for name, value in given.items():
        if name in HORIZONS and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0 means the training steps), got {value}")
        if name != "seed" and name not in HORIZONS and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return given


def run(args: argparse.Namespace) -> int:
    given = _given(args)
    if args.family == "sd3":
        report = pretrain_flow(FlowPretrainArgs(output=args.output, **given))
        print(f"wrote toy flow pipeline to {args.output} in {report['time/total_s']:.0f}s (flow-matching loss {report['loss/final']:.4f})")
        return 0
    report = pretrain(PretrainArgs(output=args.output, **given))
    print(
        f"wrote toy pipeline to {args.output} in {report['time/total_s']:.0f}s "
        f"(reconstruction fidelity {report['vae/reconstruction_fidelity']:.3f}, denoiser loss {report['unet/final_loss']:.4f})"
    )
    return 0
