"""Session fixtures shared by every test directory: tiny Hugging Face models saved to local directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from hf_helpers import make_tiny_bert_dir, make_tiny_vit_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer BERT (hidden 32) with its tokenizer, as ``save_pretrained`` writes it."""
    return make_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer HF ViT (hidden 32, 32 px, patch 8) with an image processor config."""
    return make_tiny_vit_dir(tmp_path_factory.mktemp("tiny-vit"))
