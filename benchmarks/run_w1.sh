#!/usr/bin/env bash
# W1 (dense-heavy PLE) throughput: recsys_mtl vs plain PyTorch vs torch-rechub, same batches,
# one process, 2 torch threads. Needs the bench extra: pip install -e ".[bench]".
# Run on an otherwise idle machine: 2-thread OpenMP regions slow down many-fold under contention.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/w1.json}"
STEPS="${STEPS:-40}"
WARMUP="${WARMUP:-5}"
# wait_quiet [max_seconds]: wait until the CPUs are >= 90% idle over 2 s (other jobs finished).
wait_quiet() {
    local deadline=$(( $(date +%s) + ${1:-600} ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        read -r _ u1 n1 s1 i1 w1 _ < /proc/stat; sleep 2; read -r _ u2 n2 s2 i2 w2 _ < /proc/stat
        local busy=$(( (u2+n2+s2) - (u1+n1+s1) )) idle=$(( (i2+w2) - (i1+w1) ))
        if [ $(( 100 * idle / (busy + idle + 1) )) -ge 90 ]; then return 0; fi
    done
    echo "warning: machine still busy; timings will be noisy" >&2
}
wait_quiet "${QUIET_TIMEOUT:-900}"
.venv/bin/recsys-mtl bench w1 --peers --output "$OUT" --steps "$STEPS" --warmup "$WARMUP"
