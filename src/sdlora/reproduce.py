"""``sdlora reproduce``: run the paper's SD-LoRA settings over seeds and set the results next to the paper's.

Layout of ``--out DIR``::

    DIR/runs/<preset>/sdlora/seed<seed>/   one ordinary run directory per (preset, seed), run by ``sdlora compare``
    DIR/tables/<table>.md, <table>.csv     one table per paper table (ours, the paper's, the official logs')

Each preset is one :func:`sdlora.compare.run_compare` call (in this process, or under ``torchrun`` with ``--gpus N``),
so a killed reproduction continues where it stopped: finished runs are reused, unfinished ones resume from their
last checkpoint (the run directories' own ``--resume``).

The paper's and the official logs' numbers live in :data:`PAPER_TABLES` only, with their sources in
:data:`REFERENCE_SOURCES`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

__all__ = [
    "PAPER_TABLES",
    "PROTOCOLS",
    "REFERENCE_SOURCES",
    "Reference",
    "Setting",
    "PaperTable",
    "Estimate",
    "plan_text",
    "resolve_tables",
    "run_reproduction",
    "torchrun_command",
    "write_tables",
]

log = logging.getLogger(__name__)

PROTOCOLS = ("official", "paper")
DEFAULT_SEEDS = (1993, 1994, 1995)


@dataclass(frozen=True)
class Reference:
    """The numbers to compare with, in percent.

    Attributes:
        acc, acc_se, aaa, aaa_se: the paper's mean and standard error over 5 runs (seeds 1993-1997).
        log_acc, log_aaa, log_name: the official repository's log for this setting, if there is one.
        log_minutes_per_task: the wall time per task that log shows (unknown GPU, the official code), if any.
    """

    acc: float
    acc_se: float
    aaa: float
    aaa_se: float
    log_acc: float | None = None
    log_aaa: float | None = None
    log_name: str | None = None
    log_minutes_per_task: tuple[float, float] | None = None


@dataclass(frozen=True)
class Setting:
    """One column group of a paper table: a dataset and task count, with one preset per protocol."""

    key: str
    label: str
    dataset: str | None  # the ``sdlora data get`` name; None: no download (tests)
    presets: dict[str, str]  # protocol -> preset name or config file
    reference: Reference


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    settings: tuple[Setting, ...]


REFERENCE_SOURCES = (
    "paper: Wu et al., 'SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning', ICLR 2025, "
    "arXiv 2501.13198 v3, Tables 2, 3 and 6 (mean and standard error over 5 runs, seeds 1993-1997 per SD-Lora-CL "
    "issue #14)",
    "official logs: WuYichen-97/SD-Lora-CL logs/*.log at commit 8bacded (InR-T5, InR-T20 = N=10, InR-T10 = N=20, "
    "InA, C100), final top-1 and its mean over tasks, as parsed in docs/method.md",
)


def _setting(key: str, label: str, dataset: str, ref: Reference) -> Setting:
    return Setting(key, label, dataset, {p: f"{key}_{p}" for p in PROTOCOLS}, ref)


#: The paper's SD-LoRA rows, one entry per paper table. Sources: :data:`REFERENCE_SOURCES`.
PAPER_TABLES: dict[str, PaperTable] = {
    "table2": PaperTable(
        "table2",
        "ImageNet-R, N = 5 / 10 / 20 tasks (paper Table 2)",
        (
            _setting("imagenet_r_n5", "ImageNet-R N=5", "imagenet_r",
                     Reference(79.15, 0.20, 83.01, 0.42, 79.32, 83.00, "InR-T5", (13, 18))),
            _setting("imagenet_r_n10", "ImageNet-R N=10", "imagenet_r",
                     Reference(77.34, 0.35, 82.04, 0.24, 78.17, 82.59, "InR-T20")),
            _setting("imagenet_r_n20", "ImageNet-R N=20", "imagenet_r",
                     Reference(75.26, 0.37, 80.22, 0.72, 75.13, 79.80, "InR-T10")),
        ),
    ),
    "table3": PaperTable(
        "table3",
        "ImageNet-A N = 10, DomainNet N = 5 (paper Table 3)",
        (
            _setting("imagenet_a_n10", "ImageNet-A N=10", "imagenet_a",
                     Reference(55.96, 0.73, 64.95, 1.63, 58.66, 68.77, "InA", (4, 5))),
            _setting("domainnet_n5", "DomainNet N=5", "domainnet", Reference(72.82, 0.37, 78.89, 0.50)),
        ),
    ),
    "table6": PaperTable(
        "table6",
        "CIFAR-100 and CUB-200, 10 tasks (paper Table 6)",
        (
            _setting("cifar100_n10", "CIFAR-100 N=10", "cifar100",
                     Reference(88.01, 0.31, 92.54, 0.18, 87.26, 92.05, "C100", (10, 17))),
            _setting("cub200_n10", "CUB-200 N=10", "cub200", Reference(77.48, 0.20, 85.59, 0.44)),
        ),
    ),
}  # fmt: skip

#: Other names a table may be asked by. ``table1`` is the name issue 23 uses for the ImageNet-R table.
TABLE_ALIASES = {"table1": "table2", "imagenet_r": "table2", "all": "*"}


def resolve_tables(names: Sequence[str], registry: dict[str, PaperTable] | None = None) -> list[PaperTable]:
    """The tables named (all of them for none), in the order given, each once.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    registry = PAPER_TABLES if registry is None else registry
    out: list[PaperTable] = []
    for n in names or ["all"]:
        key = TABLE_ALIASES.get(n, n) if registry is PAPER_TABLES or n == "all" else n
        chosen = list(registry.values()) if key == "*" else [registry[key]] if key in registry else None
        if chosen is None:
            known = ", ".join(list(registry) + (list(TABLE_ALIASES) if registry is PAPER_TABLES else []))
            raise ValueError(f"unknown table {n!r}; known: {known}")
        out += [t for t in chosen if t not in out]
    return out


# --------------------------------------------------------------------------------------------------------------------
# the plan: downloads, disk, runs, a time estimate
# --------------------------------------------------------------------------------------------------------------------

#: Images per split as laid out by ``sdlora data get`` (DomainNet: an assumption, see ``docs/datasets.md``).
DATA_SIZES: dict[str, tuple[int, int, str]] = {
    "cifar100": (50_000, 10_000, "the official split"),
    "imagenet_r": (24_000, 6_000, "CODA-Prompt split files"),
    "imagenet_a": (6_000, 1_500, "7,500 images (ImageNet-A README), 80/20 per class, rounded"),
    "cub200": (5_994, 5_794, "train_test_split.txt"),
    "domainnet": (420_000, 180_000, "ASSUMED: about 0.6 M images (M3SDA paper) split 70/30; not counted"),
}
#: Forward GFLOPs of ViT-B/16 at 224 px per image (the paper's Table 5 lists 35.12 for SD-LoRA's inference).
VIT_B16_GFLOPS = 35.12
#: A training step costs about 3 forward passes (forward, activation gradients, LoRA weight gradients, bounded above
#: by full training's usual 3x).
TRAIN_FORWARDS = 3.0


@dataclass(frozen=True)
class Estimate:
    """A projected GPU time, with the assumptions it rests on (nothing here was measured on a GPU)."""

    tflops: float = 250.0  # sustained bf16 TFLOP/s assumed for one H100-class GPU (about 25% of its dense peak)
    decode_per_s: float = 1500.0  # images/s the data loader is assumed to decode and augment (8 workers, JPEG)

    def run_hours(self, cfg: Any, dataset: str | None) -> tuple[float, float]:
        """``(flop_bound, at_log_pace)`` hours of one run: the FLOP/data-loading bound, and the same images at the
        official logs' training pace (:func:`official_log_pace`)."""
        train, test, _ = DATA_SIZES.get(dataset or "", (0, 0, ""))
        tasks = _num_tasks(cfg)
        train_images = train * cfg.train.epochs
        # after task t the test images of tasks 0..t are evaluated: (T+1)/2 test sets on average
        eval_images = test * (tasks + 1) / 2
        flops = (TRAIN_FORWARDS * train_images + eval_images) * VIT_B16_GFLOPS * 1e9
        gpu_s = flops / (self.tflops * 1e12)
        io_s = (train_images + eval_images) / self.decode_per_s if dataset != "cifar100" else 0.0
        return max(gpu_s, io_s) / 3600.0, train_images / official_log_pace() / 3600.0


#: Epochs per task of the official logs with wall times (all three ran 20; docs/method.md §5.4).
LOG_EPOCHS = 20


def official_log_pace() -> float:
    """Training images per second (evaluation included) implied by the official logs' minutes per task: the median
    over the logs that show them, at the middle of each range."""
    rates = []
    for table in PAPER_TABLES.values():
        for s in table.settings:
            m = s.reference.log_minutes_per_task
            if m and s.dataset in DATA_SIZES:
                tasks = int(s.key.rsplit("_n", 1)[1])
                seconds = (m[0] + m[1]) / 2 * 60 * tasks
                rates.append(DATA_SIZES[s.dataset][0] * LOG_EPOCHS / seconds)
    return statistics.median(rates)


#: Classes of the paper datasets (for the task count of the estimate).
NUM_CLASSES = {"cifar100": 100, "imagenet_r": 200, "imagenet_a": 200, "cub200": 200, "domainnet": 345}


def _num_tasks(cfg: Any) -> int:
    sc = cfg.scenario
    n = NUM_CLASSES.get(cfg.data.name, cfg.data.synthetic_classes if cfg.data.name == "synthetic" else sc.init_cls)
    tasks = 1 + max(0, (n - sc.init_cls) // sc.increment)
    return min(tasks, sc.num_tasks) if sc.num_tasks else tasks


@dataclass
class PlannedRun:
    setting: Setting
    protocol: str
    preset: str
    seed: int
    run_dir: Path
    state: str
    hours: tuple[float, float]


def _data_root(root: Path, dataset: str | None) -> Path | None:
    from .data.fetch import DATASET_SPECS

    return root / DATASET_SPECS[dataset].folder if dataset in DATASET_SPECS else None


def plan_runs(
    tables: list[PaperTable],
    root: Path,
    seeds: Sequence[int],
    out: Path,
    protocols: Sequence[str],
    overrides: Sequence[str],
    estimate: Estimate,
) -> list[PlannedRun]:
    """Every (setting, protocol, seed) run, its directory and state, and its projected hours; configs are checked."""
    from .compare import run_dir_for
    from .methods import load_run_config
    from .rundir import run_state

    runs: list[PlannedRun] = []
    for table in tables:
        for s in table.settings:
            for p in protocols:
                if p not in s.presets:
                    continue
                for seed in seeds:
                    cfg, _ = load_run_config(s.presets[p], _overrides(root, s, overrides) + [f"seed={seed}"])
                    run_dir = run_dir_for(out / "runs" / _preset_dir(s.presets[p]), "sdlora", seed)
                    state = run_state(run_dir)
                    hours = (0.0, 0.0) if state == "finished" else estimate.run_hours(cfg, s.dataset)
                    runs.append(PlannedRun(s, p, s.presets[p], seed, run_dir, state, hours))
    return runs


def _preset_dir(preset: str) -> str:
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def _overrides(root: Path, s: Setting, extra: Sequence[str]) -> list[str]:
    data_root = _data_root(root, s.dataset)
    return ([f"data.root={data_root}"] if data_root is not None else []) + list(extra)


def plan_text(tables: list[PaperTable], runs: list[PlannedRun], root: Path, estimate: Estimate, gpus: int) -> str:
    """What ``--dry-run`` prints: downloads and disk, the runs, the projected GPU hours and where they come from."""
    from .data.fetch import DATASET_SPECS, is_complete

    lines = ["Downloads (sdlora data get NAME --root ROOT):"]
    datasets = sorted({s.dataset for t in tables for s in t.settings if s.dataset in DATASET_SPECS})
    disk = 0
    for d in datasets:
        spec = DATASET_SPECS[d]
        if is_complete(root, d):
            lines.append(f"  {d}: present in {root / spec.folder}")
            continue
        if (root / spec.folder).exists():
            lines.append(f"  {d}: {root / spec.folder} exists (not made by 'sdlora data get'; used as it is)")
            continue
        need = spec.download_size + spec.extracted_size
        disk += need
        lines.append(
            f"  {d}: {len(spec.sources)} file(s), about {spec.download_size / 1e9:.1f} GB to download, "
            f"{need / 1e9:.1f} GB on disk with the archives kept; split: {spec.split}"
        )
    lines.append(f"Disk needed for data: about {disk / 1e9:.1f} GB (approximate archive sizes, see docs/datasets.md)")
    todo = [r for r in runs if r.state != "finished"]
    lines.append(f"Runs: {len(runs)} ({len(runs) - len(todo)} finished and reused, {len(todo)} to run or resume)")
    for r in runs:
        lines.append(f"  {r.preset} seed {r.seed}: {r.state:10s} {r.hours[0]:5.2f}-{r.hours[1]:5.2f} h  {r.run_dir}")
    low, high = sum(r.hours[0] for r in runs), sum(r.hours[1] for r in runs)
    wall = f"; on {gpus} GPUs about 1/{gpus} of that in wall time" if gpus > 1 else ""
    lines += [
        f"Projected GPU time: {low:.1f} to {high:.1f} GPU-hours on one GPU{wall}. PROJECTED, NOT MEASURED: this "
        "project has no GPU measurement yet (benchmarks/README.md).",
        f"  low: FLOP counts ({VIT_B16_GFLOPS} GFLOPs per ViT-B/16 forward at 224 px, the paper's Table 5; a training "
        f"image = {TRAIN_FORWARDS:g} forwards) at an assumed {estimate.tflops:g} TFLOP/s sustained, or an assumed "
        f"{estimate.decode_per_s:g} images/s of JPEG decoding if slower; an optimistic bound.",
        f"  high: the same training images at the official logs' pace, {official_log_pace():.0f} images/s (the "
        "median over the logs below; the official code, an unknown GPU).",
    ]
    for t in PAPER_TABLES.values():
        for s in t.settings:
            m = s.reference.log_minutes_per_task
            if m:
                lines.append(
                    f"  For comparison, the official log {s.reference.log_name} ({s.label}) shows {m[0]:g}-{m[1]:g} "
                    "min per task with the official code on an unknown GPU."
                )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------------------------


def torchrun_command(preset: str, seeds: Sequence[int], out: Path, overrides: Sequence[str], gpus: int) -> list[str]:
    """The ``torchrun`` command line that runs one preset's seeds on ``gpus`` processes of this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    cmd += ["-m", "sdlora", "compare", preset, "--methods", "sdlora", "--seeds", ",".join(map(str, seeds))]
    cmd += ["--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _run_preset(preset: str, seeds: Sequence[int], out: Path, overrides: list[str], gpus: int) -> None:
    from .compare import run_compare

    if gpus > 1:
        cmd = torchrun_command(preset, seeds, out, overrides, gpus)
        log.info("reproduce: %s", " ".join(cmd))
        done = subprocess.run(cmd, check=False)  # noqa: S603 - our own interpreter and arguments
        if done.returncode != 0:
            raise RuntimeError(f"torchrun for {preset} exited with {done.returncode}; run the same command to resume")
        return
    run_compare(preset, ["sdlora"], list(seeds), out, overrides)


def _check_data(tables: list[PaperTable], root: Path) -> None:
    for t in tables:
        for s in t.settings:
            data_root = _data_root(root, s.dataset)
            if data_root is not None and not data_root.exists():
                raise FileNotFoundError(
                    f"{s.label}: {data_root} not found; get it with 'sdlora data get {s.dataset} --root {root}'"
                )


def run_reproduction(
    tables: list[PaperTable],
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    protocols: Sequence[str] = PROTOCOLS,
    gpus: int = 1,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    estimate: Estimate | None = None,
) -> str:
    """Plan, then (unless ``dry_run``) run every preset of ``tables`` and write one result table per paper table.

    Returns:
        The plan (``dry_run``) or the markdown of the tables written to ``OUT/tables``.

    Raises:
        ValueError: bad seeds, protocols or GPU count. ConfigError: a preset does not load.
        FileNotFoundError: a dataset folder is missing (not for ``dry_run``).
        RunError / RuntimeError: runs failed; the tables of what finished are written first.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {list(seeds)}")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise ValueError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    root_p, out_p = Path(root).expanduser(), Path(out)
    est = estimate or Estimate()
    runs = plan_runs(tables, root_p, seeds, out_p, protocols, overrides, est)
    if dry_run:
        return plan_text(tables, runs, root_p, est, gpus)
    _check_data(tables, root_p)
    failures: list[str] = []
    for preset in dict.fromkeys(r.preset for r in runs):
        setting = next(r.setting for r in runs if r.preset == preset)
        try:
            _run_preset(
                preset, seeds, out_p / "runs" / _preset_dir(preset), _overrides(root_p, setting, overrides), gpus
            )
        except (FileNotFoundError, ValueError):
            raise  # bad input: the same for every run
        except Exception as e:
            log.error("reproduce: %s failed: %s: %s", preset, type(e).__name__, e)
            failures.append(f"{preset}: {type(e).__name__}: {e}")
    text = write_tables(tables, runs, out_p / "tables", seeds)
    if failures:
        raise RuntimeError(
            f"{len(failures)} preset(s) failed (tables of the rest in {out_p / 'tables'}); run the same command "
            "again to resume:\n  " + "\n  ".join(failures)
        )
    return text


# --------------------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------------------


def _ours(runs: list[PlannedRun], preset: str, metric: str) -> list[float]:
    from .results import load_results

    values = []
    for r in runs:
        if r.preset != preset:
            continue
        try:
            res = load_results(r.run_dir)
        except (FileNotFoundError, ValueError):
            continue
        if res.get("status") == "finished":
            values.append(float(res[metric]))
    return values


def _mark(values: list[float], ref: float | None) -> str:
    """Whether ``ref`` lies within the seeds' range [min, max] of ``values``."""
    if ref is None or not values:
        return ""
    if len(values) < 2:
        return "n/a (1 seed)"
    return "within" if min(values) <= ref <= max(values) else "outside"


def _row(s: Setting, protocol: str, metric: str, values: list[float], n_seeds: int) -> dict[str, str]:
    ref = s.reference
    paper, se = (ref.acc, ref.acc_se) if metric == "acc" else (ref.aaa, ref.aaa_se)
    logged = ref.log_acc if metric == "acc" else ref.log_aaa
    mean = statistics.fmean(values) if values else math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0

    def diff(x: float | None) -> str:
        return f"{mean - x:+.2f}" if values and x is not None else ""

    return {
        "setting": s.label,
        "protocol": protocol,
        "metric": "Acc" if metric == "acc" else "AAA",
        "ours": f"{mean:.2f} ± {std:.2f}" if values else "not finished",
        "seeds": f"{len(values)}/{n_seeds}",
        "range": f"{min(values):.2f}-{max(values):.2f}" if values else "",
        "paper": f"{paper:.2f} ({se:.2f})",
        "ours - paper": diff(paper),
        "paper vs seeds": _mark(values, paper),
        "official log": f"{logged:.2f} ({ref.log_name})" if logged is not None else "",
        "ours - log": diff(logged),
        "log vs seeds": _mark(values, logged),
    }


def write_tables(tables: list[PaperTable], runs: list[PlannedRun], out: Path, seeds: Sequence[int]) -> str:
    """Write ``<table>.md`` and ``<table>.csv`` into ``out`` for each table; returns the markdown of all of them."""
    parts: list[str] = []
    for t in tables:
        rows = [
            _row(s, p, m, _ours(runs, s.presets[p], m), len(seeds))
            for s in t.settings
            for p in s.presets
            if any(r.preset == s.presets[p] for r in runs)
            for m in ("acc", "aaa")
        ]
        if not rows:
            continue
        cols = list(rows[0])
        md = [
            f"## {t.title}",
            "",
            f"ours: mean ± sample std over seeds {', '.join(map(str, seeds))}; paper: mean (standard error) over 5 "
            "runs; 'within' = the reference lies inside the range [min, max] of our seeds.",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
            *("| " + " | ".join(r[c] for c in cols) + " |" for r in rows),
            "",
            "Sources: " + "; ".join(REFERENCE_SOURCES),
            "",
        ]
        text = "\n".join(md)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{t.name}.md", text)
        atomic_write_text(out / f"{t.name}.csv", buf.getvalue())
        parts.append(text)
    return "\n".join(parts)
