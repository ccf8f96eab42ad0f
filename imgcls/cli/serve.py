"""`imgcls serve MODEL`: an HTTP server with dynamic batching and a web page."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr
from imgcls.cli.predict import MinConfidence, Score

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """'20MB', '512KiB', '1000000' -> bytes."""
    from imgcls.errors import UsageError

    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(f"--max-upload {text}: give a size such as 20MB, 512KB or 1000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


@command
def serve(
    model: Annotated[
        str, typer.Argument(help="Run folder, .safetensors checkpoint, or exported .onnx/.pt/.ts.")
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 opens the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free port).")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="Most images in one forward pass.")] = 32,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Longest an image waits for others to share its batch (only while more are on the way).",
        ),
    ] = 5.0,
    max_queue: Annotated[
        int,
        typer.Option(min=1, help="Most requests inside the server at once; past it: 503 with Retry-After."),
    ] = 256,
    max_upload: Annotated[str, typer.Option(help="Largest request body (413 past it), e.g. 20MB.")] = "20MB",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="IMGCLS_API_KEY",
            help="Require this key (X-API-Key header, or Authorization: Bearer) on the API; 401 without it. "
            "Better from the IMGCLS_API_KEY variable than on the command line.",
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="Default labels per image (?top_k=).")
    ] = 3,
    tta: Annotated[
        bool, typer.Option("--tta", help="Test-time augmentation, as predict --tta (two forward passes).")
    ] = False,
    read_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds a request's headers, and then its body, may take to arrive (408 / closed past it).",
        ),
    ] = 30.0,
    drain: Annotated[
        float, typer.Option(min=0, help="On SIGTERM / Ctrl-C: seconds to let requests in flight finish.")
    ] = 30.0,
    access_log: Annotated[bool, typer.Option(help="Log each request on stderr.")] = True,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch threads for the model (default: torch's, one per core)."),
    ] = None,
    min_confidence: MinConfidence = None,
    score: Score = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict, a page at /, docs at /docs.

    Requests are batched (up to --max-batch, waiting at most --max-wait-ms);
    one thread runs the model. SIGTERM or Ctrl-C lets the requests in flight
    finish, then exits (0 / 130). Nothing is written to disk.

    Examples:

        imgcls serve runs/quickstart/1

        curl --data-binary @photo.png -H 'Content-Type: image/png' localhost:8000/v1/predict

        curl -F file=@a.png -F file=@b.png 'localhost:8000/v1/predict?top_k=1'
    """
    from imgcls.errors import UsageError
    from imgcls.serve import MISSING_EXTRA, missing_packages

    if missing_packages():
        raise UsageError(f"{MISSING_EXTRA} (missing: {', '.join(missing_packages())})")
    from imgcls.serve.app import ServeOptions
    from imgcls.serve.model import ServedModel
    from imgcls.serve.server import Binding
    from imgcls.serve.server import serve as run_server

    err = stderr()

    def log(message: str) -> None:
        err.print(message, markup=False)

    options = ServeOptions(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        max_upload=parse_size(max_upload),
        api_key=api_key or None,
        top_k=top_k,
        read_timeout=read_timeout,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not options.api_key:
        log(f"warning: --host {host} without --api-key: anyone who can reach this address can use the model")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)  # this process is the server's own: its one model thread
    served = ServedModel.load(model, tta=tta, log=log, min_confidence=min_confidence, score=score)
    run_server(served, options, Binding(host, port, access_log, drain, header_timeout_s=read_timeout), log)
