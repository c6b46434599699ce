import pickle

import pytest
import torch

from sdlora.data import ImageTransform
from sdlora.data.transforms import resize_size_for


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_dtype_range(train, channels):
    torch.manual_seed(0)
    img = torch.randint(0, 256, (channels, 28, 40), dtype=torch.uint8)
    tf = ImageTransform(56, train=train, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(5):
        x = tf(img)
        assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and x.is_contiguous()
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0


def test_test_transform_is_deterministic_and_matches_resize_crop():
    img = torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8)
    tf = ImageTransform(32, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(tf(img), tf(img))
    assert resize_size_for(224) == 256 and resize_size_for(56) == 64


def test_constant_image_survives_and_normalises():
    img = torch.full((1, 20, 20), 255, dtype=torch.uint8)
    for train in (True, False):
        x = ImageTransform(16, train=train, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))(img)
        assert x.shape == (3, 16, 16)
        assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], torch.full((16, 16), 3.0))
        assert torch.allclose(x[2], torch.full((16, 16), 0.5))


def test_train_transform_is_random():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    tf = ImageTransform(32, train=True, mean=(0, 0, 0), std=(1, 1, 1))
    assert not torch.equal(tf(img), tf(img))


def test_bad_inputs_and_pickle():
    tf = ImageTransform(8, train=False, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(ValueError, match="C in"):
        tf(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        ImageTransform(8, train=False, mean=(0, 0), std=(1, 1))
    assert pickle.loads(pickle.dumps(tf)).size == 8  # DataLoader workers pickle it
