"""The trajectory record that rollout actors put in the object store.

Plain numpy arrays (zero-copy reads from Ray's object store on one node); decoded
images are *not* part of it, they travel as a separate object that only reward actors
fetch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of ``array``; copied when the array is read-only (zero-copy reads
    from Ray's object store are), since torch may not share read-only memory."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


@dataclasses.dataclass
class Trajectories:
    """A batch of denoising trajectories x_T -> x_0 sampled by one policy version.

    The schedule fields depend on the policy class: a DDIM policy (SD, SDXL) records integer
    timesteps, the flow-matching policy (SD3) the sigmas of its SDE steps. Each policy reads
    back only its own kind (``FlowPolicy.log_prob`` refuses integer timesteps).

    Only stochastic steps are recorded, since only they have a log-probability. A flow
    policy sampling with an SDE window (``sampling.sde_window``) takes the deterministic ODE
    step outside it, so its trajectories hold the window alone: steps ``first_step`` to
    ``first_step + num_steps - 1`` of the sampler's ``num_inference_steps``. Everything that
    reads them (the learner's step selection, replay, the reference means, importance
    weights) therefore sees SDE steps only, without knowing about the window.
    """

    prompts: list[str]
    """Caption of each sample. len = batch."""
    latents: np.ndarray
    """x_T, x_{T-1}, ..., x_0: the latent before each recorded step and after the last. (batch, steps + 1, C, H, W)
    float32. With an SDE window, the latent where the window starts to the one where it ends (not x_T and x_0)."""
    timesteps: np.ndarray
    """Where each transition x_t -> x_{t_prev} starts, descending. (steps,): DDIM timesteps t as int64, or for
    a flow-matching policy sigmas in (0, 1] as float32."""
    prev_timesteps: np.ndarray
    """Where each transition ends. (steps,): int64 timesteps (negative after the last), or float32 sigmas
    ending at 0."""
    log_probs: np.ndarray
    """log p_behaviour(x_{t_prev} | x_t, c) of each recorded step, at sampling. (batch, steps) float32."""
    prompt_embeds: np.ndarray
    """Text-encoder output for each caption. (batch, tokens, dim) float32."""
    negative_prompt_embeds: np.ndarray
    """Embedding of the empty caption (the unconditional branch of CFG). (tokens, dim) float32."""
    seeds: np.ndarray
    """Per-sample seed: initial noise and every step's noise come from it. (batch,) int64."""
    guidance_scale: float
    eta: float
    num_inference_steps: int
    """Steps of the whole sampler, recorded or not; ``num_steps`` is how many were recorded."""
    policy_version: int = 0
    """Weights version that sampled these; the learner compares it with its own."""
    pooled_prompt_embeds: np.ndarray | None = None
    """SDXL: the second text encoder's pooled projection per caption; SD3: both CLIP projections side by side.
    (batch, dim) float32; None for SD."""
    negative_pooled_prompt_embeds: np.ndarray | None = None
    """SDXL, SD3: the same for the unconditional branch. (dim,) float32; None for SD."""
    first_step: int = 0
    """Index, in the sampler's ``num_inference_steps`` steps, of the first recorded one: the start of
    the SDE window, 0 when every step is recorded."""

    def tensor(self, name: str, rows: slice | np.ndarray | None = None) -> torch.Tensor | None:
        """An optional array field as a tensor (``rows`` of it if given), None when absent."""
        array = getattr(self, name)
        if array is None:
            return None
        return as_tensor(array if rows is None else array[rows])

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def select(self, index: np.ndarray | list[int]) -> "Trajectories":
        """A sub-batch by sample index (copies the rows; shared fields are kept)."""
        index = np.asarray(index, dtype=np.int64)
        return dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in index],
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            prompt_embeds=self.prompt_embeds[index],
            pooled_prompt_embeds=None if self.pooled_prompt_embeds is None else self.pooled_prompt_embeds[index],
            seeds=self.seeds[index],
        )

    @staticmethod
    def concatenate(parts: list["Trajectories"]) -> "Trajectories":
        """Join batches sampled with the same schedule and settings."""
        if not parts:
            raise ValueError("cannot concatenate an empty list of trajectories")
        first = parts[0]
        for part in parts[1:]:
            if not np.array_equal(part.timesteps, first.timesteps) or (part.guidance_scale, part.eta) != (first.guidance_scale, first.eta):
                raise ValueError("trajectories sampled with different timesteps, guidance or eta cannot be concatenated")
            if (part.first_step, part.num_inference_steps) != (first.first_step, first.num_inference_steps):
                raise ValueError(
                    "trajectories recording different windows of steps (first_step, num_inference_steps) cannot be concatenated"
                )
            if (part.pooled_prompt_embeds is None) != (first.pooled_prompt_embeds is None):
                raise ValueError("trajectories with and without pooled prompt embeddings (SDXL and SD models) cannot be concatenated")
        pooled = None if first.pooled_prompt_embeds is None else np.concatenate([p.pooled_prompt_embeds for p in parts])
        return dataclasses.replace(
            first,
            prompts=[p for part in parts for p in part.prompts],
            latents=np.concatenate([p.latents for p in parts]),
            log_probs=np.concatenate([p.log_probs for p in parts]),
            prompt_embeds=np.concatenate([p.prompt_embeds for p in parts]),
            pooled_prompt_embeds=pooled,
            seeds=np.concatenate([p.seeds for p in parts]),
            policy_version=min(p.policy_version for p in parts),
        )
