#!/usr/bin/env bash
# The device check as one prepared run (the device tool's machine: a CUDA GPU, its image's python3
# with torch and Triton): build the extension, run tools/gpu_evidence.py, then the tests that
# need a device. Everything lands in $1 (default $OUT): log.txt, tests.txt, gpu.json, the
# FL results and the profile. Extra arguments go to gpu_evidence.py.
#
#     bash tools/gpu_check.sh "$OUT" --parts step,topk,encode,fl,profile
set -u -o pipefail
out=${1:-${OUT:-gpu_out}}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    time python3 setup.py build_ext --inplace -j 16 >"$out/build.txt" 2>&1
} >"$out/log.txt" 2>&1
built=$?
cat "$out/log.txt"
if [ $built != 0 ]; then tail -30 "$out/build.txt"; exit 1; fi
rm "$out/build.txt"  # at most 8 files come back
timeout ${EVIDENCE_S:-270} python3 tools/gpu_evidence.py --device cuda --out "$out" "$@" 2>&1 | tee -a "$out/log.txt" | cut -c1-400
timeout ${TESTS_S:-110} python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_triton_step.py \
    tests/test_triton_topk.py tests/test_torch_kernels.py tests/test_torch_golomb.py 2>&1 | tail -25 | tee "$out/tests.txt"
