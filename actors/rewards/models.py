"""Model rewards of the literature: LAION aesthetic, CLIPScore, PickScore, HPSv2, ImageReward.

Each is a configured reward (see :mod:`actors.rewards.registry`): a class with an ``Options``
config class (``weights`` and friends, ``device``, ``dtype``, ``batch_size``). Nothing is
downloaded: a weights option is a local path, or a Hugging Face hub id that is already in
the local cache (found with ``local_files_only``, so ``HF_HUB_OFFLINE=1`` is fine).
Weights are read from safetensors only; published pickle checkpoints are converted once
with ``rayalign convert-reward`` (:mod:`actors.rewards.convert`). A missing or wrong path is
an error that names the expected files and how to get them.

Constructing a reward only validates its options; :meth:`ModelReward.check` resolves
paths and looks for the expected files (cheap, done before a run starts); the weights
load once, in :meth:`ModelReward.load` or at the first call. torch and transformers are
imported only then (from :mod:`actors.rewards.nets`).

| name | model | score |
|---|---|---|
| ``aesthetic`` | CLIP ViT-L/14 image embedding (L2-normalised) -> LAION MLP | predicted 1-10 rating |
| ``clip_score`` | CLIP | ``scale * max(cos(image, prompt), 0)``, Hessel et al. 2021 (scale 2.5) |
| ``pickscore`` | PickScore_v1 (CLIP ViT-H/14), Kirstain et al. 2023 | ``logit_scale.exp() * cos`` |
| ``hpsv2`` | HPSv2 (OpenCLIP ViT-H/14), Wu et al. 2023 | ``cos(image, prompt)`` |
| ``imagereward`` | ImageReward (BLIP + MLP), Xu et al. 2023 | standardised reward |
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.constants import HF_HUB_CACHE
from pydantic import Field, model_validator
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

from actors.diffusion.devices import resolve_device
from actors.rewards.nets import (
    DTYPES,
    clip_image_embeddings,
    clip_image_spec,
    clip_text_embeddings,
    load_imagereward,
    load_linear_head,
    preprocess_images,
    read_image_spec,
)
from actors.rewards.registry import Info, register_reward
from actors.storage import Location, fetch, is_uri, node_name
from orchestrator.config import Device, FieldError, Section

logger = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------------------
# Where the weights come from (quoted by every error about a missing file)
# --------------------------------------------------------------------------------------

HOW_TO_GET = {
    "aesthetic": (
        "download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor "
        "and convert it once: rayalign convert-reward aesthetic --input sac+logos+ava1-l14-linearMSE.pth --output DIR"
    ),
    "clip": (
        "download a CLIP model in Hugging Face format on a machine with internet access, e.g. "
        "`hf download openai/clip-vit-large-patch14`, and copy the directory (or the Hugging Face cache) here"
    ),
    "pickscore": (
        "download yuvalkirstain/PickScore_v1 (model) and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer and "
        "preprocessor, option `processor`) with `hf download` on a machine with internet access; if the model "
        "has only pytorch_model.bin, convert it once: rayalign convert-reward clip --input DIR --output DIR2"
    ),
    "hpsv2": (
        "download HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from the Hugging Face repo xswu/HPSv2 and a CLIP "
        "tokenizer (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K), then convert once: "
        "rayalign convert-reward hpsv2 --input HPS_v2.1_compressed.pt --tokenizer TOKENIZER_DIR --output DIR"
    ),
    "imagereward": (
        "download ImageReward.pt from the Hugging Face repo THUDM/ImageReward and the bert-base-uncased tokenizer, "
        "then convert once: rayalign convert-reward imagereward --input ImageReward.pt --tokenizer BERT_DIR --output DIR"
    ),
}


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~"))


def resolve_path(value: str, *, reward: str, option: str, expected: str, how: str) -> Path:
    """A local file or directory for ``options.<option>``: the path itself, a URI's copy in this
    node's cache (downloaded once per node), or a hub id's snapshot in the local Hugging Face
    cache. ``ValueError`` naming what is expected and how to get it."""
    if is_uri(value):
        if not Location(value).exists():
            raise ValueError(f"reward {reward!r}: options.{option}={value!r} does not exist; expected {expected}. To get it: {how}")
        return fetch(value, "rewards")
    path = Path(value).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(value):
        try:
            return Path(snapshot_download(value, local_files_only=True))
        except Exception as error:  # the hub client raises several types for "not cached"
            raise ValueError(
                f"reward {reward!r}: options.{option}={value!r} is not a local path and is not in the local "
                f"Hugging Face cache ({HF_HUB_CACHE}; {type(error).__name__}); expected {expected}. "
                f"Nothing is downloaded at run time: {how}"
            ) from None
    raise ValueError(
        f"reward {reward!r}: options.{option}={value!r} does not exist; expected {expected}. To get it: {how} (looked on {node_name()})"
    )


def require_weights(directory: Path, *, reward: str, option: str, convert: str) -> Path:
    """``directory``'s safetensors weights file; a pickle-only directory is an error with the conversion command."""
    if not directory.is_dir():
        raise ValueError(
            f"reward {reward!r}: options.{option}={str(directory)!r} is a file; "
            "expected a model directory with config.json and model.safetensors"
        )
    for name in SAFETENSORS_WEIGHTS:
        if (directory / name).is_file():
            if not (directory / "config.json").is_file():
                raise ValueError(f"reward {reward!r}: {directory} has {name} but no config.json; copy the model's config.json next to it")
            return directory / name
    pickles = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    if pickles:
        raise ValueError(
            f"reward {reward!r}: {directory} has only pickle weights ({pickles[0]}); rayalign loads safetensors only, "
            f"because unpickling a file can run arbitrary code. Convert once: {convert}"
        )
    raise ValueError(f"reward {reward!r}: {directory} has no model.safetensors (found: {found}); expected a Hugging Face model directory")


def require_tokenizer(directory: Path, *, reward: str, option: str) -> None:
    """Fail unless ``directory`` holds tokenizer files."""
    names = ("tokenizer.json", "vocab.json", "vocab.txt")
    if not directory.is_dir() or not any((directory / name).is_file() for name in names):
        raise ValueError(
            f"reward {reward!r}: no tokenizer in {str(directory)!r} (looked for {', '.join(names)}); "
            f"point options.{option} at the model's Hugging Face directory that has them"
        )


@contextlib.contextmanager
def _quiet_transformers():
    """No loading reports or progress bars from transformers: reward actors log one line per model instead."""

    level, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)
        if bars:
            transformers_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


class ModelOptions(Section):
    """Settings every model reward has."""

    device: Device = "auto"
    """Where the reward model runs: "auto" (cuda if available, else cpu), "cpu", "cuda"
    or "cuda:N". Give the reward pool GPUs (pools.reward.num_gpus) to use one."""

    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Dtype of the model weights; scores are computed in float32 at the end. Use
    float16/bfloat16 on GPUs only."""

    batch_size: int = Field(32, ge=1)
    """Images per forward pass; >= 1. Larger batches are split, so this bounds memory."""


def _require_weights(options: ModelOptions, reward: str) -> ModelOptions:
    if options.weights is None:
        raise FieldError("weights", f"is required: the path to the {reward} weights. To get them: {HOW_TO_GET[reward]}")
    return options


class AestheticOptions(ModelOptions):
    """Options of the ``aesthetic`` reward."""

    weights: str | None = None
    """The LAION aesthetic MLP head in safetensors: a .safetensors file or a directory with
    model.safetensors (what ``rayalign convert-reward aesthetic`` writes). Required."""

    clip: str = "openai/clip-vit-large-patch14"
    """The CLIP ViT-L/14 the head was trained on: a Hugging Face model directory, or this
    hub id in the local cache. Only its image tower is loaded."""

    @model_validator(mode="after")
    def _weights_given(self) -> "AestheticOptions":
        return _require_weights(self, "aesthetic")


class ClipOptions(ModelOptions):
    """Options of the rewards that compare CLIP image and prompt embeddings."""

    weights: str | None = None
    """The CLIP model: a Hugging Face model directory (config.json, model.safetensors) or a
    hub id in the local cache."""

    processor: str | None = None
    """Where the tokenizer and preprocessor_config.json are, if not next to the weights:
    a directory or a cached hub id; null = the weights directory."""


class ClipScoreOptions(ClipOptions):
    """Options of the ``clip_score`` reward."""

    weights: str | None = "openai/clip-vit-large-patch14"
    """The CLIP model: a Hugging Face model directory or a hub id in the local cache."""

    scale: float = Field(2.5, gt=0)
    """w in CLIPScore = w * max(cos, 0); Hessel et al. (2021) use 2.5; > 0."""


class PickScoreOptions(ClipOptions):
    """Options of the ``pickscore`` reward."""

    weights: str | None = "yuvalkirstain/PickScore_v1"
    """PickScore_v1 (a fine-tuned CLIP ViT-H/14): a Hugging Face model directory or the hub id in the local cache."""

    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """Where the tokenizer and preprocessor_config.json come from: PickScore's reference code loads them
    from the CLIP ViT-H/14 it was fine-tuned from; null = the weights directory."""


class HPSv2Options(ClipOptions):
    """Options of the ``hpsv2`` reward."""

    weights: str | None = None
    """The HPSv2 checkpoint converted to a Hugging Face CLIP directory by ``rayalign
    convert-reward hpsv2`` (config, safetensors weights, tokenizer, preprocessor). Required."""

    @model_validator(mode="after")
    def _weights_given(self) -> "HPSv2Options":
        return _require_weights(self, "hpsv2")


class ImageRewardOptions(ModelOptions):
    """Options of the ``imagereward`` reward."""

    weights: str | None = None
    """The directory written by ``rayalign convert-reward imagereward`` (config.json,
    model.safetensors, the BERT tokenizer, preprocessor_config.json). Required."""

    @model_validator(mode="after")
    def _weights_given(self) -> "ImageRewardOptions":
        return _require_weights(self, "imagereward")


# --------------------------------------------------------------------------------------
# The shared machinery: lazy loading, batching, device
# --------------------------------------------------------------------------------------


class ModelReward:
    """A reward backed by a torch model. Subclasses set ``name`` and ``Options`` and
    implement ``_files`` (resolve and check paths), ``_load`` and ``_score``."""

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, *, options: Any):
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} needs {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self._loaded = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    def check(self) -> None:
        """Resolve the weights paths and check the expected files exist; loads nothing."""
        self._files()

    def load(self) -> None:
        """Load the weights onto the configured device, once."""
        if self._loaded:
            return

        files = self._files()
        device = resolve_device(self.options.device)
        started = time.perf_counter()
        with _quiet_transformers():
            self._load(files, device=device, dtype=DTYPES[self.options.dtype])
        self.device = device
        self._loaded = True
        logger.info(
            "reward %s loaded from %s on %s (%s) in %.1fs",
            self.name,
            ", ".join(map(str, files.values())),
            device,
            self.options.dtype,
            time.perf_counter() - started,
        )

    def __call__(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, Info]:

        self.load()
        size = self.options.batch_size
        with torch.inference_mode():
            parts = [
                self._score(images[start : start + size], list(prompts[start : start + size])) for start in range(0, len(images), size)
            ]
        return torch.cat(parts).float().cpu().numpy(), {}

    def _files(self) -> dict[str, Path]:
        raise NotImplementedError

    def _load(self, files: dict[str, Path], *, device, dtype) -> None:
        raise NotImplementedError

    def _score(self, images: np.ndarray, prompts: list[str]):
        """Scores ``(chunk,)`` as a torch tensor for one chunk of at most ``batch_size`` images."""
        raise NotImplementedError


@register_reward("aesthetic")
class AestheticReward(ModelReward):
    """LAION improved aesthetic predictor: MLP on the normalised CLIP ViT-L/14 image embedding (prompt unused).

    As in DDPO's aesthetic task (Black et al. 2023), the predicted rating on LAION's 1-10 scale.
    """

    name = "aesthetic"
    Options = AestheticOptions

    def _files(self) -> dict[str, Path]:
        head = resolve_path(
            self.options.weights,
            reward=self.name,
            option="weights",
            expected="the aesthetic MLP head as safetensors",
            how=HOW_TO_GET["aesthetic"],
        )
        if head.is_dir():
            head = head / "model.safetensors"
        if not head.is_file() or head.suffix != ".safetensors":
            raise ValueError(
                f"reward 'aesthetic': options.weights must be a .safetensors file or a directory with model.safetensors, "
                f"got {str(head)!r}; a .pth checkpoint is converted once with: "
                f"rayalign convert-reward aesthetic --input FILE.pth --output DIR"
            )
        clip = resolve_path(
            self.options.clip, reward=self.name, option="clip", expected="a CLIP ViT-L/14 model directory", how=HOW_TO_GET["clip"]
        )
        require_weights(clip, reward=self.name, option="clip", convert="rayalign convert-reward clip --input DIR --output DIR2")
        return {"head": head, "clip": clip}

    def _load(self, files, *, device, dtype) -> None:

        # The checkpoint's text tower is skipped on purpose (the quiet load hides the report about it).
        self.clip = CLIPVisionModelWithProjection.from_pretrained(str(files["clip"]), use_safetensors=True, dtype=dtype).to(device).eval()
        self.head = load_linear_head(files["head"]).to(device).eval()
        width = self.clip.config.projection_dim
        first = next(layer for layer in self.head.layers if isinstance(layer, torch.nn.Linear))
        if first.in_features != width:
            raise ValueError(
                f"reward 'aesthetic': the head in {files['head']} takes {first.in_features}-d embeddings but the CLIP in "
                f"{files['clip']} makes {width}-d ones; use the CLIP the head was trained on (ViT-L/14 for the LAION head)"
            )
        self.spec = read_image_spec(files["clip"], clip_image_spec())

    def _score(self, images, prompts):

        pixels = preprocess_images(images, self.spec).to(self.device, self.clip.dtype)
        embeddings = clip_image_embeddings(self.clip, pixels)  # (chunk, 768), unit norm
        return self.head(embeddings).squeeze(-1)


class ClipSimilarityReward(ModelReward):
    """Rewards computed from the cosine of CLIP image and prompt embeddings."""

    def _files(self) -> dict[str, Path]:
        how = HOW_TO_GET.get(self.name, HOW_TO_GET["clip"])
        weights = resolve_path(
            self.options.weights, reward=self.name, option="weights", expected="a Hugging Face CLIP model directory", how=how
        )
        require_weights(weights, reward=self.name, option="weights", convert=f"rayalign convert-reward clip --input {weights} --output DIR")
        processor = weights
        if self.options.processor is not None:
            processor = resolve_path(
                self.options.processor,
                reward=self.name,
                option="processor",
                expected="a directory with the tokenizer and preprocessor_config.json",
                how=how,
            )
        require_tokenizer(processor, reward=self.name, option="processor" if self.options.processor else "weights")
        return {"weights": weights, "processor": processor}

    def _load(self, files, *, device, dtype) -> None:

        self.model = CLIPModel.from_pretrained(str(files["weights"]), use_safetensors=True, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(files["processor"]))
        self.spec = read_image_spec(files["processor"], clip_image_spec(self.model.config.vision_config.image_size))

    def _score(self, images, prompts):

        pixels = preprocess_images(images, self.spec).to(self.device, self.model.dtype)
        image = clip_image_embeddings(self.model, pixels)  # (chunk, projection_dim), unit norm
        text = clip_text_embeddings(self.model, self.tokenizer, prompts, self.device)
        return self.from_cosine((image * text).sum(dim=-1))

    def from_cosine(self, cosine):
        raise NotImplementedError


@register_reward("clip_score")
class ClipScoreReward(ClipSimilarityReward):
    """CLIPScore (Hessel et al. 2021): ``scale * max(cos(image, prompt), 0)``."""

    name = "clip_score"
    Options = ClipScoreOptions

    def from_cosine(self, cosine):
        return self.options.scale * cosine.clamp(min=0)


@register_reward("pickscore")
class PickScoreReward(ClipSimilarityReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, prompt)``, as in its reference code."""

    name = "pickscore"
    Options = PickScoreOptions

    def from_cosine(self, cosine):
        return self.model.logit_scale.exp().float() * cosine


@register_reward("hpsv2")
class HPSv2Reward(ClipSimilarityReward):
    """HPSv2 (Wu et al. 2023): the cosine of the fine-tuned OpenCLIP ViT-H/14 image and prompt features.

    The HPSv2 benchmark reports this number times 100.
    """

    name = "hpsv2"
    Options = HPSv2Options

    def from_cosine(self, cosine):
        return cosine


@register_reward("imagereward")
class ImageRewardReward(ModelReward):
    """ImageReward (Xu et al. 2023): BLIP image-text features -> MLP, standardised (see actors/rewards/nets.py)."""

    name = "imagereward"
    Options = ImageRewardOptions

    def _files(self) -> dict[str, Path]:
        weights = resolve_path(
            self.options.weights,
            reward=self.name,
            option="weights",
            expected="a directory written by rayalign convert-reward imagereward",
            how=HOW_TO_GET["imagereward"],
        )
        if not weights.is_dir() or not (weights / "model.safetensors").is_file() or not (weights / "config.json").is_file():
            raise ValueError(
                f"reward 'imagereward': {str(weights)!r} is not a converted ImageReward directory (needs config.json and "
                f"model.safetensors); the published ImageReward.pt is a pickle: {HOW_TO_GET['imagereward']}"
            )
        require_tokenizer(weights, reward=self.name, option="weights")
        return {"weights": weights}

    def _load(self, files, *, device, dtype) -> None:

        self.model = load_imagereward(files["weights"]).to(device=device, dtype=dtype)
        self.model.head.float()  # the head and the standardisation stay in float32
        self.tokenizer = AutoTokenizer.from_pretrained(str(files["weights"]))
        self.spec = read_image_spec(files["weights"], clip_image_spec())

    def _score(self, images, prompts):

        pixels = preprocess_images(images, self.spec).to(self.device, self.model.vision_model.dtype)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.model.max_length, return_tensors="pt").to(
            self.device
        )
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
