"""Score a policy on a list of prompts: the work behind ``rayalign eval``."""

from __future__ import annotations

import dataclasses
import logging
import time
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm.auto import tqdm

from actors.prompts import BUILTIN_PROMPT_SETS, read_prompts  # noqa: F401  (re-exported for callers)
from actors.rewards.registry import CombinedReward, score_batch

if TYPE_CHECKING:
    from actors.diffusion.policy import Policy

logger = logging.getLogger(__name__)


def sample_seed(base_seed: int, prompt: str, index: int) -> int:
    """Seed of the ``index``-th image of ``prompt``: independent of the prompt's position in the file."""
    entropy = [base_seed, zlib.crc32(prompt.encode("utf-8")), index]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


@dataclasses.dataclass
class EvalResult:
    mean: float
    std: float
    per_prompt: dict[str, float]
    images: np.ndarray
    """(prompts * num_per_prompt, H, W, 3) uint8, grouped by prompt."""
    scores: np.ndarray
    """(prompts * num_per_prompt,) each image's reward, in the order of ``images``."""
    info: dict[str, float]
    seconds: float
    images_per_second: float


def evaluate(
    policy: "Policy",
    prompts: Sequence[str],
    reward: CombinedReward,
    *,
    num_per_prompt: int,
    seed: int,
    num_steps: int,
    eta: float,
    guidance_scale: float,
    batch_size: int,
    sde_window: tuple[int, int] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Sample ``num_per_prompt`` images per prompt and score them with ``reward``.

    ``sde_window`` (flow-matching policies only): the SDE on those steps and the ODE step on
    the others, as a run with ``sampling.sde_window`` sampled in training.
    """
    if num_per_prompt < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {num_per_prompt}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window = {} if sde_window is None else {"sde_window": tuple(sde_window)}
    if window and not policy.SAMPLES_SDE_WINDOW:
        raise ValueError(
            f"an SDE window {list(sde_window)} was asked for, but {type(policy).__name__} samples every step with DDIM; "
            "windows are for flow-matching models (sd3, flux)"
        )
    jobs = [(p, sample_seed(seed, p, i)) for p in prompts for i in range(num_per_prompt)]
    scores, images, infos = [], [], []
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="eval", unit="img", disable=not progress, mininterval=2)
    for batch_index, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start : start + batch_size]
        batch_prompts = [p for p, _ in chunk]
        _, batch_images = policy.sample(
            batch_prompts, seeds=[s for _, s in chunk], num_steps=num_steps, eta=eta, guidance_scale=guidance_scale, **window
        )
        batch_scores, info = score_batch(reward, batch_images, batch_prompts, batch_index=batch_index)
        scores.append(batch_scores)
        images.append(batch_images)
        infos.append({k: float(np.mean(v)) for k, v in info.items()})
        bar.update(len(chunk))
        bar.set_postfix(reward=f"{np.concatenate(scores).mean():.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    all_scores = np.concatenate(scores)  # (prompts * num_per_prompt,)
    per_prompt = {p: float(all_scores[i * num_per_prompt : (i + 1) * num_per_prompt].mean()) for i, p in enumerate(prompts)}
    sizes = [len(s) for s in scores]
    info = {key: float(np.average([d[key] for d in infos], weights=sizes)) for key in infos[0]} if infos else {}
    return EvalResult(
        mean=float(all_scores.mean()),
        std=float(all_scores.std()),
        per_prompt=per_prompt,
        images=np.concatenate(images),
        scores=all_scores,
        info=info,
        seconds=seconds,
        images_per_second=len(jobs) / seconds,
    )
