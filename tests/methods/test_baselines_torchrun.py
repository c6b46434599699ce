"""The comparison baselines under torchrun (2 gloo processes on CPU) against one process: the same accuracy matrix.

Covers what only a real process group exercises: DDP with prompt pools (every prompt and key stays in the graph,
so DDP finds no unused parameter), RanPAC's statistics summed over processes, lora_merge's per-task merges
checked identical on every rank. Slow (one launch per method, ~10 s of start-up each on 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from method_helpers import run_tiny, two_task_config

from engine_helpers import write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
]

OPTIONS = {
    "l2p": {"pool_size": 4, "prompt_length": 4, "top_k": 2},
    "coda_prompt": {"pool_size": 4, "prompt_length": 4, "layers": [0, 1], "ortho_weight": 0.1},
    "ranpac": {"projection_dim": 48},
    "lora_merge": {},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_processes_match_one(tmp_path, name):
    cfg = two_task_config(name)
    cfg["method"]["options"] = OPTIONS[name]
    cfg["data"]["train_per_class"] = 16  # global batch 8 over 2 processes: no ragged batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_tiny(tmp_path / "single", cfg)
    finally:
        torch.set_num_threads(threads)
    write_config(tmp_path / "cfg.yaml", cfg)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", "-m", "sdlora", "run", "cfg.yaml", "--out", "two"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads(Path(tmp_path / "two" / "results.json").read_text())
    assert two["status"] == "finished" and two["completed_tasks"] == 2
    assert two["accuracy_matrix"] == [pytest.approx(row, abs=1e-6) for row in single["accuracy_matrix"]]
    assert two["test_samples_per_task"] == single["test_samples_per_task"]
