"""Where a policy's weights go: the config's device and dtype names resolved for torch.

Shared by both policy classes (:mod:`actors.diffusion.policy`, :mod:`actors.diffusion.flow_policy`)
and the reward models, so none of them has to import another just for these.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""The config's dtype names (``model.dtype``) and their torch dtypes."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device: cpu or auto")
    return torch.device(device)


def load_settings(*, dtype: str, finetune: str, device: str) -> tuple[torch.dtype, torch.device, dict[str, Any]]:
    """The checked dtype and device of a policy's weights, and the ``from_pretrained`` arguments every module of
    it is loaded with; a clear error for a dtype, fine-tuning mode or dtype/device pairing that cannot work."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if finetune not in ("lora", "full"):
        raise ValueError(f"finetune {finetune!r} is not supported; choose 'lora' or 'full'")
    torch_dtype = DTYPES[dtype]
    torch_device = resolve_device(device)
    if torch_dtype == torch.float16 and torch_device.type != "cuda":
        raise ValueError(
            f"dtype float16 needs a CUDA device, but the model goes to {torch_device}: CPU half-precision kernels are "
            "missing or slow. Use dtype bfloat16 (CPUs with bf16 support) or float32 on CPU"
        )
    # low_cpu_mem_usage: modules are created on the meta device and filled straight from the
    # memory-mapped safetensors, so host RAM never holds a random init next to the real weights.
    # On a GPU, device_map streams each tensor from the file (the node's shared page cache) to
    # the device: learner workers of one node do not each build a host copy of the model.
    common: dict[str, Any] = {"torch_dtype": torch_dtype, "use_safetensors": True, "low_cpu_mem_usage": True}
    if torch_device.type == "cuda":
        common["device_map"] = str(torch_device)
    return torch_dtype, torch_device, common
