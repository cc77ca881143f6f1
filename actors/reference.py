"""Reference actor: the frozen initial policy, for the KL term of DPOK."""

from __future__ import annotations

import numpy as np
import torch

from actors.policy import load_policy
from actors.trajectory import Trajectories, as_tensor


class ReferenceWorker:
    """Computes mu_ref(x_t, t, c) for every recorded transition under the initial weights."""

    def __init__(self, model, *, num_threads: int = 1):
        torch.set_num_threads(num_threads)
        self.policy = load_policy(model, trainable=False)

    def reference_means(self, trajectories: Trajectories) -> np.ndarray:
        """(batch, steps, C, H, W) float32 means of the reference policy's Gaussians."""
        batch, steps = trajectories.batch_size, trajectories.num_steps
        latents = as_tensor(trajectories.latents)
        embeds = as_tensor(trajectories.prompt_embeds)
        negative = as_tensor(trajectories.negative_prompt_embeds)
        means = np.zeros((batch, steps, *trajectories.latents.shape[2:]), dtype=np.float32)
        with torch.no_grad():
            for j in range(steps):
                out = self.policy.log_prob(
                    latents=latents[:, j],
                    next_latents=latents[:, j + 1],
                    timesteps=torch.full((batch,), int(trajectories.timesteps[j])),
                    prev_timesteps=torch.full((batch,), int(trajectories.prev_timesteps[j])),
                    prompt_embeds=embeds,
                    negative_prompt_embeds=negative,
                    guidance_scale=trajectories.guidance_scale,
                    eta=trajectories.eta,
                )
                means[:, j] = out.mean.cpu().numpy()
        return means
