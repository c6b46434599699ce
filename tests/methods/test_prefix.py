"""The prefix-attention wrapper: exactly timm's attention without (or with an empty) prefix, the prefix-tuning
formula with one, and clear refusals for attention it does not implement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sdlora.methods.prefix import PrefixAttention, inject_prefix_attention


def _vit(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
    args.update(kw)
    return VisionTransformer(**args).eval()


def _reference(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    """Prefix-tuning written out with explicit softmax: softmax(q [pk; k]^T / sqrt(d)) [pv; v], then proj."""
    b, n, c = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    k = torch.cat([pk.reshape(b, -1, h, d).transpose(1, 2), k], 2)
    v = torch.cat([pv.reshape(b, -1, h, d).transpose(1, 2), v], 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) / d**0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


@pytest.mark.parametrize("fused", [True, False])
def test_empty_prefix_reproduces_timm_attention_exactly(fused):
    vit = _vit(qkv_bias=True)
    attn = vit.blocks[0].attn
    attn.fused_attn = fused
    x = torch.randn(3, 17, 32)
    expected = attn(x)
    wrapper = PrefixAttention(attn)
    assert torch.equal(wrapper(x), expected)  # no prefix: the wrapped module itself
    wrapper.set_prefix(torch.zeros(3, 0, 32), torch.zeros(3, 0, 32))
    assert wrapper.has_prefix
    assert torch.equal(wrapper(x), expected)  # the re-stated computation, bit for bit


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_matches_the_prefix_tuning_formula_and_gets_gradients(fused):
    vit = _vit(seed=1)
    attn = vit.blocks[1].attn
    attn.fused_attn = fused
    x = torch.randn(2, 17, 32)
    pk = torch.randn(2, 5, 32, requires_grad=True)
    pv = torch.randn(2, 5, 32, requires_grad=True)
    wrapper = PrefixAttention(attn)
    wrapper.set_prefix(pk, pv)
    out = wrapper(x)
    torch.testing.assert_close(out, _reference(attn, x, pk, pv), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, attn(x), atol=1e-3)  # the prefix changes the output
    out.square().sum().backward()
    assert pk.grad is not None and pv.grad is not None and pk.grad.abs().sum() > 0 and pv.grad.abs().sum() > 0
    wrapper.clear()
    assert torch.equal(wrapper(x), attn(x))


def test_whole_model_with_wrappers_and_no_prefix_is_unchanged():
    vit = _vit(seed=2)
    x = torch.randn(2, 3, 32, 32)
    expected = vit(x)
    wrappers = inject_prefix_attention(vit, [0, 1], "test")
    assert [type(vit.blocks[i].attn) for i in (0, 1)] == [PrefixAttention, PrefixAttention]
    assert torch.equal(vit(x), expected)
    for w in wrappers:
        w.set_prefix(torch.zeros(2, 0, 32), torch.zeros(2, 0, 32))
    assert torch.equal(vit(x), expected)


def test_bad_prefix_shapes_and_masks_are_refused():
    wrapper = PrefixAttention(_vit().blocks[0].attn)
    with pytest.raises(ValueError, match="shape"):
        wrapper.set_prefix(torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))
    with pytest.raises(ValueError, match="shape"):
        wrapper.set_prefix(torch.zeros(2, 3, 32), torch.zeros(2, 4, 32))
    wrapper.set_prefix(torch.zeros(2, 3, 32), torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="batch"):
        wrapper(torch.randn(4, 17, 32))
    with pytest.raises(ValueError, match="mask"):
        wrapper(torch.randn(2, 17, 32), attn_mask=torch.zeros(17, 17))


class _OtherAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


def test_other_attention_and_backbones_without_blocks_are_refused_clearly():
    with pytest.raises(TypeError, match="timm"):
        PrefixAttention(_OtherAttention())
    vit = _vit()
    vit.blocks[1].attn = _OtherAttention()
    with pytest.raises(ValueError, match=r"cannot prompt blocks\.1\.attn.*ranpac"):
        inject_prefix_attention(vit, [0, 1], "l2p")
    with pytest.raises(ValueError, match="out of range"):
        inject_prefix_attention(_vit(), [0, 5], "l2p")
    with pytest.raises(ValueError, match="no such blocks"):
        inject_prefix_attention(nn.Sequential(nn.Linear(3, 3)), [0], "coda_prompt")


def test_sdpa_and_manual_paths_agree_with_prefix():
    vit = _vit(seed=3)
    attn = vit.blocks[0].attn
    x = torch.randn(2, 17, 32)
    pk, pv = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    wrapper = PrefixAttention(attn)
    wrapper.set_prefix(pk, pv)
    attn.fused_attn = True
    fused = wrapper(x)
    attn.fused_attn = False
    manual = wrapper(x)
    torch.testing.assert_close(fused, manual, rtol=1e-5, atol=1e-6)
    assert F.mse_loss(fused, manual) < 1e-10
