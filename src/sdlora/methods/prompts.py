"""Prompt-pool baselines of the SD-LoRA paper's comparison: L2P (Wang et al., CVPR 2022) and CODA-Prompt (Smith
et al., CVPR 2023), both by prefix-tuning a frozen timm ViT (``methods/prefix.py``).

Both methods read a *query* from the frozen backbone first: the pooled feature (the final [CLS] token for timm
ViTs) of the image without prompts, computed without gradient. The query picks or composes the prompts, which are
then prepended to the keys and values of the attention of the configured blocks in a second, prompted forward
pass; its pooled feature goes to the usual growing linear head (``Method.head``). Prediction therefore costs two
backbone passes (``inference_passes = 2``, reported in the compare table).

Only the prompts, their keys (CODA: and attention vectors) and the current task's head block learn; the backbone
stays bit-identical. The loss is the engine's cross-entropy (the current task's logits after the first task,
``loss_scope: current``, as both official codes mask earlier classes) plus the method's own term, which
``forward`` records for the batch and ``training_loss`` adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import Backbone
from ..config import MethodConfig
from ..data import Batch
from .base import Method, TaskContext, register_method
from .prefix import PrefixAttention, inject_prefix_attention

__all__ = ["CodaPrompt", "CodaPromptOptions", "L2P", "L2POptions", "PromptMethod", "gram_schmidt_extend"]


def _check_pool(pool_size: int, prompt_length: int) -> None:
    if pool_size <= 0:
        raise ValueError(f"pool_size must be positive, got {pool_size}")
    if prompt_length <= 0 or prompt_length % 2:
        raise ValueError(
            f"prompt_length must be a positive even number (half key, half value prefixes), got {prompt_length}"
        )


def _check_layers(layers: list[int]) -> None:
    if not layers:
        raise ValueError("layers must name at least one block (0-based indices)")
    if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
        raise ValueError(f"layers must be distinct non-negative block indices, got {layers}")


class PromptMethod(Method):
    """Shared machinery: prefix wrappers in ``options.layers``, the no-grad query pass, the prompted pass.

    Subclasses implement :meth:`prefixes` (query -> per-layer key/value prefixes and an auxiliary loss) and the
    prompt state.
    """

    inference_passes = 2  # the query pass and the prompted pass

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.model.requires_grad_(False)
        self.layers: list[int] = list(self.options.layers)
        self._wrappers = inject_prefix_attention(self.model, self.layers, self.name)
        dims = {w.dim for w in self._wrappers}
        if len(dims) != 1:
            raise ValueError(f"{self.name}: the prompted blocks have different key/value widths {sorted(dims)}")
        self.prompt_dim = dims.pop()
        self.key_dim = backbone.num_features  # keys live in the query (pooled feature) space
        self._aux_loss: Tensor | None = None

    # ------------------------------------------------------------------------------------------ forward
    @torch.no_grad()
    def query(self, x: Batch) -> Tensor:
        """The frozen backbone's pooled feature of ``x`` without prompts (first of the two passes)."""
        for w in self._wrappers:
            w.clear()
        return self.model(x).detach()

    def prefixes(self, q: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """Per prompted layer (in ``self.layers`` order) the key and value prefixes (B, P, D) for queries ``q``
        (B, key_dim), and the auxiliary loss of the batch (None outside training)."""
        raise NotImplementedError

    def features(self, x: Batch) -> Tensor:
        q = self.query(x)
        pre, aux = self.prefixes(q)
        try:
            for w, (pk, pv) in zip(self._wrappers, pre, strict=True):
                w.set_prefix(pk, pv)
            feats = self.model(x)
        finally:
            for w in self._wrappers:
                w.clear()
        # Recorded for training_loss (same autograd graph); only while training.
        self._aux_loss = aux if self.training else None
        return feats

    def training_loss(self, logits: Tensor, y: Tensor, ctx: TaskContext) -> Tensor:
        loss = super().training_loss(logits, y, ctx)
        aux, self._aux_loss = self._aux_loss, None
        return loss if aux is None else loss + aux

    def export_backbone(self) -> nn.Module:
        raise ValueError(
            f"{self.name} keeps its prompts outside the backbone weights (they are chosen per input from the "
            "frozen model's query), so there is no merged backbone to export; the checkpoint holds the prompts, "
            "keys and head"
        )

    @torch.no_grad()
    def merge_for_inference(self) -> None:
        """Nothing to fold: the prompts are chosen per input (the query pass), so inference keeps both passes."""
        self.eval()

    def prompted_blocks(self) -> list[PrefixAttention]:
        return list(self._wrappers)


# ================================================================================================ L2P
@dataclass
class L2POptions:
    """L2P options (``method.options`` of ``l2p``).

    Defaults are those of L2P as prefix-tuning ("L2P++", CODA-Prompt's re-implementation, Smith et al. CVPR 2023,
    ``experiments/imagenet-r.sh``: ``--prompt_param 30 20 -1``): a pool of 30 prompts of length 20 in block 0, the
    top 5 chosen per image. L2P itself (Wang et al. CVPR 2022, Sec. 5) used a pool of 10 prompts of 5 tokens
    prepended to the input; see docs/baselines.md for the difference.

    Attributes:
        pool_size: prompts in the pool (M), shared by all tasks.
        prompt_length: vectors per prompt; the first half are key prefixes, the second half value prefixes
            (so a prompt adds ``prompt_length / 2`` keys and values), as CODA-Prompt splits them.
        top_k: prompts chosen per image (N): the keys most cosine-similar to the query.
        layers: blocks (0-based) whose attention gets the chosen prompts (each layer has its own pool and keys).
        key_loss_weight: lambda of L2P's surrogate loss (L2P Eq. 5): ``lambda * sum over chosen keys of
            (1 - cos(q, k))``, averaged over the batch; 0.1 as the official configuration's pull-constraint
            coefficient.
    """

    pool_size: int = 30
    prompt_length: int = 20
    top_k: int = 5
    layers: list[int] = field(default_factory=lambda: [0])
    key_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        _check_pool(self.pool_size, self.prompt_length)
        if not 0 < self.top_k <= self.pool_size:
            raise ValueError(f"top_k must be in 1..pool_size ({self.pool_size}), got {self.top_k}")
        _check_layers(self.layers)
        if self.key_loss_weight < 0:
            raise ValueError(f"key_loss_weight must be >= 0, got {self.key_loss_weight}")


@register_method("l2p")
class L2P(PromptMethod):
    """L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022) with prefix-tuning.

    Per prompted layer, a pool of ``pool_size`` prompts ``P_m`` (length x D) with keys ``k_m`` (key_dim). For a
    query q the ``top_k`` keys of highest cosine similarity are chosen (L2P Eq. 3-4) and their prompts,
    concatenated, become the prefix. The pool is shared by all tasks and keeps learning in every task (L2P
    freezes nothing; forgetting is limited by the query-key matching). Loss: cross-entropy plus the surrogate
    ``lambda * mean_b sum_{chosen m} (1 - cos(q_b, k_m))`` that pulls the chosen keys to their queries (Eq. 5).
    Prompts and keys start uniform in [0, 1) as in the official code. ``end_task`` reports how often each
    prompt of the first prompted layer was chosen during the task (``selected``).
    """

    options_class = L2POptions
    selected: Tensor  # buffer: how often each prompt of the first prompted layer was chosen in this task

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        o: L2POptions = self.options
        ref = next(self.model.parameters())
        kw: dict[str, Any] = {"device": ref.device, "dtype": torch.float32}
        self.prompts = nn.ParameterList(
            nn.Parameter(torch.rand(o.pool_size, o.prompt_length, self.prompt_dim, **kw)) for _ in self.layers
        )
        self.keys = nn.ParameterList(nn.Parameter(torch.rand(o.pool_size, self.key_dim, **kw)) for _ in self.layers)
        self.register_buffer("selected", torch.zeros(o.pool_size, dtype=torch.long, device=ref.device))

    def select(self, q: Tensor, layer: int = 0) -> tuple[Tensor, Tensor]:
        """Indices (B, top_k) of the chosen prompts of prompted layer ``layer`` (position in ``layers``) and the
        cosine similarities (B, pool) of the queries to all keys."""
        sim = F.normalize(q.float(), dim=-1) @ F.normalize(self.keys[layer], dim=-1).t()
        return sim.topk(self.options.top_k, dim=1).indices, sim

    def prefixes(self, q: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        o: L2POptions = self.options
        half = o.prompt_length // 2
        out: list[tuple[Tensor, Tensor]] = []
        aux: Tensor | None = None
        b = q.shape[0]
        for layer in range(len(self.layers)):
            idx, sim = self.select(q, layer)
            # Indexing the whole pool keeps every prompt in the graph (zero gradient for the ones not chosen),
            # which DDP needs when not every prompt is chosen in a batch.
            chosen = self.prompts[layer][idx]  # (B, k, L, D)
            out.append(
                (
                    chosen[:, :, :half].reshape(b, -1, self.prompt_dim),
                    chosen[:, :, half:].reshape(b, -1, self.prompt_dim),
                )
            )
            if self.training:
                # L2P Eq. 5 surrogate: pull the chosen keys towards their queries.
                term = (1.0 - sim.gather(1, idx)).sum() / b
                aux = term if aux is None else aux + term
                if layer == 0:
                    self.selected += torch.bincount(idx.flatten(), minlength=o.pool_size)
        if aux is not None:
            aux = aux * o.key_loss_weight
        return out, aux

    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        self.selected.zero_()

    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        counts = ctx.all_reduce(self.selected.clone())
        return {"selected": [int(c) for c in counts.tolist()]}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["stored"] += sum(p.numel() for p in (*self.prompts, *self.keys))
        return counts

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        for i in range(len(self.layers)):
            tensors[f"l2p.prompts.{i}"] = self.prompts[i].detach().cpu().contiguous()
            tensors[f"l2p.keys.{i}"] = self.keys[i].detach().cpu().contiguous()
        meta["l2p"] = {"layers": list(self.layers)}
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        if meta["l2p"]["layers"] != self.layers:
            raise ValueError(f"l2p state was saved for layers {meta['l2p']['layers']}, this config has {self.layers}")
        for i in range(len(self.layers)):
            self.prompts[i].copy_(tensors[f"l2p.prompts.{i}"])
            self.keys[i].copy_(tensors[f"l2p.keys.{i}"])


# ======================================================================================== CODA-Prompt
@dataclass
class CodaPromptOptions:
    """CODA-Prompt options (``method.options`` of ``coda_prompt``).

    Defaults: the official ImageNet-R setting (GT-RIPL/CODA-Prompt ``experiments/imagenet-r.sh``: ``--prompt_param
    100 8 0.0``, prompts in blocks 0-4, ``models/zoo.py``); its CIFAR-100 script uses ``ortho_weight`` 0.1.

    Attributes:
        pool_size: prompt components in all (M), split evenly over the tasks: task t owns components
            ``[t * M // T, (t + 1) * M // T)`` (T = tasks of the scenario; the remainder is unused, as upstream).
        prompt_length: vectors per component; first half key prefixes, second half value prefixes.
        layers: blocks (0-based) that get prompts (each has its own components, keys and attention vectors).
        ortho_weight: weight of the orthogonality penalty ``mean((K K^T - I)^2)`` on the keys, the attention
            vectors and the flattened components in use (Sec. 3.3 of the paper; 0 disables it).
    """

    pool_size: int = 100
    prompt_length: int = 8
    layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    ortho_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_pool(self.pool_size, self.prompt_length)
        _check_layers(self.layers)
        if self.ortho_weight < 0:
            raise ValueError(f"ortho_weight must be >= 0, got {self.ortho_weight}")


def gram_schmidt_extend(previous: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` new unit vectors (n x d), orthogonal to each other and to the rows of ``previous`` (m x d), from
    Gaussian draws (CODA-Prompt's per-task re-initialisation of new components).

    When the d-dimensional space has no room left (m + n > d), the directions that do not fit are Gaussian draws
    orthogonalised against what they can be, then normalised (their orthogonality is impossible, not skipped).
    """
    d = previous.shape[1]
    prev = previous.detach().double()
    basis = prev.new_zeros(d, 0)  # orthonormal columns spanning the rows of ``previous``
    if prev.shape[0]:
        qr = torch.linalg.qr(prev.t())
        r = qr.R.diagonal().abs()
        # Keep only directions the previous rows really span (drop numerically null ones).
        basis = qr.Q[:, r > 1e-10 * max(float(r.max()), 1.0)]
    out = []
    for _ in range(n):
        v = torch.randn(d, dtype=torch.float64, generator=generator).to(prev.device)
        if basis.shape[1] < d:
            for _ in range(2):  # twice: classical Gram-Schmidt re-orthogonalised ("twice is enough")
                v = v - basis @ (basis.t() @ v)
        u = v / v.norm()
        out.append(u)
        if basis.shape[1] < d:
            basis = torch.cat([basis, u[:, None]], 1)
    if not out:
        return previous.new_zeros(0, d)
    return torch.stack(out).to(previous.dtype)


@register_method("coda_prompt")
class CodaPrompt(PromptMethod):
    """CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
    Continual Learning", CVPR 2023).

    Per prompted layer: components ``P_m`` (length x D), keys ``K_m`` and attention vectors ``A_m`` (key_dim).
    The prompt of an image is a weighted sum of the components (paper Eq. 4-5)::

        alpha_m = cos(q * A_m, K_m)        (q the query, * elementwise: A_m attends to query features)
        p       = sum_m alpha_m P_m        (no top-k: every component in use contributes)

    Task t adds its own block of components (Gram-Schmidt-initialised against the earlier ones, as the current
    official code does per task) and trains only those, with every earlier block frozen (buffers); during task t
    and afterwards the components of tasks <= t are used. Loss: cross-entropy plus ``ortho_weight`` times the
    orthogonality penalty over the keys, attention vectors and flattened components in use (Eq. 7).
    """

    options_class = CodaPromptOptions

    def __init__(self, cfg: MethodConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        ref = next(self.model.parameters())
        n_layers = len(self.layers)
        o: CodaPromptOptions = self.options
        kw: dict[str, Any] = {"device": ref.device, "dtype": torch.float32}
        for i in range(n_layers):
            self.register_buffer(f"frozen_p_{i}", torch.zeros(0, o.prompt_length, self.prompt_dim, **kw))
            self.register_buffer(f"frozen_k_{i}", torch.zeros(0, self.key_dim, **kw))
            self.register_buffer(f"frozen_a_{i}", torch.zeros(0, self.key_dim, **kw))
        self.cur_p = nn.ParameterList()
        self.cur_k = nn.ParameterList()
        self.cur_a = nn.ParameterList()
        self.per_task = 0  # components per task (pool_size // num_tasks), fixed at the first task
        self.num_tasks_begun = 0

    # ------------------------------------------------------------------------------------ components
    def frozen(self, kind: str, layer: int) -> Tensor:
        return getattr(self, f"frozen_{kind}_{layer}")

    def components(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """(P (M', L, D), K (M', key_dim), A (M', key_dim)) in use at ``layer``: frozen blocks, then the current."""
        parts = [(self.frozen("p", layer), self.frozen("k", layer), self.frozen("a", layer))]
        if len(self.cur_p):
            parts.append((self.cur_p[layer], self.cur_k[layer], self.cur_a[layer]))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat([p[j] for p in parts], 0) for j in range(3))  # type: ignore[return-value]

    def weights(self, q: Tensor, layer: int) -> Tensor:
        """alpha (B, M'): cosine of the attended query ``q * A_m`` with key ``K_m`` (paper Eq. 4)."""
        _, k, a = self.components(layer)
        attended = q.float()[:, None, :] * a[None]  # (B, M', key_dim)
        return (F.normalize(attended, dim=-1) * F.normalize(k, dim=-1)[None]).sum(-1)

    def prefixes(self, q: Tensor) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        o: CodaPromptOptions = self.options
        half = o.prompt_length // 2
        out: list[tuple[Tensor, Tensor]] = []
        aux: Tensor | None = None
        for layer in range(len(self.layers)):
            p, k, a = self.components(layer)
            if p.shape[0] == 0:
                raise RuntimeError("coda_prompt has no prompt components yet: begin_task() adds them")
            prompt = torch.einsum("bm,mld->bld", self.weights(q, layer), p)  # paper Eq. 5
            out.append((prompt[:, :half], prompt[:, half:]))
            if self.training and o.ortho_weight > 0:
                term = _ortho_penalty(k) + _ortho_penalty(a) + _ortho_penalty(p.flatten(1))
                aux = term if aux is None else aux + term
        if aux is not None:
            aux = aux * o.ortho_weight
        return out, aux

    # ------------------------------------------------------------------------------------- lifecycle
    def begin_task(self, ctx: TaskContext) -> None:
        super().begin_task(ctx)
        o: CodaPromptOptions = self.options
        if self.per_task == 0:
            self.per_task = o.pool_size // ctx.num_tasks
            if self.per_task == 0:
                raise ValueError(
                    f"coda_prompt: pool_size {o.pool_size} is smaller than the {ctx.num_tasks} tasks; "
                    "set method.options.pool_size to at least the number of tasks"
                )
        if len(self.cur_p):
            raise RuntimeError("begin_task() called twice: call end_task() first")
        n = self.per_task
        for layer in range(len(self.layers)):
            p_old, k_old, a_old = (self.frozen(kind, layer) for kind in ("p", "k", "a"))
            # New components orthogonal to the earlier ones (CODA-Prompt re-initialises each task's block so).
            p_new = gram_schmidt_extend(p_old.flatten(1), n).reshape(n, *p_old.shape[1:])
            self.cur_p.append(nn.Parameter(p_new.contiguous()))
            self.cur_k.append(nn.Parameter(gram_schmidt_extend(k_old, n)))
            self.cur_a.append(nn.Parameter(gram_schmidt_extend(a_old, n)))
        self.num_tasks_begun += 1

    @torch.no_grad()
    def end_task(self, ctx: TaskContext) -> dict[str, Any]:
        """Freeze the task's components (they stay in use, without gradient, in every later task)."""
        for layer in range(len(self.layers)):
            for kind, cur in (("p", self.cur_p), ("k", self.cur_k), ("a", self.cur_a)):
                setattr(self, f"frozen_{kind}_{layer}", torch.cat([self.frozen(kind, layer), cur[layer].detach()], 0))
        self.cur_p, self.cur_k, self.cur_a = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        return {
            "components": int(self.frozen("p", 0).shape[0]),
            "per_task": self.per_task,
        }

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        for layer in range(len(self.layers)):
            counts["stored"] += sum(int(t.numel()) for t in self.components(layer))
        return counts

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, meta = super().state()
        in_task = len(self.cur_p) > 0
        for layer in range(len(self.layers)):
            for kind in ("p", "k", "a"):
                tensors[f"coda.frozen_{kind}.{layer}"] = self.frozen(kind, layer).detach().cpu().contiguous()
            if in_task:
                for kind, cur in (("p", self.cur_p), ("k", self.cur_k), ("a", self.cur_a)):
                    tensors[f"coda.cur_{kind}.{layer}"] = cur[layer].detach().cpu().contiguous()
        meta["coda_prompt"] = {
            "layers": list(self.layers),
            "per_task": self.per_task,
            "num_tasks_begun": self.num_tasks_begun,
            "in_task": in_task,
        }
        return tensors, meta

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        super().load_state(tensors, meta)
        saved = meta["coda_prompt"]
        if saved["layers"] != self.layers:
            raise ValueError(
                f"coda_prompt state was saved for layers {saved['layers']}, this config has {self.layers}"
            )
        ref = self.frozen("p", 0)
        for layer in range(len(self.layers)):
            for kind in ("p", "k", "a"):
                setattr(self, f"frozen_{kind}_{layer}", tensors[f"coda.frozen_{kind}.{layer}"].to(ref))
        self.cur_p, self.cur_k, self.cur_a = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        if saved["in_task"]:
            for layer in range(len(self.layers)):
                for kind, cur in (("p", self.cur_p), ("k", self.cur_k), ("a", self.cur_a)):
                    cur.append(nn.Parameter(tensors[f"coda.cur_{kind}.{layer}"].to(ref)))
        self.per_task = int(saved["per_task"])
        self.num_tasks_begun = int(saved["num_tasks_begun"])


def _ortho_penalty(t: Tensor) -> Tensor:
    """``mean((T T^T - I)^2)`` over the rows of ``t`` (CODA-Prompt's orthogonality regulariser)."""
    eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
    return ((t @ t.t() - eye) ** 2).mean()
