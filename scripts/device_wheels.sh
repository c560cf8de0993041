#!/bin/bash
# Downloads into .whl/ (git-ignored) the wheels the device machine's image lacks, for Python 3.12 on
# x86-64: the environment stack (gymnasium, Meta-World, MuJoCo and their small needs). The device image
# has torch, transformers, accelerate, einops, safetensors, numpy and tqdm already.
#   bash scripts/device_wheels.sh        # here, once; then name .whl in the device run's carry
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pyver=$(python3 - <<'PY'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in ("gymnasium", "metaworld", "mujoco", "farama-notifications", "glfw", "pyopengl")))
PY
)
platforms=""
for n in 5 17 24 27 28 31 34 35; do platforms="$platforms --platform manylinux_2_${n}_x86_64"; done
for spec in $pyver; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$spec"
done
ls -la .whl
du -sh .whl
