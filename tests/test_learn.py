"""``sdlora learn``: a finished run learns the classes of a folder as its next task.

The reference for "right" is the engine itself: a 2-task run that then learns a folder of two more classes must
end exactly where a 3-task run over all the classes ends (same accuracy matrix, same checkpointed state).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine_helpers import tiny_config, write_config
from sdlora.cli import main
from sdlora.distributed import state_fingerprint
from sdlora.engine import build_method_from_run
from sdlora.learn import LearnError, learn
from sdlora.methods import METHODS
from sdlora.predict import Predictor, load_run
from sdlora.rundir import RunError, load_checkpoint, run_dir_lock

ALL = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"]

#: Options that keep each method tiny on the 2-block test ViT (the defaults are sized for a ViT-B: RanPAC's
#: M = 10,000, 10-prompt pools over blocks 2-4, the calibrated head's 4,096 random features).
TINY_OPTIONS: dict[str, dict] = {
    "ranpac": {"options": {"projection_dim": 48}},
    "l2p": {"options": {"pool_size": 4, "prompt_length": 2, "top_k": 2, "layers": [0, 1]}},
    "coda_prompt": {"options": {"pool_size": 6, "prompt_length": 2, "layers": [0, 1]}},
    "inflora": {"options": {"rank": 2}},
    "sdlora_calib": {"calib": {"projection_dim": 16}},
    "seq_lora_calib": {"calib": {"projection_dim": 16}},
}


def _folder(root: Path, classes: list[str], train: int = 5, test: int = 3) -> Path:
    """A pre-split image folder; class ``cK`` has its own colour, the same pixels whichever folder holds it."""
    for split, n in (("train", train), ("test", test)):
        for name in classes:
            k = ALL.index(name)
            rng = np.random.default_rng([k, n])
            for i in range(n):
                img = rng.integers(0, 80, size=(20, 20, 3)).astype(np.int64)
                img[..., k % 3] += 40 + 20 * k
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


#: The 3-task reference of a method whose 2-task run + ``learn`` equals a 3-task run with other options. CODA-Prompt
#: splits its pool over the scenario's tasks when the first task begins (``pool_size // num_tasks`` components each),
#: so a run that learns one task more grows its pool by one more share of its own: 2 tasks x 3 of a pool of 6, then
#: 3 more, which is the 3-task run with a pool of 9.
LEARN_REFERENCE_OPTIONS: dict[str, dict] = {
    "coda_prompt": {"options": {**TINY_OPTIONS["coda_prompt"]["options"], "pool_size": 9}},
}


def _run(
    base: Path, name: str, root: Path, method: str = "sdlora", method_options: dict | None = None, **sections
) -> Path:
    options = TINY_OPTIONS.get(method, {}) if method_options is None else method_options
    cfg = tiny_config(
        method={"name": method, "adapter": {"rank": 2}, **options},
        data={"name": "imagefolder", "root": str(root), "train_per_class": None, "test_per_class": None},
        scenario={"shuffle": False, **sections.pop("scenario", {})},
        train={"epochs": 2, "threads": 1, **sections.pop("train", {})},
        **sections,
    )
    out = base / name
    assert main(["-q", "run", str(write_config(base / f"{name}.yaml", cfg)), "--out", str(out)]) == 0
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))  # every registered method, new ones included
def test_learn_is_the_engines_next_task(tmp_path, method):
    full = _run(
        tmp_path,
        "full",
        _folder(tmp_path / "all", ALL[:6]),
        method,
        LEARN_REFERENCE_OPTIONS.get(method),
        scenario={"num_tasks": 3},
    )
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]), method)
    before = _results(two)
    report = learn(two, _folder(tmp_path / "new", ["c4", "c5"]), name="late classes")
    after, reference = _results(two), _results(full)
    assert report.task == 2 and report.class_names == ["c4", "c5"] and not report.skipped
    lower = [row[: i + 1] for i, row in enumerate(after["accuracy_matrix"])]
    assert lower[:2] == [row[: i + 1] for i, row in enumerate(before["accuracy_matrix"])]  # old rows unchanged
    assert after["accuracy_matrix"] == reference["accuracy_matrix"]
    assert after["trainable_params_per_task"] == reference["trainable_params_per_task"]
    assert after["class_names"] == ALL[:6] and after["completed_tasks"] == after["num_tasks"] == 3
    assert after["status"] == "finished" and after["learned_tasks"][0]["name"] == "late classes"
    # the new checkpoint holds the state the engine reached after its own third task
    assert state_fingerprint(build_method_from_run(two)[0]) == state_fingerprint(build_method_from_run(full)[0])
    # derived files follow: the CSV table has the new row, predict and export know the new classes
    assert len((two / "accuracy_matrix.csv").read_text().strip().splitlines()) == 4
    assert load_run(two, device="cpu").class_names == ALL[:6]


def test_learn_adds_a_component_and_a_magnitude(tmp_path):
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]), "sdlora")
    method = build_method_from_run(two)[0]
    assert method.adapter.num_tasks == 2 and method.adapter.alphas().numel() == 2
    learn(two, _folder(tmp_path / "new", ["c4", "c5"]))
    method = build_method_from_run(two)[0]
    assert method.adapter.num_tasks == 3 and method.adapter.alphas().numel() == 3
    assert all(len(u.comp_ranks) == 3 for _, u in method.adapter.named_units())
    assert method.head.num_classes == 6
    preds, _ = Predictor(load_run(two, device="cpu")).predict(
        [str(p) for p in sorted((tmp_path / "new" / "test").rglob("*.png"))]
    )
    assert {p.label for p in preds} <= set(ALL[:6])


def test_dataset_classes_the_run_never_reached_make_room(tmp_path):
    """A scenario cut short (num_tasks) leaves dataset classes unseen: learned classes take their positions."""
    one = _run(tmp_path, "one", _folder(tmp_path / "first4", ALL[:4]), scenario={"num_tasks": 1})
    assert _results(one)["class_names"] == ALL[:4] and _results(one)["status"] == "finished"
    learn(one, _folder(tmp_path / "new", ["c4", "c5"]))
    res = _results(one)
    assert res["class_names"] == ["c0", "c1", "c4", "c5"] and res["tasks"] == [[0, 1], [4, 5]]
    assert res["class_order"] == [0, 1, 4, 5] and res["learned_tasks"][0]["class_ids"] == [4, 5]
    assert load_run(one, device="cpu").class_names == res["class_names"]


def test_known_class_names_and_unfinished_runs_are_refused(tmp_path, capsys):
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    snapshot = (two / "results.json").read_bytes()
    clash = _folder(tmp_path / "clash", ["c4"])
    (clash / "train" / "C1").mkdir()
    (clash / "test" / "C1").mkdir()
    for split in ("train", "test"):
        shutil.copy(next((clash / split / "c4").glob("*.png")), clash / split / "C1" / "a.png")
    with pytest.raises(LearnError, match=r"already knows the class\(es\) 'C1' \(known as 'c1'\)"):
        learn(two, clash)
    assert main(["learn", str(two), "--data", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    partial = _run(tmp_path, "partial", tmp_path / "first4", scenario={"num_tasks": 1})
    results = _results(partial)
    results["status"], results["num_tasks"] = "running", 2  # as if killed before its second task
    (partial / "results.json").write_text(json.dumps(results))
    with pytest.raises(LearnError, match="unfinished run"):
        learn(partial, _folder(tmp_path / "new", ["c4", "c5"]))
    assert (two / "results.json").read_bytes() == snapshot


def test_learn_waits_for_no_one_while_another_process_writes_the_run(tmp_path):
    """One writer per run directory: a learn on a run that is locked (a run, resume or learn going on) is refused
    and changes nothing."""
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    snapshot = (two / "results.json").read_bytes()
    with run_dir_lock(two), pytest.raises(RunError, match="is in use by process"):
        learn(two, _folder(tmp_path / "new", ["c4", "c5"]))
    assert (two / "results.json").read_bytes() == snapshot


def test_killed_learn_leaves_the_run_as_it_was_and_can_be_rerun(tmp_path, monkeypatch):
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    new = _folder(tmp_path / "new", ["c4", "c5"])
    reference = tmp_path / "reference"
    shutil.copytree(two, reference)
    learn(reference, new)
    files = {p.relative_to(two): p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"}

    # 1) interrupted while training: nothing of the run changes
    import sdlora.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sdlora.engine, "train_task", interrupted)
        with pytest.raises(KeyboardInterrupt):
            learn(two, new)
    now = {p.relative_to(two): p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert now == files

    # 2) killed after the checkpoint was written, before results.json (the commit): the run still loads as before
    import sdlora.learn

    with monkeypatch.context() as m:
        m.setattr(sdlora.learn, "atomic_write_json", interrupted)
        with pytest.raises(KeyboardInterrupt):
            learn(two, new)
    assert (two / "checkpoints" / "task_002.json").exists()  # written, not committed
    assert (two / "results.json").read_bytes() == files[Path("results.json")]
    method, _, record = build_method_from_run(two)
    assert record["task"] == 1 and method.head.num_classes == 4
    assert len(load_run(two, device="cpu").class_names) == 4
    assert main(["export", str(two), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "labels.txt").read_text().split() == ALL[:4]

    # 3) learn again: the same result as an uninterrupted learn
    learn(two, new)
    assert _results(two)["accuracy_matrix"] == _results(reference)["accuracy_matrix"]
    _, rec_a = load_checkpoint(two / "checkpoints" / "task_002.json")
    _, rec_b = load_checkpoint(reference / "checkpoints" / "task_002.json")
    assert rec_a["tensors_sha256"] == rec_b["tensors_sha256"]


def test_learn_with_keep_checkpoints_removes_the_old_one_only_after_its_commit(tmp_path, monkeypatch):
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]), train={"keep_checkpoints": 1})
    new = _folder(tmp_path / "new", ["c4", "c5"])
    names = lambda: sorted(p.name for p in (two / "checkpoints").glob("*.json"))  # noqa: E731
    assert names() == ["task_001.json"]
    import sdlora.learn

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed between the new checkpoint and results.json
        m.setattr(sdlora.learn, "atomic_write_json", interrupted)
        with pytest.raises(KeyboardInterrupt):
            learn(two, new)
    assert names() == ["task_001.json", "task_002.json"]
    assert build_method_from_run(two)[2]["task"] == 1  # the committed one is still there
    learn(two, new)
    assert names() == ["task_002.json"] and build_method_from_run(two)[2]["task"] == 2


def test_missing_earlier_test_set_is_reported_and_skipped(tmp_path, capsys):
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    first = _folder(tmp_path / "new1", ["c4", "c5"])
    assert main(["learn", str(two), "--data", str(first), "--name", "batch 1"]) == 0
    shutil.rmtree(first / "test")  # the first learned folder's test images are gone
    report = learn(two, _folder(tmp_path / "new2", ["c6", "c7"]))
    assert [t for t, _ in report.skipped] == [2] and "is not available" in report.skipped[0][1]
    res = _results(two)
    assert res["completed_tasks"] == 4 and res["class_names"] == ALL
    assert res["accuracy_matrix"][3][2] is None and res["accuracy_matrix"][3][3] is not None
    assert res["accuracy_matrix"][2][2] is not None  # the earlier row keeps its value
    assert res["test_samples_per_task"][2] == 6  # recorded when it was learned
    assert [r["name"] for r in res["learned_tasks"]] == ["batch 1", "new2"]
    # the run's own test data changed: its two tasks are skipped too, the learn still succeeds
    c0 = tmp_path / "first4" / "test" / "c0"
    shutil.copy(next(c0.glob("*.png")), c0 / "x.png")
    report = learn(two, _extra(tmp_path))
    assert {t for t, _ in report.skipped} == {0, 1, 2} and "has changed" in report.skipped[0][1]
    assert main(["report", str(two)]) == 0


def _extra(tmp_path: Path) -> Path:
    """A folder with two more classes (reuses c6's and c7's pixels under new names; one class alone is refused)."""
    root = tmp_path / "new3"
    src = tmp_path / "new2"
    for split in ("train", "test"):
        shutil.copytree(src / split / "c6", root / split / "early")
        shutil.copytree(src / split / "c7", root / split / "late")
    return root


# ------------------------------------------------------------------------------------------------- text runs
def _text_dir(root: Path, classes: list[int], train: int = 6, test: int = 2) -> Path:
    """A pre-split text directory (train.jsonl, test.jsonl); class ``cK``'s texts are the same in every directory."""
    from hf_helpers import class_texts, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        rows = [(t, f"c{c}") for t, c in class_texts(6, n, seed=seed) if c in classes]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def _text_run(base: Path, name: str, root: Path, model_dir: Path, **scenario) -> Path:
    from hf_helpers import hf_text_config

    cfg = hf_text_config(model_dir, root, scenario={"shuffle": False, **scenario})
    out = base / name
    assert main(["-q", "run", str(write_config(base / f"{name}.yaml", cfg)), "--out", str(out)]) == 0
    return out


def test_text_learn_is_the_engines_next_task(tmp_path, tiny_bert_dir, capsys):
    full = _text_run(tmp_path, "full", _text_dir(tmp_path / "all", [0, 1, 2, 3, 4, 5]), tiny_bert_dir, num_tasks=3)
    two = _text_run(tmp_path, "two", _text_dir(tmp_path / "first4", [0, 1, 2, 3]), tiny_bert_dir)
    before = _results(two)
    report = learn(two, _text_dir(tmp_path / "new", [4, 5]), name="late texts")
    after, reference = _results(two), _results(full)
    assert report.task == 2 and report.class_names == ["c4", "c5"] and not report.skipped
    assert [row[: i + 1] for i, row in enumerate(after["accuracy_matrix"])][:2] == [
        row[: i + 1] for i, row in enumerate(before["accuracy_matrix"])
    ]
    assert after["accuracy_matrix"] == reference["accuracy_matrix"]
    assert state_fingerprint(build_method_from_run(two)[0]) == state_fingerprint(build_method_from_run(full)[0])
    assert after["class_names"] == [f"c{i}" for i in range(6)]
    assert after["learned_tasks"][0]["dataset"] == "text_jsonl"
    # predict knows the new classes
    from sdlora.predict import collect_texts

    loaded = load_run(two, device="cpu")
    texts, _ = collect_texts([str(tmp_path / "new" / "test.jsonl")], loaded.config.data)
    assert len(texts) == 4 and loaded.class_names == after["class_names"]
    # known class names (from a single file, split here) are refused, the run is unchanged
    snapshot = (two / "results.json").read_bytes()
    clash = tmp_path / "clash.csv"
    clash.write_text("text,label\nthe cat,C1\na cat,C1\nthe boat,late\na boat,late\n")
    with pytest.raises(LearnError, match=r"already knows the class\(es\) 'C1' \(known as 'c1'\).*rename their labels"):
        learn(two, clash)
    assert main(["learn", str(two), "--data", str(tmp_path / "first4" / "../all")]) == 2  # a folder of jsonl: fine
    assert "already knows" in capsys.readouterr().err
    assert main(["learn", str(two), "--data", str(tmp_path)]) == 2
    assert "this is a text run" in capsys.readouterr().err
    assert (two / "results.json").read_bytes() == snapshot
    # the run's own test data changed: its tasks are reported and skipped; a single CSV file is split here
    with open(tmp_path / "first4" / "test.jsonl", "a") as f:
        f.write('{"text": "one more cat", "label": "c0"}\n')
    late = tmp_path / "late.csv"
    words = ("a", "the", "old", "new", "red", "blue")
    late.write_text("text,label\n" + "".join(f"tree {w},late\nboat {w},soon\n" for w in words))
    report = learn(two, late)
    assert {t for t, _ in report.skipped} == {0, 1} and "has changed" in report.skipped[0][1]
    res = _results(two)
    assert res["accuracy_matrix"][3][:2] == [None, None] and res["accuracy_matrix"][3][2] is not None
    assert res["learned_tasks"][1]["dataset"] == "text_csv" and res["learned_tasks"][1]["name"] == "late"
    assert res["learned_tasks"][1]["test_count"] == 4 and res["class_names"][-2:] == ["late", "soon"]


def test_learn_from_another_directory_reads_a_relative_data_root_where_the_run_did(tmp_path, monkeypatch):
    """Issue 22, item 5: a relative data.root was read against learn's working directory: the run's own test data
    was "not available" and the new row was recorded on the new classes only, for good."""
    _folder(tmp_path / "work" / "first4", ALL[:4])
    monkeypatch.chdir(tmp_path / "work")
    cfg = tiny_config(
        data={"name": "imagefolder", "root": "first4", "train_per_class": None, "test_per_class": None},
        scenario={"shuffle": False},
        train={"epochs": 1, "threads": 1},
    )
    run = tmp_path / "run"
    assert main(["-q", "run", str(write_config(tmp_path / "rel.yaml", cfg)), "--out", str(run)]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    report = learn(run, _folder(tmp_path / "new", ["c4", "c5"]))
    assert report.skipped == []
    assert all(v is not None for v in _results(run)["accuracy_matrix"][2])
    assert _results(run)["dataset"]["resolved_root"] == str(tmp_path / "work" / "first4")


def test_one_class_learn_is_refused_where_it_would_learn_nothing(tmp_path, capsys):
    """Issue 22, item 7: over one logit the current-task loss is 0: the class was 'learned' untrained, exit 0."""
    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    snapshot = {p: p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"}
    one = _folder(tmp_path / "one", ["c4"])
    assert main(["learn", str(two), "--data", str(one)]) == 2
    err = capsys.readouterr().err
    assert "holds one class ('c4')" in err and "loss_scope: all" in err and "simplecil" in err
    assert {p: p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"} == snapshot
    # what the message names works: a loss over every seen class, or prototypes
    all_scope = tiny_config(
        method={"name": "sdlora", "adapter": {"rank": 2}, "loss_scope": "all"},
        data={"name": "imagefolder", "root": str(tmp_path / "first4"), "train_per_class": None},
        scenario={"shuffle": False},
        train={"epochs": 1, "threads": 1},
    )
    all_scope["data"]["test_per_class"] = None
    config = write_config(tmp_path / "all.yaml", all_scope)
    assert main(["-q", "run", str(config), "--out", str(tmp_path / "all")]) == 0
    for run in (tmp_path / "all", _run(tmp_path, "simplecil", tmp_path / "first4", "simplecil")):
        assert learn(run, one).class_names == ["c4"]
        assert _results(run)["accuracy_matrix"][2][2] is not None


def test_class_names_in_two_unicode_spellings_are_one_class(tmp_path, capsys):
    """Issue 22, item 9: the NFD spelling of a known NFC class was learned as a new class."""
    import unicodedata

    from engine_helpers import write_image_folder

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    first = write_image_folder(tmp_path / "first", {"c0": 4, nfc: 4}, {"c0": 2, nfc: 2})
    run = _run(tmp_path, "run", first)
    with pytest.raises(LearnError, match=re.escape(f"already knows the class(es) {nfd!r} (known as {nfc!r})")):
        learn(run, write_image_folder(tmp_path / "nfd", {nfd: 4, "tea": 4}, {nfd: 2, "tea": 2}))
    assert _results(run)["completed_tasks"] == 1 and len(_results(run)["class_names"]) == 2
    both = write_image_folder(tmp_path / "both", {nfc: 4, nfd: 4}, {nfc: 2, nfd: 2})
    assert (
        main(["-q", "run", str(write_config(tmp_path / "b.yaml", _config_for(both))), "--out", str(tmp_path / "b")])
        == 2
    )
    assert "two Unicode spellings" in capsys.readouterr().err


def test_class_name_with_a_line_break_is_refused(tmp_path):
    """Issue 22, item 9: a label holding a newline made the PEFT export's labels.txt longer than the classifier."""
    from engine_helpers import write_image_folder

    run = _run(tmp_path, "run", _folder(tmp_path / "first4", ALL[:4]))
    with pytest.raises(LearnError, match=r"class name 'c4\\nc5' holds a line break"):
        learn(run, write_image_folder(tmp_path / "nl", {"c4\nc5": 4, "tea": 4}, {"c4\nc5": 2, "tea": 2}))
    assert _results(run)["completed_tasks"] == 2


def _config_for(root: Path) -> dict:
    cfg = tiny_config(data={"name": "imagefolder", "root": str(root), "train_per_class": None}, train={"epochs": 1})
    cfg["data"]["test_per_class"] = None
    return cfg


def test_resume_never_rebuilds_a_learned_run_from_its_config(tmp_path, monkeypatch, capsys):
    """Issue 22, item 1: ``run --resume`` on a learned run exited 0 and rewrote results.json from the config's
    scenario (learned class names, tasks and learned_tasks gone, status "running 3/2"); Ctrl-C in learn advised it."""
    import sdlora.engine

    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    config = tmp_path / "two.yaml"
    new = _folder(tmp_path / "new", ["c4", "c5"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sdlora.engine, "train_task", interrupted)
        assert main(["learn", str(two), "--data", str(new)]) == 130
    assert "--resume" not in capsys.readouterr().err
    assert main(["-q", "learn", str(two), "--data", str(new)]) == 0
    files = {p: p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"}
    assert main(["-q", "run", str(config), "--out", str(two), "--resume"]) == 2
    assert "1 task(s) added by sdlora learn" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in two.rglob("*") if p.is_file() and p.name != "log.txt"} == files
    # the record lost: the newest checkpoint says it is a learned task, the same refusal
    (two / "results.json").unlink()
    assert main(["-q", "run", str(config), "--out", str(two), "--resume"]) == 2
    assert "added by sdlora learn" in capsys.readouterr().err
    _, record = load_checkpoint(two / "checkpoints" / "task_002.json")
    assert record["learned"]["class_names"] == ["c4", "c5"] and record["learned"]["identity"]["test_sha256"]
    assert record["data_identity"] == json.loads(files[two / "results.json"])["data_identity"]
    # a learn checkpoint of an older sdlora (no "learned" entry): the engine sees a task past the scenario
    from sdlora import rundir

    record.pop("learned")
    record["record_sha256"] = rundir._record_digest(record)
    (two / "checkpoints" / "task_002.json").write_text(json.dumps(record))
    assert main(["-q", "run", str(config), "--out", str(two), "--resume"]) == 2
    assert "is after task 3, but the config's scenario has 2" in capsys.readouterr().err


def test_resume_after_a_killed_learn_uses_the_committed_checkpoint(tmp_path, monkeypatch):
    """Issue 22, item 1: --resume read the newest checkpoint, so the uncommitted one of a killed learn became a third
    task of a two-task scenario (status "running 3/2", class_<id> names)."""
    import sdlora.learn

    two = _run(tmp_path, "two", _folder(tmp_path / "first4", ALL[:4]))
    before = _results(two)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed after the learn's checkpoint, before its results.json
        m.setattr(sdlora.learn, "atomic_write_json", killed)
        with pytest.raises(KeyboardInterrupt):
            learn(two, _folder(tmp_path / "new", ["c4", "c5"]))
    assert main(["-q", "run", str(tmp_path / "two.yaml"), "--out", str(two), "--resume"]) == 0
    after = _results(two)
    for key in ("status", "completed_tasks", "num_tasks", "class_names", "tasks", "accuracy_matrix"):
        assert after[key] == before[key], key
    assert load_run(two, device="cpu").class_names == ALL[:4]
