"""PyTorch eager side of `cargo xtask bench model`: the reference model (reference.py)
trained for a few steps; prints `RESULT ms_per_step peak_mib` (median step; peak RSS on
the CPU, on CUDA the GPU memory in use at the end from nvidia-smi, as the burn side reads it).

usage: bench_model.py CONFIG_JSON finetune:KEEP|pretrain BATCH STEPS [sdpa|explicit [DEVICE [f32|bf16]]]

sdpa (default): attention through F.scaled_dot_product_attention, as timm >= 0.9 runs a
ViT; explicit: softmax(q k^T) v as in the MAE reference code. bf16: the step's forward
and loss under torch.autocast(dtype=torch.bfloat16); weights and AdamW stay float32.
"""
import contextlib
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, __import__("os").path.dirname(__file__))
from reference import MAE, Attention  # noqa: E402


def main():
    cfg, kind, batch, steps = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    attn = sys.argv[5] if len(sys.argv) > 5 else "sdpa"
    device = torch.device(sys.argv[6] if len(sys.argv) > 6 else "cpu")
    precision = sys.argv[7] if len(sys.argv) > 7 else "f32"
    assert attn in ("sdpa", "explicit"), f"attention must be sdpa or explicit, not {attn}"
    assert precision in ("f32", "bf16"), f"precision must be f32 or bf16, not {precision}"
    Attention.fused = attn == "sdpa"
    torch.manual_seed(0)
    e = cfg["encoder"]
    model = MAE(cfg).to(device)
    d = e["embed_dim"]
    fc_norm = nn.LayerNorm(d, eps=e["norm_eps"]).to(device)
    imgs = torch.randn(batch, e["in_chans"], *e["image_size"]).to(device)
    labels = (torch.arange(batch) % 4).to(device)
    L = model.gh * model.gw
    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(L, generator=g) for _ in range(batch)]).to(device)

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if kind.startswith("finetune"):
        keep = float(kind.split(":")[1])
        n = L if keep >= 1.0 else int(L - int(L * 0.45 * (1 - keep) / 0.75 + 1e-9) - (int(L * 0.75 * (1 - keep) / 0.75 + 1e-9) - int(L * 0.45 * (1 - keep) / 0.75 + 1e-9)))
        visible = perms[:, :n].sort(dim=1).values
        params = list(model.patch_embed.parameters()) + [model.cls_token] + list(model.blocks.parameters()) + list(fc_norm.parameters()) + list(model.head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, eps=1e-8)

        def step():
            with autocast():
                x = model.embed(imgs)
                if n < L:
                    x = torch.gather(x, 1, visible[:, :, None].expand(-1, -1, d))
                x = model.with_cls(x)
                for b in model.blocks:
                    x, _ = b(x)
                logits = model.head(fc_norm(x[:, 1:, :].mean(dim=1)))
                loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
    else:
        nm, nt = int(L * 0.45 + 1e-9), int(L * 0.75 + 1e-9)
        masked, visible = perms[:, :nm], perms[:, nt:].sort(dim=1).values
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)

        def step():
            with autocast():
                latent = model.forward_encoder(imgs, visible)
                pred = model.forward_decoder(latent, visible, masked)
                loss = model.forward_loss(imgs, pred, masked) + 0.1 * F.cross_entropy(model.head(latent[:, 0, :]), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

    times = []
    for s in range(steps + 2):
        t = time.perf_counter()
        step()
        if s >= 2:
            times.append(time.perf_counter() - t)
    times.sort()
    if device.type == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(device.index or 0)],
                             capture_output=True, text=True)
        mem = float(smi.stdout.strip() or "nan")
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT {times[len(times) // 2] * 1e3} {mem}")


if __name__ == "__main__":
    main()
