#!/usr/bin/env bash
# One prepared device run: CUDA tests + GPU benchmarks. Results land in $OUT (or ./gpu_out).
# The lent GPU image has torch but no open_clip and no internet: first, on a machine with PyPI, fill .whl
# (ignored through .git/info/exclude: `echo /.whl/ >> .git/info/exclude`) and carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch==3.3.0 timm==1.0.31 ftfy wcwidth
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tail -15 | tee "$OUT/cuda_tests.log"
for dt in fp32 fp16 bf16; do
  timeout 60 python3 benchmarks/overhead.py --device cuda --dtype "$dt" --repeats 20 2>&1 | grep -v WARNING
  timeout 60 python3 benchmarks/overhead.py --device cuda --dtype "$dt" --repeats 20 --size 448 448 2>&1 | grep -v WARNING
done | tee "$OUT/overhead.log"
timeout 200 python3 benchmarks/suite.py --device cuda --dtypes fp32,fp16,bf16 --images 10 --out "$OUT/benchmarks_cuda.md" 2>&1 | grep -v WARNING | tail -40 | tee "$OUT/suite.log"
timeout 60 python3 benchmarks/pipeline.py --device cuda --repeats 3 2>&1 | grep -v WARNING | tail -20 | tee "$OUT/pipeline.log"
