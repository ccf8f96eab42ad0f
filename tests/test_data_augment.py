"""Batched augmentation and normalisation: shapes, dtypes, determinism."""

from __future__ import annotations

import pytest
import torch

from imgcls.data.augment import build_augment, mix_batch, random_crop
from imgcls.data.loader import compute_mean_std
from imgcls.forward import normalize
from imgcls.recipe import AugmentSpec

ALL_ON = [
    {"random_crop": 4},
    {"random_resized_crop": True},
    {"hflip": True, "vflip": True},
    {"rotation": 30},
    {"color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}},
    {"trivial_augment": True},
    {"randaugment": True},
    {"random_erasing": 0.5},
    {"random_crop": 2, "hflip": True, "rotation": 10, "color_jitter": {"brightness": 0.2}},
]


def _batch(b=8, c=3, h=12, w=16):
    return torch.randint(0, 256, (b, c, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("options", ALL_ON)
@pytest.mark.parametrize("channels", [1, 3])
def test_augment_shape_dtype_range_and_determinism(options, channels):
    fn = build_augment(AugmentSpec(**options), (12, 16))
    x = _batch(c=channels)
    a = fn(x, torch.Generator().manual_seed(7))
    b = fn(x, torch.Generator().manual_seed(7))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, fn(x, torch.Generator().manual_seed(8)))


def test_nothing_on_means_no_augment():
    assert build_augment(AugmentSpec(mixup=0.2), (8, 8)) is None


def test_random_crop_is_a_shifted_window():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    centre = [int(v) for v in out[:, 0, 1, 1]]  # pixel (1,1) moved by at most 1
    assert set(centre) <= {0, 1, 2, 4, 5, 6, 8, 9, 10} and len(set(centre)) > 1


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_targets_sum_to_one(mixup, cutmix):
    x = _batch().float() / 255
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for seed in range(5):
        xm, t = mix_batch(x, y, 4, mixup, cutmix, torch.Generator().manual_seed(seed))
        assert xm.shape == x.shape and t.shape == (8, 4)
        assert torch.allclose(t.sum(1), torch.ones(8))


def test_mean_std_and_normalize():
    x = _batch(b=10)
    mean, std = compute_mean_std(x)
    z = normalize(x, mean, std)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    assert torch.equal(normalize(x.float() / 255, mean, std), z)  # uint8 and 0..1 floats alike
