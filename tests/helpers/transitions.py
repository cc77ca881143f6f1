"""One recorded denoising step of every trajectory, as keyword arguments of ``DiffusionPolicy.log_prob``."""

from __future__ import annotations

import torch

from actors.diffusion.trajectory import Trajectories


def step_inputs(trajectories: Trajectories, step: int = 0) -> dict:
    """The transitions x_t -> x_{t_prev} at ``step`` of each trajectory, with its sampling settings."""
    rows = trajectories.latents.shape[0]
    return dict(
        latents=torch.from_numpy(trajectories.latents[:, step]),
        next_latents=torch.from_numpy(trajectories.latents[:, step + 1]),
        timesteps=torch.full((rows,), int(trajectories.timesteps[step])),
        prev_timesteps=torch.full((rows,), int(trajectories.prev_timesteps[step])),
        prompt_embeds=torch.from_numpy(trajectories.prompt_embeds),
        negative_prompt_embeds=torch.from_numpy(trajectories.negative_prompt_embeds),
        guidance_scale=trajectories.guidance_scale,
        eta=trajectories.eta,
    )
