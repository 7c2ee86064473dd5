"""One rank of the distributed tests (test_distributed.py starts it through `accelerate launch`): trains a tiny
run with softprompt's loop (`loop`; `fsdp` in its options shards the backbone) or transformers' Trainer (`hf`)
and records the prompt this rank holds after each step, its results, and how much of the backbone it holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file


def run(model: str, data: str, output: str, record: str, **options) -> None:
    from softprompt.spec import TrainConfig
    from softprompt.training import prepare

    cfg = TrainConfig(model=model, data=data, output=output, prompt_length=3, max_length=24, batch_size=8,
                      eval_every=2, progress=False, seed=0, **options)
    trainer = prepare(cfg, log=lambda _: None)
    folder, rank, step = Path(record), trainer.ranks.rank, trainer.optimizer.step

    def recorded(*args, **kwargs):
        out = step(*args, **kwargs)
        n = trainer.state["step"] + 1
        save_file({"prompt": trainer.model.prompt.weight.detach().clone()}, str(folder / f"rank{rank}-step{n}.st"))
        return out

    folder.mkdir(parents=True, exist_ok=True)
    trainer.optimizer.step = recorded
    held = held_elements(trainer.model.base)
    result = trainer.train()
    (folder / f"rank{rank}.json").write_text(json.dumps({"steps": result.step, "dev": result.dev,
                                                         "test": result.test, **held}))


def held_elements(backbone) -> dict:
    """How many elements of the backbone's weights this rank holds, of how many: for the first layer's query
    projection and for the whole backbone (an FSDP-sharded weight is a DTensor holding its local shard)."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return p.to_local().numel() if isinstance(p, DTensor) else p.numel()

    query = backbone.model.layers[0].self_attn.q_proj.weight
    params = list(backbone.parameters())
    return {"query_held": local(query), "query_full": query.numel(), "held": sum(map(local, params)),
            "full": sum(p.numel() for p in params)}


def run_hf(model: str, data: str, output: str, record: str, max_steps: int, **options) -> None:
    """PromptTrainer under the launcher: Trainer wraps the model in DDP itself."""
    from transformers import TrainingArguments

    from softprompt.hf_trainer import PromptTrainer, TaskCollator
    from softprompt.spec import TrainConfig
    from softprompt.training import prepare

    run = prepare(TrainConfig(model=model, data=data, output=output, prompt_length=3, max_length=24, progress=False,
                              **options),
                  log=lambda _: None)
    prompted = run.prompted
    args = TrainingArguments(output_dir=output + "/hf", max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=0.1, save_steps=max_steps, save_only_model=True, report_to=[],
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True, seed=0)
    trainer = PromptTrainer(task=prompted, args=args, data_collator=TaskCollator(prompted.encoder),
                            train_dataset=prompted.encoder.encode_all(run.splits.train))
    trainer.train()
    Path(record).mkdir(parents=True, exist_ok=True)
    wrapper = type(trainer.model_wrapped).__name__
    save_file({"prompt": prompted.model.prompt.served().clone()}, f"{record}/rank{args.process_index}-hf.st",
              metadata={"wrapper": wrapper})


if __name__ == "__main__":
    mode, model, data, output, record, options = sys.argv[1:7]
    (run if mode == "loop" else run_hf)(model, data, output, record, **json.loads(options))
