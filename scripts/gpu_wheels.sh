#!/usr/bin/env bash
# Wheels of softprompt's dependencies that the GPU machines' image lacks (docs/benchmarks.md, "GPU"), for its
# Python 3.12 on x86-64, into .whl/ (kept out of git by .git/info/exclude), so that scripts/gpu_check.sh installs
# them there without a network. Run here, where pip reaches the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl plotly narwhals fastapi starlette uvicorn h11 annotated-doc
du -sh .whl
