"""`imgcls serve` (FastAPI + uvicorn) against the same model behind LitServe, in the same run.

Why imgcls serve is built on FastAPI + uvicorn rather than LitServe, measured:
both servers load the same checkpoint through imgcls's predictor and answer
with predict's records (decode, calibrated logits, top-k); both batch up to 32
images waiting at most 5 ms. The clients post each JPEG as a multipart file
(LitServe reads a form or JSON, not a raw body), from 1, 8 and 32 concurrent
async httpx clients spread over --client-processes processes (as
bench/serve_throughput.py), the two servers interleaved round by round so that the
machine's load drifts alike for both; the best round of each is printed.

LitServe is not a dependency of imgcls: `pip install litserve` to run this.

    python bench/serve_vs_litserve.py [--size 64] [--requests 300] [--rounds 2] [--client-processes 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_throughput import make_checkpoint, make_jpegs  # noqa: E402
from serve_throughput import drive, p50_p99_ms, start_server  # noqa: E402

try:
    import litserve as ls
except ImportError:  # main() says what to install
    ls = None

if ls is not None:  # at module level: LitServe's worker process unpickles it

    class ImgclsAPI(ls.LitAPI):
        def __init__(self, model: str, **kwargs):
            super().__init__(**kwargs)
            self.model = model

        def setup(self, device):
            from imgcls.predict import load_predictor

            self.predictor = load_predictor(self.model, log=lambda m: None)

        def decode_request(self, request):
            from imgcls.data.inputs import load_input_bytes

            upload = request["file"].file  # the form crossed into the worker process
            upload.seek(0)
            return load_input_bytes(upload.read(), self.predictor.preprocessing)

        def predict(self, xs):
            import torch

            from imgcls.predict import calibrated_logits, prediction_records

            with torch.inference_mode():
                logits = calibrated_logits(self.predictor, torch.stack(list(xs)))
            return prediction_records(self.predictor, logits, ["upload"] * len(xs))

        def unbatch(self, output):
            return list(output)

        def encode_response(self, prediction):
            return prediction.to_dict()


def lit_server(model: str, port: int) -> None:
    """Run the model behind LitServe (this file, re-run with ``--lit-server``)."""
    api = ImgclsAPI(model, max_batch_size=32, batch_timeout=0.005)
    ls.LitServer(api, accelerator="cpu", workers_per_device=1).run(port=port, generate_client_file=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    import httpx

    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit("the LitServe server exited")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the LitServe server did not start in 120 s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--requests", type=int, default=300, help="requests per server, level and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client-processes", type=int, default=4, help="processes the clients are spread over")
    ap.add_argument("--lit-server", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lit_server:
        lit_server(args.lit_server[0], int(args.lit_server[1]))
        return
    if ls is None:
        raise SystemExit("this benchmark needs LitServe: pip install litserve")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = folder / "bench.safetensors"
        make_checkpoint(model, args.size)
        bodies = [f.read_bytes() for f in make_jpegs(folder, args.images, args.size)]
        ours, ours_url = start_server(model, ["--max-batch", "32", "--max-wait-ms", "5"])
        port = free_port()
        lit = subprocess.Popen(
            [sys.executable, __file__, "--lit-server", str(model), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its worker processes are stopped with it
        )
        lit_url = f"http://127.0.0.1:{port}"
        pool = multiprocessing.get_context("spawn").Pool(args.client_processes)
        servers = {
            "imgcls serve": (ours_url, "/v1/predict", "/healthz"),
            "litserve": (lit_url, "/predict", "/health"),
        }
        try:
            wait_until_serving(lit_url, lit)
            best: dict[tuple[str, int], tuple[float, float, float]] = {}
            for c in (1, 8, 32):
                for _ in range(args.rounds):
                    for name, (url, path, health) in servers.items():
                        kw = {"multipart": True, "path": path, "health": health}
                        drive(pool, args.client_processes, url, bodies, c, 30, **kw)  # warm-up
                        lat, wall, _ = drive(pool, args.client_processes, url, bodies, c, args.requests, **kw)
                        row = (*p50_p99_ms(lat), len(lat) / wall)
                        if row[2] > best.get((name, c), (0, 0, 0))[2]:
                            best[(name, c)] = row
        finally:
            pool.terminate()
            ours.terminate()
            ours.wait(30)
            os.killpg(lit.pid, signal.SIGTERM)
            try:
                lit.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(lit.pid, signal.SIGKILL)

    print(f"{args.size}x{args.size} JPEGs as multipart files, best of {args.rounds} interleaved rounds")
    print(f"{'clients':>8} {'server':>14} {'p50 ms':>8} {'p99 ms':>8} {'img/s':>7}")
    for c in (1, 8, 32):
        for name in servers:
            p50, p99, rate = best[(name, c)]
            print(f"{c:>8} {name:>14} {p50:8.1f} {p99:8.1f} {rate:7.0f}")
        ratio = best[("imgcls serve", c)][2] / best[("litserve", c)][2]
        print(f"{'':>8} {'imgcls / lit':>14} {'':>8} {'':>8} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
