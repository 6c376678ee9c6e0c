#!/usr/bin/env bash
# The README's main job: set up .venv if needed, generate the built-in synthetic dataset if
# absent, train STEM-Net on 2 CPU ranks through a torchx launch, print per-task metrics.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"   # torchx starts torchrun from the venv
DATA="${DATA:-$ROOT/data/synth_recsys}"
OUT="${OUT:-$ROOT/runs/quickstart_stem}"
if [[ ! -f "$DATA/schema.json" ]]; then
  echo "quickstart: generating the synthetic dataset in $DATA ..."
  recsys-mtl data synth recsys --out "$DATA" --seed 0
fi
echo "quickstart: training STEM-Net on 2 CPU ranks with torchx (local_cwd) ..."
torchx --log_level WARNING run -s local_cwd launch/components.py:train --nnodes 1 --nproc_per_node 2 \
  -- --data "$DATA" --model stem --preset quickstart --output-dir "$OUT" "$@"
echo "quickstart: metrics in $OUT/metrics.json, sharding plan in $OUT/sharding_plan.txt"
