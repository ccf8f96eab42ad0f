"""Batched augmentation and the Batches loader: shapes, dtypes, determinism."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from imgcls.data.augment import build_augment, mix_batch, random_crop
from imgcls.data.loader import Batches, compute_mean_std, load_files, make_preprocessing
from imgcls.recipe import AugmentSpec, DataSpec

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


def test_batches_shuffle_normalise_and_mix():
    x = _batch(b=10)
    y = torch.arange(10) % 3
    mean, std = compute_mean_std(x)
    batches = Batches(x, y, 4, mean=mean, std=std, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 3
    got = list(batches)
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in got]).tolist()) == sorted(y.tolist())
    xs = torch.cat([b[0] for b in got])
    assert abs(xs.mean()) < 0.05 and abs(xs.std() - 1) < 0.05
    assert len(Batches(x, y, 4, mean=mean, std=std, drop_last=True)) == 2
    aug = build_augment(AugmentSpec(hflip=True), (12, 16))
    mixed = Batches(
        x, y, 5, mean=mean, std=std, augment=aug, num_classes=3, mixup_alpha=0.2, channels_last=True
    )
    xb, yb = next(iter(mixed))
    assert yb.shape == (5, 3) and xb.is_contiguous(memory_format=torch.channels_last)


def test_load_files_for_predict(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    pre = make_preprocessing(DataSpec(image_size=8), [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert pre == {
        "image_size": [8, 8],
        "channels": 3,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "resize": "stretch",
    }
    x, ok, failures = load_files([tmp_path / "ok.png", tmp_path / "bad.png"], pre)
    assert x.shape == (1, 3, 8, 8) and [p.name for p in ok] == ["ok.png"]
    assert x[0, 0].min() == 1.0 and x[0, 1].max() == -1.0
    assert failures[0][0].name == "bad.png" and "not a supported image" in failures[0][1]
