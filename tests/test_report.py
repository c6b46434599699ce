import csv
import json
import os

import pytest

from sdlora.metrics import compute_metrics
from sdlora.report import (
    format_task_table,
    load_results,
    plot_run,
    report,
    report_table,
    write_compare,
    write_run_tables,
)
from sdlora.results import REQUIRED_KEYS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_results(
    correct, total, *, method="sdlora", seed=0, num_tasks=None, params=(1000, 1200, 1400), wall=3725.0
) -> dict:
    n = len(correct)
    classes_per_task = 2
    out = {
        "method": method,
        "protocol": "cil",
        "backbone": {"name": "vit_tiny", "tag": "t", "weights_sha256": "0" * 64},
        "dataset": {"name": "toy"},
        "seed": seed,
        "class_order": list(range(classes_per_task * (num_tasks or n))),
        "tasks": [[classes_per_task * t, classes_per_task * t + 1] for t in range(num_tasks or n)],
        "trainable_params_per_task": list(params[:n]),
        "stored_params_total": 5000,
        "wall_time_s": wall,
        "sdlora_version": "0.1.0",
        "num_tasks": num_tasks or n,
        "completed_tasks": n,
    }
    out.update(compute_metrics(correct, total))
    return out


# R: [90], [80, 70], [60, 75, 50] -> acc_after_task 90, 75, 61.67; Acc 61.67, AAA 75.56, forgetting 12.5, BWT -12.5
RUN_A = make_results([[90], [80, 70], [60, 75, 50]], [100, 100, 100], seed=0)
# R: [80], [70, 90], [70, 80, 60] -> acc_after_task 80, 80, 70; Acc 70, AAA 76.67, forgetting 10, BWT -10
RUN_B = make_results([[80], [70, 90], [70, 80, 60]], [100, 100, 100], seed=1, wall=10.0)


def write_run(path, results) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f)
    return str(path)


def read_csv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_png(path) -> None:
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_write_run_tables_contents(tmp_path):
    paths = write_run_tables(tmp_path, RUN_A)
    assert [os.path.basename(p) for p in paths] == ["metrics.csv", "accuracy_matrix.csv"]
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows[0] == [
        "task",
        "new_classes",
        "classes_seen",
        "acc_after_task",
        "mean_task_acc_so_far",
        "trainable_params",
        "acc_task_1",
        "acc_task_2",
        "acc_task_3",
    ]
    assert rows[1] == ["1", "2", "2", "90.0000", "90.0000", "1000", "90.0000", "", ""]
    assert rows[2] == ["2", "2", "4", "75.0000", "75.0000", "1200", "80.0000", "70.0000", ""]
    assert rows[3] == ["3", "2", "6", "61.6667", "61.6667", "1400", "60.0000", "75.0000", "50.0000"]
    assert read_csv(tmp_path / "accuracy_matrix.csv") == [
        ["after_task", "task_1", "task_2", "task_3"],
        ["1", "90.0000", "", ""],
        ["2", "80.0000", "70.0000", ""],
        ["3", "60.0000", "75.0000", "50.0000"],
    ]


def test_mean_task_acc_so_far_differs_from_weighted_when_unbalanced(tmp_path):
    res = make_results([[180], [100, 45]], [200, 50])
    write_run_tables(tmp_path, res)
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows[2][3:5] == ["58.0000", "70.0000"]


def test_plot_run_writes_pngs(tmp_path):
    write_run(tmp_path, RUN_A)
    paths = plot_run(tmp_path)  # results loaded from results.json
    assert sorted(os.path.relpath(p, tmp_path) for p in paths) == [
        os.path.join("plots", "accuracy_curve.png"),
        os.path.join("plots", "accuracy_matrix.png"),
    ]
    for p in paths:
        assert_png(p)


def test_format_task_table():
    text = format_task_table(RUN_A)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[1].split() == ["1", "2", "90.00", "90.0"]
    assert lines[3].split() == ["3", "6", "61.67", "60.0", "75.0", "50.0"]
    assert lines[-1] == "Acc 61.67 | AAA 75.56 | mean task acc 61.67 | forgetting 12.50 | BWT -12.50"


def test_format_task_table_partial_and_single_task():
    res = make_results([[7]], [10], num_tasks=4)
    last = format_task_table(res).splitlines()[-1]
    assert "forgetting n/a | BWT n/a" in last
    assert last.endswith("partial run: 1/4 tasks")


def test_report_shows_the_environment(tmp_path):
    env = {"python": "3.11.7", "torch": "2.14.1+cu130", "transformers": "5.25.0", "device": "NVIDIA H100"}
    a = write_run(tmp_path / "a", dict(RUN_A, environment=env))
    row = report_table([a]).splitlines()[2]
    assert row.rstrip("| ").endswith("py3.11.7 torch 2.14.1+cu130 tf 5.25.0 NVIDIA H100")


def test_report_markdown_and_files(tmp_path):
    a = write_run(tmp_path / "runs" / "sdlora_s0", RUN_A)
    b = write_run(tmp_path / "runs" / "seq_s1", dict(RUN_B, method="seq_lora"))
    out = tmp_path / "report"
    table = report([a, b], str(out))
    lines = table.splitlines()
    assert lines[0].startswith("| run | method | dataset | seed | tasks | Acc | AAA |")
    cells_a = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells_a == [
        "sdlora_s0",
        "sdlora",
        "toy",
        "0",
        "3",
        "61.67",
        "75.56",
        "61.67",
        "12.50",
        "-12.50",
        "1,400",
        "5,000",
        "1h 02m",
        "n/a",  # RUN_A was recorded without an environment (as records written before it existed)
    ]
    cells_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells_b[:2] == ["seq_s1", "seq_lora"]
    assert cells_b[5:10] == ["70.00", "76.67", "70.00", "10.00", "-10.00"]
    assert cells_b[-2:] == ["10.0 s", "n/a"]
    assert table in (out / "report.md").read_text()
    assert_png(out / "plots" / "curves.png")
    # each run's own tables and plots were regenerated
    for run in (a, b):
        assert_png(os.path.join(run, "plots", "accuracy_matrix.png"))
        assert os.path.isfile(os.path.join(run, "metrics.csv"))
    assert report_table([a, b]) == table


def test_report_partial_run_and_duplicate_names(tmp_path):
    a = write_run(tmp_path / "x" / "seed0", make_results([[9], [8, 7]], [10, 10], num_tasks=5))
    b = write_run(tmp_path / "y" / "seed0", RUN_A)
    table = report_table([a, b])
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert rows[0][4] == "2/5"
    # same directory name: the full paths tell them apart
    assert rows[0][0] == os.path.normpath(a) and rows[1][0] == os.path.normpath(b)


def test_report_errors_name_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json.*empty_run"):
        report([str(tmp_path / "empty_run")], None)
    bad = tmp_path / "bad_run"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad_run.results\.json: invalid JSON"):
        report([str(bad)], None)
    incomplete = {k: v for k, v in RUN_A.items() if k not in ("aaa", "seed")}
    inc = write_run(tmp_path / "inc_run", incomplete)
    with pytest.raises(ValueError, match=r"inc_run.results\.json: missing keys seed, aaa"):
        load_results(inc)


def test_write_compare_means_and_stds(tmp_path):
    s0 = write_run(tmp_path / "sd0", RUN_A)
    s1 = write_run(tmp_path / "sd1", RUN_B)
    seq = make_results([[50], [40, 30], [20, 25, 10]], [100] * 3, method="seq")
    seq["inference_passes"] = 2  # as a prompt method records it (query pass + prompted pass)
    q0 = write_run(tmp_path / "q0", seq)
    out = tmp_path / "cmp"
    md = write_compare({"sdlora": [s0, s1], "seq": [q0]}, out)
    assert md == (out / "compare.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]
    header, sd, seq = rows
    assert header == [
        "method",
        "dataset",
        "runs",
        "tasks",
        "Acc",
        "AAA",
        "forgetting",
        "trainable params/task",
        "stored params",
        "passes/prediction",
        "train time",
    ]
    # Acc: 61.667 and 70 -> mean 65.833; sample std = |70 - 61.667| / sqrt(2) = 5.893
    # AAA: 75.556 and 76.667 -> mean 76.111; std = 1.111 / sqrt(2) = 0.786
    # forgetting: (12.5 + 10) / 2 = 11.25; train time (3725 + 10) / 2 = 1867.5 s = 31m 08s (rounded)
    assert sd == ["sdlora", "toy", "2", "3", "65.83 (5.89)", "76.11 (0.79)", "11.25", "1,400", "5,000", "1", "31m 08s"]
    # one seed: just the mean. seq: acc after tasks 50, 35, 18.33 -> AAA 34.44; forgetting (30 + 5) / 2 = 17.5
    assert seq[4:7] == ["18.33", "34.44", "17.50"] and seq[9] == "2"

    table = read_csv(out / "compare.csv")
    head = table[0]
    sd_csv = dict(zip(head, table[1], strict=True))
    assert sd_csv["n_runs"] == "2" and sd_csv["seeds"] == "0 1"
    assert float(sd_csv["acc_mean"]) == pytest.approx(65.8333, abs=1e-4)
    assert float(sd_csv["acc_std"]) == pytest.approx(5.8926, abs=1e-4)
    assert float(sd_csv["wall_time_s_mean"]) == pytest.approx(1867.5)
    seq_csv = dict(zip(head, table[2], strict=True))
    assert seq_csv["acc_std"] == "" and seq_csv["aaa_std"] == ""
    assert sd_csv["inference_passes"] == "1" and seq_csv["inference_passes"] == "2"
    assert_png(out / "plots" / "compare_curves.png")


def test_compare_figure_tells_many_methods_apart_best_first():
    from sdlora.report import compare_figure

    # 18 methods (what `compare --methods all` runs): the default colour cycle would repeat from the 11th.
    loaded = {f"m{i:02d}": [{"acc_after_task": [90.0, float(i)]}] for i in range(18)}
    loaded["unfinished"] = [{"acc_after_task": [80.0, None]}]
    ax = compare_figure(loaded).axes[0]
    lines = ax.get_lines()
    assert len({(tuple(ln.get_color()), ln.get_linestyle()) for ln in lines}) == 19
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"m{i:02d} (n=1)" for i in range(17, -1, -1)] + ["unfinished (n=1)"]


def test_write_compare_rejects_inconsistent_runs(tmp_path):
    a = write_run(tmp_path / "a", RUN_A)
    same_seed = write_run(tmp_path / "b", dict(RUN_B, seed=0))
    short = write_run(tmp_path / "c", make_results([[9], [8, 7]], [10, 10], seed=5))
    with pytest.raises(ValueError, match="same seed"):
        write_compare({"m": [a, same_seed]}, tmp_path / "out")
    with pytest.raises(ValueError, match="different numbers of tasks"):
        write_compare({"m": [a, short]}, tmp_path / "out")
    with pytest.raises(ValueError, match="no run directories"):
        write_compare({"m": []}, tmp_path / "out")
    assert not (tmp_path / "out" / "compare.md").exists()


def test_required_keys_are_what_make_results_writes():
    # guards the fixture: if the schema grows, the hand-made results must grow with it
    assert set(REQUIRED_KEYS) <= set(RUN_A)


def test_report_rewrites_a_run_only_under_its_lock(tmp_path, capsys):
    """Issue 22, item 9: ``sdlora report`` wrote a run's tables without its lock, over a live run's newer ones."""
    from sdlora.cli import main
    from sdlora.rundir import run_dir_lock
    from test_learn import ALL, _folder, _run

    run = _run(tmp_path, "run", _folder(tmp_path / "data", ALL[:4]))
    (run / "metrics.csv").unlink()
    with run_dir_lock(run):  # a live writer
        assert main(["report", str(run)]) == 0
        assert not (run / "metrics.csv").exists()
    assert "tables and plots not rewritten" in capsys.readouterr().err
    assert main(["report", str(run)]) == 0
    assert (run / "metrics.csv").exists() and not (run / ".sdlora.lock").exists()
