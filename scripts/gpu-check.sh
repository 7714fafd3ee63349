#!/usr/bin/env bash
# The prepared GPU check, run on a GPU machine from the repository root:
#
#   bash scripts/gpu-check.sh            # needs gpu-bundle/ in the repository root
#
# That machine has no Rust: `cargo xtask gpu-bundle` (run here, on CPU) leaves msmae,
# bench_model and bench_loader, built against its PyTorch (2.11.0+cu130), in
# gpu-bundle/msmae-gpu.tar.xz. This script loads that machine's own torch/lib, then prints
# one line per figure, each step bounded by a timeout (at most 8 min in all, 4-5 expected):
#   1. parity on CUDA against libtorch CPU, same weights: forward, attention map, losses,
#      one step's gradients; f32 and bf16; composed and efficient attention kernels;
#   2. ViT-B/16 train steps (fine-tune all tokens, 25 % tokens, MAE pre-train) at batch 64
#      and 128 against PyTorch eager (SDPA) on the same GPU: ms/step, images/s, GPU MiB;
#   3. the quickstart pipeline with --device cuda: wall time and the comparison table;
#   4. training-loader throughput on this machine's cores beside torchvision;
#   5. NCCL at world size 1: two small trainings with and without MSMAE_COLLECTIVE=nccl
#      must give identical parameters.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUNDLE_DIR=gpu-bundle
BUNDLE=$BUNDLE_DIR/msmae-gpu.tar.xz
started=$(date +%s)
section() { echo; echo "== $* (t+$(( $(date +%s) - started )) s)"; }
# Run with a time limit; a failure or a timeout is reported and the check goes on.
step() {
    local limit=$1; shift
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "gpu-check: TIMEOUT after ${limit}s: $*"; elif [ "$rc" -ne 0 ]; then echo "gpu-check: FAILED (exit $rc): $*"; fi
    return 0
}

[ -f "$BUNDLE" ] || { echo "gpu-check: $BUNDLE is missing: run \`cargo xtask gpu-bundle\` on the build machine and carry $BUNDLE_DIR"; exit 2; }
PY=${MSMAE_PYTHON:-$(command -v python3 || command -v python)}
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || { echo "gpu-check: no PyTorch under $PY"; exit 2; }
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MSMAE_PYTHON="$PY" MSMAE_REPO="$REPO"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/msmae-gpu.XXXXXX")
if command -v xz >/dev/null; then
    tar -C "$WORK" -xJf "$BUNDLE"
else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE" "$WORK"
fi
BIN=$WORK/bin

section "machine"
cat "$BUNDLE_DIR/MANIFEST" 2>/dev/null
nvidia-smi -L 2>/dev/null || echo "gpu-check: nvidia-smi not found"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
echo "cpus $(nproc)"
step 20 "$BIN/msmae" stages >/dev/null && echo "msmae starts"
step 30 "$BIN/msmae" env

section "1. parity on CUDA (against libtorch CPU, same weights and inputs)"
for precision in f32 bf16; do
    for attention in composed efficient; do
        echo "-- precision $precision, attention $attention"
        MSMAE_CUDA_ATTENTION=$attention step 25 "$BIN/bench_model" --parity --device cuda --precision "$precision"
    done
done

section "2. ViT-B/16 train steps against PyTorch eager (SDPA), same GPU, model and precision"
for batch in 64 128; do
    step 90 "$BIN/bench_model" --device cuda --precision bf16 --only 3,4,5 --batch "$batch" --steps 8
done
step 40 "$BIN/bench_model" --device cuda --precision f32 --only 3 --batch 64 --steps 8

section "3. quickstart pipeline on CUDA"
q0=$(date +%s)
step 100 "$BIN/msmae" run pipelines/quickstart.yaml --device cuda --store "$WORK/store" --lock "$WORK/quickstart.lock"
echo "quickstart wall time: $(( $(date +%s) - q0 )) s"

section "4. training loader (Parquet → crop/flip → normalise → mask plan) beside torchvision"
step 40 "$BIN/bench_loader" --images 2048 --threads "1,$(nproc)"

section "5. NCCL gradient all-reduce at world size 1 (the CUDA path through the same code)"
# A one-GPU machine runs one rank. MSMAE_COLLECTIVE=nccl sends every step's flat gradient
# buffer through ncclAllReduce anyway (a sum over one rank: the identity), so the trained
# parameters must equal the run without it bit for bit. Across several GPUs it stays
# unverified by this check.
mkdir -p "$WORK/nccl"
cat > "$WORK/nccl/dp.yaml" <<'YAML'
name: dp
seed: 5
stages:
  data: { uses: ingest/synthetic, with: { images: 256, size: 32, previews: 1 } }
  supervised: { uses: attention/train-supervised, needs: [data], with: { model: { patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2 }, epochs: 2, batch_size: 32, warmup_epochs: 0, drop_path: 0.1 } }
  mae: { uses: mae/pretrain, needs: [data], with: { model: { patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, decoder_dim: 32, decoder_depth: 1, decoder_heads: 2 }, epochs: 2, batch_size: 32, warmup_epochs: 0, cls_weight: 0.1, figure_images: 1 } }
YAML
for mode in auto nccl; do
    MSMAE_COLLECTIVE=$mode step 90 "$BIN/msmae" run "$WORK/nccl/dp.yaml" --device cuda --store "$WORK/nccl/store-$mode" --lock "$WORK/nccl/$mode.lock" 2>&1 | grep -E "NCCL|gradients|dp:|error" || true
done
for stage in supervised mae; do
    a=$("$BIN/msmae" path "$WORK/nccl/dp.yaml" "$stage" --store "$WORK/nccl/store-auto" --lock "$WORK/nccl/auto.lock" 2>/dev/null)
    b=$("$BIN/msmae" path "$WORK/nccl/dp.yaml" "$stage" --store "$WORK/nccl/store-nccl" --lock "$WORK/nccl/nccl.lock" 2>/dev/null)
    step 30 "$PY" -c '
import sys
from safetensors.numpy import load_file
a, b = load_file(sys.argv[1] + "/model.safetensors"), load_file(sys.argv[2] + "/model.safetensors")
d = max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)
print(f"{sys.argv[3]}: NCCL (world 1) vs no all-reduce, {len(a)} tensors, largest parameter difference {d:.3g}", "OK" if d == 0 else "DIFFERS")
' "$a" "$b" "$stage"
done

section "done"
rm -rf "$WORK"
