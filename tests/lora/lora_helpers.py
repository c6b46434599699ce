from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sdlora.lora import AdapterConfig, SDLoRAModel

TARGETS = ["blocks.*.attn.qkv"]


def tiny_vit(seed: int = 0, depth: int = 2, dim: int = 16) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=dim, depth=depth, num_heads=2, num_classes=0)


class SeparateQV(nn.Module):
    """HF-style attention with separate query/key/value projections (BERT, DINOv2 in transformers)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        return self.out(att @ v).mean(1)


def randomise_current(model: SDLoRAModel, scale: float = 0.3) -> None:
    """Give every current B a non-zero value (as after training) so that outputs depend on it."""
    with torch.no_grad():
        for _, u in model.named_units():
            if u.B_cur is not None:
                u.B_cur.normal_(0, scale)


def run_tasks(model: SDLoRAModel, n: int, end_last: bool = True) -> None:
    for t in range(n):
        model.begin_task()
        randomise_current(model)
        with torch.no_grad():
            model.alpha_cur.add_(0.1 * (t + 1))
        if t < n - 1 or end_last:
            model.end_task()


def make(cfg: AdapterConfig | None = None, seed: int = 0, **kw) -> SDLoRAModel:
    return SDLoRAModel(tiny_vit(seed, **kw), cfg or AdapterConfig(rank=3), default_targets=TARGETS)
