"""The growing head: old rows are kept and frozen; logits cover all seen classes; init options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdlora.heads import IncrementalLinear


def test_grow_keeps_old_rows_and_concatenates():
    torch.manual_seed(0)
    head = IncrementalLinear(5)
    head.grow(2)
    w0 = head.weights[0].detach().clone()
    head.grow(3)
    assert head.num_classes == 5 and head.block_sizes() == [2, 3]
    assert torch.equal(head.weights[0], w0)
    x = torch.randn(4, 5)
    full_w = torch.cat([head.weights[0], head.weights[1]])
    full_b = torch.cat([head.biases[0], head.biases[1]])
    assert torch.allclose(head(x), F.linear(x, full_w, full_b))


def test_only_new_block_trains_under_any_optimizer():
    head = IncrementalLinear(4)
    head.grow(2)
    head.grow(2)
    head.set_trainable(train_old=False)
    before = head.weights[0].detach().clone()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(8, 4)).sum().backward()
        opt.step()
    assert torch.equal(head.weights[0], before)
    head.set_trainable(train_old=True)
    assert all(p.requires_grad for p in head.parameters())


def test_init_options_and_errors():
    head = IncrementalLinear(6, init="zeros")
    head.grow(3)
    assert torch.count_nonzero(head.weights[0]) == 0
    kaiming = IncrementalLinear(6)
    kaiming.grow(3)
    assert torch.count_nonzero(kaiming.weights[0]) > 0
    assert kaiming.weights[0].abs().max() <= (3 / 6) ** 0.5  # kaiming-uniform bound sqrt(3 / fan_in)
    with pytest.raises(ValueError, match="at least one class"):
        kaiming.grow(0)
    with pytest.raises(ValueError, match="kaiming"):
        IncrementalLinear(6, init="normal")
    with pytest.raises(RuntimeError, match="no classes"):
        IncrementalLinear(6)(torch.randn(1, 6))
