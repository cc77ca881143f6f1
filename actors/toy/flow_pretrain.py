"""Pretraining of the embedded toy flow model (``rayalign make-toy-model --family sd3``).

The model is a Stable Diffusion 3.5-format pipeline (:func:`actors.toy.sd3.build_toy_sd3_parts`)
over the latent space of the toy UNet model's autoencoder, which it reuses as is: the
autoencoder already reconstructs the toy world (its pretraining report says how well), and
sharing it makes the two toy models' images directly comparable. Its latents are used with
the autoencoder's own scaling factor and a shift of 0.

The transformer and the three text encoders learn rectified flow jointly on ground-truth
renders of the *training* captions: ``x_s = (1 - s) x_0 + s e`` for noise ``e``, the
transformer predicts the velocity ``e - x_0``, with ``s`` uniform in [0, 1] (rectified flow as
Liu et al. 2022 train it). SD3's logit-normal ``s`` (Esser et al. 2024, sec. 3.1) puts 2 % of
its draws above 0.88, where a toy image's colour is decided, and a first run with it learned
positions but mixed colours within one shape.
10 % of captions are dropped to the empty string so classifier-free guidance works, and
the saved weights are an exponential moving average.

As with the UNet model, training stops part-way down a longer learning-rate schedule
(``lr_horizon``), so the shipped model follows prompts only partly and RL has headroom in
each attribute.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from tqdm.auto import tqdm

from actors.toy import model as toy_model
from actors.toy import sd3 as toy_sd3
from actors.toy.pretrain import ToyPretrainArgs, drop_captions, ema_update, encode_latents, render_dataset, start, warmup_cosine

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FlowPretrainArgs(ToyPretrainArgs):
    """Settings of the toy flow model's pretraining job."""

    steps: int = 240
    """Optimiser steps."""
    lr_horizon: int = 3000
    """Length of the cosine learning-rate schedule; a value below ``steps`` (0 included) means
    ``steps``. Longer than ``steps`` stops training with attributes partly learned."""
    batch_size: int = 128
    lr: float = 1e-3


def uniform_sigmas(count: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels drawn uniformly from [0, 1)."""
    return torch.rand(count, generator=generator)


def flow_matching_loss(transformer, pipeline: StableDiffusion3Pipeline, x0: torch.Tensor, captions: list[str], generator) -> torch.Tensor:
    """Mean squared error of the predicted velocity ``noise - x0`` at uniform noise levels."""
    embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=toy_sd3.TOY_TEXT_TOKENS
    )
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = uniform_sigmas(len(x0), generator)
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    velocity = transformer(
        hidden_states=noisy,
        timestep=sigmas * pipeline.scheduler.config.num_train_timesteps,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
    ).sample
    return F.mse_loss(velocity, noise - x0)


def pretrain_flow(args: FlowPretrainArgs) -> dict:
    """Train the toy flow pipeline and save it to ``args.output``; returns a report dict."""
    output = Path(args.output)
    generator = start(args)
    started = time.perf_counter()

    prompts, pixels = render_dataset(args.images_per_prompt, args.seed)
    vae = AutoencoderKL.from_pretrained(toy_model.embedded_model_path(), subfolder="vae").requires_grad_(False).eval()
    vae.register_to_config(shift_factor=0.0)
    latents = encode_latents(vae, pixels) * vae.config.scaling_factor
    logger.info("encoded %d training images of %d captions (latent std %.3f)", len(prompts), len(set(prompts)), float(latents.std()))

    parts = toy_sd3.build_toy_sd3_parts(vae)
    pipeline = StableDiffusion3Pipeline(**parts)
    trained = [parts["transformer"], parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]]
    averages = [copy.deepcopy(module).requires_grad_(False) for module in trained]
    params = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    horizon = max(args.lr_horizon, args.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, horizon, 100))
    for module in trained:
        module.train()

    def save(directory: Path) -> None:
        toy_sd3.save_sd3_pipeline(
            directory,
            **{**parts, **dict(zip(("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"), averages))},
        )

    prompt_array = np.array(prompts, dtype=object)
    losses = []
    progress = tqdm(range(1, args.steps + 1), desc="flow transformer", mininterval=5)
    for step in progress:
        index = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        captions = drop_captions(prompt_array[index.numpy()].tolist(), args.caption_dropout, generator)
        loss = flow_matching_loss(parts["transformer"], pipeline, latents[index], captions, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_update(zip(averages, trained), step, args.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step in args.snapshot_steps:
            save(output / "snapshots" / f"step_{step}")
    save(output)
    report = {
        "family": "sd3",
        "seed": args.seed,
        "steps": args.steps,
        "lr_horizon": horizon,
        "train_images": len(prompts),
        "vae": "the toy UNet model's autoencoder (toy-t2i/vae), shift_factor 0",
        "loss/final": float(np.mean(losses[-100:])),
        "time/total_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    (output / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
