"""LoRA adapter files: what rayalign writes and reads back, in diffusers' format.

An adapter directory holds ``pytorch_lora_weights.safetensors`` and peft's
``adapter_config.json``. The weights file is written by the diffusers pipeline class of the
model's family, so that pipeline's ``load_lora_weights(dir)`` reads it as rayalign does:

- a UNet (SD 1.x/2.x, SDXL): keys ``unet.<diffusers LoRA name>``, as
  ``StableDiffusionPipeline.save_lora_weights`` writes them (SDXL's pipeline reads the same);
- an SD3 transformer: keys ``transformer.<peft name>``, as ``StableDiffusion3Pipeline`` writes them.

Either way the file's metadata carries the peft config (rank, alpha, targets): without it
diffusers would take alpha = rank and apply an adapter trained with another alpha at the
wrong scale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from actors.diffusion.files import LORA_CONFIG_NAME, LORA_WEIGHTS_NAME


def read_lora(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's peft config (as saved) and its weights, read and checked.

    Raises ``ValueError`` naming the directory and what is wrong with it: a missing file,
    a config that is not JSON or lacks ``r``/``lora_alpha``/``target_modules``, or weights
    that are not a readable safetensors file.
    """
    directory = Path(directory)
    weights, config_file = directory / LORA_WEIGHTS_NAME, directory / LORA_CONFIG_NAME
    for required in (weights, config_file):
        if not required.is_file():
            raise ValueError(
                f"LoRA directory {str(directory)!r} lacks {required.name}; give a directory written by rayalign (checkpoints/.../lora)"
            )
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON adapter config: {error}") from None
    missing = [key for key in ("r", "lora_alpha", "target_modules") if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise ValueError(f"{config_file} lacks {', '.join(missing)}; it is not a peft LoRA config written by rayalign")
    try:
        state_dict = load_file(weights)
    except Exception as error:  # safetensors raises its own error type for truncated or corrupt files
        raise ValueError(f"{weights} is not a readable safetensors file ({type(error).__name__}: {error})") from None
    if not state_dict:
        raise ValueError(f"{weights} holds no tensors")
    return raw, state_dict


def unet_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """A UNet's LoRA adapter weights in diffusers' key format (what a weight sync ships)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_lora(directory: str | os.PathLike, state_dict, lora_config, *, denoiser: str = "unet") -> Path:
    """Write an adapter directory: the weights as the family's diffusers pipeline saves them, + peft's config.

    ``state_dict`` maps the ``denoiser``'s LoRA keys, without a ``unet.``/``transformer.`` prefix, to
    tensors or arrays: diffusers' names (``lora.down``/``lora.up``, what :func:`unet_lora_state_dict`
    gives), or for a transformer also peft's (``lora_A``/``lora_B``).
    ``denoiser`` is the family's trained network (:attr:`actors.diffusion.files.Family.denoiser`):
    "unet", or "transformer" for SD3.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    config = lora_config.to_dict()
    if isinstance(config.get("target_modules"), (set, list)):
        config["target_modules"] = sorted(config["target_modules"])
    metadata = json.loads(json.dumps(config, default=str))  # plain JSON values, as diffusers stores them in the file
    # diffusers adapts exactly the layers the file has weights for; an exclusion (FLUX's final
    # proj_out) would exclude nothing there, and peft warns about that on every load
    metadata.pop("exclude_modules", None)
    if denoiser == "unet":
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=tensors, weight_name=LORA_WEIGHTS_NAME, unet_lora_adapter_metadata=metadata
        )
    elif denoiser == "transformer":
        tensors = convert_unet_state_dict_to_peft(tensors)  # SD3 adapter files hold peft's lora_A/lora_B names
        StableDiffusion3Pipeline.save_lora_weights(
            directory, transformer_lora_layers=tensors, weight_name=LORA_WEIGHTS_NAME, transformer_lora_adapter_metadata=metadata
        )
    else:
        raise ValueError(f"cannot write a LoRA adapter for a {denoiser!r}; the trained network is a 'unet' or a 'transformer' (SD3)")
    (directory / LORA_CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return directory
