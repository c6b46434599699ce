"""Image decoding (``read_image_file``): every PIL mode a dataset may hold is read right or refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.data import read_image_file


def _gradient(hi: int, dtype: type) -> np.ndarray:
    return np.linspace(0, hi, 8 * 8).reshape(8, 8).astype(dtype)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG (PIL mode I;16) used to come out solid white: every value above 255 was clipped."""
    arr = _gradient(65535, np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = read_image_file(str(tmp_path / "g16.png"))
    assert str(x.dtype) == "torch.uint8"
    assert x.shape == (3, 8, 8)
    expected = np.rint(arr.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(x[0].numpy(), expected) and np.array_equal(x[1].numpy(), expected)
    assert len(np.unique(x.numpy())) > 32  # a gradient, not a flat image


def test_16bit_images_keep_their_relative_brightness(tmp_path):
    """Two 16-bit images of different brightness must stay different (they became identical white images)."""
    for name, hi in (("dark", 20000), ("bright", 60000)):
        Image.fromarray(np.full((6, 6), hi, dtype=np.uint16)).save(tmp_path / f"{name}.png")
    dark, bright = (read_image_file(str(tmp_path / f"{n}.png")) for n in ("dark", "bright"))
    assert int(dark[0, 0, 0]) == round(20000 * 255 / 65535)
    assert int(bright[0, 0, 0]) == round(60000 * 255 / 65535)


def test_32bit_integer_image_within_16_bits_is_read_as_16_bit(tmp_path):
    arr = _gradient(65535, np.int32)
    Image.fromarray(arr).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    x = read_image_file(str(tmp_path / "i32.tif"))
    assert np.array_equal(x[0].numpy(), np.rint(arr.astype(np.float64) * 255 / 65535).astype(np.uint8))


def test_32bit_integer_image_beyond_16_bits_is_refused_by_name(tmp_path):
    Image.fromarray(_gradient(1_000_000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big\.tif.*32-bit integer.*\[0, 1000000\]"):
        read_image_file(str(tmp_path / "big.tif"))


def test_float_image_in_unit_range_is_scaled(tmp_path):
    arr = _gradient(1, np.float32)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    x = read_image_file(str(tmp_path / "f.tif"))
    assert np.array_equal(x[2].numpy(), np.rint(arr.astype(np.float64) * 255).astype(np.uint8))


def test_float_image_outside_unit_range_is_refused_by_name(tmp_path):
    Image.fromarray(_gradient(300, np.float32)).save(tmp_path / "f300.tif")
    with pytest.raises(ValueError, match=r"f300\.tif.*float.*\[0, 300\]"):
        read_image_file(str(tmp_path / "f300.tif"))


def test_8bit_modes_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image_file(str(tmp_path / "rgb.png")).numpy(), rgb.transpose(2, 0, 1))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png")
    x = read_image_file(str(tmp_path / "l.png"))
    assert all(np.array_equal(x[c].numpy(), rgb[..., 0]) for c in range(3))


def test_truncated_and_non_image_files_are_named(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png"):
        with pytest.raises(ValueError, match=rf"cannot decode image .*{name}"):
            read_image_file(str(tmp_path / name))
