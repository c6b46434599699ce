"""Tiny random-init Hugging Face models saved to local directories (no download), and separable text data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: Words of the tiny tokenizer; the class words make the synthetic text tasks separable.
CLASS_WORDS = ["cat", "dog", "tool", "food", "boat", "tree"]
FILLER = ["the", "a", "of", "and", "small", "large", "old", "new", "red", "blue"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *CLASS_WORDS]


def make_tiny_bert_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) and its WordPiece tokenizer, saved with ``save_pretrained``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(path))
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(str(path))
    return path


def make_tiny_vit_dir(path: Path, seed: int = 0, processor: bool = True) -> Path:
    """A 2-layer HF ViT (hidden 32, 32 px, patch 8), with an image processor config (mean/std 0.5) if asked."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    ViTModel(cfg).save_pretrained(str(path))
    if processor:
        ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(str(path))
    return path


def class_texts(n_classes: int, per_class: int, seed: int = 0) -> list[tuple[str, int]]:
    """``per_class`` short texts per class: filler words around the class word (so classes are separable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_classes):
        for _ in range(per_class):
            n = int(torch.randint(1, 6, (1,), generator=g))
            words = [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (n,), generator=g)]
            pos = int(torch.randint(0, n + 1, (1,), generator=g))
            words.insert(pos, CLASS_WORDS[c])
            out.append((" ".join(words), c))
    return out


def write_jsonl(path: Path, rows: list[tuple[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    return path


def hf_text_config(model_dir: Path, data_file: Path, method: str = "sdlora", **sections: Any) -> dict[str, Any]:
    """A two-task text run on the tiny BERT: 4 classes of ``data_file``, two epochs, CPU."""
    cfg: dict[str, Any] = {
        "name": "tiny-text",
        "seed": 7,
        "method": {"name": method, "adapter": {"rank": 2}},
        "backbone": {"name": f"hf:{model_dir}"},
        "data": {"name": "text_jsonl", "root": str(data_file), "max_length": 12, "test_fraction": 0.25},
        "scenario": {"init_cls": 2, "increment": 2},
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "eval_batch_size": 16,
            "optimizer": "adam",
            "lr": 0.01,
            "device": "cpu",
            "threads": 1,
        },
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg
