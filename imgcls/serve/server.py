"""Run the app with uvicorn: bind, serve, and on SIGTERM or Ctrl-C drain and exit.

uvicorn catches SIGINT and SIGTERM itself: it stops accepting connections,
lets the requests in flight finish (at most ``drain_s`` seconds), shuts the
app down (the batcher answers what it holds) and then raises the signal
again. A SIGTERM then only records that the server was asked to stop (exit
0); a Ctrl-C reaches :mod:`imgcls.interrupts` as KeyboardInterrupt (exit 130).
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from imgcls import interrupts
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
    header_timeout_s: float = 30.0  # a request line and headers must arrive within this


def header_deadline(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all
    arrived ``seconds`` after it opened or after its last answer: uvicorn alone waits for
    them forever, so slow-header clients (slowloris) would pile up until file descriptors run out."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _waiting(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                # asyncio sets TCP_NODELAY only on sockets made with proto IPPROTO_TCP, and the
                # listening socket below is made with proto 0: with Nagle's algorithm on, the body
                # of each answer on a kept-alive connection waited ~40 ms for the client's delayed
                # ACK of its headers (measured: 44-48 ms a request; 4-5 ms with this)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._waiting():
                self._arm()
            super().data_received(data)
            if not self._waiting():
                self._disarm()  # the headers are in: the body has the app's own deadline

        def _too_slow(self) -> None:
            self._deadline = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


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
        http=header_deadline(binding.header_timeout_s),
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if interrupts.pressed():  # a Ctrl-C before uvicorn took the signal (swallowed on its way): stop
                self.should_exit = True

    server = Server(config)
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
    interrupts.check()  # the Ctrl-C that stopped it, or one that came before uvicorn listened
    if not server.started and not terminated[0]:
        raise UsageError("the server did not start (see the log above)")
    log("stopped" + (" (SIGTERM): requests in flight were answered" if terminated[0] else ""))
