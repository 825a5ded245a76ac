"""ONNX Runtime's own time per node of a model, for comparison layer by layer.

Exports a timm hub-format folder to ONNX as `bench/peers.py` does, runs it
`--passes` times at batch 1 with ONNX Runtime's profiler on, and prints the
median kernel time of every node in graph order (fused Conv+Clip nodes are
one line) and their sum. Set it beside lineside's per-layer figures:
`cargo test --release -p lineside-inference --lib
channels_last::tests::layer_times -- --ignored --nocapture`.

    bench/.venv/bin/python bench/ort_layers.py ../shared/models/mobilenetv2_100.imagenet --threads 1
"""

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="timm hub-format folder (config.json + model.safetensors)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=300)
    a = p.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    folder = Path(a.folder)
    arch = json.loads((folder / "config.json").read_text())["architecture"]
    model, shape = peers.load_torch(folder, arch)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "model.onnx"
        torch.onnx.export(model, torch.randn(1, *shape), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(work) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.random.randn(1, *shape).astype(np.float32)
        for _ in range(a.passes):
            sess.run(None, {"x": x})
        events = json.loads(Path(sess.end_profiling()).read_text())

    times, first = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(e["dur"])
            first.setdefault(name, (e["args"].get("op_name"), e["args"].get("output_type_shape")))
    medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    print(f"{arch}, batch 1, {a.threads} thread(s), onnxruntime {ort.__version__}: "
          f"median µs per node over {a.passes} passes")
    for name, us in medians.items():
        op, out = first[name]
        print(f"{us:7.0f}  {op:>18}  {name[:48]:48}  {out}")
    print(f"{sum(medians.values()):7.0f}  sum of the node medians")


if __name__ == "__main__":
    main()
