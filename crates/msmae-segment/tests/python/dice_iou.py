"""Independent Dice/IoU on fixed masks (numpy set arithmetic, not pixel counting loops).

Reads JSON [[pred, gt], ...] (flat 0/1 lists) on stdin, writes [[dice, iou], ...].
Both masks empty scores (1, 1), as msmae-segment defines it."""
import json
import sys

import numpy as np

out = []
for pred, gt in json.load(sys.stdin):
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    union = np.logical_or(p, g).sum()
    inter = np.logical_and(p, g).sum()
    if union == 0:
        out.append([1.0, 1.0])
        continue
    out.append([float(2 * inter / (p.sum() + g.sum())), float(inter / union)])
json.dump(out, sys.stdout)
