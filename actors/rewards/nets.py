"""The networks behind the model rewards, and how their inputs are prepared.

Everything here imports torch and transformers, so :mod:`actors.rewards.models` imports
this module only when a reward loads its weights.

Architecture facts, from the published sources:

- CLIP preprocessing (Radford et al. 2021, github.com/openai/CLIP): bicubic resize of the
  shorter side to the input size (224 for ViT-L/14 and ViT-H/14), centre crop, scale to
  [0, 1], normalise with the OpenAI mean/std below. The LAION aesthetic predictor, HPSv2
  and ImageReward all reuse this transform.
- The LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor)
  and ImageReward's reward head (Xu et al. 2023, github.com/THUDM/ImageReward) are the same
  MLP shape: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear layers with dropout after the
  first three and *no* activations (the ReLUs are commented out in both sources); in
  ``nn.Sequential`` numbering the linear layers sit at positions 0, 2, 4, 6 and 7.
- ImageReward: BLIP (Li et al. 2022) ViT-L/16 at 224 px encodes the image; a BERT-base
  text encoder cross-attends to all image tokens; the [CLS] feature goes through the MLP
  and the result is standardised with mean 0.16717362830052426 and std
  1.0333394966054072 (constants of the published model). Prompts are tokenised with
  bert-base-uncased, padded to 35 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """How a checkpoint wants its pixels: resize, centre crop, normalise."""

    size: int
    """Target of the shorter side after the bicubic resize (or of both sides if ``square``)."""
    crop: int
    """Side of the centre crop."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted from pixels scaled to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel standard deviation the centred pixels are divided by."""
    square: bool = False
    """Resize straight to ``size`` x ``size`` instead of keeping the aspect ratio."""


def clip_image_spec(size: int = 224) -> ImageSpec:
    """The OpenAI CLIP transform at ``size`` pixels."""
    return ImageSpec(size=size, crop=size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def _side(value: int | Mapping[str, int], what: str, path: Path) -> tuple[int, bool]:
    if isinstance(value, int):
        return value, False
    if "shortest_edge" in value:
        return int(value["shortest_edge"]), False
    if "height" in value and value["height"] == value.get("width"):
        return int(value["height"]), True
    raise ValueError(
        f"{path}: {what} {value!r} is not supported; expected an int, {{shortest_edge: N}} or a square {{height: N, width: N}}"
    )


def read_image_spec(directory: Path, default: ImageSpec) -> ImageSpec:
    """The transform described by ``directory/preprocessor_config.json`` (Hugging Face keys), else ``default``."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return default
    config = json.loads(path.read_text())
    size, square = _side(config.get("size", default.size), "size", path)
    crop = size
    if config.get("do_center_crop", True) and "crop_size" in config:
        crop, _ = _side(config["crop_size"], "crop_size", path)
    mean = tuple(float(x) for x in config.get("image_mean", default.mean))
    std = tuple(float(x) for x in config.get("image_std", default.std))
    return ImageSpec(size=size, crop=crop, mean=mean, std=std, square=square)


def preprocess_images(images: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 ``(batch, H, W, 3)`` -> normalised float32 ``(batch, 3, crop, crop)``.

    Same arithmetic as torchvision's ``Resize(size, BICUBIC)`` + ``CenterCrop(crop)`` on a
    PIL image, which is what the reference scorers run: the longer side becomes
    ``int(size * long / short)`` and the crop offset is ``round((side - crop) / 2)``.
    Each image is processed on its own, so a score never depends on its batch-mates.
    """
    out = np.empty((len(images), 3, spec.crop, spec.crop), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    for i, image in enumerate(images):
        pil = Image.fromarray(image)
        width, height = pil.size
        if spec.square:
            new_width = new_height = spec.size
        elif width <= height:
            new_width, new_height = spec.size, int(spec.size * height / width)
        else:
            new_width, new_height = int(spec.size * width / height), spec.size
        if (new_width, new_height) != (width, height):
            pil = pil.resize((new_width, new_height), Image.BICUBIC)
        if new_width < spec.crop or new_height < spec.crop:
            raise ValueError(
                f"image resized to {new_width}x{new_height} is smaller than the {spec.crop}px crop; check preprocessor_config.json"
            )
        top = int(round((new_height - spec.crop) / 2.0))
        left = int(round((new_width - spec.crop) / 2.0))
        pil = pil.crop((left, top, left + spec.crop, top + spec.crop))
        pixels = np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, crop, crop)
        out[i] = (pixels - mean) / std
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------
# The MLP head shared by the aesthetic predictor and ImageReward
# --------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Linear layers applied in order with nothing between them (see the module docstring).

    ``layers`` keeps the published ``nn.Sequential`` numbering (dropout positions become
    ``Identity``, which is what dropout is at inference), so checkpoint keys such as
    ``layers.7.weight`` load unchanged.
    """

    def __init__(self, shapes: Mapping[int, tuple[int, int]]):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(*shapes[i][::-1]) if i in shapes else nn.Identity() for i in range(max(shapes) + 1)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def linear_head_shapes(state: Mapping[str, torch.Tensor], *, source: str, prefix: str = "layers.") -> dict[int, tuple[int, int]]:
    """``{position: (out, in)}`` of the head's linear layers, checked to chain into one score."""
    shapes: dict[int, tuple[int, int]] = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        position, _, kind = key[len(prefix) :].partition(".")
        if not position.isdigit() or kind not in ("weight", "bias"):
            raise ValueError(f"{source}: unexpected head tensor {key!r}; expected {prefix}N.weight / {prefix}N.bias")
        if kind == "weight":
            if tensor.ndim != 2:
                raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}; a linear weight is (out, in)")
            shapes[int(position)] = (int(tensor.shape[0]), int(tensor.shape[1]))
    if not shapes:
        raise ValueError(f"{source}: no head weights ({prefix}N.weight) found")
    ordered = [shapes[i] for i in sorted(shapes)]
    for (out_features, _), (_, in_features) in zip(ordered, ordered[1:]):
        if out_features != in_features:
            raise ValueError(f"{source}: head layers do not chain: a layer with {out_features} outputs feeds one with {in_features} inputs")
    if ordered[-1][0] != 1:
        raise ValueError(f"{source}: the head's last layer has {ordered[-1][0]} outputs; a reward head ends in 1")
    return shapes


def load_linear_head(path: Path) -> LinearHead:
    """A :class:`LinearHead` from a safetensors file with keys ``layers.N.weight`` / ``layers.N.bias``."""
    state = load_file(str(path))
    head = LinearHead(linear_head_shapes(state, source=str(path)))
    head.load_state_dict(state, strict=True)
    return head.eval()


# --------------------------------------------------------------------------------------
# CLIP features
# --------------------------------------------------------------------------------------


def clip_image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings ``(batch, projection_dim)`` in float32.

    Works for ``CLIPModel`` and ``CLIPVisionModelWithProjection`` alike (both have
    ``vision_model`` and ``visual_projection``).
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output  # (batch, width)
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def clip_text_embeddings(model: nn.Module, tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """L2-normalised projected text embeddings ``(batch, projection_dim)`` in float32.

    Prompts are padded to the full context, so a prompt's embedding has the same shape of
    computation whatever else shares its batch.
    """
    length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt").to(device)
    pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


# --------------------------------------------------------------------------------------
# ImageReward
# --------------------------------------------------------------------------------------

IMAGEREWARD_CONFIG = "config.json"
IMAGEREWARD_MODEL_TYPE = "rayalign-imagereward"


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BERT text encoder with cross-attention + MLP head (see module docstring)."""

    def __init__(self, config: Mapping, head_shapes: Mapping[int, tuple[int, int]]):
        super().__init__()

        self.vision_model = BlipVisionModel(BlipVisionConfig(**config["vision_config"]))
        self.text_encoder = BlipTextModel(BlipTextConfig(**config["text_config"]), add_pooling_layer=False)
        self.head = LinearHead(head_shapes)
        self.score_mean = float(config["score_mean"])
        self.score_std = float(config["score_std"])
        self.max_length = int(config["max_length"])

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Standardised rewards ``(batch,)`` in float32."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (batch, patches + 1, vision width)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (batch, tokens, text width)
        raw = self.head(text[:, 0].float()).squeeze(-1)  # (batch,)
        return (raw - self.score_mean) / self.score_std


def load_imagereward(directory: Path) -> ImageRewardModel:
    """An :class:`ImageRewardModel` from a directory written by ``rayalign convert-reward imagereward``."""
    config = json.loads((directory / IMAGEREWARD_CONFIG).read_text())
    if config.get("model_type") != IMAGEREWARD_MODEL_TYPE:
        raise ValueError(
            f"{directory / IMAGEREWARD_CONFIG} is not an ImageReward config written by rayalign "
            f"(model_type {config.get('model_type')!r}, expected {IMAGEREWARD_MODEL_TYPE!r}); "
            f"convert ImageReward.pt with: rayalign convert-reward imagereward --input ImageReward.pt --tokenizer BERT_DIR --output DIR"
        )
    state = load_file(str(directory / "model.safetensors"))
    head_state = {key[len("head.") :]: value for key, value in state.items() if key.startswith("head.")}
    model = ImageRewardModel(config, linear_head_shapes(head_state, source=str(directory / "model.safetensors")))
    model.load_state_dict(state, strict=True)
    return model.eval()
