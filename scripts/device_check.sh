#!/bin/bash
# The prepared GPU check, one device call of about 5 minutes (docs/benchmarks.md, "GPU"):
#   here, once:  bash scripts/device_wheels.sh            (the wheels the device image lacks, into .whl/)
#   device run:  command "bash scripts/device_check.sh", carry [".whl"], timeout_s 540
# It writes under $OUT: nvidia-smi.txt, bench_gpu.json and .log (bf16/fp32 tokens/s and MFU per SDPA
# kernel of the ML10/ML45 models, the cached agent on the GPU against the CPU), rollout.log (a real
# Meta-World rollout, agent on the GPU) and tests.log (the model and agent tests on that machine).
set -o pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MUJOCO_GL=egl
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))"
timeout 300 python3 scripts/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
timeout 120 python3 scripts/bench_rollout.py --trials 50 --episodes 2 --episode-length 500 --repeats 1 \
  --agent-threads 1 --skip-recompute --device cuda 2>&1 | tee "$OUT/rollout.log"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_model.py tests/test_icl_agent.py 2>&1 | tail -5 \
  | tee "$OUT/tests.log"
