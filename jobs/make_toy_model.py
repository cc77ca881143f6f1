"""``rayalign make-toy-model``: pretrain the embedded toy text-to-image model from scratch."""

from __future__ import annotations

import argparse

from actors.toy.pretrain import PretrainArgs, pretrain

FLAGS = ("seed", "vae_steps", "unet_steps", "unet_lr_horizon", "images_per_prompt")
"""Flags that map onto :class:`~actors.toy.pretrain.PretrainArgs` fields (unset ones keep its defaults)."""


def run(args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    for name, value in given.items():
        if name == "unet_lr_horizon" and value < 0:
            raise ValueError(f"--unet-lr-horizon must be >= 0 (0 means --unet-steps), got {value}")
        if name not in ("seed", "unet_lr_horizon") and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    report = pretrain(PretrainArgs(output=args.output, **given))
    print(
        f"wrote toy pipeline to {args.output} in {report['time/total_s']:.0f}s "
        f"(reconstruction fidelity {report['vae/reconstruction_fidelity']:.3f}, denoiser loss {report['unet/final_loss']:.4f})"
    )
    return 0
