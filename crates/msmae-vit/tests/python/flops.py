"""Independent FLOP count (torch.utils.flop_counter) of the reference model's forwards,
for the FLOPs-accounting test. Prints JSON: one count per requested case.

usage: flops.py '[{"kind": "encoder"|"mae", "config": {...}, "visible": n, "masked": m}, ...]'
"""
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, __import__("os").path.dirname(__file__))
from reference import MAE  # noqa: E402


def count(case):
    torch.manual_seed(0)
    c = case["config"]
    model = MAE(c)
    e = c["encoder"]
    imgs = torch.randn(1, e["in_chans"], *e["image_size"])
    L = model.gh * model.gw
    perm = torch.randperm(L)
    visible = perm[: case["visible"]][None]
    masked = perm[case["visible"] : case["visible"] + case["masked"]][None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        latent = model.forward_encoder(imgs, visible)
        if case["kind"] == "mae":
            model.forward_decoder(latent, visible, masked)
        if model.head is not None:  # the CLS head (supervision in MSMAE pre-training)
            model.head(latent[:, 0, :])
    return counter.get_total_flops()


print(json.dumps([count(c) for c in json.loads(sys.argv[1])]))
