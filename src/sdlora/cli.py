"""Command-line interface: ``sdlora run | demo | compare | check-data | export | report | diagnose | list``.

Exit codes: 0 success, 1 run failure, 2 bad input (config, arguments, data, run directory). The reason goes to
stderr in one line (``sdlora: error: ...``), also when it happened in a DataLoader worker process.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger(__name__)

DEMO_PRESETS = {"demo": "demo", "full": "demo-full", "text": "demo-text"}


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("sdlora")
    root.handlers = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _default_out(cfg_name: str) -> str:
    return str(Path("runs") / cfg_name)


def _run(config: str, out: str | None, overrides: list[str], resume: bool, overwrite: bool) -> dict[str, Any]:
    from .config import load_config
    from .engine import run_experiment
    from .report import format_task_table

    cfg, _ = load_config(config, overrides)
    out_dir = out or _default_out(cfg.name or "run")
    results = run_experiment(cfg, out_dir, resume=resume, overwrite=overwrite)
    if _is_main_process():
        print(format_task_table(results))
        print(f"run directory: {out_dir}")
    return results


def cmd_run(args: argparse.Namespace) -> int:
    _run(args.config, args.out, args.set, args.resume, args.overwrite)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .configtools import ConfigError

    if args.full and args.text:
        raise ConfigError("--full and --text exclude each other (the text demo has one size)")
    preset = DEMO_PRESETS["text" if args.text else "full" if args.full else "demo"]
    overrides = list(args.set)
    if args.method:
        overrides.append(f"method.name={args.method}")
    try:
        cfg, _ = load_config(preset, overrides)
    except ConfigError as e:
        if args.method and e.source == f"--set method.name={args.method}":
            raise e.with_source(f"--method {args.method}") from None  # what the user typed
        raise
    if _is_main_process():
        d = cfg.data
        if args.text:
            what = (
                f"{d.name}" + (f" ({d.largest_classes} largest classes)" if d.largest_classes else "") + ", "
                f"{d.train_per_class} train / {d.test_per_class} test texts per class, max {d.max_length} tokens"
            )
        else:
            what = (
                f"{d.name} at {d.image_size}px, {d.train_per_class} train / {d.test_per_class} test images per class"
            )
        print(
            f"sdlora demo: {cfg.method.name} on {cfg.backbone.name} + {what}, "
            f"{cfg.scenario.init_cls}+{cfg.scenario.increment}/task classes, {cfg.train.epochs} epoch(s)/task",
            flush=True,
        )
    out = args.out or _default_out(f"{preset}-{cfg.method.name}")
    _run(preset, out, overrides, args.resume, args.overwrite)
    return 0


def _seed_list(text: str) -> list[int]:
    """``--seeds 1993,1994``: comma-separated non-negative integers (argparse reports a bad value with usage)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated non-negative integers such as 1993,1994, got {text!r}"
        )
    return [int(t) for t in items]


def _non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    table = run_compare(args.config, methods, args.seeds, args.out, args.set)
    print(table)
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.check import check_dataset

    cfg, _ = load_config(args.config, args.set)
    check = check_dataset(
        cfg.data,
        cfg.seed,
        lambda n: cfg.scenario.make(n, cfg.seed).tasks,
        workers=args.workers,
        all_files=args.all,
    )
    print(check.format())
    return 0 if check.ok else 2


def load_hint(rebuild: dict[str, Any], weights: str) -> str:
    """One line of Python (after ``import timm, safetensors.torch``) that builds the bare architecture described by
    ``rebuild`` (``Backbone.rebuild``) and loads the exported weights into it."""
    args = ", ".join(f"{k}={v!r}" for k, v in rebuild["kwargs"].items())  # Python literals (JSON's true is not)
    if "timm_class" in rebuild:
        build = f"{rebuild['timm_class']}({args})"
    else:
        build = f"timm.create_model({rebuild['timm_model']!r}, pretrained=False{', ' + args if args else ''})"
    return f"{build}.load_state_dict(safetensors.torch.load_file({weights!r}))"


def cmd_export(args: argparse.Namespace) -> int:
    from .backbones.hf import HFFeatureExtractor
    from .configtools import ConfigError
    from .rundir import build_method_from_run

    method, cfg, record = build_method_from_run(args.run_dir)
    plain = method.export_backbone()
    is_hf = isinstance(plain, HFFeatureExtractor)
    fmt = args.format if args.format != "auto" else ("hf" if is_hf else "safetensors")
    if fmt == "hf" and not is_hf:
        raise ConfigError(f"--format hf needs a Hugging Face (hf:) backbone; this run used {cfg.backbone.name!r}")
    if fmt == "safetensors" and is_hf:
        raise ConfigError(
            f"the run's backbone {cfg.backbone.name!r} is a Hugging Face model: export it with --format hf "
            "(a save_pretrained directory that AutoModel.from_pretrained loads)"
        )
    if fmt == "hf":
        assert isinstance(plain, HFFeatureExtractor)
        return _export_hf(plain, cfg, record, method.backbone_info, Path(args.out))
    return _export_safetensors(plain, cfg, record, method.backbone_info, Path(args.out))


def _export_safetensors(plain: Any, cfg: Any, record: dict[str, Any], info: dict[str, Any], out: Path) -> int:
    import json

    from safetensors.torch import save

    from .fileio import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    rebuild = info.get("rebuild")
    if rebuild is None:  # a backbone that does not say how to rebuild it: its timm architecture, as timm names it
        arch = (getattr(plain, "pretrained_cfg", None) or {}).get("architecture") or type(plain).__name__
        rebuild = {
            "timm_model": arch,
            "kwargs": {"num_classes": 0, "img_size": cfg.data.image_size, **cfg.backbone.kwargs},
        }
    mean, std = info.get("mean", [0.0, 0.0, 0.0]), info.get("std", [1.0, 1.0, 1.0])
    metadata = {
        "format": "sdlora-merged-backbone/1",
        "backbone": str(cfg.backbone.name),
        # How to build the architecture before load_state_dict (the sdlora backbone name may be an alias).
        "timm_architecture": str(rebuild.get("timm_model") or rebuild.get("timm_class")),
        "timm_kwargs": json.dumps(rebuild["kwargs"]),
        "load_with": load_hint(rebuild, "<this file>"),
        # The input the weights expect: the run's test-time preprocessing (data/transforms.py).
        "image_size": str(cfg.data.image_size),
        "input_normalize": str(info.get("normalize")),
        "input_mean": json.dumps(mean),
        "input_std": json.dumps(std),
        "input": (
            f"RGB, shorter side resized to floor({cfg.data.image_size} * 256 / 224) (bicubic), center crop "
            f"{cfg.data.image_size}, scaled to [0, 1], then (x - mean) / std with input_mean and input_std"
        ),
        "weights_tag": str(info.get("tag")),
        "method": cfg.method.name,
        "completed_tasks": str(record["task"] + 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(state, metadata=metadata))
    print(f"wrote {out}: {len(state)} tensors of the merged backbone after task {record['task'] + 1}")
    print(f"inputs: {cfg.data.image_size} px RGB in [0, 1], normalised with mean {mean} and std {std}")
    print(f"load with: import timm, safetensors.torch; {load_hint(rebuild, str(out))}")
    return 0


#: Marker file of a directory written by ``sdlora export --format hf`` (an earlier export may be replaced).
HF_EXPORT_MARKER = "sdlora_export.json"


def _export_hf(plain: Any, cfg: Any, record: dict[str, Any], info: dict[str, Any], out: Path) -> int:
    """Write the merged ``transformers`` model with ``save_pretrained`` (plus its tokenizer for text) into ``out``.

    The directory is written next to ``out`` and renamed into place; an existing ``out`` is replaced only when it
    holds an earlier sdlora export (its marker file), never other files.
    """
    import shutil
    import tempfile

    from .configtools import ConfigError
    from .fileio import atomic_write_json

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / HF_EXPORT_MARKER).is_file())):
        raise ConfigError(
            f"{out} exists and is not an earlier sdlora export; choose a new --out directory for the hf format"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.hf.save_pretrained(str(tmp))
        if plain.modality == "text":
            from .backbones.hf import load_tokenizer

            load_tokenizer(cfg.backbone).save_pretrained(str(tmp))
        meta = {
            "format": "sdlora-merged-hf/1",
            "backbone": str(cfg.backbone.name),
            "weights_tag": info.get("tag"),
            "weights_sha256": info.get("weights_sha256"),
            "model_class": type(plain.hf).__name__,
            "modality": plain.modality,
            "pooling": plain.pooling,
            "max_length": cfg.data.max_length if plain.modality == "text" else None,
            "image_size": cfg.data.image_size if plain.modality == "image" else None,
            "method": cfg.method.name,
            "completed_tasks": record["task"] + 1,
        }
        atomic_write_json(tmp / HF_EXPORT_MARKER, meta)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pooled = (
        "mean of last_hidden_state over the tokens attention_mask keeps"
        if plain.pooling == "mean" and plain.modality == "text"
        else "mean of last_hidden_state over the patch tokens"
        if plain.pooling == "mean"
        else "last_hidden_state[:, 0]"
    )
    print(f"wrote {out}: merged {type(plain.hf).__name__} after task {record['task'] + 1} ({cfg.method.name})")
    print(f"load with: transformers.AutoModel.from_pretrained({str(out)!r}); features = {pooled}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    print(report(args.run_dirs, args.out))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import json

    from .diagnose import diagnose_run, format_diagnosis

    d = diagnose_run(args.run_dir, task=args.task, device=args.device)
    print(format_diagnosis(d))
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=1) + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES
    from .config import preset_names
    from .data import DATASETS
    from .methods import METHODS

    print("methods:   " + ", ".join(sorted(METHODS)))
    print("datasets:  " + ", ".join(sorted(DATASETS)))
    print(
        "backbones: " + ", ".join(sorted(BACKBONES)) + ", hf:<Hugging Face model id or directory>, or any timm model"
    )
    print("presets:   " + ", ".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdlora", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    sub = p.add_subparsers(dest="command", required=True)

    def run_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", help="run directory (default: runs/<config name>)")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set train.lr=0.01 (repeatable)",
        )
        sp.add_argument("--resume", action="store_true", help="continue after the last completed task")
        sp.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    sp = sub.add_parser("run", help="run an experiment from a YAML config or a preset name")
    sp.add_argument("config", help="YAML file or preset name (sdlora list)")
    run_opts(sp)
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("demo", help="the offline embedded default: SD-LoRA on split Fashion-MNIST, CPU, minutes")
    sp.add_argument("--method", help="method to run (default sdlora)")
    sp.add_argument("--full", action="store_true", help="more data per class (preset demo-full)")
    sp.add_argument(
        "--text", action="store_true", help="text demo: MiniLM on WordNet noun definitions (preset demo-text)"
    )
    run_opts(sp)
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("compare", help="run several methods (and seeds) on one config and tabulate them")
    sp.add_argument("config")
    sp.add_argument("--methods", default="sdlora,sdlora_rr,sdlora_kd,seq_lora,simplecil,inflora")
    sp.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default: the config's seed)")
    sp.add_argument("--out", default="runs/compare")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(fn=cmd_compare)

    sp = sub.add_parser(
        "check-data",
        help="decode every image file a config would read and check that every class has training and test images",
    )
    sp.add_argument("config", help="YAML file or preset name")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--workers", type=_non_negative_int, help="decoding processes (default: data.num_workers)")
    sp.add_argument("--all", action="store_true", help="every file of the dataset, not only the per-class subsets")
    sp.set_defaults(fn=cmd_check_data)

    sp = sub.add_parser("export", help="write the merged backbone of a run (safetensors, or a transformers directory)")
    sp.add_argument("run_dir")
    sp.add_argument("--out", required=True, help="FILE.safetensors, or a directory for --format hf")
    sp.add_argument(
        "--format",
        choices=["auto", "safetensors", "hf"],
        default="auto",
        help="safetensors: timm state dict; hf: save_pretrained directory of a Hugging Face backbone (auto: hf for "
        "hf backbones, else safetensors)",
    )
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("report", help="table and plots for one or several run directories")
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--out", help="also write report.md and plots/curves.png here")
    sp.set_defaults(fn=cmd_report)

    sp = sub.add_parser(
        "diagnose", help="per head block: accuracy, task-aware accuracy, block confusion and logits on test data"
    )
    sp.add_argument("run_dir")
    sp.add_argument("--task", type=int, help="use the checkpoint after this task (1-based; default: the last)")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--json", help="also write the numbers to this JSON file")
    sp.set_defaults(fn=cmd_diagnose)

    sp = sub.add_parser("list", help="registered methods, datasets, backbones and presets")
    sp.set_defaults(fn=cmd_list)
    return p


_WORKER_WRAPPER = re.compile(
    r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback \(most recent call last\):\n"
)


def error_text(e: BaseException) -> str:
    """The message of ``e`` for the one-line error, without the traceback text that torch puts into exceptions
    re-raised from DataLoader worker processes (``Caught ValueError in DataLoader worker process 0. Original
    Traceback ...``): with ``data.num_workers > 0`` a bad image must be reported as without workers."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if not _WORKER_WRAPPER.match(msg):
        return msg
    # The last traceback block belongs to the exception that was raised (earlier ones are its causes); its frames
    # are indented and the "Type: message" text follows them.
    block = msg.rsplit("Traceback (most recent call last):\n", 1)[1].splitlines()
    first = next((i for i, line in enumerate(block) if line and not line.startswith(" ")), None)
    if first is None:
        return msg
    text = "\n".join(block[first:]).strip()
    return text.split(": ", 1)[1] if re.match(r"^[\w.]+: ", text) else text


def main(argv: list[str] | None = None) -> int:
    from .configtools import ConfigError

    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        from .rundir import RunError
    except Exception as e:  # a broken installation: say so instead of a traceback
        print(f"sdlora: error: cannot import sdlora ({e})", file=sys.stderr)
        return 1
    try:
        return int(args.fn(args))
    except (ConfigError, RunError, KeyError, FileNotFoundError, ValueError) as e:
        print(f"sdlora: error: {error_text(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdlora: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("SDLORA_DEBUG"):
            raise
        print(
            f"sdlora: error: {type(e).__name__}: {error_text(e)} (set SDLORA_DEBUG=1 for a traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
