"""A tiny random FLUX.1 pipeline directory, for tests of the FLUX policy.

It has every component of the real layout (``FluxPipeline.save_pretrained``), only with widths
of a few features, so it builds in about a second and weighs well under a megabyte:

- ``transformer/``: a ``FluxTransformer2DModel`` with one double-stream (MMDiT) block and one
  single-stream block, reading 16-channel latents packed into 2 x 2 patches (64 features a
  token). ``guidance_embeds=True`` (the default) is FLUX.1-dev's guidance-distilled layout,
  whose guidance scale is an input of the network; ``False`` is FLUX.1-schnell's.
- ``vae/``: an ``AutoencoderKL`` with FLUX's 16 latent channels, no quant convolutions and
  FLUX's ``shift_factor`` / ``scaling_factor``, turning 32 x 32 images into 8 x 8 latents
  (4 x 4 = 16 image tokens once packed).
- ``text_encoder/`` and ``tokenizer/``: a ``CLIPTextModel`` (8 features) whose pooled output
  conditions the transformer's time embedding, and the toy model's CLIP tokenizer.
- ``text_encoder_2/`` and ``tokenizer_2/``: the one-layer T5 encoder and offline T5 tokenizer of
  the tiny SD3 pipeline (:mod:`actors.toy.sd3`); its tokens are what the transformer attends to.
- ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` as FLUX.1-dev ships it (resolution-dependent
  "dynamic" shift), or for ``guidance_embeds=False`` as schnell ships it (no shift at all).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from actors.toy.model import build_tokenizer, save_tokenizer, text_config
from actors.toy.sd3 import T5_WIDTH, build_flow_vae, build_t5, build_t5_tokenizer

CLIP_WIDTH = 8
"""text_encoder's hidden size: the transformer's pooled_projection_dim (768 in FLUX.1)."""
LATENT_CHANNELS = 16
VAE_SHIFT_FACTOR = 0.1159
VAE_SCALING_FACTOR = 0.3611
"""FLUX.1's VAE normalisation (its published vae/config.json): latents = (z - shift) * scale."""


def _build_transformer(*, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # a token is a 2 x 2 patch of latent pixels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),  # rotary dims of (unused, row, column) positions; they sum to the head dim
    )


def _build_scheduler(*, dynamic_shift: bool) -> FlowMatchEulerDiscreteScheduler:
    if dynamic_shift:
        # FLUX.1-dev's scheduler_config.json
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # FLUX.1-schnell's


def build_random_flux_pipeline(directory: str | os.PathLike, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a randomly initialised tiny ``FluxPipeline`` to ``directory``; returns it.

    Same ``seed``, same weights. Images are 32 x 32 pixels, latents 16 x 8 x 8 (16 tokens of 64
    features packed). ``guidance_embeds`` True builds a FLUX.1-dev-like model, False a schnell-like one.
    """
    torch.manual_seed(seed)
    t5_tokenizer = build_t5_tokenizer()
    pipeline = FluxPipeline(
        transformer=_build_transformer(guidance_embeds=guidance_embeds),
        scheduler=_build_scheduler(dynamic_shift=guidance_embeds),
        vae=build_flow_vae(scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR),
        text_encoder=CLIPTextModel(text_config(hidden_size=CLIP_WIDTH, num_layers=2, num_heads=2, vocab_size=None)),
        tokenizer=build_tokenizer(),
        text_encoder_2=build_t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
    )
    directory = Path(directory)
    pipeline.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(build_tokenizer(), directory / "tokenizer")
    return directory
