"""Text dataset readers registered in :data:`sdlora.data.DATASETS`: ``wordnet``, ``text_csv``, ``text_jsonl``.

Each returns the texts and labels of a train and a test split (tokenisation happens in
:func:`sdlora.data.build_dataset`, with the backbone's tokenizer). A malformed line raises ``ValueError`` naming the
file and the line.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataConfig, RawDataset, SplitData, register_dataset, stratified_test_mask

__all__ = [
    "WORDNET_DIR",
    "WORDNET_LEXNAMES",
    "WordNetSynset",
    "TABLE_SUFFIXES",
    "read_text_table",
    "read_texts",
    "read_wordnet_nouns",
]

log = logging.getLogger(__name__)

WORDNET_DIR = "/usr/share/wordnet"
#: The 45 lexicographer files of WordNet 3.0 (``lexnames``), indexed by ``lex_filenum``; nouns are 03..28.
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordNetSynset:
    """One line of a WordNet ``data.noun`` file.

    Attributes:
        offset: The synset's byte offset (its id in WordNet 3.0).
        lexname: Its lexicographer file, e.g. ``noun.artifact`` (the class label).
        words: Its lemmas, underscores replaced by spaces.
        definition: The gloss without its quoted usage examples (the text that is classified).
        gloss: The whole gloss.
    """

    offset: int
    lexname: str
    words: tuple[str, ...]
    definition: str
    gloss: str


def _definition(gloss: str) -> str:
    """The gloss up to its first quoted example (``; "...``); examples often contain the lemma itself."""
    cut = gloss.find('; "')
    text = gloss if cut < 0 else gloss[:cut]
    if text.startswith('"'):  # a gloss that is only an example
        text = gloss
    return text.strip().rstrip(";").strip()


def read_wordnet_nouns(path: str | Path) -> list[WordNetSynset]:
    """Parse a WordNet 3.0 ``data.noun`` file (the ``wndb(5)`` data-file format).

    Lines starting with two spaces are the licence header. Every other line is
    ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers ...] | gloss``, with ``w_cnt``
    in hexadecimal.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A malformed line (the message names the file and the line number).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"WordNet data file not found: {p}")
    out: list[WordNetSynset] = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue

            def bad(why: str, lineno: int = lineno) -> ValueError:
                return ValueError(f"{p}:{lineno}: not a WordNet data line ({why})")

            head, sep, gloss = line.partition(" | ")
            if not sep:
                raise bad("no ' | ' before the gloss")
            fields = head.split()
            if len(fields) < 6:
                raise bad(f"{len(fields)} fields before the gloss, expected at least 6")
            offset, lex, ss_type, w_cnt = fields[:4]
            if not offset.isdigit():
                raise bad(f"offset {offset!r} is not a number")
            if not lex.isdigit() or not 0 <= int(lex) < len(WORDNET_LEXNAMES):
                raise bad(f"lex_filenum {lex!r} is not 00..{len(WORDNET_LEXNAMES) - 1}")
            lexname = WORDNET_LEXNAMES[int(lex)]
            if ss_type != "n" or not lexname.startswith("noun."):
                raise bad(f"synset type {ss_type!r} / lexicographer file {lexname!r} is not a noun")
            try:
                n_words = int(w_cnt, 16)
            except ValueError:
                raise bad(f"word count {w_cnt!r} is not hexadecimal") from None
            if n_words <= 0 or len(fields) < 4 + 2 * n_words:
                raise bad(f"word count {n_words} does not fit the {len(fields) - 4} fields after it")
            words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
            gloss = gloss.strip()
            definition = _definition(gloss)
            if not definition:
                raise bad("empty gloss")
            out.append(WordNetSynset(int(offset), lexname, words, definition, gloss))
    if not out:
        raise ValueError(f"{p}: no synsets found (is this a WordNet data.noun file?)")
    return out


@register_dataset("wordnet")
def _wordnet(cfg: DataConfig, seed: int) -> RawDataset:
    """WordNet 3.0 noun definitions labelled by lexicographer file (26 classes), split per class with the seed."""
    root = Path(cfg.root).expanduser() if cfg.root else Path(WORDNET_DIR)
    path = root / "data.noun"
    if not path.is_file():
        raise FileNotFoundError(
            f"WordNet noun file not found: {path}. Install it with 'apt-get install wordnet-base' (Debian/Ubuntu; "
            "scripts/setup.sh does this), or set data.root to a WordNet 3.0 'dict' directory holding data.noun"
        )
    synsets = read_wordnet_nouns(path)
    classes = sorted({s.lexname for s in synsets}, key=WORDNET_LEXNAMES.index)
    index = {c: i for i, c in enumerate(classes)}
    targets = np.asarray([index[s.lexname] for s in synsets], dtype=np.int64)
    texts = [s.definition for s in synsets]
    is_test = stratified_test_mask(targets, cfg.test_fraction, np.random.default_rng([seed, 3]))
    tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    from ..fileio import sha256_file

    return RawDataset(
        SplitData(targets[tr], texts=[texts[i] for i in tr]),
        SplitData(targets[te], texts=[texts[i] for i in te]),
        classes,
        info={
            "root": str(root),
            "file_sha256": sha256_file(path),
            "split": f"per class, test_fraction={cfg.test_fraction}, seed={seed}",
            "text": "noun synset definition (gloss without its quoted examples)",
            "synsets": len(synsets),
        },
    )


# --------------------------------------------------------------------------------------------------------------------
# CSV / TSV / JSON lines
# --------------------------------------------------------------------------------------------------------------------


def _text_and_label(
    value_text: object, value_label: object, where: str, cfg: DataConfig, need_label: bool = True
) -> tuple[str, str]:
    if value_text is None:
        raise ValueError(f"{where}: no value in text column {cfg.text_column!r}")
    if not isinstance(value_text, str):
        raise ValueError(f"{where}: text {cfg.text_column!r} is {type(value_text).__name__}, not a string")
    text = value_text.strip()
    if not text:
        raise ValueError(f"{where}: empty text in column {cfg.text_column!r}")
    if not need_label:
        return text, ""
    if value_label is None:
        raise ValueError(f"{where}: no value in label column {cfg.label_column!r}")
    if isinstance(value_label, bool) or not isinstance(value_label, (str, int)):
        raise ValueError(f"{where}: label {cfg.label_column!r} is {type(value_label).__name__}; use a name or an int")
    label = str(value_label).strip()
    if not label:
        raise ValueError(f"{where}: empty label in column {cfg.label_column!r}")
    return text, label


def _read_csv(
    path: Path, cfg: DataConfig, delimiter: str, need_label: bool = True
) -> tuple[list[str], list[str], list[int]]:
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        last_end = 0  # line where the previous record ended (a quoted field may span lines)
        try:
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path}:1: empty file; expected a header line naming the columns")
            wanted = (cfg.text_column, cfg.label_column) if need_label else (cfg.text_column,)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise ValueError(
                    f"{path}:1: header has no column {', '.join(map(repr, missing))} (columns: "
                    f"{', '.join(header)}); set data.text_column / data.label_column"
                )
            i_text = header.index(cfg.text_column)
            i_label = header.index(cfg.label_column) if need_label else i_text
            last_end = reader.line_num
            for record in reader:
                line = last_end + 1
                last_end = reader.line_num
                if not record:
                    continue  # blank line
                where = f"{path}:{line}"
                if len(record) != len(header):
                    raise ValueError(f"{where}: {len(record)} fields, the header has {len(header)}")
                text, label = _text_and_label(record[i_text], record[i_label], where, cfg, need_label)
                texts.append(text)
                labels.append(label)
                lines.append(line)
        except csv.Error as e:
            raise ValueError(f"{path}:{last_end + 1}: {e} (in the record starting on this line)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (near line {last_end + 1}): {e}") from None
    return texts, labels, lines


def _read_jsonl(path: Path, cfg: DataConfig, need_label: bool = True) -> tuple[list[str], list[str], list[int]]:
    texts: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    with open(path, encoding="utf-8-sig") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
                text, label = _text_and_label(
                    obj.get(cfg.text_column), obj.get(cfg.label_column), where, cfg, need_label
                )
                texts.append(text)
                labels.append(label)
                lines.append(lineno)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (near line {lineno + 1}): {e}") from None
    return texts, labels, lines


def read_text_table(path: str | Path, cfg: DataConfig) -> tuple[list[str], list[str], list[int]]:
    """Texts, label strings and line numbers of the rows of a CSV / TSV (``text_csv``: a header line naming the
    columns) or JSON-lines (``text_jsonl``) file.

    The columns (keys) are ``cfg.text_column`` and ``cfg.label_column``; blank lines are skipped; the file is
    UTF-8 (a byte-order mark is allowed).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A bad row (missing column or value, wrong field count, invalid JSON, empty text or label), with
            the file and line; or a file without rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text data file not found: {p}")
    if cfg.name == "text_jsonl":
        rows = _read_jsonl(p, cfg)
    else:
        fmt = cfg.format or ("tsv" if p.suffix == ".tsv" else "csv")
        rows = _read_csv(p, cfg, "\t" if fmt == "tsv" else ",")
    if not rows[0]:
        raise ValueError(f"{p}: no rows")
    return rows


#: File suffixes read as tables by :func:`read_texts` (everything else is one text per line).
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}


def read_texts(path: str | Path, cfg: DataConfig) -> tuple[list[str], list[int]]:
    """Texts to classify from one file, with their line numbers (what ``sdlora predict`` reads on text runs).

    ``.csv`` / ``.tsv`` (a header line) and ``.jsonl`` files: the ``cfg.text_column`` of every row, read as
    ``text_csv`` / ``text_jsonl`` read it (a label column is not needed); any other file: every non-empty line is
    one text (stripped). UTF-8, a byte-order mark allowed.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not UTF-8 text, a bad row (file and line named), or no text at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    if kind == "jsonl":
        texts, _, lines = _read_jsonl(p, cfg, need_label=False)
    elif kind is not None:
        texts, _, lines = _read_csv(p, cfg, "\t" if kind == "tsv" else ",", need_label=False)
    else:
        texts, lines = [], []
        try:
            with open(p, encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        texts.append(line.strip())
                        lines.append(lineno)
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not texts:
        what = f"no row with a {cfg.text_column!r} value" if kind else "every line is empty"
        raise ValueError(f"{p}: no text to classify ({what})")
    return texts, lines


def _class_names(labels: list[str]) -> list[str]:
    """Sorted distinct labels; numerically when every label is an integer (so labels 0..K-1 keep their ids)."""
    distinct = set(labels)
    if all(s.lstrip("-").isdigit() for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _text_table_dataset(cfg: DataConfig, seed: int, extensions: tuple[str, ...]) -> RawDataset:
    if cfg.root is None:
        raise ValueError(
            f"data.root must name the {cfg.name} file (one file, split here) or a directory holding "
            f"train{extensions[0]} and test{extensions[0]}; see docs/datasets.md"
        )
    root = Path(cfg.root).expanduser()
    if root.is_dir():
        train_file = next((root / f"train{e}" for e in extensions if (root / f"train{e}").is_file()), None)
        test_file = next((root / f"test{e}" for e in extensions if (root / f"test{e}").is_file()), None)
        if train_file is None:
            raise FileNotFoundError(
                f"{cfg.name}: no train file ({', '.join('train' + e for e in extensions)}) in {root}; data.root is "
                "one data file or a directory holding train.<ext> and (optionally) test.<ext>"
            )
    elif root.is_file():
        train_file, test_file = root, None
    else:
        raise FileNotFoundError(f"{cfg.name}: data.root not found: {root}")
    train_texts, train_labels, _ = read_text_table(train_file, cfg)
    if test_file is not None:
        test_texts, test_labels, test_lines = read_text_table(test_file, cfg)
        classes = _class_names(train_labels)
        known = set(classes)
        bad = next((i for i, lab in enumerate(test_labels) if lab not in known), None)
        if bad is not None:
            raise ValueError(
                f"{test_file}:{test_lines[bad]}: label {test_labels[bad]!r} never occurs in the training file "
                f"{train_file.name}; every test class needs training samples"
            )
        index = {c: i for i, c in enumerate(classes)}
        train = SplitData(np.asarray([index[x] for x in train_labels]), texts=train_texts)
        test = SplitData(np.asarray([index[x] for x in test_labels]), texts=test_texts)
        split = f"pre-split {train_file.name} / {test_file.name}"
    else:
        classes = _class_names(train_labels)
        index = {c: i for i, c in enumerate(classes)}
        targets = np.asarray([index[x] for x in train_labels], dtype=np.int64)
        is_test = stratified_test_mask(targets, cfg.test_fraction, np.random.default_rng([seed, 3]))
        tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        train = SplitData(targets[tr], texts=[train_texts[i] for i in tr])
        test = SplitData(targets[te], texts=[train_texts[i] for i in te])
        split = f"{train_file.name} split per class, test_fraction={cfg.test_fraction}, seed={seed}"
    return RawDataset(train, test, classes, info={"root": str(root), "split": split})


@register_dataset("text_csv", formats=("csv", "tsv"))
def _text_csv(cfg: DataConfig, seed: int) -> RawDataset:
    """A CSV / TSV file with a header line, text and label columns (``data.text_column``, ``data.label_column``)."""
    return _text_table_dataset(cfg, seed, (".csv", ".tsv"))


@register_dataset("text_jsonl")
def _text_jsonl(cfg: DataConfig, seed: int) -> RawDataset:
    """A JSON-lines file: one object per line with the text and label keys."""
    return _text_table_dataset(cfg, seed, (".jsonl",))
