"""Builders for the embedded toy text-to-image model.

The toy model is an ordinary Stable-Diffusion-1.5-format pipeline directory
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), only small: a 32 x 32 RGB image is encoded by an ``AutoencoderKL`` to
an 8 x 8 x 4 latent, denoised by a ``UNet2DConditionModel`` that cross-attends to a
two-layer ``CLIPTextModel``. Everything here builds *untrained* components; the
pretraining job (:mod:`actors.toy.pretrain`) trains and saves them. Tests use the same
builders with smaller widths to make tiny random pipelines, and
:func:`build_random_pipeline` also makes tiny random pipelines of the other supported
families (SD 2.x with v-prediction, SDXL) in their real directory layouts.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from actors.toy import world as toy_world

TOKENIZER_MAX_LENGTH = 16
"""Toy captions are at most 8 tokens with the start and end markers; 16 leaves room."""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


EMBEDDED_MODELS: dict[str, str] = {
    "toy-t2i": "the toy UNet model (Stable Diffusion 1.5 format, sampled with DDIM)",
    "toy-sd3": "the toy flow model (Stable Diffusion 3.5 format, sampled with the Flow-GRPO SDE)",
}
"""The pretrained toy pipelines shipped inside the package, by the name ``model.path`` may give."""


def embedded_model_path(name: str = "toy-t2i") -> Path:
    """Directory of a pretrained toy pipeline shipped inside the package (see :data:`EMBEDDED_MODELS`)."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"{name!r} is not an embedded model; they are {', '.join(EMBEDDED_MODELS)}")
    return Path(str(resources.files("actors.toy") / "assets" / name))


def resolve_model_path(path: str | os.PathLike | None) -> str | Path:
    """Where a model given as ``model.path`` is: None means the toy UNet model, an embedded model's
    name (``toy-sd3``) its shipped directory, unless a directory of that name exists here;
    anything else (a path or a URI) is returned as it is."""
    if path is None:
        return embedded_model_path()
    if str(path) in EMBEDDED_MODELS and not Path(path).exists():
        return embedded_model_path(str(path))
    return path


def _bpe_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-pair vocabulary in which every grammar word is one token.

    Single letters (with and without the end-of-word marker) are in the vocabulary too,
    so any lower-case text still tokenizes, letter by letter, instead of failing.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    add(BOS)
    add(EOS)
    for letter in "abcdefghijklmnopqrstuvwxyz":
        add(letter)
        add(letter + "</w>")
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            add(parts[0])
    return vocab, merges


def grammar_words() -> list[str]:
    words = {"a", "an"} | set(toy_world.COLORS) | set(toy_world.SHAPES)
    for position in toy_world.POSITIONS:
        words.update(position.split())
    return sorted(words)


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = _bpe_vocab(grammar_words())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | os.PathLike) -> None:
    """Save in the fast format and also as ``vocab.json`` + ``merges.txt`` for older readers."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    vocab, merges = _bpe_vocab(grammar_words())
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def text_config(
    *, hidden_size: int, num_layers: int, num_heads: int, vocab_size: int | None, projection_dim: int | None = None
) -> CLIPTextConfig:
    """A tiny CLIP text encoder's config over the toy grammar's tokenizer (``vocab_size`` None: its vocabulary),
    shared by the toy pipelines of every family."""
    if vocab_size is None:
        vocab_size = len(_bpe_vocab(grammar_words())[0])
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim or hidden_size,
    )


def build_text_encoder(*, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int | None = None) -> CLIPTextModel:
    return CLIPTextModel(text_config(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size))


def build_vae(*, block_out_channels: tuple[int, ...] = (16, 32, 32), norm_num_groups: int = 8) -> AutoencoderKL:
    """Downsamples by 2 ** (len(block_out_channels) - 1): 32 x 32 pixels -> 8 x 8 latents by default."""
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=toy_world.IMAGE_SIZE,
    )


def build_unet(
    *,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    cross_attention_dim: int = 64,
    sample_size: int = 8,
    norm_num_groups: int = 16,
    attention_head_dim: int = 8,
    layers_per_block: int = 1,
) -> UNet2DConditionModel:
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def build_scheduler(*, prediction_type: str = "epsilon") -> DDIMScheduler:
    """Stable Diffusion 1.5's noise schedule (also SD 2.x's and SDXL's), so the toy and real models share sampling code."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def save_pipeline(
    directory: str | os.PathLike,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
) -> Path:
    """Write a standard ``StableDiffusionPipeline`` directory, weights as safetensors only."""
    directory = Path(directory)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory / "tokenizer")
    return directory


Variant = Literal["sd15", "sd2-v", "sdxl"]
VARIANTS: tuple[str, ...] = ("sd15", "sd2-v", "sdxl")


_TINY_SD2_STYLE_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "norm_num_groups": 8,
}
"""What the tiny SD 2.x and SDXL UNets share: SD 2.x and SDXL both use linear attention projections and per-block head counts."""


def _build_tiny_sd2(directory: Path) -> Path:
    """SD 2.x's distinguishing traits, tiny: v-prediction, linear attention projections, per-block head dims."""
    unet = UNet2DConditionModel(
        **_TINY_SD2_STYLE_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    vae = build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4)
    text_encoder = build_text_encoder(hidden_size=32, num_layers=2, num_heads=2)
    return save_pipeline(
        directory,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        scheduler=build_scheduler(prediction_type="v_prediction"),
    )


def _build_tiny_sdxl(directory: Path) -> Path:
    """SDXL base's layout, tiny: two text encoders (features concatenated), pooled projection and time-id embedding."""
    hidden, projection, time_dim = 16, 16, 8
    unet = UNet2DConditionModel(
        **_TINY_SD2_STYLE_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * hidden,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # Six time ids (original size, crop corner, target size) of time_dim features each, plus the pooled text projection.
        projection_class_embeddings_input_dim=6 * time_dim + projection,
    )
    vae = build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4)
    vae.register_to_config(force_upcast=True)
    text_encoder = CLIPTextModel(text_config(hidden_size=hidden, num_layers=2, num_heads=2, vocab_size=None))
    text_encoder_2 = CLIPTextModelWithProjection(
        text_config(hidden_size=hidden, num_layers=2, num_heads=2, vocab_size=None, projection_dim=projection)
    )
    directory = Path(directory)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_tokenizer(),
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        save_tokenizer(build_tokenizer(), directory / sub)
    return directory


def build_random_pipeline(directory: str | os.PathLike, *, seed: int = 0, tiny: bool = True, variant: Variant = "sd15") -> Path:
    """Save a randomly initialised pipeline (for tests and smoke runs).

    ``variant``: "sd15" (the toy model's architecture), "sd2-v" (SD 2.x traits, v-prediction)
    or "sdxl" (SDXL base's components); the last two are always tiny.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    if variant == "sd2-v":
        return _build_tiny_sd2(Path(directory))
    if variant == "sdxl":
        return _build_tiny_sdxl(Path(directory))
    if tiny:
        unet = build_unet(block_out_channels=(16, 32), cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
        vae = build_vae(block_out_channels=(8, 8, 8), norm_num_groups=4)
        text_encoder = build_text_encoder(hidden_size=32, num_layers=1, num_heads=2)
    else:
        unet, vae, text_encoder = build_unet(), build_vae(), build_text_encoder()
    return save_pipeline(directory, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer(), scheduler=build_scheduler())
