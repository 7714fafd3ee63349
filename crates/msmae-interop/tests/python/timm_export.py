"""Loads an `export/pytorch` artifact the way a PyTorch user would and reports how far its
outputs are from msmae's on the same input (crates/msmae-interop/tests/pytorch.rs).

usage: timm_export.py EXPORT_DIR IO.safetensors
IO.safetensors holds `x` (the input images) and msmae's outputs: `logits` for a ViT
export, `tokens` (the encoder's normed tokens, CLS first) for an MAE export.
Prints one JSON line: the keys PyTorch reported missing/unexpected and the max abs
differences.
"""
import json
import sys

import safetensors.torch as st
import timm  # noqa: F401  (the real timm, not a copy)
import torch
from timm.models.vision_transformer import VisionTransformer

export_dir, io_path = sys.argv[1], sys.argv[2]
cfg = json.load(open(f"{export_dir}/config.json"))
state = st.load_file(f"{export_dir}/model.safetensors")
io = st.load_file(io_path)
torch.manual_seed(0)
report = {"library": cfg["library"], "tensors": len(state)}
with torch.no_grad():
    if cfg["library"] == "timm":
        m = VisionTransformer(**cfg["model_args"]).eval()
        r = m.load_state_dict(state, strict=True)  # raises on any missing or extra key
        report["logits"] = (m(io["x"]) - io["logits"]).abs().max().item()
    else:
        # An MAE export: the encoder goes into timm's ViT as MAE's fine-tuning code does.
        m = VisionTransformer(**cfg["encoder_timm_args"]).eval()
        r = m.load_state_dict(state, strict=False)
        report["missing"] = sorted(r.missing_keys)
        report["unexpected"] = sorted(r.unexpected_keys)
        report["tokens"] = (m.forward_features(io["x"]) - io["tokens"]).abs().max().item()
print(json.dumps(report))
