#!/usr/bin/env bash
# Throughput benchmark of one docs/design.md §7 workload against its peers, on an idle machine:
#   bash benchmarks/run.sh w1 [OUT.json]   # PLE vs plain PyTorch vs torch-rechub
#   bash benchmarks/run.sh w2 [OUT.json]   # STEM-Net vs plain PyTorch (~12 GiB for the peer)
#   bash benchmarks/run.sh plans [OUT.json] # default sharding plan vs each sharding type, 2 gloo ranks
#   bash benchmarks/run.sh masked-matmul [OUT.json] # fused masked linear + CSRec step vs naive masking
#   bash benchmarks/run.sh row-grad-pool [OUT.json] # PMTRec's pooling + step vs Alg. 1 as written and EW
#                                             (WIDE_ROWS=N: 3 of its 32 tables get N rows)
# Needs the bench extra (installed by scripts/setup.sh). With 2 cores, any other process turns the
# 2-thread OpenMP regions into many-fold slowdowns, so it first waits for idle CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD="${1:?usage: benchmarks/run.sh w1|w2|plans|masked-matmul|row-grad-pool [OUT.json]}"
OUT="${2:-benchmarks/results/${WORKLOAD//-/_}.json}"  # the bench commands' own default names
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
if [ "$WORKLOAD" = w2 ]; then
    avail_gb=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) / 1048576 ))
    if [ "$avail_gb" -lt 14 ]; then
        echo "warning: only ${avail_gb} GiB available; the plain PyTorch peer needs ~12 GiB" >&2
    fi
fi
if [ "$WORKLOAD" = masked-matmul ]; then  # the fused masked linear op and a CSRec step vs the naive ones
    .venv/bin/recsys-mtl bench masked-matmul --output "$OUT" --steps "${STEPS}" --warmup "$WARMUP"
    exit 0
fi
if [ "$WORKLOAD" = row-grad-pool ]; then  # PMTRec: fused pooling and step vs Alg. 1 as written, vs EW
    .venv/bin/recsys-mtl bench row-grad-pool --output "$OUT" --steps "${STEPS}" --warmup "$WARMUP"
    exit 0
fi
if [ "$WORKLOAD" = plans ]; then  # no peers: the default sharding plan vs each sharding type, 2 ranks
    .venv/bin/recsys-mtl bench plans --output "$OUT" --steps "$STEPS" --warmup "$WARMUP" \
        ${WIDE_ROWS:+--wide-rows "$WIDE_ROWS"}
    exit 0
fi
.venv/bin/recsys-mtl bench "$WORKLOAD" --peers --output "$OUT" --steps "$STEPS" --warmup "$WARMUP"
