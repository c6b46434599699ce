"""Text datasets: WordNet parsing, CSV / TSV / JSON-lines readers (bad rows name file and line), tokenisation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora.backbones import create_backbone
from sdlora.config import RunConfig
from sdlora.configtools import from_dict
from sdlora.data import (
    DataConfig,
    TextDataset,
    TextEncoder,
    batch_to,
    build_dataset,
    encode_texts,
    read_wordnet_nouns,
)
from sdlora.rundir import text_encoder_for_run

HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  ",
]


def _noun(offset: int, lex: int, words: list[str], gloss: str) -> str:
    w = " ".join(f"{x} 0" for x in words)
    return f"{offset:08d} {lex:02d} n {len(words):02x} {w} 000 | {gloss}  "


def write_wordnet(root: Path, per_class: dict[int, int]) -> Path:
    """A data.noun with a licence header and ``per_class[lex_filenum]`` synsets of each class."""
    root.mkdir(parents=True, exist_ok=True)
    lines = list(HEADER)
    off = 1000
    for lex, n in per_class.items():
        for i in range(n):
            lines.append(_noun(off, lex, [f"word{lex}_{i}", "alias"], f'thing {lex} number {i}; "an example {i}"'))
            off += 100
    (root / "data.noun").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_wordnet_parsing_fixture(tmp_path):
    root = tmp_path / "wn"
    root.mkdir()
    (root / "data.noun").write_text(
        "\n".join(
            HEADER
            + [
                _noun(1740, 3, ["entity"], "that which is perceived or known to exist (living or nonliving)"),
                _noun(2137, 6, ["car", "auto"], 'a motor vehicle; usually propelled by an engine; "he needs a car"'),
                _noun(3000, 5, ["dog"], '"a quoted gloss only"'),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    syn = read_wordnet_nouns(root / "data.noun")
    assert [s.offset for s in syn] == [1740, 2137, 3000]
    assert [s.lexname for s in syn] == ["noun.Tops", "noun.artifact", "noun.animal"]
    assert syn[1].words == ("car", "auto")
    # Definitions keep every sense before the examples and drop the quoted examples.
    assert syn[1].definition == "a motor vehicle; usually propelled by an engine"
    assert syn[0].definition == "that which is perceived or known to exist (living or nonliving)"
    assert syn[2].definition == '"a quoted gloss only"'


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("00001740 03 n 01 entity 0 000 that has no gloss separator", "no ' | '"),
        ("00001740 77 n 01 entity 0 000 | a gloss", "lex_filenum"),
        ("00001740 29 v 01 run 0 000 | a verb", "not a noun"),
        ("00001740 03 n 05 entity 0 000 | too few words", "word count"),
        ("0000x740 03 n 01 entity 0 000 | bad offset", "offset"),
    ],
)
def test_wordnet_malformed_line_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "data.noun"
    path.write_text("\n".join([*HEADER, _noun(1, 3, ["a"], "fine"), line]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"data\.noun:4: .*{why}"):
        read_wordnet_nouns(path)


def test_wordnet_dataset_split_and_largest_classes(tmp_path):
    root = write_wordnet(tmp_path / "wn", {4: 10, 5: 20, 6: 5, 7: 15})

    def raw(seed, **kw):
        cfg = DataConfig(name="wordnet", root=str(root), test_fraction=0.2, **kw)
        from sdlora.data import DATASETS

        return DATASETS["wordnet"].loader(cfg, seed)

    a, b, c = raw(1), raw(1), raw(2)
    assert a.class_names == ["noun.act", "noun.animal", "noun.artifact", "noun.attribute"]
    assert a.train.texts == b.train.texts and a.test.texts == b.test.texts  # deterministic by seed
    assert a.test.texts != c.test.texts  # another seed, another split
    assert np.bincount(a.test.targets).tolist() == [2, 4, 1, 3]  # round(0.2 * n) per class
    assert not set(a.train.texts) & set(a.test.texts)
    assert len(a.train) + len(a.test) == 50
    assert "thing 5 number 0" in a.train.texts + a.test.texts  # examples dropped
    # largest_classes through build_dataset: the 2 largest (animal 20, attribute 15), original order kept.
    tok = _FakeTokenizer()
    bundle = build_dataset(
        DataConfig(name="wordnet", root=str(root), largest_classes=2, max_length=8), mean=(0,) * 3, std=(1,) * 3,
        seed=1, tokenizer=tok,
    )  # fmt: skip
    assert bundle.class_names == ["noun.animal", "noun.attribute"] and bundle.num_classes == 2
    assert np.bincount(bundle.train_targets).tolist() == [16, 12] and bundle.info["largest_classes"] == 2
    with pytest.raises(ValueError, match="only 4 classes"):
        build_dataset(
            DataConfig(name="wordnet", root=str(root), largest_classes=5), mean=(0,) * 3, std=(1,) * 3, seed=1,
            tokenizer=tok,
        )  # fmt: skip


def test_wordnet_missing_says_how_to_install(tmp_path):
    cfg = DataConfig(name="wordnet", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        build_dataset(cfg, mean=(0,) * 3, std=(1,) * 3, seed=0, tokenizer=_FakeTokenizer())


class _FakeTokenizer:
    """Whitespace tokenizer with the call signature build_dataset uses (ids = word lengths), no transformers."""

    model_input_names = ["input_ids", "attention_mask"]

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            toks = [1 + len(w) for w in t.split()][:max_length]
            ids[i, : len(toks)] = torch.tensor(toks)
            mask[i, : len(toks)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------- CSV / JSONL
def _csv_cfg(root, **kw):
    return DataConfig(name="text_csv", root=str(root), **kw)


def _load(cfg, seed=0):
    from sdlora.data import DATASETS

    return DATASETS[cfg.name].loader(cfg, seed)


def test_text_csv_single_file_and_columns(tmp_path):
    f = tmp_path / "d.csv"
    rows = ["sentence,topic,extra"] + [f'"text {i}, with a comma",{"ab"[i % 2]},x' for i in range(20)]
    f.write_text("\n".join(rows) + "\n\n", encoding="utf-8")
    raw = _load(_csv_cfg(f, text_column="sentence", label_column="topic", test_fraction=0.25))
    assert raw.class_names == ["a", "b"]
    assert len(raw.train) == 16 and len(raw.test) == 4
    assert "text 0, with a comma" in raw.train.texts + raw.test.texts
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"t{i}\t{i % 3}\n" for i in range(12)), encoding="utf-8")
    raw = _load(_csv_cfg(tsv))
    assert raw.class_names == ["0", "1", "2"] and len(raw.train) + len(raw.test) == 12


def test_text_csv_presplit_directory_and_numeric_labels(tmp_path):
    (tmp_path / "train.csv").write_text(
        "text,label\n" + "".join(f"t{i},{i % 11}\n" for i in range(33)), encoding="utf-8"
    )
    (tmp_path / "test.csv").write_text("text,label\nx,10\ny,2\n", encoding="utf-8")
    raw = _load(_csv_cfg(tmp_path))
    # integer labels sort numerically, so label k is class k
    assert raw.class_names == [str(i) for i in range(11)]
    assert raw.test.targets.tolist() == [10, 2] and len(raw.train) == 33
    (tmp_path / "test.csv").write_text("text,label\nx,10\n\ny,12\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.csv:4: label '12' never occurs in the training file"):
        _load(_csv_cfg(tmp_path))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("text,label\na,x\nb\n", r"d\.csv:3: 1 fields, the header has 2"),
        ("text,label\na,x\nb,y,z\n", r"d\.csv:3: 3 fields, the header has 2"),
        ("text,label\na,x\n  ,y\n", r"d\.csv:3: empty text"),
        ("text,label\na,x\nb,\n", r"d\.csv:3: empty label"),
        ("txt,label\na,x\n", r"d\.csv:1: header has no column 'text'"),
        ('text,label\na,x\n"b,y\n', r"d\.csv:3: unexpected end of data"),
        ("", r"d\.csv:1: empty file"),
        ("text,label\n", r"d\.csv: no rows"),
    ],
)
def test_text_csv_bad_rows_name_file_and_line(tmp_path, content, match):
    f = tmp_path / "d.csv"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        _load(_csv_cfg(f))


def test_text_csv_not_utf8(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"text,label\na,x\n\xff\xfe,y\n")
    with pytest.raises(ValueError, match=r"d\.csv: not UTF-8"):
        _load(_csv_cfg(f))


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "a", "label": 1}', '{"text": "b", "label": 1'], r"d\.jsonl:2: invalid JSON"),
        (['{"text": "a", "label": 1}', "", '["b", 1]'], r"d\.jsonl:3: expected a JSON object"),
        (['{"text": "a", "label": 1}', '{"text": "b"}'], r"d\.jsonl:2: no value in label column 'label'"),
        (['{"text": 3, "label": 1}'], r"d\.jsonl:1: text 'text' is int"),
        (['{"text": "a", "label": true}'], r"d\.jsonl:1: label 'label' is bool"),
    ],
)
def test_text_jsonl_bad_rows_name_file_and_line(tmp_path, lines, match):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        _load(DataConfig(name="text_jsonl", root=str(f)))


def test_text_jsonl_reads_and_data_root_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(10)))
    raw = _load(DataConfig(name="text_jsonl", root=str(f)))
    assert raw.class_names == ["a", "b"] and len(raw.train) + len(raw.test) == 10
    with pytest.raises(ValueError, match="data.root must name"):
        _load(DataConfig(name="text_jsonl"))
    with pytest.raises(FileNotFoundError, match="data.root not found"):
        _load(DataConfig(name="text_jsonl", root=str(tmp_path / "missing")))
    (tmp_path / "d2").mkdir()
    with pytest.raises(FileNotFoundError, match="no train file"):
        _load(DataConfig(name="text_jsonl", root=str(tmp_path / "d2")))


def test_data_config_text_keys_are_checked():
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(name="wordnet", max_length=1)
    with pytest.raises(ValueError, match="largest_classes"):
        DataConfig(name="wordnet", largest_classes=1)
    with pytest.raises(ValueError, match="both 'x'"):
        DataConfig(name="text_csv", text_column="x", label_column="x")
    with pytest.raises(ValueError, match="format"):
        DataConfig(name="text_csv", format="xlsx")


# ------------------------------------------------------------------------------------------------ tokenisation
def test_text_pipeline_tokenises_like_the_text_encoder(tiny_bert_dir, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"the cat {i}", "label": i % 2}) + "\n" for i in range(8)))
    run = from_dict(
        RunConfig,
        {"backbone": {"name": f"hf:{tiny_bert_dir}"}, "data": {"name": "text_jsonl", "root": str(f), "max_length": 9}},
    )
    backbone = create_backbone(run.backbone, 32)
    bundle = build_dataset(run.data, mean=backbone.mean, std=backbone.std, seed=0, tokenizer=backbone.tokenizer)
    assert isinstance(bundle.train, TextDataset) and bundle.info["modality"] == "text"
    assert bundle.info["tokens"]["max_length"] == 9
    x, y = bundle.train[0]
    assert set(x) == {"input_ids", "token_type_ids", "attention_mask"} and x["input_ids"].shape == (9,)
    encoder = text_encoder_for_run(run)
    assert isinstance(encoder, TextEncoder) and encoder.max_length == 9
    from sdlora.data import DATASETS

    texts = DATASETS["text_jsonl"].loader(run.data, 0).train.texts
    enc = encoder(texts)
    assert all(torch.equal(enc[k], bundle.train.encodings[k]) for k in enc)
    # A batch of texts collates into a dict of [B, L] tensors and moves as one.
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=3)
    xb, yb = next(iter(loader))
    assert xb["input_ids"].shape == (3, 9) and yb.shape == (3,)
    moved = batch_to(xb, torch.device("cpu"))
    assert moved.keys() == xb.keys()


def test_encode_texts_input_checks():
    tok = _FakeTokenizer()
    assert encode_texts(tok, [], 4)["input_ids"].shape == (0, 4)
    with pytest.raises(TypeError, match="not one string"):
        encode_texts(tok, "a text", 4)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        encode_texts(tok, ["a", 3], 4)


def test_modality_mismatch_is_a_clear_error(tmp_path, tiny_bert_dir):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(6)))
    with pytest.raises(ValueError, match="holds text, but the backbone is an image model"):
        build_dataset(DataConfig(name="text_jsonl", root=str(f)), mean=(0,) * 3, std=(1,) * 3, seed=0)
    with pytest.raises(ValueError, match="holds images, but the backbone is a text model"):
        build_dataset(
            DataConfig(name="synthetic", image_size=32),
            mean=(0,) * 3,
            std=(1,) * 3,
            seed=0,
            tokenizer=_FakeTokenizer(),
        )


def test_huge_text_lines_are_cut_before_tokenising_with_the_same_tokens(tiny_bert_dir):
    """Issue 22, item 9: one 22 MB text line took 4.2 GB in predict: the tokenizer splits the whole string before
    it truncates to max_length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    seen: list[int] = []

    def recording(texts, **kwargs):
        seen.extend(len(t) for t in texts)
        return tok(texts, **kwargs)

    recording.model_input_names = tok.model_input_names  # type: ignore[attr-defined]
    words = " ".join(f"word{i % 97} and more" for i in range(400_000))  # ~6 MB, one line
    enc = encode_texts(recording, [words, "short"], 16)
    assert max(seen) <= 16 * 100  # what 16 tokens of at most 100 characters each can span
    whole = tok([words[:5000], "short"], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(enc["input_ids"], whole["input_ids"])  # the tokens the model reads are the same
