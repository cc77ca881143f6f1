"""What the flow-model tests share: tiny-model settings, moving an adapter off its init, one recorded step as log_prob's arguments."""

import torch
from diffusers import FluxPipeline

from actors.diffusion.flux_policy import pack_latents
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


def transformer_inputs(family: str, trajectories: Trajectories, step: int, sigma: float) -> dict:
    """The diffusers transformer's keyword arguments for a recorded step of an ``"sd3"`` or ``"flux"``
    policy, as the family's pipeline passes them (FLUX: packed latents, position ids, guidance 3.5)."""
    latents = torch.from_numpy(trajectories.latents[:, step])
    rows = latents.shape[0]
    common = dict(
        pooled_projections=torch.from_numpy(trajectories.pooled_prompt_embeds),
        encoder_hidden_states=torch.from_numpy(trajectories.prompt_embeds),
        return_dict=False,
    )
    if family == "sd3":
        return dict(hidden_states=latents, timestep=torch.full((rows,), sigma * 1000), **common)
    side = latents.shape[-1] // 2
    return dict(
        hidden_states=pack_latents(latents),
        timestep=torch.full((rows,), sigma),
        guidance=torch.full((rows,), 3.5),
        txt_ids=torch.zeros(trajectories.prompt_embeds.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(rows, side, side, "cpu", torch.float32),
        **common,
    )
