"""Learner: one data-parallel rank that updates the policy with DeepSpeed.

Runs inside a Ray Train worker (``orchestrator.loop.train_loop_per_worker``), where
``torch.distributed`` is already initialised (gloo on CPU, nccl on GPU); DeepSpeed
reuses that process group. Each rank trains on its own shard of the epoch's
trajectories; DeepSpeed averages gradients across ranks and accumulates them over
micro-batches and denoising steps, so W workers with per-worker batch B/W take the
same step as one worker with batch B.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import deepspeed
import numpy as np
import torch

from actors.diffusion.lora import unet_lora_state_dict
from actors.diffusion.policy import Policy, load_policy
from actors.diffusion.trajectory import Trajectories, as_tensor
from actors.rl.losses import (
    AlgorithmParams,
    LossInputs,
    gaussian_kl,
    get_algorithm,
    needs_reference,
    truncated_is_weights,
)
from actors.rl.schedules import learning_rate_at, steps_per_pass

logger = logging.getLogger(__name__)


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before it is imported: its CPU one when there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return os.environ.get("DS_ACCELERATOR", "cuda")


def step_orders(rng: np.random.Generator, *, batch: int, num_steps: int, train_timesteps: int, selection: str) -> np.ndarray:
    """The denoising steps each trajectory trains on this inner epoch, in training order: (batch, train_timesteps).

    DDPO shuffles the steps of each trajectory independently ("random": a fresh subset of
    all ``num_steps``); "earliest" shuffles the first ``train_timesteps`` steps.
    """
    if selection not in ("random", "earliest"):
        raise ValueError(f"timestep selection must be 'random' or 'earliest', got {selection!r}")
    if not 1 <= train_timesteps <= num_steps:
        raise ValueError(f"train_timesteps must be in [1, num_steps={num_steps}], got {train_timesteps}")
    pool = num_steps if selection == "random" else train_timesteps
    return np.stack([rng.permutation(pool)[:train_timesteps] for _ in range(batch)]).reshape(batch, train_timesteps)


def deepspeed_config(learner, *, train_timesteps: int) -> dict[str, Any]:
    """DeepSpeed config for a learner section: one optimizer step per (accumulation x passes) micro-steps,
    where each trajectory's ``train_timesteps`` steps take ``train_timesteps / timesteps_per_pass`` passes."""
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": learner.gradient_accumulation_steps * (train_timesteps // steps_per_pass(learner, train_timesteps)),
        "gradient_clipping": learner.max_grad_norm,
        "zero_optimization": {"stage": learner.zero_stage},
        # The optimizer is torch's AdamW, given by us: DeepSpeed's own Adam kernels need a CUDA or JIT build.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Learner:
    """The policy under a DeepSpeed engine, plus the loss of the configured algorithm."""

    def __init__(self, *, model, learner, train, seed: int, rank: int, world_size: int, log_prob_reduction: str = "mean"):
        select_accelerator()

        self.train_cfg = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        torch.manual_seed(seed)  # identical adapter init on every rank (DeepSpeed also broadcasts rank 0's)
        # Trajectories carry their prompt embeddings: the learner needs neither the VAE nor the text encoders.
        # The trained network is a UNet (DDIM families) or an SD3 transformer (FlowPolicy), both reached as policy.unet.
        self.policy: Policy = load_policy(model, unet_only=True)
        self.algorithm = get_algorithm(train.algorithm)
        self.params = AlgorithmParams(clip_range=train.clip_range, beta=train.beta)
        self.uses_reference = needs_reference(train.algorithm)
        # train.reference: adapter_off: the reference means come from this very network with its adapter switched off
        self.reference_in_learner = train.reference == "adapter_off"
        if self.reference_in_learner and self.policy.lora_config is None:
            raise ValueError(
                "train.reference: adapter_off needs a LoRA adapter to switch off, but model.finetune is full (the base weights "
                "themselves are trained); use train.reference: pool with pools.reference.num_actors >= 1"
            )
        self.micro_batch_size = learner.micro_batch_size
        self.log_prob_reduction = log_prob_reduction
        optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=learner.learning_rate,
            betas=(learner.adam_beta1, learner.adam_beta2),
            eps=learner.adam_epsilon,
            weight_decay=learner.weight_decay,
        )
        self._timesteps_per_trajectory: int | None = None
        self._recorded_steps: int | None = None
        self._learner_cfg = learner
        self._optimizer = optimizer
        self.engine = None
        self._deepspeed = deepspeed

    def _ensure_engine(self, num_steps: int) -> None:
        """DeepSpeed's accumulation count depends on the recorded trajectory length, known at the first batch."""
        if self.engine is not None:
            if num_steps != self._recorded_steps:
                raise ValueError(
                    f"these trajectories record {num_steps} steps but the learner was built for {self._recorded_steps} "
                    "(sampling.num_steps, or the length of sampling.sde_window); one run's samples must record the same steps"
                )
            return
        self._recorded_steps = num_steps
        train_timesteps = self.train_cfg.trained_steps(num_steps)
        if train_timesteps % steps_per_pass(self._learner_cfg, train_timesteps):
            raise ValueError(
                f"learner.timesteps_per_pass ({self._learner_cfg.timesteps_per_pass}) must divide the "
                f"{train_timesteps} denoising steps trained per trajectory"
            )
        self._timesteps_per_trajectory = train_timesteps
        config = deepspeed_config(self._learner_cfg, train_timesteps=train_timesteps)
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * self.world_size
        engine, _, _, _ = self._deepspeed.initialize(
            model=self.policy.unet,
            model_parameters=self.policy.trainable_parameters(),
            optimizer=self._optimizer,
            config=config,
            dist_init_required=False,
        )
        self.engine = engine
        self.policy.unet = engine  # forward passes go through the engine (ZeRO-3 hooks, grad sync)

    def prepare(self, num_steps: int) -> None:
        """Build the DeepSpeed engine ahead of the first epoch (needed before loading a checkpoint).

        ``num_steps`` is the steps each trajectory records (``SamplingConfig.recorded_steps``).
        """
        self._ensure_engine(num_steps)

    # ------------------------------------------------------------------ training
    def train_epoch(
        self,
        shard: Trajectories,
        advantages: np.ndarray,
        ref_means: np.ndarray | None,
        *,
        epoch: int,
        versions: np.ndarray | None = None,
        learner_version: int | None = None,
        is_truncation: float = 1.0,
        beta: float | None = None,
    ) -> dict[str, float]:
        """All inner epochs of DDPO/DPOK updates on this rank's shard. Returns mean statistics.

        ``beta`` is DPOK's KL coefficient for this update, as the controller sends it with each
        shard (adapted when ``train.kl_target`` is set; logged as ``kl/beta``); None means ``train.beta``.

        ``versions`` (batch,) are the policy versions that sampled the shard's rows and
        ``learner_version`` the version these weights are. Rows sampled by an older
        version are replayed off-policy: their log-probs under the current weights are
        computed first (no gradient), the PPO ratio is taken against those, and each
        transition is weighted by min(p_old / p_behaviour, ``is_truncation``).
        """
        if self.reference_in_learner:
            ref_means = None  # computed below, transition by transition, with the adapter switched off
        elif self.uses_reference and ref_means is None:
            raise ValueError(f"algorithm {self.train_cfg.algorithm!r} needs reference means; the reference pool returned none")
        self._ensure_engine(shard.num_steps)
        batch = shard.batch_size
        if batch % self.micro_batch_size:
            raise ValueError(f"shard of {batch} trajectories is not divisible by micro_batch_size {self.micro_batch_size}")
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        # Dropout and any other torch randomness restart from (seed, epoch, rank): a resumed
        # run replays exactly what an uninterrupted one would.
        torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, self.rank]).generate_state(1)[0]))
        steps = shard.num_steps
        train_timesteps = self._timesteps_per_trajectory
        latents = as_tensor(shard.latents)  # (batch, steps + 1, C, H, W)
        old_log_probs = as_tensor(shard.log_probs)  # (batch, steps)
        adv = as_tensor(np.asarray(advantages, dtype=np.float32))  # (batch,)
        embeds = as_tensor(shard.prompt_embeds)
        negative = as_tensor(shard.negative_prompt_embeds)
        pooled = shard.tensor("pooled_prompt_embeds")  # (batch, dim) for SDXL, else None
        negative_pooled = shard.tensor("negative_pooled_prompt_embeds")
        timesteps = as_tensor(shard.timesteps)
        prev_timesteps = as_tensor(shard.prev_timesteps)
        ref = as_tensor(ref_means) if ref_means is not None else None
        tensors = {
            "latents": latents,
            "timesteps": timesteps,
            "prev_timesteps": prev_timesteps,
            "embeds": embeds,
            "negative": negative,
            "pooled": pooled,
            "negative_pooled": negative_pooled,
        }
        # The rate is a function of the epoch alone: a resumed run sets what an uninterrupted one would.
        lr = learning_rate_at(self._learner_cfg, epoch=epoch, epochs=self.train_cfg.epochs)
        for group in self._optimizer.param_groups:
            group["lr"] = lr
        stats: dict[str, list[float]] = {"optim/lr": [lr]}
        params = self.params if beta is None else dataclasses.replace(self.params, beta=beta)
        if self.uses_reference:
            stats["kl/beta"] = [params.beta]
        self.engine.train()
        plans = []
        for _ in range(self.train_cfg.inner_epochs):
            order = rng.permutation(batch)
            step_order = step_orders(
                rng, batch=batch, num_steps=steps, train_timesteps=train_timesteps, selection=self.train_cfg.timestep_selection
            )
            plans.append((order, step_order))
        stale = versions is not None and learner_version is not None and bool(np.any(np.asarray(versions) != learner_version))
        is_weights = None
        if stale:
            proximal = self._proximal_log_probs(shard, tensors, plans)
            behaviour = old_log_probs
            trained = ~torch.isnan(proximal)
            weights, is_stats = truncated_is_weights(
                old_log_prob=proximal[trained], behaviour_log_prob=behaviour[trained], truncation=is_truncation
            )
            is_weights = torch.ones_like(old_log_probs)
            is_weights[trained] = weights
            old_log_probs = torch.where(trained, proximal, behaviour)
        else:
            is_stats = {"is/ratio_mean": 1.0, "is/ratio_max": 1.0, "is/truncated_frac": 0.0, "is/ess_frac": 1.0}
        for k, v in is_stats.items():
            stats[k] = [v]
        for order, step_order in plans:
            per_pass = steps_per_pass(self._learner_cfg, train_timesteps)
            for start in range(0, batch, self.micro_batch_size):
                rows = order[start : start + self.micro_batch_size]
                for first in range(0, train_timesteps, per_pass):
                    # One pass: every row of the micro-batch at `per_pass` of its own steps,
                    # stacked row-major into micro * per_pass transitions.
                    j = as_tensor(step_order[rows, first : first + per_pass].reshape(-1))  # (micro * per_pass,)
                    r = as_tensor(np.repeat(rows, per_pass))  # (micro * per_pass,)
                    if ref is not None:
                        ref_mean = ref[r, j]
                    elif self.reference_in_learner and self.uses_reference:
                        # before the policy's own pass, so the adapter is back on when its graph is built
                        ref_mean = self._reference_mean(shard, tensors, r, j)
                    else:
                        ref_mean = None
                    out = self._log_prob(shard, tensors, r, j)
                    if "policy/onpolicy_gap" not in stats:
                        # Before this epoch's first update the learner holds the weights that
                        # sampled the shard (sync mode) or, replaying, the proximal weights
                        # whose log-probs it just computed: a gap here means mismatched weights.
                        gap = (out.log_prob.detach() - old_log_probs[r, j]).abs().max()
                        stats["policy/onpolicy_gap"] = [float(gap)]
                    inputs = LossInputs(
                        log_prob=out.log_prob,
                        old_log_prob=old_log_probs[r, j],
                        advantages=adv[r],
                        mean=out.mean,
                        ref_mean=ref_mean.to(out.mean.device) if ref_mean is not None else None,
                        std=out.std,
                        is_weights=is_weights[r, j] if is_weights is not None else None,
                    )
                    loss = self.algorithm(inputs, params)
                    if not torch.isfinite(loss.loss.detach()).all():
                        # Before the step: NaN never reaches the weights, and no checkpoint is written from them.
                        raise ValueError(
                            f"the loss is not finite ({float(loss.loss.detach())}) at epoch {epoch} on learner rank {self.rank}; "
                            "nothing was updated and no checkpoint written. Usual causes: a learning rate too high for "
                            "the model (learner.learning_rate) or extreme advantages (train.adv_clip_max); "
                            "--resume continues from the last complete checkpoint"
                        )
                    self.engine.backward(loss.loss)
                    self.engine.step()
                    for key, value in loss.stats.items():
                        stats.setdefault(key, []).append(value)
                    if inputs.ref_mean is not None and "kl/mean" not in loss.stats:
                        # No KL in this loss: still report how far the policy has moved from the reference.
                        with torch.no_grad():
                            kl = gaussian_kl(mean=out.mean, ref_mean=inputs.ref_mean, std=out.std)
                        stats.setdefault("kl/mean", []).append(float(kl.mean()))
        return {key: float(np.mean(values)) for key, values in stats.items()}

    def _log_prob(self, shard: Trajectories, tensors: dict[str, torch.Tensor], r: torch.Tensor, j: torch.Tensor):
        """The policy's step output for transitions (row r, step j) of the shard."""
        latents, timesteps = tensors["latents"], tensors["timesteps"]
        return self.policy.log_prob(
            latents=latents[r, j],
            next_latents=latents[r, j + 1],
            timesteps=timesteps[j],
            prev_timesteps=tensors["prev_timesteps"][j],
            prompt_embeds=tensors["embeds"][r],
            negative_prompt_embeds=tensors["negative"],
            pooled_prompt_embeds=None if tensors["pooled"] is None else tensors["pooled"][r],
            negative_pooled_prompt_embeds=tensors["negative_pooled"],
            guidance_scale=shard.guidance_scale,
            eta=shard.eta,
            reduction=self.log_prob_reduction,
        )

    def _reference_mean(self, shard: Trajectories, tensors: dict[str, torch.Tensor], r: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """mu_ref of transitions (row r, step j): the base model's Gaussian mean, from this network with its adapter off."""
        with torch.no_grad(), self.policy.adapter_disabled():
            return self._log_prob(shard, tensors, r, j).mean

    def _proximal_log_probs(self, shard: Trajectories, tensors: dict[str, torch.Tensor], plans) -> torch.Tensor:
        """log p under the current weights of every transition the plans will train on,
        before any of this update's steps; NaN where not trained. (batch, steps)"""
        batch, steps = shard.batch_size, shard.num_steps
        needed = np.zeros((batch, steps), dtype=bool)
        for _, step_order in plans:
            needed[np.arange(batch)[:, None], step_order] = True
        rows, cols = np.nonzero(needed)
        out = torch.full((batch, steps), float("nan"))
        chunk = self.micro_batch_size * steps_per_pass(self._learner_cfg, self._timesteps_per_trajectory)
        with torch.no_grad():
            for start in range(0, len(rows), chunk):
                r = as_tensor(rows[start : start + chunk])
                j = as_tensor(cols[start : start + chunk])
                out[r, j] = self._log_prob(shard, tensors, r, j).log_prob.float().cpu()
        return out

    # ------------------------------------------------------------------ weights
    def trainable_state(self) -> dict[str, np.ndarray]:
        """Trainable weights as numpy (LoRA adapters in diffusers' keys, or the full UNet or SD3 transformer).

        A collective under ZeRO-3 (parameters are gathered), so every rank must call it.
        """
        module = self.engine.module if self.engine is not None else self.policy.unet
        params = [p for p in module.parameters() if p.requires_grad]
        with self._deepspeed.zero.GatheredParameters(params, enabled=self._learner_cfg.zero_stage == 3):
            state = unet_lora_state_dict(module) if self.policy.lora_config is not None else module.state_dict()
            weights = {name: tensor.detach().to("cpu", torch.float32).numpy().copy() for name, tensor in state.items()}
        bad = [name for name, array in weights.items() if not np.isfinite(array).all()]
        if bad:
            # A finite loss can still step into overflow: these weights are neither synced nor checkpointed.
            raise ValueError(
                f"the trained weights are not finite ({len(bad)} tensors, e.g. {bad[0]}); nothing was synced or checkpointed. "
                "Lower learner.learning_rate (or use float32); --resume continues from the last complete checkpoint"
            )
        return weights

    def save_unet_config(self, directory) -> None:
        """The trained network's ``config.json`` (beside fully fine-tuned weights, it makes a diffusers model folder
        that ``unet_path`` loads: a UNet, or for SD3 a transformer)."""
        (self.engine.module if self.engine is not None else self.policy.unet).save_config(directory)

    def write_lora(self, directory, state: dict[str, np.ndarray]) -> None:
        """Adapter files loadable by ``rayalign eval --lora`` and the family's diffusers pipeline, from :meth:`trainable_state`'s output."""
        self.policy.save_lora(directory, state)
