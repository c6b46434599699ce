from __future__ import annotations

import pytest
import torch


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(3, 3, 16, 16)
