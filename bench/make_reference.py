#!/usr/bin/env python3
"""Writes a timm model as a hub-format folder with a PyTorch reference, for
`lineside models verify`: config.json, model.safetensors and ref.safetensors
(`input`, `logits` and every `features_only` map as `features.i`).

    bench/.venv/bin/python bench/make_reference.py efficientnet_b0 /tmp/efficientnet_b0
    target/release/lineside models verify /tmp/efficientnet_b0

Weights are random (seeded) unless --pretrained, which needs the hub. The
feature maps come from the classifier's own modules (`feature_info`), so they
belong to the same weights as the logits.
"""
import argparse
import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("arch")
p.add_argument("out")
p.add_argument("--pretrained", action="store_true")
p.add_argument("--batch", type=int, default=2)
a = p.parse_args()

torch.manual_seed(0)
model = timm.create_model(a.arch, pretrained=a.pretrained).eval()
if not a.pretrained:
    # Random BatchNorm statistics, so folding them is exercised too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
pc = {k: v for k, v in model.pretrained_cfg.items() if isinstance(v, (int, float, str, list, tuple, bool)) or v is None}
(out / "config.json").write_text(json.dumps({
    "architecture": a.arch, "num_classes": model.num_classes, "num_features": model.num_features,
    "global_pool": "avg", "label_names": [f"class_{i}" for i in range(model.num_classes)], "pretrained_cfg": pc,
}, indent=2))

x = torch.randn(a.batch, *pc["input_size"])
maps = {}
hooks = [dict(model.named_modules())[f["module"]].register_forward_hook(
    lambda _m, _i, o, i=i: maps.__setitem__(f"features.{i}", o.contiguous()))
    for i, f in enumerate(model.feature_info)]
with torch.no_grad():
    logits = model(x)
for h in hooks:
    h.remove()
save_file({"input": x, "logits": logits, **maps}, str(out / "ref.safetensors"))
print(f"{a.arch}: {len(maps)} feature maps; wrote {out} (torch {torch.__version__}, timm {timm.__version__})")
