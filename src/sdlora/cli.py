"""Command-line interface: ``sdlora run | demo | compare | check-data | export | predict | learn | report | diagnose |
build-data | list | data get | reproduce``.

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
    from .engine import run_experiment
    from .methods import load_run_config
    from .report import format_task_table

    cfg, _ = load_run_config(config, overrides)
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
    from .configtools import ConfigError
    from .methods import load_run_config

    if args.full and args.text:
        raise ConfigError("--full and --text exclude each other (the text demo has one size)")
    preset = DEMO_PRESETS["text" if args.text else "full" if args.full else "demo"]
    overrides = list(args.set)
    if args.method:
        overrides.append(f"method.name={args.method}")
    try:
        cfg, _ = load_run_config(preset, overrides)
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
    from .data.check import check_dataset
    from .methods import load_run_config

    cfg, _ = load_run_config(args.config, args.set)

    def tokenizer() -> Any:  # only a text dataset asks for it (loads the tokenizer, not the model)
        from .backbones.hf import load_tokenizer

        return load_tokenizer(cfg.backbone)

    check = check_dataset(
        cfg.data,
        cfg.seed,
        lambda n: cfg.scenario.make(n, cfg.seed).tasks,
        workers=args.workers,
        all_files=args.all,
        tokenizer=tokenizer,
    )
    print(check.format())
    return 0 if check.ok else 2


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_merged, export_peft

    if args.format == "peft":
        summary = export_peft(args.run_dir, args.out, include_base=not args.no_base)
    else:
        if args.no_base:
            raise ValueError("--no-base applies to --format peft only (the merged format is the whole backbone)")
        summary = export_merged(args.run_dir, args.out, fmt=args.format)
    print(f"wrote {summary.path}: {summary.description}")
    for note in summary.notes:
        print(note)
    print(f"load with: {summary.load_hint}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from collections.abc import Iterator

    from .predict import (
        ImageInput,
        PredictError,
        Prediction,
        Predictor,
        TextInput,
        check_output,
        collect_dataset_images,
        collect_inputs,
        collect_texts,
        format_predictions,
        is_dataset_spec,
        load_run,
        write_predictions,
    )

    if args.out:
        check_output(args.out)  # before the work: a wrong path must not throw a long job away
    run = load_run(args.run_dir, device=args.device)
    texts: list[TextInput] = []
    if run.modality == "text":
        texts, problems = collect_texts(args.inputs, run.config.data)
        files: list[ImageInput] = []
    else:
        specs = [s for s in args.inputs if not is_dataset_spec(s)]
        paths, problems = collect_inputs(specs) if specs else ([], [])
        rows, bad_sets = collect_dataset_images([s for s in args.inputs if is_dataset_spec(s)], run.config.data)
        files, problems = [*paths, *rows], problems + bad_sets
    if problems and args.strict:
        spec, reason = problems[0]
        raise PredictError(f"input {spec}: {reason} (without --strict it is skipped)")
    if not files and not texts:
        detail = "; ".join(f"{s}: {r}" for s, r in problems)
        raise PredictError(f"no input to classify ({detail})" if detail else "no input to classify")
    log.info(
        "%s: %s after %d task(s), %d classes, %d %s on %s",
        args.run_dir,
        run.config.method.name,
        run.completed_tasks,
        len(run.class_names),
        len(texts) or len(files),
        "text(s)" if texts else "input(s)",
        run.device,
    )
    predictor = Predictor(run, batch_size=args.batch_size, workers=args.workers)
    preds = []
    failures: list[tuple[str, str]] = list(problems)
    batches: Iterator[tuple[list[Prediction], list[tuple[str, str]]]]
    if texts:
        batches = ((batch, []) for batch in predictor.iter_texts(texts, args.top_k))
    else:
        batches = predictor.iter_batches(files, args.top_k, strict=args.strict)
    for batch, bad in batches:
        failures.extend(bad)
        if args.out:
            preds.extend(batch)
        elif batch:
            print(format_predictions(batch), flush=True)
    if failures:
        shown = "\n  ".join(f"{path}: {reason}" for path, reason in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        log.warning("skipped %d unreadable input(s):\n  %s%s", len(failures), shown, more)
    if args.out:
        write_predictions(preds, args.out)
        print(f"wrote {len(preds)} prediction(s) to {args.out}")
    n_done = len(files) - (len(failures) - len(problems))
    if not texts and n_done == 0:
        raise PredictError(f"none of the {len(files)} input file(s) could be read")
    return 0


def cmd_learn(args: argparse.Namespace) -> int:
    from .learn import learn
    from .report import format_task_table

    report = learn(args.run_dir, args.data, name=args.name, device=args.device)
    print(format_task_table(report.results))
    print(f"run directory: {args.run_dir}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report
    from .rundir import regenerate_run_files

    print(report(args.run_dirs, args.out, regenerate=regenerate_run_files))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    import json

    from .diagnose import diagnose_run, format_diagnosis

    d = diagnose_run(args.run_dir, task=args.task, device=args.device)
    print(format_diagnosis(d))
    if args.json:
        Path(args.json).write_text(json.dumps(d, indent=1) + "\n")
    return 0


def cmd_build_data(args: argparse.Namespace) -> int:
    from .data.emoji_r import build_emoji_r, default_emoji_r_root

    root = args.root or str(default_emoji_r_root())
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // total
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            log.info("emoji_r: rendered %d / %d images", done, total)

    try:
        rec = build_emoji_r(
            root,
            size=args.size,
            min_per_class=args.min_per_class,
            cache_dir=args.cache,
            registry=args.registry,
            overwrite=args.overwrite,
            progress=progress,
        )
    except FileExistsError as e:  # bad input (exit 2 with the message), not a failure of the build
        raise ValueError(f"{e} (--overwrite)") from e
    print(
        f"emoji_r: {rec['num_classes']} classes, {rec['num_emoji']} emoji, {rec['num_images']} images "
        f"({rec['settings']['size']} px) in {root} (built in {rec['build_seconds']} s)"
    )
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


EXPORT_EPILOG = """formats:
  merged  the backbone with everything learned folded into its weights. Any method.
          timm backbones: FILE.safetensors (same keys as the original backbone; the metadata names
          the timm architecture, its arguments and the input normalisation; the printed line loads it).
          hf: backbones: a DIRECTORY written by save_pretrained (with the tokenizer of text models)
          that transformers.AutoModel.from_pretrained loads.
  safetensors / hf   merged, insisting on that form (refused when the backbone is the other kind).
  peft    DIRECTORY: a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
          that computes exactly what sdlora computes: after task t each adapted projection's update
          sum_k s_k B_k A_k is one LoRA of rank sum_k r_k (lora_alpha = r, scaling 1; fused qkv with
          zero k rows). Also classifier.safetensors (the timm classifier for num_classes = classes
          seen, loads strictly), labels.txt (class names in logit order), base_model.safetensors
          (the backbone before training; --no-base leaves it out), sdlora_export.json and a README
          with the loading code (PeftModel.from_pretrained). Low-rank methods only (SD-LoRA family,
          seq_lora, ablations, inflora). Tested with peft 0.21.2.
          hf: backbones: the adapter applies to the transformers model itself (module names as
          AutoModel names them): PeftModel.from_pretrained(AutoModel.from_pretrained(DIR/base), DIR).
          base/ is the untrained model (save_pretrained; --no-base: the run's original model is named
          instead), classifier.safetensors an nn.Linear(hidden_size, classes), text runs add the
          tokenizer (AutoTokenizer.from_pretrained(DIR)); the README shows the pooling (cls or mean of
          last_hidden_state, as the run recorded) that gives sdlora's features.
"""


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
    sp.add_argument(
        "--methods",
        default="sdlora,sdlora_rr,sdlora_kd,seq_lora,simplecil,inflora",
        help="comma-separated method names (sdlora list), or 'all': every registered method, skipping those that "
        "cannot work on the config's backbone (default: %(default)s)",
    )
    sp.add_argument("--seeds", type=_seed_list, help="comma-separated seeds (default: the config's seed)")
    sp.add_argument("--out", default="runs/compare")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(fn=cmd_compare)

    sp = sub.add_parser(
        "check-data",
        help="decode every image file (or tokenise every text) a config would read and check that every class has "
        "training and test samples",
    )
    sp.add_argument("config", help="YAML file or preset name")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--workers", type=_non_negative_int, help="decoding processes (default: data.num_workers)")
    sp.add_argument("--all", action="store_true", help="every file of the dataset, not only the per-class subsets")
    sp.set_defaults(fn=cmd_check_data)

    sp = sub.add_parser(
        "export",
        help="write what a run learned for other tools (merged backbone, or a PEFT LoRA adapter)",
        description="Write what a run learned (its newest committed checkpoint) for use outside sdlora.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sp.add_argument("run_dir")
    sp.add_argument("--out", required=True, help="FILE.safetensors (merged timm backbone) or a DIRECTORY (hf, peft)")
    sp.add_argument(
        "--format",
        choices=("merged", "safetensors", "hf", "peft"),
        default="merged",
        help="what to write (default merged)",
    )
    sp.add_argument(
        "--no-base", action="store_true", help="peft: leave out base_model.safetensors (you have the weights)"
    )
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser(
        "predict",
        help="classify images (or texts, for a text run) with a trained run (merged model, class names from the "
        "training data)",
        description="Classify images with what a run learned: top-k class names and scores (softmax of the logits "
        "over the classes seen so far), the run's test transform, everything folded into the backbone. On a text "
        "run the inputs are text files: every non-empty line is one text (a .csv/.tsv/.jsonl file: its "
        "data.text_column), tokenised as in training; each result names its FILE:LINE.",
    )
    sp.add_argument("run_dir")
    sp.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders (searched recursively) or glob patterns; text runs: text files, folders or globs; "
        "either: hf:ROOT[:SPLIT], the rows of a Hugging Face dataset split (data.image_column / data.text_column; "
        "default split test, or the only one)",
    )
    sp.add_argument("--top-k", type=int, default=1, help="classes per input (default 1)")
    sp.add_argument("--out", help="write FILE.csv or FILE.jsonl instead of printing")
    sp.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default 64)")
    sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    sp.add_argument("--workers", type=int, default=0, help="processes decoding images (default 0: this one)")
    sp.add_argument("--strict", action="store_true", help="stop at the first unreadable input instead of skipping")
    sp.set_defaults(fn=cmd_predict)

    sp = sub.add_parser(
        "learn",
        help="teach a finished run the new classes found in a folder or text file (one more task, no earlier "
        "training data)",
        description="The run's model learns one more task made of the classes found in --data, with the run's "
        "method and training settings and none of the earlier training data. The accuracy matrix gains a row and a "
        "column (earlier test sets that are missing are reported and skipped); results, tables, plots and a new "
        "checkpoint are written; predict and export then know the new classes. Class names the run already knows "
        "are refused. Repeatable; an interrupted learn leaves the run as it was.",
    )
    sp.add_argument("run_dir", help="a finished run directory")
    sp.add_argument(
        "--data",
        required=True,
        help="the new classes: an image folder DIR/<class>/<images> or DIR/train/<class>/... + DIR/test/<class>/...; "
        "text runs: a .csv/.tsv/.jsonl file with the run's text and label columns (split here) or a directory "
        "holding train.<ext> and test.<ext>",
    )
    sp.add_argument("--name", help="label of the new task in the run's record (default: the folder's name)")
    sp.add_argument("--device", help="where to train (default: the run's train.device)")
    sp.set_defaults(fn=cmd_learn)

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

    sp = sub.add_parser(
        "build-data",
        help="download (npm registry, cached, sha256-pinned) and render a built dataset: emoji_r",
        description="Build Emoji-R: emoji in six openly licensed styles, labelled by CLDR sub-category "
        "(docs/datasets.md). Reuses a directory built with the same settings.",
    )
    sp.add_argument("name", choices=("emoji_r",))
    sp.add_argument(
        "--root", help="dataset directory (default: <sdlora cache>/data/emoji_r, read when data.root is null)"
    )
    sp.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    sp.add_argument("--min-per-class", type=int, default=20, help="keep sub-categories with this many emoji (20)")
    sp.add_argument("--cache", help="tarball cache directory (default: <sdlora cache>/npm)")
    sp.add_argument(
        "--registry", help="npm registry URL (default: $SDLORA_NPM_REGISTRY or https://registry.npmjs.org)"
    )
    sp.add_argument("--overwrite", action="store_true", help="replace a directory built with other settings")
    sp.set_defaults(fn=cmd_build_data)

    sp = sub.add_parser("list", help="registered methods, datasets, backbones and presets")
    sp.set_defaults(fn=cmd_list)

    _add_data_parsers(sub)
    _add_reproduce_parser(sub)
    return p


# --------------------------------------------------------------------------------------------------------------------
# sdlora data get, sdlora reproduce
# --------------------------------------------------------------------------------------------------------------------


def _add_data_parsers(sub: Any) -> None:
    """``sdlora data ...``: one subcommand group; each subcommand adds itself to ``data_sub``."""
    data_sub = sub.add_parser("data", help="datasets: download the paper's (get)").add_subparsers(
        dest="data_command", required=True
    )
    _add_data_get_parser(data_sub)


def _add_data_get_parser(data_sub: Any) -> None:
    from .data.fetch import DATASET_SPECS

    sp = data_sub.add_parser(
        "get",
        help="download, verify, extract and lay out a paper dataset as the presets expect",
        description="Download a paper dataset from its public archive (resumable), verify its checksum (published, "
        "or recorded at the first download), extract it safely and lay it out under ROOT/<folder> with the "
        "paper's split. See docs/datasets.md.",
    )
    sp.add_argument("name", choices=sorted(DATASET_SPECS))
    sp.add_argument("--root", required=True, help="data directory; the presets' data.root is ROOT/<folder>")
    sp.add_argument(
        "--from",
        dest="from_files",
        action="append",
        default=[],
        metavar="FILE",
        help="use a file you already have instead of downloading it (repeatable; matched by file name)",
    )
    sp.add_argument(
        "--unverified",
        action="store_true",
        help="accept a --from archive whose checksum differs (e.g. a pre-split copy); recorded as not verified",
    )
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(fn=cmd_data_get)


def cmd_data_get(args: argparse.Namespace) -> int:
    from .data.fetch import get_dataset

    report = get_dataset(
        args.name, args.root, args.from_files, unverified=args.unverified, progress=not args.no_progress
    )
    print("\n".join(report.lines()))
    return 0


def _add_reproduce_parser(sub: Any) -> None:
    from .reproduce import DEFAULT_SEEDS, PAPER_TABLES, PROTOCOLS, TABLE_ALIASES

    sp = sub.add_parser(
        "reproduce",
        help="run the paper's SD-LoRA settings over seeds and tabulate them against the paper",
        description="Run the paper presets (both protocols) for each seed, resumably, then write one table per "
        "paper table to OUT/tables: ours (mean +- std), the paper's, the official logs', the differences.",
    )
    names = ", ".join(f"{k} ({t.title})" for k, t in PAPER_TABLES.items())
    sp.add_argument("tables", nargs="*", metavar="TABLE", help=f"{names}; aliases {', '.join(TABLE_ALIASES)}")
    sp.add_argument("--root", required=True, help="the data directory given to 'sdlora data get'")
    sp.add_argument("--seeds", type=_seed_list, default=list(DEFAULT_SEEDS), help="default: 1993,1994,1995")
    sp.add_argument("--protocols", default=",".join(PROTOCOLS), help="official,paper (default: both)")
    sp.add_argument("--gpus", type=int, default=1, help="processes under torchrun when > 1 (one machine)")
    sp.add_argument("--out", default="runs/reproduce")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    sp.add_argument("--dry-run", action="store_true", help="print downloads, disk, runs and projected GPU hours")
    sp.set_defaults(fn=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import resolve_tables, run_reproduction

    text = run_reproduction(
        resolve_tables(args.tables),
        args.root,
        args.out,
        seeds=args.seeds,
        protocols=[p.strip() for p in args.protocols.split(",") if p.strip()],
        gpus=args.gpus,
        overrides=args.set,
        dry_run=args.dry_run,
    )
    print(text)
    return 0


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


def _after_interrupt(command: str) -> str:
    """What to do after Ctrl-C: only ``run`` and ``demo`` continue with ``--resume`` (a learn is not resumed: it
    left the run as it was, and ``--resume`` rebuilds a run from its config)."""
    if command in ("run", "demo"):
        return "continue with --resume"
    if command == "learn":
        return "the run is as it was before this learn; run the same learn again"
    return "run the command again"


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
        print(f"sdlora: interrupted; {_after_interrupt(args.command)}", file=sys.stderr)
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
