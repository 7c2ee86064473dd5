"""One rank of the distributed tests (test_distributed.py starts it through `accelerate launch`): trains a tiny
run and records the prompt this rank holds after every optimizer step."""

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
    result = trainer.train()
    (folder / f"rank{rank}.json").write_text(json.dumps({"steps": result.step, "dev": result.dev}))


if __name__ == "__main__":
    model, data, output, record, options = sys.argv[1:6]
    run(model, data, output, record, **json.loads(options))
