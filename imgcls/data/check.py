"""``imgcls data check``: lint a dataset before training on it. Read-only.

What is checked, and the rules (documented in the README):

- counts per class and split; a split is *imbalanced* when its largest class
  has more than :data:`IMBALANCE` times the images of its smallest;
- unreadable files, decoded by the one decode path (:func:`decode_image`),
  with its reason;
- exact duplicates (same SHA-256 of the bytes) and near duplicates
  (perceptual hash: the 10x10 lowest DCT frequencies of a 32x32 grey
  thumbnail, each above or below their median: 100 bits; two images are near
  duplicates at Hamming distance <= :data:`NEAR_DISTANCE`. Measured on 300
  built-in shapes: a JPEG re-save or a 2x resize moved 0-4 bits, two
  different images differed in 14 or more; the classic 8x8 (64-bit) hash
  put different shapes on similar backgrounds 4 bits apart, and 16x16 bits
  are noise on images smaller than 32 px). The hash is grey, so near
  duplicates must also agree in colour: their 4x4 RGB thumbnails may differ
  by at most :data:`NEAR_COLOUR` on average. On 20,000 shapes, the hash alone
  paired 1,107 same-place, different-colour shapes; with the mean colour
  gate 12 remained, with the 4x4 gate one: two rings that do look alike). Each group is
  classed as within one class (*duplicate*), across classes (*conflicting
  labels*) or across splits (*leakage*);
- size, aspect ratio and pixel mode: a side under :data:`TINY` px or below a
  quarter / above 4x the median side, an aspect ratio more than 2x off the
  median, and modes that lose information on the way to 8-bit RGB/grey
  (16/32-bit, float, CMYK, bi-level) are outliers;
- with a model (``--model RUN``): likely label errors by the confident-learning
  rule: an image labelled *i* is flagged when, for some other class *j*, the
  model's probability of *j* is at least *t_j*, the mean probability the model
  gives *j* over the images labelled *j* (Northcutt et al., "Confident
  Learning", 2021: the off-diagonal of the confident joint), the model also
  prefers *j* to *i*, and *j* is the most probable such class.

Hashes are computed once per file on a thread pool and cached by (path,
size, mtime) in ``<cache root>/check/`` — never inside the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.data.decode import FORMATS, DecodeError, decode_image, max_file_bytes, open_image_file
from imgcls.data.shapes import cache_root
from imgcls.data.sources import SPLITS, Links, read_labelled_rows, walk_images
from imgcls.errors import DataError
from imgcls.text import one_line, shown

IMBALANCE = 3.0
NEAR_DISTANCE = 8  # of 100 bits
NEAR_COLOUR = 12  # mean |difference| of the 4x4 RGB thumbnails of near duplicates (0..255)
TINY = 8
LOSSY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "CMYK", "1"}
CACHE_VERSION = 6
Log = Callable[[str], None]


@dataclass
class Item:
    path: Path
    label: str
    split: str


@dataclass
class CheckResult:
    root: str
    counts: dict[str, dict[str, int]]  # split -> class -> n
    files: int
    seconds: float = 0.0
    problems: dict[str, list] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not any(self.problems.values())

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "files_per_s": round(self.files / self.seconds, 1) if self.seconds else None,
            "counts": self.counts,
            "clean": self.clean,
            "rules": {
                "imbalance_ratio": IMBALANCE,
                "near_duplicate_distance": NEAR_DISTANCE,
                "near_duplicate_colour": NEAR_COLOUR,
                "tiny_side_px": TINY,
            },
            "problems": self.problems,
        }


# --------------------------------------------------------------------------- listing


def list_items(path: Path, links: Links | None = None) -> list[Item]:
    """Every image of a folder tree (flat, or train/val/test) or a CSV, with its label and split.

    Each real file once, under the class and split of its real path, as training
    lists them; symbolic links leading back into the tree go to ``links``."""
    if path.is_file() and path.suffix.lower() == ".csv":
        rows = read_labelled_rows(path, must_exist=False)
        return [Item(r.path, r.label or "(no label)", r.split or "train") for r in rows]
    if not path.is_dir():
        raise DataError(f"{path}: no such folder or CSV file")
    splits = [s for s in (*SPLITS, "valid", "validation") if (path / s).is_dir()]
    roots = [(path / s, "val" if s in ("valid", "validation") else s) for s in splits] or [(path, "all")]
    items: list[Item] = []
    walk: dict[str, Any] = dict(within=os.path.realpath(path), seen=set(), links=links)
    for root, split in roots:
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            items.extend(Item(Path(f), d.name, split) for f in walk_images(d, **walk))
    if not items:
        raise DataError(f"{path}: no images in class folders (expected PATH/<class>/<image>)")
    return items


# --------------------------------------------------------------------------- per file


_N = 32
_K = np.arange(_N)
_DCT = np.cos(np.pi * (2 * _K[None, :] + 1) * _K[:, None] / (2 * _N))


def phash(grey: np.ndarray) -> str:
    """100-bit DCT perceptual hash of a 32x32 float grey thumbnail, as 32 hex digits (128 bits, zero-padded)."""
    low = (_DCT @ grey @ _DCT.T)[:10, :10].flatten()
    bits = np.zeros(128, dtype=bool)
    bits[:100] = low > np.median(low[1:])
    bits[0] = False  # the DC term says only how bright the image is
    return np.packbits(bits).tobytes().hex()


def file_facts(path: Path) -> dict:
    """Hashes, size and mode of one file, or its decode error."""
    from PIL import Image

    digest = hashlib.sha256()
    try:
        # the decoder's guard: a regular file within the size cap, never a FIFO or a device
        with open_image_file(path) as fh:
            cap, seen = max_file_bytes(), 0
            while block := fh.read(1 << 20):
                digest.update(block)
                seen += len(block)
                if cap is not None and seen > cap:  # it grew after it was checked
                    return {"error": f"refused, grew past {cap} bytes while being read"}
    except DecodeError as exc:
        return {"error": exc.reason}
    except OSError as exc:
        return {"error": f"cannot read: {exc.strerror or exc}"}
    facts: dict = {"sha256": digest.hexdigest()}
    try:
        image = decode_image(path, 3)  # the one decode path: its reasons, its format allowlist
        # the header again, for the file's own mode
        with open_image_file(path) as fh, Image.open(fh, formats=FORMATS) as im:
            facts["mode"] = im.mode
    except DecodeError as exc:
        return {**facts, "error": exc.reason}
    except Exception as exc:  # decoded once, so this is not expected; still a per-file finding
        return {**facts, "error": f"cannot read the header: {exc}"}
    facts["width"], facts["height"] = image.size
    facts["rgb4"] = np.asarray(image.resize((4, 4), Image.Resampling.BOX)).flatten().tolist()
    image = image.convert("L")
    shrink = image.size[0] >= 32 and image.size[1] >= 32
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    thumb = np.asarray(image.resize((32, 32), resample), dtype=np.float64)
    facts["phash"] = phash(thumb)
    return facts


def _cache_file(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_root() / "check" / f"{key}.json"


def gather_facts(items: list[Item], root: Path, threads: int | None = None) -> list[dict]:
    """Facts per item: from the cache when path, size and mtime match, else computed in parallel."""
    from imgcls.io import write_text_atomic

    cache_path = _cache_file(root)
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache["files"] if cache.get("version") == CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, AttributeError):
        cache = {}
    keys: list[str | None] = []
    for item in items:
        try:
            st = item.path.stat()
            keys.append(f"{item.path}\0{st.st_size}\0{st.st_mtime_ns}")
        except OSError:
            keys.append(None)
    todo = sorted({k for k in keys if k is not None and k not in cache})
    with ThreadPoolExecutor(threads or min(32, (os.cpu_count() or 1) + 2)) as pool:
        for key, facts in zip(
            todo, pool.map(lambda k: file_facts(Path(k.split("\0")[0])), todo), strict=True
        ):
            cache[key] = facts
    if todo:
        try:
            write_text_atomic(cache_path, json.dumps({"version": CACHE_VERSION, "files": cache}))
        except OSError:
            pass  # a read-only cache costs speed next time, not correctness
    return [cache[k] if k is not None else {"error": "no such file"} for k in keys]


# --------------------------------------------------------------------------- checks


def _group_kind(members: list[Item]) -> str:
    if len({m.split for m in members}) > 1:
        return "leakage"
    if len({m.label for m in members}) > 1:
        return "conflicting_labels"
    return "duplicate"


def _describe(members: list[Item]) -> dict:
    return {
        "kind": _group_kind(members),
        "files": [{"file": str(m.path), "label": m.label, "split": m.split} for m in members],
    }


def near_pairs(hashes: np.ndarray, distance: int, chunk: int = 512) -> list[tuple[int, int, int]]:
    """(i, j, d) for i < j with Hamming distance d <= ``distance``; ``hashes`` is (N, words)
    uint64; brute force in numpy chunks (20,000 images: 200 M pairs)."""
    out = []
    h = hashes
    for start in range(0, len(h), chunk):
        block = h[start : start + chunk]
        d = np.zeros((len(block), len(h)), dtype=np.int32)
        for w in range(h.shape[1]):
            d += np.bitwise_count(block[:, None, w] ^ h[None, :, w])
        ii, jj = np.nonzero(d <= distance)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            if start + i < j:
                out.append((start + i, j, int(d[i, j])))
    return out


def check_dataset(
    path: str | os.PathLike, *, model=None, threads: int | None = None, log: Log = lambda m: None
) -> CheckResult:
    """Lint ``path`` (folder tree or CSV). ``model``: a loaded Checkpoint for label errors."""
    import time

    start = time.perf_counter()
    root = Path(path).expanduser()
    links: Links = []
    items = list_items(root, links)
    log(f"checking {len(items)} files under {root}")
    facts = gather_facts(items, root, threads)

    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for item in items:
        counts[item.split][item.label] = counts[item.split].get(item.label, 0) + 1
    result = CheckResult(str(root), {s: dict(sorted(c.items())) for s, c in counts.items()}, len(items))
    p = result.problems

    p["imbalance"] = []
    for split, by_class in result.counts.items():
        big, small = max(by_class.values()), min(by_class.values())
        if small * IMBALANCE < big:
            p["imbalance"].append(
                {
                    "split": split,
                    "largest": max(by_class, key=by_class.__getitem__),
                    "smallest": min(by_class, key=by_class.__getitem__),
                    "ratio": round(big / small, 2),
                }  # fmt: skip
            )
    all_classes = set().union(*(c.keys() for c in result.counts.values()))
    p["missing_classes"] = [
        {"split": s, "classes": sorted(all_classes - set(c))}
        for s, c in result.counts.items()
        if all_classes - set(c)
    ]

    p["unreadable"] = [
        {"file": str(i.path), "error": f["error"]} for i, f in zip(items, facts, strict=True) if "error" in f
    ]
    good = [(i, f) for i, f in zip(items, facts, strict=True) if "error" not in f]

    by_sha: dict[str, list[int]] = defaultdict(list)
    for n, (_, f) in enumerate(good):
        by_sha[f["sha256"]].append(n)
    p["exact_duplicates"] = [_describe([good[n][0] for n in g]) for g in by_sha.values() if len(g) > 1]

    # near duplicates: union-find over close pairs whose bytes differ
    parent = list(range(len(good)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if good:
        hashes = np.frombuffer(b"".join(bytes.fromhex(f["phash"]) for _, f in good), dtype=">u8")
        hashes = hashes.astype(np.uint64).reshape(len(good), -1)
        for i, j, _ in near_pairs(hashes, NEAR_DISTANCE):
            fi, fj = good[i][1], good[j][1]
            colour = np.abs(np.subtract(fi["rgb4"], fj["rgb4"])).mean()
            if fi["sha256"] != fj["sha256"] and colour <= NEAR_COLOUR:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for n in range(len(good)):
        groups[find(n)].append(n)
    p["near_duplicates"] = [_describe([good[n][0] for n in g]) for g in groups.values() if len(g) > 1]

    p["outliers"] = _outliers(good)
    # a link back into the data set: training counts its target once, where it really is
    p["links_into_dataset"] = [{"file": link, "target": target} for link, target in links]
    if model is not None:
        p["label_errors"] = label_errors(model, good, log)
    result.seconds = time.perf_counter() - start
    return result


def _outliers(good: list[tuple[Item, dict]]) -> list[dict]:
    if not good:
        return []
    widths = np.array([f["width"] for _, f in good], dtype=np.float64)
    heights = np.array([f["height"] for _, f in good], dtype=np.float64)
    mw, mh = np.median(widths), np.median(heights)
    aspect = np.log(widths / heights)
    ma = np.median(aspect)
    out = []
    for n, (item, f) in enumerate(good):
        reasons = []
        w, h = f["width"], f["height"]
        if min(w, h) < TINY:
            reasons.append(f"tiny ({w}x{h})")
        elif w < mw / 4 or h < mh / 4:
            reasons.append(f"small ({w}x{h}; median {mw:.0f}x{mh:.0f})")
        if w > mw * 4 or h > mh * 4:
            reasons.append(f"large ({w}x{h}; median {mw:.0f}x{mh:.0f})")
        if abs(aspect[n] - ma) > np.log(2):
            reasons.append(f"aspect ratio {w / h:.2f} (median {np.exp(ma):.2f})")
        if f["mode"] in LOSSY_MODES:
            reasons.append(f"mode {f['mode']} (converted to 8 bits on decode)")
        if reasons:
            out.append({"file": str(item.path), "label": item.label, "reasons": reasons})
    return out


def label_errors(ckpt, good: list[tuple[Item, dict]], log: Log) -> list[dict]:
    """The confident-learning rule of the module docstring, on the model's probabilities."""
    import torch

    from imgcls.calibration import probabilities
    from imgcls.data.decode import load_image
    from imgcls.forward import tensor_logits
    from imgcls.metadata import temperature_of

    classes = ckpt.classes
    index = {c: i for i, c in enumerate(classes)}
    known = [(item, index[item.label]) for item, _ in good if item.label in index]
    if len(known) < len(good):
        log(f"label errors: {len(good) - len(known)} images have classes the model does not know; not judged")
    if not known:
        return []
    pre = ckpt.preprocessing
    size = tuple(pre["image_size"])
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        pixels = list(
            pool.map(lambda it: load_image(it[0].path, pre["channels"], size, pre["resize"]), known)
        )
    x = torch.stack(pixels)
    temperature = temperature_of(ckpt.meta)  # the calibrated probabilities, as predict shows them
    probs = torch.cat(
        [
            probabilities(s, False, temperature)
            for _, s in tensor_logits(ckpt.model, x, pre["mean"], pre["std"], batch_size=256)
        ]
    )
    given = torch.tensor([label for _, label in known])
    thresholds = torch.full((len(classes),), float("inf"))
    for c in range(len(classes)):
        mine = given == c
        if mine.any():
            thresholds[c] = probs[mine, c].mean()
    confident = probs >= thresholds[None, :] - 1e-6  # the mean of equal floats may round up
    confident &= probs > probs[torch.arange(len(given)), given][:, None]  # also preferred to the label
    out = []
    for n in torch.nonzero(confident.any(1)).flatten().tolist():
        p = torch.where(confident[n], probs[n], torch.zeros_like(probs[n]))
        j = int(p.argmax())
        item, label = known[n]
        out.append(
            {
                "file": str(item.path),
                "label": item.label,
                "suggested": classes[j],
                "p_suggested": round(float(probs[n, j]), 4),
                "p_label": round(float(probs[n, label]), 4),
            }
        )
    return sorted(out, key=lambda r: r["p_label"])


def summary_lines(result: CheckResult) -> list[str]:
    """The report for people: counts, then each kind of problem with up to 10 examples.
    One finding is one line: names are shown by :func:`imgcls.text.shown` (a name
    with a newline, a control character or a byte that is not UTF-8 is quoted, escaped)."""
    lines = [f"{shown(result.root)}: {result.files} files in {result.seconds:.1f} s"]
    for split, by_class in result.counts.items():
        lines.append(f"  {shown(split)}: " + ", ".join(f"{shown(c)} {n}" for c, n in by_class.items()))
    names = {
        "imbalance": "imbalanced splits",
        "missing_classes": "classes missing from a split",
        "unreadable": "unreadable files",
        "exact_duplicates": "exact duplicate groups",
        "near_duplicates": f"near-duplicate groups (phash distance <= {NEAR_DISTANCE})",
        "outliers": "size / aspect / mode outliers",
        "links_into_dataset": "symbolic links back into the data set (not followed: each image counts once)",
        "label_errors": "likely label errors",
    }
    for key, found in result.problems.items():
        if not found:
            continue
        kinds = Counter(g["kind"] for g in found if isinstance(g, dict) and "kind" in g)
        extra = f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else ""
        lines.append(f"{names[key]}: {len(found)}{extra}")
        for entry in found[:10]:
            lines.append("  " + _entry_line(key, entry))
        if len(found) > 10:
            lines.append(f"  ... {len(found) - 10} more (--json lists all)")
    lines.append("clean: no problems found" if result.clean else "problems found (exit 3)")
    return lines


def _entry_line(key: str, e: dict) -> str:
    if key == "imbalance":
        return f"{e['split']}: {shown(e['largest'])} has {e['ratio']}x the images of {shown(e['smallest'])}"
    if key == "missing_classes":
        return f"{e['split']}: no {', '.join(shown(c) for c in e['classes'])}"
    if key == "unreadable":
        return f"{shown(e['file'])}: {one_line(e['error'])}"
    if key in ("exact_duplicates", "near_duplicates"):
        return f"{e['kind']}: " + ", ".join(
            f"{shown(f['file'])} ({f['split']}/{shown(f['label'])})" for f in e["files"]
        )
    if key == "links_into_dataset":
        return f"{shown(e['file'])} -> {shown(e['target'])}"
    if key == "outliers":
        return f"{shown(e['file'])}: {'; '.join(e['reasons'])}"
    return (
        f"{shown(e['file'])}: labelled {shown(e['label'])} (p={e['p_label']}), "
        f"model says {shown(e['suggested'])} (p={e['p_suggested']})"
    )
