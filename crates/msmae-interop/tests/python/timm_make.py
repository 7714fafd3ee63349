"""Makes PyTorch weights the way a PyTorch user has them, for `import/pytorch`
(crates/msmae-interop/tests/pytorch.rs): a timm VisionTransformer classifier with random
weights, once with MAE's fixed sin-cos position table (importable) and once with timm's
own learned one (refused), plus its logits on fixed images.

usage: timm_make.py OUT_DIR
writes OUT_DIR/sincos.safetensors, OUT_DIR/learned.safetensors, OUT_DIR/io.safetensors (x, logits)
"""
import os
import sys

import safetensors.torch as st
import torch
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../msmae-vit/tests/python"))
from reference import sincos_2d  # noqa: E402  (MAE's formula, written independently of msmae)

out = sys.argv[1]
torch.manual_seed(3)
m = VisionTransformer(img_size=(16, 24), patch_size=4, in_chans=3, num_classes=5, global_pool="avg", fc_norm=True,
                      embed_dim=32, depth=2, num_heads=4).eval()
with torch.no_grad():
    for p in m.parameters():  # every tensor away from its initial value
        p.add_(torch.randn_like(p) * 0.2)
state = {k: v.contiguous() for k, v in m.state_dict().items()}
st.save_file(state, f"{out}/learned.safetensors")
with torch.no_grad():
    m.pos_embed.copy_(torch.tensor(sincos_2d(32, 4, 6), dtype=torch.float32)[None])
    x = torch.randn(2, 3, 16, 24)
    logits = m(x)
st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{out}/sincos.safetensors")
st.save_file({"x": x.contiguous(), "logits": logits.contiguous()}, f"{out}/io.safetensors")
