"""The one safe way to turn an image file into pixels.

Train, evaluate and predict all call :func:`decode_image` / :func:`load_image`,
so a photo is seen identically everywhere. The rules:

- only regular files are images (:func:`open_image_file`): a FIFO, a device
  such as ``/dev/zero`` or a socket, even behind a symlink, is refused before
  a byte is read, and no open can block; a file larger than any image within
  the decompression-bomb limit can hold (:func:`max_file_bytes`) is refused
  unread;
- only the formats in :data:`FORMATS` are opened (Pillow's sniffing of dozens
  of exotic formats is a needless attack surface);
- Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is kept, and
  tripping it is an error, not a warning;
- truncated files are an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left
  False and ``load()`` is called while the file is open);
- EXIF orientation is applied, so a portrait phone photo stays portrait;
- every Pillow mode maps to the requested channels: alpha is composited on
  white, 16-bit and 32-bit images are scaled to 8 bits (not clipped), palette
  transparency is honoured.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgcls.errors import DataError

if TYPE_CHECKING:  # torch is imported where tensors are made: decode worker
    import torch  # processes import this module and need only PIL and numpy

# Pillow warns (DecompressionBombWarning) inside Image.open for images between
# MAX_IMAGE_PIXELS and twice that, and the warning would reach the terminal
# before our own one-line error. A module-level filter turns it into an
# exception for the whole process: unlike warnings.catch_warnings it is set
# once, at import, so it is safe with decode threads (and decode worker
# processes import this module, so they get it too).
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Pillow format names; PPM covers PBM/PGM/PPM/PNM.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# File extensions a folder scan treats as images (anything else is ignored).
IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm".split()
)

Resize = Literal["stretch", "center_crop", "pad"]
# Formats whose EXIF block, when there is one, Pillow puts in ``info["exif"]``.
_EXIF_IN_INFO = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "PPM"})
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


class DecodeError(DataError):
    """An image file that cannot be decoded: ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def decode_image(path: str | os.PathLike, channels: int, min_side: int | None = None) -> Image.Image:
    """Decode ``path`` to a PIL image of mode ``L`` (channels=1) or ``RGB`` (3).

    ``min_side``: the caller will shrink the image so no side needs more than
    this; a JPEG is then decoded at the smallest 1/2, 1/4 or 1/8 scale that
    keeps both sides at least that large (libjpeg's DCT scaling: a 12 MP
    photo wanted at 224 px decodes several times faster).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    try:
        with open_image_file(path) as fh:
            return _decode_open(fh, path, channels, min_side)
    except FileNotFoundError:
        raise DecodeError(path, "no such file") from None
    except IsADirectoryError:
        raise DecodeError(path, "is a folder, not an image") from None


def decode_bytes(
    data: bytes, channels: int, min_side: int | None = None, name: str = "upload"
) -> Image.Image:
    """:func:`decode_image` on bytes already in memory (an HTTP upload): the same
    format allowlist, size cap, bomb limit, truncation check and mode mapping,
    and no file is opened or written. ``name`` is only the label in errors."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if not data:
        raise DecodeError(name, "empty, no image data")
    cap = max_file_bytes()
    if cap is not None and len(data) > cap:
        raise DecodeError(
            name, f"refused, {len(data)} bytes is more than an image within the bomb limit can hold"
        )
    return _decode_open(io.BytesIO(data), name, channels, min_side)


def _decode_open(fh: BinaryIO, path: str | os.PathLike, channels: int, min_side: int | None) -> Image.Image:
    """Decode the open image ``fh`` (``path`` names it in errors)."""
    try:
        # Above MAX_IMAGE_PIXELS Pillow warns (an error here: see the filter
        # at the top) and above twice that raises; _check_pixels covers
        # images Pillow sizes only after opening.
        with Image.open(fh, formats=FORMATS) as im:
            _check_pixels(path, im.size)
            if min_side and im.format == "JPEG":
                im.draft(im.mode, (min_side, min_side))
            im.load()  # truncated data raises here (OSError)
            # Orientation lives in EXIF ("exif" in info once loaded) or, for
            # TIFF, in the image's own tags; skipping the EXIF parse for the
            # images that have none makes small-image decoding ~10% faster.
            if "exif" in im.info or im.format not in _EXIF_IN_INFO:
                image = ImageOps.exif_transpose(im)
            else:
                image = im
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(path, f"not a supported image (formats: {', '.join(FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(path, f"refused, too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncation and corrupt data as OSError / SyntaxError.
        raise DecodeError(path, f"cannot decode: {exc}") from None
    return _to_channels(image, channels, path)


# The widest pixel a supported format stores uncompressed: 16-bit RGBA.
_MAX_BYTES_PER_PIXEL = 8
# Room for what a file may hold besides pixels (EXIF, ICC profiles, XMP).
_MAX_EXTRA_BYTES = 64 << 20
_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def max_file_bytes() -> int | None:
    """The most bytes an image file may have: every pixel within Pillow's
    decompression-bomb limit stored uncompressed at the widest pixel, plus room
    for metadata (None when the limit is off)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit * _MAX_BYTES_PER_PIXEL + _MAX_EXTRA_BYTES if limit else None


def open_image_file(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file of at most
    :func:`max_file_bytes`, else raise :class:`DecodeError` saying what it is.

    Only regular files are images. The path is stat'ed (following links)
    before it is opened, and opened with ``O_NONBLOCK``, so a FIFO swapped in
    between cannot block either; the open file is checked again (``fstat``), so
    what is read is what was checked.
    """
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DecodeError(path, "no such file") from None
    except OSError as exc:
        raise DecodeError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        _check_regular(path, os.fstat(fd))
        return os.fdopen(fd, "rb")  # O_NONBLOCK means nothing for a regular file's reads
    except BaseException:
        os.close(fd)
        raise


def _check_regular(path: str | os.PathLike, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "an unknown kind of file")
        if kind == "a folder":
            raise DecodeError(path, "is a folder, not an image")
        link = f", via a link to {os.path.realpath(path)}" if os.path.islink(path) else ""
        raise DecodeError(path, f"not a regular file but {kind}{link}; only regular files are read as images")
    cap = max_file_bytes()
    if cap is not None and st.st_size > cap:
        raise DecodeError(
            path,
            f"refused, {st.st_size} bytes is more than an image within Pillow's decompression-bomb "
            f"limit of {Image.MAX_IMAGE_PIXELS} pixels can hold ({cap} bytes)",
        )


def _check_pixels(path: str | os.PathLike, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise DecodeError(
            path,
            f"refused, {size[0]}x{size[1]} exceeds Pillow's decompression-bomb limit of {limit} pixels",
        )


def _to_channels(im: Image.Image, channels: int, path: str | os.PathLike) -> Image.Image:
    mode = im.mode
    if mode == "P":
        # Palette transparency is an alpha channel in disguise.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        im = Image.fromarray(_scale_to_uint8(np.asarray(im), mode))
    elif mode == "1":
        im = im.convert("L")
    elif mode not in ("L", "RGB") and mode not in _ALPHA_MODES:
        try:
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
        except ValueError as exc:
            raise DecodeError(path, f"unsupported pixel mode {mode}: {exc}") from None

    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")

    want = "L" if channels == 1 else "RGB"
    return im if im.mode == want else im.convert(want)


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map 16/32-bit integer and float pixels onto 0..255 without clipping.

    ``I;16*`` is 0..65535. ``I`` (32-bit) is read as 8-bit when its values fit,
    16-bit when they fit in 16 bits (how Pillow opens many 16-bit PNG/TIFF),
    else scaled by its maximum. ``F`` in 0..1 is scaled by 255, otherwise like I.
    """
    a = a.astype(np.float64)
    a = np.maximum(a, 0)
    top = float(a.max()) if a.size else 0.0
    if mode.startswith("I;16"):
        scale = 65535.0
    elif mode == "F" and top <= 1.0:
        scale = 1.0
    elif top <= 255:
        scale = 255.0
    elif top <= 65535:
        scale = 65535.0
    else:
        scale = top
    return np.rint(a * (255.0 / scale)).clip(0, 255).astype(np.uint8)


def resize_image(im: Image.Image, size: tuple[int, int], resize: Resize) -> Image.Image:
    """Resize a decoded image to ``size`` = (h, w) with the recipe's policy.

    stretch: plain resize (aspect ratio not kept); center_crop: scale the shorter
    side to fit, then crop the centre; pad: scale the longer side to fit, then
    letterbox on black. Bilinear; Pillow antialiases when shrinking.
    """
    h, w = size
    src_w, src_h = im.size
    bilinear = Image.Resampling.BILINEAR
    if resize == "stretch" or (src_w * h == src_h * w):
        return im if im.size == (w, h) else im.resize((w, h), bilinear)
    if resize == "center_crop":
        # Resize straight from the centre box: one resampling step.
        if src_w * h > src_h * w:  # too wide
            crop_w = src_h * w / h
            box = ((src_w - crop_w) / 2, 0.0, (src_w + crop_w) / 2, float(src_h))
        else:
            crop_h = src_w * h / w
            box = (0.0, (src_h - crop_h) / 2, float(src_w), (src_h + crop_h) / 2)
        return im.resize((w, h), bilinear, box=box)
    if resize == "pad":
        scale = min(h / src_h, w / src_w)
        new_w = max(1, min(w, round(src_w * scale)))
        new_h = max(1, min(h, round(src_h * scale)))
        canvas = Image.new(im.mode, (w, h), 0)
        canvas.paste(im.resize((new_w, new_h), bilinear), ((w - new_w) // 2, (h - new_h) // 2))
        return canvas
    raise ValueError(f"unknown resize policy {resize!r}")


def load_image(path: str | os.PathLike, channels: int, size: tuple[int, int], resize: Resize) -> torch.Tensor:
    """Decode and resize ``path`` to a uint8 tensor of shape (C, H, W)."""
    im = resize_image(decode_image(path, channels, min_side=max(size)), size, resize)
    return image_to_tensor(im)


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    import torch

    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy())  # copy: writable, contiguous


def decode_row(
    path: str | os.PathLike, out: np.ndarray, channels: int, size: tuple[int, int], resize: Resize
) -> None:
    """:func:`load_image` written straight into ``out`` (uint8, shape (C, H, W)):
    the same pixels, one copy fewer, and no torch (decode workers use it)."""
    a = np.asarray(resize_image(decode_image(path, channels, min_side=max(size)), size, resize))
    out[...] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_rows(
    paths: Sequence[str | os.PathLike], out: np.ndarray, channels: int, size: tuple[int, int], resize: Resize
) -> list[tuple[int, str]]:
    """Decode ``paths[i]`` into ``out[i]`` (uint8, (N, C, H, W)); return the
    ``(i, reason)`` that failed (their rows are left as they were).

    The same pixels as :func:`decode_row`, faster for many small images: each
    image gives its raw bytes (``tobytes``: one C copy; ``np.asarray`` costs
    ~1.5x that in Python), and the chunk is moved from HWC to CHW in one
    numpy operation instead of one per image.
    """
    h, w = size
    target = (w, h)
    min_side = max(size)
    failures: list[tuple[int, str]] = []
    ok: list[int] = []
    data: list[bytes] = []
    for i, path in enumerate(paths):
        try:
            im = decode_image(path, channels, min_side=min_side)
            if im.size != target:
                im = resize_image(im, size, resize)
            data.append(_raw_bytes(im))
        except DecodeError as exc:
            failures.append((i, exc.reason))
            continue
        ok.append(i)
    if ok:
        rows = np.frombuffer(b"".join(data), dtype=np.uint8).reshape(len(ok), h, w, channels)
        rows = rows.transpose(0, 3, 1, 2)
        if len(ok) == len(paths):
            out[...] = rows
        elif len(ok) == ok[-1] - ok[0] + 1:
            out[ok[0] : ok[-1] + 1] = rows
        else:
            out[np.array(ok)] = rows
    return failures


def _raw_bytes(im: Image.Image) -> bytes:
    """``im.tobytes()`` for an L or RGB image, about twice as fast for small
    images: ``tobytes`` asks the raw encoder for 64 KiB blocks (allocating
    one even for a 3 KiB image); this asks for exactly the image's size."""
    w, h = im.size
    try:
        encoder = Image._getencoder(im.mode, "raw", im.mode)
        encoder.setimage(im.im, (0, 0, w, h))
        _, status, data = encoder.encode(w * h * len(im.mode))
    except (AttributeError, TypeError):  # a Pillow without these internals
        return im.tobytes()
    return data if status == 1 else im.tobytes()  # 1: all of it in one block


def channel_sums(rows: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(2, C) int64: per channel, the exact sum and sum of squares of uint8
    rows (N, C, H, W). Zero rows (failed files) add nothing.

    float64 dot products (BLAS: ~2x faster than uint16 squares summed as
    int64) are exact here: every partial sum is an integer below 2**52,
    which the chunk size guarantees."""
    n, c = rows.shape[:2]
    pixels = max(1, int(np.prod(rows.shape[2:])))
    chunk = max(1, min(chunk, 2**52 // (pixels * 255 * 255)))
    out = np.zeros((2, c), dtype=np.int64)
    for a in range(0, n, chunk):
        part = np.asarray(rows[a : a + chunk]).transpose(1, 0, 2, 3).reshape(c, -1).astype(np.float64)
        out[0] += part.sum(axis=1).astype(np.int64)
        out[1] += np.einsum("ij,ij->i", part, part).astype(np.int64)
    return out


# One open descriptor per cache file, per worker process (a chunk's rows are
# written with one pwrite: no array is sent back to the parent).
_FILES: dict[str, int] = {}


def decode_chunk(task: tuple) -> tuple[int, bytes, list[tuple[int, str]], np.ndarray]:
    """Process-pool entry: ``(start, paths, channels, (h, w), resize, target)``
    -> ``(start, rows as bytes or b"", chunk-relative failures, channel sums)``.

    ``target``: None (the rows come back as bytes) or ``(file, offset)``: the
    rows are written into ``file`` at ``offset`` (a cache being built, which
    the parent maps) and nothing comes back but failures and sums."""
    start, paths, channels, size, resize, target = task
    rows = np.zeros((len(paths), channels, *size), dtype=np.uint8)
    failures = decode_rows(paths, rows, channels, size, resize)
    sums = channel_sums(rows)
    if target is None:
        return start, rows.tobytes(), failures, sums
    name, offset = target
    fd = _FILES.get(name)
    if fd is None:
        fd = _FILES[name] = os.open(name, os.O_WRONLY)
    data = rows.data.cast("B")
    done = 0
    while done < len(data):  # pwrite may write less than asked
        done += os.pwrite(fd, data[done:], offset + done)
    return start, b"", failures, sums


def decode_workers() -> int:
    """Cores this process may run on (``sched_getaffinity`` respects taskset
    and container CPU sets, ``cpu_count`` does not)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
