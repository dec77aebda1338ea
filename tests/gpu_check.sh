#!/usr/bin/env bash
# GPU check: every test marked `gpu` and the kernel bench, a few minutes on an H100/H200 (the
# time limits below, 4 + 3 minutes, bound it). What has run on a GPU: the README's GPU section.
#   bash tests/gpu_check.sh            (from anywhere, on a machine with a CUDA GPU and CuPy)
# 1. shows the GPU, CUDA, torch and CuPy it found, builds the CPU emulation (needs g++), and
#    stops unless 4 GiB of GPU memory are free (the largest step, quantizing the 8192x8192
#    bench weight, should peak near 1.5 GiB: that is what it takes on the CPU);
# 2. runs the GPU tests (pytest -m gpu: the kernel bit-identical to the definition and to the
#    emulation for fp32/bf16/fp16, odd sizes, every blocksize; "auto" picks it; side streams;
#    PagedAdamW paging to pinned host memory);
# 3. runs the kernel bench (bandwidth and fraction of peak for 4096^2 and 8192^2 beside
#    bitsandbytes and a plain copy of as many bytes).
# Needs CuPy: pip install -e ".[gpu]" (cupy-cuda12x). Exits non-zero if a test fails or is
# skipped, or if no GPU / CuPy / free memory is there: a "pass" never means "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch (a CUDA build of torch is needed)")
try:
    import cupy
except ImportError as e:
    sys.exit(f'gpu_check: CuPy cannot be imported ({e}): pip install -e ".[gpu]"')
from minqlora.build import EmulationUnavailable
from minqlora.emulate import build_emulation
try:
    build_emulation()          # the GPU tests also compare with the kernel emulated on the CPU
except EmulationUnavailable as e:
    sys.exit(f"gpu_check: {e}")
free, total = torch.cuda.mem_get_info()
print(f"torch {torch.__version__} cuda {torch.version.cuda} | cupy {cupy.__version__} | "
      f"{torch.cuda.get_device_name()}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
if free < 4 * 2**30:
    sys.exit("gpu_check: less than 4 GiB of GPU memory free; not starting")
PY
log=$(mktemp)
timeout 240 python -m pytest tests -m gpu -q -p no:randomly -p no:cacheprovider \
    -o addopts="" -rs 2>&1 | tee "$log"
if grep -qE "skipped|no tests ran" "$log"; then
    echo "gpu_check: some GPU tests were skipped (see above)"; exit 1
fi
timeout 180 python -m minqlora bench --only kernel --quick
echo "gpu_check: all GPU tests passed; bench above"
