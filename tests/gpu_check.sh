#!/usr/bin/env bash
# GPU check for the CUDA dequantization kernel (issue 3): a few minutes at most on an H100/H200.
#   bash tests/gpu_check.sh            (from the repository root, on a machine with a CUDA GPU)
# 1. shows the GPU, CUDA, torch and CuPy it found; 2. runs the GPU tests (pytest -m gpu: the
# kernel bit-identical to the torch path for fp32/bf16/fp16, odd sizes, every blocksize);
# 3. runs the kernel bench (bandwidth and fraction of peak for 4096^2 and 8192^2 beside
# bitsandbytes). Needs CuPy: pip install -e ".[gpu]" (cupy-cuda12x). Exit status != 0 if a
# test fails or no GPU/CuPy is present (so a "pass" can never mean "skipped").
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible to torch (a CUDA build of torch is needed)"
import cupy
print("torch", torch.__version__, "cuda", torch.version.cuda, "| cupy", cupy.__version__,
      "| device", torch.cuda.get_device_name())
PY
timeout 300 python -m pytest tests/test_cuda.py -m gpu -q -p no:randomly -p no:cacheprovider \
    -o addopts="" -rs 2>&1 | tee /tmp/gpu_check_pytest.txt
if grep -qE "skipped|no tests ran" /tmp/gpu_check_pytest.txt; then
    echo "gpu_check: some GPU tests were skipped (see above)"; exit 1
fi
timeout 240 python -m minqlora bench --only kernel
