#!/usr/bin/env python
"""Cost of the SD-LoRA core (``sdlora.lora``) as tasks accumulate: training step time, peak memory, inference.

For every compute mode of ``AdapterConfig.compute`` (``factored``, ``fold``, ``loop``) and every task count t,
the adapter state of task t is built (t-1 tasks begun, their B filled with small random values as after
training, ended; then task t begun, rank 10, official protocol) on a timm ViT, and one training step
(forward, cross-entropy on a linear head over the features, backward, SGD step over
``trainable_parameters()`` and the head) is timed: warm-up, then ``--reps`` rounds (below). Peak memory
is the high-water mark of the whole configuration (adapter state, optimiser, activations, gradients) above
the bare backbone over the warm-up steps: on CPU the RSS high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``,
reset through ``/proc/self/clear_refs`` right after the backbone is built where the kernel allows it), on GPU
``torch.cuda.max_memory_allocated``; plus the exact bytes autograd saves for backward. Every configuration runs
in its own child process (forked from a parent that has imported torch and timm but run nothing), so no
allocator cache or high-water mark leaks from one into the next.

References: a plain rank-r LoRA on the q and v slices of every ``qkv`` (no magnitudes, no normaliser; written
here, independent of the library): the physical limit of a step with one trainable low-rank adapter; the bare
backbone for inference, compared with ``merge_and_unload()`` and with the unmerged model after the last task.
After its memory is measured, each configuration builds its reference in the same process and the two are timed
interleaved; ratios are medians of per-round ratios. Timing each configuration alone in its own process and
dividing across processes was tried first: on a shared 2-core VM two identical models timed that way differed
by 12%, far above the 2-5% the goals need.

Usage::

    .venv/bin/python benchmarks/bench_core.py              # full run (CPU: ~7 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick      # smoke run, < 30 s
    .venv/bin/python benchmarks/bench_core.py --device cuda --tasks 1,5,10,20,40 --reps 50

This is a script, not a test: it prints markdown tables to stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import timm  # imported here, in the parent: forked configurations then start without paying for it
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from sdlora.lora import AdapterConfig, SDLoRAModel
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdlora.lora import AdapterConfig, SDLoRAModel

MODES = ("factored", "fold", "loop")
TARGETS = ["blocks.*.attn.qkv"]
GOAL_TIME = 1.05  # step time at the last task / task 1, same mode
GOAL_MEM = 1.10  # peak memory at the last task / task 1, same mode
GOAL_MERGED = 1.02  # merged inference / bare backbone
CONTENDED = 0.25  # cores used by other processes above which a CPU figure counts as contended
B_SCALE = 0.02  # std of the random B given to each finished task (as after training)


# ------------------------------------------------------------------------------------------------ machine
def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_busy_seconds() -> float | None:
    """CPU seconds spent busy by the whole machine since boot (all cores), from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
    busy = sum(vals[:3]) + sum(vals[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_until_idle(max_wait: float, threshold: float = CONTENDED) -> tuple[float, float | None]:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores over a 1 s sample.

    Returns (seconds waited, last sampled load in cores)."""
    if max_wait <= 0:
        return 0.0, None
    t0 = time.perf_counter()
    load = None
    while True:
        b0 = cpu_busy_seconds()
        if b0 is None:
            return 0.0, None
        time.sleep(1.0)
        load = (cpu_busy_seconds() or b0) - b0
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            return waited, load


def reset_rss_high_water() -> bool:
    """Reset the kernel's RSS high-water mark (and with it ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


# ------------------------------------------------------------------------------------------------ models
class PlainLoRAQKV(nn.Module):
    """Reference: a frozen fused qkv ``nn.Linear`` plus one plain rank-r LoRA on its q and v slices.

    ``y = W0 x + b``, then ``y_q += B_q A_q x`` and ``y_v += B_v A_v x``: one down-projection GEMM for q and v,
    one up-projection each, no magnitude, no normaliser. The minimum a step with one trainable low-rank
    adapter per layer costs.
    """

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        d = base.in_features
        self.d, self.r = d, rank
        a = torch.empty(2 * rank, d, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A = nn.Parameter(a)
        self.B_q = nn.Parameter(torch.randn(d, rank, device=a.device, dtype=a.dtype) * B_SCALE)
        self.B_v = nn.Parameter(torch.randn(d, rank, device=a.device, dtype=a.dtype) * B_SCALE)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        z = F.linear(x, self.A)
        d, r = self.d, self.r
        y[..., :d] += F.linear(z[..., :r], self.B_q)
        y[..., 2 * d :] += F.linear(z[..., r:], self.B_v)
        return y


def build_backbone(cfg: dict[str, Any]) -> nn.Module:
    torch.manual_seed(cfg["seed"])
    m = timm.create_model(cfg["model"], pretrained=False, num_classes=0, img_size=cfg["img_size"])
    return m.to(cfg["device"])


def add_plain_lora(backbone: nn.Module, rank: int) -> nn.Module:
    backbone.requires_grad_(False)
    n = 0
    for name, mod in list(backbone.named_modules()):
        if name.endswith("attn.qkv") and isinstance(mod, nn.Linear):
            parent = backbone.get_submodule(name.rsplit(".", 1)[0])
            parent.qkv = PlainLoRAQKV(mod, rank)
            n += 1
    if n == 0:
        raise ValueError("plain LoRA reference: the backbone has no '*.attn.qkv' nn.Linear")
    return backbone


def build_sdlora(backbone: nn.Module, mode: str, tasks: int, rank: int, end_last: bool) -> SDLoRAModel:
    """SD-LoRA state of task ``tasks``: earlier tasks begun, given a random B (as trained), ended."""
    model = SDLoRAModel(backbone, AdapterConfig(protocol="official", rank=rank, compute=mode), default_targets=TARGETS)
    for t in range(tasks):
        model.begin_task(rank=rank)
        with torch.no_grad():
            for _, unit in model.named_units():
                if unit.B_cur is not None:
                    unit.B_cur.normal_(0.0, B_SCALE)
        if t < tasks - 1 or end_last:
            model.end_task()
    return model


def feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if not dim:
        raise ValueError("cannot tell the feature size of the backbone")
    return int(dim)


# ------------------------------------------------------------------------------------------------ worker
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn, device: str) -> tuple[float, float]:  # noqa: ANN001
    """Wall-clock and process CPU time (all threads) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _timed(fn, reps: int, device: str) -> dict[str, float]:  # noqa: ANN001
    """``reps`` timed calls (after the caller's warm-up)."""
    wall, cpu = zip(*(_time_once(fn, device) for _ in range(reps)))
    out = _summary(list(wall))
    if not device.startswith("cuda"):
        out["cpu_ms"] = statistics.median(cpu) * 1e3
    return out


def _paired(fn, ref, reps: int, device: str) -> dict[str, float]:  # noqa: ANN001
    """``reps`` rounds of one timed call of ``fn`` and one of the reference ``ref``, in ABBA order.

    The ratio is the median of the per-round ratios: drift of the machine's speed (other processes, clocks)
    between rounds cancels, and so does the ~10% spread between processes that timing each configuration
    in its own process alone shows on a shared VM.
    """
    a, b = [], []
    for i in range(reps):
        pair = (fn, ref) if i % 2 == 0 else (ref, fn)
        first, second = (_time_once(f, device) for f in pair)
        ta, tb = (first, second) if i % 2 == 0 else (second, first)
        a.append(ta)
        b.append(tb)
    out = _summary([t[0] for t in a])
    out["ref_ms"] = statistics.median(t[0] for t in b) * 1e3
    out["ratio"] = statistics.median(x[0] / y[0] for x, y in zip(a, b, strict=True))
    if not device.startswith("cuda"):
        out["cpu_ms"] = statistics.median(t[1] for t in a) * 1e3
        out["cpu_ratio"] = statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True))
    return out


def saved_for_backward_mib(loss_fn, persistent: list[Tensor]) -> float:
    """MiB of distinct tensors autograd saves for backward during ``loss_fn()`` (parameters and buffers excluded).

    Deterministic, unlike an RSS high-water mark: the activation memory each configuration keeps alive."""
    skip = {t.untyped_storage().data_ptr() for t in persistent}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values()) / 2**20


def _summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"ms": statistics.median(ms), "min_ms": ms[0], "iqr_ms": q[2] - q[0], "n": len(ms)}


def _train_step(model: nn.Module, params: list[Tensor], cfg: dict[str, Any], x: Tensor, y: Tensor):  # noqa: ANN201
    """(step, loss_fn, head): one SGD step over ``params`` and a fresh linear head on the model's features."""
    head = nn.Linear(feature_dim(getattr(model, "backbone", model)), cfg["num_classes"]).to(cfg["device"])
    opt = torch.optim.SGD([*params, *head.parameters()], lr=1e-3, momentum=0.9)
    model.train()

    def loss_fn() -> Tensor:
        return F.cross_entropy(head(model(x)), y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, loss_fn, head


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in a fresh process.

    ``cfg["kind"]``: ``train`` (variant ``sdlora`` or ``plain``) or ``infer`` (``bare``, ``merged``, ``unmerged``).
    Memory is measured over the warm-up of the configuration alone; then, for everything but the references
    themselves, the reference (plain LoRA step, bare backbone forward) is built in the same process and both are
    timed interleaved (``_paired``).
    """
    device = cfg["device"]
    torch.set_num_threads(cfg["threads"])
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)

    backbone = build_backbone(cfg)
    # Memory baseline: the bare backbone is built (and the interpreter, torch, timm loaded).
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    else:
        out["hwm_reset"] = reset_rss_high_water()
        base_mem = max_rss_bytes()

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    b, s = cfg["batch"], cfg["img_size"]
    x = torch.randn(b, 3, s, s, generator=g).to(device)
    y = torch.randint(0, cfg["num_classes"], (b,), generator=g).to(device)
    warmup = max(1, cfg["warmup"])  # at least one untimed step: the memory peak includes optimiser state

    if cfg["kind"] == "train":
        torch.manual_seed(cfg["seed"] + 2)
        if cfg["variant"] == "plain":
            model = add_plain_lora(backbone, cfg["rank"])
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            model = build_sdlora(backbone, cfg["mode"], cfg["tasks"], cfg["rank"], end_last=False)
            params = model.trainable_parameters()
        out["trainable"] = sum(p.numel() for p in params)
        step, loss_fn, head = _train_step(model, params, cfg, x, y)
        for _ in range(warmup):
            step()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) if cuda else max_rss_bytes()) - base_mem
        out["peak_mib"] = peak / 2**20
        out["saved_mib"] = saved_for_backward_mib(loss_fn, [*model.parameters(), *model.buffers(), *head.parameters()])
        if cfg["variant"] == "plain":
            out.update(_timed(step, cfg["reps"], device))
            return out
        ref_model = add_plain_lora(build_backbone(cfg), cfg["rank"])
        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        ref_step, _, _ = _train_step(ref_model, ref_params, cfg, x, y)
        for _ in range(warmup):
            ref_step()
        out.update(_paired(step, ref_step, cfg["reps"], device))
        return out

    # inference: no_grad forward in eval mode
    if cfg["variant"] == "bare":
        fwd_model = backbone
    else:
        sd = build_sdlora(backbone, cfg["mode"], cfg["tasks"], cfg["rank"], end_last=True)
        sd.eval()
        if cfg["variant"] == "merged":
            fwd_model = sd.merge_and_unload()
            if type(fwd_model) is not type(backbone):
                raise TypeError(f"merge_and_unload returned {type(fwd_model).__name__}")
            with torch.no_grad():
                out["max_abs_diff"] = float((fwd_model(x) - sd(x)).abs().max())
        else:
            fwd_model = sd
    fwd_model.eval()

    def forward(m: nn.Module = fwd_model) -> None:
        with torch.no_grad():
            m(x)

    for _ in range(warmup):
        forward()
    if cfg["variant"] == "bare":
        out.update(_timed(forward, cfg["infer_reps"], device))
        return out
    ref = build_backbone(cfg).eval()

    def ref_forward() -> None:
        forward(ref)

    for _ in range(warmup):
        ref_forward()
    out.update(_paired(forward, ref_forward, cfg["infer_reps"], device))
    return out


def _child(cfg: dict[str, Any], conn) -> None:  # noqa: ANN001
    try:
        res = run_config(cfg)
    except BaseException as e:  # report anything (OOM included) to the parent
        res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
    conn.send(res)
    conn.close()


def run_isolated(cfg: dict[str, Any], ctx: mp.context.BaseContext) -> dict[str, Any]:
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(cfg, send))
    busy0, mine0, t0 = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    p.start()
    send.close()
    try:
        res = recv.recv()
    except EOFError:
        res = {"error": "worker died without a result"}
    p.join()
    busy1, mine1, wall = cpu_busy_seconds(), children_cpu_seconds(), time.perf_counter() - t0
    if busy0 is not None and busy1 is not None and wall > 0:
        # CPU used by other processes while this configuration ran, in cores (contention diagnostic)
        res["other_load"] = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / wall
    if p.exitcode not in (0, None) and "error" not in res:
        res["error"] = f"worker exit code {p.exitcode}"
    if p.exitcode and p.exitcode < 0:
        res["error"] = f"worker killed by signal {-p.exitcode} (out of memory?)"
    return res


# ------------------------------------------------------------------------------------------------ report
def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}"


def ok(r: dict | None) -> dict | None:
    return r if r and "error" not in r else None


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(v: float | None, goal: float) -> str:
    return "-" if v is None else ("yes" if v <= goal else "**no**")


def report(args: argparse.Namespace, results: dict[tuple, dict], header: dict[str, str]) -> str:
    lines: list[str] = []
    w = lines.append
    tasks, modes = args.tasks, args.modes
    first, last = tasks[0], tasks[-1]
    plain = ok(results.get(("train", "plain")))

    def tr(mode: str, t: int) -> dict | None:
        return ok(results.get(("train", mode, t)))

    def vs_first(mode: str, t: int, key: str) -> float | None:
        """Ratio to the first task count of the same mode (time: quotient of the paired ratios)."""
        r, r1 = tr(mode, t), tr(mode, first)
        return div(r and r.get(key), r1 and r1.get(key))

    w("# sdlora core benchmark")
    w("")
    for k, v in header.items():
        w(f"- {k}: {v}")
    w("")

    w(f"## Training step time (forward + backward + SGD step; {args.warmup} warm-up, {args.reps} timed)")
    w("")
    w(
        "Every configuration runs in its own process and is timed interleaved (ABBA) with a plain rank-"
        f"{args.rank} LoRA step built in the same process: *x plain LoRA* is the median of the per-round ratios "
        f"and *x task {first}* the quotient of two such ratios. Both are robust to the machine's drift; the "
        "absolute ms of different rows come from different processes and can differ by ~10% on a shared machine."
    )
    w("")
    w(
        f"| mode | task | step ms | IQR ms | plain LoRA ms (same process) | x plain LoRA | x task {first} "
        "| other load |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    if plain:
        w(
            f"| plain LoRA (ref.) | - | {fmt(plain['ms'])} | {fmt(plain['iqr_ms'])} | - | 1.000 | - | "
            f"{fmt(plain.get('other_load'), '.2f')} |"
        )
    for mode in modes:
        for t in tasks:
            r = results.get(("train", mode, t))
            if r is None:
                continue
            if "error" in r:
                w(f"| {mode} | {t} | error | | | | | |")
                continue
            w(
                f"| {mode} | {t} | {fmt(r['ms'])} | {fmt(r['iqr_ms'])} | {fmt(r.get('ref_ms'))} | "
                f"{fmt(r.get('ratio'), '.3f')} | {fmt(vs_first(mode, t, 'ratio'), '.3f')} | "
                f"{fmt(r.get('other_load'), '.2f')} |"
            )
    w("")

    w("## Training memory")
    w("")
    w(
        "peak MiB: high-water mark above the bare backbone over the warm-up steps (adapter state, optimiser, "
        "activations, gradients), before the reference is built; saved MiB: distinct tensors autograd keeps for "
        "backward in one step (parameters and buffers excluded; exact, independent of the allocator)."
    )
    w("")
    w(
        f"| mode | task | peak MiB | x task {first} | x plain LoRA | saved MiB | saved x task {first} | "
        "saved x plain LoRA |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    pk, sv = (plain or {}).get("peak_mib"), (plain or {}).get("saved_mib")
    if plain:
        w(f"| plain LoRA (ref.) | - | {fmt(pk, '.0f')} | - | 1.000 | {fmt(sv)} | - | 1.000 |")
    for mode in modes:
        for t in tasks:
            r = tr(mode, t)
            if r is None:
                continue
            w(
                f"| {mode} | {t} | {fmt(r['peak_mib'], '.0f')} | {fmt(vs_first(mode, t, 'peak_mib'), '.3f')} | "
                f"{fmt(div(r['peak_mib'], pk), '.3f')} | {fmt(r.get('saved_mib'))} | "
                f"{fmt(vs_first(mode, t, 'saved_mib'), '.3f')} | {fmt(div(r.get('saved_mib'), sv), '.3f')} |"
            )
    w("")

    w("## Fastest compute mode per task count (training step, x plain LoRA)")
    w("")
    w("| task | " + " | ".join(modes) + " | fastest |")
    w("|---:|" + "---:|" * len(modes) + "---|")
    for t in tasks:
        got = {m: tr(m, t)["ratio"] for m in modes if tr(m, t) and "ratio" in tr(m, t)}
        best = min(got, key=got.get) if got else None
        w(f"| {t} | " + " | ".join(fmt(got.get(m), ".3f") for m in modes) + f" | {best or '-'} |")
    w("")

    if not args.skip_inference:
        w(
            f"## Inference after {args.infer_task} tasks (no_grad forward, eval mode; {args.warmup} warm-up, "
            f"{args.infer_reps} timed)"
        )
        w("")
        w("Each row is timed interleaved with a bare backbone built in the same process (*x bare*, paired).")
        w("")
        w("| model | forward ms | IQR ms | bare ms (same process) | x bare | other load |")
        w("|---|---:|---:|---:|---:|---:|")
        rows = [
            ("bare backbone", results.get(("infer", "bare"))),
            ("merge_and_unload()", results.get(("infer", "merged"))),
        ]
        rows += [(f"unmerged, compute={m}", results.get(("infer", "unmerged", m))) for m in args.infer_modes]
        for label, r in rows:
            if r is None:
                continue
            if "error" in r:
                w(f"| {label} | error | | | | |")
                continue
            is_bare = label == "bare backbone"
            w(
                f"| {label} | {fmt(r['ms'])} | {fmt(r['iqr_ms'])} | {fmt(r.get('ref_ms'))} | "
                f"{'1.000' if is_bare else fmt(r.get('ratio'), '.3f')} | {fmt(r.get('other_load'), '.2f')} |"
            )
        merged = ok(results.get(("infer", "merged")))
        if merged and "max_abs_diff" in merged:
            w("")
            w(f"max |merged - unmerged| over the batch's features: {merged['max_abs_diff']:.2e}")
        w("")

    w(f"## Goals (task {last} vs task {first} of the same mode)")
    w("")
    w("| check | goal | " + " | ".join(modes) + " |")
    w("|---|---:|" + "---:|" * len(modes))
    for label, key, goal in (
        ("step time (paired)", "ratio", GOAL_TIME),
        ("peak memory", "peak_mib", GOAL_MEM),
        ("saved for backward", "saved_mib", GOAL_MEM),
    ):
        cells = [f"{fmt(v, '.3f')} ({verdict(v, goal)})" for v in (vs_first(m, last, key) for m in modes)]
        w(f"| {label} x task {first} | <= {goal:.2f} | " + " | ".join(cells) + " |")
    if not args.skip_inference:
        merged = ok(results.get(("infer", "merged")))
        v = merged and merged.get("ratio")
        w("")
        w(
            f"merged inference x bare backbone (paired): {fmt(v, '.3f')} "
            f"(goal <= {GOAL_MERGED:.2f}: {verdict(v, GOAL_MERGED)})"
        )
    err = [(k, r["error"]) for k, r in results.items() if "error" in r]
    if err:
        w("")
        w("## Errors")
        w("")
        for k, e in err:
            w(f"- {' '.join(map(str, k))}: {e}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="timm model name (default vit_small_patch16_224; --quick: vit_tiny)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default 224 on GPU, 112 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    p.add_argument("--tasks", default=None, help="comma-separated task counts (default 1,5,10,20)")
    p.add_argument("--modes", default=",".join(MODES), help="compute modes to time (default factored,fold,loop)")
    p.add_argument("--rank", type=int, default=10, help="rank of every task's component (default 10)")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed training rounds, each one step of the configuration and one of its reference\n"
        "(default 7 on CPU, 30 on GPU)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps (forwards) first, of each model (default 2 on CPU, 10 on GPU)",
    )
    p.add_argument(
        "--infer-reps",
        type=int,
        default=None,
        help="timed inference rounds, each one forward of the model and one of the bare backbone\n"
        "(default 11 on CPU, 50 on GPU)",
    )
    p.add_argument("--infer-task", type=int, default=None, help="tasks before inference (default: last of --tasks)")
    p.add_argument("--skip-inference", action="store_true", help="time training only")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores available)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        help="before each configuration wait up to this many seconds for other processes to use < 0.25 cores\n"
        "(default 10 on CPU, 0 on GPU and with --quick)",
    )
    p.add_argument(
        "--rerun-contended",
        type=int,
        default=None,
        help="after the first pass, rerun up to this many times each configuration during which other processes\n"
        f"used > {CONTENDED} cores, keeping the least contended run (default 1 on CPU, 0 on GPU and with --quick)",
    )
    p.add_argument("--num-classes", type=int, default=100, help="classes of the linear head (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--start-method",
        choices=["fork", "spawn"],
        default=None,
        help="how each configuration's process starts (default: fork on CPU/Linux, spawn on GPU)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write every raw result to this JSON file")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny at 32 px, batch 4, tasks 1,2, 1 rep")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.quick:
        defaults = {
            "model": "vit_tiny_patch16_224",
            "img_size": 32,
            "batch": 4,
            "tasks": "1,2",
            "reps": 1,
            "warmup": 1,
            "infer_reps": 1,
        }
    else:
        defaults = {
            "model": "vit_small_patch16_224",
            "img_size": 224 if gpu else 112,
            "batch": 32,
            "tasks": "1,5,10,20",
            "reps": 30 if gpu else 7,
            "warmup": 10 if gpu else 2,
            "infer_reps": 50 if gpu else 11,
        }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tasks = sorted({int(t) for t in str(args.tasks).split(",") if t.strip()})
    if not args.tasks or args.tasks[0] < 1:
        p.error("--tasks must be positive integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes must be a subset of {','.join(MODES)}")
    args.infer_modes = list(args.modes)
    if args.infer_task is None:
        args.infer_task = args.tasks[-1]
    if args.wait_idle is None:
        args.wait_idle = 0.0 if gpu or args.quick else 10.0
    if args.rerun_contended is None:
        args.rerun_contended = 0 if gpu or args.quick else 1
    if args.threads is None:
        args.threads = available_cores()
    if args.reps < 1 or args.infer_reps < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1:
        p.error("reps, infer-reps, batch and rank must be >= 1, warmup >= 0")
    if args.start_method is None:
        args.start_method = "spawn" if gpu or "fork" not in mp.get_all_start_methods() else "fork"
    if gpu and args.start_method == "fork":
        p.error("CUDA cannot be used in forked processes: use --start-method spawn")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = mp.get_context(args.start_method)
    base = {
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "rank": args.rank,
        "warmup": args.warmup,
        "reps": args.reps,
        "infer_reps": args.infer_reps,
        "device": args.device,
        "threads": args.threads,
        "num_classes": args.num_classes,
        "seed": args.seed,
    }
    jobs: list[tuple[tuple, dict[str, Any]]] = [(("train", "plain"), {"kind": "train", "variant": "plain"})]
    for mode in args.modes:
        for t in args.tasks:
            jobs.append((("train", mode, t), {"kind": "train", "variant": "sdlora", "mode": mode, "tasks": t}))
    if not args.skip_inference:
        it = args.infer_task
        jobs.append((("infer", "bare"), {"kind": "infer", "variant": "bare"}))
        jobs.append((("infer", "merged"), {"kind": "infer", "variant": "merged", "mode": "factored", "tasks": it}))
        for mode in args.infer_modes:
            job = {"kind": "infer", "variant": "unmerged", "mode": mode, "tasks": it}
            jobs.append((("infer", "unmerged", mode), job))

    load_before = load_average()
    t_start = time.perf_counter()
    results: dict[tuple, dict[str, Any]] = {}

    def run(i: int, key: tuple, job: dict[str, Any], label: str) -> dict[str, Any]:
        waited, _ = wait_until_idle(args.wait_idle)
        t0 = time.perf_counter()
        res = run_isolated({**base, **job}, ctx)
        res["waited_s"] = waited
        msg = res.get("error") or f"{res['ms']:.1f} ms" + (f", {res['peak_mib']:.0f} MiB" if "peak_mib" in res else "")
        if "ratio" in res:
            msg += f", x reference {res['ratio']:.3f}"
        msg += f", other load {fmt(res.get('other_load'), '.2f')} cores"
        print(
            f"[{label}{i}/{len(jobs)}] {' '.join(map(str, key))}: {msg} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return res

    for i, (key, job) in enumerate(jobs, 1):
        results[key] = run(i, key, job, "")
        results[key]["runs"] = 1
    for attempt in range(args.rerun_contended):
        todo = [(i, k, j) for i, (k, j) in enumerate(jobs, 1) if results[k].get("other_load", 0.0) > CONTENDED]
        for i, key, job in todo:
            res = run(i, key, job, f"rerun {attempt + 1}: ")
            res["runs"] = results[key]["runs"] + 1
            if "error" not in res and res.get("other_load", 0.0) < results[key].get("other_load", math.inf):
                results[key] = res
            else:
                results[key]["runs"] = res["runs"]
    elapsed = time.perf_counter() - t_start

    first_ok = next((r for r in results.values() if "error" not in r), {})
    exe = sys.executable
    with contextlib.suppress(ValueError):  # show the interpreter relative to the working directory when inside it
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    header = {
        "machine": first_ok.get("gpu") if args.device.startswith("cuda") else f"{cpu_name()}",
        "cores available": f"{available_cores()} (host {os.cpu_count()})"
        + (f", RAM {total_ram_gib():.1f} GiB" if total_ram_gib() else ""),
        "torch / timm / python": f"{torch.__version__} / {timm.__version__} / {platform.python_version()}",
        "device / torch threads": f"{args.device} / {first_ok.get('threads', args.threads)}",
        "command": shlex.join([exe, *sys.argv]),
        "setup": (
            f"{args.model}, img {args.img_size}, batch {args.batch}, rank {args.rank}, official protocol, "
            f"targets {TARGETS[0]} (q,v), fp32, SGD(momentum 0.9) on trainable_parameters() + linear head "
            f"({args.num_classes} classes), one process per configuration ({args.start_method})"
        ),
        "memory": (
            "torch.cuda.max_memory_allocated above the bare backbone"
            if args.device.startswith("cuda")
            else "RSS high-water (ru_maxrss) above the bare backbone, "
            + ("high-water reset after the build" if first_ok.get("hwm_reset") else "no reset (clear_refs refused)")
        ),
        "load average before / after": f"{load_before} / {load_average()}",
        "other load": (
            "CPU cores used by other processes while a configuration ran (from /proc/stat); above ~0.2 on a "
            f"{available_cores()}-core machine the figure is contended. Waited up to {args.wait_idle:.0f} s "
            f"for an idle machine before each configuration; contended ones rerun up to {args.rerun_contended} "
            "time(s), least contended run kept"
        ),
        "wall time": f"{elapsed:.0f} s",
    }
    text = report(args, results, header)
    print(text, flush=True)
    if args.json:
        args.json.write_text(
            json.dumps({"header": header, "results": [{"key": list(k), **v} for k, v in results.items()]}, indent=1)
        )
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
