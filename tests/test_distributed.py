"""torchrun on CPU: 2 gloo processes on loopback against 1 process, same config and global batch.

Each launch costs ~10 s of interpreter start-up on 2 cores, so the launches are shared through module-scoped
fixtures: one 2-process CLI run (compared with an in-process single run), one resume of it, one SD-LoRA-KD run
through a small driver that records every rank's state after each task, and (marked slow) one refused run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config, write_config
from sdlora.config import RunConfig
from sdlora.configtools import from_dict
from sdlora.distributed import DistInfo, check_ranks_agree
from sdlora.engine import run_experiment

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

TIMEOUT = 240
# Global batch 8 over 2 processes: 4 samples each, 32 training images per task, so no batch is ragged.
CFG = tiny_config()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    cfg = from_dict(RunConfig, CFG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun process (OMP_NUM_THREADS=1); results do not depend on it
    try:
        run_experiment(cfg, out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The CLI under torchrun, 2 processes, run from an empty working directory (to see stray writes)."""
    work = tmp_path_factory.mktemp("two")
    write_config(work / "cfg.yaml", CFG)
    proc = _ok(_torchrun(["-m", "sdlora", "run", "cfg.yaml", "--out", "run"], cwd=work))
    return work, proc


def test_two_processes_match_one(single, two):
    work, _ = two
    a, b = _results(single), _results(work / "run")
    assert b["status"] == "finished" and b["completed_tasks"] == 3
    assert b["accuracy_matrix"] == [pytest.approx(row, abs=1e-6) for row in a["accuracy_matrix"]]
    assert b["test_samples_per_task"] == a["test_samples_per_task"]  # every test image counted exactly once
    assert a["accuracy_matrix"][0][0] > 75.0  # not a degenerate comparison: the model learns
    # The logged loss is the epoch mean over all samples (summed over processes), as with one process.
    assert [t["loss"] for t in b["task_log"]] == pytest.approx([t["loss"] for t in a["task_log"]], rel=1e-5)
    assert [t["steps"] for t in b["task_log"]] == [t["steps"] for t in a["task_log"]]
    # Rank 0's checkpoint holds the same weights as the single process (up to gradient summation order).
    from safetensors.torch import load_file

    sa = load_file(str(single / "checkpoints" / "task_002.safetensors"))
    sb = load_file(str(work / "run" / "checkpoints" / "task_002.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.startswith("rng."):
            torch.testing.assert_close(sb[k], sa[k], atol=1e-5, rtol=1e-4, msg=k)


def test_only_rank_zero_writes_and_reports(single, two):
    work, proc = two
    # The same files as a single-process run, nothing else in the working directory.
    assert _files(work / "run") == _files(single)
    assert _files(work) == {"cfg.yaml"} | {f"run/{f}" for f in _files(single)}
    log = (work / "run" / "log.txt").read_text()
    for t in (1, 2, 3):
        assert log.count(f"task {t}/3 |") == 1, log
    assert "x2 processes" in log
    # Console: progress and the final table from rank 0 only, no errors or warnings from any rank.
    assert proc.stderr.count("| method sdlora |") == 1, proc.stderr  # the header, once
    assert proc.stderr.count("task 3/3 |") == 1, proc.stderr
    assert proc.stdout.count("run directory: run") == 1, proc.stdout
    for bad in ("Traceback", "sdlora: error", "Warning", "WARNING"):
        assert bad not in proc.stderr, proc.stderr
    # The checkpoint's JSON commit marker names a valid tensors file (one writer, no torn write).
    assert sorted(p.name for p in (work / "run" / "checkpoints").glob("*.json")) == [
        f"task_00{i}.json" for i in range(3)
    ]


def test_resume_under_torchrun(two, tmp_path):
    work, _ = two
    part = tmp_path / "part"
    shutil.copytree(work / "run", part)
    # Simulate a run killed during task 3, as tests/test_engine.py does.
    for p in (part / "checkpoints").glob("task_002.*"):
        p.unlink()
    res = _results(part)
    res["status"] = "running"
    (part / "results.json").write_text(json.dumps(res))
    write_config(tmp_path / "cfg.yaml", CFG)
    proc = _ok(_torchrun(["-m", "sdlora", "run", "cfg.yaml", "--out", "part", "--resume"], cwd=tmp_path))
    assert proc.stderr.count("resuming after task 2 of 3") == 1, proc.stderr  # rank 0 only
    resumed, full = _results(part), _results(work / "run")
    assert resumed["status"] == "finished"
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert (part / "checkpoints" / "task_002.json").is_file()


DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from sdlora import engine
    from sdlora.distributed import state_fingerprint
    from sdlora.methods import load_run_config
    from sdlora.methods.sdlora import SDLoRA

    cfg_path, out, rec_dir = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")  # a caller-owned group: run_experiment must leave it alive
    records, seen = [], {}
    end_task = SDLoRA.end_task

    def recording_end_task(self, ctx):
        report = end_task(self, ctx)
        records.append({"task": ctx.task, "report": report, "fingerprint": state_fingerprint(self)})
        return report

    check = engine.check_ranks_agree

    def spying_check(method, info, device, task):
        seen.update(method=method, info=info, device=device)
        return check(method, info, device, task)

    SDLoRA.end_task = recording_end_task
    engine.check_ranks_agree = spying_check
    cfg, _ = load_run_config(cfg_path)
    engine.run_experiment(cfg, out)
    alive = dist.is_initialized()
    # The engine's own check must notice a process that drifted.
    with torch.no_grad():
        if rank == 1:
            seen["method"].head.weights[0].add_(1.0)
    try:
        check(seen["method"], seen["info"], seen["device"], 99)
        detected = None
    except engine.RunError as e:
        detected = str(e)
    with open(os.path.join(rec_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"records": records, "detected": detected, "group_alive": alive}, f)
    dist.destroy_process_group()
    """
)


def test_kd_and_alignment_ranks_hold_identical_state(tmp_path):
    """SD-LoRA-KD: the least-squares fit and absorption run on every rank and give bit-identical states; so does
    classifier alignment (statistics summed over processes, the same Gaussian samples on every rank): the
    engine's cross-rank check after every task (which includes the statistics and the realigned head) passes."""
    # tau above any possible residual (d has unit norm): every new direction after task 1 is absorbed.
    cfg = tiny_config(
        method={
            "name": "sdlora_kd",
            "adapter": {"kd_tau": 1.5},
            "align": {"enabled": True, "epochs": 1, "samples_per_class": 16},
        },
        train={"epochs": 2},
    )
    write_config(tmp_path / "kd.yaml", cfg)
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "rec").mkdir()
    _ok(_torchrun(["driver.py", "kd.yaml", "run", "rec"], cwd=tmp_path))
    r0, r1 = (json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [x["task"] for x in r0["records"]] == [0, 1, 2]
    assert sum(x["report"]["absorbed"] for x in r0["records"]) > 0  # the KD path really ran
    assert r0["records"] == r1["records"]  # same reports, same sha256 of head + adapter state after every task
    assert r0["group_alive"] and r1["group_alive"]
    assert r0["detected"] and r1["detected"] and "different model states" in r0["detected"]
    assert _files(tmp_path / "run") >= {"results.json", "checkpoints/task_002.safetensors"}
    reports = [t["method_report"] for t in _results(tmp_path / "run")["task_log"]]
    assert [r["align_classes"] for r in reports] == [2, 4, 6]  # every class's statistics, from both shards
    assert [r.get("align_samples") for r in reports] == [None, 4 * 16, 6 * 16]


@pytest.mark.slow  # one more launch (~10 s); the rest of the file stays near a minute on 2 cores
def test_refused_run_stops_every_process(two):
    """Rank 0 refuses to overwrite a finished run; all processes exit with its message instead of hanging."""
    work, _ = two
    proc = _torchrun(["-m", "sdlora", "run", "cfg.yaml", "--out", "run"], cwd=work)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a finished run") == 2, proc.stderr  # both ranks, same message


@pytest.mark.slow  # one more launch (~10 s)
def test_held_run_directory_stops_every_process(tmp_path):
    """Only rank 0 takes the run directory's lock; when another process holds it, every rank stops naming it."""
    write_config(tmp_path / "cfg.yaml", CFG)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    hold = "import sys, time; from pathlib import Path; from sdlora.rundir import run_dir_lock\n"
    hold += "with run_dir_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        proc = _torchrun(["-m", "sdlora", "run", "cfg.yaml", "--out", "run"], cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert proc.stderr.count(f"is in use by process {holder.pid}") == 2, proc.stderr  # both ranks, rank 0's message


def test_check_is_a_no_op_in_one_process():
    check_ranks_agree(None, DistInfo(), torch.device("cpu"), 0)  # type: ignore[arg-type]


@pytest.mark.slow  # one more launch (~10 s)
def test_only_rank_zero_tracks(single, tmp_path):
    """``train.log_to`` under torchrun: one TensorBoard writer (rank 0), every global step once."""
    pytest.importorskip("tensorboard", reason="the TensorBoard tracker needs `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_config(tmp_path / "cfg.yaml", {**CFG, "train": {**CFG["train"], "log_to": ["tensorboard"]}})
    _ok(_torchrun(["-m", "sdlora", "run", "cfg.yaml", "--out", "run"], cwd=tmp_path))
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    total = sum(t["steps"] for t in _results(single)["task_log"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, total + 1))
    assert [e.value for e in acc.Scalars("metrics/acc")] == pytest.approx(_results(tmp_path / "run")["acc_after_task"])
