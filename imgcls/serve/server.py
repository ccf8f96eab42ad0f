"""Run the app with uvicorn: bind, serve, and on SIGTERM or Ctrl-C drain and exit.

uvicorn catches SIGINT and SIGTERM itself: it stops accepting connections,
lets the requests in flight finish (at most ``drain_s`` seconds), shuts the
app down (the batcher answers what it holds) and then raises the signal
again. A SIGTERM then only records that the server was asked to stop (exit
0); a Ctrl-C reaches :mod:`imgcls.interrupts` as KeyboardInterrupt (exit 130).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass

from imgcls.errors import UsageError
from imgcls.serve.app import ServeOptions, create_app
from imgcls.serve.model import ServedModel

Log = Callable[[str], None]


@dataclass
class Binding:
    host: str = "127.0.0.1"
    port: int = 8000
    access_log: bool = True
    drain_s: float = 30.0
    keep_alive_s: float = 5.0


def serve(served: ServedModel, options: ServeOptions, binding: Binding, log: Log) -> None:
    """Serve until SIGTERM (returns) or Ctrl-C (raises KeyboardInterrupt)."""
    import socket

    import uvicorn

    config = uvicorn.Config(
        create_app(served, options),
        host=binding.host,
        port=binding.port,
        access_log=binding.access_log,
        log_level="info" if binding.access_log else "warning",
        timeout_keep_alive=int(binding.keep_alive_s),
        timeout_graceful_shutdown=int(binding.drain_s),
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    family = socket.AF_INET6 if ":" in binding.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((binding.host, binding.port))
        sock.listen(2048)  # connections wait in the backlog from now on, while uvicorn starts
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"--host {binding.host} --port {binding.port}: cannot listen ({exc.strerror or exc})"
        ) from None
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    log(
        f"serving {served.info.name} (version {served.info.version}, {served.info.format}) "
        f"on http://{shown_host}:{port}/  (the page at /, the API docs at /docs; Ctrl-C to stop)"
    )
    terminated = [False]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.__setitem__(0, True))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not server.started and not terminated[0]:
        raise UsageError("the server did not start (see the log above)")
    log("stopped" + (" (SIGTERM): requests in flight were answered" if terminated[0] else ""))
