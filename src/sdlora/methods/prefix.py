"""Prefix-tuning of a timm ViT's attention: learned key/value vectors prepended inside chosen blocks.

Prompt methods (L2P, CODA-Prompt) condition a frozen ViT by prepending ``P`` learned vectors to the keys and
``P`` to the values of the self-attention of some blocks ("prefix-tuning", Li & Liang, ACL 2021; the form
CODA-Prompt uses for every prompt method, Smith et al., CVPR 2023, Sec. 3 and their ``models/vit.py``)::

    Attn(x) = softmax(q [p_k; k]^T / sqrt(d_h)) [p_v; v]

The prefixes enter after the q/k/v projection (they are vectors of the key/value space itself, split into heads
like k and v), so the number of queries, and the output shape, do not change. Queries come only from the tokens.

:class:`PrefixAttention` wraps one ``timm.models.vision_transformer.Attention``. Its prefixes are set by the owning
method for the duration of one forward (``set_prefix`` ... ``clear``), as ``SDLoRALinear`` receives its magnitudes;
without a prefix the wrapped module runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import UnsupportedBackbone

__all__ = ["PrefixAttention", "inject_prefix_attention", "prefix_attention_class"]


def prefix_attention_class() -> type[nn.Module]:
    """The attention class prefixes are implemented for: timm's ViT ``Attention`` (fused ``qkv``)."""
    from timm.models.vision_transformer import Attention

    return Attention


class PrefixAttention(nn.Module):
    """A timm ViT ``Attention`` whose keys and values can be prefixed per sample.

    Args:
        attn: the wrapped module (kept as ``self.attn``, frozen by the caller); it must be exactly
            ``timm.models.vision_transformer.Attention``, whose forward this class re-states with the prefix.

    Raises:
        TypeError: another attention implementation (its forward may differ: rotary embeddings, separate
            projections, other masks), for which re-stating the computation would be a guess.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        cls = prefix_attention_class()
        if type(attn) is not cls:
            raise TypeError(
                f"prefix-tuning is implemented for {cls.__module__}.{cls.__name__} (timm ViT blocks), "
                f"not {type(attn).__module__}.{type(attn).__name__}"
            )
        self.attn = attn
        self.num_heads = int(attn.num_heads)  # type: ignore[arg-type]
        self.head_dim = int(attn.head_dim)  # type: ignore[arg-type]
        self.dim = self.num_heads * self.head_dim  # width of a key/value vector (all heads)
        self._prefix: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------- prefix
    def set_prefix(self, keys: Tensor, values: Tensor) -> None:
        """Prefixes for the next forward: ``keys`` and ``values`` of shape (B, P, dim); P may be 0."""
        if keys.dim() != 3 or keys.shape != values.shape or keys.shape[-1] != self.dim:
            raise ValueError(
                f"prefix keys/values must both have shape (batch, length, {self.dim}), got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        self._prefix = (keys, values)

    def clear(self) -> None:
        self._prefix = None

    @property
    def has_prefix(self) -> bool:
        return self._prefix is not None

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **kw: Any) -> Tensor:
        if self._prefix is None:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal, **kw)
        if attn_mask is not None or is_causal or kw:
            raise ValueError("prefixed attention does not take attention masks or causal attention")
        return self._prefixed(x, *self._prefix)

    def _prefixed(self, x: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
        """timm ``Attention.forward`` (timm 1.0) with ``pk``/``pv`` prepended to the keys and values."""
        a: Any = self.attn
        b, n, _ = x.shape
        if pk.shape[0] != b:
            raise ValueError(f"prefix batch {pk.shape[0]} != input batch {b}")
        gate = getattr(a, "gate", None)
        g = gate(x).sigmoid() if gate is not None else None
        qkv = a.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        # The prefixes are learned in the (normalised) key/value space; split them into heads like k and v.
        pk = pk.to(k.dtype).reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        pv = pv.to(v.dtype).reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        if a.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * a.scale) @ k.transpose(-2, -1)
            out = a.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        norm = getattr(a, "norm", None)
        if norm is not None:
            out = norm(out)
        if g is not None:
            out = out * g
        return a.proj_drop(a.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}"


def inject_prefix_attention(model: nn.Module, layers: list[int], method: str) -> list[PrefixAttention]:
    """Wrap the attention of blocks ``layers`` of a timm ViT (``model.blocks[i].attn``) in place.

    Returns:
        The wrappers, in ``layers`` order.

    Raises:
        ValueError: the model has no ``blocks``, a layer index is out of range, or a block's attention is not
            timm's ViT ``Attention`` (the message names the block, the class found and what to use instead).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise UnsupportedBackbone(
            f"{method} prefixes the attention of timm ViT blocks (model.blocks[i].attn); the backbone "
            f"{type(model).__name__} has no such blocks. Use a timm ViT backbone, or a method that does not need "
            "them (ranpac, simplecil, seq_lora, lora_merge)"
        )
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"{method}: layers {bad} out of range; the backbone has {len(blocks)} blocks (0-based)")
    wrappers = []
    for i in layers:
        attn: Any = blocks[i].attn
        if isinstance(attn, PrefixAttention):
            raise ValueError(f"{method}: block {i} is listed twice in layers")
        try:
            wrapper = PrefixAttention(attn)
        except TypeError as e:
            raise UnsupportedBackbone(
                f"{method} cannot prompt blocks.{i}.attn: {e}. Prefix-tuning needs attention that accepts extra "
                "keys and values; use a timm ViT backbone, or a method that does not need them (ranpac, "
                "simplecil, seq_lora, lora_merge)"
            ) from None
        blocks[i].attn = wrapper
        wrappers.append(wrapper)
    return wrappers
