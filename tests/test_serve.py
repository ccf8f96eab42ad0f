"""`imgcls serve`: a real uvicorn server on a real port, driven over HTTP.

Most servers run in a thread of this process (uvicorn's own loop, a socket
bound to a free port); one real `imgcls serve` process shows the SIGTERM
drain and its exit code. The page is driven by Playwright in Debian's
headless chromium, when both are installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import invoke_cli, save_tiny_checkpoint

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'imgcls[serve]')")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client (httpx) is not installed")

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def running(app, header_timeout: float = 30.0):
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port, with `imgcls serve`'s
    header deadline; yields the base URL."""
    import uvicorn

    from imgcls.serve.server import header_deadline

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", http=header_deadline(header_timeout)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def served_app(model: Path, tta: bool = False, min_confidence: str | None = None, **options):
    from imgcls.serve.app import ServeOptions, create_app
    from imgcls.serve.model import ServedModel

    served = ServedModel.load(str(model), tta=tta, min_confidence=min_confidence)
    return create_app(served, ServeOptions(**options))


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))[::8]  # one image of each class


def predict_json(model: Path, files: list[Path], *extra: str) -> list[dict]:
    r = invoke_cli("predict", *map(str, files), "--model", str(model), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def same_answer(served: dict, offline: dict) -> None:
    """The served record is predict's, minus the file name (probabilities to float32 precision)."""
    offline = {k: v for k, v in offline.items() if k != "file"}
    served = {k: v for k, v in served.items() if k not in ("file", "model")}
    assert served.keys() == offline.keys()
    for key in ("label", "unsure", "unknown"):
        assert served.get(key) == offline.get(key)
    assert served.get("score") == pytest.approx(offline.get("score"), abs=1e-6)
    for field in ("top_k", "labels"):
        if field in offline:
            assert [t["label"] for t in served[field]] == [t["label"] for t in offline[field]]
            assert [t["p"] for t in served[field]] == pytest.approx(
                [t["p"] for t in offline[field]], abs=1e-6
            )


def write_onnx(checkpoint: Path, path: Path) -> Path:
    """The checkpoint as ONNX with imgcls's metadata, by torch's TorchScript-based exporter:
    `imgcls export` (dynamo) takes ~10 s of CPU here; what is served is the same either way."""
    import warnings

    import onnx
    import torch

    from imgcls.checkpoint import load_checkpoint
    from imgcls.export.runtime import META_KEY, export_meta

    ckpt = load_checkpoint(checkpoint)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            ckpt.model, (torch.zeros(2, 3, 16, 16),), buffer, dynamo=False, input_names=["input"],
            output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(export_meta(ckpt))
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint with a temperature (T = 0.25: its probabilities far from
    the raw softmax), so every answer below also checks the calibration is applied."""
    from imgcls.checkpoint import store_calibration

    path = save_tiny_checkpoint(tmp_path_factory.mktemp("served") / "tiny.safetensors")
    store_calibration([path], {"temperature": 0.25, "fitted_on": "a test"})
    return path


@pytest.fixture(scope="module")
def server(checkpoint):
    """The tiny checkpoint, served with a 4 KB upload limit and an API key."""
    with running(served_app(checkpoint, max_upload=4000, api_key="s3cret")) as url:
        yield url


KEY = {"X-API-Key": "s3cret"}


def write_torchscript(checkpoint: Path, path: Path) -> Path:
    import torch

    from imgcls.checkpoint import load_checkpoint
    from imgcls.export.runtime import export_meta
    from imgcls.export.writers import write_torchscript as write

    ckpt = load_checkpoint(checkpoint)
    write(ckpt.model, path, export_meta(ckpt), torch.zeros(2, 3, 16, 16), True, 2)
    return path


def test_served_answers_equal_predict_for_a_checkpoint_and_its_exports(checkpoint, shapes_folder, tmp_path):
    """Checkpoint, ONNX and TorchScript, the checkpoint with --tta, and an export with
    --min-confidence (half its images unknown): served = `imgcls predict`."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    onnx = write_onnx(checkpoint, tmp_path / "tiny.onnx")
    script = write_torchscript(checkpoint, tmp_path / "tiny.pt")
    files = images(shapes_folder)
    formats = {checkpoint: "checkpoint", onnx: "onnx", script: "torchscript"}
    median = sorted(r["confidence"] for r in predict_json(checkpoint, files))[len(files) // 2]
    cases = [(checkpoint, False, None), (onnx, False, None), (script, False, None), (checkpoint, True, None)]
    for model, tta, p in [*cases, (onnx, False, f"{median:.9f}")]:
        extra = [*(["--tta"] if tta else []), *(["--min-confidence", p] if p else [])]
        offline = predict_json(model, files, *extra)
        assert p is None or 0 < sum(r["unknown"] for r in offline) < len(files)
        with running(served_app(model, tta=tta, min_confidence=p)) as url:
            info = httpx.get(f"{url}/v1/model").json()
            assert info["format"] == formats[model] and info["tta"] == tta
            assert (info["unknown"] is None) == (p is None)
            for file, expected in zip(files, offline, strict=True):
                got = httpx.post(
                    f"{url}/v1/predict", content=file.read_bytes(), headers={"Content-Type": "image/png"}
                )
                assert got.status_code == 200, got.text
                assert got.json()["model"] == {"name": info["name"], "version": info["version"]}
                same_answer(got.json(), expected)


def test_multipart_files_give_a_list_in_order_with_top_k(server, shapes_folder):
    files = images(shapes_folder)
    form = [("file", (f.name, f.read_bytes(), "image/png")) for f in files]
    r = httpx.post(f"{server}/v1/predict?top_k=1", files=form, headers=KEY)
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert [a["file"] for a in answers] == [f.name for f in files]
    assert all(len(a["top_k"]) == 1 for a in answers)


def _bomb_png() -> bytes:
    """A valid 1-bit PNG header claiming 30000 x 30000 pixels (over Pillow's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_bad_input_is_a_4xx_json_error_and_the_server_goes_on(server, shapes_folder):
    good = images(shapes_folder)[0].read_bytes()
    png = {"Content-Type": "image/png", **KEY}
    cases = [
        (b"not an image at all", png, 422, "not a supported image"),
        (good[: len(good) // 2], png, 422, "cannot decode"),
        (_bomb_png(), png, 422, "too many pixels"),
        (good, {"Content-Type": "text/plain", **KEY}, 415, "Content-Type 'text/plain'"),
        (b"", png, 400, "empty body"),
        (b"\0" * 5000, png, 413, "over the limit of 4000 bytes"),
        (b"--x\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nabc", {"Content-Type": "multipart/form-data; boundary=x", **KEY}, 400, "no files"),
    ]  # fmt: skip
    for body, headers, status, words in cases:
        r = httpx.post(f"{server}/v1/predict", content=body, headers=headers)
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["error"]
    r = httpx.post(f"{server}/v1/predict", content=good, headers=png)
    assert r.status_code == 200 and r.json()["label"] in ("circle", "square", "triangle")
    metrics = httpx.get(f"{server}/metrics", headers=KEY).text
    for status in ("422", "415", "413", "400", "200"):
        assert f'imgcls_requests_total{{route="/v1/predict",status="{status}"}}' in metrics
    assert 'imgcls_requests_total{route="/v1/predict",status="422"} 3.0' in metrics
    assert "imgcls_batch_size_count" in metrics and "imgcls_queue_depth 0.0" in metrics


def test_api_key_is_required_except_for_health_and_the_page(server, shapes_folder):
    body = images(shapes_folder)[0].read_bytes()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}):
        r = httpx.post(f"{server}/v1/predict", content=body, headers={"Content-Type": "image/png", **headers})
        assert r.status_code == 401 and "API key" in r.json()["error"]
    assert httpx.get(f"{server}/v1/model").status_code == 401
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/").status_code == 200
    ok = httpx.post(
        f"{server}/v1/predict",
        content=body,
        headers={"Content-Type": "image/png", "Authorization": "Bearer s3cret"},
    )
    assert ok.status_code == 200


def test_a_full_queue_answers_503_with_retry_after(checkpoint, shapes_folder):
    import asyncio

    app = served_app(checkpoint, max_queue=2, max_batch=1)
    served = app.state.served
    real = served.logits

    def slow(batch):
        time.sleep(0.25)
        return real(batch)

    served.logits = slow
    body = images(shapes_folder)[0].read_bytes()

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return list(
                await asyncio.gather(
                    *(
                        client.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "image/png"})
                        for _ in range(6)
                    )
                )
            )

    with running(app) as url:
        answers = asyncio.run(burst(url))
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) == 2 and codes.count(503) == 4, codes
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]
        assert (
            httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "image/png"}).status_code
            == 200
        )


def test_slow_headers_are_cut_off_and_a_slow_body_gets_408(checkpoint, shapes_folder):
    """Slowloris: uvicorn alone waits for headers forever; imgcls serve closes the connection."""
    body = images(shapes_folder)[0].read_bytes()
    with running(served_app(checkpoint, read_timeout=0.5), header_timeout=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        slow_headers = socket.create_connection(("127.0.0.1", port))
        slow_headers.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        slow_headers.settimeout(5)
        assert slow_headers.recv(100) == b""  # closed by the server, well before 5 s
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        slow_body.settimeout(5)
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 ")
        slow_headers.close()
        slow_body.close()
        assert (
            httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "image/png"}).status_code
            == 200
        )


def test_two_apps_in_one_process_count_apart(checkpoint, shapes_folder):
    from prometheus_client import generate_latest

    first, second = served_app(checkpoint), served_app(checkpoint)
    body = images(shapes_folder)[0].read_bytes()
    with running(first) as url:
        assert (
            httpx.post(f"{url}/v1/predict", content=body, headers={"Content-Type": "image/png"}).status_code
            == 200
        )
    assert b'status="200"} 1.0' in generate_latest(first.state.metrics.registry)
    assert b"imgcls_requests_total{" not in generate_latest(second.state.metrics.registry)


def test_multilabel_checkpoint_answers_its_labels_over_thresholds(tiny_checkpoint, shapes_folder, tmp_path):
    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    model = tmp_path / "ml.safetensors"
    save_checkpoint(model, ckpt.model, {**ckpt.meta, "task": "multilabel", "thresholds": [0.0, 1.0, 0.5]})
    files = images(shapes_folder)
    offline = predict_json(model, files)
    with running(served_app(model)) as url:
        form = [("file", (f.name, f.read_bytes(), "image/png")) for f in files]
        answers = httpx.post(f"{url}/v1/predict", files=form).json()["predictions"]
    for got, expected in zip(answers, offline, strict=True):
        same_answer(got, expected)
        assert "circle" in [t["label"] for t in got["labels"]]  # threshold 0: always on
        assert "square" not in [t["label"] for t in got["labels"]]  # threshold 1: never


def test_sigterm_drains_the_request_in_flight_then_exits_0(tiny_checkpoint, shapes_folder):
    """A real `imgcls serve`: SIGTERM while a request's body is half sent; it is still answered."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "serve", str(tiny_checkpoint), "--port", "0", "--no-access-log"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        line = ""
        while "serving" not in line:  # printed once the port listens
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        body = images(shapes_folder)[0].read_bytes()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sock.sendall(body[10:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"label"' in answer
        assert proc.wait(30) == 0
        assert "stopped (SIGTERM)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_without_the_extra_one_line_names_it(cli, tiny_checkpoint, monkeypatch):
    import imgcls.serve

    monkeypatch.setattr(imgcls.serve, "missing_packages", lambda: ["prometheus_client"])
    r = cli("serve", str(tiny_checkpoint))
    assert r.returncode == 2
    assert "pip install 'imgcls[serve]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _playwright_skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"headless Chromium is not installed at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    return None


@pytest.mark.skipif(_playwright_skip_reason() is not None, reason=str(_playwright_skip_reason()))
def test_page_shows_the_label_of_an_uploaded_image_and_class_names_as_text(shapes_folder, tmp_path):
    """A class name that is markup shows as text, and nothing of it runs."""
    from playwright.sync_api import sync_playwright

    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    model = save_tiny_checkpoint(tmp_path / "hostile.safetensors", classes=[hostile, "square", "triangle"])
    image = images(shapes_folder)[0]
    with running(served_app(model)) as url:
        expected = httpx.post(
            f"{url}/v1/predict", content=image.read_bytes(), headers={"Content-Type": "image/png"}
        ).json()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"])  # fmt: skip
            page = browser.new_page()
            page.goto(url + "/")
            page.set_input_files("#pick", str(image))
            page.wait_for_selector(".result .label", timeout=20000)
            assert page.text_content(".result .label") == expected["label"]
            names = page.locator(".bar .name").all_text_contents()
            assert names == [t["label"] for t in expected["top_k"]] and hostile in names
            assert page.title() == "imgcls serve"  # the onerror never ran
            page.wait_for_selector(".result img.cam", timeout=20000)  # the Grad-CAM overlay
            browser.close()
