"""A tiny random Stable Diffusion 3 / 3.5 pipeline directory, for tests of the flow-matching policy.

It has every component of the real layout (``StableDiffusion3Pipeline.save_pretrained``),
only with widths of a few features, so it builds in about a second and weighs well under a
megabyte:

- ``transformer/``: an ``SD3Transformer2DModel`` (MMDiT) over 8 x 8 x 16 latents in 2 x 2
  patches. The default ``variant="sd3.5"`` adds SD 3.5's traits (RMS-normalised queries and
  keys, one block with a second, image-only attention); ``"sd3"`` is SD 3.0's plain MMDiT.
- ``vae/``: an ``AutoencoderKL`` with SD3's 16 latent channels, no quant convolutions and
  SD3's ``shift_factor`` / ``scaling_factor``, turning 32 x 32 images into 8 x 8 latents.
- ``text_encoder/`` and ``text_encoder_2/``: two ``CLIPTextModelWithProjection`` of different
  widths (8 and 16 features, like SD3's 768 and 1280), so the zero-padding of their joint
  features up to the T5 width is exercised; ``tokenizer/`` and ``tokenizer_2/`` are the toy
  model's CLIP tokenizer.
- ``text_encoder_3/`` and ``tokenizer_3/``: a one-layer ``T5EncoderModel`` (32 features) and a
  T5 (Unigram) tokenizer whose vocabulary is built here from the toy grammar, since nothing
  can be downloaded: every grammar word is one piece, and single letters let any lower-case
  text still tokenize.
- ``scheduler/``: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, SD3's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from actors.toy.model import build_tokenizer, grammar_words, save_tokenizer, text_config

SD3Variant = Literal["sd3", "sd3.5"]

CLIP_WIDTHS = (8, 16)
"""Hidden size (and projection size) of text_encoder and text_encoder_2."""
T5_WIDTH = 32
"""text_encoder_3's d_model: the transformer's joint_attention_dim, which the CLIP features are padded to."""
LATENT_CHANNELS = 16
VAE_SHIFT_FACTOR = 0.0609
VAE_SCALING_FACTOR = 1.5305
"""SD3's VAE normalisation (its published vae/config.json): latents = (z - shift) * scale."""


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer over the toy grammar, built offline from a hand-made Unigram vocabulary.

    T5's fixed ids come first (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2); whole words score higher
    than letters, so a grammar word is always one piece. No sentinel (``<extra_id_*>``) tokens:
    an encoder-only use never needs them.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in grammar_words()]
    pieces += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [(f"\u2581{letter}", -5.0) for letter in "abcdefghijklmnopqrstuvwxyz" if f"\u2581{letter}" not in dict(pieces)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _build_transformer(
    variant: SD3Variant,
    *,
    in_channels: int = LATENT_CHANNELS,
    patch_size: int = 2,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    text_width: int = T5_WIDTH,
    pooled_width: int = sum(CLIP_WIDTHS),
) -> SD3Transformer2DModel:
    sd35 = variant == "sd3.5"
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim,  # text tokens join the image tokens' attention
        pooled_projection_dim=pooled_width,
        pos_embed_max_size=8,
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )


def build_flow_vae(*, scaling_factor: float = VAE_SCALING_FACTOR, shift_factor: float = VAE_SHIFT_FACTOR) -> AutoencoderKL:
    """A tiny 16-channel VAE as SD3 and FLUX.1 have (they differ only in the latent scaling and shift)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=True,
    )


def _build_clip(width: int, heads: int = 2) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(text_config(hidden_size=width, num_layers=2, num_heads=heads, vocab_size=None, projection_dim=width))


def build_t5(tokenizer: T5Tokenizer, *, width: int = T5_WIDTH, num_layers: int = 1) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the encoder SD3 ships
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def save_sd3_pipeline(directory: str | os.PathLike, **components) -> Path:
    """Write a ``StableDiffusion3Pipeline`` directory (safetensors) from its nine components; returns it."""
    directory = Path(directory)
    StableDiffusion3Pipeline(**components).save_pretrained(directory, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        save_tokenizer(build_tokenizer(), directory / sub)
    return directory


def build_random_sd3_pipeline(directory: str | os.PathLike, *, seed: int = 0, variant: SD3Variant = "sd3.5") -> Path:
    """Save a randomly initialised tiny ``StableDiffusion3Pipeline`` to ``directory``; returns it.

    Same ``seed``, same weights. Images are 32 x 32 pixels, latents 16 x 8 x 8.
    """
    if variant not in ("sd3", "sd3.5"):
        raise ValueError(f"variant {variant!r} is not one of 'sd3', 'sd3.5'")
    torch.manual_seed(seed)
    t5_tokenizer = build_t5_tokenizer()
    return save_sd3_pipeline(
        directory,
        transformer=_build_transformer(variant),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=build_flow_vae(),
        text_encoder=_build_clip(CLIP_WIDTHS[0]),
        tokenizer=build_tokenizer(),
        text_encoder_2=_build_clip(CLIP_WIDTHS[1]),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=build_t5(t5_tokenizer),
        tokenizer_3=t5_tokenizer,
    )


TOY_TEXT_TOKENS = 16
"""T5 tokens per caption of the embedded toy flow model (its T5 tokenizer's ``model_max_length``,
which the flow policy takes as its default): a toy caption is at most 7 words, one token each,
plus the end marker."""

TOY_WIDTH = 64
"""The embedded toy flow model's widths: T5 and the transformer's inner width; each CLIP encoder has half."""


def build_toy_sd3_parts(vae: AutoencoderKL) -> dict:
    """The untrained components of the embedded toy flow model around the toy world's ``vae``.

    An SD 3.5-style MMDiT (RMS-normalised queries and keys, a second image-only attention in
    the first block) of 6 blocks, 64 features in 4 heads, over the 4-channel 8 x 8 latents of
    the toy UNet model's autoencoder in 2 x 2 patches, as SD3's (16 image tokens of 8 x 8
    pixels: a shape covers about four); two CLIP text encoders of 32 features and a 2-layer
    T5 of 64. The
    scheduler is SD3's flow-matching Euler scheduler without a timestep shift: SD3's shift
    of 3 is for 128 x 128 latents, where far more noise is needed to erase an image.
    """
    channels = vae.config.latent_channels
    t5_tokenizer = build_t5_tokenizer()
    t5_tokenizer.model_max_length = TOY_TEXT_TOKENS
    clip_width = TOY_WIDTH // 2
    return {
        "transformer": _build_transformer(
            "sd3.5",
            in_channels=channels,
            patch_size=2,
            num_layers=6,
            heads=4,
            head_dim=TOY_WIDTH // 4,
            text_width=TOY_WIDTH,
            pooled_width=2 * clip_width,
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        "vae": vae,
        "text_encoder": _build_clip(clip_width, heads=4),
        "tokenizer": build_tokenizer(),
        "text_encoder_2": _build_clip(clip_width, heads=4),
        "tokenizer_2": build_tokenizer(),
        "text_encoder_3": build_t5(t5_tokenizer, width=TOY_WIDTH, num_layers=2),
        "tokenizer_3": t5_tokenizer,
    }
