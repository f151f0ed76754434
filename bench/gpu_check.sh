#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run: the tests marked `cuda` (fp16 with a loss scale,
# NaN reporting in fp16), the README's GPU row (ResNet-34 at 224 px in bf16, Fisher pass against
# plain training, images/s) and the depthwise closed forms timed on the GPU. Meant for a machine
# with torch, torchvision, lightning, timm, safetensors, scipy and pytest already installed: it
# runs from the source tree (PYTHONPATH) and installs nothing. About 5 minutes on one H200.
#
#   bash bench/gpu_check.sh                 # outputs in bench/results/gpu/ (or $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-bench/results/gpu}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
status=0
{ date -u; nvidia-smi -L || true; "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
    | tee "$DEST/gpu_machine.txt" || status=1
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m cuda -rs tests/test_precision.py \
    tests/test_reliability.py 2>&1 | tee "$DEST/gpu_tests.txt" || status=1
"$PY" bench/fisher_cost.py --model resnet34 --size 224 --device cuda --precision bf16 --channels-last \
    --examples 2000 --batch 200 --measure plain per_sample batch --rounds 2 --repeats 2 \
    --paired-rounds 4 --json "$DEST/fisher_resnet34_224_cuda_bf16.json" \
    2>&1 | tee "$DEST/fisher_resnet34_224_cuda_bf16.txt" || status=1
"$PY" bench/depthwise_forms.py --device cuda --batch 100 2>&1 | tee "$DEST/depthwise_forms_cuda.txt" \
    || status=1
exit $status
