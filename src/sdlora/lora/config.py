"""Configuration of the SD-LoRA adapter (one typed dataclass, validated).

The paper (Wu et al., ICLR 2025) and its official code differ in four ways that change numbers
(`docs/method.md`): the direction normaliser, whether the current task's component is normalised while it
trains, the initial magnitude, and whether earlier magnitudes carry over to the next task. ``protocol``
sets all four at once; any field given explicitly overrides the preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Normaliser = Literal["frobenius_of_product", "product_of_frobenius"]

#: Rank schedule of SD-LoRA-RR (paper §3.5 Eq. 6, §4.1): r=10 for tasks 1-4, 8 for tasks 5-8, 6 afterwards.
RR_SCHEDULE: tuple[int, ...] = (10, 10, 10, 10, 8, 8, 8, 8, 6)

#: The values each protocol preset resolves to.
PROTOCOLS: dict[str, dict[str, object]] = {
    # Paper: Eq. 3-4 normalise every component by ||A_k B_k||_F, magnitudes start at 1 (§3.3, Finding 2);
    # the paper does not say magnitudes are reset, so they persist across tasks.
    "paper": {
        "normaliser": "frobenius_of_product",
        "normalise_current": True,
        "alpha_init": 1.0,
        "alpha_carry_over": True,
    },
    # Official code (WuYichen-97/SD-Lora-CL @8bacded, backbone/lora.py): old components divided by
    # ||B||_F * ||A||_F, the current one unnormalised, every magnitude re-created at 0.8 when a task starts.
    "official": {
        "normaliser": "product_of_frobenius",
        "normalise_current": False,
        "alpha_init": 0.8,
        "alpha_carry_over": False,
    },
}


@dataclass
class AdapterConfig:
    """How SD-LoRA adapts a backbone.

    Attributes:
        protocol: preset for ``normaliser``, ``normalise_current``, ``alpha_init`` and ``alpha_carry_over``
            (``"paper"`` or ``"official"``); explicit values of those fields win over the preset.
        normaliser: ``"frobenius_of_product"`` divides a direction by ||B A||_F (paper Eq. 3);
            ``"product_of_frobenius"`` by ||B||_F * ||A||_F (official code). ``None``: from ``protocol``.
        normalise_current: whether the component being learned is normalised during training
            (paper Eq. 4: yes; official: no). With B initialised to zero the normalised direction is 0/0 at
            the first step; the denominator is then ``sqrt(n^2 + norm_eps^2)``, which makes the first gradient
            on B large: use a scale-invariant optimiser (Adam, as the paper does). ``None``: from ``protocol``.
        alpha_init: initial value of every new magnitude (paper 1.0, official 0.8). ``None``: from ``protocol``.
        alpha_carry_over: keep learned magnitudes when the next task starts (``True``) or re-create all of them
            at ``alpha_init`` (official code). ``None``: from ``protocol``.
        rank: rank of each task's component when ``rank_schedule`` is not given.
        rank_schedule: rank per task (0-based); the last entry repeats. SD-LoRA-RR uses ``RR_SCHEDULE``.
        targets: fnmatch patterns of module names to adapt (``"blocks.*.attn.qkv"``); ``None``: the backbone's
            default targets.
        projections: which slices of a fused ``qkv`` projection get components (paper §4.1: query and value).
            Ignored for separate projections, which are adapted whole.
        per_layer_magnitudes: one magnitude per task per adapted projection instead of one per task shared by
            every layer (the paper shares them, §4.1).
        components: ``"per_task"`` adds a component per task (SD-LoRA); ``"first_only"`` learns a direction in
            the first task only and afterwards trains its magnitude (paper Table 4, row 1); ``"single"`` keeps
            one component learning across all tasks (Table 4 row 2; with fixed magnitude 1 and no
            normalisation it is plain sequential LoRA).
        train_magnitudes: whether magnitudes are learned at all.
        train_old_magnitudes: whether the magnitudes of earlier tasks keep learning (SD-LoRA: yes; Table 4
            row 3, "no rescaling": no).
        kd: SD-LoRA-KD (paper §3.5, Eq. 7-8, Algorithm 1): at the end of a task, absorb a new direction that
            earlier ones explain into their magnitudes and drop it.
        kd_tau: residual threshold of KD (paper: 9e-4).
        kd_squared_residual: compare the squared residual ||d - D c||^2 (as the LibContinual port does)
            instead of the residual norm ||d - D c|| (Algorithm 1) with ``kd_tau``.
        compute: how frozen components are evaluated: ``"factored"`` (one low-rank product over the stacked
            factors), ``"fold"`` (fold them into the weight every step), ``"loop"`` (one product per
            component: the naive reference, for tests and benchmarks).
        norm_eps: stabiliser of the current component's normaliser (see ``normalise_current``).
    """

    protocol: Literal["paper", "official"] = "official"
    normaliser: Normaliser | None = None
    normalise_current: bool | None = None
    alpha_init: float | None = None
    alpha_carry_over: bool | None = None
    rank: int = 10
    rank_schedule: list[int] | None = None
    targets: list[str] | None = None
    projections: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "v"])
    per_layer_magnitudes: bool = False
    components: Literal["per_task", "first_only", "single"] = "per_task"
    train_magnitudes: bool = True
    train_old_magnitudes: bool = True
    kd: bool = False
    kd_tau: float = 9e-4
    kd_squared_residual: bool = False
    compute: Literal["factored", "fold", "loop"] = "factored"
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {self.protocol!r}")
        if self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if self.rank_schedule is not None:
            if len(self.rank_schedule) == 0:
                raise ValueError("rank_schedule must not be empty (use null for a constant rank)")
            bad = [r for r in self.rank_schedule if r <= 0]
            if bad:
                raise ValueError(f"rank_schedule entries must be positive, got {self.rank_schedule}")
        if not self.projections:
            raise ValueError("projections must name at least one of q, k, v")
        if len(set(self.projections)) != len(self.projections):
            raise ValueError(f"projections has duplicates: {self.projections}")
        if self.alpha_init is not None and self.alpha_init <= 0:
            raise ValueError(f"alpha_init must be positive, got {self.alpha_init}")
        if self.kd_tau < 0:
            raise ValueError(f"kd_tau must be >= 0, got {self.kd_tau}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if self.kd and self.components != "per_task":
            raise ValueError("kd needs components='per_task' (it compares a task's direction with earlier ones)")
        if self.targets is not None and not self.targets:
            raise ValueError("targets must be null (backbone default) or a non-empty list of patterns")

    def resolved(self) -> AdapterConfig:
        """Return a copy with every ``None`` protocol field filled from the ``protocol`` preset."""
        preset = PROTOCOLS[self.protocol]
        values: dict[str, Any] = {
            k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in preset.items()
        }
        return dataclasses.replace(self, **values)

    def rank_for_task(self, task: int) -> int:
        """Rank of task ``task`` (0-based): ``rank_schedule[task]`` (last entry repeats) or ``rank``."""
        if task < 0:
            raise ValueError(f"task index must be >= 0, got {task}")
        if self.rank_schedule is None:
            return self.rank
        return self.rank_schedule[min(task, len(self.rank_schedule) - 1)]
