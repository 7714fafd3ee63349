"""Writes torch.save checkpoints the way PyTorch users have them, for `import/pytorch`'s
.pth reader (crates/msmae-interop/tests/pytorch.rs), from the state dict in
OUT_DIR/sincos.safetensors (written by timm_make.py):

- release.pth: MAE's and MSMAE's training-checkpoint layout: {'model', 'optimizer', 'epoch',
  'scaler', 'args' (an argparse.Namespace)}
- bare.pth: the state dict itself
- half.pth (f16) and bf16.pth (bf16, under 'state_dict'), with half.safetensors and
  bf16.safetensors: the same tensors widened to f32 by PyTorch
- evil.pth: a dict holding an object whose unpickling would call os.system
- legacy.pth: the pre-1.6 (non-zip) format
- truncated.pth: the first half of release.pth

usage: torch_save.py OUT_DIR
"""
import argparse
import os
import sys

import safetensors.torch as st
import torch

out = sys.argv[1]
sd = st.load_file(f"{out}/sincos.safetensors")
opt_state = {"state": {0: {"exp_avg": torch.randn(4), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
args = argparse.Namespace(batch_size=64, model="vit_base_patch16", blr=1e-3, mask_ratio=0.75)
torch.save({"model": sd, "optimizer": opt_state, "epoch": 7, "scaler": {"scale": 65536.0}, "args": args}, f"{out}/release.pth")
torch.save(sd, f"{out}/bare.pth")
torch.save({k: v.half() for k, v in sd.items()}, f"{out}/half.pth")
st.save_file({k: v.half().float().contiguous() for k, v in sd.items()}, f"{out}/half.safetensors")
torch.save({"state_dict": {k: v.bfloat16() for k, v in sd.items()}}, f"{out}/bf16.pth")
st.save_file({k: v.bfloat16().float().contiguous() for k, v in sd.items()}, f"{out}/bf16.safetensors")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {out}/pwned",))


torch.save({"model": sd, "note": Payload()}, f"{out}/evil.pth")
torch.save(sd, f"{out}/legacy.pth", _use_new_zipfile_serialization=False)
data = open(f"{out}/release.pth", "rb").read()
open(f"{out}/truncated.pth", "wb").write(data[: len(data) // 2])
