"""torchvision side of `cargo xtask bench loader`: a DataLoader doing the msmae training
loader's work over the same Parquet image table; prints `RESULT images_per_s`.

usage: bench_loader.py TABLE WORKERS BATCH GRID [IMAGES SIDE CHANNELS]

IMAGES SIDE CHANNELS describe TABLE.raw (the same pixels, raw), read only where pyarrow
is missing (the GPU machine's Python may not have it).

Per image: its row group read with pyarrow (each worker caches the groups it has read),
the raw pixels viewed as a uint8 CHW tensor, torchvision.transforms.v2 RandomResizedCrop
(scale 0.2-1, bilinear, no antialias: the least work torchvision offers, as msmae's
crop does no antialiasing either) + RandomHorizontalFlip + ToDtype(float32, scale) +
Normalize, and an MSMAE mask plan drawn with torch.multinomial over a GRID x GRID weight
map. Shuffled, full batches, WORKERS worker processes (torch uses one thread in each).
Timed from the first batch to the last.
"""
import json
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2


try:
    import pyarrow.parquet as pq
except ImportError:  # the GPU machine's Python may lack it: read TABLE.raw instead
    pq = None


class Table(Dataset):
    def __init__(self, path, grid):
        self.path = path
        self.grid = grid
        self.raw = None
        if pq is None:
            # TABLE.raw: IMAGES x SIDE x SIDE x CHANNELS bytes (argv 5-7)
            self.raw = np.memmap(path[: -len(".parquet")] + ".raw", dtype=np.uint8, mode="r")
            self.n, self.h, self.c = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
            self.w = self.h
            self.labels = [i % 2 for i in range(self.n)]
        else:
            f = pq.ParquetFile(path)
            meta = json.loads(f.schema_arrow.metadata[b"msmae.image_table"])
            self.h, self.w, self.c = meta["height"], meta["width"], meta["channels"]
            self.starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)])
            self.n = int(self.starts[-1])
            self.labels = f.read(columns=["label"]).column("label").to_pylist()
        self.file = None
        self.cache = {}
        self.transform = v2.Compose([
            v2.RandomResizedCrop((self.h, self.w), scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BILINEAR, antialias=False),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.45] * self.c, [0.25] * self.c),
        ])
        L = grid * grid
        self.n_mask, self.n_throw = int(L * 0.45 + 1e-9), int(L * 0.75 + 1e-9) - int(L * 0.45 + 1e-9)

    def __len__(self):
        return self.n

    def group(self, g):
        if g not in self.cache:
            if self.file is None:
                self.file = pq.ParquetFile(self.path)
            self.cache[g] = self.file.read_row_group(g, columns=["pixels"]).column("pixels").to_pylist()
        return self.cache[g]

    def __getitem__(self, i):
        if self.raw is not None:
            per = self.h * self.w * self.c
            px = self.raw[i * per:(i + 1) * per].tobytes()
        else:
            g = int(np.searchsorted(self.starts, i, side="right") - 1)
            px = self.group(g)[i - int(self.starts[g])]
        img = torch.frombuffer(bytearray(px), dtype=torch.uint8).view(self.h, self.w, self.c).permute(2, 0, 1)
        img = self.transform(img)
        weights = torch.rand(self.grid * self.grid)
        chosen = torch.multinomial(weights, self.n_mask + self.n_throw)
        return img, self.labels[i], chosen


def main():
    path, workers, batch, grid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    loader = DataLoader(Table(path, grid), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=False)
    first, images = None, 0
    for imgs, _labels, _plans in loader:
        if first is None:
            first = time.perf_counter()
        else:
            images += imgs.shape[0]
    print("SOURCE raw" if pq is None else "SOURCE pyarrow")
    print(f"RESULT {images / (time.perf_counter() - first)}")


if __name__ == "__main__":
    main()
