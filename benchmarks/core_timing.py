"""The timing harness of ``bench_core.py``: one configuration's training step or inference timed (paired against
its reference, ABBA), its memory and flops counted, each configuration in its own child process.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from core_machine import children_cpu_seconds, cpu_busy_seconds, max_rss_bytes, reset_rss_high_water
from core_models import (
    AMP,
    PlainLoRAQKVSliceAdd,
    add_plain_lora,
    build_backbone,
    build_library_plain_lora,
    build_sdlora,
    feature_dim,
    tokens_per_image,
)
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdlora.lora import SDLoRAModel, route_costs


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


def train_step(model: nn.Module, params: list[Tensor], cfg: dict[str, Any], x: Tensor, y: Tensor):  # noqa: ANN202
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
        step, loss_fn, head = train_step(model, params, cfg, x, y)
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
        ref_step, _, _ = train_step(ref_model, ref_params, cfg, x, y)
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
