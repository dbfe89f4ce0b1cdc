#!/usr/bin/env bash
# On a machine with a CUDA GPU, in under 10 minutes, every GPU check in one go: the CUDA tests,
# data-parallel training as one process under torchrun (NCCL), the benchmark (the project's path; the
# seed's DataLoader loop is CPU-bound and is measured on the CPU), then the speedrun table (every
# record of bench/speedrun.py, 3 seeds) on the GPU. Figures go to $OUT (or bench/gpu-results/):
# tests.log, ddp.log, bench.json, speedrun.md, speedrun.json.
# Needs data/raw (carried, or extracted with FMNIST_MIRROR or internet) and the package importable.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

if ! ls data/raw/*.gz >/dev/null 2>&1 || [ "$(ls data/raw/*.gz | wc -l)" -ne 4 ]; then
  python stages/extract.py --out data/raw
fi
[ -f data/processed/meta.json ] || python stages/transform.py --raw data/raw --out data/processed

# the tests that need a GPU (they skip elsewhere); a failure is reported, and the figures still follow
python -m pytest -q tests/test_cuda.py tests/test_predict.py -k "cuda or gpu" 2>&1 | tee "$out/tests.log" || true

# DDP as torchrun runs it: one process, NCCL, one epoch on the GPU
printf 'device: cuda\nprocesses: 1\nepochs: 1\n' > "$out/ddp.yaml"
python -m torch.distributed.run --standalone --nproc-per-node 1 stages/train.py --params "$out/ddp.yaml" \
  --model "$out/ddp.pt" --logdir "$out/ddp-runs" --state "$out/ddp-state.pt" 2>&1 | tee "$out/ddp.log" || true

python bench/bench.py --device cuda --json "$out/bench.json" 2>&1 | tee "$out/bench.log"

# the speedrun table on the GPU: every record, 3 seeds each
python bench/speedrun.py --device cuda --json "$out/speedrun.json" 2>&1 | tee "$out/speedrun.md"
