"""The growing classifier: one linear block per task, concatenated into logits over all seen classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IncrementalLinear"]


class IncrementalLinear(nn.Module):
    """A linear head that grows by one block of rows per task (the official code's expanding ``fc``).

    The official code re-creates one ``Linear`` for all seen classes and copies the old rows; with the
    current-task loss the old rows get zero gradient and, with SGD and no weight decay, stay fixed. Keeping one
    parameter block per task gives the same function and keeps old rows fixed under any optimiser (weight decay
    included) unless ``train_old`` is set.

    Args:
        in_features: feature size of the backbone.
    """

    def __init__(self, in_features: int, init: str = "kaiming") -> None:
        super().__init__()
        if init not in ("kaiming", "zeros"):
            raise ValueError(f"head init must be 'kaiming' or 'zeros', got {init!r}")
        self.in_features = in_features
        self.init = init
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()

    @property
    def num_classes(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    @property
    def num_blocks(self) -> int:
        return len(self.weights)

    def grow(self, n_new: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Add ``n_new`` output rows for a new task.

        ``kaiming``: as the official ``SimpleLinear``, ``kaiming_uniform_(nonlinearity="linear")`` weights, zero
        bias. ``zeros``: zero weights. Why it matters: with the current-task loss (softmax over the task's own
        logits) the gradient of the sum of a block's rows is zero, so each block keeps its initial common
        offset ``sum_c w_c . mean_feature`` forever; with random init that offset differs between blocks and
        decides which task wins at prediction when features share a large mean component. Zero init makes the
        offsets equal. New rows follow the device/dtype of existing rows (or the arguments for the first block).
        """
        if n_new <= 0:
            raise ValueError(f"a task must add at least one class, got {n_new}")
        if self.num_blocks:
            device, dtype = self.weights[0].device, self.weights[0].dtype
        w = torch.zeros(n_new, self.in_features, device=device, dtype=dtype)
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(w, nonlinearity="linear")
        self.weights.append(nn.Parameter(w))
        self.biases.append(nn.Parameter(torch.zeros(n_new, device=device, dtype=dtype)))

    def set_trainable(self, train_old: bool) -> None:
        """Only the newest block learns unless ``train_old``."""
        last = self.num_blocks - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            flag = train_old or i == last
            w.requires_grad_(flag)
            b.requires_grad_(flag)

    def forward(self, features: Tensor) -> Tensor:
        """Logits over all seen classes, shape (batch, num_classes)."""
        if not self.num_blocks:
            raise RuntimeError("the head has no classes yet: call grow() when a task starts")
        w = torch.cat(list(self.weights), 0) if self.num_blocks > 1 else self.weights[0]
        b = torch.cat(list(self.biases), 0) if self.num_blocks > 1 else self.biases[0]
        return F.linear(features, w, b)

    def block_sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights]
