"""Whether bf16 frozen weights pay on this machine, decided by timing them once per machine.

On CUDA it is whether the device supports bf16. On CPU the flags do not tell: AMX tiles (Intel since Sapphire
Rapids) and avx512_bf16 without AMX (AMD Zen 4) both run bf16 matrix products several times faster than fp32,
and a CPU with neither runs them slower. So a short probe times one decoder-shaped matrix product (a batch of
512 tokens through an MLP projection, 512x576 @ 576x1536) in both dtypes, and the answer is kept in
`precision.json` under softprompt's cache folder (`$SOFTPROMPT_CACHE`, as converted models), keyed by CPU
model, torch version and thread count, so each machine probes once. `python -m softprompt.precision` probes
again and prints the timings (docs/recipe.md, Precision).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .assets import cache_dir
from .errors import SoftpromptError

# a step is more than matrix products (CPU attention stays fp32, norms, casts): a 2.4x product gave 1.4-1.8x steps,
# so under 1.3x bf16 would buy few steps for its accuracy cost (docs/recipe.md, Precision)
MIN_SPEEDUP = 1.3
PROBE_SHAPE = (512, 576, 1536)  # tokens x hidden @ hidden x MLP width: SmolLM2's up projection, batch 8 of 64
PROBE_REPEATS = 5


PRECISIONS = ("bf16", "fp32")  # what `dtype` (a frozen model's precision, for predict and serve) may say


def check_dtype(dtype: str | None) -> str | None:
    """`dtype` if it names a precision; None means each checkpoint's own."""
    if dtype not in (None, *PRECISIONS):
        raise SoftpromptError(f"--dtype must be bf16 or fp32 (or left out: the checkpoint's own), not {dtype!r}")
    return dtype


def cache_file() -> Path:
    return cache_dir() / "precision.json"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the probe's answer depends on: the CPU, torch's kernels and the threads they get."""
    return f"{cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def matmul_seconds(dtype: torch.dtype) -> float:
    """Median seconds of the probe's matrix product in `dtype` (one untimed call first)."""
    rows, width, out = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=generator).to(dtype)
    b = torch.randn(width, out, generator=generator).to(dtype)
    times = []
    for i in range(PROBE_REPEATS + 1):
        start = time.perf_counter()
        a @ b
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe() -> dict[str, Any]:
    """Time the product in fp32 and bf16 on this CPU; the timings, the speed-up and the decision."""
    fp32, bf16 = matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16)
    speedup = fp32 / bf16
    return {"fp32_ms": round(fp32 * 1e3, 3), "bf16_ms": round(bf16 * 1e3, 3), "speedup": round(speedup, 2),
            "bf16": speedup >= MIN_SPEEDUP}


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached answers, or none where the file is missing or not what this module writes."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write_cache(path: Path, cached: dict[str, Any]) -> None:
    """Replace the file atomically; a read-only cache folder only means probing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cached, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass


def cpu_record(refresh: bool = False) -> dict[str, Any]:
    """This machine's probe result, from the cache file or (missing, unreadable, `refresh`) probed and stored."""
    path, key = cache_file(), machine_key()
    cached = _read_cache(path)
    record = cached.get(key)
    if refresh or not isinstance(record, dict) or not isinstance(record.get("bf16"), bool):
        record = probe()
        _write_cache(path, {**cached, key: record})
    return record


def bf16_pays() -> bool:
    """Whether bf16 frozen weights run faster here: CUDA devices that support bf16; CPUs where the probe's
    bf16 product is at least MIN_SPEEDUP times as fast as fp32's."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(cpu_record()["bf16"])


if __name__ == "__main__":
    record = cpu_record(refresh=True)
    rows, width, out = PROBE_SHAPE
    print(f"{machine_key()}: {rows}x{width} @ {width}x{out}, median of {PROBE_REPEATS}: fp32 {record['fp32_ms']} ms, "
          f"bf16 {record['bf16_ms']} ms ({record['speedup']}x); bf16 {'pays' if record['bf16'] else 'does not pay'} "
          f"(threshold {MIN_SPEEDUP}x), stored in {cache_file()}")
