"""Text in the data pipeline: tokenisation, the text dataset, and batches that are dicts of tensors.

Texts are tokenised once, when the dataset is built, with the backbone's tokenizer: truncated and padded to
``data.max_length``, so every sample is a dict of equal-length ``[L]`` tensors and the default DataLoader collation
stacks them into ``[B, L]``. The text backbone drops the padding columns a batch does not use
(:class:`sdlora.backbones.hf.HFFeatureExtractor`), so padding to the maximum costs memory, not compute.

:class:`TextEncoder` tokenises new strings exactly as training did (prediction on text);
:func:`sdlora.rundir.text_encoder_for_run` builds it from a run's config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["Batch", "TextDataset", "TextEncoder", "batch_to", "encode_texts"]

#: What a DataLoader yields as model input: an image tensor, or a dict of token tensors for text.
Batch = Tensor | dict[str, Tensor]


def batch_to(batch: Tensor | Mapping[str, Tensor], device: torch.device, non_blocking: bool = False) -> Batch:
    """Move a model-input batch (a tensor, or a dict of tensors) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    raise TypeError(f"a batch is a tensor or a dict of tensors, got {type(batch).__name__}")


#: Characters kept per token of ``max_length`` before tokenising (:func:`encode_texts`).
MAX_CHARS_PER_TOKEN = 100


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Tokenise ``texts``: truncated and padded to ``max_length``, int64 ``[N, max_length]`` tensors.

    Only the inputs the model takes are kept (``tokenizer.model_input_names``: e.g. ``input_ids``,
    ``token_type_ids``, ``attention_mask`` for BERT).

    Raises:
        TypeError: ``texts`` is a single string or holds something other than strings.
        ValueError: ``max_length`` is not positive.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, not a string")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not texts:
        return {k: torch.zeros(0, max_length, dtype=torch.long) for k in tokenizer.model_input_names}
    # The tokenizer splits the whole string before truncating: one 22 MB line took 4 GB. A token of these
    # tokenizers spans at most MAX_CHARS_PER_TOKEN characters (WordPiece's longest word), so the cut keeps every
    # token that survives truncation unless the text has runs of whitespace longer than that.
    limit = max_length * MAX_CHARS_PER_TOKEN
    texts = [t[:limit] for t in texts]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k].to(torch.long) for k in tokenizer.model_input_names if k in enc}


class TextEncoder:
    """Tokenises strings into a model-input batch exactly as the data pipeline does for training.

    Args:
        tokenizer: The backbone's tokenizer (``Backbone.tokenizer`` or :func:`sdlora.backbones.hf.load_tokenizer`).
        max_length: ``data.max_length`` of the run.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return encode_texts(self.tokenizer, texts, self.max_length)


class TextDataset(Dataset):
    """Tokenised texts: ``__getitem__(i) -> ({name: int64 [L]}, label)``.

    Args:
        encodings: ``[N, L]`` tensors from :func:`encode_texts`.
        targets: int64 labels, one per text.
    """

    def __init__(self, encodings: Mapping[str, Tensor], targets: np.ndarray) -> None:
        targets = np.asarray(targets, dtype=np.int64)
        for name, t in encodings.items():
            if t.ndim != 2 or len(t) != len(targets):
                raise ValueError(f"encoding {name!r} has shape {tuple(t.shape)}, expected [{len(targets)}, L]")
        self.encodings = dict(encodings)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
        return {k: v[i] for k, v in self.encodings.items()}, int(self.targets[i])
