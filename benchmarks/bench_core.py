#!/usr/bin/env python
"""Cost of the SD-LoRA core (``sdlora.lora``) as tasks accumulate: training step time, memory, flops, inference.

For every compute mode of ``AdapterConfig.compute`` and every task count t, the adapter state of task t is built
on a timm ViT (t-1 tasks begun, their B filled with small random values as after training, ended; then task t
begun; rank 10, official protocol, q and v of every ``qkv``) and one training step (forward, cross-entropy on a
linear head over the features, backward, SGD step over ``trainable_parameters()`` and the head) is measured:

* **time**, paired: after its memory is measured, each configuration builds its reference (a plain rank-r LoRA
  step on the same model, below) in the same process and the two are timed interleaved (ABBA); *x plain LoRA*
  is the median of the per-round ratios, its spread the quartiles of those ratios, *x task 1* the quotient of
  two such ratios. Timing each configuration alone and dividing across processes was tried first: on a shared
  2-core VM two identical models timed that way differed by 12%, far above the 2-5% the goals need.
* **peak memory** above the bare backbone over the warm-up steps (adapter state, optimiser, activations,
  gradients): on CPU the RSS high-water mark (``ru_maxrss``, reset through ``/proc/self/clear_refs`` after the
  backbone is built), on GPU ``torch.cuda.max_memory_allocated``; plus the exact bytes autograd **saves for
  backward** (allocator-independent).
* **flops**: every matmul/convolution/attention flop of one step, counted by ``torch.utils.flop_counter``
  (elementwise work is not counted; attention through the math backend for that one step, which the counter
  knows): the arithmetic the step cannot avoid, next to the time it took. ``--flops-only`` prints that
  arithmetic for any model and batch without running anything (meta device), e.g. the GPU configuration on a
  laptop.

Every configuration runs in its own child process (forked from a parent that imported torch and timm but ran
nothing; spawned on GPU), so no allocator cache or high-water mark leaks from one into the next.

References. Training: a plain rank-r LoRA on the q and v slices of every ``qkv`` (``PlainLoRAQKV``: no
magnitudes, no normaliser, plain autograd, written here independently of the library): the physical limit of a
step with one trainable low-rank adapter. The library's own plain-LoRA configuration (``components: single``,
fixed magnitude 1, no normalisation; the ``seq_lora`` baseline) is timed against it as a check that the library's
layer adds nothing of its own. Inference: the bare backbone, against ``merge_and_unload()`` and the unmerged
model after the last task, at each ``--infer-batch``.

Usage::

    .venv/bin/python benchmarks/bench_core.py                  # CPU: ViT-S/16 at 112 px, batch 32, tasks 1-40
    .venv/bin/python benchmarks/bench_core.py --quick          # smoke run: vit_tiny at 32 px, < 1 min
    .venv/bin/python benchmarks/bench_core.py --device cuda    # GPU: ViT-B/16 at 224 px, batch 128, bf16 autocast

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm  # imported here, in the parent: forked configurations then start without paying for it
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

try:
    from sdlora.lora import COMPUTE_MODES, AdapterConfig, SDLoRAModel, route_costs
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from sdlora.lora import COMPUTE_MODES, AdapterConfig, SDLoRAModel, route_costs
from sdlora.lora.layer import FACTORED_EFFICIENCY

TARGETS = ["blocks.*.attn.qkv"]
GOAL_PLAIN = 1.05  # step time / plain LoRA step, at every task count
GOAL_TIME = 1.05  # step time at a task / task 1, same mode
GOAL_MEM = 1.10  # peak memory at a task / task 1, same mode
GOAL_MERGED = 1.02  # merged inference / bare backbone
CONTENDED = 0.25  # cores used by other processes above which a CPU figure counts as contended
B_SCALE = 0.02  # std of the random B given to each finished task (as after training)
AMP = {"none": None, "bf16": torch.bfloat16}


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

    ``y = W0 x + b + B_blk (A x)`` with ``A = [A_q; A_v]`` (2r x d, one down-projection GEMM for q and v) and
    ``B_blk`` the (3d x 2r) block matrix ``[[B_q, 0], [0, 0], [0, B_v]]``: no magnitude, no normaliser. The
    delta is added out of place. Adding it in place to the q and v slices of the output (``y[..., :d] += ...``,
    the obvious way, and this script's reference until the fused layer existed) makes autograd copy the whole
    (tokens x 3d) output gradient once per slice in backward (``CopySlices``), which costs more than the
    rank-10 adapter itself; a reference that pays for that would flatter every ratio measured against it.
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
        d, r = self.d, self.r
        zero = self.B_q.new_zeros(d, r)
        b_blk = torch.cat([torch.cat([self.B_q, zero], 1), zero.new_zeros(d, 2 * r), torch.cat([zero, self.B_v], 1)])
        return self.base(x) + F.linear(F.linear(x, self.A), b_blk)


class PlainLoRAQKVSliceAdd(PlainLoRAQKV):
    """The same plain LoRA with the delta added in place to the q and v slices of the output: the previous
    reference of this script, kept to show what the in-place slice add costs (``CopySlices`` in backward)."""

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


def add_plain_lora(backbone: nn.Module, rank: int, cls: type[PlainLoRAQKV] = PlainLoRAQKV) -> nn.Module:
    backbone.requires_grad_(False)
    n = 0
    for name, mod in list(backbone.named_modules()):
        if name.endswith("attn.qkv") and isinstance(mod, nn.Linear):
            parent = backbone.get_submodule(name.rsplit(".", 1)[0])
            parent.qkv = cls(mod, rank)
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


def build_library_plain_lora(backbone: nn.Module, rank: int) -> SDLoRAModel:
    """The library's plain LoRA: one component that keeps learning, magnitude fixed at 1, unnormalised."""
    cfg = AdapterConfig(
        rank=rank, components="single", normalise_current=False, alpha_init=1.0, train_magnitudes=False
    )
    model = SDLoRAModel(backbone, cfg, default_targets=TARGETS)
    model.begin_task(rank=rank)
    with torch.no_grad():
        for _, unit in model.named_units():
            assert unit.B_cur is not None
            unit.B_cur.normal_(0.0, B_SCALE)
    return model


def feature_dim(backbone: nn.Module) -> int:
    dim = getattr(backbone, "num_features", None) or getattr(backbone, "embed_dim", None)
    if not dim:
        raise ValueError("cannot tell the feature size of the backbone")
    return int(dim)


def tokens_per_image(backbone: nn.Module) -> int:
    """Sequence length of a timm ViT: patches plus class/register tokens."""
    pe = getattr(backbone, "patch_embed", None)
    if pe is None or not hasattr(pe, "num_patches"):
        raise ValueError("cannot tell the sequence length of the backbone (no patch_embed.num_patches)")
    return int(pe.num_patches) + int(getattr(backbone, "num_prefix_tokens", 1))


# ------------------------------------------------------------------------------------------------ worker
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], None], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU time (all threads) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def _summary(times: list[float]) -> dict[str, float]:
    ms = sorted(t * 1e3 for t in times)
    q1, q3 = _quartiles(ms)
    return {"ms": statistics.median(ms), "min_ms": ms[0], "iqr_ms": q3 - q1, "n": len(ms)}


def _timed(fn: Callable[[], None], reps: int, device: str) -> dict[str, float]:
    """``reps`` timed calls (after the caller's warm-up)."""
    wall, cpu = zip(*(_time_once(fn, device) for _ in range(reps)))
    out = _summary(list(wall))
    if not device.startswith("cuda"):
        out["cpu_ms"] = statistics.median(cpu) * 1e3
    return out


def _paired(fn: Callable[[], None], ref: Callable[[], None], reps: int, device: str) -> dict[str, float]:
    """``reps`` rounds of one timed call of ``fn`` and one of the reference ``ref``, in ABBA order.

    The ratio is the median of the per-round ratios: drift of the machine's speed (other processes, clocks)
    between rounds cancels, and so does the ~10% spread between processes that timing each configuration
    in its own process alone shows on a shared VM. ``ratio_q1``/``ratio_q3`` are the quartiles of the round
    ratios (their spread).
    """
    a, b = [], []
    for i in range(reps):
        pair = (fn, ref) if i % 2 == 0 else (ref, fn)
        first, second = (_time_once(f, device) for f in pair)
        ta, tb = (first, second) if i % 2 == 0 else (second, first)
        a.append(ta)
        b.append(tb)
    out = _summary([t[0] for t in a])
    ratios = [x[0] / y[0] for x, y in zip(a, b, strict=True)]
    out["ref_ms"] = statistics.median(t[0] for t in b) * 1e3
    out["ratio"] = statistics.median(ratios)
    out["ratio_q1"], out["ratio_q3"] = _quartiles(ratios)
    if not device.startswith("cuda"):
        out["cpu_ms"] = statistics.median(t[1] for t in a) * 1e3
        out["cpu_ratio"] = statistics.median(x[1] / y[1] for x, y in zip(a, b, strict=True))
    return out


def saved_for_backward_mib(loss_fn: Callable[[], Tensor], persistent: list[Tensor]) -> float:
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


def count_flops(fn: Callable[[], None]) -> int:
    """Matmul/convolution/attention flops of one call (``torch.utils.flop_counter``; elementwise work excluded).

    Attention runs through the math backend for this call: the counter has no formula for the CPU flash kernel
    (it would count attention as 0 on CPU and as bmm flops on the meta device)."""
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _train_step(model: nn.Module, params: list[Tensor], cfg: dict[str, Any], x: Tensor, y: Tensor):  # noqa: ANN202
    """(step, loss_fn, head): one SGD step over ``params`` and a fresh linear head on the model's features."""
    head = nn.Linear(feature_dim(getattr(model, "backbone", model)), cfg["num_classes"]).to(cfg["device"])
    opt = torch.optim.SGD([*params, *head.parameters()], lr=1e-3, momentum=0.9)
    model.train()
    amp = AMP[cfg["amp"]]
    dev_type = torch.device(cfg["device"]).type

    def loss_fn() -> Tensor:
        ctx = torch.autocast(dev_type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            return F.cross_entropy(head(model(x)), y)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step, loss_fn, head


def _memory_base(cfg: dict[str, Any], out: dict[str, Any]) -> int:
    """Reset the high-water mark and return the current level: the bare backbone is built by now."""
    device = cfg["device"]
    if device.startswith("cuda"):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    out["hwm_reset"] = reset_rss_high_water()
    return max_rss_bytes()


def _peak(cfg: dict[str, Any]) -> int:
    device = cfg["device"]
    _sync(device)
    return torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else max_rss_bytes()


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in a fresh process.

    ``cfg["kind"]``: ``train`` (variant ``plain``, ``plain_slice``, ``library_plain`` or ``sdlora``) or ``infer``
    (``bare``, ``merged``, ``unmerged``). Memory is measured over the warm-up of the configuration alone; then, for
    everything but the references themselves, the reference (plain LoRA step, bare backbone forward) is built
    in the same process and both are timed interleaved (``_paired``).
    """
    device = cfg["device"]
    torch.set_num_threads(cfg["threads"])
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(device)

    backbone = build_backbone(cfg)
    out["tokens_per_image"] = tokens_per_image(backbone)
    base_mem = _memory_base(cfg, out)
    if cuda:
        out["backbone_mib"] = base_mem / 2**20

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    s = cfg["img_size"]
    warmup = max(1, cfg["warmup"])  # at least one untimed step: the memory peak includes optimiser state

    if cfg["kind"] == "train":
        b = cfg["batch"]
        x = torch.randn(b, 3, s, s, generator=g).to(device)
        y = torch.randint(0, cfg["num_classes"], (b,), generator=g).to(device)
        torch.manual_seed(cfg["seed"] + 2)
        if cfg["variant"] == "plain":
            model: nn.Module = add_plain_lora(backbone, cfg["rank"])
            params = [p for p in model.parameters() if p.requires_grad]
        elif cfg["variant"] == "plain_slice":
            model = add_plain_lora(backbone, cfg["rank"], PlainLoRAQKVSliceAdd)
            params = [p for p in model.parameters() if p.requires_grad]
        elif cfg["variant"] == "library_plain":
            model = build_library_plain_lora(backbone, cfg["rank"])
            params = model.trainable_parameters()
        else:
            model = build_sdlora(backbone, cfg["mode"], cfg["tasks"], cfg["rank"], end_last=False)
            params = model.trainable_parameters()
        out["trainable"] = sum(p.numel() for p in params)
        out["tokens"] = tokens = b * out["tokens_per_image"]
        if isinstance(model, SDLoRAModel):
            # What route_costs predicts the frozen magnitudes' gradients cost in this step (multiply-adds).
            macs = {"fold": 0, "factored": 0, "fold_weight": 0}
            for layer in model.layers():
                shapes = [(u.out_features, int(u.A_frozen.shape[0])) for u in layer.units]
                for k, v in route_costs(tokens, layer.in_features, shapes).items():
                    macs[k] += v
                macs["fold_weight"] += sum(d_out * layer.in_features * r for d_out, r in shapes)
            out["route_macs"] = macs
        step, loss_fn, head = _train_step(model, params, cfg, x, y)
        for _ in range(warmup):
            step()
        out["peak_mib"] = (_peak(cfg) - base_mem) / 2**20
        if cuda:
            out["peak_total_mib"] = _peak(cfg) / 2**20
        out["saved_mib"] = saved_for_backward_mib(loss_fn, [*model.parameters(), *model.buffers(), *head.parameters()])
        out["flops"] = count_flops(step)
        if isinstance(model, SDLoRAModel):
            routes = {layer.last_route for layer in model.layers()}
            out["route"] = ",".join(sorted(r for r in routes if r)) or "-"
        if cfg["variant"] == "plain":
            out.update(_timed(step, cfg["reps"], device))
            return out
        ref_model = add_plain_lora(build_backbone(cfg), cfg["rank"])
        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        ref_step, _, _ = _train_step(ref_model, ref_params, cfg, x, y)
        for _ in range(warmup):
            ref_step()
        out["ref_flops"] = count_flops(ref_step)
        out.update(_paired(step, ref_step, cfg["reps"], device))
        return out

    # inference: no_grad forward in eval mode, at batch cfg["infer_batch"]
    x = torch.randn(cfg["infer_batch"], 3, s, s, generator=g).to(device)
    if cfg["variant"] == "bare":
        fwd_model: nn.Module = backbone
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
    amp = AMP[cfg["amp"]]
    dev_type = torch.device(device).type

    def forward(m: nn.Module = fwd_model) -> None:
        ctx = torch.autocast(dev_type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.no_grad(), ctx:
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


def _child(cfg: dict[str, Any], conn: Any) -> None:
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


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(v: float | None, goal: float) -> str:
    return "-" if v is None else ("yes" if v <= goal else "**no**")


class Results:
    """Every run of every configuration: ``runs[key]`` is a list (one entry per ``--runs``)."""

    def __init__(self) -> None:
        self.runs: dict[tuple, list[dict[str, Any]]] = {}

    def ok(self, key: tuple) -> list[dict[str, Any]]:
        return [r for r in self.runs.get(key, []) if "error" not in r]

    def get(self, key: tuple, field: str) -> float | None:
        """Median over the runs (the value itself with one run)."""
        vals = [r[field] for r in self.ok(key) if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    def span(self, key: tuple, field: str) -> str:
        vals = [r[field] for r in self.ok(key) if r.get(field) is not None]
        return f"{min(vals):.3f}-{max(vals):.3f}" if len(vals) > 1 else "-"

    def first(self, key: tuple, field: str) -> Any:
        return next((r[field] for r in self.ok(key) if field in r), None)

    def errors(self) -> list[tuple[tuple, str]]:
        return [(k, r["error"]) for k, rs in self.runs.items() for r in rs if "error" in r]


def report(args: argparse.Namespace, res: Results, header: dict[str, str]) -> str:
    lines: list[str] = []
    w = lines.append
    tasks, modes = args.tasks, args.modes
    first = tasks[0]
    plain = ("train", "plain")

    def vs_first(mode: str, t: int, field: str) -> float | None:
        """Ratio to the first task count of the same mode (time: quotient of the paired ratios)."""
        return div(res.get(("train", mode, t), field), res.get(("train", mode, first), field))

    def quart(key: tuple) -> str:
        q1, q3 = res.get(key, "ratio_q1"), res.get(key, "ratio_q3")
        return "-" if q1 is None or q3 is None else f"{q1:.3f}-{q3:.3f}"

    w("# sdlora core benchmark")
    w("")
    for k, v in header.items():
        w(f"- {k}: {v}")
    w("")

    w(
        f"## Training step time (forward + backward + SGD step; {args.warmup} warm-up, {args.reps} timed rounds"
        f"{f', {args.runs} runs' if args.runs > 1 else ''})"
    )
    w("")
    w(
        f"Each configuration is timed interleaved (ABBA) with a plain rank-{args.rank} LoRA step built in the same "
        "process: *x plain LoRA* is the median of the per-round ratios, *round quartiles* their spread, "
        f"*x task {first}* the quotient of two such ratios"
        + (
            f"; with {args.runs} runs every figure is the median over runs and *runs* the range of x plain LoRA"
            if args.runs > 1
            else ""
        )
        + ". *flops x plain*: matmul/attention flops of one step (``torch.utils.flop_counter``) over the "
        "reference's. *route*: how the frozen magnitudes' gradients were computed."
    )
    w("")
    w(
        f"| configuration | task | route | step ms | x plain LoRA | round quartiles | runs | x task {first} | "
        "flops x plain | other load |"
    )
    w("|---|---:|---|---:|---:|---|---|---:|---:|---:|")
    if res.ok(plain):
        w(
            f"| plain LoRA (reference) | - | - | {fmt(res.get(plain, 'ms'))} | 1.000 | - | - | - | 1.000 | "
            f"{fmt(res.get(plain, 'other_load'), '.2f')} |"
        )
    lib = ("train", "library_plain")
    for key, label in (
        (lib, "library plain LoRA (`seq_lora` config)"),
        (("train", "plain_slice"), "plain LoRA, in-place slice add (previous reference)"),
    ):
        if res.ok(key):
            w(
                f"| {label} | - | - | {fmt(res.get(key, 'ms'))} | "
                f"{fmt(res.get(key, 'ratio'), '.3f')} | {quart(key)} | {res.span(key, 'ratio')} | - | "
                f"{fmt(div(res.get(key, 'flops'), res.get(key, 'ref_flops')), '.3f')} | "
                f"{fmt(res.get(key, 'other_load'), '.2f')} |"
            )
    for mode in modes:
        for t in tasks:
            key = ("train", mode, t)
            if key not in res.runs:
                continue
            if not res.ok(key):
                w(f"| {mode} | {t} | error | | | | | | | |")
                continue
            w(
                f"| {mode} | {t} | {res.first(key, 'route') or '-'} | {fmt(res.get(key, 'ms'))} | "
                f"{fmt(res.get(key, 'ratio'), '.3f')} | {quart(key)} | {res.span(key, 'ratio')} | "
                f"{fmt(vs_first(mode, t, 'ratio'), '.3f')} | "
                f"{fmt(div(res.get(key, 'flops'), res.get(key, 'ref_flops')), '.3f')} | "
                f"{fmt(res.get(key, 'other_load'), '.2f')} |"
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
        f"| configuration | task | peak MiB | x task {first} | x plain LoRA | saved MiB | saved x task {first} | "
        "saved x plain LoRA |"
    )
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    pk, sv = res.get(plain, "peak_mib"), res.get(plain, "saved_mib")
    if res.ok(plain):
        w(f"| plain LoRA (reference) | - | {fmt(pk, '.0f')} | - | 1.000 | {fmt(sv)} | - | 1.000 |")
    if res.ok(lib):
        lp, ls = res.get(lib, "peak_mib"), res.get(lib, "saved_mib")
        w(
            f"| library plain LoRA | - | {fmt(lp, '.0f')} | - | {fmt(div(lp, pk), '.3f')} | {fmt(ls)} | - | "
            f"{fmt(div(ls, sv), '.3f')} |"
        )
    for mode in modes:
        for t in tasks:
            key = ("train", mode, t)
            if not res.ok(key):
                continue
            p, s = res.get(key, "peak_mib"), res.get(key, "saved_mib")
            w(
                f"| {mode} | {t} | {fmt(p, '.0f')} | {fmt(vs_first(mode, t, 'peak_mib'), '.3f')} | "
                f"{fmt(div(p, pk), '.3f')} | {fmt(s)} | {fmt(vs_first(mode, t, 'saved_mib'), '.3f')} | "
                f"{fmt(div(s, sv), '.3f')} |"
            )
    w("")

    arithmetic(args, res, w)

    w("## Fastest compute mode per task count (training step, x plain LoRA)")
    w("")
    w("| task | " + " | ".join(modes) + " | fastest |")
    w("|---:|" + "---:|" * len(modes) + "---|")
    for t in tasks:
        got = {m: v for m in modes if (v := res.get(("train", m, t), "ratio")) is not None}
        best = min(got, key=lambda m: got[m]) if got else None
        w(f"| {t} | " + " | ".join(fmt(got.get(m), ".3f") for m in modes) + f" | {best or '-'} |")
    w("")

    if not args.skip_inference:
        w(
            f"## Inference after {args.infer_task} tasks (no_grad forward, eval mode; {args.warmup} warm-up, "
            f"{args.infer_reps} timed rounds)"
        )
        w("")
        w(
            "Each row is timed interleaved with a bare backbone built in the same process (*x bare*, paired). The "
            "unmerged model folds its components into a cached weight at the first call and reuses it until a "
            "tensor it depends on changes; `stacked` and `loop` never fold (references)."
        )
        w("")
        w("| model | batch | forward ms | bare ms (same process) | x bare | round quartiles | other load |")
        w("|---|---:|---:|---:|---:|---|---:|")
        for bsz in args.infer_batch:
            rows = [("bare backbone", ("infer", "bare", bsz)), ("merge_and_unload()", ("infer", "merged", bsz))]
            rows += [(f"unmerged, compute={m}", ("infer", "unmerged", m, bsz)) for m in args.infer_modes]
            for label, key in rows:
                if key not in res.runs:
                    continue
                if not res.ok(key):
                    w(f"| {label} | {bsz} | error | | | | |")
                    continue
                bare = label == "bare backbone"
                w(
                    f"| {label} | {bsz} | {fmt(res.get(key, 'ms'), '.2f')} | {fmt(res.get(key, 'ref_ms'), '.2f')} | "
                    f"{'1.000' if bare else fmt(res.get(key, 'ratio'), '.3f')} | {'-' if bare else quart(key)} | "
                    f"{fmt(res.get(key, 'other_load'), '.2f')} |"
                )
        diffs = [res.get(("infer", "merged", b), "max_abs_diff") for b in args.infer_batch]
        diffs = [d for d in diffs if d is not None]
        if diffs:
            w("")
            w(f"max |merged - unmerged| over the batch's features: {max(diffs):.2e}")
        w("")

    w("## Goals")
    w("")
    w("| check | goal | task | " + " | ".join(modes) + " |")
    w("|---|---:|---:|" + "---:|" * len(modes))
    checks: list[tuple[str, float, Callable[[str, int], float | None], list[int]]] = [
        ("step time x plain LoRA", GOAL_PLAIN, lambda m, t: res.get(("train", m, t), "ratio"), tasks),
        (f"step time x task {first}", GOAL_TIME, lambda m, t: vs_first(m, t, "ratio"), tasks[1:]),
        (f"peak memory x task {first}", GOAL_MEM, lambda m, t: vs_first(m, t, "peak_mib"), tasks[1:]),
        (f"saved for backward x task {first}", GOAL_MEM, lambda m, t: vs_first(m, t, "saved_mib"), tasks[1:]),
    ]
    for label, goal, fn, ts in checks:
        for t in ts:
            cells = [f"{fmt(v, '.3f')} ({verdict(v, goal)})" for v in (fn(m, t) for m in modes)]
            w(f"| {label} | <= {goal:.2f} | {t} | " + " | ".join(cells) + " |")
    if not args.skip_inference:
        for bsz in args.infer_batch:
            v = res.get(("infer", "merged", bsz), "ratio")
            w("")
            w(
                f"merged inference x bare backbone, batch {bsz} (paired): {fmt(v, '.3f')} "
                f"(goal <= {GOAL_MERGED:.2f}: {verdict(v, GOAL_MERGED)})"
            )
    err = res.errors()
    if err:
        w("")
        w("## Errors")
        w("")
        for k, e in err:
            w(f"- {' '.join(map(str, k))}: {e}")
    return "\n".join(lines)


def arithmetic(args: argparse.Namespace, res: Results, w: Callable[[str], None]) -> None:
    """What exact magnitude gradients must cost on top of the plain step, from ``route_costs``, next to the flops
    counted in the step that ran."""
    plain_flops = res.get(("train", "plain"), "flops")
    macs = {t: res.first(("train", m, t), "route_macs") for m in args.modes for t in args.tasks}
    macs = {t: v for t, v in macs.items() if v}
    if not plain_flops or not macs:
        return
    counted = {t: res.get(("train", "auto", t), "flops") for t in args.tasks}
    arithmetic_table(
        args,
        plain_flops,
        res.get(("train", "auto", args.tasks[0]), "flops"),
        res.first(("train", "plain"), "tokens"),
        macs,
        counted,
        w,
    )


def arithmetic_table(
    args: argparse.Namespace,
    plain_flops: float,
    auto1_flops: float | None,
    tokens: int | None,
    macs: dict[int, dict[str, int]],
    counted: dict[int, float | None],
    w: Callable[[str], None],
) -> None:
    w("## Arithmetic: the extra work of exact magnitude gradients")
    w("")
    w(
        "Flops of the plain-LoRA reference step (counted): "
        f"{plain_flops / 1e9:.1f} GFLOP; tokens per step T = {tokens}. At task t every adapted projection stores "
        f"R = {args.rank}(t-1) frozen ranks. On top of the plain step, exact gradients of the frozen magnitudes cost "
        "(in flops, 2 per multiply-add, summed over the adapted layers): the fold ``W0 + B diag(s) A`` "
        "(d_out d_in R per projection) plus either the `fold` route (adapted rows' weight gradient: "
        "T d_in d_out + d_out d_in R) or the `factored` route (rank-R projections: T R (d_in + d_out)); `auto` takes "
        "the one it expects to be faster (*auto's route*; the factored route's skinny GEMMs are weighted as running "
        f"at {FACTORED_EFFICIENCY}x the fold route's multiply-add rate). *predicted* adds that route to the counted "
        "flops of `auto` at task 1; *counted* is what the step that ran did."
    )
    w("")
    w(
        "| task | R per projection | fold route x plain | factored route x plain | auto's route | predicted x plain | "
        "counted x plain (auto) |"
    )
    w("|---:|---:|---:|---:|---|---:|---:|")
    for t, m in sorted(macs.items()):
        fold = 2 * (m["fold"] + m["fold_weight"]) / plain_flops
        fact = 2 * (m["factored"] + m["fold_weight"]) / plain_flops
        route = "fold" if m["fold"] < m["factored"] / FACTORED_EFFICIENCY else "factored"
        pred = div((auto1_flops or 0) + 2 * (m[route] + m["fold_weight"]), plain_flops)
        w(
            f"| {t} | {args.rank * (t - 1)} | +{fold:.3f} | +{fact:.3f} | {route} | {fmt(pred, '.3f')} | "
            f"{fmt(div(counted.get(t), plain_flops), '.3f')} |"
        )
    w("")


def route_macs(model: SDLoRAModel, tokens: int, stored_rank: int) -> dict[str, int]:
    """``route_costs`` summed over the model's adapted layers if every unit stored ``stored_rank`` frozen ranks,
    plus the fold's own multiply-adds (``fold_weight``)."""
    macs = {"fold": 0, "factored": 0, "fold_weight": 0}
    for layer in model.layers():
        shapes = [(u.out_features, stored_rank) for u in layer.units]
        for k, v in route_costs(tokens, layer.in_features, shapes).items():
            macs[k] += v
        macs["fold_weight"] += sum(d_out * layer.in_features * r for d_out, r in shapes)
    return macs


def flops_only(args: argparse.Namespace) -> str:
    """The arithmetic table without running anything: flops counted on the meta device (no memory, no compute)
    for the plain-LoRA step and the library's task-1 step, the rest from ``route_costs``."""
    cfg = {
        "model": args.model,
        "img_size": args.img_size,
        "seed": args.seed,
        "device": "meta",
        "num_classes": args.num_classes,
        "amp": "none",
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to("meta")
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to("meta")
    backbone = build_backbone(cfg)
    tokens = args.batch * tokens_per_image(backbone)
    plain = add_plain_lora(backbone, args.rank)
    step, _, _ = _train_step(plain, [p for p in plain.parameters() if p.requires_grad], cfg, x, y)
    plain_flops = count_flops(step)
    sd = build_sdlora(build_backbone(cfg), "auto", 1, args.rank, end_last=False)
    step, _, _ = _train_step(sd, sd.trainable_parameters(), cfg, x, y)
    auto1 = count_flops(step)
    lines: list[str] = [
        "# sdlora core benchmark: arithmetic only (flops counted on the meta device, nothing timed)",
        "",
        f"- command: {shlex.join([sys.executable, *sys.argv])}",
        f"- setup: {args.model}, img {args.img_size}, batch {args.batch}, rank {args.rank}, official protocol, "
        f"targets {TARGETS[0]} (q,v)",
        "",
    ]
    macs = {t: route_macs(sd, tokens, args.rank * (t - 1)) for t in args.tasks}
    arithmetic_table(args, plain_flops, auto1, tokens, macs, {args.tasks[0]: auto1}, lines.append)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        help="timm model name (default: vit_small_patch16_224 on CPU,\n"
        "vit_base_patch16_224 on GPU, vit_tiny_patch16_224 with --quick)",
    )
    p.add_argument("--img-size", type=int, default=None, help="input size (default 112 on CPU, 224 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="training batch size (default 32 on CPU, 128 on GPU)")
    p.add_argument(
        "--tasks", default=None, help="comma-separated task counts (default 1,5,10,20,40 on CPU, 1,10,20 on GPU)"
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"compute modes to measure, a subset of {','.join(COMPUTE_MODES)}\n"
        "(default: all on CPU, auto,stacked on GPU)",
    )
    p.add_argument("--rank", type=int, default=10, help="rank of every task's component (default 10)")
    p.add_argument(
        "--amp", choices=sorted(AMP), default=None, help="autocast dtype (default: bf16 on GPU, none on CPU)"
    )
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed training rounds, each one step of the configuration and one of its reference\n"
        "(default 7 on CPU, 15 on GPU)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps (forwards) first, of each model (default 2; GPU 5)"
    )
    p.add_argument(
        "--infer-reps",
        type=int,
        default=None,
        help="timed inference rounds, each one forward of the model and one of the bare backbone\n"
        "(default 11 on CPU, 20 on GPU)",
    )
    p.add_argument(
        "--infer-batch", default=None, help="comma-separated inference batch sizes (default: 1 and --batch)"
    )
    p.add_argument(
        "--infer-modes",
        default=None,
        help="compute modes of the unmerged inference rows (default: --modes; GPU: auto)",
    )
    p.add_argument("--infer-task", type=int, default=None, help="tasks before inference (default: last of --tasks)")
    p.add_argument("--skip-inference", action="store_true", help="time training only")
    p.add_argument(
        "--runs", type=int, default=1, help="measure every configuration this many times (run-to-run spread)"
    )
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
        help="after each run, rerun up to this many times each configuration during which other processes\n"
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
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="print only the arithmetic table (flops counted on the meta device; no timing, any machine, seconds)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny at 32 px, batch 4, tasks 1,3, 1 round")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.quick:
        defaults: dict[str, Any] = {
            "model": "vit_tiny_patch16_224",
            "img_size": 32,
            "batch": 4,
            "tasks": "1,3",
            "modes": "auto,stacked",
            "reps": 1,
            "warmup": 1,
            "infer_reps": 1,
            "amp": "none",
        }
    elif gpu:
        defaults = {
            "model": "vit_base_patch16_224",
            "img_size": 224,
            "batch": 128,
            "tasks": "1,10,20",
            "modes": "auto,stacked",
            "reps": 15,
            "warmup": 5,
            "infer_reps": 20,
            "amp": "bf16",
        }
    else:
        defaults = {
            "model": "vit_small_patch16_224",
            "img_size": 112,
            "batch": 32,
            "tasks": "1,5,10,20,40",
            "modes": ",".join(COMPUTE_MODES),
            "reps": 7,
            "warmup": 2,
            "infer_reps": 11,
            "amp": "none",
        }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.tasks = sorted({int(t) for t in str(args.tasks).split(",") if t.strip()})
        batches = args.infer_batch or f"1,{args.batch}"
        args.infer_batch = sorted({int(b) for b in str(batches).split(",") if b.strip()})
    except ValueError:
        p.error("--tasks and --infer-batch take comma-separated integers")
    if not args.tasks or args.tasks[0] < 1:
        p.error("--tasks must be positive integers")
    if not args.infer_batch or args.infer_batch[0] < 1:
        p.error("--infer-batch must be positive integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.infer_modes is None:
        args.infer_modes = "auto" if gpu and not args.quick else ",".join(args.modes)
    args.infer_modes = [m.strip() for m in args.infer_modes.split(",") if m.strip()]
    for flag, modes in (("--modes", args.modes), ("--infer-modes", args.infer_modes)):
        if not modes or any(m not in COMPUTE_MODES for m in modes):
            p.error(f"{flag} must be a non-empty subset of {','.join(COMPUTE_MODES)}")
    if args.infer_task is None:
        args.infer_task = args.tasks[-1]
    if args.wait_idle is None:
        args.wait_idle = 0.0 if gpu or args.quick else 10.0
    if args.rerun_contended is None:
        args.rerun_contended = 0 if gpu or args.quick else 1
    if args.threads is None:
        args.threads = available_cores()
    if min(args.reps, args.infer_reps, args.batch, args.rank, args.runs) < 1 or args.warmup < 0:
        p.error("reps, infer-reps, batch, rank and runs must be >= 1, warmup >= 0")
    if args.start_method is None:
        args.start_method = "spawn" if gpu or "fork" not in mp.get_all_start_methods() else "fork"
    if gpu and args.start_method == "fork":
        p.error("CUDA cannot be used in forked processes: use --start-method spawn")
    return args


def make_jobs(args: argparse.Namespace) -> list[tuple[tuple, dict[str, Any]]]:
    jobs: list[tuple[tuple, dict[str, Any]]] = [
        (("train", "plain"), {"kind": "train", "variant": "plain"}),
        (("train", "library_plain"), {"kind": "train", "variant": "library_plain"}),
        (("train", "plain_slice"), {"kind": "train", "variant": "plain_slice"}),
    ]
    for mode in args.modes:
        for t in args.tasks:
            jobs.append((("train", mode, t), {"kind": "train", "variant": "sdlora", "mode": mode, "tasks": t}))
    if not args.skip_inference:
        it = args.infer_task
        for b in args.infer_batch:
            jobs.append((("infer", "bare", b), {"kind": "infer", "variant": "bare", "infer_batch": b}))
            merged = {"kind": "infer", "variant": "merged", "mode": "auto", "tasks": it, "infer_batch": b}
            jobs.append((("infer", "merged", b), merged))
            for mode in args.infer_modes:
                job = {"kind": "infer", "variant": "unmerged", "mode": mode, "tasks": it, "infer_batch": b}
                jobs.append((("infer", "unmerged", mode, b), job))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flops_only:
        print(flops_only(args), flush=True)
        return 0
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
        "amp": args.amp,
    }
    jobs = make_jobs(args)
    load_before = load_average()
    t_start = time.perf_counter()
    res = Results()

    def run(i: int, key: tuple, job: dict[str, Any], label: str) -> dict[str, Any]:
        waited, _ = wait_until_idle(args.wait_idle)
        t0 = time.perf_counter()
        r = run_isolated({**base, **job}, ctx)
        r["waited_s"] = waited
        msg = r.get("error") or f"{r['ms']:.1f} ms" + (f", {r['peak_mib']:.0f} MiB" if "peak_mib" in r else "")
        if "ratio" in r:
            msg += f", x reference {r['ratio']:.3f}"
        msg += f", other load {fmt(r.get('other_load'), '.2f')} cores"
        print(
            f"[{label}{i}/{len(jobs)}] {' '.join(map(str, key))}: {msg} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        return r

    for n in range(args.runs):
        tag = f"run {n + 1}/{args.runs} " if args.runs > 1 else ""
        this: dict[tuple, dict[str, Any]] = {}
        for i, (key, job) in enumerate(jobs, 1):
            this[key] = run(i, key, job, tag)
        for attempt in range(args.rerun_contended):
            todo = [(i, k, j) for i, (k, j) in enumerate(jobs, 1) if this[k].get("other_load", 0.0) > CONTENDED]
            for i, key, job in todo:
                r = run(i, key, job, f"{tag}rerun {attempt + 1}: ")
                if "error" not in r and r.get("other_load", 0.0) < this[key].get("other_load", math.inf):
                    this[key] = r
        for key, r in this.items():
            res.runs.setdefault(key, []).append(r)
    elapsed = time.perf_counter() - t_start

    first_ok = next((r for rs in res.runs.values() for r in rs if "error" not in r), {})
    exe = sys.executable
    with contextlib.suppress(ValueError):  # show the interpreter relative to the working directory when inside it
        exe = os.path.relpath(exe) if not os.path.relpath(exe).startswith("..") else exe
    gpu = args.device.startswith("cuda")
    header = {
        "machine": first_ok.get("gpu") if gpu else f"{cpu_name()}",
        "cores available": f"{available_cores()} (host {os.cpu_count()})"
        + (f", RAM {total_ram_gib():.1f} GiB" if total_ram_gib() else ""),
        "torch / timm / python": f"{torch.__version__} / {timm.__version__} / {platform.python_version()}",
        "device / torch threads": f"{args.device} / {first_ok.get('threads', args.threads)}",
        "command": shlex.join([exe, *sys.argv]),
        "setup": (
            f"{args.model}, img {args.img_size} ({first_ok.get('tokens_per_image', '?')} tokens/image), batch "
            f"{args.batch}, rank {args.rank}, official protocol, targets {TARGETS[0]} (q,v), "
            f"{'autocast ' + args.amp if args.amp != 'none' else 'fp32'}, SGD(momentum 0.9) on "
            f"trainable_parameters() + linear head ({args.num_classes} classes), one process per configuration "
            f"({args.start_method})"
        ),
        "memory": (
            "torch.cuda.max_memory_allocated above the bare backbone"
            if gpu
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
    text = report(args, res, header)
    print(text, flush=True)
    if args.json:
        rows = [{"key": list(k), "run": i, **r} for k, rs in res.runs.items() for i, r in enumerate(rs)]
        args.json.write_text(json.dumps({"header": header, "results": rows}, indent=1, default=str))
    return 1 if res.errors() else 0


if __name__ == "__main__":
    sys.exit(main())
