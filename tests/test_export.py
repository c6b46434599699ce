"""``sdlora export --format peft``: the adapter as a plain PEFT LoRA computes exactly what sdlora computes.

The PEFT side is vanilla ``peft`` (``PeftModel.from_pretrained``) on the timm backbone built as sdlora builds it;
the classifier loads strictly into that timm model with ``num_classes`` = classes seen. For Hugging Face backbones
it is ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), DIR)`` on the transformers model itself, run
with the code of the export's README.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# the tiny-method and tiny-adapter helpers of tests/methods and tests/lora
for _sub in ("methods", "lora"):
    if str(Path(__file__).parent / _sub) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent / _sub))
from method_helpers import make_ctx, random_batches, run_tiny, tiny_method, two_task_config  # noqa: E402

from sdlora.backbones import BackboneConfig, create_backbone  # noqa: E402
from sdlora.config import RunConfig  # noqa: E402
from sdlora.configtools import from_dict  # noqa: E402
from sdlora.export import PEFT_VERSION_TESTED, ExportError, peft_adapter, write_peft_export  # noqa: E402
from sdlora.methods import LowRankUpdate  # noqa: E402

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402


def _config(method: dict) -> RunConfig:
    from engine_helpers import tiny_config

    return from_dict(RunConfig, tiny_config(method=method))


def _absorbable_in_first_unit(method) -> None:
    """Current factors: an exact multiple of the first earlier component in the first unit (SD-LoRA-KD absorbs
    it into that component's magnitude), random elsewhere (kept as a new component)."""
    units = method.adapter.named_units()
    with torch.no_grad():
        for i, (_, u) in enumerate(units):
            r = u.A_cur.shape[0]
            if i == 0:
                r0 = u.comp_ranks[0]
                assert r == r0
                u.A_cur.copy_(u.A_frozen[:r0])
                u.B_cur.copy_(-1.7 * u.B_frozen[:, :r0])
            else:
                u.B_cur.normal_(0, 0.3)


#: SD-LoRA-KD with RR-style mixed ranks: the setting in which the export is least trivial.
KD_RR = {"adapter": {"rank_schedule": [2, 2, 1], "kd_tau": 1e-4}}


def _sdlora_tasks(n_tasks: int, end_last: bool = True, method=None):
    """sdlora_kd with RR-style mixed ranks (2, 2, 1) over ``n_tasks`` hand-run tasks of two classes each; task 2
    is absorbed by KD in the first unit only, so ranks differ between modules and a KD increment is non-zero.
    ``method``: an sdlora_kd method with :data:`KD_RR` on another backbone (default: the tiny timm ViT)."""
    fields = KD_RR
    images = method is None
    if method is None:
        method = tiny_method("sdlora_kd", seed=7, **fields)
    for t in range(n_tasks):
        batches = random_batches(2 * t, 2 * t + 2, seed=t) if images else []
        ctx = make_ctx(t, 2 * t, 2 * t + 2, batches, num_tasks=3)
        method.begin_task(ctx)
        if t == 1:
            _absorbable_in_first_unit(method)
        else:
            with torch.no_grad():
                for _, u in method.adapter.named_units():
                    u.B_cur.normal_(0, 0.3)
        with torch.no_grad():
            method.adapter.alpha_cur.fill_(0.6 + 0.3 * t)
            for w in method.head.weights:
                w.normal_(0, 0.5)
        if t < n_tasks - 1 or end_last:
            method.end_task(ctx)
    return method, _config({"name": "sdlora_kd", **fields})


def _load_with_peft(export: Path, num_classes: int) -> torch.nn.Module:
    """What a user does: the timm backbone as sdlora builds it (random-init tiny ViT, seed 7), num_classes = seen,
    base weights and classifier loaded strictly, then vanilla PeftModel.from_pretrained."""
    torch.manual_seed(123)  # the weights come from the export, not from this init
    model = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    model.reset_classifier(num_classes)
    state = {**load_file(str(export / "base_model.safetensors")), **load_file(str(export / "classifier.safetensors"))}
    model.load_state_dict(state, strict=True)
    return peft.PeftModel.from_pretrained(model, str(export)).eval()


@pytest.mark.parametrize(("n_tasks", "end_last"), [(1, True), (3, True), (3, False)])
def test_peft_export_equals_sdlora(tmp_path, n_tasks, end_last):
    method, cfg = _sdlora_tasks(n_tasks, end_last)
    method.eval()
    units = method.adapter.named_units()
    if n_tasks == 3:
        # the setting the test is about: mixed ranks across modules and a KD increment in the first unit
        assert units[0][1].kd_increment.abs().sum() > 0
        assert len({sum(u.comp_ranks) for _, u in units}) > 1
    names = [f"c{i}" for i in range(2 * n_tasks)]
    out = tmp_path / "peft"
    write_peft_export(method, out, config=cfg, completed_tasks=n_tasks, class_names=names)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    if n_tasks == 3:
        assert adapter_cfg["rank_pattern"] and adapter_cfg["alpha_pattern"] == adapter_cfg["rank_pattern"]
    assert (out / "labels.txt").read_text().splitlines() == names
    meta = json.loads((out / "sdlora_export.json").read_text())
    assert meta["num_classes"] == len(names) and meta["peft_version_tested"] == PEFT_VERSION_TESTED

    model = _load_with_peft(out, len(names))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want_logits, want_features = method(x), method.features(x)
        got_logits = model(x)
        got_features = model.forward_head(model.forward_features(x), pre_logits=True)
        merged = model.merge_and_unload()(x)
    torch.testing.assert_close(got_features, want_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, want_logits, atol=1e-5, rtol=1e-5)
    # The adapter changes the function (the comparison above is not between two bare backbones).
    assert (want_features - method.low_rank_update().base(x)).abs().max() > 1e-3


def test_peft_scaling_is_one_and_ranks_are_per_module():
    method, _ = _sdlora_tasks(3)
    update = method.low_rank_update()
    config, tensors = peft_adapter(update)
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    for name, (a, _) in update.factors.items():
        rank = a.shape[0]
        key = next((k for k in config["rank_pattern"] if name.endswith(k.replace("\\", ""))), None)
        assert (config["rank_pattern"][key] if key else config["r"]) == rank
        assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (rank, 32)
        assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (96, rank)
        # fused qkv: the k rows of B are zero (only q and v are adapted)
        assert tensors[f"base_model.model.{name}.lora_B.weight"][32:64].abs().max() == 0


def test_separate_projections_hf_style(tmp_path):
    """Separate query/value Linears (the HF transformers layout): one LoRA per projection, no zero rows."""
    from lora_helpers import SeparateQV, randomise_current

    from sdlora.lora import AdapterConfig, SDLoRAModel

    torch.manual_seed(0)
    net = SeparateQV(12)
    model = SDLoRAModel(net, AdapterConfig(rank_schedule=[3, 2], kd=True), default_targets=["query", "value"])
    for t in range(3):
        model.begin_task()
        randomise_current(model)
        with torch.no_grad():
            model.alpha_cur.fill_(0.5 + t)
        model.end_task()
    config, tensors = peft_adapter(LowRankUpdate(model.unload(), model.lora_factors()))
    assert sorted(config["target_modules"]) == ["query", "value"]
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(model.unload(), str(out)).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_inflora_exports_to_peft(tmp_path):
    method = tiny_method("inflora", seed=7, options={"rank": 3, "lamb": 0.9, "lame": 1.0})
    for t in range(2):
        ctx = make_ctx(t, 2 * t, 2 * t + 2, random_batches(2 * t, 2 * t + 2, seed=t))
        method.begin_task(ctx)
        with torch.no_grad():
            for layer in method.layers():
                for p in layer.B_cur.values():
                    p.normal_(0, 0.3)
        method.end_task(ctx)
    method.eval()
    cfg = _config({"name": "inflora", "options": {"rank": 3, "lamb": 0.9, "lame": 1.0}})
    out = tmp_path / "peft"
    write_peft_export(method, out, config=cfg, completed_tasks=2, class_names=["a", "b", "c", "d"])
    model = _load_with_peft(out, 4)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full_ft", "simplecil"])
def test_peft_export_refuses_methods_without_a_low_rank_update(tmp_path, name):
    method = tiny_method(name)
    method.begin_task(make_ctx(0, 0, 2, random_batches(0, 2)))
    with pytest.raises(ExportError, match="--format merged"):
        write_peft_export(method, tmp_path / "x", config=_config({"name": name}), completed_tasks=1, class_names=[])
    assert not (tmp_path / "x").exists()


def test_export_directory_is_replaced_only_when_it_is_an_earlier_export(tmp_path):
    method, cfg = _sdlora_tasks(1)
    out = tmp_path / "peft"
    write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["a", "b"], include_base=False)
    assert not (out / "base_model.safetensors").exists()
    meta = json.loads((out / "sdlora_export.json").read_text())
    assert set(meta["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "classifier.safetensors",
        "labels.txt",
    }
    write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["x", "y"])
    assert (out / "labels.txt").read_text() == "x\ny\n" and (out / "base_model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary or old directory left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier sdlora PEFT export"):
        write_peft_export(method, other, config=cfg, completed_tasks=1, class_names=["a", "b"])
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="class names"):
        write_peft_export(method, tmp_path / "n", config=cfg, completed_tasks=1, class_names=["a"])


def test_cli_export_peft_from_a_run(tmp_path, capsys):
    from sdlora.cli import main

    run = tmp_path / "run"
    cfg = two_task_config("sdlora_rr")
    cfg["method"]["adapter"] = {"rank": 2, "rank_schedule": [3, 2]}
    run_tiny(run, cfg)
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert "PEFT LoRA adapter" in capsys.readouterr().out
    from sdlora.engine import build_method_from_run

    method, _, _ = build_method_from_run(run)
    method.eval()
    labels = (tmp_path / "peft" / "labels.txt").read_text().splitlines()
    assert len(labels) == 4
    torch.manual_seed(0)
    model = create_backbone(BackboneConfig(name="vit_test_tiny", pretrained=False), 32).model
    model.reset_classifier(len(labels))
    d = tmp_path / "peft"
    base = load_file(str(d / "base_model.safetensors"))
    model.load_state_dict({**base, **load_file(str(d / "classifier.safetensors"))})
    model = peft.PeftModel.from_pretrained(model, str(d)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method(x), atol=1e-5, rtol=1e-5)
    # merged export unchanged; the help explains both formats
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    helptext = capsys.readouterr().out
    assert "merged" in helptext and "PEFT LoRA adapter" in helptext and PEFT_VERSION_TESTED in helptext
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "m.safetensors")]) == 2


# ------------------------------------------------------------------------------------- Hugging Face backbones
def _hf_kd_method(model_dir: Path):
    from sdlora.config import MethodConfig
    from sdlora.methods import create_method

    torch.manual_seed(7)
    backbone = create_backbone(BackboneConfig(name=f"hf:{model_dir}"), 32)
    return create_method(from_dict(MethodConfig, {"name": "sdlora_kd", **KD_RR}), backbone)


def _readme_code(export: Path, x: torch.Tensor | None = None) -> dict:
    """Run the Python block of the export's README in ``export`` (``d = "."``), with ``x`` for image models."""
    import os
    import re

    code = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S).group(1)
    if x is not None:
        code, n = re.subn(r"^x = \.\.\..*$", "x = _x", code, flags=re.M)
        assert n == 1
    cwd = os.getcwd()
    os.chdir(export)
    try:
        namespace: dict = {"_x": x}
        exec(compile(code, str(export / "README.md"), "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


@pytest.mark.parametrize(
    ("modality", "n_tasks", "include_base"),
    [("text", 1, True), ("text", 3, True), ("text", 3, False), ("image", 1, True), ("image", 3, True)],
)
def test_hf_peft_export_loads_on_the_transformers_model(
    tmp_path, tiny_bert_dir, tiny_vit_dir, modality, n_tasks, include_base
):
    from transformers import AutoModel

    from engine_helpers import tiny_config
    from hf_helpers import hf_text_config
    from sdlora.rundir import text_encoder_for_run

    model_dir = tiny_bert_dir if modality == "text" else tiny_vit_dir
    method, _ = _sdlora_tasks(n_tasks, method=_hf_kd_method(model_dir))
    method.eval()
    if modality == "text":
        cfg_dict = hf_text_config(model_dir, tmp_path / "unused.jsonl", method="sdlora_kd")
    else:
        cfg_dict = tiny_config(method={"name": "sdlora_kd"}, backbone={"name": f"hf:{model_dir}"})
    cfg_dict["method"] = {"name": "sdlora_kd", **KD_RR}
    cfg = from_dict(RunConfig, cfg_dict)
    units = method.adapter.named_units()
    if n_tasks == 3:
        assert units[0][1].kd_increment.abs().sum() > 0 and len({sum(u.comp_ranks) for _, u in units}) > 1
    names = [f"c{i}" for i in range(2 * n_tasks)]
    out = tmp_path / "peft"
    write_peft_export(method, out, config=cfg, completed_tasks=n_tasks, class_names=names, include_base=include_base)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((out / "sdlora_export.json").read_text())
    # module names as the transformers model names them (no sdlora wrapper prefix)
    hf_modules = dict(AutoModel.from_pretrained(str(model_dir)).named_modules())
    assert adapter_cfg["target_modules"] and all(t in hf_modules for t in adapter_cfg["target_modules"])
    assert bool(adapter_cfg["rank_pattern"]) == (n_tasks == 3)
    assert (out / "base").is_dir() == include_base and meta["library"] == "transformers"
    assert meta["pooling"] == ("mean" if modality == "text" else "cls")
    assert adapter_cfg["base_model_name_or_path"] == str(model_dir.resolve())

    if modality == "text":
        ns = _readme_code(out)
        x = text_encoder_for_run(cfg)(ns["texts"])
    else:
        x = torch.rand(3, 3, 32, 32)
        ns = _readme_code(out, x)
    assert ns["labels"] == names
    with torch.no_grad():
        want_features, want_logits = method.features(x), method(x)
        torch.testing.assert_close(ns["features"], want_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ns["logits"], want_logits, atol=1e-5, rtol=1e-5)
        # the adapter changes the function (not two bare backbones compared)
        assert (want_features - method.low_rank_update().base(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- kills and targets
def test_merged_export_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """Issue 22, item 9: ``--out RUN/results.json`` silently replaced the run's own record with tensors."""
    from sdlora.cli import main

    run = tmp_path / "run"
    run_tiny(run, two_task_config("sdlora"))
    for victim in (run / "results.json", run / "checkpoints" / "task_001.safetensors"):
        before = victim.read_bytes()
        assert main(["export", str(run), "--out", str(victim)]) == 2
        assert "is not an earlier sdlora merged export" in capsys.readouterr().err
        assert victim.read_bytes() == before
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0  # an earlier export is replaced


def test_killed_exports_leave_no_copies_and_the_target_is_never_missing(tmp_path, monkeypatch):
    """Issue 22, item 9: a killed export left its hidden staging copy for good, and a kill between moving the old
    export aside and renaming the new one into place left nothing at the target."""
    import contextlib
    import os

    import sdlora.export

    method, cfg = _sdlora_tasks(1)
    out = tmp_path / "peft"
    write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["a", "b"], include_base=False)
    # what kill -9 leaves: a half-written staging directory and an export moved aside
    (tmp_path / ".peft.0123abcd.tmp").mkdir()
    (tmp_path / ".peft.0123abcd.tmp" / "adapter_config.json").write_text("{")
    (tmp_path / ".peft.89abcdef.old").mkdir()
    real_replace = os.replace

    def killed_at_install(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_at_install)
        with contextlib.suppress(KeyboardInterrupt):
            write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["x", "y"], include_base=False)
    # the target holds one whole export, the old or the new one
    assert (out / "labels.txt").read_text() in ("a\nb\n", "x\ny\n") and (out / "sdlora_export.json").is_file()
    write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["x", "y"], include_base=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    # where the one-step swap is not available, a kill between the renames is repaired by the next export
    monkeypatch.setattr(sdlora.export, "_exchange", lambda a, b: False)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_at_install)
        with pytest.raises(KeyboardInterrupt):
            write_peft_export(method, out, config=cfg, completed_tasks=1, class_names=["p", "q"], include_base=False)
    sdlora.export._recover_staging(out)
    assert (out / "labels.txt").read_text() == "x\ny\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_peft_export_carries_the_calibrated_head_or_refuses_it(tmp_path):
    """A run with ``method.calib``: the exported classifier is the linear ridge head the run evaluated (same
    logits through PEFT); a head that is not linear in the features (ncm) is refused with what to do instead."""
    from sdlora.engine import build_method_from_run

    run = tmp_path / "run"
    linear_cfg = two_task_config("sdlora")
    linear_cfg["method"]["calib"] = {"head": "ridge", "drift": "linear"}  # the ridge on the adapted features
    run_tiny(run, linear_cfg)
    out = tmp_path / "peft"
    method, cfg, _ = build_method_from_run(run)
    method.eval()
    write_peft_export(method, out, config=cfg, completed_tasks=2, class_names=["a", "b", "c", "d"])
    model = _load_with_peft(out, 4)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), method(x), atol=1e-4, rtol=1e-4)
        assert method.calib is not None
        torch.testing.assert_close(method(x), method.calib.logits(method.features(x)))
    ncm = tmp_path / "ncm"
    ncm_cfg = two_task_config("sdlora")
    ncm_cfg["method"]["calib"] = {"head": "ncm"}
    run_tiny(ncm, ncm_cfg)
    method, cfg, _ = build_method_from_run(ncm)
    with pytest.raises(ExportError, match=r"method\.calib\.head='ncm'.*sdlora predict"):
        write_peft_export(method, tmp_path / "x", config=cfg, completed_tasks=2, class_names=["a", "b", "c", "d"])
    # sdlora_calib's head also reads the frozen backbone's features: not a map of the adapted features alone.
    both = tmp_path / "both"
    both_cfg = two_task_config("sdlora_calib")
    both_cfg["method"]["calib"] = {"projection_dim": 8}
    run_tiny(both, both_cfg)
    method, cfg, _ = build_method_from_run(both)
    with pytest.raises(ExportError, match=r"frozen backbone features.*sdlora predict"):
        write_peft_export(method, tmp_path / "y", config=cfg, completed_tasks=2, class_names=["a", "b", "c", "d"])
