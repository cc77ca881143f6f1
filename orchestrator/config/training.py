"""The training config: one :class:`Config` per run, a section per component.

Each component receives its own section (``cfg.sampling``, ``cfg.model``, ...), never
the root. Adding a section: a :class:`~orchestrator.config.schema.Section` with a
docstring under every field and its ranges as pydantic constraints, then one field of
:class:`Config`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.schema import FieldError, Section

Name = Annotated[str, Field(pattern=r"^\S(.*\S)?$", json_schema_extra={"allowed": "a non-empty string without surrounding spaces"})]
"""A name (a reward, a metric): non-empty, no surrounding spaces."""

Device = Annotated[
    str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", json_schema_extra={"allowed": "one of 'auto', 'cpu', 'cuda', 'cuda:N' (N a GPU index)"})
]
"""Where a component puts its model: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""

StepIndex = Annotated[int, Field(strict=True)]
"""A denoising step's index: an int even where the enclosing list is read leniently (no "1", no true)."""


class LoRAConfig(Section):
    """Low-rank adapters on the trained network, the UNet or SD3's transformer (used when ``model.finetune == "lora"``)."""

    rank: int = Field(4, ge=1)
    """Rank r of each adapter (the inner dimension of B @ A); >= 1. Higher = more capacity."""

    alpha: float = Field(4.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / rank; > 0."""

    target_modules: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        strict=False,
        json_schema_extra={"why": "list at least one module name, e.g. [to_q, to_v], or null for the model's default layers"},
    )
    """Names (suffixes, as peft matches them) of the linear layers that get adapters, or
    null for the model family's default: a UNet's attention projections [to_q, to_k, to_v,
    to_out.0] as in DDPO (SD, SDXL), every attention and feed-forward layer of SD3's
    transformer (actors/diffusion/flow_policy.py SD3_LORA_TARGETS). A list must be
    non-empty; the layer names differ between a UNet and SD3's transformer (its text
    stream's are add_q_proj, add_k_proj, add_v_proj, to_add_out, ff_context.*)."""

    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability on the adapter input during training; in [0, 1)."""

    @model_validator(mode="after")
    def _named_modules(self) -> "LoRAConfig":
        if self.target_modules is not None and not all(module.strip() for module in self.target_modules):
            raise FieldError("target_modules", f"must not contain empty names, got {self.target_modules!r}")
        return self


class ModelConfig(Section):
    """Which diffusion model to align, and which of its weights are trained."""

    path: str | None = None
    """Local diffusers pipeline directory (or an s3:// / gs:// URI) of one of the families
    ``sd`` (Stable Diffusion 1.x/2.x: unet/, vae/, text_encoder/, tokenizer/, scheduler/;
    epsilon or v-prediction), ``sdxl`` (SDXL base: also text_encoder_2/, tokenizer_2/),
    both sampled with DDIM, or ``sd3`` (Stable Diffusion 3 / 3.5: transformer/, vae/, three
    text encoders and tokenizers including T5, scheduler/), a flow-matching model sampled
    with the Flow-GRPO SDE (set sampling.eta, its noise level, e.g. to 0.7). null = the
    embedded toy UNet model (sd), also named ``toy-t2i``; ``toy-sd3`` is the embedded toy flow
    model (sd3). Nothing is downloaded: a hub id is not accepted at run time. A
    missing or incomplete directory fails before any actor starts, naming the path."""

    finetune: Literal["lora", "full"] = "lora"
    """"lora": train only LoRA adapters on the UNet (SD3: the transformer; see ``lora``);
    "full": train every weight of it. The VAE and text encoders are always frozen."""

    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    """Adapter settings; ignored when ``finetune`` is "full"."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the frozen weights and of the UNet's forward passes; one of float32,
    float16, bfloat16. Trainable weights (LoRA, or the whole UNet with finetune: full),
    optimizer state and all log-prob maths stay float32 whatever this is. float16 needs a
    CUDA device (an error on CPU); on CPU use float32, or bfloat16 where the CPU has it."""

    gradient_checkpointing: bool = False
    """Recompute the UNet's activations in the backward pass instead of keeping them:
    much less learner memory for about a third more learner compute. Needed for SDXL and
    for SD 1.5 micro-batches above ~8 on 24 GB GPUs (see docs/gpu-memory.md)."""

    device: Device = "auto"
    """Where actors put the model: "auto" (cuda if available, else cpu), "cpu", "cuda"
    or "cuda:N" (GPU index N as seen by the actor)."""

    @model_validator(mode="after")
    def _path_not_blank(self) -> "ModelConfig":
        if self.path is not None and not self.path.strip():
            raise FieldError("path", f"must be a directory path or null (for the toy model), got {self.path!r}")
        return self


class SamplingConfig(Section):
    """How rollouts are sampled: the stochastic sampler whose per-step log-probs the RL losses use
    (DDIM for sd and sdxl models, the Flow-GRPO SDE for sd3)."""

    num_steps: int = Field(20, ge=1, le=1000)
    """Number of denoising steps per image, i.e. the length T of each trajectory;
    in [1, 1000]."""

    eta: float = Field(
        1.0,
        gt=0,
        le=1,
        json_schema_extra={
            "why": "per-step log-probs need eta > 0, since DDIM at eta = 0 is deterministic; "
            "eta > 1 would make the DDIM variance invalid; DDPO uses eta = 1.0"
        },
    )
    """Per-step noise of the sampler, in (0, 1]: at 0 the step is deterministic, so
    log p(x_{t-1} | x_t) does not exist. For sd and sdxl models it is DDIM's eta (1 =
    DDPM-like noise; above 1 the DDIM variance exceeds what the step can hold); DDPO uses
    1.0. For sd3 models it is the noise level ``a`` of the Flow-GRPO SDE, whose step has
    std a * sqrt(sigma / (1 - sigma)) * sqrt(sigma - sigma_next); Flow-GRPO uses 0.7."""

    guidance_scale: float = Field(4.5, ge=1.0, json_schema_extra={"why": "1.0 turns classifier-free guidance off"})
    """Classifier-free guidance weight w in eps_uncond + w * (eps_cond - eps_uncond);
    1.0 turns guidance off (one UNet call per step instead of two); >= 1.0."""

    batch_size: int = Field(16, ge=1)
    """Images generated per sampling call on one rollout actor; >= 1."""

    log_prob_reduction: Literal["mean", "sum"] = "mean"
    """How the per-element Gaussian log-density of x_{t-1} is reduced over latent
    dimensions. "mean": averaged (the DDPO convention, so its clip ranges and KL
    coefficients transfer unchanged); "sum": the exact log-density."""

    merge_lora: bool = True
    """Rollout actors fold the LoRA adapter into the layers it sits on (again after every
    weight sync), so sampling skips the adapter's extra matmuls: about 1.6x faster
    sampling on the toy model with adapters on its attention and feed-forward layers.
    Recorded log-probs equal the unmerged model's to float32 rounding. Only float32
    models merge; with ``model.dtype`` float16/bfloat16 the adapter stays separate, since
    adding a small update to a half-precision weight would round it away."""

    sde_window: tuple[StepIndex, StepIndex] | None = Field(None, strict=False)
    """Flow-matching models (sd3, flux) only: sample with the Flow-GRPO SDE on steps start <= i <
    stop alone and with the deterministic Euler ODE step on the others, and record and train
    on the window's steps only (Flow-GRPO-Fast: most of the signal is in the early,
    high-noise steps, so e.g. [0, 2] of 10 steps trains on a fifth of the transitions, with
    a fifth of the learner, reference and replay work). null = every step, the plain
    Flow-GRPO sampler. Written [start, stop], a half-open range of step indices with 0 <=
    start < stop <= num_steps; ``train.timestep_fraction`` then picks among the window's
    steps. Other families' samplers record every step (DDIM: sd, sdxl, the toy model), so
    a window is an error there, raised by ``rayalign train`` before any actor starts (or by
    the rollout actors, for a model path the driver cannot read). The window is recorded
    beside each checkpoint's adapter, and ``rayalign eval`` and serving sample the adapter
    with it while they use the trained number of steps (``rayalign eval --sde-window``
    overrides it)."""

    @property
    def recorded_steps(self) -> int:
        """Steps each trajectory records and the learner trains among: the window's, else ``num_steps``."""
        if self.sde_window is None:
            return self.num_steps
        start, stop = self.sde_window
        return stop - start

    @model_validator(mode="after")
    def _window_within_steps(self) -> "SamplingConfig":
        if self.sde_window is not None:
            start, stop = self.sde_window
            if not 0 <= start < stop <= self.num_steps:
                raise FieldError(
                    "sde_window",
                    f"must be [start, stop] with 0 <= start < stop <= num_steps = {self.num_steps} (a half-open range of "
                    f"step indices holding at least one step), got {list(self.sde_window)}; or null for every step",
                )
        return self


class RewardComponent(Section):
    """One reward function and its weight in the weighted sum."""

    name: Name
    """A reward registered in the reward registry (e.g. "toy_fidelity",
    "jpeg_compressibility") or a user function as "package.module:function"."""

    weight: float = 1.0
    """Multiplier of this reward in the total; any finite number (negative = penalty)."""

    options: dict[str, Any] = Field(default_factory=dict)
    """Settings of a reward that takes options (model rewards such as "aesthetic" or
    "imagereward", and "http"), e.g. ``{weights: /models/imagereward, device: cuda,
    batch_size: 16}``; empty for plain reward functions. Checked against the reward's own
    option dataclass (actors/rewards/models.py, actors/rewards/http.py) before any actor
    starts: an unknown option or a bad value is an error naming it."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """Accept a bare name as shorthand for ``{name: <name>}`` (weight 1.0)."""
        return {"name": value} if isinstance(value, str) else value


class RewardConfig(Section):
    """The reward: a weighted sum of registered reward functions.

    Besides the canonical ``{components: [{name: ..., weight: ...}, ...]}``, YAML may use:

    - ``reward: toy_fidelity``  (one reward, weight 1.0);
    - ``reward: {toy_fidelity: 1.0, jpeg_compressibility: 0.1}``  (name -> weight);
    - ``reward: [toy_fidelity, {name: jpeg_compressibility, weight: 0.1}]``.

    A reward with options needs the canonical or list form, e.g. ``reward: [{name:
    aesthetic, options: {weights: /models/aesthetic-head}}]``. Names and options are
    checked against the reward registry before any actor starts (``rayalign train``'s
    pre-flight), not here.
    """

    components: tuple[RewardComponent, ...] = Field(
        (RewardComponent(name="toy_fidelity"),),
        min_length=1,
        strict=False,
        json_schema_extra={"why": "name at least one reward, e.g. `reward: toy_fidelity`"},
    )
    """The rewards to combine, each a name and a weight; non-empty, names unique."""

    on_invalid: Literal["error", "drop"] = "error"
    """What a score that is not a finite number (NaN, inf), a batch of the wrong shape or a
    reward that raises does to the run: "error" stops it before any update, with an error
    naming the reward, the prompt and the value; "drop" leaves those samples out of the
    update (advantage 0) and the reward statistics, counts them (``faults/dropped_samples``)
    and goes on."""

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, value: Any) -> Any:
        """Normalise the YAML shorthands above to ``{"components": [...]}``.

        A mapping that is empty or has a ``components`` key is taken as canonical, so a
        reward cannot be called "components".
        """
        if isinstance(value, str):
            return {"components": [{"name": value}]}
        if isinstance(value, (list, tuple)):
            return {"components": list(value)}
        if isinstance(value, Mapping) and value and "components" not in value:
            components = []
            for name, weight in value.items():
                if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                    raise ValueError(
                        f"weight of reward {name!r} must be a number, got {weight!r}; write "
                        "`reward: {name: weight, ...}` or `reward: {components: [{name: ..., weight: ...}]}`"
                    )
                components.append({"name": name, "weight": weight})
            return {"components": components}
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardConfig":
        names = [component.name for component in self.components]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise FieldError("components", f"must name each reward once, got {duplicates} more than once (merge their weights)")
        return self


class PoolConfig(Section):
    """Size and per-actor resources of one actor pool. Resources are Ray *logical*
    resources: fractions let several pools share a small machine."""

    num_actors: int = Field(1, ge=0, json_schema_extra={"why": "0 is allowed only for the reference pool"})
    """Number of actors in the pool; >= 1 (the reference pool may be 0 when the algorithm
    has no KL term; with >= 1 the KL to the reference is logged as a diagnostic)."""

    num_cpus: float = Field(0.5, ge=0)
    """Logical CPUs reserved per actor; >= 0 (fractions allowed)."""

    num_gpus: float = Field(0.0, ge=0)
    """GPUs reserved per actor; >= 0 (fractions allowed, e.g. 0.5 to pack two actors on a GPU)."""

    placement: Literal["default", "spread", "pack"] = "default"
    """How the actors are laid out over the cluster's nodes: "spread" (across as many nodes
    as they fit on, Ray's SPREAD strategy: one slow or lost node holds few of them), "pack"
    (on as few nodes as possible: a placement group with the PACK strategy) or "default"
    (Ray's own choice). ``node_labels`` and ``resources`` narrow the nodes they may use."""

    node_labels: dict[str, str] = Field(default_factory=dict)
    """Only nodes carrying these Ray node labels take the pool's actors (``ray start
    --labels``, a KubeRay group's ``rayStartParams``), e.g. ``{pool: rollout}`` or
    ``{ray.io/accelerator-type: H100}``; empty = any node."""

    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each actor reserves (``ray start --resources``), e.g.
    ``{rollout_node: 1}``: a way to pin a pool to the nodes that advertise them; empty = none."""

    @model_validator(mode="after")
    def _resources_are_amounts(self) -> "PoolConfig":
        for name, amount in self.resources.items():
            if name in ("CPU", "GPU") or not amount > 0:
                raise FieldError(
                    "resources", f"must map custom resource names to amounts > 0 (CPU and GPU have their own fields), got {name}: {amount}"
                )
        return self


class RolloutPoolConfig(PoolConfig):
    """The rollout pool: its actors sample, and the slowest one sets the pace of an epoch."""

    slowdown: tuple[float, ...] = Field((), strict=False)
    """For benchmarks and tests of dispatch: actor i's sampling calls take ``slowdown[i]``
    times as long as they need (the actor sleeps the difference), as a slower GPU or a busy
    node would; actors past the end of the list run at their own speed. () = none."""

    dispatch: Literal["least_loaded", "round_robin"] = "least_loaded"
    """Which actor samples the next chunk of an epoch: "least_loaded" (whoever has no
    unfinished call: faster actors take more chunks, a slow one fewer) or "round_robin"
    (chunk c to actor c mod n: every actor takes an equal share, so the slowest sets the
    pace; kept to measure the difference)."""

    @model_validator(mode="after")
    def _slowdown_at_least_one(self) -> "RolloutPoolConfig":
        if any(not factor >= 1 for factor in self.slowdown):
            raise FieldError("slowdown", f"must list factors >= 1 (1 = the actor's own speed), got {list(self.slowdown)}")
        return self


class PoolsConfig(Section):
    """The actor pools around the learners."""

    rollout: RolloutPoolConfig = Field(default_factory=lambda: RolloutPoolConfig(num_cpus=1.0))
    """Policy copies that sample trajectories (receive new weights after every update)."""

    reward: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.5))
    """Reward actors that score decoded images."""

    reference: PoolConfig = Field(default_factory=lambda: PoolConfig(num_cpus=0.5))
    """Frozen copies of the initial policy that compute reference means for the KL term
    (only used by algorithms with a KL term, e.g. dpok). Not started with
    ``train.reference: adapter_off``, whose learners compute the means themselves."""

    max_restarts: int = Field(3, ge=0)
    """How many deaths in a row one pool actor survives (its process killed, its node lost).
    A dead actor is restarted on a live node and its unfinished calls run again there, with
    the same weights version, prompts and seeds, so they return the same samples (none lost,
    none twice). Deaths spread over a run do not add up: a call the actor finishes starts its
    count again. One death more than this in a row (an actor that cannot load its model, a
    node that keeps dying) stops the run with an error naming the pool, the actor and the
    cause. 0 = the first death stops the run."""


class LearnerConfig(Section):
    """The learner group: Ray Train workers running DeepSpeed."""

    num_workers: int = Field(1, ge=1)
    """Ray Train workers (data-parallel ranks); >= 1."""

    num_cpus_per_worker: float = Field(1.0, ge=0)
    """Logical CPUs per worker; >= 0."""

    num_gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs per worker; 0 trains on CPU (gloo), >= 1 on GPU (nccl)."""

    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """How Ray Train lays the workers out over nodes (its placement strategy): "pack" (few
    nodes, fastest collectives), "spread" (across nodes), and their strict forms, which fail
    rather than fall back."""

    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker reserves besides its CPUs and GPUs, e.g.
    ``{learner_node: 1}`` to keep learners on the nodes that advertise it; empty = none."""

    max_failures: int = Field(2, ge=0)
    """How many times a run starts its learner group again after losing a learner (its process
    killed, its node gone), each time from the last complete checkpoint: ``metrics.jsonl``
    then keeps each epoch once, and the pools carry on. An error of the run itself (a bad
    value, a non-finite loss) is not retried. 0 = the first loss stops the run."""

    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state sharded),
    2 (+ gradients), 3 (+ parameters)."""

    micro_batch_size: int = Field(4, ge=1)
    """Trajectories per forward/backward pass on one worker; >= 1."""

    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per worker whose gradients add up to one optimizer step (before the
    accumulation over each trajectory's passes, see ``timesteps_per_pass``, on top); >= 1."""

    timesteps_per_pass: int = Field(1, ge=0)
    """Denoising steps of each trajectory stacked into one forward/backward pass; >= 1,
    or 0 for all of its trained steps in one pass (whatever their number).
    1 keeps activation memory at one UNet pass of ``micro_batch_size`` rows (what large
    models need); N runs ``micro_batch_size * N`` transitions per pass and cuts the number
    of passes N-fold, which pays on small models and CPUs where per-pass overhead
    dominates. The optimizer step is the same either way. Must divide the trained steps
    per trajectory, round(sampling.num_steps * train.timestep_fraction) (with an SDE window,
    the window's length in place of num_steps)."""

    learning_rate: float = Field(0.0003, gt=0)
    """AdamW learning rate (DDPO uses 3e-4 for LoRA); > 0. The peak rate when
    ``lr_schedule`` is not "constant"."""

    lr_schedule: Literal["constant", "cosine"] = "constant"
    """How the learning rate moves over the run: "constant", or "cosine" (half a cosine
    from ``learning_rate`` at the first epoch down to ``learning_rate * lr_final_fraction``
    at the last of ``train.epochs``). Set per epoch from the epoch number, so a resumed run
    uses the rate an uninterrupted one would."""

    lr_final_fraction: float = Field(0.1, ge=0, le=1)
    """With ``lr_schedule: cosine``, the last epoch's rate as a fraction of
    ``learning_rate``; in [0, 1]."""

    weight_decay: float = Field(0.0001, ge=0)
    """AdamW weight decay; >= 0."""

    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1; in [0, 1)."""

    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2; in [0, 1)."""

    adam_epsilon: float = Field(1e-08, gt=0)
    """AdamW epsilon; > 0."""

    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping by global norm; > 0."""


class EarlyStopConfig(Section):
    """When a run ends before ``train.epochs``: the gold reward fell from its best, or the policy
    drifted too far from the reference. Each rule is optional; set at least one."""

    gold_drop: float | None = Field(None, gt=0)
    """Stop at an eval epoch whose ``gold/mean`` is more than this below the best ``gold/mean``
    so far (in the gold reward's own units, e.g. 0.05 of ``toy_fidelity``); > 0, or null for no
    gold rule. Needs ``train.gold_reward``."""

    max_kl: float | None = Field(None, gt=0)
    """Stop after an epoch whose ``kl/mean`` (the per-step KL to the reference, as logged) is
    above this; > 0, or null for no KL rule. Needs a measured KL: ``train.algorithm: dpok``
    or a reference pool."""

    @model_validator(mode="after")
    def _some_rule(self) -> "EarlyStopConfig":
        if self.gold_drop is None and self.max_kl is None:
            raise ValueError("set gold_drop, max_kl or both (e.g. early_stop: {gold_drop: 0.05}), or early_stop: null for no early stop")
        return self


class TrainConfig(Section):
    """The RL loop: what is sampled each epoch and how it is learned from."""

    algorithm: Literal["ddpo_sf", "ddpo_is", "dpok"] = "ddpo_is"
    """Policy-gradient estimator: "ddpo_sf" (REINFORCE), "ddpo_is" (PPO-clipped
    importance ratio), "dpok" (ddpo_is plus beta * per-step KL to the frozen reference)."""

    mode: Literal["sync", "async"] = "sync"
    """"sync": sample epoch k with the weights of version k-1, then learn (exactly
    on-policy). "async": the rollouts of epoch k+1 run with the weights of version k-1
    while the learners train on epoch k, so every pool stays busy; the learner corrects
    the one-version lag with truncated importance weights (see the ``replay`` section)."""

    epochs: int = Field(10, ge=1)
    """Sample -> score -> learn -> sync rounds; >= 1."""

    prompts: str = Field("toy-train", min_length=1)
    """Training prompts: a built-in set (toy-train, toy-heldout, toy-all) or a text file
    with one prompt per line."""

    samples_per_epoch: int = Field(32, ge=1)
    """Trajectories sampled per epoch across the rollout pool; must be divisible by
    learner.num_workers * learner.micro_batch_size."""

    samples_per_prompt: int = Field(1, ge=1)
    """Images sampled per chosen prompt each epoch (a "group", as in GRPO / Flow-GRPO);
    must divide samples_per_epoch. With groups, advantages can be normalised within each
    prompt's group from the very first epoch."""

    inner_epochs: int = Field(1, ge=1)
    """Passes over each epoch's samples (more than 1 reuses samples off-policy, corrected
    by the importance ratio); >= 1."""

    timestep_fraction: float = Field(1.0, gt=0, le=1)
    """Fraction of each trajectory's recorded denoising steps trained on (DDPO); in (0, 1].
    The recorded steps are all ``sampling.num_steps``, or those of ``sampling.sde_window``."""

    timestep_selection: Literal["random", "earliest"] = "random"
    """Which steps ``timestep_fraction`` picks: "random" (a fresh random subset per
    trajectory, DDPO) or "earliest" (the first, highest-noise steps, where layout,
    shape and colour are decided; the later steps' log-prob gradients scale with 1/σ_t
    and, when they decide little, mostly add noise)."""

    clip_range: float = Field(0.0001, gt=0)
    """PPO clip range of the importance ratio (ddpo_is, dpok); DDPO uses 1e-4; > 0."""

    beta: float = Field(0.01, ge=0)
    """Weight of the per-step KL to the reference policy (dpok); >= 0."""

    reference: Literal["pool", "adapter_off"] = "pool"
    """Where the reference policy's Gaussian means (DPOK's KL term) come from: "pool" (the
    reference actors of ``pools.reference``, each holding a frozen copy of the base model)
    or "adapter_off" (the learners themselves: for each trained transition, one extra
    forward pass without gradient through the network they train, with its LoRA adapter
    switched off, which is the base model). adapter_off loads no second copy of a large
    UNet or transformer and starts no reference pool (``pools.reference`` is ignored); it
    needs ``model.finetune: lora`` and computes the means only for an algorithm with a KL
    term (dpok), so other algorithms log no ``kl/mean`` with it."""

    advantage: Literal["per_prompt", "group", "batch"] = "per_prompt"
    """Reward normalisation: "per_prompt" (running statistics per prompt across epochs,
    DDPO), "group" (within each prompt's group of samples_per_prompt images this epoch,
    GRPO-style) or "batch" (whole-epoch statistics)."""

    stat_buffer_size: int = Field(32, ge=1)
    """Rewards remembered per prompt for per-prompt normalisation; >= 1."""

    stat_min_count: int = Field(16, ge=1)
    """Below this many rewards for a prompt, batch statistics are used instead; >= 1."""

    adv_clip_max: float = Field(5.0, gt=0)
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]; > 0."""

    checkpoint_every: int = Field(1, ge=1)
    """Write a checkpoint every this many epochs (and after the last); >= 1."""

    keep_checkpoints: int = Field(2, ge=1)
    """Most recent checkpoints kept on disk; >= 1."""

    eval_every: int = Field(5, ge=0)
    """Save an image grid of the held-out prompts every this many epochs; 0 = never."""

    eval_prompts: str = "toy-heldout"
    """Prompts for the image grid (a built-in set or a file)."""

    gold_reward: RewardConfig | None = None
    """A second reward that watches for reward hacking, written like ``reward`` (a name, ``{name:
    weight}``, a list, ``package.module:function``): the reward pool scores the eval images with
    it every ``eval_every`` epochs, logged as ``gold/mean``, ``gold/std`` and
    ``gold/<component>/<key>``; it is never trained on (advantages come from ``reward`` alone).
    null = none. Needs ``eval_every`` > 0."""

    kl_target: float | None = Field(None, gt=0)
    """dpok only: adapt ``beta`` after every epoch so that ``kl/mean`` stays near this target,
    PPO's adaptive KL rule (Schulman et al. 2017, sec. 4): beta doubles after an epoch whose
    KL is above 1.5 x target and halves after one below target / 1.5. ``beta`` is the starting
    value, and beta stays within 100x of it either way; the one each update used is logged as
    ``kl/beta`` and kept in checkpoints. > 0, or null for a fixed beta."""

    early_stop: EarlyStopConfig | None = None
    """End the run early, keeping the best checkpoint as ``checkpoints/best``, when the gold
    reward falls or the KL grows too far (see its fields); null = run all ``epochs``. With a
    gold reward the best checkpoint is the eval epoch of highest ``gold/mean`` (so
    ``checkpoint_every`` must divide ``eval_every``), without one the newest checkpoint."""

    def trained_steps(self, num_steps: int) -> int:
        """Denoising steps trained per trajectory of ``num_steps`` (``timestep_fraction`` of them), at least one."""
        return max(1, int(round(num_steps * self.timestep_fraction)))

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.samples_per_epoch % self.samples_per_prompt:
            raise FieldError(
                "samples_per_prompt", f"must divide samples_per_epoch ({self.samples_per_epoch}), got {self.samples_per_prompt}"
            )
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise FieldError("advantage", "'group' needs samples_per_prompt >= 2 (a group of one has no spread)")
        if self.kl_target is not None and self.algorithm != "dpok":
            raise FieldError(
                "kl_target", f"adapts DPOK's beta, but algorithm is {self.algorithm!r}: set train.algorithm: dpok or kl_target: null"
            )
        if self.kl_target is not None and self.beta == 0:
            raise FieldError("beta", "must be > 0 with kl_target: the adaptive rule doubles and halves it, and 0 stays 0; e.g. beta: 0.01")
        if self.gold_reward is not None and not self.eval_every:
            raise FieldError("gold_reward", "is scored at the eval epochs, but eval_every is 0: set train.eval_every > 0, e.g. 5")
        if self.early_stop is not None and self.early_stop.gold_drop is not None and self.gold_reward is None:
            raise FieldError(
                "early_stop.gold_drop", "needs a gold reward to watch: set train.gold_reward (e.g. toy_fidelity), or gold_drop: null"
            )
        if self.early_stop is not None and self.gold_reward is not None and self.eval_every % self.checkpoint_every:
            raise FieldError(
                "checkpoint_every",
                f"must divide eval_every ({self.eval_every}) with early_stop and a gold reward, so that every epoch whose gold "
                f"reward is measured has a checkpoint to keep as the best; got {self.checkpoint_every}: set checkpoint_every "
                f"to a divisor of eval_every (e.g. 1 or {self.eval_every})",
            )
        if self.stat_min_count > self.stat_buffer_size:
            raise FieldError(
                "stat_min_count",
                f"must be <= stat_buffer_size ({self.stat_buffer_size}), got {self.stat_min_count}: "
                "a prompt's buffer never holds more than stat_buffer_size rewards",
            )
        return self


class ReplayConfig(Section):
    """The replay buffer between the reward pool and the learners, and the async pipeline.

    Every epoch's fresh samples enter the buffer; each update trains on
    ``train.samples_per_epoch`` of them, newest first. The defaults (reuse once, one
    version of lag) make sync mode train on exactly the fresh batch, as plain DDPO."""

    capacity: int = Field(1024, ge=1)
    """Most trajectories held; beyond it the oldest are evicted; >= train.samples_per_epoch."""

    max_staleness: int = Field(1, ge=0)
    """Oldest policy version a trained sample may come from, counted in versions behind the
    learner's; async mode needs >= 1 (its samples are one version behind)."""

    max_reuse: int = Field(1, ge=1)
    """Times one trajectory may be trained on before it leaves the buffer; >= 1."""

    is_truncation: float = Field(1.0, gt=0)
    """C in the importance weight min(p_old / p_behaviour, C) of a stale transition
    (IMPALA's rho-bar; 1 never up-weights a sample); > 0."""

    samples_per_update: int = Field(0, ge=0)
    """Trajectories each update trains on, newest first: 0 means train.samples_per_epoch
    (the fresh batch only); more reuses buffered samples of older versions (up to
    max_reuse times each) with importance weights. Same divisibility rules as
    train.samples_per_epoch."""

    max_in_flight: int = Field(8, ge=1)
    """Rollout requests (sampling batches) submitted and not yet finished, at most; bounds
    what the pipeline holds in the object store; >= 1."""


class Config(Section):
    """Everything one run needs. Components get their own section, never this root."""

    seed: int = Field(0, ge=0)
    """Base random seed (>= 0); every actor derives its own seed from it."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The diffusion model and which of its weights are trained."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """The sampler used for rollouts (DDIM, or the Flow-GRPO SDE for sd3)."""

    reward: RewardConfig = Field(default_factory=RewardConfig)
    """The reward functions and their weights."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    """The RL loop: algorithm, epochs, batch sizes, advantage estimation, checkpoints."""

    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    """Rollout, reward and reference actor pools."""

    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    """The DeepSpeed learner group in Ray Train."""

    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    """Replay buffer (staleness, reuse, importance-weight truncation) and async pipeline depth."""

    @property
    def reference_pool_used(self) -> bool:
        """Whether the driver starts (and reserves resources for) the reference pool: train.reference
        is "pool" and pools.reference has actors."""
        return self.train.reference == "pool" and self.pools.reference.num_actors > 0

    @property
    def kl_measured(self) -> bool:
        """Whether every epoch logs ``kl/mean``: DPOK's KL term, or the reference pool's diagnostic for other algorithms."""
        return self.train.algorithm == "dpok" or self.reference_pool_used

    @property
    def samples_per_update(self) -> int:
        """Trajectories per update once the buffer is full: replay.samples_per_update, or the epoch's."""
        return self.replay.samples_per_update or self.train.samples_per_epoch

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        """Rules across sections that no single section can check on its own."""
        train, learner, replay = self.train, self.learner, self.replay
        per_update = self.samples_per_update
        if per_update < train.samples_per_epoch:
            raise FieldError(
                "replay.samples_per_update", f"must be 0 or >= train.samples_per_epoch ({train.samples_per_epoch}), got {per_update}"
            )
        if replay.capacity < per_update:
            raise FieldError(
                "replay.capacity",
                f"must be >= the samples of one update ({per_update}, replay.samples_per_update or "
                f"train.samples_per_epoch), got {replay.capacity}",
            )
        if train.mode == "async" and replay.max_staleness < 1:
            raise FieldError(
                "replay.max_staleness", "must be >= 1 when train.mode is async: its samples come from the previous policy version, got 0"
            )
        for name in ("rollout", "reward"):
            if getattr(self.pools, name).num_actors < 1:
                raise FieldError(f"pools.{name}.num_actors", "must be >= 1: training cannot run without this pool")
        if train.reference == "adapter_off" and self.model.finetune != "lora":
            raise FieldError(
                "train.reference",
                "must be pool when model.finetune is full, got adapter_off: switching a LoRA adapter off gives the base "
                "model, but full fine-tuning trains the base weights themselves; use model.finetune: lora, or "
                "train.reference: pool",
            )
        if train.early_stop is not None and train.early_stop.max_kl is not None and not self.kl_measured:
            raise FieldError(
                "train.early_stop.max_kl",
                f"needs a measured KL, but algorithm {train.algorithm} without a reference pool logs no kl/mean: use "
                "train.algorithm: dpok, or pools.reference.num_actors >= 1 with train.reference: pool, or max_kl: null",
            )
        if train.algorithm == "dpok" and train.reference == "pool" and self.pools.reference.num_actors < 1:
            raise FieldError(
                "pools.reference.num_actors",
                "must be >= 1 for algorithm dpok, whose KL term needs the reference policy (or set train.reference: adapter_off "
                "to compute it in the learners, LoRA only)",
            )
        shard = learner.num_workers * learner.micro_batch_size
        if replay.samples_per_update % shard:
            raise FieldError(
                "replay.samples_per_update",
                f"must be divisible by learner.num_workers * learner.micro_batch_size = {shard}, got {replay.samples_per_update}",
            )
        if replay.samples_per_update and (replay.samples_per_update // shard) % learner.gradient_accumulation_steps:
            raise FieldError(
                "learner.gradient_accumulation_steps",
                f"must divide the {replay.samples_per_update // shard} micro-batches each worker gets per update "
                f"(replay.samples_per_update / (num_workers * micro_batch_size)), got {learner.gradient_accumulation_steps}",
            )
        if train.samples_per_epoch % shard:
            raise FieldError(
                "train.samples_per_epoch",
                f"must be divisible by learner.num_workers * learner.micro_batch_size = {learner.num_workers} * "
                f"{learner.micro_batch_size} = {shard}, got {train.samples_per_epoch}; "
                f"e.g. use {max(shard, train.samples_per_epoch // shard * shard)}",
            )
        micro_batches = train.samples_per_epoch // shard
        if micro_batches % learner.gradient_accumulation_steps:
            raise FieldError(
                "learner.gradient_accumulation_steps",
                f"must divide the {micro_batches} micro-batches each worker gets per epoch "
                f"(train.samples_per_epoch / (num_workers * micro_batch_size)), got {learner.gradient_accumulation_steps}",
            )
        recorded = self.sampling.recorded_steps
        trained = train.trained_steps(recorded)
        if learner.timesteps_per_pass and trained % learner.timesteps_per_pass:
            steps = "sampling.num_steps" if self.sampling.sde_window is None else "the sampling.sde_window length"
            raise FieldError(
                "learner.timesteps_per_pass",
                f"must divide the {trained} denoising steps trained per trajectory (round({steps} * "
                f"train.timestep_fraction) = round({recorded} * {train.timestep_fraction})), "
                f"got {learner.timesteps_per_pass}",
            )
        return self
