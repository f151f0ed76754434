#!/usr/bin/env bash
# Every benchmark behind the README's "Performance" section, one after the other (CPU, one torch
# thread per process: steadier on a shared machine). Results: bench/results/*.txt / *.json / *.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
{ date -u; uname -srm; lscpu | grep -E "Model name|^CPU\(s\)" || true; "$PY" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/machine.txt"
"$PY" bench/fisher_cost.py --threads 1 --rounds 2 --repeats 2 --json "$OUT/fisher_resnet18.json" | tee "$OUT/fisher_resnet18.txt"
"$PY" bench/fisher_cost.py --model resnet34 --threads 1 --rounds 2 --repeats 1 --json "$OUT/fisher_resnet34.json" | tee "$OUT/fisher_resnet34.txt"
"$PY" bench/fisher_cost.py --model timm:tf_efficientnet_lite0 --size 224 --examples 100 --batch 50 \
    --threads 1 --rounds 1 --repeats 1 --paired-rounds 4 --measure plain per_sample batch variational \
    --json "$OUT/fisher_lite0.json" | tee "$OUT/fisher_lite0.txt"
"$PY" bench/embed_cost.py --threads 1 --repeats 2 --json "$OUT/embed_resnet18.json" | tee "$OUT/embed_resnet18.txt"
for estimator in per_sample batch; do
    for allocator in "" --steady-allocator; do
        "$PY" bench/embed_cost.py --examples 1000 --head-epochs 0 --keep-head --all-examples --skip 0 \
            --repeats 9 --estimator "$estimator" $allocator
    done
    "$PY" bench/step_cost.py --estimator "$estimator"
done | tee "$OUT/embed_resnet18_fisher_only_rerun.txt"
"$PY" bench/noise_per_second.py --threads 1 --json "$OUT/noise.json" | tee "$OUT/noise.txt"
"$PY" bench/noise_per_second.py --threads 1 --probe-seed 1 --figure "$OUT/noise_vs_time_probe_seed1.png" \
    --json "$OUT/noise_probe_seed1.json" | tee "$OUT/noise_probe_seed1.txt"
"$PY" bench/fisher_cost.py --rounds 2 --repeats 1 --measure plain per_sample batch | tee "$OUT/fisher_resnet18_all_threads.txt"
"$PY" bench/distances.py | tee "$OUT/distances.txt"
"$PY" bench/lm_diversity.py --threads 2 --repeats 2 --json "$OUT/lm_diversity.json" | tee "$OUT/lm_diversity.txt"
