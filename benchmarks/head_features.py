"""Which features should the calibrated head see? Frozen, adapted, or both, from one training run.

The method (default ``sdlora``) trains exactly as in ``sdlora run`` (``engine.run_task``, same seed; the extra
passes restore the global RNG). Around each task the task's training data (evaluation transforms) goes through
the adapted model before and after the task, and through the frozen pretrained backbone, giving ``u`` (frozen),
``v`` (adapted) and ``h = ReLU(u P)`` (RanPAC's random features of the frozen block, ``--projection`` wide).
Per-class counts and means and one pooled scatter of ``[h, u, v]`` are kept (what ``method.calib.features: both``
keeps); old classes' ``v`` block is moved by the closed-form linear drift map after each task (``v~v``: from the
adapted features alone, as ``sdlora.calibration`` does; ``v~uv``: the frozen features as extra regressors).
``oracle`` recomputes every class's statistics from its training data with the final model: it uses old data,
which the method may not, and is the bound that drift compensation approaches. Every head is the relative ridge
(0.1) on the chosen blocks, each block scaled to one mean second moment and the adapted block then by ``w``.

Usage::

    PYTHONPATH=src python benchmarks/head_features.py demo --seed 1993 [--save F.pt] [--set key=value ...]
    PYTHONPATH=src python benchmarks/head_features.py --load F.pt           # score saved features again
    PYTHONPATH=src python benchmarks/head_features.py --load F.pt --projection 2048 --ridges 0.01,0.1,1

Prints final Acc on the test data of every class for each head; the trained head's own final Acc first. With
``--ridges``: ``sdlora_calib``'s head at each relative ridge, its final Acc beside its accuracy on 20% of the first
task held out from the statistics (how RanPAC selects its ridge without old data).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdlora.backbones.factory import create_backbone
from sdlora.data import batch_to
from sdlora.engine import build_run, run_task, task_data
from sdlora.methods import load_run_config
from sdlora.runstate import RunState
from sdlora.training import Runtime

RIDGE = 0.1
DRIFT_RIDGE = 1e-2


def collect(config: str, method_name: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Train once; return per-task (u, v) before and after each task, the final model's features of every task's
    training data, and the test features (float32, CPU)."""
    cfg, _ = load_run_config(config, [*overrides, f"seed={seed}", f"method.name={method_name}"])
    dev = torch.device("cpu")
    _backbone, data, scenario, method = build_run(cfg, dev)
    with torch.random.fork_rng(devices=[]):  # a second backbone must not move the run's RNG
        frozen = create_backbone(cfg.backbone, cfg.data.image_size).model.eval()
    rt = Runtime(train=cfg.train, seed=cfg.seed, device=dev, workers=cfg.data.num_workers)
    state = RunState(session_start=time.time())

    @torch.no_grad()
    def embed(ds: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        was = method.training
        method.eval()
        us, vs, ys = [], [], []
        with torch.random.fork_rng(devices=[]):
            for x, y in DataLoader(ds, batch_size=256, shuffle=False):
                x = batch_to(x, dev)
                us.append(frozen(x).float())
                vs.append(method.features(x).float())
                ys.append(y)
        method.train(was)
        return torch.cat(us), torch.cat(vs), torch.cat(ys)

    n = scenario.num_tasks
    out: dict[str, Any] = {"seed": seed, "n": n, "config": config, "method": method_name}
    for t in range(n):
        td = task_data(scenario, data, t)
        if t:
            out[f"before{t}"] = embed(td.statistics)[1]
        run_task(method, state, td, rt, num_tasks=n)
        u, v, y = embed(td.statistics)
        out[f"task{t}"] = (u, v, y, td.class_start, td.class_end)
    for j in range(n):
        u, v, _ = embed(task_data(scenario, data, j).statistics)
        out[f"final{j}"] = (u, v)
    out["test"] = embed(task_data(scenario, data, n - 1).test)
    out["trained"] = float(state.metrics()["acc_after_task"][-1])
    return out


class Stats:
    """Counts, means and the pooled scatter of ``z`` per class (float64)."""

    def __init__(self, dim: int) -> None:
        self.n = torch.zeros(0, dtype=torch.float64)
        self.mu = torch.zeros(0, dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, z: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        for c in range(lo, hi):
            zc = z[y == c]
            m = zc.mean(0)
            self.n = torch.cat([self.n, torch.tensor([float(len(zc))], dtype=torch.float64)])
            self.mu = torch.cat([self.mu, m[None]])
            self.scatter += (zc - m).t() @ (zc - m)

    def move(self, cols: list[int], a: torch.Tensor, b: torch.Tensor, regs: list[int]) -> None:
        """``z[cols] <- z[regs] A + b``, every other column unchanged: means and scatter move exactly."""
        m = torch.eye(self.mu.shape[1], dtype=torch.float64)
        m[:, cols] = 0.0
        for i, r in enumerate(regs):
            m[r, cols] = a[i]
        shift = torch.zeros(self.mu.shape[1], dtype=torch.float64)
        shift[cols] = b
        self.mu = self.mu @ m + shift
        self.scatter = m.t() @ self.scatter @ m


def drift(zb: torch.Tensor, za: torch.Tensor, regs: list[int], cols: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares ``za[cols] ~ zb[regs] A + b`` pulled towards "no drift" (as calibration.linear_drift)."""
    x = torch.cat([zb[:, regs], torch.ones(len(zb), 1, dtype=torch.float64)], 1)
    lam = DRIFT_RIDGE * float(zb[:, regs].square().sum()) / len(regs)
    target = torch.zeros(len(regs) + 1, len(cols), dtype=torch.float64)
    for j, c in enumerate(cols):
        target[regs.index(c), j] = 1.0
    eye = torch.eye(len(regs) + 1, dtype=torch.float64)
    p = torch.linalg.solve(x.t() @ x + lam * eye, x.t() @ za[:, cols] + lam * target)
    return p[:-1], p[-1]


def ridge_acc(
    st: Stats,
    cols: list[int],
    blocks: list[tuple[int, int, float]],
    zt: torch.Tensor,
    yt: torch.Tensor,
    ridge: float = RIDGE,
) -> float:
    """Final Acc of the block-scaled relative ridge head on columns ``cols`` of the statistics."""
    n, mu = st.n, st.mu[:, cols]
    g = st.scatter[cols][:, cols] + mu.t() @ (n[:, None] * mu)
    scale = torch.ones(len(cols), dtype=torch.float64)
    for lo, hi, w in blocks:
        scale[lo:hi] = w / torch.sqrt(torch.diagonal(g)[lo:hi].mean() / float(n.sum()))
    mu, g = mu * scale, g * scale[:, None] * scale[None, :]
    k = len(cols)
    ga = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    ga[:k, :k] = g
    ga[:k, k] = ga[k, :k] = (n[:, None] * mu).sum(0)
    ga[k, k] = n.sum()
    c = torch.cat([mu * n[:, None], n[:, None]], 1).t()
    lam = ridge * float(torch.diagonal(ga).mean())
    w = torch.linalg.solve(ga + lam * torch.eye(k + 1, dtype=torch.float64), c)
    z = torch.cat([zt[:, cols] * scale, torch.ones(len(zt), 1, dtype=torch.float64)], 1)
    return 100.0 * float(((z @ w).argmax(1) == yt).double().mean())


class Blocks:
    """``z = [h, u, v]`` of saved features, with ``P`` drawn as ``CalibratedHead.ensure_projection`` draws it (so
    the "w=0.5, drift v~v" head is ``sdlora_calib``'s), and the column ranges of its blocks."""

    def __init__(self, saved: dict[str, Any], m: int) -> None:
        self.m, self.d = m, saved["test"][0].shape[1]
        gen = torch.Generator().manual_seed((saved["seed"] * 1_000_003 + 101) % (2**63 - 1))
        self.p = torch.randn(self.d, m, generator=gen).double()
        m, d = self.m, self.d
        self.h, self.u, self.v = list(range(m)), list(range(m, m + d)), list(range(m + d, m + 2 * d))

    def z(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, v = u.double(), v.double()
        return torch.cat([torch.relu(u @ self.p), u, v], 1)

    def weights(self, w: float) -> list[tuple[int, int, float]]:
        m, d = self.m, self.d
        return [(0, m, 1.0), (m, m + d, 1.0), (m + d, m + 2 * d, w)]


def compensated(saved: dict[str, Any], bl: Blocks, drifts: dict[str, list[int] | None]) -> dict[str, Stats]:
    """Statistics of ``[h, u, v]`` accumulated task by task, one store per entry of ``drifts``: the old classes'
    ``v`` block moved after each task by the linear drift map regressed on those columns (``None``: not moved)."""
    stores = {name: Stats(bl.m + 2 * bl.d) for name in drifts}
    for t in range(saved["n"]):
        u, v, y, lo, hi = saved[f"task{t}"]
        za = bl.z(u, v)
        if t:
            zb = bl.z(u, saved[f"before{t}"])
            for name, regs in drifts.items():
                if regs is not None:
                    a, b = drift(zb, za, regs, bl.v)
                    stores[name].move(bl.v, a, b, regs)
        for st in stores.values():
            st.add(za, y, lo, hi)
    return stores


def score(saved: dict[str, Any], projection: int) -> list[tuple[str, float]]:
    bl = Blocks(saved, projection)
    m, d, h, uu, vv = bl.m, bl.d, bl.h, bl.u, bl.v
    stores = compensated(saved, bl, {"none": None, "v~v": vv, "v~uv": uu + vv})
    oracle = Stats(m + 2 * d)
    for j in range(saved["n"]):
        u, v = saved[f"final{j}"]
        _, _, y, lo, hi = saved[f"task{j}"]
        oracle.add(bl.z(u, v), y, lo, hi)
    stores["oracle"] = oracle
    ut, vt, yt = saved["test"]
    zt = bl.z(ut, vt)
    rows = [("trained linear head (the run)", saved["trained"])]
    rows += [
        ("frozen u", ridge_acc(oracle, uu, [], zt, yt)),
        (f"frozen h (RanPAC features, M={m})", ridge_acc(oracle, h, [], zt, yt)),
        ("frozen [h, u]", ridge_acc(oracle, h + uu, bl.weights(1.0)[:2], zt, yt)),
    ]
    for name, st in stores.items():
        rows.append((f"adapted v, drift {name}", ridge_acc(st, vv, [], zt, yt)))
        for w in (1.0, 0.5):
            label = " (sdlora_calib)" if (w, name) == (0.5, "v~v") else ""
            rows.append((f"[h, u, v] w={w:g}, drift {name}{label}", ridge_acc(st, h + uu + vv, bl.weights(w), zt, yt)))
    return rows


def ridge_scan(saved: dict[str, Any], projection: int, ridges: list[float]) -> list[tuple[str, float, float]]:
    """For each relative ridge: final Acc of ``sdlora_calib``'s head (``[h, u, v]``, w = 0.5, drift ``v~v``), and
    the accuracy of the same head fitted on 80% of the first task and scored on its other 20% (a fixed split):
    RanPAC's way of selecting the ridge without old data."""
    bl = Blocks(saved, projection)
    cols = bl.h + bl.u + bl.v
    st = compensated(saved, bl, {"v~v": bl.v})["v~v"]
    ut, vt, yt = saved["test"]
    zt = bl.z(ut, vt)
    u0, v0, y0, lo0, hi0 = saved["task0"]
    z0 = bl.z(u0, v0)
    perm = torch.randperm(len(y0), generator=torch.Generator().manual_seed(0))
    val, fit = perm[: len(y0) // 5], perm[len(y0) // 5 :]
    first = Stats(bl.m + 2 * bl.d)
    first.add(z0[fit], y0[fit], lo0, hi0)
    return [
        (
            f"ridge {r:g}",
            ridge_acc(st, cols, bl.weights(0.5), zt, yt, r),
            ridge_acc(first, cols, bl.weights(0.5), z0[val], y0[val], r),
        )
        for r in ridges
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--method", default="sdlora")
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--projection", type=int, default=4096)  # sdlora_calib's (calibration.calibrated_variant)
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--ridges", default=None, help="comma-separated relative ridges: scan sdlora_calib's head instead")
    args = ap.parse_args()
    t0 = time.time()
    if args.load:
        saved = torch.load(args.load)
    else:
        if not args.config:
            ap.error("a config (or --load FILE)")
        saved = collect(args.config, args.method, args.seed, args.overrides)
        if args.save:
            torch.save(saved, args.save)
    head = f"{saved['config']} | {saved['method']} | seed {saved['seed']} | M {args.projection}"
    if args.ridges:
        print(f"{head} | sdlora_calib's head: final Acc, and first-task held-out Acc (80/20 split)")
        for name, acc, held_out in ridge_scan(saved, args.projection, [float(r) for r in args.ridges.split(",")]):
            print(f"{name:<40} {acc:6.2f} {held_out:6.2f}")
    else:
        print(f"{head} | final Acc, ridge {RIDGE}")
        for name, acc in score(saved, args.projection):
            print(f"{name:<40} {acc:6.2f}")
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
