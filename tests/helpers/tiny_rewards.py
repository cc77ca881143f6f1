"""Tiny random reward checkpoints in the layouts users download, written to disk.

Each builder writes what a user would have before running rayalign (a Hugging Face CLIP
directory, a LAION-style ``.pth`` head, an HPSv2-style OpenCLIP ``.pt``, an
``ImageReward.pt`` with a BERT tokenizer), so the tests go through the same conversion
and loading code as real weights. Seconds to build, a few hundred kB on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer

from actors.rewards.convert import convert_reward
from actors.rewards.nets import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from actors.toy.model import TOKENIZER_MAX_LENGTH, _bpe_vocab, grammar_words
from tests.helpers.reference_models import (
    BlipStyleImageReward,
    OpenClipStyleCLIP,
    perturb_,
)

IMAGE_SIZE = 32
"""Input side of every tiny image tower (toy images are 32 x 32)."""


def save_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """The toy grammar's BPE tokenizer with start/end tokens given the two highest ids.

    In the real CLIP vocabulary the end-of-text token has the highest id, which is how
    OpenCLIP finds it (argmax over ids); the tiny vocabulary keeps that property.
    """
    vocab, merges = _bpe_vocab(grammar_words())
    special = ["<|startoftext|>", "<|endoftext|>"]
    ordered = [token for token in vocab if token not in special] + special
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(ordered)}, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_preprocessor(directory: Path, size: int = IMAGE_SIZE) -> None:
    config = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config))


def build_tiny_clip(directory: Path, *, seed: int) -> Path:
    """A random CLIP in Hugging Face format (config.json, model.safetensors, tokenizer, preprocessor)."""
    directory.mkdir(parents=True)
    tokenizer = save_clip_tokenizer(directory)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
            projection_dim=16,
        ),
        projection_dim=16,
    )
    # Noise large enough that image-prompt cosines take both signs (CLIPScore clips the negative ones).
    perturb_(CLIPModel(config), seed=seed, scale=0.2).save_pretrained(directory)
    save_preprocessor(directory)
    return directory


def published_aesthetic_head(in_features: int, *, seed: int) -> nn.Module:
    """The LAION predictor's MLP module (``layers``: linear layers at positions 0, 2, 4, 6, 7), narrowed."""
    torch.manual_seed(seed)
    head = nn.Module()
    head.layers = nn.Sequential(
        nn.Linear(in_features, 24),
        nn.Dropout(0.2),
        nn.Linear(24, 12),
        nn.Dropout(0.2),
        nn.Linear(12, 8),
        nn.Dropout(0.1),
        nn.Linear(8, 4),
        nn.Linear(4, 1),
    )
    return head.eval()


def save_bert_tokenizer(directory: Path) -> BertTokenizer:
    """A WordPiece vocabulary holding the toy grammar's words (bert-base-uncased's role, tiny)."""
    directory.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *grammar_words(), *"abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(directory / "vocab.txt"))
    tokenizer.save_pretrained(directory)
    return tokenizer


@dataclass
class TinyRewardModels:
    """Everything the model-reward tests need, built once per session."""

    clip: Path
    """A Hugging Face CLIP directory (clip_score, pickscore, and aesthetic's image tower)."""
    aesthetic_pth: Path
    """A LAION-style pickled head, as published."""
    aesthetic_head: nn.Module
    aesthetic: Path
    """The head converted by ``convert_reward("aesthetic")``."""
    openclip: OpenClipStyleCLIP
    hpsv2_pt: Path
    hpsv2: Path
    bert_tokenizer: Path
    imagereward_model: BlipStyleImageReward
    imagereward_pt: Path
    imagereward: Path

    def options(self) -> dict[str, dict]:
        """Options that make each model reward load these tiny models, on CPU."""
        return {
            "aesthetic": {"weights": str(self.aesthetic), "clip": str(self.clip), "device": "cpu", "batch_size": 4},
            "clip_score": {"weights": str(self.clip), "device": "cpu", "batch_size": 4},
            "pickscore": {"weights": str(self.clip), "processor": None, "device": "cpu", "batch_size": 4},
            "hpsv2": {"weights": str(self.hpsv2), "device": "cpu", "batch_size": 4},
            "imagereward": {"weights": str(self.imagereward), "device": "cpu", "batch_size": 4},
        }


def build_tiny_reward_models(root: Path, *, seed: int = 0) -> TinyRewardModels:
    clip = build_tiny_clip(root / "clip", seed=seed)

    head = published_aesthetic_head(16, seed=seed + 1)
    perturb_(head, seed=seed + 1, scale=0.2)
    aesthetic_pth = root / "sac+logos+ava1-tiny-linearMSE.pth"
    torch.save(head.state_dict(), aesthetic_pth)
    aesthetic = convert_reward("aesthetic", source=aesthetic_pth, output=root / "aesthetic")

    torch.manual_seed(seed + 2)
    tokenizer_dir = root / "clip-tokenizer"
    tokenizer = save_clip_tokenizer(tokenizer_dir)
    openclip = perturb_(OpenClipStyleCLIP(vocab=len(tokenizer), context=TOKENIZER_MAX_LENGTH), seed=seed + 2)
    hpsv2_pt = root / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": openclip.state_dict()}, hpsv2_pt)
    hpsv2 = convert_reward("hpsv2", source=hpsv2_pt, output=root / "hpsv2", tokenizer=str(tokenizer_dir), vision_heads=2, text_heads=2)

    bert = root / "bert-tokenizer"
    bert_tokenizer = save_bert_tokenizer(bert)
    torch.manual_seed(seed + 3)
    # BLIP adds [DEC] and [ENC] to bert-base-uncased: two more rows in the word embeddings.
    imagereward_model = perturb_(BlipStyleImageReward(vocab=len(bert_tokenizer) + 2), seed=seed + 3)
    imagereward_pt = root / "ImageReward.pt"
    torch.save(imagereward_model.state_dict(), imagereward_pt)
    imagereward = convert_reward(
        "imagereward", source=imagereward_pt, output=root / "imagereward", tokenizer=str(bert), vision_heads=2, text_heads=2
    )

    return TinyRewardModels(
        clip=clip,
        aesthetic_pth=aesthetic_pth,
        aesthetic_head=head,
        aesthetic=aesthetic,
        openclip=openclip,
        hpsv2_pt=hpsv2_pt,
        hpsv2=hpsv2,
        bert_tokenizer=bert,
        imagereward_model=imagereward_model,
        imagereward_pt=imagereward_pt,
        imagereward=imagereward,
    )
