"""Tiny re-implementations of the *published* reward checkpoint layouts, for testing the converters.

The reference packages themselves cannot be installed next to our CPU PyTorch (open_clip
and timm need torchvision, which has no CPU wheel on the package index we can reach), so
these modules rebuild the parts that matter, with the same parameter names and maths:

- :class:`OpenClipStyleCLIP`: OpenCLIP's plain ViT ``CLIP`` (the layout of HPSv2's
  checkpoint): ``visual.conv1``, ``visual.class_embedding``, ``transformer.resblocks.N``
  with ``nn.MultiheadAttention`` (fused ``in_proj_weight``), projections stored as
  ``(width, embed)`` matrices, text features taken at the highest token id (EOT).
- :class:`BlipStyleImageReward`: ImageReward's ``blip.visual_encoder`` (BLIP's timm-style
  ViT: ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, LayerNorm eps 1e-6),
  ``blip.text_encoder`` (BERT with cross-attention; transformers' BlipTextModel is the
  port of BLIP's med.py), the unused ``blip.vision_proj``/``text_proj``, and
  ``mlp.layers`` (linear layers with dropout, no activations).

A converted checkpoint must score exactly what these modules compute from the original
state dict; a wrong name, transpose or q/k/v split shows up as a different number.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def perturb_(module: nn.Module, *, seed: int, scale: float = 0.05) -> nn.Module:
    """Add seeded noise to every parameter, so LayerNorm gains and zero-initialised biases are not at their defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


class _OpenClipBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp), gelu=nn.GELU(), c_proj=nn.Linear(mlp, width)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_OpenClipBlock(width, heads, mlp) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _OpenClipVisual(nn.Module):
    def __init__(self, *, image_size: int, patch: int, width: int, layers: int, heads: int, embed: int):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _OpenClipTransformer(width, layers, heads, 4 * width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed) * width**-0.5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (batch, patches, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipStyleCLIP(nn.Module):
    """OpenCLIP's ``CLIP`` with a ViT image tower, tiny."""

    def __init__(
        self,
        *,
        vocab: int,
        context: int = 16,
        image_size: int = 32,
        patch: int = 8,
        width: int = 32,
        layers: int = 2,
        heads: int = 2,
        embed: int = 16,
    ):
        super().__init__()
        self.visual = _OpenClipVisual(image_size=image_size, patch=patch, width=width, layers=layers, heads=heads, embed=embed)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.transformer = _OpenClipTransformer(width, layers, heads, 4 * width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.visual(pixels), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, self.attn_mask[:length, :length]))
        features = x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ self.text_projection
        return nn.functional.normalize(features, dim=-1)


class _BlipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (width // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))


class _BlipBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _BlipAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, 4 * width)
        self.mlp.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _BlipViT(nn.Module):
    def __init__(self, *, image_size: int, patch: int, width: int, layers: int, heads: int):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList([_BlipBlock(width, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)  # (batch, patches, width)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # every token, as ImageReward feeds them to the text encoder


class BlipStyleImageReward(nn.Module):
    """ImageReward's module tree (``blip.*`` and ``mlp.layers``), tiny."""

    MEAN, STD = 0.16717362830052426, 1.0333394966054072

    def __init__(
        self,
        *,
        vocab: int,
        image_size: int = 32,
        patch: int = 16,
        vision_width: int = 32,
        text_width: int = 24,
        layers: int = 2,
        heads: int = 2,
    ):
        super().__init__()
        from transformers import BlipTextConfig
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.blip = nn.Module()
        self.blip.visual_encoder = _BlipViT(image_size=image_size, patch=patch, width=vision_width, layers=layers, heads=heads)
        text_config = BlipTextConfig(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=4 * text_width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=40,
            encoder_hidden_size=vision_width,
            pad_token_id=0,
        )
        self.blip.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.blip.vision_proj = nn.Linear(vision_width, 8)
        self.blip.text_proj = nn.Linear(text_width, 8)
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(text_width, 20),
            nn.Dropout(0.2),
            nn.Linear(20, 12),
            nn.Dropout(0.2),
            nn.Linear(12, 8),
            nn.Dropout(0.1),
            nn.Linear(8, 4),
            nn.Linear(4, 1),
        )

    def score(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        return ((self.mlp.layers(text[:, 0]) - self.MEAN) / self.STD).squeeze(-1)
