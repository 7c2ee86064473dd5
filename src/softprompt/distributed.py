"""Data parallelism over processes started by any launcher (`accelerate launch`, `torchrun`, SLURM through them).

The process group comes from accelerate (`PartialState`), from the environment the launcher set. softprompt's loop
does not wrap the model in DDP: its losses (rank loss, the shared-prefix LM loss) do not all go through `forward`,
where DDP's hooks live. What DDP would do it does by hand, on the KB that train: the rows of every batch are split
across ranks, each rank's loss is weighted by its share of the rows, and the prompt's (and head's) gradients are
summed in one all-reduce, so all ranks take the same optimizer step and hold the same prompt. On GPUs each rank
takes its own local GPU and the ranks talk over NCCL; on CPUs over gloo. One process without a launcher gets
`Ranks()`, whose every method returns its input untouched.

With `--fsdp` (or accelerate's FSDP config) the frozen backbone is sharded too (FSDP2, `shard_backbone`): each
rank keeps 1/N of every transformer layer's weights. Every rank then has to run the same forwards in the same
order, since each layer's forward gathers its weights from all ranks: evaluation gives every rank the same
number of rows (`even_shard`) and a rank without rows in a batch runs one at weight 0.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar, cast

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from .errors import SoftpromptError

Row = TypeVar("Row")
Built = TypeVar("Built")


def main_process() -> bool:
    """Whether this process is the one that logs and writes (rank 0, or no launcher), read off the launcher's
    environment without starting a process group, whose backend depends on the device decided later."""
    return os.environ.get("RANK", "0") == "0"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0  # among the processes of this machine
    local_world: int = 1
    sharded: bool = False  # the frozen backbone's layers are split across the ranks (FSDP)
    device: torch.device = torch.device("cpu")  # where this rank computes, and so where its collectives run

    @classmethod
    def from_env(cls, fsdp: bool = False, device: torch.device | None = None) -> "Ranks":
        """This process's place among those a launcher started (WORLD_SIZE > 1), else a single process. Ranks on
        GPUs talk over NCCL (each its own local GPU, `devices.resolve_device`), on CPUs over gloo. The backbone is
        sharded with `fsdp` or when `accelerate launch` runs an FSDP config (ACCELERATE_USE_FSDP)."""
        device = device or torch.device("cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device=device)
        gpu = device.type == "cuda"
        state = PartialState(cpu=not gpu, backend="nccl" if gpu else "gloo")
        atexit.register(_close_group)
        sharded = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
        return cls(state.process_index, state.num_processes, state.local_process_index,
                   int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)), sharded, device)

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics, trackers and log lines."""
        return self.rank == 0

    def shard(self, rows: Sequence[Row]) -> list[Row]:
        """This rank's rows: every world-th one, so the shards differ in size by one at most."""
        return list(rows) if self.world == 1 else list(rows[self.rank::self.world])

    def even_shard(self, rows: Sequence[Row]) -> list[Row]:
        """`shard`, filled up with copies of the first row to the longest shard's length, so that every rank
        scores as many rows (and runs as many batches); the caller keeps the first `len(shard(rows))` scores."""
        part = self.shard(rows)
        return part + [rows[0]] * (-(-len(rows) // self.world) - len(part))

    def weighted(self, loss: torch.Tensor, shard_rows: int, batch_rows: int) -> torch.Tensor:
        """A shard's mean loss scaled so the ranks' gradients sum to the whole batch's mean's gradient."""
        return loss if self.world == 1 else loss * (shard_rows / batch_rows)

    def sum_gradients(self, params: list[torch.nn.Parameter], loss: float) -> float:
        """All-reduce (sum) the parameters' gradients and the weighted loss in one call; returns the batch's loss."""
        if self.world == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([loss], device=self.device)])
        dist.all_reduce(flat)
        start = 0
        for p, g in zip(params, grads):
            p.grad = flat[start:start + g.numel()].view_as(p).to(p.dtype)
            start += g.numel()
        return float(flat[-1])

    def agree_max(self, value: float) -> float:
        """The largest of the ranks' values (elapsed time), so budgets and schedules decide alike everywhere."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather_rows(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Every rank's `part` (scores of its `shard`), back in the order of the rows they were sharded from."""
        if self.world == 1:
            return part
        longest = -(-total // self.world)
        padded = part.new_zeros((longest, *part.shape[1:]))
        padded[:len(part)] = part
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded.contiguous())
        return torch.stack(gathered, 1).flatten(0, 1)[:total]  # row i sits at [i % world][i // world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def in_turns(self, build: Callable[[], Built]) -> Built:
        """`build()` (which loads the whole backbone, then shards it) run by this machine's processes one after
        another, so a machine holds one full copy at a time besides the shards rather than one per process.
        Without sharding, all at once."""
        if not self.sharded:
            return build()
        built: Built | None = None
        for turn in range(self.local_world):
            if turn == self.local_rank:
                built = build()
            dist.barrier()
        assert built is not None
        return built

    def shard_backbone(self, backbone: nn.Module) -> str | None:
        """FSDP2 over the frozen backbone: every transformer layer (each entry of a list of frozen layers)
        becomes a unit of which each rank keeps 1/N, gathered for its forward and for the backward that carries
        the prompt's gradient through it, and freed after each. The module holding each list (LlamaModel, a
        T5 stack, BERT's encoder) is the root that runs them and shards nothing itself: the embeddings, final
        norm and LM head (and a trainable head) stay whole on every rank, since the engine calls them outside
        any stack's forward (the prompt's embedding lookup, the chunked LM loss). Frozen weights take no
        gradient, so nothing but the prompt's gradients is reduced. Returns a line saying what this rank holds
        (None: not sharded)."""
        if not self.sharded:
            return None
        stacks = layer_stacks(backbone)
        if not stacks:
            raise SoftpromptError(f"--fsdp: {type(backbone).__name__} has no list of frozen layers to shard")
        mesh = init_device_mesh(self.device.type, (self.world,))
        for holder, layers in stacks:
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            sharded = {id(p) for p in layers.parameters()}
            fully_shard(holder, mesh=mesh, ignored_params={p for p in holder.parameters() if id(p) not in sharded})
            _first_gather_outside_inference(holder, layers)
        params = list(backbone.parameters())
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        full = sum(p.numel() for p in params)
        return (f"FSDP: rank {self.rank} of {self.world} holds {held:,} of the frozen model's {full:,} weights "
                f"({sum(len(layers) for _, layers in stacks)} layers sharded)")


def _close_group() -> None:
    """Destroy the process group while the interpreter is still whole: a gloo group left to the interpreter's
    teardown can abort the process (SIGABRT, "terminate called without an active exception") after a run that
    succeeded, failing the launcher."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_gather_outside_inference(holder: nn.Module, layers: nn.ModuleList) -> None:
    """Before the stack's first forward (which all ranks run together), gather and free each layer once outside
    inference mode: FSDP allocates the buffers it gathers into at the first gather, and buffers made under
    `torch.inference_mode` (scoring's, e.g. the baselines before step 1) cannot be written by a training step."""
    def gather_once(module: nn.Module, args: tuple) -> None:
        handle.remove()
        with torch.inference_mode(False):
            for layer in layers:
                cast(FSDPModule, layer).unshard()
                cast(FSDPModule, layer).reshard()

    handle = holder.register_forward_pre_hook(gather_once)


def layer_stacks(backbone: nn.Module) -> list[tuple[nn.Module, nn.ModuleList]]:
    """The outermost lists of frozen layers (Llama's `layers`, BERT's `encoder.layer`, T5's two `block`s), each
    with the module holding it: what `shard_backbone` shards."""
    stacks: list[tuple[nn.Module, nn.ModuleList]] = []
    inside: set[int] = set()
    for module in backbone.modules():  # parents before children
        if id(module) in inside:
            continue
        for child in module.children():
            params = list(child.parameters())
            if isinstance(child, nn.ModuleList) and params and not any(p.requires_grad for p in params):
                stacks.append((module, child))
                inside.update(id(m) for m in child.modules())
    return stacks
