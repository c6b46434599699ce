"""Module surgery and the fused-qkv layout shared by the adapters."""

from __future__ import annotations

import pytest
from torch import nn

from sdlora.lora.surgery import QKV_ORDER, find_linears, is_fused_qkv, qkv_slices, replace_submodule


def _model() -> nn.Module:
    attn = nn.Module()
    attn.qkv = nn.Linear(4, 12)
    attn.proj = nn.Linear(4, 4)
    block = nn.Module()
    block.attn = attn
    root = nn.Module()
    root.blocks = nn.ModuleList([block])
    root.head = nn.Linear(4, 2)
    return root


def test_replace_submodule_by_dotted_name():
    root = _model()
    old = root.blocks[0].attn.qkv
    new = nn.Identity()
    assert replace_submodule(root, "blocks.0.attn.qkv", new) is old
    assert root.get_submodule("blocks.0.attn.qkv") is new
    head = nn.Linear(4, 3)
    replace_submodule(root, "head", head)  # a direct child of the root
    assert root.head is head
    with pytest.raises(AttributeError):
        replace_submodule(root, "blocks.0.attn.nope", new)
    with pytest.raises(AttributeError):
        replace_submodule(root, "", new)


def test_fused_qkv_layout():
    root = _model()
    qkv = root.blocks[0].attn.qkv
    assert QKV_ORDER == ("q", "k", "v")
    assert is_fused_qkv("blocks.0.attn.qkv", qkv)
    assert not is_fused_qkv("blocks.0.attn.proj", root.blocks[0].attn.proj)  # not named qkv
    assert not is_fused_qkv("x.qkv", nn.Linear(4, 8))  # not d -> 3d
    assert qkv_slices(qkv, ["v", "q"]) == [("q", 0, 4), ("v", 8, 12)]  # rows [q; k; v], in that order
    assert qkv_slices(qkv, ("k", "v")) == [("k", 4, 8), ("v", 8, 12)]
    with pytest.raises(ValueError, match="unknown projection"):
        qkv_slices(qkv, ["o"])


def test_find_linears_in_pattern_order_without_repeats():
    root = _model()
    assert find_linears(root, ["head", "blocks.*.attn.*", "blocks.0.attn.qkv"]) == [
        "head",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
    ]
    with pytest.raises(ValueError, match=r"'blocks\.\*\.mlp' matches no nn\.Linear.*head"):
        find_linears(root, ["blocks.*.mlp"])
