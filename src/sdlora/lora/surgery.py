"""Module surgery shared by every adapter: find and replace submodules by dotted name; the fused-qkv layout.

The fused attention projection of timm ViTs (``blocks.N.attn.qkv``) is one ``nn.Linear(d, 3 d)`` whose output
rows are ``[q; k; v]``; adapters that touch only some of the three projections work on row slices of it. This
module is the one place that knows that layout (``QKV_ORDER``) and how to swap a submodule in a model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

__all__ = [
    "FUSED_QKV_NAME",
    "QKV_ORDER",
    "find_linears",
    "is_fused_qkv",
    "qkv_slices",
    "replace_submodule",
]

#: Last name component of a fused q/k/v projection (timm ``Attention.qkv``).
FUSED_QKV_NAME = "qkv"
#: Order of the projections along the output rows of a fused qkv Linear.
QKV_ORDER: tuple[str, str, str] = ("q", "k", "v")


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at dotted path ``name`` inside ``root`` and return the module it replaces.

    Raises:
        AttributeError: ``name`` is empty or does not name a submodule of ``root``.
    """
    if not name:
        raise AttributeError("replace_submodule needs a submodule name, not the root itself")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    if not isinstance(old, nn.Module):
        raise AttributeError(f"{name!r} is not a submodule of {type(root).__name__}")
    setattr(parent, child, new)
    return old


def find_linears(root: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``root`` matching any fnmatch pattern, in pattern order, no repeats.

    Raises:
        ValueError: a pattern matches no ``nn.Linear`` (the message lists a few Linear names to choose from).
    """
    linear_names = [n for n, m in root.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in linear_names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
            raise ValueError(
                f"adapter target {pattern!r} matches no nn.Linear in the backbone; Linear modules look like: {sample}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def is_fused_qkv(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (at dotted path ``name``) is a fused q/k/v projection: a ``qkv`` Linear ``d -> 3 d``."""
    return (
        isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] == FUSED_QKV_NAME
        and module.out_features == 3 * module.in_features
    )


def qkv_slices(module: nn.Linear, projections: Iterable[str]) -> list[tuple[str, int, int]]:
    """Row slices ``(projection, start, stop)`` of the given projections of a fused qkv Linear, in q, k, v order.

    Raises:
        ValueError: an unknown projection name, or output rows that do not split into three equal blocks.
    """
    wanted = set(projections)
    unknown = wanted - set(QKV_ORDER)
    if unknown:
        raise ValueError(f"unknown projection(s) {sorted(unknown)}; a fused qkv Linear has {list(QKV_ORDER)}")
    if module.out_features % 3:
        raise ValueError(f"a fused qkv Linear needs 3 equal output blocks, got {module.out_features} rows")
    d = module.out_features // 3
    return [(p, i * d, (i + 1) * d) for i, p in enumerate(QKV_ORDER) if p in wanted]
