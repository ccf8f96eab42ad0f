"""Request bodies: read with a size cap and a deadline, split into images, in memory only.

Starlette's own form parsing spools files over 1 MB to a temporary file; a
server that promises to write nothing to disk parses multipart itself, from
the capped body already in memory, with python-multipart's streaming parser.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

MAX_FILES = 64  # files in one multipart request


class BadUpload(Exception):
    """A request whose body is refused: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _megabytes(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 100_000 else f"{n} bytes"


async def read_body(request, limit: int, timeout: float) -> bytes:
    """The whole body, refused (413) past ``limit`` bytes, before reading it when the
    client says its length, or as soon as it passes; 408 when it takes over ``timeout`` s."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadUpload(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise BadUpload(
                413, f"upload of {_megabytes(int(declared))} is over the limit of {_megabytes(limit)}"
            )
    chunks: list[bytes] = []
    total = 0

    async def gather() -> None:
        nonlocal total
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise BadUpload(413, f"upload is over the limit of {_megabytes(limit)}")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), timeout)
    except TimeoutError:
        raise BadUpload(408, f"the request body took over {timeout:g} s to arrive") from None
    return b"".join(chunks)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    data: list[bytes] = field(default_factory=list)


def _disposition(value: bytes) -> tuple[str | None, str | None]:
    """(name, filename) of a part's Content-Disposition."""
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(value)
    if kind != b"form-data":
        return None, None

    def text(key: bytes) -> str | None:
        raw = params.get(key)
        return None if raw is None else raw.decode("utf-8", "replace")

    return text(b"name"), text(b"filename")


def multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file part in a multipart/form-data ``body``, in order.

    Fields without a file name are ignored. Raises :class:`BadUpload`: 400 for a
    malformed body or one without files, 413 past :data:`MAX_FILES`."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadUpload(400, "multipart/form-data without a boundary")
    parts: list[_Part] = []
    header: dict[str, bytes] = {}
    ended = [0]

    def on_part_begin() -> None:
        if len(parts) >= MAX_FILES * 2:
            raise BadUpload(413, f"too many parts (at most {MAX_FILES} files a request)")
        parts.append(_Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1].headers[header.get("field", b"").decode("latin-1").lower()] = header.get("value", b"")
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.append(data[start:end])

    def on_part_end() -> None:
        ended[0] += 1

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadUpload(400, f"malformed multipart body: {exc}") from None
    files = []
    for part in parts[: ended[0]]:  # a part cut off before its boundary is not a file
        _, filename = _disposition(part.headers.get("content-disposition", b""))
        if filename is not None:
            files.append((filename, b"".join(part.data)))
    if not files:
        raise BadUpload(400, "no files in the multipart form (send them as -F file=@photo.jpg)")
    if len(files) > MAX_FILES:
        raise BadUpload(413, f"{len(files)} files in one request; at most {MAX_FILES}")
    return files
