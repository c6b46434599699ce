"""The run record has one definition: required keys, key order, typed parsing, older records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sdlora.metrics import compute_metrics
from sdlora.results import REQUIRED_KEYS, RunResults, load_results, parse_results


def _record(**changes) -> dict:
    base = dict(
        status="finished",
        name="t",
        method="sdlora",
        protocol="official",
        backbone={"name": "vit"},
        dataset={"name": "toy"},
        seed=3,
        class_order=[1, 0],
        class_names=["b", "a"],
        tasks=[[1], [0]],
        num_tasks=2,
        completed_tasks=2,
        **compute_metrics([[9], [8, 7]], [10, 10]),
        trainable_params_per_task=[5, 6],
        stored_params_total=11,
        task_log=[{"task": 0}, {"task": 1}],
        wall_time_s=1.5,
        reference={"acc": 80.0},
        sdlora_version="0.1.0",
        data_identity={"sha256": "0" * 64},
    )
    base.update(changes)
    return RunResults(**base).to_dict()


def test_required_keys_are_the_fields_without_default():
    fields = {f.name: f for f in dataclasses.fields(RunResults)}
    optional = {
        "status",
        "name",
        "class_names",
        "task_log",
        "reference",
        "data_identity",
        "learned_tasks",
        "inference_passes",
        "environment",
        "earlier_environments",
    }
    assert set(REQUIRED_KEYS) == set(fields) - optional
    # The record written to results.json keeps the field order (the order the file has always had).
    assert list(_record()) == list(fields)


def test_parse_roundtrip_and_older_records(tmp_path):
    rec = _record()
    assert parse_results(rec) == RunResults(**rec)
    # A record written before class_names / data_identity existed still loads.
    old = {k: v for k, v in rec.items() if k not in ("class_names", "data_identity")}
    typed = parse_results(old)
    assert typed.class_names == [] and typed.data_identity == {}
    # A key written by a newer version is ignored, not an error.
    assert parse_results({**rec, "from_the_future": 1}).acc == rec["acc"]
    (tmp_path / "results.json").write_text(json.dumps(rec))
    assert load_results(tmp_path) == rec


@pytest.mark.parametrize(
    "patch,match",
    [({"acc": "high"}, r"acc"), ({"tasks": [[0], "x"]}, r"tasks"), ({"status": "half"}, r"status")],
)
def test_parse_names_the_bad_key(patch, match):
    with pytest.raises(ValueError, match=rf"^run/results\.json: .*{match}"):
        parse_results({**_record(), **patch}, "run/results.json")


def test_parse_rejects_non_objects_and_missing_keys():
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_results([1, 2], "r.json")
    rec = _record()
    del rec["seed"], rec["bwt"]
    with pytest.raises(ValueError, match=r"r\.json: missing keys seed, bwt$"):
        parse_results(rec, "r.json")
