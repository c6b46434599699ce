"""Classify new inputs with what a run learned: ``sdlora predict RUN_DIR INPUTS...``.

:func:`load_run` rebuilds a run's method from its newest checkpoint, folds everything learned into the backbone
(``Method.merge_for_inference``: inference at the cost of the bare backbone) and reads the names of the classes
seen so far. :class:`Predictor` decodes image files with the run's test transform (the one the run evaluated
with: its image size and its backbone's normalisation, e.g. a Hugging Face image processor's mean and std), batches
them and returns the top-k classes of each. On a text run (a Hugging Face text backbone) the inputs are texts
(:func:`collect_texts`: every non-empty line of a file, or the run's text column of a CSV / TSV / JSONL file),
tokenised with the run's tokenizer and ``data.max_length`` as in training; each prediction names its file and line
(``notes.txt:3``). Inputs that cannot be read are reported by name and skipped (or stop the call,
``strict=True``); they never abort a long job half-way with a traceback.

Scores are the softmax of the method's logits over every class seen so far (for SimpleCIL, of its scaled cosine
similarities), so they rank classes; they are not calibrated probabilities.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .config import RunConfig
from .data import ImageRows, ImageTransform, TextEncoder, batch_to, read_image_file
from .data.hf import HF_PREFIX, HFSource
from .data.readers import IMG_EXTENSIONS, walk_visible
from .data.text_readers import read_texts
from .fileio import atomic_write_text, read_json, to_jsonable
from .methods import Method

__all__ = [
    "LoadedRun",
    "Prediction",
    "PredictError",
    "Predictor",
    "TextInput",
    "check_device",
    "check_output",
    "collect_dataset_images",
    "collect_inputs",
    "collect_texts",
    "format_predictions",
    "input_name",
    "is_dataset_spec",
    "load_run",
    "run_class_names",
    "write_predictions",
]

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """Inputs that cannot be classified (none readable, an unreadable one under ``strict``, a bad output path)."""


# ----------------------------------------------------------------------------------------------- the run
@dataclass
class LoadedRun:
    """A run's method ready for inference, and what it needs to read inputs.

    Attributes:
        run_dir: the run directory.
        method: the method after its newest checkpoint, merged for inference, in eval mode, on ``device``.
        config: the run's config.
        record: the checkpoint record (``task``: 0-based index of the last finished task).
        class_names: names of the classes seen so far, in logit order.
        transform: image runs: the run's test transform (uint8 image -> model input); ``None`` for text runs.
        device: where the method lives.
        encoder: text runs: the run's tokenisation (tokenizer and ``data.max_length``); ``None`` for image runs.
    """

    run_dir: Path
    method: Method
    config: RunConfig
    record: dict[str, Any]
    class_names: list[str]
    transform: ImageTransform | None
    device: torch.device
    encoder: TextEncoder | None = None

    @property
    def completed_tasks(self) -> int:
        return int(self.record["task"]) + 1

    @property
    def modality(self) -> str:
        """``"text"`` or ``"image"``: what the run's backbone reads."""
        return "text" if self.encoder is not None else "image"


def run_class_names(run_dir: str | os.PathLike, cfg: RunConfig, num_seen: int) -> list[str]:
    """Names of the first ``num_seen`` class positions of a run.

    From ``results.json``'s ``class_names`` (position order) when the run recorded them; for runs written before
    that, from the dataset's names mapped through the recorded ``class_order`` (which needs the dataset). When
    neither is available the classes are called ``class_<original id>``, with a warning.
    """
    results_path = Path(run_dir) / "results.json"
    results: dict[str, Any] = {}
    if results_path.exists():
        try:
            results = read_json(results_path)
        except ValueError as e:
            log.warning("cannot read %s (%s): class names come from the dataset", results_path, e)
    names = results.get("class_names") or []
    if len(names) >= num_seen:
        return [str(n) for n in names[:num_seen]]
    order = [int(c) for c in results.get("class_order") or []]
    try:
        from .data import DATASETS

        raw = DATASETS[cfg.data.name].loader(cfg.data, cfg.seed)
        by_id = list(raw.class_names)
        if len(order) >= num_seen:
            return [str(by_id[c]) for c in order[:num_seen]]
    except Exception as e:  # the dataset is not on this machine: names are a convenience here
        log.warning("the run does not record its class names and its dataset cannot be read (%s)", e)
    ids = order[:num_seen] if len(order) >= num_seen else list(range(num_seen))
    log.warning("class names unknown for %s: predictions are called class_<original id>", run_dir)
    return [f"class_{c}" for c in ids]


def _num_seen(method: Method) -> int:
    n = method.num_seen_classes()
    if n <= 0:
        raise PredictError("the run's method has no classes yet")
    return n


def check_device(device: str) -> str:
    """``device`` if this machine has it (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises:
        ValueError: another spelling, or CUDA asked for where there is none (the message says what to pass).
    """
    if device in ("auto", "cpu"):
        return device
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
    if ":" in device and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_run(run_dir: str | os.PathLike, device: str = "auto") -> LoadedRun:
    """Rebuild a run for inference (see :class:`LoadedRun`).

    Args:
        run_dir: a run directory with at least one finished task.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        RunError: not a run directory, no checkpoint yet, a damaged checkpoint, or CUDA asked for but absent.
    """
    from .distributed import DistInfo, select_device
    from .rundir import build_method_from_run, text_encoder_for_run

    dev = select_device(check_device(device), DistInfo())
    method, cfg, record = build_method_from_run(run_dir, device=str(dev))
    method.merge_for_inference()
    info = method.backbone_info
    names = run_class_names(run_dir, cfg, _num_seen(method))
    if info.get("modality") == "text":
        return LoadedRun(Path(run_dir), method, cfg, record, names, None, dev, text_encoder_for_run(cfg))
    transform = ImageTransform(cfg.data.image_size, train=False, mean=info["mean"], std=info["std"])
    return LoadedRun(Path(run_dir), method, cfg, record, names, transform, dev)


# ---------------------------------------------------------------------------------------------- inputs
def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _images_under(directory: str) -> tuple[list[str], list[str]]:
    """Image files under ``directory`` (recursive, sorted; :func:`walk_visible`, the walk the training readers use)
    and the other files found there."""
    images: list[str] = []
    others: list[str] = []
    for dirpath, _dirnames, filenames in walk_visible(directory):
        for f in filenames:
            (images if f.lower().endswith(IMG_EXTENSIONS) else others).append(os.path.join(dirpath, f))
    return images, others


def _match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` (``**``: any number of components)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _match_parts(pattern[1:], parts) or (bool(parts) and _match_parts(pattern, parts[1:]))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def _glob(spec: str) -> list[str]:
    """``glob.glob(spec, recursive=True)``, sorted, without following a directory link into a loop.

    ``glob``'s own ``**`` follows links and never stops on ``up -> ..`` (each level lists the tree again); a
    pattern with ``**`` is matched here against :func:`walk_visible` of its fixed leading folder instead (hidden
    entries are not matched, as ``glob`` does not match them with ``*``).
    """
    parts = Path(spec).parts
    if "**" not in parts:
        return sorted(glob.glob(spec))
    fixed = next(i for i, p in enumerate(parts) if _is_glob(p))
    base = os.path.join(*parts[:fixed]) if fixed else os.curdir
    pattern = parts[fixed:]
    if not os.path.isdir(base):
        return []
    hits: list[str] = []
    for dirpath, dirnames, filenames in walk_visible(base):
        rel = Path(os.path.relpath(dirpath, base)).parts if dirpath != base else ()
        rel = tuple(p for p in rel if p != os.curdir)
        for name in (*dirnames, *filenames):
            if _match_parts(pattern, (*rel, name)):
                hits.append(os.path.join(*parts[:fixed], *rel, name) if fixed else os.path.join(*rel, name))
    return sorted(hits)


def _expand(
    specs: Sequence[str], under: Callable[[str], tuple[list[str], list[str]]], empty: str
) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """Files named by ``specs`` (files, folders, glob patterns), each once in first-seen order.

    ``under(folder)`` gives ``(files to use, files passed over)`` inside a folder; ``empty`` is the reason given for
    a folder named on the command line that gives no file. Returns ``(files, problems, passed over)``.
    """
    files: list[str] = []
    seen: set[str] = set()
    problems: list[tuple[str, str]] = []
    ignored: list[str] = []

    def add(paths: list[str]) -> None:
        for path in paths:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)

    def add_folder(folder: str) -> list[str]:
        found, others = under(folder)
        ignored.extend(others)
        add(found)
        return found

    for spec in specs:
        if os.path.isdir(spec):
            if not add_folder(spec):
                problems.append((spec, empty))
        elif os.path.exists(spec):
            add([spec])
        elif _is_glob(spec):
            hits = _glob(spec)
            if not hits:
                problems.append((spec, "pattern matches no file"))
            for hit in hits:
                if os.path.isdir(hit):
                    add_folder(hit)
                else:
                    add([hit])
        else:
            problems.append((spec, "no such file or folder"))
    return files, problems, ignored


def collect_inputs(specs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files, folders (recursively, image extensions only) and glob patterns into a list of files.

    A file named explicitly is always tried, whatever its extension (so a mislabelled file is reported rather
    than silently ignored); files inside folders count only with an image extension (``IMG_EXTENSIONS``), the
    others are listed in one log line. Duplicates are kept once, in first-seen order.

    Returns:
        ``(files, problems)``: the files to classify, and ``(spec, reason)`` for specs that name nothing
        (missing paths, globs without a match, empty folders).
    """
    files, problems, ignored = _expand(
        specs, _images_under, f"folder holds no image files ({', '.join(IMG_EXTENSIONS)})"
    )
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" ... (+{len(ignored) - 5} more)" if len(ignored) > 5 else "")
        log.info("ignored %d file(s) without an image extension inside folders: %s", len(ignored), shown)
    return files, problems


def is_dataset_spec(spec: str) -> bool:
    """Whether a command-line input names a Hugging Face dataset (``hf:ROOT[:SPLIT]``, not an existing path)."""
    return spec.startswith(HF_PREFIX) and not os.path.exists(spec)


def collect_dataset_images(specs: Sequence[str], data: Any) -> tuple[list[ImageInput], list[tuple[str, str]]]:
    """The image rows of Hugging Face dataset splits ``hf:ROOT[:SPLIT]`` (:class:`sdlora.data.hf.HFSource`; the
    column is the run's ``data.image_column``), for an image run.

    Returns:
        ``(inputs, problems)``: one input per row, and ``(spec, reason)`` for a dataset that cannot be read.
    """
    inputs: list[ImageInput] = []
    problems: list[tuple[str, str]] = []
    for spec in specs:
        try:
            rows = HFSource(spec).image_rows(data)
        except (OSError, ValueError, ImportError) as e:
            problems.append((spec, str(e)))
            continue
        inputs += [(rows, i) for i in range(len(rows))]
    return inputs, problems


@dataclass(frozen=True)
class TextInput:
    """One text to classify and where it came from (``source``: ``file:line``)."""

    source: str
    text: str


def _text_files_under(directory: str) -> list[str]:
    """Files under ``directory`` (recursive, sorted, hidden ones left out; :func:`walk_visible`) that
    :func:`collect_texts` reads."""
    return [os.path.join(d, f) for d, _, filenames in walk_visible(directory) for f in filenames]


def collect_texts(specs: Sequence[str], data: Any) -> tuple[list[TextInput], list[tuple[str, str]]]:
    """The texts of files, folders (recursively, every file) and glob patterns, for a text run.

    ``hf:ROOT[:SPLIT]`` names a Hugging Face dataset split: its ``data.text_column``, one text per row
    (``hf:ROOT:SPLIT#ROW`` sources; :class:`sdlora.data.hf.HFSource`). Each file is read with
    :func:`sdlora.data.text_readers.read_texts`: ``.csv`` / ``.tsv`` / ``.jsonl`` files give
    the run's text column (``data.text_column``; a label column is not needed), any other file one text per
    non-empty line. Files are kept once, in first-seen order.

    Args:
        specs: the command line's inputs.
        data: the run's ``DataConfig`` (its text column).

    Returns:
        ``(texts, problems)``: the texts with ``file:line`` sources, and ``(spec or file, reason)`` for specs that
        name nothing and files that cannot be read (not UTF-8, a bad row, no text).
    """
    datasets = [s for s in specs if is_dataset_spec(s)]
    files, problems, _ = _expand(
        [s for s in specs if s not in datasets], lambda d: (_text_files_under(d), []), "folder holds no files"
    )
    texts: list[TextInput] = []
    for spec in datasets:
        try:
            rows, where = HFSource(spec).texts(data)
        except (OSError, ValueError, ImportError) as e:
            problems.append((spec, str(e)))
            continue
        texts += [TextInput(f"{where}#{i}", t) for i, t in enumerate(rows)]
    for path in files:
        try:
            lines, numbers = read_texts(path, data)
        except (OSError, ValueError) as e:
            # the readers' messages start with the path; the caller's report names it already
            problems.append((path, str(e).removeprefix(f"{path}: ").removeprefix(f"{Path(path)}: ")))
            continue
        texts += [TextInput(f"{path}:{n}", t) for t, n in zip(lines, numbers)]
    return texts, problems


#: One image input: a file path, or row ``i`` of an image source (a Hugging Face dataset split).
ImageInput = str | tuple[ImageRows, int]


def input_name(item: ImageInput) -> str:
    """What a prediction calls an input: the path, or the row's name (``hf:ROOT:SPLIT#ROW``)."""
    return item if isinstance(item, str) else item[0].name(item[1])


def _read_input(item: ImageInput) -> Tensor:
    return read_image_file(item) if isinstance(item, str) else item[0].read(item[1])


class _ImageFiles(Dataset):
    """``(index, input tensor or None, reason)`` for each input: a decode error becomes a reason, not an exception,
    so one bad file in a DataLoader worker does not stop the others."""

    def __init__(self, inputs: Sequence[ImageInput], transform: ImageTransform) -> None:
        self.inputs = list(inputs)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str]:
        try:
            return i, self.transform(_read_input(self.inputs[i])), ""
        except Exception as e:  # any decoder error names the file in the caller's report
            cause = e.__cause__ if isinstance(e, ValueError) and e.__cause__ is not None else e
            return i, None, str(cause) or type(cause).__name__


def _collate(items: list[tuple[int, Tensor | None, str]]) -> tuple[list[int], Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    x = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], x, bad


# ------------------------------------------------------------------------------------------- predictions
@dataclass
class Prediction:
    """The top-k classes of one input, best first: ``labels[j]`` (its ``indices[j]`` logit) with ``scores[j]``."""

    input: str
    labels: list[str]
    scores: list[float]
    indices: list[int] = field(default_factory=list)
    text: str | None = None  # text runs: the text that was classified (``input`` is its ``file:line``)

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def score(self) -> float:
        return self.scores[0]


class Predictor:
    """Classify image files (:meth:`iter_batches`) or texts (:meth:`iter_texts`) with a loaded run.

    Args:
        run: from :func:`load_run`.
        batch_size: inputs per forward pass.
        workers: DataLoader worker processes decoding images (0: in this process).
    """

    def __init__(self, run: LoadedRun, batch_size: int = 64, workers: int = 0) -> None:
        if batch_size <= 0:
            raise PredictError(f"--batch-size must be positive, got {batch_size}")
        if workers < 0:
            raise PredictError(f"--workers must be >= 0, got {workers}")
        self.run = run
        self.batch_size = batch_size
        self.workers = workers

    @torch.no_grad()
    def logits(self, x: Tensor | dict[str, Tensor]) -> Tensor:
        """Logits of a batch of model inputs (as the engine evaluates: autocast when the run trained with AMP)."""
        run = self.run
        x = batch_to(x, run.device, non_blocking=True)
        if run.config.train.amp and run.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return run.method(x).float()
        return run.method(x).float()

    def iter_batches(
        self, paths: Sequence[ImageInput], top_k: int, strict: bool = False, progress: bool = True
    ) -> Iterator[tuple[list[Prediction], list[tuple[str, str]]]]:
        """Yield ``(predictions, failures)`` per batch, in input order; ``failures`` are ``(path, reason)``.

        ``paths`` are image files, or rows of a dataset (:func:`collect_dataset_images`).

        Raises:
            PredictError: ``strict`` and a file cannot be read (the message names it); ``top_k`` < 1.
        """
        if top_k < 1:
            raise PredictError(f"--top-k must be at least 1, got {top_k}")
        if self.run.transform is None:
            raise PredictError(f"{self.run.run_dir} is a text run: it classifies texts, not image files")
        loader = DataLoader(
            _ImageFiles(paths, self.run.transform),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_collate,
        )
        from tqdm import tqdm

        quiet = not progress or not sys.stderr.isatty() or len(loader) < 2
        names = [input_name(p) for p in paths]
        for idx, x, bad in tqdm(loader, total=len(loader), desc="predict", leave=False, disable=quiet):
            failures = [(names[i], reason) for i, reason in bad]
            if strict and failures:
                path, reason = failures[0]
                raise PredictError(f"cannot read input {path}: {reason} (without --strict it is skipped)")
            preds = self._top_k(x, [names[i] for i in idx], top_k) if x is not None else []
            yield preds, failures

    def _top_k(
        self, x: Tensor | dict[str, Tensor], inputs: Sequence[str], top_k: int, texts: Sequence[str] | None = None
    ) -> list[Prediction]:
        names = self.run.class_names
        probs = torch.softmax(self.logits(x), dim=1)
        top = probs.topk(min(top_k, len(names)), dim=1)
        preds = []
        for row, name in enumerate(inputs):
            pos = top.indices[row].tolist()
            text = texts[row] if texts is not None else None
            preds.append(Prediction(name, [names[p] for p in pos], top.values[row].tolist(), pos, text))
        return preds

    def iter_texts(self, texts: Sequence[TextInput], top_k: int, progress: bool = True) -> Iterator[list[Prediction]]:
        """Yield the predictions of each batch of ``texts`` (a text run), in input order.

        Each batch is tokenised with the run's tokenizer and ``data.max_length`` (truncated and padded as the
        training data was, :class:`sdlora.data.TextEncoder`).

        Raises:
            PredictError: an image run, or ``top_k`` < 1.
        """
        if top_k < 1:
            raise PredictError(f"--top-k must be at least 1, got {top_k}")
        encoder = self.run.encoder
        if encoder is None:
            raise PredictError(f"{self.run.run_dir} is an image run: it classifies image files, not texts")
        from tqdm import tqdm

        starts = range(0, len(texts), self.batch_size)
        quiet = not progress or not sys.stderr.isatty() or len(starts) < 2
        for start in tqdm(starts, desc="predict", leave=False, disable=quiet):
            chunk = texts[start : start + self.batch_size]
            batch = encoder([t.text for t in chunk])
            yield self._top_k(batch, [t.source for t in chunk], top_k, [t.text for t in chunk])

    def predict_texts(self, texts: Sequence[TextInput], top_k: int = 1, progress: bool = True) -> list[Prediction]:
        """All predictions of ``texts`` (see :meth:`iter_texts`)."""
        return [p for batch in self.iter_texts(texts, top_k, progress) for p in batch]

    def predict(
        self, paths: Sequence[ImageInput], top_k: int = 1, strict: bool = False, progress: bool = True
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """All predictions and all failures (see :meth:`iter_batches`)."""
        preds: list[Prediction] = []
        failures: list[tuple[str, str]] = []
        for p, f in self.iter_batches(paths, top_k, strict, progress):
            preds.extend(p)
            failures.extend(f)
        return preds, failures


# ------------------------------------------------------------------------------------------------ output
def _csv_text(preds: Sequence[Prediction]) -> str:
    import csv
    import io

    k = max((len(p.labels) for p in preds), default=1)
    has_text = any(p.text is not None for p in preds)
    header = ["input", *(["text"] if has_text else []), "label", "score"]
    for j in range(2, k + 1):
        header += [f"label_{j}", f"score_{j}"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for p in preds:
        row: list[Any] = [p.input, *([p.text or ""] if has_text else [])]
        for label, score in zip(p.labels, p.scores):
            row += [label, f"{score:.6f}"]
        w.writerow(row)
    return buf.getvalue()


def _jsonl_text(preds: Sequence[Prediction]) -> str:
    import json

    lines = []
    for p in preds:
        top = [{"label": lab, "score": s, "index": i} for lab, s, i in zip(p.labels, p.scores, p.indices)]
        record: dict[str, Any] = {"input": p.input}
        if p.text is not None:
            record["text"] = p.text
        record.update(label=p.label, score=p.score, top_k=top)
        lines.append(json.dumps(to_jsonable(record), ensure_ascii=False))
    return "".join(line + "\n" for line in lines)


def check_output(out: str | os.PathLike) -> Path:
    """``out`` as a path predictions can be written to; call it before classifying anything, so a wrong path does
    not throw the work away.

    Raises:
        PredictError: an extension other than ``.csv`` / ``.jsonl``, a folder that does not exist, a folder or an
            existing file this process cannot write (read-only), or ``out`` is a folder.
    """
    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise PredictError(f"--out must end in .csv or .jsonl, got {path.name!r}")
    parent = path.parent
    if not parent.is_dir():
        raise PredictError(f"--out: folder {parent} does not exist")
    if path.is_dir():
        raise PredictError(f"--out {path}: is a folder; give a file name ending in {suffix}")
    # The file is written next to its target and renamed (atomic): the folder must be writable, not only the file.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PredictError(f"--out {path}: cannot write into folder {parent} (read-only or no permission)")
    return path


def write_predictions(preds: Sequence[Prediction], out: str | os.PathLike) -> None:
    """Write predictions to ``out`` (``.csv`` or ``.jsonl``), atomically.

    CSV columns: ``input, label, score`` then ``label_j, score_j`` for j = 2..k. JSONL: one object per input,
    ``{"input", "label", "score", "top_k": [{"label", "score", "index"}, ...]}``. Text predictions also have a
    ``text`` column / key after ``input`` (the whole text; ``input`` is its ``file:line``).

    Raises:
        PredictError: :func:`check_output` refuses ``out``, or the write fails (the message names the reason).
    """
    path = check_output(out)
    text = _csv_text(preds) if path.suffix.lower() == ".csv" else _jsonl_text(preds)
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise PredictError(f"--out {path}: cannot write the predictions: {e.strerror or e}") from None


#: Characters of a text shown on the terminal (the CSV / JSONL output keeps the whole text).
SHOWN_TEXT_CHARS = 48


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= SHOWN_TEXT_CHARS else flat[: SHOWN_TEXT_CHARS - 3] + "...")


def format_predictions(preds: Sequence[Prediction]) -> str:
    """One line per input for the terminal: ``input<TAB>label (score)[, label_2 (score_2) ...]``; text predictions
    show the text (cut to :data:`SHOWN_TEXT_CHARS` characters) after the ``file:line``."""
    return "\n".join(
        f"{p.input}\t"
        + (f"{_shown(p.text)}\t" if p.text is not None else "")
        + ", ".join(f"{lab} ({s:.3f})" for lab, s in zip(p.labels, p.scores))
        for p in preds
    )
