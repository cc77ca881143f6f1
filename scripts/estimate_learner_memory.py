"""Measure what a learner's backward pass keeps in memory for SD 1.5's UNet, without a GPU.

The UNet is built from SD 1.5's architecture on PyTorch's meta device (no weights are
allocated, nothing is computed) and one forward pass in float16 at 512 px (64 x 64
latents, 77 caption tokens) is traced; a saved-tensor hook adds up the bytes autograd
keeps for the backward pass. Attention score matrices are counted apart: a fused
attention kernel (flash / memory-efficient SDPA, what PyTorch uses on recent GPUs) does
not keep them, the unfused path does. Frozen weights are not counted again.

    python scripts/estimate_learner_memory.py

The numbers feed docs/gpu-memory.md.
"""

from __future__ import annotations

import logging

import torch
from diffusers import UNet2DConditionModel

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
"""SD 1.5's UNet config (the values that differ from diffusers' defaults are the ones given)."""
SEQUENCE_LENGTHS = (64 * 64, 32 * 32, 16 * 16, 8 * 8)
"""Latent tokens per attention level at 512 px: attention scores are (heads, these, these or 77)."""
HEADS = 8
"""SD 1.5 attends with 8 heads at every level (its config calls this attention_head_dim)."""


def saved_bytes(unet: UNet2DConditionModel, *, checkpointing: bool) -> tuple[int, int]:
    """(attention-score bytes, all other bytes) kept for backward by one row's forward pass."""
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    weight_shapes = {tuple(p.shape) for p in unet.parameters()}
    scores = other = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal scores, other
        if not tensor.requires_grad and tensor.ndim >= 2 and tuple(tensor.shape) in weight_shapes:
            return tensor  # a frozen weight, already counted as the model's size
        size = tensor.numel() * tensor.element_size()
        is_scores = (
            tensor.ndim in (3, 4)
            and tensor.shape[-3] == HEADS
            and tensor.shape[-2] in SEQUENCE_LENGTHS
            and tensor.shape[-1] in (*SEQUENCE_LENGTHS, 77)
        )
        if is_scores:
            scores += size
        else:
            other += size
        return tensor

    # The input requires grad so every layer keeps what the backward pass to the first LoRA needs.
    latents = torch.zeros(1, 4, 64, 64, device="meta", dtype=torch.float16, requires_grad=True)
    text = torch.zeros(1, 77, 768, device="meta", dtype=torch.float16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, torch.tensor([500], device="meta"), encoder_hidden_states=text)
    return scores, other


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("estimate_learner_memory")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.float16)
    unet.requires_grad_(False)
    parameters = sum(p.numel() for p in unet.parameters())
    log.info("SD 1.5 UNet: %.1f M parameters, %.2f GB in float16", parameters / 1e6, parameters * 2 / 1e9)
    for checkpointing in (False, True):
        scores, other = saved_bytes(unet, checkpointing=checkpointing)
        log.info(
            "gradient_checkpointing=%s: per UNet row (float16, 512 px) %.2f GB kept with a fused attention kernel, "
            "+ %.2f GB of attention scores with the unfused one",
            checkpointing, other / 1e9, scores / 1e9,
        )


if __name__ == "__main__":
    main()
