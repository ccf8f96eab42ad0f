"""`imgcls serve` under N concurrent clients against `imgcls predict`'s offline throughput.

Writes JPEGs (built-in shapes) and a small untrained checkpoint (as
bench/predict_throughput.py does), or takes --model, then in the same run:

- offline: predict_files (the path of `imgcls predict`), batch 64, images/s;
- one forward: the model alone on one decoded image (median), the yardstick
  for the latency at concurrency 1 (goal: p50 <= one forward + 5 ms);
- served: a real `imgcls serve` process on a free port, and N async httpx
  clients (N = 1, 8, 32) each posting one JPEG at a time: p50, p99, images/s
  (goal at 32: >= 0.8x offline).

The server runs in its own process and the clients in --client-processes
others (default 4: one Python process of 32 httpx clients saturates its own
GIL first); on a machine with few cores they all compete for the same CPUs,
as the server and its callers would. Each level also prints the CPU time per
image of the server and of the clients: where the cores went.

    python bench/serve_throughput.py [--images 256] [--size 64] [--requests 400] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import best_rates, make_checkpoint, make_jpegs  # noqa: E402


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of process ``pid`` and its threads so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "serve", str(model), "--port", "0", "--no-access-log", *extra],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit("the server did not start")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, f"http://127.0.0.1:{port}"


async def load(
    url: str,
    bodies: list[bytes],
    concurrency: int,
    total: int,
    *,
    multipart: bool = False,
    path: str = "/v1/predict",
    health: str = "/healthz",
) -> tuple[list[float], float, float]:
    """``total`` requests from ``concurrency`` clients on one event loop: (latencies in
    s, start, end: perf_counter, which is one clock for every process on Linux).
    Each posts one JPEG as the raw body, or as a multipart file (``multipart``)."""
    import httpx

    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # TCP_NODELAY, as curl and browsers set it: without it httpx sends a request's headers and
    # body in two writes, the body waits for the ACK the server delays, and every request on a
    # kept-alive connection takes ~45 ms more (measured: 46-48 ms against curl's 4 ms)
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=nodelay)
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:

        async def one_client() -> None:
            for i in counter:
                t = time.perf_counter()
                body = bodies[i % len(bodies)]
                if multipart:
                    r = await client.post(f"{url}{path}", files={"file": ("a.jpg", body, "image/jpeg")})
                else:
                    r = await client.post(
                        f"{url}{path}", content=body, headers={"Content-Type": "image/jpeg"}
                    )
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise SystemExit(f"HTTP {r.status_code}: {r.text}")

        for _ in range(concurrency):  # warm-up: a connection per client
            await client.get(f"{url}{health}")
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return latencies, start, time.perf_counter()


def _client_process(url: str, bodies: list[bytes], concurrency: int, total: int, kw: dict) -> tuple:
    """One client process's share of a level: (latencies, start, end, its CPU seconds)."""
    cpu = time.process_time()
    latencies, start, end = asyncio.run(load(url, bodies, concurrency, total, **kw))
    return latencies, start, end, time.process_time() - cpu


def drive(
    pool, processes: int, url: str, bodies: list[bytes], clients: int, total: int, **kw
) -> tuple[list[float], float, float]:
    """``clients`` concurrent clients spread over the pool's ``processes`` (one Python
    process saturates its GIL near 150 requests/s with httpx: with 32 clients in one,
    the bench measured itself, p99 1.2 s against 0.2 s over 4 processes):
    (latencies, wall time, the clients' CPU seconds)."""
    procs = max(1, min(processes, clients))
    shares = [
        (clients // procs + (i < clients % procs), total // procs + (i < total % procs)) for i in range(procs)
    ]
    results = pool.starmap(_client_process, [(url, bodies, c, n, kw) for c, n in shares], chunksize=1)
    latencies = [x for r in results for x in r[0]]
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return latencies, wall, sum(r[3] for r in results)


def p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return ordered[len(ordered) // 2] * 1000, ordered[int(len(ordered) * 0.99)] * 1000


def level(pool, processes: int, pid: int, url: str, bodies: list[bytes], clients: int, total: int) -> tuple:
    """(clients, p50 ms, p99 ms, img/s, server CPU ms/img or None, clients' CPU ms/img):
    the CPU is the server process's (its threads too) and the client processes'."""
    server_cpu = cpu_seconds(pid)
    lat, wall, client_cpu = drive(pool, processes, url, bodies, clients, total)
    server_after = cpu_seconds(pid)
    server_ms = (
        None if server_cpu is None or server_after is None else (server_after - server_cpu) / len(lat) * 1000
    )
    return clients, *p50_p99_ms(lat), len(lat) / wall, server_ms, client_cpu / len(lat) * 1000


def one_forward_ms(predictor, x: torch.Tensor) -> float:
    """The model alone on one decoded image: the median of 50 forward passes, in ms."""
    times = []
    with torch.inference_mode():
        for _ in range(50):
            t = time.perf_counter()
            predictor.batch_logits(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", help="serve this model (run folder, checkpoint, export) instead")
    ap.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over")
    ap.add_argument("--serve-args", default="", help="extra `imgcls serve` options, e.g. '--max-wait-ms 2'")
    args = ap.parse_args()

    from imgcls.data.inputs import load_input
    from imgcls.predict import load_predictor, predict_files

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = make_jpegs(folder, args.images, args.size)
        model = Path(args.model) if args.model else folder / "bench.safetensors"
        if not args.model:
            make_checkpoint(model, args.size)
        predictor = load_predictor(model, log=lambda m: None)

        def offline() -> None:
            for _ in predict_files(predictor, files, batch_size=64):
                pass

        forward_ms = one_forward_ms(predictor, load_input(files[0], predictor.preprocessing)[None])

        bodies = [f.read_bytes() for f in files]
        proc, url = start_server(model, args.serve_args.split())
        pool = multiprocessing.get_context("spawn").Pool(args.client_processes)
        try:
            n = args.client_processes
            drive(pool, n, url, bodies, n, 4 * n)  # the client processes started
            rows = []
            # the machine's load drifts: offline is measured again before and after each level,
            # and each level is compared with the mean of the two measurements around it
            offline_rates = [best_rates({"offline": offline}, len(files), args.repeat)["offline"]]
            offline_cpu = time.process_time()
            offline()
            offline_cpu = (time.process_time() - offline_cpu) / len(files) * 1000
            for c in (1, 8, 32):
                drive(pool, n, url, bodies, c, min(50, args.requests))  # warm-up
                row = level(pool, n, proc.pid, url, bodies, c, args.requests)
                offline_rates.append(best_rates({"offline": offline}, len(files), args.repeat)["offline"])
                rows.append((*row[:4], (offline_rates[-2] + offline_rates[-1]) / 2, *row[4:]))
        finally:
            pool.terminate()
            proc.terminate()
            proc.wait(30)

    print(
        f"{len(files)} JPEGs {args.size}x{args.size}, model {model.name}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}"
    )
    print(f"offline (imgcls predict path, batch 64): {', '.join(f'{r:.0f}' for r in offline_rates)} images/s")
    print(f"one forward pass, batch 1:                {forward_ms:8.2f} ms")
    print(f"offline CPU per image:                    {offline_cpu:8.2f} ms")
    print(
        f"{'clients':>8} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>8} {'offline':>8} {'x offline':>10}"
        f" {'server CPU ms/img':>18} {'clients CPU ms/img':>19}"
    )
    for c, p50, p99, rate, around, server_ms, client_ms in rows:
        server = "-" if server_ms is None else f"{server_ms:.2f}"
        print(
            f"{c:>8} {p50:8.2f} {p99:8.2f} {rate:8.0f} {around:8.0f} {rate / around:10.2f}"
            f" {server:>18} {client_ms:19.2f}"
        )
    print(
        f"goals: at 32 clients {rows[2][3] / rows[2][4]:.2f}x offline (goal >= 0.8); "
        f"at 1 client p50 {rows[0][1]:.2f} ms vs one forward + 5 ms = {forward_ms + 5:.2f} ms"
    )


if __name__ == "__main__":
    main()
