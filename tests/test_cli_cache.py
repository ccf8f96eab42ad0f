"""imgcls cache list / clear on a real persistent cache."""

from __future__ import annotations

import json

from PIL import Image

from imgcls.data.cache import load_split
from imgcls.recipe import DataSpec


def _fill_cache(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "root"))
    items = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.new("L", (6, 6), i * 30).save(p)
        items.append((p, i % 2))
    load_split(items, DataSpec(image_size=4, cache="disk"), split="train", source=tmp_path)
    load_split(items, DataSpec(image_size=5, cache="disk"), split="train", source=tmp_path)
    return _names(tmp_path)


def _names(tmp_path) -> list[str]:
    return [e.name for e in (tmp_path / "root" / "decoded").iterdir() if e.name != ".locks"]


def test_cache_list_json_and_table(cli, tmp_path, monkeypatch):
    keys = _fill_cache(tmp_path, monkeypatch)
    r = cli("cache", "list", "--json")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert sorted(e["key"] for e in entries) == sorted(keys)
    assert {e["images"] for e in entries} == {4} and all(e["bytes"] > 0 for e in entries)
    assert {e["source"] for e in entries} == {str(tmp_path)} and {e["split"] for e in entries} == {"train"}
    r = cli("cache", "list")
    assert r.returncode == 0 and keys[0][:12] in r.stdout and "2 entries" in r.stderr  # a key prefix


def test_cache_clear_by_key_and_all(cli, tmp_path, monkeypatch):
    keys = _fill_cache(tmp_path, monkeypatch)
    r = cli("cache", "clear", keys[0][:8])
    assert r.returncode == 0, r.stderr
    assert "removed 1 cache entries" in r.stderr
    assert _names(tmp_path) == [keys[1]]
    r = cli("cache", "clear", "nosuchkey")
    assert r.returncode == 2 and "nosuchkey: no cache entry" in r.stderr
    r = cli("cache", "clear")
    assert r.returncode == 2 and "--all" in r.stderr
    r = cli("cache", "clear", "--all")
    assert r.returncode == 0 and "removed 1 cache entries" in r.stderr
    assert not _names(tmp_path)  # (the entries' lock files stay: see imgcls.data.cache)


def test_cache_clear_keeps_an_entry_a_running_process_uses(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "root"))
    for i in range(4):
        Image.new("L", (6, 6), i * 30).save(tmp_path / f"{i}.png")
    items = [(tmp_path / f"{i}.png", i % 2) for i in range(4)]
    in_use = load_split(items, DataSpec(image_size=4, cache="disk"))  # holds its entry while it lives
    load_split(items, DataSpec(image_size=5, cache="disk"))  # let go at once
    r = cli("cache", "clear", "--all")
    assert r.returncode == 0 and "removed 1 cache entries" in r.stderr, r.stderr
    assert "kept 1 in use by a running process" in r.stderr
    assert in_use.file.exists() and _names(tmp_path) == [in_use.file.parent.name]
