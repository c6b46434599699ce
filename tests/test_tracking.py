"""Run tracking (``train.log_to``): what a tiny run sends to TensorBoard, MLflow and W&B, read back offline from what
each wrote (event files, MLflow's file store, the W&B offline run file) and compared with the run's own record."""

from __future__ import annotations

import glob
import json
import struct
import sys
from pathlib import Path

import pytest

from engine_helpers import tiny_config
from sdlora.config import RunConfig
from sdlora.configtools import ConfigError, from_dict
from sdlora.engine import run_experiment


def _run(tmp_path: Path, log_to: list[str], out: str = "run", **kw) -> dict:
    cfg = from_dict(RunConfig, tiny_config(scenario={"num_tasks": 2}, train={"epochs": 2, "log_to": log_to}))
    return run_experiment(cfg, tmp_path / out, **kw)


def _kill_after_first_task(out: Path) -> None:
    for p in (out / "checkpoints").glob("task_001*"):
        p.unlink()
    res = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**res, "status": "running"}))


def _epoch_losses(results: dict) -> list[float]:
    return [e["loss"] for e in results["task_log"]]


def _total_steps(results: dict) -> int:
    return sum(e["steps"] for e in results["task_log"])


# ------------------------------------------------------------------------------------------------- TensorBoard
def _tb(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_runs_curves_metrics_plots_and_config(tmp_path):
    pytest.importorskip("tensorboard", reason="the TensorBoard tracker needs `pip install tensorboard`")
    results = _run(tmp_path, ["tensorboard"])
    acc = _tb(tmp_path / "run")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, _total_steps(results) + 1))
    assert len(acc.Scalars("train/lr")) == len(loss) and acc.Scalars("train/lr")[0].value == pytest.approx(0.01)
    # the last epoch loss of each task is the task log's loss (epochs: 2 per task)
    epochs = acc.Scalars("train/epoch_loss")
    assert [e.value for e in epochs][1::2] == pytest.approx(_epoch_losses(results), rel=1e-6)
    assert [e.value for e in acc.Scalars("metrics/acc")] == pytest.approx(results["acc_after_task"], abs=1e-4)
    assert [e.step for e in acc.Scalars("metrics/acc")] == [1, 2]
    assert [e.value for e in acc.Scalars("accuracy/task_01")] == pytest.approx(
        [row[0] for row in results["accuracy_matrix"]], abs=1e-4
    )
    assert len(acc.Scalars("metrics/forgetting")) == 1  # defined from the second task on
    assert {"plots/accuracy_matrix", "plots/accuracy_curve"} <= set(acc.Tags()["images"])
    assert "config" in " ".join(acc.Tags()["tensors"])
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["tensorboard"]["log_dir"].endswith(
        "tensorboard"
    )


def test_resume_continues_the_tensorboard_run_without_the_killed_sessions_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="the TensorBoard tracker needs `pip install tensorboard`")
    full = _run(tmp_path, ["tensorboard"], out="full")
    _run(tmp_path, ["tensorboard"])
    _kill_after_first_task(tmp_path / "run")
    resumed = _run(tmp_path, ["tensorboard"], resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    acc = _tb(tmp_path / "run")
    # the second task's steps were written twice (killed session, resumed one); the purge keeps one copy
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, _total_steps(full) + 1))
    ref = {e.step: e.value for e in _tb(tmp_path / "full").Scalars("train/loss")}
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([ref[s] for s in steps], rel=1e-5)
    # --overwrite: a new run in the same directory; the old run's events are dropped, not mixed in
    again = _run(tmp_path, ["tensorboard"], overwrite=True)
    assert [e.step for e in _tb(tmp_path / "run").Scalars("train/loss")] == list(range(1, _total_steps(again) + 1))
    assert len(_tb(tmp_path / "run").Scalars("metrics/acc")) == 2


# ------------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the MLflow tracker needs `pip install mlflow`")
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sdlora-test")
    return mlflow.tracking.MlflowClient(uri)


def test_mlflow_run_holds_metrics_params_and_artifacts_and_resume_continues_it(tmp_path, mlflow_store):
    full = _run(tmp_path, ["mlflow"], out="full")
    client = mlflow_store
    run_id = json.loads((tmp_path / "full" / "tracking.json").read_text())["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.01"
    assert run.data.params["method.adapter.rank"] == "2"
    history = client.get_metric_history(run_id, "metrics/acc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx(full["acc_after_task"])
    assert len(client.get_metric_history(run_id, "train/loss")) == _total_steps(full)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"config.json", "environment.json", "plots/accuracy_matrix.png"} <= artifacts
    # a resumed run continues the same MLflow run
    _run(tmp_path, ["mlflow"])
    first_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"]
    _kill_after_first_task(tmp_path / "run")
    _run(tmp_path, ["mlflow"], resume=True)
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow"]["run_id"] == first_id
    steps = [m.step for m in client.get_metric_history(first_id, "metrics/acc")]
    assert sorted(steps) == [1, 2, 2] and client.get_run(first_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 2  # full + run: no third run for the resume


# ----------------------------------------------------------------------------------------------------- W&B
def _wandb_records(run_dir: Path) -> list:
    """Records of the offline W&B run file (LevelDB-log framing: 32 KiB blocks of CRC/length/type chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    records = []
    for path in files:
        data, pos, buf = Path(path).read_bytes(), 7, b""  # 7: the file header ":W&B", magic, version
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and length == 0:
                break
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST chunk: one record complete
                rec = pb.Record()
                rec.ParseFromString(buf)
                records.append(rec)
                buf = b""
    return records


def _history(records: list) -> list[dict]:
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_holds_the_curves_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the W&B tracker needs `pip install wandb`")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "sdlora-test"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    full = _run(tmp_path, ["wandb"], out="full")
    rows = _history(_wandb_records(tmp_path / "full"))
    losses = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in losses] == list(range(1, _total_steps(full) + 1))
    accs = [r for r in rows if "metrics/acc" in r]
    assert [r["task"] for r in accs] == [1, 2]
    assert [r["metrics/acc"] for r in accs] == pytest.approx(full["acc_after_task"])
    images = [r for r in rows if "plots/accuracy_matrix/_type" in r]
    assert len(images) == 1 and images[0]["plots/accuracy_matrix/_type"] == "image-file"
    assert glob.glob(
        str(tmp_path / "full" / "wandb" / "offline-run-*" / "files" / images[0]["plots/accuracy_matrix/path"])
    )
    run_id = json.loads((tmp_path / "full" / "tracking.json").read_text())["wandb"]["id"]
    runs = [r.run for r in _wandb_records(tmp_path / "full") if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == run_id and runs[0].project == "sdlora-test"
    # --resume: the same W&B run id
    _run(tmp_path, ["wandb"])
    first = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb"]["id"]
    _kill_after_first_task(tmp_path / "run")
    _run(tmp_path, ["wandb"], resume=True)
    records = _wandb_records(tmp_path / "run")
    assert {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"} == {first}
    assert json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb"]["id"] == first


# -------------------------------------------------------------------------------------------------- config
def test_log_to_is_checked_and_a_missing_package_stops_the_run_before_training(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError, match=r"train.log_to: unknown tracker 'neptune'; known: mlflow, tensorboard, wandb"
    ):
        from_dict(RunConfig, tiny_config(train={"log_to": ["neptune"]}))
    with pytest.raises(ConfigError, match=r"train.log_to: 'mlflow' is named twice"):
        from_dict(RunConfig, tiny_config(train={"log_to": ["mlflow", "mlflow"]}))
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not installed
    with pytest.raises(ImportError, match=r"train.log_to names wandb .*pip install 'sdlora\[track\]'"):
        _run(tmp_path, ["wandb"])
    assert not (tmp_path / "run" / "results.json").exists()


def test_learn_adds_its_task_to_the_tracked_run(tmp_path):
    pytest.importorskip("tensorboard", reason="the TensorBoard tracker needs `pip install tensorboard`")
    from engine_helpers import folder_config, write_config, write_image_folder
    from sdlora.cli import main
    from sdlora.learn import learn

    counts = {"a": 3, "b": 3, "c": 3}
    folder = write_image_folder(tmp_path / "folder", counts, dict.fromkeys(counts, 2))
    cfg = folder_config(folder)
    cfg["train"]["log_to"] = ["tensorboard"]
    run = tmp_path / "run"
    assert main(["-q", "run", str(write_config(tmp_path / "c.yaml", cfg)), "--out", str(run)]) == 0
    before = _total_steps(json.loads((run / "results.json").read_text()))
    new = write_image_folder(tmp_path / "new", {"d": 3, "e": 3}, {"d": 1, "e": 1})
    learn(run, new)
    results = json.loads((run / "results.json").read_text())
    acc = _tb(run)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, _total_steps(results) + 1))
    assert _total_steps(results) > before
    assert [e.step for e in acc.Scalars("metrics/acc")] == [1, 2, 3]
    assert acc.Scalars("metrics/acc")[-1].value == pytest.approx(results["acc_after_task"][-1], abs=1e-4)


def test_tracking_can_be_switched_on_when_resuming(tmp_path):
    """``train.log_to`` does not change results, so ``--resume`` accepts it changed; the steps keep their numbers."""
    pytest.importorskip("tensorboard", reason="the TensorBoard tracker needs `pip install tensorboard`")
    _run(tmp_path, [])
    _kill_after_first_task(tmp_path / "run")
    first_task_steps = json.loads((tmp_path / "run" / "results.json").read_text())["task_log"][0]["steps"]
    results = _run(tmp_path, ["tensorboard"], resume=True)
    steps = [e.step for e in _tb(tmp_path / "run").Scalars("train/loss")]
    assert steps == list(range(first_task_steps + 1, _total_steps(results) + 1))
