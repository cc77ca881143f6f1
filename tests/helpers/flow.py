"""What the flow-model tests share: tiny-model settings, moving an adapter off its init, one recorded step as log_prob's arguments."""

import torch

from actors.diffusion.trajectory import Trajectories

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle in the center"]
T5_TOKENS = 16
"""Short T5 sequences keep the tiny transformers cheap; the real pipelines use 256 (SD3) or 512 (FLUX)."""


def perturb(parameters, scale: float = 0.05, seed: int = 0) -> None:
    """Move an adapter off its init (LoRA B = 0) so that it really changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator).to(p.device) * scale)


def step_inputs(trajectories: Trajectories, step: int = 0) -> dict:
    """One recorded transition of every trajectory, as a flow policy's ``log_prob`` keyword arguments."""
    rows = trajectories.batch_size
    return dict(
        latents=torch.from_numpy(trajectories.latents[:, step]),
        next_latents=torch.from_numpy(trajectories.latents[:, step + 1]),
        timesteps=torch.full((rows,), float(trajectories.timesteps[step])),
        prev_timesteps=torch.full((rows,), float(trajectories.prev_timesteps[step])),
        prompt_embeds=torch.from_numpy(trajectories.prompt_embeds),
        negative_prompt_embeds=torch.from_numpy(trajectories.negative_prompt_embeds),
        pooled_prompt_embeds=torch.from_numpy(trajectories.pooled_prompt_embeds),
        negative_pooled_prompt_embeds=torch.from_numpy(trajectories.negative_pooled_prompt_embeds),
        guidance_scale=trajectories.guidance_scale,
        eta=trajectories.eta,
    )
