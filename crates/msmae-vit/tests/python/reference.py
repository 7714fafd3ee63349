"""Independent PyTorch reference for msmae's ViT/MAE (docs/method.md §1-§4), written for the
parity tests. It follows the MAE reference code's structure: the decoder scatters the
visible tokens into a full positional sequence filled with mask tokens, adds the position
table, then keeps the visible and masked positions in positional order (thrown patches
dropped) — a different formulation from the Rust side's gather, so agreement is evidence.

usage: reference.py CASE_DIR
  reads  CASE_DIR/case.json (config, inputs, Rust outputs) and CASE_DIR/w0.safetensors,
         CASE_DIR/w1.safetensors (weights before/after one SGD step with lr 1)
  writes CASE_DIR/report.json (max abs differences per quantity)
"""
import json
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


def sincos_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, gh, gw):
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w first, as MAE
    emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


class Attention(nn.Module):
    # True: F.scaled_dot_product_attention (as timm >= 0.9 runs it; returns no weights);
    # False: the explicit softmax(q k^T) v of the MAE reference code (weights returned).
    fused = False

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if Attention.fused:
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)), None
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)), attn


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))

    def forward(self, x):
        a, w = self.attn(self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x)), w


class PatchEmbed(nn.Module):
    def __init__(self, chans, dim, p):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, p, p)


class MAE(nn.Module):
    def __init__(self, c):
        super().__init__()
        e = c["encoder"]
        self.p, self.chans = e["patch_size"], e["in_chans"]
        self.gh, self.gw = e["image_size"][0] // self.p, e["image_size"][1] // self.p
        d, dd = e["embed_dim"], c["decoder_embed_dim"]
        eps = e["norm_eps"]
        self.patch_embed = PatchEmbed(self.chans, d, self.p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", torch.tensor(sincos_2d(d, self.gh, self.gw), dtype=torch.float32)[None])
        self.blocks = nn.ModuleList([Block(d, e["num_heads"], e["mlp_ratio"], eps) for _ in range(e["depth"])])
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, e["num_classes"]) if e["num_classes"] > 0 else None
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", torch.tensor(sincos_2d(dd, self.gh, self.gw), dtype=torch.float32)[None])
        self.decoder_blocks = nn.ModuleList([Block(dd, c["decoder_num_heads"], e["mlp_ratio"], eps) for _ in range(c["decoder_depth"])])
        self.decoder_norm = nn.LayerNorm(dd, eps=eps)
        self.decoder_pred = nn.Linear(dd, self.p * self.p * self.chans)
        self.norm_pix_loss = c["norm_pix_loss"]

    def patchify(self, imgs):
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // self.p, self.p, w // self.p, self.p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // self.p) * (w // self.p), self.p * self.p * c)

    def embed(self, imgs):
        x = self.patch_embed.proj(imgs).flatten(2).transpose(1, 2)
        return x + self.pos_embed[:, 1:, :]

    def with_cls(self, x):
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(self, imgs, visible):
        x = self.embed(imgs)
        x = torch.gather(x, 1, visible[:, :, None].expand(-1, -1, x.shape[2]))
        x = self.with_cls(x)
        for b in self.blocks:
            x, _ = b(x)
        return self.norm(x)

    def forward_with_attention(self, imgs):
        x = self.with_cls(self.embed(imgs))
        attn = None
        for b in self.blocks:
            x, attn = b(x)
        return self.norm(x), attn

    def forward_decoder(self, latent, visible, masked):
        x = self.decoder_embed(latent)
        b, _, dd = x.shape
        L = self.gh * self.gw
        full = self.mask_token.expand(b, L, dd).clone()
        # (under autocast x is bfloat16 and the mask token float32: scatter needs one dtype)
        full = full.scatter(1, visible[:, :, None].expand(-1, -1, dd), x[:, 1:, :].to(full.dtype))
        full = full + self.decoder_pos_embed[:, 1:, :]
        keep = torch.zeros(b, L, dtype=torch.bool, device=x.device)
        keep.scatter_(1, visible, True)
        keep.scatter_(1, masked, True)
        # the kept positions of each row in positional order (no per-sample loop: one sort)
        pos = torch.arange(L, device=x.device).expand(b, L)
        order = torch.where(keep, pos, pos + L).sort(dim=1).values[:, : visible.shape[1] + masked.shape[1]]
        seq = torch.gather(full, 1, order[:, :, None].expand(-1, -1, dd))
        h = torch.cat([x[:, :1, :] + self.decoder_pos_embed[:, :1, :], seq], dim=1)
        for blk in self.decoder_blocks:
            h, _ = blk(h)
        h = self.decoder_pred(self.decoder_norm(h))[:, 1:, :]
        # predictions of the masked patches, in the order `masked` lists them
        rank = torch.full((b, L), -1, dtype=torch.long, device=x.device)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand(b, -1).contiguous())
        return torch.gather(h, 1, torch.gather(rank, 1, masked)[:, :, None].expand(-1, -1, h.shape[2]))

    def forward_loss(self, imgs, pred, masked):
        target = self.patchify(imgs)
        target = torch.gather(target, 1, masked[:, :, None].expand(-1, -1, target.shape[2]))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return ((pred - target) ** 2).mean(dim=-1).mean()


def attention_map(attn):
    cls = attn[:, :, 0, 1:]
    lo = cls.min(dim=-1, keepdim=True).values
    hi = cls.max(dim=-1, keepdim=True).values
    return ((cls - lo) / (hi - lo).clamp_min(1e-12)).mean(dim=1)


def maxdiff(a, b):
    a = torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(-1)
    b = b.detach().reshape(-1).float()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a - b).abs().max())


def main():
    case_dir = sys.argv[1]
    case = json.load(open(f"{case_dir}/case.json"))
    torch.manual_seed(0)
    model = MAE(case["config"])
    w0 = load_file(f"{case_dir}/w0.safetensors")
    missing, unexpected = model.load_state_dict(w0, strict=False)
    missing = [m for m in missing if m not in ("pos_embed", "decoder_pos_embed")]
    assert not missing and not unexpected, f"names differ: missing {missing}, unexpected {unexpected}"
    inp = case["inputs"]
    imgs = torch.tensor(inp["imgs"], dtype=torch.float32).reshape(inp["imgs_shape"])
    visible = torch.tensor(inp["visible"], dtype=torch.long)
    masked = torch.tensor(inp["masked"], dtype=torch.long)
    labels = torch.tensor(inp["labels"], dtype=torch.long)
    out = case["rust"]
    report = {"names": len(w0)}
    report["pos_embed"] = maxdiff(out["pos_embed"], model.pos_embed)
    report["patchify"] = maxdiff(out["patchify"], model.patchify(imgs))
    latent = model.forward_encoder(imgs, visible)
    report["latent"] = maxdiff(out["latent"], latent)
    pred = model.forward_decoder(latent, visible, masked)
    report["pred"] = maxdiff(out["pred"], pred)
    rec = model.forward_loss(imgs, pred, masked)
    logits = model.head(latent[:, 0, :])
    loss = rec + case["cls_weight"] * F.cross_entropy(logits, labels)
    report["reconstruction_loss"] = abs(out["reconstruction_loss"] - float(rec))
    report["loss"] = abs(out["loss"] - float(loss))
    report["logits"] = maxdiff(out["logits"], logits)
    with torch.no_grad():
        _, attn = model.forward_with_attention(imgs)
        report["attention_map"] = maxdiff(out["attention_map"], attention_map(attn))
    loss.backward()
    w1 = load_file(f"{case_dir}/w1.safetensors")
    grad_diff, worst = 0.0, ""
    for name, p in model.named_parameters():
        rust_grad = w0[name] - w1[name]  # one SGD step with lr 1
        d = float((rust_grad - p.grad).abs().max())
        if d > grad_diff:
            grad_diff, worst = d, name
    report["gradients"] = grad_diff
    report["worst_gradient"] = worst
    report["grad_scale"] = max(float(p.grad.abs().max()) for p in model.parameters())
    json.dump(report, open(f"{case_dir}/report.json", "w"), indent=1)


if __name__ == "__main__":
    main()
