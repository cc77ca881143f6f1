"""Model families: which diffusers pipeline directories the policy loads, and how each turns text into UNet conditioning.

A family is recognised by :mod:`actors.diffusion.files` (without loading torch); what
differs between families is only the conditioning the UNet is called with:

- ``sd`` (Stable Diffusion 1.x and 2.x, epsilon or v-prediction): one CLIP text encoder;
  the UNet cross-attends to its last hidden states.
- ``sdxl`` (Stable Diffusion XL base): two text encoders whose penultimate hidden states
  are concatenated feature-wise, plus the second encoder's pooled projection and six
  "time ids" (original size, crop corner, target size) that the UNet embeds additively
  (Podell et al. 2023, sec. 2.2).

Sampling (DDIM with log-probs), LoRA and the RL losses are the same for every family;
the prediction type (epsilon, v) comes from the scheduler config and is handled by
:mod:`actors.diffusion.ddim`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import torch

from actors.diffusion.ddim import guided_output
from actors.diffusion.files import SD, Family

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptEmbeddings:
    """What the UNet is conditioned on for a batch of captions."""

    embeds: torch.Tensor
    """Token features the UNet cross-attends to. (batch, tokens, dim) float32."""
    pooled: torch.Tensor | None = None
    """SDXL: the second text encoder's pooled projection. (batch, pooled_dim) float32; None for SD."""


def guided(
    network: Callable[[torch.Tensor, torch.Tensor, PromptEmbeddings], torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    condition: PromptEmbeddings,
    negative: PromptEmbeddings,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance around ``network(latents, timesteps, condition)``: one call on
    [unconditional; conditional] rows, or the conditional call alone at scale 1.

    ``negative`` may hold one row (shared by the batch) or one per sample.
    """
    if guidance_scale == 1.0:
        return network(latents, timesteps, condition)
    batch = latents.shape[0]

    def rows(tensor: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        return tensor.expand(batch, *tensor.shape) if tensor.ndim < per_sample.ndim else tensor

    both = PromptEmbeddings(
        embeds=torch.cat([rows(negative.embeds, condition.embeds), condition.embeds]),
        pooled=None if condition.pooled is None else torch.cat([rows(negative.pooled, condition.pooled), condition.pooled]),
    )
    unconditional, conditional = network(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both).chunk(2)
    return guided_output(unconditional, conditional, guidance_scale)


def _token_ids(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def encode_prompts(
    family: Family, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], *, device: torch.device
) -> PromptEmbeddings:
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
