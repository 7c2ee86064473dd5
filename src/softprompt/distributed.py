"""Data parallelism over processes started by any launcher (`accelerate launch`, `torchrun`, SLURM through them).

The process group comes from accelerate (`PartialState`), from the environment the launcher set. softprompt's loop
does not wrap the model in DDP: its losses (rank loss, the shared-prefix LM loss) do not all go through `forward`,
where DDP's hooks live. What DDP would do it does by hand, on the KB that train: the rows of every batch are split
across ranks, each rank's loss is weighted by its share of the rows, and the prompt's (and head's) gradients are
summed in one all-reduce, so all ranks take the same optimizer step and hold the same prompt. The loop runs on CPU
(gloo). One process without a launcher gets `Ranks()`, whose every method returns its input untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

Row = TypeVar("Row")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """This process's place among those a launcher started (WORLD_SIZE > 1), else a single process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=True, backend="gloo")  # the loop's tensors live on CPU
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, metrics, trackers and log lines."""
        return self.rank == 0

    def shard(self, rows: Sequence[Row]) -> list[Row]:
        """This rank's rows: every world-th one, so the shards differ in size by one at most."""
        return list(rows) if self.world == 1 else list(rows[self.rank::self.world])

    def weighted(self, loss: torch.Tensor, shard_rows: int, batch_rows: int) -> torch.Tensor:
        """A shard's mean loss scaled so the ranks' gradients sum to the whole batch's mean's gradient."""
        return loss if self.world == 1 else loss * (shard_rows / batch_rows)

    def sum_gradients(self, params: list[torch.nn.Parameter], loss: float) -> float:
        """All-reduce (sum) the parameters' gradients and the weighted loss in one call; returns the batch's loss."""
        if self.world == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads] + [torch.tensor([loss])])
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
        t = torch.tensor([value], dtype=torch.float64)
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
