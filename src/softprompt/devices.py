"""Which device a command runs on: one rule for `train`, `eval`, `predict`, `serve` and the API.

`--device auto` (the default) takes the accelerator when there is one and the CPU otherwise; under a launcher
(`accelerate launch`, `torchrun`) each rank takes its own local GPU (`LOCAL_RANK`). `cpu`, `cuda` (this rank's
GPU) and `cuda:N` say it outright, and a device that is not there is one clear error rather than a crash later.
Everything of a run then lives there: the frozen model, the prompt, batches, the engine's kept keys/values.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import SoftpromptError

DEVICE_HELP = "auto (a GPU when there is one: each launcher rank its own) | cpu | cuda | cuda:N"


def local_rank() -> int:
    """This process's place among the processes of its machine that a launcher started (0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | None = "auto", rank: int | None = None) -> torch.device:
    """The device `name` stands for on this machine, for the process of local rank `rank`."""
    rank = local_rank() if rank is None else rank
    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else \
            torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text != "cuda" and not text.startswith("cuda:"):
        raise SoftpromptError(f"--device must be auto, cpu, cuda or cuda:N, not {name!r}")
    if not torch.cuda.is_available():
        raise SoftpromptError(f"--device {text}: torch sees no CUDA device here (a CPU-only build of torch, or no "
                              "GPU driver); use --device cpu, or auto")
    count = torch.cuda.device_count()
    index = rank if text == "cuda" else _index(text)
    if index >= count:
        raise SoftpromptError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
                              + (f" (local rank {rank} under a launcher)" if text == "cuda" else ""))
    return torch.device("cuda", index)


def _index(text: str) -> int:
    try:
        index = int(text.partition(":")[2])
    except ValueError:
        raise SoftpromptError(f"--device {text}: the index after 'cuda:' must be a number") from None
    if index < 0:
        raise SoftpromptError(f"--device {text}: the index after 'cuda:' must be 0 or more")
    return index


def gpu_supports_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on `device` (made on the host by the collate functions, then moved once)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random states a step draws from (dropout, sampling): the host's, and the GPU's where it runs."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def fitting_rows(device: torch.device, rows: int, before: int) -> int:
    """After running out of memory with `rows` rows a step (`before` bytes held when the step began): about how
    many would fit, from the step's peak allocation over the device's memory; on a CPU, half."""
    if device.type != "cuda":
        return max(1, rows // 2)
    total = torch.cuda.get_device_properties(device).total_memory
    per_row = max(torch.cuda.max_memory_allocated(device) - before, 1) / rows
    return max(1, min(rows // 2 or 1, int((0.9 * total - before) / per_row)))


def activate(device: torch.device, tf32: bool) -> None:
    """Make `device` this process's current CUDA device and allow TF32 matmuls for what stays fp32 there (the
    prompt and a head); nothing to do on a CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
