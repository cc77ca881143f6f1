"""Estimate what a learner holds on its GPU, without a GPU.

Two modes:

- **UNet trace** (no arguments): SD 1.5's UNet is built from its architecture on PyTorch's
  meta device (no weights are allocated, nothing is computed) and one forward pass in
  float16 at 512 px (64 x 64 latents, 77 caption tokens) is traced; a saved-tensor hook adds
  up the bytes autograd keeps for the backward pass. Attention score matrices are counted
  apart: a fused attention kernel (flash / memory-efficient SDPA, what PyTorch uses on
  recent GPUs) does not keep them, the unfused path does. Frozen weights are not counted
  again. Needs torch and diffusers.

- **Transformer budget** (``--transformer NAME`` or ``--transformer-params N``): arithmetic
  from a flow-matching transformer's parameter count and shape, for LoRA training with
  ``gradient_checkpointing: true`` (what the SD3 and FLUX presets use). Frozen weights in
  bfloat16 (2 bytes a parameter); LoRA weights and gradients in float32 (4 + 4) and AdamW's
  two moments (8); how much of that each DeepSpeed ZeRO stage keeps on one of ``--workers``
  learners; the block inputs that per-block checkpointing keeps (exact for diffusers'
  SD3 and FLUX transformers: each block saves its image and text token streams); the
  activations of the one block being recomputed in the backward pass (an estimate:
  ``RECOMPUTE_WIDTHS`` token-widths); the CUDA context (an estimate). Needs nothing but
  the standard library.

    python scripts/estimate_learner_memory.py
    python scripts/estimate_learner_memory.py --transformer sd3.5-medium --rows 8 --workers 4
    python scripts/estimate_learner_memory.py --transformer flux.1-dev --rows 2 --workers 4 --resolution 512
    python scripts/estimate_learner_memory.py --transformer-params 8e9 --blocks 40 --hidden 3072 --text-tokens 512

The numbers feed docs/gpu-memory.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

log = logging.getLogger("estimate_learner_memory")

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

GB = 1e9
"""Decimal gigabytes, as in docs/gpu-memory.md."""
RECOMPUTE_WIDTHS = 30
"""Tensors one transformer block keeps for its own backward pass, in units of (tokens x hidden)
per row: about 21 for a pre-norm attention + 4x MLP block with adaLN modulation (normalised
and modulated inputs, q, k, v, the attention output and its projection, the MLP's 4x hidden
before and after the GELU, gated residuals), rounded up for SD 3.5's second attention and
the gradients live while the block runs backward. An estimate, to be replaced by a measurement."""
CUDA_CONTEXT_GB = 1.5
"""CUDA context, cuBLAS/cuDNN workspaces and allocator slack; an estimate, as in docs/gpu-memory.md."""


@dataclasses.dataclass(frozen=True)
class Transformer:
    """What the learner budget needs to know about a flow-matching transformer."""

    params: float
    """Parameters of the transformer (the frozen weights the learner holds)."""
    blocks: int
    """Transformer blocks; gradient checkpointing keeps each one's inputs."""
    hidden: int
    """Width of the token streams between blocks."""
    text_tokens: int
    """Caption tokens that travel through the blocks beside the image tokens."""
    lora_params: float = 0.0
    """Parameters of the LoRA adapter the preset trains."""
    source: str = ""
    """Where the numbers come from."""

    def image_tokens(self, resolution: int) -> int:
        """Image tokens at a square resolution: a 16-channel latent 8x smaller, cut into 2x2 patches."""
        side = resolution // 8 // 2
        return side * side


TRANSFORMERS = {
    "sd3.5-medium": Transformer(
        params=2.5e9,
        blocks=24,
        hidden=1536,
        text_tokens=77 + 256,
        # r = 32 on attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out} of 24 blocks, D = 1536:
        # 32 * (1536 + 1536) per layer, 8 layers a block but 7 in the last (no to_add_out: its text stream ends there)
        lora_params=32 * (1536 + 1536) * (24 * 8 - 1),
        source="2.5 B (Stability AI's SD3.5 Medium model card); 24 MMDiT-X blocks of width 24 heads x 64; "
        "77 CLIP + 256 T5 caption tokens (StableDiffusion3Pipeline's default); LoRA of the sd35m-pickscore-grpo preset",
    ),
    "flux.1-dev": Transformer(
        params=11.9e9,
        blocks=19 + 38,
        hidden=3072,
        text_tokens=512,
        # r = 64, D = 3072, MLP width 4 D. 19 double-stream blocks: 8 attention projections 64 * (D + D) each, and the
        # image and text MLPs' two layers 64 * (D + 4 D) each; 38 single-stream blocks: attn.to_q, to_k, to_v
        lora_params=19 * (8 * 64 * (3072 + 3072) + 4 * 64 * (3072 + 4 * 3072)) + 38 * 3 * 64 * (3072 + 3072),
        source="12 B (FLUX.1 [dev] model card; 23.8 GB in bf16); 19 double- and 38 single-stream blocks of width "
        "24 heads x 128; 512 T5 caption tokens (FluxPipeline's default); LoRA of the flux-dev-hpsv2-grpo preset",
    ),
}
"""The transformers of the flow-matching presets, with the LoRA each preset trains."""


def transformer_budget(model: Transformer, *, resolution: int, rows: int, workers: int) -> dict[str, dict[str, float]]:
    """Bytes one learner holds, per ZeRO stage: {stage: {part: bytes}}. Stage 3's frozen share is after
    ``deepspeed.initialize``; the policy loads the whole transformer onto each learner GPU first."""
    tokens = model.image_tokens(resolution) + model.text_tokens
    frozen = model.params * 2
    lora_weights, lora_grads, adam = model.lora_params * 4, model.lora_params * 4, model.lora_params * 8
    block_inputs = rows * model.blocks * tokens * model.hidden * 2
    recompute = rows * RECOMPUTE_WIDTHS * tokens * model.hidden * 2
    shared = {"block inputs": block_inputs, "recomputed block (est.)": recompute, "CUDA context (est.)": CUDA_CONTEXT_GB * GB}
    stages = {
        0: {"frozen weights": frozen, "LoRA weights": lora_weights, "LoRA grads": lora_grads, "AdamW state": adam},
        1: {"frozen weights": frozen, "LoRA weights": lora_weights, "LoRA grads": lora_grads, "AdamW state": adam / workers},
        2: {"frozen weights": frozen, "LoRA weights": lora_weights, "LoRA grads": lora_grads / workers, "AdamW state": adam / workers},
        3: {
            "frozen weights": frozen / workers,
            "LoRA weights": lora_weights / workers,
            "LoRA grads": lora_grads / workers,
            "AdamW state": adam / workers,
        },
    }
    return {stage: {**parts, **shared} for stage, parts in stages.items()}


def report_transformer(name: str, model: Transformer, *, resolution: int, rows: int, workers: int) -> None:
    tokens = model.image_tokens(resolution) + model.text_tokens
    log.info("%s: %s", name, model.source or "given on the command line")
    log.info(
        "%.2f B parameters (%.2f GB in bf16), LoRA %.1f M; %d px: %d image + %d text tokens of width %d; %d row(s) per pass, %d learner(s)",
        model.params / 1e9,
        model.params * 2 / GB,
        model.lora_params / 1e6,
        resolution,
        model.image_tokens(resolution),
        model.text_tokens,
        model.hidden,
        rows,
        workers,
    )
    per_row_inputs = model.blocks * tokens * model.hidden * 2
    log.info(
        "per row: block inputs %d x %d x %d x 2 B = %.3f GB; recomputed block (est.) %d x %d x %d x 2 B = %.3f GB",
        model.blocks,
        tokens,
        model.hidden,
        per_row_inputs / GB,
        RECOMPUTE_WIDTHS,
        tokens,
        model.hidden,
        RECOMPUTE_WIDTHS * tokens * model.hidden * 2 / GB,
    )
    for stage, parts in transformer_budget(model, resolution=resolution, rows=rows, workers=workers).items():
        listed = ", ".join(f"{part} {size / GB:.2f}" for part, size in parts.items())
        log.info("ZeRO-%d: %.1f GB per learner (%s)", stage, sum(parts.values()) / GB, listed)
    log.info("(ZeRO-3: after deepspeed.initialize; each learner loads the whole %.1f GB transformer first)", model.params * 2 / GB)


def saved_bytes(unet, *, checkpointing: bool) -> tuple[int, int]:
    """(attention-score bytes, all other bytes) kept for backward by one row's forward pass."""
    import torch  # lazy: the transformer budget runs without torch

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


def trace_unet() -> None:
    # lazy: the transformer budget runs without torch and diffusers
    import torch
    from diffusers import UNet2DConditionModel

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
            checkpointing,
            other / 1e9,
            scores / 1e9,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--transformer", choices=sorted(TRANSFORMERS), help="a flow-matching preset's transformer")
    which.add_argument("--transformer-params", type=float, help="any transformer's parameter count, e.g. 8e9 (with --blocks, --hidden)")
    parser.add_argument("--blocks", type=int, help="transformer blocks (with --transformer-params)")
    parser.add_argument("--hidden", type=int, help="width of the token streams (with --transformer-params)")
    parser.add_argument("--text-tokens", type=int, help="caption tokens beside the image tokens (default: the model's, else 0)")
    parser.add_argument("--lora-params", type=float, help="LoRA parameters trained (default: the preset's, else 0)")
    parser.add_argument("--resolution", type=int, default=1024, help="square image side in pixels (default 1024)")
    parser.add_argument(
        "--rows",
        type=int,
        default=1,
        help="rows per learner pass: learner.micro_batch_size x learner.timesteps_per_pass, x 2 with classifier-free guidance",
    )
    parser.add_argument("--workers", type=int, default=4, help="learner workers sharing ZeRO-partitioned state (default 4)")
    args = parser.parse_args(argv)
    if args.transformer_params is not None and (args.blocks is None or args.hidden is None):
        parser.error("--transformer-params needs --blocks and --hidden")
    if min(args.resolution, args.rows, args.workers) < 1:
        parser.error("--resolution, --rows and --workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.transformer is None and args.transformer_params is None:
        trace_unet()
        return
    if args.transformer is not None:
        name, model = args.transformer, TRANSFORMERS[args.transformer]
        overrides = {"blocks": args.blocks, "hidden": args.hidden, "text_tokens": args.text_tokens, "lora_params": args.lora_params}
        model = dataclasses.replace(model, **{key: value for key, value in overrides.items() if value is not None})
    else:
        name = "transformer"
        model = Transformer(
            params=args.transformer_params,
            blocks=args.blocks,
            hidden=args.hidden,
            text_tokens=args.text_tokens or 0,
            lora_params=args.lora_params or 0.0,
        )
    report_transformer(name, model, resolution=args.resolution, rows=args.rows, workers=args.workers)


if __name__ == "__main__":
    main()
