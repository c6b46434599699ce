"""``sdlora diagnose RUN_DIR``: where class-incremental errors come from, per head block.

For a run's checkpoint after task N, every seen task's test images are scored and summarised per head block
(block b = the label positions of task b):

* ``acc``: class-incremental accuracy (argmax over all seen classes), what ``results.json`` reports;
* ``within``: task-aware accuracy (argmax inside the task's own block): how well the features and that block
  separate the task's classes when the task is known;
* ``to block b``: share of the task's images predicted into block b (a block-level confusion matrix);
* ``max logit b``: mean over the task's images of the largest logit in block b.

``within`` high but ``acc`` low, with images pulled to one block whose maximum logits sit above the others,
means the errors come from calibration between head blocks (what the current-task-only loss never trains), not
from forgetting in the backbone (docs/method.md, "When SD-LoRA helps and when it does not"). For a run with a
calibrated head (``method.calib``) the table is that head's (the one the run evaluated; a "block" is then the
classes of a task), and the trained linear head's accuracy on the same features is printed below it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import batch_to

__all__ = ["block_statistics", "diagnose_run", "format_diagnosis"]


@torch.no_grad()
def block_statistics(logits: torch.Tensor, labels: torch.Tensor, bounds: list[tuple[int, int]]) -> dict[str, Any]:
    """Per-block statistics of ``logits`` (samples x seen classes) for samples of one task.

    Args:
        logits: scores over all seen classes, label-position order.
        labels: label positions of the samples (all inside one block).
        bounds: ``[start, end)`` of every block.

    Returns:
        ``{"n", "acc", "within", "to_block", "max_logit", "mean_logit"}`` (percentages for the first four
        shares, plain means for the logits); ``within`` uses the block that contains the labels.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("no samples")
    own = [b for b, (s, e) in enumerate(bounds) if s <= int(labels[0]) < e]
    if len(own) != 1 or not all(bounds[own[0]][0] <= int(v) < bounds[own[0]][1] for v in labels):
        raise ValueError("block_statistics expects the samples of one task")
    s, e = bounds[own[0]]
    pred = logits.argmax(1)
    block_of = torch.empty(logits.shape[1], dtype=torch.long)
    for b, (bs, be) in enumerate(bounds):
        block_of[bs:be] = b
    pred_block = block_of[pred]
    return {
        "n": n,
        "acc": 100.0 * float((pred == labels).float().mean()),
        "within": 100.0 * float((logits[:, s:e].argmax(1) + s == labels).float().mean()),
        "to_block": [100.0 * float((pred_block == b).float().mean()) for b in range(len(bounds))],
        "max_logit": [float(logits[:, bs:be].max(1).values.mean()) for bs, be in bounds],
        "mean_logit": [float(logits[:, bs:be].mean()) for bs, be in bounds],
    }


def _load_checkpoint_for(out: Path, task: int | None, completed: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The committed checkpoint (``task`` None) or the one after ``task`` (1-based), which must be committed."""
    from .rundir import RunError, load_checkpoint, load_committed_checkpoint

    if task is None:
        loaded = load_committed_checkpoint(out)
        if loaded is None:
            raise RunError(f"{out} has no checkpoint yet (checkpoints/task_*.json)")
        return loaded[1], loaded[2]
    if not 1 <= task <= completed:
        raise RunError(f"--task {task}: {out} has completed {completed} task(s); give 1..{completed}")
    ck = out / "checkpoints" / f"task_{task - 1:03d}.json"
    if not ck.exists():
        raise RunError(
            f"{out} has no checkpoint after task {task} ({ck}): a run keeps one per finished task unless its "
            "train.keep_checkpoints removed the older ones; omit --task to diagnose the last one"
        )
    return load_checkpoint(ck)


def diagnose_run(
    run_dir: str | os.PathLike, task: int | None = None, device: str = "cpu", batch_size: int = 256
) -> dict[str, Any]:
    """Score every seen task's test images with the run's checkpoint after ``task`` (1-based; default: the last one
    ``results.json`` commits to).

    The test data of each task is what ``sdlora learn`` evaluates on (:func:`sdlora.learn.task_test_sources`): the
    run's own test split for the scenario's tasks, the recorded folder for learned ones. A task whose test data is
    missing or has changed gets ``{"n": 0, "skipped": reason}`` instead of statistics.

    Returns:
        ``{"run", "method", "after_task", "num_tasks", "tasks": [block_statistics(...) per seen task]}``.

    Raises:
        RunError: not a run directory, or no checkpoint for that task.
    """
    from .backbones import create_backbone
    from .learn import load_test_sources, task_test_sources
    from .methods import create_method, load_run_config
    from .results import load_results
    from .rundir import RunError, seed_everything

    out = Path(run_dir)
    if not (out / "config.yaml").exists():
        raise RunError(f"{out} is not a run directory (no config.yaml)")
    results = load_results(out)
    tensors, record = _load_checkpoint_for(out, task, int(results["completed_tasks"]))
    cfg, _ = load_run_config(str(out / "config.yaml"), saved_run=True)
    after = int(record["task"]) + 1
    dev = torch.device(device)
    seed_everything(cfg.seed)
    method = create_method(cfg.method, create_backbone(cfg.backbone, cfg.data.image_size)).to(dev)
    method.load_state(tensors, record["method"])
    method.eval()
    tokenizer = None
    if results["backbone"].get("modality") == "text":
        from .backbones.hf import load_tokenizer

        tokenizer = load_tokenizer(cfg.backbone)
    seen = {**results, "tasks": results["tasks"][:after]}
    sources = task_test_sources(cfg, seen, text=tokenizer is not None)
    mean, std = results["backbone"]["mean"], results["backbone"]["std"]
    datasets, skipped = load_test_sources(cfg, sources, mean, std, tokenizer)
    # With method.calib the run predicts with the calibrated head; the trained linear head is scored beside it on
    # the same features, for comparison.
    calibrated = method.calib is not None and method.calib.num_classes == method.head.num_classes
    logits, trained, labels = [], [], []
    for ds in datasets:
        for x, y in DataLoader(ds, batch_size=batch_size, shuffle=False):
            xb = batch_to(x, dev)  # a tensor, or a dict of them (text)
            logits.append(method(xb).float().cpu())
            if calibrated:
                trained.append(method.head(method.features(xb)).float().cpu())
            labels.append(y)
    all_logits = torch.cat(logits) if logits else torch.zeros(0, 0)
    all_trained = torch.cat(trained) if trained else None
    all_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    sizes = [len(ids) for ids in seen["tasks"]]
    bounds = [(sum(sizes[:t]), sum(sizes[: t + 1])) for t in range(after)]
    reasons = dict(skipped)
    rows: list[dict[str, Any]] = []
    trained_rows: list[dict[str, Any]] = []
    for t, (s, e) in enumerate(bounds):
        mask = (all_labels >= s) & (all_labels < e)
        if t in reasons or not bool(mask.any()):
            rows.append({"n": 0, "skipped": reasons.get(t, "no test samples")})
            if all_trained is not None:
                trained_rows.append(rows[-1])
            continue
        rows.append(block_statistics(all_logits[mask], all_labels[mask], bounds))
        if all_trained is not None:
            trained_rows.append(block_statistics(all_trained[mask], all_labels[mask], bounds))
    head = "trained linear head"
    if calibrated:
        c = method.calib_config
        head = f"calibrated head: {c.head}" + (f" (projection {c.projection_dim})" if c.projection_dim else "")
        head += ", on frozen and adapted features" if c.features == "both" else ""
        head += f", drift compensation {c.drift}"
    return {
        "run": str(out),
        "method": cfg.method.name,
        "after_task": after,
        "num_tasks": int(results["num_tasks"]),
        "head": head,
        "tasks": rows,
        "trained_head_tasks": trained_rows,
    }


def format_diagnosis(d: dict[str, Any]) -> str:
    """A plain-text table of ``diagnose_run``'s result."""
    k = d["after_task"]
    head = [f"run {d['run']} | method {d['method']} | after task {k} of {d['num_tasks']}"]
    blocks = " ".join(f"{'b' + str(b + 1):>6}" for b in range(k))
    head.append(
        f"test of  {'n':>5} {'acc':>6} {'within':>6} | predicted into block (%) {blocks} | max logit per block"
    )
    lines = head
    for t, r in enumerate(d["tasks"]):
        if r.get("skipped"):
            lines.append(f"task {t + 1:<3} not evaluated: {r['skipped']}")
            continue
        shares = " ".join(f"{v:6.1f}" for v in r["to_block"])
        logits = " ".join(f"{v:7.2f}" for v in r["max_logit"])
        lines.append(
            f"task {t + 1:<3} {r['n']:>5} {r['acc']:6.1f} {r['within']:6.1f} | {' ' * 24} {shares} | {logits}"
        )
    total = sum(r["n"] for r in d["tasks"])
    if total:
        acc = sum(r["acc"] * r["n"] for r in d["tasks"] if r["n"]) / total
        within = sum(r["within"] * r["n"] for r in d["tasks"] if r["n"]) / total
        lines.append(f"all      {total:>5} {acc:6.1f} {within:6.1f}")
    lines.insert(1, f"predicting with the {d.get('head', 'trained linear head')}")
    trained = [r for r in d.get("trained_head_tasks") or [] if r["n"]]
    if trained and total:
        t_acc = sum(r["acc"] * r["n"] for r in trained) / total
        t_within = sum(r["within"] * r["n"] for r in trained) / total
        per_task = " ".join(f"{r['acc']:.1f}" for r in trained)
        lines.append(
            f"the trained linear head on the same features: acc {t_acc:.1f}, within {t_within:.1f} "
            f"(per task {per_task})"
        )
    return "\n".join(lines)
