"""SD-LoRA over a whole backbone: injection, shared magnitudes, task lifecycle, KD, merge, adapter state.

Usage::

    model = SDLoRAModel(backbone, AdapterConfig(protocol="official"), default_targets=["blocks.*.attn.qkv"])
    for task in range(num_tasks):
        model.begin_task()                         # new trainable (A_t, B_t) everywhere, magnitudes set up
        opt = torch.optim.SGD(model.trainable_parameters(), lr=8e-3, momentum=0.9)
        ...                                        # train with model(x)
        report = model.end_task()                  # freeze the direction; the function stays as trained
    plain = model.merge_and_unload()               # same class as the backbone, W0 + sum_k alpha_k dir_k folded in

Evaluation path. ``end_task`` never changes the function: under the official protocol the just-trained component
keeps acting unnormalised (``alpha_t B_t A_t``, what the official code evaluates after a task) and is normalised,
with every magnitude re-created, only when the next ``begin_task`` starts (official code: the backbone is rebuilt
at the start of each task); under the paper protocol the current component is normalised while it trains, so
freezing it is continuous anyway. Whatever is evaluated, merged or exported between tasks is therefore the state
the chosen protocol evaluates.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from typing import Any

import torch
from torch import Tensor, nn

from .config import RUNTIME_FIELDS, AdapterConfig
from .layer import LowRankUnit, SDLoRALinear, component_norm
from .surgery import find_linears, is_fused_qkv, linear_summary, qkv_slices, replace_submodule

__all__ = ["SDLoRAModel", "ADAPTER_FORMAT"]

ADAPTER_FORMAT = "sdlora-adapter/2"
#: Earlier formats ``load_adapter_state`` still reads: /1 had no pending flags and called ``kd_increment`` "extra".
_OLD_FORMATS = ("sdlora-adapter/1",)


class SDLoRAModel(nn.Module):
    """A backbone with SD-LoRA components on its attention projections (paper §3.2-3.5).

    The backbone is modified in place: every target ``nn.Linear`` is replaced by an ``SDLoRALinear`` wrapping
    it, and every backbone parameter is frozen. The magnitudes (one per task, shared by all adapted layers,
    paper §4.1; or one per task per projection with ``per_layer_magnitudes``) are owned here as two tensors,
    ``alpha_prev`` (earlier tasks) and ``alpha_cur`` (current task), each a Parameter when it trains and a
    buffer when it does not.

    Args:
        backbone: the model to adapt (e.g. a timm ViT); forward(x) of this object calls it.
        config: adapter behaviour; resolved against its protocol preset.
        default_targets: module-name patterns used when ``config.targets`` is None.

    Raises:
        ValueError: a target pattern matches no ``nn.Linear`` (the message lists candidates).
    """

    # A buffer or a Parameter depending on the phase (see _set_magnitudes); declared for the type checker.
    alpha_prev: Tensor
    alpha_cur: Tensor

    def __init__(self, backbone: nn.Module, config: AdapterConfig, default_targets: list[str] | None = None) -> None:
        super().__init__()
        self.config = config.resolved()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        targets = self.config.targets or default_targets
        if not targets:
            raise ValueError(
                "no adapter targets: the backbone names no default query/value projections, so set "
                "method.adapter.targets to fnmatch patterns of its attention projections; its nn.Linear modules "
                f"are (layer indices as *): {linear_summary(backbone)}"
            )
        self.targets = list(targets)
        self._layer_names: list[str] = []
        self._inject()
        self.num_tasks = 0  # tasks begun so far (the current one included while in a task)
        self.in_task = False
        self.task_ranks: list[int] = []  # rank added per task (0: no new component)
        self.kd_log: list[dict[str, Any]] = []
        self.num_slots = 0
        ref = next(iter(self.layers())).base.weight
        shape = (self.num_units, 0) if self.config.per_layer_magnitudes else (0,)
        self.register_buffer("alpha_prev", torch.zeros(shape, device=ref.device, dtype=torch.float32))
        self.register_buffer("alpha_cur", torch.zeros(shape, device=ref.device, dtype=torch.float32))

    # ----------------------------------------------------------------------------------------- injection
    def _inject(self) -> None:
        cfg = self.config
        index = 0
        for name in find_linears(self.backbone, self.targets):
            base = self.backbone.get_submodule(name)
            assert isinstance(base, nn.Linear)
            # A fused qkv Linear gets one unit per adapted projection (its row slice), any other Linear one unit.
            fused = is_fused_qkv(name, base)
            units = qkv_slices(base, cfg.projections) if fused else [("out", 0, base.out_features)]
            layer = SDLoRALinear(
                base, units, index, cfg.compute, str(cfg.normaliser), bool(cfg.normalise_current), cfg.norm_eps
            )
            index += len(units)
            replace_submodule(self.backbone, name, layer)
            self._layer_names.append(name)
        self.num_units = index

    def layers(self) -> list[SDLoRALinear]:
        """The adapted layers, in injection order."""
        return [self.backbone.get_submodule(n) for n in self._layer_names]  # type: ignore[misc]

    def named_units(self) -> list[tuple[str, LowRankUnit]]:
        """``("blocks.0.attn.qkv.q", unit)`` for every adapted projection, in index order."""
        return [(f"{n}.{u.name}", u) for n, layer in zip(self._layer_names, self.layers()) for u in layer.units]

    # ------------------------------------------------------------------------------------------ forward
    def alphas(self) -> Tensor:
        """All magnitudes, shape (S,) or (units, S) with per-layer magnitudes: ``[alpha_prev, alpha_cur]``."""
        return torch.cat([self.alpha_prev, self.alpha_cur], dim=-1)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and self.merged and any(p.requires_grad for p in self.parameters()):
            # The merged layers compute base(x) only: the adapter parameters would silently get no gradient.
            raise RuntimeError(
                "SDLoRAModel is merged, so its trainable adapter parameters would get no gradient: call unmerge() "
                "before training (or run the forward under torch.no_grad() for inference)"
            )
        alphas = self.alphas()  # built once per forward, shared by every layer (paper §4.1)
        sources = (self.alpha_prev, self.alpha_cur)  # what alphas is made of: keys the layers' fold caches
        layers = self.layers()
        for layer in layers:
            layer.alphas = alphas
            layer.alpha_sources = sources
        try:
            return self.backbone(x, *args, **kwargs)
        finally:
            for layer in layers:
                layer.alphas = None
                layer.alpha_sources = None

    # ---------------------------------------------------------------------------------------- lifecycle
    def _adds_component(self, task: int) -> bool:
        return self.config.components == "per_task" or task == 0

    def begin_task(self, rank: int | None = None) -> int:
        """Start the next task: the protocol's transition, then a new trainable component and the magnitudes.

        The transition (official code: what rebuilding the backbone at the start of a task does): every
        component still acting unnormalised is divided by its normaliser from now on, the magnitudes are
        re-created at ``alpha_init`` unless ``alpha_carry_over``, and components SD-LoRA-KD decided to absorb
        are folded into the earlier magnitudes of their unit with the magnitude they now have (so the function
        is the one the kept component would give, up to the fit residual). Then each unit gets a new component
        (A kaiming-uniform, B zero), which leaves the function unchanged.

        Args:
            rank: rank of the new component; default from ``config.rank_for_task`` (SD-LoRA-RR schedule).

        Returns:
            The rank added (0 when the configuration adds no component for this task).
        """
        if self.in_task:
            raise RuntimeError("begin_task() called twice: call end_task() before starting another task")
        self._refuse_merged("begin_task")
        cfg = self.config
        task = self.num_tasks
        rank = cfg.rank_for_task(task) if rank is None else rank
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        old = self.alphas().detach()
        added = 0
        if self._adds_component(task):
            slot = self.num_slots
            self.num_slots += 1
            for _, unit in self.named_units():
                unit.add_current(rank, slot)
            added = rank
        elif cfg.components == "single":
            pass  # the one component keeps learning
        # Magnitudes: new slots start at alpha_init; old ones keep their values only with alpha_carry_over
        # (the official code re-creates all of them at 0.8 every task, lora.py L326-328).
        values = torch.full(
            (*old.shape[:-1], self.num_slots),
            float(cfg.alpha_init),  # type: ignore[arg-type]  # resolved(): the protocol preset fills it
            device=old.device,
            dtype=torch.float32,
        )
        if cfg.alpha_carry_over:
            values[..., : old.shape[-1]] = old
        self._transition(values)
        self._set_magnitudes(values, training=True)
        self.task_ranks.append(added)
        self.num_tasks += 1
        self.in_task = True
        return added

    def _transition(self, alphas: Tensor) -> None:
        """Normalise pending components and carry out deferred KD absorptions, with the new magnitudes."""
        for _, unit in self.named_units():
            if not unit.num_frozen:
                continue
            absorb = bool(unit.pending_absorb[-1])
            unit.pending_norm.zero_()
            if absorb:
                coef, _ = self._kd_fit(unit)
                self._absorb_last(unit, coef, alphas)
            if bool(unit.pending_absorb.any()):
                raise RuntimeError(f"unit {unit.name}: a KD absorption is pending on an older component")

    def _refuse_merged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"{what}() on a merged SDLoRAModel: call unmerge() first (merged models do not train)")

    def _set_magnitudes(self, values: Tensor, training: bool) -> None:
        cfg = self.config
        prev, cur = values[..., :-1].clone(), values[..., -1:].clone()
        for name, value, trains in (
            ("alpha_prev", prev, training and cfg.train_magnitudes and cfg.train_old_magnitudes),
            ("alpha_cur", cur, training and cfg.train_magnitudes),
        ):
            if name in self._parameters:
                del self._parameters[name]
            if name in self._buffers:
                del self._buffers[name]
            if trains and value.numel():
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @torch.no_grad()
    def end_task(self) -> dict[str, Any]:
        """Finish the current task: freeze its direction in every unit, leaving the function as trained.

        Under the official protocol (``normalise_current: false``) the frozen component keeps acting
        unnormalised until the next ``begin_task``; under the paper protocol it was normalised while training
        and is frozen as ``alpha_t / n_t`` (continuous up to ``norm_eps``). SD-LoRA-KD (paper Eq. 7-8,
        Algorithm 1) decides here which units' new direction the earlier ones explain; the absorption itself
        is done now when the component is already normalised (paper protocol, as Algorithm 1) and at the next
        ``begin_task`` otherwise, so that the state evaluated after the task is the one that was trained.

        Returns:
            ``{"task", "rank", "frozen", "absorbed", "dropped_zero"}`` (+ ``"kd_absorption"``,
            ``"kd_residual_min"``, ``"kd_residual_median"`` with KD): how many units kept a new frozen direction,
            how many (will) absorb it into earlier magnitudes, how many had a zero product; ``"kd_absorption"``
            says when absorbed directions are folded in (``"end_task"`` or ``"next begin_task"``); the residuals
            are the smallest and the median fit residual over the units (the value compared with ``kd_tau``;
            ``None`` before there is an earlier direction to fit with).
        """
        if not self.in_task:
            raise RuntimeError("end_task() called without begin_task()")
        self._refuse_merged("end_task")
        cfg = self.config
        task = self.num_tasks - 1
        report: dict[str, Any] = {
            "task": task,
            "rank": self.task_ranks[-1],
            "frozen": 0,
            "absorbed": 0,
            "dropped_zero": 0,
        }
        pending = not cfg.normalise_current
        residuals: list[float] = []  # KD fit residuals of the units that fitted one (compared with kd_tau)
        # "single" keeps its one component learning; "first_only" has nothing new after the first task.
        if cfg.components != "single" and self._adds_component(task):
            alphas = self.alphas().detach()
            for _, unit in self.named_units():
                if not unit.has_current:
                    continue
                if not unit.freeze_current(str(cfg.normaliser), pending_norm=pending):
                    report["dropped_zero"] += 1
                    continue
                if cfg.kd and unit.num_frozen > 1:
                    coef, residual = self._kd_fit(unit)
                    residuals.append(residual)
                    if residual <= cfg.kd_tau:
                        report["absorbed"] += 1
                        if pending:
                            unit.pending_absorb[-1] = True  # folded in at the next begin_task
                        else:
                            self._absorb_last(unit, coef, alphas)
                        continue
                report["frozen"] += 1
        # Magnitudes stay as they are (buffers between tasks); begin_task decides what carries over.
        self._set_magnitudes(self.alphas().detach(), training=False)
        self.in_task = False
        if cfg.kd:
            report["kd_absorption"] = "next begin_task" if pending else "end_task"
            # How close the units came to kd_tau, so a run that never absorbs says by how much it missed.
            report["kd_residual_min"] = min(residuals) if residuals else None
            report["kd_residual_median"] = statistics.median(residuals) if residuals else None
            self.kd_log.append(
                {
                    "task": task,
                    "absorbed": report["absorbed"],
                    "kept": report["frozen"],
                    "residual_min": report["kd_residual_min"],
                    "residual_median": report["kd_residual_median"],
                }
            )
        return report

    def _kd_fit(self, unit: LowRankUnit, component: int = -1) -> tuple[Tensor, float]:
        """Least-squares fit of one frozen direction of ``unit`` by the ones before it (paper Eq. 7).

        d = M_j / ||M_j||_F (j = ``component``, the newest by default) is fitted by D_k = M_k / n_k, k < j:
        c = argmin ||d - sum_k c_k D_k||_F, in float64 from r x r Gram blocks (no dense d_out x d_in product).
        Returns ``(c, residual)`` with the residual ``||d - D c||_F`` (d has unit norm, so it is relative),
        squared when ``kd_squared_residual``.
        """
        cfg = self.config
        n = unit.num_frozen
        if not -n <= component < n:
            raise IndexError(f"{unit.name}: component {component} out of range ({n} frozen)")
        j = component % n
        if j == 0:
            raise ValueError(f"{unit.name}: the first frozen direction has no earlier ones to be fitted by")
        keep = sum(unit.comp_ranks[:j])
        stop = keep + unit.comp_ranks[j]
        a_all, b_all = unit.A_frozen.double(), unit.B_frozen.double()
        a_t, b_t = a_all[keep:stop], b_all[:, keep:stop]
        a_f, b_f = a_all[:keep], b_all[:, :keep]
        m_norm = float(component_norm(b_t, a_t, "frobenius_of_product"))
        owner = unit.rank_owner[:keep]
        proj = torch.zeros(j, keep, dtype=torch.float64, device=owner.device)
        proj[owner, torch.arange(keep, device=owner.device)] = 1.0
        norms = unit.norms[:j].double()
        # <M_k, M_l>_F = sum((B_k^T B_l) * (A_k A_l^T)), aggregated from rank rows to components.
        gram_m = proj @ ((b_f.t() @ b_f) * (a_f @ a_f.t())) @ proj.t()
        gram = gram_m / (norms[:, None] * norms[None, :])
        rhs = (proj @ ((b_f.t() @ b_t) * (a_f @ a_t.t())).sum(1)) / (norms * m_norm)
        # The system is C x C (C = earlier components): solve it on the CPU, where the rank-revealing "gelsd"
        # driver exists (CUDA offers only "gels", which assumes full rank).
        gram, rhs = gram.cpu(), rhs.cpu()
        coef = torch.linalg.lstsq(gram, rhs[:, None], driver="gelsd").solution[:, 0]
        res_sq = float((1.0 - 2.0 * coef @ rhs + coef @ gram @ coef).clamp_min(0.0))
        return coef, (res_sq if cfg.kd_squared_residual else res_sq**0.5)

    @torch.no_grad()
    def direction_residuals(self) -> dict[str, list[float]]:
        """SD-LoRA-KD's fit residual (paper Eq. 7) of every frozen direction by the ones before it in its unit.

        For each unit, entry ``j - 1`` is the residual of frozen component ``j`` (j >= 1) fitted by components
        ``0..j-1``, the value SD-LoRA-KD compares with ``kd_tau`` (squared when ``kd_squared_residual``). It is
        computed for any adapter, KD or not, so a trained plain SD-LoRA shows how much of each new direction its
        earlier ones would have explained. Component j is task j's direction only while the unit absorbed or
        dropped (zero product) nothing (``kd_log`` and ``end_task``'s report say). Under the official protocol,
        between ``end_task`` and the next ``begin_task``, the newest component is still in the stack even when it
        is marked for absorption, and is reported like the others (pending normalisation changes its scale, not
        its direction).
        """
        return {
            name: [self._kd_fit(unit, j)[1] for j in range(1, unit.num_frozen)] for name, unit in self.named_units()
        }

    def _absorb_last(self, unit: LowRankUnit, coef: Tensor, alphas: Tensor) -> None:
        """SD-LoRA-KD's absorption (paper Eq. 8, Algorithm 1 line 12) of the unit's newest frozen component.

        The component contributes s_t M_t with s_t its current scale (``(alpha_t + kd_t) / n_t``, or without
        ``/ n_t`` while unnormalised), i.e. kappa * d with kappa = s_t ||M_t||_F; with d ~ sum_k c_k D_k this is
        sum_k kappa c_k D_k, so kappa * c_k is added to the earlier components' magnitude increments and the
        component is removed. Eq. 8 writes alpha_k + c_k, which is the same when the direction is normalised by
        ||M_t||_F with alpha_t = 1; kappa keeps the layer's function in every other case. The increments are
        stored per unit because the magnitudes are shared across layers.
        """
        last = unit.num_frozen - 1
        a_t = unit.A_frozen[unit.A_frozen.shape[0] - unit.comp_ranks[-1] :].double()
        b_t = unit.B_frozen[:, unit.B_frozen.shape[1] - unit.comp_ranks[-1] :].double()
        m_norm = float(component_norm(b_t, a_t, "frobenius_of_product"))
        scale = float(unit.frozen_scales(alphas)[last])
        kappa = scale * m_norm
        unit.kd_increment[:last] += (kappa * coef).to(unit.kd_increment.device, unit.kd_increment.dtype)
        unit.pop_last()

    # ----------------------------------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that learn in the current task: current (A_t, B_t) of every unit and the magnitudes."""
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, Any]:
        """Parameter accounting (counts of scalars).

        Returns:
            ``trainable_adapter``: current-task LoRA factors (ViT-B/16, r=10 on q,v of 12 blocks: 368,640);
            ``trainable_magnitudes``: magnitudes that learn now; ``stored_per_task``: frozen factor scalars kept
            per task slot; ``stored_total``: every adapter scalar held (frozen factors, norms, KD increments,
            current factors, magnitudes).
        """
        trainable_adapter = 0
        stored_per_slot = [0] * self.num_slots
        stored_total = 0
        for _, u in self.named_units():
            if u.A_cur is not None and u.B_cur is not None:
                n = u.A_cur.numel() + u.B_cur.numel()
                stored_total += n
                if u.A_cur.requires_grad:
                    trainable_adapter += n
            for c, r in enumerate(u.comp_ranks):
                stored_per_slot[int(u.slots[c])] += r * (u.in_features + u.out_features)
            stored_total += u.A_frozen.numel() + u.B_frozen.numel() + u.norms.numel() + u.kd_increment.numel()
        mags = self.alpha_prev.numel() + self.alpha_cur.numel()
        trainable_mags = sum(t.numel() for t in (self.alpha_prev, self.alpha_cur) if t.requires_grad)
        return {
            "trainable_adapter": trainable_adapter,
            "trainable_magnitudes": trainable_mags,
            "stored_per_task": stored_per_slot,
            "stored_total": stored_total + mags,
        }

    # ------------------------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self) -> None:
        """Fold all components into the wrapped weights in place, for inference at the cost of the bare
        backbone. ``unmerge`` restores W0 exactly. Training while merged is refused: a forward with autograd
        while parameters require grad, ``begin_task``, ``end_task`` and ``load_adapter_state`` raise."""
        alphas = self.alphas().detach()
        for layer in self.layers():
            layer.merge(alphas)

    @torch.no_grad()
    def unmerge(self) -> None:
        for layer in self.layers():
            layer.unmerge()

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.layers())

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """A copy of the backbone, same class, with ``W0 + sum_k alpha_k dir_k`` folded into each target
        weight and every adapter module replaced by a plain ``nn.Linear``. This object is left unchanged, so
        its ``state_dict()`` keys are those of the original backbone (e.g. loadable by
        ``timm.create_model(name, pretrained=False)``)."""
        alphas = self.alphas().detach()
        return self._plain_copy({n: layer.delta_weight(alphas) for n, layer in zip(self._layer_names, self.layers())})

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """A copy of the backbone as it was before injection (plain ``nn.Linear`` layers holding W0): the base
        model that :meth:`lora_factors` applies to. This object is left unchanged."""
        return self._plain_copy({})

    def _plain_copy(self, deltas: dict[str, Tensor]) -> nn.Module:
        plain = copy.deepcopy(self.backbone)
        for name in self._layer_names:
            wrapped = plain.get_submodule(name)
            assert isinstance(wrapped, SDLoRALinear)
            base = wrapped.base
            if wrapped.merged:  # the copy carries W0 in _w0
                assert wrapped._w0 is not None
                base.weight.copy_(wrapped._w0)
            if name in deltas:
                base.weight.add_(deltas[name].to(base.weight))
            replace_submodule(plain, name, base)
        return plain

    @torch.no_grad()
    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The adapter's function as one plain LoRA per adapted layer: ``{layer name: (A, B)}`` with
        ``W = W0 + B @ A`` (``SDLoRALinear.lora_factors``), over the backbone returned by :meth:`unload`.

        After task t each layer's update is ``sum_k s_k B_k A_k``, the scales s_k being those the forward uses
        (magnitude, KD increment and normaliser of every component; the current one's as it is now), so
        ``B = [s_1 B_1 ... s_t B_t]`` and ``A = [A_1; ...; A_t]`` have rank ``sum_k r_k``. Layers without any
        component are left out. Tensors are detached copies on the adapter's device.
        """
        alphas = self.alphas().detach()
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in zip(self._layer_names, self.layers()):
            factors = layer.lora_factors(alphas)
            if factors is not None:
                out[name] = factors
        return out

    # ------------------------------------------------------------------------------------ adapter state
    def adapter_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything that defines the adapter, without the backbone weights.

        Returns:
            ``(tensors, meta)``: tensors for safetensors (contiguous, CPU) and a JSON-able description (config,
            ranks, slots, task counters, KD log) that ``load_adapter_state`` checks against the backbone.
        """
        tensors: dict[str, Tensor] = {}
        units_meta = []
        for name, u in self.named_units():
            units_meta.append(
                {
                    "name": name,
                    "start": u.start,
                    "stop": u.stop,
                    "in_features": u.in_features,
                    "comp_ranks": list(u.comp_ranks),
                    "cur_rank": 0 if u.A_cur is None else int(u.A_cur.shape[0]),
                    "cur_slot": u.cur_slot,
                }
            )
            tensors[f"{name}.A_frozen"] = u.A_frozen
            tensors[f"{name}.B_frozen"] = u.B_frozen
            tensors[f"{name}.norms"] = u.norms
            tensors[f"{name}.kd_increment"] = u.kd_increment
            tensors[f"{name}.pending_norm"] = u.pending_norm
            tensors[f"{name}.pending_absorb"] = u.pending_absorb
            tensors[f"{name}.slots"] = u.slots
            if u.A_cur is not None and u.B_cur is not None:
                tensors[f"{name}.A_cur"] = u.A_cur
                tensors[f"{name}.B_cur"] = u.B_cur
        tensors["alpha_prev"] = self.alpha_prev
        tensors["alpha_cur"] = self.alpha_cur
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {
            "format": ADAPTER_FORMAT,
            "config": dataclasses.asdict(self.config),
            "targets": self.targets,
            "num_tasks": self.num_tasks,
            "num_slots": self.num_slots,
            "in_task": self.in_task,
            "task_ranks": list(self.task_ranks),
            "kd_log": list(self.kd_log),
            "units": units_meta,
        }
        return tensors, meta

    @torch.no_grad()
    def load_adapter_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore a state from ``adapter_state`` into this (freshly injected) model.

        Raises:
            ValueError: the state is of another format, was made with another adapter configuration, or its
                units do not match this backbone (names, slices or input sizes differ).
        """
        fmt = meta.get("format")
        if fmt != ADAPTER_FORMAT and fmt not in _OLD_FORMATS:
            raise ValueError(f"not an sdlora adapter state (format {fmt!r}, want {ADAPTER_FORMAT})")
        self._refuse_merged("load_adapter_state")
        mine = dataclasses.asdict(self.config)
        theirs = meta.get("config", {})
        # ``compute`` only chooses how the same function is evaluated: a state loads under any of its values.
        diffs = [
            f"{k}: saved {theirs.get(k)!r}, here {mine[k]!r}"
            for k in mine
            if k not in RUNTIME_FIELDS and theirs.get(k) != mine[k]
        ]
        if diffs:
            raise ValueError("adapter state was saved with another adapter config: " + "; ".join(diffs))
        units = self.named_units()
        saved = meta["units"]
        here = [(n, u.start, u.stop, u.in_features) for n, u in units]
        there = [(m["name"], m["start"], m["stop"], m["in_features"]) for m in saved]
        if here != there:
            mismatch = next(((h, t) for h, t in zip(here, there) if h != t), None)
            raise ValueError(
                f"adapter state does not fit this backbone: {len(there)} saved units vs {len(here)} here"
                + (f"; first difference: saved {mismatch[1]} vs here {mismatch[0]}" if mismatch else "")
            )
        for (name, u), m in zip(units, saved):
            get = tensors.__getitem__
            a, b = get(f"{name}.A_frozen"), get(f"{name}.B_frozen")
            if a.shape[1:] != u.A_frozen.shape[1:] or b.shape[:1] != u.B_frozen.shape[:1]:
                raise ValueError(f"{name}: saved factors of shape {tuple(a.shape)}/{tuple(b.shape)} do not fit")
            flags: tuple[Tensor | None, Tensor | None] = (None, None)
            if fmt == ADAPTER_FORMAT:
                kd_inc = get(f"{name}.kd_increment")
                flags = (get(f"{name}.pending_norm"), get(f"{name}.pending_absorb"))
            else:  # sdlora-adapter/1: every frozen component was normalised at end_task
                kd_inc = get(f"{name}.extra")
            u.set_frozen(a, b, get(f"{name}.norms"), get(f"{name}.slots"), kd_inc, m["comp_ranks"], *flags)
            u.drop_current()
            if m["cur_rank"]:
                u.add_current(m["cur_rank"], m["cur_slot"])
                assert u.A_cur is not None and u.B_cur is not None
                u.A_cur.copy_(get(f"{name}.A_cur"))
                u.B_cur.copy_(get(f"{name}.B_cur"))
        self.num_tasks = int(meta["num_tasks"])
        self.num_slots = int(meta["num_slots"])
        self.task_ranks = list(meta["task_ranks"])
        self.kd_log = list(meta["kd_log"])
        self.in_task = bool(meta["in_task"])
        values = torch.cat([tensors["alpha_prev"], tensors["alpha_cur"]], -1)
        # With no task yet both halves are empty and stay buffers, as _set_magnitudes registers them.
        self._set_magnitudes(values.to(self.alpha_prev.device, torch.float32), training=self.in_task)
