"""What a model and an adapter are on disk, recognised and checked without loading torch.

The driver, ``rayalign serve`` and ``rayalign eval`` check a pipeline directory or find an
adapter before any actor starts, so this module imports nothing heavier than the standard
library and :mod:`actors.storage`. A family is recognised from the directory's
``model_index.json`` (``_class_name``), or, without one, from its subfolders; how each
family conditions its UNet is :mod:`actors.diffusion.families`. The ``sd3`` family
(Stable Diffusion 3 and 3.5) is a rectified-flow transformer: it is sampled by
:class:`actors.diffusion.flow_policy.FlowPolicy` instead of the DDIM policy; the ``flux``
family (FLUX.1-dev and -schnell), another one, by :class:`actors.diffusion.flux_policy.FluxPolicy`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from actors.storage import Location, is_uri, node_name

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name, so ``StableDiffusionPipeline.load_lora_weights(dir)`` reads our adapters too."""
LORA_CONFIG_NAME = "adapter_config.json"


@dataclasses.dataclass(frozen=True)
class Family:
    """One supported kind of pipeline directory."""

    name: str
    """Short name used in messages and docs ("sd", "sdxl", "sd3", "flux")."""
    pipeline_classes: tuple[str, ...]
    """``model_index.json`` ``_class_name`` values that belong to this family."""
    subfolders: tuple[str, ...]
    """Subfolders a directory of this family must have."""
    text_encoders: tuple[tuple[str, str], ...]
    """(tokenizer subfolder, text encoder subfolder) pairs, in the order their features are concatenated."""
    denoiser: str = "unet"
    """Subfolder of the network that is trained: "unet", or "transformer" for SD3 and FLUX."""
    flow_matching: bool = False
    """A rectified-flow model (velocity prediction, sigma schedule), sampled by ``FlowPolicy`` or ``FluxPolicy``, not DDIM."""
    missing_hints: tuple[tuple[str, str], ...] = ()
    """(subfolder, why it is needed) for parts a user may have left out on purpose; added to the missing-part error."""


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
_T5_HINT = (
    "rayalign conditions SD3 on all three text encoders, as the full pipeline does; a directory saved "
    "without the T5 encoder (text_encoder_3=None, tokenizer_3=None, CLIP-only conditioning) is not supported: "
    "give the complete pipeline directory, e.g. `hf download stabilityai/stable-diffusion-3.5-medium --local-dir DIR`"
)
SD3 = Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    subfolders=(
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ),
    text_encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3")),
    denoiser="transformer",
    flow_matching=True,
    missing_hints=(("text_encoder_3", _T5_HINT), ("tokenizer_3", _T5_HINT)),
)
_FLUX_T5_HINT = (
    "rayalign conditions FLUX on the CLIP encoder's pooled output and the T5 encoder's tokens, as the full pipeline "
    "does; a directory saved without the T5 encoder (text_encoder_2=None, tokenizer_2=None) is not supported: give the "
    "complete pipeline directory, e.g. `hf download black-forest-labs/FLUX.1-dev --local-dir DIR` (accept its licence first)"
)
FLUX = Family(
    name="flux",
    pipeline_classes=("FluxPipeline",),
    subfolders=("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    text_encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    denoiser="transformer",
    flow_matching=True,
    missing_hints=(("text_encoder_2", _FLUX_T5_HINT), ("tokenizer_2", _FLUX_T5_HINT)),
)
FAMILIES = (SD, SDXL, SD3, FLUX)

NOT_YET_SUPPORTED = {
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
        supported = "; ".join(f"{f.name} ({', '.join(f.pipeline_classes)})" for f in FAMILIES)
        why = NOT_YET_SUPPORTED.get(class_name, "not a pipeline rayalign knows")
        raise ValueError(f"model path {str(path)!r} holds a {class_name} ({why}); supported pipelines: {supported}")
    if (path / "transformer").is_dir():
        return FLUX if _transformer_class(path) == "FluxTransformer2DModel" else SD3
    return SDXL if (path / "text_encoder_2").is_dir() else SD


def _transformer_class(path: Path) -> str | None:
    """The ``_class_name`` of a directory's ``transformer/config.json``; None when it cannot be read."""
    try:
        return json.loads((path / "transformer" / "config.json").read_text()).get("_class_name")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


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


def check_pipeline_dir(path: str | os.PathLike) -> str | Path:
    """Fail early, naming what is missing, when ``path`` is not a usable pipeline directory.

    A URI is checked in its storage (its ``model_index.json``); a local path on this node,
    whose name the error gives (on a cluster, each node that loads the model checks it).
    """
    if is_uri(path):
        if not (Location(path) / "model_index.json").is_file():
            raise ValueError(
                f"model path {str(path)!r} holds no model_index.json: it is not a diffusers pipeline directory; "
                "upload one (the folder `pipeline.save_pretrained(DIR)` writes) or fix model.path"
            )
        return str(path)
    path = Path(path)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is not a directory"
        raise ValueError(
            f"model path {str(path)!r} {state} on {node_name()}: it is not a directory; set model.path (rayalign eval/serve: --model) to a "
            "diffusers pipeline directory that every node can read (the same local path on each, or an s3:// / gs:// URI), "
            "e.g. one fetched on a machine with internet access by "
            "`hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR` (see docs/models-and-rewards.md)"
        )
    family = detect_family(path)
    missing = [name for name in family.subfolders if not (path / name).is_dir()]
    if missing:
        hints = dict.fromkeys(hint for sub, hint in family.missing_hints if sub in missing)  # each hint once, in order
        raise ValueError(
            f"model path {str(path)!r} is not a complete {family.name} pipeline directory: missing {', '.join(m + '/' for m in missing)}; "
            f"expected subfolders {', '.join(family.subfolders)} (as written by {family.pipeline_classes[0]}.save_pretrained)"
            + "".join(f". {hint}" for hint in hints)
        )
    for sub in (family.denoiser, "vae", *(encoder for _, encoder in family.text_encoders)):
        weights = list((path / sub).glob("*.safetensors"))
        if not weights:
            found = ", ".join(sorted(p.name for p in (path / sub).iterdir())) or "nothing"
            raise ValueError(
                f"{path / sub} has no .safetensors weights (found: {found}); rayalign loads safetensors only. "
                f"Convert with: pipeline.save_pretrained(dir, safe_serialization=True)"
            )
    return path
