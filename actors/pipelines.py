"""Model families: which diffusers pipeline directories the policy loads, and how each turns text into UNet conditioning.

A family is recognised from the directory's ``model_index.json`` (``_class_name``), or,
without one, from its subfolders. What differs between families is only the
conditioning the UNet is called with:

- ``sd`` (Stable Diffusion 1.x and 2.x, epsilon or v-prediction): one CLIP text encoder;
  the UNet cross-attends to its last hidden states.
- ``sdxl`` (Stable Diffusion XL base): two text encoders whose penultimate hidden states
  are concatenated feature-wise, plus the second encoder's pooled projection and six
  "time ids" (original size, crop corner, target size) that the UNet embeds additively
  (Podell et al. 2023, sec. 2.2).

Sampling (DDIM with log-probs), LoRA and the RL losses are the same for every family;
the prediction type (epsilon, v) comes from the scheduler config and is handled by
:mod:`actors.ddim`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported kind of pipeline directory."""

    name: str
    """Short name used in messages and docs ("sd", "sdxl")."""
    pipeline_classes: tuple[str, ...]
    """``model_index.json`` ``_class_name`` values that belong to this family."""
    subfolders: tuple[str, ...]
    """Subfolders a directory of this family must have."""
    text_encoders: tuple[tuple[str, str], ...]
    """(tokenizer subfolder, text encoder subfolder) pairs, in the order their features are concatenated."""


SD = Family(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline",),
    subfolders=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    text_encoders=(("tokenizer", "text_encoder"),),
)
SDXL = Family(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    subfolders=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    text_encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
)
FAMILIES = (SD, SDXL)

NOT_YET_SUPPORTED = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3 is a flow-matching model (no DDIM Gaussian step); not supported yet",
    "FluxPipeline": "FLUX is a flow-matching model (no DDIM Gaussian step); not supported yet",
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner is an image-to-image model; give the SDXL base pipeline",
    "StableDiffusionUpscalePipeline": "upscalers are image-conditioned; give a text-to-image pipeline",
    "PixArtAlphaPipeline": "PixArt (a transformer with a T5 encoder) is not supported yet",
}
"""Pipelines users are likely to point at, with why they are refused."""


def detect_family(path: str | os.PathLike) -> Family:
    """The family of a pipeline directory, from ``model_index.json`` or, lacking it, from its subfolders.

    Raises ``ValueError`` naming the pipeline class and the supported ones when the
    directory holds a pipeline the policy cannot run.
    """
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"{index} is not a readable diffusers model index: {error}") from None
        for family in FAMILIES:
            if class_name in family.pipeline_classes:
                return family
        supported = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
        why = NOT_YET_SUPPORTED.get(class_name, "not a pipeline rayalign knows")
        raise ValueError(f"model path {str(path)!r} holds a {class_name} ({why}); supported pipelines: {supported}")
    return SDXL if (path / "text_encoder_2").is_dir() else SD


def read_pipeline_options(path: str | os.PathLike) -> dict:
    """Pipeline-level settings from ``model_index.json`` (e.g. SDXL's ``force_zeros_for_empty_prompt``)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    return {k: v for k, v in json.loads(index.read_text()).items() if not isinstance(v, list) and not k.startswith("_")}


def vae_scale_factor(path: str | os.PathLike) -> int:
    """Pixels per latent cell, from the VAE's config alone (the learner never loads the VAE's weights)."""
    config = json.loads((Path(path) / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


@dataclasses.dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on for a batch of captions."""

    embeds: torch.Tensor
    """Token features the UNet cross-attends to. (batch, tokens, dim) float32."""
    pooled: torch.Tensor | None = None
    """SDXL: the second text encoder's pooled projection. (batch, pooled_dim) float32; None for SD."""


def _token_ids(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(family: Family, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], *, device: torch.device) -> PromptEmbeddings:
    """Caption features as each family's pipeline computes them (see the module docstring)."""
    if family is SD:
        hidden = text_encoders[0](_token_ids(tokenizers[0], prompts, device))[0]
        return PromptEmbeddings(embeds=hidden.float())
    features, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        output = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        # SDXL conditions on the penultimate layer of both encoders and the pooled output of the last one.
        features.append(output.hidden_states[-2])
        pooled = output[0]
    return PromptEmbeddings(embeds=torch.cat(features, dim=-1).float(), pooled=pooled.float())


def add_time_ids(*, height: int, width: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its native size:
    (original_h, original_w, crop_top, crop_left, target_h, target_w). (6,) float32."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def check_added_conditioning(unet_config, *, pooled_dim: int, num_time_ids: int = 6) -> None:
    """Fail at load, not at the first UNet call, when the SDXL UNet and text encoder disagree."""
    expected = unet_config.projection_class_embeddings_input_dim
    got = unet_config.addition_time_embed_dim * num_time_ids + pooled_dim
    if expected != got:
        raise ValueError(
            f"the SDXL UNet expects {expected} added-conditioning features but text_encoder_2's projection ({pooled_dim}) "
            f"plus {num_time_ids} time ids x {unet_config.addition_time_embed_dim} give {got}; the unet/ and text_encoder_2/ "
            "folders come from different models"
        )
