"""User strings (file, class, study names, paths) shown as data, never as markup or output lines.

One place for the rules every command follows:

- :func:`shown`: a name for a terminal. Printed as is unless it holds
  something that could forge or hide output (a control character such as a
  newline, a line separator, a bidirectional override, a byte that is not
  UTF-8, a backslash or a double quote); then it is printed in double quotes
  with C-style escapes, as ``git`` quotes paths: ``"new\\nline.png"``,
  ``"bad\\xffname.png"``. ``\\xNN`` is always one raw byte, ``\\uNNNN`` one
  Unicode character, so the quoted form names exactly one file.
- :func:`one_line`: free text (an error message) on one line: the same
  escapes, no quotes.
- :func:`cell`: a rich ``Text`` of :func:`shown`, for tables and titles; rich
  reads neither markup (``[bold]``) nor emoji codes (``:cat:``) in it.
- :func:`json_safe`: a value for ``--json`` that strict JSON parsers accept.
  File names come from the OS as bytes; one that is not valid UTF-8 is kept
  by Python as lone surrogates, which are not Unicode. Such a string is
  written with each undecodable byte as the four characters ``\\xNN``
  (:func:`plain`), and, for a value under a key ``K`` of an object, the exact
  name is added as ``K_bytes``: the raw bytes in base64. A valid name is
  written as it is (JSON escapes its control characters itself).
"""

from __future__ import annotations

import base64
import unicodedata

_C_ESCAPES = {"\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}
# bidirectional embeddings, overrides and isolates, and the directional marks: they reorder what follows
_BIDI = set("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSAFE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escaped(ch: str) -> str:
    if ch in _C_ESCAPES:
        return _C_ESCAPES[ch]
    code = ord(ch)
    if code < 0x80:  # the other ASCII controls: one byte
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (Python's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def shown(name: object) -> str:
    """``name`` for a terminal: as is, or quoted with escapes when it holds an unsafe character."""
    name = str(name)
    if not any(ch in '\\"' or _unsafe(ch) for ch in name):
        return name
    body = "".join("\\" + ch if ch in '\\"' else _escaped(ch) if _unsafe(ch) else ch for ch in name)
    return f'"{body}"'


def one_line(text: object) -> str:
    """Free text (a message naming files) on one line: control characters and
    undecodable bytes escaped as in :func:`shown`, nothing quoted."""
    text = str(text)
    if not any(_unsafe(ch) for ch in text):
        return text
    return "".join(_escaped(ch) if _unsafe(ch) else ch for ch in text)


def cell(name: object):
    """A rich ``Text`` of :func:`shown`: no markup, no emoji codes, one line."""
    from rich.text import Text

    return Text(shown(name))


def _raw(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # the bytes the OS gave
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")  # a surrogate from elsewhere: keep it visible


def _valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plain(text: str) -> str:
    """``text`` as valid Unicode: each byte that was not UTF-8 becomes the characters ``\\xNN``."""
    return text if _valid(text) else _raw(text).decode("utf-8", "backslashreplace")


def json_safe(value):
    """``value`` (dicts, lists, strings, numbers) with every string valid Unicode;
    an invalid string under key ``K`` also gets ``K_bytes`` (base64 of its raw bytes)."""
    if isinstance(value, str):
        return plain(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            key = plain(key) if isinstance(key, str) else key
            out[key] = json_safe(item)
            if isinstance(item, str) and not _valid(item):
                out[f"{key}_bytes"] = base64.b64encode(_raw(item)).decode("ascii")
        return out
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value
