"""CPU speed of float32 vs int8 exports: ONNX Runtime (and OpenVINO, when installed).

For two models, in the same process and interleaved (so load from other
processes hits both alike):

- resnet18 at 224 px, 1000 classes (random weights: speed does not depend on them);
- the quickstart (recipes/quickstart.yaml, 32 px), random weights, or a trained run's
  checkpoint with --quickstart RUN.

Each is exported to ONNX float32 by imgcls's own writer, and quantized as
`imgcls export --quantize int8` does (imgcls.export.quantize.quantize_onnx: QDQ,
per-channel int8 weights, uint8 activations, Conv/Gemm/MatMul), calibrated on
64 shapes images. Printed: latency at batch 1 (median ms per call) and throughput
at batch 32 (median images/s), each the median of --repeat rounds, and the
int8 / fp32 ratios. --openvino adds OpenVINO float32 (the ONNX file, compiled)
and OpenVINO int8 (NNCF post-training quantization of the same model, same
calibration images). --profile adds ONNX Runtime's per-operator time split
(where int8 wins and where it pays for the quantize/dequantize steps).

    python bench/export_speed.py [--repeat 5] [--openvino] [--profile] [--quickstart RUN]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def shapes_batch(n: int, size: int, mean, std) -> torch.Tensor:
    """``n`` built-in shapes images at ``size`` px, normalised (calibration data)."""
    from imgcls.data.inputs import load_input
    from imgcls.data.shapes import write_shapes
    from imgcls.forward import model_input
    from imgcls.recipe import ShapesSpec

    root = write_shapes(
        Path(tempfile.mkdtemp(prefix="bench-shapes-")), ShapesSpec(per_class=-(-n // 6), image_size=64)
    )
    files = sorted(root.rglob("*.png"))[:n]
    pre = {"channels": 3, "image_size": [size, size], "resize": "stretch"}
    return model_input(torch.stack([load_input(f, pre) for f in files]), mean, std).float()


def resnet18_model():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    # batchnorm statistics from random weights are degenerate; give it some spread
    with torch.no_grad():
        model(torch.randn(16, 3, 224, 224))
    return model.eval(), 224


def quickstart_model(run: str | None):
    if run:
        from imgcls.checkpoint import load_checkpoint

        ckpt = load_checkpoint(run)
        return ckpt.model.eval(), int(ckpt.preprocessing["image_size"][0])
    from imgcls.models.build import build_model
    from imgcls.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    torch.manual_seed(0)
    return build_model(recipe.model, recipe.input_shape(), 6).eval(), int(recipe.data.image_size)


def export_pair(model, size: int, work: Path, name: str) -> tuple[Path, Path, torch.Tensor]:
    from imgcls.export.quantize import quantize_onnx
    from imgcls.export.writers import write_onnx

    x = shapes_batch(64, size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    meta = {"classes": [str(i) for i in range(1000)]}
    write_onnx(model, fp32, meta, x[:4], None, True, 1)
    quantize_onnx(fp32, int8, x, None, work)
    return fp32, int8, x


def ort_runner(path: Path, profile_dir: Path | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_dir / path.stem)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda a: session.run(None, {name: a})[0]), session


def openvino_runners(fp32: Path, x: torch.Tensor) -> dict:
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32))
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    calib = nncf.Dataset([x[i : i + 1].numpy() for i in range(len(x))])
    q = nncf.quantize(core.read_model(str(fp32)), calib, subset_size=len(x))
    compiled_q = core.compile_model(q, "CPU", {"PERFORMANCE_HINT": "LATENCY"})

    def runner(c):
        req = c.create_infer_request()
        return lambda a: req.infer({0: a})[c.output(0)]

    return {"openvino fp32": runner(compiled), "openvino int8": runner(compiled_q)}


def time_call(fn, a: np.ndarray, seconds: float) -> float:
    """Median seconds per call of ``fn(a)`` over about ``seconds`` of calls."""
    fn(a)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        fn(a)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(runners: dict, size: int, repeat: int, seconds: float) -> dict:
    """{name: (batch-1 ms, batch-32 img/s)}: medians over ``repeat`` interleaved rounds."""
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    many = rng.standard_normal((32, 3, size, size), dtype=np.float32)
    lat: dict = collections.defaultdict(list)
    thr: dict = collections.defaultdict(list)
    for _ in range(repeat):
        for name, fn in runners.items():
            lat[name].append(time_call(fn, one, seconds) * 1000)
            thr[name].append(32 / time_call(fn, many, seconds))
    return {name: (statistics.median(lat[name]), statistics.median(thr[name])) for name in runners}


def op_split(session) -> dict[str, float]:
    """Share of the node time per operator type, from an ONNX Runtime profile."""
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return {op: us / total for op, us in per_op.most_common()}


def graph_ops(path: Path) -> dict[str, int]:
    """Node counts per operator type in the ONNX graph ONNX Runtime runs (after its fusions)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    out = Path(tempfile.mkdtemp()) / "optimized.onnx"
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node).most_common())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per measurement")
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--quickstart", default=None, help="a trained quickstart run (default: random weights)"
    )
    parser.add_argument("--only", choices=["resnet18", "quickstart"], default=None)
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    models = {"resnet18@224": resnet18_model, "quickstart@32": lambda: quickstart_model(args.quickstart)}
    for name, make in models.items():
        if args.only and not name.startswith(args.only):
            continue
        work = Path(tempfile.mkdtemp(prefix="bench-export-"))
        model, size = make()
        fp32, int8, x = export_pair(model, size, work, name.split("@")[0])
        runners = {"onnxruntime fp32": ort_runner(fp32)[0], "onnxruntime int8": ort_runner(int8)[0]}
        if args.openvino:
            runners.update(openvino_runners(fp32, x))
        mb = fp32.stat().st_size / 1e6, int8.stat().st_size / 1e6
        print(f"\n{name}: fp32 {mb[0]:.2f} MB, int8 {mb[1]:.2f} MB; median of {args.repeat} rounds")
        results = measure(runners, size, args.repeat, args.seconds)
        base_lat, base_thr = results["onnxruntime fp32"]
        print(f"  {'runtime':<18} {'batch 1 ms':>11} {'x fp32':>7} {'batch 32 img/s':>15} {'x fp32':>7}")
        for runtime, (lat, thr) in results.items():
            print(f"  {runtime:<18} {lat:>11.2f} {base_lat / lat:>7.2f} {thr:>15.1f} {thr / base_thr:>7.2f}")
        if args.profile:
            a = np.random.default_rng(0).standard_normal((32, 3, size, size), dtype=np.float32)
            for label, path in (("fp32", fp32), ("int8", int8)):
                fn, session = ort_runner(path, work)
                for _ in range(5):
                    fn(a)
                split = op_split(session)
                print(
                    f"  {label} op time at batch 32: " + ", ".join(f"{k} {v:.0%}" for k, v in split.items())
                )
                print(f"  {label} graph as run: {graph_ops(path)}")


if __name__ == "__main__":
    main()
