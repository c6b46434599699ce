"""The models ``bench_core.py`` times: the backbone, the SD-LoRA adapter state after t tasks, and the plain-LoRA
references written here independently of the library.
"""

from __future__ import annotations

import math
from typing import Any

import timm  # imported here, in the parent: forked configurations then start without paying for it
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdlora.lora import AdapterConfig, SDLoRAModel

TARGETS = ["blocks.*.attn.qkv"]
B_SCALE = 0.02  # std of the random B given to each finished task (as after training)
AMP = {"none": None, "bf16": torch.bfloat16}


class PlainLoRAQKV(nn.Module):
    """Reference: a frozen fused qkv ``nn.Linear`` plus one plain rank-r LoRA on its q and v slices.

    ``y = W0 x + b + B_blk (A x)`` with ``A = [A_q; A_v]`` (2r x d, one down-projection GEMM for q and v) and
    ``B_blk`` the (3d x 2r) block matrix ``[[B_q, 0], [0, 0], [0, B_v]]``: no magnitude, no normaliser. The
    delta is added out of place. Adding it in place to the q and v slices of the output (``y[..., :d] += ...``,
    the obvious way, and this script's reference until the fused layer existed) makes autograd copy the whole
    (tokens x 3d) output gradient once per slice in backward (``CopySlices``), which costs more than the
    rank-10 adapter itself; a reference that pays for that would flatter every ratio measured against it.
    """

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        d = base.in_features
        self.d, self.r = d, rank
        a = torch.empty(2 * rank, d, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A = nn.Parameter(a)
        self.B_q = nn.Parameter(torch.randn(d, rank, device=a.device, dtype=a.dtype) * B_SCALE)
        self.B_v = nn.Parameter(torch.randn(d, rank, device=a.device, dtype=a.dtype) * B_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        d, r = self.d, self.r
        zero = self.B_q.new_zeros(d, r)
        b_blk = torch.cat([torch.cat([self.B_q, zero], 1), zero.new_zeros(d, 2 * r), torch.cat([zero, self.B_v], 1)])
        return self.base(x) + F.linear(F.linear(x, self.A), b_blk)


class PlainLoRAQKVSliceAdd(PlainLoRAQKV):
    """The same plain LoRA with the delta added in place to the q and v slices of the output: the previous
    reference of this script, kept to show what the in-place slice add costs (``CopySlices`` in backward)."""

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        z = F.linear(x, self.A)
        d, r = self.d, self.r
        y[..., :d] += F.linear(z[..., :r], self.B_q)
        y[..., 2 * d :] += F.linear(z[..., r:], self.B_v)
        return y


def build_backbone(cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(cfg["seed"])
    m = timm.create_model(cfg["model"], pretrained=False, num_classes=0, img_size=cfg["img_size"])
    return m.to(cfg["device"])


def add_plain_lora(backbone: nn.Module, rank: int, cls: type[PlainLoRAQKV] = PlainLoRAQKV) -> nn.Module:
    backbone.requires_grad_(False)
    n = 0
    for name, mod in list(backbone.named_modules()):
        if name.endswith("attn.qkv") and isinstance(mod, nn.Linear):
            parent = backbone.get_submodule(name.rsplit(".", 1)[0])
            parent.qkv = cls(mod, rank)
            n += 1
    if n == 0:
        raise ValueError("plain LoRA reference: the backbone has no '*.attn.qkv' nn.Linear")
    return backbone


def build_sdlora(backbone: nn.Module, mode: str, tasks: int, rank: int, end_last: bool) -> SDLoRAModel:
    """SD-LoRA state of task ``tasks``: earlier tasks begun, given a random B (as trained), ended."""
    model = SDLoRAModel(backbone, AdapterConfig(protocol="official", rank=rank, compute=mode), default_targets=TARGETS)
    for t in range(tasks):
        model.begin_task(rank=rank)
        with torch.no_grad():
            for _, unit in model.named_units():
                if unit.B_cur is not None:
                    unit.B_cur.normal_(0.0, B_SCALE)
        if t < tasks - 1 or end_last:
            model.end_task()
    return model


def build_library_plain_lora(backbone: nn.Module, rank: int) -> SDLoRAModel:
    """The library's plain LoRA: one component that keeps learning, magnitude fixed at 1, unnormalised."""
    cfg = AdapterConfig(
        rank=rank, components="single", normalise_current=False, alpha_init=1.0, train_magnitudes=False
    )
    model = SDLoRAModel(backbone, cfg, default_targets=TARGETS)
    model.begin_task(rank=rank)
    with torch.no_grad():
        for _, unit in model.named_units():
            assert unit.B_cur is not None
            unit.B_cur.normal_(0.0, B_SCALE)
    return model


def feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if not dim:
        raise ValueError("cannot tell the feature size of the backbone")
    return int(dim)


def tokens_per_image(backbone: nn.Module) -> int:
    """Sequence length of a timm ViT: patches plus class/register tokens."""
    pe = getattr(backbone, "patch_embed", None)
    if pe is None or not hasattr(pe, "num_patches"):
        raise ValueError("cannot tell the sequence length of the backbone (no patch_embed.num_patches)")
    return int(pe.num_patches) + int(getattr(backbone, "num_prefix_tokens", 1))
