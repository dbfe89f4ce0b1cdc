#!/usr/bin/env bash
# On a machine with a CUDA GPU, in under 5 minutes: the benchmark (project path only; the seed's
# DataLoader loop is CPU-bound and measured on the CPU), then fastnet's full training and evaluation.
# Figures go to $OUT (or bench/gpu-results/): bench.json, train.log, eval.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"

[ -d data/processed ] || { python stages/extract.py --out data/raw && python stages/transform.py; }

python bench/bench.py --device cuda --json "$out/bench.json" 2>&1 | tee "$out/bench.log"

# fastnet at its 94% setting (README, "A model worth using"), on the GPU
sed -e 's/^model: .*/model: fastnet/' -e 's/^device: .*/device: cuda/' params.yaml > "$out/params.yaml"
python - "$out/params.yaml" <<'PY'
import sys, yaml
path = sys.argv[1]
p = yaml.safe_load(open(path))
p.update(yaml.safe_load(open("bench/fastnet94.yaml")))
p["device"] = "cuda"
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
PY
/usr/bin/time -v python stages/train.py --params "$out/params.yaml" --model "$out/model.pt" \
  --metrics "$out/train.json" --history "$out/history.csv" --logdir "$out/runs" 2>&1 | tee "$out/train.log"
python stages/evaluate.py --params "$out/params.yaml" --model "$out/model.pt" --metrics "$out/eval.json" \
  --confusion "$out/confusion.csv" --plots "$out"
cat "$out/eval.json"
