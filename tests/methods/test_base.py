"""The ``Method`` base class: the training loss of each ``loss_scope`` and which head rows it trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_helpers import make_ctx, tiny_method


@pytest.mark.parametrize("scope", ["current", "all"])
def test_loss_scope_and_old_head_rows(scope):
    method = tiny_method("sdlora", loss_scope=scope)
    ctx0 = make_ctx(0, 0, 2, [])
    method.begin_task(ctx0)
    method.end_task(ctx0)
    ctx1 = make_ctx(1, 2, 4, [])
    method.begin_task(ctx1)
    torch.manual_seed(1)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([2, 3, 2, 3, 3, 2])
    logits = method(x)
    logits.retain_grad()
    loss = method.training_loss(logits, y, ctx1)
    loss.backward()
    old_w, old_b = method.head.weights[0], method.head.biases[0]
    new_w = method.head.weights[1]
    assert new_w.grad is not None and new_w.grad.abs().sum() > 0
    if scope == "current":
        # The paper's / official code's loss: softmax over the current task's logits only (labels shifted).
        torch.testing.assert_close(loss, F.cross_entropy(logits[:, 2:4], y - 2))
        assert torch.count_nonzero(logits.grad[:, :2]) == 0  # old classes' logits get no gradient
        assert not old_w.requires_grad and not old_b.requires_grad and old_w.grad is None
    else:
        torch.testing.assert_close(loss, F.cross_entropy(logits, y))
        assert torch.count_nonzero(logits.grad[:, :2]) > 0
        assert old_w.requires_grad and old_w.grad is not None and old_w.grad.abs().sum() > 0


def test_first_task_loss_covers_its_classes_in_both_scopes():
    torch.manual_seed(0)
    logits = torch.randn(5, 2)
    y = torch.tensor([0, 1, 1, 0, 1])
    ctx = make_ctx(0, 0, 2, [])
    for scope in ("current", "all"):
        method = tiny_method("sdlora", loss_scope=scope)
        torch.testing.assert_close(method.training_loss(logits, y, ctx), F.cross_entropy(logits, y))


def test_registering_a_method_whose_config_hook_is_not_a_classmethod_is_refused():
    from sdlora.methods import METHODS, Method, register_method

    class Instance(Method):
        def make_calib_config(self, cfg):  # resolve_method_config calls it on the class
            return cfg

    with pytest.raises(TypeError, match=r"'bad_hook': Instance.make_calib_config must be a @classmethod"):
        register_method("bad_hook")(Instance)
    assert "bad_hook" not in METHODS

    class Inherits(Method):  # the base class's classmethods are inherited: accepted
        pass

    try:
        assert register_method("inherits_hooks")(Inherits) is Inherits
    finally:
        METHODS.pop("inherits_hooks", None)
