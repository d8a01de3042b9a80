#!/usr/bin/env bash
# One prepared device run (~8 minutes on one H100/H200): CUDA tests, then the issue-13 throughput set. Results land
# in $OUT (or ./gpu_out); each step has its own timeout so a hang cannot eat the others' time.
# The lent GPU image has torch but no open_clip and no internet: first, on a machine with PyPI, fill .whl
# (ignored through .git/info/exclude: `echo /.whl/ >> .git/info/exclude`) and carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth segment-anything==1.0
#
# Steps and budgets (seconds): install 30 · CUDA tests 150 · suite fp16 (batch 1/8/32, e2e with 4 workers,
# compiled CASS; Trident's Table 8 breakdown with SAM-B) 270 · suite fp32 + bf16 (forwards, NACLIP, CASS;
# batch 1/8) 90 · crop overhead fp16 30.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"

# 1. every CUDA test (sync count, device-path spectral math, segment_many, fp16/bf16 agreement, ...); -s keeps the
#    printed measurements (synchronisations per forward, argmax agreement)
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m cuda tests 2>&1 | grep -v WARNING | tail -40 \
  | tee "$OUT/cuda_tests.log"

# 2. the issue-13 targets: VOC-size images (500×375 → 6 windows of 224²), 21 classes, fp16
timeout 270 python3 benchmarks/suite.py --device cuda --dtypes fp16 --batch-sizes 1,8,32 --images 20 --workers 4 \
  --compile --out "$OUT/benchmarks_cuda_fp16.md" 2>&1 | grep -v WARNING | tail -60 | tee "$OUT/suite_fp16.log"

# 3. the same rows in fp32 and bf16 for CASS and one baseline
timeout 90 python3 benchmarks/suite.py --device cuda --dtypes fp32,bf16 --batch-sizes 1,8 --images 10 \
  --methods clip-forward,vfm-forward,naclip,cass --out "$OUT/benchmarks_cuda_fp32_bf16.md" 2>&1 \
  | grep -v WARNING | tail -40 | tee "$OUT/suite_fp32_bf16.log"

# 4. one crop's overhead (patched CASS ÷ CLIP + VFM), for the table of docs/benchmarks.md
timeout 30 python3 benchmarks/overhead.py --device cuda --dtype fp16 --repeats 20 2>&1 | grep -v WARNING \
  | tee "$OUT/overhead.log"
