"""Pretraining of the embedded toy text-to-image model (``rayalign make-toy-model``).

Two phases on ground-truth renders of the *training* captions only (held-out
combinations are never seen, so evaluating on them measures composition):

1. the autoencoder learns to reconstruct 32 x 32 images through an 8 x 8 x 4 latent
   (MSE plus a small KL term, as in latent diffusion), then the latent scaling factor is
   set so scaled latents have unit variance (Stable Diffusion's convention);
2. the UNet and the CLIP text encoder learn the usual epsilon-prediction objective
   jointly, with 10 % of captions dropped to the empty string so classifier-free
   guidance works.

Training is deliberately short: the shipped model follows prompts only partly, which
leaves reward headroom for RL fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from actors.toy import model as toy_model
from actors.toy import world as toy_world

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ToyPretrainArgs:
    """What the pretraining jobs of both toy models take."""

    output: str
    """Directory the pipeline is written to (created; must be empty or absent)."""
    seed: int = 0
    """Seeds data rendering, initialisation and noise."""
    caption_dropout: float = 0.1
    """Fraction of captions replaced by "" so the unconditional branch of CFG is learned."""
    ema_decay: float = 0.995
    """Exponential moving average of the denoiser's (and text encoders') weights; the average is what gets saved."""
    images_per_prompt: int = 80
    """Ground-truth renders per training caption (distinct seeds)."""
    snapshot_steps: tuple[int, ...] = ()
    """Denoiser steps at which to also save a full pipeline under ``output/snapshots/step_N``."""
    num_threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""


@dataclasses.dataclass(frozen=True)
class PretrainArgs(ToyPretrainArgs):
    """Settings of the toy UNet model's pretraining job."""

    vae_steps: int = 1000
    """Optimiser steps of the autoencoder phase."""
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-5
    """Weight of KL(q(z|x) || N(0, I)); small, so latents stay informative."""
    unet_steps: int = 500
    """Optimiser steps of the denoiser phase."""
    unet_lr_horizon: int = 2600
    """Length of the denoiser's cosine learning-rate schedule; a value below ``unet_steps``
    (0 included) means ``unet_steps``. The default is the shipped model's.

    A horizon longer than ``unet_steps`` stops training part-way down the schedule, at a
    learning rate that is still high: the model is caught mid-way through learning, with
    its attributes partly learned, which leaves headroom for RL.
    """
    unet_batch_size: int = 128
    unet_lr: float = 1e-3


def drop_captions(captions: list[str], fraction: float, generator: torch.Generator) -> list[str]:
    """``captions`` with each replaced by "" with probability ``fraction`` (for classifier-free guidance)."""
    drop = torch.rand(len(captions), generator=generator) < fraction
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def start(args: ToyPretrainArgs) -> torch.Generator:
    """Refuse a non-empty output directory, set torch's threads and seed; the job's generator."""
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"output directory {output} is not empty; choose a new path or remove it")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed)


def render_dataset(images_per_prompt: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Ground-truth renders of every training caption: the captions and (N, 3, 32, 32) pixels in [-1, 1]."""
    prompts = [p for p in toy_world.train_prompts() for _ in range(images_per_prompt)]
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=len(prompts))
    images = toy_world.render_batch(prompts, seeds.tolist())  # (N, 32, 32, 3) uint8
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, 32, 32) in [-1, 1]
    return prompts, pixels


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def ema_update(pairs, step: int, max_decay: float) -> None:
    """Move each (average, model) pair's average towards the model; the decay ramps up to ``max_decay`` over the first steps."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for average, model in pairs:
        for p_average, p in zip(average.parameters(), model.parameters()):
            p_average.lerp_(p, 1 - decay)


def train_vae(vae, pixels: torch.Tensor, args: PretrainArgs, generator: torch.Generator) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, args.vae_steps, 50))
    vae.train()
    losses = []
    for _ in tqdm(range(args.vae_steps), desc="autoencoder", mininterval=5):
        index = torch.randint(0, len(pixels), (args.vae_batch_size,), generator=generator)
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + args.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    vae.eval()
    return {"vae/final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)])


@torch.no_grad()
def reconstruction_fidelity(vae, pixels: torch.Tensor, prompts: list[str], count: int = 256) -> float:
    """Verifier score of autoencoder reconstructions: the ceiling any latent model can reach."""
    index = torch.linspace(0, len(pixels) - 1, count).long()
    decoded = vae.decode(vae.encode(pixels[index]).latent_dist.mean).sample
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return float(np.mean([toy_world.fidelity(img, prompts[i]) for img, i in zip(images, index.tolist())]))


def train_denoiser(
    unet, text_encoder, tokenizer, noise_scheduler, latents, prompts, args: PretrainArgs, generator, on_snapshot=None
) -> dict:
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, max(args.unet_lr_horizon, args.unet_steps), 100))
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    losses = []
    prompt_array = np.array(prompts, dtype=object)
    progress = tqdm(range(1, args.unet_steps + 1), desc="denoiser", mininterval=5)
    for step in progress:
        index = torch.randint(0, len(latents), (args.unet_batch_size,), generator=generator)
        x0 = latents[index]
        captions = drop_captions(prompt_array[index.numpy()].tolist(), args.caption_dropout, generator)
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        embeddings = text_encoder(ids)[0]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=embeddings).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema_update(((ema, unet), (ema_text, text_encoder)), step, args.ema_decay)
        losses.append(loss.item())
        if step % 100 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if on_snapshot is not None and step in args.snapshot_steps:
            on_snapshot(step, ema, ema_text)
    return {"unet/final_loss": float(np.mean(losses[-100:])), "ema_unet": ema, "ema_text_encoder": ema_text}


def pretrain(args: PretrainArgs) -> dict:
    """Train the toy pipeline and save it to ``args.output``; returns a report dict."""
    output = Path(args.output)
    generator = start(args)
    started = time.perf_counter()

    prompts, pixels = render_dataset(args.images_per_prompt, args.seed)
    logger.info("rendered %d training images of %d captions", len(prompts), len(set(prompts)))

    vae = toy_model.build_vae()
    vae_report = train_vae(vae, pixels, args, generator)
    vae_seconds = time.perf_counter() - started
    recon = reconstruction_fidelity(vae, pixels, prompts)
    logger.info("autoencoder done in %.0fs; reconstruction fidelity %.3f", vae_seconds, recon)

    latents = encode_latents(vae, pixels)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor

    tokenizer = toy_model.build_tokenizer()
    text_encoder = toy_model.build_text_encoder()
    unet = toy_model.build_unet()
    scheduler = toy_model.build_scheduler()

    def save(directory: Path, unet_weights, text_weights) -> None:
        toy_model.save_pipeline(directory, unet=unet_weights, vae=vae, text_encoder=text_weights, tokenizer=tokenizer, scheduler=scheduler)

    def on_snapshot(step, ema_unet, ema_text):
        save(output / "snapshots" / f"step_{step}", ema_unet, ema_text)

    denoiser_report = train_denoiser(unet, text_encoder, tokenizer, scheduler, latents, prompts, args, generator, on_snapshot)
    save(output, denoiser_report.pop("ema_unet"), denoiser_report.pop("ema_text_encoder"))
    report = {
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "unet_lr_horizon": max(args.unet_lr_horizon, args.unet_steps),
        "train_images": len(prompts),
        "vae/reconstruction_fidelity": recon,
        "vae/scaling_factor": scaling_factor,
        "time/vae_s": vae_seconds,
        "time/total_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        **vae_report,
        **denoiser_report,
    }
    (output / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
