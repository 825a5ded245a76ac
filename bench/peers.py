#!/usr/bin/env python3
"""lineside against PyTorch and ONNX Runtime, side by side, in one run.

Every engine runs the same weights on the same input, with the same thread
count, and each is timed the same way: 3 warm-up batches, then a run of at
least `--min-run-ms`. Runs are interleaved: each of the `--runs` rounds per
batch size gives every engine one run, in an order that rotates from round
to round, so a slow minute of a shared machine falls on all engines alike.
The img/s figure is an engine's median run; the ratios are the medians of the
ratios within each round. lineside runs as a subprocess (`lineside bench
--runs 1 --json`, one per run), so it and the peers share the machine but
not the process.

Setup (not in CI: torch is a 5 GB install):
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -r bench/requirements-peers.txt
    cargo build --release
    bench/.venv/bin/python bench/peers.py --threads 2

Models: a timm hub-format folder (config.json + model.safetensors) or
`timm:NAME`, which writes NAME with random weights into a folder first
(speed does not depend on the weights).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = [
    "timm:resnet18",
    str(ROOT.parent / "shared/models/mobilenetv2_100.imagenet"),
    str(ROOT.parent / "shared/models/tf_efficientnet_lite0.imagenet"),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--min-run-ms", type=int, default=1500)
    p.add_argument("--lineside", default=str(ROOT / "target/release/lineside"))
    p.add_argument("--engines", default="lineside,onnxruntime,torch")
    p.add_argument("--json", action="store_true", help="one JSON object per model, batch and engine")
    return p.parse_args()


def materialize(spec, workdir):
    """A hub-format folder for `spec`, and its timm architecture."""
    import timm
    import torch
    from safetensors.torch import save_file

    if not spec.startswith("timm:"):
        cfg = json.loads((Path(spec) / "config.json").read_text())
        return Path(spec), cfg["architecture"]
    arch = spec[len("timm:"):]
    out = Path(workdir) / arch
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    pc = dict(model.pretrained_cfg)
    pc = {k: v for k, v in pc.items() if isinstance(v, (int, float, str, list, tuple, bool)) or v is None}
    cfg = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "label_names": [f"class_{i}" for i in range(model.num_classes)],
        "pretrained_cfg": pc,
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, arch


def load_torch(folder, arch):
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    model = timm.create_model(arch, pretrained=False, num_classes=cfg["num_classes"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.eval(), tuple(cfg["pretrained_cfg"]["input_size"])


def timed(step, batch, min_run_ms):
    """One run after 3 warm-up batches: img/s and p50/p99 per-batch latency in ms."""
    for _ in range(3):
        step()
    lat, start = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        step()
        lat.append((time.perf_counter() - t) * 1000)
        if (time.perf_counter() - start) * 1000 >= min_run_ms:
            break
    rate = len(lat) * batch / (time.perf_counter() - start)
    lat.sort()
    return {"images_per_second": rate, "p50_ms": lat[len(lat) // 2],
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def torch_runner(model, shape, a):
    """A function that times one run of PyTorch eager at a batch size."""
    import torch

    torch.set_num_threads(a.threads)

    def run(b):
        x = torch.randn(b, *shape)
        with torch.inference_mode():
            return timed(lambda: model(x), b, a.min_run_ms)
    return run


def ort_runner(model, shape, a, workdir, name):
    """A function that times one run of ONNX Runtime (CPU EP) at a batch size."""
    import numpy as np
    import onnxruntime as ort
    import torch

    path = Path(workdir) / f"{name}.onnx"
    torch.onnx.export(
        model, torch.randn(1, *shape), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(b):
        x = np.random.randn(b, *shape).astype(np.float32)
        return timed(lambda: sess.run(None, {"x": x}), b, a.min_run_ms)
    return run


def lineside_runner(folder, a):
    """A function that times one run of `lineside bench` (its own process) at a batch size."""
    def run(b):
        cmd = [a.lineside, "bench", "--model", str(folder), "--batch-sizes", str(b), "--threads", str(a.threads),
               "--runs", "1", "--min-run-ms", str(a.min_run_ms), "--json"]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        return {k: r[k] for k in ("images_per_second", "p50_ms", "p99_ms")}
    return run


def interleaved(runners, batches, runs):
    """Per batch size and engine: median img/s with its spread, median p50/p99, and per peer the
    median over rounds of lineside's img/s over the peer's in the same round."""
    out = {e: {} for e in runners}
    engines = list(runners)
    for b in batches:
        per_run = {e: [] for e in engines}
        for r in range(runs):
            for e in engines[r % len(engines):] + engines[:r % len(engines)]:
                per_run[e].append(runners[e](b))
        for e, rs in per_run.items():
            rates = [x["images_per_second"] for x in rs]
            out[e][b] = {
                "images_per_second": statistics.median(rates),
                "images_per_second_min": min(rates),
                "images_per_second_max": max(rates),
                "p50_ms": statistics.median(x["p50_ms"] for x in rs),
                "p99_ms": statistics.median(x["p99_ms"] for x in rs),
            }
            if "lineside" in per_run and e != "lineside":
                out[e][b]["lineside_ratio"] = statistics.median(
                    mine["images_per_second"] / theirs["images_per_second"]
                    for mine, theirs in zip(per_run["lineside"], rs))
    return out


def main():
    a = parse_args()
    batches = [int(b) for b in a.batch_sizes.split(",")]
    engines = a.engines.split(",")
    import torch
    import onnxruntime
    import timm

    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, timm {timm.__version__}"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for spec in a.models:
            folder, arch = materialize(spec, work)
            model, shape = load_torch(folder, arch)
            runners = {}
            if "lineside" in engines:
                runners["lineside"] = lineside_runner(folder, a)
            if "onnxruntime" in engines:
                runners["onnxruntime"] = ort_runner(model, shape, a, work, arch)
            if "torch" in engines:
                runners["torch"] = torch_runner(model, shape, a)
            results = interleaved(runners, batches, a.runs)
            for b in batches:
                for e, r in results.items():
                    rows.append({"model": arch, "batch": b, "engine": e, "threads": a.threads, **{
                        k: r[b][k] for k in ("images_per_second", "images_per_second_min", "images_per_second_max", "p50_ms", "p99_ms",
                                             "lineside_ratio") if k in r[b]}})
            if not a.json:
                print_table(arch, shape, batches, results)
                sys.stdout.flush()
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(f"\n{a.threads} threads; median of {a.runs} interleaved runs of >= {a.min_run_ms} ms each; "
              f"ratios: median of the per-round ratios; {versions}")


def print_table(arch, shape, batches, results):
    print(f"\n{arch} ({'x'.join(map(str, shape))}), img/s (min-max), p50 ms per batch")
    engines = list(results)
    print(f"{'batch':>5}  " + "  ".join(f"{e:>28}" for e in engines) + "  lineside/ORT  lineside/torch")
    for b in batches:
        cells = []
        for e in engines:
            r = results[e][b]
            cells.append(f"{r['images_per_second']:8.1f} ({r['images_per_second_min']:.0f}-{r['images_per_second_max']:.0f}) {r['p50_ms']:7.1f}ms")
        ratio = lambda peer: (f"{results[peer][b]['lineside_ratio']:12.2f}x"
                              if "lineside" in results and peer in results else f"{'-':>13}")
        print(f"{b:>5}  " + "  ".join(f"{c:>28}" for c in cells) + f"  {ratio('onnxruntime')}  {ratio('torch'):>14}")


if __name__ == "__main__":
    main()
