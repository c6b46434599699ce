"""``lora_merge``: a fresh rank-r LoRA per task, merged into the backbone when the task ends (sequential
"LoRA-M", the merge-only ablation of LoRA-P&M, NeurIPS 2025).

Task t trains ``W_{t-1} + B_t A_t`` (B_t zero-initialised, A_t kaiming-uniform, the same targets, projections and
rank as SD-LoRA's ``method.adapter``) with the task's head block; at its end ``W_t = W_{t-1} + B_t A_t`` is folded
into the weights and the next task starts a new LoRA on top. After task t the backbone is therefore
``W0 + sum_{k<=t} B_k A_k``, evaluated at the cost of the bare backbone.

The LoRA is the SD-LoRA adapter in its plain-LoRA configuration (one component, no normalisation, fixed magnitude
1: the configuration ``seq_lora`` uses), and the fold is the core's own ``SDLoRAModel.merge_and_unload``: a new
adapter wraps the merged backbone each task. Checkpoints keep every task's factors (not the dense weights); loading
replays the same merges in the same order, so a resumed run holds bit-identical weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..backbones import Backbone
from ..config import MethodConfig
from ..lora import SDLoRAModel
from .base import Method, TaskContext, register_method
from .baselines import plain_lora_config

__all__ = ["LoRAMerge"]


@register_method("lora_merge")
class LoRAMerge(Method):
    """Sequential LoRA merged into the backbone after every task (see the module docstring).

    ``method.adapter`` gives the LoRA's rank, targets and projections (default: rank 10 on q and v of every
    block); ``protocol`` and the SD-LoRA-specific fields do not apply.
    """

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.model.requires_grad_(False)
        self.adapter_config = plain_lora_config(cfg.adapter)
        self.default_targets = list(backbone.lora_targets)
        #: per finished task: the adapter state (factors) that was merged, as ``SDLoRAModel.adapter_state``
        self.merged_tasks: list[tuple[dict[str, Tensor], dict[str, Any]]] = []

    @property
    def protocol(self) -> str:
        return "plain"

    @property
    def adapter(self) -> SDLoRAModel | None:
        """The LoRA of the task being learned, or None between tasks (``self.model`` is then a plain backbone)."""
        return self.model if isinstance(self.model, SDLoRAModel) else None

    def _wrap(self) -> SDLoRAModel:
        return SDLoRAModel(self.model, self.adapter_config, default_targets=self.default_targets)

    # ------------------------------------------------------------------------------------- lifecycle
    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        if self.adapter is not None:
            raise RuntimeError("begin_task() called twice: call end_task() first")
        adapter = self._wrap()
        adapter.begin_task()  # new A_t (kaiming-uniform), B_t = 0: the function is unchanged
        self.model = adapter

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        """Merge the task's LoRA into the weights: ``W_t = W_{t-1} + B_t A_t``."""
        adapter = self.adapter
        if adapter is None:
            raise RuntimeError("end_task() called without begin_task()")
        adapter.end_task()
        self.merged_tasks.append(adapter.adapter_state())
        self.model = adapter.merge_and_unload()
        delta_norm = sum(float(layer.delta_weight(adapter.alphas()).norm() ** 2) for layer in adapter.layers()) ** 0.5
        return {"merged_tasks": len(self.merged_tasks), "delta_fro_norm": round(delta_norm, 6)}

    def export_backbone(self) -> nn.Module:
        adapter = self.adapter
        return adapter.merge_and_unload() if adapter is not None else self.model

    # ---------------------------------------------------------------------------------------- accounting
    def parameter_counts(self) -> dict[str, int]:
        """``stored``: the head and every task's factors (what the checkpoint keeps; the merged weights are
        rebuilt from them and the pretrained backbone)."""
        counts = super().parameter_counts()
        counts["stored"] += sum(int(t.numel()) for tensors, _ in self.merged_tasks for t in tensors.values())
        if self.adapter is not None:
            counts["stored"] += self.adapter.parameter_counts()["stored_total"]
        return counts

    # -------------------------------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        metas = []
        for k, (t_tensors, t_meta) in enumerate(self.merged_tasks):
            tensors.update({f"merged.{k}.{name}": v for name, v in t_tensors.items()})
            metas.append(t_meta)
        meta["merged_tasks"] = metas
        if self.adapter is not None:
            a_tensors, a_meta = self.adapter.adapter_state()
            tensors.update({f"adapter.{k}": v for k, v in a_tensors.items()})
            meta["adapter"] = a_meta
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Replay the saved merges on the pretrained backbone (this method must be freshly built)."""
        if self.merged_tasks or self.adapter is not None:
            raise RuntimeError("lora_merge.load_state needs a freshly built method (the merges are replayed)")
        super().load_state(tensors, meta)
        for k, t_meta in enumerate(meta["merged_tasks"]):
            prefix = f"merged.{k}."
            t_tensors = {name[len(prefix) :]: v for name, v in tensors.items() if name.startswith(prefix)}
            adapter = self._wrap()
            adapter.load_adapter_state(t_tensors, t_meta)
            self.merged_tasks.append(adapter.adapter_state())
            self.model = adapter.merge_and_unload()
        if "adapter" in meta:
            adapter = self._wrap()
            prefix = "adapter."
            adapter.load_adapter_state(
                {name[len(prefix) :]: v for name, v in tensors.items() if name.startswith(prefix)}, meta["adapter"]
            )
            self.model = adapter
