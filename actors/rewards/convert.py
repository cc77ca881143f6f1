"""One-time conversion of published reward checkpoints to safetensors directories.

rayalign reads weights from safetensors only (ARCHITECTURE decision 5): unpickling a
``.pt``/``.pth``/``.bin`` file can run arbitrary code, and reward checkpoints are files
users download from many places. Several published reward models exist only as pickles,
so this module converts them once, explicitly (``rayalign convert-reward``), with
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which accepts
tensors and plain containers and refuses everything else.

| kind | input | output (what the reward's ``weights`` option points at) |
|---|---|---|
| ``aesthetic`` | ``sac+logos+ava1-l14-linearMSE.pth`` (LAION MLP state dict) | ``model.safetensors`` |
| ``clip`` | a Hugging Face CLIP directory with ``pytorch_model.bin`` (e.g. PickScore_v1) | the same directory with ``model.safetensors`` |
| ``hpsv2`` | ``HPS_v2*.pt`` (OpenCLIP ViT-H/14 state dict) + a CLIP tokenizer | a Hugging Face ``CLIPModel`` directory |
| ``imagereward`` | ``ImageReward.pt`` (BLIP + MLP state dict) + the bert-base-uncased tokenizer | config, safetensors, tokenizer |

Every output directory also gets ``conversion.json`` (kind, source file name and its
SHA-256) so a converted model can be traced back to what it came from. The output is
written to a temporary sibling directory and renamed at the end, so an interrupted
conversion never leaves a half-written model behind; an existing non-empty output is
never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from actors.rewards.models import resolve_path
from actors.rewards.nets import (
    IMAGEREWARD_CONFIG,
    IMAGEREWARD_MODEL_TYPE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageRewardModel,
    linear_head_shapes,
)

logger = logging.getLogger(__name__)

IMAGEREWARD_SCORE_MEAN = 0.16717362830052426
"""Mean of the raw ImageReward head output, subtracted by the published model (ImageReward.py)."""
IMAGEREWARD_SCORE_STD = 1.0333394966054072
"""Standard deviation the published ImageReward model divides by."""
IMAGEREWARD_MAX_LENGTH = 35
"""Prompt length (BERT tokens) ImageReward pads and truncates to."""

_OPENCLIP_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
"""Attention heads of OpenCLIP vision towers by width (ViT-B, L, H, bigG); not recoverable from shapes."""
_HEAD_WIDTH = 64
"""Per-head width of BERT, BLIP's ViT and OpenCLIP text towers: heads = width / 64."""

KINDS = ("aesthetic", "clip", "hpsv2", "imagereward")


# --------------------------------------------------------------------------------------
# Reading a pickle safely, writing a directory atomically
# --------------------------------------------------------------------------------------


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save``'d state dict, read with the restricted unpickler.

    Unwraps a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a ``module.``
    prefix (from DataParallel), as the published checkpoints have.
    """
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist or is not a file")
    logger.info("reading %s (%.2f GB)", path, path.stat().st_size / 1e9)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects other than tensors, which the restricted unpickler refuses "
            f"({str(error).splitlines()[0]}); rayalign does not run arbitrary unpickling. Re-save just the weights "
            f"where the checkpoint was made: torch.save(model.state_dict(), 'weights.pt')"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is not a state dict of tensors (got {type(state).__name__}); expected what torch.save(model.state_dict(), ...) writes"
        )
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output {str(output)!r} already exists and is not an empty directory; choose a new path (nothing is overwritten)")


def _save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    logger.info(
        "writing %d tensors (%.2f GB) to %s", len(state), sum(t.numel() * t.element_size() for t in state.values()) / 1e9, path.name
    )
    # Tied weights share storage after unpickling, which safetensors refuses; copies do not.
    save_file({key: value.detach().contiguous().clone() for key, value in state.items()}, str(path), metadata={"format": "pt"})


def _load_tokenizer(value: str | None, kind: str, what: str):

    if value is None:
        raise ValueError(f"convert-reward {kind} needs --tokenizer: {what}")
    directory = resolve_path(value, reward=kind, option="tokenizer", expected=what, how=f"pass --tokenizer DIR with {what}")
    return AutoTokenizer.from_pretrained(str(directory))


# --------------------------------------------------------------------------------------
# Converters: each writes into an empty directory
# --------------------------------------------------------------------------------------


def _convert_aesthetic(source: Path, out: Path, **_) -> None:
    state = load_pickle_state(source)
    strays = sorted(key for key in state if not key.startswith("layers."))
    if strays:
        raise ValueError(
            f"{source} is not an aesthetic MLP state dict: unexpected keys {strays[:5]}; expected layers.N.weight / layers.N.bias"
        )
    shapes = linear_head_shapes(state, source=str(source))
    _save_tensors(state, out / "model.safetensors")
    sizes = [shapes[i][1] for i in sorted(shapes)] + [1]
    logger.info("aesthetic head: linear layers %s", " -> ".join(map(str, sizes)))


def _convert_clip(source: Path, out: Path, **_) -> None:
    if not source.is_dir() or not (source / "config.json").is_file():
        raise ValueError(
            f"convert-reward clip needs a Hugging Face model directory with config.json and pytorch_model.bin, got {str(source)!r}"
        )
    index = source / "pytorch_model.bin.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["pytorch_model.bin"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_pickle_state(source / shard))
    for item in source.iterdir():
        # Keep config, tokenizer and preprocessor files; the pickles are what is being replaced.
        if (
            item.is_file()
            and not item.name.startswith("pytorch_model.bin")
            and item.suffix not in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
        ):
            shutil.copy2(item, out / item.name)
    _save_tensors(state, out / "model.safetensors")


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"expected transformer blocks {prefix}0., {prefix}1., ... in the checkpoint, found indices {sorted(indices)[:8]}")
    return len(indices)


def _grid_side(positions: int, what: str) -> int:
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"{what} has {positions} positions, not 1 + a square number of patches")
    return side


def _heads(width: int, given: int | None, table: Mapping[int, int] | None, flag: str) -> int:
    heads = given or (table.get(width) if table is not None else width // _HEAD_WIDTH)
    if not heads or width % heads:
        raise ValueError(
            f"cannot tell the number of attention heads of a {width}-wide tower from the weights; pass {flag} N (N divides {width})"
        )
    return heads


def openclip_to_hf(
    state: Mapping[str, torch.Tensor], *, vision_heads: int | None = None, text_heads: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """An OpenCLIP (ViT) state dict as a transformers ``CLIPModel`` config dict and state dict.

    The layouts differ in names and in three tensors: the fused attention input
    projection ``in_proj_weight`` (3·width, width) is split into q, k, v (in that order,
    as ``nn.MultiheadAttention`` packs them), and the image/text projections are stored
    as (width, embed) matrices applied on the right, so they are transposed into
    ``nn.Linear`` weights.
    """
    state = dict(state)
    unsupported = sorted(k for k in state if ".ls_" in k or k.startswith(("text.", "visual.attn_pool", "visual.trunk")))
    if unsupported:
        raise ValueError(
            f"unsupported OpenCLIP layout (layer scale, custom text tower or timm trunk): {unsupported[:4]}; "
            "only plain ViT CLIP models such as HPSv2's ViT-H-14 are converted"
        )
    hf: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"OpenCLIP checkpoint lacks {key!r}; is it an OpenCLIP ViT model (e.g. HPSv2)?")
        used.add(key)
        return state[key]

    def blocks(src: str, dst: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src}{i}.", f"{dst}{i}."
            q, k, v = take(s + "attn.in_proj_weight").chunk(3, dim=0)
            qb, kb, vb = take(s + "attn.in_proj_bias").chunk(3, dim=0)
            hf.update(
                {
                    d + "self_attn.q_proj.weight": q,
                    d + "self_attn.k_proj.weight": k,
                    d + "self_attn.v_proj.weight": v,
                    d + "self_attn.q_proj.bias": qb,
                    d + "self_attn.k_proj.bias": kb,
                    d + "self_attn.v_proj.bias": vb,
                }
            )
            for ours, theirs in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                hf[f"{d}{ours}.weight"] = take(f"{s}{theirs}.weight")
                hf[f"{d}{ours}.bias"] = take(f"{s}{theirs}.bias")

    conv = take("visual.conv1.weight")  # (width, 3, patch, patch)
    vision_width, patch = conv.shape[0], conv.shape[-1]
    positions = take("visual.positional_embedding").shape[0]
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    image_proj = take("visual.proj")  # (width, embed)
    token_embedding = take("token_embedding.weight")  # (vocab, text width)
    text_width = token_embedding.shape[1]
    text_layers = _count_blocks(state, "transformer.resblocks.")
    text_proj = state.get("text_projection.weight")
    text_proj = take("text_projection.weight") if text_proj is not None else take("text_projection").T  # (embed, text width)

    hf["vision_model.embeddings.patch_embedding.weight"] = conv
    hf["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    hf["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        hf[f"vision_model.{ours}.weight"] = take(f"visual.{theirs}.weight")
        hf[f"vision_model.{ours}.bias"] = take(f"visual.{theirs}.bias")
    blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers)
    hf["visual_projection.weight"] = image_proj.T
    hf["text_model.embeddings.token_embedding.weight"] = token_embedding
    hf["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    hf["text_model.final_layer_norm.weight"] = take("ln_final.weight")
    hf["text_model.final_layer_norm.bias"] = take("ln_final.bias")
    blocks("transformer.resblocks.", "text_model.encoder.layers.", text_layers)
    hf["text_projection.weight"] = text_proj
    hf["logit_scale"] = take("logit_scale")
    leftover = sorted(set(state) - used - {"attn_mask", "visual.attn_mask"})
    if leftover:
        raise ValueError(
            f"OpenCLIP checkpoint has tensors this converter does not map: {leftover[:6]}; "
            "it supports plain ViT CLIP models (e.g. HPSv2's ViT-H-14)"
        )

    config = {
        "projection_dim": int(image_proj.shape[1]),
        "vision_config": {
            "hidden_size": int(vision_width),
            "intermediate_size": int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": vision_layers,
            "num_attention_heads": _heads(vision_width, vision_heads, _OPENCLIP_VISION_HEADS, "--vision-heads"),
            "image_size": int(_grid_side(positions, "visual.positional_embedding") * patch),
            "patch_size": int(patch),
            "projection_dim": int(image_proj.shape[1]),
            "hidden_act": "gelu",  # OpenCLIP's ViT-H-14 (HPSv2) uses exact GELU, not OpenAI's QuickGELU
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "vocab_size": int(token_embedding.shape[0]),
            "hidden_size": int(text_width),
            "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": text_layers,
            "num_attention_heads": _heads(text_width, text_heads, None, "--text-heads"),
            "max_position_embeddings": int(hf["text_model.embeddings.position_embedding.weight"].shape[0]),
            "projection_dim": int(image_proj.shape[1]),
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
    }
    return config, hf


def _clip_preprocessor(image_size: int) -> dict:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # bicubic
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }


def _check_vocab(tokenizer, rows: int, source: Path, what: str) -> None:
    if len(tokenizer) != rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but {source}'s word embeddings have {rows} rows; pass --tokenizer with {what}"
        )


def _convert_hpsv2(
    source: Path, out: Path, *, tokenizer: str | None = None, vision_heads: int | None = None, text_heads: int | None = None
) -> None:

    what = "a CLIP tokenizer (e.g. the directory of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
    tok = _load_tokenizer(tokenizer, "hpsv2", what)
    config_dict, state = openclip_to_hf(load_pickle_state(source), vision_heads=vision_heads, text_heads=text_heads)
    _check_vocab(tok, config_dict["text_config"]["vocab_size"], source, what)
    config_dict["text_config"].update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(**config_dict)
    with torch.device("meta"):
        skeleton = CLIPModel(config)
    # Strict loading into a weightless skeleton checks every name and shape without a full copy in memory.
    skeleton.load_state_dict(state, strict=True, assign=True)
    config.save_pretrained(out)
    _save_tensors(state, out / "model.safetensors")
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor(config.vision_config.image_size), indent=2) + "\n")


def blip_to_imagereward(
    state: Mapping[str, torch.Tensor], *, vision_heads: int | None = None, text_heads: int | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """ImageReward's state dict (BLIP ``blip.*`` + ``mlp.*``) as our config and state dict.

    BLIP's ViT uses timm's names (``blocks.N.attn.qkv``, ``norm1``, ``cls_token``, ...),
    which become transformers' ``BlipVisionModel`` names; its text encoder is already
    BERT-named as transformers' ``BlipTextModel`` (BLIP's med.py is where that port came
    from), so only the prefix changes. The contrastive projections (``vision_proj``,
    ``text_proj``) are not used for scoring and are dropped.
    """
    vision, text, head = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
    out: dict[str, torch.Tensor] = {}
    names = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    block_names = {
        "norm1": "layer_norm1",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    block = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")
    ignored = []
    for key, value in state.items():
        if key.startswith(vision):
            name = key[len(vision) :]
            if name in names:
                out["vision_model." + names[name]] = value
            elif (m := block.match(name)) and m.group(2) in block_names:
                out[f"vision_model.encoder.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"] = value
            else:
                raise ValueError(f"ImageReward checkpoint has a vision tensor this converter does not map: {key!r}")
        elif key.startswith(text):
            if not key.endswith("position_ids"):  # a constant buffer older transformers saved
                out["text_encoder." + key[len(text) :]] = value
        elif key.startswith(head):
            out["head." + key[len(head) :]] = value
        else:
            ignored.append(key)
    if ignored:
        logger.info("not used for scoring, dropped: %s", ", ".join(sorted(ignored)))
    for required in ("vision_model.embeddings.patch_embedding.weight", "text_encoder.embeddings.word_embeddings.weight"):
        if required not in out:
            raise ValueError(
                f"not an ImageReward checkpoint: no {required.split('.', 1)[0]} weights (expected keys under {vision!r} and {text!r})"
            )
    linear_head_shapes({k[len("head.") :]: v for k, v in out.items() if k.startswith("head.")}, source="ImageReward mlp")

    patch = out["vision_model.embeddings.patch_embedding.weight"]  # (width, 3, patch, patch)
    vision_width = patch.shape[0]
    positions = out["vision_model.embeddings.position_embedding"].shape[1]
    words = out["text_encoder.embeddings.word_embeddings.weight"]  # (vocab, hidden)
    config = {
        "model_type": IMAGEREWARD_MODEL_TYPE,
        "vision_config": {
            "hidden_size": int(vision_width),
            "intermediate_size": int(out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": _count_blocks(out, "vision_model.encoder.layers."),
            "num_attention_heads": _heads(vision_width, vision_heads, None, "--vision-heads"),
            "image_size": int(_grid_side(positions, "pos_embed") * patch.shape[-1]),
            "patch_size": int(patch.shape[-1]),
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,  # BLIP's ViT builds its LayerNorms with eps 1e-6
        },
        "text_config": {
            "vocab_size": int(words.shape[0]),
            "hidden_size": int(words.shape[1]),
            "intermediate_size": int(out["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "num_hidden_layers": _count_blocks(out, "text_encoder.encoder.layer."),
            "num_attention_heads": _heads(int(words.shape[1]), text_heads, None, "--text-heads"),
            "max_position_embeddings": int(out["text_encoder.embeddings.position_embeddings.weight"].shape[0]),
            "encoder_hidden_size": int(out["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape[1]),
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "is_decoder": True,  # makes transformers build the cross-attention layers; scoring runs it as an encoder
        },
        "score_mean": IMAGEREWARD_SCORE_MEAN,
        "score_std": IMAGEREWARD_SCORE_STD,
        "max_length": IMAGEREWARD_MAX_LENGTH,
    }
    return config, out


def _convert_imagereward(
    source: Path, out: Path, *, tokenizer: str | None = None, vision_heads: int | None = None, text_heads: int | None = None
) -> None:

    what = "the bert-base-uncased tokenizer (a directory with vocab.txt)"
    tok = _load_tokenizer(tokenizer, "imagereward", what)
    # BLIP's tokenizer: bert-base-uncased plus a [DEC] start token and an [ENC] token (BLIP's init_tokenizer).
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    config, state = blip_to_imagereward(load_pickle_state(source), vision_heads=vision_heads, text_heads=text_heads)
    _check_vocab(tok, config["text_config"]["vocab_size"], source, what)
    config["text_config"]["pad_token_id"] = tok.pad_token_id
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    skeleton = ImageRewardModel(config, linear_head_shapes(head, source=str(source)))
    skeleton.load_state_dict(state, strict=True)
    (out / IMAGEREWARD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _save_tensors(state, out / "model.safetensors")
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_clip_preprocessor(config["vision_config"]["image_size"]), indent=2) + "\n")


_CONVERTERS: dict[str, Callable[..., None]] = {
    "aesthetic": _convert_aesthetic,
    "clip": _convert_clip,
    "hpsv2": _convert_hpsv2,
    "imagereward": _convert_imagereward,
}


def convert_reward(
    kind: str,
    *,
    source: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer: str | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> Path:
    """Convert a published checkpoint of ``kind`` (see the module docstring) into ``output``."""
    if kind not in _CONVERTERS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; convert-reward knows {', '.join(KINDS)}")
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not source.exists():
        raise ValueError(f"--input {str(source)!r} does not exist")
    _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _CONVERTERS[kind](source, staging, tokenizer=tokenizer, vision_heads=vision_heads, text_heads=text_heads)
        provenance = {"kind": kind, "source": source.name, "source_sha256": _sha256(source) if source.is_file() else None}
        (staging / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")
        if output.exists():
            output.rmdir()  # checked empty above
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s checkpoint %s -> %s", kind, source, output)
    return output
