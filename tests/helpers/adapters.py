"""Real LoRA adapter directories for serving tests: random, non-zero, written by rayalign's own code."""

from pathlib import Path

import torch


def make_adapter(model_dir, out_dir, *, seed: int, rank: int = 4, target_modules=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """Attach a LoRA to the model in ``model_dir``, give it random non-zero weights, save it to ``out_dir``."""
    from actors.diffusion.policy import DiffusionPolicy

    policy = DiffusionPolicy.from_pretrained(
        model_dir, finetune="lora", lora_rank=rank, lora_alpha=float(rank), lora_target_modules=target_modules, device="cpu"
    )
    generator = torch.Generator().manual_seed(seed)
    for param in policy.trainable_parameters():
        # peft starts lora_B at zero (a no-op adapter); a visible adapter needs both factors non-zero.
        param.data = torch.randn(param.shape, generator=generator) * 0.3
    return policy.save_lora(out_dir)
