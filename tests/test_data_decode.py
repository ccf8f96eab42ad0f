"""decode_image / load_image: formats, modes, EXIF, truncation, bombs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data.decode import DecodeError, decode_image, load_image


def _save(tmp_path, name, im, **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "png"),
        ("RGB", "png"),
        ("RGBA", "png"),
        ("LA", "png"),
        ("P", "png"),
        ("1", "png"),
        ("CMYK", "jpeg"),
        ("I;16", "png"),
        ("I", "tiff"),
        ("F", "tiff"),
        ("RGB", "bmp"),
        ("RGB", "webp"),
        ("L", "ppm"),
        ("RGB", "gif"),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_maps_to_requested_channels(tmp_path, mode, fmt, channels):
    im = Image.new(mode, (7, 5))
    path = _save(tmp_path, f"x.{fmt}", im)
    out = decode_image(path, channels)
    assert out.mode == ("L" if channels == 1 else "RGB")
    assert out.size == (7, 5)


def test_16bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = _save(tmp_path, "deep.png", Image.fromarray(a))
    assert np.asarray(decode_image(path, 1)).tolist() == [[0, 128, 255]]


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    out = np.asarray(decode_image(_save(tmp_path, "a.png", im), 3))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]


def test_palette_transparency_is_composited(tmp_path):
    im = Image.new("P", (2, 1), 0)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    out = np.asarray(decode_image(_save(tmp_path, "p.png", im, transparency=0), 3))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = _save(tmp_path, "phone.jpg", im, exif=exif.tobytes())
    assert decode_image(path, 3).size == (20, 40)


def test_truncated_file_is_an_error_naming_it(tmp_path):
    path = _save(tmp_path, "cut.png", Image.effect_noise((64, 64), 50).convert("RGB"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="cut.png"):
        decode_image(path, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path, "big.png", Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(DecodeError, match="big.png: refused.*decompression-bomb"):
        decode_image(path, 1)  # Pillow only warns here; we refuse
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # > 2x: Pillow raises itself
    with pytest.raises(DecodeError, match="big.png"):
        decode_image(path, 1)


def test_format_outside_allowlist_is_refused(tmp_path):
    path = _save(tmp_path, "x.ico", Image.new("RGB", (16, 16)), format="ICO")
    with pytest.raises(DecodeError, match=r"x\.ico: not a supported image"):
        decode_image(path, 3)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DecodeError, match="junk.png"):
        decode_image(junk, 3)
    with pytest.raises(DecodeError, match="no such file"):
        decode_image(tmp_path / "missing.png", 3)


@pytest.mark.parametrize("resize", ["stretch", "center_crop", "pad"])
def test_load_image_shape_and_dtype(tmp_path, resize):
    path = _save(tmp_path, "wide.png", Image.new("RGB", (60, 20), (255, 255, 255)))
    t = load_image(path, 3, (16, 24), resize)
    assert t.dtype == torch.uint8 and t.shape == (3, 16, 24)
    if resize == "pad":  # 60x20 -> 24x8 centred: black bars top and bottom
        assert t[:, 0].max() == 0 and t[:, 8].min() == 255
    else:
        assert t.min() == 255
    assert load_image(path, 1, (8, 8), resize).shape == (1, 8, 8)


def test_center_crop_keeps_the_centre(tmp_path):
    im = Image.new("L", (30, 10), 0)
    im.paste(255, (10, 0, 20, 10))  # white centre square, black sides
    t = load_image(_save(tmp_path, "c.png", im), 1, (10, 10), "center_crop")
    assert t.float().mean() > 250


def test_large_jpeg_decodes_at_a_reduced_scale_without_visible_change(tmp_path):
    import numpy as np
    from PIL import Image

    from imgcls.data.decode import decode_image, image_to_tensor, load_image, resize_image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 1600)[None, :, None]
    Image.fromarray((rng.random((1200, 1600, 3)) * 40 + ramp).astype(np.uint8)).save(
        tmp_path / "big.jpg", quality=90
    )
    small = decode_image(tmp_path / "big.jpg", 3, min_side=100)
    assert small.size == (200, 150)  # 1/8 scale: both sides still >= 100
    fast = load_image(tmp_path / "big.jpg", 3, (100, 100), "center_crop").float()
    full = image_to_tensor(
        resize_image(decode_image(tmp_path / "big.jpg", 3), (100, 100), "center_crop")
    ).float()
    assert (fast - full).abs().mean() < 2.0  # out of 255
